"""
Presence in SQL (t_presence, migration 0009): a user's C{share} setting and
last-seen time. Read when a connection asks about or watches users (one
query per request), written when the setting changes and, in batches, when
users go online or offline; never on the push path.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from imserver.storage.model import chunks
from imserver.storage.sql.database import Database, Txn, marks

#: The C{share} setting, as the wire names it, and as stored.
SHARE_CODES = {"contacts": 0, "everyone": 1, "nobody": 2}
SHARE_NAMES = {code: name for name, code in SHARE_CODES.items()}
DEFAULT_SHARE = "contacts"


@attrs.frozen
class PresenceRow:
    uid: int
    share: str = DEFAULT_SHARE
    last_seen: int = 0


def load_txn(txn: Txn, uids: Sequence[int]) -> dict[int, PresenceRow]:
    rows = txn.query_in("SELECT uid, share, lastSeen FROM t_presence WHERE uid IN (%s)", uids)
    return {
        int(uid): PresenceRow(int(uid), SHARE_NAMES.get(int(share), DEFAULT_SHARE), int(seen))
        for uid, share, seen in rows
    }


def set_share_txn(txn: Txn, uid: int, share: int) -> None:
    """Idempotent: the row is made if need be, then given the setting."""
    txn.execute(f"{txn.engine.insert_ignore} INTO t_presence (uid) VALUES (?)", (uid,))
    txn.execute("UPDATE t_presence SET share = ? WHERE uid = ?", (share, uid))


def seen_txn(txn: Txn, seen: Sequence[tuple[int, int]]) -> None:
    """lastSeen = max(lastSeen, ms) for each (uid, ms): idempotent, order-free."""
    for part in chunks(sorted(seen), 500):
        sql = txn.engine.upsert_add(
            "t_presence", ("uid",), ("uid", "lastSeen"), (), greatest=("lastSeen",), rows=len(part)
        )
        txn.execute(sql, [value for row in part for value in row])


def contacts_txn(txn: Txn, uid: int, others: Sequence[int]) -> set[int]:
    """Which of C{others} have a conversation (a t_session row) with C{uid}: one query a chunk."""
    found: set[int] = set()
    for part in chunks(sorted(set(others) - {uid}), 500):
        rows = txn.query(
            f"SELECT uidHigh FROM t_session WHERE uidLow = ? AND uidHigh IN ({marks(len(part))})"
            f" UNION ALL SELECT uidLow FROM t_session WHERE uidHigh = ?"
            f" AND uidLow IN ({marks(len(part))})",
            (uid, *part, uid, *part),
        )
        found.update(int(row[0]) for row in rows)
    return found


class PresenceStore:
    """The queries above on the store's pools: reads on the real-time one, writes in background."""

    def __init__(self, db: Database, background: Database) -> None:
        self.db = db
        self.background = background

    async def load(self, uids: Sequence[int]) -> dict[int, PresenceRow]:
        """Every uid asked, with the defaults for users without a row."""
        found = await self.db.run("presence_load", load_txn, sorted(set(uids))) if uids else {}
        return {uid: found.get(uid, PresenceRow(uid)) for uid in uids}

    async def set_share(self, uid: int, share: str) -> None:
        await self.db.run("presence_share", set_share_txn, uid, SHARE_CODES[share])

    async def seen(self, seen: Sequence[tuple[int, int]]) -> None:
        if seen:
            await self.background.run("presence_seen", seen_txn, list(seen))

    async def contacts(self, uid: int, others: Sequence[int]) -> set[int]:
        if not others:
            return set()
        return await self.db.run("presence_contacts", contacts_txn, uid, list(others))
