"""
Latency and packet loss between one node and its backends (``bench chaos
--netem``), with addresses that exist only inside namespaces this tool makes.

Two network namespaces, A and B, joined by a veth pair (10.231.0.1 in A,
10.231.0.2 in B). A forwarder process (``python -m bench.netem forward``)
carries node 1's connections to MariaDB and Redis across them::

    node 1 -> 127.0.0.1:P (root namespace, forwarder)
           -> socket made in A -> 10.231.0.2:Q over the veth (netem here)
           -> forwarder's listener made in B -> 127.0.0.1:backend (root namespace)

A socket keeps the namespace it was created in, so the forwarder enters A or
B (C{setns}, this thread only) just to create a socket, and leaves again.
Nothing but loopback and the two namespaces is ever addressed. Everything is
removed at exit (the namespaces take the veth pair with them).

The faults: where the kernel has C{sch_netem}, a C{tc netem} qdisc on both
ends of the veth (C{delay 100ms 20ms}, C{loss 10%}). Where it has not (some
container kernels: "Specified qdisc kind is unknown"), the forwarder does it
itself on what crosses the veth: every chunk held for the delay (order kept),
and a lost packet as TCP shows it to the application, the stream stalled for
one retransmission timeout (200 ms) with that probability per chunk. The
result says which (C{"netem": "tc"} or C{"forwarder"}).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from bench.stacks import REPO

CLONE_NEWNET = 0x40000000
ADDR_A, ADDR_B = "10.231.0.1", "10.231.0.2"


def available() -> str | None:
    """Why netem cannot be used here, or None."""
    if os.geteuid() != 0:
        return "--netem needs root (ip netns, tc)"
    for tool in ("/usr/sbin/ip", "/usr/sbin/tc"):
        if not os.path.exists(tool):
            return f"--netem needs {tool}"
    return None


def run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


class Netem:
    """The namespaces, the veth pair, the qdiscs and the forwarder."""

    def __init__(self) -> None:
        tag = os.getpid()
        self.ns_a, self.ns_b = f"imchaos{tag}a", f"imchaos{tag}b"
        self.dev_a, self.dev_b = f"imc{tag}a", f"imc{tag}b"
        self.forwarder: subprocess.Popen[bytes] | None = None
        self.made = False
        self.shaped: str | None = None
        self.mode = "tc"

    def setup(self) -> None:
        why = available()
        if why:
            raise RuntimeError(why)
        atexit.register(self.cleanup)
        self.made = True
        for ns in (self.ns_a, self.ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            run("ip", "netns", "add", ns)
        # Made inside A, its peer straight into B: never in the root namespace.
        run(
            "ip", "-n", self.ns_a, "link", "add", self.dev_a, "type", "veth",
            "peer", "name", self.dev_b, "netns", self.ns_b,
        )  # fmt: skip
        for ns, dev, addr in ((self.ns_a, self.dev_a, ADDR_A), (self.ns_b, self.dev_b, ADDR_B)):
            run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        try:
            for ns, dev in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
                run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", "0ms")
        except RuntimeError:
            self.mode = "forwarder"  # no sch_netem in this kernel

    def shape(self, spec: str | None) -> None:
        """C{delay MS JITTER_MS} or C{loss PERCENT} both ways; None: clear."""
        self.shaped = spec
        if self.mode == "tc":
            args = ["delay", "0ms"]
            if spec and spec.startswith("delay"):
                _, ms, jitter = spec.split()
                args = ["delay", f"{ms}ms", f"{jitter}ms"]
            elif spec:
                args = ["loss", f"{spec.split()[1]}%"]
            for ns, dev in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
                run("tc", "-n", ns, "qdisc", "change", "dev", dev, "root", "netem", *args)
        elif self.forwarder is not None and self.forwarder.stdin is not None:
            self.forwarder.stdin.write(f"{spec or 'clear'}\n".encode())
            self.forwarder.stdin.flush()

    def per_node(self, node_id: int, config: dict[str, dict[str, Any]]) -> None:
        """Point node 1's database and Redis at the forwarder."""
        if node_id != 1:
            return
        storage = config["storage"]
        sql_url, redis_url = storage["sql"], storage["redis"]
        sql_port = int(sql_url.split("@127.0.0.1:", 1)[1].split("/", 1)[0])
        redis_port = int(redis_url.split("127.0.0.1:", 1)[1].split("/", 1)[0])
        ports = self.forward([sql_port, redis_port])
        storage["sql"] = sql_url.replace(f":{sql_port}/", f":{ports[0]}/")
        storage["redis"] = redis_url.replace(f":{redis_port}/", f":{ports[1]}/")

    def forward(self, targets: list[int]) -> list[int]:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        argv = [sys.executable, "-m", "bench.netem", "forward", self.ns_a, self.ns_b]
        self.forwarder = subprocess.Popen(
            argv + [str(t) for t in targets],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        assert self.forwarder.stdout is not None
        line = self.forwarder.stdout.readline().decode().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"the netem forwarder did not start: {line}")
        return [int(p) for p in line[1:]]

    def cleanup(self) -> None:
        if self.forwarder is not None and self.forwarder.poll() is None:
            self.forwarder.kill()
            self.forwarder.wait()
        if self.made:
            for ns in (self.ns_a, self.ns_b):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            self.made = False


