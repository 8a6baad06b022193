"""
L{imserver.client.Client} on fakes: a fake connector hands out real
L{IMClientProtocol}s over StringTransports, a test plays the server frame by
frame, and a Clock drives every timer (heartbeat, backoff, acks, the seq
gap), so each rule of docs/sdk.md is checked exactly and without waiting.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from imserver.client import (
    Client,
    Edit,
    IMClientProtocol,
    JSONFileStore,
    MemoryStore,
    Message,
    Read,
    RequestFailed,
    StateChanged,
)
from imserver.client import client as client_module
from imserver.client.backoff import Backoff
from imserver.wire.codec import decode_body, encode
from imserver.wire.framing import FrameDecoder

UID = 42
PEER = 7


class FixedRandom:
    """A random source that always answers C{value} (jitter made exact)."""

    def __init__(self, value: float = 0.5) -> None:
        self.value = value
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        return self.value


class ManualThreads:
    """A fake C{run_in_thread}: the test runs each queued call when it likes."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self) -> None:
        f, args, d = self.calls.pop(0)
        d.callback(f(*args))

    def fail(self, error: Exception) -> None:
        _f, _args, d = self.calls.pop(0)
        d.errback(error)


class FakeConn:
    """The server's end of one connection."""

    def __init__(self, proto: IMClientProtocol) -> None:
        self.proto = proto
        self.transport = StringTransport()
        proto.makeConnection(self.transport)
        self._decoder = FrameDecoder(1 << 20)
        self._frames: list[dict[str, Any]] = []

    def frames(self) -> list[dict[str, Any]]:
        """Every frame the client wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        self._frames.extend(dict(decode_body(b)) for b in self._decoder.feed(data))
        frames, self._frames = self._frames, []
        return frames

    def take(self, op: str) -> dict[str, Any]:
        """The first unread frame of C{op} (others stay unread)."""
        data = self.transport.value()
        self.transport.clear()
        self._frames.extend(dict(decode_body(b)) for b in self._decoder.feed(data))
        for i, frame in enumerate(self._frames):
            if frame["t"] == op:
                return self._frames.pop(i)
        raise AssertionError(f"no {op} frame among {self._frames}")

    def ops(self) -> list[str]:
        return [f["t"] for f in self.frames()]

    def reply(self, request: dict[str, Any], **fields: Any) -> None:
        self.proto.dataReceived(encode({"t": "ok", "id": request["id"], **fields}))

    def error(self, request: dict[str, Any], code: str) -> None:
        self.proto.dataReceived(
            encode({"t": "error", "id": request["id"], "code": code, "message": code})
        )

    def push(self, **frame: Any) -> None:
        self.proto.dataReceived(encode(frame))

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))

    def live(
        self,
        seq: int = 0,
        head: int | None = None,
        events: list[dict[str, Any]] | None = None,
        msgs: list[dict[str, Any]] | None = None,
        **auth: Any,
    ) -> dict[str, Any]:
        """Answer auth, one catchup page and one sync page: the auth request."""
        request = self.take("auth")
        self.reply(
            request,
            uid=UID,
            heartbeat=30.0,
            server_time=0,
            device=request.get("device"),
            seq=seq,
            head=head if head is not None else seq,
            new_device=False,
            **auth,
        )
        catchup = self.take("catchup")
        last = max([seq, *(e["seq"] for e in events or [])])
        self.reply(catchup, events=events or [], seq=last, more=False)
        self.reply(self.take("sync"), msgs=msgs or [], more=False)
        return request


class FakeServer:
    """The connector: every connect attempt waits for the test to accept or refuse it."""

    def __init__(self) -> None:
        self.attempts: list[Deferred[IMClientProtocol]] = []
        self.urls: list[str] = []

    def connector(self, reactor: Any, url: str) -> Deferred[IMClientProtocol]:
        d: Deferred[IMClientProtocol] = Deferred()
        self.attempts.append(d)
        self.urls.append(url)
        return d

    def accept(self) -> FakeConn:
        conn = FakeConn(IMClientProtocol())
        self.attempts.pop(0).callback(conn.proto)
        return conn

    def refuse(self) -> None:
        self.attempts.pop(0).errback(ConnectionRefusedError())


def msg(msg_id: int, seq: int | None = None, frm: int = PEER, to: int = UID, **extra: Any) -> Any:
    frame = {
        "t": "msg",
        "msg_id": msg_id,
        "session_id": 99,
        "from": frm,
        "to": to,
        "cid": f"c{msg_id}",
        "type": "text",
        "body": f"m{msg_id}",
        "ts": 1,
        "sender": {"nickname": "", "avatar": ""},
        **extra,
    }
    if seq is not None:
        frame["seq"] = seq
    return frame


class ClientTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.server = FakeServer()
        self.random = FixedRandom(0.5)
        self.events: list[Any] = []

    def make(self, token: Any = "tok", **options: Any) -> Client:
        options.setdefault("device", "dev1")
        client = Client(
            "tcp://127.0.0.1:7000",
            token,
            reactor=self.clock,
            connector=self.server.connector,
            random=self.random,
            **options,
        )
        for name in ("message", "read", "edit", "recall", "reset", "kick", "typing"):
            client.on(name, self.events.append)
        self.states: list[StateChanged] = []
        client.on("state", self.states.append)
        return client

    def started(self, **options: Any) -> tuple[Client, FakeConn]:
        client = self.make(**options)
        client.start()
        conn = self.server.accept()
        conn.live()
        self.assertEqual(client.state, "live")
        conn.frames()
        return client, conn

    def messages(self) -> list[int]:
        return [e.msg["msg_id"] for e in self.events if isinstance(e, Message)]

    def result(self, d: Deferred[Any]) -> Any:
        return self.successResultOf(d)


class ConnectTests(ClientTestCase):
    def test_auth_catchup_sync_then_live(self) -> None:
        """auth {token, device, client, since}, catch-up pages (ack {seq} each), sync pages."""
        client = self.make()
        client.start()
        self.assertEqual(client.state, "connecting")
        conn = self.server.accept()
        auth = conn.take("auth")
        self.assertEqual(auth["token"], "tok")
        self.assertEqual(auth["device"], "dev1")
        self.assertEqual(auth["since"], 0)
        self.assertTrue(auth["client"].startswith("imserver-py/"))
        conn.reply(auth, uid=UID, heartbeat=30.0, seq=0, head=3, new_device=False)
        self.assertEqual(client.state, "syncing")
        self.assertEqual(client.uid, UID)
        page = conn.take("catchup")
        self.assertEqual(page["after"], 0)
        conn.reply(page, events=[msg(1, seq=1), msg(2, seq=2)], seq=2, more=True)
        self.assertEqual(conn.take("ack"), {"t": "ack", "id": 3, "msg_ids": [1, 2], "seq": 2})
        page = conn.take("catchup")
        self.assertEqual(page["after"], 2)
        # A push that arrives meanwhile waits for the end of catch-up.
        conn.push(t="typing", **{"from": PEER, "active": True})
        conn.reply(
            page,
            events=[{"t": "read", "session_id": 99, "by": PEER, "msg_id": 5, "seq": 3}],
            seq=3,
            more=False,
        )
        self.assertEqual(conn.take("ack")["seq"], 3)
        sync = conn.take("sync")
        conn.reply(sync, msgs=[msg(2), msg(4)], more=True, after=4)
        sync = conn.take("sync")
        self.assertEqual(sync["after"], 4)
        self.assertEqual(client.state, "syncing")
        self.assertEqual(len([e for e in self.events if e.name == "typing"]), 0)
        conn.reply(sync, msgs=[], more=False)
        self.assertEqual(client.state, "live")
        self.assertEqual(self.messages(), [1, 2, 4])
        self.assertTrue(all(e.replay for e in self.events if isinstance(e, (Message, Read))))
        self.assertEqual(self.events[-1].name, "typing")
        self.assertEqual(client.seq, 3)
        self.assertEqual([s.state for s in self.states], ["connecting", "syncing", "live"])
        self.successResultOf(client.wait_live())

    def test_new_device_starts_at_head(self) -> None:
        client = self.make()
        client.start()
        conn = self.server.accept()
        conn.live(seq=17)
        self.assertEqual(client.seq, 17)

    def test_reset(self) -> None:
        """reset: true emits reset and continues from the auth reply's seq."""
        store = MemoryStore()
        store.save({"device": "dev1", "seq": 50, "outbox": []})
        client = self.make(store=store)
        client.start()
        conn = self.server.accept()
        self.assertEqual(conn.live(seq=10, reset=True)["since"], 50)
        self.assertEqual([e.name for e in self.events], ["reset"])
        self.assertEqual(client.seq, 10)

    def test_token_callable(self) -> None:
        tokens = iter(["t1", "t2"])
        client = self.make(token=lambda: next(tokens))
        client.start()
        conn = self.server.accept()
        self.assertEqual(conn.live()["token"], "t1")
        conn.lose()
        self.clock.advance(1)
        conn = self.server.accept()
        self.assertEqual(conn.live()["token"], "t2")

    def test_tokens_from_deferred(self) -> None:
        d: Deferred[str] = Deferred()
        client = self.make(token=lambda: d)
        client.start()
        self.assertEqual(self.server.attempts, [])
        d.callback("later")
        self.assertEqual(self.server.accept().live()["token"], "later")
        self.assertEqual(client.state, "live")

    def test_auth_failed_static_token(self) -> None:
        client = self.make()
        client.start()
        conn = self.server.accept()
        conn.error(conn.take("auth"), "auth_failed")
        self.assertEqual(client.state, "failed")
        self.clock.advance(100)
        self.assertEqual(self.server.attempts, [])
        self.assertEqual(
            self.failureResultOf(client.wait_live(), RequestFailed).value.code, "auth_failed"
        )

    def test_auth_failed_callable_token_retries(self) -> None:
        client = self.make(token=lambda: "t")
        client.start()
        conn = self.server.accept()
        conn.error(conn.take("auth"), "auth_failed")
        self.assertEqual(client.state, "offline")
        self.assertEqual(self.states[-1].retry_in, 0.25)
        self.clock.advance(0.25)
        self.server.accept().live()
        self.assertEqual(client.state, "live")

    def test_tcp_url_and_endpoints(self) -> None:
        self.make().start()
        self.assertEqual(self.server.urls, ["tcp://127.0.0.1:7000"])


