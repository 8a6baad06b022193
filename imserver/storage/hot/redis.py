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
Calls go through the node's L{RedisConnection} (shared with the cluster
bus, L{imserver.storage.hot.bus.RedisBus}): bounded by a timeout and a
circuit breaker, failures become L{HotUnavailable}.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import msgpack
from twisted.logger import Logger
from zope.interface import implementer

from imserver.config import AnyRedisTarget
from imserver.storage.hot.connection import (
    RedisConnection,
    RedisScripts,
    pack,
    to_int,
    to_str,
)
from imserver.storage.hot.interface import (
    GONE_MS,
    LIVE_MS,
    STALE_MARGIN_MS,
    WINDOW_SIZE,
    IHotStore,
)
from imserver.storage.model import ConvRow, Message, Profile, UserSnapshot, chunks
from imserver.wire.codec import packb

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
)


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
    return packb([m.msg_id, m.session_id, m.sender, m.recipient, m.cid, m.type, m.body, m.ts])


def _from_record(blob: bytes) -> Message:
    msg_id, sid, sender, recipient, cid, kind, body, ts = msgpack.unpackb(blob, raw=False)
    return Message(msg_id, sid, sender, recipient, cid, kind, body, ts)


@implementer(IHotStore)
class RedisHotStore(RedisScripts):
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
        connection: RedisConnection | None = None,
    ) -> None:
        #: Shared with the cluster bus; started and stopped with this store.
        super().__init__(
            connection
            or RedisConnection(reactor, target, prefix=prefix, timeout=timeout, poolsize=poolsize),
            prefix,
            SCRIPTS,
        )
        self._reactor = reactor
        self.target = target
        self.message_ttl = message_ttl
        self.profile_ttl = profile_ttl
        self.window_size = window_size
        self.live_ms = live_ms

    @property
    def failures(self) -> int:
        """Failed Redis calls (read by metrics)."""
        return self.connection.failures

    async def start(self) -> None:
        await self.connection.start()

    async def stop(self) -> None:
        await self.connection.stop()

    def circuit_state(self) -> str | None:
        return self.connection.breaker.state

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
        await self._script("fanout", pack(payload))

    async def ack(self, acked: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> None:
        await self._script(
            "ack",
            pack([[str(uid), [[str(i), str(s)] for i, s in removed]] for uid, removed in acked]),
            str(GONE_MS),
        )

    async def recall(self, message: Message, row: ConvRow | None) -> None:
        await self._script(
            "recall",
            pack(
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
            await self._script("rows", pack([_row(r) for r in rows]))

    async def invalidate(
        self, uids: Sequence[int], session_ids: Sequence[int], msg_ids: Sequence[int] = ()
    ) -> None:
        stale_ms = self.live_ms + STALE_MARGIN_MS
        what = [[str(u) for u in uids], [str(s) for s in session_ids], [str(m) for m in msg_ids]]
        await self._script("invalidate", pack([*what, stale_ms]))

    async def load_begin(self, uid: int) -> str:
        token = os.urandom(8).hex()
        await self._script("load_begin", str(uid), token)
        return token

    async def load_finish(self, uid: int, token: str, snapshot: UserSnapshot) -> bool:
        payload = [
            [[str(i), str(s)] for i, s in snapshot.pending],
            [_row(r) for r in snapshot.convs],
        ]
        return bool(await self._script("load_finish", str(uid), token, pack(payload)))

    # -- reads -------------------------------------------------------------

    async def pending(
        self, uid: int, after: int, limit: int, sender: int | None
    ) -> list[tuple[int, int]] | None:
        flat = await self._script(
            "read_pending", str(uid), str(after), str(limit), "" if sender is None else str(sender)
        )
        if flat is None:
            return None
        return [(to_int(flat[i]), to_int(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def offline_summary(self, uid: int) -> list[tuple[int, int, int]] | None:
        flat = await self._script("read_summary", str(uid))
        if flat is None:
            return None
        return [
            (to_int(flat[i]), to_int(flat[i + 1]), to_int(flat[i + 2]))
            for i in range(0, len(flat), 3)
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
            (to_int(flat[i]), to_int(flat[i + 1]), to_int(flat[i + 2]), to_int(flat[i + 3]))
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
        return [to_int(i) for i in ids]

    async def last_in_windows(self, session_ids: Sequence[int]) -> dict[int, int]:
        if not session_ids:
            return {}
        flat = await self._script("read_last", pack([str(s) for s in session_ids]))
        return {to_int(flat[i]): to_int(flat[i + 1]) for i in range(0, len(flat), 2) if flat[i + 1]}

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
        flat = await self._script("profiles_get", pack([str(u) for u in uids]))
        return {
            to_int(flat[i]): Profile(
                to_int(flat[i]), to_str(flat[i + 1]), to_str(flat[i + 2]), to_int(flat[i + 3])
            )
            for i in range(0, len(flat), 4)
        }

    async def put_profiles(self, profiles: Sequence[Profile]) -> None:
        if profiles:
            await self._script(
                "profiles_put",
                pack([[str(p.uid), p.nickname, p.avatar, str(p.version)] for p in profiles]),
                str(self.profile_ttl),
            )
