"""
Several nodes on one MariaDB and one Redis (docs/scaling.md).

* L{ClusterPresenceTests}: two L{ClusterPresence} in this process on a real
  Redis: routing, kicks, compare-and-delete logout, refresh, resubscription.
* L{ClusterMessagingTests}: the whole messaging contract of
  L{tests.test_e2e_messaging} on three C{twistd} nodes, each login going to
  the next node, so sender and recipient (and a user's two connections) are
  on different nodes.
* L{NodeFailureTests}: a node killed (its users reconnect elsewhere and sync
  exactly once), Redis restarted (cross-node pushes resume).
* L{WorkersTests}: C{[server] workers = 2}: one supervisor, two nodes sharing
  the port, a dead worker started again.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
import msgpack
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from imserver.client import IMClientProtocol
from imserver.config import parse_config
from imserver.services.cluster import SYNC_PUSH, ClusterPresence
from imserver.services.presence import KICK_REPLACED, IClientLink
from imserver.services.registry import LocalRegistry
from imserver.storage.hot.bus import RedisBus
from imserver.storage.hot.connection import RedisConnection
from imserver.storage.hot.interface import HotUnavailable
from imserver.storage.model import Profile
from tests import test_e2e_messaging as messaging
from tests.harness import (
    RedisServer,
    ServerProcess,
    fresh_prefix,
    shared_mariadb,
    shared_redis,
    wait_for,
)
from tests.support import eventually, reactor, sleep, within

Frame = dict[str, Any]

_uids = itertools.count(1)


@implementer(IClientLink)
@attrs.define(eq=False)
class RecordingLink:
    uid: int
    epoch: int
    device: str = "default"
    connected_at: int = 0
    last_active: float = 0.0
    pushes: list[Frame] = attrs.Factory(list)
    kicks: list[str] = attrs.Factory(list)

    def push(self, frame: Mapping[str, Any]) -> None:
        self.pushes.append(dict(frame))

    def kick(self, reason: str) -> None:
        self.kicks.append(reason)


async def answers(presence: ClusterPresence) -> bool:
    """Whether the node's Redis connections answer (again)."""
    try:
        await presence._redis.ping()
    except HotUnavailable:
        return False
    return True


