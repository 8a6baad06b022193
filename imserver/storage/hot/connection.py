"""
The node's Redis connection: one txredisapi pool shared by the hot index
(L{imserver.storage.hot.redis.RedisHotStore}) and the cluster bus
(L{imserver.storage.hot.bus.RedisBus}), behind a circuit breaker, plus the
pub/sub subscriptions.

Why a breaker: txredisapi's lazy pool queues a command issued while Redis
is unreachable without any bound, and a stopped Redis (SIGSTOP, a stalled
host) keeps its connections open and answers nothing. Every caller would
wait its whole timeout, one batch after another. The breaker opens on the
first sign (a timeout, a lost connection, no connection at all) and from
then on every call fails at once with L{CircuitOpen}, while one probe
(PING) at a time, with a backoff, finds out when Redis answers again. Calls
in flight are bounded too, so nothing ever piles up in the pool.

The pool and the subscriber connections are created in L{_new_pool} and
L{_new_subscriber_factory} only, through L{imserver.storage.hot.connect}
(a plain address or the master a set of Sentinels names; a pool that finds
itself on a new Redis server forgets the hot copies it cannot trust).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import msgpack
import txredisapi
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from imserver.config import AnyRedisTarget
from imserver.deferreds import within
from imserver.storage.hot.connect import connect_pool, connect_subscriber
from imserver.storage.hot.interface import HotUnavailable, ISubscription

#: Calls allowed in flight at once; beyond it calls fail at once.
MAX_IN_FLIGHT = 1000

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitOpen(HotUnavailable):
    """Not even tried: Redis was found unreachable and has not answered a probe since."""


def load_scripts(names: Sequence[str]) -> dict[str, bytes]:
    """The Lua scripts C{lua/NAME.lua}, each after the shared prelude."""
    lua = resources.files("imserver.storage.hot").joinpath("lua")
    prelude = lua.joinpath("prelude.lua").read_text("utf-8")
    return {
        name: (prelude + "\n" + lua.joinpath(f"{name}.lua").read_text("utf-8")).encode()
        for name in names
    }


def pack(obj: Any) -> bytes:
    """A script argument: Redis's cmsgpack has no bin type, so bytes go as raw strings."""
    data: bytes = msgpack.packb(obj, use_bin_type=False)
    return data


def to_int(value: Any) -> int:
    if isinstance(value, bytes):
        value = value.decode()
    return int(value) if not isinstance(value, str) or "." not in value else int(float(value))


