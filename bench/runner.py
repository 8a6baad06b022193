"""
The scenarios, parent side: start the load workers, run the measurement
window, sample the server's /proc and /metrics around it, add the workers'
results up, and write the result file.

The parent is plain blocking Python (no reactor): it only reads the workers'
JSON lines with a selector and sleeps until the window's edges.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import selectors
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from bench import metrics, procstat, stats
from bench.stacks import REPO, Target, external, is_server, start_imserver, start_relay

RESULTS_DIR = os.path.join(REPO, "bench", "results")
MAX_PER_WORKER = 5000  # connections: a process may open at most 20,000 files


class BenchError(Exception):
    pass


def log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# -- progress --------------------------------------------------------------------


class Progress:
    """One status line on stderr, redrawn with C{\\r}."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.width = 0
        self.last = 0.0

    def show(self, text: str) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.25:
            return
        self.last = now
        pad = max(0, self.width - len(text))
        self.width = len(text)
        sys.stderr.write("\r" + text + " " * pad)
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self.width = 0


def bar(fraction: float, width: int = 24) -> str:
    filled = int(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


# -- workers --------------------------------------------------------------------------


class WorkerPool:
    """C{python -m bench.worker SPEC} processes, spoken to in JSON lines."""

    def __init__(self, specs: list[dict[str, Any]], module: str = "bench.worker") -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", module, json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
            for spec in specs
        ]
        self.selector = selectors.DefaultSelector()
        self.buffers = [b""] * len(self.procs)
        self.progress: list[dict[str, Any]] = [{} for _ in self.procs]
        self.results: list[dict[str, Any] | None] = [None] * len(self.procs)
        self.events: list[list[dict[str, Any]]] = [[] for _ in self.procs]
        for i, p in enumerate(self.procs):
            assert p.stdout is not None
            os.set_blocking(p.stdout.fileno(), False)
            self.selector.register(p.stdout, selectors.EVENT_READ, i)

    @property
    def pids(self) -> dict[str, int]:
        return {f"worker{i}": p.pid for i, p in enumerate(self.procs)}

    def send(self, cmd: Mapping[str, Any]) -> None:
        line = json.dumps(cmd).encode() + b"\n"
        for p in self.procs:
            assert p.stdin is not None
            if p.poll() is None:
                p.stdin.write(line)
                p.stdin.flush()

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(max(0.0, timeout)):
            i = key.data
            data = os.read(key.fd, 1 << 20)
            if not data:
                self.selector.unregister(key.fileobj)
                continue
            lines = (self.buffers[i] + data).split(b"\n")
            self.buffers[i] = lines.pop()
            for line in lines:
                if line.strip():
                    self._event(i, json.loads(line))

    def _event(self, i: int, event: dict[str, Any]) -> None:
        ev = event.pop("ev")
        if ev == "progress":
            self.progress[i] = event
        elif ev == "result":
            self.results[i] = event
            if "fatal" in event:
                raise BenchError(f"worker {i}: {event['fatal']}")
        else:
            event["ev"] = ev
            self.events[i].append(event)

    def check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None and self.results[i] is None:
                self.poll(0.1)
                if self.results[i] is None:
                    raise BenchError(f"worker {i} exited with status {p.returncode}")

    def wait(
        self, ev: str, timeout: float, tick: Callable[[], None] | None = None
    ) -> list[dict[str, Any]]:
        """Wait until every worker has emitted C{ev}; return those events."""
        deadline = time.monotonic() + timeout
        while True:
            got = [next((e for e in es if e["ev"] == ev), None) for es in self.events]
            found = [g for g in got if g is not None]
            if len(found) == len(got):
                for es, g in zip(self.events, found, strict=True):
                    es.remove(g)
                return found
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f}s waiting for workers: {ev}")
            self.poll(0.1)
            self.check_alive()
            if tick:
                tick()

    def sleep_until(self, t: float, tick: Callable[[], None] | None = None) -> None:
        """Read the workers until C{time.monotonic() >= t}."""
        while True:
            left = t - time.monotonic()
            if left <= 0:
                return
            self.poll(min(left, 0.1))
            self.check_alive()
            if tick:
                tick()

    def collect(self, timeout: float, tick: Callable[[], None] | None = None) -> list[Any]:
        deadline = time.monotonic() + timeout
        while any(r is None for r in self.results):
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f}s waiting for worker results")
            self.poll(0.1)
            self.check_alive()
            if tick:
                tick()
        return list(self.results)

    def total(self, key: str) -> float:
        return sum(p.get(key, 0) for p in self.progress)

    def close(self) -> None:
        for p in self.procs:
            if p.stdin is not None and not p.stdin.closed:
                try:
                    p.stdin.close()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.selector.close()


@contextmanager
def workers(specs: list[dict[str, Any]], module: str = "bench.worker") -> Iterator[WorkerPool]:
    pool = WorkerPool(specs, module)
    try:
        yield pool
    finally:
        pool.close()


def split(n: int, parts: int) -> list[int]:
    """n items over `parts` workers, as evenly as possible (no empty part)."""
    parts = max(1, min(parts, n)) if n else 1
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


class Uids:
    """Fresh uids for every run: a random base far from real users and from other runs."""

    def __init__(self) -> None:
        self.next = random.randrange(10**6, 10**12) * 10**6

    def take(self, n: int) -> list[int]:
        first, self.next = self.next, self.next + n
        return list(range(first, first + n))


def ns(t: float) -> int:
    return int(t * 1e9)


# -- machine, windows, costs --------------------------------------------------------------


def cpu_busy() -> tuple[float, float]:
    """(busy, softirq + irq) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    idle = fields[3] + fields[4]
    steal = fields[7] if len(fields) > 7 else 0
    guest = sum(fields[8:10])  # already counted in user and nice
    busy = sum(fields) - idle - steal - guest
    return float(busy), float(fields[5] + fields[6])


def listen_drops() -> dict[str, int]:
    """The kernel's (machine-wide) counters of connections refused by full listen queues."""
    out: dict[str, int] = {}
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            for key in ("ListenOverflows", "ListenDrops"):
                out[key] = int(table.get(key, 0))
    return out


def calibrate() -> dict[str, float]:
    """A rough speed of this machine for the per-message work: msgpack round
    trips of a push frame and a plain Python loop."""
    import msgpack

    frame = {"t": "msg", "msg_id": 493692073500680, "session_id": 493692073500681,
             "from": 1, "to": 2, "cid": "0000002a", "type": "text",
             "body": {"q": 42, "s": 123456789012}, "ts": 1764400000000,
             "sender": {"nickname": "", "avatar": ""}, "unread": 3, "total_unread": 7}  # fmt: skip
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        msgpack.unpackb(msgpack.packb(frame), raw=False)
    rt = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    x = 0
    for i in range(200000):
        x += i & 7
    loop = (time.perf_counter() - t0) / 200000 * 1e9
    return {"msgpack_roundtrip_us": round(rt, 2), "python_loop_ns": round(loop, 1)}


def machine_info() -> dict[str, Any]:
    import msgpack

    import twisted

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = ""
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "twisted": twisted.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "reactor": "epoll",
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "repo": commit,
        "calibration": calibrate(),
    }


class Window:
    """/proc samples of the measured processes (and the machine) around a window.

    The target's processes are listed again at the start of the window (the
    workers of a supervisor are its current children); C{extra} are more
    processes to measure (the load workers)."""

    def __init__(
        self, target: Target, extra: Mapping[str, int] | None = None, scrape: bool = True
    ) -> None:
        self.target = target
        self.extra = dict(extra or {})
        self.scraper = target.scraper() if scrape else None

    def _scrape(self) -> dict[str, metrics.Samples]:
        return self.scraper.scrape() if self.scraper else {}

    def begin(self) -> None:
        self.pids = {**self.target.measured_pids(), **self.extra}
        self.metrics0 = self._scrape()
        self.t0 = time.monotonic()
        self.proc0 = procstat.sample_all(self.pids)
        self.machine0 = cpu_busy()
        self.drops0 = listen_drops()

    def end(self) -> dict[str, Any]:
        self.t1 = time.monotonic()
        proc1 = procstat.sample_all(self.pids)
        machine1 = cpu_busy()
        drops1 = listen_drops()
        metrics1 = self._scrape()
        seconds = self.t1 - self.t0
        procs = procstat.delta(self.proc0, proc1, seconds)
        busy = (machine1[0] - self.machine0[0]) / procstat.CLOCK_TICKS
        irq = (machine1[1] - self.machine0[1]) / procstat.CLOCK_TICKS
        ours = sum(p["cpu_s"] for p in procs.values())
        per_s = 1 / seconds if seconds > 0 else 0.0
        server_metrics, scraped = metrics.window_all(self.metrics0, metrics1)
        self.result = {
            "seconds": round(seconds, 3),
            "procs": procs,
            "machine_busy_cores": round(busy * per_s, 3),
            # Interrupt time: mostly the loopback network stack of this very run.
            "irq_cores": round(irq * per_s, 3),
            # CPU of processes we do not measure: a noisy neighbour (another
            # session's benchmark) shows up here.
            "other_cores": round(max(0.0, busy - irq - ours) * per_s, 3),
            # Machine-wide: SYNs dropped because a listen queue was full.
            "listen_overflows": {k: v - self.drops0.get(k, 0) for k, v in drops1.items()},
            "metrics": server_metrics,
            "metrics_scope": metrics_scope(self.target, scraped),
        }
        return self.result


