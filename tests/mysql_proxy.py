"""
A loopback TCP proxy between PyMySQL and mariadbd that can lose a COMMIT.

It forwards bytes both ways and reads just enough of the MySQL protocol to
find the client's queries (COM_QUERY packets) and the end of the server's
reply to one. Armed with L{MysqlProxy.arm}, it picks the connection that
sends a query containing a pattern, and at that connection's next query
ending in C{COMMIT} it either:

* C{"after"}: forwards the query, waits for the server's complete reply (so
  the server has committed), drops it and closes both sides: the client
  lost the answer of a commit that happened;
* C{"before"}: closes both sides without forwarding it: the server rolls
  the transaction back;
* C{"stall"}: closes the client's side at once, and forwards the query
  only L{MysqlProxy.stall} seconds later, as a network partition could: the
  server's session lives on meanwhile, its transaction open, and then tries
  to commit.

Independently, L{MysqlProxy.kill_prefix} closes the connection that sends
the next query starting with it, without forwarding it (a connection killed
between two requests).

Plain threads and sockets (PyMySQL runs in pool threads; the reactor stays
out of it). Each fault fires once per L{arm}.
"""

from __future__ import annotations

import socket
import threading
import time

COM_QUERY = 0x03
SERVER_MORE_RESULTS_EXISTS = 0x0008


def _lenenc(data: bytes, pos: int) -> tuple[int, int]:
    """A length-encoded integer at C{pos}: (value, next position)."""
    first = data[pos]
    if first < 0xFB:
        return first, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}[first]
    return int.from_bytes(data[pos + 1 : pos + 1 + size], "little"), pos + 1 + size


class _ReplyReader:
    """Follows the server's packets of one query's reply (no DEPRECATE_EOF,
    as PyMySQL connects) until its last result has arrived."""

    def __init__(self) -> None:
        self.state = "start"
        self.columns = 0
        self.done = False

    def feed(self, payload: bytes) -> None:
        head = payload[0] if payload else 0
        if self.state == "start":
            if head == 0x00:  # OK
                _, pos = _lenenc(payload, 1)
                _, pos = _lenenc(payload, pos)
                status = int.from_bytes(payload[pos : pos + 2], "little")
                self.done = not status & SERVER_MORE_RESULTS_EXISTS
            elif head == 0xFF:  # ERR: the statements after it do not run
                self.done = True
            else:  # a result set: column count, definitions, EOF, rows, EOF
                self.columns, _ = _lenenc(payload, 0)
                self.state = "columns"
        elif self.state == "columns":
            if head == 0xFE and len(payload) < 9:
                self.state = "rows"
            else:
                self.columns -= 1
        elif self.state == "rows" and head == 0xFE and len(payload) < 9:
            status = int.from_bytes(payload[3:5], "little")
            self.state = "start"
            self.done = not status & SERVER_MORE_RESULTS_EXISTS


def _packets(buf: bytearray) -> list[bytes]:
    """Whole packets taken from the front of C{buf} (header included)."""
    out = []
    while len(buf) >= 4:
        size = int.from_bytes(buf[:3], "little")
        if len(buf) < 4 + size:
            break
        out.append(bytes(buf[: 4 + size]))
        del buf[: 4 + size]
    return out


class _Link:
    def __init__(self, proxy: MysqlProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.marked = False
        #: Set once the lost COMMIT is on its way: the reply is swallowed.
        self.swallow: _ReplyReader | None = None
        self.replied = proxy.replied
        self.closed = False
        for target in (self._upstream, self._downstream):
            threading.Thread(target=target, daemon=True).start()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for s in (self.client, self.server):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _upstream(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = self.client.recv(65536)
                if not data:
                    break
                buf += data
                for packet in _packets(buf):
                    action = self.proxy._inspect(self, packet)
                    if action == "before":
                        self.proxy._fired()
                        self.close()
                        return
                    if action == "stall":
                        self.proxy._fired()
                        self.client.shutdown(socket.SHUT_RDWR)
                        time.sleep(self.proxy.stall)
                        self.swallow = _ReplyReader()
                        self.server.sendall(packet)
                        return
                    if action == "after":
                        self.swallow = _ReplyReader()
                    self.server.sendall(packet)
        except OSError:
            pass
        self.close()

    def _downstream(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = self.server.recv(65536)
                if not data:
                    break
                if self.swallow is None:
                    self.client.sendall(data)
                    continue
                buf += data
                for packet in _packets(buf):
                    self.swallow.feed(packet[4:])
                if self.swallow.done:
                    # The server answered the COMMIT (it happened, or failed
                    # in a stall). The client never hears of it.
                    self.proxy._fired()
                    self.replied.set()
                    break
        except OSError:
            pass
        self.close()


class MysqlProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed: tuple[str, bytes] | None = None
        self._links: list[_Link] = []
        self.fired = threading.Event()
        #: The server's reply to the lost or stalled COMMIT has come (and gone).
        self.replied = threading.Event()
        #: Seconds a stalled COMMIT waits.
        self.stall = 1.0
        #: New connections are closed at once (the database "is down").
        self.refuse = False
        #: The next query starting with this is not forwarded: its connection
        #: is closed (once).
        self.kill_prefix: bytes | None = None
        #: COM_QUERY texts seen, for tests that count attempts.
        self.queries: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database: str) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{database}"

    def arm(self, mode: str, pattern: bytes) -> None:
        """Lose (C{"after"}) or withhold (C{"before"}) the next COMMIT of the
        connection that sends a query containing C{pattern}."""
        assert mode in ("after", "before", "stall")
        with self._lock:
            self.fired.clear()
            self.replied.clear()
            self._armed = (mode, pattern)
            for link in self._links:
                link.marked = False

    def _inspect(self, link: _Link, packet: bytes) -> str | None:
        if packet[3] != 0 or len(packet) < 5 or packet[4] != COM_QUERY:
            return None  # handshake, or not a query
        text = packet[5:]
        with self._lock:
            self.queries.append(text)
            if self.kill_prefix is not None and text.startswith(self.kill_prefix):
                self.kill_prefix = None
                return "before"
            if self._armed is None:
                return None
            mode, pattern = self._armed
            if pattern in text:
                link.marked = True
            if link.marked and text.rstrip().endswith(b"COMMIT"):
                self._armed = None
                link.marked = False
                return mode
        return None

    def _fired(self) -> None:
        self.fired.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._links = [link for link in self._links if not link.closed]
                self._links.append(_Link(self, client, server))

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
