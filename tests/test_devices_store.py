"""
Devices and the user's stream in the storage layer (issue 10), on both
backends: seqs given out with no gap and no repeat, read and recall events,
catch-up pages, device rows (login, revoke, forget, exact names); on MariaDB
also two nodes sending to one user at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from imserver.errors import ErrorCode, ImError
from imserver.services.ids import id_time_ms
from imserver.storage.model import (
    CatchupPage,
    Committed,
    Duplicate,
    NewMessage,
    SendOutcome,
    pack_body,
)
from imserver.storage.sql import queries as q
from imserver.storage.sql.database import Database, Txn
from imserver.storage.sql.engines import create_engine
from imserver.storage.store import FanoutOutcome, Store
from tests.stack import Stack, make_stack
from tests.support import reactor

_uids = itertools.count(70_000)


def _age_txn(txn: Txn, table: str, column: str, uid: int, value: int) -> None:
    txn.execute(f"UPDATE {table} SET {column} = ? WHERE uid = ?", (value, uid))


def _count_txn(txn: Txn, table: str, uid: int) -> int:
    row = txn.query_one(f"SELECT COUNT(*) FROM {table} WHERE uid = ?", (uid,))
    assert row is not None
    return int(row[0])


def _poison_cid_txn(txn: Txn, cid: str) -> None:
    """A trigger that refuses one cid: a message the database refuses (the isolate path)."""
    if txn.engine.kind == "mysql":
        txn.execute(
            "CREATE TRIGGER poison_cid BEFORE INSERT ON t_msg_record_list FOR EACH ROW"
            f" IF NEW.cid = '{cid}' THEN"
            " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poisoned cid'; END IF"
        )
    else:
        txn.execute(
            "CREATE TRIGGER poison_cid BEFORE INSERT ON t_msg_record_list"
            f" WHEN NEW.cid = '{cid}' BEGIN SELECT RAISE(ABORT, 'poisoned cid'); END"
        )


def _stream_of(outcomes: Sequence[SendOutcome], uid: int) -> list[int]:
    """The seqs these committed messages took in C{uid}'s stream."""
    seqs = []
    for c in outcomes:
        if isinstance(c, Committed):
            if c.message.recipient == uid:
                seqs.append(c.recipient_seq)
            if c.message.sender == uid:
                seqs.append(c.sender_seq)
    return seqs


