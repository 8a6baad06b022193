"""
Edits and per-user hiding in storage (docs/protocol.md, "Editing and hiding").

The SQL is the truth; the hot store is told by invalidation only (rare ops,
no scripts of their own): an edit forgets the cached message, so every read
path (session windows, convs' last, sync) reads its body from SQL again; a
hide or a clear forgets the hider's copy (pending, conversation rows), which
is reloaded from SQL. Each write commits with an outbox row naming what to
invalidate, so a crash before the invalidation is repaired by the replay.

Hidden messages are filtered per reader. Users who never hid anything (most)
read as before, from the hot copies: whether a user hid something is cached
on each node (L{EditStore.hides}); a "never hid" entry is dropped by a hide
on this node, by the other nodes' broadcast of one (L{EditStore.forget}),
when the user's hot copy is reloaded here (a hide invalidates it in the
shared hot store), and after L{CLEAN_TTL} seconds whatever happened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import attrs

from imserver.errors import ErrorCode, ImError
from imserver.storage.lru import LRU
from imserver.storage.model import (
    EVENT_CLEAR,
    EVENT_EDIT,
    EVENT_HIDE,
    RECORD_NORMAL,
    RECORD_RECALLED,
    Message,
    Outbox,
)
from imserver.storage.sql import queries as q
from imserver.storage.sql.database import ROWS, CommitUnknown, Statement, Txn, marks, values

if TYPE_CHECKING:
    from imserver.storage.store import Store

#: Seconds a node trusts that a user never hid anything, without a broadcast.
CLEAN_TTL = 60.0
#: Users remembered per node as having hidden something, or not.
CACHE_SIZE = 200_000
#: Messages per hide request.
MAX_HIDE = 100


@attrs.frozen
class EditResult:
    #: The message as stored now (its body and C{edited}).
    message: Message
    #: False: it had this body already (nothing written, no seqs).
    changed: bool
    sender_seq: int | None = None
    recipient_seq: int | None = None


@attrs.frozen
class HideResult:
    #: The messages this request hid (not hidden before), ascending.
    msg_ids: tuple[int, ...]
    #: The hide event's seq in the hider's stream; None if nothing changed.
    seq: int | None = None
    #: (msg_id, sender) of those the hider received: no longer pending.
    pending: tuple[tuple[int, int], ...] = ()
    #: True: all of them were hidden already (a retry): C{msg_ids} and C{seq}
    #: are the earlier hide's (the latest one's seq), told again to the devices.
    repeat: bool = False


@attrs.frozen
class ClearResult:
    session_id: int
    #: Everything up to this msg id is hidden for the user (0: nothing yet).
    up_to: int
    #: The clear event's seq; None if nothing changed (cleared up to there already).
    seq: int | None = None
    #: (msg_id, sender) of the messages it took out of pending.
    pending: tuple[tuple[int, int], ...] = ()
    #: True: nothing committed since the last clear (a retry): C{seq} is its seq.
    repeat: bool = False


#: What a hide or a clear is given (msg ids, a session), and what it answers.
A = TypeVar("A")
H = TypeVar("H", HideResult, ClearResult)


# ---------------------------------------------------------------------------
# Transactions (lock order as in queries.py: t_user, messages, t_conv)


def edit_txn(
    txn: Txn,
    uid: int,
    msg_id: int,
    body: bytes,
    now_ms: int,
    window_ms: int,
    outbox: Outbox | None = None,
) -> EditResult:
    """
    Replace a message's body (its sender's, within the window). C{edited}
    is max(now, previous + 1): strictly increasing per message, in commit
    order (the row is locked). An edit is an event of both streams.
    """
    found = txn.query_one(
        "SELECT senderUid, recipientUid FROM t_msg_record_list WHERE id = ?", (msg_id,)
    )
    if found is None:
        raise ImError(ErrorCode.NOT_FOUND, "no such message")
    sender, recipient = int(found[0]), int(found[1])
    if uid != sender:
        if uid == recipient:
            raise ImError(ErrorCode.FORBIDDEN, "only the sender may edit a message")
        raise ImError(ErrorCode.FORBIDDEN, "you are not part of this message")
    heads = q.lock_streams(txn, (sender, recipient))
    row = txn.query_one(
        f"SELECT {q.MSG_COLUMNS} FROM t_msg_record_list WHERE id = ?{txn.engine.for_update}",
        (msg_id,),
    )
    if row is None:
        raise ImError(ErrorCode.NOT_FOUND, "no such message")
    message = q._message(row)
    if message.status == RECORD_RECALLED:
        raise ImError(ErrorCode.NOT_FOUND, "this message was recalled")
    if message.body == body:
        # A retry, or an edit to what it says already: nothing to do.
        return EditResult(message, changed=False)
    if now_ms - message.ts > window_ms:
        raise ImError(ErrorCode.TOO_LATE, f"messages can be edited for {window_ms // 1000}s")
    edited = max(now_ms, message.edited + 1)
    txn.execute(
        "UPDATE t_msg_record_list SET body = ?, edited = ? WHERE id = ?", (body, edited, msg_id)
    )
    moved = {u: heads[u] for u in (sender, recipient) if u in heads}
    sender_seq, recipient_seq = q._take_seqs(moved, (sender, recipient))
    sid = message.session_id
    script = [
        q._event_statement(
            [
                (sender, sender_seq, EVENT_EDIT, sid, msg_id, uid, now_ms),
                (recipient, recipient_seq, EVENT_EDIT, sid, msg_id, uid, now_ms),
            ]
        )
    ]
    if moved:
        script.append(q._head_statement(moved))
    if outbox is not None:
        script.append(
            q.outbox_statement(
                attrs.evolve(outbox, users=(sender, recipient), sessions=(sid,), msgs=(msg_id,))
            )
        )
    txn.script(script)
    return EditResult(
        attrs.evolve(message, body=body, edited=edited),
        changed=True,
        sender_seq=sender_seq,
        recipient_seq=recipient_seq,
    )


def _recount_read(txn: Txn, uid: int, session_ids: Sequence[int]) -> None:
    """
    Hidden and cleared messages count as read: recount the user's readCount
    (the caller holds the user's t_user lock, taken before its first plain read).
    """
    for sid in sorted(set(session_ids)):
        row = txn.query_one(
            "SELECT readUpTo, totalCount FROM t_conv WHERE uid = ? AND sessionId = ?", (uid, sid)
        )
        if row is None:
            continue
        read = int(row[1]) - q.unread_after_txn(txn, uid, sid, int(row[0]))
        txn.execute(
            "UPDATE t_conv SET readCount = ?, version = version + 1"
            " WHERE uid = ? AND sessionId = ?",
            (read, uid, sid),
        )


def hide_txn(
    txn: Txn, uid: int, msg_ids: Sequence[int], now_ms: int, outbox: Outbox | None = None
) -> HideResult:
    """
    Hide messages of the user's own sessions from the user (the peer keeps
    them): a t_hidden row each, their pending rows deleted (as if acked),
    unread recounted (they count as read). One event of the user's stream
    for the messages not hidden before; none if there are none.
    """
    wanted = sorted(set(msg_ids))
    # Lock order (as an ack's): t_user, then t_pending, then t_conv; a plain read
    # of t_conv is exact under the t_user lock (only a clear, holding it, writes
    # clearedUpTo/clearedSeq). The hider's stream is the only one it writes: its
    # t_user row first, before any plain read (on MySQL that starts the REPEATABLE
    # READ snapshot; taken after the lock it sees every send and read of the user:
    # the recount is right).
    heads = q.lock_streams(txn, (uid,))
    rows = txn.query_in(
        "SELECT id, sessionId, senderUid, recipientUid, senderSeq, recipientSeq"
        " FROM t_msg_record_list WHERE id IN (%s)",
        wanted,
    )
    sessions = {int(r[0]): int(r[1]) for r in rows}
    senders = {int(r[0]): int(r[2]) for r in rows if int(r[3]) == uid}
    # The message's seq in the hider's stream (None: older than streams).
    seqs = {int(r[0]): r[4] if int(r[2]) == uid else r[5] for r in rows}
    for r in rows:
        if uid not in (int(r[2]), int(r[3])):
            raise ImError(ErrorCode.FORBIDDEN, f"message {int(r[0])} is not in your conversations")
    missing = [i for i in wanted if i not in sessions]
    if missing:
        raise ImError(ErrorCode.NOT_FOUND, f"no such message: {missing[0]}")
    hidden = {
        int(r[0]): int(r[1])
        for r in txn.query_in(
            "SELECT msgId, seq FROM t_hidden WHERE uid = ? AND msgId IN (%s)", wanted, (uid,)
        )
    }
    received = sorted(senders)
    if received:
        # Before any t_conv row is locked (an ack deletes t_pending, then updates
        # t_conv): as if acked, whether or not hidden before (no harm if so).
        txn.execute(
            f"DELETE FROM t_pending WHERE uid = ? AND msgId IN ({marks(len(received))})",
            (uid, *received),
        )
    cleared = {
        int(r[0]): (int(r[1]), int(r[2]))
        for r in txn.query_in(
            "SELECT sessionId, clearedUpTo, clearedSeq FROM t_conv WHERE uid = ?"
            " AND sessionId IN (%s)",
            sorted(set(sessions.values())),
            (uid,),
        )
    }
    new = [
        i
        for i in wanted
        if i not in hidden and not _was_cleared(i, seqs[i], cleared.get(sessions[i], (0, 0)))
    ]
    if not new:
        if hidden:
            # A retry (its reply lost?): answer and tell as the first try did.
            return HideResult(tuple(sorted(hidden)), max(hidden.values()), repeat=True)
        return HideResult(())
    [seq] = q._take_seqs(heads, (uid,))
    rows_sql, args = values([(uid, i, sessions[i], seq) for i in new])
    script = [
        Statement(f"INSERT INTO t_hidden (uid, msgId, sessionId, seq) VALUES {rows_sql}", args),
        q._event_statement([(uid, seq, EVENT_HIDE, sessions[new[0]], new[0], uid, now_ms)]),
        q._head_statement({uid: seq}),
    ]
    if outbox is not None:
        script.append(q.outbox_statement(attrs.evolve(outbox, users=(uid,))))
    txn.script(script)
    _recount_read(txn, uid, [sessions[i] for i in new])
    pending = tuple((i, senders[i]) for i in new if i in senders)
    return HideResult(tuple(new), seq, pending)


def _was_cleared(msg_id: int, seq: int | None, clear: tuple[int, int]) -> bool:
    """Whether a clear (clearedUpTo, clearedSeq) hides the message (queries.CLEARED)."""
    up_to, clear_seq = clear
    return msg_id <= up_to and (clear_seq == 0 or (seq or 0) <= clear_seq)


def clear_txn(
    txn: Txn, uid: int, session_id: int, now_ms: int, outbox: Outbox | None = None
) -> ClearResult:
    """
    Hide everything of a session up to its last message for the user
    (clearedUpTo), as L{hide_txn} does for single messages.
    """
    # As in read_txn: a locking read of the members before the t_user lock.
    members = txn.query_one(
        f"SELECT uidLow, uidHigh FROM t_session WHERE id = ?{txn.engine.for_share}",
        (session_id,),
    )
    if members is None:
        raise ImError(ErrorCode.NOT_FOUND, "no such session")
    if uid not in (int(members[0]), int(members[1])):
        raise ImError(ErrorCode.FORBIDDEN, "you are not part of this session")
    # The t_user lock serialises the clear with every send, read and clear of the
    # user's (each takes it): what is committed now is exactly what has a seq in
    # the user's stream at or below the clear's; a plain read of t_conv is exact.
    heads = q.lock_streams(txn, (uid,))
    row = txn.query_one(
        "SELECT clearedUpTo, clearedSeq, peerUid FROM t_conv WHERE uid = ? AND sessionId = ?",
        (uid, session_id),
    )
    if row is None:
        raise ImError(ErrorCode.NOT_FOUND, "no such session")
    cleared, cleared_seq, peer = (int(v) for v in row)
    # Msg ids are not commit order: the highest id, not the conv's lastMsgId.
    top = txn.query_one("SELECT MAX(id) FROM t_msg_record_list WHERE sessionId = ?", (session_id,))
    last = max(int(top[0]) if top is not None and top[0] is not None else 0, cleared)
    if last == 0:
        return ClearResult(session_id, 0)
    if cleared_seq and not _committed_since(txn, uid, session_id, cleared_seq):
        # A retry (its reply lost?), or nothing new: answer as the last clear did.
        return ClearResult(session_id, cleared, cleared_seq, repeat=True)
    [seq] = q._take_seqs(heads, (uid,))
    # Before the t_conv row is locked (an ack deletes t_pending, then updates t_conv).
    pending = txn.query(
        "SELECT msgId FROM t_pending WHERE uid = ? AND senderUid = ? AND msgId <= ?",
        (uid, peer, last),
    )
    txn.execute(
        # One session per pair: the peer's pending messages are this session's.
        "DELETE FROM t_pending WHERE uid = ? AND senderUid = ? AND msgId <= ?",
        (uid, peer, last),
    )
    script = [
        Statement(
            "UPDATE t_conv SET clearedUpTo = ?, clearedSeq = ? WHERE uid = ? AND sessionId = ?",
            (last, seq, uid, session_id),
        ),
        q._event_statement([(uid, seq, EVENT_CLEAR, session_id, last, uid, now_ms)]),
        q._head_statement({uid: seq}),
    ]
    if outbox is not None:
        script.append(q.outbox_statement(attrs.evolve(outbox, users=(uid,))))
    txn.script(script)
    _recount_read(txn, uid, (session_id,))
    return ClearResult(session_id, last, seq, tuple((int(r[0]), peer) for r in pending))


def _committed_since(txn: Txn, uid: int, session_id: int, seq: int) -> bool:
    """Whether a message of the session has a seq in the user's stream above C{seq}."""
    for side in ("recipient", "sender"):
        found = txn.query_one(
            f"SELECT 1 FROM t_msg_record_list WHERE {side}Uid = ? AND {side}Seq > ?"
            " AND sessionId = ? LIMIT 1",
            (uid, seq, session_id),
        )
        if found is not None:
            return True
    return False


