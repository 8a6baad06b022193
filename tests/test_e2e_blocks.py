"""
End-to-end: blocking (docs/protocol.md, "Blocking") on a cluster of three
C{twistd} nodes sharing the harness's MariaDB and Redis, over real TCP and
HTTP. A block made on one node refuses sends both ways on every node (each
had the pair in its cache: the broadcast updates them), the blocker's other
devices are told, history stays, unblock lets sends through again; the ops'
errors, the limit and the rate limit; the admin API acts as the user does.
"""

from __future__ import annotations

import itertools
import time
import urllib.request
from typing import Any

from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from imserver.client import IMClientProtocol, RequestFailed
from tests.harness import ServerProcess
from tests.support import within
from tests.test_cluster import cluster_backend, kept_nodes
from tests.test_e2e_devices import DevicesHelpers, admin

Frame = dict[str, Any]
log = Logger()

_uids = itertools.count(930_000)
#: Seconds a block may take to reach the other nodes' caches (a broadcast: milliseconds).
SPREAD = 5.0


def metric(server: ServerProcess, name: str) -> float:
    """A metric of the node (unlabelled), from its /metrics."""
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


class BlocksClusterTests(DevicesHelpers, TestCase):
    """Users on three nodes of one cluster ([limits] max_blocks = 3)."""

    _nodes: list[ServerProcess] = []

    def backend(self) -> dict[str, dict[str, Any]]:
        return {**cluster_backend(), "limits": {"max_blocks": 3}}

    @property
    def nodes(self) -> list[ServerProcess]:
        return kept_nodes(type(self)._nodes, self.backend)

    async def refused_send(self, client: IMClientProtocol, to: int) -> list[int]:
        """
        Sends from C{client} to C{to} are refused (forbidden) within
        L{SPREAD} seconds; the msg_ids of those accepted before (a send
        racing the block's broadcast to its node may pass: documented).
        """
        deadline = time.monotonic() + SPREAD
        accepted = []
        while True:
            try:
                reply = await within(client.request("send", to=to, cid=f"c{next(_uids)}", body="x"))
            except RequestFailed as e:
                self.assertEqual(e.code, "forbidden", e)
                self.assertIn("blocked", e.frame["message"])
                return accepted
            accepted.append(reply["msg_id"])
            if time.monotonic() > deadline:
                self.fail(f"sends from {client.uid} to {to} still accepted")

    async def sends_pass(self, client: IMClientProtocol, to: int) -> Frame:
        """A send from C{client} to C{to} is accepted within L{SPREAD} seconds."""
        deadline = time.monotonic() + SPREAD
        while True:
            try:
                return dict(
                    await within(client.request("send", to=to, cid=f"c{next(_uids)}", body="ok"))
                )
            except RequestFailed as e:
                self.assertEqual(e.code, "forbidden", e)
                if time.monotonic() > deadline:
                    raise

    async def pushes_of(self, client: IMClientProtocol, kind: str, n: int) -> list[Frame]:
        """The next C{n} pushes of C{kind} (others skipped)."""
        found: list[Frame] = []
        while len(found) < n:
            frame = await self.push(client)
            if frame["t"] == kind:
                found.append(frame)
        return found

    async def test_a_block_on_one_node_holds_on_every_node(self) -> None:
        n1, n2, _n3 = self.nodes
        a, b = next(_uids), next(_uids)
        phone, _ = await self.device(n1, a, "phone")
        laptop, _ = await self.device(n2, a, "laptop")
        peers = [(await self.device(node, b, f"d{i}"))[0] for i, node in enumerate(self.nodes)]
        # Every node has the pair in its cache: each of b's devices sends once.
        for peer in peers:
            await self.sends_pass(peer, a)
        before = await self.result(peers[0], "history", peer=a)
        self.assertEqual(len(before["msgs"]), 3)

        self.assertEqual(await self.result(phone, "block", uid=b), {})
        [told] = await self.pushes_of(laptop, "block", 1)
        self.assertEqual(told, {"t": "block", "uid": b, "blocked": True})
        raced = []
        for peer in peers:
            raced += await self.refused_send(peer, a)
        raced += await self.refused_send(phone, b)
        raced += await self.refused_send(laptop, b)
        # Once refused, refused: every node knows.
        for client, to in [*((peer, a) for peer in peers), (phone, b), (laptop, b)]:
            self.assertEqual(await self.refused_send(client, to), [])
        if raced:
            log.info("{n} sends raced the block's broadcast", n=len(raced))
        self.assertEqual(await self.result(laptop, "blocked"), {"uids": [b], "more": False})
        self.assertEqual(await self.result(peers[2], "blocked"), {"uids": [], "more": False})
        # History stays, for both.
        kept = sorted([*raced, *(m["msg_id"] for m in before["msgs"])], reverse=True)
        for client, peer_uid in ((peers[1], a), (laptop, b)):
            history = await self.result(client, "history", peer=peer_uid)
            self.assertEqual([m["msg_id"] for m in history["msgs"]], kept)

        # Blocking again changes nothing (and tells the other devices again).
        self.assertEqual(await self.result(phone, "block", uid=b), {})
        self.assertEqual(await self.pushes_of(laptop, "block", 1), [told])
        self.assertEqual(await self.result(laptop, "unblock", uid=b), {})
        [untold] = await self.pushes_of(phone, "block", 1)
        self.assertEqual(untold, {"t": "block", "uid": b, "blocked": False})
        for peer in peers:
            await self.sends_pass(peer, a)
        await self.sends_pass(phone, b)
        self.assertEqual(await self.result(laptop, "unblock", uid=b), {})

    async def test_the_admin_api_blocks_as_the_user_does(self) -> None:
        n1, n2, n3 = self.nodes
        a, b = next(_uids), next(_uids)
        phone, _ = await self.device(n1, a, "phone")
        peer, _ = await self.device(n3, b, "phone")
        await self.sends_pass(peer, a)
        path = f"/v1/admin/users/{a}/blocks"
        self.assertEqual(admin(n2, "PUT", f"{path}/{b}"), (200, {"blocked": True}))
        [told] = await self.pushes_of(phone, "block", 1)
        self.assertEqual(told, {"t": "block", "uid": b, "blocked": True})
        await self.refused_send(peer, a)
        # n3 refused it from its cache (the pair was loaded by the first send).
        self.assertGreaterEqual(metric(n3, "imserver_sends_blocked_total"), 1)
        self.assertGreaterEqual(metric(n3, "imserver_block_cache_users"), 2)
        self.assertEqual(admin(n3, "GET", path), (200, {"uids": [b], "more": False}))
        self.assertEqual(await self.result(phone, "blocked"), {"uids": [b], "more": False})
        self.assertEqual(admin(n1, "DELETE", f"{path}/{b}"), (200, {"blocked": False}))
        await self.sends_pass(peer, a)
        self.assertEqual(admin(n2, "GET", path), (200, {"uids": [], "more": False}))

    async def test_errors_limits_and_pages(self) -> None:
        n1 = self.nodes[0]
        a = next(_uids)
        others = [next(_uids) for _ in range(4)]
        for i, uid in enumerate(others):
            client, _ = await self.device(self.nodes[i % 3], uid, "phone")
            await within(client.close())
        client, _ = await self.device(n1, a, "phone")
        await self.fails(client, "invalid", "block", uid=a)
        await self.fails(client, "invalid", "unblock", uid=a)
        await self.fails(client, "no_such_user", "block", uid=next(_uids))
        for bad in (0, -5, "7", 1.5, None, True):
            await self.fails(client, "invalid", "block", uid=bad)
        await self.fails(client, "invalid", "block")
        await self.fails(client, "too_large", "block", uid=2**63)
        await self.fails(client, "too_large", "blocked", limit=501)
        await self.fails(client, "invalid", "blocked", limit=0)
        await self.fails(client, "invalid", "blocked", after=-1)
        for uid in others[:3]:
            self.assertEqual(await self.result(client, "block", uid=uid), {})
        await self.fails(client, "too_large", "block", uid=others[3])
        ordered = sorted(others[:3])
        page = await self.result(client, "blocked", limit=2)
        self.assertEqual(page, {"uids": ordered[:2], "more": True})
        page = await self.result(client, "blocked", limit=2, after=ordered[1])
        self.assertEqual(page, {"uids": ordered[2:], "more": False})

    async def test_block_and_unblock_are_rate_limited(self) -> None:
        a, b = next(_uids), next(_uids)
        peer, _ = await self.device(self.nodes[1], b, "phone")
        client, _ = await self.device(self.nodes[0], a, "phone")
        codes = []
        for i in range(40):
            try:
                await within(client.request("unblock" if i % 2 else "block", uid=b))
                codes.append("ok")
            except RequestFailed as e:
                codes.append(e.code)
        self.assertIn("rate_limited", codes)
        self.assertEqual(set(codes), {"ok", "rate_limited"})
        # blocked is not in the bucket; the peer was never told anything.
        await self.result(client, "blocked")
        await self.quiet(peer)
