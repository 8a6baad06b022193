"""
A load worker: ``python -m bench.worker '<spec json>'``.

One Twisted reactor drives many client connections that speak only the wire
protocol (L{bench.wire} frames, L{imserver.wire.framing.FrameDecoder}, msgpack).
The parent talks to the worker in JSON lines:

* worker -> parent (stdout): C{{"ev": "ready"}} once set up, C{{"ev":
  "progress", ...}} every half second, scenario events, and finally C{{"ev":
  "result", ...}};
* parent -> worker (stdin): commands, C{{"cmd": "start", ...}} and friends.

Times exchanged with the parent are CLOCK_MONOTONIC nanoseconds, which all
processes on the machine share. The worker exits when its stdin closes, so it
never outlives the parent.
"""

from __future__ import annotations

import functools
import gc
import heapq
import json
import os
import random
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgpack
from twisted.internet import reactor as _reactor
from twisted.internet import stdio
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from bench import stats, wire
from bench.streamcheck import StreamCheck
from imserver.wire.framing import FrameDecoder

reactor: Any = _reactor
monotonic_ns = time.monotonic_ns
unpackb = msgpack.unpackb
Frame = dict[str, Any]
ACK_BATCH = 20
ACK_INTERVAL = 0.010


def mint_tokens(secret: str, uids: list[int]) -> list[str]:
    from imserver.services.tokens import TokenService

    tokens = TokenService(secret)
    now = time.time()
    return [tokens.mint(uid, now=now, ttl_seconds=6 * 3600) for uid in uids]


# -- connections -----------------------------------------------------------------


class Conn(Protocol):
    """
    A client connection: sends C{auth} on connect, then hands the frames of
    each read to C{on_frames} once authenticated.
    """

    transport: Any

    def __init__(self, uid: int, token: str) -> None:
        self.uid = uid
        self.token = token
        self.decoder = FrameDecoder(1 << 24)
        self.open = False
        self.authed = False
        self.started = self.connected_at = 0
        self.node = 0  # which of the server's endpoints (nodes) to connect to
        # Several devices per user: the auth's device name and catch-up position
        # (None: not sent, the v1 frame).
        self.device: str | None = None
        self.since: int | None = None
        self.auth_ok: Frame = {}
        self.ready: Deferred[Conn] = Deferred()
        self.errors: Counter[str] = Counter()

    def connectionMade(self) -> None:
        self.open = True
        self.connected_at = monotonic_ns()
        self.transport.setTcpNoDelay(True)
        self.transport.write(wire.auth_frame(self.token, device=self.device, since=self.since))

    def dataReceived(self, data: bytes) -> None:
        try:
            bodies = self.decoder.feed(data)
        except Exception:
            self.errors["bad_framing"] += 1
            self.transport.abortConnection()
            return
        self.bodies_received(bodies)

    def bodies_received(self, bodies: list[bytes]) -> None:
        """The frame bodies of one read (decoded here, or messages: L{bench.wsconn})."""
        if not self.authed:
            while bodies and not self.authed and self.open:
                self._auth_reply(unpackb(bodies.pop(0)))
            if not self.authed:
                return
        if bodies:
            self.on_frames(bodies)

    def on_frames(self, bodies: list[bytes]) -> None:
        """The frames of one read (all received at the same time)."""
        for body in bodies:
            self.on_frame(unpackb(body))

    def _auth_reply(self, f: Frame) -> None:
        if f.get("t") == "ok" and f.get("id") == 1:
            self.authed = True
            self.auth_ok = f
            self.on_authed()
            d, self.ready = self.ready, Deferred()
            d.callback(self)
        else:
            self.errors[f"auth:{f.get('code', f.get('t'))}"] += 1
            self.transport.abortConnection()

    def on_authed(self) -> None:
        pass

    def on_frame(self, f: Frame) -> None:
        if f.get("t") == "error":
            self.errors[str(f.get("code"))] += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
        if not self.authed and not self.ready.called:
            self.ready.errback(reason)
        self.on_lost()

    def on_lost(self) -> None:
        pass

    def close(self) -> None:
        if self.open:
            self.transport.loseConnection()


C = TypeVar("C", bound=Conn)


class Connector:
    """Opens connections, at most C{concurrency} connecting at a time, over
    several local source addresses (each gives its own range of ports), each
    to the server endpoint (node) its C{Conn.node} names."""

    def __init__(self, endpoints: list[str], bind: list[str] | None, concurrency: int) -> None:
        # Per node: the TCP endpoints (one per source address), and how to
        # build a connection's factory (over WebSocket for a ws:// URL).
        self.factories: list[Callable[[Conn], Factory]] = []
        self.kinds: list[str] = []
        self.endpoints: list[list[IStreamClientEndpoint]] = []
        for endpoint in endpoints:
            if endpoint.startswith(("ws://", "wss://")):
                from bench import wsconn

                shared = wsconn.shared_factory(endpoint)
                self.factories.append(functools.partial(wsconn.OneWSFactory, shared))
                self.kinds.append("ws")
                endpoint = wsconn.tcp_endpoint(endpoint)
            else:
                self.factories.append(_factory)
                self.kinds.append("tcp")
            self.endpoints.append(
                [clientFromString(reactor, f"{endpoint}:bindAddress={a}") for a in bind or []]
                or [clientFromString(reactor, endpoint)]
            )
        self.concurrency = max(1, concurrency)
        self.latencies = array("q")  # connect call -> auth reply
        self.tcp = array("q")  # connect call -> connection made
        self.errors: Counter[str] = Counter()
        self.first_start = 0
        self.last_done = 0
        #: Connections authenticated, by transport (the result says what carried the load).
        self.authed_by_transport: Counter[str] = Counter()

    def open_all(self, conns: Sequence[Conn]) -> Deferred[list[Conn]]:
        """Connect and authenticate all; fire with those that made it."""
        done: Deferred[list[Conn]] = Deferred()
        todo = list(reversed(conns))
        ok: list[Conn] = []
        state = {"running": 0, "index": 0}
        if not conns:
            done.callback(ok)
            return done

        def finished(_: Any) -> None:
            state["running"] -= 1
            launch()
            if not todo and not state["running"] and not done.called:
                done.callback(ok)

        def authed(conn: Conn) -> Conn:
            now = monotonic_ns()
            self.latencies.append(now - conn.started)
            self.tcp.append(conn.connected_at - conn.started)
            self.last_done = max(self.last_done, now)
            self.authed_by_transport[self.kinds[conn.node % len(self.kinds)]] += 1
            ok.append(conn)
            return conn

        def failed(f: Failure) -> None:
            self.errors[f"connect:{type(f.value).__name__}"] += 1

        def launch() -> None:
            while todo and state["running"] < self.concurrency:
                conn = todo.pop()
                state["running"] += 1
                node = conn.node % len(self.endpoints)
                eps = self.endpoints[node]
                ep = eps[state["index"] % len(eps)]
                state["index"] += 1
                conn.started = monotonic_ns()
                if not self.first_start:
                    self.first_start = conn.started
                d: Deferred[Any] = ep.connect(self.factories[node](conn))
                d.addCallback(_authenticated, conn)
                d.addCallbacks(authed, failed)
                d.addBoth(finished)

        launch()
        return done


