"""
Property-based tests of several devices per user (docs/protocol.md, "Devices"):
every device sees every event of its user's stream exactly once, in order,
from its confirmed position on, whatever it sends, acks, reads, recalls, and
however it drops and comes back; read state and unread counts are the user's,
equal to SQL; pending is what no device acked.

A Hypothesis L{RuleBasedStateMachine}, on both backends, as
L{tests.test_properties} (whose bridge between Hypothesis's thread and the
reactor it reuses), but one level up: the real L{Gateway} with the real op
table and login hook listens on a loopback port, and every device is a real
client connection (L{imserver.client}), so what is checked is what a client
reads off the wire, catch-up mode and its push filter included.

The model keeps, per user, the stream the protocol promises: one event per
seq (a message received or sent, a read that moved, a recall), the seq
predicted from the order of the steps and checked against every reply. After
every step (fan-out settled, then a ping on every connection as a barrier)
each live connection must have received exactly the events of its user after
where it started, minus what it caused itself (its own device's sends; its own
reads and recalls), each once, in seq order (a message recalled before a
catch-up reached it may be passed over: its recall event comes instead); and
for every user unread (COUNT over the message rows in SQL, the unread op, the
counts in pushes) and pending (sync, offline_summary) must match the model,
and devices {} must list every known device and which are online.

Rules: send, bursts of sends from several devices, read, recall (again too),
ack (msg_ids and/or seq), set_profile, disconnect, reconnect (with since =
the confirmed seq and catch-up to the end, or live without since), replace
(the same device again: the old one is kicked replaced), a reconnect racing
sends (the catch-up or the pushes slowed down, so that both races happen: a
send committed after a page's snapshot, and one pushed after the page that
had it), forget (the sweep after forget_days: reset), a device beyond
max_online (the least recently active goes: too_many_devices), losing the
hot store.

Three runs: the embedded default, MariaDB + Redis on one node, and a cluster
of two nodes (each with its own service, store and gateway on the shared
database and Redis, presence L{ClusterPresence}) where each connection goes
to the next node, so a user's devices, replacements and races span nodes;
there pushes between nodes travel over pub/sub, may overtake each other, and
are waited for (bounded), and seqs are read from SQL, since two nodes' commits
may take a user's seqs in either order.

Environment: IMSERVER_PROPERTY_SCALE multiplies the number of programs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar
from unittest import mock

import attrs
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import FailTest, TestCase

from imserver.client import IMClientProtocol, connect
from imserver.config import LimitsConfig, ServerConfig, parse_config
from imserver.gateway.ops import business_ops, login_hook
from imserver.gateway.protocol import Gateway
from imserver.services.cluster import ClusterPresence
from imserver.services.registry import LocalRegistry
from imserver.services.tokens import TokenService
from imserver.storage.hot.bus import RedisBus
from imserver.storage.hot.connection import RedisConnection
from imserver.storage.sql.database import Database
from tests.stack import Stack, make_stack
from tests.support import eventually, reactor, sleep
from tests.test_properties import Bridge, _Scope, run_search

T = TypeVar("T")

UIDS = (1, 2, 3)
MAX_DEVICES = 4
LIMITS = LimitsConfig(recall_seconds=3600, send_per_second=1e6, send_burst=10**6)
SECRET = "device-properties-secret-0123456789-abcdef"
#: A read position past any message: capped at the session's latest one.
FAR = 2**53 - 1
#: Bound on one step's wait for a reply.
CALL_TIMEOUT = 30.0
#: Seconds a push between nodes (Redis pub/sub) may take before it counts as missing.
CROSS_NODE = 5.0
#: Page size of the catch-up: small, so that catching up takes several pages.
PAGE = 3
#: Seconds the racing rule delays a catch-up page's reply, or pushes.
SLOW = 0.03
#: [devices] forget_days, the default: 30 days.
FORGET_MS = 30 * 86400 * 1000
#: The first device of every user gives no device name (a client of protocol v1).
DEFAULT = "default"

log = Logger()

picks = st.integers(0, 1000)


def other(uid: int, d: int) -> int:
    """The d-th user after C{uid} (d in 1..2): never C{uid} itself."""
    return UIDS[(UIDS.index(uid) + d) % len(UIDS)]


def pair(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


@attrs.define(eq=False)
class Msg:
    label: str
    sender: int
    to: int
    session_id: int
    msg_id: int
    ts: int
    cid: str
    #: The device it was sent from.
    device: str
    recalled: bool = False
    acked: bool = False

    def view(self) -> tuple[Any, ...]:
        return ("msg", self.msg_id, self.session_id, self.sender, self.to, self.cid, self.ts)


@attrs.define(eq=False)
class Event:
    """One seq of one user's stream, as the model expects it."""

    seq: int
    #: What the frame of it says (see L{view}).
    view: tuple[Any, ...]
    #: The message of a msg or recall event.
    msg: Msg | None = None
    #: A msg event on the sender's side: the device that sent it (never told of it).
    own_device: str | None = None
    #: The connection whose read or recall made it (not pushed to that connection).
    actor: int | None = None
    #: (unread, total_unread) a push of it must carry, None when not checked
    #: (concurrent steps) or when it carries none.
    counts: tuple[int, int] | None = None

    @property
    def kind(self) -> str:
        return str(self.view[0])


def view(frame: dict[str, Any]) -> tuple[Any, ...]:
    """What a msg/read/recall frame says, as L{Event.view}."""
    t = frame.get("t")
    if t == "msg":
        return (
            "msg",
            frame["msg_id"],
            frame["session_id"],
            frame["from"],
            frame["to"],
            frame["cid"],
            frame["ts"],
        )
    if t == "read":
        return ("read", frame["session_id"], frame["by"], frame["msg_id"])
    if t == "recall":
        return ("recall", frame["msg_id"], frame["session_id"], frame["by"])
    return (t, frame)


