"""
The business layer and storage, in process, on any backend:

    stack = await make_stack(self, "embedded")      # SQLite + in-process hot store
    stack = await make_stack(self, "redis")         # MariaDB + Redis (the harness's own)
    stack = await make_stack(self, "sqlite-redis")  # SQLite + Redis

Pushes go to a L{RecordingPresence} instead of connections.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from imserver.chat.service import ChatService
from imserver.config import LimitsConfig, SqliteTarget, parse_config
from imserver.services.filter import ContentFilter
from imserver.services.ids import IdGenerator
from imserver.services.presence import IClientLink, IPresence, OnlineDevice
from imserver.storage.hot.interface import IHotStore
from imserver.storage.hot.memory import MemoryHotStore
from imserver.storage.hot.redis import RedisHotStore
from imserver.storage.model import Profile
from imserver.storage.sql.database import Database, Statement, Txn
from imserver.storage.sql.engines import create_engine
from imserver.storage.store import Store
from tests.harness import RedisServer, fresh_prefix, shared_mariadb, shared_redis
from tests.support import reactor

BACKENDS = ("embedded", "redis")


class RecordingTxn:
    """A Txn that notes each statement's SQL, in order, in C{sql}."""

    def __init__(self, txn: Txn) -> None:
        self._txn = txn
        self.sql: list[str] = []

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._txn, name)
        if name not in ("execute", "query", "query_one", "query_in", "script"):
            return found

        def noted(first: Any, *args: Any, **kw: Any) -> Any:
            if name == "script":
                self.sql += [st.sql for st in first if isinstance(st, Statement)]
            else:
                self.sql.append(first)
            return found(first, *args, **kw)

        return noted


@implementer(IPresence)
class RecordingPresence:
    """
    Presence where users are "online" when the test says so; pushes are
    recorded per uid. A push that names an C{exclude} connection is recorded
    with it (C{excluded}); L{take} leaves out nothing: tests that care read
    C{excluded}. Users whose every connection is excluded get nothing (the
    acting device only, with C{online_only}).
    """

    max_online = 5

    def __init__(self) -> None:
        self.online_users: set[int] = set()
        self.pushes: dict[int, list[dict[str, Any]]] = {}
        #: (uid, frame, the excluded link) of every push with an exclude.
        self.excluded: list[tuple[int, dict[str, Any], IClientLink]] = []
        #: (uid, device, reason) of every kick_device.
        self.kicked: list[tuple[int, str, str]] = []
        #: (kind, data) of every broadcast.
        self.broadcasts: list[tuple[str, Any]] = []
        self._links: dict[int, dict[str, IClientLink]] = {}
        #: Presence listeners (issue 11): tests drive them with L{change}.
        self.change_listeners: list[Callable[[int, bool, int, bool], None]] = []
        self.gone_listeners: list[Callable[[int, IClientLink], None]] = []

    def on_change(self, listener: Callable[[int, bool, int, bool], None]) -> None:
        self.change_listeners.append(listener)

    def on_link_gone(self, listener: Callable[[int, IClientLink], None]) -> None:
        self.gone_listeners.append(listener)

    def change(self, uid: int, online: bool, at: int = 0, here: bool = True) -> None:
        """A user-level presence transition, as a registry or the cluster reports it."""
        for listener in list(self.change_listeners):
            listener(uid, online, at, here)

    def login(self, uid: int, link: IClientLink) -> Deferred[None]:
        self.online_users.add(uid)
        self._links.setdefault(uid, {})[link.device] = link
        return succeed(None)

    def logout(self, uid: int, link: IClientLink) -> None:
        devices = self._links.get(uid, {})
        if devices.get(link.device) is link:
            del devices[link.device]
            for listener in list(self.gone_listeners):
                listener(uid, link)
        if not devices:
            self._links.pop(uid, None)
            self.online_users.discard(uid)

    def local(self, uid: int) -> list[IClientLink]:
        return list(self._links.get(uid, {}).values())

    def push(self, uid: int, frame: Mapping[str, Any], exclude: IClientLink | None = None) -> bool:
        if uid not in self.online_users:
            return False
        if exclude is not None:
            self.excluded.append((uid, dict(frame), exclude))
            others = [link for link in self.local(uid) if link is not exclude]
            if self._links.get(uid) and not others:
                return False  # the acting connection is the user's only one
        self.pushes.setdefault(uid, []).append(dict(frame))
        return True

    def push_local(
        self, uid: int, frame: Mapping[str, Any], exclude: IClientLink | None = None
    ) -> bool:
        """Users with links (or for whom a test makes C{local} say so) are on this node."""
        if not self.local(uid):
            return False
        return self.push(uid, frame, exclude)

    def push_remote(
        self, uid: int, frame: Mapping[str, Any], exclude: IClientLink | None = None
    ) -> None:
        """Users online without links are on "another node": pushed after indexing."""
        if not self.local(uid):
            self.push(uid, frame, exclude)

    def kick_device(self, uid: int, device: str, reason: str) -> Deferred[bool]:
        self.kicked.append((uid, device, reason))
        link = self._links.get(uid, {}).get(device)
        if link is None:
            return succeed(False)
        self.logout(uid, link)
        link.kick(reason)
        return succeed(True)

    def online_devices(self, uid: int) -> Deferred[list[OnlineDevice]]:
        return succeed(
            [OnlineDevice(link.device, "1", link.connected_at) for link in self.local(uid)]
        )

    def links(self) -> Iterator[IClientLink]:
        return iter([link for devices in self._links.values() for link in devices.values()])

    def broadcast(self, kind: str, data: Any) -> None:
        self.broadcasts.append((kind, data))

    def on_broadcast(self, kind: str, callback: Callable[[Any], None]) -> None:
        pass

    def share_profile(self, profile: Profile) -> None:
        pass

    def online(self, uid: int) -> Deferred[bool]:
        return succeed(uid in self.online_users)

    def take(self, uid: int, kind: str | None = None) -> list[dict[str, Any]]:
        """Pushes received by C{uid} (of one kind), forgetting them."""
        frames = self.pushes.pop(uid, [])
        if kind is None:
            return frames
        keep = [f for f in frames if f["t"] != kind]
        if keep:
            self.pushes[uid] = keep
        return [f for f in frames if f["t"] == kind]


