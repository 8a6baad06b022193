"""
Listening sockets: a large backlog, and ports shared by several worker
processes (SO_REUSEPORT).

Twisted's TCP endpoints cannot set SO_REUSEPORT, so for C{tcp:} and C{tcp6:}
descriptions the socket is made here, with the option set before bind, and
handed to the reactor with C{adoptStreamPort}. The kernel then spreads new
connections over every process listening on the port.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory

from imserver.config import endpoint_args

#: Pending connections the kernel may queue per listener (capped by
#: net.core.somaxconn). Twisted's default of 50 drops a burst of reconnecting
#: clients and makes them wait for SYN retries (1 s, 3 s, ...).
LISTEN_BACKLOG = 4096


def with_backlog(desc: str) -> str:
    """A TCP or TLS endpoint description with a large backlog, unless it sets one."""
    kind = desc.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in desc:
        return f"{desc}:backlog={LISTEN_BACKLOG}"
    return desc


def reuse_port_address(desc: str) -> tuple[int, str, int, int]:
    """(family, interface, port, backlog) of a C{tcp:}/C{tcp6:} description."""
    kind, kwargs, positional = endpoint_args(desc)
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"only tcp: and tcp6: endpoints can be shared by workers, not {desc!r}")
    port = int(kwargs.get("port") or positional[0])
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    interface = kwargs.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
    return family, interface, port, int(kwargs.get("backlog", LISTEN_BACKLOG))


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
