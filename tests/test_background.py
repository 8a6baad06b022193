"""
Background work that must not die, leak or repeat itself (issue 9, defect 10):
the notifier's shutdown and leases, the fan-out's outbox countdown, and
repairs that outlive their dead letter.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, ensureDeferred, maybeDeferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import NOT_DONE_YET, Request, Site

from imserver.config import LimitsConfig, NotifyConfig
from imserver.errors import Unavailable
from imserver.periodic import Periodic
from imserver.retry import EXPEDITE_CHUNK, RetryPolicy, RetryQueue, Task
from imserver.services.ids import IdGenerator
from imserver.services.notifier import Notifier
from imserver.storage.hot.interface import HotUnavailable
from imserver.storage.sql.database import Txn
from imserver.storage.store import Store
from tests.stack import Stack, make_stack
from tests.support import eventually, reactor, sleep, within
from tests.test_queues import Sink

BIG = LimitsConfig(send_per_second=1e6, send_burst=10**6, recall_seconds=3600)
SECRET = "webhook-secret-0123456789"
_uids = itertools.count(170_000)


class HoldingSink(Sink):
    """A webhook receiver that answers only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render_POST(self, request: Request) -> Any:
        self.held.append(request)
        super().render_POST(request)
        request.notifyFinish().addErrback(lambda _: self._gone(request))
        return NOT_DONE_YET

    def _gone(self, request: Request) -> None:
        if request in self.held:
            self.held.remove(request)

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            request.setResponseCode(200)
            request.write(b"{}")
            request.finish()


def _claims(txn: Txn) -> list[tuple[int, int, int]]:
    return [
        (int(r[0]), int(r[1]), int(r[2]))
        for r in txn.query("SELECT msgId, claimedBy, claimedUntil FROM t_notify ORDER BY msgId")
    ]


async def _users(stack: Stack, n: int) -> list[int]:
    uids = [next(_uids) for _ in range(n)]
    for uid in uids:
        await stack.chat.login(uid)
    return uids


class NotifierShutdownTests(TestCase):
    """Regression: stopping did not wait for the poll in progress, so a
    webhook already posted was never recorded, and posted again later."""

    timeout = 60

    async def setUp(self) -> None:
        self.sink = HoldingSink()
        port = reactor.listenTCP(0, Site(self.sink), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self.sink.release)
        self.config = NotifyConfig(
            webhook=f"http://127.0.0.1:{port.getHost().port}/push",
            delay_seconds=0.1,
            max_attempts=3,
            secret=SECRET,
            timeout_seconds=5.0,
        )
        self.stack = await make_stack(self, "embedded", limits=BIG, notify_delay_ms=100)
        self.a, self.b = await _users(self.stack, 2)

    def notifier(self) -> Notifier:
        return Notifier(reactor, self.stack.store, self.config, self.stack.store.total_unread)

    async def test_stop_waits_for_the_post_in_flight_and_records_it(self) -> None:
        sent = await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await sleep(0.2)
        notifier = self.notifier()
        polling = ensureDeferred(notifier.poll())
        await within(self.sink.next())  # the POST reached the webhook
        stopping = maybeDeferred(notifier.stop)
        self.assertFalse(stopping.called, "stop() returned with a post in flight")
        self.sink.release()
        await within(stopping)
        # Recorded before stop() returned: the next node will not post it again.
        self.assertEqual(await self.stack.store.notify_backlog(), 0)
        await within(polling)
        self.assertEqual([p["msg_id"] for p, _, _ in self.sink.received], [sent["msg_id"]])

    async def test_stop_hands_back_notifications_not_posted_yet(self) -> None:
        for i in range(3):
            await self.stack.chat.send(self.a, self.b, str(i), "text", "x")
        await sleep(0.2)
        notifier = self.notifier()
        notifier._limit = DeferredSemaphore(1)
        polling = ensureDeferred(notifier.poll())
        await within(self.sink.next())
        stopping = maybeDeferred(notifier.stop)
        self.sink.release()
        await within(stopping)
        await within(polling)
        self.assertEqual(len(self.sink.received), 1)
        # The two never posted are free at once for the next node (no lease to wait out).
        rows = await self.stack.store.background.run("t", _claims)
        self.assertEqual(len(rows), 2)
        self.assertTrue(all(until == 0 for _, _, until in rows), rows)

    async def test_stop_is_bounded(self) -> None:
        await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await sleep(0.2)
        notifier = self.notifier()
        polling = ensureDeferred(notifier.poll())
        await within(self.sink.next())
        started = reactor.seconds()
        await within(notifier.stop(timeout=0.3))  # the webhook never answers
        self.assertLess(reactor.seconds() - started, 2.0)
        self.sink.release()
        await within(polling)


