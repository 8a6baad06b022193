"""
The gateway's lean WebSocket path (imserver.gateway.wsfast) against autobahn's
own: every frame a client may send is answered the same with the fast path
on and off (the messages delivered, the bytes written back, the close codes,
the traffic counters), and every message sent is framed to the same bytes.
The fingerprints at the end fail when autobahn's code under the overrides
changes, so an upgrade of autobahn is checked again rather than trusted.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import autobahn
from autobahn.twisted.websocket import WebSocketAdapterProtocol, WebSocketServerFactory
from autobahn.websocket.protocol import WebSocketProtocol, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from autobahn.websocket.xormasker import create_xor_masker
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from imserver.gateway import wsfast
from imserver.gateway.websocket import _Adapter
from imserver.gateway.wsfast import INT_XOR_MAX, FastServerProtocol, unmask, verified

HANDSHAKE = (
    b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: imserver.v1\r\n\r\n"
)

#: The limits of the test factory (the gateway's are its max_frame_bytes).
MAX_FRAME = 70_000
MAX_MESSAGE = 100_000

SIZES = (0, 1, 2, 3, 4, 5, 125, 126, 127, INT_XOR_MAX, INT_XOR_MAX + 1, 65535, 65536, 69_999)


def frame(
    payload: bytes,
    opcode: int = 2,
    *,
    mask: bytes | None = b"\x37\xfa\x21\x3d",
    fin: bool = True,
    rsv: int = 0,
    length_form: int | None = None,
) -> bytes:
    """One client frame, masked with C{mask} (None: unmasked), built by hand from RFC 6455."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    form = length_form if length_form is not None else (0 if n < 126 else 1 if n < 65536 else 2)
    masked = 0x80 if mask is not None else 0
    if form == 0:
        head = bytes([b0, masked | n])
    elif form == 1:
        head = bytes([b0, masked | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, masked | 127]) + struct.pack(">Q", n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Recorder(FastServerProtocol):
    """A fast-path protocol that records what autobahn hands up."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Any] = []

    def onConnect(self, request: ConnectionRequest) -> str:
        return "imserver.v1"

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.events.append(("message", payload, isBinary))

    def onPing(self, payload: bytes) -> None:
        self.events.append(("ping", payload))
        super().onPing(payload)

    def onPong(self, payload: bytes) -> None:
        self.events.append(("pong", payload))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.events.append(("close", wasClean, code, reason))


def connect(fast: bool, fail_by_drop: bool = True) -> tuple[Recorder, StringTransport]:
    factory = WebSocketServerFactory()
    factory.protocol = Recorder
    factory.setProtocolOptions(
        maxFramePayloadSize=MAX_FRAME,
        maxMessagePayloadSize=MAX_MESSAGE,
        autoPingInterval=0,
        failByDrop=fail_by_drop,
    )
    proto: Any = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    proto.fast_framing = fast
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    proto.makeConnection(transport)
    # As the gateway's ClientProtocol does (autobahn unregisters it on failing).
    transport.registerProducer(proto, True)
    proto.dataReceived(HANDSHAKE)
    assert transport.value().startswith(b"HTTP/1.1 101"), transport.value()
    transport.clear()
    return proto, transport


STATS = (
    "incomingOctetsWireLevel",
    "incomingOctetsWebSocketLevel",
    "incomingOctetsAppLevel",
    "incomingWebSocketFrames",
    "incomingWebSocketMessages",
    "outgoingOctetsWireLevel",
    "outgoingOctetsWebSocketLevel",
    "outgoingOctetsAppLevel",
    "outgoingWebSocketFrames",
    "outgoingWebSocketMessages",
)


class _Both(TestCase):
    """Runs the same input through a fast and an autobahn-only protocol."""

    def tearDown(self) -> None:
        for call in list(reactor.getDelayedCalls()):  # type: ignore[attr-defined]
            if "autobahn" in repr(call.func) or "txaio" in repr(call.func):
                call.cancel()

    def outcome(
        self, fast: bool, chunks: list[bytes], sends: Sequence[bytes] = (), drop: bool = True
    ) -> dict[str, Any]:
        proto, transport = connect(fast, drop)
        for chunk in chunks:
            proto.dataReceived(chunk)
        for body in sends:
            if proto.state == WebSocketProtocol.STATE_OPEN:
                proto.sendMessage(body, isBinary=True)
        result = {
            "events": list(proto.events),
            "written": transport.value(),
            "state": proto.state,
            "disconnected": transport.disconnected,
            "buffered": proto.data,
            "failed": (proto.failedByMe, proto.wasNotCleanReason),
            "stats": {name: getattr(proto.trafficStats, name) for name in STATS},
        }
        if proto.state != WebSocketProtocol.STATE_CLOSED:
            proto.connectionLost(Failure(ConnectionDone()))
        return result

    def assertSame(
        self, chunks: list[bytes], sends: Sequence[bytes] = (), drop: bool = True
    ) -> dict[str, Any]:
        """
        The outcome of C{chunks} received then C{sends} sent, the same with
        the fast path and without; C{drop}: autobahn's failByDrop (the
        gateway's default: a failed connection is dropped, no close frame).
        """
        autobahn_only = self.outcome(False, chunks, sends, drop)
        fast = self.outcome(True, chunks, sends, drop)
        self.assertEqual(fast, autobahn_only)
        return fast

    def close_code(self, out: dict[str, Any]) -> int:
        """The code of the close frame the server wrote last."""
        written = out["written"]
        at = written.rindex(b"\x88")
        return int(struct.unpack(">H", written[at + 2 : at + 4])[0])


class UnmaskTests(TestCase):
    def test_sizes_match_autobahn(self) -> None:
        for n in SIZES:
            payload = os.urandom(n)
            mask = os.urandom(4)
            expected = create_xor_masker(mask, n).process(payload) if n else b""
            self.assertEqual(unmask(mask, payload), expected, n)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(min_size=4, max_size=4), st.binary(max_size=3000))
    def test_random_masks_match_autobahn(self, mask: bytes, payload: bytes) -> None:
        expected = create_xor_masker(mask, len(payload)).process(payload) if payload else b""
        self.assertEqual(unmask(mask, payload), expected)

    def test_unmasking_twice_is_the_identity(self) -> None:
        payload = b"\x00\xff" * 100
        self.assertEqual(unmask(b"abcd", unmask(b"abcd", payload)), payload)


class ReceiveTests(_Both):
    def test_sizes(self) -> None:
        for n in SIZES:
            payload = os.urandom(n)
            out = self.assertSame([frame(payload, mask=os.urandom(4))])
            self.assertEqual(out["events"], [("message", payload, True)], n)

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.tuples(st.binary(min_size=4, max_size=4), st.binary(max_size=400)), max_size=6),
        st.lists(st.integers(min_value=1, max_value=500), max_size=6),
    )
    def test_random_frames_and_chunking(
        self, messages: list[tuple[bytes, bytes]], cuts: list[int]
    ) -> None:
        wire = b"".join(frame(payload, mask=mask) for mask, payload in messages)
        chunks, rest = [], wire
        for cut in cuts:
            chunks.append(rest[:cut])
            rest = rest[cut:]
        chunks.append(rest)
        out = self.assertSame(chunks)
        self.assertEqual(out["events"], [("message", p, True) for _, p in messages])
        self.tearDown()

    def test_byte_by_byte(self) -> None:
        wire = frame(b"hello" * 40) + frame(b"") + frame(b"x")
        out = self.assertSame([wire[i : i + 1] for i in range(len(wire))])
        self.assertEqual(len(out["events"]), 3)

    def test_fragmented_message(self) -> None:
        wire = frame(b"one", fin=False) + frame(b"two", opcode=0, fin=False)
        wire += frame(b"ping!", opcode=9) + frame(b"three", opcode=0) + frame(b"after")
        out = self.assertSame([wire])
        self.assertEqual(
            out["events"],
            [("ping", b"ping!"), ("message", b"onetwothree", True), ("message", b"after", True)],
        )

    def test_ping_pong(self) -> None:
        out = self.assertSame([frame(b"are you there", opcode=9) + frame(b"yes", opcode=10)])
        self.assertEqual(out["events"], [("ping", b"are you there"), ("pong", b"yes")])
        self.assertEqual(out["written"], b"\x8a\x0dare you there")

    def test_text_message(self) -> None:
        out = self.assertSame([frame("zürich".encode(), opcode=1)])
        self.assertEqual(out["events"], [("message", "zürich".encode(), False)])

    def test_invalid_utf8_text(self) -> None:
        out = self.assertSame([frame(b"\xff\xfe", opcode=1)])
        self.assertTrue(out["disconnected"])
        self.assertIn("invalid UTF-8", out["failed"][1])
        out = self.assertSame([frame(b"\xff\xfe", opcode=1)], drop=False)
        self.assertEqual(self.close_code(out), 1007)

    def test_close_codes(self) -> None:
        out = self.assertSame([frame(struct.pack(">H", 1000) + b"bye", opcode=8)])
        self.assertEqual(out["written"], b"\x88\x02\x03\xe8")  # echoes 1000
        # autobahn answers any code with 1000 (echoCloseCodeReason is off).
        out = self.assertSame([frame(struct.pack(">H", 4001), opcode=8)])
        self.assertEqual(out["written"], b"\x88\x02\x03\xe8")
        out = self.assertSame([frame(struct.pack(">H", 999), opcode=8)], drop=False)
        self.assertEqual(self.close_code(out), 1002)  # an invalid code
        out = self.assertSame([frame(b"", opcode=8)])
        self.assertEqual(out["written"], b"\x88\x02\x03\xe8")

    def test_protocol_violations(self) -> None:
        for wire in (
            frame(b"plain", mask=None),  # unmasked client frame
            frame(b"x", rsv=1),
            frame(b"x", opcode=3),  # reserved opcode
            frame(b"x", opcode=0),  # continuation outside a message
            frame(b"x" * 10, length_form=1),  # non-minimal 16-bit length
            frame(b"x" * 200, length_form=2),  # non-minimal 64-bit length
            frame(b"x", fin=False) + frame(b"y"),  # new message inside a fragmented one
        ):
            out = self.assertSame([wire + frame(b"never")])
            self.assertTrue(out["disconnected"], wire)
            self.assertTrue(out["failed"][0], wire)
            self.assertNotIn(("message", b"never", True), out["events"])
            out = self.assertSame([wire + frame(b"never")], drop=False)
            self.assertEqual(self.close_code(out), 1002, wire)

    def test_oversize_frames_rejected(self) -> None:
        for wire in (
            frame(b"x" * (MAX_FRAME + 1)),
            frame(b"x" * 60_000, fin=False) + frame(b"x" * 60_000, opcode=0),  # message limit
            frame(b"x" * (MAX_FRAME + 1))[:20],  # rejected on the header alone
        ):
            out = self.assertSame([wire])
            self.assertTrue(out["disconnected"])
            self.assertIn("exceeds payload limit", out["failed"][1])
            self.assertFalse([e for e in out["events"] if e[0] == "message"])
            out = self.assertSame([wire], drop=False)
            self.assertEqual(self.close_code(out), 1009)

    def test_frames_after_close_are_ignored(self) -> None:
        out = self.assertSame([frame(struct.pack(">H", 1000), opcode=8) + frame(b"late")])
        self.assertFalse([e for e in out["events"] if e[0] == "message"])

    def test_the_fast_path_takes_plain_frames(self) -> None:
        proto, _transport = connect(True)
        self.addCleanup(proto.connectionLost, Failure(ConnectionDone()))
        taken = []
        slow = WebSocketServerProtocol.processData
        self.patch(WebSocketServerProtocol, "processData", lambda p: taken.append(1) or slow(p))
        proto.dataReceived(frame(b"a") + frame(b"b" * 300))
        short = frame(b"s" * INT_XOR_MAX)
        proto.dataReceived(short[:1000])  # cut by the TCP read: waits in the buffer
        self.assertEqual(proto.data, short[:1000])
        proto.dataReceived(short[1000:])
        self.assertEqual(taken, [])
        long = frame(b"l" * (INT_XOR_MAX + 1))
        proto.dataReceived(long[:1000])  # autobahn takes it in pieces
        self.assertTrue(taken)
        proto.dataReceived(long[1000:])
        taken.clear()
        proto.dataReceived(frame(b"c", fin=False) + frame(b"d", opcode=0))
        self.assertTrue(taken)
        self.assertEqual(
            [e[1] for e in proto.events],
            [b"a", b"b" * 300, b"s" * INT_XOR_MAX, b"l" * (INT_XOR_MAX + 1), b"cd"],
        )


class SendTests(_Both):
    def test_sizes(self) -> None:
        bodies = [os.urandom(n) for n in SIZES]
        out = self.assertSame([], bodies)
        self.assertTrue(out["written"].startswith(b"\x82\x00\x82\x01"))

    def test_falls_back_for_what_it_does_not_frame(self) -> None:
        proto, transport = connect(True)
        self.addCleanup(proto.connectionLost, Failure(ConnectionDone()))
        proto.sendMessage(b"abc", isBinary=True, fragmentSize=2)
        proto.sendMessage(b"text", isBinary=False)
        self.assertEqual(transport.value(), b"\x02\x02ab\x80\x01c\x81\x04text")

    def test_oversize_send_raises_as_autobahn_does(self) -> None:
        from autobahn.exception import PayloadExceededError

        for fast in (True, False):
            proto, _transport = connect(fast)
            self.addCleanup(proto.connectionLost, Failure(ConnectionDone()))
            with self.assertRaises(PayloadExceededError):
                proto.sendMessage(b"x" * (MAX_MESSAGE + 1), isBinary=True)


class VersionTests(TestCase):
    def test_verified(self) -> None:
        self.assertTrue(verified("26.11.1"))
        self.assertTrue(verified("26.12.0"))
        self.assertFalse(verified("26.10.9"))
        self.assertFalse(verified("27.1.0"))
        self.assertFalse(verified("25.12.2"))
        self.assertFalse(verified("unknown"))

    def test_pyproject_pins_the_verified_range(self) -> None:
        text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
        [spec] = re.findall(r'"autobahn([^"]*)"', text)
        (low_major, low_minor), (high_major, high_minor) = wsfast.VERIFIED
        self.assertEqual(spec, f">={low_major}.{low_minor},<{high_major}")
        self.assertEqual(high_minor, 0)

    def test_enabled_on_the_installed_autobahn(self) -> None:
        # Fails when an autobahn outside VERIFIED is installed: check the
        # fingerprints below against the new version, then widen VERIFIED.
        self.assertTrue(wsfast.ENABLED, autobahn.__version__)
        self.assertTrue(issubclass(_Adapter, FastServerProtocol))
        self.assertTrue(_Adapter.fast_framing)


#: sha256 (first 16 hex digits) of the source of the autobahn methods that the
#: fast path stands in for, or whose state and attributes it reads and keeps,
#: in autobahn 26.11.1.
FINGERPRINTS = {
    "WebSocketProtocol._dataReceived": "b6616694f9d65410",
    "WebSocketProtocol.consumeData": "aaa88196e762438f",
    "WebSocketProtocol.processData": "25b9c1387a46ab25",
    "WebSocketProtocol.onFrameBegin": "9537027007767ae4",
    "WebSocketProtocol.onFrameData": "b39b40e3d1702273",
    "WebSocketProtocol.onFrameEnd": "c45a45b9bf333417",
    "WebSocketProtocol.onMessageBegin": "1c5cb3b3e3eb227b",
    "WebSocketProtocol.onMessageFrameBegin": "68c4eae4de95e1fb",
    "WebSocketProtocol.onMessageFrameData": "23e4805e8f059816",
    "WebSocketProtocol.onMessageFrameEnd": "00c94dd299eb55fc",
    "WebSocketProtocol.onMessageFrame": "f125b1f1668fa11c",
    "WebSocketProtocol.onMessageEnd": "efff2a43ca8540d0",
    "WebSocketProtocol.sendMessage": "048d6bcf0d712309",
    "WebSocketProtocol.sendFrame": "89cc8b024c413aa0",
    "WebSocketProtocol.sendData": "5dcca425b048b07e",
    "WebSocketProtocol._connectionMade": "7ac58d8bb6c3c752",
    "WebSocketAdapterProtocol.dataReceived": "7997f762de218433",
    "WebSocketAdapterProtocol._onMessage": "a8cece711929bc21",
}


def fingerprint(qualname: str) -> str:
    owner, name = qualname.split(".")
    cls = {
        "WebSocketProtocol": WebSocketProtocol,
        "WebSocketAdapterProtocol": WebSocketAdapterProtocol,
    }[owner]
    source = inspect.getsource(cls.__dict__[name])
    return hashlib.sha256(source.encode()).hexdigest()[:16]


class FingerprintTests(TestCase):
    def test_autobahn_internals_unchanged(self) -> None:
        # A mismatch means autobahn changed code the fast path mirrors: read the
        # new version of each method named, adjust imserver/gateway/wsfast.py
        # where needed (its fallback conditions, counters, attribute names),
        # run this module, then record the new fingerprints.
        changed = {
            name: fingerprint(name)
            for name, expected in FINGERPRINTS.items()
            if fingerprint(name) != expected
        }
        self.assertEqual(changed, {}, f"autobahn {autobahn.__version__}")
