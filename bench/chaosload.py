"""
The chaos soak's load worker: ``python -m bench.chaosload SPEC``, the
process of L{bench.worker} with one more scenario (L{Chaos}).

Every client here behaves like a careful real client: it reconnects after a
lost connection (with a randomised back-off, to another node when its own
refuses), re-sends every send that got no answer, C{unavailable}, C{internal}
or C{rate_limited} with the SAME C{cid} and the same body (the protocol's
idempotency key), re-acks what it could not ack, and syncs after every
reconnect. So a message lost or stored twice, or a pending message that goes
missing, is the server's fault, never the client's.

What the worker records is what the parent (L{bench.chaos}) needs to judge the
run against SQL: per send the first-send and ok times, the answered msg_id and
dup flag, how many attempts, and which connection stored it in which order;
per recipient what arrived (push or sync, on which connection), what was
acked and read, and at the end what C{sync}, C{unread} and C{history} answer.
"""

from __future__ import annotations

import itertools
import random
import socket
import struct
from array import array
from collections import Counter
from typing import Any

import msgpack
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from bench import stats, wire, worker
from bench.worker import Frame, Scenario, mint_tokens, monotonic_ns, reactor
from imserver.client.protocol import ConnectionClosed, RequestFailed
from imserver.wire.codec import encode
from imserver.wire.framing import HEADER, FrameDecoder

#: Error codes a client retries (sends with the same cid).
RETRYABLE = frozenset({"unavailable", "internal", "rate_limited"})
#: A request with no answer after this long is sent again (same cid).
REQUEST_TIMEOUT_NS = 10 * 10**9
#: Request ids of other requests start here; below it, a send's id is its seq.
OTHER_IDS = 1 << 40
#: Recipients leave every message whose seq is a multiple of this unacked, so
#: that the end of the run has pending messages to check.
KEEP_PENDING = 5
#: A sender recalls the messages whose seq is RECALL_EVERY * k + 7.
RECALL_EVERY = 29
TICK = 0.05
#: After the load, how long every ok'd message has to arrive.
ARRIVAL_S = 15.0


def unpack(body: bytes) -> Frame:
    frame: Frame = msgpack.unpackb(body, raw=False, strict_map_key=False)
    return frame


class Link(Protocol):
    """One connection of an L{Actor}: auth first, then frames to the actor."""

    transport: Any

    def __init__(self, actor: Actor) -> None:
        self.actor = actor
        self.decoder = FrameDecoder(1 << 26)
        self.authed = False
        self.open = False

    def connectionMade(self) -> None:
        self.open = True
        self.transport.setTcpNoDelay(True)
        self.transport.write(wire.auth_frame(self.actor.token))

    def dataReceived(self, data: bytes) -> None:
        try:
            bodies = self.decoder.feed(data)
        except Exception:
            self.actor.errors["bad_framing"] += 1
            self.transport.abortConnection()
            return
        for body in bodies:
            if not self.open:
                return
            f = unpack(body)
            if self.authed:
                self.actor.frame(f)
            elif f.get("t") == "ok" and f.get("id") == 1:
                self.authed = True
                self.actor.up(self)
            else:
                self.actor.errors[f"auth:{f.get('code', f.get('t'))}"] += 1
                self.transport.abortConnection()
                return

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
        self.actor.down(self)


class _LinkFactory(Factory):
    noisy = False

    def __init__(self, actor: Actor) -> None:
        self.actor = actor

    def buildProtocol(self, addr: Any) -> Link:
        return Link(self.actor)