class NotifierLeaseTests(TestCase):
    """
    Regression: a poll could outlast its 60 s lease (200 notifications, 20 at
    a time, each up to the webhook's timeouts), so another node claimed the
    same rows and posted them too. Two nodes on one database, a slow
    webhook, time on a task.Clock.
    """

    timeout = 60

    async def test_two_nodes_never_post_the_same_notification(self) -> None:
        stack = await make_stack(self, "embedded", limits=BIG, notify_delay_ms=0)
        a, b = await _users(stack, 2)
        sent = [(await stack.chat.send(a, b, str(i), "text", "x"))["msg_id"] for i in range(6)]
        await stack.settle()
        clock = Clock()
        clock.advance(reactor.seconds() + 1)
        config = NotifyConfig(
            webhook="http://127.0.0.1:1/push", delay_seconds=0, secret=SECRET, timeout_seconds=10.0
        )
        posts: list[tuple[int, int]] = []

        def node(node_id: int) -> Notifier:
            store = Store(
                clock,
                stack.store.db,
                stack.hot,
                ids=IdGenerator(node_id, clock),
                node_id=node_id,
            )

            async def post(payload: dict[str, Any]) -> None:
                posts.append((node_id, payload["msg_id"]))
                await deferLater(clock, 20, lambda: None)  # slow, within its timeouts

            async def unread(uid: int) -> int:
                return 0

            notifier = Notifier(clock, store, config, unread, post=post)
            notifier._limit = DeferredSemaphore(1)
            return notifier

        # Simulated time moves only while no transaction is running, so a
        # slow machine cannot make a claim look older than it is.
        db = stack.store.db
        real_run = db.run
        running_txns = [0]

        async def run(desc: str, func: Any, *args: Any, **kwargs: Any) -> Any:
            running_txns[0] += 1
            try:
                return await real_run(desc, func, *args, **kwargs)
            finally:
                running_txns[0] -= 1

        db.run = run  # type: ignore[method-assign]
        self.addCleanup(lambda: db.__dict__.pop("run"))

        nodes = [node(1), node(2)]
        polls: list[Deferred[Any] | None] = [None, None]
        for _ in range(300):
            for i, notifier in enumerate(nodes):
                running = polls[i]
                if running is None or running.called:
                    polls[i] = ensureDeferred(notifier.poll())
            await sleep(0.005)
            await eventually(lambda: running_txns[0] == 0, interval=0.005)
            clock.advance(1)
            everyone = len({msg_id for _, msg_id in posts}) == len(sent)
            if everyone and not await stack.store.notify_backlog():
                break
        for running in polls:
            if running is not None:
                clock.advance(60)
                await within(running)
        posted = [msg_id for _, msg_id in posts]
        self.assertEqual(sorted(posted), sorted(sent), f"posted twice: {posts}")
        self.assertEqual(await stack.store.notify_backlog(), 0)

    def test_lease_outlasts_the_longest_notification(self) -> None:
        """The lease is derived from the webhook's timeouts, not a constant."""
        clock = Clock()
        for timeout in (1.0, 10.0, 60.0, 300.0):
            config = NotifyConfig(webhook="http://127.0.0.1:1/", timeout_seconds=timeout)
            notifier = Notifier(clock, None, config, None)  # type: ignore[arg-type]
            self.assertGreater(notifier.lease_seconds, 2 * notifier.budget)
            self.assertGreater(notifier.budget, 2 * timeout)


# ---------------------------------------------------------------------------
# The fan-out's outbox countdown


def _outbox_rows(txn: Txn) -> list[tuple[int, str]]:
    return [(int(r[0]), str(r[1])) for r in txn.query("SELECT id, kind FROM t_outbox ORDER BY id")]


def _age_outbox(txn: Txn) -> None:
    txn.execute(
        "UPDATE t_outbox SET createdAt = createdAt - 120000, claimedAt = claimedAt - 120000"
    )


def _countdowns(stack: Stack) -> int:
    """Outbox rows whose fan-out this node still counts down."""
    old = getattr(stack.chat, "_outbox_left", None)  # where it lived before the fix
    return len(old) if old is not None else stack.store.outbox_countdowns


