"""
Property-based tests of the messaging contract (docs/protocol.md, "Messaging"):
pending until ack, unread = received and not read, read monotonic and capped,
recall, dedupe by cid, history newest first without recalled messages, sync
oldest first, offline_summary, and the pushes that go with them.

A Hypothesis L{RuleBasedStateMachine} drives the real L{ChatService} and
L{Store} (tests/stack.py) on both backends and keeps a plain-Python model of
what the protocol promises; after every step (once background fan-out has
settled) every user's view is compared with the model.

How Hypothesis and the reactor meet: Hypothesis is synchronous, the service is
asynchronous on the reactor. Trial runs the test with the reactor going; the
test runs the whole Hypothesis search in a worker thread and waits for it (a
Deferred). Every rule and invariant hands one coroutine to the reactor thread
with L{blockingCallFromThread} and waits for its answer. So the service runs
on the real reactor, Hypothesis keeps generation *and* shrinking, and a failure
reports the minimal program: both Hypothesis's own listing of the rules it
called and a transcript of the steps in model terms (m1, m2, ... are messages
in the order they were sent; c1, c2, ... their cids).

Environment: IMSERVER_PROPERTY_SCALE multiplies the number of programs (e.g.
10 for a long soak).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, NoReturn, TypeVar

import attrs
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, TestCase

from imserver.config import LimitsConfig
from imserver.errors import ErrorCode, ImError
from tests.stack import Stack, make_stack
from tests.support import reactor

T = TypeVar("T")

UIDS = (1, 2, 3, 4)
LIMITS = LimitsConfig(recall_seconds=3600, send_per_second=1e6, send_burst=10**6)
#: A read position past any message: capped at the session's latest one.
FAR = 2**53 - 1
#: No message or session has this id (real ids are time based and huge).
UNKNOWN_ID = 4242
#: Bound on one service call (a hang fails the step instead of the whole run).
CALL_TIMEOUT = 30.0

log = Logger()

SCALE = float(os.environ.get("IMSERVER_PROPERTY_SCALE", "1"))

users = st.sampled_from(UIDS)
#: An index into a list the rule picks from (taken modulo its length).
picks = st.integers(0, 1000)


def other(uid: int, d: int) -> int:
    """The d-th user after C{uid} (d in 1..3): never C{uid} itself."""
    return UIDS[(UIDS.index(uid) + d) % len(UIDS)]


def pair(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


@attrs.define
class Msg:
    """The model of one stored message."""

    label: str
    sender: int
    to: int
    session_id: int
    msg_id: int
    ts: int
    cid: str
    body: str
    recalled: bool = False
    acked: bool = False
    #: The sender's stream seq (the send reply's).
    seq: int = 0

    def fields(self) -> tuple[Any, ...]:
        """What a msg object of it must say."""
        return (
            self.msg_id,
            self.session_id,
            self.sender,
            self.to,
            self.cid,
            "text",
            self.body,
            self.ts,
        )


def msg_fields(m: dict[str, Any]) -> tuple[Any, ...]:
    return (
        m["msg_id"],
        m["session_id"],
        m["from"],
        m["to"],
        m["cid"],
        m["type"],
        m["body"],
        m["ts"],
    )


class _Scope:
    """What make_stack needs of a test case, with cleanups kept per program."""

    def __init__(self, case: TestCase) -> None:
        self.case = case
        self.cleanups: list[Callable[[], Any]] = []

    def mktemp(self) -> str:
        return self.case.mktemp()

    def addCleanup(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.cleanups.append(lambda: f(*args, **kwargs))

    async def close(self) -> None:
        while self.cleanups:
            result = self.cleanups.pop()()
            if isinstance(result, Deferred | Awaitable):
                await result


class Bridge:
    """Run coroutines on the reactor thread from the Hypothesis thread."""

    def __init__(self) -> None:
        self.aborted = threading.Event()
        # Every failure a program hit, as (steps, report): if Hypothesis cannot replay
        # a failure (it depends on timing), the shortest one is still reported.
        self.failures: list[tuple[int, str]] = []
        self.stats: Counter[str] = Counter()

    def __call__(self, f: Callable[[], Coroutine[Any, Any, T]]) -> T:
        if self.aborted.is_set():
            raise RuntimeError("the test was stopped")

        def start() -> Deferred[T]:
            d: Deferred[T] = ensureDeferred(f())
            return d.addTimeout(CALL_TIMEOUT, reactor)

        result: T = blockingCallFromThread(reactor, start)  # type: ignore[arg-type]
        return result


def describe(e: BaseException, indent: str = "") -> str:
    """An exception's text with its notes and, for a group, its members'."""
    lines = [f"{type(e).__name__}: {e}", *getattr(e, "__notes__", ())]
    if isinstance(e, BaseExceptionGroup):
        for i, sub in enumerate(e.exceptions, 1):
            lines.append(f"--- cause {i} of {len(e.exceptions)} ---")
            lines.append(describe(sub, indent + "    "))
    return "\n".join(indent + line for text in lines for line in str(text).splitlines())


def in_thread(work: Callable[[], None], bridge: Bridge) -> Deferred[None]:
    """Run C{work} in a new thread; fires (on the reactor thread) when it is done."""
    d: Deferred[None] = Deferred(lambda _: bridge.aborted.set())

    def main() -> None:
        try:
            work()
        except BaseException as e:
            flaky = isinstance(e, Flaky)
            if flaky or getattr(e, "__notes__", None) or isinstance(e, BaseExceptionGroup):
                # Hypothesis puts the minimal program in the notes, and a flaky failure's
                # causes in an exception group: trial would show neither.
                text = describe(e)
                if flaky and bridge.failures:
                    steps, report = min(bridge.failures, key=lambda f: f[0])
                    text += (
                        f"\n\nHypothesis could not replay the failure (it depends on timing)."
                        f" {len(bridge.failures)} programs failed; the shortest one"
                        f" ({steps} steps):\n{report}"
                    )
                kind = FailTest if isinstance(e, AssertionError) or flaky else RuntimeError
                e = kind(text).with_traceback(e.__traceback__)
            failure = Failure(e)
            reactor.callFromThread(lambda: None if d.called else d.errback(failure))
        else:
            reactor.callFromThread(lambda: None if d.called else d.callback(None))

    threading.Thread(target=main, name="hypothesis", daemon=True).start()
    return d


class MessagingMachine(RuleBasedStateMachine):
    """Users 1..4, all logged in and connected; every rule acts on the real service."""

    # Set by the test before the run (one backend per run).
    case: TestCase
    backend: str
    bridge: Bridge

    def __init__(self) -> None:
        super().__init__()
        self.scope = _Scope(self.case)
        self.stack: Stack = self.bridge(self._start)
        self.msgs: list[Msg] = []  # in msg_id order
        self.by_id: dict[int, Msg] = {}
        self.by_cid: dict[tuple[int, str], Msg] = {}
        self.sessions: dict[tuple[int, int], int] = {}
        self.read_pos: dict[tuple[int, int], int] = {}
        self.cids = itertools.count(1)
        self.transcript: list[str] = []
        self.kinds: list[tuple[str, str]] = []
        # Pushes the current step must cause: uid -> frames (see _push_view).
        self.expected_pushes: dict[int, list[tuple[Any, ...]]] = {}
        # After a concurrent step: any order, and no counts in msg pushes.
        self.loose_pushes = False
        # Delivery receipts of the current step, (session, msg_id, by) per sender:
        # those that must come (each session's highest acked message), and those
        # that may (any message acked in the step; which ack call removed a
        # message two calls named is the batches' order).
        self.delivered_must: dict[int, set[tuple[int, int, int]]] = {}
        self.delivered_may: dict[int, set[tuple[int, int, int]]] = {}
        self.steps = 0

    async def _start(self) -> Stack:
        stack = await make_stack(self.scope, self.backend, limits=LIMITS)  # type: ignore[arg-type]
        for uid in UIDS:
            await stack.chat.login(uid)
        stack.presence.online_users.update(UIDS)
        return stack

    def run(self, f: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a step on the reactor; an unexpected error fails with the program."""
        try:
            return self.bridge(f)
        except FailTest:
            raise
        except Exception as e:
            self.stop(f"unexpected error: {e!r}")

    def teardown(self) -> None:
        self.bridge.stats.update(kind for kind, _ in self.kinds)
        self.bridge.stats["programs"] += 1
        self.bridge.stats["steps"] += self.steps
        self.bridge.stats["messages"] += len(self.msgs)
        self.run(self.scope.close)

    # -- the model ---------------------------------------------------------------

    def label(self, msg_id: int) -> str:
        m = self.by_id.get(msg_id)
        return m.label if m is not None else str(msg_id)

    def labels(self, ids: Iterable[int]) -> str:
        return "[" + ", ".join(self.label(i) for i in ids) + "]"

    def session_name(self, sid: int) -> str:
        for (a, b), s in self.sessions.items():
            if s == sid:
                return f"s{a}-{b}"
        return f"session {sid}"

    def in_session(self, sid: int) -> list[Msg]:
        return [m for m in self.msgs if m.session_id == sid]

    def last_id(self, sid: int) -> int:
        """The session's latest message, recalled or not (the cap of a read)."""
        return max(m.msg_id for m in self.in_session(sid))

    def sessions_of(self, uid: int) -> list[tuple[int, int]]:
        """(session id, peer) of the user's conversations, most recent first."""
        found = [
            (sid, b if a == uid else a) for (a, b), sid in self.sessions.items() if uid in (a, b)
        ]
        return sorted(found, key=lambda s: self.last_id(s[0]), reverse=True)

    def unread_in(self, uid: int, sid: int) -> int:
        pos = self.read_pos.get((uid, sid), 0)
        return sum(
            1 for m in self.in_session(sid) if m.to == uid and not m.recalled and m.msg_id > pos
        )

    def total_unread(self, uid: int) -> int:
        return sum(self.unread_in(uid, sid) for sid, _ in self.sessions_of(uid))

    def pending(self, uid: int) -> list[Msg]:
        return [m for m in self.msgs if m.to == uid and not m.acked and not m.recalled]

    def history(self, sid: int) -> list[Msg]:
        return [m for m in reversed(self.in_session(sid)) if not m.recalled]

    def note(self, line: str) -> None:
        self.steps += 1
        self.kinds.append((line.split()[0], line))
        self.transcript.append(f"{self.steps:3d}. {line}")

    def push(self, uid: int, frame: tuple[Any, ...]) -> None:
        self.expected_pushes.setdefault(uid, []).append(frame)

    def delivered(self, uid: int, acked: Sequence[Msg], must: bool = True) -> None:
        """C{uid} acked these pending messages in this step: their senders are told."""
        best: dict[tuple[int, int], Msg] = {}
        for m in acked:
            self.delivered_may.setdefault(m.sender, set()).add((m.session_id, m.msg_id, uid))
            key = (m.sender, m.session_id)
            if key not in best or m.msg_id > best[key].msg_id:
                best[key] = m
        if must:
            for (sender, sid), m in best.items():
                self.delivered_must.setdefault(sender, set()).add((sid, m.msg_id, uid))

    def fail(self, what: str, observed: Any, expected: Any) -> NoReturn:
        self.stop(f"{what}\n  observed: {observed}\n  expected: {expected}")

    def stop(self, text: str) -> NoReturn:
        report = (
            f"[{self.backend}] {text}\n"
            "program (m<n>: n-th message sent, s<a>-<b>: session of users a and b):\n"
            + "\n".join(self.transcript or ["  (no steps)"])
        )
        self.bridge.failures.append((self.steps, report))
        raise FailTest(report)

    def check(self, what: str, observed: Any, expected: Any) -> None:
        if observed != expected:
            self.fail(what, observed, expected)

    async def refused(self, code: ErrorCode, what: str, call: Awaitable[Any]) -> None:
        try:
            result = await call
        except ImError as e:
            self.check(f"{what}: error code", e.code, code)
        else:
            self.fail(f"{what}: should be refused", result, code)

    # -- rules -------------------------------------------------------------------

    @rule(a=users, d=st.integers(1, 3))
    def send(self, a: int, d: int) -> None:
        self.run(lambda: self._sends([(a, other(a, d), None)]))

    @rule(
        sends=st.lists(st.tuples(users, st.integers(1, 3), st.booleans()), min_size=2, max_size=5)
    )
    def burst(self, sends: list[tuple[int, int, bool]]) -> None:
        """Several sends in flight at once (one group commit); a True flag
        reuses the cid of the sender's previous send in the burst (a client
        retrying before the first reply): exactly one of them is stored."""
        batch: list[tuple[int, int, int | None]] = []
        for i, (a, d, repeat) in enumerate(sends):
            earlier = [j for j in range(i) if batch[j][0] == a and batch[j][2] is None]
            batch.append((a, other(a, d), earlier[-1] if repeat and earlier else None))
        self.run(lambda: self._sends(batch))

    async def _sends(self, batch: list[tuple[int, int, int | None]]) -> None:
        """Send concurrently; batch entries are (from, to, index of the send whose cid
        this one repeats or None)."""
        cids = [f"c{next(self.cids)}" if rep is None else "" for _, _, rep in batch]
        for i, (_, _, rep) in enumerate(batch):
            if rep is not None:
                cids[i] = cids[rep]
        chat = self.stack.chat
        replies = await gatherResults(
            [
                ensureDeferred(chat.send(a, b, cid, "text", f"body of {cid}"))
                for (a, b, _), cid in zip(batch, cids, strict=True)
            ],
            consumeErrors=True,
        )
        parts = []
        for i, ((a, b, rep), cid, reply) in enumerate(zip(batch, cids, replies, strict=True)):
            if rep is not None:
                original = self.by_cid[a, cid]
                parts.append(f"{a}->{b} {cid} again")
                self.check(
                    f"send #{i + 1} of the step repeats {cid}: reply",
                    reply,
                    {
                        "msg_id": original.msg_id,
                        "session_id": original.session_id,
                        "ts": original.ts,
                        "dup": True,
                        "seq": original.seq,
                    },
                )
                continue
            m = self._sent(a, b, cid, reply)
            parts.append(f"{a}->{b} {cid} = {m.label}")
            # Both counts include this message (and what came before it, not after).
            self.push(b, ("msg", m.fields(), self.unread_in(b, m.session_id), self.total_unread(b)))
        self.note(("send " if len(batch) == 1 else "burst ") + "; ".join(parts))

    def _sent(self, a: int, b: int, cid: str, reply: dict[str, Any]) -> Msg:
        """Check the reply to a send with a new cid and add the message to the model."""
        newest = self.msgs[-1].msg_id if self.msgs else 0
        if reply["dup"]:
            self.fail(f"send {a}->{b} {cid} (a new cid): dup", reply, "dup false")
        if reply["msg_id"] <= newest:
            self.fail(
                f"send {a}->{b} {cid}: msg_id not increasing in the order sent",
                reply["msg_id"],
                f"> {newest}",
            )
        key = pair(a, b)
        sid = reply["session_id"]
        if key in self.sessions:
            self.check(f"send {a}->{b} {cid}: session_id", sid, self.sessions[key])
        elif sid in self.sessions.values():
            self.fail(
                f"send {a}->{b} {cid}: session_id of another pair",
                self.session_name(sid),
                f"a new session for {key}",
            )
        self.sessions[key] = sid
        m = Msg(
            f"m{len(self.msgs) + 1}", a, b, sid, reply["msg_id"], reply["ts"], cid, f"body of {cid}"
        )
        m.seq = reply.get("seq", 0)
        self.msgs.append(m)
        self.by_id[m.msg_id] = m
        self.by_cid[a, cid] = m
        return m

    @precondition(lambda self: self.msgs)
    @rule(
        ops=st.lists(
            st.tuples(st.sampled_from(["send", "read", "recall", "ack"]), picks, st.integers(1, 3)),
            min_size=2,
            max_size=6,
        )
    )
    def mix(self, ops: list[tuple[str, int, int]]) -> None:
        """Sends, reads, recalls and acks all in flight at once. Only the end state
        is order-independent, so replies are not compared with the model here (but
        must not be errors), the counts in msg pushes are not checked, and at most
        one read per user and session is included."""
        msgs = list(self.msgs)
        plan: list[tuple[Any, ...]] = []
        reading: set[tuple[int, int]] = set()
        for kind, pick, d in ops:
            m = msgs[pick % len(msgs)]
            if kind == "send":
                a = UIDS[pick % len(UIDS)]
                plan.append(("send", a, other(a, d), f"c{next(self.cids)}"))
            elif kind == "read":
                uid = m.sender if d == 3 else m.to
                if (uid, m.session_id) not in reading:
                    reading.add((uid, m.session_id))
                    plan.append(("read", uid, m))
            elif kind == "recall":
                plan.append(("recall", m.sender, m))
            else:
                pending = [x for x in msgs if not x.acked and not x.recalled]
                if pending:
                    x = pending[pick % len(pending)]
                    plan.append(("ack", x.to, x))
        chat = self.stack.chat

        def start(step: tuple[Any, ...]) -> Coroutine[Any, Any, Any]:
            if step[0] == "send":
                _, a, b, cid = step
                return chat.send(a, b, cid, "text", f"body of {cid}")
            if step[0] == "read":
                return chat.read(step[1], step[2].session_id, step[2].msg_id)
            if step[0] == "recall":
                return chat.recall(step[1], step[2].msg_id)
            return chat.ack(step[1], [step[2].msg_id])

        async def go() -> None:
            # Each call runs up to its first wait at once: ids are assigned in this order.
            replies: list[Any] = await gatherResults(
                [ensureDeferred(start(step)) for step in plan], consumeErrors=True
            )
            parts = []
            for step, reply in zip(plan, replies, strict=True):
                if step[0] == "send":
                    _, a, b, cid = step
                    m = self._sent(a, b, cid, reply)
                    parts.append(f"send {a}->{b} {cid} = {m.label}")
                    self.push(b, ("msg", m.fields(), None, None))
                elif step[0] == "read":
                    _, uid, m = step
                    old = self.read_pos.get((uid, m.session_id), 0)
                    parts.append(f"read {uid} {self.session_name(m.session_id)} up to {m.label}")
                    if m.msg_id > old:
                        self.read_pos[uid, m.session_id] = m.msg_id
                        peer = m.to if m.sender == uid else m.sender
                        self.push(peer, ("read", m.session_id, uid, m.msg_id))
                elif step[0] == "recall":
                    _, uid, m = step
                    parts.append(f"recall {m.label} by {uid}")
                    # Again too if recalled already (docs/protocol.md, "Recall").
                    self.push(m.to, ("recall", m.msg_id, m.session_id, m.sender))
                    m.recalled = True
                else:
                    _, uid, m = step
                    parts.append(f"ack {uid} [{m.label}]")
                    m.acked = True
                    # Unless a recall in this mix removed it first.
                    racing = any(x[0] == "recall" and x[2] is m for x in plan)
                    self.delivered(uid, [m], must=not racing)
            self.loose_pushes = True
            self.note("mix (concurrent): " + "; ".join(parts))

        self.run(go)

    @precondition(lambda self: self.msgs)
    @rule(pick=picks, d=st.integers(0, 3))
    def send_again(self, pick: int, d: int) -> None:
        """A retry with a used cid (to the same recipient if d == 0, else to anyone):
        the original ids with dup=true, and nothing new."""
        m = self.msgs[pick % len(self.msgs)]
        to = m.to if d == 0 else other(m.sender, d)

        async def go() -> None:
            reply = await self.stack.chat.send(m.sender, to, m.cid, "text", "again")
            self.note(f"send {m.sender}->{to} {m.cid} again (cid of {m.label})")
            self.check(
                f"repeat of {m.label}'s cid: reply",
                reply,
                {
                    "msg_id": m.msg_id,
                    "session_id": m.session_id,
                    "ts": m.ts,
                    "dup": True,
                    "seq": m.seq,
                },
            )

        self.run(go)

    @rule(
        acks=st.lists(
            st.tuples(
                picks,
                st.lists(picks, max_size=4),
                st.lists(st.sampled_from(["unknown", "own", "others", "done"]), max_size=3),
            ),
            min_size=1,
            max_size=3,
        )
    )
    def ack(self, acks: list[tuple[int, list[int], list[str]]]) -> None:
        """Users with pending messages (if any) ack some of them, mixed with ids that
        must be ignored (unknown, sent by the user, someone else's, already acked or
        recalled). Several acks are in flight at once (one batch)."""
        requests: list[tuple[int, list[int], list[Msg]]] = []
        for who, chosen, noise in acks:
            waiting = [u for u in UIDS if self.pending(u)] or list(UIDS)
            uid = waiting[who % len(waiting)]
            pending = self.pending(uid)
            take = [pending[i % len(pending)] for i in chosen] if pending else []
            ids = [m.msg_id for m in take]
            pools = {
                "own": [m for m in self.msgs if m.sender == uid],
                "others": [m for m in self.msgs if m.to != uid],
                "done": [m for m in self.msgs if m.to == uid and (m.acked or m.recalled)],
            }
            for n, kind in enumerate(noise):
                pool = pools.get(kind)
                if kind == "unknown":
                    ids.append(UNKNOWN_ID)
                elif pool:
                    ids.append(pool[(n * 7 + len(ids)) % len(pool)].msg_id)
            requests.append((uid, ids or [UNKNOWN_ID], take))

        async def go() -> None:
            replies = await gatherResults(
                [ensureDeferred(self.stack.chat.ack(uid, ids)) for uid, ids, _ in requests],
                consumeErrors=True,
            )
            for _, _, take in requests:
                for m in take:
                    m.acked = True
            for uid in {uid for uid, _, _ in requests}:
                self.delivered(uid, [m for u, _, take in requests if u == uid for m in take])
            self.note("; ".join(f"ack {uid} {self.labels(ids)}" for uid, ids, _ in requests))
            self.check("ack replies", replies, [{}] * len(requests))

        self.run(go)

    @precondition(lambda self: self.msgs)
    @rule(
        pick=picks,
        role=st.sampled_from(["recipient", "sender"]),
        mode=st.sampled_from(["message", "older", "everything"]),
    )
    def read(self, pick: int, role: str, mode: str) -> None:
        """A member of a message's session reads up to: that message, one older
        than the current read position (reading is monotonic), or past them all
        (capped at the session's latest message)."""
        m = self.msgs[pick % len(self.msgs)]
        uid, peer = (m.to, m.sender) if role == "recipient" else (m.sender, m.to)
        sid = m.session_id
        upto = m
        if mode == "older":
            pos = self.read_pos.get((uid, sid), 0)
            older = [x for x in self.in_session(sid) if x.msg_id < pos]
            if older:
                upto = older[pick % len(older)]
        far = mode == "everything"
        target = FAR if far else upto.msg_id

        async def go() -> None:
            reply = await self.stack.chat.read(uid, sid, target)
            old = self.read_pos.get((uid, sid), 0)
            new = max(old, min(target, self.last_id(sid)))
            self.read_pos[uid, sid] = new
            self.note(
                f"read {uid} {self.session_name(sid)} up to "
                + ("everything" if far else upto.label)
                + f" (position {self.label(old) if old else 'none'} -> {self.label(new)})"
            )
            if new != old:
                self.push(peer, ("read", sid, uid, new))
            # A read that moves is an event of the reader's stream: its seq.
            self.check(f"read by {uid}: seq in the reply", "seq" in reply, new != old)
            reply.pop("seq", None)
            self.check(
                f"read by {uid} of {self.session_name(sid)}: reply",
                reply,
                {"unread": self.unread_in(uid, sid), "total_unread": self.total_unread(uid)},
            )

        self.run(go)

    @precondition(lambda self: self.msgs)
    @rule(pick=picks, who=st.sampled_from(["sender", "recipient", "stranger"]))
    def recall(self, pick: int, who: str) -> None:
        m = self.msgs[pick % len(self.msgs)]
        if who == "sender":
            uid = m.sender
        elif who == "recipient":
            uid = m.to
        else:
            uid = next(u for u in UIDS if u not in (m.sender, m.to))

        async def go() -> None:
            self.note(f"recall {m.label} by {uid} ({who})" + (" again" if m.recalled else ""))
            if who != "sender":
                await self.refused(
                    ErrorCode.FORBIDDEN,
                    f"recall of {m.label} by {who} {uid}",
                    self.stack.chat.recall(uid, m.msg_id),
                )
                return
            again = m.recalled
            reply = await self.stack.chat.recall(uid, m.msg_id)
            self.push(m.to, ("recall", m.msg_id, m.session_id, m.sender))
            m.recalled = True
            # A first recall is an event of the sender's stream (its seq); a repeat is not.
            self.check(f"recall of {m.label}: reply", sorted(reply), [] if again else ["seq"])

        self.run(go)

    @rule(
        uid=users,
        kind=st.sampled_from(
            ["read_foreign", "read_unknown", "history_foreign", "history_unknown", "recall_unknown"]
        ),
    )
    def refusal(self, uid: int, kind: str) -> None:
        """Requests that must fail (and change nothing)."""
        foreign = [sid for key, sid in self.sessions.items() if uid not in key]
        chat = self.stack.chat

        async def go() -> None:
            if kind.endswith("_foreign"):
                if not foreign:
                    return
                sid, code = foreign[0], ErrorCode.FORBIDDEN
            else:
                sid, code = UNKNOWN_ID, ErrorCode.NOT_FOUND
            self.note(
                f"{kind} by {uid}"
                + (f" ({self.session_name(sid)})" if kind.endswith("_foreign") else "")
            )
            what = f"{kind.replace('_', ' of ')} session by {uid}"
            if kind.startswith("read"):
                await self.refused(code, what, chat.read(uid, sid, FAR))
            elif kind.startswith("history"):
                await self.refused(code, what, chat.history(uid, None, sid, None, 10))
            else:
                await self.refused(
                    ErrorCode.NOT_FOUND,
                    f"recall of an unknown id by {uid}",
                    chat.recall(uid, UNKNOWN_ID),
                )

        self.run(go)

    @rule()
    def flush_hot(self) -> None:
        """Lose the whole hot copy: it must be rebuilt from SQL, invisibly."""

        async def go() -> None:
            await self.stack.settle()
            await self.stack.flush_hot()
            self.note("flush the hot store")

        self.run(go)

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def views_match_the_model(self) -> None:
        self.run(self._check_all)

    async def _check_all(self) -> None:
        await self.stack.settle()
        self._check_pushes()
        for uid in UIDS:
            await self._check_user(uid)
        for a, b in itertools.combinations(UIDS, 2):
            await self._check_history(a, b)
        # Paging checks rotate over the users (a full sweep every 4 steps).
        uid = UIDS[self.steps % len(UIDS)]
        await self._check_sync_pages(uid)

    def _check_pushes(self) -> None:
        for uid in UIDS:
            # One device per user here: what a user's other devices are told of
            # its own sends, reads and recalls is tests/test_devices_properties.py's.
            frames = self.stack.presence.take(uid)
            receipts = {
                (f["session_id"], f["msg_id"], f["by"]) for f in frames if f["t"] == "delivered"
            }
            may = self.delivered_may.get(uid, set())
            self.check(f"delivered pushes to {uid}: unexpected", sorted(receipts - may), [])
            must = self.delivered_must.get(uid, set())
            self.check(f"delivered pushes to {uid}: missing", sorted(must - receipts), [])
            got = [
                self._push_view(f)
                for f in frames
                if f["t"] != "delivered"
                and (f.get("from", f.get("by")) != uid or f["t"] not in ("msg", "read", "recall"))
            ]
            expected = self.expected_pushes.get(uid, [])
            if self.loose_pushes:
                got = sorted(((*f[:2], None, None) if f[0] == "msg" else f for f in got), key=repr)
                expected = sorted(expected, key=repr)
            self.check(f"pushes to {uid} in the last step", self._show(got), self._show(expected))
        self.expected_pushes.clear()
        self.delivered_must.clear()
        self.delivered_may.clear()
        self.loose_pushes = False

    def _push_view(self, f: dict[str, Any]) -> tuple[Any, ...]:
        if f["t"] == "msg":
            return ("msg", msg_fields(f), f["unread"], f["total_unread"])
        if f["t"] == "read":
            return ("read", f["session_id"], f["by"], f["msg_id"])
        if f["t"] == "recall":
            return ("recall", f["msg_id"], f["session_id"], f["by"])
        return (f["t"], f)

    def _show(self, frames: list[tuple[Any, ...]]) -> list[str]:
        out = []
        for f in frames:
            if f[0] == "msg":
                fields = f[1]
                m = self.by_id.get(fields[0])
                text = f"msg {self.label(fields[0])} {fields[2]}->{fields[3]}"
                if m is None or m.fields() != fields:
                    text += f" {fields}"
                if f[2] is not None:
                    text += f" unread={f[2]} total_unread={f[3]}"
                out.append(text)
            elif f[0] == "read":
                out.append(f"read {self.session_name(f[1])} by {f[2]} to {self.label(f[3])}")
            elif f[0] == "recall":
                out.append(f"recall {self.label(f[1])} {self.session_name(f[2])} by {f[3]}")
            else:
                out.append(repr(f))
        return out

    async def _check_user(self, uid: int) -> None:
        chat = self.stack.chat
        convs = self.sessions_of(uid)

        # unread: received, not recalled, past the read position; never one's own.
        unread = await chat.unread(uid)
        expected_sessions = [
            {"session_id": sid, "count": self.unread_in(uid, sid)}
            for sid, _ in convs
            if self.unread_in(uid, sid) > 0
        ]
        self.check(
            f"unread of {uid} (total, sessions)",
            (
                unread["total"],
                [(self.session_name(s["session_id"]), s["count"]) for s in unread["sessions"]],
            ),
            (
                sum(s["count"] for s in expected_sessions),
                [(self.session_name(s["session_id"]), s["count"]) for s in expected_sessions],
            ),
        )

        # sync: exactly the pending messages (not acked, not recalled), oldest first.
        pending = self.pending(uid)
        sync = await chat.sync(uid, 500, 0, None)
        self.check(
            f"sync of {uid}: msg ids",
            self.labels(m["msg_id"] for m in sync["msgs"]),
            self.labels(m.msg_id for m in pending),
        )
        self.check(
            f"sync of {uid}: msgs",
            [msg_fields(m) for m in sync["msgs"]],
            [m.fields() for m in pending],
        )
        self.check(f"sync of {uid}: more", sync["more"], False)

        # offline_summary: pending per sender, the most recent sender first.
        per_sender: dict[int, list[Msg]] = {}
        for m in pending:
            per_sender.setdefault(m.sender, []).append(m)
        summary = await chat.offline_summary(uid)
        self.check(
            f"offline_summary of {uid}",
            [(s["uid"], s["count"], self.label(s["last_msg_id"])) for s in summary["senders"]],
            [
                (s, len(ms), ms[-1].label)
                for s, ms in sorted(per_sender.items(), key=lambda e: -e[1][-1].msg_id)
            ],
        )

        # convs: most recent first, with the unread count and the latest normal message.
        page = await chat.convs(uid, 100, None)
        observed = [
            (
                self.session_name(c["session_id"]),
                c["peer"]["uid"],
                self.label(c["last_msg_id"]),
                None if c["last"] is None else self.label(c["last"]["msg_id"]),
                c["unread"],
            )
            for c in page["convs"]
        ]
        expected = []
        for sid, peer in convs:
            normal = self.history(sid)
            expected.append(
                (
                    self.session_name(sid),
                    peer,
                    self.label(self.last_id(sid)),
                    normal[0].label if normal else None,
                    self.unread_in(uid, sid),
                )
            )
        self.check(f"convs of {uid} (session, peer, last_msg_id, last, unread)", observed, expected)
        self.check(f"convs of {uid}: more", page["more"], False)

    async def _check_history(self, a: int, b: int) -> None:
        """Both members see the same history; pages of 2 neither repeat nor skip."""
        chat = self.stack.chat
        sid = self.sessions.get((a, b))
        if sid is None:
            got = await chat.history(a, b, None, None, 100)
            self.check(
                f"history of {a} with {b} (never talked)",
                got,
                {"msgs": [], "more": False, "peer_read": 0, "peer_delivered": 0},
            )
            return
        expected = self.history(sid)
        name = self.session_name(sid)
        for viewer, args in ((a, (None, sid)), (b, (a, None))):
            via = "session_id" if args[1] else "peer"
            got = await chat.history(viewer, args[0], args[1], None, 100)
            self.check(
                f"history of {name} seen by {viewer} (by {via})",
                self.labels(m["msg_id"] for m in got["msgs"]),
                self.labels(m.msg_id for m in expected),
            )
            self.check(
                f"history of {name} seen by {viewer}: msgs",
                [msg_fields(m) for m in got["msgs"]],
                [m.fields() for m in expected],
            )
            self.check(f"history of {name}: more", got["more"], False)
        # Pages of 2, from the member this step's rotation picks.
        viewer = (a, b)[self.steps % 2]
        pages: list[tuple[str, bool]] = []
        before = None
        while len(pages) < 100:
            page = await chat.history(viewer, None, sid, before, 2)
            ids = [m["msg_id"] for m in page["msgs"]]
            pages.append((self.labels(ids), page["more"]))
            if not page["more"] or not ids:
                break
            before = ids[-1]
        self.check(
            f"history of {name} in pages of 2 seen by {viewer} (page, more)",
            pages,
            self.pages([m.msg_id for m in expected]),
        )

    def pages(self, ids: list[int]) -> list[tuple[str, bool]]:
        """Pages of 2 as (labels, more)."""
        chunks = [ids[i : i + 2] for i in range(0, len(ids), 2)] or [[]]
        return [(self.labels(c), i < len(chunks) - 1) for i, c in enumerate(chunks)]

    async def _check_sync_pages(self, uid: int) -> None:
        """sync in pages of 2 (after = last id of the page) and per sender."""
        chat = self.stack.chat
        pending = self.pending(uid)
        pages: list[tuple[str, bool]] = []
        after = 0
        while len(pages) < 100:
            page = await chat.sync(uid, 2, after, None)
            ids = [m["msg_id"] for m in page["msgs"]]
            pages.append((self.labels(ids), page["more"]))
            if not page["more"] or not ids:
                break
            after = ids[-1]
        self.check(
            f"sync of {uid} in pages of 2 (page, more)",
            pages,
            self.pages([m.msg_id for m in pending]),
        )
        for sender in UIDS:
            if sender == uid:
                continue
            got = await chat.sync(uid, 500, 0, sender)
            self.check(
                f"sync of {uid} from {sender}",
                self.labels(m["msg_id"] for m in got["msgs"]),
                self.labels(m.msg_id for m in pending if m.sender == sender),
            )