class ReconnectTests(ClientTestCase):
    def test_backoff_full_jitter(self) -> None:
        """Delays are random() * min(max, base * 2**attempt); live resets the attempts."""
        client = self.make(backoff_base=0.5, backoff_max=4.0)
        client.start()
        delays = []
        for _ in range(6):
            self.server.refuse()
            self.assertEqual(client.state, "offline")
            delay = self.states[-1].retry_in
            assert delay is not None
            delays.append(delay)
            self.clock.advance(delay - 0.001)
            self.assertEqual(self.server.attempts, [])
            self.clock.advance(0.001)
        self.assertEqual(delays, [0.25, 0.5, 1.0, 2.0, 2.0, 2.0])
        conn = self.server.accept()
        conn.live()
        conn.lose()
        self.assertEqual(self.states[-1].retry_in, 0.25)

    def test_backoff_bounds(self) -> None:
        b = Backoff(0.5, 30, FixedRandom(1.0))
        self.assertEqual([b.delay(n) for n in (0, 1, 5, 6, 2000)], [0.5, 1.0, 16.0, 30, 30])

    def test_goaway_quick_reconnect(self) -> None:
        client = self.make()
        client.start()
        self.server.refuse()  # attempt 1: the next backoff would be 0.5
        self.clock.advance(0.25)
        conn = self.server.accept()
        conn.live()
        self.random.value = 0.3
        conn.push(t="goaway", reason="shutdown")
        conn.lose()
        self.assertEqual(self.states[-1], StateChanged("offline", "connection lost", 0.3))
        self.clock.advance(0.3)
        self.server.refuse()
        self.assertEqual(self.states[-1].retry_in, 0.3 * 0.5)  # the attempts were reset by live

    def test_kick_stops_reconnecting(self) -> None:
        client, conn = self.started()
        sent = client.send(PEER, "x")
        conn.push(t="kick", reason="replaced")
        conn.lose()
        self.assertEqual(client.state, "kicked")
        self.assertEqual(self.states[-1].reason, "replaced")
        self.assertEqual([e.name for e in self.events], ["kick"])
        self.clock.advance(3600)
        self.assertEqual(self.server.attempts, [])
        self.assertEqual(self.failureResultOf(sent, RequestFailed).value.code, "kicked")
        self.assertEqual(self.failureResultOf(client.unread(), RequestFailed).value.code, "kicked")

    def test_heartbeat_ping_and_timeout(self) -> None:
        """A ping after `heartbeat` s idle; unanswered within ping_timeout: drop, reconnect."""
        client, conn = self.started(ping_timeout=10)
        self.clock.advance(29)
        self.assertEqual(conn.ops(), [])
        self.clock.advance(1)
        ping = conn.take("ping")
        conn.reply(ping, server_time=1)
        self.clock.advance(29.9)
        self.assertEqual(conn.ops(), [])
        self.clock.advance(0.1)
        conn.take("ping")
        pending = client.unread()
        conn.take("unread")
        self.clock.advance(9.9)
        self.assertEqual(client.state, "live")
        self.clock.advance(0.1)
        self.assertEqual(client.state, "offline")
        self.assertTrue(self.states[-1].reason.startswith("timeout"))
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual(self.failureResultOf(pending, RequestFailed).value.code, "disconnected")
        self.clock.advance(self.states[-1].retry_in)
        self.server.accept().live()
        self.assertEqual(client.state, "live")

    def test_activity_postpones_ping(self) -> None:
        client, conn = self.started()
        self.clock.advance(20)
        d = client.unread()
        conn.reply(conn.take("unread"), total=0, sessions=[])
        self.result(d)
        self.clock.advance(29)
        self.assertEqual(conn.ops(), [])
        self.clock.advance(1)
        self.assertEqual(conn.ops(), ["ping"])

    def test_silence_drops(self) -> None:
        """Sending (no ping needed) but receiving nothing for heartbeat + ping_timeout: drop."""
        client, conn = self.started()
        typing = []
        for _ in range(7):
            self.clock.advance(5)
            typing.append(client.typing(PEER, True))
        self.assertEqual(client.state, "live")
        self.assertNotIn("ping", conn.ops())
        self.clock.advance(5)
        self.assertEqual(client.state, "offline")
        for d in typing:
            self.assertEqual(self.failureResultOf(d, RequestFailed).value.code, "disconnected")

    def test_request_waits_for_live(self) -> None:
        client = self.make(request_timeout=15)
        client.start()
        d = client.unread()
        self.server.refuse()
        self.clock.advance(0.25)
        conn = self.server.accept()
        conn.live()
        conn.reply(conn.take("unread"), total=0, sessions=[])
        self.assertEqual(self.result(d), {"total": 0, "sessions": []})

    def test_request_timeout(self) -> None:
        client = self.make(request_timeout=15)
        client.start()
        d = client.unread()
        self.clock.advance(15)
        self.assertEqual(self.failureResultOf(d, RequestFailed).value.code, "timeout")

    def test_connect_timeout(self) -> None:
        """A connect (or auth) that never answers is given up after request_timeout."""
        client = self.make(request_timeout=15)
        client.start()
        self.clock.advance(15)
        self.assertEqual(client.state, "offline")
        self.assertEqual(self.server.attempts[0].called, True)

    def test_connect_timeout_covers_the_token(self) -> None:
        """A token callable that never answers is a failed attempt after request_timeout."""
        tokens: list[Deferred[str]] = []

        def token() -> Deferred[str]:
            tokens.append(Deferred())
            return tokens[-1]

        client = self.make(token=token, request_timeout=15)
        client.start()
        self.clock.advance(15)
        self.assertEqual(client.state, "offline")
        tokens[0].callback("late")  # ours was cancelled, theirs untouched
        self.clock.advance(60)
        self.assertEqual(len(tokens), 2)
        tokens[1].callback("tok")
        self.server.accept().live()
        self.assertEqual(client.state, "live")

    def test_catchup_timeout_reconnects(self) -> None:
        """A catch-up page never answered drops the connection: no stuck syncing."""
        client = self.make(request_timeout=15)
        client.start()
        conn = self.server.accept()
        conn.reply(conn.take("auth"), uid=UID, heartbeat=30.0, seq=0, head=0)
        conn.take("catchup")
        self.assertEqual(client.state, "syncing")
        self.clock.advance(15)
        self.assertEqual(client.state, "offline")
        self.clock.advance(60)
        self.server.accept().live()
        self.assertEqual(client.state, "live")

    def test_sync_timeout_reconnects(self) -> None:
        client = self.make(request_timeout=15)
        client.start()
        conn = self.server.accept()
        conn.reply(conn.take("auth"), uid=UID, heartbeat=30.0, seq=0, head=0)
        conn.reply(conn.take("catchup"), events=[], seq=0, more=False)
        conn.take("sync")
        self.clock.advance(15)
        self.assertEqual(client.state, "offline")

    def test_close(self) -> None:
        client, conn = self.started()
        conn.push(**msg(5, seq=1))
        d = client.close()
        self.assertEqual(conn.take("ack"), {"t": "ack", "id": 4, "msg_ids": [5], "seq": 1})
        self.assertTrue(conn.transport.disconnecting)
        conn.lose()
        self.successResultOf(d)
        self.assertEqual(client.state, "closed")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(3600)
        self.assertEqual(self.server.attempts, [])
        self.assertEqual(self.failureResultOf(client.ping(), RequestFailed).value.code, "closed")

    def test_close_while_offline(self) -> None:
        client = self.make()
        client.start()
        self.server.refuse()
        self.successResultOf(client.close())
        self.clock.advance(3600)
        self.assertEqual(self.server.attempts, [])


