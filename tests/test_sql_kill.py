"""
A MariaDB connection killed under a transaction (KILL CONNECTION: an
operator, a proxy's failover, the chaos soak's C{sql_kill}) is a lost
connection, like a server restart: the transaction is settled or run again
on a fresh connection, never reported as a failure of its own items (which
made a group commit run again in halves and answer C{dup: true} to a send's
only attempt).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from imserver.config import parse_config
from imserver.storage.sql.database import Database, Txn
from imserver.storage.sql.engines import create_engine
from tests.harness import shared_mariadb
from tests.support import reactor


def connection_sleep_txn(txn: Txn, seen: list[int]) -> int:
    """Note this connection's id in C{seen}, then hold it 2 s (to be killed meanwhile)."""
    row = txn.query_one("SELECT CONNECTION_ID()")
    assert row is not None
    seen.append(int(row[0]))
    txn.query("SELECT SLEEP(2)")
    return len(seen)


class KilledConnectionTests(TestCase):
    def database(self) -> tuple[Database, Any]:
        config = parse_config({"storage": {"sql": shared_mariadb().fresh_database()}})
        engine = create_engine(config.storage.sql)
        db = Database(reactor, engine, name="test", max_connections=2)
        self.addCleanup(db.close)
        return db, engine

    async def test_a_killed_connection_is_a_lost_connection(self) -> None:
        db, engine = self.database()
        killer = Database(reactor, engine, name="killer", max_connections=1)
        self.addCleanup(killer.close)
        seen: list[int] = []
        running = Deferred.fromCoroutine(db.run("sleep", connection_sleep_txn, seen))
        while not seen:
            await deferLater(reactor, 0.05, lambda: None)
        await deferLater(reactor, 0.2, lambda: None)
        await killer.run("kill", lambda txn: txn.query(f"KILL CONNECTION {seen[0]}"))
        # Run again on a fresh connection (nothing was written), not failed.
        self.assertEqual(await running, 2)
        self.assertNotEqual(seen[0], seen[1])

    def test_killed_errors_are_unavailable(self) -> None:
        import pymysql

        _, engine = self.database()
        for code in (1927, 2013):
            with self.subTest(code=code):
                self.assertTrue(engine.is_unavailable(pymysql.err.OperationalError(code, "killed")))
