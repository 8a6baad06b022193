"""
Listening sockets shared by workers (issue 9, defect 6): the interface of an
endpoint, positional (C{tcp:7000:127.0.0.1}) or keyword, is the one bound.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver.config import is_loopback
from imserver.listen import LISTEN_BACKLOG, listen_reuse_port, reuse_port_address


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