class OutboxTests(ClientTestCase):
    def test_cid(self) -> None:
        client = self.make(device="d" * 64)
        client.send(PEER, "0")
        client.send(PEER, "1")
        cids = [e["cid"] for e in client.outbox]
        self.assertEqual(len(set(cids)), 2)
        for cid in cids:
            self.assertLessEqual(len(cid), 64)
            device, _rand, _n = cid.rsplit(".", 2)
            self.assertTrue(device.startswith("ddd"))
        self.assertEqual([c.rsplit(".", 1)[1] for c in cids], ["1", "2"])
        short = self.make(device="phone")
        short.send(PEER, "x")
        self.assertTrue(short.outbox[0]["cid"].startswith("phone."))

    def test_retry_with_same_cid_after_disconnect(self) -> None:
        client, conn = self.started()
        d = client.send(PEER, "hello", type="text")
        first = conn.take("send")
        self.assertEqual((first["to"], first["body"], first["type"]), (PEER, "hello", "text"))
        conn.lose()
        self.assertNoResult(d)
        self.clock.advance(self.states[-1].retry_in)
        conn = self.server.accept()
        conn.live()
        again = conn.take("send")
        self.assertEqual(again["cid"], first["cid"])
        conn.reply(again, msg_id=1, session_id=99, ts=5, dup=True, seq=1)
        self.assertEqual(
            self.result(d), {"msg_id": 1, "session_id": 99, "ts": 5, "dup": True, "seq": 1}
        )
        self.assertEqual(client.outbox, [])
        self.assertEqual(client.seq, 1)

    def test_retry_later_codes(self) -> None:
        client, conn = self.started()
        d = client.send(PEER, "x")
        cids = []
        for code in ("unavailable", "internal", "rate_limited"):
            request = conn.take("send")
            cids.append(request["cid"])
            conn.error(request, code)
            self.assertEqual(conn.ops(), [])
            self.clock.advance(5)
        request = conn.take("send")
        self.assertEqual(set(cids), {request["cid"]})
        conn.reply(request, msg_id=1, session_id=99, ts=1, dup=False)
        self.assertEqual(self.result(d)["msg_id"], 1)

    def test_rejected_codes(self) -> None:
        client, conn = self.started()
        d = client.send(PEER, "x")
        later = client.send(PEER, "y")
        conn.error(conn.take("send"), "forbidden")
        self.assertEqual(self.failureResultOf(d, RequestFailed).value.code, "forbidden")
        self.assertEqual(conn.take("send")["body"], "y")
        self.assertNoResult(later)

    def test_per_peer_order(self) -> None:
        """One send at a time per peer, in order; another peer is not held up."""
        client, conn = self.started()
        a1, a2 = client.send(PEER, "a1"), client.send(PEER, "a2")
        b1 = client.send(8, "b1")
        sends = [f for f in conn.frames() if f["t"] == "send"]
        self.assertEqual([f["body"] for f in sends], ["a1", "b1"])
        conn.reply(sends[1], msg_id=3, session_id=2, ts=1, dup=False)
        self.result(b1)
        conn.reply(sends[0], msg_id=1, session_id=1, ts=1, dup=False)
        self.result(a1)
        second = conn.take("send")
        self.assertEqual(second["body"], "a2")
        conn.reply(second, msg_id=2, session_id=1, ts=1, dup=False)
        self.result(a2)

    def test_sends_wait_for_live(self) -> None:
        client = self.make()
        d = client.send(PEER, "early")
        client.start()
        conn = self.server.accept()
        auth = conn.take("auth")
        self.assertEqual(conn.ops(), [])
        conn.reply(auth, uid=UID, heartbeat=30.0, seq=0, head=0)
        conn.reply(conn.take("catchup"), events=[], seq=0, more=False)
        conn.reply(conn.take("sync"), msgs=[], more=False)
        request = conn.take("send")
        conn.reply(request, msg_id=1, session_id=1, ts=1, dup=False)
        self.result(d)

    def test_close_rejects_and_store_keeps(self) -> None:
        store = MemoryStore()
        client, conn = self.started(store=store)
        d = client.send(PEER, "kept")
        cid = conn.take("send")["cid"]
        client.close()
        conn.lose()
        self.assertEqual(self.failureResultOf(d, RequestFailed).value.code, "closed")
        self.assertEqual(
            store.load()["outbox"], [{"cid": cid, "to": PEER, "type": None, "body": "kept"}]
        )
        again = self.make(store=store)
        again.start()
        conn = self.server.accept()
        conn.live()
        self.assertEqual(conn.take("send")["cid"], cid)

    def test_send_over_max_frame_bytes_rejected_locally(self) -> None:
        """
        A send the server could not read (it would close with frame_too_large,
        and the retry would close the next connection too, for ever) fails
        with too_large at once, is not queued and not sent; the next goes on.
        """
        client, conn = self.started()
        d = client.send(PEER, "x" * 70_000)
        self.assertEqual(self.failureResultOf(d, RequestFailed).value.code, "too_large")
        self.assertEqual(client.outbox, [])
        small = client.send(PEER, "x" * 60_000, type="text")
        self.assertEqual(len(conn.take("send")["body"]), 60_000)
        self.assertNoResult(small)
        self.assertEqual(conn.ops(), [])
        bigger = self.make(max_frame_bytes=200_000)
        self.assertNoResult(bigger.send(PEER, "x" * 100_000))
        self.assertEqual(
            self.failureResultOf(client.send(PEER, object()), RequestFailed).value.code, "invalid"
        )

    def test_frame_too_large_lowers_the_limit(self) -> None:
        """
        max_frame_bytes above the server's: its frame_too_large (then close)
        lowers the client's limit below the largest frame in flight, so the
        resend fails with too_large instead of closing every connection.
        """
        client, conn = self.started(max_frame_bytes=1 << 20)
        big = client.send(PEER, "x" * 100_000)
        later = client.send(PEER, "after")
        self.assertEqual(len(conn.take("send")["body"]), 100_000)
        conn.push(t="error", code="frame_too_large", message="frame too large")
        conn.lose()
        self.assertNoResult(big)
        self.clock.advance(self.states[-1].retry_in or 0)
        conn = self.server.accept()
        conn.live()
        self.assertEqual(self.failureResultOf(big, RequestFailed).value.code, "too_large")
        self.assertLess(client.max_frame_bytes, 100_100)
        self.assertGreater(client.max_frame_bytes, 100_000)
        request = conn.take("send")
        self.assertEqual(request["body"], "after")
        conn.reply(request, msg_id=1, session_id=1, ts=1, dup=False)
        self.assertEqual(self.result(later)["msg_id"], 1)
        self.assertEqual(client.outbox, [])

    def test_send_after_close(self) -> None:
        client = self.make()
        client.close()
        self.assertEqual(
            self.failureResultOf(client.send(PEER, "x"), RequestFailed).value.code, "closed"
        )


