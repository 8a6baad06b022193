"""
L{imserver.client.websocket}: the SDK's WebSocket client. Unit tests on
fakes and an in-process autobahn server on loopback (a fake imserver), then
end to end against C{twistd -n imserver} (its WebSocket listener, beside TCP).
"""

from __future__ import annotations

from typing import Any

import msgpack
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from imserver.client import (
    ConnectionClosed,
    HandshakeFailed,
    IMClientProtocol,
    RequestFailed,
    connect_ws,
)
from imserver.client.websocket import WebSocketClient, ws_endpoint
from imserver.wire.codec import encode, pack
from imserver.wstransport import MessageTransport
from tests.harness import ServerProcess
from tests.support import ClientsMixin, eventually, reactor, within

# -- unit: message framing in the protocol, the message transport -----------


class MessageFramingTests(TestCase):
    def test_stream_framing_is_the_default(self) -> None:
        proto = IMClientProtocol()
        proto.makeConnection(StringTransport())
        proto.request("ping")
        self.assertEqual(proto.transport.value(), encode({"t": "ping", "id": 1}))

    def test_writes_are_bare_bodies(self) -> None:
        proto = IMClientProtocol()
        proto.use_message_framing()
        proto.makeConnection(StringTransport())
        proto.request("ping")
        self.assertEqual(proto.transport.value(), pack({"t": "ping", "id": 1}))
        proto.transport.clear()
        proto.send_frame({"t": "ack", "seq": 3})
        self.assertEqual(proto.transport.value(), pack({"t": "ack", "seq": 3}))

    def test_bodies_received(self) -> None:
        proto = IMClientProtocol()
        proto.use_message_framing()
        proto.makeConnection(StringTransport())
        ok, bad = proto.request("ping"), proto.request("send", to=2)
        push = proto.next_push()
        proto.bodies_received(
            [
                pack({"t": "ok", "id": 1, "server_time": 5}),
                pack({"t": "msg", "msg_id": 9}),
                pack({"t": "error", "id": 2, "code": "no_such_user", "message": "no"}),
            ]
        )
        self.assertEqual(self.successResultOf(ok)["server_time"], 5)
        self.assertEqual(self.successResultOf(push)["msg_id"], 9)
        self.assertEqual(self.failureResultOf(bad, RequestFailed).value.code, "no_such_user")


class _FakeWS:
    """What L{MessageTransport} drives: an autobahn protocol's sending side."""

    STATE_OPEN = WebSocketClient.STATE_OPEN

    def __init__(self, state: int) -> None:
        self.state = state
        self.sent: list[tuple[bytes, bool]] = []
        self.closes: list[int] = []
        self.dropped = 0
        self.transport = StringTransport()

    def sendMessage(self, data: bytes, isBinary: bool) -> None:
        self.sent.append((data, isBinary))

    def sendClose(self, code: int) -> None:
        self.closes.append(code)

    def dropConnection(self, abort: bool) -> None:
        self.dropped += 1


class MessageTransportTests(TestCase):
    def test_open(self) -> None:
        ws = _FakeWS(WebSocketClient.STATE_OPEN)
        transport = MessageTransport(ws)  # type: ignore[arg-type]
        transport.write(b"\x81\xa1t\xa4ping")
        transport.writeSequence([b"a", b"b"])
        self.assertEqual(ws.sent, [(b"\x81\xa1t\xa4ping", True), (b"a", True), (b"b", True)])
        transport.loseConnection()
        self.assertEqual(ws.closes, [1000])
        self.assertEqual(transport.getPeer(), ws.transport.getPeer())

    def test_closing(self) -> None:
        ws = _FakeWS(WebSocketClient.STATE_CLOSING)
        transport = MessageTransport(ws)  # type: ignore[arg-type]
        transport.write(b"late")
        transport.loseConnection()
        self.assertEqual((ws.sent, ws.closes, ws.dropped), ([], [], 1))

    def test_endpoints(self) -> None:
        self.assertIsInstance(ws_endpoint(reactor, "ws://127.0.0.1:7001/v1/ws"), HostnameEndpoint)
        wss = ws_endpoint(reactor, "wss://chat.example.com/v1/ws")
        self.assertNotIsInstance(wss, HostnameEndpoint)  # TLS around it
        self.assertEqual(wss._wrappedEndpoint._hostBytes, b"chat.example.com")  # type: ignore[attr-defined]
        self.assertEqual(wss._wrappedEndpoint._port, 443)  # type: ignore[attr-defined]


