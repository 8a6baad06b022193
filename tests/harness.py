"""
Throwaway backends and server processes for the integration and end-to-end
tests.

Nothing here touches the machine's own Redis or MariaDB: each
L{RedisServer} and L{MariaDBServer} runs its own process on a free loopback
port with its data in a temporary directory, so a fault test can kill and
restart it. One of each is shared by the whole run (L{shared_redis},
L{shared_mariadb}); fault tests start private ones.

If the binaries are missing, tests that need them are skipped with the
reason, unless C{IMSERVER_TEST_BACKENDS=required} (CI), where they fail.

L{ServerProcess} runs C{twistd -n imserver --config ...} as a subprocess,
with the checkout first on C{PYTHONPATH}, so end-to-end tests exercise the
code under test exactly as a user starts it.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from twisted.trial.unittest import SkipTest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = os.environ.get("IMSERVER_TEST_BACKENDS", "") == "required"


class BackendUnavailable(Exception):
    pass


def need(binary: str) -> str:
    """The path of a binary the test needs; skip (or fail in CI) without it."""
    path = shutil.which(binary) or (
        f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None
    )
    if path is None:
        message = f"{binary} is not installed"
        if REQUIRED:
            raise BackendUnavailable(message + " (IMSERVER_TEST_BACKENDS=required)")
        raise SkipTest(message + "; set up redis-server and mariadbd to run this test")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise BackendUnavailable(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class _Process:
    """A child process with a log file, killed at exit if still running."""

    proc: subprocess.Popen[bytes] | None = None

    def __init__(self, name: str) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"imserver-{name}-")
        self.log_path = os.path.join(self.dir, f"{name}.log")
        _live.append(self)

    def _spawn(
        self, argv: list[str], env: Mapping[str, str] | None = None, cwd: str | None = None
    ) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env else None,
                cwd=cwd or self.dir,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, then wait; SIGKILL if it takes too long."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


_live: list[_Process] = []


@atexit.register
def _cleanup_all() -> None:
    for p in _live:
        p.cleanup()


class RedisServer(_Process):
    #: Added to the command line (subclasses: replicas).
    extra_args: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.binary = need("redis-server")
        super().__init__("redis")
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self._spawn(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *self.extra_args,
            ]
        )
        wait_for(self.ping, 10, f"redis-server on port {self.port}")
        return self

    def ping(self) -> bool:
        try:
            return self.command("PING") == b"+PONG\r\n"
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one command in RESP and return the raw reply (for test set-up)."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(payload)
            return s.recv(65536)

    def restart(self) -> None:
        self.stop()
        self.start()


class RedisReplica(RedisServer):
    """
    A replica of a L{RedisServer}. Writable (C{replica-read-only no}) so that
    a test can make it miss writes, as asynchronous replication may.
    """

    def __init__(self, master: RedisServer) -> None:
        super().__init__()
        self.extra_args = (
            "--replicaof",
            "127.0.0.1",
            str(master.port),
            "--replica-read-only",
            "no",
        )

    def info(self, section: str) -> dict[str, str]:
        reply = self.command("INFO", section).decode(errors="replace")
        return dict(
            line.split(":", 1) for line in reply.splitlines() if ":" in line and line[0] != "$"
        )

    def synced(self) -> bool:
        return self.info("replication").get("master_link_status") == "up"


class RedisSentinel(RedisServer):
    """
    C{redis-server --sentinel} (no extra package) monitoring one master as
    service C{name}, with short timeouts: down after C{down_after_ms}, so a
    failover takes a couple of seconds.
    """

    def __init__(
        self,
        master: RedisServer,
        name: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        super().__init__()
        self.name = name
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.dir}\n"
                f"sentinel monitor {name} 127.0.0.1 {master.port} {quorum}\n"
                f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
                f"sentinel failover-timeout {name} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {name} 1\n"
            )
        self.conf = conf

    def start(self) -> RedisSentinel:
        # The config file first: sentinel rewrites it as it learns the topology.
        self._spawn([self.binary, self.conf, "--sentinel"])
        wait_for(self.ping, 10, f"redis sentinel on port {self.port}")
        return self

    def master(self) -> dict[str, str]:
        """C{SENTINEL MASTER name} as a dict (raw RESP parsed for flat replies)."""
        reply = self.command("SENTINEL", "MASTER", self.name).decode(errors="replace")
        values = [line for line in reply.split("\r\n") if line and line[0] not in "*$"]
        return dict(zip(values[::2], values[1::2], strict=False))

    def master_port(self) -> int:
        return int(self.master().get("port", 0))


def redis_sentinel_url(sentinels: list[RedisSentinel], db: int = 0) -> str:
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
    return f"redis+sentinel://{hosts}/{sentinels[0].name}/{db}"


class MariaDBServer(_Process):
    _dbs = itertools.count(1)

    def __init__(self) -> None:
        self.daemon = need("mariadbd")
        self.installer = need("mariadb-install-db")
        self.admin = need("mariadb-admin")
        super().__init__("mariadb")
        self.port = free_port()
        self.datadir = os.path.join(self.dir, "data")
        self.socket = os.path.join(self.dir, "sock")
        # The bootstrap fails now and then on a busy machine ("Unknown table
        # 'mysql.tmp_user_sys'"); a fresh data directory succeeds.
        for _ in range(3):
            shutil.rmtree(self.datadir, ignore_errors=True)
            result = subprocess.run(
                [
                    self.installer,
                    "--no-defaults",
                    f"--datadir={self.datadir}",
                    "--user=root",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ],
                capture_output=True,
                timeout=120,
            )
            if result.returncode == 0:
                break
        else:
            raise BackendUnavailable(f"mariadb-install-db failed: {result.stderr[-2000:]!r}")

    def start(self) -> MariaDBServer:
        self._spawn(
            [
                self.daemon,
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--socket={self.socket}",
                f"--pid-file={self.dir}/pid",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-name-resolve",
                f"--log-error={self.dir}/err.log",
                "--innodb-buffer-pool-size=64M",
                "--max-connections=500",
                # More server options, for measuring (e.g. --performance-schema=ON).
                *shlex.split(os.environ.get("IMSERVER_TEST_MARIADB_ARGS", "")),
            ]
        )
        wait_for(self.ping, 30, f"mariadbd on port {self.port}", interval=0.05)
        return self

    def ping(self) -> bool:
        if not self.running:
            raise BackendUnavailable(f"mariadbd exited: {self.error_log()[-2000:]}")
        result = subprocess.run(
            [self.admin, "--no-defaults", f"--socket={self.socket}", "-uroot", "ping"],
            capture_output=True,
        )
        return result.returncode == 0

    def error_log(self) -> str:
        try:
            with open(os.path.join(self.dir, "err.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def sql(self, statement: str, database: str | None = None) -> str:
        argv = [
            shutil.which("mariadb") or "mariadb",
            "--no-defaults",
            f"--socket={self.socket}",
            "-uroot",
            "-N",
            "-B",
            "-e",
            statement,
        ]
        if database:
            argv.append(database)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise BackendUnavailable(f"SQL failed: {result.stderr}")
        return result.stdout

    def fresh_database(self) -> str:
        """Create an empty database; return its mysql:// URL."""
        name = f"imtest_{os.getpid()}_{next(self._dbs)}"
        self.sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        return self.url(name)

    def url(self, database: str) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{database}"

    def restart(self) -> None:
        self.stop(60)
        self.start()


