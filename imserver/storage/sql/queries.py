"""
Transaction functions: the SQL side of every operation.

Each C{*_txn(txn, ...)} runs inside one transaction in a pool thread (see
L{imserver.storage.sql.database}) and returns plain records from
L{imserver.storage.model}. Business rules that SQL must enforce atomically
(dedupe, first use of a session, monotonic reads, the recall window) live
here; everything else stays in the layers above.

Lock order, to keep deadlocks rare (InnoDB still detects them and the
transaction is retried): the t_user rows of the transaction's users first,
in ascending uid (C{FOR UPDATE}, or the send batch's checking UPDATE: they
hold each user's stream head, see L{lock_streams}), then message rows, then
conversation rows; conversation rows in (uid, sessionId) order. A
transaction that must find its users first (a read, a recall) reads without
locking, then locks in that order. t_device rows are only locked by their
own single-row writes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

import attrs

from imserver.errors import ErrorCode, ImError
from imserver.storage.model import (
    EVENT_KINDS,
    EVENT_MUTE,
    EVENT_READ,
    EVENT_RECALL,
    RECORD_NORMAL,
    RECORD_RECALLED,
    CatchupPage,
    Committed,
    ConvRow,
    ConvState,
    DeadLetter,
    DeviceRow,
    DueNotification,
    Duplicate,
    Login,
    Message,
    MuteResult,
    NewMessage,
    Outbox,
    Positions,
    Profile,
    ReadResult,
    RecallResult,
    Refused,
    SendOutcome,
    StreamEvent,
    UserSnapshot,
    chunks,
    session_pair,
)
from imserver.storage.sql.database import (
    ROWS,
    CommitConfirmed,
    Statement,
    Txn,
    marks,
    values,
)

MSG_COLUMNS = "id, sessionId, senderUid, recipientUid, cid, msgType, body, ts, recordStatus, edited"
#: Columns of MSG_COLUMNS: a query's extra columns come after them.
MSG_WIDTH = 10
CONV_COLUMNS = "uid, sessionId, peerUid, lastMsgId, totalCount, readCount, version"


def cid_text(value: Any) -> str:
    """
    A cid as stored: bytes from MySQL's VARBINARY (it compares exactly, as
    Python does; see migration 0003), text from SQLite.
    """
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8")
    return str(value)


def _message(row: Sequence[Any]) -> Message:
    return Message(
        msg_id=int(row[0]),
        session_id=int(row[1]),
        sender=int(row[2]),
        recipient=int(row[3]),
        cid=cid_text(row[4]),
        type=str(row[5]),
        body=bytes(row[6]),
        ts=int(row[7]),
        status=int(row[8]),
        edited=int(row[9]),
    )


def _conv(row: Sequence[Any]) -> ConvRow:
    return ConvRow(*(int(v) for v in row[:7]))


# ---------------------------------------------------------------------------
# Users


def ensure_users_txn(txn: Txn, uids: Sequence[int], now_ms: int) -> list[Profile]:
    """Create the users that do not exist yet; return every profile."""
    txn.executemany(
        f"{txn.engine.insert_ignore} INTO t_user (uid, nickname, avatar, createTime, updateTime,"
        " version) VALUES (?, ?, ?, ?, ?, ?)",
        [(uid, "", "", now_ms, now_ms, 0) for uid in sorted(set(uids))],
    )
    return get_profiles_txn(txn, uids)


def get_profiles_txn(txn: Txn, uids: Sequence[int]) -> list[Profile]:
    rows = txn.query_in(
        "SELECT uid, nickname, avatar, version FROM t_user WHERE uid IN (%s)", sorted(set(uids))
    )
    return [Profile(int(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]


# ---------------------------------------------------------------------------
# The users' streams


def lock_streams(txn: Txn, uids: Iterable[int]) -> dict[int, int]:
    """
    Lock these users' t_user rows (ascending uid, the first locks of the
    transaction: see the lock order above) and return each existing user's
    stream head. Whoever holds the lock gives out the user's next seqs, so
    per user seq order is commit order, with no gaps.
    """
    wanted = sorted(set(uids))
    if not wanted:
        return {}
    rows = txn.query_in(
        f"SELECT uid, streamSeq FROM t_user WHERE uid IN (%s) ORDER BY uid{txn.engine.for_update}",
        wanted,
    )
    return {int(r[0]): int(r[1]) for r in rows}


def _head_statement(heads: Mapping[int, int], seen: Mapping[int, int] | None = None) -> Statement:
    """
    Set these users' stream heads (their rows are locked: L{lock_streams}).

    With C{seen} (heads seen earlier, not locked yet), the statement locks
    the rows (ascending uid, as L{lock_streams}) and sets each head only
    where it is still the one seen: where it moved it is set to NULL, which
    the NOT NULL column refuses (strict sql_mode on MySQL; always on
    SQLite): the statement fails and changes nothing. One statement of the
    script instead of a locking read of its own (measured: 2.6-3 ms of a
    16 ms group commit) and a second UPDATE of the same rows.
    """
    uids = sorted(heads)
    if seen is None:
        cases = " ".join("WHEN ? THEN ?" for _ in uids)
        pairs = [v for uid in uids for v in (uid, heads[uid])]
    else:
        cases = " ".join("WHEN ? THEN CASE WHEN streamSeq = ? THEN ? END" for _ in uids)
        pairs = [v for uid in uids for v in (uid, seen[uid], heads[uid])]
    return Statement(
        f"UPDATE t_user SET streamSeq = CASE uid {cases} END WHERE uid IN ({marks(len(uids))})",
        (*pairs, *uids),
    )


def _take_seqs(heads: dict[int, int], uids: Sequence[int]) -> list[int]:
    """The next seq of each of these users, in order (C{heads} moves on)."""
    out = []
    for uid in uids:
        heads[uid] = heads.get(uid, 0) + 1
        out.append(heads[uid])
    return out


def _event_statement(rows: Sequence[tuple[int, int, int, int, int, int, int]]) -> Statement:
    rows_sql, args = values(rows)
    return Statement(
        f"INSERT INTO t_event (uid, seq, kind, sessionId, msgId, byUid, ts) VALUES {rows_sql}",
        args,
    )


def head_txn(txn: Txn, uid: int) -> int:
    row = txn.query_one("SELECT streamSeq FROM t_user WHERE uid = ?", (uid,))
    return 0 if row is None else int(row[0])


def set_profile_txn(
    txn: Txn, uid: int, nickname: str | None, avatar: str | None, now_ms: int
) -> Profile | None:
    changed = txn.execute(
        "UPDATE t_user SET nickname = COALESCE(?, nickname), avatar = COALESCE(?, avatar),"
        " updateTime = ?, version = version + 1 WHERE uid = ?",
        (nickname, avatar, now_ms, uid),
    )
    if not changed:
        return None
    [profile] = get_profiles_txn(txn, [uid])
    return profile


def upsert_user_txn(
    txn: Txn, uid: int, nickname: str | None, avatar: str | None, now_ms: int
) -> tuple[Profile, bool]:
    """Create or update (admin API); return the profile and whether it was created."""
    created = txn.execute(
        f"{txn.engine.insert_ignore} INTO t_user (uid, nickname, avatar, createTime, updateTime,"
        " version) VALUES (?, ?, ?, ?, ?, 1)",
        (uid, nickname or "", avatar or "", now_ms, now_ms),
    )
    if created:
        [profile] = get_profiles_txn(txn, [uid])
        return profile, True
    updated = set_profile_txn(txn, uid, nickname, avatar, now_ms)
    assert updated is not None
    return updated, False


# ---------------------------------------------------------------------------
# Sessions


def session_members_txn(txn: Txn, session_ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    rows = txn.query_in("SELECT id, uidLow, uidHigh FROM t_session WHERE id IN (%s)", session_ids)
    return {int(r[0]): (int(r[1]), int(r[2])) for r in rows}


def session_for_pair_txn(txn: Txn, low: int, high: int) -> int | None:
    row = txn.query_one("SELECT id FROM t_session WHERE uidLow = ? AND uidHigh = ?", (low, high))
    return None if row is None else int(row[0])


def _resolve_sessions(
    txn: Txn, wanted: dict[tuple[int, int], int], now_ms: int
) -> dict[tuple[int, int], int]:
    """Get or create the sessions of these pairs (race-free: a unique key)."""
    txn.executemany(
        f"{txn.engine.insert_ignore} INTO t_session (id, uidLow, uidHigh, createTime)"
        " VALUES (?, ?, ?, ?)",
        [(sid, low, high, now_ms) for (low, high), sid in sorted(wanted.items())],
    )
    found = {}
    for low, high in wanted:
        sid = session_for_pair_txn(txn, low, high)
        assert sid is not None
        found[(low, high)] = sid
    return found


# ---------------------------------------------------------------------------
# Sending


def commit_messages_txn(
    txn: Txn,
    msgs: Sequence[NewMessage],
    check_recipients: Sequence[int],
    now_ms: int,
    outbox: Outbox | None = None,
    notify_delay_ms: int | None = None,
    started: float = 0.0,
    done_outbox: Sequence[int] = (),
    cached_heads: Mapping[int, int] | None = None,
    known: KnownConvs | None = None,
) -> list[SendOutcome]:
    """
    Commit a batch of messages (group commit), in one transaction: the
    users' t_user rows locked (the recipients checked, the stream heads
    read), sessions created on first use, messages inserted with their two
    seqs (a repeated (sender, cid) is a L{Duplicate}, never a second
    message, and takes no seq), the new heads, pending rows for the
    recipients, both users' conversation rows bumped, the batch's outbox
    row, and (if notifications are on) one delayed notification per
    message. Returns one outcome per message, in order.

    In the common case (known sessions, no repeated cid) all of it is two
    round trips to MySQL: the locking read, then L{_write_messages}. The outbox
    rows of finished follow-ups (C{done_outbox}) are deleted in the same
    request. With C{known} (this node's copy of the rows and unread totals
    as of C{cached_heads}), a batch whose heads check out computes its
    conversation rows instead of reading them back (L{KnownConvs}).
    """
    outcomes: list[SendOutcome | None] = [None] * len(msgs)
    users = sorted({u for m in msgs for u in (m.sender, m.recipient)})
    verify = (
        cached_heads is not None
        and not check_recipients
        and all(m.session_id is not None for m in msgs)
        and all(u in cached_heads for u in users)
    )
    if verify:
        # The heads this node saw last: the script's first statement locks
        # the rows and checks them (see _head_statement): no round trip.
        assert cached_heads is not None
        heads = {u: cached_heads[u] for u in users}
        missing: set[int] = set()
    else:
        # One locking read of every user of the batch: the recipient check
        # and the stream heads the messages' seqs follow (given out in
        # Python, in batch order, by _write_messages: only for the messages
        # written).
        heads = lock_streams(txn, users)
        missing = set(check_recipients) - set(heads)
    live = []
    for i, m in enumerate(msgs):
        if m.recipient in missing:
            outcomes[i] = Refused(ErrorCode.NO_SUCH_USER, f"user {m.recipient} does not exist")
        else:
            live.append(i)

    wanted: dict[tuple[int, int], int] = {}
    for i in live:
        m = msgs[i]
        if m.session_id is None:
            wanted.setdefault(session_pair(m.sender, m.recipient), m.new_session_id)
    sessions = _resolve_sessions(txn, wanted, now_ms) if wanted else {}
    resolved = {
        i: msgs[i]
        if msgs[i].session_id is not None
        else attrs.evolve(
            msgs[i], session_id=sessions[session_pair(msgs[i].sender, msgs[i].recipient)]
        )
        for i in live
    }

    # A (sender, cid) repeated inside the batch is a duplicate of its first use.
    first: dict[tuple[int, str], int] = {}
    repeats: dict[int, int] = {}
    for i in live:
        key = (msgs[i].sender, msgs[i].cid)
        if key in first:
            repeats[i] = first[key]
        else:
            first[key] = i
    fresh = [i for i in live if i not in repeats]
    if not fresh:
        delete_outbox(txn, done_outbox)
    # With the check, the script's first statement also moves the heads on.
    checked = verify and bool(fresh)
    try:
        try:
            written = _write_messages(
                txn,
                [resolved[i] for i in fresh],
                heads,
                outbox,
                notify_delay_ms,
                started,
                done_outbox,
                verify=checked,
                known=known if verify else None,
            )
        except Exception as e:
            if not (checked and txn.engine.is_null_violation(e)):
                raise
            # A head moved since this node saw it (another node's send, a
            # read): nothing ran. Lock and read them, and go on as usual.
            checked = False
            heads = lock_streams(txn, users)
            written = _write_messages(
                txn,
                [resolved[i] for i in fresh],
                heads,
                outbox,
                notify_delay_ms,
                started,
                done_outbox,
            )
    except Exception as e:
        if not txn.engine.is_duplicate(e):
            raise
        # Some cids were used before (a client retrying): those are
        # duplicates; write the rest. (The outbox rows were deleted by the
        # statements before the failed one, which itself changed nothing.)
        used = _used_cids(txn, [msgs[i] for i in fresh])
        if outbox is not None and used:
            used = _claim_unfinished(txn, used, outbox.node_id, now_ms)
        for i in fresh:
            outcomes[i] = used.get((msgs[i].sender, msgs[i].cid))
        fresh = [i for i in fresh if outcomes[i] is None]
        if checked and not fresh:
            # The failed script had moved the heads on, and nothing is
            # written: set them back (a rerun below sets them itself).
            txn.script([_head_statement(heads)])
        written = _write_messages(
            txn, [resolved[i] for i in fresh], heads, outbox, notify_delay_ms, started, ()
        )
    for i, outcome in zip(fresh, written, strict=True):
        outcomes[i] = outcome
    for i, j in repeats.items():
        first_use = outcomes[j]
        if isinstance(first_use, Committed):
            stored = first_use.message
            outcomes[i] = Duplicate(
                stored.msg_id, stored.session_id, stored.ts, seq=first_use.sender_seq
            )
        else:
            outcomes[i] = first_use
    result = [o for o in outcomes if o is not None]
    assert len(result) == len(msgs)
    return result


def _used_cids(txn: Txn, msgs: Sequence[NewMessage]) -> dict[tuple[int, str], Duplicate]:
    """The messages already stored under these (sender, cid) pairs."""
    senders = sorted({m.sender for m in msgs})
    cids = sorted({m.cid for m in msgs})
    rows = txn.query(
        f"SELECT senderUid, cid, id, sessionId, ts, senderSeq FROM t_msg_record_list"
        f" WHERE senderUid IN ({marks(len(senders))})"
        f" AND cid IN ({marks(len(cids))})",
        (*senders, *cids),
    )
    return {
        (int(r[0]), cid_text(r[1])): Duplicate(
            int(r[2]), int(r[3]), int(r[4]), seq=0 if r[5] is None else int(r[5])
        )
        for r in rows
    }


#: How far before its message's time a send outbox row may have been created
#: (the message id and the row's time are read from one node's clock, the id
#: first: a margin for that clock being stepped back).
OUTBOX_CLOCK_MARGIN_MS = 10_000
#: Outbox rows older than this belong to the sweepers (the store's
#: C{OUTBOX_STALE_MS} is the same bound; tests check that they agree).
OUTBOX_STALE_MS = 60_000
#: Unfinished send rows a duplicate's transaction reads at most: it runs
#: inside the serialized send commit; a row past it is left to the sweeper.
OUTBOX_CLAIM_LIMIT = 100


def _claim_unfinished(
    txn: Txn, used: dict[tuple[int, str], Duplicate], node_id: int, now_ms: int
) -> dict[tuple[int, str], Duplicate]:
    """
    Find, among the duplicates' originals, those whose send outbox row is
    still there untouched by any sweeper or recovery (C{attempts = 0}):
    their fan-out never finished (the commit's outcome was unknown and the
    client got C{unavailable}), or is still running on its node. Claim each
    such row for this node and hand it back on one of its duplicates. The
    claim keeps a retry and a sweeper apart: a sweeper's takes C{attempts}
    past 0, this one makes the row fresh (no sweeper takes it for the stale
    bound, 60 s), and each is conditional on the other's absence. It leaves
    C{attempts} at 0, so that a later retry can still take the row if this
    transaction's own outcome is lost. Only on the duplicate path: a send
    that is no retry pays nothing for it. Only rows younger than the stale
    bound, and a bounded number of them (this runs inside the serialized
    send commit): a retry of an old message (a reconnect storm) reads
    nothing, its row is the sweepers'.
    """
    since = max(min(d.ts for d in used.values()) - OUTBOX_CLOCK_MARGIN_MS, now_ms - OUTBOX_STALE_MS)
    # No send commits a minute after its message got its id (its client
    # gave up long before): rows younger than that are other messages'.
    until = max(d.ts for d in used.values()) + OUTBOX_STALE_MS
    if since > until:
        return used
    by_msg = {d.msg_id: key for key, d in used.items()}
    rows = txn.query(
        f"SELECT {OUTBOX_COLUMNS} FROM t_outbox"
        " WHERE createdAt >= ? AND createdAt <= ? AND kind = 'send' AND attempts = 0"
        " ORDER BY createdAt LIMIT ?",
        (since, until, OUTBOX_CLAIM_LIMIT),
    )
    out = dict(used)
    for row in map(Outbox.from_row, rows):
        mine = [by_msg[m] for m in row.msgs if m in by_msg]
        if mine and txn.execute(
            "UPDATE t_outbox SET claimedBy = ?, claimedAt = ?"
            " WHERE id = ? AND kind = 'send' AND attempts = 0",
            (node_id, now_ms, row.id),
        ):
            out[mine[0]] = attrs.evolve(used[mine[0]], unfinished=row)
    return out


@attrs.frozen
class KnownConvs:
    """
    A node's copy of some users' conversation rows and unread totals, exact
    as of the stream heads the batch is checked against (see L{ConvState}:
    whatever changes them moves the head). Only used together with that
    check: if a head moved, the batch reads the rows back as usual.
    """

    rows: Mapping[tuple[int, int], ConvRow]
    totals: Mapping[int, int]

    def covers(self, keys: Iterable[tuple[int, int]], uids: Iterable[int]) -> bool:
        return all(k in self.rows for k in keys) and all(u in self.totals for u in uids)


def _write_messages(
    txn: Txn,
    msgs: Sequence[NewMessage],
    locked_heads: dict[int, int],
    outbox: Outbox | None,
    notify_delay_ms: int | None,
    started: float,
    done_outbox: Sequence[int] = (),
    verify: bool = False,
    known: KnownConvs | None = None,
) -> list[Committed]:
    """
    Insert messages whose sessions are known and whose cids are believed
    new, with everything that goes with them, and commit: one script (one
    round trip on MySQL). A cid used before makes the message insert fail
    with a duplicate key, before anything else is written (C{locked_heads}
    is not changed, a retry gives the same seqs), except, with C{verify},
    the heads, which the first statement moved on: the caller sets them.
    Each message takes the recipient's next seq, then the sender's. With
    C{verify}, C{locked_heads} are heads seen earlier, not locked yet: the
    script's first statement locks the rows and fails (a NOT NULL
    violation, before anything else ran) unless every head is still that.
    With C{known} (only with C{verify}) covering every row and user of the
    batch, the rows and totals are computed from it: no read-back.
    """
    if not msgs:
        return []
    engine = txn.engine
    heads = dict(locked_heads)
    seqs = [tuple(_take_seqs(heads, (m.recipient, m.sender))) for m in msgs]
    # Only the users that exist (a sender never stored has no stream).
    moved = {u: h for u, h in heads.items() if u in locked_heads}
    # First the outbox rows of finished follow-ups: no round trip of their own.
    script = _outbox_deletes(done_outbox)
    if verify:
        # Checks the heads and moves them on (see commit_messages_txn for a
        # later statement of the script failing).
        script.insert(0, _head_statement(moved, seen=locked_heads))
    rows_sql, args = values(
        [
            (
                m.msg_id,
                m.session_id,
                m.msg_id,
                m.sender,
                m.recipient,
                m.cid,
                m.type,
                m.body,
                m.ts,
                0,
                RECORD_NORMAL,
                sender_seq,
                recipient_seq,
                m.sender_device,
                m.ts,
            )
            for m, (recipient_seq, sender_seq) in zip(msgs, seqs, strict=True)
        ],
        # createTime is computed by the database from ts.
        template="(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, " + engine.datetime_from_ms + ")",
    )
    script.append(
        Statement(
            "INSERT INTO t_msg_record_list (id, sessionId, msgId, senderUid, recipientUid, cid,"
            " msgType, body, ts, isRead, recordStatus, senderSeq, recipientSeq, senderDevice,"
            f" createTime) VALUES {rows_sql}",
            args,
        )
    )
    if moved and not verify:
        script.append(_head_statement(moved))
    rows_sql, args = values([(m.msg_id, m.recipient, m.sender) for m in msgs])
    script.append(
        Statement(f"INSERT INTO t_pending (msgId, uid, senderUid) VALUES {rows_sql}", args)
    )
    if notify_delay_ms is not None:
        rows_sql, args = values(
            [(m.msg_id, m.recipient, m.ts + notify_delay_ms, 0, -1, 0) for m in msgs]
        )
        script.append(
            Statement(
                "INSERT INTO t_notify (msgId, uid, dueAt, attempts, claimedBy, claimedUntil)"
                f" VALUES {rows_sql}",
                args,
            )
        )

    # Conversation rows: one upsert row per (user, session) of the batch.
    bump: dict[tuple[int, int], list[int]] = {}  # (uid, sid) -> [peer, last, received]
    for m in msgs:
        assert m.session_id is not None
        for uid, peer, received in ((m.recipient, m.sender, 1), (m.sender, m.recipient, 0)):
            entry = bump.setdefault((uid, m.session_id), [peer, 0, 0])
            entry[1] = max(entry[1], m.msg_id)
            entry[2] += received
    keys = sorted(bump)
    script.append(
        Statement(
            engine.upsert_add(
                "t_conv",
                key=("uid", "sessionId"),
                columns=(
                    "uid",
                    "sessionId",
                    "peerUid",
                    "lastMsgId",
                    "totalCount",
                    "readCount",
                    "readUpTo",
                    "version",
                ),
                add=("totalCount",),
                greatest=("lastMsgId",),
                bump="version",
                rows=len(keys),
            ),
            tuple(v for uid, sid in keys for v in (uid, sid, *bump[uid, sid], 0, 0, 1)),
        )
    )
    outbox_id = 0
    if outbox is not None:
        outbox_id = outbox.id
        script.append(
            outbox_statement(
                attrs.evolve(
                    outbox,
                    users=tuple(sorted({u for m in msgs for u in (m.sender, m.recipient)})),
                    sessions=tuple(
                        sorted({m.session_id for m in msgs if m.session_id is not None})
                    ),
                    msgs=tuple(m.msg_id for m in msgs),
                )
            )
        )
    users = sorted({u for m in msgs for u in (m.sender, m.recipient)})
    if known is not None and verify and known.covers(keys, users):
        # The heads are checked by the script's first statement: the rows
        # are what this node saw last, plus this batch (as the upsert does).
        conv = {k: _bumped(known.rows[k], *bump[k]) for k in keys}
        totals = dict(known.totals)
        for m in msgs:
            totals[m.recipient] += 1
        try:
            txn.script(script, commit=True)
        except CommitConfirmed:
            pass  # committed; the replies (row counts) are not needed
    else:
        reads = len(script)
        script += _conv_rows_statements(keys)
        # Every user's total, senders' too: the node's copy needs them all.
        script.append(_total_unread_statement(users))
        try:
            results = txn.script(script, commit=True)
        except CommitConfirmed:
            # Committed, but the replies were lost: read the rows again. They
            # may hold later changes too (another node's send, a read): newer
            # versions, which the hot copy takes as well.
            results = [None] * reads + txn.script(script[reads:])
        conv = {(r.uid, r.session_id): r for r in _wanted_rows(results[reads:-1], keys)}
        totals = _total_unread_rows(results[-1])
    # Only the users of the messages written (the heads locked can be more:
    # a batch's duplicates and refusals write nothing).
    streams = [u for u in users if u in moved]
    state = ConvState(
        before={u: locked_heads[u] for u in streams},
        after={u: moved[u] for u in streams},
        rows=conv,
        totals={u: totals.get(u, 0) for u in users},
    )

    # Unread as of each message: the final numbers minus what came after it
    # in this batch.
    later_in_session: dict[tuple[int, int], int] = defaultdict(int)
    later_for_user: dict[int, int] = defaultdict(int)
    committed: list[Committed] = []
    for m, (recipient_seq, sender_seq) in zip(reversed(msgs), reversed(seqs), strict=True):
        sid = m.session_id
        assert sid is not None
        recipient_row = conv[m.recipient, sid]
        committed.append(
            Committed(
                message=Message(m.msg_id, sid, m.sender, m.recipient, m.cid, m.type, m.body, m.ts),
                recipient_row=recipient_row,
                sender_row=conv[m.sender, sid],
                unread=recipient_row.unread - later_in_session[m.recipient, sid],
                total_unread=totals.get(m.recipient, 0) - later_for_user[m.recipient],
                started=started,
                outbox_id=outbox_id,
                outbox_count=len(msgs),
                sender_seq=sender_seq,
                recipient_seq=recipient_seq,
                state=state,
            )
        )
        later_in_session[m.recipient, sid] += 1
        later_for_user[m.recipient] += 1
    committed.reverse()
    return committed


def _bumped(row: ConvRow, peer: int, last: int, received: int) -> ConvRow:
    """C{row} after the send upsert of L{_write_messages} (peer is kept)."""
    return ConvRow(
        row.uid,
        row.session_id,
        row.peer,
        max(row.last_msg_id, last),
        row.total + received,
        row.read,
        row.version + 1,
    )


def _conv_rows_statements(keys: Sequence[tuple[int, int]]) -> list[Statement]:
    """
    SELECTs for the rows of these (uid, sessionId) keys, asked as C{uid IN
    (...) AND sessionId IN (...)} (primary-key ranges; a session has two
    rows, so they cannot return much more than asked; the caller filters).
    Measured 2-3x faster on MariaDB than a row-constructor C{IN} list.
    """
    out = []
    for i in range(0, len(keys), 250):
        part = keys[i : i + 250]
        uids = sorted({uid for uid, _ in part})
        sids = sorted({sid for _, sid in part})
        out.append(
            Statement(
                f"SELECT {CONV_COLUMNS} FROM t_conv WHERE uid IN ({marks(len(uids))})"
                f" AND sessionId IN ({marks(len(sids))})",
                (*uids, *sids),
                ROWS,
            )
        )
    return out


def _wanted_rows(
    results: Iterable[Sequence[Sequence[Any]]], keys: Iterable[tuple[int, int]]
) -> list[ConvRow]:
    """The rows of these keys among what L{_conv_rows_statements} returned (which can be more)."""
    wanted = set(keys)
    return [r for rows in results for r in map(_conv, rows) if (r.uid, r.session_id) in wanted]


def _conv_rows(txn: Txn, keys: Sequence[tuple[int, int]]) -> list[ConvRow]:
    return _wanted_rows(txn.script(_conv_rows_statements(keys)), keys)


def _total_unread_statement(uids: Sequence[int]) -> Statement:
    """Each user's unread count over all sessions; read by L{_total_unread_rows}."""
    return Statement(
        "SELECT uid, SUM(totalCount - readCount) FROM t_conv"
        f" WHERE uid IN ({marks(len(uids))}) GROUP BY uid",
        tuple(uids),
        ROWS,
    )


