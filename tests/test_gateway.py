"""The connection layer, driven through StringTransport and a task.Clock."""

from __future__ import annotations

import gc
import random
import struct
from typing import Any

import attrs
import jwt
import twisted.test
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from imserver.config import ServerConfig
from imserver.errors import ErrorCode, ImError
from imserver.gateway.protocol import ClientProtocol, Gateway, Op
from imserver.services.presence import IClientLink, IPresence
from imserver.services.registry import LocalRegistry
from imserver.services.tokens import Claims, TokenService
from imserver.wire import frames
from imserver.wire.codec import decode_body, encode
from imserver.wire.framing import FrameDecoder

SECRET = "unit-test-secret-0123456789-abcdefgh"


class Echo(frames.Request):
    op = "echo"


class Client:
    """A connection under test with a decoder for what the server wrote."""

    def __init__(self, gateway: Gateway, proto: ClientProtocol | None = None) -> None:
        self.proto = gateway.buildProtocol(None) if proto is None else proto
        assert self.proto is not None
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self._decoder = FrameDecoder(2**20)

    def send(self, frame: dict[str, Any]) -> None:
        self.proto.dataReceived(encode(frame))

    def received(self) -> list[dict[str, Any]]:
        data = self.transport.value()
        self.transport.clear()
        return [decode_body(b) for b in self._decoder.feed(data)]

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        self.proto.connectionLost()


class GatewayTestsMixin:
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.tokens = TokenService(SECRET)
        self.registry = LocalRegistry()
        self.config = ServerConfig(
            auth_timeout_seconds=10,
            idle_timeout_seconds=90,
            heartbeat_seconds=30,
            max_frame_bytes=1024,
            max_outbound_bytes=10_000,
        )
        self.logins: list[int] = []
        self.login_result: Deferred[None] | None = None
        self.gateway = self.make_gateway()

    def make_gateway(self, **ops: Op) -> Gateway:
        def on_login(claims: Claims, conn: ClientProtocol, req: frames.Auth) -> Deferred[None]:
            self.logins.append(claims.uid)
            return self.login_result if self.login_result is not None else succeed(None)

        return Gateway(
            config=self.config,
            clock=self.clock,
            tokens=self.tokens,
            presence=self.registry,
            ops=ops,
            on_login=on_login,
        )

    def token(self, uid: int, ttl: int = 60) -> str:
        return self.tokens.mint(uid, now=self.clock.seconds(), ttl_seconds=ttl)

    def authed(self, uid: int = 42) -> Client:
        client = Client(self.gateway)
        client.send({"t": "auth", "id": 1, "token": self.token(uid)})
        [reply] = client.received()
        assert reply["t"] == "ok", reply
        return client


