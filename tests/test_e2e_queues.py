"""
End-to-end, against C{twistd -n imserver}: a Redis outage while users keep
talking, and offline notifications through a real webhook.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
from typing import Any

from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from imserver.client import IMClientProtocol
from tests.harness import RedisServer, ServerProcess, fresh_prefix, shared_mariadb
from tests.support import ClientsMixin, eventually, reactor, sleep, within
from tests.test_queues import Sink
from tests.test_recovery import state_of

_uids = itertools.count(90_000)
FAST = {"send_per_second": 100000.0, "send_burst": 100000}


class RedisOutageE2ETests(ClientsMixin, TestCase):
    timeout = 180

    async def test_sends_go_on_while_redis_is_down_and_everything_converges(self) -> None:
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        server = ServerProcess(
            {
                "storage": {
                    "sql": shared_mariadb().fresh_database(),
                    "redis": redis.url,
                    "key_prefix": fresh_prefix(),
                },
                "limits": FAST,
            }
        )
        self.addCleanup(server.cleanup)
        server.start()
        a, b = next(_uids), next(_uids)
        alice = await self.client(server.endpoint, server.token(a))
        bob = await self.client(server.endpoint, server.token(b))

        async def talk(tag: str, n: int) -> list[int]:
            ids = []
            for i in range(n):
                ids.append(
                    (await within(alice.request("send", to=b, cid=f"{tag}{i}", body=f"{tag} {i}")))[
                        "msg_id"
                    ]
                )
                await within(bob.request("send", to=a, cid=f"{tag}{i}", body="re"))
            return ids

        before = await talk("before", 5)
        await within(bob.request("sync"))  # bob's hot copy is in Redis now
        redis.stop()
        during = await talk("during", 5)  # every send is still accepted
        pushed = [await within(bob.next_push()) for _ in range(10)]
        self.assertEqual([p["msg_id"] for p in pushed if p["t"] == "msg"], before + during)
        await within(bob.request("ack", msg_ids=before[:3]))
        await within(bob.request("read", session_id=pushed[0]["session_id"], msg_id=during[0]))
        expected = await state_of(bob)  # answered from SQL while Redis is down
        self.assertEqual(expected["pending"], before[3:] + during)
        self.assertEqual(expected["unread"][0], 4)

        redis.start()  # empty, as after a restart without persistence
        after = await talk("after", 3)
        marker = f"{server.config['storage']['key_prefix']}:hot:{b}"

        async def served_from_redis_again() -> bool:
            # Once the node has repaired bob's copy, a read loads it into Redis.
            await within(bob.request("sync"))
            return redis.command("EXISTS", marker) == b":1\r\n"

        await eventually(served_from_redis_again, timeout=60, interval=0.5)
        state = await state_of(bob)
        self.assertEqual(state["pending"], before[3:] + during + after)
        self.assertEqual(state["unread"][0], 7)
        # Both directions, nothing lost or doubled: 13 sends each way.
        [history] = state["histories"].values()
        self.assertEqual(len(history), 26)
        self.assertEqual(len(set(history)), 26)


class WebhookE2ETests(ClientsMixin, TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.sink = Sink()
        port = reactor.listenTCP(0, Site(self.sink), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.secret = "e2e-webhook-secret-0123"
        self.server = ServerProcess(
            {
                "notify": {
                    "webhook": f"http://127.0.0.1:{port.getHost().port}/push",
                    "delay_seconds": 0.5,
                    "secret": self.secret,
                    "max_attempts": 3,
                }
            }
        )
        self.addCleanup(self.server.cleanup)
        self.server.start()

    async def clients(self) -> tuple[int, int, IMClientProtocol]:
        a, b = next(_uids), next(_uids)
        bob = await self.client(self.server.endpoint, self.server.token(b))
        await bob.close()
        alice = await self.client(self.server.endpoint, self.server.token(a))
        return a, b, alice

    async def test_offline_recipient_is_notified(self) -> None:
        a, b, alice = await self.clients()
        sent = await within(alice.request("send", to=b, cid="1", body="wake up"))
        await within(self.sink.next(), 10)
        [(payload, signature, body)] = self.sink.received
        self.assertEqual(
            payload,
            {
                "uid": b,
                "from": a,
                "msg_id": sent["msg_id"],
                "session_id": sent["session_id"],
                "preview": "wake up",
                "total_unread": 1,
            },
        )
        digest = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        self.assertEqual(signature, "sha256=" + digest)

    async def test_acked_in_time_is_not_notified(self) -> None:
        _, b, alice = await self.clients()
        bob = await self.client(self.server.endpoint, self.server.token(b))
        sent = await within(alice.request("send", to=b, cid="1", body="hi"))
        push: dict[str, Any] = await within(bob.next_push())
        await within(bob.request("ack", msg_ids=[push["msg_id"]]))
        self.assertEqual(push["msg_id"], sent["msg_id"])
        await sleep(1.5)
        self.assertEqual(self.sink.received, [])
