"""
The gateway never writes a frame larger than max_frame_bytes (issue 9,
defect 7's backstop): a reply that would be larger becomes an C{internal}
error for its request id (logged with the op), a push that would be larger
is dropped (logged). Replies are bounded by the chat layer already; this is
what keeps a client's decoder from refusing the stream (and closing) when a
bug or an unforeseen field makes one frame too big.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from imserver.gateway.protocol import ClientProtocol, Op
from imserver.wire import frames
from imserver.wire.codec import pack
from imserver.wire.framing import HEADER_SIZE
from tests.test_gateway import Client, GatewayTestsMixin


class Big(frames.Request):
    op = "big"


def _result_of_size(size: int) -> dict[str, Any]:
    """A result whose ok reply (id 5) is exactly C{size} bytes of msgpack body."""
    base = len(pack(frames.ok(5, {"pad": ""})))
    pad = size - base
    # A str header grows at 32 and 256 characters: adjust until exact.
    while len(pack(frames.ok(5, {"pad": "x" * pad}))) > size:
        pad -= 1
    result = {"pad": "x" * pad}
    assert len(pack(frames.ok(5, result))) == size, len(pack(frames.ok(5, result)))
    return result


class OutboundBoundTests(GatewayTestsMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.max = self.config.max_frame_bytes

    def logged(self, level: LogLevel) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_level") is level]

    def client_with(self, handler: Any) -> Client:
        self.gateway = self.make_gateway(big=Op(Big, handler))
        return self.authed(7)

    def test_a_reply_at_the_limit_is_written(self) -> None:
        client = self.client_with(lambda c, r: _result_of_size(self.max))
        client.send({"t": "big", "id": 5})
        [reply] = client.received()
        self.assertEqual(reply["t"], "ok")
        self.assertEqual(len(pack(reply)), self.max)

    def test_a_larger_reply_becomes_an_internal_error(self) -> None:
        client = self.client_with(lambda c, r: _result_of_size(self.max + 1))
        client.send({"t": "big", "id": 5})
        [reply] = client.received()
        self.assertEqual((reply["t"], reply["id"], reply["code"]), ("error", 5, "internal"), reply)
        self.assertIn("max_frame_bytes", reply["message"])
        self.assertFalse(client.closing)
        [event] = [e for e in self.logged(LogLevel.error) if e.get("op") == "big"]
        self.assertEqual((event["req_id"], event["uid"]), (5, 7))
        self.assertEqual(event["size"], self.max + 1 + HEADER_SIZE)
        self.assertEqual(self.gateway.oversized["reply"], 1)
        # The connection goes on.
        client.send({"t": "ping", "id": 6})
        self.assertEqual(client.received()[0]["t"], "ok")

    def test_a_larger_deferred_reply_becomes_an_internal_error(self) -> None:
        d: Deferred[dict[str, Any]] = Deferred()
        client = self.client_with(lambda c, r: d)
        client.send({"t": "big", "id": 5})
        d.callback(_result_of_size(10 * self.max))
        [reply] = client.received()
        self.assertEqual((reply["t"], reply["id"], reply["code"]), ("error", 5, "internal"))
        self.assertTrue([e for e in self.logged(LogLevel.error) if e.get("op") == "big"])

    def test_a_larger_push_is_dropped(self) -> None:
        client = self.authed(9)
        proto = client.proto
        assert isinstance(proto, ClientProtocol)
        proto.push(frames.push("msg", body="x" * (2 * self.max)))
        proto.push(frames.push("msg", body="small"))
        [pushed] = client.received()
        self.assertEqual(pushed["body"], "small")
        self.assertFalse(client.closing)
        [event] = [e for e in self.logged(LogLevel.warn) if e.get("push") == "msg"]
        self.assertEqual(event["uid"], 9)
        self.assertEqual(self.gateway.oversized["push"], 1)
