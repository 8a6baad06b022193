"""
End-to-end: several devices per user (docs/protocol.md, "Devices") on a
cluster of C{twistd} nodes sharing the harness's MariaDB and Redis, spoken to
over real TCP and HTTP: one user's devices on three nodes get every push
meant for them (and not their own), a device offline during 5,000 messages
catches up exactly, replace / too_many / logout_device / admin revocation
kick across nodes, device-bound tokens, and a client of protocol v1 (no
device) works as before.

L{DevicesClusterTests} shares one three-node cluster (C{max_online = 3}) among
its tests, as L{tests.test_cluster.ClusterMessagingTests} does; tests that
need another configuration start their own nodes.
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.error
import urllib.request
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from imserver.client import IMClientProtocol, RequestFailed
from imserver.services.tokens import TokenService
from tests import test_e2e_messaging as messaging
from tests.harness import ServerProcess
from tests.support import eventually, sleep, within
from tests.test_cluster import cluster_backend, kept_nodes, start_nodes

Frame = dict[str, Any]
log = Logger()

_uids = itertools.count(900_000)
#: Sends raised far beyond what the tests send (5,000 messages from a few connections).
FAST = {"send_per_second": 1_000_000, "send_burst": 1_000_000}
#: How long a push between nodes may take before it counts as missing.
QUIET = 0.5
#: Seconds after a revocation by which all it does is done (the server kicks the
#: device again 5 s later, for a login that was on its way in).
REVOKE_SETTLED = 5.5


def token(server: ServerProcess, uid: int, device: str | None = None, ttl: int = 3600) -> str:
    return TokenService(server.secret).mint(uid, now=time.time(), ttl_seconds=ttl, device=device)


def admin(server: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Call the node's admin API: (status, decoded JSON)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"X-Admin-Key": str(server.config["auth"]["admin_key"])},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def devices_path(uid: int) -> str:
    return f"/v1/admin/users/{uid}/devices"


class DevicesHelpers(messaging.MessagingHelpers):
    async def device(
        self,
        server: ServerProcess,
        uid: int,
        device: str | None,
        tok: str | None = None,
        **fields: Any,
    ) -> tuple[IMClientProtocol, Frame]:
        """Connect and authenticate as C{device} of C{uid} (no device field if None)."""
        client = await self.client(server.endpoint)
        if device is not None:
            fields["device"] = device
        reply = dict(await within(client.auth(tok or token(server, uid), **fields)))
        self.assertEqual(reply["uid"], uid)
        return client, reply

    async def refused_auth(
        self, server: ServerProcess, uid: int, device: str | None, tok: str
    ) -> RequestFailed:
        client = await self.client(server.endpoint)
        fields = {} if device is None else {"device": device}
        try:
            reply = await within(client.auth(tok, **fields))
        except RequestFailed as e:
            self.assertEqual(e.code, "auth_failed", e)
            await within(client.closed)
            return e
        self.fail(f"auth of {uid}/{device} should fail: {reply}")

    async def result(self, client: IMClientProtocol, op: str, **fields: Any) -> Frame:
        """The ok reply without its envelope, seq kept (MessagingHelpers drops it)."""
        reply = await self.ok(client, op, **fields)
        del reply["t"], reply["id"]
        return reply

    async def push(self, client: IMClientProtocol) -> Frame:
        """
        The next push but C{{"t": "sync"}}: a node that learns late that
        another node holds a user's device tells it to catch up (allowed at
        any time, docs/protocol.md); what is checked here is what it must get.
        """
        while True:
            # Not MessagingHelpers.push: that one drops the seq (for the v1 contract tests).
            frame = dict(await within(client.next_push()))
            # Delivery receipts (issue 11): tests/test_e2e_receipts.py checks them.
            if frame != {"t": "sync"} and frame.get("t") != "delivered":
                return frame

    async def quiet(self, *clients: IMClientProtocol) -> None:
        """Nothing more is pushed to these clients (within L{QUIET} seconds)."""
        await sleep(QUIET)
        for c in clients:
            extra = [dict(await c.next_push()) for _ in range(c.pending_pushes)]
            extra = [f for f in extra if f != {"t": "sync"} and f.get("t") != "delivered"]
            if extra:
                self.fail(f"unexpected pushes to {c.uid}: {messaging.short(extra)}")

    async def kicked(self, client: IMClientProtocol, reason: str) -> None:
        push = await self.push(client)
        self.assertEqual(push, {"t": "kick", "reason": reason})
        await within(client.closed)

    async def catch_up(self, client: IMClientProtocol, limit: int = 500) -> tuple[list[Frame], int]:
        """Every catch-up page to the end: (events, the last page's seq)."""
        events: list[Frame] = []
        while True:
            page = await self.result(client, "catchup", limit=limit)
            events.extend(page["events"])
            if not page["more"]:
                return events, page["seq"]
            # A page holds at most limit events and one reply's size (max_frame_bytes).
            self.assertGreater(len(page["events"]), 0, "a page before the last is not empty")
            self.assertLessEqual(len(page["events"]), limit)


class DevicesClusterTests(DevicesHelpers, TestCase):
    """One user's devices on three nodes of one cluster (max_online 3)."""

    _nodes: list[ServerProcess] = []

    def backend(self) -> dict[str, dict[str, Any]]:
        return {**cluster_backend(), "limits": dict(FAST), "devices": {"max_online": 3}}

    @property
    def nodes(self) -> list[ServerProcess]:
        return kept_nodes(type(self)._nodes, self.backend)

    async def three(self, uid: int) -> list[IMClientProtocol]:
        """Devices d1, d2, d3 of C{uid} on nodes 1, 2, 3."""
        clients = []
        for i, node in enumerate(self.nodes, 1):
            client, reply = await self.device(node, uid, f"d{i}")
            self.assertEqual(reply["device"], f"d{i}")
            self.assertIs(reply["new_device"], True)
            clients.append(client)
        return clients

    async def test_three_devices_on_three_nodes(self) -> None:
        _n1, n2, _n3 = self.nodes
        uid, peer_uid = next(_uids), next(_uids)
        d1, d2, d3 = await self.three(uid)
        peer, _ = await self.device(n2, peer_uid, "phone")

        # A message to the user reaches all three devices, each with the user's seq.
        reply = await self.ok(peer, "send", to=uid, cid="c1", body="hi")
        sent = messaging.Sent(
            {k: reply[k] for k in ("msg_id", "session_id", "ts", "dup")}, peer_uid, uid, "c1", "hi"
        )
        self.assertEqual(reply["seq"], 1, "the peer's stream: its own send")
        pushes = [await self.push(d) for d in (d1, d2, d3)]
        for p in pushes:
            self.assertEqual(p, {**sent.push(1, 1), "seq": 1})
        await self.quiet(d1, d2, d3, peer)

        # The user sends from d1: d2, d3 and the recipient get it, d1 does not.
        reply = await self.ok(d1, "send", to=peer_uid, cid="c2", body="back")
        self.assertEqual(reply["seq"], 2)
        mine = messaging.Sent(
            {k: reply[k] for k in ("msg_id", "session_id", "ts", "dup")},
            uid,
            peer_uid,
            "c2",
            "back",
        )
        for d in (d2, d3):
            p = await self.push(d)
            self.assertEqual(p, {"t": "msg", **mine.obj(), "seq": 2})
        p = await self.push(peer)
        self.assertEqual(p, {**mine.push(1, 1), "seq": 2})
        await self.quiet(d1, d2, d3, peer)

        # Read on d2: the reply has the counts and seq; d1 and d3 get the read
        # with the user's counts; the peer gets the read (its own seq).
        reply = await self.result(d2, "read", session_id=sent.session_id, msg_id=sent.msg_id)
        self.assertEqual(reply, {"unread": 0, "total_unread": 0, "seq": 3})
        read = {"t": "read", "session_id": sent.session_id, "by": uid, "msg_id": sent.msg_id}
        for d in (d1, d3):
            self.assertEqual(await self.push(d), {**read, "seq": 3, "unread": 0, "total_unread": 0})
        self.assertEqual(await self.push(peer), {**read, "seq": 3})
        await self.quiet(d1, d2, d3, peer)
        # Read state is the user's: every device sees it.
        for d in (d1, d2, d3):
            self.assertEqual(await self.result(d, "unread"), {"total": 0, "sessions": []})

        # devices {} lists the three, online, each on its node.
        listed = (await self.result(d3, "devices"))["devices"]
        self.assertEqual(
            sorted((x["device"], x["online"]) for x in listed),
            [("d1", True), ("d2", True), ("d3", True)],
        )
        self.assertEqual(len({x["node"] for x in listed}), 3, listed)
        for x in listed:
            self.assertEqual(
                set(x), {"device", "client", "online", "node", "since", "last_seen"}, x
            )

        # d1 confirms seq 3 and goes; meanwhile a message comes, d2 sends one and
        # recalls it, d3 reads. d1 comes back on node 2 with since 3: the
        # message, the recall (the recalled message is passed over) and the read.
        await self.ok(d1, "ack", seq=3)
        await within(d1.close())
        r = await self.ok(peer, "send", to=uid, cid="c3", body="while away")
        third = messaging.Sent(
            {k: r[k] for k in ("msg_id", "session_id", "ts", "dup")},
            peer_uid,
            uid,
            "c3",
            "while away",
        )
        r = await self.ok(d2, "send", to=peer_uid, cid="c4", body="oops")
        self.assertEqual(r["seq"], 5)
        self.assertEqual(await self.result(d2, "recall", msg_id=r["msg_id"]), {"seq": 6})
        recall = {"t": "recall", "msg_id": r["msg_id"], "session_id": sent.session_id, "by": uid}
        reply = await self.result(d3, "read", session_id=sent.session_id, msg_id=third.msg_id)
        self.assertEqual(reply, {"unread": 0, "total_unread": 0, "seq": 7})
        back, auth = await self.device(n2, uid, "d1", since=3)
        self.assertEqual((auth["seq"], auth["head"], auth["new_device"]), (3, 7, False))
        events, position = await self.catch_up(back, limit=2)
        self.assertEqual(
            events,
            [
                {"t": "msg", **third.obj(), "seq": 4},
                {**recall, "seq": 6},
                {**read, "msg_id": third.msg_id, "seq": 7},
            ],
        )
        self.assertEqual(position, 7)
        await self.quiet(back)

    async def test_offline_device_catches_up_5000_messages(self) -> None:
        n1, n2, n3 = self.nodes
        uid = next(_uids)
        online, _ = await self.device(n1, uid, "desk")
        away, reply = await self.device(n2, uid, "phone")
        start = reply["seq"]
        self.assertEqual(start, reply["head"])
        await self.ok(away, "ack", seq=start)
        await within(away.close())

        # Five senders on the three nodes, each pipelining 1,000 sends.
        senders = [(await self.device(self.nodes[i % 3], next(_uids), "bot"))[0] for i in range(5)]
        total = 5000
        per = total // len(senders)
        seen: list[int] = []

        def on_push(frame: Frame) -> None:
            if frame.get("t") == "msg":
                seen.append(frame["seq"])

        online.on_push = on_push

        async def blast(i: int, client: IMClientProtocol) -> list[int]:
            replies = await gatherResults(
                [
                    client.request("send", to=uid, cid=f"s{i}-{n}", body=f"{i}/{n}")
                    for n in range(per)
                ]
            )
            return [r["msg_id"] for r in replies]

        sent = await within(
            gatherResults([Deferred.fromCoroutine(blast(i, c)) for i, c in enumerate(senders)]),
            120,
        )
        msg_ids = {m for ids in sent for m in ids}
        self.assertEqual(len(msg_ids), total)
        # The device that stayed online had them all pushed, once each (from
        # three nodes: their order between nodes is not the seq order).
        await eventually(lambda: len(seen) >= total, timeout=60)
        self.assertEqual(sorted(seen), list(range(start + 1, start + total + 1)))

        # The phone comes back on the third node: exactly the 5,000, in seq order, once.
        began = time.monotonic()
        back, reply = await self.device(n3, uid, "phone", since=start)
        self.assertEqual(
            (reply["seq"], reply["head"], reply["new_device"]), (start, start + total, False)
        )
        events, position = await within(self.catch_up(back), 60)
        took = time.monotonic() - began
        self.assertEqual(position, start + total)
        self.assertEqual([e["seq"] for e in events], list(range(start + 1, start + total + 1)))
        self.assertEqual({e["t"] for e in events}, {"msg"})
        self.assertEqual(len({e["msg_id"] for e in events}), total)
        self.assertEqual({e["msg_id"] for e in events}, msg_ids)
        for e in events:
            self.assertNotIn("unread", e)
        # Per sender, in the order sent.
        for ids in sent:
            mine = set(ids)
            self.assertEqual([e["msg_id"] for e in events if e["msg_id"] in mine], ids)
        self.assertLess(took, 30, "the catch-up of 5,000 events")
        log.info("5,000 events caught up in {took:.2f}s (auth and every page)", took=took)
        # Live from there: the next message is pushed once, nothing else is.
        await self.ok(senders[0], "send", to=uid, cid="after", body="after")
        p = await self.push(back)
        self.assertEqual((p["t"], p["seq"]), ("msg", start + total + 1))
        await self.quiet(back)

    async def test_replace_across_nodes(self) -> None:
        n1, n2, n3 = self.nodes
        uid, peer_uid = next(_uids), next(_uids)
        old, _ = await self.device(n1, uid, "phone")
        other, _ = await self.device(n3, uid, "desk")
        new, reply = await self.device(n2, uid, "phone")
        self.assertIs(reply["new_device"], False)
        # The old connection was kicked (and closed) before the new auth answered.
        await self.kicked(old, "replaced")
        peer, _ = await self.device(n3, peer_uid, "phone")
        await self.ok(peer, "send", to=uid, cid="c1", body="to the new one")
        for c in (new, other):
            self.assertEqual((await self.push(c))["cid"], "c1")
        await self.quiet(new, other)

    async def test_logout_device(self) -> None:
        n1, n2, n3 = self.nodes
        uid = next(_uids)
        phone, _ = await self.device(n1, uid, "phone")
        desk, _ = await self.device(n2, uid, "desk", client="desk-app/2.0")
        self.assertEqual(await self.result(phone, "logout_device", device="desk"), {"kicked": True})
        await self.kicked(desk, "logged_out")
        # Known but offline now: nothing to kick.
        self.assertEqual(
            await self.result(phone, "logout_device", device="desk"), {"kicked": False}
        )
        self.assertEqual(
            await self.result(phone, "logout_device", device="never-seen"), {"kicked": False}
        )
        listed = {x["device"]: x for x in (await self.result(phone, "devices"))["devices"]}
        self.assertEqual(set(listed), {"phone", "desk"})
        self.assertIs(listed["phone"]["online"], True)
        self.assertIs(listed["desk"]["online"], False)
        self.assertEqual(listed["desk"]["client"], "desk-app/2.0")
        self.assertGreater(listed["desk"]["last_seen"], 0)
        await self.fails(phone, "invalid", "logout_device")
        # The logged-out device may log in again.
        await self.device(n3, uid, "desk")

    async def test_admin_revokes_a_device(self) -> None:
        n1, n2, n3 = self.nodes
        uid = next(_uids)
        phone, _ = await self.device(n1, uid, "phone")
        laptop_token = TokenService(n2.secret).mint(uid, now=time.time() - 60, ttl_seconds=3600)
        laptop, _ = await self.device(n2, uid, "laptop", tok=laptop_token)

        status, listed = admin(n3, "GET", devices_path(uid))
        self.assertEqual(status, 200, listed)
        self.assertEqual(sorted(d["device"] for d in listed["devices"]), ["laptop", "phone"])

        status, body = admin(n3, "POST", devices_path(uid) + "/revoke", {"device": "laptop"})
        revoked_at = time.time()
        self.assertEqual((status, body), (200, {"revoked": True}))
        await self.kicked(laptop, "revoked")
        # The token issued before the revocation is refused, on any node.
        for node in (n1, n2, n3):
            await self.refused_auth(node, uid, "laptop", laptop_token)
        # A token issued after it (iat in whole seconds: a later second) works,
        # minted by the admin API...
        await sleep(1.1)
        status, minted = admin(n1, "POST", "/v1/admin/tokens", {"uid": uid, "device": "laptop"})
        self.assertEqual(status, 200, minted)
        again, reply = await self.device(n2, uid, "laptop", tok=minted["token"])
        self.assertEqual(reply["device"], "laptop")
        # ...and stays: nothing that follows the revocation kicks the device
        # signed in again with a token issued after it.
        await sleep(max(0.0, revoked_at + REVOKE_SETTLED - time.time()))
        kicks = [dict(await again.next_push()) for _ in range(again.pending_pushes)]
        self.assertTrue(
            again.is_open,
            f"the device signed in with a token issued after its revocation was closed: {kicks}",
        )
        await within(again.request("ping"))
        await self.quiet(again)
        # The other device was never touched.
        await within(phone.request("ping"))
        # An unknown device cannot be revoked.
        status, body = admin(n3, "POST", devices_path(uid) + "/revoke", {"device": "tablet"})
        self.assertEqual(status, 404, body)

    async def test_revocation_refuses_tokens_of_its_second(self) -> None:
        """iat is in whole seconds: a token of the revocation's second may have
        been issued before it, so it is refused (a later second's works)."""
        n1, n2, n3 = self.nodes
        uid = next(_uids)
        await sleep(1 - time.time() % 1 + 0.01)  # at the start of a second
        same_second = token(n2, uid)
        laptop, _ = await self.device(n2, uid, "laptop", tok=same_second)
        status, body = admin(n3, "POST", devices_path(uid) + "/revoke", {"device": "laptop"})
        self.assertEqual((status, body), (200, {"revoked": True}))
        self.assertLess(time.time() % 1, 0.9, "the revocation was in the second of the token")
        await self.kicked(laptop, "revoked")
        for node in (n1, n2, n3):
            await self.refused_auth(node, uid, "laptop", same_second)

    async def test_device_bound_token(self) -> None:
        n1, n2, _ = self.nodes
        uid = next(_uids)
        bound = token(n1, uid, device="phone")
        for device in ("laptop", None):  # None: the default device
            e = await self.refused_auth(n1, uid, device, bound)
            self.assertIn("device", e.message)
        _client, reply = await self.device(n2, uid, "phone", tok=bound)
        self.assertEqual(reply["device"], "phone")

    async def test_v1_client_works_unchanged(self) -> None:
        n1, n2, n3 = self.nodes
        alice_uid, bob_uid = next(_uids), next(_uids)
        alice, reply = await self.device(n1, alice_uid, None)
        self.assertLessEqual({"t", "id", "uid", "heartbeat", "server_time"}, set(reply))
        bob, _ = await self.device(n2, bob_uid, None)
        reply = await self.ok(alice, "send", to=bob_uid, cid="v1", body={"text": "hello"})
        self.assertIs(reply["dup"], False)
        sent = messaging.Sent(
            {k: reply[k] for k in ("msg_id", "session_id", "ts", "dup")},
            alice_uid,
            bob_uid,
            "v1",
            {"text": "hello"},
        )
        push = await self.push(bob)
        self.assertLessEqual(sent.push(1, 1).items(), push.items())
        self.assertEqual(await self.sync(bob), {"msgs": [sent.obj()], "more": False})
        summary = await self.result(bob, "offline_summary")
        self.assertEqual(
            [(s["uid"], s["count"]) for s in summary["senders"]], [(alice_uid, 1)], summary
        )
        self.assertEqual(await self.result(bob, "ack", msg_ids=[sent.msg_id]), {})
        self.assertEqual(await self.sync(bob), {"msgs": [], "more": False})
        read = await self.result(bob, "read", session_id=sent.session_id, msg_id=sent.msg_id)
        self.assertEqual((read["unread"], read["total_unread"]), (0, 0))
        push = await self.push(alice)
        self.assertLessEqual(
            {
                "t": "read",
                "session_id": sent.session_id,
                "by": bob_uid,
                "msg_id": sent.msg_id,
            }.items(),
            push.items(),
        )
        # A second v1 connection of bob (the same default device) replaces the first.
        bob2, _ = await self.device(n3, bob_uid, None)
        await self.kicked(bob, "replaced")
        await self.ok(alice, "send", to=bob_uid, cid="v1b", body="again")
        self.assertEqual((await self.push(bob2))["cid"], "v1b")
        await self.quiet(alice, bob2)


class TooManyDevicesTests(DevicesHelpers, TestCase):
    """max_online = 2 on a three-node cluster."""

    async def test_too_many_across_nodes(self) -> None:
        sections = {**cluster_backend(), "limits": dict(FAST), "devices": {"max_online": 2}}
        n1, n2, n3 = start_nodes(self, sections, 3)
        uid, peer_uid = next(_uids), next(_uids)
        a, _ = await self.device(n1, uid, "a")
        b, _ = await self.device(n2, uid, "b")
        # a is the least recently active: b asks something after it.
        await sleep(0.2)
        await self.ok(b, "ping")
        await sleep(0.2)
        c, _ = await self.device(n3, uid, "c")
        await self.kicked(a, "too_many_devices")
        peer, _ = await self.device(n1, peer_uid, "phone")
        await self.ok(peer, "send", to=uid, cid="c1", body="x")
        for client in (b, c):
            self.assertEqual((await self.push(client))["cid"], "c1")
        await self.quiet(b, c)

        # Now c is the least recently active of b and c (b asked something after
        # c's login, on another node than c's): a new login kicks c, not b. (A
        # node writes its devices' activity every second: wait for it.)
        await self.ok(b, "ping")
        await sleep(1.2)
        a2, _ = await self.device(n1, uid, "a")
        await eventually(lambda: not (b.is_open and c.is_open))
        self.assertTrue(
            b.is_open, "b (active 0.2 s ago) was kicked instead of c (idle since its login)"
        )
        await self.kicked(c, "too_many_devices")
        await self.ok(peer, "send", to=uid, cid="c2", body="y")
        for client in (b, a2):
            self.assertEqual((await self.push(client))["cid"], "c2")
        await self.quiet(b, a2)
