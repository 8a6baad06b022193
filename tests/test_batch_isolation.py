"""
One bad item must never fail the other items of a batch (issue 9, defect 1's
rule, beyond the send group commit).

* L{Batcher}: a batch function gives a L{Failure} (or an exception) for an
  item it could not do, which fails that item alone; raising still fails the
  whole batch (outages). Unit and hypothesis tests on L{task.Clock}.
* The ack and login batches of L{Store}: a transaction that fails for
  anything but an outage is run again in halves, so only the item the
  database refuses fails; on both engines (a trigger refuses one item).
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Sequence
from typing import Any

import pymysql
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver.batching import Batcher, ItemFailure
from imserver.config import LimitsConfig
from imserver.errors import ErrorCode, ImError, Unavailable
from imserver.storage.model import Login
from imserver.storage.sql.database import Txn
from tests.stack import Stack, make_stack
from tests.support import reactor


class ItemError(Exception):
    pass


class BatchError(Exception):
    pass


class BatcherItemFailureTests(SynchronousTestCase):
    def test_a_failure_result_fails_that_item_alone(self) -> None:
        def run(items: Sequence[int]) -> Deferred[list[int | ItemFailure]]:
            out: list[int | ItemFailure] = []
            for i in items:
                if i == 2:
                    out.append(Failure(ItemError(i)))
                elif i == 3:
                    out.append(ItemError(i))  # an exception instance will do too
                else:
                    out.append(i * 10)
            d: Deferred[list[int | ItemFailure]] = Deferred()
            pending.append((d, out))
            return d

        pending: list[tuple[Deferred[list[int | ItemFailure]], list[int | ItemFailure]]] = []
        b: Batcher[int, int] = Batcher("t", run)
        ds = [b.submit(i) for i in range(5)]
        while pending:  # [0] runs alone, [1, 2, 3, 4] share the next batch
            d, out = pending.pop(0)
            d.callback(out)
        self.assertEqual(self.successResultOf(ds[0]), 0)
        self.assertEqual(self.successResultOf(ds[1]), 10)
        self.failureResultOf(ds[2], ItemError)
        self.failureResultOf(ds[3], ItemError)
        self.assertEqual(self.successResultOf(ds[4]), 40)
        self.successResultOf(b.idle())

    def test_raising_still_fails_the_whole_batch(self) -> None:
        async def run(items: Sequence[int]) -> list[int]:
            raise Unavailable("down")

        clock = Clock()
        b: Batcher[int, int] = Batcher("t", run, gather=clock)
        ds = [b.submit(i) for i in range(3)]
        clock.advance(0)
        for d in ds:
            self.failureResultOf(d, Unavailable)

    def test_an_item_failure_keeps_the_order_of_results(self) -> None:
        """Failed items are delivered in their place: callbacks fire in submit order."""
        order: list[tuple[int, bool]] = []

        async def run(items: Sequence[int]) -> list[int | ItemFailure]:
            return [ItemError(i) if i % 3 == 1 else i for i in items]

        clock = Clock()
        b: Batcher[int, int] = Batcher("t", run, gather=clock)
        for i in range(9):
            b.submit(i).addCallbacks(
                lambda r: order.append((r, True)),
                lambda f: order.append((f.value.args[0], False)),
            )
        clock.advance(0)
        self.assertEqual(order, [(i, i % 3 != 1) for i in range(9)])


#: How an item of the property test ends: ok, a Failure result, an exception
#: result, or (for its whole batch) the batch function raises.
MODES = ("ok", "failure", "exception", "batch")


class BatcherIsolationProperty(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        items=st.lists(
            st.tuples(
                st.sampled_from(MODES),
                st.sampled_from([0.0, 0.0, 0.001, 0.01, 0.1]),
            ),
            min_size=1,
            max_size=60,
        ),
        durations=st.lists(st.sampled_from([0.0, 0.002, 0.02, 0.2]), min_size=1, max_size=8),
        max_batch=st.integers(1, 8),
        concurrency=st.integers(1, 3),
        gather=st.booleans(),
    )
    def test_each_item_gets_its_own_outcome(
        self,
        items: list[tuple[str, float]],
        durations: list[float],
        max_batch: int,
        concurrency: int,
        gather: bool,
    ) -> None:
        """
        Whatever the timing, batch size and concurrency: an item's Deferred
        fails only if its own result is a failure or its own batch raised;
        every other item gets its result; callbacks fire in submit order.
        """
        clock = Clock()
        modes = [mode for mode, _ in items]
        runs: list[list[int]] = []
        running = [0]
        peak = [0]
        took = itertools.cycle(durations)

        async def run(batch: Sequence[int]) -> list[int | ItemFailure]:
            runs.append(list(batch))
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            try:
                await deferLater(clock, next(took), lambda: None)
            finally:
                running[0] -= 1
            if any(modes[i] == "batch" for i in batch):
                raise BatchError(batch[0])
            out: list[int | ItemFailure] = []
            for i in batch:
                if modes[i] == "failure":
                    out.append(Failure(ItemError(i)))
                elif modes[i] == "exception":
                    out.append(ItemError(i))
                else:
                    out.append(i * 7)
            return out

        b: Batcher[int, int] = Batcher(
            "p", run, max_batch=max_batch, concurrency=concurrency, gather=clock if gather else None
        )
        got: list[tuple[int, str, Any]] = []
        for i, (_, pause) in enumerate(items):
            clock.advance(pause)
            b.submit(i).addCallbacks(
                lambda r, i=i: got.append((i, "ok", r)),
                lambda f, i=i: got.append((i, type(f.value).__name__, f.value.args[0])),
            )
        while b.busy:
            clock.advance(0.01)
        self.successResultOf(b.idle())
        # Every item ran in exactly one batch, in submit order, none too big.
        self.assertEqual([i for batch in runs for i in batch], list(range(len(items))))
        self.assertTrue(all(1 <= len(batch) <= max_batch for batch in runs))
        self.assertLessEqual(peak[0], concurrency)
        batch_of = {i: batch for batch in runs for i in batch}
        expected = []
        for i, mode in enumerate(modes):
            batch = batch_of[i]
            if any(modes[j] == "batch" for j in batch):
                expected.append((i, "BatchError", batch[0]))
            elif mode == "ok":
                expected.append((i, "ok", i * 7))
            else:
                expected.append((i, "ItemError", i))
        self.assertEqual(got, expected)


# ---------------------------------------------------------------------------
# The ack and login batches of the store, on both engines

_uids = itertools.count(70_000)
BIG = LimitsConfig(send_per_second=1e6, send_burst=10**6, recall_seconds=3600)


async def _settled(ds: list[Deferred[Any]]) -> list[tuple[bool, Any]]:
    """Every result of a list of Deferreds, failures included, in order."""
    results: list[tuple[bool, Any]] = await gatherResults(
        [d.addCallbacks(lambda r: (True, r), lambda f: (False, f.value)) for d in ds]
    )
    return results


def _poison_ack_txn(txn: Txn, msg_id: int) -> None:
    """A trigger that refuses to clear one pending message: an ack the database refuses."""
    if txn.engine.kind == "mysql":
        txn.execute(
            "CREATE TRIGGER poison_ack BEFORE DELETE ON t_pending FOR EACH ROW"
            f" IF OLD.msgId = {int(msg_id)} THEN"
            " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poisoned ack'; END IF"
        )
    else:
        txn.execute(
            "CREATE TRIGGER poison_ack BEFORE DELETE ON t_pending"
            f" WHEN OLD.msgId = {int(msg_id)} BEGIN SELECT RAISE(ABORT, 'poisoned ack'); END"
        )


def _poison_login_txn(txn: Txn, uid: int) -> None:
    """A trigger that refuses to create one user: a login the database refuses."""
    if txn.engine.kind == "mysql":
        txn.execute(
            "CREATE TRIGGER poison_user BEFORE INSERT ON t_user FOR EACH ROW"
            f" IF NEW.uid = {int(uid)} THEN"
            " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poisoned user'; END IF"
        )
    else:
        txn.execute(
            "CREATE TRIGGER poison_user BEFORE INSERT ON t_user"
            f" WHEN NEW.uid = {int(uid)} BEGIN SELECT RAISE(ABORT, 'poisoned user'); END"
        )


def _pending_txn(txn: Txn, uid: int) -> list[int]:
    return [
        int(r[0])
        for r in txn.query("SELECT msgId FROM t_pending WHERE uid = ? ORDER BY msgId", (uid,))
    ]


def _users_txn(txn: Txn, uids: Sequence[int]) -> list[int]:
    return sorted(int(r[0]) for r in txn.query_in("SELECT uid FROM t_user WHERE uid IN (%s)", uids))


class BatchIsolationContract:
    backend = ""

    async def stack(self) -> Stack:
        return await make_stack(self, self.backend, limits=BIG)  # type: ignore[arg-type]

    async def users(self, stack: Stack, n: int) -> list[int]:
        uids = [next(_uids) for _ in range(n)]
        for uid in uids:
            await stack.chat.login(uid)
        return uids

    async def test_one_bad_ack_fails_alone(self) -> None:
        """
        One ack in a batch of other users' acks touches a message the
        database refuses to clear: that ack alone fails (internal, a clear
        message); every other ack of the batch commits and clears its
        pending messages, in SQL and in the hot copy.
        """
        stack = await self.stack()
        senders = await self.users(stack, 1)
        readers = await self.users(stack, 6)
        [s] = senders
        sent: dict[int, list[int]] = {}
        for r in readers:
            sent[r] = [
                (await stack.chat.send(s, r, f"{r}-{k}", "text", "x"))["msg_id"] for k in range(3)
            ]
        await stack.settle()
        bad_reader = readers[3]
        poisoned = sent[bad_reader][1]
        await stack.store.db.run("poison", _poison_ack_txn, poisoned)
        # A first ack runs alone; the others wait for it and share one batch.
        first = stack.chat.ack(readers[0], sent[readers[0]][:1])
        acks = [stack.chat.ack(r, sent[r]) for r in readers[1:]]
        self.assertEqual(stack.store.acks.depth, len(acks))
        results = await _settled([first, *acks])
        for r, (ok, value) in zip(readers, results, strict=True):
            if r == bad_reader:
                self.assertFalse(ok)
                self.assertIsInstance(value, ImError)
                self.assertEqual(value.code, ErrorCode.INTERNAL)
                self.assertEqual(value.message, "this ack could not be stored")
            else:
                self.assertTrue(ok, value)
        await stack.settle()
        self.assertEqual(
            await stack.store.db.run("p", _pending_txn, readers[0]), sent[readers[0]][1:]
        )
        for r in readers[1:]:
            left = await stack.store.db.run("p", _pending_txn, r)
            self.assertEqual(left, sent[r] if r == bad_reader else [])
            sync = await stack.chat.sync(r, 100, 0, None)
            self.assertEqual(
                [m["msg_id"] for m in sync["msgs"]], sent[r] if r == bad_reader else []
            )
        # The refused user can ack the rest (another batch, alone): still
        # refused as a whole, since their ack holds the bad id; without it, fine.
        with self.assertRaises(ImError):
            await stack.chat.ack(bad_reader, sent[bad_reader])
        await stack.chat.ack(bad_reader, [sent[bad_reader][0], sent[bad_reader][2]])
        self.assertEqual(await stack.store.db.run("p", _pending_txn, bad_reader), [poisoned])

    async def test_one_bad_login_fails_alone(self) -> None:
        """
        One first login in a batch of others is refused by the database:
        that login alone fails (internal, a clear message), every other
        user of the batch is created and logged in.
        """
        stack = await self.stack()
        uids = [next(_uids) for _ in range(7)]
        bad = uids[4]
        await stack.store.db.run("poison", _poison_login_txn, bad)
        first = Deferred.fromCoroutine(stack.chat.login(uids[0]))
        logins = [Deferred.fromCoroutine(stack.chat.login(uid)) for uid in uids[1:]]
        self.assertEqual(stack.store.logins.depth, len(logins))
        results = await _settled([first, *logins])
        for uid, (ok, value) in zip(uids, results, strict=True):
            if uid == bad:
                self.assertFalse(ok)
                self.assertIsInstance(value, ImError)
                self.assertEqual(value.code, ErrorCode.INTERNAL)
                self.assertEqual(value.message, "this login could not be stored")
            else:
                self.assertTrue(ok, value)
                self.assertIsInstance(value, Login)
                self.assertEqual(value.profile.uid, uid)
        self.assertEqual(
            await stack.store.db.run("u", _users_txn, uids), sorted(u for u in uids if u != bad)
        )
        # The good users can send to each other at once.
        await stack.chat.send(uids[1], uids[2], "c", "text", "x")

    async def test_an_unexpected_hot_step_error_after_the_commit(self) -> None:
        """
        The ack committed in SQL, then its hot-store step failed with an
        unexpected error (not an outage): every ack of the batch is answered
        ok (it is stored), nothing is run again, and the hot copies are
        repaired, so sync does not show the acked messages again.
        """
        stack = await self.stack()
        [s] = await self.users(stack, 1)
        readers = await self.users(stack, 3)
        sent = {r: (await stack.chat.send(s, r, f"x{r}", "text", "x"))["msg_id"] for r in readers}
        await stack.settle()
        for r in readers:  # the hot copies are loaded
            self.assertEqual(len((await stack.chat.sync(r, 10, 0, None))["msgs"]), 1)
        real = stack.store.hot.ack
        calls: list[int] = []

        async def broken(acked: Any) -> None:
            calls.append(len(acked))
            if len(calls) == 1:
                raise RuntimeError("unexpected hot-store error")
            await real(acked)

        stack.store.hot.ack = broken  # type: ignore[method-assign]
        results = await _settled([stack.chat.ack(r, [sent[r]]) for r in readers])
        self.assertTrue(all(ok for ok, _ in results), results)
        await stack.settle()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # type: ignore[attr-defined]
        for r in readers:
            self.assertEqual(await stack.store.db.run("p", _pending_txn, r), [])
            self.assertEqual((await stack.chat.sync(r, 10, 0, None))["msgs"], [])
        # Repaired: the hot copies answer again, without the acked messages.
        while stack.store.suspect_users:
            await deferLater(reactor, 0.05, lambda: None)
        for r in readers:
            self.assertEqual((await stack.chat.sync(r, 10, 0, None))["msgs"], [])

    async def test_an_outage_still_fails_the_whole_batch(self) -> None:
        """Unavailable is not isolated: every ack of the batch is answered unavailable."""
        stack = await self.stack()
        [s, r1, r2] = await self.users(stack, 3)
        m1 = (await stack.chat.send(s, r1, "a", "text", "x"))["msg_id"]
        m2 = (await stack.chat.send(s, r2, "b", "text", "x"))["msg_id"]
        await stack.settle()
        calls: list[int] = []
        real = stack.store.db.run

        async def down(desc: str, func: Any, *args: Any, **kw: Any) -> Any:
            if desc == "ack":
                calls.append(len(args[0]))
                await deferLater(reactor, 0, lambda: None)
                raise Unavailable("the database is unavailable")
            return await real(desc, func, *args, **kw)

        stack.store.db.run = down  # type: ignore[method-assign]
        first = stack.chat.ack(s, [m1])  # runs alone; the next two share a batch
        both = [stack.chat.ack(r1, [m1]), stack.chat.ack(r2, [m2])]
        results = await _settled([first, *both])
        stack.store.db.run = real  # type: ignore[method-assign]
        self.assertEqual([ok for ok, _ in results], [False, False, False])
        self.assertTrue(all(isinstance(v, Unavailable) for _, v in results))
        # One transaction per batch, no halves.
        self.assertEqual(calls, [1, 2])

    async def test_a_lock_conflict_left_after_retries_fails_the_whole_batch(self) -> None:
        """
        A deadlock or lock wait the database pool's retries did not clear is
        not one item's fault: not halved (halves would wait on the same
        locks), every ack of that batch fails with it.
        """
        stack = await self.stack()
        [s, r1, r2] = await self.users(stack, 3)
        m1 = (await stack.chat.send(s, r1, "a", "text", "x"))["msg_id"]
        m2 = (await stack.chat.send(s, r2, "b", "text", "x"))["msg_id"]
        await stack.settle()
        engine = stack.store.db.engine
        conflict: Exception
        if engine.kind == "mysql":
            conflict = pymysql.err.OperationalError(1213, "Deadlock found")
        else:
            conflict = sqlite3.OperationalError("database is locked")
        self.assertTrue(engine.is_retryable(conflict))
        calls: list[int] = []
        real = stack.store.db.run

        async def busy(desc: str, func: Any, *args: Any, **kw: Any) -> Any:
            if desc == "ack":
                calls.append(len(args[0]))
                await deferLater(reactor, 0, lambda: None)
                raise conflict
            return await real(desc, func, *args, **kw)

        stack.store.db.run = busy  # type: ignore[method-assign]
        first = stack.chat.ack(s, [m1])  # runs alone; the next two share a batch
        both = [stack.chat.ack(r1, [m1]), stack.chat.ack(r2, [m2])]
        results = await _settled([first, *both])
        stack.store.db.run = real  # type: ignore[method-assign]
        self.assertTrue(all(v is conflict for _, v in results), results)
        self.assertEqual(calls, [1, 2])


class EmbeddedBatchIsolationTests(BatchIsolationContract, TestCase):
    backend = "embedded"


class MariaDBBatchIsolationTests(BatchIsolationContract, TestCase):
    backend = "redis"
