"""
End-to-end: presence and typing (docs/protocol.md, "Presence and typing") on
a cluster of three C{twistd} nodes sharing the harness's MariaDB and Redis,
over real TCP: a watcher on node 1 sees a user on node 2 come online and go
offline (a second device on node 3 changes nothing), share settings and who
may see whom across nodes, presence answers, and typing across nodes with
its errors and rate limit.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.trial.unittest import TestCase

from imserver.client import IMClientProtocol, RequestFailed
from tests.harness import ServerProcess
from tests.support import sleep, within
from tests.test_cluster import cluster_backend, kept_nodes
from tests.test_e2e_devices import DevicesHelpers

Frame = dict[str, Any]

_uids = itertools.count(950_000)
#: A presence push may wait for its coalescing window (3 s) and cross nodes.
PUSH_TIMEOUT = 10.0


class PresenceHelpers(DevicesHelpers):
    async def pushed(self, client: IMClientProtocol, kind: str) -> Frame:
        """The next push of C{kind} (others, messages or sync, are passed over)."""
        while True:
            frame = dict(await within(client.next_push(), PUSH_TIMEOUT))
            if frame["t"] == kind:
                return frame

    async def none_of(self, client: IMClientProtocol, kind: str, wait: float = 1.0) -> None:
        await sleep(wait)
        frames = [dict(await client.next_push()) for _ in range(client.pending_pushes)]
        self.assertEqual([f for f in frames if f["t"] == kind], [])

    async def contacts(
        self, a: IMClientProtocol, b: IMClientProtocol, b_uid: int, a_uid: int
    ) -> None:
        """a and b talk (a conversation: contacts)."""
        await self.ok(a, "send", to=b_uid, cid=f"hello-{a_uid}-{b_uid}", body="hi")
        await self.pushed(b, "msg")


class PresenceClusterTests(PresenceHelpers, TestCase):
    _nodes: list[ServerProcess] = []

    def backend(self) -> dict[str, dict[str, Any]]:
        return cluster_backend()

    @property
    def nodes(self) -> list[ServerProcess]:
        return kept_nodes(type(self)._nodes, self.backend)

    async def test_watch_a_user_on_another_node(self) -> None:
        n1, n2, n3 = self.nodes
        alice_uid, bob_uid = next(_uids), next(_uids)
        alice, _ = await self.device(n1, alice_uid, "phone")
        bob, _ = await self.device(n2, bob_uid, "phone")
        await self.contacts(alice, bob, bob_uid, alice_uid)
        answer = await self.result(alice, "watch", uids=[bob_uid])
        [state] = answer["users"]
        self.assertEqual((state["uid"], state["online"]), (bob_uid, True))
        connected = state["last_seen"]
        self.assertGreater(connected, 0)

        await within(bob.close())
        gone = await self.pushed(alice, "presence")
        self.assertEqual((gone["uid"], gone["online"]), (bob_uid, False))
        self.assertGreaterEqual(gone["last_seen"], connected)

        # Back on node 2: online, its last_seen the new session's start.
        bob, _ = await self.device(n2, bob_uid, "phone")
        back = await self.pushed(alice, "presence")
        self.assertEqual((back["uid"], back["online"]), (bob_uid, True))
        self.assertGreaterEqual(back["last_seen"], gone["last_seen"])
        # A second device on node 3 is no transition; its leaving neither.
        desk, _ = await self.device(n3, bob_uid, "desk")
        await within(desk.close())
        await self.none_of(alice, "presence", wait=4.0)
        answer = await self.result(alice, "presence", uids=[bob_uid, alice_uid])
        self.assertEqual(
            answer["users"],
            [
                {"uid": bob_uid, "online": True, "last_seen": back["last_seen"]},
                {"uid": alice_uid, "online": True, "last_seen": answer["users"][1]["last_seen"]},
            ],
        )
        await within(bob.close())
        off = await self.pushed(alice, "presence")
        self.assertEqual((off["uid"], off["online"]), (bob_uid, False))
        # Durable: another node answers it from SQL.
        carol_uid = next(_uids)
        carol, _ = await self.device(n3, carol_uid, "phone")
        answer = await self.result(carol, "presence", uids=[bob_uid])
        self.assertEqual(answer["users"], [{"uid": bob_uid, "online": False, "last_seen": 0}])
        viewer, _ = await self.device(n3, alice_uid, "desk")
        answer = await self.result(viewer, "presence", uids=[bob_uid])
        [state] = answer["users"]
        self.assertEqual(state["online"], False)
        self.assertGreaterEqual(state["last_seen"], off["last_seen"] - 1)

    async def test_share_settings_across_nodes(self) -> None:
        n1, n2, n3 = self.nodes
        alice_uid, bob_uid, carol_uid = next(_uids), next(_uids), next(_uids)
        alice, _ = await self.device(n1, alice_uid, "phone")
        bob, _ = await self.device(n2, bob_uid, "phone")
        carol, _ = await self.device(n3, carol_uid, "phone")
        await self.contacts(alice, bob, bob_uid, alice_uid)
        # carol has no conversation with bob: hidden (contacts is the default).
        answer = await self.result(carol, "watch", uids=[bob_uid])
        self.assertEqual(answer["users"], [{"uid": bob_uid, "online": False, "last_seen": 0}])
        answer = await self.result(alice, "watch", uids=[bob_uid])
        self.assertIs(answer["users"][0]["online"], True)

        # everyone: carol (node 3) is told at once.
        reply = await self.result(bob, "set_profile", presence="everyone")
        self.assertEqual(reply["presence"], "everyone")
        shown = await self.pushed(carol, "presence")
        self.assertEqual((shown["uid"], shown["online"]), (bob_uid, True))
        # profile (of others) does not show the setting.
        answer = await self.result(carol, "profile", uids=[bob_uid])
        self.assertNotIn("presence", answer["users"][0])

        # nobody: alice (a contact) and carol see what a never-seen user looks like.
        await self.result(bob, "set_profile", presence="nobody")
        for c in (alice, carol):
            self.assertEqual(
                await self.pushed(c, "presence"),
                {"t": "presence", "uid": bob_uid, "online": False, "last_seen": 0},
            )
        await within(bob.close())
        await self.none_of(alice, "presence", wait=4.0)
        await self.none_of(carol, "presence", wait=0)
        await self.fails(alice, "invalid", "set_profile", presence="friends")

    async def test_typing_across_nodes(self) -> None:
        n1, _n2, n3 = self.nodes
        alice_uid, bob_uid, carol_uid = next(_uids), next(_uids), next(_uids)
        alice, _ = await self.device(n1, alice_uid, "phone")
        bob, _ = await self.device(n3, bob_uid, "phone")
        bob2, _ = await self.device(n1, bob_uid, "desk")
        carol, _ = await self.device(n3, carol_uid, "phone")
        await self.contacts(alice, bob, bob_uid, alice_uid)
        await self.pushed(bob2, "msg")
        self.assertEqual(await self.result(alice, "typing", to=bob_uid, active=True), {})
        for device in (bob, bob2):
            self.assertEqual(
                await self.pushed(device, "typing"),
                {"t": "typing", "from": alice_uid, "active": True},
            )
        self.assertEqual(await self.result(alice, "typing", to=bob_uid, active=False), {})
        self.assertEqual(
            (await self.pushed(bob, "typing"))["active"],
            False,
        )
        # No conversation, or oneself: forbidden; a bad field: invalid.
        await self.fails(carol, "forbidden", "typing", to=bob_uid, active=True)
        await self.fails(alice, "forbidden", "typing", to=alice_uid, active=True)
        await self.fails(alice, "invalid", "typing", to=bob_uid, active="yes")
        await self.none_of(bob, "typing", wait=0.5)
        # Rate-limited per connection: 2 a second, bursts of 5.
        codes = []
        for _ in range(8):
            try:
                await within(alice.request("typing", to=bob_uid, active=True))
                codes.append("ok")
            except Exception as e:
                codes.append(getattr(e, "code", repr(e)))
        self.assertIn("rate_limited", codes)
        self.assertEqual(codes[0], "ok")

    async def test_limits(self) -> None:
        n1 = self.nodes[0]
        uid = next(_uids)
        client, _ = await self.device(n1, uid, "phone")
        await self.fails(client, "too_large", "presence", uids=list(range(1, 102)))
        await self.fails(client, "invalid", "presence", uids=[])
        await self.fails(client, "too_large", "watch", uids=list(range(1, 502)))
        answer = await self.result(client, "watch", uids=list(range(1, 501)))
        self.assertEqual(len(answer["users"]), 500)
        self.assertEqual(await self.result(client, "watch", uids=[]), {"users": []})
        # presence and watch share the social bucket (burst 30, 10 a second).
        codes = []
        for _ in range(40):
            try:
                await within(client.request("presence", uids=[uid]))
                codes.append("ok")
            except RequestFailed as e:
                codes.append(e.code)
        self.assertIn("rate_limited", codes)
        self.assertEqual(codes[:25], ["ok"] * 25)

    async def test_a_client_that_does_not_watch_gets_no_presence_push(self) -> None:
        """A v1 client: its contacts come and go, nothing new is pushed to it."""
        n1, n2, _n3 = self.nodes
        old_uid, peer_uid = next(_uids), next(_uids)
        old = await self.client(n1.endpoint, n1.token(old_uid))  # no device: v1
        peer, _ = await self.device(n2, peer_uid, "phone")
        await self.contacts(peer, old, old_uid, peer_uid)
        await within(peer.close())
        peer, _ = await self.device(n2, peer_uid, "phone")
        await within(peer.close())
        await self.none_of(old, "presence", wait=4.0)


class PresenceSingleNodeTests(PresenceHelpers, TestCase):
    """The embedded default (one node, SQLite): presence through the local registry."""

    async def test_last_seen_survives_a_restart(self) -> None:
        server = ServerProcess()
        self.addCleanup(server.cleanup)
        server.start()
        alice_uid, bob_uid = next(_uids), next(_uids)
        alice, _ = await self.device(server, alice_uid, "phone")
        bob, _ = await self.device(server, bob_uid, "phone")
        await self.ok(bob, "send", to=alice_uid, cid="hi", body="hi")
        answer = await self.result(alice, "watch", uids=[bob_uid])
        self.assertIs(answer["users"][0]["online"], True)
        await within(bob.close())
        off = await self.pushed(alice, "presence")
        self.assertEqual((off["uid"], off["online"]), (bob_uid, False))
        await sleep(1.5)  # last_seen is written within a second
        await within(alice.close())
        server.stop()
        server.start()
        alice, _ = await self.device(server, alice_uid, "phone")
        answer = await self.result(alice, "presence", uids=[bob_uid])
        self.assertEqual(
            answer["users"], [{"uid": bob_uid, "online": False, "last_seen": off["last_seen"]}]
        )
