"""
User-level presence transitions across nodes (issue 11): three nodes'
ClusterPresence in this process on the harness's Redis. A user's first
device anywhere is one "online" transition, its last one leaving one
"offline", each seen by the node where it happened and heard once by the
others; devices coming and going in between are none.
"""

from __future__ import annotations

import itertools

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from imserver.config import parse_config
from imserver.services.cluster import ClusterPresence
from imserver.services.registry import LocalRegistry
from imserver.storage.hot.bus import RedisBus
from imserver.storage.hot.connection import RedisConnection
from tests.harness import RedisServer, fresh_prefix, shared_redis
from tests.support import eventually, reactor, sleep
from tests.test_cluster import RecordingLink

_uids = itertools.count(120_000)

Change = tuple[int, bool, int, bool]


class TransitionTests(TestCase):
    def setUp(self) -> None:
        self.prefix = fresh_prefix()
        self.epochs = itertools.count(1)

    async def node(self, node_id: int, redis: RedisServer | None = None) -> ClusterPresence:
        """As tests.test_cluster.ClusterPresenceTests.node."""
        url = (redis or shared_redis()).url
        target = parse_config({"storage": {"redis": url}}).storage.redis
        assert target is not None
        connection = RedisConnection(reactor, target, timeout=1.0)
        await connection.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(connection.stop()))
        presence = ClusterPresence(
            reactor, LocalRegistry(), RedisBus(connection, self.prefix), node_id, ttl_seconds=3
        )
        presence.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(presence.stop()))
        await eventually(lambda: presence.pubsub_state() == "ok")
        return presence

    async def nodes(
        self, n: int, redis: RedisServer | None = None
    ) -> tuple[list[ClusterPresence], list[list[Change]]]:
        nodes, changes = [], []
        for i in range(1, n + 1):
            node = await self.node(i, redis)
            seen: list[Change] = []
            node.on_change(lambda *change, seen=seen: seen.append(change))  # type: ignore[misc]
            nodes.append(node)
            changes.append(seen)
        return nodes, changes

    def link(self, uid: int, device: str, at: int) -> RecordingLink:
        return RecordingLink(uid, next(self.epochs), device=device, connected_at=at)

    async def test_one_transition_each_way(self) -> None:
        (a, b, c), (ca, cb, cc) = await self.nodes(3)
        uid = next(_uids)
        phone = self.link(uid, "phone", 1_000)
        before = int(reactor.seconds() * 1000)
        await a.login(uid, phone)
        await eventually(lambda: cb and cc)
        [(_, _, at, _)] = ca
        # When the login completed (not when its connection began).
        self.assertGreaterEqual(at, before)
        self.assertEqual(ca, [(uid, True, at, True)])
        self.assertEqual(cb, [(uid, True, at, False)])
        self.assertEqual(cc, [(uid, True, at, False)])
        # A second device on another node, and the first leaving: no transition.
        desk = self.link(uid, "desk", 2_000)
        await b.login(uid, desk)
        a.logout(uid, phone)
        await sleep(0.5)
        self.assertEqual([len(x) for x in (ca, cb, cc)], [1, 1, 1])
        # The last device leaves: offline, seen on b, heard on a and c.
        b.logout(uid, desk)
        await eventually(lambda: len(ca) == 2 and len(cc) == 2 and len(cb) == 2)
        offline = cb[1]
        self.assertEqual(offline[:2], (uid, False))
        self.assertTrue(offline[3])
        self.assertGreater(offline[2], 0)
        self.assertEqual(ca[1], (uid, False, offline[2], False))
        self.assertEqual(cc[1], (uid, False, offline[2], False))
        self.assertEqual(sum(n.transitions for n in (a, b, c)), 2)

    async def test_two_devices_on_one_node(self) -> None:
        (a, b), (ca, cb) = await self.nodes(2)
        uid = next(_uids)
        phone, desk = self.link(uid, "phone", 1_000), self.link(uid, "desk", 1_001)
        await a.login(uid, phone)
        await a.login(uid, desk)
        a.logout(uid, desk)
        await sleep(0.3)
        self.assertEqual([c[:2] for c in ca], [(uid, True)])
        a.logout(uid, phone)
        await eventually(lambda: len(cb) == 2)
        self.assertEqual([x[1] for x in ca], [True, False])
        self.assertEqual(a.transitions, 2)
        self.assertEqual(b.transitions, 0)

    async def test_replaced_device_is_no_transition(self) -> None:
        (a, b), (ca, cb) = await self.nodes(2)
        uid = next(_uids)
        old, new = self.link(uid, "phone", 1_000), self.link(uid, "phone", 2_000)
        await a.login(uid, old)
        await b.login(uid, new)  # the same device elsewhere: the old one is kicked
        self.assertEqual(old.kicks, ["replaced"])
        a.logout(uid, old)
        await sleep(0.5)
        self.assertEqual((len(ca), len(cb)), (1, 1))
        b.logout(uid, new)
        await eventually(lambda: len(ca) == 2)
        self.assertEqual(ca[1][1], False)

    async def test_a_storm_of_logins_is_one_message(self) -> None:
        """The transitions of one reactor turn share one broadcast message."""
        (a, _b), (_ca, cb) = await self.nodes(2)
        sent: list[bytes] = []
        real = a._redis.broadcast

        async def counting(message: bytes) -> int:
            sent.append(message)
            return await real(message)

        self.patch(a._redis, "broadcast", counting)
        users = [next(_uids) for _ in range(50)]
        await gatherResults([a.login(uid, self.link(uid, "phone", 1_000)) for uid in users])
        await eventually(lambda: len(cb) == 50)
        self.assertEqual(len(sent), 1)
        self.assertEqual(sorted(c[0] for c in cb), users)

    async def test_transitions_during_an_outage_are_told_after_it(self) -> None:
        """A logout and a login while Redis is down: announced once it answers."""
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        (a, _b), (ca, cb) = await self.nodes(2, redis)
        gone, late = next(_uids), next(_uids)
        phone = self.link(gone, "phone", 1_000)
        await a.login(gone, phone)
        await eventually(lambda: len(cb) == 1)
        redis.stop()
        a.logout(gone, phone)  # its logout script fails
        newcomer = self.link(late, "phone", 2_000)
        await a.login(late, newcomer)  # checked on this node only
        # a's own listeners (watchers on the users' node) are told at once.
        await eventually(lambda: len(ca) == 3)
        early = {(uid, online): (at, here) for uid, online, at, here in ca[1:]}
        self.assertEqual(set(early), {(gone, False), (late, True)})
        self.assertEqual({here for _, here in early.values()}, {False})
        self.assertEqual(len(cb), 1)
        redis.start()  # empty: a's refresh restores its presences
        await eventually(lambda: len(cb) == 3, timeout=30)
        heard = {(uid, online): (at, here) for uid, online, at, here in cb[1:]}
        self.assertEqual(set(heard), {(gone, False), (late, True)})
        self.assertFalse(heard[(late, True)][1])
        # Each when it happened here: the logout, then the login.
        self.assertLessEqual(heard[(gone, False)][0], heard[(late, True)][0])
        # Then announced (here) with the times told before: listeners keep their state.
        await eventually(lambda: len(ca) == 5)
        announced = {(uid, online): (at, here) for uid, online, at, here in ca[3:]}
        self.assertEqual(announced, {k: (at, True) for k, (at, _) in early.items()})

    async def test_online_devices_of_many_users_share_script_calls(self) -> None:
        """A watch of many users asks presence in a few script calls, not one each."""
        (a, b), _ = await self.nodes(2)
        uids = [next(_uids) for _ in range(50)]
        for i, uid in enumerate(uids[:10]):
            await (a if i % 2 else b).login(uid, self.link(uid, "phone", 1_000 + i))
        before = a.devices_calls
        answers = await gatherResults([a.online_devices(uid) for uid in uids + uids[:3]])
        self.assertLessEqual(a.devices_calls - before, 2)
        for i, devices in enumerate(answers):
            if i % 50 < 10:
                node = "2" if (i % 50) % 2 == 0 else "1"
                self.assertEqual(
                    [(d.device, d.node, d.since) for d in devices],
                    [("phone", node, 1_000 + i % 50)],
                )
            else:
                self.assertEqual(devices, [])
        self.assertTrue(await a.online(uids[0]))
        self.assertFalse(await a.online(uids[20]))

    async def test_transitions_are_stamped_by_redis_not_by_the_nodes_clocks(self) -> None:
        """A node whose clock is behind still stamps its transitions after the earlier ones."""
        (a,), (ca,) = await self.nodes(1)
        url = shared_redis().url
        target = parse_config({"storage": {"redis": url}}).storage.redis
        assert target is not None
        connection = RedisConnection(reactor, target, timeout=1.0)
        await connection.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(connection.stop()))
        behind = _Skewed(-10.0)
        b = ClusterPresence(
            behind,  # type: ignore[arg-type]
            LocalRegistry(),
            RedisBus(connection, self.prefix),
            2,
            ttl_seconds=3,
        )
        b.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(b.stop()))
        await eventually(lambda: b.pubsub_state() == "ok")
        uid = next(_uids)
        phone = self.link(uid, "phone", 1_000)
        await a.login(uid, phone)
        a.logout(uid, phone)
        await eventually(lambda: len(ca) == 2)
        await b.login(uid, self.link(uid, "desk", 2_000))
        await eventually(lambda: len(ca) == 3)
        (_, _, on, _), (_, _, off, _), (_, online, again, here) = ca
        self.assertEqual((online, here), (True, False))
        self.assertLessEqual(on, off)
        self.assertGreater(again, off)  # b's own clock says 10 s before
        self.assertLess(abs(again - reactor.seconds() * 1000), 5_000)


class _Skewed:
    """The reactor, with a clock C{by} seconds off."""

    def __init__(self, by: float) -> None:
        self.by = by

    def seconds(self) -> float:
        return reactor.seconds() + self.by

    def __getattr__(self, name: str) -> object:
        return getattr(reactor, name)
