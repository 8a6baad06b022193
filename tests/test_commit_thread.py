"""
The commit threads of L{Database} (issue 13): the send and ack batches each
run on one thread of their own, fed by a queue, instead of the pool's.

Unit tests drive L{CommitThread} with an injected thread that runs its loop
only when joined, and a reactor whose C{callFromThread} is recorded; the
integration tests run real threads on SQLite and MariaDB.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from imserver.config import SqliteTarget, parse_config
from imserver.errors import Unavailable
from imserver.storage.sql.database import HOT_LANES, CommitThread, Database, Txn
from imserver.storage.sql.engines import create_engine
from imserver.storage.sql.migrate import migrate
from tests.harness import shared_mariadb
from tests.support import reactor
from tests.test_sql_kill import connection_sleep_txn


class _FakeReactor:
    """C{callFromThread} queues the call; L{flush} runs them (the reactor's turn)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.append((f, args))

    def flush(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


class _FakeThread:
    """Starts nothing; its loop runs, in the caller's thread, when joined."""

    made: list[_FakeThread]

    def __init__(self, target: Callable[[], None], name: str, stuck: bool = False) -> None:
        self.target = target
        self.name = name
        self.started = False
        self.done = False
        self.stuck = stuck

    def start(self) -> None:
        self.started = True

    def join(self, timeout: float | None = None) -> None:
        if not self.stuck and not self.done:
            self.target()
            self.done = True

    def is_alive(self) -> bool:
        return self.started and not self.done


class CommitThreadTests(TestCase):
    def make(self, stuck: bool = False) -> tuple[CommitThread, _FakeReactor, list[_FakeThread]]:
        fake = _FakeReactor()
        threads: list[_FakeThread] = []
        self.exits = 0

        def factory(target: Callable[[], None], name: str) -> _FakeThread:
            t = _FakeThread(target, name, stuck)
            threads.append(t)
            return t

        def on_exit() -> None:
            self.exits += 1

        lane = CommitThread(fake, "lane", thread_factory=factory, on_exit=on_exit)
        return lane, fake, threads

    def test_started_once_on_first_submit(self) -> None:
        lane, _, threads = self.make()
        self.assertEqual(threads, [])
        lane.submit(lambda: 1)
        lane.submit(lambda: 2)
        self.assertEqual(len(threads), 1)
        self.assertTrue(threads[0].started)
        self.assertEqual(threads[0].name, "lane")

    def test_jobs_run_in_order_and_results_come_back_on_the_reactor(self) -> None:
        lane, fake, _ = self.make()
        ran: list[int] = []
        got: list[int] = []
        for i in range(3):
            d = lane.submit(lambda i=i: ran.append(i) or i * 10)
            d.addCallback(got.append)
        self.assertEqual(lane.pending, 3)
        self.assertTrue(lane.stop())  # drains: the three jobs run
        self.assertEqual(ran, [0, 1, 2])
        # Nothing fired in the thread: only through callFromThread.
        self.assertEqual(got, [])
        fake.flush()
        self.assertEqual(got, [0, 10, 20])
        self.assertEqual(lane.pending, 0)

    def test_a_failing_job_fails_alone(self) -> None:
        lane, fake, _ = self.make()

        def boom() -> int:
            raise ValueError("boom")

        first = lane.submit(boom)
        second = lane.submit(lambda: 2)
        lane.stop()
        fake.flush()
        self.failureResultOf(first, ValueError)
        self.assertEqual(self.successResultOf(second), 2)

    def test_a_base_exception_does_not_end_the_thread(self) -> None:
        lane, fake, _ = self.make()

        def interrupted() -> int:
            raise KeyboardInterrupt()

        first = lane.submit(interrupted)
        second = lane.submit(lambda: 2)
        lane.stop()
        fake.flush()
        self.failureResultOf(first, KeyboardInterrupt)
        self.assertEqual(self.successResultOf(second), 2)

    def test_stop_drains_then_runs_the_exit_hook_and_refuses_new_jobs(self) -> None:
        lane, fake, threads = self.make()
        d = lane.submit(lambda: "queued before stop")
        self.assertTrue(lane.stop())
        self.assertEqual(self.exits, 1)
        fake.flush()
        self.assertEqual(self.successResultOf(d), "queued before stop")
        self.assertRaises(Unavailable, lane.submit, lambda: None)
        # Once: a second stop does nothing.
        self.assertTrue(lane.stop())
        self.assertEqual(self.exits, 1)
        self.assertEqual(len(threads), 1)

    def test_stop_without_a_thread_starts_none(self) -> None:
        lane, _, threads = self.make()
        self.assertTrue(lane.stop())
        self.assertEqual(threads, [])
        self.assertEqual(self.exits, 0)

    def test_stop_of_a_stuck_thread_gives_up(self) -> None:
        lane, _, _ = self.make(stuck=True)
        lane.submit(lambda: None)
        self.assertFalse(lane.stop(timeout=0.01))
        self.flushLoggedErrors()

    def test_exit_hook_failure_is_logged_not_raised(self) -> None:
        fake = _FakeReactor()

        def on_exit() -> None:
            raise RuntimeError("close failed")

        lane = CommitThread(
            fake, "lane", thread_factory=lambda t, n: _FakeThread(t, n), on_exit=on_exit
        )
        lane.submit(lambda: None)
        self.assertTrue(lane.stop())


def _where_txn(txn: Txn) -> str:
    txn.query_one("SELECT 1")
    return threading.current_thread().name


def _insert_users_txn(txn: Txn, uids: list[int]) -> int:
    return txn.executemany(
        "INSERT INTO t_user (uid, createTime, updateTime) VALUES (?, ?, ?)",
        [(uid, 0, 0) for uid in uids],
    )


def _count_users_txn(txn: Txn) -> int:
    row = txn.query_one("SELECT COUNT(*) FROM t_user")
    assert row is not None
    return int(row[0])


def _insert_then_fail_txn(txn: Txn) -> None:
    txn.execute("INSERT INTO t_user (uid, createTime, updateTime) VALUES (?, ?, ?)", (99, 0, 0))
    raise ValueError("boom")


class LaneContract:
    """Mixed into a TestCase per engine."""

    db: Database

    def make_db(self, **kwargs: Any) -> Database:
        raise NotImplementedError

    async def setUp(self) -> None:
        self.db = self.make_db()
        self.addCleanup(self.db.close)  # type: ignore[attr-defined]
        await migrate(self.db, 0)

    async def test_hot_transactions_run_on_their_own_threads(self) -> None:
        self.assertEqual(tuple(self.db.lanes), HOT_LANES)
        names = {desc: await self.db.run(desc, _where_txn) for desc in ("send", "ack", "other")}
        self.assertEqual(names["send"], "imserver-sql-test-send")
        self.assertEqual(names["ack"], "imserver-sql-test-ack")
        self.assertTrue(names["other"].startswith("PoolThread-"), names)
        # The same thread, with the same connection, batch after batch.
        self.assertEqual(await self.db.run("send", _where_txn), "imserver-sql-test-send")

    async def test_observed_stages(self) -> None:
        seen: list[tuple[str, float]] = []
        self.db.observe = lambda stage, s: seen.append((stage, s))
        await self.db.run("send", _where_txn)
        self.assertEqual([stage for stage, _ in seen], ["wait", "run", "return"])
        self.assertTrue(all(s >= 0 for _, s in seen))

    async def test_a_failed_transaction_rolls_back_and_the_lane_goes_on(self) -> None:
        with self.assertRaises(ValueError):  # type: ignore[attr-defined]
            await self.db.run("send", _insert_then_fail_txn)
        self.assertEqual(await self.db.run("send", _insert_users_txn, [1, 2]), 2)
        self.assertEqual(await self.db.run("ack", _count_users_txn), 2)

    async def test_close_drains_the_queue(self) -> None:
        queued = [
            Deferred.fromCoroutine(self.db.run("send", _insert_users_txn, [uid]))
            for uid in range(10, 15)
        ]
        lane = self.db.lanes["send"]
        self.db.close()
        self.assertEqual(await gatherResults(queued), [1] * 5)
        self.assertTrue(lane.stopped)
        # The thread has ended, and closed its connection on the way out.
        self.assertEqual(
            [t for t in threading.enumerate() if t.name == "imserver-sql-test-send"], []
        )
        with self.assertRaises(Unavailable):  # type: ignore[attr-defined]
            await self.db.run("send", _count_users_txn)
        db = self.make_db()
        self.addCleanup(db.close)  # type: ignore[attr-defined]
        self.assertEqual(await db.run("other", _count_users_txn), 5)

    async def test_no_lanes(self) -> None:
        db = self.make_db(lanes=())
        self.addCleanup(db.close)  # type: ignore[attr-defined]
        name = await db.run("send", _where_txn)
        self.assertTrue(name.startswith("PoolThread-"), name)


class SqliteLaneTests(LaneContract, TestCase):
    def make_db(self, **kwargs: Any) -> Database:
        if not hasattr(self, "path"):
            self.path = os.path.abspath(self.mktemp())
        kwargs.setdefault("lanes", HOT_LANES)  # not the default on SQLite (below)
        return Database(reactor, create_engine(SqliteTarget(self.path)), name="test", **kwargs)

    async def test_no_lanes_by_default_on_the_embedded_engine(self) -> None:
        """
        Regression: SQLite is one writer connection; the commit threads' own
        connections waited on its file lock in the busy handler's sleeps
        (a send 0.6-0.9 s during a flood of reads, tests.test_e2e_limits).
        """
        db = Database(reactor, create_engine(SqliteTarget(self.path + "-2")), name="t")
        self.addCleanup(db.close)
        self.assertEqual(db.lanes, {})
        name = await db.run("send", _where_txn)
        self.assertTrue(name.startswith("PoolThread-"), name)


def _lock_two_txn(
    txn: Txn, first: int, second: int, barrier: threading.Barrier, tries: list[int]
) -> int:
    txn.execute("UPDATE t_user SET updateTime = updateTime + 1 WHERE uid = ?", (first,))
    tries.append(first)
    if len(tries) <= 2:
        # Both hold their first row: each now waits for the other's.
        try:
            barrier.wait(10)
        except threading.BrokenBarrierError:
            pass
    txn.execute("UPDATE t_user SET updateTime = updateTime + 1 WHERE uid = ?", (second,))
    return first


class MariaDBLaneTests(LaneContract, TestCase):
    timeout = 60

    def make_db(self, **kwargs: Any) -> Database:
        if not hasattr(self, "url"):
            self.url = shared_mariadb().fresh_database()
        config = parse_config({"storage": {"sql": self.url}})
        return Database(
            reactor, create_engine(config.storage.sql), name="test", max_connections=3, **kwargs
        )

    async def test_warm_opens_each_lane_connection(self) -> None:
        """
        Regression: a lane's connection was opened on its first batch, so a
        server out of descriptors (a connection flood) answered every send
        unavailable (tests.test_e2e_limits test_emfile_for_real).
        """
        self.assertEqual(sorted(self.db.lanes), ["ack", "send"])
        before = len(self.db._pool.connections)  # the pool's own (the migration)
        await self.db.warm()
        self.assertEqual(len(self.db._pool.connections), before + 2)
        self.assertEqual({lane.pending for lane in self.db.lanes.values()}, {0})

    async def test_deadlock_between_the_send_and_ack_lanes_is_retried(self) -> None:
        """The two lanes are two threads with two connections: a deadlock
        between them rolls one back, which is run again, and both succeed."""
        await self.db.run("other", _insert_users_txn, [1, 2])
        barrier = threading.Barrier(2)
        tries: list[int] = []
        results = await gatherResults(
            [
                Deferred.fromCoroutine(self.db.run("send", _lock_two_txn, 1, 2, barrier, tries)),
                Deferred.fromCoroutine(self.db.run("ack", _lock_two_txn, 2, 1, barrier, tries)),
            ]
        )
        self.assertEqual(results, [1, 2])
        self.assertEqual(len(tries), 3)  # one of the two ran twice

    async def test_a_killed_lane_connection_is_run_again_on_a_fresh_one(self) -> None:
        seen: list[int] = []
        running = Deferred.fromCoroutine(self.db.run("send", connection_sleep_txn, seen))
        while not seen:
            await deferLater(reactor, 0.05, lambda: None)
        await deferLater(reactor, 0.2, lambda: None)
        await self.db.run("other", lambda txn: txn.query(f"KILL CONNECTION {seen[0]}"))
        self.assertEqual(await running, 2)
        self.assertNotEqual(seen[0], seen[1])
        # The lane goes on, on its new connection.
        self.assertEqual(await self.db.run("send", _count_users_txn), 0)
