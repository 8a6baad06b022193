"""
End-to-end: L{imserver.client.Client} against a real C{twistd -n imserver}
(tests.harness.ServerProcess), over TCP and over WebSocket: two clients
chat; a send outstanding while the server is killed resolves after the
restart and the message arrives exactly once; a client offline while
messages arrive catches up with each once; a second client on the same
device kicks the first, which stays kicked.
"""

from __future__ import annotations

import itertools
import os
import signal
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from imserver.client import Client, JSONFileStore, MemoryStore, Message, Read, StateChanged
from imserver.wire.codec import decode_body
from imserver.wire.framing import FrameDecoder, encode_frame
from tests.harness import ServerProcess
from tests.support import eventually as _eventually
from tests.support import reactor, sleep, within

_uids = itertools.count(710_000)

#: Reconnect quickly: the tests restart servers and wait for the clients to come back.
FAST: dict[str, Any] = {"backoff_base": 0.1, "backoff_max": 1.0}


async def eventually(check: Any, timeout: float = 30.0) -> Any:
    """Generous: two cores shared by several test runs."""
    return await _eventually(check, timeout=timeout)


class ClientE2EMixin:
    """The tests; C{url(server)} picks the transport."""

    timeout = 120
    addCleanup: Any
    assertEqual: Any
    assertTrue: Any

    def url(self, server: ServerProcess) -> str:
        raise NotImplementedError

    def server(self) -> ServerProcess:
        server = ServerProcess()
        self.addCleanup(server.cleanup)
        return server.start()

    def client(self, server: ServerProcess, uid: int, **options: Any) -> Client:
        for key, value in FAST.items():
            options.setdefault(key, value)
        client = Client(self.url(server), server.token(uid), reactor=reactor, **options)
        self.addCleanup(client.close)
        return client

    async def live(self, *clients: Client) -> None:
        for client in clients:
            client.start()
        for client in clients:
            await within(client.wait_live(), 30)

    def collect(self, client: Client, name: str) -> list[Any]:
        events: list[Any] = []
        client.on(name, events.append)
        return events

    @staticmethod
    def bodies(events: list[Any]) -> list[Any]:
        return [e.msg["body"] for e in events if isinstance(e, Message)]

    async def test_two_clients_chat(self) -> None:
        server = self.server()
        a_uid, b_uid = next(_uids), next(_uids)
        a, b = self.client(server, a_uid), self.client(server, b_uid)
        a_msgs, b_msgs = self.collect(a, "message"), self.collect(b, "message")
        a_reads = self.collect(a, "read")
        await self.live(a, b)
        self.assertEqual((a.uid, b.uid), (a_uid, b_uid))

        sent = await within(a.send(b_uid, "hello b"))
        self.assertEqual(sent["dup"], False)
        await eventually(lambda: b_msgs)
        got = b_msgs[0].msg
        self.assertEqual((got["from"], got["to"], got["body"]), (a_uid, b_uid, "hello b"))
        self.assertEqual(got["msg_id"], sent["msg_id"])
        self.assertEqual((b_msgs[0].unread, b_msgs[0].replay), (1, False))

        await within(b.read(sent["session_id"], sent["msg_id"]))
        await eventually(lambda: a_reads)
        self.assertEqual(
            a_reads[0], Read(sent["session_id"], b_uid, sent["msg_id"], seq=a_reads[0].seq)
        )
        await within(b.send(a_uid, {"text": "hi a"}, type="rich"))
        await eventually(lambda: a_msgs)
        self.assertEqual((a_msgs[0].msg["body"], a_msgs[0].msg["type"]), ({"text": "hi a"}, "rich"))

        convs = await within(a.convs())
        self.assertEqual(convs["convs"][0]["peer"]["uid"], b_uid)
        history = await within(a.history(peer=b_uid))
        self.assertEqual([m["body"] for m in history["msgs"]], [{"text": "hi a"}, "hello b"])
        self.assertEqual((await within(b.unread()))["total"], 0)
        profile = await within(a.set_profile(nickname="alice"))
        self.assertEqual(profile["user"]["nickname"], "alice")
        users = await within(b.profile([a_uid]))
        self.assertEqual(users["users"][0]["nickname"], "alice")
        # Acked by the client in a batch: nothing stays pending for b.
        await eventually(lambda: self.pending(b))

    async def pending(self, client: Client) -> bool:
        return (await within(client.request("sync")))["msgs"] == []

    async def test_send_outstanding_while_server_killed(self) -> None:
        server = self.server()
        a_uid, b_uid = next(_uids), next(_uids)
        a, b = self.client(server, a_uid), self.client(server, b_uid)
        b_msgs = self.collect(b, "message")
        a_states: list[StateChanged] = self.collect(a, "state")
        await self.live(a, b)

        # Frozen, the server reads nothing and answers nothing: the send is in flight.
        server.signal(signal.SIGSTOP)
        pending = a.send(b_uid, "through the crash")
        await sleep(0.2)
        self.assertEqual(len(a.outbox), 1)
        cid = a.outbox[0]["cid"]
        server.kill()
        await eventually(lambda: a.state == "offline")
        server.start()
        sent = await within(pending, 60)
        self.assertEqual(a.outbox, [])
        self.assertTrue(any(s.state == "offline" for s in a_states))

        await within(a.send(b_uid, "after"))
        await eventually(lambda: "after" in self.bodies(b_msgs))
        self.assertEqual(self.bodies(b_msgs), ["through the crash", "after"])
        self.assertEqual(b_msgs[0].msg["cid"], cid)
        self.assertEqual(b_msgs[0].msg["msg_id"], sent["msg_id"])
        history = await within(b.history(peer=a_uid))
        self.assertEqual([m["body"] for m in history["msgs"]], ["after", "through the crash"])

    async def test_send_across_graceful_restart(self) -> None:
        """goaway, the server away, a send queued meanwhile: sent once it is back."""
        server = self.server()
        a_uid, b_uid = next(_uids), next(_uids)
        a, b = self.client(server, a_uid), self.client(server, b_uid)
        b_msgs = self.collect(b, "message")
        await self.live(a, b)
        server.stop()
        await eventually(lambda: a.state in ("offline", "connecting"))
        pending = [a.send(b_uid, f"queued {i}") for i in range(3)]
        server.start()
        for d in pending:
            await within(d, 60)
        await eventually(lambda: len(b_msgs) >= 3)
        self.assertEqual(self.bodies(b_msgs), ["queued 0", "queued 1", "queued 2"])

    async def test_offline_client_catches_up(self) -> None:
        server = self.server()
        a_uid, b_uid = next(_uids), next(_uids)
        path = os.path.join(self.mktemp(), "b.json")
        a = self.client(server, a_uid)
        b = self.client(server, b_uid, store=JSONFileStore(path))
        await self.live(a, b)
        device = b.device
        await within(b.close())

        sends = [a.send(b_uid, f"m{i}") for i in range(30)] + [a.send(b_uid, "last")]
        for d in sends:
            await within(d, 30)
        # The app restarts: the same device and seq from the file.
        again = self.client(server, b_uid, store=JSONFileStore(path))
        self.assertEqual(again.device, device)
        msgs = self.collect(again, "message")
        await self.live(again)
        expected = [f"m{i}" for i in range(30)] + ["last"]
        await eventually(lambda: len(msgs) >= len(expected))
        self.assertEqual(self.bodies(msgs), expected)
        self.assertTrue(all(e.replay for e in msgs))
        await eventually(lambda: self.pending(again))

        # Another restart: nothing again (acked, and the seq kept).
        await within(again.close())
        third = self.client(server, b_uid, store=JSONFileStore(path))
        replayed = self.collect(third, "message")
        await self.live(third)
        await within(a.send(b_uid, "new"))
        await eventually(lambda: replayed)
        self.assertEqual(self.bodies(replayed), ["new"])

    async def test_catch_up_many_pages(self) -> None:
        """600 messages while away: two catch-up pages, six sync pages, each message once."""
        server = ServerProcess({"limits": {"send_per_second": 100_000, "send_burst": 100_000}})
        self.addCleanup(server.cleanup)
        server.start()
        a_uid, b_uid = next(_uids), next(_uids)
        store = MemoryStore()
        a, b = self.client(server, a_uid), self.client(server, b_uid, store=store)
        await self.live(a, b)
        await within(b.close())
        bodies = [f"m{i}" for i in range(600)]
        sends = [a.send(b_uid, body) for body in bodies]
        for d in sends:
            await within(d, 60)
        again = self.client(server, b_uid, store=store)
        msgs = self.collect(again, "message")
        await self.live(again)
        self.assertEqual(self.bodies(msgs), bodies)
        self.assertEqual(again.seq, store.load()["seq"])

    async def test_offline_by_disconnect(self) -> None:
        """The same device, reconnecting by itself after the server dropped it."""
        server = self.server()
        a_uid, b_uid = next(_uids), next(_uids)
        a, b = self.client(server, a_uid), self.client(server, b_uid, store=MemoryStore())
        msgs = self.collect(b, "message")
        await self.live(a, b)
        server.kill()
        await eventually(lambda: b.state == "offline")
        server.start()
        await within(a.wait_live(), 30)
        sends = [a.send(b_uid, f"m{i}") for i in range(10)] + [a.send(b_uid, "end")]
        for d in sends:
            await within(d, 30)
        await eventually(lambda: len(msgs) >= 11)
        self.assertEqual(self.bodies(msgs), [f"m{i}" for i in range(10)] + ["end"])

    async def test_same_device_kicks(self) -> None:
        server = self.server()
        uid = next(_uids)
        first = self.client(server, uid, device="phone")
        states: list[StateChanged] = self.collect(first, "state")
        kicks = self.collect(first, "kick")
        await self.live(first)
        second = self.client(server, uid, device="phone")
        await self.live(second)
        await eventually(lambda: first.state == "kicked")
        self.assertEqual(states[-1], StateChanged("kicked", "replaced"))
        self.assertEqual([k.reason for k in kicks], ["replaced"])
        failure = await within(self.failed(first.ping()))
        self.assertEqual(failure.code, "kicked")
        # A reconnect would kick the second: it stays live (backoff_max 1 s).
        await sleep(2.5)
        self.assertEqual((first.state, second.state), ("kicked", "live"))
        self.assertEqual(states[-1].state, "kicked")

    async def test_own_devices(self) -> None:
        """What one device sends shows on the user's other device, with from = own uid."""
        server = self.server()
        a_uid, b_uid = next(_uids), next(_uids)
        phone = self.client(server, a_uid, device="phone")
        desktop = self.client(server, a_uid, device="desktop")
        b = self.client(server, b_uid)
        mine, theirs = self.collect(desktop, "message"), self.collect(b, "message")
        phone_msgs = self.collect(phone, "message")
        await self.live(phone, desktop, b)
        sent = await within(phone.send(b_uid, "from the phone"))
        await eventually(lambda: mine and theirs)
        self.assertEqual((mine[0].msg["from"], mine[0].msg["msg_id"]), (a_uid, sent["msg_id"]))
        self.assertEqual(mine[0].unread, None)
        await within(b.send(a_uid, "to both"))
        await eventually(lambda: len(mine) == 2 and phone_msgs)
        self.assertEqual(self.bodies(phone_msgs), ["to both"])
        self.assertEqual(self.bodies(mine), ["from the phone", "to both"])

    async def test_heartbeat(self) -> None:
        """Pings keep an idle client connected; a frozen server is noticed by the ping timeout."""
        server = ServerProcess({"server": {"heartbeat_seconds": 1, "idle_timeout_seconds": 3}})
        self.addCleanup(server.cleanup)
        server.start()
        client = self.client(server, next(_uids), ping_timeout=2)
        states: list[StateChanged] = self.collect(client, "state")
        await self.live(client)
        await sleep(5)  # beyond the idle timeout: only the pings were sent
        self.assertEqual([s.state for s in states], ["connecting", "syncing", "live"])
        server.signal(signal.SIGSTOP)
        self.addCleanup(server.signal, signal.SIGCONT)
        await eventually(lambda: client.state != "live")
        self.assertTrue(states[3].reason.startswith("timeout"), states)
        server.signal(signal.SIGCONT)
        await within(client.wait_live(), 30)

    async def test_send_over_the_frame_limit_refused_locally(self) -> None:
        """Over max_frame_bytes (the server's default, 64 KiB): too_large at once, nothing sent."""
        server = self.server()
        a_uid, b_uid = next(_uids), next(_uids)
        a, b = self.client(server, a_uid), self.client(server, b_uid)
        b_msgs = self.collect(b, "message")
        await self.live(a, b)
        failure = await within(self.failed(a.send(b_uid, "y" * 70_000)))
        self.assertEqual(failure.code, "too_large")
        await within(a.send(b_uid, "after"), 30)
        await eventually(lambda: b_msgs)
        self.assertEqual(self.bodies(b_msgs), ["after"])
        self.assertEqual(a.state, "live")

    async def test_bad_token_fails(self) -> None:
        server = self.server()
        client = Client(self.url(server), "not-a-token", reactor=reactor, **FAST)
        self.addCleanup(client.close)
        client.start()
        failure = await within(self.failed(client.wait_live()), 30)
        self.assertEqual((failure.code, client.state), ("auth_failed", "failed"))

    async def failed(self, d: Deferred[Any]) -> Any:
        try:
            await d
        except Exception as e:
            return e
        raise AssertionError("expected a failure")