class ClusterPresenceTests(TestCase):
    """Two nodes' presence in this process, on the harness's Redis."""

    def setUp(self) -> None:
        self.prefix = fresh_prefix()
        self.epochs = itertools.count(1)

    async def node(
        self, node_id: int, redis: RedisServer | None = None, ttl_seconds: float = 3
    ) -> ClusterPresence:
        target = parse_config({"storage": {"redis": (redis or shared_redis()).url}}).storage.redis
        assert target is not None
        connection = RedisConnection(reactor, target, timeout=1.0)
        await connection.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(connection.stop()))
        bus = RedisBus(connection, self.prefix)
        presence = ClusterPresence(reactor, LocalRegistry(), bus, node_id, ttl_seconds=ttl_seconds)
        presence.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(presence.stop()))
        await eventually(lambda: presence.pubsub_state() == "ok")
        return presence

    def link(self, uid: int) -> RecordingLink:
        return RecordingLink(uid, next(self.epochs))

    async def test_push_reaches_the_node_holding_the_user(self) -> None:
        a, b = await self.node(1), await self.node(2)
        bob = self.link(next(_uids))
        await b.login(bob.uid, bob)
        # Binary msgpack on the way: big ints, non-ASCII text, nesting.
        frame = {
            "t": "msg",
            "msg_id": 2**52 + 7,
            "body": {"text": "héllo ✓ \x00", "n": [-1, 2**40, 1.5, None, True]},
        }
        self.assertFalse(a.push(bob.uid, frame))  # not here: routed
        await eventually(lambda: bob.pushes)
        self.assertEqual(bob.pushes, [frame])
        self.assertEqual((a.routed, b.received), (1, 1))

    async def test_pushes_of_one_turn_all_arrive_in_order(self) -> None:
        a, b = await self.node(1), await self.node(2)
        users = [self.link(next(_uids)) for _ in range(50)]
        for user in users:
            await b.login(user.uid, user)
        for i in range(5):
            for user in users:
                a.push(user.uid, {"t": "msg", "i": i})
        await eventually(lambda: all(len(u.pushes) == 5 for u in users))
        for user in users:
            self.assertEqual([p["i"] for p in user.pushes], [0, 1, 2, 3, 4])
        self.assertEqual(a.routed, 250)

    async def test_push_to_a_user_online_nowhere_is_dropped(self) -> None:
        a, b = await self.node(1), await self.node(2)
        self.assertFalse(a.push(next(_uids), {"t": "msg"}))
        bob = self.link(next(_uids))
        await b.login(bob.uid, bob)
        a.push(bob.uid, {"t": "msg", "n": 1})
        await eventually(lambda: bob.pushes)
        self.assertEqual(a.routed, 1)

    async def test_login_on_another_node_kicks_the_older_connection(self) -> None:
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        first, second = self.link(uid), self.link(uid)
        await a.login(uid, first)
        await b.login(uid, second)
        await eventually(lambda: first.kicks)
        self.assertEqual(first.kicks, [KICK_REPLACED])
        self.assertEqual(second.kicks, [])
        self.assertEqual(a.kicked_remotely, 1)
        # The kicked connection logs out: that must not remove the new presence.
        a.logout(uid, first)
        await sleep(0.1)
        self.assertTrue(await a.online(uid))
        a.push(uid, {"t": "msg"})
        await eventually(lambda: second.pushes)

    async def test_logins_and_logouts_of_one_turn_share_a_script_call(self) -> None:
        a, b = await self.node(1), await self.node(2)
        calls: list[str] = []
        original = b._redis._script

        def counting(name: str, *args: str | bytes) -> Any:
            if name.startswith("presence_"):
                calls.append(name)
            return original(name, *args)

        b._redis._script = counting  # type: ignore[method-assign]
        olds = [self.link(next(_uids)) for _ in range(30)]
        for old in olds[:10]:
            await a.login(old.uid, old)
        news = [self.link(old.uid) for old in olds]
        # 30 logins in one turn: 10 of them kick a connection on node a.
        await gatherResults([b.login(new.uid, new) for new in news])
        self.assertEqual(calls, ["presence_login"])
        await eventually(lambda: all(old.kicks for old in olds[:10]))
        self.assertEqual(a.kicked_remotely, 10)
        for old in olds[:10]:
            a.logout(old.uid, old)  # what a kicked connection does
        for new in news:
            self.assertTrue(await a.online(new.uid))
        # And 30 logouts in one turn, one call.
        for new in news:
            b.logout(new.uid, new)
        await eventually(lambda: calls.count("presence_logout") == 1)
        await sleep(0.1)
        for new in news:
            self.assertFalse(await a.online(new.uid))
        self.assertEqual(calls, ["presence_login", "presence_logout"])

    async def test_logouts_pending_at_stop_are_written(self) -> None:
        a, b = await self.node(1), await self.node(2)
        bob = self.link(next(_uids))
        await b.login(bob.uid, bob)
        b.logout(bob.uid, bob)
        await b.stop()
        self.assertFalse(await a.online(bob.uid))

    async def test_a_stale_kick_spares_a_newer_connection(self) -> None:
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        first, second, third = self.link(uid), self.link(uid), self.link(uid)
        await a.login(uid, first)
        await b.login(uid, second)  # kicks first, on a
        await a.login(uid, third)  # back on a: kicks second, on b
        await eventually(lambda: second.kicks)
        await sleep(0.2)
        self.assertEqual(third.kicks, [])
        self.assertEqual(second.kicks, [KICK_REPLACED])
        self.assertEqual(first.kicks, [KICK_REPLACED])

    async def test_online_anywhere(self) -> None:
        a, b = await self.node(1), await self.node(2)
        bob = self.link(next(_uids))
        self.assertFalse(await a.online(bob.uid))
        await b.login(bob.uid, bob)
        self.assertTrue(await a.online(bob.uid))
        self.assertTrue(await b.online(bob.uid))
        b.logout(bob.uid, bob)
        await eventually(lambda: a.online(bob.uid).addCallback(lambda online: not online))

    async def test_a_changed_profile_reaches_every_node(self) -> None:
        a, b = await self.node(1), await self.node(2)
        seen: dict[str, list[Profile]] = {"a": [], "b": []}
        a.on_profile, b.on_profile = seen["a"].append, seen["b"].append
        profile = Profile(next(_uids), "zoë ✓", "https://img/z.png", 2**40)
        a.share_profile(profile)
        await eventually(lambda: seen["a"] and seen["b"])
        self.assertEqual(seen, {"a": [profile], "b": [profile]})

    async def test_refresh_restores_presences_lost_by_redis(self) -> None:
        a, b = await self.node(1), await self.node(2)
        bob = self.link(next(_uids))
        await b.login(bob.uid, bob)
        await b._redis.command("FLUSHALL")
        self.assertFalse(await a.online(bob.uid))
        await b.refresh()
        self.assertTrue(await a.online(bob.uid))
        a.push(bob.uid, {"t": "msg"})
        await eventually(lambda: bob.pushes)

    async def test_refresh_kicks_a_user_who_moved_while_the_kick_was_lost(self) -> None:
        b = await self.node(2)
        bob = self.link(next(_uids))
        await b.login(bob.uid, bob)
        # Another node took the presence, and its kick never reached us.
        await b._redis.command(
            "HSET", f"{self.prefix}:devices:{bob.uid}", "default", "9:1:1|0|0|99999999999999"
        )
        await b.refresh()
        self.assertEqual(bob.kicks, [KICK_REPLACED])

    async def test_an_unreadable_channel_message_is_skipped(self) -> None:
        a, b = await self.node(1), await self.node(2)
        bob = self.link(next(_uids))
        await b.login(bob.uid, bob)
        channel = f"{self.prefix}:node:{b.node}"
        junk = [
            b"\xc1garbage",
            msgpack.packb({"not": "a list"}),
            msgpack.packb([[1, 2]]),
            msgpack.packb([["p", str(bob.uid), msgpack.packb(7)]]),
            msgpack.packb([["p", str(bob.uid), b"\xc1"]]),
            msgpack.packb([["x", str(bob.uid), b""]]),
        ]
        for message in junk:
            await b._redis.command("PUBLISH", channel, message)
        a.push(bob.uid, {"t": "msg", "after": "junk"})
        await eventually(lambda: bob.pushes)
        self.assertEqual(bob.pushes, [{"t": "msg", "after": "junk"}])

    async def test_pushes_resume_after_a_redis_restart(self) -> None:
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        a, b = await self.node(1, redis), await self.node(2, redis)
        bob = self.link(next(_uids))
        await b.login(bob.uid, bob)

        redis.stop()
        await eventually(lambda: b.pubsub_state() == "down")
        self.assertFalse(a.push(bob.uid, {"t": "msg", "n": 1}))  # lost: Redis is down
        await eventually(lambda: a.route_failures == 1)

        redis.start()  # empty: presences are restored at once
        await eventually(lambda: b.pubsub_state() == "ok", timeout=15)
        self.assertGreaterEqual(b.subscription.resubscriptions, 2)  # type: ignore[union-attr]
        await eventually(lambda: answers(a))
        await eventually(lambda: a.online(bob.uid))
        a.push(bob.uid, {"t": "msg", "n": 2})
        await eventually(lambda: {"t": "msg", "n": 2} in bob.pushes)
        # Told to sync (what was published meanwhile is lost), pushed again.
        self.assertEqual(set(map(str, bob.pushes)), {str(SYNC_PUSH), "{'t': 'msg', 'n': 2}"})

    async def test_redis_losing_its_data_restores_presences_and_tells_users_to_sync(
        self,
    ) -> None:
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        # A refresh every 10 s: what brings presences back must be quicker.
        a = await self.node(1, redis, ttl_seconds=30)
        b = await self.node(2, redis, ttl_seconds=30)
        bob = self.link(next(_uids))
        await b.login(bob.uid, bob)
        await eventually(lambda: a.generation is not None and b.generation is not None)
        redis.command("FLUSHALL")
        self.assertFalse(await a.online(bob.uid))
        started = reactor.seconds()
        await eventually(lambda: a.online(bob.uid), timeout=3)
        self.assertLess(reactor.seconds() - started, 2)
        await eventually(lambda: bob.pushes)
        self.assertEqual(bob.pushes, [SYNC_PUSH])
        await eventually(lambda: a.data_losses == 1 and b.data_losses == 1)
        a.push(bob.uid, {"t": "msg"})
        await eventually(lambda: len(bob.pushes) == 2)

    async def test_recipients_of_unroutable_pushes_are_told_to_sync(self) -> None:
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        self.addCleanup(redis.signal, signal.SIGCONT)
        a = await self.node(1, redis, ttl_seconds=30)
        b = await self.node(2, redis, ttl_seconds=30)
        bob = self.link(next(_uids))
        await b.login(bob.uid, bob)
        redis.signal(signal.SIGSTOP)
        a.push(bob.uid, {"t": "msg", "n": 1})
        await eventually(lambda: a.route_failures == 1)
        self.assertEqual(a._redis.state(), "open")
        a.push(bob.uid, {"t": "msg", "n": 2})  # fails at once
        await eventually(lambda: a.route_failures == 2, timeout=0.5)
        redis.signal(signal.SIGCONT)
        await eventually(lambda: SYNC_PUSH in bob.pushes, timeout=10)
        self.assertEqual(a.sync_pushes, 1)
        self.assertEqual(b.data_losses, 0)


