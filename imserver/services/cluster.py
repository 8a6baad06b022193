"""
Presence and push routing across nodes, with Redis as the bus.

L{ClusterPresence} wraps this node's local registry (any L{IPresence}):

* Presence: C{{p}:presence:{uid}} holds the connection that is logged in
  (C{node:incarnation:epoch}), written on login, removed on logout only if it
  is still ours (the logins, and the logouts, of one reactor turn share one
  script call: a reconnect storm is thousands at once), and kept alive by
  this node every third of its TTL (C{[server].presence_ttl_seconds},
  default 30): a node that dies leaves no presence behind the TTL. The
  refresh also restores presences lost by a Redis restart.
* Routing: a push for a user not connected here goes, through Redis
  pub/sub, to the node that holds the user (one channel per node, binary
  msgpack). Pushes are gathered for one reactor turn and sent with one
  script call. If the user left or the node died meanwhile the push is
  simply lost: the message stays pending and is synced on reconnect.
* Profiles: a node that changes a profile publishes it on the channel every
  node hears, so their in-process profile caches never show an old one.
* Kick: a login tells the node holding the user's previous connection to
  kick it (C{login_elsewhere}), whichever node that is.
* Recovery: when Redis loses its data (FLUSHALL, a restart without
  persistence) the bus's generation changes; every node notices within a
  second (at once if it routes a push or hears another node tell it), and
  restores its presences at once. Pushes lost meanwhile cannot be found
  again, so every user connected to the node is told C{{"t": "sync"}}; the
  same after a resubscription (pushes published while the node was not
  subscribed are gone) and, for the recipients of pushes that could not be
  routed, when Redis answers again after an outage.

If Redis is down, logins and local pushes work; cross-node pushes and kicks
wait for it (presences are restored as soon as it answers again).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import msgpack
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imserver.batching import Batcher, QueueFull
from imserver.errors import Unavailable
from imserver.periodic import Periodic
from imserver.services.presence import KICK_LOGIN_ELSEWHERE, IClientLink, IPresence
from imserver.storage.hot.interface import (
    HotUnavailable,
    IClusterBus,
    ISubscription,
)
from imserver.storage.model import Profile

__all__ = ["KICK_LOGIN_ELSEWHERE", "SYNC_PUSH", "ClusterPresence"]

PRESENCE_TTL_MS = 30_000
REFRESH_CHUNK = 1000
#: How often the bus's generation is checked (a FLUSHALL disconnects nobody).
GENERATION_SECONDS = 1.0
#: The pub/sub self-check (see L{ClusterPresence._check_pubsub}): a node
#: whose probes have not come back for this long re-creates its subscriber
#: connection...
PUBSUB_ECHO_SECONDS = 3
#: ...and one that is not subscribed again this long after losing its
#: subscription, while Redis answers.
PUBSUB_STUCK_SECONDS = 5
#: Recipients of unroutable pushes remembered for a sync push; beyond it
#: every local user is told to sync.
MAX_UNROUTED = 100_000
#: Pushed to a connected user who may have missed pushes: sync now.
SYNC_PUSH: Mapping[str, Any] = {"t": "sync"}


@implementer(IPresence)
class ClusterPresence:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        local: IPresence,
        bus: IClusterBus,
        node_id: int,
        ttl_seconds: float = PRESENCE_TTL_MS / 1000,
    ) -> None:
        self.ttl_ms = int(ttl_seconds * 1000)
        self._reactor = reactor
        self.registry = local
        self._redis = bus
        self.node = str(node_id)
        # Distinguishes this run of the node from earlier ones, so that a
        # stale kick never hits a new connection with a recycled epoch.
        self.incarnation = str(int(reactor.seconds() * 1000))
        self._values: dict[int, str] = {}  # uid -> our presence value
        self._outgoing: list[tuple[int, bytes]] = []
        self._flush_call: IDelayedCall | None = None
        # Presence writes of one reactor turn share one script call: a
        # reconnect storm is thousands of logins (and logouts) at once.
        self._logins: Batcher[tuple[int, str], None] = Batcher(
            "presence logins", self._login_batch, max_batch=REFRESH_CHUNK, gather=reactor
        )
        self._logouts: Batcher[tuple[int, str], None] = Batcher(
            "presence logouts", self._logout_batch, max_batch=REFRESH_CHUNK, gather=reactor
        )
        self._refresh = Periodic(reactor, self.ttl_ms / 3000, self.refresh, "presence refresh")
        self._generation_check = Periodic(
            reactor, GENERATION_SECONDS, self._check_generation, "generation check"
        )
        #: The bus's generation last seen (None: not known yet).
        self.generation: str | None = None
        self._unrouted: set[int] = set()
        self._unrouted_overflow = False
        self._everyone_pending = False
        self._recovering = False
        self._recover_again: str | None = None
        # Set by stop: a heartbeat in flight, Redis answering again or a
        # resubscription must not start work (a subscriber nobody stops).
        self._stopped = False
        self.subscription: ISubscription | None = None
        # The self-check's probes carry this, so that only ours count.
        self._probe_id = secrets.token_hex(8)
        self._probes = 0
        self._echo_at = 0.0
        self._subscribed_at = 0.0
        self._unsubscribed_since: float | None = None
        # Read by metrics.
        self.routed = 0
        self.received = 0
        self.kicked_remotely = 0
        self.route_failures = 0
        self.profiles_received = 0
        self.data_losses = 0
        self.sync_pushes = 0
        #: Self-checks that found the subscription useless (re-created).
        self.pubsub_failures = 0
        #: Called with each profile changed on a node (this one included).
        self.on_profile: Callable[[Profile], None] | None = None

    def value(self, link: IClientLink) -> str:
        return f"{self.node}:{self.incarnation}:{link.epoch}"

    def start(self) -> None:
        self.subscription = self._redis.subscribe(self.node, self._on_message, self._subscribed)
        self._redis.when_back(lambda: self._recover("redis answers again"))
        self._refresh.start()
        self._generation_check.start(now=True)

    async def stop(self) -> None:
        self._stopped = True
        # The ticks in flight finish before the subscription stops.
        await self._refresh.stop()
        await self._generation_check.stop()
        # Logouts of the last turn (clients leaving at shutdown).
        await self._logouts.idle()
        if self.subscription is not None:
            await self.subscription.stop()

    # -- IPresence ---------------------------------------------------------------

    def login(self, uid: int, link: IClientLink) -> Deferred[None]:
        async def login() -> None:
            await self.registry.login(uid, link)
            value = self.value(link)
            self._values[uid] = value
            try:
                await self._logins.submit((uid, value))
            except QueueFull:
                self.log.warn("presence of {uid} not written: too many logins", uid=uid)

        return Deferred.fromCoroutine(login())

    async def _login_batch(self, entries: Sequence[tuple[int, str]]) -> list[None]:
        try:
            self._saw(await self._redis.presence_login(entries, self.ttl_ms))
        except HotUnavailable as e:
            # Written by the recovery once Redis answers again.
            if self._redis.state() == "ok":
                self.log.warn(
                    "presence of {n} logins not written: {error}", n=len(entries), error=e
                )
        return [None] * len(entries)

    def logout(self, uid: int, link: IClientLink) -> None:
        if self.registry.local(uid) is not link:
            return
        self.registry.logout(uid, link)
        value = self._values.pop(uid, None)
        if value is None:
            return
        try:
            # Never fails: _logout_batch handles its errors.
            self._logouts.submit((uid, value))
        except QueueFull:
            pass  # the TTL removes it

    async def _logout_batch(self, entries: Sequence[tuple[int, str]]) -> list[None]:
        try:
            await self._redis.presence_logout(entries)
        except HotUnavailable:
            pass  # the TTL removes them anyway
        except Exception:
            self.log.failure("forgetting {n} presences failed", Failure(), n=len(entries))
        return [None] * len(entries)

    def local(self, uid: int) -> IClientLink | None:
        return self.registry.local(uid)

    def push(self, uid: int, frame: Mapping[str, Any]) -> bool:
        if self.registry.push(uid, frame):
            return True
        self._outgoing.append((uid, msgpack.packb(frame, use_bin_type=True)))
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)
        return False

    def links(self) -> Iterator[IClientLink]:
        return iter(self.registry.links())

    def share_profile(self, profile: Profile) -> None:
        message = msgpack.packb(
            [
                [
                    "u",
                    str(profile.uid),
                    msgpack.packb([profile.nickname, profile.avatar, profile.version]),
                ]
            ],
            use_bin_type=True,
        )
        d = Deferred.fromCoroutine(self._redis.broadcast(message))
        d.addErrback(self._profile_not_shared, profile.uid)

    def _profile_not_shared(self, failure: Failure, uid: int) -> None:
        # The other nodes' send paths keep their copy until its TTL (10 s).
        if failure.check(HotUnavailable):
            self.log.warn("profile of {uid} not shared: {error}", uid=uid, error=failure.value)
        else:
            self.log.failure("sharing the profile of {uid} failed", failure, uid=uid)

    def online(self, uid: int) -> Deferred[bool]:
        async def online() -> bool:
            if self.registry.local(uid) is not None:
                return True
            try:
                return await self._redis.presence_get(uid) is not None
            except HotUnavailable as e:
                raise Unavailable(f"presence is unknown while Redis is down: {e}") from None

        return Deferred.fromCoroutine(online())

    # -- routing -----------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_call = None
        pushes, self._outgoing = self._outgoing, []
        d = Deferred.fromCoroutine(self._route(pushes))
        d.addErrback(lambda f: self.log.failure("routing pushes failed", f))

    async def _route(self, pushes: list[tuple[int, bytes]]) -> None:
        try:
            sent, generation = await self._redis.route(self.node, pushes)
        except HotUnavailable as e:
            # Lost pushes: the messages stay pending, and their recipients
            # are told to sync once Redis answers again.
            self.route_failures += len(pushes)
            if len(self._unrouted) < MAX_UNROUTED:
                self._unrouted.update(uid for uid, _ in pushes)
            else:
                self._unrouted_overflow = True
            if self._redis.state() == "ok":
                self.log.warn("{n} cross-node pushes lost: {error}", n=len(pushes), error=e)
            return
        self.routed += sent
        self._saw(generation)

    def _on_message(self, message: bytes) -> None:
        # Lua's cmsgpack packs every string as "str", and push frames are
        # binary msgpack (not UTF-8): unpack raw and decode the text fields.
        try:
            entries = [_entry(*entry) for entry in msgpack.unpackb(message, raw=True)]
        except Exception as e:
            self.log.warn("unreadable message on this node's channel: {error!r}", error=e)
            return
        for kind, uid, data in entries:
            if kind == "h":
                if data == self._probe_id:
                    self._echo_at = self._reactor.seconds()
                continue
            if kind == "g":
                # Another node found the bus's data lost: check now.
                self._recover("told by another node")
                continue
            if kind == "u":
                self.profiles_received += 1
                if self.on_profile is not None:
                    self.on_profile(data)
                continue
            link = self.registry.local(uid)
            if link is None:
                continue
            if kind == "p":
                self.received += 1
                link.push(data)
            elif kind == "k" and data == self._values.get(uid):
                self.kicked_remotely += 1
                link.kick(KICK_LOGIN_ELSEWHERE)

    # -- presence refresh ---------------------------------------------------------

    async def refresh(self) -> None:
        """Extend the presence of every local user (restoring lost ones)."""
        entries = [
            (uid, value)
            for uid, value in list(self._values.items())
            if self.registry.local(uid) is not None
        ]
        for i in range(0, len(entries), REFRESH_CHUNK):
            chunk = entries[i : i + REFRESH_CHUNK]
            try:
                lost, generation = await self._redis.presence_refresh(chunk, self.ttl_ms)
            except HotUnavailable:
                return
            self._saw(generation)
            for uid in lost:
                # Logged in elsewhere while the kick could not reach us.
                link = self.registry.local(uid)
                if link is not None:
                    link.kick(KICK_LOGIN_ELSEWHERE)

    # -- recovery -------------------------------------------------------------------

    def _saw(self, generation: str | None) -> None:
        """A generation a script returned: a change means Redis lost its data."""
        if generation is not None and generation == self.generation:
            return
        if generation is not None and self.generation is None and not self._recovering:
            self.generation = generation
            return
        self._recover("the bus's generation changed")

    async def _check_generation(self) -> None:
        """The generation and the pub/sub self-check: one script call a second."""
        try:
            current, receivers = await self._redis.heartbeat(
                secrets.token_hex(8), self.node, self._probe()
            )
        except HotUnavailable:
            # Checked again when Redis answers, from then on: no probe is
            # published meanwhile, and only time Redis answers counts
            # towards a reconnect stuck.
            self._echo_at = self._reactor.seconds()
            self._unsubscribed_since = None
            return
        self._saw(current)
        self._check_pubsub(receivers)

    def _probe(self) -> bytes:
        """A message for this node's own channel that only this node counts."""
        self._probes += 1
        probe: bytes = msgpack.packb(
            [["h", str(self._probes), self._probe_id.encode()]], use_bin_type=True
        )
        return probe

    def _check_pubsub(self, receivers: int) -> None:
        """
        Whatever the subscription believes, a node must hear its own
        channel, or pushes from other nodes miss its users without anything
        saying so: the probe it just published reached no subscriber (the
        connection was killed without us noticing: a NAT, a proxy, a server
        that lost it), or its probes do not come back (what we hear is not
        what is published), or a lost subscription is not made again while
        Redis answers (a reconnect stuck somewhere). Then the subscriber
        connection is dropped and made again, and the users are told to
        sync once it is (as after any resubscription).
        """
        subscription = self.subscription
        if subscription is None:
            return
        now = self._reactor.seconds()
        if not subscription.subscribed:
            # Its own reconnect is on it; unless that takes too long.
            if self._unsubscribed_since is None:
                self._unsubscribed_since = now
            elif now - self._unsubscribed_since >= PUBSUB_STUCK_SECONDS:
                self._pubsub_failed(
                    f"not subscribed again after {now - self._unsubscribed_since:.0f}s "
                    "while redis answers"
                )
            return
        self._unsubscribed_since = None
        if receivers == 0:
            self._pubsub_failed("a probe published to this node's channel reached no subscriber")
        elif now - max(self._echo_at, self._subscribed_at) >= PUBSUB_ECHO_SECONDS:
            self._pubsub_failed(
                f"no probe came back on this node's channel for "
                f"{now - max(self._echo_at, self._subscribed_at):.0f}s"
            )

    def _pubsub_failed(self, reason: str) -> None:
        if self.subscription is None or self._stopped:
            return
        self.pubsub_failures += 1
        self.log.warn(
            "pub/sub self-check of node {node}: {reason}; pushes from other nodes may be "
            "missing: re-creating the subscriber connection (its users will be told to sync)",
            node=self.node,
            reason=reason,
        )
        self._unsubscribed_since = None
        self.subscription.restart()

    def _subscribed(self, again: bool) -> None:
        self._subscribed_at = self._reactor.seconds()
        self._unsubscribed_since = None
        if again:
            # Whatever was published to this node meanwhile is lost.
            self._everyone_pending = True
            self._recover("resubscribed")

    def _recover(self, reason: str) -> None:
        """Start a recovery (or run one more after the one running)."""
        if self._stopped:
            return
        if self._recovering:
            self._recover_again = reason
            return
        self._recovering = True
        d = Deferred.fromCoroutine(self._recovery(reason))
        d.addErrback(lambda f: self.log.failure("cluster recovery failed", f))
        d.addBoth(self._recovered)

    def _recovered(self, _: object) -> None:
        self._recovering = False
        again, self._recover_again = self._recover_again, None
        if again is not None:
            self._recover(again)

    async def _recovery(self, reason: str) -> None:
        """
        Check the generation, restore this node's presences at once, and
        tell the users who may have missed pushes to sync: every local user
        if Redis lost its data or this node was not subscribed for a while,
        else the recipients of pushes that could not be routed.
        """
        try:
            current = await self._redis.generation(secrets.token_hex(8))
        except HotUnavailable:
            return  # started again when Redis answers
        previous, self.generation = self.generation, current
        lost = previous is not None and previous != current
        everyone = lost or self._everyone_pending or self._unrouted_overflow
        self._everyone_pending = False
        if lost:
            self.data_losses += 1
            # The other nodes check at once instead of within a second.
            try:
                await self._redis.broadcast(msgpack.packb([["g", "0", b""]], use_bin_type=True))
            except HotUnavailable:
                pass
        await self.refresh()
        unrouted, self._unrouted = self._unrouted, set()
        self._unrouted_overflow = False
        told = 0
        for uid in unrouted:
            # Recipients on other nodes (or on none: then the push goes nowhere).
            if not everyone or self.registry.local(uid) is None:
                self.push(uid, SYNC_PUSH)
                told += 1
        if everyone:
            for link in list(self.registry.links()):
                link.push(SYNC_PUSH)
                told += 1
            if lost:
                self.log.warn(
                    "redis lost its data: node {node} restored {presences} presences at once "
                    "(pub/sub {pubsub}) and told {told} users to sync",
                    node=self.node,
                    presences=len(self._values),
                    pubsub=self.pubsub_state(),
                    told=told,
                )
            else:
                self.log.warn("{reason}: told {told} users to sync", reason=reason, told=told)
        elif told:
            self.log.warn(
                "{reason}: restored {presences} presences; told {told} users whose "
                "pushes were lost to sync",
                reason=reason,
                presences=len(self._values),
                told=told,
            )
        self.sync_pushes += told

    def pubsub_state(self) -> str:
        """C{ok} while subscribed to this node's channel, else C{down}."""
        return "ok" if self.subscription is not None and self.subscription.subscribed else "down"


def _entry(kind: bytes, uid: bytes, data: bytes) -> tuple[str, int, Any]:
    """
    One entry of a channel message: (C{p}, uid, push frame), (C{k}, uid,
    presence), (C{u}, uid, profile), (C{g}, 0, empty): the bus lost its data,
    or (C{h}, 0, a node's probe id): a node's self-check probe.
    """
    if kind == b"g":
        return "g", 0, None
    if kind == b"h":
        return "h", 0, data.decode()
    if kind == b"u":
        nickname, avatar, version = msgpack.unpackb(data, raw=False)
        return "u", int(uid), Profile(int(uid), str(nickname), str(avatar), int(version))
    if kind == b"p":
        frame = msgpack.unpackb(data, raw=False)
        if not isinstance(frame, dict):
            raise ValueError(f"a push frame must be a map, not {type(frame).__name__}")
        return "p", int(uid), frame
    if kind == b"k":
        return "k", int(uid), data.decode()
    raise ValueError(f"unknown entry kind {kind!r}")