class ReplyLosingProxy:
    """
    A loopback TCP proxy to the server that, once armed, drops the next
    C{send} reply (an ok frame with a C{msg_id}: the message is committed)
    and cuts the connection: a send whose answer was lost.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.armed = False
        self.dropped: Deferred[None] = Deferred()
        self.port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _Downstream(self)), interface="127.0.0.1"
        )

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port.getHost().port}"


class _Downstream(Protocol):
    """The client's side of one proxied connection."""

    transport: Any

    def __init__(self, proxy: ReplyLosingProxy) -> None:
        self.proxy = proxy
        self.up: _Upstream | None = None

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.upstream_port)
        d = connectProtocol(endpoint, _Upstream(self))
        d.addCallbacks(self._connected, lambda f: self.transport.loseConnection())

    def _connected(self, up: _Upstream) -> None:
        self.up = up
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        assert self.up is not None
        self.up.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.up is not None:
            self.up.transport.loseConnection()


class _Upstream(Protocol):
    transport: Any

    def __init__(self, down: _Downstream) -> None:
        self.down = down
        self.decoder = FrameDecoder(1 << 24)

    def dataReceived(self, data: bytes) -> None:
        proxy = self.down.proxy
        for body in self.decoder.feed(data):
            frame = decode_body(body)
            if proxy.armed and frame.get("t") == "ok" and "msg_id" in frame:
                proxy.armed = False
                self.transport.abortConnection()
                self.down.transport.abortConnection()
                proxy.dropped.callback(None)
                return
            self.down.transport.write(encode_frame(body))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.down.transport.loseConnection()


