"""
The node's Redis connection and its circuit breaker (issue 9, defect 5):
unit tests on a fake clock, then a real redis-server stopped (SIGSTOP) and
killed under it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from imserver.config import parse_config
from imserver.storage.hot.connection import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    CircuitBreaker,
    CircuitOpen,
    RedisConnection,
)
from imserver.storage.hot.interface import HotUnavailable
from tests.harness import RedisServer
from tests.support import eventually, reactor, within


class CircuitBreakerTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.answers = False
        self.probes = 0
        self.closed = 0

        def probe() -> Deferred[None]:
            self.probes += 1
            return succeed(None) if self.answers else fail(HotUnavailable("still down"))

        self.breaker = CircuitBreaker(self.clock, probe, base_delay=0.2, max_delay=1.0)
        self.breaker.on_closed.append(lambda: setattr(self, "closed", self.closed + 1))

    def test_closed_lets_calls_through(self) -> None:
        self.breaker.check()
        self.assertEqual((self.breaker.state, self.breaker.rejected), (CLOSED, 0))

    def test_a_failure_opens_it_and_calls_fail_at_once(self) -> None:
        self.breaker.failed("timeout")
        self.assertEqual(self.breaker.state, OPEN)
        self.assertRaises(CircuitOpen, self.breaker.check)
        self.assertRaises(CircuitOpen, self.breaker.check)
        self.assertEqual((self.breaker.rejected, self.breaker.opened), (2, 1))
        self.breaker.failed("another timeout")  # already open: no second probe loop
        self.assertEqual(self.breaker.opened, 1)

    def test_probes_back_off_then_close_it(self) -> None:
        self.breaker.failed("timeout")
        self.clock.advance(0.2)
        self.assertEqual((self.probes, self.breaker.state), (1, OPEN))
        self.clock.advance(0.39)
        self.assertEqual(self.probes, 1)  # the delay doubled
        self.clock.advance(0.01)
        self.assertEqual(self.probes, 2)
        for _ in range(5):
            self.clock.advance(1.0)  # at most max_delay apart
        self.assertEqual(self.probes, 7)
        self.answers = True
        self.clock.advance(1.0)
        self.assertEqual((self.probes, self.breaker.state, self.closed), (8, CLOSED, 1))
        self.breaker.check()
        # Opened again, it starts from the short delay.
        self.breaker.failed("timeout")
        self.clock.advance(0.2)
        self.assertEqual((self.breaker.state, self.closed), (CLOSED, 2))

    def test_half_open_while_the_probe_runs(self) -> None:
        pending: Deferred[None] = Deferred()
        breaker = CircuitBreaker(self.clock, lambda: pending, base_delay=0.2)
        breaker.failed("timeout")
        self.clock.advance(0.2)
        self.assertEqual(breaker.state, HALF_OPEN)
        self.assertRaises(CircuitOpen, breaker.check)  # only the probe goes through
        pending.callback(None)
        self.assertEqual(breaker.state, CLOSED)

    def test_stopped_it_probes_no_more(self) -> None:
        self.breaker.failed("timeout")
        self.breaker.stop()
        self.clock.advance(10)
        self.assertEqual(self.probes, 0)


class RedisConnectionTests(TestCase):
    """A real redis-server stopped and killed under the connection."""

    timeout = 60

    async def setUp(self) -> None:
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        target = parse_config({"storage": {"redis": self.redis.url}}).storage.redis
        assert target is not None
        self.connection = RedisConnection(reactor, target, timeout=0.5, max_in_flight=50)
        await self.connection.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.connection.stop()))
        self.addCleanup(self.redis.signal, signal.SIGCONT)

    async def timed_failure(self) -> float:
        started = time.monotonic()
        with self.assertRaises(HotUnavailable):
            await within(self.connection.command("INCR", "n"))
        return time.monotonic() - started

    async def answers(self) -> bool:
        try:
            await self.connection.ping()
        except HotUnavailable:
            return False
        return True

    async def test_a_stopped_redis_costs_one_timeout_then_calls_fail_fast(self) -> None:
        self.assertEqual(await self.connection.command("INCR", "n"), 1)
        self.redis.signal(signal.SIGSTOP)
        first = await self.timed_failure()
        self.assertGreaterEqual(first, 0.45)
        self.assertEqual(self.connection.breaker.state, OPEN)
        for _ in range(100):
            self.assertLess(await self.timed_failure(), 0.05)
        # Only the probes reach the stalled connections: nothing piles up.
        self.assertLessEqual(self.connection.in_flight, 1)
        self.redis.signal(signal.SIGCONT)
        await eventually(lambda: self.connection.breaker.state == CLOSED, timeout=10)
        # The first INCR ran once Redis resumed; the fast failures never went out.
        self.assertEqual(await self.connection.command("INCR", "n"), 3)

    async def test_a_killed_redis_fails_fast_and_is_found_again(self) -> None:
        await self.connection.ping()
        self.redis.kill()

        async def fails_fast() -> bool:
            return await self.timed_failure() < 0.05

        await eventually(fails_fast)
        self.assertNotEqual(self.connection.breaker.state, CLOSED)
        self.redis.start()
        await eventually(self.answers, timeout=10)
        self.assertEqual(self.connection.breaker.state, CLOSED)

    async def test_calls_in_flight_are_bounded(self) -> None:
        self.redis.signal(signal.SIGSTOP)
        calls = [Deferred.fromCoroutine(self.connection.command("PING")) for _ in range(60)]
        results = [r async for r in _settle(calls)]
        refused = [r for r in results if "in flight" in str(r)]
        self.assertEqual(len(refused), 10)
        self.assertEqual(self.connection.too_busy, 10)


async def _settle(calls: list[Deferred[object]]) -> AsyncIterator[object]:
    for d in calls:
        try:
            yield await d
        except HotUnavailable as e:
            yield e
