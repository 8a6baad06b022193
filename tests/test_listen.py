"""
Listening sockets shared by workers (issue 9, defect 6): the interface of an
endpoint, positional (C{tcp:7000:127.0.0.1}) or keyword, is the one bound.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import twisted.test
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver.config import is_loopback
from imserver.listen import LISTEN_BACKLOG, listen_reuse_port, listen_tcp, reuse_port_address


class AddressTests(SynchronousTestCase):
    def test_positional_and_keyword_forms(self) -> None:
        inet, inet6 = socket.AF_INET, socket.AF_INET6
        for desc, expected in (
            ("tcp:7000", (inet, "0.0.0.0", 7000, LISTEN_BACKLOG)),
            ("tcp:7000:127.0.0.1", (inet, "127.0.0.1", 7000, LISTEN_BACKLOG)),
            ("tcp:7000:127.0.0.1:100", (inet, "127.0.0.1", 7000, 100)),
            ("tcp:7000:interface=127.0.0.1", (inet, "127.0.0.1", 7000, LISTEN_BACKLOG)),
            ("tcp:port=7000:interface=10.0.0.5:backlog=9", (inet, "10.0.0.5", 7000, 9)),
            ("tcp:7000:backlog=9:interface=10.0.0.5", (inet, "10.0.0.5", 7000, 9)),
            ("tcp6:7000", (inet6, "::", 7000, LISTEN_BACKLOG)),
            ("tcp6:7000:\\:\\:1", (inet6, "::1", 7000, LISTEN_BACKLOG)),
        ):
            self.assertEqual(reuse_port_address(desc), expected, desc)

    def test_loopback_detection_reads_the_positional_interface_too(self) -> None:
        self.assertTrue(is_loopback("tcp:7000:127.0.0.1"))
        self.assertTrue(is_loopback("tcp6:7000:\\:\\:1"))
        self.assertFalse(is_loopback("tcp:7000:0.0.0.0"))
        self.assertFalse(is_loopback("ssl:7000:privateKey=127.0.0.1"))

    def test_conflicting_forms_are_refused(self) -> None:
        for desc in ("tcp:7000:127.0.0.1:interface=10.0.0.5", "ssl:7000", "tcp:port=1:7000"):
            self.assertRaises(ValueError, reuse_port_address, desc)


class BindTests(TestCase):
    def test_the_positional_interface_is_the_one_bound(self) -> None:
        port = listen_reuse_port(reactor, "tcp:0:127.0.0.2", Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        host = port.getHost()
        self.assertEqual(host.host, "127.0.0.2")  # type: ignore[attr-defined]
        with socket.socket() as s:
            self.assertNotEqual(s.connect_ex(("127.0.0.1", host.port)), 0)  # type: ignore[attr-defined]


class _Echo(Protocol):
    """Writes what it is told to on connect and on data; records what it sees."""

    def __init__(self) -> None:
        self.on_data: list[bytes] = []
        self.lost: Deferred[None] = Deferred()
        self.seen_in_turn: list[bytes] = []
        self.client: socket.socket | None = None

    def dataReceived(self, data: bytes) -> None:
        for chunk in self.on_data:
            self.transport.write(chunk)  # type: ignore[union-attr]
        if self.client is not None:
            # Still inside the reactor's turn that read the request.
            try:
                self.seen_in_turn.append(self.client.recv(65536, socket.MSG_DONTWAIT))
            except BlockingIOError:
                self.seen_in_turn.append(b"")

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class EagerWriteTests(TestCase):
    """L{imserver.listen.EagerServer}: a write leaves in the turn that made it."""

    def _serve(self) -> tuple[_Echo, socket.socket]:
        proto = _Echo()
        port = listen_tcp(reactor, "tcp:0:127.0.0.1", Factory.forProtocol(lambda: proto))
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))  # type: ignore[attr-defined]
        self.addCleanup(client.close)
        return proto, client

    async def _until(self, check: Callable[[], bool]) -> None:
        for _ in range(500):
            if check():
                return
            await deferLater(reactor, 0.01)
        self.fail("timed out")

    def test_a_reply_is_sent_before_the_turn_ends(self) -> Deferred[None]:
        """
        Buffered, the reply would wait for the reactor's next poll: the
        client's socket would still be empty while the server's turn runs.
        """
        proto, client = self._serve()
        proto.client = client
        proto.on_data = [b"pong"]

        async def run() -> None:
            client.sendall(b"ping")
            await self._until(lambda: bool(proto.seen_in_turn))
            self.assertEqual(proto.seen_in_turn, [b"pong"])

        return Deferred.fromCoroutine(run())

    def test_what_the_kernel_does_not_take_is_buffered_in_order(self) -> Deferred[None]:
        big = bytes(range(256)) * 40_000  # 10 MB: more than a loopback socket takes at once
        proto, client = self._serve()
        proto.on_data = [big, b"tail"]
        client.setblocking(False)

        async def run() -> None:
            client.sendall(b"go")
            got = bytearray()

            def read() -> bool:
                try:
                    while chunk := client.recv(1 << 20):
                        got.extend(chunk)
                except BlockingIOError:
                    pass
                return len(got) >= len(big) + 4

            await self._until(read)
            self.assertEqual(bytes(got), big + b"tail")

        return Deferred.fromCoroutine(run())

    def test_a_write_to_a_reset_connection_closes_it(self) -> Deferred[None]:
        proto, client = self._serve()
        proto.on_data = [b"x" * 1000]

        async def run() -> None:
            client.sendall(b"hello")
            await self._until(lambda: proto.transport is not None)
            await deferLater(reactor, 0.05)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # an RST
            await deferLater(reactor, 0.05)
            for _ in range(3):
                proto.transport.write(b"after the reset")  # type: ignore[union-attr]
            await proto.lost

        return Deferred.fromCoroutine(run())

    def test_writes_after_start_tls_are_encrypted(self) -> Deferred[None]:
        """
        After C{startTLS} a write is plaintext for the TLS layer: sent at
        once to the socket, it reached the client in the clear and broke
        its TLS session.
        """
        pem = FilePath(twisted.test.__file__).sibling("server.pem").getContent()
        server_options = ssl.PrivateCertificate.loadPEM(pem).options()

        class StartsTLS(Protocol):
            def connectionMade(self) -> None:
                self.transport.startTLS(server_options)  # type: ignore[union-attr]

            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"pong:" + data)  # type: ignore[union-attr]

        class Client(Protocol):
            def __init__(self) -> None:
                self.got = b""
                self.done: Deferred[bytes] = Deferred()

            def connectionMade(self) -> None:
                self.transport.write(b"ping")  # type: ignore[union-attr]

            def dataReceived(self, data: bytes) -> None:
                self.got += data
                if self.got == b"pong:ping":
                    self.transport.loseConnection()  # type: ignore[union-attr]

            def connectionLost(self, reason: object = None) -> None:
                self.done.callback(self.got)

        port = listen_tcp(reactor, "tcp:0:127.0.0.1", Factory.forProtocol(StartsTLS))
        self.addCleanup(port.stopListening)
        client = Client()
        reactor.connectSSL(  # type: ignore[attr-defined]
            "127.0.0.1",
            port.getHost().port,  # type: ignore[attr-defined]
            ClientFactory.forProtocol(lambda: client),
            ssl.CertificateOptions(verify=False),
        )

        async def run() -> None:
            self.assertEqual(await client.done, b"pong:ping")

        return Deferred.fromCoroutine(run())
