"""
Versioned schema migrations, applied at start-up and by C{imserver migrate}.

Migrations are files C{migrations/NNNN_name.<dialect>.sql}, applied in order;
C{t_schema_version} records each applied version. Concurrently starting nodes
take a lock (MySQL C{GET_LOCK}; SQLite's write lock) so each version is
applied once.
"""

from __future__ import annotations

import re
from importlib import resources

import attrs

from imserver.storage.sql.database import Database, Txn

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(mysql|sqlite)\.sql$")


@attrs.frozen
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def split_statements(script: str) -> tuple[str, ...]:
    """Split a script on semicolons ending a line; strip comment lines."""
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    parts = re.split(r";\s*$", "\n".join(lines), flags=re.M)
    return tuple(p.strip() for p in parts if p.strip())


def available(dialect: str) -> list[Migration]:
    found = []
    for entry in resources.files("imserver.storage.sql").joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m and m.group(3) == dialect:
            found.append(
                Migration(int(m.group(1)), m.group(2), split_statements(entry.read_text("utf-8")))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions for {dialect}: {versions}")
    return found


def _migrate_txn(txn: Txn, migrations: list[Migration], now_ms: int) -> list[int]:
    engine = txn.engine
    # DDL commits on its own on MySQL, and t_commit may not exist yet: no
    # commit token (migrations are idempotent anyway).
    txn.tokens = False
    engine.lock_migrations(txn)
    try:
        txn.execute(
            "CREATE TABLE IF NOT EXISTS t_schema_version ("
            " version INTEGER NOT NULL PRIMARY KEY,"
            " name VARCHAR(128) NOT NULL,"
            " appliedAt BIGINT NOT NULL)"
        )
        done = {row[0] for row in txn.query("SELECT version FROM t_schema_version")}
        applied = []
        for migration in migrations:
            if migration.version in done:
                continue
            for statement in migration.statements:
                txn.execute(statement)
            txn.execute(
                "INSERT INTO t_schema_version (version, name, appliedAt) VALUES (?, ?, ?)",
                (migration.version, migration.name, now_ms),
            )
            applied.append(migration.version)
        return applied
    finally:
        engine.unlock_migrations(txn)


async def migrate(db: Database, now_ms: int) -> list[int]:
    """Apply every pending migration; return the versions applied."""
    return await db.run("migrate", _migrate_txn, available(db.engine.kind), now_ms)