@attrs.define(eq=False)
class Conn:
    """One connection of a device, with all it received."""

    id: int
    proto: IMClientProtocol
    #: Events after this seq must all reach the connection.
    start: int
    node: Node
    #: (how, frame) of every frame carrying a seq, in arrival order; how is
    #: "push" or "page".
    got: list[tuple[str, dict[str, Any]]] = attrs.Factory(list)
    #: Pushes without a seq (profile, sync, a repeated recall...).
    other: list[dict[str, Any]] = attrs.Factory(list)
    kicks: list[str] = attrs.Factory(list)

    def on_push(self, frame: dict[str, Any]) -> None:
        if frame.get("t") == "kick":
            self.kicks.append(frame.get("reason", ""))
        elif "seq" in frame:
            self.got.append(("push", dict(frame)))
        else:
            self.other.append(dict(frame))


@attrs.define(eq=False)
class Device:
    uid: int
    name: str
    #: The seq this device confirmed (ack seq): it reconnects with since = this.
    confirmed: int = 0
    #: The server's cursor for it, as the model knows: max of acks and catch-up starts.
    cursor: int = 0
    conn: Conn | None = None
    #: The server forgot it (unseen for forget_days): its next login makes it anew.
    forgotten: bool = False

    @property
    def label(self) -> str:
        return f"{self.uid}/{self.name}"


@attrs.define(eq=False)
class Node:
    id: int
    stack: Stack
    registry: LocalRegistry
    endpoint: str


