"""
The protocol test vectors (docs/vectors/, README.md there) against the real code:

* the committed JSON files are exactly what docs/vectors/generate.py writes;
* request vectors decode through L{imserver.wire} into their frame, pass the
  op's schema and encode back to the same bytes; replies and pushes decode
  into their frames (types included: 30.0 stays a float, big ints exact);
* malformed vectors fed to the gateway's L{ClientProtocol} (with the real op
  table) over both framings give the error they name, and close or not;
* the Python SDK (L{IMClientProtocol}) matches every reply to its request by
  id and hands pushes to C{on_push};
* a real C{twistd -n imserver} answers the same ops with the same shapes
  (keys and value types), so the hand-written replies stay true, and answers
  the malformed vectors, sent as raw bytes or WebSocket messages, as they say.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import msgpack
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver.chat.service import ChatService
from imserver.client import IMClientProtocol, RequestFailed
from imserver.config import LimitsConfig, ServerConfig
from imserver.errors import ErrorCode
from imserver.gateway.ops import business_ops
from imserver.gateway.protocol import ClientProtocol, Gateway
from imserver.services.registry import LocalRegistry
from imserver.services.tokens import TokenService
from imserver.wire import frames
from imserver.wire.codec import decode_body, encode, pack
from imserver.wire.framing import FrameDecoder
from tests.harness import REPO, ServerProcess
from tests.support import ClientsMixin, eventually, within
from tests.test_websocket import ws_client

VECTORS = Path(REPO) / "docs" / "vectors"
Vector = dict[str, Any]


def generator() -> ModuleType:
    """docs/vectors/generate.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("imserver_vectors", VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str) -> list[Vector]:
    with open(VECTORS / name, encoding="utf-8") as f:
        vectors: list[Vector] = json.load(f)["vectors"]
    return vectors


def native(value: Any) -> Any:
    """A vector's JSON value as msgpack decodes it ({"$int"}, {"$float"}, {"$bin"})."""
    if isinstance(value, dict):
        if value.keys() == {"$int"}:
            return int(value["$int"])
        if value.keys() == {"$float"}:
            return float(value["$float"])
        if value.keys() == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: native(v) for k, v in value.items()}
    if isinstance(value, list):
        return [native(v) for v in value]
    return value


