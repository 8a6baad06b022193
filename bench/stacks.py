"""
What the benchmark drives: an imserver the tool starts (``embedded`` or
``mysql-redis``, through L{tests.harness}; on ``mysql-redis`` optionally
several nodes or one config with several worker processes), an imserver
already running (``--endpoint``/``--pid``/``--secret``), or the baseline relay.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from bench import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The rate limit lifted: the benchmark measures the server, not the limiter.
LIMITS_LIFTED = {"send_per_second": 1000000.0, "send_burst": 1000000}

#: [storage].key_prefix of the nodes the tool starts (one cluster on its own Redis).
KEY_PREFIX = "bench"


def is_server(name: str) -> bool:
    """Whether a measured process name is one of the server's processes."""
    return name == "server" or name.startswith("server:")


def children(pid: int) -> list[int]:
    """The child processes of C{pid} (all its threads' children), from /proc."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return sorted(set(out))


def worker_index(pid: int) -> str:
    """The C{--worker-index} of a worker process (its pid if unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        return argv[argv.index(b"--worker-index") + 1].decode()
    except (OSError, ValueError, IndexError):
        return f"pid{pid}"


@attrs.define
class Target:
    name: str  # "imserver" or "relay"
    stack: str  # embedded, mysql-redis, external, relay
    endpoints: list[str]  # tcp:127.0.0.1:PORT, one per node (client endpoint strings)
    secret: str
    # "server" (one process), or "server:node1".. (nodes), or "server:supervisor"
    # (workers: re-discovered as its children, see measured_pids); and, when
    # known, "mariadb", "redis".
    pids: dict[str, int]
    http_ports: list[int] = attrs.Factory(list)  # one per node (one shared for workers)
    config: dict[str, Any] | None = None
    nodes: int = 1
    server_workers: int = 1
    stop: Callable[[], None] = lambda: None
    #: Every process measured so far (a worker's pid stays listed once it is gone).
    seen_pids: dict[str, int] = attrs.Factory(dict)
    #: The processes the tool started (tests.harness objects), for the chaos
    #: soak to kill and restart: the ServerProcess of each node, and the
    #: "mariadb" and "redis" servers.
    servers: list[Any] = attrs.Factory(list)
    backends: dict[str, Any] = attrs.Factory(dict)
    #: The WebSocket URLs (ws://127.0.0.1:PORT/v1/ws), one per node, when known.
    ws_urls: list[str] = attrs.Factory(list)
    #: How the load clients connect: "tcp" (to C{endpoints}) or "ws" (C{ws_urls}).
    transport: str = "tcp"

    @property
    def endpoint(self) -> str:
        return self.endpoints[0]

    @property
    def client_endpoints(self) -> list[str]:
        """Where the load workers connect: TCP endpoint strings or ws:// URLs."""
        if self.transport == "ws":
            if not self.ws_urls:
                raise ValueError(f"{self.name} has no WebSocket listener")
            return self.ws_urls
        return self.endpoints

    def over(self, transport: str) -> Target:
        """This target with the load clients on C{transport} (the same servers)."""
        return attrs.evolve(self, transport=transport)

    def measured_pids(self) -> dict[str, int]:
        """The processes to read in /proc now: with workers, the supervisor's
        current children too (a worker that died and was started again has a
        new pid)."""
        out = dict(self.pids)
        if self.server_workers > 1 and "server:supervisor" in out:
            for pid in children(out["server:supervisor"]):
                out[f"server:worker{worker_index(pid)}"] = pid
        self.seen_pids.update(out)
        return out

    def scraper(self) -> metrics.Scraper:
        return metrics.Scraper(self.http_ports, self.server_workers)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stack": self.stack,
            "endpoint": self.endpoint,
            "endpoints": self.endpoints,
            "transport": self.transport,
            "ws_urls": self.ws_urls,
            "nodes": self.nodes,
            "server_workers": self.server_workers,
            "pids": {**self.seen_pids, **self.measured_pids()},
            "http_ports": self.http_ports,
            "config": _redact(self.config) if self.config else None,
        }


def _redact(config: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) for k, v in config.items()}
    for key in ("secret", "admin_key"):
        if key in out.get("auth", {}):
            out["auth"][key] = "***"
    return out


