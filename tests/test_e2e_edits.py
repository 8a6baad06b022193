"""
End-to-end: edit, hide and clear (docs/protocol.md, "Editing and hiding") on
a cluster of three C{twistd} nodes sharing the harness's MariaDB and Redis:
an edit made on node 1 is pushed to devices on nodes 2 and 3 and read there
(history, convs, sync, catch-up) with its new body, the cached copies of the
old one notwithstanding; a hide or a clear made on node 1 is told to the
hider's device on node 3 and its history there leaves the messages out,
while the peer keeps them; and who may do what (an outsider, the recipient, a blocked
pair).
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.trial.unittest import TestCase

from imserver.client import IMClientProtocol
from tests.harness import ServerProcess
from tests.test_cluster import cluster_backend, kept_nodes
from tests.test_e2e_devices import FAST, DevicesHelpers

Frame = dict[str, Any]

_uids = itertools.count(950_000)


class EditsClusterTests(DevicesHelpers, TestCase):
    _nodes: list[ServerProcess] = []

    def backend(self) -> dict[str, dict[str, Any]]:
        return {**cluster_backend(), "limits": dict(FAST)}

    @property
    def nodes(self) -> list[ServerProcess]:
        return kept_nodes(type(self)._nodes, self.backend)

    async def bodies(self, client: IMClientProtocol, peer: int) -> list[tuple[int, Any, int]]:
        page = await self.result(client, "history", peer=peer, limit=50)
        return [(m["msg_id"], m["body"], m.get("edited", 0)) for m in page["msgs"]]

    async def test_edit_on_one_node_is_seen_on_the_others(self) -> None:
        n1, n2, n3 = self.nodes
        a, b = next(_uids), next(_uids)
        a1, _ = await self.device(n1, a, "a1")
        a3, _ = await self.device(n3, a, "a3")
        b2, _ = await self.device(n2, b, "b2")
        sent = await self.result(a1, "send", to=b, cid="e1", body="first")
        msg_id = sent["msg_id"]
        self.assertEqual((await self.push(b2))["t"], "msg")
        self.assertEqual((await self.push(a3))["t"], "msg")
        # Node 2 serves b's reads from the hot copies: the old body is cached there.
        self.assertEqual(await self.bodies(b2, a), [(msg_id, "first", 0)])
        before = (await self.result(b2, "catchup", after=0))["seq"]

        edited = []
        for body in ("second", {"text": "third"}):
            reply = await self.result(a1, "edit", msg_id=msg_id, body=body)
            self.assertEqual(set(reply), {"edited", "seq"})
            edited.append(reply["edited"])
            for device in (b2, a3):
                push = await self.push(device)
                self.assertEqual(push["t"], "edit")
                self.assertEqual((push["msg_id"], push["body"]), (msg_id, body))
                self.assertEqual(push["edited"], reply["edited"])
                self.assertIsInstance(push["seq"], int)
        self.assertLess(edited[0], edited[1])
        await self.quiet(a1, a3, b2)
        last = (msg_id, {"text": "third"}, edited[1])
        self.assertEqual(await self.bodies(b2, a), [last])
        self.assertEqual(await self.bodies(a3, b), [last])
        [conv] = (await self.result(b2, "convs"))["convs"]
        self.assertEqual((conv["last"]["body"], conv["last"]["edited"]), last[1:])
        [synced] = (await self.result(b2, "sync"))["msgs"]
        self.assertEqual((synced["body"], synced["edited"]), last[1:])
        # The same body again: nothing changes (idempotent).
        again = await self.result(a1, "edit", msg_id=msg_id, body={"text": "third"})
        self.assertEqual(again, {"edited": edited[1]})
        # A device that was away catches up on the edits: the message as it is now.
        events = (await self.result(b2, "catchup", after=before))["events"]
        self.assertEqual([e["t"] for e in events], ["edit", "edit"])
        self.assertEqual({e["body"]["text"] for e in events}, {"third"})
        # The recipient may not edit.
        await self.fails(b2, "forbidden", "edit", msg_id=msg_id, body="mine")

    async def test_hide_and_clear_on_one_node_hidden_on_another(self) -> None:
        n1, n2, n3 = self.nodes
        a, b = next(_uids), next(_uids)
        b1, _ = await self.device(n1, b, "b1")
        b3, _ = await self.device(n3, b, "b3")
        a2, _ = await self.device(n2, a, "a2")
        ids = []
        for i in range(3):
            ids.append((await self.result(a2, "send", to=b, cid=f"h{i}", body=f"m{i}"))["msg_id"])
            for device in (b1, b3):
                self.assertEqual((await self.push(device))["t"], "msg")
        # Node 3 has read b's history: it knows b never hid anything.
        self.assertEqual([m for m, _, _ in await self.bodies(b3, a)], ids[::-1])

        reply = await self.result(b1, "hide", msg_ids=[ids[1]])
        push = await self.push(b3)
        self.assertEqual(push, {"t": "hide", "msg_ids": [ids[1]], "seq": reply["seq"]})

        # Read right after the push: the broadcast that goes before it made node 3 filter.
        self.assertEqual([m for m, _, _ in await self.bodies(b3, a)], [ids[2], ids[0]])
        self.assertEqual([m for m, _, _ in await self.bodies(a2, b)], ids[::-1])
        self.assertEqual((await self.result(b3, "unread"))["total"], 2)
        self.assertEqual(
            [m["msg_id"] for m in (await self.result(b3, "sync"))["msgs"]], [ids[0], ids[2]]
        )

        [conv] = (await self.result(b3, "convs"))["convs"]
        cleared = await self.result(b1, "clear", session_id=conv["session_id"])
        self.assertEqual(cleared["up_to"], ids[2])
        push = await self.push(b3)
        self.assertEqual(
            push,
            {
                "t": "clear",
                "session_id": conv["session_id"],
                "up_to": ids[2],
                "seq": cleared["seq"],
            },
        )
        self.assertEqual(await self.bodies(b3, a), [])
        [conv] = (await self.result(b3, "convs"))["convs"]
        self.assertEqual((conv["last"], conv["unread"]), (None, 0))
        self.assertEqual(len(await self.bodies(a2, b)), 3)
        # An outsider may not hide the pair's messages.
        c1, _ = await self.device(n1, next(_uids), "c1")
        await self.fails(c1, "forbidden", "hide", msg_ids=[ids[0]])
        await self.fails(c1, "forbidden", "clear", session_id=conv["session_id"])

    async def test_who_may_edit_hide_clear(self) -> None:
        """The authorization rules (docs/protocol.md, "Who may do what"): an
        outsider, the recipient, a blocked pair; refusals tell nobody anything."""
        n1, n2, n3 = self.nodes
        a, b, c = next(_uids), next(_uids), next(_uids)
        ca, _ = await self.device(n1, a, "a")
        cb, _ = await self.device(n2, b, "b")
        cc, _ = await self.device(n3, c, "c")
        sent = await self.result(ca, "send", to=b, cid="w1", body="x")
        msg_id, sid = sent["msg_id"], sent["session_id"]
        self.assertEqual((await self.push(cb))["t"], "msg")
        for client, op, fields in (
            (cc, "edit", {"msg_id": msg_id, "body": "y"}),
            (cb, "edit", {"msg_id": msg_id, "body": "y"}),
            (cc, "hide", {"msg_ids": [msg_id]}),
            (cc, "clear", {"session_id": sid}),
        ):
            await self.fails(client, "forbidden", op, **fields)
        await self.fails(ca, "not_found", "edit", msg_id=msg_id + 9999, body="y")
        await self.fails(ca, "not_found", "hide", msg_ids=[msg_id + 9999])
        await self.fails(ca, "not_found", "clear", session_id=sid + 9999)
        await self.quiet(ca, cb, cc)
        # Blocked (b blocks a, from a device on a's node: its cache knows at once; other
        # nodes learn it by a broadcast): the sender may not edit; both may still hide
        # and clear.
        cb1, _ = await self.device(n1, b, "b1")
        await self.result(cb1, "block", uid=a)
        await self.fails(ca, "forbidden", "edit", msg_id=msg_id, body="y")
        self.assertIn("seq", await self.result(ca, "hide", msg_ids=[msg_id]))
        self.assertEqual((await self.result(cb, "clear", session_id=sid))["up_to"], msg_id)
        await self.quiet(ca, cc)
        await self.result(cb1, "unblock", uid=a)
        reply = await self.result(ca, "edit", msg_id=msg_id, body="y")
        self.assertGreater(reply["edited"], 0)
