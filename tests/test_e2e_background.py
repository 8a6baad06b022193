"""
End-to-end, against C{twistd -n imserver}: background work across a
shutdown (issue 9, defect 10).
"""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3

from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.harness import ServerProcess
from tests.support import ClientsMixin, eventually, reactor, sleep, within
from tests.test_background import HoldingSink

_uids = itertools.count(190_000)


class WebhookShutdownE2ETests(ClientsMixin, TestCase):
    """Regression: SIGTERM in the middle of a notification poll: the node
    closed its pools without waiting for the poll, so a webhook already
    posted stayed claimed in t_notify and was posted again once the lease ran
    out (by this node after a restart, or by another)."""

    timeout = 90

    async def test_sigterm_during_a_post_records_it(self) -> None:
        sink = HoldingSink()
        port = reactor.listenTCP(0, Site(sink), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(sink.release)
        server = ServerProcess(
            {
                "notify": {
                    "webhook": f"http://127.0.0.1:{port.getHost().port}/push",
                    "delay_seconds": 0.2,
                    "secret": "e2e-webhook-secret-0123",
                    "timeout_seconds": 5.0,
                }
            }
        )
        self.addCleanup(server.cleanup)
        server.start()
        a, b = next(_uids), next(_uids)
        bob = await self.client(server.endpoint, server.token(b))
        await bob.close()
        alice = await self.client(server.endpoint, server.token(a))
        sent = await within(alice.request("send", to=b, cid="1", body="wake up"))
        await within(sink.next(), 10)  # posted, not answered yet
        server.signal(signal.SIGTERM)
        await sleep(1.0)  # the node is shutting down, waiting for the poll
        sink.release()
        await eventually(lambda: not server.running, timeout=30)
        self.assertIn("imserver stopped", server.log())
        self.assertEqual([p["msg_id"] for p, _, _ in sink.received], [sent["msg_id"]])
        db = sqlite3.connect(os.path.join(server.dir, "im.db"))
        self.addCleanup(db.close)
        left = db.execute("SELECT msgId FROM t_notify").fetchall()
        self.assertEqual(left, [], "the posted notification was not recorded")
