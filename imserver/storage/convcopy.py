"""
The node's copy of its recent senders' and recipients' conversation rows
and unread totals, so that a send batch need not read them back after its
writes (issue 13: the read-back was about a tenth of the commit's time, and
its unread total a sum over all of a recipient's conversations).

Why it is safe: every transaction that changes a conversation row's
counters or a user's unread total takes the user's t_user lock and moves
the user's stream head (sends, reads, recalls, hides, clears, mutes; an
ack's delivery position is not part of the copy). So what a batch's commit
left for a user stays exact for as long as the user's head is still the one
that commit gave it, and the next batch's first statement checks exactly
that (L{imserver.storage.sql.queries._head_statement} with C{seen}). A head that moved
elsewhere fails the check and the batch reads the rows back, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from twisted.logger import Logger

from imserver.storage.lru import LRU
from imserver.storage.model import Committed, ConvRow, ConvState, NewMessage, SendOutcome
from imserver.storage.sql.queries import KnownConvs

#: Users whose rows a node keeps (the oldest forgotten first): a forgotten
#: user's next batch reads its rows back once.
CONV_COPY_USERS = 50_000


class _UserConvs:
    __slots__ = ("head", "rows", "total")

    def __init__(self, head: int, total: int, rows: dict[int, ConvRow]) -> None:
        self.head = head
        self.total = total
        self.rows = rows


class ConvCopy:
    """Conversation rows and unread totals per user, each as of a stream head."""

    log = Logger()

    def __init__(self, size: int = CONV_COPY_USERS) -> None:
        self._users: LRU[int, _UserConvs] = LRU(size)

    def __len__(self) -> int:
        return len(self._users)

    def known(self, msgs: Sequence[NewMessage], heads: Mapping[int, int]) -> KnownConvs | None:
        """
        The rows and totals of this batch's users that are as of C{heads}
        (the guesses the batch is checked against), or None if some are
        not: the batch then reads them back.
        """
        rows: dict[tuple[int, int], ConvRow] = {}
        totals: dict[int, int] = {}
        for m in msgs:
            sid = m.session_id
            if sid is None:
                return None
            for uid in (m.sender, m.recipient):
                entry = self._users.get(uid)
                if entry is None or entry.head != heads.get(uid):
                    return None
                row = entry.rows.get(sid)
                if row is None:
                    return None
                rows[uid, sid] = row
                totals[uid] = entry.total
        return KnownConvs(rows, totals)

    def learn(self, outcomes: Iterable[SendOutcome]) -> None:
        """
        Take the state each committed batch left (in commit order). Never
        raises: the batch is committed whatever happens here, so a state
        this cannot take only costs its users one read-back.
        """
        seen: set[int] = set()
        for outcome in outcomes:
            state = outcome.state if isinstance(outcome, Committed) else None
            if state is not None and id(state) not in seen:
                seen.add(id(state))
                try:
                    self._learn(state)
                except Exception:
                    self.log.failure("conv copy: forgetting {users} users", users=len(state.after))
                    self.forget(state.before.keys() | state.after.keys())

    def forget(self, uids: Iterable[int]) -> None:
        """Drop these users: their next batch reads their rows back."""
        for uid in uids:
            self._users.pop(uid, None)

    def _learn(self, state: ConvState) -> None:
        users = self._users
        by_user: dict[int, dict[int, ConvRow]] = {}
        for (uid, sid), row in state.rows.items():
            by_user.setdefault(uid, {})[sid] = row
        for uid, after in state.after.items():
            rows = by_user.get(uid, {})
            entry = users.get(uid)
            if entry is not None and entry.head == state.before.get(uid):
                # Nothing changed the user's rows between the two batches:
                # the other sessions' rows are still exact.
                entry.rows.update(rows)
                entry.head = after
                entry.total = state.totals[uid]
                users.move_to_end(uid)
                continue
            if entry is not None and entry.head >= after:
                continue  # an older batch's state, learnt late
            users.put(uid, _UserConvs(after, state.totals[uid], rows))
