"""The SQL layer on both engines: transactions, migrations, outages (real mariadbd)."""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import TestCase

from imserver.config import SqliteTarget, parse_config
from imserver.errors import Unavailable
from imserver.storage.sql.database import ROWS, Database, Statement, Txn, values
from imserver.storage.sql.engines import create_engine, render
from imserver.storage.sql.migrate import available, migrate, split_statements
from tests.harness import MariaDBServer, shared_mariadb
from tests.support import reactor


def _insert_then_fail_txn(txn: Txn) -> None:
    txn.execute("INSERT INTO t_user (uid, createTime, updateTime) VALUES (?, ?, ?)", (1, 0, 0))
    raise ValueError("boom")


def _count_users_txn(txn: Txn) -> int:
    row = txn.query_one("SELECT COUNT(*) FROM t_user")
    assert row is not None
    return int(row[0])


def _insert_users_txn(txn: Txn, uids: list[int]) -> int:
    return txn.executemany(
        "INSERT INTO t_user (uid, createTime, updateTime) VALUES (?, ?, ?)",
        [(uid, 0, 0) for uid in uids],
    )


def _select_in_txn(txn: Txn, uids: list[int]) -> list[int]:
    return sorted(r[0] for r in txn.query_in("SELECT uid FROM t_user WHERE uid IN (%s)", uids))


class SqlContract:
    """Mixed into a TestCase per engine: SQLite and MariaDB."""

    db: Database

    def make_db(self) -> Database:
        raise NotImplementedError

    async def asyncSetUp(self) -> None:
        self.db = self.make_db()
        self.addCleanup(self.db.close)
        self.assertEqual(
            await migrate(self.db, 0), [m.version for m in available(self.db.engine.kind)]
        )

    async def test_migrations_apply_once(self) -> None:
        await self.asyncSetUp()
        self.assertEqual(await migrate(self.db, 0), [])

    async def test_failed_transaction_rolls_back(self) -> None:
        await self.asyncSetUp()
        with self.assertRaises(ValueError):
            await self.db.run("fail", _insert_then_fail_txn)
        self.assertEqual(await self.db.run("count", _count_users_txn), 0)

    async def test_executemany_and_chunked_in(self) -> None:
        await self.asyncSetUp()
        uids = list(range(1, 1202))
        await self.db.run("insert", _insert_users_txn, uids)
        self.assertEqual(await self.db.run("count", _count_users_txn), 1201)
        found = await self.db.run("select", _select_in_txn, [5, 1201, 5000, *uids[100:1150]])
        self.assertEqual(found[:3], [5, 101, 102])
        self.assertEqual(len(found), 1052)


NASTY = [
    "it's",
    'a "quote"',
    "back\\slash",
    "nul\x00byte",
    "new\nline",
    "ctrl-z\x1a",
    "unicode \u00e9\u4e2d\U0001f600",
    "?",
    "%s %% %(x)s",
    "",
    "--",
    "'; DROP TABLE t_user; --",
]


def _script_round_trip_txn(txn: Txn, texts: list[str]) -> list[tuple[Any, ...]]:
    rows = [(i + 1, t, t.encode("utf-8") + bytes([0, 39, 92, 255])) for i, t in enumerate(texts)]
    marks, args = values(rows)
    txn.script([Statement(f"INSERT INTO t_odd (id, s, b) VALUES {marks}", args)])
    [result] = txn.script([Statement("SELECT id, s, b FROM t_odd ORDER BY id", (), ROWS)])
    return result


def _create_odd_txn(txn: Txn) -> None:
    txn.execute("CREATE TABLE t_odd (id INTEGER PRIMARY KEY, s VARCHAR(200), b BLOB)")


class ScriptTests:
    """Scripts carry any value intact (MySQL renders literals itself)."""

    async def test_awkward_values_round_trip(self) -> None:
        await self.asyncSetUp()
        await self.db.run("create", _create_odd_txn)
        rows = await self.db.run("odd", _script_round_trip_txn, NASTY)
        self.assertEqual(
            [(int(r[0]), str(r[1]), bytes(r[2])) for r in rows],
            [(i + 1, t, t.encode("utf-8") + bytes([0, 39, 92, 255])) for i, t in enumerate(NASTY)],
        )
        self.assertEqual(await self.db.run("count", _count_users_txn), 0)  # t_user intact


class RenderTests(TestCase):
    def test_literals(self) -> None:
        self.assertEqual(
            render("VALUES (?, ?, ?, ?, ?)", (1, 'it\'s \\ "x"\n', b"\x00\xff", None, 2.5)),
            "VALUES (1, 'it\\'s \\\\ \\\"x\\\"\\n', X'00ff', NULL, 2.5)",
        )

    def test_percent_signs_stay_as_they_are(self) -> None:
        # The text is rendered with one % formatting: its own % must survive.
        self.assertEqual(
            render("SELECT ? WHERE s LIKE '%a%s' AND t = ?", ("100%", 7)),
            "SELECT '100%' WHERE s LIKE '%a%s' AND t = 7",
        )

    def test_placeholder_count_must_match(self) -> None:
        self.assertRaises(ValueError, render, "VALUES (?, ?)", (1,))
        self.assertRaises(KeyError, render, "VALUES (?)", (object(),))


class SqliteTests(SqlContract, ScriptTests, TestCase):
    def make_db(self) -> Database:
        path = os.path.abspath(self.mktemp())
        return Database(reactor, create_engine(SqliteTarget(path)), name="test")


class MariaDBTests(SqlContract, ScriptTests, TestCase):
    def make_db(self) -> Database:
        url = shared_mariadb().fresh_database()
        config = parse_config({"storage": {"sql": url}})
        return Database(reactor, create_engine(config.storage.sql), name="test", max_connections=3)


class MariaDBFaultTests(TestCase):
    """A private mariadbd we can stop and restart."""

    timeout = 120

    async def test_restart_and_outage(self) -> None:
        server = MariaDBServer().start()
        self.addCleanup(server.cleanup)
        server.sql("CREATE DATABASE im")
        config = parse_config({"storage": {"sql": server.url("im")}})
        db = Database(reactor, create_engine(config.storage.sql), name="test", max_connections=3)
        self.addCleanup(db.close)
        await migrate(db, 0)
        # Warm every pooled connection.
        await db.run("insert", _insert_users_txn, [1])
        for _ in range(6):
            await db.run("count", _count_users_txn)

        server.restart()
        # Every pooled connection is stale now; none of them may fail a query.
        for _ in range(10):
            self.assertEqual(await db.run("count", _count_users_txn), 1)

        server.stop()
        with self.assertRaises(Unavailable):
            await db.run("count", _count_users_txn)
        server.start()
        self.assertEqual(await db.run("count", _count_users_txn), 1)


class MigrationFileTests(TestCase):
    def test_both_dialects_have_the_same_versions(self) -> None:
        self.assertEqual(
            [m.version for m in available("mysql")], [m.version for m in available("sqlite")]
        )

    def test_split(self) -> None:
        self.assertEqual(
            split_statements("-- c\nCREATE TABLE a (x INT);\n\nCREATE TABLE b (y INT);\n"),
            ("CREATE TABLE a (x INT)", "CREATE TABLE b (y INT)"),
        )
