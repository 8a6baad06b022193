"""The node's copy of conversation rows (L{imserver.storage.convcopy})."""

from __future__ import annotations

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from imserver.storage.convcopy import ConvCopy
from imserver.storage.model import Committed, ConvRow, ConvState, Message, NewMessage

SID = 7


def _row(uid: int, peer: int, total: int, read: int = 0) -> ConvRow:
    return ConvRow(uid, SID, peer, 100 + total, total, read, total)


def _committed(state: ConvState) -> Committed:
    msg = Message(1, SID, 1, 2, "c", "text", b"\xa1x", 0)
    return Committed(msg, _row(2, 1, 1), _row(1, 2, 0), 1, 1, state=state)


def _new(sender: int = 1, recipient: int = 2) -> NewMessage:
    return NewMessage(2, sender, recipient, "d", "text", b"\xa1y", 0, SID, SID)


def _state(before: dict[int, int], after: dict[int, int], total: int = 1) -> ConvState:
    rows = {(1, SID): _row(1, 2, 0), (2, SID): _row(2, 1, total)}
    return ConvState(before, after, rows, {1: 0, 2: total})


class ConvCopyTests(TestCase):
    def test_known_at_the_heads_it_learnt(self) -> None:
        copy = ConvCopy()
        copy.learn([_committed(_state({1: 0, 2: 0}, {1: 5, 2: 6}))])
        known = copy.known([_new()], {1: 5, 2: 6})
        assert known is not None
        self.assertEqual(known.totals, {1: 0, 2: 1})
        self.assertEqual(known.rows[2, SID].total, 1)

    def test_a_head_moved_elsewhere_is_unknown(self) -> None:
        copy = ConvCopy()
        copy.learn([_committed(_state({1: 0, 2: 0}, {1: 5, 2: 6}))])
        self.assertIsNone(copy.known([_new()], {1: 5, 2: 7}))

    def test_an_older_state_learnt_late_is_ignored(self) -> None:
        copy = ConvCopy()
        copy.learn([_committed(_state({1: 5, 2: 6}, {1: 8, 2: 9}, total=2))])
        copy.learn([_committed(_state({1: 0, 2: 0}, {1: 5, 2: 6}))])
        known = copy.known([_new()], {1: 8, 2: 9})
        assert known is not None
        self.assertEqual(known.totals[2], 2)

    def test_the_oldest_users_are_forgotten(self) -> None:
        copy = ConvCopy(size=2)
        copy.learn([_committed(_state({1: 0, 2: 0}, {1: 5, 2: 6}))])
        state = ConvState({3: 0}, {3: 4}, {(3, SID): _row(3, 1, 1)}, {3: 1})
        copy.learn([_committed(state)])
        self.assertEqual(len(copy), 2)
        self.assertIsNone(copy.known([_new()], {1: 5, 2: 6}))

    def test_a_state_it_cannot_take_forgets_its_users(self) -> None:
        """
        learn runs after the batch committed: an error in it must not fail
        the batch's sends. It logs, and the users read their rows back.
        """
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        copy = ConvCopy()
        copy.learn([_committed(_state({1: 0, 2: 0}, {1: 5, 2: 6}))])
        broken = ConvState({1: 5, 2: 6}, {1: 8, 2: 9}, {}, {1: 0})  # no total for 2
        copy.learn([_committed(broken)])
        self.assertIsNone(copy.known([_new()], {1: 8, 2: 9}))
        self.assertIsNone(copy.known([_new()], {1: 5, 2: 6}))
        self.assertEqual(len(copy), 0)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertTrue(any("conv copy" in str(e.get("log_format")) for e in events))
