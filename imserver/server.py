"""
The composition root: build every component of one imserver node from a
L{Config} and a reactor, start them in order, stop them gracefully.

This is the only module that decides which implementations are used (SQLite
or MySQL, in-process hot store or Redis); everything below takes its
collaborators, reactor and clock as arguments.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.chat.service import ChatService
from imserver.config import Config, endpoint_args
from imserver.deferreds import within
from imserver.gateway.ops import business_ops, login_hook
from imserver.gateway.protocol import Gateway
from imserver.gateway.websocket import PATH as WS_PATH
from imserver.gateway.websocket import WebSocketGateway
from imserver.gcwatch import GcWatch, freeze, tune
from imserver.http.api import make_site
from imserver.http.web import WebSocketPlace
from imserver.listen import connection_budget, is_tcp, listen_tcp, with_backlog
from imserver.metrics import (
    BlockCollector,
    DeviceCollector,
    Metrics,
    PresenceCollector,
    ServerCollector,
)
from imserver.reactorlag import ReactorLag
from imserver.services.cluster import ClusterPresence
from imserver.services.filter import ContentFilter
from imserver.services.ids import IdGenerator
from imserver.services.notifier import Notifier
from imserver.services.presence import IPresence
from imserver.services.registry import LocalRegistry
from imserver.services.tokens import TokenService
from imserver.storage.hot.bus import RedisBus
from imserver.storage.hot.connection import RedisConnection
from imserver.storage.hot.interface import IHotStore
from imserver.storage.hot.memory import MemoryHotStore
from imserver.storage.hot.redis import RedisHotStore
from imserver.storage.sql.database import Database
from imserver.storage.sql.engines import create_engine
from imserver.storage.store import Store


class IMServer(MultiService):
    """One imserver node, as a twistd service."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        worker_index: int | None = None,
        *,
        gc_tuning: bool = False,
    ) -> None:
        """
        @param gc_tuning: raise the collector's thresholds now and freeze the
            start-up objects once listening (L{imserver.gcwatch}), and set
            the GIL's switch interval. The process is the server's alone
            then: twistd sets it, tests do not.
        """
        super().__init__()
        if worker_index is not None:
            # One worker of several: its own node id, ports shared with the others.
            config = attrs.evolve(
                config,
                server=attrs.evolve(config.server, node_id=config.server.node_id + worker_index),
            )
        self.worker_index = worker_index
        self.config = config
        self.reactor = reactor
        self.registry = LocalRegistry(
            max_online=config.devices.max_online, node=str(config.server.node_id)
        )
        self.tokens = TokenService(config.auth.secret)
        self.metrics = Metrics()
        self.gc_tuning = gc_tuning
        if gc_tuning:
            tune()
            # Process-wide too: how soon the reactor gets the GIL back from a
            # SQL thread's Python ([server] gil_switch_interval_ms).
            sys.setswitchinterval(config.server.gil_switch_interval_ms / 1000)
        self.gcwatch = GcWatch()
        self.metrics.register(self.gcwatch)
        self.reactor_lag = ReactorLag(reactor)
        self.metrics.register(self.reactor_lag)
        ids = IdGenerator(config.server.node_id, reactor)
        engine = create_engine(config.storage.sql)
        mysql = engine.kind == "mysql"
        # Two pools, two thread pools: the real-time path (sends, acks, reads)
        # never waits behind background work (outbox, notifications). The
        # send and ack batches run on commit threads of their own (HOT_LANES).
        self.db = Database(reactor, engine, name="realtime", max_connections=8 if mysql else None)
        self.background = Database(
            reactor, engine, name="background", max_connections=3 if mysql else None, lanes=()
        )
        hot: IHotStore
        # Who is online and how pushes reach them: this node alone on the
        # embedded default; the whole cluster (Redis presence and pub/sub) with
        # Redis.
        self.presence: IPresence = self.registry
        self.cluster: ClusterPresence | None = None
        self.redis: RedisConnection | None = None
        if config.storage.redis is None:
            hot = MemoryHotStore(reactor, max_cache_bytes=config.storage.embedded_cache_bytes)
        else:
            # One pool (and circuit breaker) for the hot index and the bus.
            self.redis = RedisConnection(
                reactor, config.storage.redis, prefix=config.storage.key_prefix
            )
            hot = RedisHotStore(
                reactor, config.storage.redis, config.storage.key_prefix, connection=self.redis
            )
            self.cluster = ClusterPresence(
                reactor,
                self.registry,
                RedisBus(self.redis, config.storage.key_prefix),
                config.server.node_id,
                ttl_seconds=config.server.presence_ttl_seconds,
                max_online=config.devices.max_online,
            )
            self.presence = self.cluster
        notify = config.notify
        self.store = Store(
            reactor,
            self.db,
            hot,
            ids=ids,
            node_id=config.server.node_id,
            background=self.background,
            notify_delay_ms=None if notify.webhook is None else int(notify.delay_seconds * 1000),
        )
        self.chat = ChatService(
            store=self.store,
            presence=self.presence,
            ids=ids,
            content=ContentFilter.from_file(config.filter.words_file, config.filter.action),
            limits=config.limits,
            clock=reactor,
            observe=self.metrics.observe,
            shared_profiles=self.cluster is not None,
            max_reply_bytes=config.server.max_frame_bytes,
            devices=config.devices,
        )
        if self.cluster is not None:
            self.cluster.on_profile = self.chat.profiles.put
        if self.redis is not None:
            # What failed while Redis was out is repaired as soon as it answers.
            self.redis.breaker.on_closed.append(self.store.hot_back)
        for db in (self.db, self.background):
            db.observe = self.metrics.sql(db.name)
        for queue, batcher in (
            ("commit", self.store.sends),
            ("ack", self.store.acks),
            ("login", self.store.logins),
            ("realtime", self.chat.fanouts),
        ):
            batcher.on_batch = self.metrics.batch(queue)
        self.notifier: Notifier | None = None
        if notify.webhook is not None:
            self.notifier = Notifier(reactor, self.store, notify, self.store.total_unread)
        self.gateway = Gateway(
            config=config.server,
            clock=reactor,
            tokens=self.tokens,
            presence=self.presence,
            ops=business_ops(self.chat, config.limits),
            on_login=login_hook(self.chat),
            on_logout=lambda conn: self.chat.devices.left(conn.device_id),
            max_connections=connection_budget(),
        )
        self.site = make_site(
            chat=self.chat,
            store=self.store,
            tokens=self.tokens,
            presence=self.presence,
            admin_key=config.auth.admin_key,
            metrics=self.metrics,
            clock=reactor,
            pubsub=None if self.cluster is None else self.cluster.pubsub_state,
            node=config.server.node_id,
            websocket=self._websocket_place,
            websocket_origins=config.server.websocket_origins,
            recall_seconds=config.limits.recall_seconds,
        )
        self.ports: list[IListeningPort] = []
        self.ws_port: IListeningPort | None = None
        self.ready: Deferred[None] = Deferred()
        self.metrics.register(ServerCollector(self))
        self.metrics.register(DeviceCollector(self.chat.devices))
        self.metrics.register(BlockCollector(self.chat.blocks))
        self.metrics.register(PresenceCollector(self.chat.presence_service, self.cluster))

    def startService(self) -> None:
        super().startService()
        self.gcwatch.install()
        self.reactor_lag.start()
        d = Deferred.fromCoroutine(self._start())
        d.addCallbacks(self.ready.callback, self._start_failed)

    async def _start(self) -> None:
        cfg = self.config
        applied = await self.store.start()
        # The commit threads' connections, before any client can take the
        # descriptors they need.
        await self.db.warm()
        if self.cluster is not None:
            self.cluster.start()
        if applied:
            self.log.info("applied schema migrations {versions}", versions=applied)
        replayed = await self.chat.recover()
        if replayed:
            self.log.info("replayed {n} outbox rows left by the previous run", n=replayed)
        self.chat.start_sweeper()
        self.chat.devices.start()
        if self.notifier is not None:
            self.notifier.start()
        for desc in cfg.server.listen:
            factory = self.gateway.factory_for(endpoint_args(desc)[0])
            port = await self._listen(desc, factory)
            self.ports.append(port)
            self.log.info("listening for clients on {address}", address=port.getHost())
        if cfg.server.websocket is not None:
            ws = WebSocketGateway(
                self.gateway,
                secure=endpoint_args(cfg.server.websocket)[0] == "ssl",
                origins=cfg.server.websocket_origins,
            )
            port = await self._listen(cfg.server.websocket, ws)
            self.ports.append(port)
            self.ws_port = port
            self.log.info(
                "listening for WebSocket clients on {address}{path}",
                address=port.getHost(),
                path=WS_PATH,
            )
        if cfg.server.http is not None:
            port = await self._listen(cfg.server.http, self.site)
            self.ports.append(port)
            self.log.info("listening for HTTP on {address}", address=port.getHost())
        if self.gc_tuning:
            # Not a stall while serving: nothing is connected yet.
            self.gcwatch.uninstall()
            frozen = freeze()
            self.gcwatch.install()
            self.log.info("froze {objects} start-up objects (gc)", objects=frozen)
        self.log.info(
            "imserver node {node_id} ready (config {source}, sql {sql}, hot store {hot})",
            node_id=cfg.server.node_id,
            source=cfg.source,
            sql=cfg.storage.sql.kind,
            hot=self.store.hot.kind,
        )

    def _websocket_place(self) -> WebSocketPlace | None:
        """Where the WebSocket listens (for the web chat), once it does."""
        desc = self.config.server.websocket
        if desc is None or self.ws_port is None:
            return None
        port = getattr(self.ws_port.getHost(), "port", None)
        if port is None:
            return None  # a unix socket: no URL for a browser
        return WebSocketPlace(port=port, secure=endpoint_args(desc)[0] == "ssl")

    async def _listen(self, desc: str, factory: Any) -> IListeningPort:
        """Listen on an endpoint; shared with the other workers (SO_REUSEPORT) if any."""
        if is_tcp(desc):
            return listen_tcp(self.reactor, desc, factory, reuse_port=self.worker_index is not None)
        if self.worker_index is not None:
            raise ValueError(f"only tcp: and tcp6: endpoints can be shared by workers: {desc!r}")
        port: IListeningPort = await serverFromString(self.reactor, with_backlog(desc)).listen(
            factory
        )
        return port

    def _start_failed(self, failure: Failure) -> None:
        self.log.failure("imserver failed to start", failure)
        self.ready.errback(failure)
        # twistd has no exit status of its own: leave with 1 once it has shut down.
        self.reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[None]:
        self.reactor_lag.stop()
        super().stopService()
        stopped = Deferred.fromCoroutine(self._stop())
        # Collections are timed while the server runs, its shutdown included.
        return stopped.addBoth(self._uninstall_gcwatch)

    def _uninstall_gcwatch(self, result: object) -> object:
        self.gcwatch.uninstall()
        return result

    async def _stop(self) -> None:
        for port in self.ports:
            await maybeDeferred(port.stopListening)
        self.ports.clear()
        goodbye = self.gateway.goaway_all("shutdown")
        goodbye.addTimeout(self.config.server.shutdown_seconds, self.reactor)
        try:
            await goodbye
        except Exception:
            self.log.warn("clients still connected after the shutdown grace period")
        # Everything acked to a sender is committed already; let the
        # fan-outs that follow commits finish too.
        # A sweep in progress finishes before the pools close (bounded).
        swept = self.chat.stop_sweeper()
        self.chat.blocks.stop()
        swept.addTimeout(self.config.server.shutdown_seconds, self.reactor)
        # The poll in progress records what it posted before the pools close
        # (bounded by the notifier), while the fan-outs drain.
        notifier_stopped = None if self.notifier is None else self.notifier.stop()
        # The drain awaits other tasks' work (hot-store steps, a downgrade
        # transaction): bound the wait, never cancel that work.
        drained = Deferred.fromCoroutine(self.chat.drain())
        try:
            await within(drained, self.config.server.shutdown_seconds, self.reactor)
        except Exception:
            self.log.warn("fan-out still running after the shutdown grace period")
        if notifier_stopped is not None:
            await notifier_stopped
        try:
            await swept
        except Exception:
            self.log.warn("outbox sweep still running after the shutdown grace period")
        await self.chat.devices.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.store.stop()
        self.log.info("imserver stopped")


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
