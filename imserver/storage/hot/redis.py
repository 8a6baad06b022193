"""
The hot store on Redis (txredisapi), with the seed's key layout
(C{{p}} is C{[storage].key_prefix}; see docs/data-model.md):

    {p}:conv:{uid}                          zset  session_id -> last msg id
    {p}:session_list:{sid}                  zset  msg ids (window of the newest)
    {p}:offline_senders:{uid}               set   senders with pending messages
    {p}:offline_msg:{uid}:{sender}          zset  pending msg ids from that sender
    {p}:session_count:{sid}:{uid}           total messages received in the session
    {p}:session_read_count:{sid}:{uid}      how many of them are read
    {p}:session_ver:{sid}:{uid}             version of the two counters above
    {p}:user:{uid}                          hash  profile cache
    {p}:msg:{msg_id}                        message cache (msgpack, with a TTL)
    {p}:hot:{uid}                           the user's copy marker (lua/prelude.lua)

Each operation is one Lua script, so one round trip, whatever it touches.
Every call is bounded by a timeout (txredisapi would wait forever for a
command issued while Redis is down) and failures become L{HotUnavailable}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import msgpack
import txredisapi
from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger
from zope.interface import implementer

from imserver.config import AnyRedisTarget
from imserver.storage.hot.connect import connect_pool, connect_subscriber
from imserver.storage.hot.interface import (
    GONE_MS,
    LIVE_MS,
    WINDOW_SIZE,
    HotUnavailable,
    IHotStore,
)
from imserver.storage.model import ConvRow, Message, Profile, UserSnapshot, chunks

SCRIPTS = (
    "fanout",
    "ack",
    "recall",
    "rows",
    "invalidate",
    "load_begin",
    "load_finish",
    "read_pending",
    "read_summary",
    "read_convs",
    "read_last",
    "profiles_get",
    "profiles_put",
    "presence_login",
    "presence_logout",
    "presence_refresh",
    "presence_route",
)


def load_scripts() -> dict[str, bytes]:
    lua = resources.files("imserver.storage.hot").joinpath("lua")
    prelude = lua.joinpath("prelude.lua").read_text("utf-8")
    return {
        name: (prelude + "\n" + lua.joinpath(f"{name}.lua").read_text("utf-8")).encode()
        for name in SCRIPTS
    }


def _pack(obj: Any) -> bytes:
    """A script argument: Redis's cmsgpack has no bin type, so bytes go as raw strings."""
    data: bytes = msgpack.packb(obj, use_bin_type=False)
    return data


def _row(row: ConvRow) -> list[str]:
    return [
        str(row.uid),
        str(row.session_id),
        str(row.last_msg_id),
        str(row.total),
        str(row.read),
        str(row.version),
    ]


def _record(m: Message) -> bytes:
    """The cached message: opaque to the scripts, read back only by Python."""
    data: bytes = msgpack.packb(
        [m.msg_id, m.session_id, m.sender, m.recipient, m.cid, m.type, m.body, m.ts],
        use_bin_type=True,
    )
    return data


def _from_record(blob: bytes) -> Message:
    msg_id, sid, sender, recipient, cid, kind, body, ts = msgpack.unpackb(blob, raw=False)
    return Message(msg_id, sid, sender, recipient, cid, kind, body, ts)


def _int(value: Any) -> int:
    if isinstance(value, bytes):
        value = value.decode()
    return int(value) if not isinstance(value, str) or "." not in value else int(float(value))