def to_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class CircuitBreaker:
    """
    Closed: calls go through. The first connectivity failure opens it: calls
    fail at once. After C{base_delay} seconds (doubling up to C{max_delay}
    while probes fail) it is half-open: one probe runs, and closes it if it
    succeeds. C{on_closed} callbacks run each time it closes again.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        probe: Callable[[], Deferred[Any]],
        *,
        name: str = "redis",
        base_delay: float = 0.2,
        max_delay: float = 2.0,
    ) -> None:
        self._clock = clock
        self._probe = probe
        self.name = name
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.state = CLOSED
        self._delay = base_delay
        self._opened_at = 0.0
        self._call: IDelayedCall | None = None
        self._stopped = False
        self.on_closed: list[Callable[[], None]] = []
        # Read by metrics.
        self.opened = 0
        self.rejected = 0

    def check(self) -> None:
        """Raise L{CircuitOpen} unless calls may go through."""
        if self.state != CLOSED:
            self.rejected += 1
            raise CircuitOpen(f"{self.name} is unreachable (circuit {self.state})")

    def failed(self, error: str) -> None:
        """A call failed for want of Redis (not for a refused command)."""
        if self.state != CLOSED or self._stopped:
            return
        self.state = OPEN
        self.opened += 1
        self._opened_at = self._clock.seconds()
        self._delay = self.base_delay
        self.log.warn(
            "{name} unreachable ({error}): failing fast until a probe answers",
            name=self.name,
            error=error,
        )
        self._schedule()

    def _schedule(self) -> None:
        self._call = self._clock.callLater(self._delay, self._half_open)

    def _half_open(self) -> None:
        self._call = None
        self.state = HALF_OPEN
        d = self._probe()
        d.addCallbacks(self._probe_ok, self._probe_failed)
        d.addErrback(lambda f: self.log.failure("{name} probe crashed", f, name=self.name))

    def _probe_ok(self, _: object) -> None:
        if self._stopped:
            return
        self.state = CLOSED
        self.log.warn(
            "{name} answers again after {seconds:.1f}s; circuit closed",
            name=self.name,
            seconds=self._clock.seconds() - self._opened_at,
        )
        for callback in list(self.on_closed):
            try:
                callback()
            except Exception:
                self.log.failure("{name} recovery callback failed", name=self.name)

    def _probe_failed(self, _: object) -> None:
        if self._stopped:
            return
        self.state = OPEN
        self._delay = min(self.max_delay, self._delay * 2)
        self._schedule()

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class RedisConnection:
    """
    The node's pool of Redis connections, every call bounded by a timeout
    and by the breaker. Failures become L{HotUnavailable} (L{CircuitOpen}
    when not even tried).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        target: AnyRedisTarget,
        *,
        prefix: str = "im",
        timeout: float = 2.0,
        poolsize: int = 4,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._reactor = reactor
        self.target = target
        #: The key prefix whose hot copies a new Redis server makes stale.
        self.prefix = prefix
        self.timeout = timeout
        self.poolsize = poolsize
        self.max_in_flight = max_in_flight
        self._pool: Any = None
        self.breaker = CircuitBreaker(reactor, self._probe)
        # Read by metrics.
        self.failures = 0
        self.in_flight = 0
        self.too_busy = 0

    @property
    def started(self) -> bool:
        return self._pool is not None

    def _new_pool(self) -> Any:
        # Binary, lazy, reconnecting within a second; plain or Sentinel.
        return connect_pool(
            self._reactor,
            self.target,
            prefix=self.prefix,
            poolsize=self.poolsize,
            timeout=self.timeout,
        )

    def _new_subscriber_factory(self, protocol: type) -> Any:
        return connect_subscriber(self._reactor, self.target, protocol, timeout=self.timeout)

    async def start(self) -> None:
        """Connect (idempotent); wait a little for the pool, so the first calls find it."""
        if self._pool is not None:
            return
        self._pool = self._new_pool()
        connected: Deferred[Any] | None = self._pool._factory.deferred
        if connected is not None:
            # Not on the factory's own Deferred: a timeout would cancel it.
            try:
                await within(connected, self.timeout, self._reactor)
            except Exception:
                pass  # Not connected (yet): the check below says what to do.
        if not self._connected():
            # Redis is down at start: sends go on without it.
            self.breaker.failed("not reachable at start")

    async def stop(self) -> None:
        self.breaker.stop()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.disconnect()

    def _connected(self) -> bool:
        return self._pool is not None and self._pool._factory.size > 0

    async def call(self, method: str, *args: Any) -> Any:
        """C{pool.method(*args)} (C{eval}, C{execute_command}, C{ping}...)."""
        if self._pool is None:
            raise HotUnavailable("redis is not connected")
        self.breaker.check()
        return await self._call(method, *args)

    async def _call(self, method: str, *args: Any) -> Any:
        if not self._connected():
            # The lazy pool would queue the command until a reconnect.
            self.failures += 1
            self.breaker.failed("no connection")
            raise HotUnavailable("redis: no connection")
        if self.in_flight >= self.max_in_flight:
            self.too_busy += 1
            raise HotUnavailable(f"redis: {self.in_flight} calls in flight already")
        self.in_flight += 1
        try:
            d: Deferred[Any] = getattr(self._pool, method)(*args)
            d.addTimeout(self.timeout, self._reactor)
            return await d
        except txredisapi.ResponseError as e:
            # Redis answered: it refused this command (a script error, OOM).
            self.failures += 1
            self.log.error("redis refused a command: {error}", error=e)
            raise HotUnavailable(f"redis: {e.__class__.__name__}: {e}") from e
        except (txredisapi.RedisError, TimeoutError, OSError) as e:
            self.failures += 1
            self.breaker.failed(f"{e.__class__.__name__}: {e}")
            raise HotUnavailable(f"redis: {e.__class__.__name__}: {e}") from e
        finally:
            self.in_flight -= 1

    def _probe(self) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._call("ping"))

    async def ping(self) -> None:
        await self.call("ping")

    async def eval(self, script: bytes, args: Sequence[Any]) -> Any:
        return await self.call("eval", script, [], list(args))

    async def command(self, *args: Any) -> Any:
        return await self.call("execute_command", *args)

    def subscribe(
        self,
        channels: Sequence[str],
        on_message: Callable[[bytes], None],
        on_subscribed: Callable[[bool], None] | None = None,
    ) -> Subscription:
        """
        Listen on C{channels}, resubscribing after every reconnect;
        C{on_subscribed(again)} runs each time the channels are subscribed
        (C{again}: not the first time, so messages may have been missed).
        """
        subscription = Subscription(self, channels, on_message, on_subscribed)
        subscription.start()
        return subscription