class AuthTests(GatewayTestsMixin, SynchronousTestCase):
    def test_auth_ok(self) -> None:
        client = Client(self.gateway)
        client.send({"t": "auth", "id": 7, "token": self.token(42), "device": "ios"})
        self.assertEqual(
            client.received(),
            [{"t": "ok", "id": 7, "uid": 42, "heartbeat": 30.0, "server_time": 1_700_000_000_000}],
        )
        self.assertEqual(self.logins, [42])
        self.assertEqual(self.registry.local(42), [client.proto])
        self.assertEqual(client.proto.device, "ios")
        self.assertFalse(client.closing)

    def test_any_other_first_frame_is_unauthenticated_and_closes(self) -> None:
        client = Client(self.gateway)
        client.send({"t": "ping", "id": 3})
        self.assertEqual(client.received()[0]["code"], "unauthenticated")
        self.assertEqual(client.received(), [])
        self.assertTrue(client.closing)

    def test_frames_after_a_refused_first_frame_are_ignored(self) -> None:
        client = Client(self.gateway)
        client.proto.dataReceived(encode({"t": "ping", "id": 1}) + encode({"t": "ping", "id": 2}))
        self.assertEqual([f["id"] for f in client.received()], [1])

    def assertAuthFailed(self, token: object) -> None:
        client = Client(self.gateway)
        client.send({"t": "auth", "id": 1, "token": token})
        [reply] = client.received()
        self.assertEqual((reply["t"], reply["code"], reply["id"]), ("error", "auth_failed", 1))
        self.assertTrue(client.closing)
        self.assertEqual(self.logins, [])

    def test_bad_signature(self) -> None:
        self.assertAuthFailed(
            TokenService("another-secret-0123456-abcdefghijklmn").mint(42, now=self.clock.seconds())
        )

    def test_expired(self) -> None:
        token = self.token(42, ttl=5)
        self.clock.advance(6)
        self.assertAuthFailed(token)

    def test_alg_none(self) -> None:
        self.assertAuthFailed(
            jwt.encode({"sub": "42", "exp": 2_000_000_000}, None, algorithm="none")
        )

    def test_other_hmac_algorithm(self) -> None:
        self.assertAuthFailed(
            jwt.encode(
                {"sub": "42", "exp": 2_000_000_000},
                SECRET + "-long-enough-for-hs512-abcdefghijklmnopqrstuvwxyz",
                algorithm="HS512",
            )
        )

    def test_missing_exp(self) -> None:
        self.assertAuthFailed(jwt.encode({"sub": "42"}, SECRET, algorithm="HS256"))

    def test_bad_subjects(self) -> None:
        for sub in ("0", "-5", "abc", str(2**63), " 42", "4.2"):
            self.assertAuthFailed(jwt.encode({"sub": sub, "exp": 2_000_000_000}, SECRET))

    def test_malformed_token_and_fields(self) -> None:
        self.assertAuthFailed("not-a-jwt")
        self.assertAuthFailed(12)
        self.assertAuthFailed(None)

    def test_auth_timeout(self) -> None:
        client = Client(self.gateway)
        self.clock.advance(9.9)
        self.assertFalse(client.closing)
        self.clock.advance(0.2)
        self.assertEqual(client.received()[0]["code"], "unauthenticated")
        self.assertTrue(client.closing)

    def test_frames_during_login_wait_for_it(self) -> None:
        self.login_result = Deferred()
        client = Client(self.gateway)
        client.send({"t": "auth", "id": 1, "token": self.token(42)})
        client.send({"t": "ping", "id": 2})
        self.assertEqual(client.received(), [])
        self.login_result.callback(None)
        self.assertEqual([(f["t"], f["id"]) for f in client.received()], [("ok", 1), ("ok", 2)])

    def test_login_failure_is_reported_and_closes(self) -> None:
        self.login_result = fail(ImError(ErrorCode.UNAVAILABLE, "db down"))
        client = Client(self.gateway)
        client.send({"t": "auth", "id": 1, "token": self.token(42)})
        [reply] = client.received()
        self.assertEqual(reply["code"], "unavailable")
        self.assertTrue(client.closing)
        self.assertEqual(self.registry.local(42), [])

    def test_connection_lost_during_login(self) -> None:
        self.login_result = Deferred()
        client = Client(self.gateway)
        client.send({"t": "auth", "id": 1, "token": self.token(42)})
        client.lose()
        self.login_result.callback(None)
        self.assertEqual(self.registry.local(42), [])
        self.assertEqual(client.received(), [])

    def test_second_login_kicks_the_first(self) -> None:
        first = self.authed(42)
        second = self.authed(42)
        self.assertEqual(first.received(), [{"t": "kick", "reason": "replaced"}])
        self.assertTrue(first.closing)
        self.assertFalse(second.closing)
        first.lose()
        self.assertEqual(self.registry.local(42), [second.proto])

    def test_other_users_are_not_kicked(self) -> None:
        a = self.authed(1)
        self.authed(2)
        self.assertEqual(a.received(), [])