class MessagingPropertiesMixin:
    backend = ""
    programs = 0
    steps = 30
    #: Far more than a passing run takes (~20 s each); shrinking a failure takes longer.
    timeout = 900

    async def test_messaging_invariants(self) -> None:
        assert isinstance(self, TestCase)
        bridge = Bridge()
        machine = type(
            "MessagingMachine",
            (MessagingMachine,),
            {"case": self, "backend": self.backend, "bridge": bridge},
        )
        await run_search(machine, bridge, self.backend, self.programs, self.steps, self.timeout)


async def run_search(
    machine: type[Any], bridge: Bridge, backend: str, programs: int, steps: int, timeout: float
) -> None:
    """
    Run a state machine's search in its thread (see L{in_thread}), stopping
    it (the thread's next call fails) before trial gives up on the test.
    """
    config = settings(
        max_examples=max(1, round(programs * SCALE)),
        stateful_step_count=steps,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    )
    done = in_thread(lambda: run_state_machine_as_test(machine, settings=config), bridge)
    try:
        await done.addTimeout(timeout - 20, reactor)
    except defer.TimeoutError:
        raise FailTest(
            f"the search did not finish in {timeout - 20}s (a call hung, or shrinking"
            f" took too long); so far: {dict(bridge.stats)}; failures seen: "
            + ("\n\n".join(r for _, r in bridge.failures[:1]) or "none")
        )
    log.info("{backend}: {stats}", backend=backend, stats=dict(sorted(bridge.stats.items())))


class EmbeddedProperties(MessagingPropertiesMixin, TestCase):
    backend = "embedded"
    programs = 60


class RedisProperties(MessagingPropertiesMixin, TestCase):
    backend = "redis"
    programs = 15