class FanoutErrorTests(TestCase):
    """
    Regression: an unexpected error in a fan-out left its outbox row's
    countdown entry in memory for good (and, with a row spread over two
    fan-out batches, the row was never finished by this node). Every row is
    now finished, or left for the sweeper, exactly once.
    """

    timeout = 60

    async def setUp(self) -> None:
        self.stack = await make_stack(self, "embedded", limits=BIG)
        self.a, self.b, self.c = await _users(self.stack, 3)
        self.stack.presence.online_users.update((self.b, self.c))

    async def sent_together(self) -> list[int]:
        """Three sends at once: the first commits alone, the last two share the
        next commit (and its outbox row). Their msg_ids."""
        ds = [
            self.stack.chat.send(self.a, self.c, "0", "text", "w"),
            self.stack.chat.send(self.a, self.b, "1", "text", "x"),
            self.stack.chat.send(self.a, self.c, "2", "text", "y"),
        ]
        return [(await d)["msg_id"] for d in ds]

    async def rows(self) -> list[tuple[int, str]]:
        await self.stack.settle()
        return await self.stack.store.background.run("t", _outbox_rows)

    async def sweep(self) -> None:
        await self.stack.store.background.run("t", _age_outbox)
        await self.stack.chat._sweep()

    def break_fanout(self, failing: tuple[int, ...] = (1,)) -> None:
        """Make these fan-out batches (1 = the next) fail with an unexpected error."""
        real = self.stack.store.fanout
        calls = [0]

        async def fanout(committed: Any) -> bool:
            calls[0] += 1
            if calls[0] in failing:
                raise RuntimeError("unexpected")
            return await real(committed)

        self.stack.store.fanout = fanout  # type: ignore[method-assign]

    async def test_unexpected_error_leaves_no_entry_and_the_row_to_the_sweeper(self) -> None:
        self.break_fanout()
        sent = await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        self.assertEqual([kind for _, kind in await self.rows()], ["send"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(_countdowns(self.stack), 0)
        self.assertEqual(self.stack.presence.take(self.b, "msg"), [])
        await self.sweep()
        [push] = self.stack.presence.take(self.b, "msg")
        self.assertEqual(push["msg_id"], sent["msg_id"])
        self.assertEqual(await self.rows(), [])

    async def test_an_unexpected_error_does_not_leave_stale_reads(self) -> None:
        """The hot copy may lack the messages of a fan-out that failed
        unexpectedly: their users read from SQL until it is repaired, not
        from a stale copy until the sweeper comes (60 to 90 s)."""
        await self.stack.chat.sync(self.b, 10, 0, None)  # b has a hot copy
        self.break_fanout()
        sent = await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await self.stack.settle()
        self.flushLoggedErrors(RuntimeError)
        sync = await self.stack.chat.sync(self.b, 10, 0, None)
        self.assertEqual([m["msg_id"] for m in sync["msgs"]], [sent["msg_id"]])
        self.assertEqual((await self.stack.chat.unread(self.b))["total"], 1)
        await eventually(lambda: not self.stack.store.suspect_users, timeout=10)
        sync = await self.stack.chat.sync(self.b, 10, 0, None)
        self.assertEqual([m["msg_id"] for m in sync["msgs"]], [sent["msg_id"]])

    async def test_drain_waits_for_the_downgrade_of_a_repair_row(self) -> None:
        """Regression (a flaky test, and a shutdown race): the downgrade of a
        row to 'repair' ran unawaited, so a drain (then the pools' close) could
        come first and the row stayed 'send': its replay pushed again."""
        db = self.stack.store.background
        real = db.run

        async def run(desc: str, func: Any, *args: Any, **kwargs: Any) -> Any:
            if desc == "outbox_downgrade":
                await sleep(0.3)
            return await real(desc, func, *args, **kwargs)

        db.run = run  # type: ignore[method-assign]
        self.addCleanup(lambda: db.__dict__.pop("run"))

        async def down(*args: Any) -> None:
            raise HotUnavailable("down")

        self.stack.hot.fanout = down  # type: ignore[method-assign]
        await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        self.assertEqual([kind for _, kind in await self.rows()], ["repair"])

    async def test_a_row_split_over_two_batches_is_left_once(self) -> None:
        """One commit, two fan-out batches: the first fails, the second works."""
        self.stack.chat.fanouts.max_batch = 1
        self.break_fanout((2,))
        _, first, second = await self.sent_together()
        rows = await self.rows()
        self.assertEqual(len(rows), 1, "both messages share one commit and one outbox row")
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(_countdowns(self.stack), 0)
        self.assertEqual([kind for _, kind in rows], ["send"])  # not deleted: b missed his push
        await self.sweep()
        self.assertEqual([p["msg_id"] for p in self.stack.presence.take(self.b)], [first])
        self.assertEqual(await self.rows(), [])
        self.assertIn(second, [p["msg_id"] for p in self.stack.presence.take(self.c)])

    async def test_a_failing_observe_still_counts_the_message_down(self) -> None:
        """Regression: an error between the commit and the start of its
        fan-out (here the latency metric) left its row's countdown one short
        for good: the row was renewed by every sweep and never replayed."""
        real = self.stack.chat.observe
        calls = [0]

        def observe(name: str, seconds: float) -> None:
            calls[0] += name == "send_to_commit"
            if name == "send_to_commit" and calls[0] == 2:
                raise RuntimeError("broken metric")
            real(name, seconds)

        self.stack.chat.observe = observe  # type: ignore[method-assign]
        ds = [
            self.stack.chat.send(self.a, self.c, "0", "text", "w"),
            self.stack.chat.send(self.a, self.b, "1", "text", "x"),
            self.stack.chat.send(self.a, self.c, "2", "text", "y"),
        ]
        for d in ds:
            d.addErrback(lambda f: f.trap(RuntimeError))
        await self.stack.settle()
        self.assertEqual(_countdowns(self.stack), 0)
        self.assertEqual(await self.rows(), [])
        self.assertEqual(len(self.stack.presence.take(self.b, "msg")), 1)

    async def test_a_countdown_left_too_long_goes_to_the_sweeper(self) -> None:
        """Regression: a countdown entry had no age limit, and every sweep
        renewed its row's claim: one that never reached zero kept its row
        from every sweeper for good. Past a few times OUTBOX_STALE_MS it is
        dropped (logged), and the sweeper replays the row."""
        gate: Deferred[None] = Deferred()
        real = self.stack.hot.fanout

        async def held(*args: Any) -> Any:
            await gate
            return await real(*args)

        self.patch(self.stack.hot, "fanout", held)
        sent = await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        self.assertEqual(_countdowns(self.stack), 1)
        store = self.stack.store
        now_ms = store._now_ms
        self.patch(store, "_now_ms", lambda: now_ms() + 600_000)
        try:
            await self.stack.chat._sweep()
            self.assertEqual(_countdowns(self.stack), 0)
            [push] = self.stack.presence.take(self.b, "msg")
            self.assertEqual(push["msg_id"], sent["msg_id"])
        finally:
            gate.callback(None)
        await self.stack.settle()
        self.assertEqual(await self.rows(), [])

    async def test_a_failing_push_spares_the_others(self) -> None:
        real = self.stack.presence.push

        def push(uid: int, frame: Any, exclude: Any = None) -> bool:
            if uid == self.b:
                raise RuntimeError("broken link")
            return real(uid, frame, exclude)

        self.stack.presence.push = push  # type: ignore[method-assign]
        await self.sent_together()
        await self.stack.settle()
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(self.stack.presence.take(self.c, "msg")), 2)
        self.assertEqual(_countdowns(self.stack), 0)
        self.assertEqual([kind for _, kind in await self.rows()], ["send"])  # b: replayed

    async def test_a_failing_push_at_commit_still_answers_and_settles(self) -> None:
        """The recipient is on this node: pushed at commit, and that push raises."""
        self.stack.presence.local = lambda uid: object()  # type: ignore[method-assign,assignment,return-value]

        def push(uid: int, frame: Any, exclude: Any = None) -> bool:
            raise RuntimeError("broken link")

        self.stack.presence.push = push  # type: ignore[method-assign]
        await self.stack.chat.profile([self.a])  # the sender's profile is at hand
        sent = await within(self.stack.chat.send(self.a, self.b, "1", "text", "x"))
        self.assertFalse(sent["dup"])
        # Reads of both users do not wait for ever on a fan-out that never ran.
        await within(self.stack.chat.sync(self.a, 10, 0, None), 5)
        await within(self.stack.chat.sync(self.b, 10, 0, None), 5)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(_countdowns(self.stack), 0)
        self.assertEqual([kind for _, kind in await self.rows()], ["send"])

    async def test_unexpected_hot_store_error_is_repaired_like_an_outage(self) -> None:
        """Not a HotUnavailable (a script error, a client bug): the hot copy
        may still lack the messages, so their users are served from SQL and
        repaired, as in an outage, instead of trusting the copy until a sweep."""
        await self.stack.chat.sync(self.b, 10, 0, None)  # b has a hot copy
        real = self.stack.hot.fanout

        async def fanout(*args: Any) -> None:
            raise RuntimeError("ERR Error running script")

        self.stack.hot.fanout = fanout  # type: ignore[method-assign]
        sent = await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        self.assertEqual([kind for _, kind in await self.rows()], ["repair"])
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(self.stack.presence.take(self.b, "msg")), 1)  # pushed anyway
        sync = await self.stack.chat.sync(self.b, 10, 0, None)
        self.assertEqual([m["msg_id"] for m in sync["msgs"]], [sent["msg_id"]])
        self.stack.hot.fanout = real  # type: ignore[method-assign]
        await eventually(lambda: not self.stack.store.suspect_users, timeout=10)
        sync = await self.stack.chat.sync(self.b, 10, 0, None)
        self.assertEqual([m["msg_id"] for m in sync["msgs"]], [sent["msg_id"]])


