"""Helpers for tests that run on the real reactor (end-to-end, integration)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater

from imserver.client import IMClientProtocol, connect

T = TypeVar("T")

reactor: Any = _reactor


async def within(awaitable: Awaitable[T], seconds: float = 10.0) -> T:
    """Await with a bound, so a missing reply fails the test instead of hanging it."""
    d: Deferred[T] = ensureDeferred(awaitable)
    d.addTimeout(seconds, reactor)
    return await d


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def eventually(check: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll C{check()} (sync or async) until it returns a true value."""
    deadline = reactor.seconds() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await sleep(interval)


class ClientsMixin:
    """Connect clients that are closed at the end of the test."""

    addCleanup: Any  # provided by TestCase

    async def client(
        self, endpoint: str, token: str | None = None, **auth: Any
    ) -> IMClientProtocol:
        proto = await within(connect(reactor, endpoint, token, **auth))
        self.addCleanup(proto.close)
        return proto
