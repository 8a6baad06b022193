"""L{within}: a bounded wait that never cancels the work it waits for."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from imserver.deferreds import within
from imserver.server import IMServer


class WithinTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.cancelled: list[Deferred[int]] = []
        self.work: Deferred[int] = Deferred(self.cancelled.append)

    def test_result_before_the_timeout(self) -> None:
        waiter = within(self.work, 5, self.clock)
        self.work.callback(7)
        self.assertEqual(self.successResultOf(waiter), 7)
        self.clock.advance(10)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failure_before_the_timeout(self) -> None:
        waiter = within(self.work, 5, self.clock)
        self.work.errback(ValueError("boom"))
        self.failureResultOf(waiter, ValueError)

    def test_timeout_leaves_the_work_running(self) -> None:
        waiter = within(self.work, 5, self.clock)
        self.clock.advance(5)
        self.failureResultOf(waiter, TimeoutError)
        self.assertEqual(self.cancelled, [])
        self.assertFalse(self.work.called)
        # Its late outcome, even a failure, is dropped (not an unhandled error).
        self.work.errback(ValueError("late"))
        self.assertIsNone(self.successResultOf(self.work))


class _Blocks:
    def stop(self) -> None:
        """The block cache's refreshes (here: none)."""


class _Chat:
    """A chat service whose drain awaits work it does not own."""

    def __init__(self, work: Deferred[None]) -> None:
        self.work = work
        self.devices = self
        self.blocks = _Blocks()

    def stop_sweeper(self) -> Deferred[None]:
        return succeed(None)

    async def stop(self) -> None:
        """The device service's upkeep (here: nothing to stop)."""

    async def drain(self) -> None:
        await self.work


class _Store:
    stopped = False

    async def stop(self) -> None:
        self.stopped = True


class ShutdownTests(TestCase):
    def test_grace_period_does_not_cancel_the_work_drained(self) -> None:
        """The shutdown's grace period bounds the wait for the fan-outs to
        drain; it does not cancel the hot-store steps or the downgrade
        transaction the drain waits for (they are other tasks' work)."""
        clock = Clock()
        cancelled: list[Deferred[None]] = []
        work: Deferred[None] = Deferred(cancelled.append)
        store = _Store()
        server = SimpleNamespace(
            ports=[],
            gateway=SimpleNamespace(goaway_all=lambda reason: succeed(None)),
            config=SimpleNamespace(server=SimpleNamespace(shutdown_seconds=5)),
            reactor=clock,
            chat=_Chat(work),
            notifier=None,
            cluster=None,
            store=store,
            log=Logger(),
        )
        stopped = Deferred.fromCoroutine(IMServer._stop(server))  # type: ignore[arg-type]
        clock.advance(5)
        self.successResultOf(stopped)
        self.assertTrue(store.stopped)
        self.assertEqual(cancelled, [])
        self.assertFalse(work.called)
        work.callback(None)
