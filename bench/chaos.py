"""
``python -m bench chaos``: the chaos soak (see bench/README.md and the
"Chaos soak" section of docs/reliability.md).

Mixed load from L{bench.chaosload} workers on real MariaDB + Redis (the
tool's own throwaway processes, as C{--stack mysql-redis}) while this parent
injects faults on a schedule. When the load stops, every unanswered send is
retried (same cid) until answered, the clients read their final state through
the protocol, and L{judge} compares all of it with SQL. Any violation makes
the exit status 1.

The parent is plain blocking Python like L{bench.runner}: faults that
restart a process block it for a few seconds while the workers go on.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import signal
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import msgpack

from bench import procstat, runner, stats
from bench.runner import BenchError, Progress, Uids, WorkerPool, log
from bench.stacks import Target, start_imserver

#: Faults a 60-second CI run injects: deterministic enough to pass every time.
CI_FAULTS = (
    "malformed",
    "node_kill",
    "flushall",
    "redis_stop",
    "mariadb_kill",
    "sql_kill",
    "slow_consumer",
)
#: Every fault, in schedule order (C{--netem} adds the network ones).
ALL_FAULTS = (*CI_FAULTS, "redis_restart", "storm")
NETEM_FAULTS = ("netem_delay", "netem_loss")
KNOWN_FAULTS = ALL_FAULTS + NETEM_FAULTS

#: Latencies of sends first sent this long after a fault ended still count as "during".
RECOVERY_NS = 2 * 10**9
#: A recipient connected from before a send until this long after its ok must get it pushed.
PUSH_GRACE_NS = 15 * 10**9
#: Examples kept per kind of violation.
EXAMPLES = 8


@attrs.define
class Fault:
    kind: str
    start_ns: int
    end_ns: int = 0
    detail: dict[str, Any] = attrs.Factory(dict)


@attrs.define
class Violations:
    """Violations by kind: a count and a few examples each."""

    counts: Counter[str] = attrs.Factory(Counter)
    examples: dict[str, list[str]] = attrs.Factory(lambda: defaultdict(list))

    def add(self, kind: str, detail: str, n: int = 1) -> None:
        self.counts[kind] += n
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(detail)

    def as_dict(self) -> dict[str, Any]:
        return {
            k: {"count": n, "examples": self.examples[k]} for k, n in sorted(self.counts.items())
        }


# -- SQL ------------------------------------------------------------------------------


@attrs.frozen
class Row:
    id: int
    session: int
    sender: int
    recipient: int
    cid: str
    status: int
    q: int | None  # the body's seq


@attrs.frozen
class Conv:
    peer: int
    total: int
    read_count: int
    read_up_to: int
    last_msg_id: int


@attrs.define
class Sql:
    """What MariaDB holds for the run's users."""

    rows: list[Row] = attrs.Factory(list)
    pending: dict[int, set[int]] = attrs.Factory(lambda: defaultdict(set))
    conv: dict[tuple[int, int], Conv] = attrs.Factory(dict)


def body_q(hex_body: str) -> int | None:
    try:
        body = msgpack.unpackb(bytes.fromhex(hex_body), raw=False)
        return int(body["q"])
    except Exception:
        return None


def read_sql(mariadb: Any, database: str, lo: int, hi: int) -> Sql:
    """The run's messages, pending rows and conversations (uids in [lo, hi])."""
    out = Sql()
    text = mariadb.sql(
        "SELECT id, sessionId, senderUid, recipientUid, cid, recordStatus, HEX(body) "
        f"FROM t_msg_record_list WHERE senderUid BETWEEN {lo} AND {hi}",
        database,
    )
    for line in text.splitlines():
        i, sid, s, r, cid, status, body = line.split("\t")
        out.rows.append(Row(int(i), int(sid), int(s), int(r), cid, int(status), body_q(body)))
    text = mariadb.sql(
        f"SELECT uid, msgId FROM t_pending WHERE uid BETWEEN {lo} AND {hi}", database
    )
    for line in text.splitlines():
        uid, mid = line.split("\t")
        out.pending[int(uid)].add(int(mid))
    text = mariadb.sql(
        "SELECT uid, sessionId, peerUid, totalCount, readCount, readUpTo, lastMsgId "
        f"FROM t_conv WHERE uid BETWEEN {lo} AND {hi}",
        database,
    )
    for line in text.splitlines():
        uid, sid, peer, total, rc, upto, last = (int(x) for x in line.split("\t"))
        out.conv[(uid, sid)] = Conv(peer, total, rc, upto, last)
    return out


# -- judging --------------------------------------------------------------------------


def cid_seq(cid: str) -> int | None:
    """The seq of a cid the workers send (8 hex digits), else None."""
    if len(cid) != 8:
        return None
    try:
        return int(cid, 16)
    except ValueError:
        return None