class DevicesMachine(RuleBasedStateMachine):
    """Users 1..3 with 1..4 devices each, every device a real connection."""

    case: TestCase
    backend: str
    bridge: Bridge
    #: Nodes (more than one: a cluster on Redis; each connection goes to the next).
    node_count = 1

    #: [devices] max_online: on one node, as many as a user starts with, so that
    #: one more (L{extra_device}, or the reconnect of the device it kicked)
    #: kicks the least recently active; in the cluster, more than a user has.
    @property
    def max_online(self) -> int:
        return MAX_DEVICES if self.node_count == 1 else MAX_DEVICES + 2

    def __init__(self) -> None:
        super().__init__()
        self.scope = _Scope(self.case)
        self.tokens = TokenService(SECRET)
        #: What the racing rule slows down: None, "pages" or "pushes".
        self.slow: str | None = None
        self.delayed: list[Deferred[Any]] = []
        self.devices: list[Device] = []
        self.nodes = self.bridge(self._start)
        #: Where the checks ask (every node shares the database and the hot store).
        self.stack = self.nodes[0].stack
        self.connections = itertools.count()
        self.streams: dict[int, list[Event]] = {uid: [] for uid in UIDS}
        self.msgs: list[Msg] = []
        self.sessions: dict[tuple[int, int], int] = {}
        self.read_pos: dict[tuple[int, int], int] = {}
        self.conn_ids = itertools.count(1)
        self.cids = itertools.count(1)
        self.transcript: list[str] = []
        self.steps = 0
        #: The last step ran things concurrently: push counts are not checked.
        self.loose = False

    async def _start(self) -> list[Node]:
        nodes: list[Node] = []
        for node_id in range(1, self.node_count + 1):
            nodes.append(await self._node(node_id, nodes[0] if nodes else None))

        async def stop() -> None:
            for device in self.devices:
                if device.conn is not None:
                    await device.conn.proto.close()

        # Cleanups run last first: connections close before the nodes stop.
        self.scope.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return nodes

    async def _node(self, node_id: int, first: Node | None) -> Node:
        """
        One node: the service and storage of L{make_stack}, the real gateway
        on a loopback port, and presence: the node's registry alone, or (a
        cluster) L{ClusterPresence} on the Redis, key prefix and database of
        the first node.
        """
        if first is None:
            stack = await make_stack(self.scope, self.backend, limits=LIMITS)  # type: ignore[arg-type]
        else:
            db = Database(
                reactor, first.stack.store.db.engine, name=f"node{node_id}", max_connections=8
            )
            with mock.patch("tests.stack.fresh_prefix", lambda: first.stack.prefix):
                stack = await make_stack(
                    self.scope,  # type: ignore[arg-type]
                    self.backend,
                    limits=LIMITS,
                    node_id=node_id,
                    redis=first.stack.redis,
                    db=db,
                )
        registry = LocalRegistry(max_online=self.max_online)
        presence: Any = registry
        if self.node_count > 1:
            assert stack.redis is not None
            target = parse_config({"storage": {"redis": stack.redis.url}}).storage.redis
            assert target is not None
            connection = RedisConnection(reactor, target, timeout=1.0)
            await connection.start()
            presence = ClusterPresence(
                reactor,
                registry,
                RedisBus(connection, stack.prefix),
                node_id,
                max_online=self.max_online,
            )
            presence.start()

            async def stop_presence() -> None:
                await presence.stop()
                await connection.stop()

            self.scope.addCleanup(lambda: Deferred.fromCoroutine(stop_presence()))
            await eventually(lambda: presence.pubsub_state() == "ok")
        # The service (and its device ops) push to and ask the presence the
        # gateway logs connections into.
        stack.chat.presence = presence
        if hasattr(stack.chat, "devices"):
            stack.chat.devices.presence = presence
        gateway = Gateway(
            config=ServerConfig(),
            clock=reactor,
            tokens=self.tokens,
            presence=presence,
            ops=business_ops(stack.chat, LIMITS),
            on_login=login_hook(stack.chat),
        )
        port = reactor.listenTCP(0, gateway, interface="127.0.0.1")
        self.scope.addCleanup(port.stopListening)
        # The racing rule slows one side of the race: the catch-up ("pages":
        # a page's snapshot is read, then the racing sends commit and push
        # before its reply) or the pushes ("pushes": the fan-out of a send
        # committed before a page's snapshot reaches the connection after the
        # page's reply). Delayed pushes keep their order.
        read_page = stack.store.catchup
        push = registry.push_local

        async def catchup(uid: int, device_id: int, after: int, limit: int) -> Any:
            page = await read_page(uid, device_id, after, limit)
            if self.slow == "pages":
                await sleep(SLOW)
            return page

        held: list[tuple[int, Any, Any]] = []

        def flush() -> None:
            while held:
                push(*held.pop(0))

        def slow_push(uid: int, frame: Any, exclude: Any = None) -> bool:
            if self.slow != "pushes" and not held:
                return push(uid, frame, exclude)
            # Held, and so is every push after it until they all go (in order).
            if not held:
                self.delayed.append(deferLater(reactor, SLOW, flush))
            held.append((uid, frame, exclude))
            return any(link is not exclude for link in registry.local(uid))

        stack.store.catchup = catchup  # type: ignore[method-assign]
        # (LocalRegistry.push pushes through push_local.)
        registry.push_local = slow_push  # type: ignore[method-assign]
        return Node(node_id, stack, registry, f"tcp:127.0.0.1:{port.getHost().port}")

    def run(self, f: Callable[[], Coroutine[Any, Any, T]]) -> T:
        try:
            return self.bridge(f)
        except FailTest:
            raise
        except Exception as e:
            self.stop(f"unexpected error: {e!r}")

    def teardown(self) -> None:
        self.bridge.stats["programs"] += 1
        self.bridge.stats["steps"] += self.steps
        self.bridge.stats["messages"] += len(self.msgs)
        self.bridge.stats["events"] += sum(len(s) for s in self.streams.values())
        self.run(self.scope.close)

    # -- the model ---------------------------------------------------------------

    def note(self, line: str) -> None:
        self.steps += 1
        self.transcript.append(f"{self.steps:3d}. {line}")

    def stop(self, text: str) -> NoReturn:
        report = (
            f"[{self.backend}] {text}\n"
            "program (u/dev: device dev of user u; m<n>: n-th message; #<n>: connection n):\n"
            + "\n".join(self.transcript or ["  (no steps)"])
        )
        self.bridge.failures.append((self.steps, report))
        raise FailTest(report)

    def fail(self, what: str, observed: Any, expected: Any) -> NoReturn:
        self.stop(f"{what}\n  observed: {observed}\n  expected: {expected}")

    def check(self, what: str, observed: Any, expected: Any) -> None:
        if observed != expected:
            self.fail(what, observed, expected)

    def head(self, uid: int) -> int:
        return len(self.streams[uid])

    def add_event(self, uid: int, view: tuple[Any, ...], **fields: Any) -> Event:
        event = Event(self.head(uid) + 1, view, **fields)
        self.streams[uid].append(event)
        return event

    def devices_of(self, uid: int) -> list[Device]:
        return [d for d in self.devices if d.uid == uid]

    def online(self) -> list[Device]:
        return [d for d in self.devices if d.conn is not None]

    def offline(self) -> list[Device]:
        return [d for d in self.devices if d.conn is None]

    def last_id(self, sid: int) -> int:
        return max(m.msg_id for m in self.msgs if m.session_id == sid)

    def unread_in(self, uid: int, sid: int) -> int:
        pos = self.read_pos.get((uid, sid), 0)
        return sum(
            1
            for m in self.msgs
            if m.session_id == sid and m.to == uid and not m.recalled and m.msg_id > pos
        )

    def total_unread(self, uid: int) -> int:
        return sum(self.unread_in(uid, sid) for key, sid in self.sessions.items() if uid in key)

    def pending(self, uid: int) -> list[Msg]:
        return [m for m in self.msgs if m.to == uid and not m.acked and not m.recalled]

    def label(self, msg_id: int) -> str:
        for m in self.msgs:
            if m.msg_id == msg_id:
                return m.label
        return str(msg_id)

    def show(self, uid: int, seqs: Any) -> list[str]:
        """Seqs of a user's stream in model terms."""
        out = []
        stream = self.streams[uid]
        for s in seqs:
            if not 1 <= s <= len(stream):
                out.append(f"{s}:?")
                continue
            e = stream[s - 1]
            if e.kind == "msg":
                assert e.msg is not None
                out.append(f"{s}:msg {e.msg.label}")
            elif e.kind == "read":
                out.append(f"{s}:read by {e.view[2]} to {self.label(e.view[3])}")
            else:
                assert e.msg is not None
                out.append(f"{s}:recall {e.msg.label}")
        return out

    # -- connections ---------------------------------------------------------------

    async def request(self, device: Device, op: str, **fields: Any) -> dict[str, Any]:
        assert device.conn is not None
        d = device.conn.proto.request(op, **fields)
        d.addTimeout(CALL_TIMEOUT, reactor)
        reply = dict(await d)
        del reply["t"], reply["id"]
        return reply

    async def connect(self, device: Device, since: int | None) -> tuple[Conn, dict[str, Any]]:
        """A new connection of C{device} (auth with C{since} when given)."""
        fields: dict[str, Any] = {"client": "property-test/1"}
        if device.name != DEFAULT:
            # The default device names none, as a client of protocol v1.
            fields["device"] = device.name
        if since is not None:
            fields["since"] = since
        token = self.tokens.mint(device.uid, now=reactor.seconds())
        node = self.nodes[next(self.connections) % len(self.nodes)]
        # Beyond max_online the least recently active other device goes (as
        # the registry saw their last requests; equal times: any of them).
        others = [d for d in self.online() if d.uid == device.uid and d is not device]
        victims: list[Device] = []
        if len(others) >= self.max_online:
            active = {
                link.device: link.last_active
                for n in self.nodes
                for link in n.registry.local(device.uid)
            }
            least = min(active[d.name] for d in others)
            victims = [d for d in others if active[d.name] == least]
        proto = await connect(reactor, node.endpoint)
        conn = Conn(next(self.conn_ids), proto, start=0, node=node)
        proto.on_push = conn.on_push
        d = proto.request("auth", token=token, **fields)
        d.addTimeout(CALL_TIMEOUT, reactor)
        reply = dict(await d)
        if len(others) >= self.max_online:
            await self._kicked_one(device, others, victims)
        return conn, reply

    async def _kicked_one(
        self, device: Device, others: list[Device], victims: list[Device]
    ) -> None:
        """The login of C{device} kicked one of C{victims} (too_many_devices), no other."""
        conns = {d: d.conn for d in others if d.conn is not None}
        await eventually(
            lambda: any(not c.proto.is_open for c in conns.values()), timeout=CALL_TIMEOUT
        )
        gone = [d for d, c in conns.items() if not c.proto.is_open]
        self.check(
            f"devices kicked by the login of {device.label} beyond max_online {self.max_online}"
            " (one of the least recently active)",
            [d.label for d in gone],
            [gone[0].label] if gone and gone[0] in victims else [v.label for v in victims],
        )
        victim = gone[0]
        kicked = conns[victim]
        self.check(f"kick of {victim.label} (#{kicked.id})", kicked.kicks, ["too_many_devices"])
        victim.conn = None
        self.bridge.stats["too_many kicks"] += 1
        self.note(f"  ...which kicked {victim.label} (#{kicked.id}): too_many_devices")

    async def catch_up(
        self,
        device: Device,
        conn: Conn,
        start: int,
        before_page: Callable[[int], Deferred[Any] | None] | None = None,
    ) -> list[tuple[int, bool, int]]:
        """
        Pull catch-up pages (after: the connection's position, the default)
        until more is false; (events, more, seq) of each page. Each page's
        C{after} becomes the device's cursor on the server.
        """
        pages = []
        after = start
        while len(pages) < 1000:
            if before_page is not None:
                wait = before_page(len(pages))
                if wait is not None:
                    await wait
            reply = await self.request(device, "catchup", limit=PAGE)
            device.cursor = max(device.cursor, after)
            events = reply["events"]
            for e in events:
                conn.got.append(("page", dict(e)))
            pages.append((len(events), reply["more"], reply["seq"]))
            if not reply["more"]:
                return pages
            after = reply["seq"]
        self.fail(f"catch-up of {device.label}", "1000 pages and more", "an end")

    async def barrier(self) -> None:
        """Everything pushed so far has reached the clients (on one node)."""
        for node in self.nodes:
            await node.stack.settle()
        delayed, self.delayed = self.delayed, []
        await gatherResults(delayed, consumeErrors=True)
        live = [d.conn for d in self.devices if d.conn is not None]
        pings = []
        for conn in live:
            d = conn.proto.request("ping")
            d.addTimeout(CALL_TIMEOUT, reactor)
            pings.append(d)
        await gatherResults(pings, consumeErrors=True)

    # -- rules -------------------------------------------------------------------

    @initialize(counts=st.lists(st.integers(1, MAX_DEVICES), min_size=3, max_size=3))
    def start_devices(self, counts: list[int]) -> None:
        """Every user's devices, new, connected without since (live from the head: 0)."""

        async def go() -> None:
            for uid, n in zip(UIDS, counts, strict=True):
                for i in range(n):
                    await self._new_device(uid, DEFAULT if i == 0 else f"dev{i + 1}")
            self.note(
                "devices: " + ", ".join(f"user {u}: {n}" for u, n in zip(UIDS, counts, strict=True))
            )

        self.run(go)

    async def _new_device(self, uid: int, name: str) -> Device:
        device = Device(uid, name)
        conn, reply = await self.connect(device, None)
        head = self.head(uid)
        self.check(
            f"auth of new device {device.label}",
            {k: reply.get(k) for k in ("uid", "device", "seq", "head", "new_device", "reset")},
            {
                "uid": uid,
                "device": name,
                "seq": head,
                "head": head,
                "new_device": True,
                "reset": None,
            },
        )
        conn.start = head
        device.conn = conn
        device.confirmed = device.cursor = head
        self.devices.append(device)
        return device

    @precondition(lambda self: any(len(self.devices_of(u)) < MAX_DEVICES for u in UIDS))
    @rule(pick=picks, since=st.booleans())
    def new_device(self, pick: int, since: bool) -> None:
        """A device never seen joins (with since = 0: catch-up mode, nothing to catch up)."""
        room = [u for u in UIDS if len(self.devices_of(u)) < MAX_DEVICES]
        uid = room[pick % len(room)]
        name = f"dev{len(self.devices_of(uid)) + 1}"

        async def go() -> None:
            self.note(f"new device {uid}/{name}" + (" with since 0" if since else ""))
            if not since:
                await self._new_device(uid, name)
                return
            device = Device(uid, name)
            conn, reply = await self.connect(device, 0)
            head = self.head(uid)
            self.check(
                f"auth of new device {device.label} with since 0",
                {k: reply.get(k) for k in ("seq", "head", "new_device", "reset")},
                {"seq": head, "head": head, "new_device": True, "reset": None},
            )
            conn.start = head
            device.conn = conn
            device.confirmed = device.cursor = head
            self.devices.append(device)
            pages = await self.catch_up(device, conn, head)
            self.check(f"catch-up of new device {device.label}", pages, [(0, False, head)])

        self.run(go)

    @precondition(
        lambda self: any(
            len([d for d in self.devices_of(u) if d.conn is not None]) >= self.max_online
            and len(self.devices_of(u)) <= self.max_online
            for u in UIDS
        )
    )
    @rule(pick=picks)
    def extra_device(self, pick: int) -> None:
        """A device joins a user online on max_online devices already."""
        full = [
            u
            for u in UIDS
            if len([d for d in self.devices_of(u) if d.conn is not None]) >= self.max_online
            and len(self.devices_of(u)) <= self.max_online
        ]
        uid = full[pick % len(full)]

        async def go() -> None:
            await self.settled()
            for d in self.devices_of(uid):
                if d.conn is not None:
                    self._check_conn(d, d.conn)
            self.note(f"extra device {uid}/extra beyond max_online {self.max_online}")
            await self._new_device(uid, "extra")

        self.run(go)

    def sender_device(self, pick: int, uid: int | None = None) -> Device | None:
        pool = [d for d in self.online() if uid is None or d.uid == uid]
        return pool[pick % len(pool)] if pool else None

    @precondition(lambda self: self.online())
    @rule(pick=picks, d=st.integers(1, 2))
    def send(self, pick: int, d: int) -> None:
        device = self.sender_device(pick)
        assert device is not None
        self.run(lambda: self._sends([(device, other(device.uid, d))]))

    @precondition(lambda self: self.online())
    @rule(sends=st.lists(st.tuples(picks, st.integers(1, 2)), min_size=2, max_size=6))
    def burst(self, sends: list[tuple[int, int]]) -> None:
        """Sends from several devices (of one user or several) in flight at once."""
        batch = []
        for pick, d in sends:
            device = self.sender_device(pick)
            assert device is not None
            batch.append((device, other(device.uid, d)))
        self.run(lambda: self._sends(batch))

    async def _sends(self, batch: list[tuple[Device, int]]) -> None:
        cids = [f"c{next(self.cids)}" for _ in batch]
        replies = await gatherResults(
            [
                ensureDeferred(self.request(device, "send", to=to, cid=cid, body=f"body {cid}"))
                for (device, to), cid in zip(batch, cids, strict=True)
            ],
            consumeErrors=True,
        )
        await self._sent(batch, cids, replies)

    async def _sent(
        self,
        batch: list[tuple[Device, int]],
        cids: list[str],
        replies: list[dict[str, Any]],
        what: str = "",
    ) -> None:
        """
        Add sends that were in flight together to the model. On one node they
        commit in msg_id order, each message taking the recipient's next seq,
        then the sender's: the model predicts every seq. In a cluster the
        nodes' batches commit in either order: the seqs are read from SQL and
        must still be each user's next ones, without gap, in msg_id order for
        the messages of one node.
        """
        concurrent = len(batch) > 1
        order = sorted(range(len(batch)), key=lambda i: replies[i]["msg_id"])
        parts, made = [], {}
        for i in order:
            (device, to), cid, reply = batch[i], cids[i], replies[i]
            a = device.uid
            if reply.get("dup"):
                self.fail(f"send {device.label}->{to} {cid}: dup", reply, "dup false")
            key = pair(a, to)
            sid = reply["session_id"]
            if key in self.sessions:
                self.check(f"send {device.label}->{to}: session_id", sid, self.sessions[key])
            self.sessions[key] = sid
            m = Msg(
                f"m{len(self.msgs) + 1}", a, to, sid, reply["msg_id"], reply["ts"], cid, device.name
            )
            self.msgs.append(m)
            made[i] = m
            parts.append(f"{device.label}->{to} {cid} = {m.label}")
            if len(self.nodes) == 1:
                # Recipient first, then sender (the batch's seq order per message).
                counts = None if concurrent else (self.unread_in(to, sid), self.total_unread(to))
                self.add_event(to, m.view(), msg=m, counts=counts)
                mine = self.add_event(a, m.view(), msg=m, own_device=device.name)
                self.check(f"send {m.label}: reply seq", reply.get("seq"), mine.seq)
        self.msgs.sort(key=lambda m: m.msg_id)
        self.loose = concurrent
        self.note((what or ("burst " if concurrent else "send ")) + "; ".join(parts))
        if len(self.nodes) == 1:
            return
        seqs = await self.stack.store.db.run("seqs", _seqs, [m.msg_id for m in made.values()])
        new: dict[int, list[tuple[int, int, Msg, str | None]]] = {}
        for i, m in made.items():
            sender_seq, recipient_seq = seqs[m.msg_id]
            self.check(f"send {m.label}: reply seq", replies[i].get("seq"), sender_seq)
            node = batch[i][0].conn.node.id if batch[i][0].conn else 0
            new.setdefault(m.to, []).append((recipient_seq, node, m, None))
            new.setdefault(m.sender, []).append((sender_seq, node, m, m.device))
        for uid, events in new.items():
            events.sort(key=lambda e: e[0])
            self.check(
                f"seqs of user {uid} for the sends",
                [e[0] for e in events],
                list(range(self.head(uid) + 1, self.head(uid) + len(events) + 1)),
            )
            for node in {e[1] for e in events}:
                ids = [e[2].msg_id for e in events if e[1] == node]
                self.check(f"seqs of user {uid} for node {node}'s sends in order", ids, sorted(ids))
            for _, _, m, own in events:
                counts = None
                if not concurrent and own is None:
                    counts = (self.unread_in(uid, m.session_id), self.total_unread(uid))
                self.add_event(uid, m.view(), msg=m, own_device=own, counts=counts)

    @precondition(lambda self: self.msgs and self.online())
    @rule(
        pick=picks,
        who=picks,
        role=st.sampled_from(["recipient", "sender"]),
        mode=st.sampled_from(["message", "everything"]),
    )
    def read(self, pick: int, who: int, role: str, mode: str) -> None:
        """A device of a member of a message's session reads up to it (or everything)."""
        m = self.msgs[pick % len(self.msgs)]
        uid, peer = (m.to, m.sender) if role == "recipient" else (m.sender, m.to)
        device = self.sender_device(who, uid)
        if device is None:
            return
        sid = m.session_id
        target = FAR if mode == "everything" else m.msg_id

        async def go() -> None:
            assert device.conn is not None
            reply = await self.request(device, "read", session_id=sid, msg_id=target)
            old = self.read_pos.get((uid, sid), 0)
            new = max(old, min(target, self.last_id(sid)))
            self.read_pos[uid, sid] = new
            self.note(
                f"read by {device.label} (#{device.conn.id}) of s{pair(uid, peer)} up to "
                + ("everything" if mode == "everything" else m.label)
                + f" ({self.label(old) if old else 'none'} -> {self.label(new)})"
            )
            expected: dict[str, Any] = {
                "unread": self.unread_in(uid, sid),
                "total_unread": self.total_unread(uid),
            }
            if new != old:
                frame = ("read", sid, uid, new)
                counts = (self.unread_in(uid, sid), self.total_unread(uid))
                mine = self.add_event(uid, frame, actor=device.conn.id, counts=counts)
                self.add_event(peer, frame)
                expected["seq"] = mine.seq
            self.check(f"read by {device.label}: reply", reply, expected)

        self.run(go)

    @precondition(lambda self: self.msgs and self.online())
    @rule(pick=picks, who=picks)
    def recall(self, pick: int, who: int) -> None:
        """A device of the sender recalls a message (again, if recalled already)."""
        m = self.msgs[pick % len(self.msgs)]
        device = self.sender_device(who, m.sender)
        if device is None:
            return

        async def go() -> None:
            assert device.conn is not None
            reply = await self.request(device, "recall", msg_id=m.msg_id)
            self.note(
                f"recall of {m.label} by {device.label} (#{device.conn.id})"
                + (" again" if m.recalled else "")
            )
            if m.recalled:
                self.check(f"repeated recall of {m.label}: reply", reply.get("seq"), None)
                return
            m.recalled = True
            frame = ("recall", m.msg_id, m.session_id, m.sender)
            self.add_event(m.to, frame, msg=m)
            mine = self.add_event(m.sender, frame, msg=m, actor=device.conn.id)
            self.check(f"recall of {m.label}: reply", reply, {"seq": mine.seq})

        self.run(go)

    @precondition(lambda self: self.online())
    @rule(pick=picks, chosen=st.lists(picks, max_size=3), upto=st.integers(0, 4))
    def ack(self, pick: int, chosen: list[int], upto: int) -> None:
        """A device acks some messages it received and/or confirms a position
        (upto 0: no seq; else somewhere from its confirmed position to the head)."""
        device = self.sender_device(pick)
        assert device is not None and device.conn is not None
        waiting = self.pending(device.uid)
        take = (
            list({id(m): m for m in (waiting[i % len(waiting)] for i in chosen)}.values())
            if waiting
            else []
        )
        head = self.head(device.uid)
        seq = None
        if upto or not take:
            seq = device.confirmed + (head - device.confirmed) * max(upto, 1) // 4
        fields: dict[str, Any] = {}
        if take:
            fields["msg_ids"] = [m.msg_id for m in take]
        if seq is not None:
            fields["seq"] = seq

        async def go() -> None:
            reply = await self.request(device, "ack", **fields)
            self.note(
                f"ack by {device.label}: "
                + ", ".join(m.label for m in take)
                + ("" if seq is None else f" seq {seq}")
            )
            self.check(f"ack by {device.label}: reply", reply, {})
            for m in take:
                m.acked = True
            if seq is not None:
                device.confirmed = max(device.confirmed, seq)
                device.cursor = max(device.cursor, seq)

        self.run(go)

    @precondition(lambda self: self.online())
    @rule(pick=picks)
    def disconnect(self, pick: int) -> None:
        device = self.sender_device(pick)
        assert device is not None and device.conn is not None
        conn = device.conn

        async def go() -> None:
            await self.settled()
            self._check_conn(device, conn)
            await conn.proto.close()
            device.conn = None
            self.note(f"disconnect {device.label} (#{conn.id})")
            # The server has seen it go (devices {} says offline from here on).
            await eventually(
                lambda: all(
                    link.device != device.name for link in conn.node.registry.local(device.uid)
                ),
                timeout=CALL_TIMEOUT,
                interval=0.001,
            )

        self.run(go)

    @precondition(lambda self: self.offline())
    @rule(pick=picks, live=st.booleans())
    def reconnect(self, pick: int, live: bool) -> None:
        """An offline device comes back: with since = its confirmed position and
        catch-up to the end, or (live) without since, from the head on."""
        pool = self.offline()
        device = pool[pick % len(pool)]
        self.run(lambda: self._reconnect(device, live=live))

    @precondition(lambda self: self.online())
    @rule(pick=picks)
    def replace(self, pick: int) -> None:
        """A device connects again while its old connection is up: the old one is
        kicked (replaced), the new one catches up from the confirmed position."""
        device = self.sender_device(pick)
        assert device is not None and device.conn is not None
        old = device.conn

        async def go() -> None:
            await self.settled()
            self._check_conn(device, old)
            self.note(f"replace {device.label} (#{old.id}) by a new connection:")
            await self._reconnect(device, live=False)
            d = old.proto.closed
            d.addTimeout(CALL_TIMEOUT, reactor)
            await d
            self.check(
                f"kicks of the replaced #{old.id} of {device.label}", old.kicks, ["replaced"]
            )

        self.run(go)

    @precondition(lambda self: self.offline())
    @rule(
        pick=picks,
        sends=st.lists(st.tuples(picks, st.integers(1, 2)), min_size=1, max_size=9),
        slow=st.sampled_from(["pages", "pushes"]),
    )
    def reconnect_racing(self, pick: int, sends: list[tuple[int, int]], slow: str) -> None:
        """An offline device reconnects (since, catch-up) while messages to and
        from its user are being sent, in three waves: before the auth, with the
        first catch-up page, with the second. Each must reach it once, by page
        or by push: none may fall between the last page and the live pushes."""
        pool = [d for d in self.offline() if not d.forgotten] or self.offline()
        device = pool[pick % len(pool)]
        online = [d for d in self.devices_of(device.uid) if d.conn is not None]
        if device.forgotten or len(online) >= self.max_online:
            # (Not with a kick: a sender could be the device it kicks.)
            return
        batch = []
        for p, d in sends:
            sender = self.sender_device(p)
            if sender is None:
                break
            # Half of them to the reconnecting user.
            to = device.uid if p % 2 and sender.uid != device.uid else other(sender.uid, d)
            batch.append((sender, to))
        cids = [f"c{next(self.cids)}" for _ in batch]
        waves = [list(range(len(batch)))[w::3] for w in range(3)]

        async def go() -> None:
            sending: dict[int, Deferred[dict[str, Any]]] = {}

            def wave(w: int) -> Deferred[Any] | None:
                """Send the w-th wave; with slow pushes, wait until it is committed
                (so the next page has it and its pushes come after the page)."""
                started = []
                for i in waves[w] if w < len(waves) else ():
                    if i not in sending:
                        (s, to), cid = batch[i], cids[i]
                        sending[i] = ensureDeferred(
                            self.request(s, "send", to=to, cid=cid, body=f"body {cid}")
                        )
                        started.append(sending[i])
                if slow != "pushes" or not started:
                    return None
                return gatherResults(started, consumeErrors=True)

            wave(0)
            since = device.confirmed
            conn, reply = await self.connect(device, since)
            device.conn = conn
            self.slow = slow
            try:
                pages = await self.catch_up(device, conn, since, lambda n: wave(n + 1))
            finally:
                self.slow = None
            wave(1)
            wave(2)
            replies = await gatherResults(
                [sending[i] for i in range(len(batch))], consumeErrors=True
            )
            # The sends are in the model only now: the checks of the connection
            # run after the step, against the whole stream.
            conn.start = since
            self.check(f"racing reconnect of {device.label}: auth seq", reply.get("seq"), since)
            self.note(
                f"reconnect {device.label} (#{conn.id}) since {since} racing"
                f" {len(batch)} sends (slow {slow}); pages {pages}"
            )
            if batch:
                await self._sent(batch, cids, replies, "  ...the racing sends: ")
            self.loose = True

        self.run(go)

    async def _reconnect(self, device: Device, live: bool) -> None:
        head = self.head(device.uid)
        since = None if live else device.confirmed
        conn, reply = await self.connect(device, since)
        device.conn = conn
        forgotten = device.forgotten
        if forgotten:
            # Made anew: from the head; told to rebuild if it had a position.
            self.check(
                f"auth of forgotten {device.label}" + ("" if live else f" since {since}"),
                {k: reply.get(k) for k in ("device", "seq", "head", "new_device", "reset")},
                {
                    "device": device.name,
                    "seq": head,
                    "head": head,
                    "new_device": True,
                    "reset": True if since else None,
                },
            )
            device.forgotten = False
            device.confirmed = device.cursor = head
            since = None if live else head
        else:
            self.check(
                f"auth of {device.label} again" + (" without since" if live else f" since {since}"),
                {k: reply.get(k) for k in ("device", "seq", "head", "new_device", "reset")},
                {
                    "device": device.name,
                    "seq": device.cursor if live else since,
                    "head": head,
                    "new_device": False,
                    "reset": None,
                },
            )
        if live:
            conn.start = head
            self.note(f"reconnect {device.label} (#{conn.id}) without since, live from {head}")
            return
        assert since is not None
        conn.start = since
        pages = await self.catch_up(device, conn, since)
        self.note(
            f"reconnect {device.label} (#{conn.id}) since {since}"
            + (" (forgotten: reset)" if forgotten else "")
            + f": pages {pages}"
        )
        self.check(f"catch-up of {device.label}: last page's seq", pages[-1][2], head)
        full = [p for p in pages[:-1] if p[0] != PAGE]
        self.check(f"catch-up of {device.label}: pages before the last are full", full, [])

    @precondition(lambda self: self.online())
    @rule(pick=picks)
    def set_profile(self, pick: int) -> None:
        """A device changes the user's profile: the user's other devices are told."""
        device = self.sender_device(pick)
        assert device is not None and device.conn is not None
        conn = device.conn
        nickname = f"n{self.steps}"

        async def go() -> None:
            await self.barrier()
            before = {d.label: len(d.conn.other) for d in self.devices_of(device.uid) if d.conn}
            reply = await self.request(device, "set_profile", nickname=nickname)
            self.note(f"set_profile by {device.label} (#{conn.id}): {nickname}")
            self.check(
                f"set_profile by {device.label}: nickname", reply["user"]["nickname"], nickname
            )
            await self.barrier()
            if len(self.nodes) > 1:
                await sleep(0.1)  # to the devices on other nodes, over pub/sub
            for d in self.devices_of(device.uid):
                if d.conn is None:
                    continue
                new = [f for f in d.conn.other[before[d.label] :] if f.get("t") == "profile"]
                expected = [] if d is device else [nickname]
                self.check(
                    f"profile pushes to {d.label} (#{d.conn.id})",
                    [f["user"]["nickname"] for f in new],
                    expected,
                )

        self.run(go)

    @precondition(lambda self: any(not d.forgotten for d in self.offline()))
    @rule(pick=picks)
    def forget(self, pick: int) -> None:
        """An offline device goes unseen for [devices] forget_days: the sweep forgets it."""
        pool = [d for d in self.offline() if not d.forgotten]
        device = pool[pick % len(pool)]

        async def go() -> None:
            await self.stack.store.db.run("unseen", _unseen, device.uid, device.name)
            forgot = await self.stack.store.forget_devices(FORGET_MS)
            self.note(f"forget {device.label}")
            self.check(f"devices forgotten with {device.label}", forgot, 1)
            device.forgotten = True

        self.run(go)

    @precondition(lambda self: len(self.nodes) == 1)
    @rule()
    def flush_hot(self) -> None:
        """Lose the whole hot copy: catch-up, unread and pending come from SQL."""

        async def go() -> None:
            await self.stack.settle()
            await self.stack.flush_hot()
            self.note("flush the hot store")

        self.run(go)

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def views_match_the_model(self) -> None:
        self.run(self._check_all)

    async def settled(self) -> None:
        """
        L{barrier}; in a cluster, pushes between nodes go over Redis pub/sub,
        with nothing to wait on: wait (a bounded time) until no connection
        misses an event, then a little more for anything extra to show.
        """
        await self.barrier()
        if len(self.nodes) == 1:
            return
        deadline = reactor.seconds() + CROSS_NODE
        while reactor.seconds() < deadline:
            if not any(self._missing(d, d.conn) for d in self.online() if d.conn):
                break
            await sleep(0.005)
        await sleep(0.02)
        await self.barrier()

    async def _check_all(self) -> None:
        await self.settled()
        for device in self.online():
            assert device.conn is not None
            self._check_conn(device, device.conn)
        for uid in UIDS:
            await self._check_user(uid)
        await self._check_devices(UIDS[self.steps % len(UIDS)])
        self.loose = False

    async def _check_devices(self, uid: int) -> None:
        """devices {} (asked from one of the user's devices): every device known, which online."""
        asking = self.sender_device(0, uid)
        if asking is None:
            return
        expected = sorted(
            (d.name, d.conn is not None) for d in self.devices_of(uid) if not d.forgotten
        )
        deadline = reactor.seconds() + CROSS_NODE
        while True:
            listed = (await self.request(asking, "devices"))["devices"]
            observed = sorted((d["device"], d["online"]) for d in listed)
            # In a cluster a logout reaches Redis a moment later.
            if observed == expected or len(self.nodes) == 1 or reactor.seconds() > deadline:
                break
            await sleep(0.01)
        self.check(f"devices of {uid} (device, online)", observed, expected)

    def _check_conn(self, device: Device, conn: Conn) -> None:
        """Exactly the events after where it started, minus its own, each once, in order."""
        uid = device.uid
        stream = self.streams[uid]
        name = f"{device.label} (#{conn.id}, from seq {conn.start})"
        self.check(f"kicks of {name}", conn.kicks, [])
        seqs = [f["seq"] for _, f in conn.got]
        if len(self.nodes) == 1:
            self.check(f"seqs reaching {name} in order, each once", seqs, sorted(set(seqs)))
        else:
            # Pushes from different nodes may overtake each other; pages may not.
            self.check(f"seqs reaching {name} once", sorted(seqs), sorted(set(seqs)))
            paged = [f["seq"] for how, f in conn.got if how == "page"]
            self.check(f"seqs of the catch-up pages to {name} in order", paged, sorted(paged))
        required, optional = self._expected(device, conn)
        got = set(seqs)
        missing = [s for s in required if s not in got]
        extra = sorted(s for s in got if s not in required and s not in optional)
        if missing or extra:
            self.fail(
                f"events reaching {name}",
                f"missing {self.show(uid, missing)}, not expected {self.show(uid, extra)}",
                "none of either",
            )
        for how, frame in conn.got:
            e = stream[frame["seq"] - 1]
            self.check(f"{how} {frame['seq']} to {name}", view(frame), e.view)
            # Counts: in a msg push to the recipient and a read push to the
            # reader's other devices (theirs); nowhere else.
            counted = how == "push" and (
                (e.kind == "msg" and e.own_device is None)
                or (e.kind == "read" and e.actor is not None)
            )
            expected = e.counts if counted else (None, None)
            if expected is not None:
                counts = (frame.get("unread"), frame.get("total_unread"))
                self.check(f"{how} {frame['seq']} to {name}: unread counts", counts, expected)

    def _expected(self, device: Device, conn: Conn) -> tuple[list[int], set[int]]:
        """(required, optional) seqs of the connection: everything after its start
        but what it caused; a message recalled since may be passed over."""
        required, optional = [], set()
        for e in self.streams[device.uid][conn.start :]:
            if e.own_device == device.name or (e.actor is not None and e.actor == conn.id):
                continue
            if e.kind == "msg" and e.msg is not None and e.msg.recalled:
                optional.add(e.seq)
            else:
                required.append(e.seq)
        return required, optional

    def _missing(self, device: Device, conn: Conn) -> bool:
        got = {f["seq"] for _, f in conn.got}
        return any(s not in got for s in self._expected(device, conn)[0])

    async def _check_user(self, uid: int) -> None:
        chat = self.stack.chat
        # unread: SQL truth, the op, the model.
        truth = await self.stack.store.db.run("unread truth", _unread_truth, uid)
        model = {sid: self.unread_in(uid, sid) for key, sid in self.sessions.items() if uid in key}
        model = {sid: n for sid, n in model.items() if n}
        self.check(f"unread of {uid}: COUNT in SQL vs the model", truth, model)
        unread = await chat.unread(uid)
        self.check(
            f"unread of {uid}: the op",
            (unread["total"], {s["session_id"]: s["count"] for s in unread["sessions"]}),
            (sum(model.values()), model),
        )
        # pending: what no device acked.
        pending = self.pending(uid)
        sync = await chat.sync(uid, 500, 0, None)
        self.check(
            f"sync of {uid}",
            [self.label(m["msg_id"]) for m in sync["msgs"]],
            [m.label for m in pending],
        )
        summary = await chat.offline_summary(uid)
        per_sender: dict[int, list[Msg]] = {}
        for m in pending:
            per_sender.setdefault(m.sender, []).append(m)
        self.check(
            f"offline_summary of {uid}",
            sorted((s["uid"], s["count"]) for s in summary["senders"]),
            sorted((s, len(ms)) for s, ms in per_sender.items()),
        )