def hides_txn(txn: Txn, uid: int) -> bool:
    """Whether the user hid or cleared anything, ever."""
    hidden = txn.query_one("SELECT 1 FROM t_hidden WHERE uid = ? LIMIT 1", (uid,))
    if hidden is not None:
        return True
    cleared = txn.query_one(
        "SELECT 1 FROM t_conv WHERE uid = ? AND clearedUpTo > 0 LIMIT 1", (uid,)
    )
    return cleared is not None


#: What a reader may see of a session: not recalled, not cleared, not hidden.
_VISIBLE = (
    "m.sessionId = ? AND m.recordStatus = ? AND NOT EXISTS (SELECT 1 FROM t_conv c WHERE"
    f" c.uid = ? AND c.sessionId = ? AND {q.CLEARED}) AND NOT EXISTS (SELECT 1 FROM t_hidden h"
    " WHERE h.uid = ? AND h.msgId = m.id)"
)


def visible_history_txn(
    txn: Txn, uid: int, session_id: int, before: int | None, limit: int
) -> list[Message]:
    """history_txn for a user who hides messages: the ones it may see."""
    rows = txn.query(
        f"SELECT {q.MSG_COLUMNS} FROM t_msg_record_list m WHERE {_VISIBLE} AND m.id < ?"
        " ORDER BY m.id DESC LIMIT ?",
        (
            session_id,
            RECORD_NORMAL,
            uid,
            session_id,
            uid,
            before if before is not None else 2**63 - 1,
            limit,
        ),
    )
    return [q._message(r) for r in rows]