# ---------------------------------------------------------------------------
# Repairs that outlive their retries


class ParkedRepairTests(TestCase):
    """
    Regression: a hot-store repair that exhausted its retries (Redis down
    for more than ~20 minutes) was dead-lettered and its users stayed
    "suspect" for the life of the process: every read of theirs went to SQL
    for good. A repair given up on is now parked and tried again (every
    C{parked_repair_seconds}) until the hot store answers.
    """

    timeout = 60

    async def setUp(self) -> None:
        self.stack = await make_stack(self, "embedded", limits=BIG)
        store = self.stack.store
        store.retries.policy = RetryPolicy(
            base=0.01, factor=1.0, max_delay=0.01, max_attempts=2, jitter=0.0
        )
        store.parked_repair_seconds = 0.05
        self.a, self.b = await _users(self.stack, 2)
        await self.stack.chat.sync(self.b, 10, 0, None)  # b has a hot copy

    def hot_down(self) -> Any:
        hot = self.stack.hot
        real = {name: getattr(hot, name) for name in ("fanout", "invalidate", "recall")}

        async def down(*args: Any) -> None:
            raise HotUnavailable("down")

        for name in real:
            setattr(hot, name, down)

        def up() -> None:
            for name, method in real.items():
                setattr(hot, name, method)

        return up

    async def test_a_dead_lettered_repair_is_tried_again_later(self) -> None:
        up = self.hot_down()
        sent = await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await self.stack.settle()

        async def dead_lettered() -> bool:
            letters = await self.stack.store.dead_letters(None, 10)
            return any(letter.kind == "repair" for letter in letters)

        await eventually(dead_lettered)
        await sleep(0.2)
        self.assertIn(self.b, self.stack.store.suspect_users)  # Redis still down: SQL
        self.assertGreater(self.stack.store.parked_repairs, 0)
        up()
        await eventually(lambda: not self.stack.store.suspect_users, timeout=10)
        self.assertEqual(self.stack.store.parked_repairs, 0)
        self.assertFalse(self.stack.store.suspect_sessions)
        sync = await self.stack.chat.sync(self.b, 10, 0, None)
        self.assertEqual([m["msg_id"] for m in sync["msgs"]], [sent["msg_id"]])
        # Served from the rebuilt hot copy again.
        self.assertEqual(
            await self.stack.hot.pending(self.b, 0, 10, None), [(sent["msg_id"], self.a)]
        )

    async def test_a_full_retry_queue_neither_fails_the_request_nor_forgets_the_repair(
        self,
    ) -> None:
        """Regression: with the repair queue full, the committed recall was
        answered unavailable (its push lost: a retry finds it recalled
        already), and its users stayed suspect with no repair at all."""
        sent = await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await self.stack.settle()
        self.stack.store.retries.max_tasks = 0
        self.stack.presence.online_users.add(self.b)
        up = self.hot_down()
        self.assertEqual(set(await self.stack.chat.recall(self.a, sent["msg_id"])), {"seq"})
        [push] = self.stack.presence.take(self.b, "recall")
        self.assertEqual(push["msg_id"], sent["msg_id"])
        self.assertIn(self.b, self.stack.store.suspect_users)
        up()
        await eventually(lambda: not self.stack.store.suspect_users, timeout=10)
        self.assertFalse(self.stack.store.suspect_sessions)
        self.assertEqual((await self.stack.chat.sync(self.b, 10, 0, None))["msgs"], [])

    async def test_one_repair_task_however_long_the_outage(self) -> None:
        """Regression: each attempt of a repair let the next failure open a
        new repair task, even one failing at once (circuit open): about two
        new tasks a second during an outage, until the queue was full."""
        store = self.stack.store
        store.retries.policy = RetryPolicy(
            base=0.01, factor=1.0, max_delay=0.01, max_attempts=10_000, jitter=0.0
        )
        up = self.hot_down()
        for i in range(8):
            await self.stack.chat.send(self.a, self.b, str(i), "text", "x")
            await self.stack.settle()
            await sleep(0.03)
        self.assertEqual(store.retries.depth, 1)
        up()
        store.hot_back()
        await eventually(lambda: not store.suspect_users, timeout=10)
        self.assertFalse(store.suspect_sessions)
        self.assertEqual(store.retries.depth, 0)
        sync = await self.stack.chat.sync(self.b, 10, 0, None)
        self.assertEqual(len(sync["msgs"]), 8)

    async def test_a_repair_invalidates_messages_then_sessions_then_users(self) -> None:
        """Regression: a repair invalidated users, sessions and messages in
        one call per chunk (the parked repairs in the documented order): a
        user served from the hot store again could meet a stale cached
        message. Both now go messages, then sessions, then users."""
        sent = await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await self.stack.settle()
        hot = self.stack.hot
        calls: list[tuple[list[int], list[int], list[int]]] = []
        real_invalidate, real_recall = hot.invalidate, hot.recall

        async def invalidate(uids: Any, sessions: Any, msgs: Any = ()) -> None:
            calls.append((list(uids), list(sessions), list(msgs)))
            await real_invalidate(uids, sessions, msgs)

        async def down(*args: Any) -> None:
            raise HotUnavailable("down")

        self.patch(hot, "invalidate", invalidate)
        self.patch(hot, "recall", down)
        await self.stack.chat.recall(self.a, sent["msg_id"])
        self.patch(hot, "recall", real_recall)
        await eventually(lambda: not self.stack.store.suspect_users, timeout=10)
        self.assertEqual(
            calls,
            [
                ([], [], [sent["msg_id"]]),
                ([], [sent["session_id"]], []),
                (sorted((self.a, self.b)), [], []),
            ],
        )

    async def test_a_profile_change_with_a_full_retry_queue_is_answered_and_parked(
        self,
    ) -> None:
        """Regression: with the repair queue full, a committed profile change
        whose hot write failed was answered unavailable (RetryQueueFull) and
        the stale cached profile stayed. It is answered, and its hot write
        is parked and done once the hot store answers."""
        self.stack.store.retries.max_tasks = 0
        hot = self.stack.hot
        real = hot.put_profiles

        async def down(*args: Any) -> None:
            raise HotUnavailable("down")

        self.patch(hot, "put_profiles", down)
        reply = await self.stack.chat.set_profile(self.a, "new", None)
        self.assertEqual(reply["user"]["nickname"], "new")
        profile, _ = await self.stack.store.upsert_user(self.b, "bee", None)
        self.assertEqual(profile.nickname, "bee")
        self.patch(hot, "put_profiles", real)

        async def cached() -> bool:
            found = await hot.profiles([self.a, self.b])
            return [p.nickname for p in found.values()] == ["new", "bee"]

        await eventually(cached, timeout=10)

    async def test_a_profile_change_replies_before_the_hot_store(self) -> None:
        """Regression: set_profile and upsert_user waited for Redis before replying."""
        gate: Deferred[None] = Deferred()
        real = self.stack.hot.put_profiles

        async def held(*args: Any) -> None:
            await gate
            await real(*args)

        self.patch(self.stack.hot, "put_profiles", held)
        try:
            reply = await within(self.stack.chat.set_profile(self.a, "later", None), 5)
            self.assertEqual(reply["user"]["nickname"], "later")
            profile, _ = await within(self.stack.store.upsert_user(self.b, "b2", None), 5)
            self.assertEqual(profile.nickname, "b2")
        finally:
            gate.callback(None)
        await self.stack.settle()
        found = await self.stack.hot.profiles([self.a])
        self.assertEqual(found[self.a].nickname, "later")