def _total_unread_rows(rows: Iterable[Sequence[Any]]) -> dict[int, int]:
    return {int(r[0]): int(r[1] or 0) for r in rows}


def total_unread_txn(txn: Txn, uid: int) -> int:
    statement = _total_unread_statement([uid])
    return _total_unread_rows(txn.query(statement.sql, statement.args)).get(uid, 0)


# ---------------------------------------------------------------------------
# Delivery state


def ack_txn(
    txn: Txn,
    requests: Sequence[tuple[int, Sequence[int]]],
    outbox: Outbox | None = None,
    done_outbox: Sequence[int] = (),
    cursors: Sequence[tuple[int, int, int]] = (),
) -> list[list[tuple[int, int, int]]]:
    """
    Clear pending rows, for many users at once, in two scripts (two round
    trips on MySQL, one without ids): what is pending among the ids (with
    each message's session and its user); then one DELETE by primary key of
    the rows found that are the acking users' own, the recipients'
    deliveredUpTo (one UPDATE for the batch, L{_delivered_statements}), the
    device cursors, the outbox row, COMMIT.
    For each (uid, msg_ids) return the (msg_id, sender, session_id) of the
    messages that were pending for that uid; other ids (already acked,
    unknown, someone else's) are ignored; msg_ids may be empty. C{cursors}
    are (uid, device_id, seq): each moves that device's cursor up to seq
    (never back; a device of another user is left alone).

    Why two round trips: the delivered positions are known once the pending
    rows are read. One UPDATE that reads them itself (a join over a grouped
    derived table) cost MariaDB 30-40 % more CPU per message in the pairs
    benchmark; the UPDATE by values costs about what the ack did before.
    """
    by_user: dict[int, set[int]] = {}
    for uid, msg_ids in requests:
        by_user.setdefault(uid, set()).update(msg_ids)
    everything = sorted({msg_id for ids in by_user.values() for msg_id in ids})
    script = _outbox_deletes(done_outbox)
    removed: dict[int, list[tuple[int, int, int]]] = {}
    if everything:
        # A plain read (no FOR UPDATE): a locking read here cost the pairs
        # benchmark 12 % (measured: its locks are held across a round trip,
        # beside the send batches' inserts). Two nodes' batches acking the same
        # ids at the same moment may thus both report them removed: both push
        # the same delivered position, which clients keep as a maximum.
        selects = [
            Statement(
                "SELECT p.msgId, p.uid, p.senderUid, COALESCE(m.sessionId, 0) FROM t_pending p"
                " LEFT JOIN t_msg_record_list m ON m.id = p.msgId"
                f" WHERE p.msgId IN ({marks(len(part))})",
                tuple(part),
                ROWS,
            )
            for part in chunks(everything, 1000)
        ]
        results = txn.script(script + selects)
        for rows in results[len(script) :]:
            for msg_id, uid, sender, sid in sorted(
                (int(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows
            ):
                if msg_id in by_user.get(uid, ()):
                    removed.setdefault(uid, []).append((msg_id, sender, sid))
        script = []
    # The rows the read found are the users' own (a row's uid never
    # changes): one DELETE by primary key for all of them, not one per user
    # (MariaDB parses and runs each statement: 25-50 of them per batch).
    gone = sorted(msg_id for rows in removed.values() for msg_id, _, _ in rows)
    script += [
        Statement(f"DELETE FROM t_pending WHERE msgId IN ({marks(len(part))})", tuple(part))
        for part in chunks(gone, 1000)
    ]
    # After the DELETEs: t_pending, then t_conv, as a send locks them.
    script += _delivered_statements(removed)
    script += _cursor_statements(cursors)
    if outbox is not None:
        script.append(outbox_statement(attrs.evolve(outbox, users=tuple(sorted(by_user)))))
    try:
        txn.script(script, commit=True)
    except CommitConfirmed:
        return _acked_after_lost_commit(txn, requests, everything)
    return _first_claims(requests, removed)


def _first_claims(
    requests: Sequence[tuple[int, Sequence[int]]],
    removed: Mapping[int, Sequence[tuple[int, int, int]]],
) -> list[list[tuple[int, int, int]]]:
    """
    Each removed message goes to the first request of its user that named
    it, and only to that one: two devices acking the same ids in one batch
    make one delivery receipt, as they would in two batches.
    """
    given: set[int] = set()
    out = []
    for uid, msg_ids in requests:
        mine = set(msg_ids) - given
        got = [p for p in removed.get(uid, ()) if p[0] in mine]
        given.update(p[0] for p in got)
        out.append(got)
    return out


def _delivered_statements(removed: Mapping[int, Sequence[tuple[int, int, int]]]) -> list[Statement]:
    """
    Move each recipient's deliveredUpTo to the highest of the messages it
    acked per session (never back: C{deliveredUpTo < ?}, so a transaction run
    twice changes nothing more): one UPDATE per 250 (user, session) pairs,
    primary-key lookups, not one statement per message or user.
    """
    best: dict[tuple[int, int], int] = {}
    for uid, triples in removed.items():
        for msg_id, _, sid in triples:
            if sid and msg_id > best.get((uid, sid), 0):
                best[uid, sid] = msg_id
    keys = sorted(best)
    out = []
    for part in chunks(keys, 250):
        if len(part) == 1:
            [(uid, sid)] = part
            out.append(
                Statement(
                    "UPDATE t_conv SET deliveredUpTo = ? WHERE uid = ? AND sessionId = ?"
                    " AND deliveredUpTo < ?",
                    (best[uid, sid], uid, sid, best[uid, sid]),
                )
            )
            continue
        cases = " ".join("WHEN uid = ? AND sessionId = ? THEN ?" for _ in part)
        where = " OR ".join("(uid = ? AND sessionId = ? AND deliveredUpTo < ?)" for _ in part)
        args = [v for key in part for v in (*key, best[key])]
        out.append(
            Statement(
                f"UPDATE t_conv SET deliveredUpTo = CASE {cases} ELSE deliveredUpTo END"
                f" WHERE {where}",
                (*args, *args),
            )
        )
    return out


def _acked_after_lost_commit(
    txn: Txn, requests: Sequence[tuple[int, Sequence[int]]], everything: Sequence[int]
) -> list[list[tuple[int, int, int]]]:
    """
    What L{ack_txn} returns, when its commit happened but its replies were
    lost: each user's messages among the ids that are not pending any more.
    That includes ids acked before this transaction, which is harmless: the
    hot-store ack only removes ids, and every one of these is gone in SQL.
    """
    sent = {
        int(r[0]): (int(r[1]), int(r[2]), int(r[3]))
        for r in txn.query_in(
            "SELECT id, recipientUid, senderUid, sessionId FROM t_msg_record_list WHERE id IN (%s)",
            everything,
        )
    }
    still = {
        int(r[0])
        for r in txn.query_in("SELECT msgId FROM t_pending WHERE msgId IN (%s)", everything)
    }
    removed: dict[int, list[tuple[int, int, int]]] = {}
    for i in sorted(sent.keys() - still):
        recipient, sender, sid = sent[i]
        removed.setdefault(recipient, []).append((i, sender, sid))
    return _first_claims(requests, removed)


def _cursor_statements(cursors: Iterable[tuple[int, int, int]]) -> list[Statement]:
    """
    Move device cursors forward (never back). The seq is what the device
    says it has; it is not checked against the head here (that would lock
    t_user): readers clamp it (L{login_txn}), and catch-up from a position
    past the head answers the head as the next position.
    """
    best: dict[tuple[int, int], int] = {}
    for uid, device_id, seq in cursors:
        if device_id:
            best[uid, device_id] = max(seq, best.get((uid, device_id), seq))
    return [
        Statement(
            "UPDATE t_device SET cursorSeq = ? WHERE id = ? AND uid = ? AND cursorSeq < ?",
            (seq, device_id, uid, seq),
        )
        for (uid, device_id), seq in sorted(best.items(), key=lambda kv: kv[0][1])
    ]


def pending_txn(
    txn: Txn, uid: int, after: int, limit: int, sender: int | None
) -> list[tuple[int, int]]:
    if sender is None:
        rows = txn.query(
            "SELECT msgId, senderUid FROM t_pending WHERE uid = ? AND msgId > ?"
            " ORDER BY msgId LIMIT ?",
            (uid, after, limit),
        )
    else:
        rows = txn.query(
            "SELECT msgId, senderUid FROM t_pending WHERE uid = ? AND senderUid = ? AND msgId > ?"
            " ORDER BY msgId LIMIT ?",
            (uid, sender, after, limit),
        )
    return [(int(r[0]), int(r[1])) for r in rows]


def offline_summary_txn(txn: Txn, uid: int) -> list[tuple[int, int, int]]:
    rows = txn.query(
        "SELECT senderUid, COUNT(*), MAX(msgId) FROM t_pending WHERE uid = ?"
        " GROUP BY senderUid ORDER BY MAX(msgId) DESC",
        (uid,),
    )
    return [(int(r[0]), int(r[1]), int(r[2])) for r in rows]


# ---------------------------------------------------------------------------
# Reading and unread counts


def read_txn(
    txn: Txn,
    uid: int,
    session_id: int,
    msg_id: int,
    outbox: Outbox | None = None,
    now_ms: int = 0,
) -> ReadResult:
    """
    Move the user's read position in a session forward (never back) to
    C{msg_id}, capped at the session's latest message; recount unread from
    the messages themselves, so the counters cannot drift. A read that
    moves is an event of both streams (the reader's seq, then the peer's).
    """
    # The session's two users, from its row (never updated, so the shared
    # lock waits for nobody): a locking read, as every read before the
    # t_user locks must be. A plain SELECT would start this transaction's
    # snapshot (REPEATABLE READ) before the locks are taken, and the unread
    # recount below would then miss a message committed meanwhile.
    members = txn.query_one(
        f"SELECT uidLow, uidHigh FROM t_session WHERE id = ?{txn.engine.for_share}",
        (session_id,),
    )
    heads = lock_streams(txn, members or ())
    # Whether the two block each other (issue 11): then the read is no
    # receipt, not in the peer's stream (no event, no push). In the same
    # statement, no round trip more; after the t_user locks, which a block
    # takes too, so it is the block state of this commit.
    low, high = members or (0, 0)
    row = txn.query_one(
        "SELECT peerUid, lastMsgId, totalCount, readCount, readUpTo, version,"
        " (SELECT COUNT(*) FROM t_block WHERE (uid = ? AND blockedUid = ?)"
        " OR (uid = ? AND blockedUid = ?)) FROM t_conv"
        f" WHERE uid = ? AND sessionId = ?{txn.engine.for_update}",
        (low, high, high, low, uid, session_id),
    )
    if row is None:
        _refuse_session(txn, session_id)
    peer, last, total, read, upto, version, blocks = (int(v) for v in row)
    target = min(msg_id, last)
    advanced = None
    reader_seq = peer_seq = None
    if target > upto:
        txn.execute(
            "UPDATE t_msg_record_list SET isRead = 1 WHERE sessionId = ? AND id > ? AND id <= ?"
            " AND recipientUid = ? AND isRead = 0",
            (session_id, upto, target, uid),
        )
        # Hidden and cleared messages count as read (issue 11: edits).
        read = total - unread_after_txn(txn, uid, session_id, target)
        version += 1
        txn.execute(
            "UPDATE t_conv SET readUpTo = ?, readCount = ?, version = ?"
            " WHERE uid = ? AND sessionId = ?",
            (target, read, version, uid, session_id),
        )
        advanced = target
        told = (uid,) if blocks else (uid, peer)
        moved = {u: heads[u] for u in told if u in heads}
        reader_seq, *peer_seqs = _take_seqs(moved, told)
        events = [(uid, reader_seq, EVENT_READ, session_id, target, uid, now_ms)]
        for peer_seq in peer_seqs:
            events.append((peer, peer_seq, EVENT_READ, session_id, target, uid, now_ms))
        script = [_event_statement(events)]
        if moved:
            script.append(_head_statement(moved))
        if outbox is not None:
            script.append(
                outbox_statement(attrs.evolve(outbox, users=(uid,), sessions=(session_id,)))
            )
        txn.script(script)
    conv = ConvRow(uid, session_id, peer, last, total, read, version)
    return ReadResult(
        conv, total_unread_txn(txn, uid), advanced, reader_seq, peer_seq, peer_blocked=bool(blocks)
    )


#: Message m is cleared for c.uid: at or below clearedUpTo and committed before
#: the clear (its seq in c.uid's stream at or below the clear's; clearedSeq 0:
#: a clear from before clearedSeq existed, by id alone). Msg ids are per-node
#: time stamps, not commit order: a message with a lower id may commit later.
CLEARED = (
    "m.id <= c.clearedUpTo AND (c.clearedSeq = 0 OR COALESCE(CASE WHEN m.senderUid = c.uid"
    " THEN m.senderSeq ELSE m.recipientSeq END, 0) <= c.clearedSeq)"
)


def unread_after_txn(txn: Txn, uid: int, session_id: int, upto: int) -> int:
    """
    The user's unread messages of a session above C{upto}: received, not
    recalled, not hidden by the user nor below its clear (issue 11: those
    count as read).
    """
    row = txn.query_one(
        "SELECT COUNT(*) FROM t_msg_record_list m WHERE m.sessionId = ? AND m.id > ?"
        " AND m.recipientUid = ? AND m.recordStatus = 0"
        " AND NOT EXISTS (SELECT 1 FROM t_conv c WHERE c.uid = ? AND c.sessionId = ?"
        f" AND {CLEARED})"
        " AND NOT EXISTS (SELECT 1 FROM t_hidden h WHERE h.uid = ? AND h.msgId = m.id)",
        (session_id, upto, uid, uid, session_id, uid),
    )
    assert row is not None
    return int(row[0])


def counted_unread_txn(txn: Txn, message: Message, read_upto: int, cleared_upto: int) -> bool:
    """Whether the message counts among its recipient's unread (see L{unread_after_txn})."""
    if message.msg_id <= read_upto:
        return False
    uid, msg_id = message.recipient, message.msg_id
    if msg_id <= cleared_upto:
        cleared = txn.query_one(
            f"SELECT 1 FROM t_msg_record_list m JOIN t_conv c ON c.uid = ?"
            f" AND c.sessionId = m.sessionId WHERE m.id = ? AND {CLEARED}",
            (uid, msg_id),
        )
        if cleared is not None:
            return False
    hidden = txn.query_one("SELECT 1 FROM t_hidden WHERE uid = ? AND msgId = ?", (uid, msg_id))
    return hidden is None


def _refuse_session(txn: Txn, session_id: int) -> NoReturn:
    if session_members_txn(txn, [session_id]):
        raise ImError(ErrorCode.FORBIDDEN, "you are not part of this session")
    raise ImError(ErrorCode.NOT_FOUND, "no such session")


def unread_txn(txn: Txn, uid: int) -> list[tuple[int, int]]:
    rows = txn.query(
        "SELECT sessionId, totalCount - readCount FROM t_conv"
        " WHERE uid = ? AND totalCount > readCount ORDER BY lastMsgId DESC",
        (uid,),
    )
    return [(int(r[0]), int(r[1])) for r in rows]


# ---------------------------------------------------------------------------
# Recall


def recall_txn(
    txn: Txn, uid: int, msg_id: int, now_ms: int, window_ms: int, outbox: Outbox | None = None
) -> RecallResult:
    """
    Recall a message of C{uid}'s. A recall that is not a repeated one is an
    event of both streams (the sender's seq, then the recipient's); a
    repeated one gives out nothing.
    """
    # The message's two users, read without a lock (the lock order puts
    # t_user first). This starts the transaction's snapshot early, which is
    # harmless here: every later read is a locking one or reads back a row
    # this transaction changed (InnoDB shows it at its latest version).
    found = txn.query_one(
        "SELECT senderUid, recipientUid FROM t_msg_record_list WHERE id = ?", (msg_id,)
    )
    if found is None:
        raise ImError(ErrorCode.NOT_FOUND, "no such message")
    heads = lock_streams(txn, (int(found[0]), int(found[1])))
    row = txn.query_one(
        f"SELECT {MSG_COLUMNS} FROM t_msg_record_list WHERE id = ?{txn.engine.for_update}",
        (msg_id,),
    )
    if row is None:
        raise ImError(ErrorCode.NOT_FOUND, "no such message")
    message = _message(row)
    if uid != message.sender:
        if uid == message.recipient:
            raise ImError(ErrorCode.FORBIDDEN, "only the sender may recall a message")
        raise ImError(ErrorCode.FORBIDDEN, "you are not part of this message")
    if message.status == RECORD_RECALLED:
        return RecallResult(message, None, was_pending=False, already=True)
    if now_ms - message.ts > window_ms:
        raise ImError(ErrorCode.TOO_LATE, f"messages can be recalled for {window_ms // 1000}s")
    txn.execute(
        "UPDATE t_msg_record_list SET recordStatus = ? WHERE id = ?", (RECORD_RECALLED, msg_id)
    )
    was_pending = txn.execute("DELETE FROM t_pending WHERE msgId = ?", (msg_id,)) > 0
    conv = txn.query_one(
        "SELECT readUpTo, totalCount, clearedUpTo FROM t_conv WHERE uid = ? AND sessionId = ?"
        f"{txn.engine.for_update}",
        (message.recipient, message.session_id),
    )
    recipient_row = None
    if conv is not None and counted_unread_txn(txn, message, int(conv[0]), int(conv[2])):
        # It was unread: it stops counting.
        txn.execute(
            "UPDATE t_conv SET totalCount = totalCount - 1, version = version + 1"
            " WHERE uid = ? AND sessionId = ?",
            (message.recipient, message.session_id),
        )
        [recipient_row] = _conv_rows(txn, [(message.recipient, message.session_id)])
    moved = {u: heads[u] for u in (message.sender, message.recipient) if u in heads}
    sender_seq, recipient_seq = _take_seqs(moved, (message.sender, message.recipient))
    script = [
        _event_statement(
            [
                (message.sender, sender_seq, EVENT_RECALL, message.session_id, msg_id, uid, now_ms),
                (
                    message.recipient,
                    recipient_seq,
                    EVENT_RECALL,
                    message.session_id,
                    msg_id,
                    uid,
                    now_ms,
                ),
            ]
        )
    ]
    if moved:
        script.append(_head_statement(moved))
    if outbox is not None:
        script.append(
            outbox_statement(
                attrs.evolve(
                    outbox,
                    users=(message.sender, message.recipient),
                    sessions=(message.session_id,),
                    msgs=(msg_id,),
                )
            )
        )
    txn.script(script)
    recalled = attrs.evolve(message, status=RECORD_RECALLED)
    return RecallResult(
        recalled,
        recipient_row,
        was_pending=was_pending,
        already=False,
        sender_seq=sender_seq,
        recipient_seq=recipient_seq,
    )


# ---------------------------------------------------------------------------
# Conversations, history, message bodies


def convs_txn(txn: Txn, uid: int, before: int | None, limit: int) -> list[ConvRow]:
    if before is None:
        rows = txn.query(
            f"SELECT {CONV_COLUMNS} FROM t_conv WHERE uid = ? ORDER BY lastMsgId DESC LIMIT ?",
            (uid, limit),
        )
    else:
        rows = txn.query(
            f"SELECT {CONV_COLUMNS} FROM t_conv WHERE uid = ? AND lastMsgId < ?"
            " ORDER BY lastMsgId DESC LIMIT ?",
            (uid, before, limit),
        )
    return [_conv(r) for r in rows]


def positions_txn(
    txn: Txn, uids: Sequence[int], session_ids: Sequence[int]
) -> dict[tuple[int, int], Positions]:
    """
    The read, delivered and mute positions of the t_conv rows of these
    users in these sessions (a page's: both users of each session), one
    SELECT per 250 sessions (primary-key ranges, as L{_conv_rows_statements}).
    """
    out: dict[tuple[int, int], Positions] = {}
    users = sorted(set(uids))
    if not users:
        return out
    for part in chunks(sorted(set(session_ids)), 250):
        for r in txn.query(
            "SELECT uid, sessionId, readUpTo, deliveredUpTo, muteUntil FROM t_conv"
            f" WHERE uid IN ({marks(len(users))}) AND sessionId IN ({marks(len(part))})",
            (*users, *part),
        ):
            out[int(r[0]), int(r[1])] = Positions(int(r[2]), int(r[3]), int(r[4]))
    return out


def mute_txn(txn: Txn, uid: int, session_id: int, until: int, now_ms: int) -> MuteResult:
    """
    Set the user's muteUntil in a session. A change is an event of the
    user's stream (kind 6, msgId = the new value); setting the value it
    has changes nothing (a retry, or the same mute twice).
    """
    # As read_txn: a locking read of the session's row before the t_user lock.
    members = txn.query_one(
        f"SELECT uidLow, uidHigh FROM t_session WHERE id = ?{txn.engine.for_share}",
        (session_id,),
    )
    if members is None:
        raise ImError(ErrorCode.NOT_FOUND, "no such session")
    if uid not in (int(members[0]), int(members[1])):
        raise ImError(ErrorCode.FORBIDDEN, "you are not part of this session")
    heads = lock_streams(txn, (uid,))
    row = txn.query_one(
        f"SELECT muteUntil FROM t_conv WHERE uid = ? AND sessionId = ?{txn.engine.for_update}",
        (uid, session_id),
    )
    if row is None:
        _refuse_session(txn, session_id)
    if int(row[0]) == until:
        return MuteResult(until)
    txn.execute(
        "UPDATE t_conv SET muteUntil = ? WHERE uid = ? AND sessionId = ?",
        (until, uid, session_id),
    )
    moved = {uid: heads[uid]} if uid in heads else {}
    [seq] = _take_seqs(moved, (uid,))
    script = [_event_statement([(uid, seq, EVENT_MUTE, session_id, until, uid, now_ms)])]
    if moved:
        script.append(_head_statement(moved))
    txn.script(script)
    return MuteResult(until, seq)


def history_txn(txn: Txn, session_id: int, before: int | None, limit: int) -> list[Message]:
    """The seed's paginated query: normal messages, newest first."""
    rows = txn.query(
        f"SELECT {MSG_COLUMNS} FROM t_msg_record_list WHERE sessionId = ? AND recordStatus = ?"
        " AND id < ? ORDER BY id DESC LIMIT ?",
        (session_id, RECORD_NORMAL, before if before is not None else 2**63 - 1, limit),
    )
    return [_message(r) for r in rows]


def messages_txn(txn: Txn, msg_ids: Sequence[int]) -> list[Message]:
    rows = txn.query_in(f"SELECT {MSG_COLUMNS} FROM t_msg_record_list WHERE id IN (%s)", msg_ids)
    return [_message(r) for r in rows]


def last_normal_txn(txn: Txn, session_ids: Sequence[int]) -> dict[int, Message]:
    """
    Each session's newest normal message: one SELECT per session, all in
    one script (one round trip on MySQL).
    """
    if not session_ids:
        return {}
    results = txn.script(
        [
            Statement(
                f"SELECT {MSG_COLUMNS} FROM t_msg_record_list WHERE sessionId = ?"
                " AND recordStatus = ? ORDER BY id DESC LIMIT 1",
                (sid, RECORD_NORMAL),
                ROWS,
            )
            for sid in session_ids
        ]
    )
    return {sid: _message(rows[0]) for sid, rows in zip(session_ids, results, strict=True) if rows}


def snapshot_txn(txn: Txn, uid: int) -> UserSnapshot:
    """Everything the hot copy of one user holds, as SQL has it now."""
    pending = txn.query(
        "SELECT msgId, senderUid FROM t_pending WHERE uid = ? ORDER BY msgId", (uid,)
    )
    convs = txn.query(f"SELECT {CONV_COLUMNS} FROM t_conv WHERE uid = ?", (uid,))
    return UserSnapshot(
        uid=uid,
        pending=tuple((int(r[0]), int(r[1])) for r in pending),
        convs=tuple(_conv(r) for r in convs),
    )


def pending_count_txn(txn: Txn, uid: int) -> int:
    row = txn.query_one("SELECT COUNT(*) FROM t_pending WHERE uid = ?", (uid,))
    return int(row[0]) if row else 0


# ---------------------------------------------------------------------------
# The outbox


def outbox_statement(outbox: Outbox) -> Statement:
    return Statement(
        "INSERT INTO t_outbox (id, nodeId, kind, payload, createdAt, claimedBy, claimedAt,"
        " attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            outbox.id,
            outbox.node_id,
            outbox.kind,
            outbox.payload(),
            outbox.created_at,
            outbox.node_id,
            outbox.created_at,
            0,
        ),
    )


def write_outbox(txn: Txn, outbox: Outbox) -> None:
    txn.script([outbox_statement(outbox)])


OUTBOX_COLUMNS = "id, nodeId, kind, payload, createdAt"


def _outbox_deletes(ids: Sequence[int]) -> list[Statement]:
    return [
        Statement(f"DELETE FROM t_outbox WHERE id IN ({marks(len(part))})", tuple(part))
        for part in chunks(sorted(set(ids)), 500)
    ]


def delete_outbox(txn: Txn, ids: Sequence[int]) -> None:
    """Delete the outbox rows of finished follow-ups."""
    if ids:
        txn.script(_outbox_deletes(ids))


def outbox_claim_txn(
    txn: Txn, node_id: int, now_ms: int, older_than_ms: int | None, limit: int
) -> list[Outbox]:
    """
    Claim outbox rows to replay: with C{older_than_ms} None, this node's
    own rows (at start-up: they are from its previous life); otherwise any
    node's rows created and last claimed before that time (a node that died,
    or a follow-up that never finished).
    """
    if older_than_ms is None:
        rows = txn.query(
            f"SELECT {OUTBOX_COLUMNS} FROM t_outbox WHERE nodeId = ? AND claimedAt < ?"
            " ORDER BY id LIMIT ?",
            (node_id, now_ms, limit),
        )
    else:
        rows = txn.query(
            f"SELECT {OUTBOX_COLUMNS} FROM t_outbox WHERE createdAt < ? AND claimedAt < ?"
            " ORDER BY id LIMIT ?",
            (older_than_ms, older_than_ms, limit),
        )
    claimed = []
    for row in rows:
        # Optimistic claim: only one node's UPDATE moves claimedAt past the bound.
        bound = now_ms if older_than_ms is None else older_than_ms
        if txn.execute(
            "UPDATE t_outbox SET claimedBy = ?, claimedAt = ?, attempts = attempts + 1"
            " WHERE id = ? AND claimedAt < ?",
            (node_id, now_ms, int(row[0]), bound),
        ):
            claimed.append(Outbox.from_row(row))
    return claimed


def outbox_renew_txn(txn: Txn, ids: Sequence[int], node_id: int, now_ms: int) -> None:
    """This node still works on these rows: no sweeper may take them yet."""
    for part in chunks(ids, 500):
        txn.execute(
            f"UPDATE t_outbox SET claimedAt = ? WHERE claimedBy = ? AND id IN ({marks(len(part))})",
            (now_ms, node_id, *part),
        )


def outbox_downgrade_txn(txn: Txn, ids: Sequence[int]) -> None:
    """The pushes of these rows are done; only the hot-store repair is left."""
    for part in chunks(ids, 500):
        txn.execute(f"UPDATE t_outbox SET kind = 'repair' WHERE id IN ({marks(len(part))})", part)


def outbox_size_txn(txn: Txn) -> int:
    row = txn.query_one("SELECT COUNT(*) FROM t_outbox")
    return int(row[0]) if row else 0


# ---------------------------------------------------------------------------
# Offline notifications (the delayed queue)


def notify_claim_txn(
    txn: Txn, node_id: int, now_ms: int, lease_ms: int, limit: int
) -> list[DueNotification]:
    """Claim due notifications (for C{lease_ms}); each with its message and
    whether it is still pending for its recipient."""
    due = [
        int(r[0])
        for r in txn.query(
            "SELECT msgId FROM t_notify WHERE dueAt <= ? AND claimedUntil <= ?"
            " ORDER BY dueAt LIMIT ?",
            (now_ms, now_ms, limit),
        )
    ]
    claimed = [
        msg_id
        for msg_id in due
        if txn.execute(
            "UPDATE t_notify SET claimedBy = ?, claimedUntil = ?"
            " WHERE msgId = ? AND claimedUntil <= ?",
            (node_id, now_ms + lease_ms, msg_id, now_ms),
        )
    ]
    if not claimed:
        return []
    attempts = dict(
        txn.query_in("SELECT msgId, attempts FROM t_notify WHERE msgId IN (%s)", claimed)
    )
    pending = {
        int(r[0]) for r in txn.query_in("SELECT msgId FROM t_pending WHERE msgId IN (%s)", claimed)
    }
    messages = messages_txn(txn, claimed)
    muted = _muted(txn, {(m.recipient, m.session_id) for m in messages}, now_ms)
    return [
        DueNotification(
            m, int(attempts[m.msg_id]), m.msg_id in pending, (m.recipient, m.session_id) in muted
        )
        for m in messages
    ]


def _muted(txn: Txn, keys: set[tuple[int, int]], now_ms: int) -> set[tuple[int, int]]:
    """The (uid, sessionId) among C{keys} muted after C{now_ms} (issue 11: mute)."""
    if not keys:
        return set()
    uids = sorted({uid for uid, _ in keys})
    sids = sorted({sid for _, sid in keys})
    rows = txn.query(
        f"SELECT uid, sessionId FROM t_conv WHERE uid IN ({marks(len(uids))})"
        f" AND sessionId IN ({marks(len(sids))}) AND muteUntil > ?",
        (*uids, *sids, now_ms),
    )
    return {(int(r[0]), int(r[1])) for r in rows} & keys


def notify_done_txn(
    txn: Txn, msg_ids: Sequence[int], node_id: int = 0, release: Sequence[int] = ()
) -> None:
    """Delete finished notifications; end this node's claims of C{release}
    (not started: due again at once, for any node)."""
    for part in chunks(msg_ids, 500):
        txn.execute(f"DELETE FROM t_notify WHERE msgId IN ({marks(len(part))})", part)
    for part in chunks(release, 500):
        txn.execute(
            f"UPDATE t_notify SET claimedUntil = 0 WHERE claimedBy = ? AND msgId IN"
            f" ({marks(len(part))})",
            (node_id, *part),
        )


def notify_retry_txn(txn: Txn, msg_id: int, due_ms: int) -> None:
    txn.execute(
        "UPDATE t_notify SET attempts = attempts + 1, dueAt = ?, claimedUntil = 0 WHERE msgId = ?",
        (due_ms, msg_id),
    )


def notify_backlog_txn(txn: Txn) -> int:
    row = txn.query_one("SELECT COUNT(*) FROM t_notify")
    return int(row[0]) if row else 0


# ---------------------------------------------------------------------------
# Dead letters


def dead_letter_txn(txn: Txn, letter: DeadLetter) -> None:
    txn.execute(
        "INSERT INTO t_dead_letter (id, kind, ref, payload, error, attempts, createdAt)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            letter.id,
            letter.kind,
            letter.ref,
            letter.payload,
            letter.error[:4000],
            letter.attempts,
            letter.created_at,
        ),
    )