class ClientTCPTests(ClientE2EMixin, TestCase):
    def url(self, server: ServerProcess) -> str:
        return f"tcp://127.0.0.1:{server.port}"

    async def test_send_over_the_server_frame_limit(self) -> None:
        """
        A client that believes the server takes 1 MiB frames sends 100 KB:
        the server closes (frame_too_large), the client lowers its limit and
        the resend fails with too_large; the next send is delivered.
        """
        server = self.server()
        a_uid, b_uid = next(_uids), next(_uids)
        a, b = self.client(server, a_uid, max_frame_bytes=1 << 20), self.client(server, b_uid)
        b_msgs = self.collect(b, "message")
        await self.live(a, b)
        big = a.send(b_uid, "x" * 100_000)
        after = a.send(b_uid, "after")
        failure = await within(self.failed(big), 30)
        self.assertEqual(failure.code, "too_large")
        self.assertLess(a.max_frame_bytes, 100_100)
        await within(after, 30)
        await eventually(lambda: b_msgs)
        self.assertEqual(self.bodies(b_msgs), ["after"])

    async def test_reply_lost(self) -> None:
        """Stored, answer lost: the retry (same cid) is answered dup, the message arrives once."""
        server = self.server()
        proxy = ReplyLosingProxy(server.port)
        self.addCleanup(proxy.port.stopListening)
        a_uid, b_uid = next(_uids), next(_uids)
        a = Client(proxy.url, server.token(a_uid), reactor=reactor, **FAST)
        self.addCleanup(a.close)
        b = self.client(server, b_uid)
        b_msgs = self.collect(b, "message")
        await self.live(a, b)
        proxy.armed = True
        sent = await within(a.send(b_uid, "once"), 30)
        self.assertTrue(proxy.dropped.called)
        self.assertEqual(sent["dup"], True)
        await within(a.send(b_uid, "twice?"), 30)
        await eventually(lambda: len(b_msgs) >= 2)
        self.assertEqual(self.bodies(b_msgs), ["once", "twice?"])
        self.assertEqual(b_msgs[0].msg["msg_id"], sent["msg_id"])


class ClientEndpointStringTests(TestCase):
    timeout = 60

    async def test_endpoint_string(self) -> None:
        server = ServerProcess()
        self.addCleanup(server.cleanup)
        server.start()
        client = Client(server.endpoint, server.token(next(_uids)), reactor=reactor)
        self.addCleanup(client.close)
        client.start()
        await within(client.wait_live(), 30)
        self.assertEqual(set(await within(client.ping())), {"server_time"})


class ClientWebSocketTests(ClientE2EMixin, TestCase):
    def url(self, server: ServerProcess) -> str:
        return server.ws_url