def last_visible_txn(txn: Txn, uid: int, session_ids: Sequence[int]) -> dict[int, Message]:
    """last_normal_txn for a user who hides messages (one script)."""
    if not session_ids:
        return {}
    results = txn.script(
        [
            Statement(
                f"SELECT {q.MSG_COLUMNS} FROM t_msg_record_list m WHERE {_VISIBLE}"
                " ORDER BY m.id DESC LIMIT 1",
                (sid, RECORD_NORMAL, uid, sid, uid),
                ROWS,
            )
            for sid in session_ids
        ]
    )
    return {
        sid: q._message(rows[0]) for sid, rows in zip(session_ids, results, strict=True) if rows
    }


# ---------------------------------------------------------------------------
# The store's side


class EditStore:
    """Edits, hides and clears for L{Store} (SQL, then invalidation)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # uid -> when this node learned the user never hid anything.
        self._clean: LRU[int, float] = LRU(CACHE_SIZE)
        # Users known to hide something (a hide is never undone).
        self._hiders: LRU[int, bool] = LRU(CACHE_SIZE)
        # Read by metrics and tests.
        self.hides_checked = 0

    def _now(self) -> float:
        return float(self._store._reactor.seconds())

    # -- who hides ------------------------------------------------------------

    async def hides(self, uid: int) -> bool:
        """Whether the user's reads must filter hidden messages (cached, see module)."""
        if uid in self._hiders:
            return True
        learned = self._clean.get(uid)
        if learned is not None and self._now() - learned < CLEAN_TTL:
            return False
        asked = self._now()
        self.hides_checked += 1
        found = await self._store.db.run("hides", hides_txn, uid)
        if found:
            self._hiders.put(uid, True)
        elif uid not in self._hiders:
            # (Unless a hide came meanwhile: forget() marked it a hider.)
            self._clean.put(uid, asked)
        return found

    def reloaded(self, uid: int) -> None:
        """
        The user's hot copy is being reloaded here (it was invalidated: a
        hide or a clear on any node does that through the shared hot store):
        ask SQL again whether it hides messages, should the broadcast be lost.
        """
        self._clean.pop(uid, None)

    def forget(self, uid: int) -> None:
        """The user hid something (here or on another node): filter its reads."""
        self._hiders.put(uid, True)
        self._clean.pop(uid, None)

    # -- writes -----------------------------------------------------------------

    async def edit(
        self,
        uid: int,
        msg_id: int,
        body: bytes,
        window_ms: int,
        then: Callable[[EditResult], None] | None = None,
    ) -> EditResult:
        """
        Edit a message. After the reply: the cached message is forgotten,
        then C{then} runs (the pushes: a node reading after one finds the
        new body). A repeated edit (same body) forgets it again and runs
        C{then} again if the message was edited (the retry of an edit whose
        reply was lost still tells the devices; clients keep the highest
        C{edited}).
        """
        store = self._store
        outbox = store._outbox("edit")
        try:
            result = await store.db.run(
                "edit", edit_txn, uid, msg_id, body, store._now_ms(), window_ms, outbox
            )
        except CommitUnknown as e:
            # Maybe edited: serve the message and the sender from SQL until repaired.
            store._hot_failed((uid,), (), (msg_id,), str(e))
            raise
        m = result.message
        store.saw_seq(m.sender, result.sender_seq)
        store.saw_seq(m.recipient, result.recipient_seq)
        tell = then if (result.changed or m.edited) else None
        store._run_after_reply(
            self._edit_follow_up(outbox.id if result.changed else 0, result, tell),
            (m.sender, m.recipient),
            (m.session_id,),
        )
        return result

    async def _edit_follow_up(
        self, outbox_id: int, result: EditResult, then: Callable[[EditResult], None] | None
    ) -> None:
        m = result.message
        users, sessions, msgs = (m.sender, m.recipient), (m.session_id,), (m.msg_id,)
        try:
            step = self._store.hot.invalidate((), (), msgs)
            # The invalidation also marks the message stale for a while: a send's
            # fan-out still running on another node does not cache the old body.
            await self._store._follow_up(outbox_id, step, users, sessions, msgs)
        finally:
            if then is not None:
                then(result)

    async def hide(
        self, uid: int, msg_ids: Sequence[int], then: Callable[[HideResult], None] | None = None
    ) -> HideResult:
        """Hide messages; after the reply the user's copy is forgotten, then C{then} runs."""
        return await self._hiding("hide", hide_txn, uid, msg_ids, then)

    async def clear(
        self, uid: int, session_id: int, then: Callable[[ClearResult], None] | None = None
    ) -> ClearResult:
        """Clear a conversation for the user (as L{hide})."""
        return await self._hiding("clear", clear_txn, uid, session_id, then)

    async def _hiding(
        self,
        kind: str,
        txn_func: Callable[[Txn, int, A, int, Outbox | None], H],
        uid: int,
        what: A,
        then: Callable[[H], None] | None,
    ) -> H:
        """A hide or a clear: SQL first with an outbox row, then the user's hot copy goes."""
        store = self._store
        outbox = store._outbox(kind)
        try:
            result = await store.db.run(kind, txn_func, uid, what, store._now_ms(), outbox)
        except CommitUnknown as e:
            self.forget(uid)
            store._hot_failed((uid,), (), (), str(e))
            raise
        if result.seq is not None:
            tell = None if then is None else partial(then, result)
            self._hidden(uid, result.seq, 0 if result.repeat else outbox.id, result.pending, tell)
        return result

    def _hidden(
        self,
        uid: int,
        seq: int,
        outbox_id: int,
        pending: Sequence[tuple[int, int]],
        then: Callable[[], None] | None,
    ) -> None:
        """The user's copy (pending, unread) is reloaded from SQL; its reads filter."""
        store = self._store
        self.forget(uid)
        store.saw_seq(uid, seq)
        store._run_after_reply(self._hide_follow_up(outbox_id, uid, pending, then), (uid,))

    async def _hide_follow_up(
        self,
        outbox_id: int,
        uid: int,
        pending: Sequence[tuple[int, int]],
        then: Callable[[], None] | None,
    ) -> None:
        store = self._store
        try:
            await store._follow_up(outbox_id, self._unpend(uid, pending), (uid,), (), ())
        finally:
            if then is not None:
                then()

    async def _unpend(self, uid: int, pending: Sequence[tuple[int, int]]) -> None:
        """
        As an ack would (its tombstones keep a late fan-out of these from
        making them pending again), then forget the user's copy: the unread
        counts are reloaded from SQL.
        """
        if pending:
            await self._store.hot.ack([(uid, pending)])
        await self._store.hot.invalidate((uid,), ())

    # -- reads --------------------------------------------------------------------

    async def history(
        self, uid: int, session_id: int, before: int | None, limit: int
    ) -> list[Message]:
        return await self._store.db.run(
            "visible_history", visible_history_txn, uid, session_id, before, limit
        )

    async def last_messages(self, uid: int, session_ids: Sequence[int]) -> dict[int, Message]:
        return await self._store.db.run("last_visible", last_visible_txn, uid, session_ids)