def dead_letters_txn(txn: Txn, before: int | None, limit: int) -> list[DeadLetter]:
    rows = txn.query(
        "SELECT id, kind, ref, payload, error, attempts, createdAt FROM t_dead_letter"
        " WHERE id < ? ORDER BY id DESC LIMIT ?",
        (before if before is not None else 2**63 - 1, limit),
    )
    return [
        DeadLetter(int(r[0]), str(r[1]), int(r[2]), bytes(r[3]), str(r[4]), int(r[5]), int(r[6]))
        for r in rows
    ]


# ---------------------------------------------------------------------------
# Devices and catch-up

DEVICE_COLUMNS = "id, uid, device, client, cursorSeq, createdAt, lastSeen, revokedAt"
#: Rows a forget transaction deletes at most (of t_device, and of t_event).
FORGET_CHUNK = 1000


def _device(row: Sequence[Any]) -> DeviceRow:
    return DeviceRow(
        id=int(row[0]),
        uid=int(row[1]),
        device=cid_text(row[2]),
        client=str(row[3]),
        cursor=int(row[4]),
        created_at=int(row[5]),
        last_seen=int(row[6]),
        revoked_at=int(row[7]),
    )


def login_txn(
    txn: Txn, items: Sequence[tuple[int, str, str, int, int]], now_ms: int
) -> list[Login]:
    """
    Logins of many (uid, device, client, new_id, issued_ms) at once: create
    the users that do not exist, create the devices that do not exist (with
    C{new_id}, cursor = the user's head), set every device's client and
    lastSeen, except where the device was revoked at or after C{issued_ms}
    (a login the chat layer refuses must not change what the device list
    shows).
    A row is the login's own (C{created}) when it holds the login's new id:
    race-free, as the unique key (uid, device) decides. No t_user lock: a
    message committed meanwhile only makes the new cursor one event early.
    """
    uids = sorted({uid for uid, _, _, _, _ in items})
    ensure_users_txn(txn, uids, now_ms)
    users = {
        int(r[0]): (Profile(int(r[0]), str(r[1]), str(r[2]), int(r[3])), int(r[4]))
        for r in txn.query_in(
            "SELECT uid, nickname, avatar, version, streamSeq FROM t_user WHERE uid IN (%s)", uids
        )
    }
    txn.executemany(
        f"{txn.engine.insert_ignore} INTO t_device ({DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?,"
        " ?, 0)",
        [
            (new_id, uid, device, client, users[uid][1], now_ms, now_ms)
            for uid, device, client, new_id, _ in items
        ],
    )
    txn.script(
        [
            Statement(
                "UPDATE t_device SET client = ?, lastSeen = ? WHERE uid = ? AND device = ?"
                " AND (revokedAt = 0 OR revokedAt < ?)",
                (client, now_ms, uid, device, issued_ms),
            )
            for uid, device, client, _, issued_ms in items
        ]
    )
    rows = {
        (d.uid, d.device): d
        for d in map(
            _device,
            txn.query_in(f"SELECT {DEVICE_COLUMNS} FROM t_device WHERE uid IN (%s)", uids),
        )
    }
    out = []
    for uid, device, _, new_id, _ in items:
        profile, head = users[uid]
        row = rows[uid, device]
        out.append(
            Login(
                profile=profile,
                device=attrs.evolve(row, cursor=min(row.cursor, head)),
                created=row.id == new_id,
                head=head,
            )
        )
    return out