# ---------------------------------------------------------------------------
# The outbox sweeper


class SweeperTests(TestCase):
    timeout = 60
    backend = "embedded"

    async def test_rows_whose_pushes_failed_are_replayed_again(self) -> None:
        """Regression: a replay deleted its rows before pushing their messages,
        so a push step that failed (SQL down while reading the messages or the
        unread counts) lost those pushes for good."""
        stack = await make_stack(self, self.backend, limits=BIG)
        a, b = await _users(stack, 2)
        stack.presence.online_users.add(b)
        stack.chat._start_fanout = lambda *args: None  # type: ignore[method-assign]
        sent = await stack.chat.send(a, b, "1", "text", "x")  # the node "dies" here
        del stack.chat._start_fanout
        stack.chat._inflight.clear()
        real = stack.store.normal_messages

        async def down(msg_ids: Any) -> Any:
            raise Unavailable("SQL down")

        stack.store.normal_messages = down  # type: ignore[method-assign]
        await stack.store.background.run("t", _age_outbox)
        with self.assertRaises(Unavailable):
            await stack.chat._sweep()
        self.assertEqual(stack.presence.take(b, "msg"), [])
        stack.store.normal_messages = real  # type: ignore[method-assign]
        await stack.store.background.run("t", _age_outbox)
        await stack.chat._sweep()
        [push] = stack.presence.take(b, "msg")
        self.assertEqual(push["msg_id"], sent["msg_id"])
        self.assertEqual(await stack.store.background.run("t", _outbox_rows), [])

    async def test_recover_keeps_rows_whose_pushes_failed(self) -> None:
        stack = await make_stack(self, self.backend, limits=BIG)
        a, b = await _users(stack, 2)
        stack.chat._start_fanout = lambda *args: None  # type: ignore[method-assign]
        await stack.chat.send(a, b, "1", "text", "x")
        del stack.chat._start_fanout
        stack.chat._inflight.clear()

        async def down(uid: int) -> Any:
            raise Unavailable("SQL down")

        stack.store.unread = down  # type: ignore[method-assign]
        # A row is claimed once claimedAt < now: not in its commit's millisecond.
        await sleep(0.01)
        with self.assertRaises(Unavailable):
            await stack.chat.recover()
        del stack.store.unread
        self.assertEqual(len(await stack.store.background.run("t", _outbox_rows)), 1)

    async def stale_rows(self, n: int) -> Stack:
        """A stack with C{n} stale send rows (their fan-outs never ran)."""
        stack = await make_stack(self, self.backend, limits=BIG)
        a, b = await _users(stack, 2)
        stack.chat._start_fanout = lambda *args: None  # type: ignore[method-assign]
        for i in range(n):
            await stack.chat.send(a, b, str(i), "text", "x")
        del stack.chat._start_fanout
        stack.chat._inflight.clear()
        await stack.store.background.run("t", _age_outbox)
        return stack

    async def test_a_replay_stops_at_the_first_hot_store_outage(self) -> None:
        """Regression: with Redis unreachable every row's invalidation waited
        for its timeout in turn (500 rows a sweep, and at start-up), so a
        sweep outlived its 60 s claim and other nodes replayed the same rows."""
        stack = await self.stale_rows(3)
        calls = []

        async def down(*args: Any) -> None:
            calls.append(args)
            raise HotUnavailable("timeout")

        stack.hot.invalidate = down  # type: ignore[method-assign]
        self.assertEqual(await stack.store.replay_outbox(own=False), [])
        self.assertEqual(len(calls), 1)
        self.assertEqual(len(await stack.store.background.run("t", _outbox_rows)), 3)

    async def test_a_replay_stops_before_its_claim_can_run_out(self) -> None:
        """A slow hot store (each invalidation 20 s): a replay ends well
        within the stale bound after its claim, leaving the rest claimed."""
        stack = await self.stale_rows(5)
        clock = Clock()
        clock.advance(reactor.seconds())
        store = Store(clock, stack.store.db, stack.hot, ids=IdGenerator(3, clock), node_id=3)
        real = stack.hot.invalidate

        async def slow(*args: Any) -> None:
            clock.advance(20)
            await real(*args)

        stack.hot.invalidate = slow  # type: ignore[method-assign]
        started = clock.seconds()
        replayed = await store.replay_outbox(own=False)
        self.assertLess(clock.seconds() - started, 60)
        self.assertEqual(len(replayed), 2)
        self.assertEqual(len(await stack.store.background.run("t", _outbox_rows)), 3)

    async def test_a_fanout_still_running_keeps_its_row_from_other_sweepers(self) -> None:
        """Regression: a send row is "stale" 60 s after its commit, but a fan-out
        backlog (Redis slow, 50,000 messages queued) can take longer, and every
        node's sweeper then replayed rows whose owner was still fanning them out
        (pushing again, invalidating hot copies mid-fan-out). The owner now
        renews the claim of the rows it is still working on."""
        stack = await make_stack(self, self.backend, limits=BIG)
        a, b = await _users(stack, 2)
        stack.presence.online_users.add(b)
        gate: Deferred[None] = Deferred()
        self.addCleanup(lambda: None if gate.called else gate.callback(None))
        real = stack.store.fanout

        async def slow(committed: Any) -> bool:
            await gate
            return await real(committed)

        stack.store.fanout = slow  # type: ignore[method-assign]
        sent = await stack.chat.send(a, b, "1", "text", "x")
        await stack.store.background.run("t", _age_outbox)  # its fan-out is 2 minutes late
        await stack.chat._sweep()  # the owner's own sweep
        other = Store(reactor, stack.store.db, stack.hot, ids=IdGenerator(2, reactor), node_id=2)
        self.assertEqual(await other.replay_outbox(own=False), [])
        self.assertEqual(stack.presence.take(b, "msg"), [])
        gate.callback(None)
        await stack.settle()
        [push] = stack.presence.take(b, "msg")
        self.assertEqual(push["msg_id"], sent["msg_id"])
        self.assertEqual(await stack.store.background.run("t", _outbox_rows), [])


