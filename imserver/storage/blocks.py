"""
Blocks in SQL (t_block, migration 0006): L{BlockStore}.

SQL only: nothing of a block lives in the hot store (the node cache of
L{imserver.chat.blocks.BlockService} sits in front of this), so a change is
one short transaction and needs no outbox row. Kept apart from L{Store}, as
L{imserver.storage.devices} is.
"""

from __future__ import annotations

from collections.abc import Sequence

from imserver.errors import ErrorCode, ImError
from imserver.storage.sql.database import Database, Txn

#: Uids one page of a user's blocks holds, at most.
BLOCKED_MAX_LIMIT = 500


#: Most users block nobody: one shared value.
EMPTY: frozenset[int] = frozenset()


#: Users per statement of a load.
LOAD_CHUNK = 250


class BlockStore:
    def __init__(self, db: Database, background: Database | None = None) -> None:
        self.db = db
        self.background = background or db

    async def block(self, uid: int, other: int, max_blocks: int, now_ms: int) -> bool:
        """
        C{uid} blocks C{other}; whether the row is new.

        @raise ImError: C{no_such_user} (either user), C{too_large} (C{uid}
            blocks C{max_blocks} users already).
        """
        return await self.db.run("block", block_txn, uid, other, max_blocks, now_ms)

    async def unblock(self, uid: int, other: int) -> bool:
        """C{uid} no longer blocks C{other}; whether there was a row."""
        return await self.db.run("unblock", unblock_txn, uid, other)

    async def blocked(self, uid: int, after: int, limit: int) -> list[int]:
        """The users C{uid} blocks above C{after}, ascending, at most C{limit}."""
        return await self.db.run("blocked", blocked_txn, uid, after, limit)

    async def load(
        self, uids: Sequence[int], background: bool = False
    ) -> dict[int, frozenset[int]]:
        """
        The users each of C{uids} blocks (outgoing only: at most max_blocks
        each; L{EMPTY} for most): one query (per L{LOAD_CHUNK} users), on the
        background pool if C{background}.
        """
        db = self.background if background else self.db
        return await db.run("load_blocks", load_blocks_txn, list(uids))


def block_txn(txn: Txn, uid: int, other: int, max_blocks: int, now_ms: int) -> bool:
    # Both users' t_user rows, ascending (the lock order of queries.py): the
    # blocker's lock makes the count below exact under concurrent blocks.
    rows = txn.query(
        f"SELECT uid FROM t_user WHERE uid IN (?, ?) ORDER BY uid{txn.engine.for_update}",
        sorted((uid, other)),
    )
    found = {int(r[0]) for r in rows}
    for who in (uid, other):
        if who not in found:
            raise ImError(ErrorCode.NO_SUCH_USER, f"user {who} does not exist")
    row = txn.query_one(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN blockedUid = ? THEN 1 ELSE 0 END), 0)"
        " FROM t_block WHERE uid = ?",
        (other, uid),
    )
    assert row is not None
    count, already = int(row[0]), int(row[1])
    if already:
        return False
    if count >= max_blocks:
        raise ImError(ErrorCode.TOO_LARGE, f"you block {max_blocks} users already: the most")
    # INSERT IGNORE: a run again after a rolled-back first try finds its row gone anyway.
    n = txn.execute(
        f"{txn.engine.insert_ignore} INTO t_block (uid, blockedUid, createdAt) VALUES (?, ?, ?)",
        (uid, other, now_ms),
    )
    return n == 1


def unblock_txn(txn: Txn, uid: int, other: int) -> bool:
    return txn.execute("DELETE FROM t_block WHERE uid = ? AND blockedUid = ?", (uid, other)) > 0


def blocked_txn(txn: Txn, uid: int, after: int, limit: int) -> list[int]:
    rows = txn.query(
        "SELECT blockedUid FROM t_block WHERE uid = ? AND blockedUid > ?"
        " ORDER BY blockedUid LIMIT ?",
        (uid, after, limit),
    )
    return [int(r[0]) for r in rows]


def load_blocks_txn(txn: Txn, uids: Sequence[int]) -> dict[int, frozenset[int]]:
    """Whom each user in C{uids} blocks: one statement (primary key ranges) a chunk."""
    wanted = sorted(set(uids))
    if not wanted:
        return {}
    blocks: dict[int, set[int]] = {uid: set() for uid in wanted}
    for i in range(0, len(wanted), LOAD_CHUNK):
        part = wanted[i : i + LOAD_CHUNK]
        marks = ", ".join("?" * len(part))
        for r in txn.query(
            f"SELECT uid, blockedUid FROM t_block WHERE uid IN ({marks})", tuple(part)
        ):
            blocks[int(r[0])].add(int(r[1]))
    return {uid: frozenset(blocks[uid]) if blocks[uid] else EMPTY for uid in wanted}
