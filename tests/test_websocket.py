"""
The WebSocket transport (docs/protocol.md, "Transport"): C{twistd -n imserver}
with C{[server].websocket} set, spoken to with autobahn's client beside a raw
TCP client. One binary message is one frame body; the gateway's state
machine is the TCP one.
"""

from __future__ import annotations

import itertools
import signal
import struct
from typing import Any

import msgpack
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from imserver.client import IMClientProtocol
from imserver.gateway.protocol import Refused
from imserver.gateway.websocket import WebSocketGateway, origin_allowed
from imserver.wire.framing import HEADER_SIZE, encode_frame
from tests.harness import ServerProcess, free_port
from tests.support import ClientsMixin, within
from tests.test_cluster import cluster_backend
from tests.test_gateway import GatewayTestsMixin

WS_MAX_FRAME = 4096


class _Stripping:
    """The IMClientProtocol's transport: each length-prefixed frame goes out as one message."""

    def __init__(self, ws: WSClient) -> None:
        self.ws = ws

    def write(self, data: bytes) -> None:
        self.ws.sendMessage(data[HEADER_SIZE:], isBinary=True)

    def loseConnection(self) -> None:
        self.ws.sendClose(1000)


class WSClient(WebSocketClientProtocol):
    """An autobahn client driving the ordinary test client (its requests and pushes)."""

    def __init__(self) -> None:
        super().__init__()
        self.im = IMClientProtocol()
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[tuple[bool, Any, Any]] = Deferred()
        self.messages: list[tuple[bytes, bool]] = []

    def onOpen(self) -> None:
        self.im.makeConnection(_Stripping(self))  # type: ignore[arg-type]
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))
        self.im.dataReceived(encode_frame(payload))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if self.im.is_open:
            self.im.connectionLost()
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((wasClean, code, reason))


async def ws_client(
    test: TestCase,
    port: int,
    token: str | None = None,
    *,
    path: str = "/v1/ws",
    protocols: list[str] | None = None,
    origin: str | None = None,
    tls: bool = False,
) -> WSClient:
    """An authenticated (with C{token}) WebSocket client, closed at the end of C{test}."""
    scheme = "wss" if tls else "ws"
    factory = WebSocketClientFactory(
        f"{scheme}://127.0.0.1:{port}{path}",
        protocols=["imserver.v1"] if protocols is None else protocols,
        origin=origin,
    )
    factory.protocol = WSClient
    endpoint = clientFromString(reactor, f"{'ssl' if tls else 'tcp'}:127.0.0.1:{port}")
    proto: WSClient = await within(endpoint.connect(factory))
    test.addCleanup(lambda: proto.transport.abortConnection())
    await within(proto.opened)
    if token is not None:
        await within(proto.im.auth(token, device="ws"))
    return proto


class OriginTests(TestCase):
    def test_patterns(self) -> None:
        patterns = ("https://chat.example.com", "https://*.example.org", "http://localhost:*")
        for origin in (
            "https://chat.example.com",
            "HTTPS://Chat.Example.com/",
            "https://a.example.org",
            "http://localhost:8080",
        ):
            self.assertTrue(origin_allowed(origin, patterns), origin)
        for origin in (
            "http://chat.example.com",
            "https://chat.example.com.evil.net",
            "https://example.org",
            "null",
            "http://localhost",
        ):
            self.assertFalse(origin_allowed(origin, patterns), origin)