# -- an in-process fake imserver on loopback --------------------------------


class _FakeServer(WebSocketServerProtocol):
    """Answers auth and ping; C{push} and C{text} messages trigger pushes."""

    factory: _FakeServerFactory

    def onConnect(self, request: ConnectionRequest) -> str | None:
        self.factory.requests.append(request)
        return self.factory.subprotocol

    def onOpen(self) -> None:
        self.factory.opened.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append((payload, isBinary))
        frame = msgpack.unpackb(payload)
        if frame["t"] == "auth":
            if frame["token"] == "good":
                self.reply({"t": "ok", "id": frame["id"], "uid": 5})
            else:
                self.reply({"t": "error", "id": frame["id"], "code": "bad_token", "message": "no"})
        elif frame["t"] == "ping":
            self.reply({"t": "ok", "id": frame["id"], "server_time": 1})
        elif frame["t"] == "push":
            self.reply({"t": "msg", "msg_id": 77})
        elif frame["t"] == "text":
            self.sendMessage(b"{}", isBinary=False)
        # anything else: no answer

    def reply(self, frame: dict[str, Any]) -> None:
        self.sendMessage(msgpack.packb(frame), isBinary=True)


class _FakeServerFactory(WebSocketServerFactory):
    protocol = _FakeServer  # type: ignore[assignment]

    def __init__(self, subprotocol: str | None) -> None:
        super().__init__()
        self.subprotocol = subprotocol
        self.requests: list[ConnectionRequest] = []
        self.opened: list[_FakeServer] = []
        self.received: list[tuple[bytes, bool]] = []


class FakeServerTests(TestCase):
    def serve(self, subprotocol: str | None = "imserver.v1") -> tuple[_FakeServerFactory, str]:
        factory = _FakeServerFactory(subprotocol)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, f"ws://127.0.0.1:{port.getHost().port}/v1/ws"

    async def connect(self, url: str, token: str | None = None, **kw: Any) -> IMClientProtocol:
        im = await within(connect_ws(reactor, url, token, **kw))
        self.addCleanup(lambda: im.transport.abortConnection() if im.is_open else None)
        return im

    async def test_handshake_auth_and_messages(self) -> None:
        factory, url = self.serve()
        im = await self.connect(url, "good", origin="https://chat.example.com", device="d1")
        self.assertEqual(im.uid, 5)
        [request] = factory.requests
        self.assertEqual((request.path, request.protocols), ("/v1/ws", ["imserver.v1"]))
        self.assertEqual(request.origin, "https://chat.example.com")
        # The auth request: one binary message, a bare msgpack body.
        payload, binary = factory.received[0]
        self.assertTrue(binary)
        self.assertEqual(
            msgpack.unpackb(payload), {"t": "auth", "id": 1, "token": "good", "device": "d1"}
        )
        self.assertEqual((await within(im.request("ping")))["server_time"], 1)
        im.send_frame({"t": "push"})
        self.assertEqual((await within(im.next_push()))["msg_id"], 77)
        await within(im.close())
        self.assertFalse(im.is_open)
        self.assertEqual(im.transport.ws.close_code, 1000)

    async def test_no_token_no_auth(self) -> None:
        factory, url = self.serve()
        im = await self.connect(url)
        self.assertEqual((im.uid, factory.received), (None, []))
        self.assertFalse(factory.requests[0].origin)  # none sent

    async def test_auth_refused(self) -> None:
        factory, url = self.serve()
        with self.assertRaises(RequestFailed) as caught:
            await within(connect_ws(reactor, url, "bad"))
        self.assertEqual(caught.exception.code, "bad_token")
        # connect_ws closed the connection it opened.
        await eventually(lambda: factory.opened[0].state == WebSocketServerProtocol.STATE_CLOSED)

    async def test_subprotocol_not_chosen(self) -> None:
        _, url = self.serve(subprotocol=None)
        with self.assertRaises(HandshakeFailed) as caught:
            await within(connect_ws(reactor, url))
        self.assertIn("the server chose subprotocol None", str(caught.exception))

    async def test_server_closes(self) -> None:
        factory, url = self.serve()
        im = await self.connect(url)
        pending = im.request("silence")
        factory.opened[0].sendClose(4000, "bye")
        await within(im.closed)
        self.assertFalse(im.is_open)
        self.assertEqual(im.transport.ws.close_code, 4000)
        self.failureResultOf(pending, ConnectionClosed)

    async def test_text_message_closes(self) -> None:
        factory, url = self.serve()
        im = await self.connect(url)
        im.send_frame({"t": "text"})
        await within(im.closed)
        await eventually(lambda: factory.opened[0].remoteCloseCode == 1000)

    async def test_cancel_a_stuck_handshake(self) -> None:
        # A TCP server that never answers the upgrade request.
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        d = ensureDeferred(connect_ws(reactor, f"ws://127.0.0.1:{port.getHost().port}/v1/ws"))
        # Let the TCP connection open and the request go out.
        await within(_later(0.2))
        d.cancel()
        with self.assertRaises(CancelledError):
            await d