class MariaDBSweeperTests(SweeperTests):
    """The same on MariaDB and Redis (the harness's own)."""

    backend = "redis"


class PeriodicStopTests(SynchronousTestCase):
    """Regression: stopping a loop did not wait for its tick in progress, so
    at shutdown a sweep went on after the pools it uses were closed."""

    def test_stop_waits_for_the_running_tick(self) -> None:
        clock = Clock()
        gate: Deferred[None] = Deferred()
        ticks: list[float] = []

        async def tick() -> None:
            ticks.append(clock.seconds())
            await gate

        loop = Periodic(clock, 5.0, tick, "test loop")
        loop.start()
        clock.advance(5)
        stopped = maybeDeferred(loop.stop)
        self.assertFalse(stopped.called)
        gate.callback(None)
        self.assertTrue(stopped.called)
        clock.advance(20)
        self.assertEqual(ticks, [5.0])

    def test_stop_between_ticks_is_immediate(self) -> None:
        clock = Clock()

        async def tick() -> None:
            pass

        loop = Periodic(clock, 5.0, tick, "test loop")
        loop.start()
        clock.advance(5)
        self.assertTrue(maybeDeferred(loop.stop).called)
        self.assertTrue(maybeDeferred(loop.stop).called)  # twice: harmless


class NotifierOutageTests(TestCase):
    """The notifier while SQL fails under it."""

    timeout = 60

    async def setUp(self) -> None:
        self.stack = await make_stack(self, "embedded", limits=BIG, notify_delay_ms=0)
        self.a, self.b = await _users(self.stack, 2)
        config = NotifyConfig(
            webhook="http://127.0.0.1:1/push", max_attempts=1, secret=SECRET, timeout_seconds=1.0
        )

        async def post(payload: dict[str, Any]) -> None:
            raise RuntimeError("HTTP 500")

        self.notifier = Notifier(
            reactor, self.stack.store, config, self.stack.store.total_unread, post=post
        )
        self.failing: set[str] = set()
        db = self.stack.store.background
        real = db.run

        async def run(desc: str, func: Any, *args: Any, **kwargs: Any) -> Any:
            if desc in self.failing:
                raise Unavailable("the database is unavailable")
            return await real(desc, func, *args, **kwargs)

        db.run = run  # type: ignore[method-assign]
        self.addCleanup(lambda: db.__dict__.pop("run"))

    async def test_a_dead_letter_not_written_keeps_the_notification(self) -> None:
        """Regression: the dead letter's write failed (logged), and the
        notification was deleted all the same: no record of it anywhere."""
        await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await self.stack.settle()
        self.failing.add("dead_letter")
        await self.notifier.poll()
        self.assertEqual(await self.stack.store.notify_backlog(), 1)
        self.assertEqual(await self.stack.store.dead_letters(None, 10), [])
        self.flushLoggedErrors()

    async def test_a_database_outage_is_a_warning_not_a_crash_report(self) -> None:
        """An outage while recording a retry is an ordinary condition: a
        warning, not a CRITICAL traceback (docs/reliability.md)."""
        await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await self.stack.settle()
        self.notifier.policy = RetryPolicy(max_attempts=5)
        self.failing.add("notify_retry")
        await self.notifier.poll()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(await self.stack.store.notify_backlog(), 1)

    async def test_a_hung_unread_count_ends_within_the_budget(self) -> None:
        """Reading the unread total hangs (SQL stuck): the notification ends
        at its budget with a warning, and is claimed again after its lease."""
        await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await self.stack.settle()
        clock = Clock()
        clock.advance(reactor.seconds() + 1)
        store = Store(
            clock, self.stack.store.db, self.stack.hot, ids=IdGenerator(2, clock), node_id=2
        )
        config = NotifyConfig(webhook="http://127.0.0.1:1/push", secret=SECRET, timeout_seconds=1.0)

        def hung(uid: int) -> Deferred[int]:
            return Deferred()

        notifier = Notifier(clock, store, config, hung, post=self.notifier._post)
        polling = ensureDeferred(notifier.poll())
        await eventually(lambda: clock.getDelayedCalls())  # claimed; the budget runs
        clock.advance(notifier.budget)
        self.assertEqual(await within(polling), 1)
        self.assertEqual(self.flushLoggedErrors(), [])
        [(_, by, until)] = await self.stack.store.background.run("t", _claims)
        self.assertEqual(by, 2)
        self.assertGreater(until, clock.seconds() * 1000)