class WebSocketTests(ClientsMixin, TestCase):
    _server: ServerProcess | None = None

    @property
    def server(self) -> ServerProcess:
        cls = type(self)
        if cls._server is None or not cls._server.running:
            server = ServerProcess(
                {
                    "server": {
                        "websocket_origins": ["https://chat.example.com"],
                        "max_frame_bytes": WS_MAX_FRAME,
                    }
                }
            )
            cls._server = server.start()
        return cls._server

    async def ws(self, token: str | None = None, **kwargs: Any) -> WSClient:
        return await ws_client(self, self.server.ws_port, token, **kwargs)

    async def test_chat_between_websocket_and_tcp(self) -> None:
        ws = await self.ws(self.server.token(901))
        self.assertEqual(ws.websocket_protocol_in_use, "imserver.v1")
        tcp = await self.client(self.server.endpoint, self.server.token(902))
        reply = await within(ws.im.request("send", to=902, cid="ws-1", body="from ws"))
        push = await within(tcp.next_push())
        self.assertEqual(
            (push["t"], push["msg_id"], push["body"]), ("msg", reply["msg_id"], "from ws")
        )
        reply = await within(tcp.request("send", to=901, cid="tcp-1", body="from tcp"))
        push = await within(ws.im.next_push())
        self.assertEqual((push["t"], push["msg_id"], push["from"]), ("msg", reply["msg_id"], 902))
        # Every frame was one binary message without a length prefix.
        self.assertTrue(all(binary for _, binary in ws.messages))
        self.assertEqual(msgpack.unpackb(ws.messages[0][0])["t"], "ok")
        pong = await within(ws.im.request("ping"))
        self.assertIn("server_time", pong)

    async def test_allowed_origin(self) -> None:
        ws = await self.ws(self.server.token(903), origin="https://chat.example.com")
        await within(ws.im.request("ping"))

    async def assertRefused(self, **kwargs: Any) -> None:
        with self.assertRaises(ConnectionError):
            await self.ws(**kwargs)

    async def test_wrong_subprotocol_refused(self) -> None:
        await self.assertRefused(protocols=["other"])

    async def test_no_subprotocol_refused(self) -> None:
        await self.assertRefused(protocols=[])

    async def test_wrong_path_refused(self) -> None:
        await self.assertRefused(path="/ws")

    async def test_other_origin_refused(self) -> None:
        await self.assertRefused(origin="https://evil.example.com")

    async def test_text_message_refused(self) -> None:
        ws = await self.ws(self.server.token(904))
        ws.sendMessage(b'{"t": "ping", "id": 1}', isBinary=False)
        await within(ws.closed)
        error = msgpack.unpackb(ws.messages[-1][0])
        self.assertEqual(error["t"], "error")
        self.assertEqual(error["code"], "bad_frame")
        self.assertIn("text messages are not accepted", error["message"])

    async def test_oversize_message_closes(self) -> None:
        ws = await self.ws(self.server.token(905))
        ws.sendMessage(b"\x80" * (WS_MAX_FRAME + 1), isBinary=True)
        await within(ws.closed)
        # autobahn fails the connection (close code 1009, message too big) and drops it.
        self.assertEqual(len(ws.messages), 1)  # the auth reply only
        tcp = await self.client(self.server.endpoint, self.server.token(907))
        await within(tcp.request("ping"))

    async def test_op_before_auth_is_unauthenticated(self) -> None:
        ws = await self.ws()
        ws.im.send_frame({"t": "ping", "id": 1})
        await within(ws.closed)
        self.assertEqual(msgpack.unpackb(ws.messages[-1][0])["code"], "unauthenticated")

    async def test_bad_frame_keeps_the_connection(self) -> None:
        ws = await self.ws(self.server.token(906))
        ws.sendMessage(b"\xc1", isBinary=True)  # never valid msgpack
        for _ in range(100):
            if ws.messages[1:]:
                break
            await within(_later())
        self.assertEqual(msgpack.unpackb(ws.messages[-1][0])["code"], "bad_frame")
        await within(ws.im.request("ping"))


def _later() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0.02, d.callback, None)  # type: ignore[attr-defined]
    return d


class SecureAndWorkersTests(ClientsMixin, TestCase):
    async def test_wss(self) -> None:
        server, _ = ServerProcess.wss()
        self.addCleanup(server.cleanup)
        server.start()
        ws = await ws_client(self, server.ws_port, server.token(11), tls=True)
        tcp = await self.client(server.endpoint, server.token(12))
        reply = await within(ws.im.request("send", to=12, cid="wss-1", body="over tls"))
        push = await within(tcp.next_push())
        self.assertEqual((push["msg_id"], push["body"]), (reply["msg_id"], "over tls"))

    async def test_kick_and_goaway_on_sigterm(self) -> None:
        port = free_port()
        server = ServerProcess({"server": {"websocket": f"tcp:{port}:interface=127.0.0.1"}})
        self.addCleanup(server.cleanup)
        server.start()
        first = await ws_client(self, port, server.token(21))
        second = await ws_client(self, port, server.token(21))
        self.assertEqual(await within(first.im.next_push()), {"t": "kick", "reason": "replaced"})
        was_clean, code, _ = await within(first.closed)
        self.assertEqual((was_clean, code), (True, 1000))
        server.signal(signal.SIGTERM)
        self.assertEqual(await within(second.im.next_push()), {"t": "goaway", "reason": "shutdown"})
        await within(second.closed)
        self.assertEqual(server.stop(), -signal.SIGTERM)

    async def test_two_workers_share_the_websocket_port(self) -> None:
        backend = cluster_backend()
        port = free_port()
        backend["server"] = {
            "workers": 2,
            "node_id": 30,
            "websocket": f"tcp:{port}:interface=127.0.0.1",
        }
        server = ServerProcess(backend)
        self.addCleanup(server.cleanup)
        server.start()
        self.assertEqual(server.log().count("listening for WebSocket clients"), 2)
        uids = [next(_uids) for _ in range(8)]
        clients = [await ws_client(self, port, server.token(uid)) for uid in uids]
        tcp = await self.client(server.endpoint, server.token(next(_uids)))
        # Pairs of WebSocket clients, wherever the kernel put them, and TCP to each.
        for i in range(0, 8, 2):
            reply = await within(
                clients[i].im.request("send", to=uids[i + 1], cid=f"w{i}", body=f"m{i}")
            )
            push = await within(clients[i + 1].im.next_push())
            self.assertEqual((push["msg_id"], push["from"]), (reply["msg_id"], uids[i]))
        for uid, client in zip(uids, clients, strict=True):
            reply = await within(tcp.request("send", to=uid, cid=f"t{uid}", body="from tcp"))
            push = await within(client.im.next_push())
            while push["t"] != "msg":
                push = await within(client.im.next_push())
            self.assertEqual(push["msg_id"], reply["msg_id"])