class RequestTests(GatewayTestsMixin, SynchronousTestCase):
    def test_ping(self) -> None:
        client = self.authed()
        self.clock.advance(1.5)
        client.send({"t": "ping", "id": 9})
        self.assertEqual(
            client.received(), [{"t": "ok", "id": 9, "server_time": 1_700_000_001_500}]
        )

    def test_unknown_op(self) -> None:
        client = self.authed()
        for op in ("send", "sync", "fly"):
            client.send({"t": op, "id": 4})
            [reply] = client.received()
            self.assertEqual((reply["code"], reply["id"]), ("unknown_op", 4))
        self.assertFalse(client.closing)

    def test_bad_frame_keeps_the_connection(self) -> None:
        client = self.authed()
        for body in (b"\xc1", b"\x93\x01\x02\x03", b"\xa3abc"):
            client.proto.dataReceived(struct.pack(">I", len(body)) + body)
            [reply] = client.received()
            self.assertEqual(reply["code"], "bad_frame")
            self.assertNotIn("id", reply)
        client.send({"t": "ping", "id": 1})
        self.assertEqual(client.received()[0]["t"], "ok")
        self.assertFalse(client.closing)

    def test_bad_frame_before_auth_keeps_the_connection(self) -> None:
        client = Client(self.gateway)
        client.proto.dataReceived(struct.pack(">I", 1) + b"\x01")
        self.assertEqual(client.received()[0]["code"], "bad_frame")
        self.assertFalse(client.closing)

    def test_frame_too_large_closes(self) -> None:
        for length in (0, 1025):
            client = self.authed()
            client.proto.dataReceived(struct.pack(">I", length) + b"x" * 10)
            [reply] = client.received()
            self.assertEqual(reply["code"], "frame_too_large")
            self.assertTrue(client.closing)

    def test_frame_too_large_before_auth_closes(self) -> None:
        client = Client(self.gateway)
        client.proto.dataReceived(struct.pack(">I", 10**6))
        self.assertEqual(client.received()[0]["code"], "frame_too_large")
        self.assertTrue(client.closing)

    def test_invalid_envelope(self) -> None:
        client = self.authed()
        client.send({"t": "ping"})
        [reply] = client.received()
        self.assertEqual(reply["code"], "invalid")
        self.assertNotIn("id", reply)

    def test_handler_errors(self) -> None:
        def boom(conn: ClientProtocol, req: frames.Request) -> Any:
            raise ZeroDivisionError()

        def refuse(conn: ClientProtocol, req: frames.Request) -> Any:
            return fail(ImError(ErrorCode.FORBIDDEN, "no"))

        def later(conn: ClientProtocol, req: frames.Request) -> Any:
            return fail(KeyError("x"))

        for handler, code in ((boom, "internal"), (refuse, "forbidden"), (later, "internal")):
            self.gateway = self.make_gateway(echo=Op(Echo, handler))
            client = self.authed()
            client.send({"t": "echo", "id": 5})
            [reply] = client.received()
            self.assertEqual((reply["code"], reply["id"]), (code, 5))
            self.assertFalse(client.closing)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError, KeyError)), 2)

    def test_replies_in_completion_order(self) -> None:
        waiting: list[Deferred[dict[str, int]]] = []

        def slow(conn: ClientProtocol, req: frames.Request) -> Any:
            d: Deferred[dict[str, int]] = Deferred()
            waiting.append(d)
            return d

        self.gateway = self.make_gateway(echo=Op(Echo, slow))
        client = self.authed()
        client.send({"t": "echo", "id": 1})
        client.send({"t": "echo", "id": 2})
        waiting[1].callback({"n": 2})
        waiting[0].callback({"n": 1})
        self.assertEqual([f["id"] for f in client.received()], [2, 1])

    def test_reply_after_disconnect_is_dropped(self) -> None:
        d: Deferred[dict[str, int]] = Deferred()
        self.gateway = self.make_gateway(echo=Op(Echo, lambda c, r: d))
        client = self.authed()
        client.send({"t": "echo", "id": 1})
        client.lose()
        d.callback({"n": 1})
        self.assertEqual(client.received(), [])