def devices_txn(txn: Txn, uid: int) -> list[DeviceRow]:
    rows = txn.query(
        f"SELECT {DEVICE_COLUMNS} FROM t_device WHERE uid = ? ORDER BY createdAt, id", (uid,)
    )
    return [_device(r) for r in rows]


def device_txn(txn: Txn, uid: int, device: str) -> DeviceRow | None:
    row = txn.query_one(
        f"SELECT {DEVICE_COLUMNS} FROM t_device WHERE uid = ? AND device = ?", (uid, device)
    )
    return None if row is None else _device(row)


def revoke_device_txn(txn: Txn, uid: int, device: str, now_ms: int) -> DeviceRow | None:
    """Mark the device revoked now (tokens issued before it are refused); None if unknown."""
    txn.execute(
        "UPDATE t_device SET revokedAt = ? WHERE uid = ? AND device = ?", (now_ms, uid, device)
    )
    return device_txn(txn, uid, device)


def touch_devices_txn(txn: Txn, device_ids: Sequence[int], now_ms: int) -> None:
    """These devices are connected: lastSeen = now (chunked IN lists, one script)."""
    txn.script(
        [
            Statement(
                f"UPDATE t_device SET lastSeen = ? WHERE id IN ({marks(len(part))})",
                (now_ms, *part),
            )
            for part in chunks(sorted(set(device_ids)), 500)
        ]
    )