class RetryQueueStopTests(SynchronousTestCase):
    """Regression: an attempt in flight when the queue was cancelled (the
    store stopping) rescheduled itself on failure, so repairs went on against
    closed backends after shutdown, and ended as dead letters nobody could
    write."""

    def test_an_attempt_in_flight_at_cancel_is_not_rescheduled(self) -> None:
        clock = Clock()
        dead: list[Task] = []

        async def record(task: Task) -> None:
            dead.append(task)

        queue = RetryQueue(
            clock, RetryPolicy(base=1.0, factor=1.0, max_attempts=3, jitter=0.0), record
        )
        attempt: Deferred[None] = Deferred()
        queue.add(Task("repair", 1, lambda: attempt), "down")
        clock.advance(1)  # the second attempt starts, and waits
        queue.cancel_all()
        attempt.errback(HotUnavailable("closed"))
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10)
        self.assertEqual(dead, [])
        self.assertEqual(queue.depth, 0)

    def test_expedite_runs_the_waiting_tasks_in_bounded_chunks(self) -> None:
        """Regression: at hot_back every waiting task ran at once, beyond
        what one Redis connection takes in flight (part failed as too busy)."""
        clock = Clock()

        async def record(task: Task) -> None:
            pass

        queue = RetryQueue(
            clock, RetryPolicy(base=60.0, factor=1.0, max_attempts=3, jitter=0.0), record
        )
        ran: list[int] = []

        def task(i: int) -> Task:
            async def run() -> None:
                ran.append(i)

            return Task("repair", i, run)

        for i in range(250):
            queue.add(task(i), "down")
        self.assertEqual(queue.expedite(), 250)
        clock.advance(0)
        self.assertEqual(len(ran), EXPEDITE_CHUNK)
        clock.advance(1)
        self.assertEqual(sorted(ran), list(range(250)))
        self.assertEqual(queue.depth, 0)