_shared: dict[str, Any] = {}


def shared_redis() -> RedisServer:
    """One redis-server for the whole run (tests use distinct key prefixes)."""
    server = _shared.get("redis")
    if server is None or not server.running:
        server = _shared["redis"] = RedisServer().start()
    assert isinstance(server, RedisServer)
    return server


def shared_mariadb() -> MariaDBServer:
    """One mariadbd for the whole run (tests use fresh databases)."""
    server = _shared.get("mariadb")
    if server is None or not server.running:
        server = _shared["mariadb"] = MariaDBServer().start()
    assert isinstance(server, MariaDBServer)
    return server


_prefixes = itertools.count(1)


def fresh_prefix() -> str:
    return f"t{os.getpid()}x{next(_prefixes)}"


# ---------------------------------------------------------------------------
# TOML for generated configs (values are str, int, float, bool or lists).


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    out = []
    for name, table in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)


def self_signed_certificate(directory: str, name: str, san: str) -> tuple[str, str]:
    """
    A throwaway key and self-signed certificate (PEM files in C{directory}) for
    C{CN=name} with the subjectAltName C{san} (C{IP:127.0.0.1}, C{DNS:...}).
    """
    key, cert = os.path.join(directory, f"{name}.key"), os.path.join(directory, f"{name}.pem")
    subprocess.run(
        [
            *(need("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", f"/CN={name}", "-addext", f"subjectAltName={san}"),
            *("-keyout", key, "-out", cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


class ServerProcess(_Process):
    """
    C{twistd -n imserver --config FILE} in a subprocess.

    @param sections: config sections merged over a loopback test default
        (free ports, a SQLite file in the process's directory).
    """

    def __init__(self, sections: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        super().__init__("server")
        self.port = free_port()
        self.http_port = free_port()
        self.ws_port = free_port()
        config: dict[str, dict[str, Any]] = {
            "server": {
                "listen": f"tcp:{self.port}:interface=127.0.0.1",
                "http": f"tcp:{self.http_port}:interface=127.0.0.1",
                "websocket": f"tcp:{self.ws_port}:interface=127.0.0.1",
            },
            "auth": {
                "secret": "e2e-test-secret-0123456789-abcdefghij",
                "admin_key": "e2e-admin-key-0123456789",
            },
            "storage": {"sql": f"sqlite:{os.path.join(self.dir, 'im.db')}"},
        }
        for name, table in (sections or {}).items():
            config.setdefault(name, {}).update(table)
        self.config = config
        self.config_path = os.path.join(self.dir, "imserver.toml")
        with open(self.config_path, "w") as f:
            f.write(to_toml(config))

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """The WebSocket URL (the default config listens on C{ws_port})."""
        return f"ws://127.0.0.1:{self.ws_port}/v1/ws"

    @property
    def secret(self) -> str:
        return str(self.config["auth"]["secret"])

    @property
    def workers(self) -> int:
        """Worker processes (C{[server].workers}): each logs "ready"."""
        return int(self.config["server"].get("workers", 1))

    def start(self, timeout: float = 30) -> ServerProcess:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        offset = len(self.log())
        self._spawn([twistd, "-n", "--pidfile=", "imserver", "--config", self.config_path], env=env)

        def up() -> bool:
            if not self.running:
                raise BackendUnavailable(f"imserver exited early:\n{self.log()[-4000:]}")
            ready = self.log()[offset:].count("ready (config")
            return ready >= self.workers and port_open(self.port)

        wait_for(up, timeout, f"imserver on port {self.port}", interval=0.05)
        return self

    @classmethod
    def wss(cls, san: str = "IP:127.0.0.1") -> tuple[ServerProcess, str]:
        """
        A server (not started) whose WebSocket listener is TLS with a fresh
        self-signed certificate for C{san}; with the certificate's PEM file.
        """
        directory = tempfile.mkdtemp(prefix="imserver-cert-")
        atexit.register(shutil.rmtree, directory, True)
        key, cert = self_signed_certificate(directory, "server", san)
        port = free_port()
        server = cls(
            {
                "server": {
                    "websocket": f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
                }
            }
        )
        server.ws_port = port
        return server, cert

    def token(self, uid: int, ttl: int = 3600) -> str:
        from imserver.services.tokens import TokenService

        return TokenService(self.secret).mint(uid, now=time.time(), ttl_seconds=ttl)
