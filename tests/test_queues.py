"""
The queues: the retry queue (task.Clock), the transactional outbox and its
replay, and the delayed notification queue against a real local HTTP sink.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import random
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from imserver.config import LimitsConfig, NotifyConfig
from imserver.periodic import Periodic
from imserver.retry import RetryPolicy, RetryQueue, RetryQueueFull, Task
from imserver.services.notifier import Notifier, Webhook, preview
from imserver.storage.hot.interface import HotUnavailable
from imserver.storage.sql.database import Txn
from tests.stack import Stack, make_stack
from tests.support import eventually, reactor, sleep, within

BIG = LimitsConfig(send_per_second=1e6, send_burst=10**6, recall_seconds=3600)
SECRET = "webhook-secret-0123456789"
_uids = itertools.count(70_000)


class RetryPolicyTests(SynchronousTestCase):
    def test_exponential_capped_with_bounded_jitter(self) -> None:
        policy = RetryPolicy(base=0.5, factor=2.0, max_delay=4.0, max_attempts=5, jitter=0.2)
        rng = random.Random(1)
        for attempt, raw in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)):
            for _ in range(50):
                self.assertTrue(raw * 0.8 <= policy.delay(attempt, rng) <= raw * 1.2)
        self.assertFalse(policy.exhausted(4))
        self.assertTrue(policy.exhausted(5))

    def test_jitter_spreads_retries(self) -> None:
        policy = RetryPolicy(jitter=0.2)
        rng = random.Random(2)
        self.assertGreater(len({round(policy.delay(3, rng), 6) for _ in range(20)}), 10)


class RetryQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dead: list[Task] = []
        self.queue = RetryQueue(
            self.clock,
            RetryPolicy(base=1.0, factor=2.0, max_delay=8.0, max_attempts=4, jitter=0.0),
            lambda task: succeed(self.dead.append(task)),
            max_tasks=3,
        )

    def task(self, outcomes: list[bool]) -> tuple[Task, list[float]]:
        """A task whose attempts succeed or fail as listed; records when they ran."""
        times: list[float] = []

        async def run() -> None:
            times.append(self.clock.seconds())
            if not outcomes.pop(0):
                raise HotUnavailable("down")

        return Task("repair", 7, run), times

    def test_backoff_then_success(self) -> None:
        task, times = self.task([False, False, True])
        self.queue.add(task, "first attempt failed")
        self.assertEqual(self.queue.depth, 1)
        self.clock.pump([0.5] * 20)
        self.assertEqual(times, [1.0, 3.0, 7.0])  # waits of 1, 2, 4 s
        self.assertEqual(self.queue.depth, 0)
        self.assertEqual(self.queue.retries, 3)
        self.assertEqual(self.dead, [])

    def test_dead_letter_after_max_attempts(self) -> None:
        task, times = self.task([False] * 10)
        self.queue.add(task, "first attempt failed")
        self.clock.pump([1.0] * 30)
        self.assertEqual(len(times), 3)  # attempts 2, 3, 4 (the first was the caller's)
        self.assertEqual(self.dead, [task])
        self.assertEqual(task.attempts, 4)
        self.assertIn("HotUnavailable: down", task.last_error)
        self.assertEqual(self.queue.dead_letters, 1)
        self.assertEqual(self.queue.depth, 0)

    def test_bounded(self) -> None:
        for _ in range(3):
            self.queue.add(self.task([True])[0])
        self.assertRaises(RetryQueueFull, self.queue.add, self.task([True])[0])

    def test_cancel_all(self) -> None:
        task, times = self.task([True])
        self.queue.add(task)
        self.queue.cancel_all()
        self.clock.pump([1.0] * 5)
        self.assertEqual(times, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


def _outbox_rows(txn: Txn) -> list[tuple[Any, ...]]:
    return txn.query("SELECT id, nodeId, kind FROM t_outbox ORDER BY id")


def _age_outbox(txn: Txn, by_ms: int) -> None:
    txn.execute(
        "UPDATE t_outbox SET createdAt = createdAt - ?, claimedAt = claimedAt - ?", (by_ms, by_ms)
    )


class OutboxContract:
    backend = ""

    async def stack(self) -> Stack:
        return await make_stack(self, self.backend, limits=BIG)

    async def users(self, stack: Stack, n: int) -> list[int]:
        uids = [next(_uids) for _ in range(n)]
        for uid in uids:
            await stack.chat.login(uid)
        return uids

    async def rows(self, stack: Stack) -> list[tuple[Any, ...]]:
        await stack.settle()
        return await stack.store.background.run("t", _outbox_rows)

    async def test_rows_are_deleted_once_followed_up(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        sent = await stack.chat.send(a, b, "1", "text", "x")
        await stack.chat.sync(b, 10, 0, None)
        await stack.chat.ack(b, [sent["msg_id"]])
        await stack.chat.read(b, sent["session_id"], sent["msg_id"])
        await stack.chat.recall(a, sent["msg_id"])
        self.assertEqual(await self.rows(stack), [])

    async def test_crash_between_commit_and_fanout_is_replayed(self) -> None:
        """A send committed (with its outbox row) whose fan-out never ran, as
        when the node dies: recover() makes every answer right again."""
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        await stack.chat.sync(b, 10, 0, None)  # b has a ready hot copy
        stack.presence.online_users.add(b)
        stack.chat._start_fanout = lambda *args: None  # the "crash": no push, no fan-out
        lost = await stack.chat.send(a, b, "lost", "text", "x")
        rows = await stack.store.background.run("t", _outbox_rows)
        self.assertEqual([(r[1], r[2]) for r in rows], [(1, "send")])
        # The hot copy does not know the message yet.
        self.assertEqual(await stack.hot.pending(b, 0, 10, None), [])
        del stack.chat._start_fanout
        stack.chat._inflight.clear()

        self.assertEqual(await stack.chat.recover(), 1)
        self.assertEqual(await self.rows(stack), [])
        sync = await stack.chat.sync(b, 10, 0, None)
        self.assertEqual([m["msg_id"] for m in sync["msgs"]], [lost["msg_id"]])
        self.assertEqual((await stack.chat.unread(b))["total"], 1)
        [push] = stack.presence.take(b, "msg")
        self.assertEqual((push["msg_id"], push["unread"]), (lost["msg_id"], 1))

    async def test_sweeper_replays_only_stale_rows(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        stack.chat._start_fanout = lambda *args: None
        await stack.chat.send(a, b, "x", "text", "x")
        del stack.chat._start_fanout
        stack.chat._inflight.clear()
        self.assertEqual(await stack.store.replay_outbox(own=False), [])
        await stack.store.background.run("t", _age_outbox, 120_000)
        [row] = await stack.store.replay_outbox(own=False)
        self.assertEqual(row.kind, "send")
        self.assertEqual(await self.rows(stack), [])

    async def test_failed_hot_write_keeps_a_repair_row(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        real = stack.hot.fanout

        async def down(*args: Any) -> None:
            raise HotUnavailable("down")

        stack.hot.fanout = down
        stack.presence.online_users.add(b)
        await stack.chat.send(a, b, "x", "text", "x")
        await stack.settle()
        self.assertEqual(len(stack.presence.take(b, "msg")), 1)  # pushed anyway
        [row] = await stack.store.background.run("t", _outbox_rows)
        self.assertEqual(row[2], "repair")
        self.assertIn(b, stack.store.suspect_users)
        stack.hot.fanout = real
        await eventually(lambda: not stack.store.suspect_users, timeout=10)
        # The sweeper's replay of a repair row does not push again.
        await stack.store.background.run("t", _age_outbox, 120_000)
        await stack.chat._sweep()
        self.assertEqual(stack.presence.take(b, "msg"), [])
        self.assertEqual(await self.rows(stack), [])


class EmbeddedOutboxTests(OutboxContract, TestCase):
    backend = "embedded"


class RedisOutboxTests(OutboxContract, TestCase):
    backend = "redis"


# ---------------------------------------------------------------------------
# Offline notifications


class PeriodicTests(SynchronousTestCase):
    def test_a_failed_tick_is_logged_and_the_next_one_runs(self) -> None:
        """Regression: a bare LoopingCall stopped for good at its first failure."""
        clock = Clock()
        ticks: list[float] = []

        async def tick() -> None:
            ticks.append(clock.seconds())
            if len(ticks) == 1:
                raise RuntimeError("backend down")

        loop = Periodic(clock, 5.0, tick, "test loop")
        loop.start()
        clock.advance(5)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(loop.running)
        clock.advance(5)
        clock.advance(5)
        self.assertEqual(ticks, [5.0, 10.0, 15.0])
        self.assertEqual(loop.failures, 1)
        loop.stop()
        self.assertFalse(loop.running)


class Sink(Resource):
    """A webhook receiver: records requests, answers with scripted codes."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[dict[str, Any], str, bytes]] = []
        self.codes: list[int] = []  # answers to the next requests; then 200
        self.hang = False
        self.waiting: list[Deferred[None]] = []

    def render_POST(self, request: Request) -> Any:
        body = request.content.read()
        signature = request.getHeader("x-imserver-signature") or ""
        self.received.append((json.loads(body), signature, body))
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.codes.pop(0) if self.codes else 200)
        return b"{}"

    def next(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        return d


class NotifierTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.sink = Sink()
        site = Site(self.sink)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        url = f"http://127.0.0.1:{self.port.getHost().port}/push"
        self.config = NotifyConfig(
            webhook=url, delay_seconds=0.2, max_attempts=3, secret=SECRET, timeout_seconds=1.0
        )
        self.stack = await make_stack(self, "embedded", limits=BIG, notify_delay_ms=200)
        self.notifier = Notifier(
            reactor, self.stack.store, self.config, self.stack.store.total_unread
        )
        self.notifier.policy = RetryPolicy(base=0.05, factor=2.0, max_delay=0.2, max_attempts=3)
        self.a, self.b = next(_uids), next(_uids)
        for uid in (self.a, self.b):
            await self.stack.chat.login(uid)

    async def due(self) -> None:
        """Wait past the delay, then let the queue run once."""
        await sleep(0.25)
        await self.notifier.poll()

    async def test_unacked_message_is_notified_signed(self) -> None:
        await self.stack.chat.send(self.a, self.b, "1", "text", "first")
        sent = await self.stack.chat.send(self.a, self.b, "2", "text", "x" * 150)
        await self.notifier.poll()
        self.assertEqual(self.sink.received, [])  # not due yet
        await self.due()
        self.assertEqual(len(self.sink.received), 2)
        # Sent concurrently: find the second message's notification.
        [(payload, signature, body)] = [
            r for r in self.sink.received if r[0]["msg_id"] == sent["msg_id"]
        ]
        self.assertEqual(
            payload,
            {
                "uid": self.b,
                "from": self.a,
                "msg_id": sent["msg_id"],
                "session_id": sent["session_id"],
                "preview": "x" * 100,
                "total_unread": 2,
            },
        )
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        self.assertEqual(signature, expected)
        await self.due()
        self.assertEqual(len(self.sink.received), 2)  # once only
        self.assertEqual(self.notifier.sent, 2)

    async def test_acked_or_recalled_in_time_is_not_notified(self) -> None:
        acked = await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        recalled = await self.stack.chat.send(self.a, self.b, "2", "text", "x")
        await self.stack.chat.ack(self.b, [acked["msg_id"]])
        await self.stack.chat.recall(self.a, recalled["msg_id"])
        await self.due()
        self.assertEqual(self.sink.received, [])
        self.assertEqual(self.notifier.skipped, 2)
        self.assertEqual(await self.stack.store.notify_backlog(), 0)

    async def test_retries_on_500_then_succeeds(self) -> None:
        self.sink.codes = [500, 503]
        sent = await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await self.due()
        for _ in range(2):
            await sleep(0.3)
            await self.notifier.poll()
        self.assertEqual([p["msg_id"] for p, _, _ in self.sink.received], [sent["msg_id"]] * 3)
        self.assertEqual((self.notifier.retries, self.notifier.sent), (2, 1))
        self.assertEqual(await self.stack.store.notify_backlog(), 0)

    async def test_dead_letter_after_max_attempts(self) -> None:
        self.sink.codes = [500] * 10
        sent = await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await self.due()
        for _ in range(4):
            await sleep(0.3)
            await self.notifier.poll()
        self.assertEqual(len(self.sink.received), 3)
        [letter] = await self.stack.store.dead_letters(None, 10)
        self.assertEqual((letter.kind, letter.ref, letter.attempts), ("notify", sent["msg_id"], 3))
        self.assertIn("HTTP 500", letter.error)
        self.assertEqual(json.loads(letter.payload)["msg_id"], sent["msg_id"])
        self.assertEqual(await self.stack.store.notify_backlog(), 0)

    async def test_a_failing_notification_spares_the_others(self) -> None:
        """Regression: one error (here the unread count) used to abort the whole poll."""
        await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        c = next(_uids)
        await self.stack.chat.login(c)
        second = await self.stack.chat.send(self.a, c, "2", "text", "y")

        async def total_unread(uid: int) -> int:
            if uid == self.b:
                raise RuntimeError("SQL down")
            return await self.stack.store.total_unread(uid)

        self.notifier._total_unread = total_unread
        await sleep(0.25)
        self.assertEqual(await self.notifier.poll(), 2)
        self.assertEqual([p["msg_id"] for p, _, _ in self.sink.received], [second["msg_id"]])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # Not finished: claimed again once its lease runs out.
        self.assertEqual(await self.stack.store.notify_backlog(), 1)

    async def test_timeout_is_retried(self) -> None:
        self.sink.hang = True
        await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await sleep(0.25)
        await within(self.notifier.poll(), 5)
        self.assertEqual((self.notifier.failures, self.notifier.retries), (1, 1))
        self.sink.hang = False
        await sleep(0.3)
        await self.notifier.poll()
        self.assertEqual(self.notifier.sent, 1)

    def test_preview(self) -> None:
        self.assertEqual(preview("text", "é" * 120), "é" * 100)
        self.assertEqual(preview("image", {"text": "look", "url": "x"}), "look")
        self.assertEqual(preview("image", {"url": "x"}), "[image]")

    async def test_webhook_refuses_non_2xx(self) -> None:
        self.sink.codes = [404]
        hook = Webhook(reactor, self.config.webhook or "", SECRET, 1.0)
        with self.assertRaises(Exception) as e:
            await hook.post({"x": 1})
        self.assertIn("HTTP 404", str(e.exception))