class TimerTests(GatewayTestsMixin, SynchronousTestCase):
    def test_idle_timeout(self) -> None:
        client = self.authed()
        self.clock.advance(89)
        self.assertFalse(client.closing)
        self.clock.advance(1)
        self.assertTrue(client.closing)

    def test_activity_postpones_the_idle_timeout(self) -> None:
        client = self.authed()
        for _ in range(5):
            self.clock.advance(60)
            client.send({"t": "ping", "id": 1})
        self.clock.advance(89)
        self.assertFalse(client.closing)
        self.clock.advance(1)
        self.assertTrue(client.closing)

    def test_idle_connections_share_one_timer(self) -> None:
        """Issue 13: no DelayedCall per authenticated connection, one for the wheel."""
        clients = [self.authed(uid) for uid in range(1, 51)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.gateway.idle_wheel.size, 50)
        self.clock.advance(30)
        clients[0].send({"t": "ping", "id": 1})  # active: 30 s more
        self.clock.advance(60)
        self.assertEqual([c.closing for c in clients], [False] + [True] * 49)
        self.assertEqual(self.gateway.idle_closed, 49)
        self.clock.advance(30)
        self.assertTrue(clients[0].closing)

    def test_connections_that_keep_pinging_are_never_closed(self) -> None:
        """Many connections pinging at their own pace, below the timeout, over many
        periods of the wheel: none closed; silent, each closed within a second after
        its timeout, never before."""
        rng = random.Random(13)
        clients, last, next_ping = [], [], []
        for uid in range(1, 101):
            self.clock.advance(rng.choice((0, 0.25, 0.5)))
            clients.append(self.authed(uid))
            last.append(self.clock.seconds())
            next_ping.append(self.clock.seconds() + rng.uniform(1, 89))
        end = self.clock.seconds() + 900
        while self.clock.seconds() < end:
            self.clock.advance(0.25)
            for i, c in enumerate(clients):
                if self.clock.seconds() >= next_ping[i]:
                    c.send({"t": "ping", "id": 1})
                    last[i] = self.clock.seconds()
                    next_ping[i] = self.clock.seconds() + rng.uniform(1, 89)
        self.assertEqual([c for c in clients if c.closing], [])
        closed_at: dict[int, float] = {}
        while len(closed_at) < len(clients) and self.clock.seconds() < end + 100:
            self.clock.advance(0.25)
            for i, c in enumerate(clients):
                if c.closing and i not in closed_at:
                    closed_at[i] = self.clock.seconds()
        self.assertEqual(len(closed_at), 100)
        for i, t in closed_at.items():
            self.assertTrue(90 <= t - last[i] <= 91, (i, t - last[i]))
        self.assertEqual(self.gateway.idle_closed, 100)

    def test_idle_close_is_never_early_and_at_most_the_resolution_late(self) -> None:
        self.clock.advance(0.5)  # logged in between two of the wheel's buckets
        client = self.authed()
        self.clock.advance(89.75)
        self.assertFalse(client.closing)  # 0.25 s left
        self.clock.advance(0.5)
        self.assertFalse(client.closing)  # its bucket is at the next whole second
        self.clock.advance(0.25)
        self.assertTrue(client.closing)

    def test_a_lost_connection_leaves_the_wheel_and_no_timer(self) -> None:
        client = self.authed()
        other = self.authed(43)
        client.lose()
        self.assertEqual(self.gateway.idle_wheel.size, 1)
        other.lose()
        self.assertEqual(self.gateway.idle_wheel.size, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closing_connection_that_does_not_drain_is_aborted(self) -> None:
        client = self.authed()
        self.clock.advance(90)
        self.assertTrue(client.closing)
        self.assertFalse(client.transport.disconnected)
        self.clock.advance(5)
        self.assertTrue(client.transport.disconnected)

    def test_no_timers_left_after_disconnect(self) -> None:
        client = self.authed()
        client.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BackpressureTests(GatewayTestsMixin, SynchronousTestCase):
    def test_registered_as_streaming_producer(self) -> None:
        client = self.authed()
        self.assertIs(client.transport.producer, client.proto)
        self.assertTrue(client.transport.streaming)

    def test_paused_connection_stops_reading(self) -> None:
        client = self.authed()
        client.proto.pauseProducing()
        self.assertEqual(client.transport.producerState, "paused")
        client.proto.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")

    def test_client_that_does_not_read_is_dropped_past_the_cap(self) -> None:
        client = self.authed()
        client.proto.pauseProducing()
        sent = 0
        while not client.transport.disconnected and sent < 1000:
            client.proto.push({"t": "msg", "body": "x" * 500})
            sent += 1
        self.assertTrue(client.transport.disconnected)
        self.assertLess(sent, 30)
        self.assertEqual(self.gateway.overflowed, 1)

    def test_resume_resets_the_count(self) -> None:
        client = self.authed()
        for _ in range(10):
            client.proto.pauseProducing()
            for _ in range(15):
                client.proto.push({"t": "msg", "body": "x" * 500})
            client.proto.resumeProducing()
        self.assertFalse(client.transport.disconnected)


class ShutdownTests(GatewayTestsMixin, SynchronousTestCase):
    def test_goaway_to_everyone(self) -> None:
        clients = [self.authed(uid) for uid in (1, 2)] + [Client(self.gateway)]
        done = self.gateway.goaway_all()
        for client in clients:
            self.assertEqual(client.received(), [{"t": "goaway", "reason": "shutdown"}])
            self.assertTrue(client.closing)
        self.assertNoResult(done)
        for client in clients:
            client.lose()
        self.successResultOf(done)
        self.assertIsNone(self.gateway.buildProtocol(None))

    def test_goaway_with_no_connections(self) -> None:
        self.successResultOf(self.gateway.goaway_all())


class InterfaceTests(GatewayTestsMixin, SynchronousTestCase):
    def test_interfaces(self) -> None:
        client = self.authed()
        verifyObject(IClientLink, client.proto)
        verifyObject(IPresence, self.registry)

    def test_registry_push(self) -> None:
        client = self.authed(5)
        self.assertTrue(self.registry.push(5, {"t": "x"}))
        self.assertFalse(self.registry.push(6, {"t": "x"}))
        self.assertEqual(client.received(), [{"t": "x"}])
        self.assertEqual(list(self.registry.links()), [client.proto])


class DrainingShutdownTests(GatewayTestsMixin, SynchronousTestCase):
    def test_goaway_lets_requests_in_flight_reply_then_closes(self) -> None:
        waiting: list[Deferred[dict[str, int]]] = []

        def slow(conn: ClientProtocol, req: frames.Request) -> Any:
            d: Deferred[dict[str, int]] = Deferred()
            waiting.append(d)
            return d

        self.gateway = self.make_gateway(echo=Op(Echo, slow))
        client = self.authed()
        client.send({"t": "echo", "id": 1})
        client.send({"t": "echo", "id": 2})
        self.gateway.goaway_all()
        self.assertEqual(client.received(), [{"t": "goaway", "reason": "shutdown"}])
        self.assertEqual(client.transport.producerState, "paused")  # reads nothing more
        client.send({"t": "echo", "id": 3})  # ignored
        self.assertEqual(len(waiting), 2)
        waiting[0].callback({"n": 1})
        self.assertFalse(client.closing)
        waiting[1].callback({"n": 2})
        self.assertEqual([f["id"] for f in client.received()], [1, 2])
        self.assertTrue(client.closing)

    def test_goaway_closes_at_once_when_idle(self) -> None:
        client = self.authed()
        self.gateway.goaway_all()
        self.assertTrue(client.closing)

    def test_requests_that_never_finish_are_cut_off_after_the_grace(self) -> None:
        self.gateway = self.make_gateway(echo=Op(Echo, lambda c, r: Deferred()))
        client = self.authed()
        client.send({"t": "echo", "id": 1})
        self.gateway.goaway_all()
        self.assertFalse(client.transport.disconnected)
        self.clock.advance(5)
        self.assertTrue(client.transport.disconnected)


class NoDelayTests(GatewayTestsMixin, SynchronousTestCase):
    def test_nagle_is_off_for_clients(self) -> None:
        class TCPTransport(StringTransport):
            nodelay = False

            def setTcpNoDelay(self, enabled: bool) -> None:
                self.nodelay = enabled

        tcp = TCPTransport()
        self.gateway.buildProtocol(None).makeConnection(tcp)
        self.assertTrue(tcp.nodelay)

        class TLSTransport(StringTransport):
            transport = TCPTransport()

        tls = TLSTransport()
        self.gateway.buildProtocol(None).makeConnection(tls)
        self.assertTrue(tls.transport.nodelay)


class InFlightTests(GatewayTestsMixin, SynchronousTestCase):
    """Issue 9, defect 3: a connection has at most C{max_in_flight} requests being handled."""

    def setUp(self) -> None:
        super().setUp()
        self.config = attrs.evolve(self.config, max_in_flight=4)
        self.waiting: list[Deferred[dict[str, int]]] = []

        def slow(conn: ClientProtocol, req: frames.Request) -> Any:
            d: Deferred[dict[str, int]] = Deferred()
            self.waiting.append(d)
            return d

        self.gateway = self.make_gateway(echo=Op(Echo, slow))

    def pipeline(self, client: Client, n: int, first: int = 1) -> None:
        client.proto.dataReceived(
            b"".join(encode({"t": "echo", "id": i}) for i in range(first, first + n))
        )

    def test_n_plus_one_pipelined_requests_have_n_in_flight_and_pause(self) -> None:
        client = self.authed()
        self.pipeline(client, 5)
        self.assertEqual(len(self.waiting), 4)
        self.assertEqual(client.transport.producerState, "paused")
        self.waiting[0].callback({"n": 1})
        self.assertEqual(len(self.waiting), 5)  # the fifth starts as the first replies
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual([f["id"] for f in client.received()], [1])

    def test_a_flood_is_handled_in_order_n_at_a_time(self) -> None:
        client = self.authed()
        self.pipeline(client, 100)
        started = 0
        while started < 100:
            self.assertLessEqual(len(self.waiting) - started, 4)
            waiting = len(self.waiting) < 100
            self.assertEqual(client.transport.producerState, "paused" if waiting else "producing")
            d, started = self.waiting[started], started + 1
            d.callback({"n": started})
        self.assertEqual([f["id"] for f in client.received()], list(range(1, 101)))
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(self.gateway.throttled, 1)

    def test_output_backpressure_and_the_in_flight_cap_pause_together(self) -> None:
        client = self.authed()
        self.pipeline(client, 5)
        client.proto.pauseProducing()  # the transport's write buffer is full too
        client.proto.resumeProducing()  # ... and drains: still paused for the cap
        self.assertEqual(client.transport.producerState, "paused")
        client.proto.pauseProducing()
        self.waiting[0].callback({"n": 1})  # the cap is free, the buffer is not
        self.assertEqual(client.transport.producerState, "paused")
        client.proto.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")

    def test_fair_ops_take_turns_between_connections(self) -> None:
        self.config = attrs.evolve(self.config, max_in_flight=10, max_concurrent_requests=1)
        started: list[int | None] = []

        def slow(conn: ClientProtocol, req: frames.Request) -> Any:
            started.append(conn.uid)
            d: Deferred[dict[str, int]] = Deferred()
            self.waiting.append(d)
            return d

        self.gateway = self.make_gateway(echo=Op(Echo, slow, fair=True))
        flood, other = self.authed(1), self.authed(2)
        self.pipeline(flood, 10)
        other.send({"t": "echo", "id": 99})
        self.assertEqual(started, [1])
        self.waiting[0].callback({})
        self.assertEqual(started, [1, 2])  # not the flood's second request
        other.lose()  # nothing of it is left waiting
        while len(self.waiting) < 11:
            self.waiting[-1].callback({})
        self.assertEqual(started, [1, 2] + [1] * 9)
        self.assertEqual(self.gateway.scheduler.depth, 0)

    def test_a_reply_that_cannot_be_written_is_logged_and_frees_its_slot(self) -> None:
        """A reply whose encoding raises: logged, and the request no longer
        holds one of the C{max_in_flight} slots (the next one starts)."""
        client = self.authed()
        self.pipeline(client, 5)
        self.waiting[0].callback({"bad": object()})  # msgpack cannot pack it
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(len(self.waiting), 5)
        self.waiting[1].errback(RuntimeError("boom"))  # the failure path still answers
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.waiting), 5)  # nothing was left to start
        self.assertEqual([(f["t"], f["id"]) for f in client.received()], [("error", 2)])

    def test_synchronous_replies_do_not_count(self) -> None:
        client = self.authed()
        client.proto.dataReceived(b"".join(encode({"t": "ping", "id": i}) for i in range(50)))
        self.assertEqual(len(client.received()), 50)
        self.assertEqual(client.transport.producerState, "producing")

    def test_queued_frames_are_dropped_on_close(self) -> None:
        client = self.authed()
        self.pipeline(client, 10)
        client.lose()
        for d in self.waiting:
            d.callback({})
        self.assertEqual(len(self.waiting), 4)

    def test_a_transport_that_ignores_pause_is_cut_off(self) -> None:
        client = self.authed()
        self.pipeline(client, 5)
        body = {"t": "echo", "id": 9, "pad": "x" * 900}
        for _ in range(400):
            if client.closing:
                break
            client.send(body)
        self.assertTrue(client.closing)
        self.assertEqual(client.received()[-1]["code"], "rate_limited")