class _OneFactory(Factory):
    noisy = False

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    def buildProtocol(self, addr: Any) -> Conn:
        return self.conn


def _authenticated(_: object, conn: Conn) -> Deferred[Conn]:
    """Once connected: wait for the auth reply."""
    return conn.ready


def _factory(conn: Conn) -> Factory:
    return _OneFactory(conn)


def total_errors(conns: list[Conn], extra: Counter[str] | None = None) -> Counter[str]:
    out: Counter[str] = Counter()
    for c in conns:
        out.update(c.errors)
    if extra:
        out.update(extra)
    return out


# -- pairs: senders and recipients ---------------------------------------------------


class Sender(Conn):
    """Sends numbered messages to its recipient, at most C{window} in flight."""

    def __init__(self, run: Pairs, index: int, uid: int, token: str, to: int) -> None:
        super().__init__(uid, token)
        self.run = run
        self.index = index
        self.build = wire.send_builder(to, run.pad)
        self.window = run.window
        self.seq = 0
        self.inflight: dict[int, int] = {}
        self.ok = 0
        self.dup_flags = 0
        self.failed: set[int] = set()
        self.sending = False
        # open loop
        self.next_t = 0
        self.interval = 0
        self.blocked = False

    def pump(self) -> None:
        """Closed loop: keep C{window} in flight (one write for all)."""
        inflight = self.inflight
        free = self.window - len(inflight)
        if free <= 0 or not self.sending:
            return
        build = self.build
        seq = self.seq
        now = monotonic_ns()
        out = []
        for _ in range(free):
            inflight[seq] = now
            out.append(build(seq, now))
            seq += 1
        self.seq = seq
        self.transport.write(b"".join(out))

    def due(self, now: int) -> None:
        """Open loop: send what is scheduled by now, as the window allows."""
        run = self.run
        end = run.t_end
        inflight = self.inflight
        window = self.window
        build = self.build
        t = self.next_t
        seq = self.seq
        out = []
        while t <= now and t < end and len(inflight) < window:
            inflight[seq] = t
            out.append(build(seq, t))
            seq += 1
            t += self.interval
        self.next_t, self.seq = t, seq
        if out:
            self.transport.write(b"".join(out))
        if t >= end or not self.sending:
            self.blocked = False
        elif t <= now:
            self.blocked = True
        else:
            self.blocked = False
            heapq.heappush(run.heap, (t, self.index, self))

    def on_frames(self, bodies: list[bytes]) -> None:
        now = monotonic_ns()
        run = self.run
        t_start = run.t_start
        lat = run.lat_ok
        inflight = self.inflight
        for body in bodies:
            f = unpackb(body)
            t = f["t"]
            if t == "ok":
                sent = inflight.pop(f["id"], None)
                if sent is None:
                    self.errors["unexpected_reply"] += 1
                    continue
                self.ok += 1
                if f.get("dup"):
                    self.dup_flags += 1
                if sent >= t_start:
                    lat.append(now - sent)
            elif t == "error":
                seq = f.get("id")
                self.errors[str(f.get("code"))] += 1
                if seq is not None and inflight.pop(seq, None) is not None:
                    self.failed.add(seq)
        if run.open_loop:
            if self.blocked:
                self.due(now)
        else:
            self.pump()

    def on_lost(self) -> None:
        if self.run.phase in ("sending", "draining"):
            self.errors["disconnected"] += 1