class StreamTests(ClientTestCase):
    def test_dedupe_by_seq_and_msg_id(self) -> None:
        client, conn = self.started()
        conn.push(**msg(1, seq=1))
        conn.push(**msg(1, seq=1))
        conn.push(**msg(1))  # a replay without seq
        conn.push(**msg(2, seq=2))
        conn.push(**msg(2, seq=3))  # the same message at another seq: still once
        self.assertEqual(self.messages(), [1, 2])
        self.assertEqual(client.seq, 3)

    def test_dedupe_across_reconnect(self) -> None:
        _client, conn = self.started()
        conn.push(**msg(1, seq=1))
        conn.lose()
        self.clock.advance(1)
        conn = self.server.accept()
        self.assertEqual(conn.live(msgs=[msg(1), msg(3)])["since"], 1)
        self.assertEqual(self.messages(), [1, 3])

    def test_edits_by_version(self) -> None:
        client, conn = self.started()
        conn.push(**msg(1, seq=1))
        conn.push(**{**msg(1, seq=2, edited=10), "t": "edit", "body": "v1"})
        conn.push(**{**msg(1, edited=10), "t": "edit", "body": "v1"})  # repeated, no seq
        conn.push(**{**msg(1, seq=4, edited=20), "t": "edit", "body": "v2"})
        conn.push(**{**msg(1, seq=3, edited=15), "t": "edit", "body": "older"})
        edits = [e.msg["body"] for e in self.events if isinstance(e, Edit)]
        self.assertEqual(edits, ["v1", "v2"])
        self.assertEqual(client.seq, 4)

    def test_msg_after_a_newer_edit_is_not_stale(self) -> None:
        """A live msg arriving after its newer edit shows the edited version."""
        client, conn = self.started()
        edited = {k: v for k, v in msg(5).items() if k != "t"}
        conn.push(t="edit", **{**edited, "body": "new", "edited": 2}, seq=2)
        conn.push(**msg(5, seq=1))
        self.assertEqual(client.seq, 2)
        messages = [e for e in self.events if isinstance(e, Message)]
        self.assertEqual([(m.msg["body"], m.msg.get("edited")) for m in messages], [("new", 2)])

    def test_gap_runs_catchup(self) -> None:
        client, conn = self.started()
        conn.push(**msg(1, seq=1))
        conn.push(**msg(3, seq=3))
        self.assertEqual(client.seq, 1)
        self.assertEqual(self.messages(), [1, 3])
        self.clock.advance(1)
        self.assertEqual(conn.take("ack")["seq"], 1)  # never the 3 beyond the gap
        self.clock.advance(2)
        page = conn.take("catchup")
        self.assertEqual(page["after"], 1)
        conn.reply(page, events=[msg(2, seq=2), msg(3, seq=3)], seq=3, more=False)
        self.assertEqual(self.messages(), [1, 3, 2])
        self.assertEqual(client.seq, 3)
        self.clock.advance(10)
        self.assertNotIn("catchup", conn.ops())

    def test_gap_filled_in_time(self) -> None:
        client, conn = self.started()
        conn.push(**msg(2, seq=2))
        self.clock.advance(2)
        d = client.read(99, 2)
        conn.reply(conn.take("read"), unread=0, total_unread=0, seq=1)
        self.result(d)
        self.assertEqual(client.seq, 2)
        self.clock.advance(10)
        self.assertNotIn("catchup", conn.ops())

    def test_unknown_push_with_seq_advances(self) -> None:
        """An unknown push type with a seq is a stream event: no gap, acked, still a push."""
        client, conn = self.started()
        pushes: list[Any] = []
        client.on("push", pushes.append)
        conn.push(t="poll_vote", seq=1, poll=3)
        conn.push(**msg(5, seq=2))
        self.assertEqual(client.seq, 2)
        self.assertEqual(self.messages(), [5])
        self.assertEqual([p.frame["t"] for p in pushes], ["poll_vote", "msg"])
        self.clock.advance(1)
        ack = conn.take("ack")
        self.assertEqual(ack["seq"], 2)
        self.clock.advance(10)
        self.assertNotIn("catchup", conn.ops())

    def test_sync_push(self) -> None:
        _client, conn = self.started()
        conn.push(t="sync")
        conn.reply(conn.take("catchup"), events=[], seq=0, more=False)
        conn.reply(conn.take("sync"), msgs=[msg(9)], more=False)
        self.assertEqual(self.messages(), [9])

    def test_acks_batched(self) -> None:
        _client, conn = self.started()
        for i in range(1, 100):
            conn.push(**msg(i, seq=i))
        self.assertNotIn("ack", conn.ops())
        conn.push(**msg(100, seq=100))
        ack = conn.take("ack")
        self.assertEqual(ack["msg_ids"], list(range(1, 101)))
        self.assertEqual(ack["seq"], 100)
        conn.reply(ack)
        conn.push(**msg(101, seq=101))
        conn.push(**msg(102, frm=UID, to=PEER, seq=102))  # sent from another device: no ack
        self.clock.advance(0.9)
        self.assertNotIn("ack", conn.ops())
        self.clock.advance(0.1)
        ack = conn.take("ack")
        self.assertEqual((ack["msg_ids"], ack["seq"]), ([101], 102))

    def test_failed_ack_retried_on_next_connection(self) -> None:
        _client, conn = self.started()
        conn.push(**msg(1, seq=1))
        self.clock.advance(1)
        conn.take("ack")
        conn.lose()
        self.clock.advance(1)
        conn = self.server.accept()
        conn.live(seq=1)
        self.clock.advance(1)
        self.assertEqual(conn.take("ack")["msg_ids"], [1])

    def test_failed_ack_retried_on_the_live_connection(self) -> None:
        """An ack answered with an error is sent again by a timer, same range."""
        _client, conn = self.started()
        conn.push(**msg(5, seq=1))
        self.clock.advance(1)
        conn.error(conn.take("ack"), "unavailable")
        self.clock.advance(1)
        again = conn.take("ack")
        self.assertEqual((again["seq"], again["msg_ids"]), (1, [5]))

    def test_lost_ack_retried_on_the_live_connection(self) -> None:
        """An ack never answered times out and is sent again."""
        _client, conn = self.started(request_timeout=15)
        conn.push(**msg(5, seq=1))
        self.clock.advance(1)
        conn.take("ack")
        self.clock.advance(15)
        self.clock.advance(1)
        again = conn.take("ack")
        self.assertEqual((again["seq"], again["msg_ids"]), (1, [5]))

    def test_failing_acks_back_off_and_log_once(self) -> None:
        """
        Acks failing in a row wait 1 s doubling to 30 s (half jitter: 0.75 of
        it with random 0.5), new ids wait with them, one log line per streak;
        a success goes back to the normal batch delay.
        """
        logged: list[dict[str, Any]] = []
        self.patch(client_module, "log", Logger(observer=logged.append))
        _client, conn = self.started()
        conn.push(**msg(5, seq=1))
        self.clock.advance(1)
        conn.error(conn.take("ack"), "unavailable")
        for n in range(100, 200):  # a full batch waits for the retry too
            conn.push(**msg(n))
        for ceiling in (1, 2, 4, 8, 16, 30, 30):
            self.clock.advance(0.75 * ceiling - 0.01)
            self.assertNotIn("ack", conn.ops())
            self.clock.advance(0.01)
            ack = conn.take("ack")
            self.assertEqual((ack["seq"], ack["msg_ids"]), (1, [5, *range(100, 200)]))
            conn.error(ack, "unavailable")
        failures = [e for e in logged if "ack failed" in e["log_format"]]
        self.assertEqual(len(failures), 1)
        self.clock.advance(22.5)
        conn.reply(conn.take("ack"))
        self.assertEqual(len([e for e in logged if "succeed again" in e["log_format"]]), 1)
        conn.push(**msg(6, seq=2))
        self.clock.advance(1)
        self.assertEqual(conn.take("ack")["msg_ids"], [6])

    def test_handlers_run_before_ack_and_unsubscribe(self) -> None:
        client, conn = self.started()
        seen: list[int] = []
        off = client.on("message", lambda e: seen.append(e.msg["msg_id"]))
        conn.push(**msg(1, seq=1))
        off()
        off()
        conn.push(**msg(2, seq=2))
        self.assertEqual(seen, [1])
        raw: list[Any] = []
        client.on("push", raw.append)
        conn.push(t="something_new", x=1)
        self.assertEqual(raw[0].frame, {"t": "something_new", "x": 1})
        self.assertRaises(ValueError, client.on, "nope", print)

    def test_failing_handler_does_not_stop_others(self) -> None:
        client, conn = self.started()

        def bad(event: Any) -> None:
            raise RuntimeError("app bug")

        client.on("message", bad)
        conn.push(**msg(1, seq=1))
        self.assertEqual(self.messages(), [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_replies_fill_seq(self) -> None:
        client, conn = self.started()
        d = client.send(PEER, "x")
        conn.reply(conn.take("send"), msg_id=1, session_id=1, ts=1, dup=False, seq=1)
        self.result(d)
        conn.push(**msg(5, seq=2))
        self.assertEqual(client.seq, 2)


class StoreTests(TestCase):
    def test_json_file_store(self) -> None:
        path = os.path.join(self.mktemp(), "state.json")
        store = JSONFileStore(path)
        self.assertIsNone(store.load())
        store.save({"device": "d", "seq": 3, "outbox": []})
        self.assertEqual(JSONFileStore(path).load(), {"device": "d", "seq": 3, "outbox": []})
        with open(path) as f:
            self.assertEqual(json.load(f)["seq"], 3)
        self.assertEqual([n for n in os.listdir(os.path.dirname(path))], ["state.json"])

    def test_json_file_store_writes_in_a_thread_one_at_a_time(self) -> None:
        """
        A turn's saves are one encoding; the file is written off the reactor,
        one write in flight, and the latest state written right after it.
        """
        path = os.path.join(self.mktemp(), "state.json")
        clock, threads = Clock(), ManualThreads()
        store = JSONFileStore(path, reactor=clock, run_in_thread=threads)
        for n in range(50):
            store.save({"device": "d", "seq": n, "outbox": []})
        self.assertEqual((len(threads.calls), store.load()["seq"]), (0, 49))
        clock.advance(0)
        self.assertEqual((len(threads.calls), store.writes, os.path.exists(path)), (1, 0, False))
        state = {"device": "d", "seq": 50, "outbox": []}
        store.save(state)
        clock.advance(0)
        state["seq"] = 1000  # after its turn: encoded already, not saved by this
        for n in range(51, 60):
            store.save({"device": "d", "seq": n, "outbox": []})
            clock.advance(0)
        self.assertEqual(len(threads.calls), 1)  # the write in flight: the others wait
        threads.run()
        self.assertEqual((store.writes, JSONFileStore(path).load()["seq"]), (1, 49))
        self.assertEqual(len(threads.calls), 1)  # the latest, at once
        threads.run()
        self.assertEqual((store.writes, JSONFileStore(path).load()["seq"]), (2, 59))
        self.assertEqual((threads.calls, clock.getDelayedCalls()), ([], []))

    def test_json_file_store_flush_writes_the_latest_now(self) -> None:
        """flush() (at stop) writes synchronously; an older write still queued is skipped."""
        path = os.path.join(self.mktemp(), "state.json")
        clock, threads = Clock(), ManualThreads()
        store = JSONFileStore(path, reactor=clock, run_in_thread=threads)
        store.save({"device": "d", "seq": 1, "outbox": []})
        clock.advance(0)
        store.save({"device": "d", "seq": 2, "outbox": []})
        store.flush()
        self.assertEqual((store.writes, JSONFileStore(path).load()["seq"]), (1, 2))
        threads.run()
        self.assertEqual((store.writes, JSONFileStore(path).load()["seq"]), (1, 2))
        self.assertEqual((threads.calls, clock.getDelayedCalls()), ([], []))

    def test_json_file_store_failed_write_is_logged_and_written_later(self) -> None:
        path = os.path.join(self.mktemp(), "state.json")
        clock, threads = Clock(), ManualThreads()
        store = JSONFileStore(path, reactor=clock, run_in_thread=threads)
        store.save({"device": "d", "seq": 1, "outbox": []})
        clock.advance(0)
        threads.fail(OSError("disk full"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(threads.calls, [])  # not retried at once
        store.flush()
        self.assertEqual(JSONFileStore(path).load()["seq"], 1)

    async def test_json_file_store_real_reactor_thread(self) -> None:
        """With a real reactor the write runs in its thread pool."""
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        path = os.path.join(self.mktemp(), "state.json")
        store = JSONFileStore(path, reactor=reactor)
        store.save({"device": "d", "seq": 7, "outbox": []})
        await deferLater(reactor, 0, lambda: None)
        writing = store._writing
        self.assertIsNotNone(writing)
        await writing
        self.assertEqual((store.writes, JSONFileStore(path).load()["seq"]), (1, 7))

    def test_client_flushes_the_store_when_it_stops(self) -> None:
        path = os.path.join(self.mktemp(), "state.json")
        clock, server = Clock(), FakeServer()
        store = JSONFileStore(path)
        client = Client("tcp://h:1", "t", reactor=clock, connector=server.connector, store=store)
        client.send(PEER, "hi").addErrback(lambda f: None)
        client.send(PEER, "again").addErrback(lambda f: None)
        writes = store.writes
        client.close()
        self.assertEqual(store.writes, writes + 1)
        self.assertEqual(len(JSONFileStore(path).load()["outbox"]), 2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_corrupt_store_is_moved_aside(self) -> None:
        path = os.path.join(self.mktemp(), "state.json")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write('{"device": "d", "outb')
        client = Client("tcp://h:1", "t", reactor=Clock(), store=JSONFileStore(path))
        self.assertEqual(client.outbox, [])
        with open(path + ".corrupt") as f:
            self.assertEqual(f.read(), '{"device": "d", "outb')
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_client_keeps_device_and_seq(self) -> None:
        path = os.path.join(self.mktemp(), "state.json")
        clock, server = Clock(), FakeServer()
        client = Client(
            "tcp://h:1", "t", reactor=clock, connector=server.connector, store=JSONFileStore(path)
        )
        device = client.device
        self.assertTrue(device.startswith("py-"))
        client.start()
        conn = server.accept()
        conn.live(seq=4)
        client.close()
        conn.lose()
        again = Client(
            "tcp://h:1", "t", reactor=clock, connector=server.connector, store=JSONFileStore(path)
        )
        self.assertEqual((again.device, again.seq), (device, 4))
        other = Client(
            "tcp://h:1",
            "t",
            device="other",
            reactor=clock,
            connector=server.connector,
            store=JSONFileStore(path),
        )
        # The stream and the store are the user's: another device name keeps them.
        self.assertEqual(other.seq, 4)

    def test_other_device_keeps_the_outbox_other_uid_discards_it(self) -> None:
        store = MemoryStore()
        clock, server = Clock(), FakeServer()

        def client(device: str) -> Client:
            return Client(
                "tcp://h:1",
                "t",
                device=device,
                reactor=clock,
                connector=server.connector,
                store=store,
            )

        first = client("a")
        first.start()
        conn = server.accept()
        conn.live(seq=4)
        first.send(PEER, "hi")
        cid = conn.take("send")["cid"]
        first.close()
        conn.lose()
        second = client("b")
        self.assertEqual([e["cid"] for e in second.outbox], [cid])
        second.start()
        conn = server.accept()
        conn.live(seq=4)
        self.assertEqual(conn.take("send")["cid"], cid)  # same cid, another device
        second.close()
        conn.lose()
        third = client("c")
        third.start()
        conn = server.accept()
        request = conn.take("auth")
        conn.reply(request, uid=UID + 1, heartbeat=30.0, seq=0, head=0)
        conn.reply(conn.take("catchup"), events=[], seq=0, more=False)
        conn.reply(conn.take("sync"), msgs=[], more=False)
        self.assertEqual(third.state, "live")
        self.assertEqual(third.outbox, [])
        self.assertEqual(third.seq, 0)
        self.assertNotIn("send", conn.ops())
        clock.advance(0)  # saved at the end of the turn
        self.assertEqual(store.state["uid"], UID + 1)


class MoreTests(ClientTestCase):
    def test_watch_again_after_reconnect(self) -> None:
        client, conn = self.started()
        presence: list[Any] = []
        client.on("presence", presence.append)
        d = client.watch([PEER])
        conn.reply(conn.take("watch"), users=[{"uid": PEER, "online": True, "last_seen": 1}])
        self.assertEqual(self.result(d)["users"][0]["online"], True)
        conn.lose()
        self.clock.advance(1)
        conn = self.server.accept()
        auth = conn.take("auth")
        conn.reply(auth, uid=UID, heartbeat=30.0, seq=0, head=0)
        conn.reply(conn.take("catchup"), events=[], seq=0, more=False)
        conn.reply(conn.take("sync"), msgs=[], more=False)
        watch = conn.take("watch")
        self.assertEqual(watch["uids"], [PEER])
        self.assertEqual(client.state, "syncing")
        conn.reply(watch, users=[{"uid": PEER, "online": False, "last_seen": 2}])
        self.assertEqual(client.state, "live")
        self.assertEqual([(p.uid, p.online) for p in presence], [(PEER, False)])

    def test_refused_watch_is_not_kept(self) -> None:
        """
        A watch the server refuses (too_large, invalid) is not watched again
        after a reconnect (where its failure failed every catch-up: never
        live again); the set accepted before it still is.
        """
        client, conn = self.started()
        self.result(self.watched(client, conn, [PEER]))
        refused = client.watch(list(range(1, 502)))
        conn.error(conn.take("watch"), "too_large")
        self.failureResultOf(refused, RequestFailed)
        conn = self.reconnect(conn)
        self.assertEqual(conn.take("watch")["uids"], [PEER])

    def test_failed_watch_again_goes_live_anyway(self) -> None:
        """A watch refused while catching up is logged; the client goes live (and forgets it)."""
        client, conn = self.started()
        self.result(self.watched(client, conn, [PEER]))
        conn = self.reconnect(conn)
        conn.error(conn.take("watch"), "too_large")
        self.assertEqual(client.state, "live")
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        conn = self.reconnect(conn)
        self.assertEqual(client.state, "live")
        self.assertEqual(conn.ops(), [])

    def watched(self, client: Client, conn: FakeConn, uids: list[int]) -> Deferred[Any]:
        d = client.watch(uids)
        conn.reply(conn.take("watch"), users=[])
        return d

    def reconnect(self, conn: FakeConn) -> FakeConn:
        """Lose the connection; the next one answers auth, catchup and sync."""
        conn.lose()
        self.clock.advance(self.states[-1].retry_in or 0)
        conn = self.server.accept()
        conn.live()
        return conn

    def test_close_from_a_handler_while_catching_up(self) -> None:
        client = self.make()
        client.on("message", lambda e: client.close())
        client.start()
        conn = self.server.accept()
        conn.reply(conn.take("auth"), uid=UID, heartbeat=30.0, seq=0, head=1)
        conn.reply(conn.take("catchup"), events=[msg(1, seq=1)], seq=1, more=False)
        self.assertEqual(client.state, "closed")
        conn.lose()
        self.clock.advance(3600)
        self.assertEqual(client.state, "closed")
        self.assertEqual(self.server.attempts, [])

    def test_no_events_after_close_from_a_handler(self) -> None:
        """close() from a handler mid catch-up page: the rest of the page is not emitted."""
        client = self.make()
        client.on("message", lambda e: client.close())
        client.start()
        conn = self.server.accept()
        conn.reply(conn.take("auth"), uid=UID, heartbeat=30.0, seq=0, head=2)
        conn.reply(conn.take("catchup"), events=[msg(1, seq=1), msg(2, seq=2)], seq=2, more=False)
        self.assertEqual(self.messages(), [1])

    def test_kick_ends_the_outbox_retry_delay(self) -> None:
        """A kick stops the outbox's retry timer; an unawaited send is no unhandled error."""
        client, conn = self.started()
        client.send(PEER, "x")
        conn.error(conn.take("send"), "unavailable")
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        conn.push(t="kick", reason="replaced")
        conn.lose()
        self.assertEqual(client.state, "kicked")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_close_while_token_pending(self) -> None:
        d: Deferred[str] = Deferred()
        client = self.make(token=lambda: d)
        client.start()
        client.close()
        d.callback("late")
        self.assertEqual(self.server.attempts, [])
        self.assertEqual(client.state, "closed")

    def test_typing_and_delivered_events(self) -> None:
        client, conn = self.started()
        got: list[Any] = []
        client.on("delivered", got.append)
        conn.push(t="typing", **{"from": PEER, "active": True})
        conn.push(t="delivered", session_id=99, msg_id=5, by=PEER)
        typing = [e for e in self.events if e.name == "typing"]
        self.assertEqual((typing[0].from_, typing[0].active), (PEER, True))
        self.assertEqual((got[0].session_id, got[0].msg_id, got[0].by), (99, 5, PEER))


class RandomisedStreamTests(ClientTestCase):
    """
    A fake server that publishes a stream, pushes it out of order, twice or
    not at all, loses connections (also between a send's commit and its
    reply) and answers catchup / sync / ack / send as the real one: every
    message is emitted exactly once, acks never name a seq the client does
    not have contiguously, the client ends at the head, and every send is
    stored once, in order per peer, and resolves with what was stored.
    """

    def run_seed(self, seed: int) -> None:
        import random

        rng = random.Random(seed)
        total = 80
        self.random = FixedRandom(0.5)
        client = self.make()
        client.start()
        #: The user's stream: seq -> an incoming msg_id, or None for an own send.
        stream: dict[int, int | None] = {}
        unacked: set[int] = set()
        to_push: list[int] = []
        stored: dict[str, tuple[int, int]] = {}
        stored_order: dict[int, list[str]] = {PEER: [], PEER + 1: []}
        sent_order: dict[int, list[str]] = {PEER: [], PEER + 1: []}
        results: list[tuple[str, Deferred[Any]]] = []
        conn: FakeConn | None = None

        def head() -> int:
            return len(stream)

        def publish() -> None:
            seq = head() + 1
            stream[seq] = 1000 + seq
            unacked.add(seq)
            if rng.random() < 0.85:  # else the push is lost: a gap
                to_push.insert(rng.randint(0, len(to_push)), seq)

        def down(c: FakeConn | None) -> bool:
            return c is None or c.proto.transport.disconnecting

        def lose(c: FakeConn) -> None:
            c.lose()
            c.transport.disconnecting = True
            to_push.clear()

        def serve(c: FakeConn) -> None:
            for frame in c.frames():
                if down(c):
                    return
                t = frame["t"]
                if t == "auth":
                    c.reply(frame, uid=UID, heartbeat=30.0, seq=frame["since"], head=head())
                elif t == "catchup":
                    after = frame["after"]
                    upto = min(head(), after + rng.randint(1, 7))
                    events = [
                        msg(stream[s], seq=s)
                        for s in range(after + 1, upto + 1)
                        if stream[s] is not None  # own sends are left out
                    ]
                    c.reply(frame, events=events, seq=upto, more=upto < head())
                elif t == "sync":
                    some = sorted(s for s in unacked if rng.random() < 0.5)
                    c.reply(frame, msgs=[msg(1000 + s) for s in some], more=False)
                elif t == "ack":
                    self.assertLessEqual(frame.get("seq", 0), client.seq)
                    for mid in frame.get("msg_ids", []):
                        unacked.discard(mid - 1000)
                    c.reply(frame)
                elif t == "ping":
                    c.reply(frame, server_time=0)
                elif t == "send":
                    cid = frame["cid"]
                    r = rng.random()
                    if r < 0.1:
                        lose(c)  # before the commit
                        return
                    if r < 0.2:
                        c.error(frame, "unavailable")
                        continue
                    dup = cid in stored
                    if not dup:
                        stream[head() + 1] = None
                        stored[cid] = (5000 + head(), head())
                        stored_order[frame["to"]].append(cid)
                    if r < 0.3:
                        lose(c)  # committed, the reply lost
                        return
                    msg_id, seq = stored[cid]
                    c.reply(frame, msg_id=msg_id, session_id=1, ts=1, dup=dup, seq=seq)

        for step in range(600):
            if step % 15 == 0 and len(results) < 20:
                peer = PEER + rng.randint(0, 1)
                d = client.send(peer, f"s{len(results)}")
                cid = [e["cid"] for e in client.outbox if e["to"] == peer][-1]
                sent_order[peer].append(cid)
                results.append((cid, d))
            if down(conn):
                if self.server.attempts:
                    if rng.random() < 0.2:
                        self.server.refuse()
                    else:
                        conn = self.server.accept()
                self.clock.advance(rng.choice([0.1, 0.5, 2]))
                if conn is not None and not down(conn):
                    serve(conn)
                continue
            assert conn is not None
            action = rng.random()
            if action < 0.35 and head() < total:
                publish()
            elif action < 0.7 and to_push:
                s = to_push.pop(0)
                conn.push(**msg(1000 + s, seq=s))
                if rng.random() < 0.1:
                    conn.push(**msg(1000 + s, seq=s))
            elif action < 0.75:
                lose(conn)
            else:
                self.clock.advance(rng.choice([0.2, 1.0, 3.0]))
            if not down(conn):
                serve(conn)
        # Quiet: publish the rest (each pushed: a lost push shows as a gap once a
        # later one arrives), let the gap timer, catch-up and the outbox finish.
        while head() < total:
            seq = head() + 1
            stream[seq] = 1000 + seq
            unacked.add(seq)
            to_push.append(seq)
        quiet = random.Random(seed + 1_000_000)
        rng.random = lambda: 0.5 + quiet.random() / 2  # type: ignore[method-assign]
        for _ in range(300):
            done = all(d.called for _, d in results)
            if client.seq == head() and client.state == "live" and done:
                break
            if down(conn) and self.server.attempts:
                conn = self.server.accept()
            if not down(conn) and to_push:
                assert conn is not None
                s = to_push.pop(0)
                conn.push(**msg(1000 + s, seq=s))
            self.clock.advance(1)
            if not down(conn):
                assert conn is not None
                serve(conn)
        self.assertEqual((client.state, client.seq), ("live", head()), seed)
        ids = self.messages()
        self.assertEqual(sorted(ids), sorted(m for m in stream.values() if m is not None), seed)
        self.assertEqual(len(ids), len(set(ids)), seed)
        self.assertEqual(stored_order, sent_order, seed)
        for cid, d in results:
            self.assertEqual(self.successResultOf(d)["msg_id"], stored[cid][0], seed)
        self.assertEqual(client.outbox, [])

    def test_many_seeds(self) -> None:
        for seed in range(40):
            self.events = []
            self.server = FakeServer()
            self.clock = Clock()
            self.run_seed(seed)


class StreamPositionTests(TestCase):
    def test_position(self) -> None:
        from imserver.client.stream import Position

        p = Position(5)
        self.assertFalse(p.note(5))
        self.assertTrue(p.note(7))
        self.assertEqual((p.seq, p.gap), (5, True))
        self.assertFalse(p.note(7))
        self.assertTrue(p.note(6))
        self.assertEqual((p.seq, p.gap), (7, False))
        p.note(10)
        p.advance_to(9)  # a catch-up page's seq (over own sends)
        self.assertEqual((p.seq, p.gap), (10, False))

    def test_lru_keeps_the_last(self) -> None:
        from imserver.client.stream import DEDUPE_SIZE, LRU

        self.assertEqual(DEDUPE_SIZE, 10_000)
        lru = LRU(3)
        for key in (1, 2, 3, 1, 4):
            lru.put(key)
        self.assertEqual([k in lru for k in (1, 2, 3, 4)], [True, False, True, True])


class InFlightTests(ClientTestCase):
    def test_in_flight_at_kick_and_close(self) -> None:
        store = MemoryStore()
        client, conn = self.started(store=store)
        pending = client.unread()
        sent = client.send(PEER, "kept")
        cid = conn.take("send")["cid"]
        conn.push(t="kick", reason="logged_out")
        conn.lose()
        self.assertEqual(self.failureResultOf(pending, RequestFailed).value.code, "kicked")
        self.assertEqual(self.failureResultOf(sent, RequestFailed).value.code, "kicked")
        self.assertEqual([e["cid"] for e in store.load()["outbox"]], [cid])

        other, conn = self.started(device="dev2")
        pending = other.unread()
        other.close()
        self.assertEqual(self.failureResultOf(pending, RequestFailed).value.code, "closed")

    def test_unanswered_send_is_sent_again(self) -> None:
        """No answer within request_timeout on a live connection: again, same cid."""
        client, conn = self.started(request_timeout=15)
        d = client.send(PEER, "stuck")
        first = conn.take("send")
        self.clock.advance(15)
        self.assertEqual(conn.ops(), [])
        self.clock.advance(0.25)  # the backoff delay (random 0.5 of 0.5 s)
        again = conn.take("send")
        self.assertEqual(again["cid"], first["cid"])
        conn.reply(first, msg_id=1, session_id=1, ts=1, dup=False)  # late: ignored
        self.assertNoResult(d)
        conn.reply(again, msg_id=1, session_id=1, ts=1, dup=True)
        self.assertEqual(self.result(d)["dup"], True)
        self.assertEqual(client.state, "live")

    def test_kick_without_close(self) -> None:
        client, conn = self.started()
        conn.push(t="kick", reason="revoked")
        self.assertEqual(client.state, "kicked")
        self.assertTrue(conn.transport.disconnecting)
        self.clock.advance(3600)
        self.assertEqual(self.server.attempts, [])

    def test_goaway_without_close(self) -> None:
        client, conn = self.started()
        conn.push(t="goaway", reason="shutdown")
        self.assertEqual(client.state, "live")
        self.clock.advance(5)
        self.assertEqual(client.state, "offline")
        self.assertTrue(conn.transport.disconnecting)
        self.assertLess(self.states[-1].retry_in, 1)

    def test_a_burst_of_sends_is_saved_once(self) -> None:
        """The state (the whole outbox) is built and saved once per reactor turn, not per send."""
        saves: list[int] = []

        class Counting(MemoryStore):
            def save(self, state: dict[str, Any]) -> None:
                saves.append(len(state["outbox"]))
                super().save(state)

        client, _ = self.started(store=Counting())
        self.clock.advance(0)
        del saves[:]
        for i in range(200):
            client.send(PEER, f"m{i}")
        self.assertEqual(saves, [])
        self.clock.advance(0)
        self.assertEqual(saves, [200])
        client.close()  # the final state is saved at once
        self.assertEqual(len(saves), 2)

    def test_close_ends_every_delay(self) -> None:
        """The reconnect's delay and the outbox's retry delay both end with close()."""
        client, conn = self.started()
        d = client.send(PEER, "x")
        conn.error(conn.take("send"), "unavailable")  # the outbox waits 0.25 s
        conn.lose()  # the reconnect waits too
        self.clock.advance(0)  # the state saved at the end of the turn
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        client.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.failureResultOf(d, RequestFailed).value.code, "closed")