def cluster_backend() -> dict[str, dict[str, Any]]:
    """Config sections for the nodes of one new cluster (shared SQL and Redis)."""
    return {
        "storage": {
            "sql": shared_mariadb().fresh_database(),
            "redis": shared_redis().url,
            "key_prefix": fresh_prefix(),
        }
    }


def start_nodes(
    case: TestCase, sections: Mapping[str, Mapping[str, Any]], count: int
) -> list[ServerProcess]:
    """C{count} nodes (node ids 1..count) of one cluster; stopped after the test."""
    nodes = []
    for node_id in range(1, count + 1):
        node = ServerProcess(_node_config(sections, node_id))
        case.addCleanup(node.cleanup)
        nodes.append(node.start())
    return nodes


def _node_config(sections: Mapping[str, Mapping[str, Any]], node_id: int) -> dict[str, Any]:
    config = {name: dict(table) for name, table in sections.items()}
    config.setdefault("server", {})["node_id"] = node_id
    return config


def kept_nodes(
    kept: list[ServerProcess],
    sections: Callable[[], Mapping[str, Mapping[str, Any]]],
    count: int = 3,
) -> list[ServerProcess]:
    """
    A test class's cluster of C{count} nodes, kept across its tests in
    C{kept} (the class's list): started again, on fresh C{sections}, when a
    node is gone.
    """
    if len(kept) != count or not all(n.running for n in kept):
        for node in kept:
            node.cleanup()
        backend = sections()
        kept[:] = [ServerProcess(_node_config(backend, i)).start() for i in range(1, count + 1)]
    return kept


