"""
Presence and push routing across nodes, with Redis as the bus.

L{ClusterPresence} wraps this node's local registry (any L{IPresence}):

* Presence: C{{p}:presence:{uid}} holds the connection that is logged in
  (C{node:incarnation:epoch}), written on login, removed on logout only if it
  is still ours, and kept alive by this node every third of its TTL
  (C{[server].presence_ttl_seconds}, default 30): a node that dies leaves no
  presence behind the TTL. The refresh also restores presences lost by a Redis restart.
* Routing: a push for a user not connected here goes, through Redis
  pub/sub, to the node that holds the user (one channel per node, binary
  msgpack). Pushes are gathered for one reactor turn and sent with one
  script call. If the user left or the node died meanwhile the push is
  simply lost: the message stays pending and is synced on reconnect.
* Kick: a login tells the node holding the user's previous connection to
  kick it (C{login_elsewhere}), whichever node that is.

If Redis is down, logins and local pushes work; cross-node pushes and kicks
wait for it (presences come back with the next refresh).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import msgpack
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from imserver.services.presence import IClientLink, IPresence
from imserver.storage.hot.interface import HotUnavailable
from imserver.storage.hot.redis import RedisHotStore, Subscription

KICK_LOGIN_ELSEWHERE = "login_elsewhere"
PRESENCE_TTL_MS = 30_000
REFRESH_CHUNK = 1000


@implementer(IPresence)
class ClusterPresence:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        local: IPresence,
        redis: RedisHotStore,
        node_id: int,
        ttl_seconds: float = PRESENCE_TTL_MS / 1000,
    ) -> None:
        self.ttl_ms = int(ttl_seconds * 1000)
        self._reactor = reactor
        self.registry = local
        self._redis = redis
        self.node = str(node_id)
        # Distinguishes this run of the node from earlier ones, so that a
        # stale kick never hits a new connection with a recycled epoch.
        self.incarnation = str(int(reactor.seconds() * 1000))
        self._values: dict[int, str] = {}  # uid -> our presence value
        self._outgoing: list[tuple[int, bytes]] = []
        self._flush_call: IDelayedCall | None = None
        self._refresh: LoopingCall | None = None
        self.subscription: Subscription | None = None
        # Read by metrics.
        self.routed = 0
        self.received = 0
        self.kicked_remotely = 0
        self.route_failures = 0

    def value(self, link: IClientLink) -> str:
        return f"{self.node}:{self.incarnation}:{link.epoch}"

    def start(self) -> None:
        self.subscription = self._redis.subscribe(self.node, self._on_message)
        self._refresh = LoopingCall(lambda: Deferred.fromCoroutine(self.refresh()))
        self._refresh.clock = self._reactor
        self._refresh.start(self.ttl_ms / 3000, now=False).addErrback(
            lambda f: self.log.failure("presence refresh loop stopped", f)
        )

    async def stop(self) -> None:
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        if self.subscription is not None:
            await self.subscription.stop()

    # -- IPresence ---------------------------------------------------------------

    def login(self, uid: int, link: IClientLink) -> Deferred[None]:
        async def login() -> None:
            await self.registry.login(uid, link)
            value = self.value(link)
            self._values[uid] = value
            try:
                await self._redis.presence_login(uid, value, self.ttl_ms)
            except HotUnavailable as e:
                # The refresh loop writes it once Redis answers again.
                self.log.warn("presence of {uid} not written: {error}", uid=uid, error=e)

        return Deferred.fromCoroutine(login())

    def logout(self, uid: int, link: IClientLink) -> None:
        if self.registry.local(uid) is not link:
            return
        self.registry.logout(uid, link)
        value = self._values.pop(uid, None)
        if value is not None:
            d = Deferred.fromCoroutine(self._redis.presence_logout(uid, value))
            d.addErrback(lambda f: None)  # the TTL removes it anyway

    def local(self, uid: int) -> IClientLink | None:
        return self.registry.local(uid)

    def push(self, uid: int, frame: Mapping[str, Any]) -> bool:
        link = self.registry.local(uid)
        if link is not None:
            link.push(frame)
            return True
        self._outgoing.append((uid, msgpack.packb(frame, use_bin_type=True)))
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)
        return False

    def links(self) -> Iterator[IClientLink]:
        return iter(self.registry.links())

    # -- routing -----------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_call = None
        pushes, self._outgoing = self._outgoing, []
        d = Deferred.fromCoroutine(self._route(pushes))
        d.addErrback(lambda f: self.log.failure("routing pushes failed", f))

    async def _route(self, pushes: list[tuple[int, bytes]]) -> None:
        try:
            self.routed += await self._redis.route(self.node, pushes)
        except HotUnavailable as e:
            # Lost pushes only: the messages stay pending for their recipients.
            self.route_failures += len(pushes)
            self.log.warn("{n} cross-node pushes lost: {error}", n=len(pushes), error=e)

    def _on_message(self, message: bytes) -> None:
        try:
            entries = msgpack.unpackb(message, raw=False)
        except Exception:
            self.log.warn("unreadable message on this node's channel")
            return
        for kind, uid_text, data in entries:
            uid = int(uid_text)
            link = self.registry.local(uid)
            if link is None:
                continue
            if kind == "p":
                self.received += 1
                link.push(msgpack.unpackb(data, raw=False))
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
                lost = await self._redis.presence_refresh(chunk, self.ttl_ms)
            except HotUnavailable:
                return
            for uid in lost:
                # Logged in elsewhere while the kick could not reach us.
                link = self.registry.local(uid)
                if link is not None:
                    link.kick(KICK_LOGIN_ELSEWHERE)

    def pubsub_state(self) -> str:
        """C{ok} while subscribed to this node's channel, else C{down}."""
        return "ok" if self.subscription is not None and self.subscription.subscribed else "down"