def _epoch_covering(epochs: Sequence[Sequence[int]], start: int, until: int) -> list[int] | None:
    """The connection that was up from before C{start} to after C{until} (or to the end)."""
    for e in epochs:
        if e[0] < start and (e[1] == 0 or e[1] > until):
            return list(e)
    return None


def _history_diff(got: Sequence[int], want: Sequence[int]) -> str | None:
    if list(got) == list(want):
        return None
    g, w = set(got), set(want)
    return f"{len(got)} ids, SQL has {len(want)}: {len(w - g)} missing, {len(g - w)} extra" + (
        ", order differs" if g == w else ""
    )


def judge(
    senders: Sequence[Mapping[str, Any]],
    recipients: Sequence[Mapping[str, Any]],
    sql: Sql,
) -> tuple[dict[str, Any], Violations, dict[str, list[int]]]:
    """
    Compare what the clients were told and saw with what SQL holds. Sender i
    sends to recipient i. Returns figures, violations, and the ok times of
    the messages of some violations (to tell which fault they followed).
    """
    v = Violations()
    when: dict[str, list[int]] = defaultdict(list)
    figures: Counter[str] = Counter()
    by_sender: dict[int, list[Row]] = defaultdict(list)
    for row in sql.rows:
        by_sender[row.sender].append(row)
    for s, r in zip(senders, recipients, strict=True):
        uid = s["uid"]
        rows = by_sender.get(uid, [])
        by_cid = {row.cid: row for row in rows}
        msg_id, first_ns, ok_ns = s["msg_id"], s["first_ns"], s["ok_ns"]
        recalled = set(s["recalled"])
        recall_open = set(s["recall_unresolved"])
        sent = len(msg_id)
        figures["sent"] += sent
        figures["attempts"] += sum(s["attempts"])
        figures["retried"] += sum(1 for a in s["attempts"] if a > 1)
        # Every send answered ok is stored, once, with the id it was answered.
        for seq in range(sent):
            found = by_cid.get(f"{seq:08x}")
            mid = msg_id[seq]
            if mid:
                figures["ok"] += 1
                if found is None:
                    v.add("lost", f"sender {uid} seq {seq}: answered ok msg_id {mid}, not in SQL")
                elif found.id != mid:
                    v.add(
                        "mismatch:msg_id", f"sender {uid} seq {seq}: answered {mid}, SQL {found.id}"
                    )
            else:
                figures["unresolved"] += 1
                v.add("unresolved", f"sender {uid} seq {seq}: never answered ok")
            if found is not None:
                if found.q != seq:
                    v.add("mismatch:body", f"sender {uid} cid {found.cid}: body q {found.q}")
                if seq in recalled and found.status != 1:
                    v.add(
                        "recall_lost", f"sender {uid} seq {seq}: recall ok, status {found.status}"
                    )
                if found.status == 1 and seq not in recalled and seq not in recall_open:
                    v.add("mismatch:status", f"sender {uid} seq {seq}: recalled, never asked")
        figures["recalled"] += len(recalled)
        for row in rows:
            row_seq = cid_seq(row.cid)
            if row_seq is None or row_seq >= sent:
                v.add("unexpected_row", f"sender {uid}: row {row.id} cid {row.cid!r}")
        for q, n in Counter(row.q for row in rows).items():
            if n > 1:
                v.add("duplicated", f"sender {uid}: body q {q} stored {n} times", n - 1)
        for seq in s["spurious_dup"]:
            v.add(
                "misreported_dup",
                f"sender {uid} seq {seq}: dup:true on the only attempt (msg_id {msg_id[seq]})",
            )
        for seq, a, b in s["id_mismatch"]:
            v.add("mismatch:answers", f"sender {uid} seq {seq}: answered {a} then {b}")
        for seq, code, message in s["rejected"]:
            v.add("rejected", f"sender {uid} seq {seq}: {code} {message}")
        figures["dup_flags"] += sum(s["dup"])
        # Order: on one connection, stored in the order sent; and a send made
        # after another was answered ok gets a later id.
        stored: dict[int, int] = {}
        for row in rows:
            row_seq = cid_seq(row.cid)
            if row_seq is not None:
                stored[row_seq] = row.id
        by_epoch: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for seq in range(sent):
            if msg_id[seq] and not s["dup"][seq] and s["store_epoch"][seq] and seq in stored:
                by_epoch[s["store_epoch"][seq]].append((s["store_index"][seq], stored[seq], seq))
        reordered: set[int] = set()
        for items in by_epoch.values():
            items.sort()
            top = 0
            for _, mid, seq in items:
                if mid < top:
                    reordered.add(seq)
                top = max(top, mid)
        events = sorted(
            [(ok_ns[q], 1, stored[q]) for q in range(sent) if msg_id[q] and q in stored]
            + [(first_ns[q], 0, q) for q in range(sent) if q in stored]
        )
        top = 0
        for _, kind, x in events:
            if kind == 1:
                top = max(top, x)
            elif stored[x] < top:
                reordered.add(x)
        for seq in sorted(reordered):
            v.add("reordered", f"sender {uid} seq {seq}: stored out of order (id {stored[seq]})")

        # -- the recipient's side --
        ruid = r["uid"]
        mine = [row for row in rows if row.recipient == ruid]
        normal = {row.id for row in mine if row.status == 0}
        gone = {row.id for row in mine if row.status != 0}
        pending = sql.pending.get(ruid, set())
        acked = set(r["acked"])
        figures["acked"] += len(acked)
        figures["pending_at_end"] += len(pending)
        for mid in sorted(acked & pending):
            v.add("pending:acked_still_pending", f"recipient {ruid}: {mid} acked ok, still pending")
        for mid in sorted(normal - acked - pending):
            v.add("pending:lost", f"recipient {ruid}: {mid} never acked, not pending")
        for mid in sorted(pending & gone):
            v.add("pending:recalled_pending", f"recipient {ruid}: recalled {mid} still pending")
        for mid in sorted(pending - normal - gone):
            v.add("pending:orphan", f"recipient {ruid}: pending {mid} has no message")
        if "final_sync" in r:
            want = sorted(pending & normal)
            got = r["final_sync"]
            if got != want:
                missing = sorted(set(want) - set(got))
                extra = sorted(set(got) - set(want))
                misreported = {msg_id[q] for q in s["spurious_dup"]}
                v.add(
                    "mismatch:sync",
                    f"recipient {ruid}: sync {_history_diff(got, want)}"
                    f" (missing {missing[:3]}, {len(set(missing) & misreported)} of them"
                    f" answered dup:true on their only attempt; extra {extra[:3]},"
                    f" {len(set(extra) & acked)} of them acked ok,"
                    f" {len(set(extra) & gone)} recalled)",
                )
        for q, a, b in r["dups"]:
            v.add("duplicated", f"recipient {ruid}: seq {q} received as {a} and {b}")
        # Pushed to a connected recipient.
        received = {rec[0]: rec for rec in r["received"]}
        for seq in range(sent):
            mid = msg_id[seq]
            if not mid or seq in recalled or seq in recall_open or mid not in normal:
                continue
            e = _epoch_covering(r["epochs"], first_ns[seq], ok_ns[seq] + PUSH_GRACE_NS)
            rec = received.get(mid)
            if e is None:
                continue
            end = e[1] or (1 << 62)
            if rec is None or rec[3] > end:
                when["push_missed"].append(ok_ns[seq])
                v.add(
                    "push_missed",
                    f"recipient {ruid} connected throughout, never got {mid}"
                    f" (sender {uid} seq {seq})",
                )
            elif rec[4] and rec[3] - ok_ns[seq] > 5 * 10**9:
                figures["pushed_late_5s"] += 1
        # Unread counts: SQL truth, t_conv's counters, the unread answer.
        sessions = {row.session for row in mine}
        truth_total = 0
        answer = r.get("unread")
        answered = {x["session_id"]: x["count"] for x in answer["sessions"]} if answer else {}
        for sid in sessions:
            conv = sql.conv.get((ruid, sid))
            if conv is None:
                v.add("mismatch:conv", f"recipient {ruid}: no t_conv row for session {sid}")
                continue
            truth = sum(
                1
                for row in mine
                if row.session == sid and row.status == 0 and row.id > conv.read_up_to
            )
            truth_total += truth
            if conv.total - conv.read_count != truth:
                v.add(
                    "mismatch:unread_counter",
                    f"recipient {ruid}: t_conv says {conv.total - conv.read_count},"
                    f" SQL truth {truth}",
                )
            if answer is not None and answered.get(sid, 0) != truth:
                v.add(
                    "mismatch:unread",
                    f"recipient {ruid}: unread answered {answered.get(sid, 0)}, SQL truth {truth}",
                )
            if conv.read_up_to < r["read_ok"]:
                v.add(
                    "read_lost",
                    f"recipient {ruid}: read to {r['read_ok']} ok, readUpTo {conv.read_up_to}",
                )
        if answer is not None and answer["total"] != truth_total:
            v.add(
                "mismatch:unread",
                f"recipient {ruid}: total {answer['total']}, SQL truth {truth_total}",
            )
        figures["unread_at_end"] += truth_total
        want_history = sorted(normal, reverse=True)
        for who, side in (("recipient", r), ("sender", s)):
            if "history" in side:
                diff = _history_diff(side["history"], want_history)
                if diff:
                    v.add("mismatch:history", f"{who} {side['uid']}: history {diff}")
            if "verify_error" in side:
                v.add("verify_failed", f"{who} {side['uid']}: {side['verify_error']}")
        figures["received"] += len(received)
        figures["sync_hints"] += r["hints"]
    return dict(figures), v, dict(when)