def _later(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


# -- end to end: twistd -n imserver ------------------------------------------


class EndToEndTests(ClientsMixin, TestCase):
    _server: ServerProcess | None = None

    @property
    def server(self) -> ServerProcess:
        cls = type(self)
        if cls._server is None or not cls._server.running:
            server = ServerProcess({"server": {"websocket_origins": ["https://chat.example.com"]}})
            cls._server = server.start()
        return cls._server

    async def ws(self, token: str | None = None, **kw: Any) -> IMClientProtocol:
        im = await within(connect_ws(reactor, self.server.ws_url, token, **kw))
        self.addCleanup(im.close)
        return im

    async def test_chat_between_websocket_and_tcp(self) -> None:
        ws = await self.ws(self.server.token(1101), device="ws")
        self.assertEqual(ws.uid, 1101)
        tcp = await self.client(self.server.endpoint, self.server.token(1102))
        reply = await within(ws.request("send", to=1102, cid="ws-1", body="from ws"))
        push = await within(tcp.next_push())
        self.assertEqual((push["msg_id"], push["body"]), (reply["msg_id"], "from ws"))
        reply = await within(tcp.request("send", to=1101, cid="tcp-1", body="from tcp"))
        push = await within(ws.next_push())
        self.assertEqual((push["msg_id"], push["from"]), (reply["msg_id"], 1102))
        page = await within(ws.request("sync", after=0))
        self.assertIn(reply["msg_id"], [m["msg_id"] for m in page["msgs"]])

    async def test_bad_token(self) -> None:
        with self.assertRaises(RequestFailed):
            await within(connect_ws(reactor, self.server.ws_url, "not-a-token"))

    async def test_wrong_path(self) -> None:
        url = self.server.ws_url.replace("/v1/ws", "/ws")
        with self.assertRaises(HandshakeFailed):
            await within(connect_ws(reactor, url))

    async def test_origins(self) -> None:
        ws = await self.ws(self.server.token(1103), origin="https://chat.example.com")
        await within(ws.request("ping"))
        with self.assertRaises(HandshakeFailed):
            await within(connect_ws(reactor, self.server.ws_url, origin="https://evil.example.com"))

    async def test_kick_closes(self) -> None:
        first = await self.ws(self.server.token(1104))
        await self.ws(self.server.token(1104))
        self.assertEqual(await within(first.next_push()), {"t": "kick", "reason": "replaced"})
        await within(first.closed)
        self.assertEqual(first.transport.ws.close_code, 1000)


class SecureTests(ClientsMixin, TestCase):
    def wss_server(self, san: str) -> tuple[str, Certificate]:
        server, cert = ServerProcess.wss(san)
        self.addCleanup(server.cleanup)
        server.start()
        self.token = server.token
        with open(cert, "rb") as f:
            return f"wss://127.0.0.1:{server.ws_port}/v1/ws", Certificate.loadPEM(f.read())

    async def test_wss(self) -> None:
        url, root = self.wss_server("IP:127.0.0.1")
        im = await within(connect_ws(reactor, url, self.token(1201), trust_root=root))
        self.addCleanup(im.close)
        self.assertEqual((await within(im.request("ping")))["t"], "ok")
        # Not trusted without the root: the platform's do not know this certificate.
        with self.assertRaises(HandshakeFailed) as caught:
            await within(connect_ws(reactor, url))
        self.assertIn("certificate verify failed", str(caught.exception))

    async def test_wss_checks_the_identity(self) -> None:
        url, root = self.wss_server("DNS:other.example.com")
        with self.assertRaises(HandshakeFailed) as caught:
            await within(connect_ws(reactor, url, trust_root=root))
        self.assertIn("IPAddressMismatch", str(caught.exception))
