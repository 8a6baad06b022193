"""
The pub/sub self-check (L{imserver.services.cluster}): every second a node
publishes a probe to its own channel, in the script that checks the bus's
generation; PUBLISH answering 0 receivers, probes that do not come back, or
no subscription made again for a while though Redis answers, mean the node
would miss its cross-node pushes whatever it believes: it re-creates its
subscriber connection and, once subscribed, tells its users to sync.

* L{SelfCheckTests}: L{ClusterPresence} on a fake bus and a L{task.Clock}.
* L{SelfCheckRedisTests}: two nodes in this process on a private
  redis-server: the subscriber connection killed (C{CLIENT KILL TYPE
  pubsub}), and killed behind a relay that keeps the node's side open (the
  node cannot notice: only the self-check finds it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from imserver.config import RedisTarget, parse_config
from imserver.services import cluster
from imserver.services.cluster import SYNC_PUSH, ClusterPresence
from imserver.services.presence import IClientLink
from imserver.services.registry import LocalRegistry
from imserver.storage.hot.bus import RedisBus
from imserver.storage.hot.connection import RedisConnection
from imserver.storage.hot.interface import (
    HotUnavailable,
    IClusterBus,
    ISubscription,
    LoginAnswer,
    LoginEntry,
)
from tests.harness import RedisServer, fresh_prefix
from tests.support import eventually, reactor, within

_uids = itertools.count(1)


@implementer(IClientLink)
@attrs.define(eq=False)
class Link:
    uid: int
    epoch: int = 1
    device: str = "default"
    connected_at: int = 0
    last_active: float = 0.0
    pushes: list[dict[str, Any]] = attrs.Factory(list)

    def push(self, frame: Mapping[str, Any]) -> None:
        self.pushes.append(dict(frame))

    def kick(self, reason: str) -> None:
        pass


@implementer(ISubscription)
class FakeSubscription:
    def __init__(
        self, on_message: Callable[[bytes], None], on_subscribed: Callable[[bool], None] | None
    ) -> None:
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self.subscribed = False
        self.restarts = 0
        self.times = 0

    def made(self) -> None:
        """The (re)subscription completes."""
        self.subscribed = True
        self.times += 1
        if self.on_subscribed is not None:
            self.on_subscribed(self.times > 1)

    def restart(self) -> None:
        self.restarts += 1
        self.subscribed = False

    async def stop(self) -> None:
        self.subscribed = False


@implementer(IClusterBus)
class FakeBus:
    """
    Answers like Redis would; C{receivers} is what PUBLISH of a probe
    answers, C{echo} whether the probe comes back on the subscription.
    """

    def __init__(self) -> None:
        self.receivers = 1
        self.echo = True
        self.down = False
        self.probes: list[bytes] = []
        self.subscription: FakeSubscription | None = None
        self.back: list[Callable[[], None]] = []
        #: Set: probes come back a little after the heartbeat's reply (as
        #: on Redis: the subscriber is another connection), on this clock.
        self.late: Clock | None = None
        #: Set: the next heartbeat waits for it.
        self.held: Deferred[None] | None = None

    def _up(self) -> None:
        if self.down:
            raise HotUnavailable("redis: down")

    async def ping(self) -> None:
        self._up()

    async def generation(self, fresh: str) -> str:
        self._up()
        return "g1"

    async def heartbeat(self, fresh: str, node: str, probe: bytes) -> tuple[str, int]:
        if self.held is not None:
            held, self.held = self.held, None
            await held
        self._up()
        self.probes.append(probe)
        if self.echo and self.subscription is not None and self.subscription.subscribed:
            if self.late is None:
                self.subscription.on_message(probe)
            else:
                self.late.callLater(0.01, self.subscription.on_message, probe)
        return "g1", self.receivers

    async def presence_login(
        self,
        node: str,
        nonce: str,
        entries: Sequence[LoginEntry],
        ttl_ms: int,
        max_online: int,
        replay: bool = False,
    ) -> tuple[list[LoginAnswer], str | None]:
        self._up()
        return [([], [], []) for _ in entries], "g1"

    async def presence_devices(self, uid: int) -> list[tuple[str, str, int]]:
        return []

    async def presence_logout(self, node: str, entries: Sequence[tuple[int, str, str]]) -> None:
        pass

    async def presence_refresh(
        self, node: str, entries: Sequence[LoginEntry], ttl_ms: int
    ) -> tuple[list[tuple[int, str, str]], dict[int, set[str]], str | None]:
        self._up()
        return [], {}, "g1"

    async def presence_active(self, entries: Sequence[tuple[int, str, str, int]]) -> int:
        self._up()
        return len(entries)

    async def presence_kick(
        self, uid: int, device: str, reason: str, node: str, nonce: str
    ) -> str | None:
        self._up()
        return None

    async def route(
        self, node: str, pushes: Sequence[tuple[int, bytes, str]]
    ) -> tuple[int, str | None]:
        self._up()
        return len(pushes), "g1"

    async def send(self, node: str, message: bytes) -> None:
        self._up()

    async def broadcast(self, message: bytes) -> None:
        self._up()

    def subscribe(
        self,
        node: str,
        on_message: Callable[[bytes], None],
        on_subscribed: Callable[[bool], None] | None = None,
    ) -> FakeSubscription:
        self.subscription = FakeSubscription(on_message, on_subscribed)
        return self.subscription

    def when_back(self, callback: Callable[[], None]) -> None:
        self.back.append(callback)

    def state(self) -> str:
        return "open" if self.down else "ok"


class SelfCheckTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = FakeBus()
        self.node = ClusterPresence(self.clock, LocalRegistry(), self.bus, 2, ttl_seconds=30)
        self.node.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.node.stop()))
        self.sub = self.bus.subscription
        assert self.sub is not None
        self.sub.made()
        self.bob = Link(next(_uids))
        d = self.node.login(self.bob.uid, self.bob)
        self.clock.advance(0)  # the login batch
        self.successResultOf(d)

    def seconds(self, n: int) -> None:
        for _ in range(n):
            self.clock.advance(cluster.GENERATION_SECONDS)

    def test_a_probe_per_second_and_nothing_else_while_it_comes_back(self) -> None:
        self.seconds(10)
        self.assertEqual(len(self.bus.probes), 11)  # the first one at start
        self.assertEqual(len(set(self.bus.probes)), 11)
        self.assertEqual((self.sub.restarts, self.node.pubsub_failures), (0, 0))
        self.assertEqual(self.bob.pushes, [])
        self.assertEqual(self.node.pubsub_state(), "ok")

    def test_no_receiver_recreates_the_subscription_then_users_sync(self) -> None:
        self.bus.receivers = 0  # Redis has no subscription of ours
        self.seconds(1)
        self.assertEqual((self.sub.restarts, self.node.pubsub_failures), (1, 1))
        self.assertEqual(self.node.pubsub_state(), "down")
        self.flushLoggedErrors()
        # Made again: everything published meanwhile may be lost.
        self.bus.receivers = 1
        self.sub.made()
        self.clock.advance(0)
        self.assertEqual(self.bob.pushes, [SYNC_PUSH])
        self.assertEqual(self.node.pubsub_state(), "ok")
        self.seconds(10)
        self.assertEqual(self.sub.restarts, 1)

    def test_probes_that_do_not_come_back(self) -> None:
        # Someone else holds our channel (PUBLISH counts them), but our
        # subscription receives nothing.
        self.bus.echo = False
        self.seconds(cluster.PUBSUB_ECHO_SECONDS - 1)
        self.assertEqual(self.sub.restarts, 0)
        self.seconds(1)
        self.assertEqual(self.sub.restarts, 1)

    def test_a_reconnect_that_takes_too_long_while_redis_answers(self) -> None:
        self.sub.subscribed = False  # lost; its own reconnect is on it
        self.bus.receivers = 0
        self.seconds(cluster.PUBSUB_STUCK_SECONDS)
        self.assertEqual(self.sub.restarts, 0)
        self.seconds(1)
        self.assertEqual(self.sub.restarts, 1)
        # Then it has as long again to subscribe.
        self.seconds(cluster.PUBSUB_STUCK_SECONDS)
        self.assertEqual(self.sub.restarts, 1)

    def test_no_verdict_while_redis_does_not_answer(self) -> None:
        self.bus.down = True
        self.sub.subscribed = False
        self.seconds(30)
        self.assertEqual(self.sub.restarts, 0)
        self.assertEqual(self.node.pubsub_failures, 0)

    def test_a_fresh_subscription_gets_time_for_its_first_probe(self) -> None:
        self.bus.echo = False
        self.seconds(cluster.PUBSUB_ECHO_SECONDS)
        self.assertEqual(self.sub.restarts, 1)
        self.sub.made()
        self.seconds(cluster.PUBSUB_ECHO_SECONDS - 1)
        self.assertEqual(self.sub.restarts, 1)

    def test_an_outage_the_subscriber_survived_is_no_failure(self) -> None:
        """While Redis is down no probe is published: the first heartbeat
        after the outage does not count the outage as probes lost (the
        subscriber is fine: no restart, nobody told to sync)."""
        self.bus.late = self.clock
        self.seconds(3)
        self.bus.down = True
        self.seconds(cluster.PUBSUB_ECHO_SECONDS + 5)
        self.bus.down = False
        self.seconds(cluster.PUBSUB_ECHO_SECONDS - 1)
        self.assertEqual((self.sub.restarts, self.node.pubsub_failures), (0, 0))
        self.assertEqual(self.bob.pushes, [])
        # Probes lost after the outage still count.
        self.bus.echo = False
        self.seconds(cluster.PUBSUB_ECHO_SECONDS + 1)
        self.assertEqual(self.sub.restarts, 1)

    def test_an_outage_does_not_count_as_a_reconnect_stuck(self) -> None:
        """Only the time Redis answers counts towards a stuck reconnect."""
        self.sub.subscribed = False
        self.bus.receivers = 0
        self.seconds(cluster.PUBSUB_STUCK_SECONDS - 2)
        self.bus.down = True
        self.seconds(10)
        self.bus.down = False
        self.seconds(cluster.PUBSUB_STUCK_SECONDS - 1)
        self.assertEqual(self.sub.restarts, 0)
        self.seconds(2)
        self.assertEqual(self.sub.restarts, 1)

    def test_nothing_runs_after_stop(self) -> None:
        """A heartbeat in flight at stop, and Redis answering again after
        it, neither re-create the subscriber (a connection nobody would
        stop) nor start a recovery; stop waits for the heartbeat."""
        gate: Deferred[None] = Deferred()
        self.bus.held = gate
        self.bus.receivers = 0
        self.seconds(1)
        stopped = Deferred.fromCoroutine(self.node.stop())
        self.assertNoResult(stopped)
        gate.callback(None)
        self.successResultOf(stopped)
        for back in self.bus.back:
            back()
        self.sub.on_subscribed = self.node._subscribed
        self.sub.made()
        self.clock.advance(0)
        self.assertEqual((self.sub.restarts, self.node.pubsub_failures), (0, 0))
        self.assertEqual(self.bob.pushes, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_probes_of_another_incarnation_do_not_count(self) -> None:
        self.bus.echo = False
        other = ClusterPresence(self.clock, LocalRegistry(), FakeBus(), 2)
        for _ in range(cluster.PUBSUB_ECHO_SECONDS):
            self.sub.on_message(other._probe())
            self.seconds(1)
        self.assertEqual(self.sub.restarts, 1)

    def test_a_reactor_seconds_late_is_no_failure(self) -> None:
        """
        Regression (issue 13, 100,000 connections on a starved machine): a
        node whose reactor ran seconds late read its echoes seconds late, took
        that for a dead subscription, re-subscribed and told every local user
        to sync, which starved it further. Only probes answered by Redis and
        still not back count.
        """
        self.bus.late = self.clock  # echoes come a little after each reply
        for _ in range(5):
            # One heartbeat per 4 s: the 1 s LoopingCall fires that late.
            self.clock.advance(4 * cluster.GENERATION_SECONDS)
        self.assertEqual((self.sub.restarts, self.node.pubsub_failures), (0, 0))
        self.assertEqual(self.bob.pushes, [])
        # Probes that do not come back still count, late reactor or not.
        self.bus.echo = False
        for _ in range(cluster.PUBSUB_ECHO_PROBES):
            self.clock.advance(4 * cluster.GENERATION_SECONDS)
        self.assertEqual(self.sub.restarts, 1)


class _Relay(protocol.Protocol):
    """One client connection relayed to Redis."""

    def __init__(self, proxy: RelayFactory) -> None:
        self.proxy = proxy
        self.upstream: Any = None
        self.buffer: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port)
        d = endpoint.connect(protocol.Factory.forProtocol(lambda: _Upstream(self)))
        d.addErrback(lambda _: self.transport.loseConnection())

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class _Upstream(protocol.Protocol):
    def __init__(self, relay: _Relay) -> None:
        self.relay = relay

    def connectionMade(self) -> None:
        self.relay.upstream = self
        self.relay.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.relay.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        proxy = self.relay.proxy
        if proxy.silence_next:
            # As a NAT or a firewall that lost the connection's state: the
            # node's side stays open and hears nothing.
            proxy.silence_next = False
            proxy.silenced += 1
            return
        self.relay.transport.loseConnection()


class RelayFactory(protocol.Factory):
    def __init__(self, port: int) -> None:
        self.port = port
        #: The next connection Redis closes stays open on the node's side.
        self.silence_next = False
        self.silenced = 0

    def buildProtocol(self, addr: Any) -> _Relay:
        return _Relay(self)


class SelfCheckRedisTests(TestCase):
    """Two nodes in this process on a private redis-server (kills are global)."""

    timeout = 60

    def setUp(self) -> None:
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.prefix = fresh_prefix()

    async def node(self, node_id: int, subscriber_port: int | None = None) -> ClusterPresence:
        target = parse_config({"storage": {"redis": self.redis.url}}).storage.redis
        assert isinstance(target, RedisTarget)
        connection = RedisConnection(reactor, target, timeout=1.0)
        if subscriber_port is not None:
            # The subscriber through the relay, the pool straight to Redis.
            relayed = attrs.evolve(target, port=subscriber_port)
            base = connection._new_subscriber_factory

            def through_relay(protocol: type) -> Any:
                connection.target = relayed
                try:
                    return base(protocol)
                finally:
                    connection.target = target

            connection._new_subscriber_factory = through_relay  # type: ignore[method-assign]
        await connection.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(connection.stop()))
        presence = ClusterPresence(
            reactor, LocalRegistry(), RedisBus(connection, self.prefix), node_id, ttl_seconds=30
        )
        presence.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(presence.stop()))
        await eventually(lambda: presence.pubsub_state() == "ok")
        return presence

    def kill_subscribers(self) -> None:
        reply = self.redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        self.assertTrue(reply.startswith(b":") and int(reply[1:]) >= 1, reply)

    async def push_arrives(self, a: ClusterPresence, bob: Link, n: int, bound: float) -> float:
        """Push from C{a} until bob has it (or was told to sync after it was sent)."""
        started = reactor.seconds()
        frame = {"t": "msg", "n": n}
        a.push(bob.uid, frame)
        await eventually(lambda: frame in bob.pushes or SYNC_PUSH in bob.pushes, timeout=bound)
        return reactor.seconds() - started

    async def test_subscriber_killed(self) -> None:
        a, b = await self.node(1), await self.node(2)
        bob = Link(next(_uids))
        await within(b.login(bob.uid, bob))
        self.kill_subscribers()
        await eventually(lambda: SYNC_PUSH in bob.pushes, timeout=5)
        bob.pushes.clear()
        took = await self.push_arrives(a, bob, 1, 2)
        self.assertIn({"t": "msg", "n": 1}, bob.pushes)
        self.assertLess(took, 2)
        self.assertEqual(b.pubsub_state(), "ok")

    async def test_subscriber_killed_silently(self) -> None:
        relay = RelayFactory(self.redis.port)
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(relay)
        self.addCleanup(listening.stopListening)
        a = await self.node(1)
        b = await self.node(2, subscriber_port=listening.getHost().port)
        bob = Link(next(_uids))
        await within(b.login(bob.uid, bob))
        relay.silence_next = True
        killed = reactor.seconds()
        self.kill_subscribers()
        await eventually(lambda: relay.silenced == 1)
        # The node cannot tell: its side of the connection is open.
        numsub = self.redis.command("PUBSUB", "NUMSUB", f"{self.prefix}:node:2")
        self.assertTrue(numsub.endswith(b":0\r\n"), numsub)
        self.assertEqual(b.pubsub_state(), "ok")
        # Found within about a second, made again, bob told to sync.
        await eventually(lambda: SYNC_PUSH in bob.pushes, timeout=5)
        found = reactor.seconds() - killed
        self.assertEqual(b.pubsub_failures, 1)
        self.assertEqual(b.pubsub_state(), "ok")
        bob.pushes.clear()
        await self.push_arrives(a, bob, 2, 2)
        self.assertEqual(bob.pushes, [{"t": "msg", "n": 2}])
        print(f"\nsilent subscriber loss found and repaired in {found:.2f}s")
        self.flushLoggedErrors()