class AuthQueueTests(GatewayTestsMixin, SynchronousTestCase):
    """Issue 9, defect 10: frames sent while auth is in progress are bounded."""

    def test_frames_during_login_stop_reading_until_it_is_done(self) -> None:
        self.login_result = Deferred()
        client = Client(self.gateway)
        client.proto.dataReceived(
            encode({"t": "auth", "id": 1, "token": self.token(42)})
            + b"".join(encode({"t": "ping", "id": i}) for i in range(2, 200))
        )
        self.assertEqual(client.transport.producerState, "paused")
        self.assertEqual(client.received(), [])
        self.login_result.callback(None)
        self.assertEqual([f["id"] for f in client.received()], list(range(1, 200)))
        self.assertEqual(client.transport.producerState, "producing")

    def test_more_while_paused_is_refused(self) -> None:
        self.login_result = Deferred()
        client = Client(self.gateway)
        client.send({"t": "auth", "id": 1, "token": self.token(42)})
        for i in range(100_000):
            if client.closing:
                break
            client.send({"t": "ping", "id": i})
        self.assertTrue(client.closing)
        self.assertLess(i, 100_000)
        [reply] = client.received()
        self.assertEqual(reply["code"], "rate_limited")


class UnauthenticatedCapTests(GatewayTestsMixin, SynchronousTestCase):
    """Issue 9, defect 4: caps on connections that have not authenticated."""

    def setUp(self) -> None:
        super().setUp()
        self.config = attrs.evolve(
            self.config, max_unauthenticated=6, max_unauthenticated_per_address=2
        )
        self.gateway = self.make_gateway()

    def connect(self, host: str) -> Client | None:
        addr = IPv6Address("TCP", host, 5000) if ":" in host else IPv4Address("TCP", host, 5000)
        proto = self.gateway.buildProtocol(addr)
        return None if proto is None else Client(self.gateway, proto)

    def test_per_address_and_total_caps(self) -> None:
        a = [self.connect("192.0.2.1") for _ in range(3)]
        self.assertEqual([c is not None for c in a], [True, True, False])
        self.assertIsNotNone(self.connect("192.0.2.2"))
        self.assertIsNotNone(self.connect("192.0.2.2"))
        self.assertIsNotNone(self.connect("192.0.2.3"))
        self.assertIsNotNone(self.connect("192.0.2.3"))
        self.assertIsNone(self.connect("192.0.2.4"))  # 6 in total
        self.assertEqual(self.gateway.refused, {"per_address": 1, "total": 1, "descriptors": 0})
        self.assertEqual(self.gateway.unauthenticated, 6)

    def test_authenticated_and_closed_connections_leave_the_count(self) -> None:
        first = self.connect("192.0.2.1")
        second = self.connect("192.0.2.1")
        assert first is not None and second is not None
        self.assertIsNone(self.connect("192.0.2.1"))
        first.send({"t": "auth", "id": 1, "token": self.token(42)})
        self.assertEqual(first.received()[0]["t"], "ok")
        self.assertIsNotNone(self.connect("192.0.2.1"))
        self.assertIsNone(self.connect("192.0.2.1"))
        second.lose()
        self.assertIsNotNone(self.connect("192.0.2.1"))
        self.assertEqual(self.gateway.unauthenticated, 2)

    def test_ipv6_counts_by_slash_64_and_loopback_by_total_only(self) -> None:
        self.assertIsNotNone(self.connect("2001:db8::1"))
        self.assertIsNotNone(self.connect("2001:db8::2"))
        self.assertIsNone(self.connect("2001:db8::3"))
        self.assertIsNotNone(self.connect("2001:db8:0:1::1"))
        self.assertIsNotNone(self.connect("::ffff:192.0.2.9"))
        self.assertIsNotNone(self.connect("192.0.2.9"))
        self.assertIsNone(self.connect("::ffff:192.0.2.9"))
        config = attrs.evolve(self.config, max_unauthenticated=100)
        self.config = config
        self.gateway = self.make_gateway()
        self.assertTrue(all(self.connect("127.0.0.1") for _ in range(50)))

    def test_the_descriptor_budget_counts_every_connection(self) -> None:
        gateway = Gateway(
            config=self.config,
            clock=self.clock,
            tokens=self.tokens,
            presence=self.registry,
            max_connections=3,
        )
        self.gateway = gateway
        first = self.connect("192.0.2.1")
        assert first is not None
        first.send({"t": "auth", "id": 1, "token": self.token(42)})
        self.assertIsNotNone(self.connect("192.0.2.2"))
        self.assertIsNotNone(self.connect("192.0.2.3"))
        self.assertIsNone(self.connect("192.0.2.4"))
        self.assertEqual(gateway.refused["descriptors"], 1)
        first.lose()
        self.assertIsNotNone(self.connect("192.0.2.4"))

    def test_refused_on_a_tls_listener(self) -> None:
        """A TLS listener wraps what the gateway builds: a refusal must be a protocol."""
        pem = FilePath(twisted.test.__file__).sibling("server.pem").getContent()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
        self.assertIs(self.gateway.factory_for("tcp"), self.gateway)
        tls = TLSMemoryBIOFactory(options, False, self.gateway.factory_for("ssl"))
        for _ in range(3):
            proto = tls.buildProtocol(IPv4Address("TCP", "192.0.2.1", 5000))
            transport = StringTransport()
            proto.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.gateway.refused["per_address"], 1)

    def test_zero_turns_the_per_address_cap_off(self) -> None:
        self.config = attrs.evolve(self.config, max_unauthenticated_per_address=0)
        self.gateway = self.make_gateway()
        self.assertTrue(all(self.connect("192.0.2.1") for _ in range(6)))
        self.assertIsNone(self.connect("192.0.2.1"))