def _seqs(txn: Any, msg_ids: list[int]) -> dict[int, tuple[int, int]]:
    """msg_id -> (senderSeq, recipientSeq), from the message rows."""
    rows = txn.query_in(
        "SELECT id, senderSeq, recipientSeq FROM t_msg_record_list WHERE id IN (%s)", msg_ids
    )
    return {int(i): (int(s), int(r)) for i, s, r in rows}


def _unseen(txn: Any, uid: int, device: str) -> None:
    """Make a device last seen long ago (as the forget sweep's test needs)."""
    rows = txn.execute(
        "UPDATE t_device SET lastSeen = 1 WHERE uid = ? AND device = ?", (uid, device)
    )
    assert rows == 1, rows


def _unread_truth(txn: Any, uid: int) -> dict[int, int]:
    """Unread per session straight from the rows: received, not recalled, past the read position."""
    rows = txn.query(
        "SELECT m.sessionId, COUNT(*) FROM t_msg_record_list m"
        " JOIN t_conv c ON c.uid = m.recipientUid AND c.sessionId = m.sessionId"
        " WHERE m.recipientUid = ? AND m.recordStatus = 0 AND m.id > c.readUpTo"
        " GROUP BY m.sessionId",
        (uid,),
    )
    return {int(sid): int(n) for sid, n in rows}


class DevicesPropertiesMixin:
    backend = ""
    node_count = 1
    programs = 0
    steps = 25
    timeout = 900

    async def test_device_invariants(self) -> None:
        assert isinstance(self, TestCase)
        bridge = Bridge()
        machine = type(
            "DevicesMachine",
            (DevicesMachine,),
            {
                "case": self,
                "backend": self.backend,
                "bridge": bridge,
                "node_count": self.node_count,
            },
        )
        await run_search(machine, bridge, self.backend, self.programs, self.steps, self.timeout)


class EmbeddedDeviceProperties(DevicesPropertiesMixin, TestCase):
    backend = "embedded"
    programs = 50


class RedisDeviceProperties(DevicesPropertiesMixin, TestCase):
    backend = "redis"
    programs = 15


class ClusterDeviceProperties(DevicesPropertiesMixin, TestCase):
    """Two nodes on MariaDB + Redis, each connection on the next node."""

    backend = "redis"
    node_count = 2
    programs = 6