class Recipient(Conn):
    """Receives pushes, checks them against the sequence, acks in small batches.

    With several devices per user, each device of the recipient is one of
    these (each acks what it got: a message stays pending for every device
    until that device acks it)."""

    def __init__(self, run: Pairs, uid: int, token: str) -> None:
        super().__init__(uid, token)
        self.run = run
        self.delivered = 0
        self.in_window = 0
        self.seen = bytearray(1024)
        self.max_q = -1
        self.unique = 0
        self.duplicates = 0
        self.reorders = 0
        self.pending_acks: list[int] = []
        self.ack_id = 1
        self.acks_out = 0
        self.acks_ok = 0

    def count(self, f: Frame, now: int, t_start: int, in_window: bool, lat: Any) -> None:
        """One msg push: its latency, and the exactly-once and order bookkeeping."""
        b = f["body"]
        q = b["q"]
        sent = b["s"]
        if sent >= t_start:
            lat.append(now - sent)
        self.delivered += 1
        if in_window:
            self.in_window += 1
        seen = self.seen
        if q >= len(seen):
            seen.extend(bytes(max(q + 1 - len(seen), len(seen))))
        if seen[q]:
            self.duplicates += 1
        else:
            seen[q] = 1
            self.unique += 1
            if q < self.max_q:
                self.reorders += 1
            else:
                self.max_q = q

    def on_frames(self, bodies: list[bytes]) -> None:
        now = monotonic_ns()
        run = self.run
        t_start = run.t_start
        in_window = t_start <= now <= run.t_end
        lat = run.lat_push
        acks = self.pending_acks
        was_empty = not acks
        for body in bodies:
            f = unpackb(body)
            t = f["t"]
            if t == "msg":
                self.count(f, now, t_start, in_window, lat)
                acks.append(f["msg_id"])
            elif t == "ok":
                self.acks_ok += 1
            elif t == "error":
                self.errors[f"ack:{f.get('code')}"] += 1
        if len(acks) >= ACK_BATCH:
            self.flush_acks()
        elif acks and was_empty:
            run.ack_dirty.append(self)

    def flush_acks(self) -> None:
        """Ack what arrived, C{ACK_BATCH} ids per request, in one write."""
        acks = self.pending_acks
        if acks and self.open:
            out = []
            for i in range(0, len(acks), ACK_BATCH):
                self.ack_id += 1
                self.acks_out += 1
                out.append(wire.ack_frame(self.ack_id, acks[i : i + ACK_BATCH]))
            self.transport.write(b"".join(out))
        self.pending_acks = []

    def on_lost(self) -> None:
        if self.run.phase in ("sending", "draining"):
            self.errors["disconnected"] += 1


class Echo(Recipient):
    """Another device of a sender: every message its user sends from the
    sending device is pushed here too, and checked like a recipient's (each
    once, in order). Nothing to ack: a message is pending for its recipient's
    devices, not for its sender's."""

    def flush_acks(self) -> None:
        self.pending_acks = []


def device_names(devices: int) -> list[str | None]:
    """The device of each connection of a user: none named with one device (the
    v1 auth frame, the server's "default"), else C{d0}, C{d1}, ..."""
    return [None] if devices <= 1 else [f"d{k}" for k in range(devices)]


class Scenario:
    """What a worker runs; subclasses implement the scenario."""

    def __init__(self, worker: Worker, spec: dict[str, Any]) -> None:
        self.worker = worker
        self.spec = spec
        self.endpoints: list[str] = spec.get("endpoints") or [spec["endpoint"]]
        self.connector = Connector(self.endpoints, spec.get("bind"), spec.get("concurrency", 25))

    def place_pairs(self, senders: Sequence[Conn], recipients: Sequence[Conn]) -> None:
        """Pair i (counted over all workers): its sender on node i % N and its
        recipient on node (i + 1) % N, so with several nodes every message
        crosses nodes."""
        n = len(self.endpoints)
        first = self.spec.get("first_pair", 0)
        for j, (s, r) in enumerate(zip(senders, recipients, strict=True)):
            s.node = (first + j) % n
            r.node = (first + j + 1) % n

    def place_round_robin(self, conns: Sequence[Conn]) -> None:
        """Connection i (counted over all workers) on node i % N."""
        first = self.spec.get("first", 0)
        for j, c in enumerate(conns):
            c.node = (first + j) % len(self.endpoints)

    def setup(self) -> Deferred[Any] | None:
        return None

    def command(self, cmd: dict[str, Any]) -> None:
        raise NotImplementedError

    def progress(self) -> dict[str, Any]:
        return {}

    def later_at(self, t_ns: int, f: Callable[[], None]) -> None:
        reactor.callLater(max(0.0, (t_ns - monotonic_ns()) / 1e9), f)


