"""
The client side of the WebSocket transport (docs/protocol.md, "WebSocket").

    client = await connect_ws(reactor, "ws://127.0.0.1:7001/v1/ws", token)
    reply = await client.request("send", to=7, cid="c1", body="hello")

L{connect_ws} gives the same L{IMClientProtocol} as L{connect} does over TCP;
only the framing differs: one binary WebSocket message is one msgpack frame
body, with no length prefix. An autobahn L{WebSocketClientProtocol}
(L{WebSocketClient}) carries the IMClientProtocol: binary messages go in
through L{IMClientProtocol.bodies_received}, the protocol's writes go out as
binary messages (L{imserver.wstransport.MessageTransport}), and the end of the TCP connection is
the protocol's C{connectionLost}. C{wss://} URLs use TLS with the server's
identity checked (service_identity) against the system's trust roots or
C{trust_root}.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectionResponse
from autobahn.websocket.util import parse_url
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure

from imserver.client.protocol import IMClientProtocol
from imserver.wstransport import SUBPROTOCOL, MessageTransport

#: The default C{max_frame_bytes} of L{IMClientProtocol}; also the largest message accepted.
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024


class HandshakeFailed(ConnectionError):
    """The WebSocket opening handshake did not complete (refused, dropped or timed out)."""


class WebSocketClient(WebSocketClientProtocol):
    """
    One WebSocket connection carrying one L{IMClientProtocol} (C{im}).

    C{opened} fires after the opening handshake, or fails with
    L{HandshakeFailed}; C{close_code} and C{close_reason} are the closing
    handshake's, once the connection is closed.
    """

    factory: _Factory
    im: IMClientProtocol
    transport: Any

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[IMClientProtocol] = Deferred(self._cancel_open)
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.refused: str | None = None

    def _cancel_open(self, d: Deferred[IMClientProtocol]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def onConnect(self, response: ConnectionResponse) -> None:
        if response.protocol != SUBPROTOCOL:
            # Not an imserver: drop it (raising here would log an error) and
            # say why when the connection is gone.
            self.refused = f"the server chose subprotocol {response.protocol!r}, not {SUBPROTOCOL}"
            self.dropConnection(abort=True)

    def onOpen(self) -> None:
        if self.refused:
            return
        im = self.im = self.factory.new_protocol()
        im.use_message_framing()
        im.makeConnection(MessageTransport(self))
        self.opened.callback(im)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            # The server never sends text. (autobahn lets applications close
            # with 1000 or 3000-4999 only, not 1003 "unsupported data".)
            self.sendClose(1000, "imserver.v1 frames are binary messages")
            return
        self.im.bodies_received([payload])

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code, self.close_reason = code, reason

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if not self.opened.called:
            # The WebSocket's reason, and the connection's (a TLS error says why).
            why = self.refused or f"{self.close_reason} ({reason.value!r})"
            self.opened.errback(
                HandshakeFailed(f"WebSocket handshake with {self.factory.url} failed: {why}")
            )
        im: IMClientProtocol | None = getattr(self, "im", None)
        if im is not None and im.is_open:
            im.connectionLost(reason)


class _Factory(WebSocketClientFactory):
    protocol = WebSocketClient  # type: ignore[assignment]
    noisy = False

    def __init__(self, url: str, *, origin: str | None, max_frame_bytes: int) -> None:
        super().__init__(url, protocols=[SUBPROTOCOL], origin=origin)
        self.max_frame_bytes = max_frame_bytes
        self.setProtocolOptions(
            maxMessagePayloadSize=max_frame_bytes,
            maxFramePayloadSize=max_frame_bytes,
            # The protocol has its own heartbeat (op ping); no WebSocket pings.
            autoPingInterval=0,
            # A loaded machine may take more than autobahn's 5 s.
            openHandshakeTimeout=30,
        )

    def new_protocol(self) -> IMClientProtocol:
        return IMClientProtocol(self.max_frame_bytes)


def ws_endpoint(reactor: Any, url: str, trust_root: Any = None) -> IStreamClientEndpoint:
    """
    The endpoint for C{url}: TCP for C{ws://}, TLS for C{wss://} checking the
    server's certificate against C{trust_root} (see L{optionsForClientTLS};
    the platform's roots when C{None}) and its identity against the URL's host.
    """
    secure, host, port, _, _, _ = parse_url(url)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port)
    if secure:
        endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=trust_root), endpoint)
    return endpoint


async def connect_ws(
    reactor: Any,
    url: str,
    token: str | None = None,
    *,
    origin: str | None = None,
    trust_root: Any = None,
    max_frame_bytes: int = DEFAULT_MAX_MESSAGE,
    **auth_fields: Any,
) -> IMClientProtocol:
    """
    Connect to C{url} (C{ws://host:port/v1/ws} or C{wss://...}) and
    authenticate if a token is given; fire after the handshake (and auth).

    @param origin: the C{Origin} header (checked by the server against
        C{websocket_origins}); none is sent by default, as by non-browsers.
    @param trust_root: for C{wss://}: the certificate authorities to trust,
        e.g. C{twisted.internet.ssl.Certificate.loadPEM(...)} for a test's
        self-signed certificate; default: the platform's.
    @param auth_fields: more fields of the C{auth} request (C{device=...}).
    @raise HandshakeFailed: the server refused the WebSocket (wrong path,
        subprotocol or origin), or it did not complete.
    """
    factory = _Factory(url, origin=origin, max_frame_bytes=max_frame_bytes)
    endpoint = ws_endpoint(reactor, url, trust_root)
    ws = await endpoint.connect(factory)
    assert isinstance(ws, WebSocketClient)
    im = await ws.opened
    if token is not None:
        try:
            await im.auth(token, **auth_fields)
        except BaseException:
            await im.close()
            raise
    return im