def _chunk_bound(
    txn: Txn, table: str, column: str, before_ms: int, where: str = "", args: tuple[Any, ...] = ()
) -> int | None:
    """
    A bound so that C{column <= bound} holds at most about L{FORGET_CHUNK}
    rows older than C{before_ms} (more only where many share a time) that
    also match C{where}: a range delete on the column's index, on both
    dialects (SQLite's DELETE has no LIMIT). None if there is nothing to delete.
    """
    row = txn.query_one(
        f"SELECT {column} FROM {table} WHERE {column} < ?{where} ORDER BY {column}"
        " LIMIT 1 OFFSET ?",
        (before_ms, *args, FORGET_CHUNK - 1),
    )
    if row is not None:
        return int(row[0])
    first = txn.query_one(
        f"SELECT {column} FROM {table} WHERE {column} < ?{where} LIMIT 1", (before_ms, *args)
    )
    return None if first is None else before_ms - 1


#: A revoked device is remembered this long after its revocation, however
#: long unseen: forgetting it would forget the revocation too, and an old
#: token (without a device claim, or a long-lived one) would sign it in again.
REVOKED_KEEP_MS = 400 * 86_400_000


def forget_txn(txn: Txn, before_ms: int, now_ms: int | None = None) -> tuple[int, int]:
    """
    One chunk of the forget sweep: devices last seen before C{before_ms}
    (but not those revoked in the last L{REVOKED_KEEP_MS}) and stream
    events older than it. Returns (devices, events) deleted; the caller
    runs it again while a chunk is full.
    """
    revoked_before = (before_ms if now_ms is None else now_ms) - REVOKED_KEEP_MS
    deleted = []
    for table, column, where, args in (
        ("t_device", "lastSeen", " AND (revokedAt = 0 OR revokedAt < ?)", (revoked_before,)),
        ("t_event", "ts", "", ()),
    ):
        bound = _chunk_bound(txn, table, column, before_ms, where, args)
        deleted.append(
            0
            if bound is None
            else txn.execute(
                f"DELETE FROM {table} WHERE {column} <= ? AND {column} < ?{where}",
                (bound, before_ms, *args),
            )
        )
    return deleted[0], deleted[1]


