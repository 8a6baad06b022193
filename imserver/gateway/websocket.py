"""
The WebSocket transport: the gateway's protocol over RFC 6455 (autobahn).

Only the framing differs from raw TCP: one binary WebSocket message is one
msgpack frame body, without the length prefix. L{WebSocketGateway} is the
listening factory; each connection is an autobahn L{WebSocketServerProtocol}
(L{_Adapter}; plain binary frames are read and written by
L{imserver.gateway.wsfast.FastServerProtocol}, for CPU per message) driving
one gateway L{ClientProtocol}: its message payloads go in as frame bodies,
and the gateway's writes go out as binary messages through
L{imserver.wstransport.MessageTransport}. Auth timeout, heartbeat, limits, in-flight caps
and backpressure are the ClientProtocol's, as on TCP: the auth timeout runs
from the TCP connection (the handshake counts), reading is paused and
resumed on the TCP transport below, and the ClientProtocol is registered as
the TCP transport's producer.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from imserver.errors import ErrorCode
from imserver.gateway.protocol import ClientProtocol, Gateway, Refused, State
from imserver.gateway.wsfast import FastServerProtocol
from imserver.wstransport import SUBPROTOCOL, MessageTransport

#: The path clients connect to.
PATH = "/v1/ws"


def origin_allowed(origin: str, patterns: tuple[str, ...]) -> bool:
    """
    Whether a browser's C{Origin} header matches one of C{patterns}
    (C{https://chat.example.com}, C{https://*.example.com}, C{http://localhost:*}):
    compared case-insensitively, as C{scheme://host[:port]}. A client that
    sends no Origin (not a browser) is not checked.
    """
    origin = origin.strip().lower().rstrip("/")
    return any(fnmatch.fnmatchcase(origin, pattern.lower().rstrip("/")) for pattern in patterns)


class _Demoted:
    """
    autobahn's logger with its per-connection info and warn lines (a refused
    handshake, a dropped connection) at debug: a flood of bad handshakes
    must not flood the log. Errors and failures stay as they are.
    """

    def __init__(self, log: Any) -> None:
        self._log = log

    def __getattr__(self, name: str) -> Any:
        if name in ("info", "warn"):
            return self._log.debug
        return getattr(self._log, name)


class _Adapter(FastServerProtocol):
    conn: ClientProtocol
    log = _Demoted(WebSocketServerProtocol.log)

    def connectionMade(self) -> None:
        super().connectionMade()
        conn = self.conn
        conn.use_message_framing()
        conn.makeConnection(MessageTransport(self))

    def onConnect(self, request: ConnectionRequest) -> str:
        if request.path != PATH:
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, f"no WebSocket at {request.path}")
        if SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(
                ConnectionDeny.BAD_REQUEST, f"the subprotocol must be {SUBPROTOCOL}"
            )
        origin = request.origin
        allowed = self.factory.origins
        if allowed and origin and not origin_allowed(origin, allowed):
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, f"origin {origin!r} not allowed")
        return SUBPROTOCOL

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        conn = self.conn
        if conn.state is State.CLOSING:
            return
        conn._last_activity = conn.gateway.clock.seconds()
        if not isBinary:
            conn._error(
                ErrorCode.BAD_FRAME,
                "text messages are not accepted: send each frame as one binary message",
            )
            conn.close("text message")
            return
        conn.frames_received([payload])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.conn.connectionLost(reason)


class WebSocketGateway(WebSocketServerFactory):
    """A listening factory serving the gateway over WebSocket at L{PATH}."""

    protocol = _Adapter
    noisy = False

    def __init__(
        self, gateway: Gateway, *, secure: bool = False, origins: tuple[str, ...] = ()
    ) -> None:
        super().__init__()
        self.gateway = gateway
        self.isSecure = secure
        self.origins = origins
        max_bytes = gateway.config.max_frame_bytes
        self.setProtocolOptions(
            maxMessagePayloadSize=max_bytes,
            maxFramePayloadSize=max_bytes,
            # Checked in onConnect (autobahn's check wants the port in every pattern).
            allowedOrigins=["*"],
            # The gateway has its own heartbeat and idle timeout.
            autoPingInterval=0,
        )

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        """A protocol for a new connection; refused (closed at once) past the gateway's caps."""
        conn = self.gateway.buildProtocol(addr)
        if conn is None:
            return Refused()
        proto: Any = super().buildProtocol(addr)
        proto.conn = conn
        return proto