class InFlightPropertyTests(GatewayTestsMixin, SynchronousTestCase):
    @given(
        st.integers(1, 6),
        st.lists(st.integers(1, 400), min_size=1, max_size=8),
        st.lists(st.integers(0, 10), max_size=200),
        st.booleans(),
    )
    @settings(max_examples=60, deadline=None)
    def test_every_request_is_answered_once_within_the_cap(
        self, cap: int, chunks: list[int], picks: list[int], fair: bool
    ) -> None:
        """Whatever the read boundaries and the completion order."""
        self.config = attrs.evolve(self.config, max_in_flight=cap, max_concurrent_requests=2)
        waiting: list[Deferred[dict[str, int]]] = []

        def slow(conn: ClientProtocol, req: frames.Request) -> Any:
            d: Deferred[dict[str, int]] = Deferred()
            waiting.append(d)
            return d

        self.gateway = self.make_gateway(echo=Op(Echo, slow, fair=fair))
        client = self.authed()
        stream = b"".join(encode({"t": "echo", "id": i}) for i in range(1, 41))
        offset = 0
        for size in chunks:
            part, offset = stream[offset : offset + size], offset + size
            if part:
                client.proto.dataReceived(part)
        client.proto.dataReceived(stream[offset:])
        replies: list[int] = []
        picks = list(picks)
        while True:
            pending = [d for d in waiting if not d.called]
            self.assertLessEqual(len(pending), cap)
            replies += [f["id"] for f in client.received()]
            if not pending:
                break
            pending[picks.pop() % len(pending) if picks else 0].callback({})
        replies += [f["id"] for f in client.received()]
        self.assertEqual(sorted(replies), list(range(1, 41)))
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(self.gateway.scheduler.depth, 0)