class Pairs(Scenario):
    """
    P sender/recipient pairs (both ends in this worker, so delivery is
    checked locally), closed loop (W in flight) or open loop (a rate per
    sender, latency from the scheduled time, in flight capped by W).
    """

    # The connections' classes (bench/socialload.py mixes more ops in).
    sender_class: type[Sender] = Sender
    recipient_class: type[Recipient] = Recipient

    def __init__(self, worker: Worker, spec: dict[str, Any]) -> None:
        super().__init__(worker, spec)
        self.window: int = spec["window"]
        self.pad: int = spec.get("pad", 0)
        self.rate: float = spec.get("rate_per_sender") or 0.0
        self.open_loop = self.rate > 0
        self.drain_s: float = spec.get("drain_s", 15.0)
        self.phase = "setup"
        self.t_start = self.t_end = 1 << 62
        self.lat_ok = array("q")
        self.lat_push = array("q")
        self.heap: list[tuple[int, int, Sender]] = []
        self.ack_dirty: list[Recipient] = []
        uids: list[int] = spec["uids"]  # [sender0, recipient0, sender1, ...]
        tokens = mint_tokens(spec["secret"], uids)
        self.recipients = [
            self.recipient_class(self, uids[i + 1], tokens[i + 1]) for i in range(0, len(uids), 2)
        ]
        self.senders = [
            self.sender_class(self, i // 2, uids[i], tokens[i], uids[i + 1])
            for i in range(0, len(uids), 2)
        ]
        self.place_pairs(self.senders, self.recipients)
        self.devices: int = spec.get("devices", 1)
        # Pair j's receiving connections: the recipient's device 0, then each
        # further device k of the recipient and of the sender (its pushes of the
        # sender's own messages), on node (first + j + 1 + k) % N and
        # (first + j + k) % N: with several nodes, a user's devices spread out.
        self.receivers: list[list[Recipient]] = [[r] for r in self.recipients]
        self.others: list[Recipient] = []
        names = device_names(self.devices)
        n = len(self.endpoints)
        first = spec.get("first_pair", 0)
        for j, (s, r) in enumerate(zip(self.senders, self.recipients, strict=True)):
            s.device = r.device = names[0]
            for k in range(1, self.devices):
                rd: Recipient = Recipient(self, r.uid, r.token)
                sd: Recipient = Echo(self, s.uid, s.token)
                rd.device = sd.device = names[k]
                rd.node = (first + j + 1 + k) % n
                sd.node = (first + j + k) % n
                self.receivers[j] += [rd, sd]
                self.others += [rd, sd]
        self.all_receivers = [*self.recipients, *self.others]
        self.ack_loop = LoopingCall(self.flush_acks)
        self.tick_call: Any = None

    def setup(self) -> Deferred[Any]:
        async def go() -> None:
            groups = (self.recipients, self.others, self.senders)
            for group in groups if self.others else (self.recipients, self.senders):
                ok = await self.connector.open_all(list(group))
                if len(ok) != len(group):
                    raise RuntimeError(f"only {len(ok)} of {len(group)} connections authenticated")

        return Deferred.fromCoroutine(go())

    def command(self, cmd: dict[str, Any]) -> None:
        if cmd["cmd"] == "start":
            self.t_start, self.t_end = cmd["t_start"], cmd["t_end"]
            self.ack_loop.start(ACK_INTERVAL, now=False)
            self.later_at(cmd["t_warm"], self.begin)

    def begin(self) -> None:
        self.phase = "sending"
        for s in self.senders:
            s.sending = True
        if self.open_loop:
            interval = int(1e9 / self.rate)
            now = monotonic_ns()
            for s in self.senders:
                s.interval = interval
                s.next_t = now + random.randrange(interval)
                heapq.heappush(self.heap, (s.next_t, s.index, s))
            self.tick()
        else:
            for s in self.senders:
                s.pump()
        self.later_at(self.t_end, self.stop_sending)

    def tick(self) -> None:
        self.tick_call = None
        if self.phase != "sending":
            return
        heap = self.heap
        now = monotonic_ns()
        while heap and heap[0][0] <= now:
            _, _, s = heapq.heappop(heap)
            s.due(now)
        delay = (heap[0][0] - monotonic_ns()) / 1e9 if heap else 0.001
        self.tick_call = reactor.callLater(min(max(delay, 0.0), 0.001), self.tick)

    def flush_acks(self) -> None:
        dirty, self.ack_dirty = self.ack_dirty, []
        for r in dirty:
            r.flush_acks()

    def stop_sending(self) -> None:
        self.phase = "draining"
        self.backlog = 0
        now = monotonic_ns()
        for s in self.senders:
            s.sending = False
            if self.open_loop and s.next_t < self.t_end:
                # Scheduled but never sent: the window was full (saturation).
                self.backlog += max(0, (min(now, self.t_end) - s.next_t) // s.interval + 1)
        self.deadline = monotonic_ns() + int(self.drain_s * 1e9)
        self.drain_loop = LoopingCall(self.check_drained)
        self.drain_loop.start(0.02, now=False)

    def check_drained(self) -> None:
        now = monotonic_ns()
        done = all(
            (not s.inflight or not s.open) and all(r.unique >= s.ok or not r.open for r in rs)
            for s, rs in zip(self.senders, self.receivers, strict=True)
        )
        if self.phase == "draining" and (done or now > self.deadline):
            self.phase = "acking"
            self.flush_acks()
            self.ack_deadline = now + int(3e9)
        if self.phase == "acking":
            acked = all(r.acks_ok >= r.acks_out or not r.open for r in self.all_receivers)
            if acked or now > self.ack_deadline:
                self.drain_loop.stop()
                self.ack_loop.stop()
                self.finish()

    def progress(self) -> dict[str, Any]:
        return {
            "sent": sum(s.seq for s in self.senders),
            "ok": sum(s.ok for s in self.senders),
            # Messages (the recipients' device 0: the timeline's msg/s), and every push.
            "delivered": sum(r.delivered for r in self.recipients),
            "pushes": sum(r.delivered for r in self.all_receivers),
            "errors": sum(sum(c.errors.values()) for c in (*self.senders, *self.all_receivers)),
        }

    def extra_result(self) -> dict[str, Any]:
        """More fields for the result (a subclass's)."""
        return {}

    def finish(self) -> None:
        missing = unexpected = no_reply = expected = expected_msgs = 0
        for s, rs in zip(self.senders, self.receivers, strict=True):
            no_reply += len(s.inflight)
            for i, r in enumerate(rs):
                seen = r.seen
                for q in range(s.seq):
                    got = q < len(seen) and seen[q]
                    should = q not in s.failed and q not in s.inflight
                    if should:
                        expected += 1  # a push expected on this device
                        expected_msgs += i == 0
                        if not got:
                            missing += 1
                    elif got:
                        unexpected += 1
        receivers = self.all_receivers
        conns: list[Conn] = [*self.senders, *receivers]
        self.worker.finish(
            {
                **self.extra_result(),
                "pairs": len(self.senders),
                "sent": sum(s.seq for s in self.senders),
                "ok": sum(s.ok for s in self.senders),
                "dup_flags": sum(s.dup_flags for s in self.senders),
                "failed": sum(len(s.failed) for s in self.senders),
                "no_reply": no_reply,
                "backlog_at_end": getattr(self, "backlog", 0),
                "devices": self.devices,
                # Pushes received by every device; messages: by the recipient's device 0.
                "delivered": sum(r.delivered for r in receivers),
                "delivered_in_window": sum(r.in_window for r in self.recipients),
                "pushes_in_window": sum(r.in_window for r in receivers),
                "expected": expected,
                "expected_msgs": expected_msgs,
                "unique": sum(r.unique for r in receivers),
                "duplicates": sum(r.duplicates for r in receivers),
                "reorders": sum(r.reorders for r in receivers),
                "missing": missing,
                "unexpected": unexpected,
                "acks_sent": sum(r.acks_out for r in receivers),
                "acks_ok": sum(r.acks_ok for r in receivers),
                "errors": dict(total_errors(conns, self.connector.errors)),
                "connections_by_transport": dict(self.connector.authed_by_transport),
                "lat_ok": stats.histogram(self.lat_ok),
                "lat_push": stats.histogram(self.lat_push),
            }
        )


# -- idle -------------------------------------------------------------------------


class Idler(Conn):
    def __init__(self, run: Idle, uid: int, token: str) -> None:
        super().__init__(uid, token)
        self.run = run
        self.ping_t = 0

    def ping(self) -> None:
        if self.open:
            self.ping_t = monotonic_ns()
            self.run.pings += 1
            self.transport.write(wire.PING)

    def on_frame(self, f: Frame) -> None:
        if f["t"] == "ok":
            self.run.pongs += 1
            # Timed only for pings sent in the measured window: a ping sent
            # while thousands of connections were still authenticating measures
            # the connect storm, not the heartbeat path.
            if self.ping_t >= self.run.window_ns:
                self.run.rtt.append(monotonic_ns() - self.ping_t)
        elif f["t"] == "error":
            self.errors[str(f.get("code"))] += 1
        else:
            self.errors[f"push:{f['t']}"] += 1

    def on_lost(self) -> None:
        if self.authed and self.run.phase != "stopping":
            self.errors["disconnected"] += 1


class Idle(Scenario):
    """Authenticated connections that only ping every C{heartbeat} seconds,
    spread evenly over the period (slots of C{TICK} seconds)."""

    TICK = 0.02

    def __init__(self, worker: Worker, spec: dict[str, Any]) -> None:
        super().__init__(worker, spec)
        self.phase = "setup"
        tokens = mint_tokens(spec["secret"], spec["uids"])
        self.conns = [Idler(self, u, t) for u, t in zip(spec["uids"], tokens, strict=True)]
        self.place_round_robin(self.conns)
        self.heartbeat: float = spec["heartbeat"]
        self.slots: list[list[Idler]] = [
            [] for _ in range(max(1, round(self.heartbeat / self.TICK)))
        ]
        self.slot = 0
        self.pings = self.pongs = 0
        self.rtt = array("q")
        # How late each tick fired: the worker's own lag, which a ping's round
        # trip includes (its reply waits for this reactor too).
        self.tick_lag = array("q")
        self.next_tick = 0
        # Pings and ticks are timed from the first mark on (the measured window).
        self.window_ns = 1 << 62
        self.beat = LoopingCall.withCount(self.tick)
        self.authed = 0

    def slotted(self, conn: Conn, i: int) -> Conn:
        """An authenticated connection joins its heartbeat slot."""
        assert isinstance(conn, Idler)
        self.slots[i % len(self.slots)].append(conn)
        return conn

    def tick(self, count: int = 1) -> None:
        """
        The next slot's connections ping. C{count}: ticks due since the last
        call (a late reactor makes LoopingCall skip them): the skipped slots
        ping too, or their connections would go silent long enough for the
        server's idle timeout on a busy machine.
        """
        now = monotonic_ns()
        if self.next_tick and now >= self.window_ns:
            self.tick_lag.append(max(0, now - self.next_tick))
        self.next_tick = now + int(self.TICK * 1e9)
        for _ in range(min(count, len(self.slots))):
            self.slot = (self.slot + 1) % len(self.slots)
            for c in self.slots[self.slot]:
                c.ping()

    def command(self, cmd: dict[str, Any]) -> None:
        if cmd["cmd"] == "connect":
            self.phase = "connecting"
            self.beat.start(self.TICK, now=False)
            for i, c in enumerate(self.conns):
                c.ready.addCallback(self.slotted, i)
            d = self.connector.open_all(self.conns)
            d.addCallback(self.connected)
        elif cmd["cmd"] == "mark":
            self.window_ns = min(self.window_ns, monotonic_ns())
            self.worker.emit(
                {
                    "ev": "mark",
                    "pings": self.pings,
                    "pongs": self.pongs,
                    "open": sum(1 for c in self.conns if c.authed and c.open),
                }
            )
        elif cmd["cmd"] == "stop":
            self.phase = "stopping"
            self.beat.stop()
            self.worker.finish(
                {
                    "connections": self.authed,
                    "pings": self.pings,
                    "pongs": self.pongs,
                    "errors": dict(total_errors(list(self.conns), self.connector.errors)),
                    "lat_connect": stats.histogram(self.connector.latencies),
                    "lat_tcp": stats.histogram(self.connector.tcp),
                    "lat_ping": stats.histogram(self.rtt),
                    "lat_tick": stats.histogram(self.tick_lag),
                }
            )

    def connected(self, ok: list[Conn]) -> None:
        self.phase = "idle"
        self.authed = len(ok)
        # The worker's own thousands of connections are never walked again: a
        # full collection here (tens of ms) would be timed as the server's.
        gc.collect()
        gc.freeze()
        self.worker.emit({"ev": "connected", "ok": len(ok)})

    def progress(self) -> dict[str, Any]:
        return {
            "connected": sum(1 for c in self.conns if c.authed and c.open),
            "pings": self.pings,
            "errors": sum(sum(c.errors.values()) for c in self.conns)
            + sum(self.connector.errors.values()),
        }


# -- connect ------------------------------------------------------------------------


class Connect(Scenario):
    """C{len(uids)} clients connect and authenticate at once."""

    def __init__(self, worker: Worker, spec: dict[str, Any]) -> None:
        super().__init__(worker, spec)
        tokens = mint_tokens(spec["secret"], spec["uids"])
        self.conns = [Conn(u, t) for u, t in zip(spec["uids"], tokens, strict=True)]
        self.place_round_robin(self.conns)
        self.ok: list[Conn] = []

    def command(self, cmd: dict[str, Any]) -> None:
        if cmd["cmd"] == "start":
            self.later_at(cmd["t_start"], self.go)
        elif cmd["cmd"] == "stop":
            c = self.connector
            self.worker.finish(
                {
                    "clients": len(self.conns),
                    "ok": len(self.ok),
                    "first_start": c.first_start,
                    "last_done": c.last_done,
                    "errors": dict(total_errors(self.conns, c.errors)),
                    "lat_connect": stats.histogram(c.latencies),
                    "lat_tcp": stats.histogram(c.tcp),
                }
            )

    def go(self) -> None:
        self.connector.open_all(self.conns).addCallback(self.done)

    def done(self, ok: list[Conn]) -> None:
        self.ok = ok
        self.worker.emit({"ev": "done", "ok": len(ok), "t": self.connector.last_done})

    def progress(self) -> dict[str, Any]:
        return {
            "connected": len(self.connector.latencies),
            "errors": sum(self.connector.errors.values()),
        }


# -- offline ----------------------------------------------------------------------------


class Visitor(Conn):
    """Authenticates once (so the user exists) and leaves."""

    def __init__(self, uid: int, token: str) -> None:
        super().__init__(uid, token)
        self.gone: Deferred[None] = Deferred()

    def on_lost(self) -> None:
        if not self.gone.called:
            self.gone.callback(None)


class OfflineSender(Conn):
    def __init__(self, run: Offline | Catchup, uid: int, token: str, to: int, count: int) -> None:
        super().__init__(uid, token)
        self.run = run
        self.build = wire.send_builder(to, run.pad)
        self.count = count
        self.seq = 0
        self.inflight = 0
        self.ok = 0
        self.failed = 0

    def pump(self) -> None:
        while self.inflight < self.run.window and self.seq < self.count:
            self.inflight += 1
            self.transport.write(self.build(self.seq, monotonic_ns()))
            self.seq += 1

    def on_frame(self, f: Frame) -> None:
        t = f["t"]
        if t not in ("ok", "error"):
            return
        self.inflight -= 1
        if t == "ok":
            self.ok += 1
        else:
            self.failed += 1
            self.errors[str(f.get("code"))] += 1
        self.pump()
        if not self.inflight and self.seq >= self.count:
            self.run.sender_done()


class Drainer(Conn):
    """Reconnects and drains with sync pages of C{limit}, acking each page."""

    def __init__(self, run: Offline, uid: int, token: str) -> None:
        super().__init__(uid, token)
        self.run = run
        self.next_id = 1
        self.waiting: dict[int, str] = {}
        self.expect = 0
        self.unique = 0
        self.duplicates = 0
        self.reorders = 0
        self.pushes = 0
        self.max_q = -1
        self.seen: set[int] = set()
        self.more = True
        self.done = False

    def request(self, kind: str, data: Callable[[int], bytes]) -> None:
        self.next_id += 1
        self.waiting[self.next_id] = kind
        self.transport.write(data(self.next_id))

    def on_authed(self) -> None:
        self.request("sync", lambda i: wire.sync_frame(i, self.run.limit, 0))

    def on_frame(self, f: Frame) -> None:
        t = f["t"]
        if t == "msg":
            self.pushes += 1
            return
        kind = self.waiting.pop(f.get("id", -1), None)
        if t == "error" or kind is None:
            self.errors[f"{kind}:{f.get('code', t)}"] += 1
        elif kind == "sync":
            msgs = f["msgs"]
            self.run.drained += len(msgs)
            for m in msgs:
                q = m["body"]["q"]
                if q in self.seen:
                    self.duplicates += 1
                    continue
                self.seen.add(q)
                self.unique += 1
                if q < self.max_q:
                    self.reorders += 1
                self.max_q = max(self.max_q, q)
            self.more = bool(f["more"])
            if msgs:
                ids = [m["msg_id"] for m in msgs]
                self.request("ack", lambda i: wire.ack_frame(i, ids))
                if self.more:
                    last = ids[-1]
                    self.request("sync", lambda i: wire.sync_frame(i, self.run.limit, last))
            else:
                self.more = False
        if not self.more and not self.waiting and not self.done:
            self.done = True
            self.run.drainer_done()


class Offline(Scenario):
    """
    Messages queued for offline users: the recipients authenticate once (so
    they exist) and leave, the senders send C{count} messages each, then the
    recipients come back and drain with C{sync} + C{ack}.
    """

    def __init__(self, worker: Worker, spec: dict[str, Any]) -> None:
        super().__init__(worker, spec)
        self.window: int = spec["window"]
        self.pad: int = spec.get("pad", 0)
        self.limit: int = spec.get("limit", 500)
        uids: list[int] = spec["uids"]
        counts: list[int] = spec["counts"]
        tokens = mint_tokens(spec["secret"], uids)
        self.recipient_uids = uids[1::2]
        self.recipient_tokens = tokens[1::2]
        self.counts = counts
        self.senders = [
            OfflineSender(self, uids[i], tokens[i], uids[i + 1], counts[i // 2])
            for i in range(0, len(uids), 2)
        ]
        self.drainers: list[Drainer] = []
        self.senders_left = len(self.senders)
        self.drainers_left = len(self.recipient_uids)
        self.drained = 0
        self.phase = "setup"

    def recipient_credentials(self) -> list[tuple[int, str]]:
        return list(zip(self.recipient_uids, self.recipient_tokens, strict=True))

    def recipients_placed(self, conns: list[C]) -> list[C]:
        """Recipient connections (visitors, drainers) on their pair's recipient node."""
        self.place_pairs(self.senders, conns)
        return conns

    def setup(self) -> Deferred[Any]:
        async def go() -> None:
            first = self.recipients_placed([Visitor(u, t) for u, t in self.recipient_credentials()])
            ok = await self.connector.open_all(first)
            if len(ok) != len(first):
                raise RuntimeError("recipients could not authenticate")
            for c in first:
                c.close()
            for c in first:
                await c.gone
            ok = await self.connector.open_all(list(self.senders))
            if len(ok) != len(self.senders):
                raise RuntimeError("senders could not authenticate")

        return Deferred.fromCoroutine(go())

    def command(self, cmd: dict[str, Any]) -> None:
        if cmd["cmd"] == "start":
            self.phase = "sending"
            for s in self.senders:
                s.pump()
        elif cmd["cmd"] == "drain":
            self.phase = "draining"
            self.drainers = self.recipients_placed(
                [Drainer(self, u, t) for u, t in self.recipient_credentials()]
            )
            self.drain_connector = Connector(
                self.endpoints, self.spec.get("bind"), self.spec.get("concurrency", 25)
            )
            self.drain_connector.open_all(list(self.drainers))
        elif cmd["cmd"] == "stop":
            self.finish()

    def sender_done(self) -> None:
        self.senders_left -= 1
        if not self.senders_left:
            self.worker.emit({"ev": "sent", "t": monotonic_ns()})

    def drainer_done(self) -> None:
        self.drainers_left -= 1
        if not self.drainers_left:
            self.worker.emit({"ev": "drained", "t": monotonic_ns()})

    def progress(self) -> dict[str, Any]:
        return {
            "sent": sum(s.seq for s in self.senders),
            "ok": sum(s.ok for s in self.senders),
            "drained": self.drained,
            "errors": sum(sum(c.errors.values()) for c in (*self.senders, *self.drainers)),
        }

    def finish(self) -> None:
        ok_by_pair = [s.ok for s in self.senders]
        missing = 0
        for i, d in enumerate(self.drainers):
            missing += sum(1 for q in range(self.counts[i]) if q not in d.seen)
        conns: list[Conn] = [*self.senders, *self.drainers]
        self.worker.finish(
            {
                "sent": sum(s.seq for s in self.senders),
                "ok": sum(ok_by_pair),
                "failed": sum(s.failed for s in self.senders),
                "expected": sum(self.counts),
                "drained": self.drained,
                "unique": sum(d.unique for d in self.drainers),
                "duplicates": sum(d.duplicates for d in self.drainers),
                "reorders": sum(d.reorders for d in self.drainers),
                "missing": missing,
                "pushes_during_drain": sum(d.pushes for d in self.drainers),
                "errors": dict(
                    total_errors(conns, self.connector.errors + self.drain_connector.errors)
                    if self.drainers
                    else total_errors(conns, self.connector.errors)
                ),
            }
        )


# -- catchup ----------------------------------------------------------------------------


class CatchupDevice(Conn):
    """The device coming back: auth with C{since} = its position, then
    C{catchup} pages (no C{after}: the server pages from the connection's
    position) until C{more} is false, then C{ack {seq}} of the last position."""

    def __init__(self, run: Catchup, uid: int, token: str, device: str, since: int) -> None:
        super().__init__(uid, token)
        self.run = run
        self.device = device
        self.since = since
        self.check = StreamCheck(run.expected)
        self.next_id = 1
        self.waiting: dict[int, str] = {}
        self.pushes = 0
        self.t_authed = self.t_done = 0
        self.failed = ""

    def request(self, kind: str, frame: Callable[[int], bytes]) -> None:
        self.next_id += 1
        self.waiting[self.next_id] = kind
        self.transport.write(frame(self.next_id))

    def on_authed(self) -> None:
        self.t_authed = monotonic_ns()
        if self.auth_ok.get("reset"):
            self.failed = "the server answered reset: it did not know the device"
        self.request("catchup", lambda i: wire.catchup_frame(i, self.run.limit))

    def on_frame(self, f: Frame) -> None:
        kind = self.waiting.pop(f.get("id", -1), None)
        if kind is None:
            # A push (none expected: nothing is sent during the catch-up, and
            # pushes with a seq are held back until the last page).
            self.pushes += 1
            return
        if f.get("t") == "error":
            self.errors[f"{kind}:{f.get('code')}"] += 1
            self.failed = self.failed or f"{kind} answered {f.get('code')}: {f.get('message')}"
            self.run.caught_up(self)
            return
        if kind == "catchup":
            if self.check.page(f):
                self.request("catchup", lambda i: wire.catchup_frame(i, self.run.limit))
            else:
                self.t_done = monotonic_ns()
                self.run.caught_up(self)
                position = self.check.position
                if position is not None:
                    self.request("ack", lambda i: wire.ack_seq_frame(i, position))
                else:
                    self.run.acked()
        elif kind == "ack":
            self.run.acked()

    def on_lost(self) -> None:
        if self.run.phase == "catching up" and not self.t_done:
            self.failed = self.failed or "disconnected during the catch-up"
            self.errors["disconnected"] += 1
            self.run.caught_up(self)


class Catchup(Scenario):
    """
    A device that missed C{count} messages: it authenticates once with its
    device name (registering it; its position is the reply's C{seq}) and
    leaves; the senders send their messages to its user (W in flight each);
    then it comes back with C{since} and pages C{catchup}. Only the worker whose
    spec has C{device} runs the device; the others only send.
    """

    def __init__(self, worker: Worker, spec: dict[str, Any]) -> None:
        super().__init__(worker, spec)
        self.window: int = spec["window"]
        self.pad: int = spec.get("pad", 0)
        self.limit: int = spec.get("limit", 500)
        self.to: int = spec["user"]
        device = spec.get("device")
        uids: list[int] = spec["uids"]
        counts: list[int] = spec["counts"]
        tokens = mint_tokens(spec["secret"], [*uids, self.to])
        self.user_token = tokens[-1]
        self.senders = [
            OfflineSender(self, u, t, self.to, n)
            for u, t, n in zip(uids, tokens[:-1], counts, strict=True)
        ]
        self.place_round_robin(self.senders)
        self.device_name: str | None = device
        # Every sender of the run (over all workers) and its count: the device checks all.
        self.expected: dict[int, int] = {int(k): v for k, v in spec.get("expected", {}).items()}
        self.device: CatchupDevice | None = None
        self.position = 0
        self.first_auth: Frame = {}
        self.senders_left = len(self.senders)
        self.phase = "setup"

    def setup(self) -> Deferred[Any]:
        async def go() -> None:
            if self.device_name is not None:
                first = Visitor(self.to, self.user_token)
                first.device = self.device_name
                if len(await self.connector.open_all([first])) != 1:
                    raise RuntimeError("the device could not authenticate")
                self.first_auth = dict(first.auth_ok)
                # Where the device's catch-up starts (a new device: the head).
                self.position = int(first.auth_ok.get("seq", first.auth_ok.get("head", 0)) or 0)
                first.close()
                await first.gone
            ok = await self.connector.open_all(list(self.senders))
            if len(ok) != len(self.senders):
                raise RuntimeError("senders could not authenticate")

        return Deferred.fromCoroutine(go())

    def command(self, cmd: dict[str, Any]) -> None:
        if cmd["cmd"] == "start":
            self.phase = "sending"
            if not self.senders:
                self.worker.emit({"ev": "sent", "t": monotonic_ns()})
            for s in self.senders:
                s.pump()
        elif cmd["cmd"] == "catchup":
            self.phase = "catching up"
            if self.device_name is None:
                self.worker.emit({"ev": "caught_up", "device": False})
                self.worker.emit({"ev": "acked"})
                return
            self.t_connect = monotonic_ns()
            self.device = CatchupDevice(
                self, self.to, self.user_token, self.device_name, self.position
            )
            self.device.node = 0
            self.device_connector = Connector(self.endpoints, self.spec.get("bind"), 1)
            d = self.device_connector.open_all([self.device])
            d.addCallback(self.device_open)
        elif cmd["cmd"] == "stop":
            self.finish()

    def device_open(self, ok: list[Conn]) -> None:
        if not ok and self.device is not None:
            self.device.failed = "could not connect again"
            self.caught_up(self.device)

    def sender_done(self) -> None:
        self.senders_left -= 1
        if not self.senders_left:
            self.worker.emit({"ev": "sent", "t": monotonic_ns()})

    def caught_up(self, device: CatchupDevice) -> None:
        if getattr(self, "reported", False):
            return
        self.reported = True
        self.phase = "caught up"
        self.worker.emit(
            {
                "ev": "caught_up",
                "device": True,
                "t_connect": self.t_connect,
                "t_authed": device.t_authed,
                "t_done": device.t_done,
                "events": device.check.events,
                "pages": device.check.pages,
                "failed": device.failed,
            }
        )
        if device.failed:
            self.acked()

    def acked(self) -> None:
        self.worker.emit({"ev": "acked"})

    def progress(self) -> dict[str, Any]:
        dev = self.device
        return {
            "sent": sum(s.seq for s in self.senders),
            "ok": sum(s.ok for s in self.senders),
            "events": dev.check.events if dev else 0,
            "errors": sum(sum(c.errors.values()) for c in self.senders)
            + (sum(dev.errors.values()) if dev else 0),
        }

    def finish(self) -> None:
        dev = self.device
        errors = total_errors(list(self.senders), self.connector.errors)
        if dev is not None:
            errors.update(dev.errors)
            errors.update(self.device_connector.errors)
        self.worker.finish(
            {
                "sent": sum(s.seq for s in self.senders),
                "ok": sum(s.ok for s in self.senders),
                "ok_by_sender": {str(s.uid): s.ok for s in self.senders},
                "failed": sum(s.failed for s in self.senders),
                "device": dev is not None,
                "first_auth": {k: v for k, v in self.first_auth.items() if k != "id"},
                "auth": {k: v for k, v in dev.auth_ok.items() if k != "id"} if dev else {},
                "position_before": self.position,
                "check": dev.check.result() if dev else None,
                "pushes_during_catchup": dev.pushes if dev else 0,
                "device_failed": dev.failed if dev else "",
                "errors": dict(errors),
            }
        )


# -- the worker process ---------------------------------------------------------------

SCENARIOS: dict[str, type[Scenario]] = {
    "pairs": Pairs,
    "idle": Idle,
    "connect": Connect,
    "offline": Offline,
    "catchup": Catchup,
}


class Commands(LineReceiver):
    delimiter = b"\n"

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def lineReceived(self, line: bytes) -> None:
        if line.strip():
            self.worker.command(json.loads(line))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The parent is gone (or done with us).
        if reactor.running:
            reactor.stop()


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.io = stdio.StandardIO(Commands(self))
        self.scenario = SCENARIOS[spec["scenario"]](self, spec)
        self.progress = LoopingCall(self.report)

    def emit(self, event: dict[str, Any]) -> None:
        self.io.write(json.dumps(event).encode() + b"\n")

    def start(self) -> None:
        d = self.scenario.setup()
        if d is None:
            self.emit({"ev": "ready"})
        else:
            d.addCallbacks(
                lambda _: self.emit({"ev": "ready"}),
                lambda f: self.fail(f"setup failed: {f.getErrorMessage()}"),
            )
        self.progress.start(0.5, now=False)

    def report(self) -> None:
        self.emit({"ev": "progress", "t": monotonic_ns(), **self.scenario.progress()})

    def command(self, cmd: dict[str, Any]) -> None:
        try:
            self.scenario.command(cmd)
        except Exception as e:
            self.fail(f"command {cmd.get('cmd')} failed: {e!r}")

    def fail(self, message: str) -> None:
        self.finish({"fatal": message})

    def finish(self, result: dict[str, Any]) -> None:
        ru = os.times()
        result["worker_cpu_s"] = round(ru.user + ru.system, 3)
        if self.progress.running:
            self.progress.stop()
        # Flush everything written so far, then close: Commands.connectionLost
        # stops the reactor.
        self.emit({"ev": "result", **result})
        self.io.loseConnection()
        reactor.callLater(10, reactor.stop)


def main() -> None:
    spec = json.loads(sys.argv[1])
    worker = Worker(spec)
    reactor.callWhenRunning(worker.start)
    profile = os.environ.get("BENCH_WORKER_PROFILE")
    if profile:
        # BENCH_WORKER_PROFILE=/tmp/w: cProfile each worker into /tmp/w.<pid>.
        import cProfile

        cProfile.runctx("reactor.run()", globals(), locals(), f"{profile}.{os.getpid()}")
    else:
        reactor.run()


if __name__ == "__main__":
    main()