def latencies(
    actors: Sequence[Mapping[str, Any]], faults: Sequence[Fault]
) -> dict[str, dict[str, Any]]:
    """
    Send (first attempt) -> ok, and each ack and read -> its answer, for
    requests sent during a fault (or just after it) and for the rest.
    """
    windows = sorted((f.start_ns, (f.end_ns or f.start_ns) + RECOVERY_NS) for f in faults)
    out: dict[str, list[int]] = defaultdict(list)

    def add(kind: str, sent: int, lat: int) -> None:
        inside = any(a <= sent <= b for a, b in windows)
        out[f"{kind}_{'during' if inside else 'outside'}_faults"].append(lat)

    for x in actors:
        for first, ok in zip(x.get("first_ns", ()), x.get("ok_ns", ()), strict=True):
            if ok:
                add("send", first, ok - first)
        for kind, sent, lat in x.get("op_times", ()):
            if kind in ("ack", "read"):
                add(kind, sent, lat)
    return {k: stats.summary(stats.histogram(v)) for k, v in sorted(out.items())}


def _follows(t: int, faults: Sequence[Fault]) -> Fault | None:
    """The fault that most recently started before C{t}, if it ended less than 15 s before."""
    last = None
    for f in faults:
        if f.start_ns <= t:
            last = f
    if last is not None and t <= (last.end_ns or last.start_ns) + 15 * 10**9:
        return last
    return None


