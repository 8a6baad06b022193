"""
Redis behind a TCP proxy (HAProxy, a cloud endpoint, the chaos soak's
netem forwarder): while Redis is down the proxy accepts each reconnection
and closes it at once. txredisapi's connectionMade then fails its SELECT
(or AUTH) and calls C{factory.stopTrying()}: the pool gave up for good and
the node stayed "redis down" after Redis came back. Found by the chaos soak
(C{--netem --faults redis_restart}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.portforward import ProxyFactory
from twisted.trial.unittest import TestCase

from imserver.config import parse_config
from imserver.storage.hot.connection import RedisConnection
from imserver.storage.hot.interface import HotUnavailable
from tests.harness import shared_redis
from tests.support import eventually, reactor


class _Closer(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


class Gate(Factory):
    """Forwards to Redis while open; accepts and closes at once while shut."""

    def __init__(self, host: str, port: int) -> None:
        self.forward = ProxyFactory(host, port)
        self.open = True
        self.live: list[Any] = []
        self.refused = 0

    def buildProtocol(self, addr: Any) -> Protocol | None:
        if not self.open:
            self.refused += 1
            return _Closer()
        protocol = self.forward.buildProtocol(addr)
        self.live.append(protocol)
        return protocol

    def shut(self) -> None:
        self.open = False
        for protocol in self.live:
            protocol.transport.loseConnection()
        self.live.clear()


class RedisBehindAProxyTests(TestCase):
    async def test_the_pool_reconnects_after_the_proxy_refused_it(self) -> None:
        redis = shared_redis()
        gate = Gate("127.0.0.1", redis.port)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(gate)
        self.addCleanup(port.stopListening)
        url = f"redis://127.0.0.1:{port.getHost().port}/0"
        target = parse_config({"storage": {"redis": url}}).storage.redis
        assert target is not None
        connection = RedisConnection(reactor, target, timeout=0.5)
        await connection.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(connection.stop()))
        await connection.ping()

        gate.shut()  # Redis "down" behind the proxy

        async def refused_a_few() -> bool:
            try:
                await connection.ping()
            except HotUnavailable:
                pass
            return gate.refused >= 1  # it tried again, and the proxy refused it

        await eventually(refused_a_few, timeout=15)
        gate.open = True  # Redis is back

        async def answers() -> bool:
            try:
                await connection.ping()
            except HotUnavailable:
                return False
            return True

        await eventually(answers, timeout=15)