def metrics_scope(target: Target, scraped: list[str]) -> str | None:
    """What C{server_metrics} covers, in words (None when there is no snapshot)."""
    if not scraped:
        return None
    expected = max(target.nodes, target.server_workers)
    if expected == 1:
        return "the server"
    what = "nodes" if target.nodes > 1 else "workers"
    missing = "" if len(scraped) == expected else f" (of {expected}: some did not answer)"
    return f"sum over {len(scraped)} {what}{missing}: " + ", ".join(scraped)


def server_total(procs: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The server's processes added up (CPU, cores, RSS)."""
    out = {"cpu_s": 0.0, "sys_s": 0.0, "cores": 0.0, "rss_before_mb": 0.0, "rss_after_mb": 0.0}
    n = 0
    for name, p in procs.items():
        if is_server(name):
            n += 1
            for key in out:
                out[key] += p.get(key, 0.0)
    total = {k: round(v, 1 if k.startswith("rss") else 3) for k, v in out.items()}
    total["processes"] = n
    return total


def server_rss_mb(samples: Mapping[str, procstat.Sample | None]) -> float:
    return round(sum(s.rss_kb for n, s in samples.items() if s and is_server(n)) / 1024, 1)


def warnings(window: dict[str, Any]) -> list[str]:
    """Reasons not to trust a window's numbers as the server's own."""
    out = []
    cores = os.cpu_count() or 1
    if window["other_cores"] > 0.25:
        out.append(
            f"other processes used {window['other_cores']:.2f} cores during the window "
            "(another benchmark?): rerun on a quiet machine"
        )
    if window["machine_busy_cores"] > 0.9 * cores:
        out.append(
            f"the machine was {window['machine_busy_cores']:.2f}/{cores} cores busy: "
            "throughput may be the machine's, not the server's"
        )
    for name, p in sorted(window["procs"].items()):
        if name.startswith("worker") and p["cores"] > 0.85:
            out.append(f"{name} used {p['cores']:.2f} cores: the load generator may be the limit")
    return out


def costs(window: dict[str, Any], per: float, unit: str = "cpu_ms_per_1k_msgs") -> dict[str, Any]:
    """
    CPU per 1,000 units (delivered messages, auths) for each measured process.
    C{server} is the sum over the server's processes (every node, or the
    supervisor and its workers), C{server_processes} each of them.
    """

    def per_1k(cpu_s: float) -> float | None:
        return round(cpu_s * 1000 / (per / 1000), 3) if per else None

    out: dict[str, Any] = {}
    server: dict[str, Any] = dict(server_total(window["procs"]))
    server[unit] = per_1k(server["cpu_s"])
    out["server"] = server
    out["server_processes"] = {}
    workers_cpu = workers_cores = 0.0
    for name, p in window["procs"].items():
        if name.startswith("worker"):
            workers_cpu += p["cpu_s"]
            workers_cores += p["cores"]
            continue
        entry = dict(p)
        entry[unit] = per_1k(p["cpu_s"])
        if is_server(name):
            out["server_processes"][name.removeprefix("server:")] = entry
        else:
            out[name] = entry
    out["workers"] = {
        "cpu_s": round(workers_cpu, 3),
        "cores": round(workers_cores, 3),
        "per_worker_cores": [
            p["cores"] for n, p in sorted(window["procs"].items()) if n.startswith("worker")
        ],
    }
    return out


# -- targets ----------------------------------------------------------------------------


TRANSPORTS = ("tcp", "ws")


def parse_transports(text: str | None) -> list[str]:
    """C{--transport tcp}, C{ws}, or (pairs) C{tcp,ws}: the transport of each run."""
    out = [t.strip() for t in (text or "tcp").split(",") if t.strip()]
    if not out or any(t not in TRANSPORTS for t in out) or len(set(out)) != len(out):
        raise BenchError(f"--transport takes tcp, ws or tcp,ws, not {text!r}")
    return out


def check_transport_args(args: Any) -> None:
    """
    Resolve C{--target} (its default: imserver alone over WebSocket, the
    relay speaking TCP only) and refuse what cannot be: the relay over
    WebSocket, several transports where only pairs alternates them.
    """
    transports = parse_transports(getattr(args, "transport", "tcp"))
    if getattr(args, "target", "imserver") is None:
        args.target = "imserver" if "ws" in transports else args.target_default
    if "ws" in transports and getattr(args, "target", "imserver") != "imserver":
        raise BenchError("the relay speaks TCP only: --transport ws needs --target imserver")
    if len(transports) > 1:
        if getattr(args, "scenario", "pairs") != "pairs":
            raise BenchError("several transports alternate in pairs only: --transport tcp or ws")
        if len(parse_devices(getattr(args, "devices", None))) > 1:
            raise BenchError("compare devices or transports in one run, not both")
    if "ws" in transports and getattr(args, "endpoint", None) and not args.ws_url:
        raise BenchError("--endpoint with --transport ws needs --ws-url")


def check_server_args(args: Any) -> None:
    """Refuse --nodes / --server-workers where they cannot apply."""
    check_transport_args(args)
    nodes = getattr(args, "nodes", 1)
    server_workers = getattr(args, "server_workers", 1)
    if nodes < 1 or server_workers < 1:
        raise BenchError("--nodes and --server-workers must be at least 1")
    if nodes == server_workers == 1:
        return
    flag = "--nodes" if nodes > 1 else "--server-workers"
    if getattr(args, "endpoint", None):
        raise BenchError(f"{flag} starts its own servers: it cannot drive --endpoint")
    if args.stack != "mysql-redis":
        raise BenchError(
            f"{flag} needs --stack mysql-redis (nodes and workers share one MariaDB database "
            f"and one Redis; the {args.stack} stack cannot be shared between processes)"
        )
    if nodes > 1 and server_workers > 1:
        raise BenchError("--nodes and --server-workers are mutually exclusive")
    if getattr(args, "target", "imserver") == "relay":
        raise BenchError(f"{flag} applies to imserver, not to --target relay")


def with_settings(
    sections: Mapping[str, Mapping[str, Any]] | None, settings: Sequence[str]
) -> dict[str, dict[str, Any]] | None:
    """
    C{sections} with the C{--server-config SECTION.KEY=VALUE} settings added
    (VALUE read as TOML, a bare word as a string).
    """
    if not settings:
        return None if sections is None else {k: dict(v) for k, v in sections.items()}
    out = {k: dict(v) for k, v in (sections or {}).items()}
    for setting in settings:
        name, sep, value = setting.partition("=")
        section, dot, key = name.strip().partition(".")
        if not (sep and dot and section and key):
            raise BenchError(f"--server-config {setting!r}: expected SECTION.KEY=VALUE")
        try:
            parsed: Any = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        out.setdefault(section, {})[key] = parsed
    return out


def imserver_target(args: Any, sections: Mapping[str, Mapping[str, Any]] | None = None) -> Target:
    check_server_args(args)
    if args.endpoint:
        if not args.pid or not args.secret:
            raise BenchError("--endpoint needs --pid and --secret")
        extra = dict(kv.split("=", 1) for kv in args.extra_pid or [])
        return external(
            args.endpoint,
            args.pid,
            args.secret,
            args.http_port,
            {k: int(v) for k, v in extra.items()},
            getattr(args, "ws_url", None),
        ).over(_one_transport(args))
    nodes, server_workers = args.nodes, args.server_workers
    what = args.stack
    if nodes > 1:
        what += f", {nodes} nodes"
    if server_workers > 1:
        what += f", {server_workers} workers"
    sections = with_settings(sections, getattr(args, "server_config", None) or [])
    log(f"starting imserver ({what}) ...")
    try:
        target = start_imserver(args.stack, sections, args.backlog, nodes, server_workers)
    except Exception as e:
        raise BenchError(f"could not start imserver ({what}): {e}") from e
    return target.over(_one_transport(args))


def _one_transport(args: Any) -> str:
    """The transport of the load clients (the first of C{tcp,ws}: pairs switches)."""
    return parse_transports(getattr(args, "transport", "tcp"))[0]


def relay_target(args: Any, secret: str) -> Target:
    return start_relay(
        secret or "bench-relay-secret-0123456789-abcdefgh",
        args.backlog,
        getattr(args, "relay_nagle", False),
        # Several devices per user: the relay pushes to every connection of a uid.
        max(parse_devices(getattr(args, "devices", None))) > 1,
    )


def each_target(
    args: Any,
    run: Callable[[Target], dict[str, Any]],
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """
    Run a scenario against imserver, then the relay (C{--target}), each
    server stopped before the next starts; the relay checks tokens with
    imserver's secret. Results by target name.
    """
    out: dict[str, dict[str, Any]] = {}
    secret = getattr(args, "secret", None) or ""
    if args.target in ("imserver", "both"):
        target = imserver_target(args, sections)
        secret = target.secret
        try:
            out["imserver"] = run(target)
        finally:
            target.stop()
    if args.target in ("relay", "both"):
        relay = relay_target(args, secret)
        try:
            out["relay"] = run(relay)
        finally:
            relay.stop()
    return out


def stack_param(args: Any) -> str:
    return "external" if args.endpoint else str(args.stack)


def merged_errors(results: list[dict[str, Any]]) -> Counter[str]:
    """The workers' error counts, added up."""
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    return errors


def save(result: dict[str, Any], results_dir: str) -> str:
    os.makedirs(results_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = os.path.join(results_dir, f"{result['scenario']}-{stamp}.json")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(results_dir, f"{result['scenario']}-{stamp}-{n}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=False)
        f.write("\n")
    return path


def base_result(scenario: str, args: Any, params: dict[str, Any]) -> dict[str, Any]:
    params.setdefault("backlog", getattr(args, "backlog", None))
    params.setdefault("relay_nagle", getattr(args, "relay_nagle", False))
    params.setdefault("nodes", getattr(args, "nodes", 1))
    params.setdefault("server_workers", getattr(args, "server_workers", 1))
    params.setdefault("transport", getattr(args, "transport", "tcp"))
    return {
        "scenario": scenario,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": params,
        "machine": machine_info(),
    }


def placement(target: Target, pairs: bool) -> str:
    """
    Where the clients connect. Several nodes: pair i's sender on node i % N
    and its recipient on node (i + 1) % N, so every message crosses nodes
    (C{cross-node}); other clients round-robin. Workers: the kernel chooses.
    """
    if target.nodes > 1:
        return "cross-node" if pairs else "round-robin"
    if target.server_workers > 1:
        return "kernel (SO_REUSEPORT over the workers)"
    return "single process"


# -- pairs --------------------------------------------------------------------------------


def run_pairs(
    target: Target,
    params: dict[str, Any],
    uids: Uids,
    progress: Progress,
    label: str,
    extend: Callable[[list[dict[str, Any]]], None] | None = None,
    extra: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]] | None = None,
    around: tuple[Callable[[], None], Callable[[], None]] | None = None,
) -> dict[str, Any]:
    """One pairs run against one target; the numbers of that target.

    C{extend} may change the workers' specs (bench/social.py: more ops mixed
    in, run by C{params["module"]}), C{extra} adds to the numbers from the
    workers' results and the window; C{around} is called at the window's start
    and end (bench/stages.py: a profiler attached for exactly the window)."""
    p, w = params["pairs"], params["workers"]
    rate = params.get("rate")
    specs = []
    first = 0
    for n in split(p, w):
        specs.append(
            {
                "scenario": "pairs",
                "endpoints": target.client_endpoints,
                "first_pair": first,  # pair i: sender on node i % N, recipient (i + 1) % N
                "secret": target.secret,
                "uids": uids.take(2 * n),
                "window": params["window"],
                "rate_per_sender": rate / p if rate else 0,
                "pad": params["pad"],
                "drain_s": params["drain_s"],
                "bind": params.get("bind"),
                "devices": params.get("devices", 1),
            }
        )
        first += n
    if extend is not None:
        extend(specs)
    duration, warmup = params["duration"], params["warmup"]
    with workers(specs, params.get("module", "bench.worker")) as pool:
        pool.wait("ready", 120, lambda: progress.show(f"[{label}] connecting"))
        t_warm = time.monotonic() + 0.3
        t_start = t_warm + warmup
        t_end = t_start + duration
        times = {"t_warm": ns(t_warm), "t_start": ns(t_start), "t_end": ns(t_end)}
        pool.send({"cmd": "start", **times})
        window = Window(target, pool.pids)
        rate_state = {"t": time.monotonic(), "n": 0.0, "rate": 0.0}
        timeline: list[tuple[float, float]] = []

        def tick() -> None:
            now = time.monotonic()
            delivered = pool.total("delivered")
            if now - rate_state["t"] >= 1.0:
                rate_state["rate"] = (delivered - rate_state["n"]) / (now - rate_state["t"])
                rate_state["t"], rate_state["n"] = now, delivered
                timeline.append((round(now - t_start, 2), round(rate_state["rate"], 1)))
            if now < t_start:
                phase = "warm-up"
            elif now < t_end:
                phase = "measuring"
            else:
                phase = "draining"
            elapsed = now - t_warm
            progress.show(
                f"[{label}] {bar(elapsed / (t_end - t_warm))} {elapsed:5.1f}/"
                f"{t_end - t_warm:.0f}s {phase:9} {rate_state['rate']:9.0f} msg/s  "
                f"delivered {int(delivered)}  errors {int(pool.total('errors'))}"
            )

        pool.sleep_until(t_start, tick)
        if around is not None:
            around[0]()
        window.begin()
        pool.sleep_until(t_end, tick)
        win = window.end()
        if around is not None:
            around[1]()
        results = pool.collect(params["drain_s"] + 60, tick)
    progress.done()
    out = summarize_pairs(results, win, params, target)
    if extra is not None:
        out.update(extra(results, win))
    # Delivered msg/s per second of the run (from the workers' progress reports;
    # negative times are the warm-up): a server that slows down shows here.
    out["timeline"] = timeline
    return out


def summarize_pairs(
    results: list[dict[str, Any]], win: dict[str, Any], params: dict[str, Any], target: Target
) -> dict[str, Any]:
    def total(key: str) -> int:
        return sum(r[key] for r in results)

    errors = merged_errors(results)
    duration = win["seconds"]
    in_window = total("delivered_in_window")
    pushes = total("pushes_in_window")
    verify = {
        "sent": total("sent"),
        "ok": total("ok"),
        "expected": total("expected"),
        "expected_msgs": total("expected_msgs"),
        "delivered": total("delivered"),
        "delivered_unique": total("unique"),
        "duplicates": total("duplicates"),
        "missing": total("missing"),
        "reorders": total("reorders"),
        "unexpected": total("unexpected"),
        "no_reply": total("no_reply"),
        "failed_sends": total("failed"),
        "dup_flags": total("dup_flags"),
        "acks_sent": total("acks_sent"),
        "acks_ok": total("acks_ok"),
    }
    verify["exactly_once_in_order"] = (
        verify["duplicates"] == verify["missing"] == verify["reorders"] == 0
        and verify["unexpected"] == verify["no_reply"] == 0
        and verify["delivered_unique"] == verify["expected"]
    )
    out: dict[str, Any] = {
        "target": target.describe(),
        "placement": placement(target, pairs=True),
        "throughput": {
            "offered_msg_s": params.get("rate"),
            "delivered_msg_s": round(in_window / duration, 1),
            "delivered_in_window": in_window,
            "window_s": duration,
            "backlog_at_end": total("backlog_at_end"),
            # Several devices per user: msg pushes received by every device (the
            # recipient's and the sender's other ones), per second of the window.
            "devices": params.get("devices", 1),
            "delivered_pushes_s": round(pushes / duration, 1),
            "pushes_in_window": pushes,
            "pushes_per_msg": round(pushes / in_window, 3) if in_window else None,
        },
        "latency": {
            "send_to_ok": stats.summary(stats.merge(r["lat_ok"] for r in results)),
            "send_to_push": stats.summary(stats.merge(r["lat_push"] for r in results)),
        },
        "errors": dict(errors),
        "connections_by_transport": dict(
            sum((Counter(r.get("connections_by_transport", {})) for r in results), Counter())
        ),
        "verify": verify,
        "cost": costs(win, in_window),
        "machine_busy_cores": win["machine_busy_cores"],
        "irq_cores": win["irq_cores"],
        "other_cores": win["other_cores"],
        "workers_cpu_total_s": [r["worker_cpu_s"] for r in results],
        "warnings": warnings(win),
        "server_metrics": win["metrics"],
        "server_metrics_scope": win["metrics_scope"],
        "reactor_lag": reactor_lag(win["metrics"]),
    }
    return out


def ratio(imserver: dict[str, Any], relay: dict[str, Any]) -> dict[str, Any]:
    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    i_cost = imserver["cost"]["server"].get("cpu_ms_per_1k_msgs")
    r_cost = relay["cost"]["server"].get("cpu_ms_per_1k_msgs")
    i_lat, r_lat = imserver["latency"]["send_to_push"], relay["latency"]["send_to_push"]
    return {
        "throughput": div(
            imserver["throughput"]["delivered_msg_s"], relay["throughput"]["delivered_msg_s"]
        ),
        "server_cpu_per_msg": div(i_cost, r_cost),
        "push_p50": div(i_lat.get("p50_ms"), r_lat.get("p50_ms")),
        "push_p99": div(i_lat.get("p99_ms"), r_lat.get("p99_ms")),
        "meaning": "imserver / relay: throughput below 1 is slower, CPU per message above "
        "1 costs more, latency above 1 is slower",
    }


def parse_devices(text: str | None) -> list[int]:
    """C{--devices 1,3}: the devices per user of each run (default one run of 1)."""
    if not text:
        return [1]
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--devices takes counts separated by commas, not {text!r}") from None
    if not out or any(not 1 <= d <= 1000 for d in out):
        raise BenchError(f"--devices: each count must be 1..1000 (got {text!r})")
    return out


def device_order(devices: list[int], rounds: int) -> list[tuple[int, int]]:
    """(round, devices) of each run: the counts alternate, round after round
    (C{1,3} x 2: 1, 3, 1, 3), so a drift of the machine hits each alike."""
    return [(r, d) for r in range(1, rounds + 1) for d in devices]


def device_sections(devices: list[int]) -> dict[str, dict[str, Any]] | None:
    """Lift C{[devices] max_online} (default 5) when a run needs more."""
    most = max(devices)
    return {"devices": {"max_online": most}} if most > 5 else None


def pairs_params(
    args: Any, rate: float | None = None, devices: int = 1, transport: str | None = None
) -> dict[str, Any]:
    return {
        "pairs": args.pairs,
        "window": args.window,
        "duration": args.duration,
        "warmup": args.warmup,
        "rate": rate if rate is not None else getattr(args, "rate", None),
        "mode": "open" if (rate or getattr(args, "rate", None)) else "closed",
        "pad": args.pad,
        "workers": args.workers,
        "drain_s": args.drain,
        "stack": "none (relay only)" if args.target == "relay" else stack_param(args),
        "target": args.target,
        "devices": devices,
        "transport": transport or _one_transport(args),
    }


def cmd_pairs(args: Any) -> dict[str, Any]:
    devices = parse_devices(getattr(args, "devices", None))
    transports = parse_transports(getattr(args, "transport", "tcp"))
    rounds = getattr(args, "rounds", 1) or 1
    if rounds < 1:
        raise BenchError("--rounds must be at least 1")
    if len(devices) > 1 or len(transports) > 1 or rounds > 1:
        return cmd_pairs_devices(args, devices, rounds, transports)
    params = pairs_params(args, devices=devices[0])
    result = base_result("pairs", args, params)
    uids = Uids()
    progress = Progress(not args.quiet)
    result["targets"] = each_target(
        args,
        lambda target: run_pairs(target, params, uids, progress, target.name),
        device_sections(devices),
    )
    if len(result["targets"]) == 2:
        result["ratio_to_relay"] = ratio(result["targets"]["imserver"], result["targets"]["relay"])
    return result


def cmd_pairs_devices(
    args: Any, devices: list[int], rounds: int, transports: list[str] | None = None
) -> dict[str, Any]:
    """
    C{pairs --devices 1,3 [--rounds R]}, or C{pairs --transport tcp,ws
    [--rounds R]}: one server per target for every run, the device counts
    (or the transports) alternating (L{device_order}); C{runs} holds each
    run's numbers as C{pairs} gives them, C{devices_comparison} (or
    C{transports_comparison}) the medians per count (transport) and their
    ratios to the first one.
    """
    transports = transports or ["tcp"]
    order = [(r, d, tr) for r, d in device_order(devices, rounds) for tr in transports]
    params = pairs_params(args, devices=devices[0], transport=transports[0])
    params.update(
        devices=devices,
        rounds=rounds,
        order=[d for _, d, _ in order],
        transports=transports,
        transport_order=[tr for _, _, tr in order],
    )
    result = base_result("pairs", args, params)
    uids = Uids()
    progress = Progress(not args.quiet)
    runs: list[dict[str, Any]] = [
        {"round": r, "devices": d, "transport": tr, "targets": {}} for r, d, tr in order
    ]

    def run_all(target: Target) -> dict[str, Any]:
        for run in runs:
            label = f"{target.name}, {run['devices']} devices, round {run['round']}"
            if len(transports) > 1:
                label = f"{target.name} over {run['transport']}, round {run['round']}"
            p = pairs_params(args, devices=run["devices"], transport=run["transport"])
            t = run_pairs(target.over(run["transport"]), p, uids, progress, label)
            run["targets"][target.name] = t
            log(f"  {label}: {line_pairs(t)}")
        return {}

    each_target(args, run_all, device_sections(devices))
    for run in runs:
        if len(run["targets"]) == 2:
            run["ratio_to_relay"] = ratio(run["targets"]["imserver"], run["targets"]["relay"])
    result["runs"] = runs
    if len(transports) > 1:
        result["transports_comparison"] = compare_transports(runs, transports)
    else:
        result["devices_comparison"] = compare_devices(runs, devices)
    return result


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else round((values[mid - 1] + values[mid]) / 2, 3)


#: The bar of issue 10: with several devices, messages sent per second at
#: least this fraction of the one-device figure.
DEVICES_BAR = 0.60
#: A run is "quiet" when processes the tool does not measure used at most this
#: many cores in its window (the threshold of L{warnings}).
QUIET_OTHER_CORES = 0.25


def compare_devices(runs: list[dict[str, Any]], devices: list[int]) -> dict[str, Any]:
    """Per target and device count: the median over the rounds of messages/s,
    pushes/s, send->push p99 and server CPU per message; each count's ratio to
    the first count's messages/s (and whether it meets L{DEVICES_BAR}). On a
    shared machine another session's load steals the cores of some runs:
    C{quiet} repeats messages/s and its ratio over the quiet runs alone
    (L{QUIET_OTHER_CORES}), when each count has one."""
    out: dict[str, Any] = {}
    names = sorted({n for run in runs for n in run["targets"]})
    for name in names:
        per: dict[str, Any] = {}
        for d in devices:
            ts = [run["targets"][name] for run in runs if run["devices"] == d]
            per[str(d)] = _group_stats([t for t in ts if t])
        base = per[str(devices[0])]["messages_s"]
        quiet_base = per[str(devices[0])]["quiet"]["messages_s"]
        for d in devices[1:]:
            mine = per[str(d)]["messages_s"]
            r = round(mine / base, 3) if base and mine is not None else None
            per[str(d)]["messages_ratio_to_first"] = r
            if devices[0] == 1 and d > 1:
                per[str(d)]["meets_bar"] = r is not None and r >= DEVICES_BAR
            quiet = per[str(d)]["quiet"]
            if quiet_base and quiet["messages_s"] is not None:
                quiet["messages_ratio_to_first"] = round(quiet["messages_s"] / quiet_base, 3)
        out[name] = per
    out["bar"] = f"messages/s with several devices >= {DEVICES_BAR:.0%} of --devices {devices[0]}"
    return out


def compare_transports(runs: list[dict[str, Any]], transports: list[str]) -> dict[str, Any]:
    """
    Per target and transport: the medians over the rounds (as
    L{compare_devices}), and each transport's ratios to the first one's
    messages/s and server CPU per message (over the quiet runs too, when
    each transport has one).
    """
    out: dict[str, Any] = {}
    names = sorted({n for run in runs for n in run["targets"]})
    for name in names:
        per: dict[str, Any] = {}
        for tr in transports:
            ts = [run["targets"][name] for run in runs if run["transport"] == tr]
            per[tr] = _group_stats([t for t in ts if t])
        first = per[transports[0]]
        for tr in transports[1:]:
            for base, mine in ((first, per[tr]), (first["quiet"], per[tr]["quiet"])):
                mine["messages_ratio_to_first"] = _div(mine["messages_s"], base["messages_s"])
                mine["server_cpu_ratio_to_first"] = _div(
                    mine["server_cpu_ms_per_1k_msgs"], base["server_cpu_ms_per_1k_msgs"]
                )
        out[name] = per
    out["meaning"] = (
        f"ratios to {transports[0]}: msg/s below 1 is slower, server CPU per message above 1 "
        "costs more"
    )
    return out


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _group_stats(ts: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians of some runs of one target (the same devices, the same transport)."""
    quiet = [t for t in ts if t["other_cores"] <= QUIET_OTHER_CORES]
    return {
        "runs": len(ts),
        "messages_s": _median([t["throughput"]["delivered_msg_s"] for t in ts]),
        "messages_s_each": [t["throughput"]["delivered_msg_s"] for t in ts],
        "delivered_pushes_s": _median([t["throughput"]["delivered_pushes_s"] for t in ts]),
        "push_p99_ms": _median([t["latency"]["send_to_push"].get("p99_ms") for t in ts]),
        "ok_p99_ms": _median([t["latency"]["send_to_ok"].get("p99_ms") for t in ts]),
        "server_cores": _median([t["cost"]["server"]["cores"] for t in ts]),
        "server_cpu_ms_per_1k_msgs": _median(
            [t["cost"]["server"]["cpu_ms_per_1k_msgs"] for t in ts]
        ),
        "workers_cores": _median([t["cost"]["workers"]["cores"] for t in ts]),
        "workers_max_core": _median(
            [max(t["cost"]["workers"]["per_worker_cores"] or [0.0]) for t in ts]
        ),
        "machine_busy_cores": _median([t["machine_busy_cores"] for t in ts]),
        "other_cores_each": [t["other_cores"] for t in ts],
        "exactly_once_in_order": all(t["verify"]["exactly_once_in_order"] for t in ts),
        "quiet": {
            "runs": len(quiet),
            "messages_s": _median([t["throughput"]["delivered_msg_s"] for t in quiet]),
            "delivered_pushes_s": _median([t["throughput"]["delivered_pushes_s"] for t in quiet]),
            "push_p99_ms": _median([t["latency"]["send_to_push"].get("p99_ms") for t in quiet]),
            "server_cpu_ms_per_1k_msgs": _median(
                [t["cost"]["server"]["cpu_ms_per_1k_msgs"] for t in quiet]
            ),
        },
    }


# -- sweep ------------------------------------------------------------------------------------


def cmd_sweep(args: Any) -> dict[str, Any]:
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    params = pairs_params(args)
    params.update(rates=rates, mode="open")
    result = base_result("sweep", args, params)
    result["points"] = []
    uids = Uids()
    progress = Progress(not args.quiet)
    targets: list[Target] = []
    try:
        if args.target in ("imserver", "both"):
            targets.append(imserver_target(args))
        if args.target in ("relay", "both"):
            targets.append(relay_target(args, targets[0].secret if targets else ""))
        for rate in rates:
            point: dict[str, Any] = {"offered_msg_s": rate}
            for target in targets:
                point[target.name] = run_pairs(
                    target,
                    pairs_params(args, rate),
                    uids,
                    progress,
                    f"{target.name} @ {rate:.0f}/s",
                )
                log(f"  {target.name} @ {rate:.0f}/s: {line_pairs(point[target.name])}")
            result["points"].append(point)
    finally:
        for t in targets:
            t.stop()
    return result


# -- offline ------------------------------------------------------------------------------------


def cmd_offline(args: Any) -> dict[str, Any]:
    p, n = args.pairs, args.messages
    params = {
        "pairs": p,
        "messages": n,
        "window": args.window,
        "limit": args.limit,
        "pad": args.pad,
        "workers": args.workers,
        "stack": stack_param(args),
    }
    result = base_result("offline", args, params)
    per_pair = split(n, p) if n >= p else [1] * n
    target = imserver_target(args)
    uids = Uids()
    progress = Progress(not args.quiet)
    try:
        specs = []
        i = 0
        for k in split(len(per_pair), args.workers):
            specs.append(
                {
                    "scenario": "offline",
                    "endpoints": target.client_endpoints,
                    "first_pair": i,
                    "secret": target.secret,
                    "uids": uids.take(2 * k),
                    "counts": per_pair[i : i + k],
                    "window": args.window,
                    "limit": args.limit,
                    "pad": args.pad,
                }
            )
            i += k
        with workers(specs) as pool:
            t0 = time.monotonic()

            def tick(phase: str, key: str, total: int) -> Callable[[], None]:
                def show() -> None:
                    done = pool.total(key)
                    el = time.monotonic() - t0
                    progress.show(
                        f"[offline] {phase} {bar(done / max(total, 1))} {el:5.1f}s "
                        f"{int(done)}/{total}  errors {int(pool.total('errors'))}"
                    )

                return show

            pool.wait("ready", 120, lambda: progress.show("[offline] connecting"))
            send_win = Window(target, pool.pids)
            send_win.begin()
            t0 = time.monotonic()
            pool.send({"cmd": "start"})
            sent = pool.wait("sent", 600, tick("queueing", "ok", n))
            t_sent = max(e["t"] for e in sent) / 1e9
            sending = send_win.end()
            drain_win = Window(target, pool.pids)
            drain_win.begin()
            t_drain = time.monotonic()
            pool.send({"cmd": "drain"})
            drained = pool.wait("drained", 600, tick("draining", "drained", n))
            t_drained = max(e["t"] for e in drained) / 1e9
            draining = drain_win.end()
            pool.send({"cmd": "stop"})
            results = pool.collect(60)
        progress.done()
    finally:
        target.stop()

    def total(key: str) -> int:
        return sum(r[key] for r in results)

    errors = merged_errors(results)
    queue_s = t_sent - send_win.t0
    drain_s = t_drained - t_drain
    verify = {
        k: total(k)
        for k in (
            *("sent", "ok", "failed", "expected", "drained", "unique", "duplicates"),
            *("reorders", "missing", "pushes_during_drain"),
        )
    }
    verify["exactly_once_in_order"] = (
        verify["unique"] == verify["expected"] == verify["ok"]
        and verify["duplicates"] == verify["reorders"] == verify["missing"] == 0
    )
    result["targets"] = {
        "imserver": {
            "target": target.describe(),
            "placement": placement(target, pairs=True),
            "queue": {
                "seconds": round(queue_s, 3),
                "msg_s": round(total("ok") / queue_s, 1) if queue_s > 0 else None,
                "cost": costs(sending, total("ok")),
                "warnings": warnings(sending),
                "server_metrics": sending["metrics"],
                "server_metrics_scope": sending["metrics_scope"],
            },
            "drain": {
                "seconds": round(drain_s, 3),
                "drained_msg_s": round(total("unique") / drain_s, 1) if drain_s > 0 else None,
                "cost": costs(draining, total("unique")),
                "warnings": warnings(draining),
                "other_cores": draining["other_cores"],
                "server_metrics": draining["metrics"],
                "server_metrics_scope": draining["metrics_scope"],
            },
            "errors": dict(errors),
            "verify": verify,
        }
    }
    return result


# -- catchup ------------------------------------------------------------------------------------

#: The device name of the catch-up benchmark's device.
CATCHUP_DEVICE = "bench-catchup"


def cmd_catchup(args: Any) -> dict[str, Any]:
    """
    A device that missed C{--messages} N: it registers (auth with its device
    name), leaves; C{--senders} S send N messages to its user, W in flight
    each, as fast as they are answered; after C{--settle} seconds the device
    comes back with C{since} and pages C{catchup} (C{--limit}) until C{more}
    is false. Timed from its reconnect to the last page; the server's CPU
    (and MariaDB's, Redis's) in a window around that. The device must get
    exactly the N messages, once each, in order (L{StreamCheck}).
    """
    n, senders = args.messages, max(1, min(args.senders, args.messages or 1))
    params = {
        "messages": n,
        "senders": senders,
        "window": args.window,
        "limit": args.limit,
        "pad": args.pad,
        "workers": args.workers,
        "settle_s": args.settle,
        "stack": stack_param(args),
    }
    result = base_result("catchup", args, params)
    counts = split(n, senders) if n else []
    uids = Uids()
    user = uids.take(1)[0]
    sender_uids = uids.take(len(counts))
    expected = {str(u): c for u, c in zip(sender_uids, counts, strict=True)}
    target = imserver_target(args)
    progress = Progress(not args.quiet)
    try:
        specs = []
        i = 0
        for w, k in enumerate(split(len(counts), args.workers) if counts else [0]):
            specs.append(
                {
                    "scenario": "catchup",
                    "endpoints": target.client_endpoints,
                    "first": i,
                    "secret": target.secret,
                    "user": user,
                    "uids": sender_uids[i : i + k],
                    "counts": counts[i : i + k],
                    "expected": expected,
                    "device": CATCHUP_DEVICE if w == 0 else None,
                    "window": args.window,
                    "limit": args.limit,
                    "pad": args.pad,
                }
            )
            i += k
        with workers(specs) as pool:
            t0 = time.monotonic()

            def tick(phase: str, key: str) -> Callable[[], None]:
                def show() -> None:
                    done = pool.total(key)
                    el = time.monotonic() - t0
                    progress.show(
                        f"[catchup] {phase} {bar(done / max(n, 1))} {el:5.1f}s "
                        f"{int(done)}/{n}  errors {int(pool.total('errors'))}"
                    )

                return show

            pool.wait("ready", 120, lambda: progress.show("[catchup] connecting"))
            send_win = Window(target, pool.pids)
            send_win.begin()
            t0 = time.monotonic()
            pool.send({"cmd": "start"})
            sent = pool.wait("sent", 600, tick("sending", "ok"))
            t_sent = max(e["t"] for e in sent) / 1e9
            sending = send_win.end()
            # The server's work after the replies (pushes to nobody, hot-store
            # writes) is left out of the catch-up's window.
            pool.sleep_until(time.monotonic() + args.settle)
            win = Window(target, pool.pids)
            win.begin()
            t0 = time.monotonic()
            pool.send({"cmd": "catchup"})
            caught = pool.wait("caught_up", 600, tick("catching up", "events"))
            catching = win.end()
            pool.wait("acked", 60)
            pool.send({"cmd": "stop"})
            results = pool.collect(60)
        progress.done()
    finally:
        target.stop()
    dev = next(e for e in caught if e["device"])
    mine = next(r for r in results if r["device"])
    check = mine["check"] or {}
    seconds = (dev["t_done"] - dev["t_connect"]) / 1e9 if dev["t_done"] else None
    events = dev["events"]
    errors = merged_errors(results)
    queue_s = t_sent - send_win.t0
    ok = sum(r["ok"] for r in results)
    verify = {
        "sent": sum(r["sent"] for r in results),
        "ok": ok,
        "failed_sends": sum(r["failed"] for r in results),
        **check,
        "pushes_during_catchup": mine["pushes_during_catchup"],
        "device_failed": mine["device_failed"],
        "reset": bool(mine["auth"].get("reset")),
    }
    verify["ok_exactly"] = (
        ok == n
        and bool(check.get("exactly_once_in_order"))
        and check.get("msg_events") == n
        and not verify["device_failed"]
        and not verify["reset"]
        and not errors
    )
    server = costs(catching, events, "cpu_ms_per_1k_events")
    result["targets"] = {
        "imserver": {
            "target": target.describe(),
            "placement": placement(target, pairs=False),
            "queue": {
                "seconds": round(queue_s, 3),
                "msg_s": round(ok / queue_s, 1) if queue_s > 0 else None,
                "cost": costs(sending, ok),
                "warnings": warnings(sending),
            },
            "catchup": {
                "seconds": round(seconds, 3) if seconds is not None else None,
                "auth_ms": round((dev["t_authed"] - dev["t_connect"]) / 1e6, 2)
                if dev["t_authed"]
                else None,
                "events": events,
                "pages": dev["pages"],
                "limit": args.limit,
                "events_s": round(events / seconds, 1) if seconds else None,
                "server_cpu_s": server["server"]["cpu_s"],
                "window_s": catching["seconds"],
                "cost": server,
                "warnings": warnings(catching),
                "other_cores": catching["other_cores"],
                "server_metrics": catching["metrics"],
                "server_metrics_scope": catching["metrics_scope"],
            },
            "first_auth": mine["first_auth"],
            "auth": mine["auth"],
            "position_before": mine["position_before"],
            "errors": dict(errors),
            "verify": verify,
        }
    }
    return result


# -- idle ---------------------------------------------------------------------------------------


#: Connections per loopback source address when the tool picks their number:
#: well under one address's ephemeral ports (28,232 with the default range).
PER_SOURCE = 10000


def ephemeral_ports() -> int:
    """How many local ports a source address has for outgoing connections
    (C{net.ipv4.ip_local_port_range}; the default range if it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return high - low + 1


def source_addresses(connections: int, sources: int | None, minimum: int = 0) -> list[str] | None:
    """
    The loopback source addresses 127.0.0.2, .3, ... the load clients bind
    before they connect, spread round robin: each address has its own range
    of ephemeral ports, and one range (~28,000) cannot hold 100,000
    connections to one server port. C{sources}: how many (C{--sources}); None
    or 0: one per L{PER_SOURCE} connections, at least C{minimum} (None, no
    bind, when that is 0 and one range suffices). Refused when an address
    would need more connections than it has ports.
    """
    if sources is not None and sources < 0:
        raise BenchError("--sources must be at least 1 (0: automatic)")
    if sources and sources > 254:
        raise BenchError("--sources: at most 254 addresses (127.0.0.2 .. 127.0.0.255)")
    if not sources:
        needed = math.ceil(connections / PER_SOURCE)
        if needed <= 1 and not minimum:
            return None
        sources = max(minimum, needed)
    per_source = math.ceil(connections / sources)
    ports = ephemeral_ports()
    if per_source > ports:
        raise BenchError(
            f"{connections} connections over {sources} source addresses is {per_source} "
            f"per address, more than its {ports} ephemeral ports "
            f"(net.ipv4.ip_local_port_range): use --sources {math.ceil(connections / ports)} "
            "or more"
        )
    return [f"127.0.0.{2 + i}" for i in range(sources)]


def run_idle(target: Target, args: Any, uids: Uids, progress: Progress) -> dict[str, Any]:
    c = args.connections
    heartbeat = args.heartbeat
    nworkers = max(args.workers, math.ceil(c / MAX_PER_WORKER))
    measure = args.measure or max(3 * heartbeat, 10.0)
    label = f"[idle {target.name}]"
    bind = source_addresses(c, getattr(args, "sources", None), minimum=2)
    specs = []
    first = 0
    for k in split(c, nworkers):
        specs.append(
            {
                "scenario": "idle",
                "endpoints": target.client_endpoints,
                "first": first,  # connection i on node i % N
                "secret": target.secret,
                "uids": uids.take(k),
                "heartbeat": heartbeat,
                "bind": bind,
                "concurrency": max(1, getattr(args, "concurrency", 25)),
            }
        )
        first += k
    with workers(specs) as pool:
        pool.wait("ready", 300, lambda: progress.show(f"{label} minting tokens"))
        fds_before = procstat.open_files(target.measured_pids())
        base = Window(target, scrape=False)
        base.begin()
        time.sleep(args.baseline)
        baseline = base.end()
        t0 = time.monotonic()
        pool.send({"cmd": "connect"})
        connected = pool.wait(
            "connected",
            # 100,000 over 2 busy cores take minutes (~150-300 auths/s).
            max(600, c / 50),
            lambda: progress.show(
                f"{label} connecting {bar(pool.total('connected') / c)} "
                f"{int(pool.total('connected'))}/{c} {time.monotonic() - t0:5.1f}s  "
                f"errors {int(pool.total('errors'))}"
            ),
        )
        connect_s = time.monotonic() - t0
        ok = sum(e["ok"] for e in connected)
        pool.sleep_until(time.monotonic() + args.settle)
        after_connect = procstat.sample_all(target.measured_pids())
        fds_after = procstat.open_files(target.measured_pids())
        win = Window(target, pool.pids)
        pool.send({"cmd": "mark"})
        marks0 = pool.wait("mark", 30)
        win.begin()
        t_end = time.monotonic() + measure

        def show() -> None:
            left = t_end - time.monotonic()
            progress.show(
                f"{label} heartbeats {bar(1 - left / measure)} {ok} connections, "
                f"{left:4.1f}s left  errors {int(pool.total('errors'))}"
            )

        beside = None
        if getattr(args, "load_pairs", 0):
            # The pairs load beside the idle connections (issue 13: no stall):
            # the pings are timed meanwhile, the idle workers read afterwards.
            beside = run_pairs(
                target, idle_pairs_params(args), uids, progress, f"idle {target.name} + pairs"
            )
        pool.sleep_until(t_end, show)
        loaded = win.end()
        pool.send({"cmd": "mark"})
        marks1 = pool.wait("mark", 30)
        pool.send({"cmd": "stop"})
        results = pool.collect(60)
    progress.done()
    errors = merged_errors(results)
    # Every server process added up (nodes, or the supervisor and its workers).
    server_before = server_total(baseline["procs"])
    rss_before = server_before["rss_after_mb"]
    rss_after = server_rss_mb(after_connect)
    per_process = {
        name.removeprefix("server:"): {
            "before": baseline["procs"].get(name, {}).get("rss_after_mb"),
            "after": round(sample.rss_kb / 1024, 1),
        }
        for name, sample in after_connect.items()
        if sample and is_server(name)
    }
    # Connections open when RSS was read (the mark right after it): fewer than
    # authenticated if some were closed meanwhile (an overloaded machine).
    open_at_rss = sum(m.get("open", 0) for m in marks0) or ok
    pings = sum(m["pings"] for m in marks1) - sum(m["pings"] for m in marks0)
    pongs = sum(m["pongs"] for m in marks1) - sum(m["pongs"] for m in marks0)
    cpu_loaded = server_total(loaded["procs"])["cores"]
    cpu_base = server_before["cores"]
    heartbeat_cpu = max(0.0, cpu_loaded - cpu_base)
    pings_s = pings / loaded["seconds"]
    return {
        "target": target.describe(),
        "placement": placement(target, pairs=False),
        "connections": ok,
        "connect_s": round(connect_s, 3),
        "server_rss_mb": {"before": rss_before, "after": rss_after},
        "server_rss_mb_per_process": per_process,
        # The server's descriptors before connecting (its own) and after, per process.
        "server_open_files": {
            name.removeprefix("server:"): {"before": fds_before.get(name), "after": n}
            for name, n in fds_after.items()
            if is_server(name)
        },
        "connections_open_at_rss": open_at_rss,
        "rss_kb_per_connection": (
            round((rss_after - rss_before) * 1024 / open_at_rss, 2) if open_at_rss else None
        ),
        "server_cpu": {
            "idle_no_connections_cores": cpu_base,
            "with_heartbeats_cores": cpu_loaded,
            "heartbeat_ms_per_s": round(heartbeat_cpu * 1000, 2),
            "pings_per_s": round(pings_s, 1),
            "pongs_per_s": round(pongs / loaded["seconds"], 1),
            "us_per_ping": round(heartbeat_cpu * 1e6 / pings_s, 1) if pings else None,
        },
        "latency": {
            "connect_auth": stats.summary(stats.merge(r["lat_connect"] for r in results)),
            "tcp_connect": stats.summary(stats.merge(r["lat_tcp"] for r in results)),
            "ping_rtt": stats.summary(stats.merge(r["lat_ping"] for r in results)),
            # The load workers' own lateness (a 20 ms tick's): the part of a
            # ping's round trip that is the tool's, not the server's.
            "worker_lag": stats.summary(stats.merge(r.get("lat_tick", {}) for r in results)),
        },
        "errors": dict(errors),
        "cost": costs(loaded, pings, "cpu_ms_per_1k_pings"),
        "warnings": warnings(loaded),
        "other_cores": loaded["other_cores"],
        "server_metrics": loaded["metrics"],
        "server_metrics_scope": loaded["metrics_scope"],
        "gc_longest_pause_ms": gc_longest_pause_ms(loaded["metrics"]),
        "gc_window_pause_at_most_ms": gc_window_pause_ms(loaded["metrics"]),
        "gc_longest_pause_cpu_ms": gc_longest_pause_ms(loaded["metrics"], cpu=True),
        "reactor_lag": reactor_lag(loaded["metrics"]),
        "load_pairs": (
            None if beside is None else {"pairs": args.load_pairs, **idle_pairs_summary(beside)}
        ),
    }


def idle_pairs_params(args: Any) -> dict[str, Any]:
    """C{idle --load-pairs P}: a closed-loop pairs run (C{--load-window} in flight)."""
    return {
        "pairs": args.load_pairs,
        "window": args.load_window,
        "duration": args.load_duration,
        "warmup": 1.0,
        "rate": None,
        "mode": "closed",
        "pad": 0,
        "workers": 1,
        "drain_s": 3.0,
        "devices": 1,
    }


def idle_pairs_summary(t: dict[str, Any]) -> dict[str, Any]:
    """What the pairs load beside the idle connections measured."""
    return {
        "delivered_msg_s": t["throughput"]["delivered_msg_s"],
        "send_to_ok": t["latency"]["send_to_ok"],
        "send_to_push": t["latency"]["send_to_push"],
        "errors": t["errors"],
        "exactly_once_in_order": t["verify"]["exactly_once_in_order"],
    }


def gc_longest_pause_ms(server_metrics: dict[str, Any] | None, cpu: bool = False) -> float | None:
    """
    The server's longest gc pause since it started, any generation, in wall
    clock or (C{cpu}) CPU time of the collector (None: not reported).
    """
    prefix = "imserver_gc_pause_longest_cpu_ms" if cpu else "imserver_gc_pause_longest_ms"
    values = [v for k, v in (server_metrics or {}).items() if k.startswith(prefix)]
    return max(values) if values else None


def gc_window_pause_ms(server_metrics: dict[str, Any] | None) -> float | None:
    """
    The longest gc pause inside the measured window, as the bound of its
    histogram bucket (the since-start gauge includes start-up and the connect
    storm); None: none observed or not reported.
    """
    tops = [
        v["max_at_most_ms"]
        for k, v in (server_metrics or {}).items()
        if k.startswith("imserver_gc_pause_seconds") and isinstance(v, dict)
        if v.get("max_at_most_ms") is not None
    ]
    return max(tops) if tops else None


def reactor_lag(server_metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """
    The server's reactor lag over the window (p50/p99 interpolated, the
    largest as its bucket's bound) and the longest since start (None: not
    reported, e.g. the relay).
    """
    lag = (server_metrics or {}).get("imserver_reactor_lag_seconds")
    if lag is None:
        return None
    top = lag.get("max_at_most_ms")
    longest = (server_metrics or {}).get("imserver_reactor_lag_longest_ms")
    # The longest since start bounds the window's too (tighter than a bucket).
    if top is None or (longest is not None and longest < top):
        top = longest

    def capped(q: float | None) -> float | None:
        # Interpolated inside a bucket, a quantile may pass the largest lag.
        return q if q is None or top is None else min(q, top)

    return {
        "p50_ms": capped(lag["p50_ms"]),
        "p99_ms": capped(lag["p99_ms"]),
        "max_at_most_ms": top,
        "longest_since_start_ms": longest,
    }


def lag_text(t: dict[str, Any]) -> str:
    lag = t.get("reactor_lag")
    if not lag:
        return ""
    return f"; reactor lag p99 {lag['p99_ms']} max <= {lag['max_at_most_ms']} ms"


def cmd_idle(args: Any) -> dict[str, Any]:
    heartbeat = args.heartbeat
    params = {
        "connections": args.connections,
        "heartbeat": heartbeat,
        "measure_s": args.measure or max(3 * heartbeat, 10.0),
        "load_pairs": getattr(args, "load_pairs", 0),
        "concurrency_per_worker": max(1, getattr(args, "concurrency", 25)),
        "baseline_s": args.baseline,
        "workers": max(args.workers, math.ceil(args.connections / MAX_PER_WORKER)),
        # Checked before any server starts (too few for the ports: refused).
        "sources": source_addresses(args.connections, getattr(args, "sources", None), minimum=2),
        "stack": stack_param(args),
        "target": args.target,
    }
    result = base_result("idle", args, params)
    uids = Uids()
    progress = Progress(not args.quiet)
    sections = {
        "server": {
            # The server accepts 1..3600; clients ping every `heartbeat` anyway.
            "heartbeat_seconds": float(min(max(heartbeat, 1), 3600)),
            "idle_timeout_seconds": float(max(3 * heartbeat, 30)),
        }
    }
    result["targets"] = each_target(
        args, lambda target: run_idle(target, args, uids, progress), sections
    )
    return result


# -- connect ---------------------------------------------------------------------------------------


def run_connect(target: Target, args: Any, uids: Uids, progress: Progress) -> dict[str, Any]:
    c = args.clients
    nworkers = max(args.workers, math.ceil(c / MAX_PER_WORKER))
    bind = source_addresses(c, getattr(args, "sources", None))
    specs = []
    first = 0
    for k in split(c, nworkers):
        specs.append(
            {
                "scenario": "connect",
                "endpoints": target.client_endpoints,
                "first": first,  # client i on node i % N
                "secret": target.secret,
                "uids": uids.take(k),
                "concurrency": args.concurrency or k,
                "bind": bind,
            }
        )
        first += k
    with workers(specs) as pool:
        pool.wait("ready", 300, lambda: progress.show(f"[connect {target.name}] minting tokens"))
        win = Window(target, pool.pids)
        win.begin()
        t_start = time.monotonic() + 0.2
        pool.send({"cmd": "start", "t_start": ns(t_start)})
        done = pool.wait(
            "done",
            max(300, c / 50),
            lambda: progress.show(
                f"[connect {target.name}] {bar(pool.total('connected') / c)} "
                f"{int(pool.total('connected'))}/{c} {time.monotonic() - t_start:5.1f}s  "
                f"errors {int(pool.total('errors'))}"
            ),
        )
        loaded = win.end()
        pool.send({"cmd": "stop"})
        results = pool.collect(60)
    progress.done()
    ok = sum(e["ok"] for e in done)
    last = max(r["last_done"] for r in results) / 1e9
    elapsed = last - t_start
    errors = merged_errors(results)
    return {
        "target": target.describe(),
        "placement": placement(target, pairs=False),
        "clients": c,
        "ok": ok,
        "seconds": round(elapsed, 3),
        "auths_per_s": round(ok / elapsed, 1) if elapsed > 0 else None,
        "latency": {
            "connect_auth": stats.summary(stats.merge(r["lat_connect"] for r in results)),
            "tcp_connect": stats.summary(stats.merge(r["lat_tcp"] for r in results)),
        },
        "listen_overflows": loaded["listen_overflows"],
        "warnings": warnings(loaded),
        "errors": dict(errors),
        "cost": costs(loaded, ok, "cpu_ms_per_1k_auths"),
        "other_cores": loaded["other_cores"],
        "server_metrics": loaded["metrics"],
        "server_metrics_scope": loaded["metrics_scope"],
    }


def cmd_connect(args: Any) -> dict[str, Any]:
    params = {
        "clients": args.clients,
        "concurrency": args.concurrency or "all at once",
        "workers": max(args.workers, math.ceil(args.clients / MAX_PER_WORKER)),
        "sources": source_addresses(args.clients, getattr(args, "sources", None)),
        "stack": stack_param(args),
        "target": args.target,
    }
    result = base_result("connect", args, params)
    uids = Uids()
    progress = Progress(not args.quiet)
    result["targets"] = each_target(args, lambda target: run_connect(target, args, uids, progress))
    return result


# -- one-line summaries --------------------------------------------------------------------------


def tag(t: dict[str, Any]) -> str:
    """C{" [3 nodes, cross-node]"}, C{" [over ws, 2 workers, ...]"}, or nothing for one
    process over TCP."""
    d = t.get("target") or {}
    parts = []
    if d.get("nodes", 1) > 1:
        parts.append(f"{d['nodes']} nodes")
    if d.get("server_workers", 1) > 1:
        parts.append(f"{d['server_workers']} workers")
    if parts and t.get("placement"):
        parts.append(t["placement"])
    if d.get("transport", "tcp") != "tcp":
        parts.insert(0, f"over {d['transport']}")
    return f" [{', '.join(parts)}]" if parts else ""


def server_cores(server: dict[str, Any]) -> str:
    n = server.get("processes", 1)
    return f"{server['cores']:.2f} cores" + (f" (sum of {n} processes)" if n > 1 else "")


def line_pairs(t: dict[str, Any]) -> str:
    th, lat, v = t["throughput"], t["latency"], t["verify"]
    ok, push = lat["send_to_ok"], lat["send_to_push"]
    server = t["cost"]["server"]
    devices = th.get("devices", 1)
    pushes = (
        f" ({th['delivered_pushes_s']:.0f} pushes/s, {devices} devices per user)"
        if devices > 1
        else ""
    )
    return (
        f"{th['delivered_msg_s']:.0f} msg/s delivered{pushes}; send->ok p50 {ok.get('p50_ms')} "
        f"p99 {ok.get('p99_ms')} ms; send->push p50 {push.get('p50_ms')} p99 "
        f"{push.get('p99_ms')} p99.9 {push.get('p99.9_ms')} ms; server "
        f"{server_cores(server)}, {server['cpu_ms_per_1k_msgs']} CPU-ms/1k msgs; "
        f"workers {t['cost']['workers']['cores']:.2f} cores; "
        f"errors {sum(t['errors'].values())}; exactly once in order: "
        f"{v['exactly_once_in_order']}" + lag_text(t)
    )


def _warning_lines(result: dict[str, Any]) -> list[str]:
    lines = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for w in node.get("warnings", []):
                lines.append(f"warning ({where}): {w}")
            for k, v in node.items():
                if k != "warnings" and isinstance(v, dict | list):
                    walk(v, f"{where}/{k}" if where else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(result.get("targets") or result.get("points") or result.get("runs"), "")
    return lines


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = _warning_lines(result)
    scenario = result["scenario"]
    if scenario == "pairs" and "transports_comparison" in result:
        for run in result["runs"]:
            for name, t in run["targets"].items():
                lines.append(
                    f"{run['transport']}, round {run['round']}, {name}{tag(t)}: {line_pairs(t)}"
                )
        for name, per in result["transports_comparison"].items():
            if name == "meaning":
                continue
            for tr, c in per.items():
                vs, cpu = c.get("messages_ratio_to_first"), c.get("server_cpu_ratio_to_first")
                lines.append(
                    f"{name} over {tr} (median of {c['runs']}): {c['messages_s']} msg/s "
                    f"{c['messages_s_each']}, send->push p99 {c['push_p99_ms']} ms, server "
                    f"{c['server_cores']} cores, {c['server_cpu_ms_per_1k_msgs']} CPU-ms/1k msgs, "
                    f"load workers {c['workers_cores']} cores"
                    + (f"; x{vs} msg/s, x{cpu} server CPU/msg of the first" if vs else "")
                )
                q = c["quiet"]
                if q["runs"] and q["runs"] < c["runs"]:
                    lines.append(
                        f"  quiet runs only ({q['runs']} of {c['runs']}, other processes <= "
                        f"{QUIET_OTHER_CORES} cores): {q['messages_s']} msg/s, "
                        f"{q['server_cpu_ms_per_1k_msgs']} server CPU-ms/1k msgs"
                    )
    elif scenario == "pairs" and "runs" in result:
        for run in result["runs"]:
            for name, t in run["targets"].items():
                lines.append(
                    f"{run['devices']} devices, round {run['round']}, {name}{tag(t)}: "
                    f"{line_pairs(t)}"
                )
        comparison = result["devices_comparison"]
        for name, per in comparison.items():
            if name == "bar":
                continue
            for d, c in per.items():
                vs = c.get("messages_ratio_to_first")
                lines.append(
                    f"{name} {d} devices (median of {c['runs']}): {c['messages_s']} msg/s, "
                    f"{c['delivered_pushes_s']} pushes/s, send->push p99 {c['push_p99_ms']} ms, "
                    f"server {c['server_cores']} cores, load workers {c['workers_cores']} cores"
                    + (f"; msg/s x{vs} of the first count" if vs is not None else "")
                    + (
                        f" (bar >= {DEVICES_BAR:.2f}: {'met' if c['meets_bar'] else 'MISSED'})"
                        if "meets_bar" in c
                        else ""
                    )
                )
                q = c["quiet"]
                if q["runs"] and q["runs"] < c["runs"]:
                    qvs = q.get("messages_ratio_to_first")
                    lines.append(
                        f"  quiet runs only ({q['runs']} of {c['runs']}, other processes <= "
                        f"{QUIET_OTHER_CORES} cores): {q['messages_s']} msg/s, "
                        f"{q['server_cpu_ms_per_1k_msgs']} server CPU-ms/1k msgs"
                        + (f"; msg/s x{qvs} of the first count" if qvs is not None else "")
                    )
    elif scenario == "pairs":
        for name, t in result["targets"].items():
            lines.append(f"{name}{tag(t)}: {line_pairs(t)}")
        if "ratio_to_relay" in result:
            r = result["ratio_to_relay"]
            lines.append(
                f"imserver/relay: throughput x{r['throughput']}, server CPU per message "
                f"x{r['server_cpu_per_msg']}, push p50 x{r['push_p50']}, p99 x{r['push_p99']}"
            )
    elif scenario == "sweep":
        for point in result["points"]:
            for name in ("imserver", "relay"):
                if name in point:
                    offered = point["offered_msg_s"]
                    t = point[name]
                    lines.append(f"@{offered:.0f}/s {name}{tag(t)}: {line_pairs(t)}")
    elif scenario == "offline":
        t = result["targets"]["imserver"]
        lines.append(
            f"imserver{tag(t)}: queued {t['verify']['ok']} msgs at {t['queue']['msg_s']} msg/s; "
            f"drained {t['verify']['unique']} at {t['drain']['drained_msg_s']} msg/s "
            f"(server {t['drain']['cost']['server']['cpu_ms_per_1k_msgs']} CPU-ms/1k); "
            f"errors {sum(t['errors'].values())}; exactly once in order: "
            f"{t['verify']['exactly_once_in_order']}"
        )
    elif scenario == "catchup":
        t = result["targets"]["imserver"]
        c, v = t["catchup"], t["verify"]
        cost = c["cost"]
        backends = "".join(
            f", {name} {cost[name]['cpu_s']} s" for name in ("mariadb", "redis") if name in cost
        )
        lines.append(
            f"imserver{tag(t)}: sent {v['ok']} msgs at {t['queue']['msg_s']} msg/s; the device "
            f"caught up {c['events']} events in {c['pages']} pages in {c['seconds']} s = "
            f"{c['events_s']} events/s; server CPU {c['server_cpu_s']} s "
            f"({cost['server']['cpu_ms_per_1k_events']} CPU-ms/1k events{backends}); "
            f"{v.get('msg_events')} msg events of {result['params']['messages']}: "
            f"exactly once in order: {v['ok_exactly']}"
            + (f"; failed: {v['device_failed']}" if v["device_failed"] else "")
        )
    elif scenario == "idle":
        for name, t in result["targets"].items():
            cpu = t["server_cpu"]
            n = t["cost"]["server"].get("processes", 1)
            summed = f", sum of {n} processes" if n > 1 else ""
            lines.append(
                f"{name}{tag(t)}: {t['connections']} idle connections: "
                f"{t['rss_kb_per_connection']} KiB RSS each ({t['server_rss_mb']['before']} -> "
                f"{t['server_rss_mb']['after']} MiB{summed}); "
                f"heartbeats {cpu['pings_per_s']} pings/s cost {cpu['heartbeat_ms_per_s']} "
                f"CPU-ms/s ({cpu['us_per_ping']} us/ping); ping rtt p99 "
                f"{t['latency']['ping_rtt'].get('p99_ms')} ms (load workers' lag p99 "
                f"{t['latency'].get('worker_lag', {}).get('p99_ms')} ms); "
                f"errors {sum(t['errors'].values())}"
                + (
                    f"; longest gc pause {t['gc_longest_pause_ms']} ms"
                    f" ({t.get('gc_longest_pause_cpu_ms')} ms CPU; in the window "
                    + (
                        f"<= {t['gc_window_pause_at_most_ms']} ms)"
                        if t.get("gc_window_pause_at_most_ms") is not None
                        else "none)"
                    )
                    if t.get("gc_longest_pause_ms") is not None
                    else ""
                )
                + lag_text(t)
            )
            beside = t.get("load_pairs")
            if beside:
                lines.append(
                    f"  + pairs beside: {beside['delivered_msg_s']} msg/s, send->push p99 "
                    f"{beside['send_to_push'].get('p99_ms')} ms, exactly once in order "
                    f"{beside['exactly_once_in_order']}"
                )
    elif scenario == "connect":
        for name, t in result["targets"].items():
            lat = t["latency"]["connect_auth"]
            lines.append(
                f"{name}{tag(t)}: {t['ok']}/{t['clients']} authenticated in {t['seconds']} s = "
                f"{t['auths_per_s']} auths/s; connect+auth p50 {lat.get('p50_ms')} p99 "
                f"{lat.get('p99_ms')} ms; server {server_cores(t['cost']['server'])}, "
                f"{t['cost']['server']['cpu_ms_per_1k_auths']} CPU-ms/1k auths; "
                f"errors {sum(t['errors'].values())}"
            )
    return lines