class DeviceStoreContract:
    backend = ""

    async def stack(self, **kw: Any) -> Stack:
        assert isinstance(self, TestCase)
        return await make_stack(self, self.backend, **kw)

    async def users(self, store: Store, n: int) -> list[int]:
        uids = [next(_uids) for _ in range(n)]
        for uid in uids:
            await store.ensure_user(uid)
        return uids

    def message(
        self, store: Store, sender: int, to: int, cid: str | None = None, device: int = 0
    ) -> NewMessage:
        msg_id = store.ids.next_id()
        hint = store.session_hint(sender, to)
        return NewMessage(
            msg_id=msg_id,
            sender=sender,
            recipient=to,
            cid=cid or f"c{msg_id}",
            type="text",
            body=pack_body("hi"),
            ts=id_time_ms(msg_id),
            session_id=hint,
            new_session_id=store.ids.next_id() if hint is None else 0,
            sender_device=device,
        )

    async def send(self, store: Store, msgs: Sequence[NewMessage]) -> list[SendOutcome]:
        """Commit these (submitted in one turn: batched), then finish their fan-out."""
        outcomes: list[SendOutcome] = await gatherResults([store.commit(m) for m in msgs])
        committed = [c for c in outcomes if isinstance(c, Committed)]
        for c in committed:
            store.fanout_started(c)
        if committed:
            await store.fanout(committed)
            store.fanout_finished(committed, FanoutOutcome.DONE)
        return outcomes

    # -- seqs --------------------------------------------------------------------

    async def test_seqs_are_contiguous_per_user(self) -> None:
        stack = await self.stack()
        store = stack.store
        a, b, c = await self.users(store, 3)
        outcomes = []
        # Batches of several messages, and single ones, both directions.
        outcomes += await self.send(store, [self.message(store, a, b) for _ in range(4)])
        outcomes += await self.send(store, [self.message(store, b, a), self.message(store, c, b)])
        outcomes += await self.send(store, [self.message(store, a, b)])
        outcomes += await self.send(store, [self.message(store, b, c) for _ in range(3)])
        for uid in (a, b, c):
            seqs = _stream_of(outcomes, uid)
            self.assertEqual(sorted(seqs), list(range(1, len(seqs) + 1)), uid)
            self.assertEqual(await store.head(uid), len(seqs))
        # In a batch, in order: each message takes the recipient's seq, then the sender's.
        first = [o for o in outcomes[:4] if isinstance(o, Committed)]
        self.assertEqual([o.recipient_seq for o in first], [1, 2, 3, 4])
        self.assertEqual([o.sender_seq for o in first], [1, 2, 3, 4])

    async def test_duplicates_take_no_seq(self) -> None:
        stack = await self.stack()
        store = stack.store
        a, b = await self.users(store, 2)
        [first] = await self.send(store, [self.message(store, a, b, cid="same")])
        assert isinstance(first, Committed)
        self.assertEqual((first.sender_seq, first.recipient_seq), (1, 1))
        # A repeat in the same batch, and a repeat of an earlier batch's cid
        # beside fresh messages (the duplicate-key retry inside the commit).
        outcomes = await self.send(
            store,
            [
                self.message(store, a, b),
                self.message(store, a, b, cid="same"),
                self.message(store, a, b, cid="twice"),
                self.message(store, a, b, cid="twice"),
                self.message(store, a, b),
            ],
        )
        kinds = [type(o).__name__ for o in outcomes]
        self.assertEqual(kinds, ["Committed", "Duplicate", "Committed", "Duplicate", "Committed"])
        self.assertEqual(sorted(_stream_of([first, *outcomes], b)), [1, 2, 3, 4])
        self.assertEqual(await store.head(a), 4)
        self.assertEqual(await store.head(b), 4)
        [again] = await self.send(store, [self.message(store, a, b, cid="twice")])
        self.assertIsInstance(again, Duplicate)
        self.assertEqual(await store.head(b), 4)

    async def test_a_refused_message_takes_no_seq(self) -> None:
        stack = await self.stack()
        store = stack.store
        a, b = await self.users(store, 2)
        outcomes = await self.send(
            store,
            [self.message(store, a, b), self.message(store, a, 10**15), self.message(store, a, b)],
        )
        self.assertEqual(_stream_of(outcomes, a), [1, 2])
        self.assertEqual(await store.head(a), 2)

    async def test_isolated_batches_keep_the_stream_whole(self) -> None:
        """A message the database refuses: the batch is committed in halves;
        the refused message takes no seq, the others take 1..n in order."""
        stack = await self.stack()
        store = stack.store
        a, b = await self.users(store, 2)
        await store.db.run("poison", _poison_cid_txn, "poison")
        self.flushLoggedErrors()
        outcomes = await self.send(
            store,
            [self.message(store, a, b)]
            + [self.message(store, a, b, cid=c) for c in ("x1", "poison", "x2", "x3")],
        )
        kinds = [type(o).__name__ for o in outcomes]
        self.assertEqual(kinds, ["Committed", "Committed", "Refused", "Committed", "Committed"])
        self.assertEqual(_stream_of(outcomes, b), [1, 2, 3, 4])
        self.assertEqual(_stream_of(outcomes, a), [1, 2, 3, 4])
        self.assertEqual(await store.head(b), 4)
        page = await store.catchup(b, 0, 0, 10)
        self.assertEqual([e.seq for e in page.events], [1, 2, 3, 4])

    async def test_read_and_recall_events(self) -> None:
        stack = await self.stack()
        store = stack.store
        a, b = await self.users(store, 2)
        m1, m2 = await self.send(store, [self.message(store, a, b), self.message(store, a, b)])
        assert isinstance(m1, Committed) and isinstance(m2, Committed)
        sid = m1.message.session_id
        read = await store.read(b, sid, m2.message.msg_id)
        self.assertEqual((read.reader_seq, read.peer_seq), (3, 3))
        again = await store.read(b, sid, m2.message.msg_id)
        self.assertIsNone(again.advanced_to)
        self.assertEqual((again.reader_seq, again.peer_seq), (None, None))
        recall = await store.recall(a, m1.message.msg_id, 3_600_000)
        self.assertEqual((recall.sender_seq, recall.recipient_seq), (4, 4))
        repeated = await store.recall(a, m1.message.msg_id, 3_600_000)
        self.assertTrue(repeated.already)
        self.assertEqual((repeated.sender_seq, repeated.recipient_seq), (None, None))
        self.assertEqual(await store.head(a), 4)
        self.assertEqual(await store.head(b), 4)
        # A refused recall gives out nothing either.
        with self.assertRaises(ImError) as e:
            await store.recall(b, m2.message.msg_id, 3_600_000)
        self.assertEqual(e.exception.code, ErrorCode.FORBIDDEN)
        self.assertEqual(await store.head(b), 4)

    # -- catch-up ----------------------------------------------------------------

    async def test_catchup_pages(self) -> None:
        stack = await self.stack()
        store = stack.store
        a, b = await self.users(store, 2)
        phone = (await store.login(b, "phone", "ios")).device
        laptop = (await store.login(b, "laptop", "web")).device
        m1, m2 = await self.send(store, [self.message(store, a, b), self.message(store, a, b)])
        [m3] = await self.send(store, [self.message(store, b, a, device=phone.id)])
        assert isinstance(m1, Committed) and isinstance(m2, Committed)
        assert isinstance(m3, Committed)
        sid = m1.message.session_id
        await store.read(b, sid, m2.message.msg_id)  # b: seq 4
        await store.recall(a, m2.message.msg_id, 3_600_000)  # b: seq 5
        self.assertEqual(await store.head(b), 5)

        page = await store.catchup(b, phone.id, 0, 100)
        # m2 is recalled (its recall event is there), m3 is the phone's own send.
        self.assertEqual(
            [(e.seq, e.kind, e.msg_id) for e in page.events],
            [
                (1, "msg", m1.message.msg_id),
                (4, "read", m2.message.msg_id),
                (5, "recall", m2.message.msg_id),
            ],
        )
        self.assertEqual((page.seq, page.more, page.head), (5, False, 5))
        msg = page.events[0]
        self.assertEqual(msg.message, m1.message)
        self.assertEqual((msg.by, msg.session_id), (a, sid))
        self.assertEqual((page.events[1].by, page.events[2].by), (b, a))

        other = await store.catchup(b, laptop.id, 0, 100)
        self.assertEqual([e.seq for e in other.events], [1, 3, 4, 5])
        self.assertEqual(other.events[1].message, m3.message)

        # Full pages: the position is the last event's seq; short: the head.
        pages: list[CatchupPage] = []
        after = 0
        while True:
            p = await store.catchup(b, laptop.id, after, 2)
            pages.append(p)
            after = p.seq
            if not p.more:
                break
        self.assertEqual([[e.seq for e in p.events] for p in pages], [[1, 3], [4, 5]])
        self.assertEqual([(p.seq, p.more) for p in pages], [(3, True), (5, False)])
        # A short page passes over the own send: position = head.
        p = await store.catchup(b, phone.id, 1, 1)
        self.assertEqual(([e.seq for e in p.events], p.seq, p.more), ([4], 4, True))
        p = await store.catchup(b, phone.id, 5, 10)
        self.assertEqual((p.events, p.seq, p.more), ((), 5, False))

    async def test_catchup_page_of_exactly_limit_events_is_the_last(self) -> None:
        stack = await self.stack()
        store = stack.store
        a, b = await self.users(store, 2)
        await self.send(store, [self.message(store, a, b) for _ in range(3)])
        page = await store.catchup(b, 0, 0, 3)
        self.assertEqual(([e.seq for e in page.events], page.seq, page.more), ([1, 2, 3], 3, False))
        page = await store.catchup(b, 0, 0, 2)
        self.assertEqual(([e.seq for e in page.events], page.seq, page.more), ([1, 2], 2, True))
        # A position past the head (a confused client): nothing, and the head.
        page = await store.catchup(b, 0, 10, 5)
        self.assertEqual((page.events, page.seq, page.more, page.head), ((), 3, False, 3))

    async def test_catchup_records_a_monotonic_cursor(self) -> None:
        stack = await self.stack()
        store = stack.store
        a, b = await self.users(store, 2)
        phone = (await store.login(b, "phone", "ios")).device
        await self.send(store, [self.message(store, a, b) for _ in range(6)])
        await store.catchup(b, phone.id, 5, 10)
        row = await store.device(b, "phone")
        assert row is not None
        self.assertEqual(row.cursor, 5)
        await store.catchup(b, phone.id, 2, 10)
        row = await store.device(b, "phone")
        assert row is not None
        self.assertEqual(row.cursor, 5)
        # Another user's device id moves nothing.
        await store.catchup(a, phone.id, 6, 10)
        row = await store.device(b, "phone")
        assert row is not None
        self.assertEqual(row.cursor, 5)

    async def test_catchup_refuses_bad_input(self) -> None:
        stack = await self.stack()
        for after, limit in ((-1, 10), (0, 0), (0, 501)):
            with self.assertRaises(ImError) as e:
                await stack.store.catchup(1, 0, after, limit)
            self.assertEqual(e.exception.code, ErrorCode.INVALID)

    async def test_ack_moves_the_cursor(self) -> None:
        stack = await self.stack()
        store = stack.store
        a, b = await self.users(store, 2)
        phone = (await store.login(b, "phone", "ios")).device
        outcomes = await self.send(store, [self.message(store, a, b) for _ in range(3)])
        first = outcomes[0]
        assert isinstance(first, Committed)
        acked = await store.ack(b, [first.message.msg_id], phone.id, 2)
        self.assertEqual(acked, [(first.message.msg_id, a, first.message.session_id)])
        self.assertEqual((await store.device(b, "phone")).cursor, 2)  # type: ignore[union-attr]
        self.assertEqual(await store.ack(b, [], phone.id, 1), [])
        self.assertEqual((await store.device(b, "phone")).cursor, 2)  # type: ignore[union-attr]
        await store.ack(a, [], phone.id, 3)  # not a's device
        self.assertEqual((await store.device(b, "phone")).cursor, 2)  # type: ignore[union-attr]
        # Several in one batch: the largest wins.
        await gatherResults([store.ack(b, [], phone.id, s) for s in (3, 1)])
        self.assertEqual((await store.device(b, "phone")).cursor, 3)  # type: ignore[union-attr]

    # -- devices -----------------------------------------------------------------

    async def test_login_creates_the_device_at_the_head(self) -> None:
        stack = await self.stack()
        store = stack.store
        a, b = await self.users(store, 2)
        await self.send(store, [self.message(store, a, b) for _ in range(3)])
        login = await store.login(b, "phone", "ios 1.0")
        self.assertTrue(login.created)
        self.assertEqual((login.head, login.device.cursor), (3, 3))
        self.assertEqual((login.device.uid, login.device.device), (b, "phone"))
        self.assertEqual(login.device.client, "ios 1.0")
        self.assertEqual(login.profile.uid, b)
        await self.send(store, [self.message(store, a, b)])
        again = await store.login(b, "phone", "ios 1.1")
        self.assertFalse(again.created)
        self.assertEqual(again.device.id, login.device.id)
        self.assertEqual((again.head, again.device.cursor, again.device.client), (4, 3, "ios 1.1"))
        self.assertGreaterEqual(again.device.last_seen, login.device.last_seen)
        # A new user, and logins of one turn (one batch), the same device twice included.
        c = next(_uids)
        logins = await gatherResults(
            [ensureDeferred(store.login(c, d, "x")) for d in ("one", "two", "one")]
        )
        self.assertEqual([lg.head for lg in logins], [0, 0, 0])
        self.assertEqual(logins[0].device.id, logins[2].device.id)
        self.assertEqual(sorted(lg.created for lg in logins), [False, True, True])
        self.assertEqual([d.device for d in await store.devices(c)], ["one", "two"])
        self.assertEqual((await store.ensure_user(c)).uid, c)

    async def test_login_refuses_bad_device_names(self) -> None:
        stack = await self.stack()
        for device in ("", "x" * 65, "\ud800"):
            with self.assertRaises(ImError) as e:
                await stack.store.login(1, device, "")
            self.assertEqual(e.exception.code, ErrorCode.INVALID)
        # The client string is informational: cut and cleaned, never refused.
        login = await stack.store.login(next(_uids), "x" * 64, "c\ud800" + "y" * 200)
        self.assertEqual(login.device.client, "c?" + "y" * 126)
        self.assertEqual(login.device.device, "x" * 64)

    async def test_device_names_compare_exactly(self) -> None:
        stack = await self.stack()
        store = stack.store
        [a] = await self.users(store, 1)
        names = ["phone", "phone ", "Phone", "phöne", "télé" * 16]
        ids = {(await store.login(a, name, "")).device.id for name in names}
        self.assertEqual(len(ids), len(names))
        self.assertEqual(sorted(d.device for d in await store.devices(a)), sorted(names))
        row = await store.device(a, "phone ")
        assert row is not None
        self.assertEqual(row.device, "phone ")
        self.assertIsNone(await store.device(a, "PHONE"))

    async def test_revoke(self) -> None:
        stack = await self.stack()
        store = stack.store
        [a] = await self.users(store, 1)
        await store.login(a, "phone", "")
        before = int(reactor.seconds() * 1000)
        row = await store.revoke_device(a, "phone")
        assert row is not None
        self.assertGreaterEqual(row.revoked_at, before)
        self.assertIsNone(await store.revoke_device(a, "tablet"))
        # A later login keeps the revocation (the chat layer decides).
        login = await store.login(a, "phone", "")
        self.assertEqual(login.device.revoked_at, row.revoked_at)

    async def test_a_refused_login_does_not_change_the_revoked_device(self) -> None:
        """
        Regression (review): a login with a token older than the device's
        revocation (refused by the chat layer) still wrote its client string
        and lastSeen: whoever held a revoked token could rewrite what the
        device list shows. A token from a later second refreshes them.
        """
        stack = await self.stack()
        store = stack.store
        [a] = await self.users(store, 1)
        await store.login(a, "phone", "app/1")
        row = await store.revoke_device(a, "phone")
        assert row is not None
        old_token = row.revoked_at / 1000 - 60
        for issued in (old_token, row.revoked_at // 1000, None):
            login = await store.login(a, "phone", "evil/9", issued)
            self.assertEqual(
                (login.device.client, login.device.last_seen), ("app/1", row.last_seen)
            )
        later = row.revoked_at // 1000 + 1
        login = await store.login(a, "phone", "app/2", later)
        self.assertEqual(login.device.client, "app/2")

    async def test_touch_and_forget(self) -> None:
        stack = await self.stack()
        store = stack.store
        a, b, c = await self.users(store, 3)
        old = (await store.login(b, "old", "")).device
        kept = (await store.login(b, "kept", "")).device
        [m] = await self.send(store, [self.message(store, a, b)])
        assert isinstance(m, Committed)
        await store.read(b, m.message.session_id, m.message.msg_id)
        long_ago = int(reactor.seconds() * 1000) - 40 * 86_400_000
        await store.db.run("t", _age_txn, "t_device", "lastSeen", b, long_ago)
        await store.db.run("t", _age_txn, "t_event", "ts", b, long_ago)
        # Chunked IN lists: unknown ids beside the real one change nothing.
        await store.touch_devices([kept.id, *range(1, 1200)])
        await store.touch_devices([])
        # Several chunks of the sweep.
        self.patch(q, "FORGET_CHUNK", 2)
        for i in range(5):
            await store.login(c, f"d{i}", "")
        await store.db.run("t", _age_txn, "t_device", "lastSeen", c, long_ago)
        self.assertEqual(await store.forget_devices(30 * 86_400_000), 6)
        self.assertEqual([d.id for d in await store.devices(b)], [kept.id])
        self.assertEqual(await store.devices(c), [])
        self.assertEqual(await store.db.run("t", _count_txn, "t_event", b), 0)
        self.assertEqual(await store.db.run("t", _count_txn, "t_event", a), 1)
        self.assertEqual(await store.forget_devices(30 * 86_400_000), 0)
        # A forgotten device logs in as a new one.
        again = await store.login(b, "old", "")
        self.assertTrue(again.created)
        self.assertNotEqual(again.device.id, old.id)

    async def test_heads_seen_before_are_checked_not_trusted(self) -> None:
        """
        The send batch takes the heads this node saw last as its guess (one
        round trip less); a head that moved meanwhile (here: set behind the
        node's back, as another node's commit would) is found by the script's
        first statement, nothing is written with a wrong seq, and the batch
        goes on with the locked heads: the stream stays 1, 2, 3... per user.
        """
        stack = await self.stack()
        store = stack.store
        a, b = await self.users(store, 2)
        [m1] = await self.send(store, [self.message(store, a, b)])
        assert isinstance(m1, Committed)
        self.assertEqual(store._heads.get(b), m1.recipient_seq)
        # The guess is right: the next batch needs no locking read.
        reads: list[int] = []
        real = q.lock_streams

        def counting(txn: Any, uids: Any) -> Any:
            reads.append(1)
            return real(txn, uids)

        self.patch(q, "lock_streams", counting)
        [m2] = await self.send(store, [self.message(store, a, b)])
        assert isinstance(m2, Committed)
        self.assertEqual((m2.recipient_seq, m2.sender_seq), (2, 2))
        self.assertEqual(reads, [])
        # Another writer moved b's head (a read on another node, say).
        await store.db.run("t", _bump_txn, b, 5)
        [m3] = await self.send(store, [self.message(store, a, b)])
        assert isinstance(m3, Committed)
        self.assertEqual((m3.recipient_seq, m3.sender_seq), (8, 3))
        self.assertEqual(reads, [1])
        self.assertEqual(await store.head(b), 8)
        self.assertEqual(await store.head(a), 3)

    async def _rows_now(self, store: Store, keys: Sequence[tuple[int, int]]) -> Any:
        rows = await store.db.run("t", q._conv_rows, keys)
        return {(r.uid, r.session_id): r for r in rows}

    async def test_rows_are_computed_not_read_back(self) -> None:
        """
        Issue 13: a batch whose users' heads are the ones this node's last
        batch left computes their conversation rows and unread totals from
        its copy (no read-back); they equal the rows in the database. A read
        (any change of a row moves the user's head) makes the next batch read
        them back again, with the right unread counts.
        """
        stack = await self.stack()
        store = stack.store
        a, b, c = await self.users(store, 3)
        # The read-backs of send commits (other readers of rows not counted).
        reads: list[int] = []
        writing: list[bool] = []
        real, real_write = q._conv_rows_statements, q._write_messages

        def counting(keys: Any) -> Any:
            if writing:
                reads.append(len(keys))
            return real(keys)

        def write(*args: Any, **kw: Any) -> Any:
            writing.append(True)
            try:
                return real_write(*args, **kw)
            finally:
                writing.pop()

        self.patch(q, "_conv_rows_statements", counting)
        self.patch(q, "_write_messages", write)
        await self.send(store, [self.message(store, a, b)])
        [m2] = await self.send(store, [self.message(store, c, b)])
        self.assertEqual(reads, [2, 2])  # first sends: nothing known yet
        # b sends to a and c, a and c to b, in one batch and then another.
        for _ in range(2):
            batch = await self.send(
                store,
                [
                    self.message(store, b, a),
                    self.message(store, a, b),
                    self.message(store, c, b),
                    self.message(store, b, c),
                    self.message(store, a, b),
                ],
            )
        self.assertEqual(reads, [2, 2])
        last = batch[-1]
        assert isinstance(last, Committed)
        sab = last.message.session_id
        assert isinstance(m2, Committed)
        sbc = m2.message.session_id
        keys = [(a, sab), (b, sab), (b, sbc), (c, sbc)]
        now = await self._rows_now(store, keys)
        self.assertEqual(last.recipient_row, now[b, sab])
        self.assertEqual(last.sender_row, now[a, sab])
        for o in batch:
            assert isinstance(o, Committed)
            if o.state is not last.state:
                continue  # an earlier commit (the batcher started it at once)
            sid = o.message.session_id
            self.assertEqual(o.recipient_row, now[o.message.recipient, sid])
            self.assertEqual(o.sender_row, now[o.message.sender, sid])
        # b: 1 + 1 + 2 x (2 + 1) received; a: 2 x 1; c: 2 x 1.
        self.assertEqual(last.total_unread, 8)
        self.assertEqual(await store.db.run("t", q.total_unread_txn, b), 8)
        # b reads everything of the a-b session: the next batch reads back.
        await store.read(b, sab, last.message.msg_id)
        [m3] = await self.send(store, [self.message(store, a, b)])
        assert isinstance(m3, Committed)
        self.assertEqual(reads, [2, 2, 2])
        self.assertEqual((m3.unread, m3.total_unread), (1, 4))
        now = await self._rows_now(store, [(a, sab), (b, sab)])
        self.assertEqual((m3.recipient_row, m3.sender_row), (now[b, sab], now[a, sab]))
        # And the one after it needs nothing read again.
        [m4] = await self.send(store, [self.message(store, a, b)])
        assert isinstance(m4, Committed)
        self.assertEqual(reads, [2, 2, 2])
        self.assertEqual((m4.unread, m4.total_unread), (2, 5))
        self.assertEqual(m4.recipient_row.version, m3.recipient_row.version + 1)

    async def test_a_user_only_in_a_duplicate_is_not_learnt(self) -> None:
        """
        Regression (found by tests.test_properties): a batch whose only
        message of one user was a duplicate (a retried cid) wrote nothing for
        that user, but the batch's state listed the user's locked head
        without a total, and learning it raised KeyError: the whole batch
        failed.
        """
        stack = await self.stack()
        store = stack.store
        a, b, c = await self.users(store, 3)
        await self.send(store, [self.message(store, a, b, cid="x")])
        await self.send(store, [self.message(store, c, b)])
        # The first of a turn's sends is committed at once, alone: the other
        # two make the batch.
        _, again, other = await self.send(
            store,
            [
                self.message(store, c, b),
                self.message(store, a, b, cid="x"),
                self.message(store, c, b),
            ],
        )
        self.assertIsInstance(again, Duplicate)
        assert isinstance(other, Committed)
        self.assertEqual((other.unread, other.total_unread), (3, 4))

    async def test_rows_changed_elsewhere_are_read_back(self) -> None:
        """
        A row changed behind this node's back (another node's read, which
        moves the user's head too) is never taken from the copy: the head
        check fails and the batch reads the rows it reports.
        """
        stack = await self.stack()
        store = stack.store
        a, b = await self.users(store, 2)
        await self.send(store, [self.message(store, a, b)])
        [m1] = await self.send(store, [self.message(store, a, b)])
        assert isinstance(m1, Committed)
        self.assertEqual(m1.unread, 2)
        sid = m1.message.session_id
        await store.db.run("t", _read_all_txn, b, sid)
        await store.db.run("t", _bump_txn, b, 1)
        [m2] = await self.send(store, [self.message(store, a, b)])
        assert isinstance(m2, Committed)
        self.assertEqual((m2.unread, m2.total_unread), (1, 1))
        now = await self._rows_now(store, [(b, sid)])
        self.assertEqual(m2.recipient_row, now[b, sid])

    async def test_a_revoked_device_is_not_forgotten(self) -> None:
        """
        Regression (review): the forget sweep deleted revoked devices too, so
        after forget_days the revocation was gone and an old token signed the
        device in again, as a new device.
        """
        stack = await self.stack()
        store = stack.store
        [a] = await self.users(store, 1)
        await store.login(a, "stolen", "")
        await store.login(a, "plain", "")
        # Many unseen devices before it in the lastSeen order: the chunks step over it.
        self.patch(q, "FORGET_CHUNK", 2)
        for i in range(3):
            await store.login(a, f"x{i}", "")
        assert await store.revoke_device(a, "stolen") is not None
        long_ago = int(reactor.seconds() * 1000) - 40 * 86_400_000
        await store.db.run("t", _age_txn, "t_device", "lastSeen", a, long_ago)
        self.assertEqual(await store.forget_devices(30 * 86_400_000), 4)
        [kept] = await store.devices(a)
        self.assertEqual(kept.device, "stolen")
        self.assertTrue(kept.revoked_at)


class EmbeddedDeviceStoreTests(DeviceStoreContract, TestCase):
    backend = "embedded"


class MariaDBDeviceStoreTests(DeviceStoreContract, TestCase):
    backend = "redis"

    async def test_two_nodes_sending_to_one_user(self) -> None:
        """
        Two nodes (two stores, two connection pools on one database) send to
        one recipient at once: the recipient's seqs are 1..N with no gap and
        no repeat, and every catch-up taken meanwhile sees a prefix of the
        stream (no later seq visible before an earlier one).
        """
        one = await self.stack(node_id=1)
        engine = create_engine(one.store.db.engine.target)  # type: ignore[attr-defined]
        db = Database(reactor, engine, name="node2", max_connections=8)
        two = await make_stack(self, "redis", node_id=2, db=db)
        senders = await self.users(one.store, 8)
        [to] = await self.users(one.store, 1)
        seen: list[CatchupPage] = []
        sending = True

        async def poll() -> None:
            while sending:
                seen.append(await two.store.catchup(to, 0, 0, 500))

        async def node(stack: Stack, mine: Sequence[int]) -> list[SendOutcome]:
            out: list[SendOutcome] = []
            for _ in range(6):
                out += await self.send(
                    stack.store,
                    [self.message(stack.store, s, to) for s in mine for _ in range(2)],
                )
            return out

        poller = ensureDeferred(poll())
        results = await gatherResults(
            [ensureDeferred(node(one, senders[:4])), ensureDeferred(node(two, senders[4:]))]
        )
        sending = False
        await poller
        outcomes = [o for part in results for o in part]
        self.assertTrue(all(isinstance(o, Committed) for o in outcomes))
        seqs = _stream_of(outcomes, to)
        self.assertEqual(sorted(seqs), list(range(1, len(outcomes) + 1)))
        for s in senders:
            mine = _stream_of(outcomes, s)
            self.assertEqual(mine, list(range(1, len(mine) + 1)))
        for page in [*seen, await one.store.catchup(to, 0, 0, 500)]:
            self.assertEqual([e.seq for e in page.events], list(range(1, page.head + 1)))
            self.assertEqual(page.seq, page.head)
        page = await one.store.catchup(to, 0, 0, 500)
        self.assertEqual(page.head, len(outcomes))
        by_seq = {o.recipient_seq: o.message.msg_id for o in outcomes if isinstance(o, Committed)}
        self.assertEqual([e.msg_id for e in page.events], [by_seq[e.seq] for e in page.events])


def _read_all_txn(txn: Any, uid: int, sid: int) -> None:
    txn.execute(
        "UPDATE t_conv SET readCount = totalCount, version = version + 1"
        " WHERE uid = ? AND sessionId = ?",
        (uid, sid),
    )


def _bump_txn(txn: Any, uid: int, n: int) -> None:
    txn.execute("UPDATE t_user SET streamSeq = streamSeq + ? WHERE uid = ?", (n, uid))