def catchup_txn(txn: Txn, uid: int, device_id: int, after: int, limit: int) -> CatchupPage:
    """
    A page of the user's stream after C{after}, in one transaction: a
    consistent snapshot (REPEATABLE READ on MySQL; its read view starts at
    the first SELECT, after the cursor write). Three index range scans: the
    messages received, those sent by other devices than C{device_id}, and
    the read and recall events; recalled messages are left out (their
    recall event is in the stream). The device's cursor becomes C{after}
    (monotonic) first, in this transaction. The page's C{seq} is its last
    event's on a full page, else the head (what was passed over, own sends
    and recalled messages, is never asked for again).
    """
    if device_id:
        txn.script(_cursor_statements([(uid, device_id, after)]))
    head = head_txn(txn, uid)
    take = limit + 1
    received = txn.query(
        f"SELECT {MSG_COLUMNS}, recipientSeq FROM t_msg_record_list WHERE recipientUid = ?"
        " AND recipientSeq > ? AND recordStatus = ? ORDER BY recipientSeq LIMIT ?",
        (uid, after, RECORD_NORMAL, take),
    )
    sent = txn.query(
        f"SELECT {MSG_COLUMNS}, senderSeq FROM t_msg_record_list WHERE senderUid = ?"
        " AND senderSeq > ? AND senderDevice <> ? AND recordStatus = ? ORDER BY senderSeq LIMIT ?",
        (uid, after, device_id, RECORD_NORMAL, take),
    )
    others = txn.query(
        "SELECT seq, kind, sessionId, msgId, byUid FROM t_event WHERE uid = ? AND seq > ?"
        " ORDER BY seq LIMIT ?",
        (uid, after, take),
    )
    events = [
        StreamEvent(int(r[MSG_WIDTH]), "msg", int(r[1]), int(r[0]), int(r[2]), _message(r))
        for r in (*received, *sent)
    ]
    events += [
        StreamEvent(
            int(r[0]), EVENT_KINDS.get(int(r[1]), "unknown"), int(r[2]), int(r[3]), int(r[4])
        )
        for r in others
    ]
    events.sort(key=lambda e: e.seq)
    events = _render_edit_events(txn, uid, events[: limit + 1])
    if len(events) > limit:
        page = events[:limit]
        return CatchupPage(tuple(page), page[-1].seq, True, head)
    return CatchupPage(tuple(events), head, False, head)


