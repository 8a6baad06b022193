"""
End-to-end recovery: Redis loses everything mid-conversation; the server
restarts (gracefully and by SIGKILL). Every answer must stay what SQL says.
"""

from __future__ import annotations

import itertools
import signal
from typing import Any

from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from imserver.client import IMClientProtocol
from tests.harness import ServerProcess, fresh_prefix, shared_mariadb, shared_redis
from tests.support import ClientsMixin, within

_uids = itertools.count(50_000)


async def state_of(client: IMClientProtocol) -> dict[str, Any]:
    """Everything a user can see: pending, unread, conversations, histories."""
    sync = await within(client.request("sync", limit=500))
    unread = await within(client.request("unread"))
    summary = await within(client.request("offline_summary"))
    convs = await within(client.request("convs", limit=100))
    histories = {}
    for conv in convs["convs"]:
        page = await within(client.request("history", session_id=conv["session_id"], limit=100))
        histories[conv["session_id"]] = [m["msg_id"] for m in page["msgs"]]
    return {
        "pending": [m["msg_id"] for m in sync["msgs"]],
        "unread": (unread["total"], unread["sessions"]),
        "summary": summary["senders"],
        "convs": [
            (
                c["session_id"],
                c["last_msg_id"],
                c["unread"],
                c["last"]["msg_id"] if c["last"] else None,
            )
            for c in convs["convs"]
        ],
        "histories": histories,
    }


async def all_pending(client: IMClientProtocol) -> list[int]:
    """Every pending msg id, paging sync with `after` (without acking)."""
    pending: list[int] = []
    after = 0
    while True:
        page = await within(client.request("sync", limit=500, after=after))
        pending += [m["msg_id"] for m in page["msgs"]]
        if not page["more"]:
            return pending
        after = pending[-1]


async def all_history(client: IMClientProtocol, peer: int) -> list[int]:
    """The whole history with a peer, paging with `before`."""
    history: list[int] = []
    while True:
        fields = {"peer": peer, "limit": 100} | ({"before": history[-1]} if history else {})
        page = await within(client.request("history", **fields))
        history += [m["msg_id"] for m in page["msgs"]]
        if not page["more"]:
            return history