def start_imserver(
    stack: str,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    backlog: int | None = None,
    nodes: int = 1,
    server_workers: int = 1,
    per_node: Callable[[int, dict[str, dict[str, Any]]], None] | None = None,
) -> Target:
    """
    A fresh imserver (and its own mariadbd and redis-server for mysql-redis).

    @param backlog: the client listener's backlog (default: imserver's).
    @param nodes: imserver processes (node ids 1..N) on the one MariaDB
        database and Redis, each on its own ports (mysql-redis only).
    @param server_workers: C{[server] workers}: one supervisor and that many
        worker processes sharing the ports (mysql-redis only).
    @param per_node: called with each node's id and config before it starts,
        to change it (the chaos soak points one node at its backends through
        a delayed network).
    """
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from tests.harness import MariaDBServer, RedisServer, ServerProcess, free_port

    if (nodes > 1 or server_workers > 1) and stack != "mysql-redis":
        raise ValueError("several nodes or workers need --stack mysql-redis")
    if nodes > 1 and server_workers > 1:
        raise ValueError("--nodes and --server-workers are exclusive")
    config: dict[str, dict[str, Any]] = {"limits": dict(LIMITS_LIFTED)}
    pids: dict[str, int] = {}
    backends: list[Any] = []
    named: dict[str, Any] = {}
    servers: list[Any] = []
    leftovers: set[int] = set()

    def cleanup() -> None:
        # SIGTERM to every node (or the supervisor, which passes it on) at once,
        # then wait for each.
        for s in servers:
            if s.proc is not None and server_workers > 1:
                leftovers.update(children(s.proc.pid))
            s.signal(signal.SIGTERM)
        for s in servers:
            if s.proc is not None:
                try:
                    s.proc.wait(60)
                except subprocess.TimeoutExpired:
                    pass
            s.cleanup()  # SIGKILL if still running
        # A supervisor that had to be killed leaves its workers behind: end them.
        for pid in leftovers:
            if worker_index(pid).startswith("pid"):
                continue  # gone (and the pid possibly reused): not ours any more
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for b in backends:
            b.cleanup()

    try:
        if stack == "mysql-redis":
            mariadb = MariaDBServer().start()
            backends.append(mariadb)
            redis = RedisServer().start()
            backends.append(redis)
            named.update(mariadb=mariadb, redis=redis)
            assert mariadb.proc is not None and redis.proc is not None
            pids["mariadb"] = mariadb.proc.pid
            pids["redis"] = redis.proc.pid
            config["storage"] = {
                "sql": mariadb.fresh_database(),
                "redis": redis.url,
                "key_prefix": KEY_PREFIX,
            }
        elif stack != "embedded":
            raise ValueError(f"unknown stack {stack!r}")
        for name, table in (sections or {}).items():
            config.setdefault(name, {}).update(table)
        if server_workers > 1:
            config.setdefault("server", {}).update(workers=server_workers, node_id=1)
        for node_id in range(1, nodes + 1):
            node_config = {name: dict(table) for name, table in config.items()}
            if nodes > 1:
                node_config.setdefault("server", {})["node_id"] = node_id
            if per_node is not None:
                per_node(node_id, node_config)
            port = None
            if backlog:
                port = free_port()
                listen = f"tcp:{port}:interface=127.0.0.1:backlog={backlog}"
                node_config.setdefault("server", {})["listen"] = listen
            server = ServerProcess(node_config)
            if port is not None:
                server.port = port  # the harness reads .port for the endpoint and readiness
            servers.append(server)
            try:
                server.start(timeout=60 + 15 * server_workers)
            except Exception:
                sys.stderr.write("imserver log (end):\n" + server.log()[-4000:] + "\n")
                raise
    except BaseException:
        cleanup()
        raise
    if nodes > 1:
        names = [f"server:node{i}" for i in range(1, nodes + 1)]
    elif server_workers > 1:
        names = ["server:supervisor"]
    else:
        names = ["server"]
    server_pids = {name: s.proc.pid for name, s in zip(names, servers, strict=True)}
    return Target(
        name="imserver",
        stack=stack,
        endpoints=[s.endpoint for s in servers],
        secret=servers[0].secret,
        pids={**server_pids, **pids},
        http_ports=[s.http_port for s in servers],
        config=servers[0].config,
        nodes=nodes,
        server_workers=server_workers,
        stop=cleanup,
        servers=servers,
        backends=named,
        ws_urls=[s.ws_url for s in servers],
    )


def external(
    endpoint: str,
    pid: int,
    secret: str,
    http_port: int | None = None,
    extra_pids: Mapping[str, int] | None = None,
    ws_url: str | None = None,
) -> Target:
    """An imserver somebody else runs (never stopped by the tool)."""
    return Target(
        name="imserver",
        stack="external",
        endpoints=[endpoint],
        secret=secret,
        pids={"server": pid, **(extra_pids or {})},
        http_ports=[http_port] if http_port else [],
        ws_urls=[ws_url] if ws_url else [],
    )


def start_relay(
    secret: str, backlog: int | None = None, nagle: bool = False, devices: bool = False
) -> Target:
    """The baseline relay; C{devices}: several connections per uid, all pushed to."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, "-m", "bench.relay", "--port", "0", "--secret", secret]
    if backlog:
        argv += ["--backlog", str(backlog)]
    if nagle:
        argv.append("--nagle")
    if devices:
        argv.append("--devices")
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("listening "):
        proc.kill()
        raise RuntimeError(f"the relay did not start: {line!r}")
    port = int(line.split()[1])

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    return Target(
        name="relay",
        stack="relay",
        endpoints=[f"tcp:127.0.0.1:{port}"],
        secret=secret,
        pids={"server": proc.pid},
        stop=stop,
    )