def _render_edit_events(txn: Txn, uid: int, events: list[StreamEvent]) -> list[StreamEvent]:
    """
    Catch-up's edit and hide events with what they render (issue 11): an
    edit carries its message's current state (None if recalled since: its
    recall event follows), a hide the messages it hid. One query per kind,
    only when the page has one.
    """
    edits = sorted({e.msg_id for e in events if e.kind == "edit"})
    hides = sorted({e.seq for e in events if e.kind == "hide"})
    if not edits and not hides:
        return events
    messages = {
        m.msg_id: m
        for m in map(
            _message,
            txn.query_in(f"SELECT {MSG_COLUMNS} FROM t_msg_record_list WHERE id IN (%s)", edits)
            if edits
            else (),
        )
        if m.status == RECORD_NORMAL
    }
    hidden: dict[int, list[int]] = defaultdict(list)
    if hides:
        for seq, msg_id in txn.query_in(
            "SELECT seq, msgId FROM t_hidden WHERE uid = ? AND seq IN (%s)", hides, (uid,)
        ):
            hidden[int(seq)].append(int(msg_id))
    out = []
    for e in events:
        if e.kind == "edit":
            e = attrs.evolve(e, message=messages.get(e.msg_id))
        elif e.kind == "hide":
            e = attrs.evolve(e, msg_ids=tuple(sorted(hidden.get(e.seq, ()))))
        out.append(e)
    return out
