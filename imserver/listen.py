"""
Listening sockets: a large backlog, and ports shared by several worker
processes (SO_REUSEPORT).

Twisted's TCP endpoints cannot set SO_REUSEPORT, so for C{tcp:} and C{tcp6:}
descriptions the socket is made here, with the option set before bind, and
handed to the reactor with C{adoptStreamPort}. The kernel then spreads new
connections over every process listening on the port.
"""

from __future__ import annotations

import resource
import socket
from typing import Any

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


def listen_reuse_port(reactor: Any, desc: str, factory: Factory) -> IListeningPort:
    family, interface, port, backlog = reuse_port_address(desc)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)
        listening: IListeningPort = reactor.adoptStreamPort(sock.fileno(), family, factory)
    finally:
        sock.close()  # the reactor holds its own copy of the descriptor
    return listening


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
