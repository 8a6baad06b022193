"""
``python -m bench stages``: ``pairs`` against imserver with py-spy attached to
the server for exactly the measured window, the samples turned into CPU
microseconds per delivered message for each stage of the message's path
(issue 13).

py-spy samples the server's Python stacks C{rate} times a second; by default
only the thread holding the GIL (C{--gil}): that is Python CPU, the pool
threads' included, and leaves out threads blocked on a socket or a lock, which
py-spy's idle detection counts as busy (with C{--all-threads} the "CPU" of a
mysql-redis run was 1.9x the server's /proc CPU). A stage's samples / C{rate}
are then the CPU seconds spent in it; divided by the messages delivered in the
window they are sampled-us per message. py-spy samples wall time, though: on
a busy machine a descheduled GIL holder is sampled too (C{coverage}, sampled
/ /proc CPU, above 1), and the table scales every stage down alike to the
server's CPU from /proc; below 1, the rest is a row of its own (C that
released the GIL: SQLite, socket syscalls). See L{aggregate}.

A sample belongs to the stage of the **innermost** frame that a rule of
L{STAGES} matches (the rules are tried in order on each frame, leaf first), so
C{msgpack.packb} under the push encoder is "push encode" and under the send
path "send building". Samples no rule matches are C{other}. py-spy sees Python
frames only, so C called from Python (with the GIL held) is charged to its
Python caller.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from bench import runner
from bench.stacks import Target

#: (stage, substrings of "function (file)"). For each sample the frames are
#: tried leaf first, each against the rules in this order: the first match
#: names the stage. Library frames no rule names (msgpack, attrs-generated
#: __init__, the stdlib) are charged to their nearest named caller; twisted/
#: is a stage of its own only where no imserver frame is above it
#: (L{FALLBACK}). Deferreds count apart: their cost per message is a stage.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("SQL execute (driver + DB)", ("sql/engines.py", "pymysql/", "sqlite3")),
    ("hot store (Lua / Redis)", ("storage/hot/", "txredisapi")),
    ("metrics / logging", ("imserver/metrics.py", "twisted/logger/")),
    ("Deferred machinery", ("twisted/internet/defer.py",)),
    ("frame decode", ("FrameDecoder.", "decode_body (", "ClientProtocol.dataReceived")),
    ("frame decode", ("ClientProtocol.frames_received", "ClientProtocol._drain")),
    ("frame decode", ("ClientProtocol._handle ",)),
    ("dispatch + validation", ("wire/frames.py", "imserver.wire.frames", "_dispatch ")),
    (
        "ack handling",
        ("ChatService.ack ", "ChatService._acked", "ChatService._receipt", "ack_txn"),
    ),
    ("ack handling", ("Store._ack_batch", "Store.ack ")),
    (
        "reply + push encode + write",
        ("ChatService._push_", "ChatService._start_fanout", "ChatService._fanned_out"),
    ),
    ("reply + push encode + write", ("ChatService._frames", "message_object", "sender_info")),
    ("reply + push encode + write", ("LocalRegistry.push", "ClientProtocol.push ")),
    ("reply + push encode + write", ("ClientProtocol._send ", "ClientProtocol._repl")),
    ("send: enrichment + dict building", ("chat/service.py", "imserver/services/")),
    ("SQL render (send batch)", ("sql/queries.py", "sql/database.py")),
    ("batching + store glue", ("imserver/batching.py", "storage/store.py")),
]
FALLBACK: list[tuple[str, tuple[str, ...]]] = [
    ("reactor + socket I/O (Twisted)", ("twisted/",)),
    ("threads (pool hand-off)", ("threading.py",)),
]
OTHER = "other"
#: The server's /proc CPU that no sample explains: C that released the GIL
#: (SQLite, socket syscalls).
UNSAMPLED = "not sampled (C without the GIL)"


def parse_frame(frame: str) -> str:
    """C{"func (path/file.py:12)"} -> C{"func (path/file.py)"} (no line)."""
    head, sep, tail = frame.rpartition(":")
    if sep and tail.rstrip(")").isdigit():
        return head + ")"
    return frame


Rules = list[tuple[str, tuple[str, ...]]]


def classify(stack: list[str], stages: Rules = STAGES, fallback: Rules = FALLBACK) -> str:
    """The stage of one sample: C{stack} root first, as py-spy writes it."""
    frames = [parse_frame(f) for f in reversed(stack)]
    for rules in (stages, fallback):
        for where in frames:
            for stage, patterns in rules:
                if any(p in where for p in patterns):
                    return stage
    return OTHER


def stage_names(stages: Rules = STAGES, fallback: Rules = FALLBACK) -> list[str]:
    """Every stage once, in table order, then C{other}."""
    names = [s for s, _ in stages + fallback]
    return [*dict.fromkeys(names), OTHER]


def read_raw(lines: Iterable[str]) -> Counter[tuple[str, ...]]:
    """py-spy C{--format raw} (collapsed stacks: C{a;b;c COUNT}) -> counts."""
    out: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        line = line.rstrip("\n")
        stack, sep, count = line.rpartition(" ")
        if not sep or not count.isdigit():
            continue
        out[tuple(stack.split(";"))] += int(count)
    return out


def aggregate(
    samples: Counter[tuple[str, ...]],
    rate: float,
    messages: int,
    cpu_s: float | None = None,
    stages: Rules = STAGES,
    fallback: Rules = FALLBACK,
) -> dict[str, Any]:
    """
    Samples -> CPU-us per message by stage (in table order, then other).

    C{sampled_us_per_msg}: samples / C{rate} / C{messages}. py-spy samples
    wall time: a GIL holder that the kernel has descheduled (a busy machine)
    is still sampled, so on a shared machine that overstates the CPU. With
    C{cpu_s} (the server's CPU over the window, from /proc) C{cpu_us_per_msg}
    is scaled down alike for every stage when the samples add up to more
    than C{cpu_s}, and a last row, L{UNSAMPLED}, holds what /proc counted
    and no sample explains; the rows then add up to the server's CPU.
    """
    by_stage: Counter[str] = Counter()
    for stack, n in samples.items():
        by_stage[classify(list(stack), stages, fallback)] += n
    total = sum(by_stage.values())
    sampled = 1e6 / rate / messages if rate > 0 and messages > 0 else 0.0
    # Sampled more than /proc's CPU (a busy machine): shrink every stage alike.
    scale = 1.0
    if cpu_s and rate > 0 and total / rate > cpu_s:
        scale = cpu_s / (total / rate)
    rows = []
    for stage in stage_names(stages, fallback):
        n = by_stage.get(stage, 0)
        rows.append(
            {
                "stage": stage,
                "samples": n,
                "share": round(n / total, 4) if total else 0.0,
                "sampled_us_per_msg": round(n * sampled, 2),
                "cpu_us_per_msg": round(n * sampled * scale, 2),
            }
        )
    out: dict[str, Any] = {
        "samples": total,
        "rate_hz": rate,
        "messages": messages,
        "sampled_cpu_s": round(total / rate, 3) if rate > 0 else 0.0,
        "sampled_us_per_msg": round(total * sampled, 2),
        "server_cpu_s": cpu_s,
        "cpu_us_per_msg": round(total * sampled * scale, 2),
        # Sampled against /proc: above 1 when the machine was busy (see above).
        "coverage": round(total / rate / cpu_s, 3) if cpu_s and rate > 0 else None,
        "stages": rows,
    }
    if cpu_s is not None and messages > 0:
        server_us = cpu_s * 1e6 / messages
        rows.append(
            {
                "stage": UNSAMPLED,
                "samples": 0,
                "share": 0.0,
                "sampled_us_per_msg": 0.0,
                "cpu_us_per_msg": round(max(0.0, server_us - total * sampled * scale), 2),
            }
        )
        out["cpu_us_per_msg"] = round(server_us, 2)
    return out


def top_functions(samples: Counter[tuple[str, ...]], n: int = 25) -> list[tuple[str, int]]:
    """The leaf functions with the most samples (self time), for finding wins."""
    leaves: Counter[str] = Counter()
    for stack, count in samples.items():
        if stack:
            leaves[parse_frame(stack[-1])] += count
    return leaves.most_common(n)


class Profiler:
    """py-spy recording one pid between L{start} and L{stop} (SIGINT)."""

    def __init__(self, pid: int, rate: int, path: str, gil: bool = True) -> None:
        self.pid, self.rate, self.path, self.gil = pid, rate, path, gil
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        cmd = [exe, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw"]
        cmd += ["--nonblocking", "--output", self.path, *(["--gil"] if self.gil else [])]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.2)  # attached before the window opens
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise runner.BenchError(f"py-spy could not attach to {self.pid}: {err.strip()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cmd_stages(args: Any) -> dict[str, Any]:
    args.target = "imserver"
    params = runner.pairs_params(args)
    params["profile_rate_hz"] = args.rate_hz
    params["profile_gil_only"] = not args.all_threads
    result = runner.base_result("stages", args, params)
    uids = runner.Uids()
    progress = runner.Progress(not args.quiet)
    raw_dir = args.results_dir
    os.makedirs(raw_dir, exist_ok=True)
    fd, raw = tempfile.mkstemp(prefix="stages-", suffix=".pyspy.txt", dir=raw_dir)
    os.close(fd)

    def run(target: Target) -> dict[str, Any]:
        server = [pid for name, pid in target.measured_pids().items() if name == "server"]
        if len(server) != 1:
            raise runner.BenchError("stages profiles one server process (no --nodes/workers)")
        prof = Profiler(server[0], args.rate_hz, raw, gil=not args.all_threads)
        out = runner.run_pairs(
            target, params, uids, progress, target.name, around=(prof.start, prof.stop)
        )
        with open(raw) as f:
            samples = read_raw(f)
        messages = int(out["throughput"]["delivered_in_window"])
        cpu_s = out["cost"]["server"]["cpu_s"]
        out["profile"] = aggregate(samples, args.rate_hz, messages, cpu_s)
        out["profile"]["raw_file"] = os.path.relpath(raw)
        out["profile"]["gil_only"] = not args.all_threads
        out["profile"]["top_self"] = top_functions(samples)
        return out

    result["targets"] = runner.each_target(args, run)
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = runner.summary_lines(result)
    for name, t in result["targets"].items():
        prof = t.get("profile")
        if not prof:
            continue
        lines.append(
            f"{name}: {prof['messages']} msgs, {prof['samples']} samples at "
            f"{prof['rate_hz']} Hz = {prof['sampled_cpu_s']} s CPU sampled "
            f"(server /proc {prof['server_cpu_s']} s, coverage {prof['coverage']})"
        )
        lines.append(f"  {'stage':36} {'CPU-us/msg':>10} {'share':>7} {'sampled-us':>10}")
        for row in prof["stages"]:
            lines.append(
                f"  {row['stage']:36} {row['cpu_us_per_msg']:10.1f} {100 * row['share']:6.1f}%"
                f" {row['sampled_us_per_msg']:10.1f}"
            )
        lines.append(
            f"  {'total (server /proc)':36} {prof['cpu_us_per_msg']:10.1f} {'':7}"
            f" {prof['sampled_us_per_msg']:10.1f}"
        )
    return lines