class RedisScripts:
    """
    What the hot index and the cluster bus share: their Lua scripts (each
    after the prelude), run under their key prefix on the node's connection.
    """

    def __init__(self, connection: RedisConnection, prefix: str, scripts: Sequence[str]) -> None:
        self.connection = connection
        self.prefix = prefix
        self._scripts = load_scripts(scripts)

    async def _script(self, name: str, *args: Any) -> Any:
        return await self.connection.eval(self._scripts[name], [self.prefix, *args])

    async def ping(self) -> None:
        await self.connection.ping()

    async def command(self, *args: Any) -> Any:
        """A raw command (tests, admin)."""
        return await self.connection.command(*args)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    """Subscribes in connectionMade, so a reconnect subscribes again."""

    subscription: Subscription

    factory: Any

    def connectionMade(self) -> Deferred[None]:
        d: Deferred[None] = super().connectionMade()
        d.addCallback(lambda _: self.subscribe(list(self.subscription.channels)))
        d.addCallbacks(lambda _: self.subscription._subscribed(self), self.subscription._failed)
        return d

    def connectionLost(self, reason: Any) -> None:
        self.subscription._lost(self)
        super().connectionLost(reason)

    def messageReceived(self, pattern: Any, channel: Any, message: bytes) -> None:
        # Not from a connection dropped by restart() (it may linger a moment).
        if self.factory is self.subscription._factory:
            self.subscription.on_message(message)


@implementer(ISubscription)
class Subscription:
    """
    Pub/sub channels, kept subscribed across Redis restarts (txredisapi
    reconnects the connection but does not subscribe again by itself).
    """

    log = Logger()

    def __init__(
        self,
        connection: RedisConnection,
        channels: Sequence[str],
        on_message: Callable[[bytes], None],
        on_subscribed: Callable[[bool], None] | None = None,
    ) -> None:
        self._connection = connection
        self.channels = tuple(channels)
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self._factory: Any = None
        self._protocol: Any = None
        #: Read by health and metrics.
        self.subscribed = False
        self.resubscriptions = 0
        self.restarts = 0

    def start(self) -> None:
        subscription = self

        class Protocol(_SubscriberProtocol):
            pass

        Protocol.subscription = subscription
        self._factory = self._connection._new_subscriber_factory(Protocol)

    def _subscribed(self, protocol: Any) -> None:
        if protocol.factory is not self._factory:
            return  # a connection restart() dropped
        self._protocol = protocol
        again = self.resubscriptions > 0
        if again:
            self.log.info("resubscribed to {channels}", channels=", ".join(self.channels))
        self.resubscriptions += 1
        self.subscribed = True
        if self.on_subscribed is not None:
            self.on_subscribed(again)

    def _failed(self, failure: Any) -> None:
        self.log.warn(
            "cannot subscribe to {channels}: {error}",
            channels=", ".join(self.channels),
            error=failure.value,
        )

    def _lost(self, protocol: Any) -> None:
        if protocol is self._protocol:
            self.subscribed = False
            self._protocol = None
            self.log.warn(
                "lost the subscription to {channels}; reconnecting",
                channels=", ".join(self.channels),
            )

    def restart(self) -> None:
        """
        Drop the subscriber connection, whatever its state, and start a new
        one: the node's self-check found that it receives nothing (killed
        without a FIN reaching us, made to another server, a reconnect that
        never ends). A new factory, not just a closed transport: the old
        one's reconnecting may be what is stuck.
        """
        factory, protocol = self._factory, self._protocol
        self._factory = self._protocol = None
        self.subscribed = False
        self.restarts += 1
        if protocol is not None and protocol.transport is not None:
            # Nothing to flush that matters; a dead peer would hold a close.
            protocol.transport.abortConnection()
        if factory is not None:
            d = factory.disconnect()
            d.addErrback(
                lambda f: self.log.warn(
                    "closing the dropped subscriber connection failed: {error}", error=f.value
                )
            )
        self.start()

    async def stop(self) -> None:
        if self._factory is not None:
            factory, self._factory = self._factory, None
            self._protocol = None  # a loss we asked for: nothing to warn about
            self.subscribed = False
            await factory.disconnect()