def fault_costs(
    senders: Sequence[Mapping[str, Any]],
    recipients: Sequence[Mapping[str, Any]],
    faults: Sequence[Fault],
    when: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """Per fault: sends it delayed, unavailable answers, and the longest time without any ok."""
    oks = sorted(t for s in senders for t in s["ok_ns"] if t)
    last_ok = oks[-1] if oks else 0
    errors = sorted((t, code) for s in senders for t, code in s["error_times"])
    out = []
    for f in faults:
        a = f.start_ns
        b = (f.end_ns or f.start_ns) + RECOVERY_NS
        lat = [
            ok - first
            for s in senders
            for first, ok in zip(s["first_ns"], s["ok_ns"], strict=True)
            if ok and a <= first <= b
        ]
        # The longest time without any ok, from the fault's start to 8 s after
        # its end (or the last ok of the run).
        until = max(a, min(b + 8 * 10**9, last_ok))
        i, j = bisect.bisect_left(oks, a), bisect.bisect_right(oks, until)
        points = [a, *oks[i:j], until]
        stall = max((y - x for x, y in itertools.pairwise(points)), default=0)
        refused = Counter(
            code
            for t, code in errors[
                bisect.bisect_left(errors, (a, "")) : bisect.bisect_right(errors, (b, "~"))
            ]
        )
        acks = [
            lat
            for r in recipients
            for kind, sent, lat in r["op_times"]
            if kind == "ack" and a <= sent <= b
        ]
        out.append(
            {
                "kind": f.kind,
                "at_s": None,
                "seconds": round(((f.end_ns or a) - a) / 1e9, 2),
                "sends": len(lat),
                "send_to_ok": stats.summary(stats.histogram(lat)),
                "ack": stats.summary(stats.histogram(acks)),
                "longest_without_ok_s": round(stall / 1e9, 2),
                "refused": dict(refused),
                # Violations about messages answered ok after this fault
                # started (and before the next one), up to 15 s after its end.
                "after": {
                    kind: sum(1 for t in times if _follows(t, faults) is f)
                    for kind, times in (when or {}).items()
                },
                **f.detail,
            }
        )
    return out


# -- the run ----------------------------------------------------------------------------


def schedule(kinds: Sequence[str], duration: float, every: float) -> list[tuple[float, str]]:
    """(seconds from the start, fault), cycling through C{kinds}; none in the last 6 s."""
    out: list[tuple[float, str]] = []
    t = min(4.0, duration / 4)
    i = 0
    while kinds and t <= duration - 6:
        out.append((t, kinds[i % len(kinds)]))
        i += 1
        t += every
    return out


def http_ok(port: int, path: str = "/healthz") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)


