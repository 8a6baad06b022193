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

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.config import Config
from imserver.gateway.protocol import Gateway
from imserver.gateway.registry import LocalRegistry
from imserver.services.tokens import TokenService
from imserver.storage.sql.database import Database
from imserver.storage.sql.engines import create_engine
from imserver.storage.sql.migrate import migrate


class IMServer(MultiService):
    """One imserver node, as a twistd service."""

    log = Logger()

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.registry = LocalRegistry()
        self.tokens = TokenService(config.auth.secret)
        self.gateway = Gateway(
            config=config.server,
            clock=reactor,
            tokens=self.tokens,
            presence=self.registry,
        )
        self.db: Database | None = None
        self.ports: list[IListeningPort] = []
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._start())
        d.addCallbacks(self.ready.callback, self._start_failed)

    async def _start(self) -> None:
        cfg = self.config
        self.db = Database(self.reactor, create_engine(cfg.storage.sql), name="realtime")
        applied = await migrate(self.db, int(self.reactor.seconds() * 1000))
        if applied:
            self.log.info("applied schema migrations {versions}", versions=applied)
        for desc in cfg.server.listen:
            port = await serverFromString(self.reactor, desc).listen(self.gateway)
            self.ports.append(port)
            self.log.info("listening for clients on {address}", address=port.getHost())
        self.log.info(
            "imserver node {node_id} ready (config {source}, sql {sql})",
            node_id=cfg.server.node_id,
            source=cfg.source,
            sql=cfg.storage.sql.kind,
        )

    def _start_failed(self, failure: Failure) -> None:
        self.log.failure("imserver failed to start", failure)
        self.ready.errback(failure)
        # twistd has no exit status of its own: leave with 1 once it has shut down.
        self.reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

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
        if self.db is not None:
            self.db.close()
            self.db = None
        self.log.info("imserver stopped")


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