class ConnectionMemoryTests(GatewayTestsMixin, SynchronousTestCase):
    """
    Issue 13: an idle authenticated connection holds no per-instance dict,
    no inbox deque and no rate-limit dict (6.0 -> 3.9 KiB per connection).
    """

    def test_an_idle_connection_has_no_instance_dict(self) -> None:
        client = self.authed()
        client.send({"t": "ping", "id": 2})
        self.assertEqual([f["t"] for f in client.received()], ["ok"])
        proto = client.proto
        # Slots: a materialised __dict__ would be among the referents (the
        # idle wheel's bucket, shared by the connections due together, is not).
        self.assertIn(proto, proto.idle_bucket)  # type: ignore[operator]
        referents = gc.get_referents(proto)
        self.assertFalse(any(type(r) is dict and r is not proto.idle_bucket for r in referents))
        self.assertIsNone(proto._inbox)
        self.assertIsNone(proto.buckets)
        # The decoder holds no chunk list between frames either.
        self.assertEqual(proto._decoder._chunks, ())
        proto.dataReceived(encode({"t": "ping", "id": 3})[:3])
        self.assertIsInstance(proto._decoder._chunks, list)
        proto.dataReceived(encode({"t": "ping", "id": 3})[3:])
        self.assertEqual([f["id"] for f in client.received()], [3])
        self.assertEqual(proto._decoder._chunks, ())

    def test_frames_waiting_keep_their_order_after_the_inbox_was_dropped(self) -> None:
        done: list[int] = []

        def echo(conn: ClientProtocol, req: frames.Request) -> dict[str, int]:
            done.append(req.id)
            return {}

        self.gateway = self.make_gateway(echo=Op(Echo, echo))
        client = self.authed()
        for first in (2, 5):
            client.proto.dataReceived(
                b"".join(encode({"t": "echo", "id": i}) for i in range(first, first + 3))
            )
            self.assertIsNone(client.proto._inbox)
        self.assertEqual(done, [2, 3, 4, 5, 6, 7])