class Soak:
    """One chaos run: the stack, the workers, the faults, the checks."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.duration = float(args.seconds if args.seconds else args.minutes * 60)
        if args.faults:
            kinds = tuple(k for k in args.faults.split(",") if k)
        elif self.duration <= 90:
            kinds = CI_FAULTS
        else:
            kinds = ALL_FAULTS + (NETEM_FAULTS if args.netem else ())
        unknown = [k for k in kinds if k not in KNOWN_FAULTS]
        if unknown:
            raise BenchError(f"unknown faults {unknown}; known: {', '.join(KNOWN_FAULTS)}")
        if any(k in NETEM_FAULTS for k in kinds) and not args.netem:
            raise BenchError("netem faults need --netem")
        self.kinds = kinds
        every = args.every or (8.0 if self.duration <= 120 else 15.0)
        self.plan = schedule(kinds, self.duration, every)
        self.faults: list[Fault] = []
        self.violations = Violations()
        self.target: Target | None = None
        self.pool: WorkerPool | None = None
        self.netem: Any = None
        self.progress = Progress(not args.quiet)
        self.killing: set[int] = set()
        self.given_up: set[int] = set()
        self.rss: dict[int, dict[str, Any]] = {}  # pid -> node, base, peak, last (KiB)
        self.started = time.monotonic()
        self.next_sample = 0.0
        self.redis_stopped = False
        self.node_rotation = 0
        self.restarts: Counter[str] = Counter()

    # -- monitoring ---------------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        if now < self.next_sample or self.target is None:
            return
        self.next_sample = now + 1.0
        for i, server in enumerate(self.target.servers):
            if i in self.killing or i in self.given_up:
                continue
            if not server.running:
                self.violations.add(
                    "node_died", f"node {i + 1} exited by itself: {server.log()[-1500:]!r}"
                )
                try:
                    self.restart_node(i)
                except Exception as e:
                    self.given_up.add(i)
                    self.violations.add("node_dead", f"node {i + 1} did not start again: {e}")
                continue
            pid = server.proc.pid
            sample = procstat.sample(pid)
            if sample is None:
                continue
            m = self.rss.setdefault(pid, {"node": i + 1, "since": now, "base": 0, "peak": 0})
            if not m["base"] and now - m["since"] >= 3:
                m["base"] = sample.rss_kb
            m["peak"] = max(m["peak"], sample.rss_kb)
            m["last"] = sample.rss_kb
        if self.pool is not None:
            p = self.pool
            self.progress.show(
                f"chaos {now - self.started:5.0f}s  {p.progress[0].get('phase', '')}  "
                f"sent {p.total('sent'):.0f} ok {p.total('ok'):.0f} "
                f"unavailable {p.total('unavailable'):.0f} reconnects {p.total('reconnects'):.0f} "
                f"faults {len(self.faults)}"
            )

    def sleep(self, seconds: float) -> None:
        assert self.pool is not None
        self.pool.sleep_until(time.monotonic() + seconds, self.tick)

    def restart_node(self, i: int) -> None:
        assert self.target is not None
        server = self.target.servers[i]
        self.killing.add(i)
        try:
            server.kill()
            server.start(timeout=90)
        finally:
            self.killing.discard(i)
        self.restarts[f"node{i + 1}"] += 1

    # -- faults -------------------------------------------------------------------

    def worker_fault(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.pool is not None
        pool = self.pool
        pool.procs[0].stdin.write((json.dumps({"cmd": "fault", **cmd}) + "\n").encode())  # type: ignore[union-attr]
        pool.procs[0].stdin.flush()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in pool.events[0]:
                if e["ev"] == "fault" and e["kind"] == cmd["kind"]:
                    pool.events[0].remove(e)
                    return {k: x for k, x in e.items() if k not in ("ev", "kind")}
            pool.poll(0.1)
            pool.check_alive()
            self.tick()
        return {"error": f"no result after {timeout:.0f}s"}

    def sql_kill(self, seconds: float) -> dict[str, Any]:
        """
        For C{seconds}: KILL every connection of imserver's that is running a
        statement, as fast as one client can (each may be in its COMMIT: the
        server then cannot know whether it committed). MariaDB stays up.
        """
        import pymysql

        assert self.target is not None and self.target.config is not None
        mariadb = self.target.backends["mariadb"]
        database = self.target.config["storage"]["sql"].rsplit("/", 1)[1]
        conn = pymysql.connect(unix_socket=mariadb.socket, user="root", autocommit=True)
        killed = rounds = 0
        end = time.monotonic() + seconds
        try:
            with conn.cursor() as cur:
                while time.monotonic() < end:
                    rounds += 1
                    cur.execute(
                        "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s"
                        " AND COMMAND = 'Query' AND ID <> CONNECTION_ID()",
                        (database,),
                    )
                    for (pid,) in cur.fetchall():
                        try:
                            cur.execute(f"KILL CONNECTION {int(pid)}")
                            killed += 1
                        except pymysql.MySQLError:
                            pass  # gone meanwhile
                    assert self.pool is not None
                    self.pool.poll(0.005)
                    self.tick()
        finally:
            conn.close()
        return {"killed": killed, "rounds": rounds}

    def inject(self, kind: str) -> None:
        assert self.target is not None
        f = Fault(kind, time.monotonic_ns())
        self.faults.append(f)
        redis = self.target.backends["redis"]
        mariadb = self.target.backends["mariadb"]
        if kind == "node_kill":
            i = self.node_rotation % len(self.target.servers)
            self.node_rotation += 1
            f.detail["node"] = i + 1
            self.killing.add(i)
            try:
                self.target.servers[i].kill()
                self.sleep(1.0)
                t = time.monotonic()
                self.target.servers[i].start(timeout=90)
                f.detail["restart_s"] = round(time.monotonic() - t, 2)
            finally:
                self.killing.discard(i)
        elif kind == "sql_kill":
            f.detail.update(self.sql_kill(3.0))
        elif kind == "flushall":
            f.detail["reply"] = redis.command("FLUSHALL").decode(errors="replace").strip()
        elif kind == "redis_stop":
            redis.signal(signal.SIGSTOP)
            self.redis_stopped = True
            try:
                self.sleep(5.0)
            finally:
                redis.signal(signal.SIGCONT)
                self.redis_stopped = False
        elif kind == "redis_restart":
            redis.kill()
            self.sleep(1.0)
            redis.start()
        elif kind == "mariadb_kill":
            mariadb.kill()
            self.sleep(1.0)
            t = time.monotonic()
            mariadb.start()
            f.detail["restart_s"] = round(time.monotonic() - t, 2)
        elif kind == "malformed":
            out = self.worker_fault({"kind": "malformed"}, 120)
            f.detail.update(out)
            for m in out.get("mismatches", []):
                self.violations.add("malformed", m)
            if "error" in out:
                self.violations.add("malformed", f"the probe failed: {out['error']}")
        elif kind == "slow_consumer":
            out = self.worker_fault({"kind": "slow_consumer", "seconds": 8.0}, 120)
            f.detail.update(out)
            if "error" in out:
                self.violations.add("slow_consumer", f"the probe failed: {out['error']}")
        elif kind == "storm":
            out = self.worker_fault({"kind": "storm", "clients": self.args.storm}, 120)
            f.detail.update({k: x for k, x in out.items() if k != "lat_connect"})
            if "lat_connect" in out:
                f.detail["connect_auth"] = stats.summary(stats.merge([out["lat_connect"]]))
            if "error" in out:
                self.violations.add("storm", f"the storm failed: {out['error']}")
        elif kind in NETEM_FAULTS:
            assert self.netem is not None
            shape = "delay 100 20" if kind == "netem_delay" else "loss 10"
            f.detail["netem"] = f"{shape} ({self.netem.mode})"
            self.netem.shape(shape)
            try:
                self.sleep(8.0)
            finally:
                self.netem.shape(None)
        f.end_ns = time.monotonic_ns()

    # -- phases -------------------------------------------------------------------

    def start(self) -> None:
        args = self.args
        per_node = None
        if args.netem:
            from bench import netem

            why = netem.available()
            if why:
                raise BenchError(why)
            self.netem = netem.Netem()
            try:
                self.netem.setup()
            except RuntimeError as e:
                raise BenchError(f"--netem: {e}") from e
            log(
                f"netem: node 1 reaches its backends through {self.netem.ns_a} and "
                f"{self.netem.ns_b} (shaped by {self.netem.mode})"
            )
            per_node = self.netem.per_node
        log(f"starting imserver (mysql-redis, {args.nodes} node(s)) ...")
        try:
            self.target = start_imserver("mysql-redis", None, nodes=args.nodes, per_node=per_node)
        except Exception as e:
            raise BenchError(f"could not start imserver: {e}") from e
        uids = Uids()
        self.uids = uids.take(2 * args.pairs)
        # Fresh users for the faults worker 0 runs: 2 per malformed or slow
        # consumer, --storm per storm.
        spare = sum(args.storm if k == "storm" else 2 for _, k in self.plan)
        parts = runner.split(args.pairs, args.workers)
        specs = []
        first = 0
        for i, n in enumerate(parts):
            specs.append(
                {
                    "scenario": "chaos",
                    "index": i,
                    "endpoints": self.target.endpoints,
                    "secret": self.target.secret,
                    "uids": self.uids[2 * first : 2 * (first + n)],
                    "first_pair": first,
                    "spare_uids": uids.take(spare if i == 0 else 0),
                    "rate": args.rate,
                    "window": args.window,
                    "burst": args.burst,
                    "reconnect_per_s": args.reconnect_every and 1.0 / args.reconnect_every,
                }
            )
            first += n
        self.lo, self.hi = self.uids[0], uids.next
        self.pool = WorkerPool(specs, module="bench.chaosload")
        self.pool.wait("ready", 120, self.tick)

    def run(self) -> dict[str, Any]:
        assert self.pool is not None and self.target is not None
        pool = self.pool
        pool.send({"cmd": "start"})
        self.t0 = time.monotonic()
        self.t0_ns = time.monotonic_ns()
        for at, kind in self.plan:
            pool.sleep_until(self.t0 + at, self.tick)
            self.progress.done()
            log(f"[{time.monotonic() - self.t0:6.1f}s] fault: {kind}")
            try:
                self.inject(kind)
            except (KeyboardInterrupt, BenchError):
                raise
            except Exception as e:
                # A process that does not come back is a finding, not a crash of the tool.
                self.violations.add("fault_failed", f"{kind}: {type(e).__name__}: {e}"[:2000])
                if self.faults and not self.faults[-1].end_ns:
                    self.faults[-1].end_ns = time.monotonic_ns()
        pool.sleep_until(self.t0 + self.duration, self.tick)
        self.progress.done()
        log(
            f"[{time.monotonic() - self.t0:6.1f}s] load stopped;"
            " settling (retrying unanswered sends)"
        )
        pool.send({"cmd": "settle", "timeout": self.args.settle})
        settled = pool.wait("settled", self.args.settle + 60, self.tick)
        if not all(e["in_time"] for e in settled):
            self.violations.add(
                "settle_timeout",
                f"sends still unanswered {self.args.settle:.0f} s after the load",
            )
        log(f"[{time.monotonic() - self.t0:6.1f}s] verifying through the protocol and SQL")
        pool.send({"cmd": "verify"})
        results = pool.collect(300, self.tick)
        self.progress.done()
        return self.check(results)

    def check(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        assert self.target is not None
        senders = [s for r in results for s in r["senders"]]
        recipients = [x for r in results for x in r["recipients"]]
        mariadb = self.target.backends["mariadb"]
        database = (
            self.target.config["storage"]["sql"].rsplit("/", 1)[1] if self.target.config else ""
        )
        sql = read_sql(mariadb, database, self.lo, self.hi)
        figures, v, when = judge(senders, recipients, sql)
        for kind, n in self.violations.counts.items():
            v.counts[kind] += n
            v.examples[kind].extend(self.violations.examples[kind])
        # The servers: alive, healthy, memory bounded.
        nodes = []
        for i, server in enumerate(self.target.servers):
            status, body = 0, ""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status, body = http_ok(server.http_port)
                if status == 200:
                    break
                time.sleep(0.5)
            node: dict[str, Any] = {"node": i + 1, "running": server.running, "healthz": status}
            # Its log goes with its temporary directory: keep what it complained about.
            noisy = [
                line[:400]
                for line in server.log().splitlines()
                if any(w in line for w in ("#warn]", "#error]", "#critical]", "Traceback"))
            ]
            node["log_complaints"] = len(noisy)
            node["log_last_complaints"] = noisy[-40:]
            if not server.running:
                v.add("node_dead", f"node {i + 1} is not running at the end")
            elif status != 200:
                v.add("node_unhealthy", f"node {i + 1} /healthz {status}: {body[:300]}")
            sample = procstat.sample(server.proc.pid) if server.running else None
            m = self.rss.get(server.proc.pid, {}) if server.proc else {}
            if sample is not None:
                base = m.get("base") or m.get("last") or sample.rss_kb
                node.update(
                    rss_mb=round(sample.rss_kb / 1024, 1),
                    rss_base_mb=round(base / 1024, 1),
                    rss_peak_mb=round(max(m.get("peak", 0), sample.rss_kb) / 1024, 1),
                )
                if sample.rss_kb - base > self.args.rss_growth_mb * 1024:
                    v.add(
                        "memory",
                        f"node {i + 1} grew from {base / 1024:.0f}"
                        f" to {sample.rss_kb / 1024:.0f} MB",
                    )
            node["restarts"] = self.restarts[f"node{i + 1}"] + sum(
                1 for f in self.faults if f.kind == "node_kill" and f.detail.get("node") == i + 1
            )
            nodes.append(node)
        lat = latencies([*senders, *recipients], self.faults)
        costs = fault_costs(senders, recipients, self.faults, when)
        for c, f in zip(costs, self.faults, strict=True):
            c["at_s"] = round((f.start_ns - self.t0_ns) / 1e9, 1)
        errors: Counter[str] = Counter()
        for x in (*senders, *recipients):
            errors.update(x["errors"])
        figures["reconnects"] = sum(x["reconnects"] for x in (*senders, *recipients))
        figures["unavailable"] = sum(n for k, n in errors.items() if k.endswith("unavailable"))
        figures["no_answer"] = sum(n for k, n in errors.items() if k.startswith("no_answer"))
        for k, n in sorted(errors.items()):
            if k.startswith("no_answer"):
                v.add("no_answer", f"{n} {k.split(':')[1]} requests unanswered for 10 s", n)
        figures["faults"] = len(self.faults)
        figures["violations"] = sum(v.counts.values())
        return {
            "figures": figures,
            "violations": v.as_dict(),
            "faults_by_kind": dict(Counter(f.kind for f in self.faults)),
            "fault_costs": costs,
            "netem_mode": self.netem.mode if self.netem is not None else None,
            "latency": lat,
            "errors": dict(errors),
            "nodes": nodes,
        }

    def stop(self) -> None:
        if self.target is not None and self.redis_stopped:
            self.target.backends["redis"].signal(signal.SIGCONT)
        if self.pool is not None:
            self.pool.close()
        if self.target is not None:
            self.target.stop()
        if self.netem is not None:
            self.netem.cleanup()


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_chaos(args: Any) -> int:
    """Run the soak; print the figures; 0 if nothing was violated."""
    soak = Soak(args)
    old = signal.signal(signal.SIGTERM, _sigterm)
    result: dict[str, Any] = runner.base_result(
        "chaos",
        args,
        {
            "seconds": soak.duration,
            "nodes": args.nodes,
            "pairs": args.pairs,
            "rate_per_sender": args.rate,
            "window": args.window,
            "burst": args.burst,
            "faults": list(soak.kinds),
            "schedule": [[at, k] for at, k in soak.plan],
            "netem": bool(args.netem),
        },
    )
    try:
        soak.start()
        result.update(soak.run())
    except KeyboardInterrupt:
        log("\ninterrupted: stopping every process")
        return 130
    except BenchError as e:
        log(f"\nchaos failed: {e}")
        return 2
    finally:
        soak.progress.done()
        soak.stop()
        signal.signal(signal.SIGTERM, old)
    path = runner.save(result, args.results_dir)
    for line in summary_lines(result):
        print(line)
    print(f"results: {os.path.relpath(path)}")
    sys.stdout.flush()
    return 1 if result["figures"]["violations"] else 0


def _ms(h: Mapping[str, Any]) -> str:
    """p50/p99/max (count) of a latency summary."""
    if not h.get("count"):
        return "-"
    return f"{h['p50_ms']:.0f}/{h['p99_ms']:.0f}/{h['max_ms']:.0f} ({h['count']})"


def _p99(h: Mapping[str, Any]) -> str:
    return f"{h['p99_ms']:.0f} ms" if h.get("count") else "-"


MISMATCH_KINDS = ("mismatch", "pending", "read_lost", "recall_lost")


def summary_lines(result: Mapping[str, Any]) -> Iterable[str]:
    f = result["figures"]
    p = result["params"]
    lat = result["latency"]
    v = result["violations"]

    def n(kind: str) -> int:
        return int(v.get(kind, {}).get("count", 0))

    mismatches = sum(x["count"] for k, x in v.items() if k.startswith(MISMATCH_KINDS))
    yield f"chaos soak: {p['seconds']:.0f} s, {p['nodes']} node(s), {p['pairs']} pairs"
    yield (
        f"  sent {f.get('sent', 0)}  ok {f.get('ok', 0)}  lost {n('lost')}"
        f"  duplicated {n('duplicated')}  reordered {n('reordered')}"
        f"  misreported dup {n('misreported_dup')}  mismatches {mismatches}"
    )
    yield (
        f"  push missed {n('push_missed')}  unresolved {f.get('unresolved', 0)}"
        f"  retried {f.get('retried', 0)}  dup flags {f.get('dup_flags', 0)}"
        f"  pending at end {f.get('pending_at_end', 0)}  unread at end {f.get('unread_at_end', 0)}"
    )
    kinds = ", ".join(f"{k} x{c}" for k, c in result["faults_by_kind"].items())
    yield f"  faults {f.get('faults', 0)} ({kinds})"
    yield (
        f"  reconnects {f.get('reconnects', 0)}  unavailable {f.get('unavailable', 0)}"
        f"  no answer {f.get('no_answer', 0)}"
    )
    for op in ("send", "ack", "read"):
        during = lat.get(f"{op}_during_faults", {})
        outside = lat.get(f"{op}_outside_faults", {})
        yield f"  {op} p50/p99/max ms: during faults {_ms(during)}, outside {_ms(outside)}"
    for c in result["fault_costs"]:
        extra = ""
        if c["kind"] == "slow_consumer":
            extra = f", dropped {c.get('dropped')}"
        elif c["kind"] == "storm":
            extra = f", {c.get('ok')}/{c.get('clients')} in {c.get('seconds')} s"
        elif c["kind"] == "malformed":
            extra = f", {c.get('checked')} frames, {len(c.get('mismatches', []))} answered wrong"
        elif c["kind"] == "sql_kill":
            extra = f", {c.get('killed')} connections killed"
        elif "restart_s" in c:
            extra = f", restart {c['restart_s']} s"
        for kind, count in c.get("after", {}).items():
            if count:
                extra += f", {kind} {count}"
        yield (
            f"    {c['at_s']:6.1f}s {c['kind']:<14} {c['seconds']:5.1f}s"
            f"  no ok {c['longest_without_ok_s']:.1f}s  refused {sum(c['refused'].values())}"
            f"  send p99 {_p99(c['send_to_ok'])}  ack p99 {_p99(c['ack'])}{extra}"
        )
    for node in result["nodes"]:
        yield (
            f"  node {node['node']}: {'running' if node['running'] else 'DEAD'}"
            f", healthz {node['healthz']}, RSS {node.get('rss_base_mb', '-')}"
            f" -> {node.get('rss_mb', '-')} MB (peak {node.get('rss_peak_mb', '-')})"
            f", restarts {node['restarts']}"
        )
    if v:
        yield f"VIOLATIONS ({f['violations']}):"
        for kind, x in v.items():
            yield f"  {kind}: {x['count']}"
            for ex in x["examples"][:3]:
                yield f"      {ex}"
    else:
        yield "no violations"
