"""
Listening sockets: a large backlog, ports shared by several worker
processes (SO_REUSEPORT), and connections that send a write at once.

C{tcp:} and C{tcp6:} descriptions are listened on here, with L{TCPPort}
(Twisted's C{tcp.Port}, whose endpoints cannot set SO_REUSEPORT: the option
is set before bind, and the kernel then spreads new connections over every
process listening on the port). Its connections are L{EagerServer}s. Other
descriptions (C{ssl:}, C{unix:}) go to Twisted's endpoints unchanged.
"""

from __future__ import annotations

import resource
import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory

from imserver.config import endpoint_args

#: Pending connections the kernel may queue per listener (capped by
#: net.core.somaxconn). Twisted's default of 50 drops a burst of reconnecting
#: clients and makes them wait for SYN retries (1 s, 3 s, ...).
LISTEN_BACKLOG = 4096
#: Descriptors kept for the process's own use (SQL and Redis reconnects, log
#: files, HTTP requests) when client connections fill the rest.
DESCRIPTOR_HEADROOM = 100


def with_backlog(desc: str) -> str:
    """A TCP or TLS endpoint description with a large backlog, unless it sets one."""
    kind = desc.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in desc:
        return f"{desc}:backlog={LISTEN_BACKLOG}"
    return desc


#: The arguments of Twisted's tcp: and tcp6: server parsers, in positional order.
_TCP_ARGS = ("port", "interface", "backlog")


def reuse_port_address(desc: str) -> tuple[int, str, int, int]:
    """
    (family, interface, port, backlog) of a C{tcp:}/C{tcp6:} description,
    read as Twisted reads it: C{tcp:7000:127.0.0.1:50} is port, interface
    and backlog by position, and any of them may be a keyword instead. (The
    positional interface was once ignored here and workers bound every
    interface: issue 9, defect 6.)
    """
    kind, kwargs, positional = endpoint_args(desc)
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"only tcp: and tcp6: endpoints can be shared by workers, not {desc!r}")
    unknown = set(kwargs) - set(_TCP_ARGS)
    if unknown or len(positional) > len(_TCP_ARGS):
        raise ValueError(f"unexpected arguments in {desc!r}")
    args = dict(kwargs)
    for name, value in zip(_TCP_ARGS, positional, strict=False):
        if name in args:
            raise ValueError(f"{name} given twice in {desc!r}")
        args[name] = value
    if "port" not in args:
        raise ValueError(f"no port in {desc!r}")
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    interface = args.get("interface") or ("::" if kind == "tcp6" else "0.0.0.0")
    return family, interface, int(args["port"]), int(args.get("backlog", LISTEN_BACKLOG))


class EagerServer(tcp.Server):
    """
    A TCP connection whose C{write} sends at once when nothing is waiting
    to be sent before it, instead of buffering until the reactor's next
    poll says the socket is writable (issue 13). Under load one poll hands
    the reactor a hundred ready sockets: a reply buffered in that turn left
    only after the rest of it and part of the next, which doubled ping and
    send -> push times (15,000 idle connections with pairs beside: ping p99
    26-31 ms buffered, 13-15 ms sent at once), and costs two C{epoll_ctl}s
    per reply. What the kernel does not take (a full socket buffer) is
    buffered as before, and a send error is left to the reactor, which
    meets it again on the buffered path and closes the connection the usual
    way. The price is one C{send} per write where several writes in one
    turn used to share one: measured equal in server CPU at 50 pairs x 10.
    Once C{startTLS} has run, a write is plaintext for the TLS protocol and
    goes the usual way.
    """

    def write(self, data: bytes) -> None:
        if (
            data
            and not self.TLS
            and not self.dataBuffer
            and not self._tempDataBuffer
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnected
        ):
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0  # EAGAIN, ENOBUFS, or an error the buffered path reports
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)


class TCPPort(tcp.Port):
    """A listening TCP port of L{EagerServer}s, shared with other processes if C{reuse_port}."""

    transport = EagerServer

    def __init__(
        self,
        port: int,
        factory: Factory,
        backlog: int,
        interface: str,
        reactor: Any,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(port, factory, backlog, interface, reactor)
        self._reuse_port = reuse_port

    def createInternetSocket(self) -> socket.socket:
        sock: socket.socket = super().createInternetSocket()
        if self._reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock


def is_tcp(desc: str) -> bool:
    """Whether L{listen_tcp} listens on this description."""
    return desc.split(":", 1)[0] in ("tcp", "tcp6")


def listen_tcp(
    reactor: Any, desc: str, factory: Factory, reuse_port: bool = False
) -> IListeningPort:
    """Listen on a C{tcp:}/C{tcp6:} description (backlog L{LISTEN_BACKLOG} unless it sets one)."""
    _, interface, port, backlog = reuse_port_address(desc)
    listening = TCPPort(port, factory, backlog, interface, reactor, reuse_port=reuse_port)
    listening.startListening()
    return listening


def listen_reuse_port(reactor: Any, desc: str, factory: Factory) -> IListeningPort:
    """Listen on a C{tcp:}/C{tcp6:} port that other worker processes share."""
    return listen_tcp(reactor, desc, factory, reuse_port=True)


def connection_budget(headroom: int = DESCRIPTOR_HEADROOM) -> int | None:
    """
    How many client connections this process can hold and keep descriptors
    for its own work: the soft RLIMIT_NOFILE less C{headroom} (less a quarter
    of a small limit). Past it the gateway accepts and closes at once: new
    clients are refused while existing ones go on, instead of the process
    running into EMFILE where a database reconnect fails too (issue 9,
    defect 4). Twisted's own EMFILE recovery (a reserved descriptor closed to
    accept and drop) still covers what the budget does not count, e.g. HTTP.
    None: no limit.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - min(headroom, soft // 4))