class ClusterMessagingTests(messaging.MessagingTestsMixin, TestCase):
    """The messaging contract with every login on the next of three nodes."""

    _nodes: list[ServerProcess] = []
    _turn = itertools.count()

    def backend(self) -> dict[str, dict[str, Any]]:
        return cluster_backend()

    def break_sql(self, server: ServerProcess) -> None:
        database = urlsplit(str(server.config["storage"]["sql"])).path.lstrip("/")
        shared_mariadb().sql("DROP TABLE t_pending", database=database)

    @property
    def nodes(self) -> list[ServerProcess]:
        return kept_nodes(type(self)._nodes, self.backend)

    async def login(
        self, uid: int | None = None, server: ServerProcess | None = None
    ) -> IMClientProtocol:
        if server is None:
            server = self.nodes[next(self._turn) % 3]
        return await super().login(uid, server)


class NodeFailureTests(messaging.MessagingHelpers, TestCase):
    """Nodes and Redis dying under a cluster, on the real processes."""

    async def test_users_of_a_killed_node_reconnect_elsewhere_and_sync_once(self) -> None:
        sections = {
            **cluster_backend(),
            "server": {"presence_ttl_seconds": 2},
            "limits": {"send_per_second": 1000, "send_burst": 1000},
        }
        a, b = start_nodes(self, sections, 2)
        alice = await self.login(server=a)
        bob = await self.login(server=b)
        first = await self.send(alice, bob, "before")
        self.assertEqual(await self.push(bob), first.push(1, 1))
        await self.ok(bob, "ack", msg_ids=[first.msg_id])

        # Alice keeps sending while node b dies under bob.
        assert bob.uid is not None
        sent: list[messaging.Sent] = []

        async def traffic() -> None:
            for i in range(60):
                sent.append(await self.send(alice, bob.uid, f"m{i}"))
                await sleep(0.01)

        sending = Deferred.fromCoroutine(traffic())
        await eventually(lambda: len(sent) >= 20)
        b.kill()
        await within(bob.closed)
        await within(sending, 60)
        # What reached bob before the crash came in order, and nothing else.
        pushed = [(await self.push(bob))["msg_id"] for _ in range(bob.pending_pushes)]
        self.assertEqual(pushed, [m.msg_id for m in sent[: len(pushed)]])
        self.assertGreater(len(pushed), 0)

        # Bob reconnects to node a and gets every message exactly once.
        bob_again = await self.login(bob.uid, server=a)
        self.assertEqual(
            await self.sync(bob_again), {"msgs": [m.obj() for m in sent], "more": False}
        )
        lost = sent
        await self.ok(bob_again, "ack", msg_ids=[m.msg_id for m in lost])
        self.assertEqual(await self.sync(bob_again), {"msgs": [], "more": False})
        after = await self.send(alice, bob_again, "after")
        # Acked is not read: all of them are unread.
        self.assertEqual(await self.push(bob_again), after.push(62, 62))
        self.assertEqual(bob_again.pending_pushes, 0)

        # Node b comes back (same node id): its users get pushes from a again.
        b.start()
        carol = await self.login(server=b)
        to_carol = await self.send(alice, carol, "b is back")
        self.assertEqual(await self.push(carol), to_carol.push(1, 1))

    async def test_a_dead_node_s_presence_expires(self) -> None:
        a, b = start_nodes(self, {**cluster_backend(), "server": {"presence_ttl_seconds": 2}}, 2)
        bob = await self.login(server=b)
        admin = {"X-Admin-Key": str(a.config["auth"]["admin_key"])}

        def online() -> bool:
            url = f"http://127.0.0.1:{a.http_port}/v1/admin/users/{bob.uid}"
            with urllib.request.urlopen(urllib.request.Request(url, headers=admin)) as r:
                return bool(json.load(r)["online"])

        self.assertTrue(online())
        b.kill()
        wait_for(lambda: not online(), 10, "bob's presence to expire")

    async def test_cross_node_pushes_resume_after_a_redis_restart(self) -> None:
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        backend = cluster_backend()
        backend["storage"]["redis"] = redis.url
        backend["server"] = {"presence_ttl_seconds": 3}
        a, b = start_nodes(self, backend, 2)
        alice = await self.login(server=a)
        bob = await self.login(server=b)
        first = await self.send(alice, bob, "before")
        self.assertEqual(await self.push(bob), first.push(1, 1))

        redis.stop()
        redis.start()  # empty, and the nodes must subscribe again

        def healthy(node: ServerProcess) -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz") as r:
                    return bool(json.load(r)["pubsub"] == "ok")
            except OSError:
                return False

        wait_for(lambda: healthy(a) and healthy(b), 20, "both nodes resubscribed")
        # Bob's presence is back at once, and he is told to sync.
        self.assertEqual(await self.push(bob), {"t": "sync"})
        second = await self.send(alice, bob, "after")
        push = await self.push(bob)
        while push["t"] == "sync":  # told again (resubscribed, then data lost)
            push = await self.push(bob)
        self.assertEqual(push, second.push(2, 2))
        self.assertIn("resubscribed to", b.log())

    async def test_pushes_across_nodes_survive_redis_losing_its_data(self) -> None:
        """
        FLUSHALL, then a restart without persistence, while alice on node a
        sends to bob on node b: every message reaches bob, still connected,
        within a few seconds, pushed or through the sync he is told to do
        (issue 9, defect 8). The default presence TTL: its refresh (every
        10 s) must not be what brings pushes back.
        """
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        backend = cluster_backend()
        backend["storage"]["redis"] = redis.url
        backend["limits"] = {"send_per_second": 1000, "send_burst": 1000}
        a, b = start_nodes(self, backend, 2)
        alice = await self.login(server=a)
        bob = await self.login(server=b)
        assert bob.uid is not None
        received: set[int] = set()
        syncs: list[Deferred[None]] = []

        async def sync() -> None:
            after = 0
            while True:
                page = await within(bob.request("sync", limit=500, after=after))
                received.update(m["msg_id"] for m in page["msgs"])
                if not page["more"]:
                    return
                after = page["msgs"][-1]["msg_id"]

        def on_push(frame: Frame) -> None:
            if frame["t"] == "msg":
                received.add(frame["msg_id"])
            elif frame["t"] == "sync":
                syncs.append(Deferred.fromCoroutine(sync()))

        bob.on_push = on_push
        sent: list[int] = []

        async def traffic(n: int, tag: str) -> None:
            for i in range(n):
                reply = await within(
                    alice.request("send", to=bob.uid, cid=f"{tag}{i}", body=f"{tag}{i}")
                )
                sent.append(reply["msg_id"])
                await sleep(0.02)

        async def window(tag: str, fault: Callable[[], None]) -> float:
            """Seconds until bob has every message sent around the fault."""
            sending = Deferred.fromCoroutine(traffic(100, tag))
            await eventually(lambda: len(sent) >= 20 or sending.called, timeout=30)
            fault()
            await within(sending, 60)
            done = reactor.seconds()
            try:
                await eventually(lambda: received >= set(sent), timeout=5, interval=0.05)
            except AssertionError:
                missing = sorted(set(sent) - received)
                self.fail(
                    f"{tag}: {len(missing)} of {len(sent)} never reached bob;"
                    f" node b's log:\n{b.log()[-3000:]}\nnode a's log:\n{a.log()[-3000:]}"
                )
            return reactor.seconds() - done

        flushall = await window("f", lambda: redis.command("FLUSHALL"))
        await within(gatherResults(syncs))
        self.assertIn("redis lost its data", b.log())

        def restart() -> None:
            redis.kill()
            redis.start()

        restarted = await window("r", restart)
        await within(gatherResults(syncs))
        print(f"every message at bob {flushall:.2f}s / {restarted:.2f}s after the last send")
        self.assertGreater(len(syncs), 0)
        self.assertFalse(bob.closed.called)


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for its reaper does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class WorkersTests(messaging.MessagingHelpers, TestCase):
    """C{[server] workers = 2}: a supervisor and two nodes sharing the ports."""

    def worker_pids(self, server: ServerProcess) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-f", f"{server.config_path} --worker-index"],
            capture_output=True,
            text=True,
        ).stdout
        return sorted(int(pid) for pid in out.split())

    def health(self, server: ServerProcess) -> Frame:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/healthz") as r:
            answer: Frame = json.load(r)
            return answer

    async def test_two_workers_share_the_port_and_restart(self) -> None:
        backend = cluster_backend()
        backend["server"] = {"workers": 2, "node_id": 10}
        server = ServerProcess(backend)
        self.addCleanup(server.cleanup)
        server.start()
        self.assertEqual(len(self.worker_pids(server)), 2)
        # The kernel spreads connections (and HTTP requests) over both.
        nodes = {self.health(server)["node"] for _ in range(40)}
        self.assertEqual(nodes, {10, 11})

        clients = [await self.login(server=server) for _ in range(8)]
        sent = [await self.send(clients[i], clients[i + 1], f"m{i}") for i in range(0, 8, 2)]
        for i, message in zip(range(1, 8, 2), sent, strict=True):
            self.assertEqual(await self.push(clients[i]), message.push(1, 1))

        # A worker that dies is started again; the other one serves meanwhile.
        victim = self.worker_pids(server)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: len(self.worker_pids(server)) == 2 and victim not in self.worker_pids(server),
            20,
            "the worker to be restarted",
        )
        wait_for(lambda: server.log().count("ready (config") >= 3, 20, "the new worker ready")
        self.assertIn("restarting it in", server.log())
        alice, bob = await self.login(server=server), await self.login(server=server)
        message = await self.send(alice, bob, "after the restart")
        self.assertEqual(await self.push(bob), message.push(1, 1))

        # SIGTERM to the supervisor stops every worker gracefully.
        pids = self.worker_pids(server)
        # (twistd ends by re-raising the signal it stopped on.)
        self.assertEqual(server.stop(60), -signal.SIGTERM)
        self.assertEqual([pid for pid in pids if alive(pid)], [])

    async def test_workers_die_with_the_supervisor(self) -> None:
        backend = cluster_backend()
        backend["server"] = {"workers": 2, "node_id": 20}
        server = ServerProcess(backend)
        self.addCleanup(server.cleanup)
        server.start()
        pids = self.worker_pids(server)
        self.assertEqual(len(pids), 2)
        server.kill()  # SIGKILL: the supervisor cannot pass anything on
        # No orphan keeps serving the port.
        wait_for(lambda: not any(alive(pid) for pid in pids), 30, "the workers to exit")