def _str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@implementer(IHotStore)
class RedisHotStore:
    kind = "redis"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        target: AnyRedisTarget,
        prefix: str,
        *,
        timeout: float = 2.0,
        poolsize: int = 4,
        message_ttl: int = 600,
        profile_ttl: int = 3600,
        window_size: int = WINDOW_SIZE,
        live_ms: int = LIVE_MS,
    ) -> None:
        self._reactor = reactor
        self.target = target
        self.prefix = prefix
        self.timeout = timeout
        self.poolsize = poolsize
        self.message_ttl = message_ttl
        self.profile_ttl = profile_ttl
        self.window_size = window_size
        self.live_ms = live_ms
        self._scripts = load_scripts()
        self._redis: Any = None
        # Read by metrics.
        self.failures = 0

    async def start(self) -> None:
        # Plain or Sentinel; reconnects within a second (imserver/storage/hot/connect.py).
        self._redis = connect_pool(
            self._reactor,
            self.target,
            prefix=self.prefix,
            poolsize=self.poolsize,
            timeout=self.timeout,
        )

    async def stop(self) -> None:
        if self._redis is not None:
            redis, self._redis = self._redis, None
            await redis.disconnect()

    async def _call(self, d: Deferred[Any]) -> Any:
        d.addTimeout(self.timeout, self._reactor)
        try:
            return await d
        except (txredisapi.RedisError, TimeoutError, OSError) as e:
            self.failures += 1
            if isinstance(e, txredisapi.ResponseError):
                self.log.error("redis refused a command: {error}", error=e)
            raise HotUnavailable(f"redis: {e.__class__.__name__}: {e}") from e

    async def _script(self, name: str, *args: Any) -> Any:
        if self._redis is None:
            raise HotUnavailable("redis is not connected")
        return await self._call(self._redis.eval(self._scripts[name], [], [self.prefix, *args]))

    async def ping(self) -> None:
        if self._redis is None:
            raise HotUnavailable("redis is not connected")
        await self._call(self._redis.ping())

    async def command(self, *args: Any) -> Any:
        """A raw command (tests, admin)."""
        if self._redis is None:
            raise HotUnavailable("redis is not connected")
        return await self._call(self._redis.execute_command(*args))

    # -- writes ------------------------------------------------------------

    async def fanout(
        self, messages: Sequence[tuple[Message, int]], rows: Sequence[ConvRow]
    ) -> None:
        now_ms = int(self._reactor.seconds() * 1000)
        payload = [
            now_ms,
            self.message_ttl,
            self.window_size,
            self.live_ms,
            GONE_MS,
            [
                [str(m.msg_id), str(m.session_id), str(m.sender), str(m.recipient), age, _record(m)]
                for m, age in messages
            ],
            [_row(r) for r in rows],
        ]
        await self._script("fanout", _pack(payload))

    async def ack(self, acked: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> None:
        await self._script(
            "ack",
            _pack([[str(uid), [[str(i), str(s)] for i, s in removed]] for uid, removed in acked]),
            str(GONE_MS),
        )

    async def recall(self, message: Message, row: ConvRow | None) -> None:
        await self._script(
            "recall",
            _pack(
                [
                    str(message.msg_id),
                    str(message.session_id),
                    str(message.sender),
                    str(message.recipient),
                    _row(row) if row is not None else None,
                ]
            ),
            str(GONE_MS),
        )

    async def apply_rows(self, rows: Sequence[ConvRow]) -> None:
        if rows:
            await self._script("rows", _pack([_row(r) for r in rows]))

    async def invalidate(
        self, uids: Sequence[int], session_ids: Sequence[int], msg_ids: Sequence[int] = ()
    ) -> None:
        await self._script(
            "invalidate",
            _pack(
                [[str(u) for u in uids], [str(s) for s in session_ids], [str(m) for m in msg_ids]]
            ),
        )

    async def load_begin(self, uid: int) -> str:
        token = os.urandom(8).hex()
        await self._script("load_begin", str(uid), token)
        return token

    async def load_finish(self, uid: int, token: str, snapshot: UserSnapshot) -> bool:
        payload = [
            [[str(i), str(s)] for i, s in snapshot.pending],
            [_row(r) for r in snapshot.convs],
        ]
        return bool(await self._script("load_finish", str(uid), token, _pack(payload)))

    # -- reads -------------------------------------------------------------

    async def pending(
        self, uid: int, after: int, limit: int, sender: int | None
    ) -> list[tuple[int, int]] | None:
        flat = await self._script(
            "read_pending", str(uid), str(after), str(limit), "" if sender is None else str(sender)
        )
        if flat is None:
            return None
        return [(_int(flat[i]), _int(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def offline_summary(self, uid: int) -> list[tuple[int, int, int]] | None:
        flat = await self._script("read_summary", str(uid))
        if flat is None:
            return None
        return [
            (_int(flat[i]), _int(flat[i + 1]), _int(flat[i + 2])) for i in range(0, len(flat), 3)
        ]

    async def convs(
        self, uid: int, before: int | None, limit: int
    ) -> list[tuple[int, int, int, int]] | None:
        flat = await self._script(
            "read_convs", str(uid), "" if before is None else str(before), str(limit)
        )
        if flat is None:
            return None
        return [
            (_int(flat[i]), _int(flat[i + 1]), _int(flat[i + 2]), _int(flat[i + 3]))
            for i in range(0, len(flat), 4)
        ]

    async def window(self, session_id: int, before: int | None, limit: int) -> list[int]:
        top = "+inf" if before is None else f"({before}"
        ids = await self.command(
            "ZREVRANGEBYSCORE",
            f"{self.prefix}:session_list:{session_id}",
            top,
            "-inf",
            "LIMIT",
            0,
            limit,
        )
        return [_int(i) for i in ids]

    async def last_in_windows(self, session_ids: Sequence[int]) -> dict[int, int]:
        if not session_ids:
            return {}
        flat = await self._script("read_last", _pack([str(s) for s in session_ids]))
        return {_int(flat[i]): _int(flat[i + 1]) for i in range(0, len(flat), 2) if flat[i + 1]}

    async def messages(self, msg_ids: Sequence[int]) -> dict[int, Message]:
        out: dict[int, Message] = {}
        for part in chunks(msg_ids, 500):
            blobs = await self.command("MGET", *(f"{self.prefix}:msg:{i}" for i in part))
            for blob in blobs:
                if blob:
                    message = _from_record(blob)
                    out[message.msg_id] = message
        return out

    async def profiles(self, uids: Sequence[int]) -> dict[int, Profile]:
        if not uids:
            return {}
        flat = await self._script("profiles_get", _pack([str(u) for u in uids]))
        return {
            _int(flat[i]): Profile(
                _int(flat[i]), _str(flat[i + 1]), _str(flat[i + 2]), _int(flat[i + 3])
            )
            for i in range(0, len(flat), 4)
        }

    async def put_profiles(self, profiles: Sequence[Profile]) -> None:
        if profiles:
            await self._script(
                "profiles_put",
                _pack([[str(p.uid), p.nickname, p.avatar, str(p.version)] for p in profiles]),
                str(self.profile_ttl),
            )

    # -- presence and routing (see imserver.services.cluster) -----------------

    async def presence_login(self, entries: Sequence[tuple[int, str]], ttl_ms: int) -> int:
        """
        Claim the presences of (uid, value) pairs; the nodes that held them
        are told to kick their connections. How many kicks went out.
        """
        packed = _pack([[str(uid), value] for uid, value in entries])
        return int(await self._script("presence_login", str(ttl_ms), packed))

    async def presence_get(self, uid: int) -> str | None:
        """The user's presence (C{node:incarnation:epoch}), if online anywhere."""
        value = await self.command("GET", f"{self.prefix}:presence:{uid}")
        return None if value is None else _str(value)

    async def presence_logout(self, entries: Sequence[tuple[int, str]]) -> None:
        """Forget the presences of (uid, value) pairs that are still those values."""
        await self._script("presence_logout", _pack([[str(uid), value] for uid, value in entries]))

    async def presence_refresh(self, entries: Sequence[tuple[int, str]], ttl_ms: int) -> list[int]:
        """Extend (or restore) presences; the uids now held by another connection."""
        lost = await self._script(
            "presence_refresh", str(ttl_ms), _pack([[str(uid), value] for uid, value in entries])
        )
        return [_int(uid) for uid in lost]

    async def route(self, node: str, pushes: Sequence[tuple[int, bytes]]) -> int:
        """Publish pushes to the nodes holding their users; how many went out."""
        return int(
            await self._script("presence_route", node, _pack([[str(u), f] for u, f in pushes]))
        )

    async def broadcast(self, message: bytes) -> None:
        """Publish to every node (the channel all of them listen on besides their own)."""
        await self.command("PUBLISH", f"{self.prefix}:nodes", message)

    def subscribe(self, node: str, on_message: Callable[[bytes], None]) -> Subscription:
        """
        Listen on this node's channel and on the one every node hears
        (resubscribing after every reconnect).
        """
        channels = (f"{self.prefix}:node:{node}", f"{self.prefix}:nodes")
        subscription = Subscription(self._reactor, self.target, channels, on_message)
        subscription.start()
        return subscription


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    """Subscribes in connectionMade, so a reconnect subscribes again."""

    subscription: Subscription

    def connectionMade(self) -> Deferred[None]:
        d: Deferred[None] = super().connectionMade()
        d.addCallback(lambda _: self.subscribe(list(self.subscription.channels)))
        d.addCallbacks(lambda _: self.subscription._subscribed(self), self.subscription._failed)
        return d

    def connectionLost(self, reason: Any) -> None:
        self.subscription._lost(self)
        super().connectionLost(reason)

    def messageReceived(self, pattern: Any, channel: Any, message: bytes) -> None:
        self.subscription.on_message(message)


class Subscription:
    """
    Pub/sub channels, kept subscribed across Redis restarts (txredisapi
    reconnects the connection but does not subscribe again by itself).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        target: AnyRedisTarget,
        channels: Sequence[str],
        on_message: Callable[[bytes], None],
    ) -> None:
        self._reactor = reactor
        self.target = target
        self.channels = tuple(channels)
        self.on_message = on_message
        self._factory: Any = None
        self._protocol: Any = None
        #: Read by health and metrics.
        self.subscribed = False
        self.resubscriptions = 0

    def start(self) -> None:
        subscription = self

        class Protocol(_SubscriberProtocol):
            pass

        Protocol.subscription = subscription
        self._factory = connect_subscriber(self._reactor, self.target, Protocol)

    def _subscribed(self, protocol: Any) -> None:
        self._protocol = protocol
        if self.resubscriptions:
            self.log.info("resubscribed to {channels}", channels=", ".join(self.channels))
        self.resubscriptions += 1
        self.subscribed = True

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

    async def stop(self) -> None:
        if self._factory is not None:
            factory, self._factory = self._factory, None
            self._protocol = None  # a loss we asked for: nothing to warn about
            self.subscribed = False
            await factory.disconnect()