class RecoveryMixin(ClientsMixin):
    def sections(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def server(self) -> ServerProcess:
        server = ServerProcess(self.sections())
        self.addCleanup(server.cleanup)
        return server.start()

    async def conversation(self, server: ServerProcess, users: list[int]) -> None:
        """A little of everything: sends, reads, acks, a recall."""
        clients = [await self.client(server.endpoint, server.token(u)) for u in users]
        a, b, c = clients
        ids = []
        for i in range(6):
            ids.append(await within(a.request("send", to=users[1], cid=f"ab{i}", body=f"m{i}")))
            await within(c.request("send", to=users[1], cid=f"cb{i}", body=f"m{i}"))
            await within(b.request("send", to=users[0], cid=f"ba{i}", body=f"m{i}"))
        await within(b.request("read", session_id=ids[2]["session_id"], msg_id=ids[2]["msg_id"]))
        sync = await within(b.request("sync", limit=4))
        await within(b.request("ack", msg_ids=[m["msg_id"] for m in sync["msgs"]]))
        await within(a.request("recall", msg_id=ids[5]["msg_id"]))
        for client in clients:
            await client.close()

    async def states(self, server: ServerProcess, users: list[int]) -> list[dict[str, Any]]:
        out = []
        for uid in users:
            client = await self.client(server.endpoint, server.token(uid))
            out.append(await state_of(client))
            await client.close()
        return out

    async def test_restart_keeps_every_acknowledged_message(self) -> None:
        server = self.server()
        users = [next(_uids) for _ in range(3)]
        await self.conversation(server, users)
        before = await self.states(server, users)
        server.stop()
        server.start()
        self.assertEqual(await self.states(server, users), before)

    async def test_sigkill_keeps_every_acknowledged_message(self) -> None:
        """1,000 sends in flight when the server dies: every one answered ok is
        in history, pending for its recipient and counted exactly once."""
        server = self.server()
        alice, bob = next(_uids), next(_uids)
        bob_client = await self.client(server.endpoint, server.token(bob))
        await bob_client.close()
        client = await self.client(server.endpoint, server.token(alice))
        acked: list[int] = []
        sends = []
        for i in range(1000):
            d = client.request("send", to=bob, cid=f"k{i}", body=f"m{i}")
            d.addCallback(lambda reply: acked.append(reply["msg_id"]))
            sends.append(d)
        while len(acked) < 200:
            await within(sends[len(acked)])
        server.kill()
        await within(gatherResults(sends, consumeErrors=True).addErrback(lambda _: None))
        self.assertLess(len(acked), 1000, "the kill came too late to test anything")
        server.start()

        bob_client = await self.client(server.endpoint, server.token(bob))
        pending = await all_pending(bob_client)
        history = await all_history(bob_client, alice)
        unread = await within(bob_client.request("unread"))

        self.assertEqual(len(pending), len(set(pending)))
        self.assertEqual(sorted(history, reverse=True), history)
        self.assertEqual(set(history), set(pending))  # nothing was acked or read
        self.assertTrue(set(acked) <= set(pending), sorted(set(acked) - set(pending))[:5])
        self.assertEqual(unread["total"], len(pending))  # each counted exactly once
        self.assertEqual(pending, sorted(pending))

    async def test_sigterm_answers_requests_in_flight(self) -> None:
        """A graceful stop with sends in flight: goaway first, then the replies
        of every request the server had read, then the close. Nothing
        answered ok is lost."""
        server = self.server()
        alice, bob = next(_uids), next(_uids)
        await (await self.client(server.endpoint, server.token(bob))).close()
        client = await self.client(server.endpoint, server.token(alice))
        acked: list[int] = []
        sends = []
        for i in range(300):
            d = client.request("send", to=bob, cid=f"t{i}", body=f"m{i}")
            d.addCallback(lambda reply: acked.append(reply["msg_id"]))
            sends.append(d)
        while len(acked) < 50:
            await within(sends[len(acked)])
        server.signal(signal.SIGTERM)
        self.assertEqual(await within(client.next_push()), {"t": "goaway", "reason": "shutdown"})
        await within(client.closed)
        await within(gatherResults(sends, consumeErrors=True).addErrback(lambda _: None))
        answered = len(acked)
        server.proc.wait(30)  # type: ignore[union-attr]
        server.start()
        bob_client = await self.client(server.endpoint, server.token(bob))
        pending = await all_pending(bob_client)
        self.assertTrue(set(acked) <= set(pending))
        self.assertGreaterEqual(len(pending), answered)


class EmbeddedRecoveryTests(RecoveryMixin, TestCase):
    timeout = 120

    def sections(self) -> dict[str, dict[str, Any]]:
        return {"limits": {"send_per_second": 100000.0, "send_burst": 100000}}


class RedisRecoveryTests(RecoveryMixin, TestCase):
    timeout = 120

    def sections(self) -> dict[str, dict[str, Any]]:
        return {
            "storage": {
                "sql": shared_mariadb().fresh_database(),
                "redis": shared_redis().url,
                "key_prefix": fresh_prefix(),
            },
            "limits": {"send_per_second": 100000.0, "send_burst": 100000},
        }

    async def test_flushall_mid_conversation(self) -> None:
        server = self.server()
        users = [next(_uids) for _ in range(3)]
        await self.conversation(server, users)
        before = await self.states(server, users)
        shared_redis().command("FLUSHALL")
        self.assertEqual(await self.states(server, users), before)
        # The conversation goes on, and everything still adds up.
        await self.conversation(server, users[::-1])
        once_more = await self.states(server, users)
        shared_redis().command("FLUSHALL")
        self.assertEqual(await self.states(server, users), once_more)
