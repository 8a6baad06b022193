"""
The cluster bus on Redis: presences, pushes routed between nodes,
broadcasts and the data's generation (see L{IClusterBus} and
L{imserver.services.cluster}). It shares the node's L{RedisConnection} (and
so its circuit breaker) with the hot index:

    {p}:devices:{uid}       hash: device -> conn|since_ms|active_ms|expires_ms, the
                            user's connected devices (conn = node:incarnation:epoch,
                            since = connected_at, active = Redis ms of the last
                            request, expires = Redis ms it is gone unless refreshed);
                            expired fields count as absent; the key has a TTL too
    {p}:generation          set once by the first node to find it missing
    {p}:node:{node}         channel: for that node: pushes, kicks (with a nonce),
                            kick confirmations, join/leave notices of users it holds
    {p}:nodes               channel: what every node hears (profiles, generation changes)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgpack
from zope.interface import implementer

from imserver.storage.hot.connection import (
    CLOSED,
    RedisConnection,
    RedisScripts,
    Subscription,
    pack,
    to_int,
    to_str,
)
from imserver.storage.hot.interface import IClusterBus, LoginAnswer, LoginEntry

SCRIPTS = (
    "bus_generation",
    "bus_heartbeat",
    "presence_devices",
    "presence_kick",
    "presence_login",
    "presence_logout",
    "presence_active",
    "presence_refresh",
    "presence_route",
)


def _unpack(value: bytes) -> Any:
    """A script's msgpack answer (a Lua empty table may come as a map: use C{or ()})."""
    return msgpack.unpackb(value, raw=False)


def _generation(value: Any) -> str | None:
    return None if value is None else to_str(value)


@implementer(IClusterBus)
class RedisBus(RedisScripts):
    def __init__(self, connection: RedisConnection, prefix: str) -> None:
        super().__init__(connection, prefix, SCRIPTS)

    async def generation(self, fresh: str) -> str:
        return to_str(await self._script("bus_generation", fresh))

    async def heartbeat(self, fresh: str, node: str, probe: bytes) -> tuple[str, int]:
        generation, receivers = await self._script("bus_heartbeat", fresh, node, probe)
        return to_str(generation), to_int(receivers)

    async def presence_login(
        self,
        node: str,
        nonce: str,
        entries: Sequence[LoginEntry],
        ttl_ms: int,
        max_online: int,
        replay: bool = False,
    ) -> tuple[list[LoginAnswer], str | None, int]:
        answers, now, *generation = await self._script(
            "presence_login",
            str(ttl_ms),
            str(max_online),
            node,
            nonce,
            pack([[str(u), d, c, str(s), str(i)] for u, d, c, s, i in entries]),
            "1" if replay else "0",
        )
        return (
            [
                (
                    [(d, c, r, t) for d, c, r, t in kicks or ()],
                    list(others or ()),
                    list(joins or ()),
                )
                for kicks, others, joins in _unpack(answers)
            ],
            _generation(generation[0] if generation else None),
            to_int(now),
        )

    async def presence_devices(self, uid: int) -> list[tuple[str, str, int]]:
        return (await self.presence_devices_many([uid]))[0]

    async def presence_devices_many(self, uids: Sequence[int]) -> list[list[tuple[str, str, int]]]:
        answers = _unpack(await self._script("presence_devices", *[str(u) for u in uids]))
        return [[(d, c, int(s)) for d, c, s in rows or ()] for rows in answers or ()]

    async def presence_logout(
        self, node: str, entries: Sequence[tuple[int, str, str]]
    ) -> tuple[list[int], int]:
        now, nobody = await self._script(
            "presence_logout", node, pack([[str(u), d, c] for u, d, c in entries])
        )
        return [int(uid) for uid in nobody or ()], to_int(now)

    async def presence_active(self, entries: Sequence[tuple[int, str, str, int]]) -> int:
        written = await self._script(
            "presence_active", pack([[str(u), d, c, str(i)] for u, d, c, i in entries])
        )
        return to_int(written)

    async def presence_refresh(
        self, node: str, entries: Sequence[LoginEntry], ttl_ms: int
    ) -> tuple[list[tuple[int, str, str]], dict[int, set[str]], str | None]:
        generation, packed = await self._script(
            "presence_refresh",
            str(ttl_ms),
            node,
            pack([[str(u), d, c, str(s), str(i)] for u, d, c, s, i in entries]),
        )
        lost, shared = _unpack(packed)
        return (
            [(int(u), d, c) for u, d, c in lost or ()],
            {int(row[0]): set(row[1:]) for row in shared or ()},
            _generation(generation),
        )

    async def presence_kick(
        self, uid: int, device: str, reason: str, node: str, nonce: str
    ) -> str | None:
        conn = await self._script("presence_kick", str(uid), device, reason, node, nonce)
        return None if conn is None else to_str(conn)

    async def route(
        self, node: str, pushes: Sequence[tuple[int, bytes, str]]
    ) -> tuple[int, str | None]:
        sent, generation = await self._script(
            "presence_route", node, pack([[str(u), f, x] for u, f, x in pushes])
        )
        return to_int(sent), _generation(generation)

    async def send(self, node: str, message: bytes) -> None:
        await self.connection.command("PUBLISH", f"{self.prefix}:node:{node}", message)

    async def broadcast(self, message: bytes) -> None:
        await self.connection.command("PUBLISH", f"{self.prefix}:nodes", message)

    def subscribe(
        self,
        node: str,
        on_message: Callable[[bytes], None],
        on_subscribed: Callable[[bool], None] | None = None,
    ) -> Subscription:
        channels = (f"{self.prefix}:node:{node}", f"{self.prefix}:nodes")
        return self.connection.subscribe(channels, on_message, on_subscribed)

    def when_back(self, callback: Callable[[], None]) -> None:
        self.connection.breaker.on_closed.append(callback)

    def state(self) -> str:
        state = self.connection.breaker.state
        return "ok" if state == CLOSED else state
