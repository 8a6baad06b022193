"""
End-to-end: delivery receipts and mute (docs/protocol.md, "Receipts",
"Mute") on a cluster of three C{twistd} nodes sharing the harness's MariaDB
and Redis, over real TCP: the sender on node 1 (and its second device on
node 3) gets C{delivered} when the recipient on node 2 acks, once; convs and
history on any node show the peer's positions; a mute on one node reaches
the user's device on another, and its catch-up.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from twisted.trial.unittest import TestCase

from imserver.client import IMClientProtocol
from tests.harness import ServerProcess
from tests.support import sleep, within
from tests.test_cluster import cluster_backend, kept_nodes
from tests.test_e2e_devices import FAST, QUIET, DevicesHelpers

_uids = itertools.count(930_000)
Frame = dict[str, Any]


class ReceiptsClusterTests(DevicesHelpers, TestCase):
    _nodes: list[ServerProcess] = []

    def backend(self) -> dict[str, dict[str, Any]]:
        return {**cluster_backend(), "limits": dict(FAST)}

    @property
    def nodes(self) -> list[ServerProcess]:
        return kept_nodes(type(self)._nodes, self.backend)

    async def next_of(self, client: IMClientProtocol, kind: str) -> Frame:
        """The next push of this kind (others, such as the message's own echo, pass)."""
        while True:
            # Not self.push: the shared helpers pass over delivered pushes.
            push = dict(await within(client.next_push()))
            if push["t"] == kind:
                return push

    async def quiet(self, *clients: IMClientProtocol) -> None:
        """No receipt, mute nor message more (the shared quiet lets receipts pass)."""
        await sleep(QUIET)
        for c in clients:
            extra = [dict(await c.next_push()) for _ in range(c.pending_pushes)]
            extra = [f for f in extra if f != {"t": "sync"}]
            self.assertEqual(extra, [], f"unexpected pushes to {c.uid}")

    async def test_delivered_across_nodes(self) -> None:
        n1, n2, n3 = self.nodes
        alice, bob = next(_uids), next(_uids)
        phone, _ = await self.device(n1, alice, "phone")
        laptop, _ = await self.device(n3, alice, "laptop")
        recipient, _ = await self.device(n2, bob, "phone")
        replies = [
            await self.ok(phone, "send", to=bob, cid=f"c{i}", body=f"hi {i}") for i in range(3)
        ]
        sid = replies[0]["session_id"]
        ids = [r["msg_id"] for r in replies]
        for _ in ids:
            await self.next_of(recipient, "msg")
        # The sender's own convs: nothing delivered or read yet.
        [conv] = (await self.result(phone, "convs"))["convs"]
        self.assertEqual((conv["peer_read"], conv["peer_delivered"]), (0, 0))

        await self.result(recipient, "ack", msg_ids=ids[:2])
        expected = {"t": "delivered", "session_id": sid, "msg_id": ids[1], "by": bob}
        self.assertEqual(await self.next_of(phone, "delivered"), expected)
        self.assertEqual(await self.next_of(laptop, "delivered"), expected)
        # Acked again (another device of bob's would do the same): nothing.
        recipient2, _ = await self.device(n3, bob, "tablet")
        await self.result(recipient2, "ack", msg_ids=ids[:2])
        await self.result(recipient, "ack", msg_ids=[ids[2]])
        last = await self.next_of(phone, "delivered")
        self.assertEqual(last["msg_id"], ids[2])
        self.assertEqual((await self.next_of(laptop, "delivered"))["msg_id"], ids[2])
        await self.quiet(phone, laptop)

        # Positions from any node (SQL's: the same everywhere).
        [conv] = (await self.result(laptop, "convs"))["convs"]
        self.assertEqual((conv["peer_read"], conv["peer_delivered"]), (0, ids[2]))
        await self.result(recipient, "read", session_id=sid, msg_id=ids[1])
        history = await self.result(phone, "history", session_id=sid, limit=1)
        self.assertEqual((history["peer_read"], history["peer_delivered"]), (ids[1], ids[2]))
        history = await self.result(laptop, "history", peer=bob)
        self.assertEqual(len(history["msgs"]), 3)
        self.assertEqual((history["peer_read"], history["peer_delivered"]), (ids[1], ids[2]))

    async def test_mute_reaches_the_other_devices(self) -> None:
        n1, n2, n3 = self.nodes
        alice, bob = next(_uids), next(_uids)
        phone, _ = await self.device(n1, alice, "phone")
        sender, _ = await self.device(n2, bob, "phone")
        sid = (await self.ok(sender, "send", to=alice, cid="m", body="x"))["session_id"]
        await self.next_of(phone, "msg")
        laptop, _ = await self.device(n3, alice, "laptop")
        until = int(time.time() * 1000) + 3_600_000
        reply = await self.result(phone, "mute", session_id=sid, until=until)
        self.assertEqual(set(reply), {"muted_until", "seq"})
        self.assertEqual(reply["muted_until"], until)
        push = await self.next_of(laptop, "mute")
        self.assertEqual(
            push, {"t": "mute", "session_id": sid, "until": until, "seq": reply["seq"]}
        )
        [conv] = (await self.result(laptop, "convs"))["convs"]
        self.assertEqual(conv["muted_until"], until)
        [conv] = (await self.result(sender, "convs"))["convs"]
        self.assertEqual(conv["muted_until"], 0)
        # Catch-up renders the same event (from any node).
        tablet, _ = await self.device(n2, alice, "tablet")
        page = await self.result(tablet, "catchup", after=reply["seq"] - 1)
        self.assertEqual(page["events"], [push])
        # Refused for someone outside the conversation, and for no such session.
        eve, _ = await self.device(n3, next(_uids), "phone")
        for session_id, code in ((sid, "forbidden"), (sid + 7_777_777, "not_found")):
            await self.fails(eve, code, "mute", session_id=session_id, until=until)
        await self.fails(eve, "invalid", "mute", session_id=sid, until=-1)
        await self.quiet(phone, sender)
        await within(self.result(phone, "mute", session_id=sid, until=0))