class Actor:
    """A user with one connection at a time, reconnecting while wanted."""

    def __init__(self, run: Chaos, uid: int, token: str, node: int) -> None:
        self.run = run
        self.uid = uid
        self.token = token
        self.home = self.node = node
        self.link: Link | None = None
        self.connecting = False
        self.wanted = True
        self.epoch = 0
        self.epochs: list[list[int]] = []  # [authed at, lost at (0: open)]
        self.ids = itertools.count(OTHER_IDS)
        # request id -> (kind, data, sent at); kept after a timeout (late replies count)
        self.waiting: dict[int, tuple[str, Any, int]] = {}
        self.errors: Counter[str] = Counter()
        self.reconnects = 0
        self.backoff = 0.2
        self.up_waiters: list[Deferred[None]] = []
        #: [kind, sent at, latency] of each answered request but sends (acks, reads, ...)
        self.op_times: list[list[Any]] = []

    # -- connection ------------------------------------------------------------

    def connect(self) -> None:
        if self.connecting or self.link is not None or not self.wanted:
            return
        self.connecting = True
        endpoints = self.run.endpoints
        ep = clientFromString(reactor, endpoints[self.node % len(endpoints)])
        d = ep.connect(_LinkFactory(self))
        d.addErrback(self._connect_failed)

    def _connect_failed(self, f: Failure) -> None:
        self.connecting = False
        self.errors[f"connect:{type(f.value).__name__}"] += 1
        self.node += 1  # the next node next time (if there are several)
        self.reconnect_later()

    def reconnect_later(self) -> None:
        if self.wanted and not self.connecting and self.link is None:
            delay = self.backoff * random.uniform(0.5, 1.5)
            self.backoff = min(2.0, self.backoff * 2)
            reactor.callLater(delay, self.connect)

    def up(self, link: Link) -> None:
        self.connecting = False
        self.link = link
        self.epoch += 1
        self.epochs.append([monotonic_ns(), 0])
        self.backoff = 0.2
        if self.epoch > 1:
            self.reconnects += 1
        self.on_up()
        waiters, self.up_waiters = self.up_waiters, []
        for d in waiters:
            d.callback(None)

    def down(self, link: Link) -> None:
        if link is not self.link:  # lost before auth
            self.connecting = False
            self.reconnect_later()
            return
        self.link = None
        self.node = self.home  # its own node first again (it may be back)
        self.epochs[-1][1] = monotonic_ns()
        waiting, self.waiting = self.waiting, {}
        self.on_down(waiting)
        for kind, data, _ in waiting.values():
            if kind == "call":
                data.errback(ConnectionClosed("connection lost"))
        self.reconnect_later()

    def drop(self) -> None:
        """Abort the connection (a client whose network went away)."""
        if self.link is not None:
            self.link.transport.abortConnection()

    def wait_up(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.link is not None:
            d.callback(None)
        else:
            self.up_waiters.append(d)
            self.connect()
        return d

    # -- requests --------------------------------------------------------------

    def request(self, op: str, fields: dict[str, Any], kind: str, data: Any = None) -> bool:
        if self.link is None:
            return False
        rid = next(self.ids)
        self.waiting[rid] = (kind, data, monotonic_ns())
        self.link.transport.write(encode({"t": op, "id": rid, **fields}))
        return True

    def call(self, op: str, **fields: Any) -> Deferred[Frame]:
        """A request whose reply fires a Deferred (the final checks)."""
        d: Deferred[Frame] = Deferred()
        if not self.request(op, fields, "call", d):
            d.errback(ConnectionClosed("not connected"))
        return d

    def frame(self, f: Frame) -> None:
        rid = f.get("id")
        if rid is None:
            self.push(f)
        elif rid < OTHER_IDS:
            self.send_reply(rid, f)
        else:
            entry = self.waiting.pop(rid, None)
            if entry is None:
                self.errors["unexpected_reply"] += 1
                return
            kind, data, sent = entry
            if len(self.op_times) < 200000 and kind != "call":
                self.op_times.append([kind, sent, monotonic_ns() - sent])
            if kind == "call":
                if f.get("t") == "error":
                    data.errback(RequestFailed(f))
                else:
                    data.callback(f)
            else:
                self.reply(kind, data, f)

    def check_timeouts(self, now: int) -> None:
        for rid, (kind, data, sent) in list(self.waiting.items()):
            if now - sent > REQUEST_TIMEOUT_NS and kind != "call":
                del self.waiting[rid]
                self.errors[f"no_answer:{kind}"] += 1
                self.timed_out(kind, data)

    # -- for subclasses ----------------------------------------------------------

    def on_up(self) -> None:
        pass

    def on_down(self, waiting: dict[int, tuple[str, Any, int]]) -> None:
        pass

    def push(self, f: Frame) -> None:
        pass

    def send_reply(self, seq: int, f: Frame) -> None:
        self.errors["unexpected_reply"] += 1

    def reply(self, kind: str, data: Any, f: Frame) -> None:
        pass

    def timed_out(self, kind: str, data: Any) -> None:
        pass

    def tick(self, now: int) -> None:
        pass

    @property
    def quiet(self) -> bool:
        return True

    async def history(self, peer: int) -> list[int]:
        """Every msg_id of the conversation with C{peer}, newest first."""
        out: list[int] = []
        before = 0
        for _ in range(100000):
            fields: dict[str, Any] = {"peer": peer, "limit": 100}
            if before:
                fields["before"] = before
            page = await self.call("history", **fields)
            out.extend(m["msg_id"] for m in page["msgs"])
            if not page["more"] or not page["msgs"]:
                break
            before = page["msgs"][-1]["msg_id"]
        return out


class Sender(Actor):
    """
    Sends numbered messages (seq 0, 1, ...; cid = 8 hex digits of seq) in
    bursts, several in flight, at C{rate} msg/s on average; re-sends what got
    no answer with the same cid and body; recalls some of what was answered ok.
    """

    def __init__(self, run: Chaos, uid: int, token: str, node: int, to: int) -> None:
        super().__init__(run, uid, token, node)
        self.to = to
        self.build = wire.send_builder(to)
        self.sending = False
        self.credit = random.uniform(0, run.burst)
        self.first_ns = array("q")
        self.ok_ns = array("q")
        self.msg_id = array("q")
        self.dup = bytearray()
        self.attempts = bytearray()
        self.store_epoch = array("q")
        self.store_index = array("q")
        self.inflight: dict[int, tuple[int, int, int]] = {}  # seq -> (epoch, index, sent at)
        self.retry: dict[int, int] = {}  # seq -> due at
        self.link_index = 0
        self.ok = 0
        self.dup_flags = 0
        self.spurious_dup: list[int] = []
        self.id_mismatch: list[list[int]] = []
        self.rejected: list[list[Any]] = []
        self.error_times: list[list[Any]] = []
        self.recalled: set[int] = set()
        self.recall_todo: set[int] = set()
        self.recall_errors: Counter[str] = Counter()

    @property
    def sent(self) -> int:
        return len(self.first_ns)

    def on_up(self) -> None:
        self.link_index = 0
        self.tick(monotonic_ns())
        for seq in sorted(self.recall_todo):
            self.recall(seq)

    def on_down(self, waiting: dict[int, tuple[str, Any, int]]) -> None:
        now = monotonic_ns()
        for seq in self.inflight:
            self.retry[seq] = now
        self.inflight = {}
        for kind, data, _ in waiting.values():
            if kind == "recall":
                self.recall_todo.add(data)

    def transmit(self, seq: int, now: int) -> None:
        assert self.link is not None
        self.attempts[seq] = min(255, self.attempts[seq] + 1)
        self.link_index += 1
        self.inflight[seq] = (self.epoch, self.link_index, now)
        self.link.transport.write(self.build(seq, self.first_ns[seq]))

    def tick(self, now: int) -> None:
        if self.link is None:
            return
        run = self.run
        if self.retry:
            for seq in sorted(s for s, due in self.retry.items() if due <= now):
                if len(self.inflight) >= 2 * run.window:
                    break
                del self.retry[seq]
                self.transmit(seq, now)
        if not self.sending:
            return
        self.credit = min(self.credit + run.rate * TICK, 4.0 * run.burst)
        while self.credit >= run.burst and len(self.inflight) + run.burst <= run.window:
            self.credit -= run.burst
            for _ in range(run.burst):
                seq = self.sent
                self.first_ns.append(now)
                self.ok_ns.append(0)
                self.msg_id.append(0)
                self.dup.append(0)
                self.attempts.append(0)
                self.store_epoch.append(0)
                self.store_index.append(0)
                self.transmit(seq, now)

    def check_timeouts(self, now: int) -> None:
        super().check_timeouts(now)
        for seq, (_, _, sent) in list(self.inflight.items()):
            if now - sent > REQUEST_TIMEOUT_NS:
                del self.inflight[seq]
                self.errors["no_answer:send"] += 1
                self.retry[seq] = now

    def send_reply(self, seq: int, f: Frame) -> None:
        now = monotonic_ns()
        if seq >= self.sent:
            self.errors["unexpected_reply"] += 1
            return
        attempt = self.inflight.pop(seq, None)
        if f.get("t") == "ok":
            self.retry.pop(seq, None)
            mid = int(f["msg_id"])
            if self.msg_id[seq]:
                if self.msg_id[seq] != mid:
                    self.id_mismatch.append([seq, self.msg_id[seq], mid])
                return  # the answer to another attempt of a retried cid
            self.msg_id[seq] = mid
            self.ok_ns[seq] = now
            self.ok += 1
            if f.get("dup"):
                self.dup[seq] = 1
                self.dup_flags += 1
                if self.attempts[seq] == 1:
                    # Only one attempt was ever sent: nothing could have stored it before.
                    self.spurious_dup.append(seq)
            elif attempt is not None:
                self.store_epoch[seq], self.store_index[seq] = attempt[0], attempt[1]
            if seq % RECALL_EVERY == 7 and self.run.phase == "load":
                reactor.callLater(0.3, self.recall, seq)
            return
        code = str(f.get("code"))
        self.errors[code] += 1
        if len(self.error_times) < 200000:
            self.error_times.append([now, code])
        if self.msg_id[seq]:
            return
        if code in RETRYABLE:
            backoff = min(2.0, 0.1 * self.attempts[seq]) * random.uniform(0.5, 1.5)
            self.retry[seq] = now + int(backoff * 1e9)
        else:
            self.rejected.append([seq, code, f.get("message")])

    def recall(self, seq: int) -> None:
        if self.run.phase == "verify":
            return  # left unresolved (judged as such)
        self.recall_todo.discard(seq)
        if not self.request("recall", {"msg_id": self.msg_id[seq]}, "recall", seq):
            self.recall_todo.add(seq)

    def reply(self, kind: str, data: Any, f: Frame) -> None:
        if kind != "recall":
            return
        if f.get("t") == "ok":
            self.recalled.add(data)
            return
        code = str(f.get("code"))
        self.recall_errors[code] += 1
        if code in RETRYABLE:
            self.recall_todo.add(data)
            reactor.callLater(0.5, self._recall_again, data)

    def _recall_again(self, seq: int) -> None:
        if seq in self.recall_todo and self.link is not None and self.run.phase != "verify":
            self.recall(seq)

    def timed_out(self, kind: str, data: Any) -> None:
        if kind == "recall":
            self.recall(data)

    @property
    def resolved(self) -> bool:
        return not self.inflight and not self.retry and not self.recall_todo

    @property
    def quiet(self) -> bool:
        return self.resolved and not any(k == "recall" for k, _, _ in self.waiting.values())

    def result(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "to": self.to,
            "first_ns": list(self.first_ns),
            "ok_ns": list(self.ok_ns),
            "msg_id": list(self.msg_id),
            "dup": list(self.dup),
            "attempts": list(self.attempts),
            "store_epoch": list(self.store_epoch),
            "store_index": list(self.store_index),
            "spurious_dup": self.spurious_dup,
            "id_mismatch": self.id_mismatch,
            "rejected": self.rejected,
            "error_times": self.error_times,
            "recalled": sorted(self.recalled),
            "recall_unresolved": sorted(self.recall_todo),
            "recall_errors": dict(self.recall_errors),
            "unanswered": sorted(set(self.inflight) | set(self.retry)),
            "errors": dict(self.errors),
            "reconnects": self.reconnects,
            "epochs": self.epochs,
            "op_times": self.op_times,
        }


class Recipient(Actor):
    """
    Receives from one sender: syncs after every (re)connect, acks what it
    got (except every KEEP_PENDING-th seq), reads a little behind what it got,
    and syncs again on any push it does not know (a server telling it to).
    """

    def __init__(self, run: Chaos, uid: int, token: str, node: int, sender: int) -> None:
        super().__init__(run, uid, token, node)
        self.sender = sender
        self.received: dict[int, list[int]] = {}  # msg_id -> [q, epoch, t_ns, pushed]
        self.by_q: dict[int, int] = {}
        self.dups: list[list[int]] = []
        self.to_ack: set[int] = set()
        self.acked: set[int] = set()
        self.session_id = 0
        self.max_id = 0
        self.read_target = 0
        self.read_ok = 0
        self.read_sent = 0
        self.next_read = 0
        self.hints = 0
        self.pushes: Counter[str] = Counter()

    def on_up(self) -> None:
        self.sync(0)

    def sync(self, after: int) -> None:
        fields: dict[str, Any] = {"limit": 100}
        if after:
            fields["after"] = after
        self.request("sync", fields, "sync")

    def on_down(self, waiting: dict[int, tuple[str, Any, int]]) -> None:
        for kind, data, _ in waiting.values():
            if kind == "ack":
                self.to_ack.update(data)  # may or may not have been applied: again
            elif kind == "read":
                self.read_sent = self.read_ok

    def got(self, m: Frame, pushed: bool) -> None:
        if m.get("from") != self.sender:
            self.errors["unexpected_sender"] += 1
            return
        mid = int(m["msg_id"])
        body = m.get("body")
        if not isinstance(body, dict) or "q" not in body:
            self.errors["unexpected_body"] += 1
            return
        q = int(body["q"])
        if mid not in self.received:
            prev = self.by_q.get(q)
            if prev is not None and prev != mid:
                self.dups.append([q, prev, mid])
            else:
                self.by_q[q] = mid
            self.received[mid] = [q, self.epoch, monotonic_ns(), int(pushed)]
        self.session_id = int(m["session_id"])
        self.max_id = max(self.max_id, mid)
        if q % KEEP_PENDING and mid not in self.acked and self.run.phase != "verify":
            self.to_ack.add(mid)

    def push(self, f: Frame) -> None:
        t = str(f.get("t"))
        self.pushes[t] += 1
        if t == "msg":
            self.got(f, True)
        elif t in ("recall", "read", "kick", "goaway"):
            pass
        elif self.run.phase != "verify":
            # A push this client does not know: a server asking it to resync.
            self.hints += 1
            self.sync(0)

    def reply(self, kind: str, data: Any, f: Frame) -> None:
        ok = f.get("t") == "ok"
        code = str(f.get("code"))
        if not ok:
            self.errors[f"{kind}:{code}"] += 1
        if kind == "sync":
            if ok:
                msgs = f["msgs"]
                for m in msgs:
                    self.got(m, False)
                if f["more"] and msgs:
                    self.sync(int(msgs[-1]["msg_id"]))
            elif code in RETRYABLE:
                reactor.callLater(0.5, self._sync_again)
        elif kind == "ack":
            if ok:
                self.acked.update(data)
            else:
                self.to_ack.update(data)
        elif kind == "read":
            if ok:
                self.read_ok = max(self.read_ok, data)
            else:
                self.read_sent = self.read_ok

    def _sync_again(self) -> None:
        if self.link is not None:
            self.sync(0)

    def timed_out(self, kind: str, data: Any) -> None:
        if kind == "ack":
            self.to_ack.update(data)
        elif kind == "sync":
            self.sync(0)
        elif kind == "read":
            self.read_sent = self.read_ok

    def tick(self, now: int) -> None:
        if self.link is None or self.run.phase == "verify":
            return
        if self.to_ack:
            ids = sorted(self.to_ack - self.acked)
            self.to_ack = set()
            for i in range(0, len(ids), 50):
                chunk = ids[i : i + 50]
                self.request("ack", {"msg_ids": chunk}, "ack", chunk)
        if now >= self.next_read and self.run.phase == "load":
            # Read up to what had arrived one read earlier: some unread remains.
            self.next_read = now + int(random.uniform(1.0, 3.0) * 1e9)
            target, self.read_target = self.read_target, self.max_id
            if target > self.read_sent and self.session_id:
                self.read_sent = target
                self.request(
                    "read", {"session_id": self.session_id, "msg_id": target}, "read", target
                )

    @property
    def quiet(self) -> bool:
        """Nothing that changes the server's state in flight or still to send."""
        return not self.to_ack and not any(
            k in ("ack", "read") for k, _, _ in self.waiting.values()
        )

    def result(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "from": self.sender,
            "received": [[mid, *rec] for mid, rec in self.received.items()],
            "dups": self.dups,
            "acked": sorted(self.acked),
            "read_ok": self.read_ok,
            "hints": self.hints,
            "pushes": dict(self.pushes),
            "errors": dict(self.errors),
            "reconnects": self.reconnects,
            "epochs": self.epochs,
            "op_times": self.op_times,
        }


# -- faults run by a worker ------------------------------------------------------------


class Probe(Protocol):
    """A raw connection that collects the frames it receives."""

    transport: Any

    def __init__(self) -> None:
        self.decoder = FrameDecoder(1 << 26)
        self.frames: list[Frame] = []
        self.waiter: Deferred[None] | None = None
        self.closed = False
        self.lost: Deferred[None] = Deferred()
        self.bytes = 0

    def dataReceived(self, data: bytes) -> None:
        self.bytes += len(data)
        try:
            self.frames.extend(unpack(b) for b in self.decoder.feed(data))
        except Exception:
            self.frames.append({"t": "client:undecodable"})
        self._wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._wake()
        self.lost.callback(None)

    def _wake(self) -> None:
        w, self.waiter = self.waiter, None
        if w is not None:
            w.callback(None)

    async def next(self, seconds: float = 5.0) -> Frame | None:
        """The next frame, or None once closed or after C{seconds}."""
        deadline = monotonic_ns() + int(seconds * 1e9)
        while not self.frames:
            if self.closed or monotonic_ns() > deadline:
                return None
            w: Deferred[None] = Deferred()
            self.waiter = w
            call = reactor.callLater(max(0.0, (deadline - monotonic_ns()) / 1e9), self._wake)
            await w
            if call.active():
                call.cancel()
        return self.frames.pop(0)


class _ProbeFactory(Factory):
    noisy = False

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def buildProtocol(self, addr: Any) -> Probe:
        return self.probe


async def open_probe(endpoint: str, token: str | None) -> Probe:
    probe = Probe()
    ep = clientFromString(reactor, endpoint)
    await ep.connect(_ProbeFactory(probe))
    probe.transport.setTcpNoDelay(True)
    if token is not None:
        probe.transport.write(wire.auth_frame(token))
        reply = await probe.next(10)
        if not reply or reply.get("t") != "ok":
            raise RuntimeError(f"probe auth failed: {reply}")
    return probe


def _frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def malformed_cases(peer: int, me: int) -> list[tuple[str, bytes, str, bool]]:
    """(name, bytes, expected code, reply has an id) on one open connection:
    each is answered with that error and the connection stays open."""
    p = wire.packb
    return [
        ("invalid msgpack", _frame(b"\xc1"), "bad_frame", False),
        ("array body", _frame(p([1, 2])), "bad_frame", False),
        (
            "binary keys",
            _frame(msgpack.packb({b"t": b"ping"}, use_bin_type=True)),
            "bad_frame",
            False,
        ),
        ("trailing bytes", _frame(p({"t": "ping", "id": 5}) + b"\x00"), "bad_frame", False),
        (
            "ext type",
            _frame(p({"t": "ping", "id": 6, "x": msgpack.ExtType(5, b"x")})),
            "bad_frame",
            False,
        ),
        (
            "timestamp ext",
            _frame(p({"t": "ping", "id": 7, "x": msgpack.Timestamp(1, 0)})),
            "bad_frame",
            False,
        ),
        ("unknown op", encode({"t": "nope", "id": 8}), "unknown_op", True),
        ("no t", encode({"id": 9}), "invalid", True),
        (
            "send to a string",
            encode({"t": "send", "id": 10, "to": "1", "cid": "a", "body": "b"}),
            "invalid",
            True,
        ),
        (
            "empty cid",
            encode({"t": "send", "id": 11, "to": peer, "cid": "", "body": "b"}),
            "invalid",
            True,
        ),
        (
            "cid of 65",
            encode({"t": "send", "id": 12, "to": peer, "cid": "c" * 65, "body": "b"}),
            "too_large",
            True,
        ),
        (
            "body of 40 KB",
            encode({"t": "send", "id": 13, "to": peer, "cid": "big", "body": "x" * 40000}),
            "too_large",
            True,
        ),
        (
            "send to self",
            encode({"t": "send", "id": 14, "to": me, "cid": "self", "body": "b"}),
            "invalid",
            True,
        ),
        (
            "ack of 501 ids",
            encode({"t": "ack", "id": 15, "msg_ids": list(range(1, 502))}),
            "too_large",
            True,
        ),
        (
            "read of no session",
            encode({"t": "read", "id": 16, "session_id": 1, "msg_id": 1}),
            "not_found",
            True,
        ),
        ("bool id", encode({"t": "ping", "id": True}), "invalid", False),
    ]


async def malformed(endpoint: str, tokens: list[str], uids: list[int]) -> dict[str, Any]:
    """Send each malformed frame and check the documented answer."""
    mismatches: list[str] = []
    checked = 0
    probe = await open_probe(endpoint, tokens[0])
    for name, data, code, with_id in malformed_cases(uids[1], uids[0]):
        checked += 1
        probe.transport.write(data)
        reply = await probe.next(5)
        got = "no reply (closed)" if reply is None else f"{reply.get('t')}/{reply.get('code')}"
        if reply is None or reply.get("t") != "error" or reply.get("code") != code:
            mismatches.append(f"{name}: expected error {code}, got {got}")
        elif with_id != ("id" in reply and reply["id"] is not None):
            mismatches.append(f"{name}: expected an error {'with' if with_id else 'without'} id")
        if probe.closed:
            mismatches.append(f"{name}: the server closed the connection")
            probe = await open_probe(endpoint, tokens[0])
    probe.transport.write(encode({"t": "ping", "id": 99}))
    reply = await probe.next(5)
    checked += 1
    if not reply or reply.get("t") != "ok":
        mismatches.append(f"ping after the malformed frames: {reply}")
    probe.transport.loseConnection()
    # Frames after which the server must answer and close (or, for garbage as
    # the first frame, answer bad_frame like anywhere else).
    closing: list[tuple[str, str | None, bytes, tuple[str, ...], bool]] = [
        ("length 0", tokens[0], struct.pack(">I", 0), ("frame_too_large",), True),
        (
            "length 2^31",
            tokens[0],
            struct.pack(">I", 1 << 31) + b"x" * 16,
            ("frame_too_large",),
            True,
        ),
        ("request before auth", None, encode({"t": "ping", "id": 1}), ("unauthenticated",), True),
        (
            "bad token",
            None,
            encode({"t": "auth", "id": 1, "token": "x.y.z"}),
            ("auth_failed",),
            True,
        ),
        (
            "garbage before auth",
            None,
            _frame(b"\xc1\xc1"),
            ("bad_frame", "unauthenticated"),
            False,
        ),
    ]
    for name, token, data, codes, must_close in closing:
        checked += 1
        probe = await open_probe(endpoint, token)
        probe.transport.write(data)
        reply = await probe.next(5)
        if reply is None or reply.get("code") not in codes:
            mismatches.append(f"{name}: expected {' or '.join(codes)}, got {reply}")
        if must_close:
            await _closed_within(probe, 5)
            if not probe.closed:
                mismatches.append(f"{name}: the server did not close the connection")
        probe.transport.abortConnection()
    return {"checked": checked, "mismatches": mismatches}


async def _closed_within(probe: Probe, seconds: float) -> None:
    if probe.closed:
        return
    d: Deferred[None] = Deferred()

    def fire(_: object = None) -> None:
        if not d.called:
            d.callback(None)

    call = reactor.callLater(seconds, fire)
    probe.lost.addBoth(fire)
    await d
    if call.active():
        call.cancel()


async def slow_consumer(
    endpoint: str, tokens: list[str], uids: list[int], seconds: float
) -> dict[str, Any]:
    """
    A client that stops reading: 60 pending messages of 4 KB, then it asks
    for them 40 times (16 MB of replies) and reads nothing for C{seconds}
    while a feeder pushes more to it. The server should drop it once
    C{max_outbound_bytes} pile up, and stay well for everyone else.
    """
    feeder = await open_probe(endpoint, tokens[1])
    slow = await open_probe(endpoint, tokens[0])
    pad = "p" * 4000
    for i in range(60):
        feeder.transport.write(
            encode({"t": "send", "id": 100 + i, "to": uids[0], "cid": f"slow{i}", "body": pad})
        )
    for _ in range(60):
        if await feeder.next(15) is None:
            break
    slow.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.transport.pauseProducing()
    for i in range(40):
        slow.transport.write(encode({"t": "sync", "id": 1000 + i, "limit": 100}))
    t_end = monotonic_ns() + int(seconds * 1e9)
    i = 0
    while monotonic_ns() < t_end:
        feeder.transport.write(
            encode({"t": "send", "id": 200 + i, "to": uids[0], "cid": f"slowp{i}", "body": pad})
        )
        i += 1
        await _sleep(0.05)
    slow.transport.resumeProducing()
    await _closed_within(slow, 10)
    dropped = slow.closed
    slow.transport.abortConnection()
    feeder.transport.loseConnection()
    return {"dropped": dropped, "received_bytes": slow.bytes, "pushes_fed": i}


def _sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def storm(endpoints: list[str], tokens: list[str]) -> dict[str, Any]:
    """All of C{tokens} connect and authenticate at once, then leave."""
    t0 = monotonic_ns()

    async def one(i: int, token: str) -> int:
        start = monotonic_ns()
        probe = await open_probe(endpoints[i % len(endpoints)], token)
        probe.transport.loseConnection()
        return monotonic_ns() - start

    results = await DeferredList(
        [Deferred.fromCoroutine(one(i, t)) for i, t in enumerate(tokens)], consumeErrors=True
    )
    lat = array("q", [v for ok, v in results if ok])
    return {
        "clients": len(tokens),
        "ok": len(lat),
        "failed": len(tokens) - len(lat),
        "seconds": round((monotonic_ns() - t0) / 1e9, 3),
        "lat_connect": stats.histogram(lat),
    }


# -- the scenario ---------------------------------------------------------------------


class Chaos(Scenario):
    """
    Pairs (sender -> recipient, the recipient on the next node), plus the
    faults a worker runs itself (malformed frames, a slow consumer, a connect
    storm) when the parent says so. Phases: setup, load (sends, acks, reads,
    recalls, random reconnects), settle (no new sends; every unanswered send
    retried until answered), verify (no acks or reads; the final sync,
    unread and history of every client).
    """

    def __init__(self, worker: worker.Worker, spec: dict[str, Any]) -> None:
        super().__init__(worker, spec)
        self.rate: float = spec["rate"]
        self.window: int = spec["window"]
        self.burst: int = max(1, min(spec["burst"], self.window))
        self.drop_per_s: float = spec["reconnect_per_s"]
        self.phase = "setup"
        uids: list[int] = spec["uids"]
        tokens = mint_tokens(spec["secret"], uids)
        n = len(self.endpoints)
        first = spec.get("first_pair", 0)
        self.senders: list[Sender] = []
        self.recipients: list[Recipient] = []
        for j in range(0, len(uids), 2):
            i = first + j // 2
            self.senders.append(Sender(self, uids[j], tokens[j], i % n, uids[j + 1]))
            self.recipients.append(
                Recipient(self, uids[j + 1], tokens[j + 1], (i + 1) % n, uids[j])
            )
        self.actors: list[Actor] = [*self.recipients, *self.senders]
        self.spare = list(
            zip(spec["spare_uids"], mint_tokens(spec["secret"], spec["spare_uids"]), strict=True)
        )
        self.loop = LoopingCall(self.tick)
        self.slow_loop = LoopingCall(self.slow_tick)
        self.faults: list[dict[str, Any]] = []

    def take(self, n: int) -> tuple[list[int], list[str]]:
        taken, self.spare = self.spare[:n], self.spare[n:]
        if len(taken) < n:
            raise RuntimeError("out of spare uids")
        return [u for u, _ in taken], [t for _, t in taken]

    def setup(self) -> Deferred[Any]:
        async def go() -> None:
            for group in (self.recipients, self.senders):
                await DeferredList([a.wait_up() for a in group])

        return Deferred.fromCoroutine(go())

    def tick(self) -> None:
        now = monotonic_ns()
        for a in self.actors:
            a.tick(now)

    def slow_tick(self) -> None:
        now = monotonic_ns()
        p = self.drop_per_s
        for a in self.actors:
            a.check_timeouts(now)
            if self.phase == "load" and p and random.random() < p:
                a.drop()

    def command(self, cmd: dict[str, Any]) -> None:
        c = cmd["cmd"]
        if c == "start":
            self.phase = "load"
            for s in self.senders:
                s.sending = True
            self.loop.start(TICK, now=False)
            self.slow_loop.start(1.0, now=False)
        elif c == "settle":
            self.phase = "settle"
            for s in self.senders:
                s.sending = False
            Deferred.fromCoroutine(self.settle(cmd["timeout"])).addErrback(self.failed)
        elif c == "verify":
            Deferred.fromCoroutine(self.verify()).addErrback(self.failed)
        elif c == "fault":
            Deferred.fromCoroutine(self.fault(cmd)).addErrback(self.failed)

    def failed(self, f: Failure) -> None:
        self.worker.fail(f"{f.value.__class__.__name__}: {f.getErrorMessage()}")

    async def fault(self, cmd: dict[str, Any]) -> None:
        kind = cmd["kind"]
        try:
            if kind == "malformed":
                uids, tokens = self.take(2)
                # The peer must exist: authenticate it once.
                peer = await open_probe(self.endpoints[0], tokens[1])
                peer.transport.loseConnection()
                out = await malformed(self.endpoints[0], tokens, uids)
            elif kind == "slow_consumer":
                uids, tokens = self.take(2)
                out = await slow_consumer(self.endpoints[0], tokens, uids, cmd["seconds"])
            elif kind == "storm":
                uids, tokens = self.take(cmd["clients"])
                out = await storm(self.endpoints, tokens)
            else:
                out = {"error": f"unknown fault {kind}"}
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        self.worker.emit({"ev": "fault", "kind": kind, **out})

    async def settle(self, seconds: float) -> None:
        """
        Every send answered (within C{seconds}), then up to ARRIVAL_S more for
        every ok'd message to arrive and the acks and reads to be answered
        (what never arrives is judged as a push missed, not waited for).
        """
        deadline = monotonic_ns() + int(seconds * 1e9)
        while monotonic_ns() < deadline and not all(s.resolved for s in self.senders):
            await _sleep(0.2)
        answered = all(s.resolved for s in self.senders)
        until = min(deadline, monotonic_ns()) + int(ARRIVAL_S * 1e9)
        while monotonic_ns() < until:
            if all(
                r.quiet and self.arrived(s, r)
                for s, r in zip(self.senders, self.recipients, strict=True)
            ):
                break
            await _sleep(0.2)
        # Whatever happens, nothing of ours may still change SQL once the final
        # reads start: every ack, read and recall answered.
        until = monotonic_ns() + int(ARRIVAL_S * 1e9)
        while monotonic_ns() < until and not all(a.quiet for a in self.actors):
            await _sleep(0.2)
        await _sleep(0.5)
        self.phase = "verify"
        self.worker.emit({"ev": "settled", "in_time": answered})

    @staticmethod
    def arrived(s: Sender, r: Recipient) -> bool:
        received = r.received
        return all(
            not mid or mid in received or seq in s.recalled for seq, mid in enumerate(s.msg_id)
        )

    async def verify(self) -> None:
        self.loop.stop()
        self.slow_loop.stop()

        async def recipient(r: Recipient) -> dict[str, Any]:
            out: dict[str, Any] = {}
            try:
                await r.wait_up()
                pending: list[int] = []
                after = 0
                for _ in range(10000):
                    fields: dict[str, Any] = {"limit": 500}
                    if after:
                        fields["after"] = after
                    page = await r.call("sync", **fields)
                    pending.extend(int(m["msg_id"]) for m in page["msgs"])
                    if not page["more"] or not page["msgs"]:
                        break
                    after = pending[-1]
                out["final_sync"] = pending
                unread = await r.call("unread")
                out["unread"] = {"total": unread["total"], "sessions": unread["sessions"]}
                out["history"] = await r.history(r.sender)
            except Exception as e:
                out["verify_error"] = f"{type(e).__name__}: {e}"
            return out

        async def sender(s: Sender) -> dict[str, Any]:
            try:
                await s.wait_up()
                return {"history": await s.history(s.to)}
            except Exception as e:
                return {"verify_error": f"{type(e).__name__}: {e}"}

        rs = [await recipient(r) for r in self.recipients]
        ss = [await sender(s) for s in self.senders]
        for a in self.actors:
            a.wanted = False
            if a.link is not None:
                a.link.transport.loseConnection()
        self.worker.finish(
            {
                "senders": [{**s.result(), **v} for s, v in zip(self.senders, ss, strict=True)],
                "recipients": [
                    {**r.result(), **v} for r, v in zip(self.recipients, rs, strict=True)
                ],
            }
        )

    def progress(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "sent": sum(s.sent for s in self.senders),
            "ok": sum(s.ok for s in self.senders),
            "connected": sum(1 for a in self.actors if a.link is not None),
            "unavailable": sum(s.errors.get("unavailable", 0) for s in self.senders),
            "reconnects": sum(a.reconnects for a in self.actors),
        }


def main() -> None:
    worker.SCENARIOS["chaos"] = Chaos
    worker.main()


if __name__ == "__main__":
    main()
