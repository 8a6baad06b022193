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
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET, Request, Site

from imserver.config import LimitsConfig, NotifyConfig
from imserver.services.ids import IdGenerator
from imserver.services.notifier import Notifier
from imserver.storage.sql.database import Txn
from imserver.storage.store import Store
from tests.stack import Stack, make_stack
from tests.support import reactor, sleep, within
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

        nodes = [node(1), node(2)]
        polls: list[Deferred[Any] | None] = [None, None]
        for _ in range(300):
            for i, notifier in enumerate(nodes):
                running = polls[i]
                if running is None or running.called:
                    polls[i] = ensureDeferred(notifier.poll())
            await sleep(0.01)  # the pool threads' claims and bookkeeping
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
