"""
What the benchmark drives: an imserver the tool starts (``embedded`` or
``mysql-redis``, through L{tests.harness}), an imserver already running
(``--endpoint``/``--pid``/``--secret``), or the baseline relay.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The rate limit lifted: the benchmark measures the server, not the limiter.
LIMITS_LIFTED = {"send_per_second": 1000000.0, "send_burst": 1000000}


@attrs.define
class Target:
    name: str  # "imserver" or "relay"
    stack: str  # embedded, mysql-redis, external, relay
    endpoint: str  # tcp:127.0.0.1:PORT (a client endpoint string)
    secret: str
    pids: dict[str, int]  # "server" and, when known, "mariadb", "redis"
    http_port: int | None = None
    config: dict[str, Any] | None = None
    stop: Callable[[], None] = lambda: None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stack": self.stack,
            "endpoint": self.endpoint,
            "pids": self.pids,
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
) -> Target:
    """
    A fresh imserver (and its own mariadbd and redis-server for mysql-redis).

    @param backlog: the client listener's backlog (default: Twisted's, 50).
    """
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from tests.harness import MariaDBServer, RedisServer, ServerProcess, free_port

    config: dict[str, dict[str, Any]] = {"limits": dict(LIMITS_LIFTED)}
    pids: dict[str, int] = {}
    backends: list[Any] = []
    if stack == "mysql-redis":
        mariadb = MariaDBServer().start()
        redis = RedisServer().start()
        backends += [mariadb, redis]
        assert mariadb.proc is not None and redis.proc is not None
        pids["mariadb"] = mariadb.proc.pid
        pids["redis"] = redis.proc.pid
        config["storage"] = {"sql": mariadb.fresh_database(), "redis": redis.url}
    elif stack != "embedded":
        raise ValueError(f"unknown stack {stack!r}")
    for name, table in (sections or {}).items():
        config.setdefault(name, {}).update(table)
    port = None
    if backlog:
        port = free_port()
        listen = f"tcp:{port}:interface=127.0.0.1:backlog={backlog}"
        config.setdefault("server", {})["listen"] = listen
    server = ServerProcess(config)
    if port is not None:
        server.port = port  # the harness reads .port for the endpoint and readiness
    try:
        server.start(timeout=60)
    except Exception:
        sys.stderr.write("imserver log (end):\n" + server.log()[-4000:] + "\n")
        for b in backends:
            b.cleanup()
        raise
    assert server.proc is not None
    pids = {"server": server.proc.pid, **pids}

    def stop() -> None:
        server.stop()
        server.cleanup()
        for b in backends:
            b.cleanup()

    return Target(
        name="imserver",
        stack=stack,
        endpoint=server.endpoint,
        secret=server.secret,
        pids=pids,
        http_port=server.http_port,
        config=server.config,
        stop=stop,
    )


def external(
    endpoint: str,
    pid: int,
    secret: str,
    http_port: int | None = None,
    extra_pids: Mapping[str, int] | None = None,
) -> Target:
    """An imserver somebody else runs (never stopped by the tool)."""
    return Target(
        name="imserver",
        stack="external",
        endpoint=endpoint,
        secret=secret,
        pids={"server": pid, **(extra_pids or {})},
        http_port=http_port,
    )


def start_relay(secret: str, backlog: int | None = None, nodelay: bool = False) -> Target:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, "-m", "bench.relay", "--port", "0", "--secret", secret]
    if backlog:
        argv += ["--backlog", str(backlog)]
    if nodelay:
        argv.append("--nodelay")
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
        endpoint=f"tcp:127.0.0.1:{port}",
        secret=secret,
        pids={"server": proc.pid},
        stop=stop,
    )