@attrs.define
class Stack:
    backend: str
    store: Store
    chat: ChatService
    presence: RecordingPresence
    hot: IHotStore
    redis: RedisServer | None = None
    prefix: str = "im"

    async def settle(self) -> None:
        """Wait until every commit and fan-out so far is done."""
        await self.chat.drain()

    async def flush_hot(self) -> None:
        """Lose the whole hot copy, as a Redis FLUSHALL (or a restart) would."""
        if isinstance(self.hot, RedisHotStore):
            await self.hot.command("FLUSHALL")
        else:
            assert isinstance(self.hot, MemoryHotStore)
            fresh = MemoryHotStore(reactor)
            self.hot.__dict__.update(fresh.__dict__)


async def make_stack(
    case: TestCase,
    backend: str = "embedded",
    *,
    limits: LimitsConfig | None = None,
    words: list[str] | None = None,
    action: str = "reject",
    node_id: int = 1,
    redis: RedisServer | None = None,
    notify_delay_ms: int | None = None,
    db: Database | None = None,
) -> Stack:
    if db is None:
        if backend in ("embedded", "sqlite-redis"):
            engine = create_engine(SqliteTarget(os.path.abspath(case.mktemp())))
        else:
            config = parse_config({"storage": {"sql": shared_mariadb().fresh_database()}})
            engine = create_engine(config.storage.sql)
        db = Database(
            reactor, engine, name="test", max_connections=None if engine.kind == "sqlite" else 8
        )
    prefix = fresh_prefix()
    hot: IHotStore
    server = None
    if backend == "embedded":
        hot = MemoryHotStore(reactor)
    else:
        server = redis or shared_redis()
        target = parse_config({"storage": {"redis": server.url}}).storage.redis
        assert target is not None
        hot = RedisHotStore(reactor, target, prefix, timeout=1.0)
    ids = IdGenerator(node_id, reactor)
    store = Store(reactor, db, hot, ids=ids, node_id=node_id, notify_delay_ms=notify_delay_ms)
    await store.start()
    presence = RecordingPresence()
    chat = ChatService(
        store=store,
        presence=presence,
        ids=ids,
        content=ContentFilter(words or [], action),
        limits=limits or LimitsConfig(),
        clock=reactor,
    )

    async def stop() -> None:
        await chat.drain()
        await store.stop()

    case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    return Stack(backend, store, chat, presence, hot, server, prefix)