def mismatch(actual: Any, expected: Any, path: str = "$") -> str | None:
    """Where two decoded values differ, types included (1, 1.0 and True are three values)."""
    if type(actual) is not type(expected):
        return f"{path}: {actual!r} is not {expected!r}"
    if isinstance(expected, dict):
        if actual.keys() != expected.keys():
            return f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            found = mismatch(actual[key], expected[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(expected, list):
        if len(actual) != len(expected):
            return f"{path}: {len(actual)} items, not {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            found = mismatch(a, e, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if actual == expected else f"{path}: {actual!r} != {expected!r}"


class Same:
    def assertSame(self, actual: Any, expected: Any, name: str) -> None:
        found = mismatch(actual, expected)
        if found:
            cast(SynchronousTestCase, self).fail(f"{name}: {found}")


REQUESTS = load("requests.json")
REPLIES = load("replies.json")
PUSHES = load("pushes.json")
MALFORMED = load("malformed.json")
#: Every vector with a frame a client sends, by the name replies refer to.
SENT = {v["name"]: v for v in REQUESTS} | {
    f"malformed/{v['name']}": v for v in MALFORMED if v["frame"] is not None
}


class FilesTests(SynchronousTestCase):
    def test_committed_files_are_the_generators_output(self) -> None:
        for name, content in generator().build().items():
            self.assertEqual(
                (VECTORS / name).read_text(encoding="utf-8"),
                content,
                f"docs/vectors/{name} is stale: run python docs/vectors/generate.py",
            )

    def test_names_are_unique(self) -> None:
        for vectors in (REQUESTS, REPLIES, PUSHES, MALFORMED):
            names = [v["name"] for v in vectors]
            self.assertEqual(len(names), len(set(names)))

    def test_hex_is_the_prefixed_body(self) -> None:
        for v in REQUESTS + REPLIES + PUSHES + MALFORMED:
            if v["body_hex"] is None:
                continue
            body = bytes.fromhex(v["body_hex"])
            self.assertEqual(bytes.fromhex(v["hex"]), len(body).to_bytes(4, "big") + body)

    def test_max_frame_bytes_is_the_servers_default(self) -> None:
        with open(VECTORS / "malformed.json", encoding="utf-8") as f:
            self.assertEqual(json.load(f)["max_frame_bytes"], ServerConfig().max_frame_bytes)


class CoverageTests(SynchronousTestCase):
    """Every op, reply, error code and push of docs/protocol.md has vectors."""

    def test_every_op_has_a_request_and_an_ok_reply(self) -> None:
        ops = {v["frame"]["t"] for v in REQUESTS}
        self.assertEqual(ops, set(frames.REQUESTS))
        answered = {SENT[v["request"]]["frame"]["t"] for v in REPLIES if v["frame"]["t"] == "ok"}
        self.assertEqual(answered, set(frames.REQUESTS))

    def test_every_error_code_has_a_vector(self) -> None:
        codes = {v["frame"]["code"] for v in REPLIES + PUSHES if v["frame"]["t"] == "error"}
        codes |= {v["reply"]["code"] for v in MALFORMED}
        self.assertEqual(codes, {str(code) for code in ErrorCode})

    def test_every_push(self) -> None:
        pushes = {v["frame"]["t"] for v in PUSHES}
        expected = "msg read recall edit delivered hide clear mute typing presence profile"
        expected += " block kick goaway sync error"
        self.assertEqual(pushes, set(expected.split()))
        reasons = {v["frame"]["reason"] for v in PUSHES if v["frame"]["t"] == "kick"}
        self.assertEqual(reasons, {"replaced", "too_many_devices", "logged_out", "revoked"})

    def test_catchup_has_every_stream_event(self) -> None:
        [page] = [v for v in REPLIES if v["name"] == "ok/catchup"]
        kinds = [e["t"] for e in page["frame"]["events"]]
        self.assertEqual(set(kinds), {"msg", "read", "recall", "mute", "edit", "hide", "clear"})


class WireTests(Same, SynchronousTestCase):
    """The server's wire layer (imserver.wire) on the vectors."""

    def test_requests_decode_validate_and_encode_exactly(self) -> None:
        for v in REQUESTS:
            self.assertTrue(v["exact"])
            body = bytes.fromhex(v["body_hex"])
            frame = native(v["frame"])
            decoded = decode_body(body)
            self.assertSame(decoded, frame, v["name"])
            self.assertEqual(list(decoded), list(frame), "key order")
            request = frames.parse_request(decoded)
            self.assertEqual((request.op, request.id), (frame["t"], frame["id"]))
            self.assertEqual(encode(frame), bytes.fromhex(v["hex"]), v["name"])
            self.assertEqual(pack(frame), body, v["name"])

    def test_tcp_frames_cut_back_into_bodies(self) -> None:
        """All the server-bound vectors as one stream, fed a byte at a time."""
        stream = b"".join(bytes.fromhex(v["hex"]) for v in REQUESTS)
        decoder = FrameDecoder(ServerConfig().max_frame_bytes)
        bodies = [body for i in range(len(stream)) for body in decoder.feed(stream[i : i + 1])]
        self.assertEqual(bodies, [bytes.fromhex(v["body_hex"]) for v in REQUESTS])

    def test_replies_and_pushes_decode(self) -> None:
        for v in REPLIES + PUSHES:
            self.assertFalse(v["exact"])
            decoded = decode_body(bytes.fromhex(v["body_hex"]))
            self.assertSame(decoded, native(v["frame"]), v["name"])

    def test_replies_answer_their_request(self) -> None:
        for v in REPLIES:
            self.assertIn(v["frame"]["t"], ("ok", "error"))
            self.assertEqual(v["frame"]["id"], SENT[v["request"]]["frame"]["id"], v["name"])

    def test_pushes_have_no_id(self) -> None:
        for v in PUSHES:
            self.assertNotIn("id", v["frame"], v["name"])

    def test_floats_stay_floats(self) -> None:
        [auth] = [v for v in REPLIES if v["name"] == "ok/auth"]
        self.assertEqual(auth["frame"]["heartbeat"], {"$float": 30.0})
        heartbeat = decode_body(bytes.fromhex(auth["body_hex"]))["heartbeat"]
        self.assertIs(type(heartbeat), float)


class _NoChat:
    """The business layer is never reached: every malformed vector fails before."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a malformed frame reached ChatService.{name}")


class MalformedGatewayTests(SynchronousTestCase):
    """Malformed vectors through the gateway's state machine and the real op table."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_764_400_000)
        self.tokens = TokenService("vectors-unit-secret-0123456789abcdef")
        self.gateway = Gateway(
            config=ServerConfig(),
            clock=self.clock,
            tokens=self.tokens,
            presence=LocalRegistry(),
            ops=business_ops(cast(ChatService, _NoChat()), LimitsConfig()),
        )

    def connect(self, websocket: bool) -> tuple[ClientProtocol, StringTransport]:
        proto = self.gateway.buildProtocol(None)
        assert proto is not None
        if websocket:
            proto.use_message_framing()
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def feed(self, proto: ClientProtocol, websocket: bool, v: Vector) -> None:
        if websocket:
            proto.frames_received([bytes.fromhex(v["body_hex"])])
        else:
            proto.dataReceived(bytes.fromhex(v["hex"]))

    def received(self, transport: StringTransport, websocket: bool) -> list[dict[str, Any]]:
        data = transport.value()
        transport.clear()
        if websocket:  # one write per message: the bodies follow each other
            unpacker = msgpack.Unpacker(raw=False)
            unpacker.feed(data)
            return list(unpacker)
        return [decode_body(b) for b in FrameDecoder(2**20).feed(data)]

    def auth(self, proto: ClientProtocol, transport: StringTransport, websocket: bool) -> None:
        token = self.tokens.mint(42, now=self.clock.seconds(), ttl_seconds=60)
        auth = {"t": "auth", "id": 1, "token": token}
        if websocket:
            proto.frames_received([pack(auth)])
        else:
            proto.dataReceived(encode(auth))
        [reply] = self.received(transport, websocket)
        self.assertEqual((reply["t"], reply["uid"]), ("ok", 42))

    def check(self, v: Vector, websocket: bool) -> None:
        name = f"{v['name']} ({'websocket' if websocket else 'tcp'})"
        proto, transport = self.connect(websocket)
        if v["state"] == "ready":
            self.auth(proto, transport, websocket)
        self.feed(proto, websocket, v)
        replies = self.received(transport, websocket)
        self.assertEqual(len(replies), 1, f"{name}: {replies}")
        [reply] = replies
        expected = v["reply"]
        self.assertEqual((reply["t"], reply.get("code")), ("error", expected["code"]), name)
        self.assertEqual(reply.get("id"), expected.get("id"), name)
        self.assertIsInstance(reply["message"], str)
        self.assertEqual(bool(transport.disconnecting), v["closes"], name)
        if v["closes"]:
            return
        # Still open, and in the state it was: a ping is answered (or auth is).
        if v["state"] == "ready":
            ping = {"t": "ping", "id": 99}
            self.feed(proto, websocket, {"hex": encode(ping).hex(), "body_hex": pack(ping).hex()})
            [pong] = self.received(transport, websocket)
            self.assertEqual((pong["t"], pong["id"]), ("ok", 99), name)
        else:
            self.auth(proto, transport, websocket)

    def test_malformed_over_tcp(self) -> None:
        for v in MALFORMED:
            if "tcp" in v["transports"]:
                self.check(v, websocket=False)

    def test_malformed_over_websocket(self) -> None:
        """The frame bodies as WebSocket messages (the gateway's message framing)."""
        for v in MALFORMED:
            if "websocket" in v["transports"]:
                self.check(v, websocket=True)


class PythonSDKTests(Same, SynchronousTestCase):
    """The Python SDK's low-level protocol: requests out, replies and pushes in."""

    def connect(self) -> tuple[IMClientProtocol, StringTransport]:
        proto = IMClientProtocol()
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_requests_are_written_as_the_vectors(self) -> None:
        proto, transport = self.connect()
        for v in REQUESTS:
            frame = native(v["frame"])
            proto._ids = itertools.count(frame["id"])
            fields = {k: x for k, x in frame.items() if k not in ("t", "id")}
            proto.request(frame["t"], **fields).addErrback(lambda _: None)
            self.assertEqual(transport.value(), bytes.fromhex(v["hex"]), v["name"])
            transport.clear()

    def test_replies_are_matched_to_their_requests(self) -> None:
        for v in REPLIES:
            proto, _ = self.connect()
            sent = native(SENT[v["request"]]["frame"])
            proto._ids = itertools.count(sent["id"])
            pushes: list[dict[str, Any]] = []
            proto.on_push = pushes.append
            fields = {k: x for k, x in sent.items() if k not in ("t", "id")}
            d = proto.request(sent["t"], **fields)
            outcome: list[Any] = []
            d.addBoth(outcome.append)
            data = bytes.fromhex(v["hex"])
            # In two reads, split mid-frame: the SDK reassembles.
            proto.dataReceived(data[:5])
            self.assertEqual(outcome, [])
            proto.dataReceived(data[5:])
            self.assertEqual(pushes, [], v["name"])
            [result] = outcome
            expected = native(v["frame"])
            if expected["t"] == "ok":
                self.assertSame(result, expected, v["name"])
            else:
                self.assertIsInstance(result, Failure)
                error = result.value
                self.assertIsInstance(error, RequestFailed)
                self.assertEqual(error.code, expected["code"])
                self.assertSame(error.frame, expected, v["name"])

    def test_pushes_go_to_on_push_in_order(self) -> None:
        proto, _ = self.connect()
        pushes: list[dict[str, Any]] = []
        proto.on_push = pushes.append
        stream = b"".join(bytes.fromhex(v["hex"]) for v in PUSHES)
        for i in range(0, len(stream), 7):
            proto.dataReceived(stream[i : i + 7])
        self.assertSame(pushes, [native(v["frame"]) for v in PUSHES], "pushes")


# ---------------------------------------------------------------------------
# A real server's replies have the vectors' shapes.


def paths(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path, type) of every value: lists merge their items (C{convs[].last.msg_id})."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, f"{prefix}.{key}")
    elif isinstance(value, list):
        for item in value:
            yield from paths(item, f"{prefix}[]")
    else:
        yield prefix, type(value).__name__


def shape(frame: dict[str, Any]) -> dict[str, set[str]]:
    """
    Every path of a frame and the types seen there. Nulls are left out: a
    null stands for a value that may be absent (C{last}, C{node}).
    """
    out: dict[str, set[str]] = {}
    for path, kind in paths(frame):
        if kind != "NoneType":
            out.setdefault(path, set()).add(kind)
    return out


BOB = 7


class RealServerTests(ClientsMixin, Same, TestCase):
    """
    A real C{twistd -n imserver}: one conversation (alice 42 on three
    devices, bob 7, carol 9) touching every op, each reply and push compared
    with the vector of the same name by its paths and value types; and the
    malformed vectors as raw bytes on TCP and as WebSocket messages.
    """

    timeout = 120

    def setUp(self) -> None:
        self.server = ServerProcess({"server": {"auth_timeout_seconds": 1}}).start()
        self.addCleanup(self.server.stop)

    def assertShape(self, actual: dict[str, Any], v: Vector) -> None:
        expected = shape(native(v["frame"]))
        got = shape(actual)
        self.assertEqual(set(got), set(expected), f"{v['name']}: {actual}")
        for path, kinds in expected.items():
            self.assertEqual(got[path], kinds, f"{v['name']} at {path}: {actual}")

    async def test_replies_and_pushes_have_the_vectors_shapes(self) -> None:
        server = self.server
        real: dict[str, dict[str, Any]] = {}
        pushes: dict[str, list[dict[str, Any]]] = {"a": [], "a2": [], "b": []}

        async def connect(name: str, uid: int, **fields: Any) -> IMClientProtocol:
            client = await self.client(server.endpoint)
            client.on_push = pushes.setdefault(name, []).append
            reply = await within(client.request("auth", token=server.token(uid), **fields))
            real.setdefault("ok/auth" if "since" in fields else "ok/auth/new-device", reply)
            return client

        async def ask(name: str, client: IMClientProtocol, op: str, **fields: Any) -> Any:
            try:
                reply = await within(client.request(op, **fields))
            except RequestFailed as e:
                reply = e.frame
            real[name] = dict(reply)
            return reply

        carol = await connect("c", 9)
        await carol.close()
        # A device that has its stream (since): catch-up mode, so it stays out of the pushes.
        a3 = await connect("a3", 42, device="iphone-15", client="app/2.3", since=0)
        await ask("ok/set_profile", a3, "set_profile", nickname="alice", presence="everyone")
        await a3.close()
        b = await connect("b", BOB)
        await ask("ok/watch", b, "watch", uids=[42])
        a2 = await connect("a2", 42, device="ipad")
        a = await connect("a", 42, device="phone")
        await ask("ok/ping", a, "ping")
        await ask("ok/set_profile", a, "set_profile", nickname="alice", presence="everyone")
        await ask("ok/set_profile", b, "set_profile", nickname="bob", presence="everyone")
        sent = await ask("ok/send", a, "send", to=BOB, cid="c-1", type="text", body="hello")
        await ask("ok/send/dup", a, "send", to=BOB, cid="c-1", type="text", body="hello")
        await ask("ok/send", b, "send", to=42, cid="b-1", body="are you there?")
        card = {"title": "Lunch?", "lat": 52.52, "tags": ["a", "b"]}
        await ask("ok/send", b, "send", to=42, cid="b-2", type="card", body=card)
        session = sent["session_id"]
        await ask("ok/sync", a, "sync", limit=100)
        mine = [m["msg_id"] for m in real["ok/sync"]["msgs"]]
        await ask("ok/offline_summary", a, "offline_summary")
        await ask("ok/unread", a, "unread")
        await ask("ok/ack", a, "ack", msg_ids=mine)
        await ask("ok/ack/seq", a, "ack", seq=1)
        await ask("ok/read", b, "read", session_id=session, msg_id=sent["msg_id"])
        await ask("ok/read", a, "read", session_id=session, msg_id=mine[-1])
        await ask("ok/edit", a, "edit", msg_id=sent["msg_id"], body="hello, world")
        await ask("ok/history", a, "history", peer=BOB, limit=20)
        await ask("ok/convs", a, "convs", limit=20)
        await ask("ok/profile", a, "profile", uids=[42, BOB])
        await ask("ok/presence", a, "presence", uids=[BOB, 9])
        await ask("ok/typing", a, "typing", to=BOB, active=True)
        await ask("ok/mute", a, "mute", session_id=session, until=4102444800000)
        await ask("ok/block", a, "block", uid=9)
        await ask("ok/blocked", a, "blocked", after=0, limit=100)
        await ask("ok/unblock", a, "unblock", uid=9)
        await ask("ok/hide", a, "hide", msg_ids=[mine[0]])
        recall = await ask("ok/send", b, "send", to=42, cid="b-3", body="oops")
        await ask("ok/recall", b, "recall", msg_id=recall["msg_id"])
        await ask("ok/clear", a, "clear", session_id=session)
        await ask("ok/catchup", a, "catchup", after=0, limit=100)
        await ask("ok/devices", a, "devices")
        await ask("ok/watch/nobody", b, "watch", uids=[])
        await ask("error/no_such_user", a, "send", to=123456, cid="x", body="x")
        await ask("error/unknown_op", a, "teleport")
        await ask("error/invalid", a, "send", to="7", cid="c-1", body="hi")
        await ask("error/too_large", a, "sync", limit=501)
        await ask("error/not_found", a, "recall", msg_id=1)
        await ask("error/forbidden", a, "typing", to=9, active=True)
        await ask("ok/logout_device", a, "logout_device", device="ipad")
        await within(a2.closed)
        timeout = await self.client(server.endpoint)
        timeout_pushes = pushes["t"] = []
        timeout.on_push = timeout_pushes.append
        await within(timeout.closed)
        await eventually(lambda: any(p["t"] == "presence" for p in pushes["b"]))
        server.signal(signal.SIGTERM)
        await within(a.closed, 30)
        await within(b.closed, 30)  # every push to b came before its goaway

        by_name = {v["name"]: v for v in REPLIES + PUSHES}
        compared = set()
        for name, frame in real.items():
            self.assertShape(frame, by_name[name])
            compared.add(name)
        wanted_by = {
            ("a2", "msg", 42): "msg/own-device",
            ("a", "msg", BOB): "msg",
            ("a2", "read", BOB): "read",
            ("a2", "read", 42): "read/own-device",
        }
        for (who, kind, by), name in wanted_by.items():
            found = [p for p in pushes[who] if p["t"] == kind and p.get("by", p.get("from")) == by]
            self.assertTrue(found, f"no {kind} push by {by} to {who}: {pushes[who]}")
            self.assertShape(found[0], by_name[name])
            compared.add(name)
        wanted = {
            ("a", "recall"): "recall",
            ("b", "edit"): "edit",
            ("b", "delivered"): "delivered",
            ("a2", "hide"): "hide",
            ("a2", "clear"): "clear",
            ("a2", "mute"): "mute",
            ("b", "typing"): "typing",
            ("b", "presence"): "presence",
            ("a2", "profile"): "profile",
            ("a2", "block"): "block",
            ("a2", "kick"): "kick/logged_out",
            ("a", "goaway"): "goaway",
            ("t", "error"): "error/auth-timeout",
        }
        for (who, kind), name in wanted.items():
            found = [p for p in pushes[who] if p["t"] == kind]
            self.assertTrue(found, f"no {kind} push to {who}: {pushes[who]}")
            self.assertShape(found[0], by_name[name])
            compared.add(name)
        # Each op's main reply, and every push kind, was compared.
        for op in frames.REQUESTS:
            self.assertIn(f"ok/{op}", compared)

    async def test_malformed_frames_over_tcp(self) -> None:
        """The malformed vectors, as raw bytes on a TCP connection to the real server."""
        for v in MALFORMED:
            if "tcp" not in v["transports"]:
                continue
            client = await self.client(self.server.endpoint)
            if v["state"] == "ready":
                await within(client.auth(self.server.token(42)))
            client.send_raw(bytes.fromhex(v["hex"]))
            # An error frame answers no waiting request: the SDK hands it to on_push.
            reply = await within(client.next_push())
            expected = v["reply"]
            self.assertEqual((reply["t"], reply["code"]), ("error", expected["code"]), v["name"])
            self.assertEqual(reply.get("id"), expected.get("id"), v["name"])
            if v["closes"]:
                await within(client.closed)
            elif v["state"] == "ready":
                self.assertEqual((await within(client.request("ping")))["t"], "ok")
                self.assertEqual(client.pending_pushes, 0, v["name"])
            else:
                self.assertEqual((await within(client.auth(self.server.token(42))))["uid"], 42)
            await client.close()

    async def test_malformed_frames_over_websocket(self) -> None:
        """The malformed vectors' bodies as binary WebSocket messages to the real server."""
        for v in MALFORMED:
            if "websocket" not in v["transports"]:
                continue
            ready = v["state"] == "ready"
            token = self.server.token(42) if ready else None
            ws = await ws_client(self, self.server.ws_port, token)
            ws.sendMessage(bytes.fromhex(v["body_hex"]), isBinary=True)
            reply = await within(ws.im.next_push())
            expected = v["reply"]
            self.assertEqual((reply["t"], reply["code"]), ("error", expected["code"]), v["name"])
            self.assertEqual(reply.get("id"), expected.get("id"), v["name"])
            if v["closes"]:
                await within(ws.closed)
            elif ready:
                self.assertEqual((await within(ws.im.request("ping")))["t"], "ok")
                self.assertEqual(ws.im.pending_pushes, 0, v["name"])
            else:
                self.assertEqual((await within(ws.im.auth(self.server.token(42))))["uid"], 42)
            ws.sendClose(1000)
            await within(ws.closed)
