"""
Redis connections from the configured target (C{[storage].redis}): a server
at a fixed address, or the master of a Sentinel-monitored service.

* L{connect_pool}: the hot store's pool; L{connect_subscriber}: the cluster
  bus's pub/sub connection. With Sentinel, every connection attempt asks
  the sentinels for the master's address, and a connection to a server
  that is not (or no longer) the master is dropped, so both follow a
  failover by themselves; the subscriber's protocol subscribes again in
  C{connectionMade}, so it follows too.
* L{SwitchWatch}: a failover with the old master alive (C{SENTINEL
  FAILOVER}, a master that was only unreachable from the sentinels) leaves
  it a master, with our connections, until the sentinels convert it to a
  replica (about 10 s later): nodes that reconnect meanwhile reach the new
  master, the others stay, and pushes between them are lost. So each
  factory also listens to the sentinels' C{+switch-master} and drops its
  connections to any other server at once.
* L{ServerWatch}: after a failover (or a restart from an old snapshot) the
  server we reach may lack the last writes we made: Redis replicates
  asynchronously. Users' copies marked complete would then stay wrong for
  good, so when the server's C{run_id} changes the markers, windows and
  caches are forgotten and rebuilt from SQL on use, as after a restart
  without persistence.

txredisapi's own C{Sentinel.master_for} is not used as is: its role check
compares C{ROLE}'s reply with a C{str}, which fails for the binary
(C{charset=None}) connections imserver needs, so every connection would be
dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, TimeoutError, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from imserver.config import AnyRedisTarget, RedisSentinelTarget

#: Seconds between reconnection attempts at most (txredisapi's default is 10):
#: until every pooled connection is back, commands routed to the pool wait.
RECONNECT_MAX_DELAY = 1.0

#: Key kinds forgotten when the server changed (see docs/data-model.md): the
#: per-user markers (users' copies are reloaded from SQL on use), session
#: windows, the message cache and the profile cache. Deleting any of them
#: at any moment is safe (an invalidation does the same for a few ids);
#: what the markers guard is not read until a reload rewrites it.
FORGET = frozenset({"hot", "session_list", "msg", "user"})
SCAN_COUNT = 1000

log = Logger()


def connect_pool(
    reactor: Any,
    target: AnyRedisTarget,
    *,
    prefix: str,
    poolsize: int,
    timeout: float,
) -> Any:
    """
    A lazy pool (commands wait until a connection is up) of binary
    connections (C{charset=None}, no number conversion) to the target, or to
    its master. Its factory's C{watch} is the pool's L{ServerWatch}.
    """
    factory = _factory(
        reactor,
        target,
        _PoolProtocol,
        poolsize=poolsize,
        timeout=timeout,
        dbid=target.db,
    )
    factory.watch = ServerWatch(reactor, prefix)
    factory.startConnecting(_endpoint(reactor, target, factory, timeout))
    return factory.handler


def connect_subscriber(
    reactor: Any, target: AnyRedisTarget, protocol: type, *, timeout: float = 2.0
) -> Any:
    """
    Start a pub/sub connection with this protocol (a
    C{txredisapi.SubscriberProtocol} that subscribes in C{connectionMade});
    return its factory (C{disconnect()} ends it).
    """
    factory = _factory(
        reactor,
        target,
        type(protocol.__name__, (_MasterOnly, protocol), {}),
        poolsize=1,
        timeout=timeout,
        dbid=None,
    )
    factory.startConnecting(_endpoint(reactor, target, factory, timeout))
    return factory


def _factory(
    reactor: Any,
    target: AnyRedisTarget,
    protocol: type,
    *,
    poolsize: int,
    timeout: float,
    dbid: int | None,
) -> Any:
    sentinel = None
    if isinstance(target, RedisSentinelTarget):
        sentinel = _sentinel_manager(target, timeout)
    factory = _Factory(
        None,
        dbid,
        poolsize,
        isLazy=True,
        charset=None,
        password=target.password,
        convertNumbers=False,
    )
    factory.protocol = protocol
    factory.maxDelay = RECONNECT_MAX_DELAY
    factory.sentinel = sentinel
    factory.watch = None
    factory.switch = None
    if isinstance(target, RedisSentinelTarget):
        factory.switch = SwitchWatch(reactor, target, factory, timeout)
    return factory


class _Factory(txredisapi.RedisFactory):
    """A pool that also closes its connections to the sentinels."""

    sentinel: Any
    watch: ServerWatch | None
    switch: SwitchWatch | None

    def disconnect(self) -> Deferred[None]:
        d: Deferred[None] = super().disconnect()
        if self.switch is not None:
            switch, self.switch = self.switch, None
            d.addBoth(lambda _: switch.disconnect())
            d.addBoth(lambda _: None)
        if self.sentinel is not None:
            sentinel, self.sentinel = self.sentinel, None
            d.addBoth(lambda _: sentinel.disconnect())
            d.addBoth(lambda _: None)
        return d

    def stopTrying(self) -> Deferred[None]:
        """
        Keep trying. txredisapi calls this from C{connectionMade} when AUTH
        or SELECT fails, and that is also what a proxy in front of a Redis
        that is down does to every reconnection (it accepts, then closes):
        the pool gave up for good. Only L{disconnect} stops a pool here; a
        wrong password is logged at each attempt instead.
        """
        return succeed(None)

    def retryDelay(self, attempt: int) -> float:
        if self.sentinel is not None and attempt <= 1:
            # The address is rediscovered on every attempt, and a failover
            # is the likely reason the connection was lost: at once.
            return 0.0
        delay: float = super().retryDelay(attempt)
        return delay


def _sentinel_manager(target: RedisSentinelTarget, timeout: float) -> Any:
    manager = txredisapi.Sentinel(
        list(target.sentinels),
        password=target.sentinel_password,
        connectTimeout=timeout,
    )
    # A master is "not found" if no sentinel names a healthy one this fast.
    manager.discovery_timeout = timeout
    for conn in manager.sentinels:
        conn._factory.maxDelay = RECONNECT_MAX_DELAY
    return manager


def _endpoint(reactor: Any, target: AnyRedisTarget, factory: Any, timeout: float) -> Any:
    if isinstance(target, RedisSentinelTarget):
        return SentinelMasterEndpoint(reactor, factory, target.service, timeout)
    return HostnameEndpoint(reactor, target.host, target.port, timeout=timeout)


@implementer(IStreamClientEndpoint)
class SentinelMasterEndpoint:
    """
    Asks the sentinels for the master's address before every connection
    attempt; when it changed, drops the pool's other connections (still to
    the old master, which may now be a replica).
    """

    def __init__(self, reactor: Any, factory: Any, service: str, timeout: float) -> None:
        self._reactor = reactor
        self._factory = factory
        self.service = service
        self.timeout = timeout
        self.address: tuple[str, int] | None = None

    def connect(self, protocol_factory: Any) -> Deferred[Any]:
        async def connect() -> Any:
            try:
                host, port = await self._factory.sentinel.discover_master(self.service)
            except txredisapi.MasterNotFoundError as e:
                log.warn("redis sentinel: {error}", error=e)
                raise
            if self.address is not None and self.address != (host, port):
                log.warn(
                    "redis sentinel: the master of {service} is {host}:{port} now",
                    service=self.service,
                    host=host,
                    port=port,
                )
                for conn in list(self._factory.pool):
                    conn.transport.loseConnection()
            self.address = (host, port)
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self.timeout)
            return await endpoint.connect(protocol_factory)

        return Deferred.fromCoroutine(connect())


class _SwitchProtocol(txredisapi.SubscriberProtocol):
    """A sentinel connection that listens to C{+switch-master} (resubscribing on reconnects)."""

    watch: SwitchWatch

    def connectionMade(self) -> Deferred[None]:
        d: Deferred[None] = super().connectionMade()
        d.addCallback(lambda _: self.subscribe(["+switch-master"]))
        d.addErrback(
            lambda f: log.warn("redis sentinel: no +switch-master events: {error}", error=f.value)
        )
        return d

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.watch.switched(_text(message))


class SwitchWatch:
    """
    Follows C{+switch-master} (C{name old-ip old-port new-ip new-port}) on
    every sentinel: when the service's master changes, the factory's
    connections to another address are dropped, and reconnect to the
    master the sentinels name. (Sentinel only kills the old master's
    clients once it converts it to a replica.)
    """

    def __init__(self, reactor: Any, target: RedisSentinelTarget, factory: Any, timeout: float):
        self.service = target.service
        self._factory = factory
        #: Read by tests: connections dropped on a switch.
        self.dropped = 0
        self._sentinels = []
        for host, port in target.sentinels:
            sentinel = txredisapi.RedisFactory(
                None, None, 1, isLazy=True, password=target.sentinel_password
            )
            sentinel.protocol = type("SwitchProtocol", (_SwitchProtocol,), {"watch": self})
            sentinel.maxDelay = RECONNECT_MAX_DELAY
            sentinel.startConnecting(HostnameEndpoint(reactor, host, port, timeout=timeout))
            self._sentinels.append(sentinel)

    def switched(self, message: str) -> None:
        parts = message.split()
        if len(parts) != 5 or parts[0] != self.service or not parts[4].isdigit():
            return
        master = (parts[3], int(parts[4]))
        n = 0
        for conn in list(self._factory.pool):
            peer = conn.transport.getPeer()
            if (getattr(peer, "host", None), getattr(peer, "port", None)) != master:
                conn.transport.loseConnection()
                n += 1
        if n:
            self.dropped += n
            log.warn(
                "redis sentinel: +switch-master {service} to {host}:{port}: dropped {n} "
                "connections to the old master",
                service=self.service,
                host=master[0],
                port=master[1],
                n=n,
            )

    def disconnect(self) -> Deferred[Any]:
        sentinels, self._sentinels = self._sentinels, []
        return gatherResults([s.disconnect() for s in sentinels], consumeErrors=True)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _MasterOnly:
    """
    Drops a connection, with Sentinel, to a server whose C{ROLE} is not
    master (a stale address, or a master demoted meanwhile), before it is
    used; then runs the protocol's own C{connectionMade} and the pool's
    L{ServerWatch}.
    """

    factory: Any
    password: str | None
    username: str | None
    transport: Any

    def connectionMade(self) -> Deferred[None]:
        base: Callable[[], Any] = super().connectionMade  # type: ignore[misc]

        async def made() -> None:
            if self.factory.sentinel is not None and not await self._is_master():
                self.transport.loseConnection()
                return
            await base()
            if self.factory.watch is not None:
                await self.factory.watch.check(self)

        return Deferred.fromCoroutine(made())

    async def _is_master(self) -> bool:
        conn: Any = self
        try:
            if self.password is not None:
                await conn.auth(self.password, self.username)
            role = await conn.role()
        except Exception as e:
            log.warn("redis sentinel: cannot ask the server's role: {error}", error=e)
            return False
        if isinstance(role, list) and role and _text(role[0]) == "master":
            return True
        log.warn(
            "redis sentinel: {peer} is not a master ({role}); asking the sentinels again",
            peer=self.transport.getPeer(),
            role=_text(role[0]) if isinstance(role, list) and role else role,
        )
        return False


class _PoolProtocol(_MasterOnly, txredisapi.RedisProtocol):
    pass


_RUN_ID = re.compile(rb"^run_id:([0-9a-f]+)", re.MULTILINE)


class ServerWatch:
    """
    Notices that the pool reaches another Redis server than before (its
    C{run_id} changed: a failover, a restart) and forgets what of the hot
    copy may miss the last writes. The first pooled connection to a new
    server does it; the first node to finish records it in
    C{{p}:reset:{run_id}}, so that the others do not do it again.
    """

    def __init__(self, reactor: Any, prefix: str) -> None:
        self._reactor = reactor
        self.prefix = prefix
        self.run_id: str | None = None
        #: Read by tests and metrics.
        self.changes = 0
        self.forgotten = 0

    async def check(self, conn: Any) -> None:
        try:
            info = await self._bounded(conn.execute_command("INFO", "server"))
            match = _RUN_ID.search(info if isinstance(info, bytes) else str(info).encode())
            if match is None:
                return
            run_id = match.group(1).decode()
            previous = self.run_id
            if previous == run_id:
                return
            self.run_id = run_id
            if previous is None:
                return  # the first server this node sees: nothing to compare with
            self.changes += 1
            log.warn(
                "redis is another server now (run_id {old} -> {new}, a failover or a "
                "restart): forgetting the hot copy, which may miss the last writes",
                old=previous[:8],
                new=run_id[:8],
            )
            try:
                n = await self.forget(conn, run_id)
            except BaseException:
                self.run_id = previous  # the next connection tries again
                raise
            self.forgotten += n
            log.info("forgot {n} hot-store keys; users' copies reload from SQL", n=n)
        except Exception as e:
            log.warn("redis server check failed: {error}", error=e)

    async def forget(self, conn: Any, run_id: str) -> int:
        """Delete the markers, windows and caches under the prefix (once per server)."""
        done = f"{self.prefix}:reset:{run_id}"
        if await self._bounded(conn.execute_command("EXISTS", done)):
            return 0
        n = 0
        cursor: Any = b"0"
        while True:
            cursor, keys = await self._bounded(
                conn.execute_command(
                    "SCAN", cursor, "MATCH", f"{self.prefix}:*", "COUNT", SCAN_COUNT
                ),
            )
            doomed = [k for k in keys if _kind(k, self.prefix) in FORGET]
            if doomed:
                n += int(await self._bounded(conn.execute_command("UNLINK", *doomed)))
            if _text(cursor) == "0":
                break
        await self._bounded(conn.execute_command("SET", done, str(n), "EX", 86400))
        return n

    async def _bounded(self, d: Deferred[Any], seconds: float = 10.0) -> Any:
        """A command on a pooled connection, bounded: a lost reply must not hang us."""
        d.addTimeout(seconds, self._reactor)
        try:
            return await d
        except TimeoutError:
            raise txredisapi.TimeoutError(f"no reply in {seconds}s") from None


def _kind(key: Any, prefix: str) -> str:
    """C{hot} of C{{p}:hot:42}."""
    return _text(key)[len(prefix) + 1 :].split(":", 1)[0]
