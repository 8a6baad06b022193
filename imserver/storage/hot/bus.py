"""
The cluster bus on Redis: presences, pushes routed between nodes,
broadcasts and the data's generation (see L{IClusterBus} and
L{imserver.services.cluster}). It shares the node's L{RedisConnection} (and
so its circuit breaker) with the hot index:

    {p}:presence:{uid}      the connection logged in (node:incarnation:epoch), with a TTL
    {p}:generation          set once by the first node to find it missing
    {p}:node:{node}         channel: pushes and kicks for that node's users
    {p}:nodes               channel: what every node hears (profiles, generation changes)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
from imserver.storage.hot.interface import IClusterBus

SCRIPTS = (
    "bus_generation",
    "bus_heartbeat",
    "presence_login",
    "presence_logout",
    "presence_refresh",
    "presence_route",
)


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

    async def presence_login(self, entries: Sequence[tuple[int, str]], ttl_ms: int) -> str | None:
        packed = pack([[str(uid), value] for uid, value in entries])
        _, generation = await self._script("presence_login", str(ttl_ms), packed)
        return _generation(generation)

    async def presence_get(self, uid: int) -> str | None:
        value = await self.connection.command("GET", f"{self.prefix}:presence:{uid}")
        return None if value is None else to_str(value)

    async def presence_logout(self, entries: Sequence[tuple[int, str]]) -> None:
        await self._script("presence_logout", pack([[str(uid), value] for uid, value in entries]))

    async def presence_refresh(
        self, entries: Sequence[tuple[int, str]], ttl_ms: int
    ) -> tuple[list[int], str | None]:
        generation, lost = await self._script(
            "presence_refresh", str(ttl_ms), pack([[str(uid), value] for uid, value in entries])
        )
        return [to_int(uid) for uid in lost], _generation(generation)

    async def route(self, node: str, pushes: Sequence[tuple[int, bytes]]) -> tuple[int, str | None]:
        sent, generation = await self._script(
            "presence_route", node, pack([[str(u), f] for u, f in pushes])
        )
        return to_int(sent), _generation(generation)

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
