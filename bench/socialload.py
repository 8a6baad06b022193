"""
The load workers of ``python -m bench social`` and ``python -m bench cost``
(issue 11's ops): ``python -m bench.socialload SPEC`` is L{bench.worker} with
two more scenarios.

* C{social}: the C{pairs} load (same checks: every message exactly once, in
  order) with typing before each message, read receipts, occasional edits,
  presence watches and users that go on and offline (L{Social});
* C{cost}: one push path at a time, to measure its CPU per 1,000 events
  (L{CostPairs}: typing, edit, delivered; L{CostPresence}: one user with many
  watchers going on and offline).

Ops the server does not know (a feature not merged yet) answer C{unknown_op}:
the op is then skipped for the rest of the run and reported in C{absent}, so the
scenario runs at every stage of the features' landing.
"""

from __future__ import annotations

import random
from array import array
from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from bench import stats, wire, worker
from bench.worker import (
    Conn,
    Connector,
    Frame,
    Pairs,
    Recipient,
    Scenario,
    Sender,
    mint_tokens,
    monotonic_ns,
    reactor,
    total_errors,
    unpackb,
)

#: Request ids of the mixed-in ops: far above the senders' ids (their message
#: seqs) and the recipients' ack ids. One constant id per op: replies are
#: counted, not matched.
SOCIAL_ID = 1 << 40
OPS = ("typing", "read", "edit", "watch", "set_profile", "send")
IDS = {op: SOCIAL_ID + i for i, op in enumerate(OPS)}
OP_OF = {v: k for k, v in IDS.items()}
#: The acks of the cost scenarios (counted, not matched, not an op of L{Mix}).
ACK_ID = SOCIAL_ID + 100
#: Push types counted apart (anything else is counted too, under its own name).
PUSH_TYPES = ("typing", "presence", "delivered", "read", "edit")


