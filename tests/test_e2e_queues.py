"""
End-to-end, against C{twistd -n imserver}: a Redis outage while users keep
talking, and offline notifications through a real webhook.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import signal
import statistics
import time
import urllib.request
from collections.abc import Callable
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


def own_redis_server(case: TestCase) -> tuple[RedisServer, ServerProcess]:
    """A twistd node on the shared MariaDB and a Redis of its own (to stop and kill)."""
    redis = RedisServer().start()
    case.addCleanup(redis.cleanup)
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
    case.addCleanup(server.cleanup)
    server.start()
    return redis, server


class RedisOutageE2ETests(ClientsMixin, TestCase):
    timeout = 180

    async def test_sends_go_on_while_redis_is_down_and_everything_converges(self) -> None:
        redis, server = own_redis_server(self)
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


def healthz(server: ServerProcess) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/healthz") as r:
            return dict(json.load(r))
    except urllib.error.HTTPError as e:  # 503 while degraded, with the same body
        return dict(json.load(e))


class RedisStallE2ETests(ClientsMixin, TestCase):
    """
    Redis stopped (SIGSTOP: connections stay open, nothing answers) or killed:
    replies must not wait for it, sends go on at full rate, and once Redis is
    back the hot copy converges to what SQL says (issue 9, defect 5).
    """

    timeout = 300

    async def test_replies_do_not_wait_for_a_stopped_or_killed_redis(self) -> None:
        redis, server = own_redis_server(self)
        a, b, c = next(_uids), next(_uids), next(_uids)
        alice = await self.client(server.endpoint, server.token(a))
        bob = await self.client(server.endpoint, server.token(b))
        carol = await self.client(server.endpoint, server.token(c))
        await carol.close()  # a known user, for logins during the outage
        marker = f"{server.config['storage']['key_prefix']}:hot:{b}"

        async def timed(d: Any) -> tuple[float, Any]:
            started = time.monotonic()
            result = await within(d, 30)
            return time.monotonic() - started, result

        async def sends(tag: str, n: int) -> tuple[float, list[int]]:
            """n sends alice -> bob, one at a time; (sends per second, msg ids)."""
            started = time.monotonic()
            ids = []
            for i in range(n):
                reply = await within(alice.request("send", to=b, cid=f"{tag}{i}", body=tag), 30)
                ids.append(reply["msg_id"])
            return n / (time.monotonic() - started), ids

        async def pushes(n: int) -> list[int]:
            ids: list[int] = []
            while len(ids) < n:
                push = await within(bob.next_push())
                if push["t"] == "msg":
                    ids.append(push["msg_id"])
            return ids

        async def phase(tag: str, halt: Callable[[], None], resume: Callable[[], None]) -> None:
            rate_before, before = await sends(f"{tag}-before", 50)
            self.assertEqual(await pushes(50), before)
            await within(bob.request("sync", limit=500))  # bob's copy is in Redis
            self.assertEqual(redis.command("EXISTS", marker), b":1\r\n")
            session_id = (await within(bob.request("convs", limit=1)))["convs"][0]["session_id"]

            halt()
            acks, reads = [], []
            for i in range(5):
                seconds, _ = await timed(bob.request("ack", msg_ids=[before[i]]))
                acks.append(seconds)
                seconds, _ = await timed(
                    bob.request("read", session_id=session_id, msg_id=before[10 + i])
                )
                reads.append(seconds)
            # Once Redis is known to be unreachable, nothing waits for it.
            await eventually(lambda: healthz(server).get("redis") == "down", timeout=15)
            logins = []
            for _ in range(3):
                seconds, client = await timed(self.client(server.endpoint, server.token(c)))
                logins.append(seconds)
                await client.close()
            rate_during, during = await sends(f"{tag}-during", 200)
            self.assertEqual(await pushes(200), during)
            for i in range(5, 10):
                seconds, _ = await timed(bob.request("ack", msg_ids=[before[i]]))
                acks.append(seconds)
            seconds, _ = await timed(bob.request("read", session_id=session_id, msg_id=during[-1]))
            reads.append(seconds)
            figures = (
                f"{tag}: ack max {max(acks):.3f}s median {statistics.median(acks):.3f}s, "
                f"read max {max(reads):.3f}s, login max {max(logins):.3f}s, "
                f"sends/s {rate_before:.0f} before, {rate_during:.0f} during"
            )
            print(figures)
            self.assertLess(statistics.median(acks), 0.2, figures)
            self.assertLess(max(acks), 0.5, figures)
            self.assertLess(statistics.median(reads), 0.2, figures)
            self.assertLess(max(reads), 0.5, figures)
            self.assertLess(max(logins), 0.5, figures)
            self.assertGreater(rate_during, rate_before / 2, figures)
            expected = await state_of(bob)  # answered from SQL while Redis is out
            self.assertEqual(expected["pending"][:1], [before[10]])
            self.assertEqual(expected["unread"][0], 0)

            resume()
            await eventually(lambda: healthz(server).get("redis") == "ok", timeout=30)

            async def served_from_redis_again() -> bool:
                # Once bob's copy is repaired, a read loads it into Redis again.
                await within(bob.request("sync"))
                return redis.command("EXISTS", marker) == b":1\r\n"

            await eventually(served_from_redis_again, timeout=30, interval=0.2)
            self.assertEqual(await state_of(bob), expected)
            self.assertEqual(redis.command("EXISTS", marker), b":1\r\n")
            # Clean up for the next phase: bob has nothing pending.
            await within(bob.request("ack", msg_ids=expected["pending"]))

        await phase(
            "stopped",
            lambda: redis.signal(signal.SIGSTOP),
            lambda: redis.signal(signal.SIGCONT),
        )
        await phase("killed", redis.kill, redis.start)


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
