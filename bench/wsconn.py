"""
Load connections over WebSocket (``--transport ws``): the worker's L{Conn}
classes, unchanged, carried by autobahn.

A L{Conn} writes length-prefixed frames (several per write, from the
pre-encoded L{bench.wire} builders) and reads the bodies of one read at a
time (L{Conn.bodies_received}). Over WebSocket, L{_FramesTransport} splits
each write at the length prefixes and sends every body as one binary
message, and L{WSConn} hands the messages of one TCP read to the Conn
together, as the TCP path hands it the frames of one read: the scenarios,
their measurements and the TCP hot path stay the same. The Conn is
"connected" once the opening handshake is done (so C{connect}'s TCP time
includes the handshake).
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from imserver.wire.framing import HEADER, HEADER_SIZE
from imserver.wstransport import SUBPROTOCOL

_unpack_header = HEADER.unpack_from
OPEN = WebSocketClientProtocol.STATE_OPEN


def tcp_endpoint(url: str) -> str:
    """The TCP client endpoint string of a C{ws://} URL (no C{wss://} in the bench)."""
    secure, host, port, _, _, _ = parse_url(url)
    if secure:
        raise ValueError(f"the load workers speak ws://, not wss:// ({url})")
    return f"tcp:{host}:{port}"


class _FramesTransport:
    """The Conn's transport: each length-prefixed frame written goes out as one message."""

    def __init__(self, ws: WSConn) -> None:
        self.ws = ws

    def write(self, data: bytes) -> None:
        ws = self.ws
        if ws.state != OPEN:
            return
        send = ws.sendMessage
        i, n = 0, len(data)
        while i < n:
            (length,) = _unpack_header(data, i)
            i += HEADER_SIZE
            send(data[i : i + length], True)
            i += length

    def loseConnection(self) -> None:
        ws = self.ws
        if ws.state == OPEN:
            ws.sendClose(1000)
        elif ws.state != WebSocketClientProtocol.STATE_CLOSED:
            ws.dropConnection(abort=False)

    def abortConnection(self) -> None:
        self.ws.transport.abortConnection()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.ws.transport.setTcpNoDelay(enabled)

    def getPeer(self) -> Any:
        return self.ws.transport.getPeer()

    def getHost(self) -> Any:
        return self.ws.transport.getHost()


class WSConn(WebSocketClientProtocol):
    """One WebSocket connection carrying one L{Conn}."""

    transport: Any

    def __init__(self, conn: Any) -> None:
        super().__init__()
        self.conn = conn
        self.batch: list[bytes] | None = None

    def onConnect(self, response: Any) -> None:
        if response.protocol != SUBPROTOCOL:
            raise ValueError(f"the server chose subprotocol {response.protocol!r}")

    def onOpen(self) -> None:
        self.conn.makeConnection(_FramesTransport(self))

    def dataReceived(self, data: bytes) -> None:
        # The messages of this read, collected by onMessage, go to the Conn at once.
        batch: list[bytes] = []
        self.batch = batch
        try:
            super().dataReceived(data)
        finally:
            self.batch = None
        if batch and self.conn.open:
            self.conn.bodies_received(batch)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.conn.errors["ws_text_message"] += 1
            return
        if self.batch is not None:
            self.batch.append(payload)
        elif self.conn.open:
            self.conn.bodies_received([payload])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.conn.connectionLost(reason)


def shared_factory(url: str) -> WebSocketClientFactory:
    """The options of every connection to C{url} (one autobahn factory per URL)."""
    factory = WebSocketClientFactory(url, protocols=[SUBPROTOCOL])
    factory.noisy = False
    factory.setProtocolOptions(
        maxMessagePayloadSize=1 << 24,
        maxFramePayloadSize=1 << 24,
        autoPingInterval=0,  # the protocol's own heartbeat (op ping), as on TCP
        openHandshakeTimeout=60,  # connect storms on a loaded machine
        tcpNoDelay=True,
    )
    return factory


class OneWSFactory(Factory):
    """Builds the one L{WSConn} of C{conn}, with the shared autobahn factory's options."""

    noisy = False

    def __init__(self, shared: WebSocketClientFactory, conn: Any) -> None:
        self.shared = shared
        self.conn = conn

    def buildProtocol(self, addr: Any) -> Protocol:
        proto = WSConn(self.conn)
        proto.factory = self.shared
        return proto