class Mix:
    """One worker's counters of the mixed-in ops: requests, replies, pushes."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.oks: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # "op:code"
        self.absent: dict[str, str] = {}  # op -> why it was skipped
        self.pushes: Counter[str] = Counter()  # in the measured window, by type
        self.pushes_total: Counter[str] = Counter()
        self.t_start = self.t_end = 1 << 62

    def wants(self, op: str) -> bool:
        return op not in self.absent

    def frame(self, op: str, **fields: Any) -> bytes:
        self.requests[op] += 1
        return wire.request(op, IDS[op], **fields)

    def reply(self, f: Frame) -> bool:
        """Count the reply to a mixed-in op; False if it is not one."""
        op = OP_OF.get(f.get("id", -1))
        if op is None:
            return False
        if f["t"] == "ok":
            self.oks[op] += 1
            return True
        code = str(f.get("code"))
        if code == "unknown_op":
            self.absent.setdefault(op, "unknown_op: the server does not have it (not merged?)")
        elif op == "set_profile" and code == "invalid":
            # A server without the presence share setting refuses the field alone.
            self.absent.setdefault(op, f"invalid: {f.get('message')}")
        else:
            self.errors[f"{op}:{code}"] += 1
        return True

    def push(self, t: str, now: int) -> None:
        self.pushes_total[t] += 1
        if self.t_start <= now <= self.t_end:
            self.pushes[t] += 1

    def result(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "oks": dict(self.oks),
            "errors": dict(self.errors),
            "absent": dict(self.absent),
            "pushes_in_window": dict(self.pushes),
            "pushes_total": dict(self.pushes_total),
        }


# -- social: the pairs load with everything mixed in ------------------------------------


class SocialSender(Sender):
    """A pairs sender that sends C{typing} before each message (once the
    conversation exists: its first ok), edits every C{edit_every}-th message
    once it is answered, and times the C{delivered} receipts of its messages."""

    run: Social

    def __init__(self, run: Pairs, index: int, uid: int, token: str, to: int) -> None:
        super().__init__(run, index, uid, token, to)
        assert isinstance(run, Social)
        self.mix = run.mix
        self.to = to
        self.typing = wire.request("typing", IDS["typing"], to=to, active=True)
        self.sent_at: dict[int, int] = {}  # msg_id -> send time, for send -> delivered

    def on_authed(self) -> None:
        self.run.share(self)

    def pump(self) -> None:
        inflight = self.inflight
        free = self.window - len(inflight)
        if free <= 0 or not self.sending:
            return
        build = self.build
        seq = self.seq
        now = monotonic_ns()
        typing = self.typing if self.ok and self.run.typing and self.mix.wants("typing") else b""
        out = []
        for _ in range(free):
            inflight[seq] = now
            out.append(typing + build(seq, now))
            seq += 1
        if typing:
            self.mix.requests["typing"] += free
        self.seq = seq
        self.transport.write(b"".join(out))

    def due(self, now: int) -> None:
        run = self.run
        end = run.t_end
        inflight = self.inflight
        build = self.build
        typing = self.typing if self.ok and run.typing and self.mix.wants("typing") else b""
        t = self.next_t
        seq = self.seq
        out = []
        while t <= now and t < end and len(inflight) < self.window:
            inflight[seq] = t
            out.append(typing + build(seq, t))
            seq += 1
            t += self.interval
        if typing:
            self.mix.requests["typing"] += seq - self.seq
        self.next_t, self.seq = t, seq
        if out:
            self.transport.write(b"".join(out))
        if t >= end or not self.sending:
            self.blocked = False
        elif t <= now:
            self.blocked = True
        else:
            self.blocked = False
            worker.heapq.heappush(run.heap, (t, self.index, self))

    def on_frames(self, bodies: list[bytes]) -> None:
        now = monotonic_ns()
        run = self.run
        mix = self.mix
        t_start = run.t_start
        lat = run.lat_ok
        inflight = self.inflight
        edit_every = run.edit_every
        edits = []
        for body in bodies:
            f = unpackb(body)
            t = f["t"]
            if t == "ok":
                if mix.reply(f):
                    continue
                sent = inflight.pop(f["id"], None)
                if sent is None:
                    self.errors["unexpected_reply"] += 1
                    continue
                self.ok += 1
                if f.get("dup"):
                    self.dup_flags += 1
                if sent >= t_start:
                    lat.append(now - sent)
                    self.sent_at[f["msg_id"]] = sent
                q = f["id"]
                if edit_every and q % edit_every == edit_every - 1 and mix.wants("edit"):
                    edits.append(
                        mix.frame("edit", msg_id=f["msg_id"], body={"q": q, "s": now, "e": 1})
                    )
            elif t == "error":
                if mix.reply(f):
                    continue
                seq = f.get("id")
                self.errors[str(f.get("code"))] += 1
                if seq is not None and inflight.pop(seq, None) is not None:
                    self.failed.add(seq)
            else:
                mix.push(t, now)
                if t == "delivered":
                    sent = self.sent_at.pop(f.get("msg_id", -1), None)
                    if sent is not None:
                        run.lat_delivered.append(now - sent)
        if edits and self.open:
            self.transport.write(b"".join(edits))
        if run.open_loop:
            if self.blocked:
                self.due(now)
        else:
            self.pump()


class SocialRecipient(Recipient):
    """A pairs recipient (checks and acks as in C{pairs}) that also sends a
    C{read} of the newest message every C{read_every} messages, and counts
    every other push by type (times C{edit} pushes from the edit's send)."""

    run: Social

    def __init__(self, run: Pairs, uid: int, token: str) -> None:
        super().__init__(run, uid, token)
        assert isinstance(run, Social)
        self.mix = run.mix
        self.unread = 0

    def on_authed(self) -> None:
        self.run.share(self)

    def on_frames(self, bodies: list[bytes]) -> None:
        now = monotonic_ns()
        run = self.run
        mix = self.mix
        t_start = run.t_start
        in_window = t_start <= now <= run.t_end
        lat = run.lat_push
        acks = self.pending_acks
        was_empty = not acks
        read_every = run.read_every
        last: Frame | None = None
        for body in bodies:
            f = unpackb(body)
            t = f["t"]
            if t == "msg":
                self.count(f, now, t_start, in_window, lat)
                acks.append(f["msg_id"])
                self.unread += 1
                last = f
            elif t == "ok":
                if not mix.reply(f):
                    self.acks_ok += 1
            elif t == "error":
                if not mix.reply(f):
                    self.errors[f"ack:{f.get('code')}"] += 1
            else:
                mix.push(t, now)
                if t == "edit":
                    b = f.get("body")
                    if isinstance(b, dict) and isinstance(b.get("s"), int) and b["s"] >= t_start:
                        run.lat_edit.append(now - b["s"])
        if len(acks) >= 20:
            self.flush_acks()
        elif acks and was_empty:
            run.ack_dirty.append(self)
        if last is not None and read_every and self.unread >= read_every and self.open:
            self.unread = 0
            self.transport.write(
                mix.frame("read", session_id=last["session_id"], msg_id=last["msg_id"])
            )


class Flapper(Conn):
    """A user that only goes on and offline (so presence pushes flow), one
    connection per session; it counts what it is pushed."""

    def __init__(self, run: Social, uid: int, token: str) -> None:
        super().__init__(uid, token)
        self.run = run

    def on_authed(self) -> None:
        self.run.share(self)

    def on_frame(self, f: Frame) -> None:
        if f.get("t") in ("ok", "error"):
            if not self.run.mix.reply(f) and f.get("t") == "error":
                self.errors[str(f.get("code"))] += 1
        else:
            self.run.mix.push(f["t"], monotonic_ns())


class Social(Pairs):
    """
    C{pairs} with issue 11's ops mixed in (spec C{"social"}): typing before
    each message, a C{read} every C{read_every} messages received, an edit of
    every C{edit_every}-th message, every client watching its peer and
    C{watch_others} other users (the run's flappers first, then other clients),
    and C{flappers} users going on and offline every C{flap_seconds} (random
    phase). Every client first sets its presence share to C{everyone}, so the
    users it does not talk to may see it too.
    """

    sender_class = SocialSender
    recipient_class = SocialRecipient

    def __init__(self, worker_: worker.Worker, spec: dict[str, Any]) -> None:
        self.mix = Mix()
        social: dict[str, Any] = spec["social"]
        self.typing: bool = social.get("typing", True)
        self.read_every: int = social.get("read_every", 10)
        self.edit_every: int = social.get("edit_every", 50)
        self.watch_others: int = social.get("watch_others", 20)
        self.flap_seconds: float = social.get("flap_seconds", 4.0)
        self.flapper_uids: list[int] = social.get("flapper_uids", [])
        self.pool_uids: list[int] = social.get("pool_uids", [])
        super().__init__(worker_, spec)
        self.lat_delivered = array("q")
        self.lat_edit = array("q")
        mine: list[int] = social.get("my_flappers", [])
        self.flap_tokens = dict(zip(mine, mint_tokens(spec["secret"], mine), strict=True))
        self.flappers: dict[int, Flapper | None] = dict.fromkeys(mine)
        self.flaps = 0
        self.flap_connector = Connector(self.endpoints, spec.get("bind"), 25)
        self.share_frame = wire.request("set_profile", IDS["set_profile"], presence="everyone")

    def share(self, conn: Conn) -> None:
        """Once authenticated: presence visible to everyone (not only contacts)."""
        if self.mix.wants("set_profile"):
            self.mix.requests["set_profile"] += 1
            conn.transport.write(self.share_frame)

    def watched(self, uid: int, peer: int) -> list[int]:
        others = [u for u in self.flapper_uids if u not in (uid, peer)][: self.watch_others]
        pool = [u for u in self.pool_uids if u not in (uid, peer)]
        rng = random.Random(uid)
        more = self.watch_others - len(others)
        if more > 0 and pool:
            others += rng.sample(pool, min(more, len(pool)))
        return [peer, *others]

    def setup(self) -> Deferred[Any]:
        d = super().setup()

        async def flappers_too(_: Any) -> None:
            # The flappers start online (known to the server, their share set).
            conns = [self.flapper(u) for u in self.flappers]
            await self.flap_connector.open_all(conns)

        d.addCallback(lambda r: Deferred.fromCoroutine(flappers_too(r)))
        return d

    def flapper(self, uid: int) -> Flapper:
        conn = Flapper(self, uid, self.flap_tokens[uid])
        conn.node = uid % len(self.endpoints)
        self.flappers[uid] = conn
        return conn

    def begin(self) -> None:
        self.mix.t_start, self.mix.t_end = self.t_start, self.t_end
        for s, r in zip(self.senders, self.recipients, strict=True):
            for conn, peer in ((s, r.uid), (r, s.uid)):
                if self.mix.wants("watch") and conn.open:
                    conn.transport.write(self.mix.frame("watch", uids=self.watched(conn.uid, peer)))
        for uid in self.flappers:
            reactor.callLater(random.uniform(0, self.flap_seconds), self.flap, uid)
        super().begin()

    def flap(self, uid: int) -> None:
        """Go off (or on) line, and come back here in C{flap_seconds}."""
        if self.phase != "sending":
            return
        conn = self.flappers[uid]
        if conn is not None and conn.open:
            conn.close()
            self.flappers[uid] = None
        else:
            self.flap_connector.open_all([self.flapper(uid)])
        self.flaps += 1
        reactor.callLater(self.flap_seconds, self.flap, uid)

    def extra_result(self) -> dict[str, Any]:
        flappers = [c for c in self.flappers.values() if c is not None]
        for c in flappers:
            c.close()
        errors = total_errors(list(flappers), self.flap_connector.errors)
        return {
            "mix": self.mix.result(),
            "flaps": self.flaps,
            "flapper_errors": dict(errors),
            "lat_delivered": stats.histogram(self.lat_delivered),
            "lat_edit": stats.histogram(self.lat_edit),
        }


# -- cost: one push path at a time -----------------------------------------------------


class CostClient(Conn):
    """A client of the cost scenarios: counts replies and pushes (L{Mix}),
    keeps the msg ids it sent (answered) or was pushed."""

    def __init__(self, run: CostBase, uid: int, token: str) -> None:
        super().__init__(uid, token)
        self.run = run
        self.mix = run.mix
        self.sent_ids: list[int] = []
        self.got_ids: list[int] = []
        self.session_id = 0
        self.unanswered = 0
        self.next = 0  # the next of sent_ids / got_ids to use

    def on_authed(self) -> None:
        if self.run.share_all and self.mix.wants("set_profile"):
            self.unanswered += 1
            self.transport.write(self.mix.frame("set_profile", presence="everyone"))

    def on_frames(self, bodies: list[bytes]) -> None:
        now = monotonic_ns()
        mix = self.mix
        for body in bodies:
            f = unpackb(body)
            t = f["t"]
            if t == "ok" or t == "error":
                if f.get("id") == IDS["send"] and t == "ok":
                    self.sent_ids.append(f["msg_id"])
                    self.session_id = f["session_id"]
                mix.reply(f)
                self.unanswered -= 1
            else:
                mix.push(t, now)
                if t == "msg":
                    self.got_ids.append(f["msg_id"])
                    self.session_id = f["session_id"]
        if self.unanswered <= 0:
            self.run.settled(self)


class CostBase(Scenario):
    """Connect, prime (not measured), then the measured phase: C{start} with
    the window's times, events issued at C{rate} per second (this worker's
    share) until its end, then the result."""

    share_all = False

    def __init__(self, worker_: worker.Worker, spec: dict[str, Any]) -> None:
        super().__init__(worker_, spec)
        self.mix = Mix()
        self.rate: float = spec.get("rate", 0.0)
        self.issued = 0
        self.waiting: Deferred[None] | None = None
        self.conns: list[CostClient] = []

    def reset_mix(self) -> None:
        """Forget the counts of the set-up (not measured); keep what is absent."""
        fresh = Mix()
        fresh.absent = self.mix.absent
        self.mix = fresh
        for c in self.conns:
            c.mix = fresh
        if isinstance(self, CostPresence) and self.flapper is not None:
            self.flapper.mix = fresh

    def settled(self, conn: CostClient) -> None:
        if self.waiting is not None and all(c.unanswered <= 0 for c in self.conns):
            d, self.waiting = self.waiting, None
            d.callback(None)

    def answered(self) -> Deferred[None]:
        """Fires once every request sent so far is answered."""
        d: Deferred[None] = Deferred()
        self.waiting = d
        if self.conns:
            self.settled(self.conns[0])
        else:
            d.callback(None)
        return d

    def command(self, cmd: dict[str, Any]) -> None:
        if cmd["cmd"] == "start":
            # Events until t_end; their pushes counted until t_count (a little later).
            self.t_stop = cmd["t_end"]
            self.mix.t_start, self.mix.t_end = cmd["t_start"], cmd.get("t_count", cmd["t_end"])
            self.later_at(cmd["t_start"], self.begin)
        elif cmd["cmd"] == "stop":
            self.finish()

    def begin(self) -> None:
        self.t0 = monotonic_ns()
        self.ticker = LoopingCall(self.tick)
        self.ticker.start(0.005)

    def tick(self) -> None:
        now = monotonic_ns()
        if now >= self.t_stop:
            self.ticker.stop()
            self.worker.emit({"ev": "issued", "issued": self.issued})
            return
        due = int((now - self.t0) / 1e9 * self.rate) - self.issued
        for _ in range(max(0, due)):
            self.issue(self.issued)
            self.issued += 1

    def issue(self, n: int) -> None:
        raise NotImplementedError

    def progress(self) -> dict[str, Any]:
        return {
            "issued": self.issued,
            "pushes": sum(self.mix.pushes_total.values()),
            "errors": sum(self.mix.errors.values()),
        }

    def finish(self) -> None:
        self.worker.finish(
            {
                "issued": self.issued,
                "mix": self.mix.result(),
                "errors": dict(total_errors(list(self.conns), self.connector.errors)),
            }
        )


class CostPairs(CostBase):
    """
    C{path} typing, edit or delivered, over pairs (sender, recipient):

    * typing: one message per pair first (a conversation), then senders send
      C{typing} round-robin at C{rate};
    * edit: C{messages} per pair first (acked), then senders edit them
      round-robin (each once, then again with another body);
    * delivered: C{messages} per pair first, not acked; then recipients ack
      them one id per C{ack} (one C{delivered} push per ack) round-robin.
    """

    def __init__(self, worker_: worker.Worker, spec: dict[str, Any]) -> None:
        super().__init__(worker_, spec)
        self.path: str = spec["path"]
        self.messages: int = 1 if self.path == "typing" else spec["messages"]
        uids: list[int] = spec["uids"]
        tokens = mint_tokens(spec["secret"], uids)
        self.senders = [CostClient(self, uids[i], tokens[i]) for i in range(0, len(uids), 2)]
        self.recipients = [
            CostClient(self, uids[i + 1], tokens[i + 1]) for i in range(0, len(uids), 2)
        ]
        self.conns = [*self.senders, *self.recipients]
        self.place_pairs(self.senders, self.recipients)

    def setup(self) -> Deferred[Any]:
        async def go() -> None:
            for group in (self.recipients, self.senders):
                ok = await self.connector.open_all(list(group))
                if len(ok) != len(group):
                    raise RuntimeError(f"only {len(ok)} of {len(group)} connections authenticated")
            # Prime: the messages, 10 in flight per sender.
            for start in range(0, self.messages, 10):
                for s, r in zip(self.senders, self.recipients, strict=True):
                    out = []
                    for q in range(start, min(start + 10, self.messages)):
                        s.unanswered += 1
                        body = {"q": q, "s": monotonic_ns()}
                        cid = f"p{q:08x}"
                        out.append(self.mix.frame("send", to=r.uid, cid=cid, body=body))
                    s.transport.write(b"".join(out))
                await self.answered()
            await self.pushed()
            if self.path == "edit":
                for r in self.recipients:
                    for i in range(0, len(r.got_ids), 100):
                        r.unanswered += 1
                        r.transport.write(wire.ack_frame(ACK_ID, r.got_ids[i : i + 100]))
                await self.answered()
            self.reset_mix()

        return Deferred.fromCoroutine(go())

    async def pushed(self) -> None:
        """Until every recipient has its messages pushed (at most 30 s)."""
        deadline = monotonic_ns() + int(30e9)
        while monotonic_ns() < deadline:
            if all(len(r.got_ids) >= self.messages for r in self.recipients):
                return
            d: Deferred[None] = Deferred()
            reactor.callLater(0.02, d.callback, None)
            await d

    def issue(self, n: int) -> None:
        k = n % len(self.senders)
        s, r = self.senders[k], self.recipients[k]
        if self.path == "typing":
            if self.mix.wants("typing"):
                s.unanswered += 1
                s.transport.write(self.mix.frame("typing", to=r.uid, active=n % 2 == 0))
        elif self.path == "edit":
            if self.mix.wants("edit") and s.sent_ids:
                i = s.next % len(s.sent_ids)
                s.next += 1
                body = {"q": i, "s": monotonic_ns(), "e": s.next}
                s.unanswered += 1
                s.transport.write(self.mix.frame("edit", msg_id=s.sent_ids[i], body=body))
        elif self.path == "delivered" and r.next < len(r.got_ids):
            r.unanswered += 1
            self.mix.requests["ack"] += 1
            r.transport.write(wire.ack_frame(ACK_ID, [r.got_ids[r.next]]))
            r.next += 1


class CostPresence(CostBase):
    """
    C{path} presence: C{uids} watch one C{user} (its share: everyone); the
    worker with C{flapper} makes that user go offline and online again every
    C{flap_seconds} from the window's start until half a second before its end
    (the last pushes inside the window). Events: the C{presence} pushes the
    watchers get; C{transitions}: the user's changes.
    """

    share_all = True

    def __init__(self, worker_: worker.Worker, spec: dict[str, Any]) -> None:
        super().__init__(worker_, spec)
        self.user: int = spec["user"]
        self.is_flapper: bool = spec.get("flapper", False)
        self.flap_seconds: float = spec.get("flap_seconds", 3.5)
        uids: list[int] = spec["uids"]
        tokens = mint_tokens(spec["secret"], [*uids, self.user])
        self.user_token = tokens[-1]
        self.conns = [CostClient(self, u, t) for u, t in zip(uids, tokens[:-1], strict=True)]
        self.place_round_robin(self.conns)
        self.flapper: CostClient | None = None
        self.transitions = 0

    def setup(self) -> Deferred[Any]:
        async def go() -> None:
            if self.is_flapper:
                self.flapper = CostClient(self, self.user, self.user_token)
                if len(await self.connector.open_all([self.flapper])) != 1:
                    raise RuntimeError("the watched user could not authenticate")
            ok = await self.connector.open_all(list(self.conns))
            if len(ok) != len(self.conns):
                raise RuntimeError(f"only {len(ok)} of {len(self.conns)} watchers authenticated")
            await self.answered()
            for c in self.conns:
                if self.mix.wants("watch"):
                    c.unanswered += 1
                    c.transport.write(self.mix.frame("watch", uids=[self.user]))
            await self.answered()
            self.reset_mix()

        return Deferred.fromCoroutine(go())

    def begin(self) -> None:
        if self.is_flapper:
            self.flap()
        reactor.callLater(max(0.0, (self.t_stop - monotonic_ns()) / 1e9), self.done)

    def flap(self) -> None:
        # The last transition early enough for its pushes to land in the window.
        left = (self.t_stop - monotonic_ns()) / 1e9
        if left < 0.5:
            return
        conn = self.flapper
        if conn is not None and conn.open:
            conn.close()
            self.flapper = None
        else:
            self.flapper = CostClient(self, self.user, self.user_token)
            self.connector.open_all([self.flapper])
        self.transitions += 1
        reactor.callLater(self.flap_seconds, self.flap)

    def done(self) -> None:
        self.worker.emit({"ev": "issued", "issued": self.transitions})

    def finish(self) -> None:
        self.issued = self.transitions
        super().finish()


SCENARIOS: dict[str, type[Scenario]] = {"social": Social}


def cost_scenario(worker_: worker.Worker, spec: dict[str, Any]) -> Scenario:
    if spec["path"] == "presence":
        return CostPresence(worker_, spec)
    return CostPairs(worker_, spec)


def main() -> None:
    worker.SCENARIOS["social"] = Social
    worker.SCENARIOS["cost"] = cost_scenario  # type: ignore[assignment]
    worker.main()


if __name__ == "__main__":
    main()