_uids = itertools.count(77_000)


def client_message(payload: bytes, opcode: int = 2) -> bytes:
    """One masked client frame (FIN set) carrying C{payload}."""
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_messages(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of the unmasked server frames in C{data}."""
    out = []
    while data:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if n == 126:
            (n,) = struct.unpack_from(">H", data, 2)
            offset = 4
        elif n == 127:
            (n,) = struct.unpack_from(">Q", data, 2)
            offset = 10
        out.append((opcode, data[offset : offset + n]))
        data = data[offset + n :]
    return out


HANDSHAKE = (
    b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: imserver.v1\r\n\r\n"
)


class AdapterTests(GatewayTestsMixin, TestCase):
    """The adapter over a StringTransport: the gateway's machinery behind WebSocket framing."""

    def connect(self) -> tuple[Any, StringTransport]:
        factory = WebSocketGateway(self.gateway)
        proto: Any = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 5555))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
        proto.makeConnection(transport)
        proto.dataReceived(HANDSHAKE)
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 101"), response)
        self.assertIn(b"Sec-WebSocket-Protocol: imserver.v1", response)
        transport.clear()
        self.addCleanup(self.cleanup, proto)
        return proto, transport

    def cleanup(self, proto: Any) -> None:
        if proto.state != proto.STATE_CLOSED:
            proto.connectionLost(Failure(ConnectionDone()))
        for call in list(reactor.getDelayedCalls()):  # type: ignore[attr-defined]
            if "autobahn" in repr(call.func) or "txaio" in repr(call.func):
                call.cancel()

    def frames(self, transport: StringTransport) -> list[Any]:
        data = transport.value()
        transport.clear()
        return [
            msgpack.unpackb(p) if op == 2 else ("close", p[:2]) for op, p in server_messages(data)
        ]

    def send(self, proto: Any, frame: dict[str, Any]) -> None:
        proto.dataReceived(client_message(msgpack.packb(frame)))

    def test_auth_and_ping(self) -> None:
        proto, transport = self.connect()
        self.assertIs(transport.producer, proto.conn)
        self.assertTrue(transport.streaming)
        self.send(proto, {"t": "auth", "id": 1, "token": self.token(42)})
        self.send(proto, {"t": "ping", "id": 2})
        [auth, pong] = self.frames(transport)
        self.assertEqual((auth["t"], auth["uid"]), ("ok", 42))
        self.assertEqual((pong["t"], pong["id"]), ("ok", 2))
        self.assertEqual(self.logins, [42])

    def test_auth_timeout(self) -> None:
        _proto, transport = self.connect()
        self.clock.advance(10)
        [error, close] = self.frames(transport)
        self.assertEqual(error["code"], "unauthenticated")
        self.assertEqual(close, ("close", struct.pack(">H", 1000)))

    def test_reading_pauses_while_logging_in(self) -> None:
        proto, transport = self.connect()
        self.login_result = Deferred()
        self.send(proto, {"t": "auth", "id": 1, "token": self.token(42)})
        self.send(proto, {"t": "ping", "id": 2})
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.frames(transport), [])
        self.login_result.callback(None)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual([f["id"] for f in self.frames(transport)], [1, 2])

    def test_backpressure_drops_a_client_that_does_not_read(self) -> None:
        proto, transport = self.connect()
        self.send(proto, {"t": "auth", "id": 1, "token": self.token(42)})
        self.frames(transport)
        conn = proto.conn
        conn.pauseProducing()  # the TCP transport's buffer is full
        for _ in range(100):
            conn.push({"t": "msg", "body": "x" * 200})
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.gateway.overflowed, 1)

    def test_oversized_reply_is_bounded_by_max_frame_bytes(self) -> None:
        proto, transport = self.connect()
        self.send(proto, {"t": "auth", "id": 1, "token": self.token(42)})
        self.frames(transport)
        # Bodies up to max_frame_bytes go out (as one message each); a larger one is dropped.
        proto.conn.push({"t": "msg", "body": "x" * 1000})
        proto.conn.push({"t": "msg", "body": "x" * 1020})
        [push] = self.frames(transport)
        self.assertEqual(len(push["body"]), 1000)
        self.assertEqual(self.gateway.oversized["push"], 1)

    def test_text_message(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(client_message(b"hello", opcode=1))
        [error, close] = self.frames(transport)
        self.assertEqual(error["code"], "bad_frame")
        self.assertEqual(close[0], "close")

    def test_refused_past_the_caps(self) -> None:
        self.gateway.accepting = False
        proto = WebSocketGateway(self.gateway).buildProtocol(None)
        self.assertIsInstance(proto, Refused)