# -- the forwarder process ------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def namespace(name: str) -> Iterator[None]:
    """This thread in network namespace C{name} (sockets made here stay in it)."""
    root = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        yield
    finally:
        _libc.setns(root, CLONE_NEWNET)
        os.close(target)
        os.close(root)


#: What the forwarder adds to each chunk crossing the veth (no sch_netem).
SHAPE = {"delay_ms": 0.0, "jitter_ms": 0.0, "loss": 0.0}
RTO_S = 0.2


def _hold() -> float:
    """Seconds to hold one chunk: the delay, and a retransmission timeout if 'lost'."""
    hold = max(0.0, SHAPE["delay_ms"] + random.uniform(-1, 1) * SHAPE["jitter_ms"]) / 1000
    if SHAPE["loss"] and random.random() < SHAPE["loss"]:
        hold += RTO_S
    return hold


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shaped: bool = False
) -> None:
    """Copy one direction; if C{shaped}, each chunk is held (L{_hold}), order kept."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            at, data = await queue.get()
            if not data:
                break
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(release())
    last = 0.0
    try:
        while data := await reader.read(65536):
            last = max(last, loop.time() + (_hold() if shaped else 0.0))
            queue.put_nowait((last, data))
            if sender.done():
                break
    except OSError:
        pass
    finally:
        queue.put_nowait((0.0, b""))
        with contextlib.suppress(OSError):
            await sender
        writer.close()


async def _control() -> None:
    """Shapes from the parent on stdin: C{delay MS JITTER}, C{loss PERCENT}, C{clear}."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        words = line.decode().split()
        SHAPE.update(delay_ms=0.0, jitter_ms=0.0, loss=0.0)
        if words[:1] == ["delay"]:
            SHAPE.update(delay_ms=float(words[1]), jitter_ms=float(words[2]))
        elif words[:1] == ["loss"]:
            SHAPE.update(loss=float(words[1]) / 100)


async def _join(
    r1: asyncio.StreamReader,
    w1: asyncio.StreamWriter,
    r2: asyncio.StreamReader,
    w2: asyncio.StreamWriter,
    shaped: bool = False,
) -> None:
    await asyncio.gather(_pipe(r1, w2, shaped), _pipe(r2, w1, shaped))


async def forward(ns_a: str, ns_b: str, targets: list[int]) -> None:
    loop = asyncio.get_running_loop()
    ports = []
    servers = []
    for i, target in enumerate(targets):
        inner_port = 20000 + i

        async def inner(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, target: int = target
        ) -> None:
            # In B: on to the backend in the root namespace (over loopback).
            try:
                r2, w2 = await asyncio.open_connection("127.0.0.1", target)
            except OSError:
                w.close()
                return
            await _join(r, w, r2, w2)

        async def outer(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, inner_port: int = inner_port
        ) -> None:
            # From the root namespace into A, across the veth to B.
            with namespace(ns_a):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (ADDR_B, inner_port))
                r2, w2 = await asyncio.open_connection(sock=sock)
            except OSError:
                sock.close()
                w.close()
                return
            # This hop crosses the veth: the one the forwarder shapes (no sch_netem).
            await _join(r, w, r2, w2, shaped=True)

        with namespace(ns_b):
            listen_b = socket.create_server((ADDR_B, inner_port))
        servers.append(await asyncio.start_server(inner, sock=listen_b))
        listen_root = socket.create_server(("127.0.0.1", 0))
        ports.append(listen_root.getsockname()[1])
        servers.append(await asyncio.start_server(outer, sock=listen_root))
    sys.stdout.write("ready " + " ".join(str(p) for p in ports) + "\n")
    sys.stdout.flush()
    # Exit with the parent: its end of stdin closes when it goes.
    await _control()


def main() -> None:
    if len(sys.argv) >= 4 and sys.argv[1] == "forward":
        asyncio.run(forward(sys.argv[2], sys.argv[3], [int(p) for p in sys.argv[4:]]))
    else:
        sys.exit("usage: python -m bench.netem forward NS_A NS_B PORT...")


if __name__ == "__main__":
    main()
