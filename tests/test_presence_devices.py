"""
Several devices per user (issue 10): presence per device.

* L{LocalRegistryTests}: the single node's registry, with fake links.
* L{ClusterDevicesTests}: three L{ClusterPresence} nodes in this process on
  the harness's real Redis: pushes to every device wherever it is, exclude,
  replace and too_many across nodes (kicks confirmed before the login
  fires, or after the timeout when the old node is dead), no Redis call for
  a user held by one node only, leave notices, kick_device, online_devices.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import msgpack
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from imserver.config import parse_config
from imserver.errors import Unavailable
from imserver.services.cluster import KICK_CONFIRM_SECONDS, ClusterPresence
from imserver.services.presence import (
    KICK_LOGGED_OUT,
    KICK_REPLACED,
    KICK_TOO_MANY,
    IClientLink,
    IPresence,
    OnlineDevice,
)
from imserver.services.registry import LocalRegistry
from imserver.storage.hot.bus import RedisBus
from imserver.storage.hot.connection import RedisConnection
from imserver.storage.hot.interface import HotUnavailable
from tests.harness import RedisServer, fresh_prefix, shared_redis
from tests.stack import RecordingPresence
from tests.support import eventually, reactor, sleep

_uids = itertools.count(900_000)
_epochs = itertools.count(1)


@implementer(IClientLink)
@attrs.define(eq=False)
class DeviceLink:
    uid: int
    device: str = "default"
    last_active: float = 0.0
    connected_at: int = 0
    epoch: int = attrs.Factory(lambda: next(_epochs))
    pushes: list[dict[str, Any]] = attrs.Factory(list)
    kicks: list[str] = attrs.Factory(list)
    #: Called on kick (a real connection closes, then logs out).
    on_kick: Callable[[DeviceLink], None] | None = None
    #: Shared with the test: what happened, in order.
    events: list[str] | None = None

    def push(self, frame: Mapping[str, Any]) -> None:
        self.pushes.append(dict(frame))

    def kick(self, reason: str) -> None:
        self.kicks.append(reason)
        if self.events is not None:
            self.events.append(f"kicked {self.device}")
        if self.on_kick is not None:
            self.on_kick(self)


class LocalRegistryTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        verifyObject(IPresence, LocalRegistry())
        verifyObject(IPresence, RecordingPresence())
        verifyObject(IClientLink, DeviceLink(1))

    def test_devices_of_a_user_are_all_online(self) -> None:
        registry = LocalRegistry()
        phone, laptop = DeviceLink(1, "phone"), DeviceLink(1, "laptop")
        registry.login(1, phone)
        registry.login(1, laptop)
        self.assertEqual(registry.local(1), [phone, laptop])
        self.assertEqual(registry.local(2), [])
        self.assertTrue(registry.push(1, {"t": "x"}))
        self.assertEqual((phone.pushes, laptop.pushes), ([{"t": "x"}], [{"t": "x"}]))
        self.assertEqual((phone.kicks, laptop.kicks), ([], []))
        self.assertEqual(list(registry.links()), [phone, laptop])
        self.assertEqual(len(registry), 1)

    def test_same_device_replaces_the_older_connection(self) -> None:
        registry = LocalRegistry()
        old, new = DeviceLink(1, "phone"), DeviceLink(1, "phone")
        registry.login(1, old)
        registry.login(1, new)
        self.assertEqual(old.kicks, [KICK_REPLACED])
        self.assertEqual(registry.local(1), [new])
        # The replaced connection logs out: that must not remove the new one.
        registry.logout(1, old)
        self.assertEqual(registry.local(1), [new])
        registry.logout(1, new)
        self.assertEqual(registry.local(1), [])
        self.assertEqual(len(registry), 0)

    def test_too_many_kicks_the_least_recently_active(self) -> None:
        registry = LocalRegistry(max_online=2)
        a = DeviceLink(1, "a", last_active=5.0)
        b = DeviceLink(1, "b", last_active=1.0)
        registry.login(1, a)
        registry.login(1, b)
        c = DeviceLink(1, "c", last_active=0.0)  # the newest never goes
        registry.login(1, c)
        self.assertEqual(b.kicks, [KICK_TOO_MANY])
        self.assertEqual((a.kicks, c.kicks), ([], []))
        self.assertEqual(registry.local(1), [a, c])
        registry.logout(1, b)  # what the kicked connection does
        self.assertEqual(registry.local(1), [a, c])

    def test_max_online_one_is_one_connection_per_user(self) -> None:
        registry = LocalRegistry(max_online=1)
        first, second = DeviceLink(1, "phone"), DeviceLink(1, "laptop")
        registry.login(1, first)
        registry.login(1, second)
        self.assertEqual(first.kicks, [KICK_TOO_MANY])
        self.assertEqual(registry.local(1), [second])

    def test_exclude(self) -> None:
        registry = LocalRegistry()
        phone, laptop = DeviceLink(1, "phone"), DeviceLink(1, "laptop")
        registry.login(1, phone)
        self.assertFalse(registry.push(1, {"t": "x"}, exclude=phone))
        registry.login(1, laptop)
        self.assertTrue(registry.push(1, {"t": "y"}, exclude=phone))
        self.assertTrue(registry.push_local(1, {"t": "z"}, exclude=laptop))
        registry.push_remote(1, {"t": "nowhere"})
        self.assertEqual(phone.pushes, [{"t": "z"}])
        self.assertEqual(laptop.pushes, [{"t": "y"}])

    def test_kick_device_and_online_devices(self) -> None:
        registry = LocalRegistry(node="7")
        phone = DeviceLink(1, "phone", connected_at=1000)
        laptop = DeviceLink(1, "laptop", connected_at=2000)
        registry.login(1, phone)
        registry.login(1, laptop)
        devices = self.successResultOf(registry.online_devices(1))
        self.assertEqual(
            devices, [OnlineDevice("phone", "7", 1000), OnlineDevice("laptop", "7", 2000)]
        )
        self.assertTrue(self.successResultOf(registry.kick_device(1, "phone", KICK_LOGGED_OUT)))
        self.assertEqual(phone.kicks, [KICK_LOGGED_OUT])
        self.assertFalse(self.successResultOf(registry.kick_device(1, "phone", KICK_LOGGED_OUT)))
        self.assertEqual(registry.local(1), [laptop])
        self.assertTrue(self.successResultOf(registry.online(1)))


class ClusterDevicesTests(TestCase):
    """Nodes in this process, on the harness's Redis (each with its connection)."""

    def setUp(self) -> None:
        self.prefix = fresh_prefix()
        self.routes: dict[str, int] = {}

    async def node(
        self, node_id: int, max_online: int = 5, redis: RedisServer | None = None
    ) -> ClusterPresence:
        target = parse_config({"storage": {"redis": (redis or shared_redis()).url}}).storage.redis
        assert target is not None
        connection = RedisConnection(reactor, target, timeout=1.0)
        await connection.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(connection.stop()))
        bus = RedisBus(connection, self.prefix)
        presence = ClusterPresence(
            reactor, LocalRegistry(max_online), bus, node_id, ttl_seconds=30, max_online=max_online
        )
        original = bus._script
        name = presence.node
        self.routes[name] = 0

        def counting(script: str, *args: Any) -> Any:
            if script == "presence_route":
                self.routes[name] += 1
            return original(script, *args)

        bus._script = counting  # type: ignore[method-assign]
        presence.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(presence.stop()))
        await eventually(lambda: presence.pubsub_state() == "ok")
        return presence

    def link(self, node: ClusterPresence, uid: int, device: str, **kw: Any) -> DeviceLink:
        """A link that logs out of its node when kicked, as a connection does."""
        kw.setdefault("last_active", reactor.seconds())
        return DeviceLink(uid, device, on_kick=lambda link: node.logout(uid, link), **kw)

    async def test_a_push_from_any_node_reaches_every_device(self) -> None:
        nodes = [await self.node(1), await self.node(2), await self.node(3)]
        uid = next(_uids)
        links = [self.link(n, uid, f"d{i}") for i, n in enumerate(nodes)]
        for node, link in zip(nodes, links, strict=True):
            await node.login(uid, link)
        # The earlier nodes hear of the later ones by their join notices.
        await eventually(lambda: all(len(n._others[uid]) == 2 for n in nodes))
        for i, node in enumerate(nodes):
            self.assertTrue(node.push(uid, {"t": "msg", "from": i}))
            await eventually(lambda i=i: all({"t": "msg", "from": i} in x.pushes for x in links))
        for link in links:
            self.assertEqual([p["from"] for p in link.pushes], [0, 1, 2])
        # Exclude: the acting connection is left out, on its node and others.
        for link in links:
            link.pushes.clear()
        nodes[0].push(uid, {"t": "msg", "n": 1}, exclude=links[0])
        nodes[1].push_remote(uid, {"t": "msg", "n": 2}, exclude=links[0])
        await eventually(lambda: len(links[1].pushes) == 1 and len(links[2].pushes) == 2)
        await sleep(0.1)
        self.assertEqual(links[0].pushes, [{"t": "msg", "n": 2}])
        self.assertEqual(links[1].pushes, [{"t": "msg", "n": 1}])
        self.assertEqual(links[2].pushes, [{"t": "msg", "n": 1}, {"t": "msg", "n": 2}])

    async def test_exclude_carried_to_the_node_of_the_excluded_connection(self) -> None:
        # A push routed by a node that does not hold the acting connection.
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        phone, laptop = self.link(b, uid, "phone"), self.link(b, uid, "laptop")
        await b.login(uid, phone)
        await b.login(uid, laptop)
        a._queue(uid, {"t": "msg"}, None)
        a._outgoing[-1] = (uid, a._outgoing[-1][1], b.value(phone))
        await eventually(lambda: laptop.pushes)
        await sleep(0.1)
        self.assertEqual((phone.pushes, laptop.pushes), ([], [{"t": "msg"}]))

    async def test_replace_across_nodes_kicks_before_the_login_fires(self) -> None:
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        events: list[str] = []
        old = self.link(a, uid, "phone", events=events)
        await a.login(uid, old)
        new = self.link(b, uid, "phone", events=events)
        d = b.login(uid, new)
        d.addCallback(lambda _: events.append("logged in"))
        await d
        self.assertEqual(events, ["kicked phone", "logged in"])
        self.assertEqual(old.kicks, [KICK_REPLACED])
        self.assertEqual((a.local(uid), b.local(uid)), ([], [new]))
        self.assertEqual(a.kicked_remotely, 1)
        self.assertEqual(b.kicks_unconfirmed, 0)
        devices = await a.online_devices(uid)
        self.assertEqual([(x.device, x.node) for x in devices], [("phone", "2")])
        # The kicked connection's logout (already done) removed nothing.
        await sleep(0.1)
        a.push(uid, {"t": "msg"})
        await eventually(lambda: new.pushes)

    async def test_too_many_across_nodes_kicks_the_least_recently_active(self) -> None:
        a, b, c = await self.node(1, 2), await self.node(2, 2), await self.node(3, 2)
        uid = next(_uids)
        laptop = self.link(b, uid, "laptop")
        await b.login(uid, laptop)
        phone = self.link(a, uid, "phone")
        await a.login(uid, phone)
        # The phone (logged in last) has been idle since; the laptop is busy.
        phone.last_active = reactor.seconds() - 100
        laptop.last_active = reactor.seconds()
        await a.refresh()
        await b.refresh()
        tablet = self.link(c, uid, "tablet")
        await c.login(uid, tablet)
        self.assertEqual(phone.kicks, [KICK_TOO_MANY])
        self.assertEqual((laptop.kicks, tablet.kicks), ([], []))
        devices = await c.online_devices(uid)
        self.assertEqual(sorted(x.device for x in devices), ["laptop", "tablet"])

    async def test_too_many_sees_activity_of_the_last_second_on_other_nodes(self) -> None:
        """
        Regression (tests/test_e2e_devices.py): the activity in Redis was
        written by the refresh only (every ttl/3), so a login on a third node
        kicked a device active a moment ago instead of the idle one.
        """
        a, b, c = await self.node(1, 2), await self.node(2, 2), await self.node(3, 2)
        uid = next(_uids)
        laptop, phone = self.link(b, uid, "laptop"), self.link(c, uid, "phone")
        await b.login(uid, laptop)
        await c.login(uid, phone)
        await b.write_activity()
        await c.write_activity()
        laptop.last_active = reactor.seconds() + 0.2  # busy after the phone
        await b.write_activity()
        tablet = self.link(a, uid, "tablet")
        await a.login(uid, tablet)
        self.assertEqual((phone.kicks, laptop.kicks), ([KICK_TOO_MANY], []))

    async def test_activity_is_not_written_for_a_user_with_one_device(self) -> None:
        a = await self.node(1)
        calls: list[str] = []
        original = a._redis._script

        def counting(script: str, *args: Any) -> Any:
            calls.append(script)
            return original(script, *args)

        a._redis._script = counting  # type: ignore[method-assign]
        uid = next(_uids)
        await a.login(uid, self.link(a, uid, "phone"))
        await a.write_activity()
        self.assertNotIn("presence_active", calls)
        other = self.link(a, uid, "laptop")
        await a.login(uid, other)
        await a.write_activity()
        self.assertEqual(calls.count("presence_active"), 1)
        await a.write_activity()  # nothing new since
        self.assertEqual(calls.count("presence_active"), 1)

    async def test_login_goes_on_after_the_timeout_when_the_old_node_is_dead(self) -> None:
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        old = self.link(a, uid, "phone")
        await a.login(uid, old)
        await a.stop()  # dead: its presence stays until the TTL, nobody hears
        new = self.link(b, uid, "phone")
        started = reactor.seconds()
        await b.login(uid, new)
        elapsed = reactor.seconds() - started
        self.assertGreaterEqual(elapsed, KICK_CONFIRM_SECONDS - 0.1)
        self.assertLess(elapsed, KICK_CONFIRM_SECONDS + 1.5)
        self.assertEqual(b.kicks_unconfirmed, 1)
        self.assertEqual(b.local(uid), [new])

    async def test_a_user_held_by_one_node_costs_no_redis_call(self) -> None:
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        phone, laptop = self.link(a, uid, "phone"), self.link(a, uid, "laptop")
        await a.login(uid, phone)
        await a.login(uid, laptop)
        for i in range(5):
            self.assertTrue(a.push(uid, {"t": "msg", "i": i}))
        await sleep(0.1)
        self.assertEqual(self.routes["1"], 0)
        self.assertEqual(len(phone.pushes), 5)
        self.assertEqual(len(laptop.pushes), 5)
        # A device elsewhere: pushes go through Redis (the join notice told a).
        tablet = self.link(b, uid, "tablet")
        await b.login(uid, tablet)
        await eventually(lambda: a._others.get(uid) == {"2"})
        a.push(uid, {"t": "msg", "i": 5})
        await eventually(lambda: tablet.pushes)
        self.assertEqual(self.routes["1"], 1)
        # It leaves: the leave notice stops the Redis calls again.
        b.logout(uid, tablet)
        await eventually(lambda: a._others.get(uid) == set())
        a.push(uid, {"t": "msg", "i": 6})
        await sleep(0.1)
        self.assertEqual(self.routes["1"], 1)
        self.assertEqual(len(phone.pushes), 7)

    async def test_a_login_completes_once_the_other_nodes_route_to_it(self) -> None:
        """
        Regression: a login completed before the user's other nodes had heard
        its join notice, so a push they made meanwhile (for an event committed
        after the new device's catch-up had read) reached no device of that
        node: the new device missed it until its next catch-up.
        """
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        phone, tablet = self.link(a, uid, "phone"), self.link(b, uid, "tablet")
        await a.login(uid, phone)
        await b.login(uid, tablet)
        # No wait for the notice: the login itself waited for a's confirmation.
        self.assertEqual(a._others.get(uid), {"2"})
        a.push(uid, {"t": "msg", "n": 1})
        await eventually(lambda: tablet.pushes)
        self.assertEqual(tablet.pushes, [{"t": "msg", "n": 1}])
        self.assertEqual(b.kicks_unconfirmed, 0)

    async def test_a_join_heard_before_the_login_knew_the_user_is_kept(self) -> None:
        a = await self.node(1)
        uid = next(_uids)
        phone = self.link(a, uid, "phone")
        d = a.login(uid, phone)  # pending: its script runs in the next turn
        a._on_message(msgpack.packb([["j", str(uid), [b"9", b""]]], use_bin_type=True))
        await d
        self.assertEqual(a._others.get(uid), {"9"})
        # A notice for a user with no login pending here is not kept.
        other = next(_uids)
        a._on_message(msgpack.packb([["j", str(other), [b"9", b""]]], use_bin_type=True))
        self.assertEqual((a._early_notices, a._early_count), ({}, 0))

    async def pending_login(
        self, a: ClusterPresence, c: ClusterPresence, uid: int
    ) -> Deferred[None]:
        """A login on C{a} that waits 2 s for the kick confirmation of dead C{c}."""
        await c.login(uid, self.link(c, uid, "phone"))
        await c.stop()
        d = a.login(uid, self.link(a, uid, "phone"))
        await eventually(lambda: a._confirms)  # its script ran: it waits
        return d

    async def test_a_refresh_keeps_the_notices_of_a_pending_login(self) -> None:
        """
        Regression: the refresh forgot every early join notice, also those
        of a login still waiting for its kick confirmations: the node never
        routed to the user's device that joined meanwhile.
        """
        a, b, c = await self.node(1), await self.node(2), await self.node(3)
        uid = next(_uids)
        d = await self.pending_login(a, c, uid)
        tablet = self.link(b, uid, "tablet")
        await b.login(uid, tablet)  # its join notice reaches a, still pending
        await a.refresh()
        await d
        self.assertEqual(a._others.get(uid), {"2"})
        a.push(uid, {"t": "msg", "n": 1})
        await eventually(lambda: tablet.pushes, timeout=2)
        self.assertEqual(a._early_count, 0)

    async def test_a_leave_heard_while_a_login_is_pending_is_applied_in_order(self) -> None:
        """
        Regression: a leave notice for a user whose login was pending was
        dropped, while the join before it was kept: the node kept routing
        to a node that no longer held the user.
        """
        a, b, c = await self.node(1), await self.node(2), await self.node(3)
        uid = next(_uids)
        d = await self.pending_login(a, c, uid)
        tablet = self.link(b, uid, "tablet")
        await b.login(uid, tablet)
        b.logout(uid, tablet)
        await b._logouts.idle()
        await sleep(0.1)
        await d
        self.assertEqual(a._others.get(uid), set())

    async def test_refresh_rereads_the_other_nodes_and_tells_a_late_found_one_to_sync(
        self,
    ) -> None:
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        phone, tablet = self.link(a, uid, "phone"), self.link(b, uid, "tablet")
        await a.login(uid, phone)
        await b.login(uid, tablet)
        await eventually(lambda: a._others.get(uid) == {"2"})
        a._others[uid] = set()  # as if the join notice were lost
        await a.refresh()
        self.assertEqual(a._others[uid], {"2"})
        await eventually(lambda: {"t": "sync"} in tablet.pushes)

    async def test_kick_device_across_nodes(self) -> None:
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        phone, laptop = self.link(a, uid, "phone"), self.link(b, uid, "laptop")
        await a.login(uid, phone)
        await b.login(uid, laptop)
        self.assertTrue(await b.kick_device(uid, "phone", KICK_LOGGED_OUT))
        self.assertEqual(phone.kicks, [KICK_LOGGED_OUT])  # confirmed before it fired
        self.assertFalse(await b.kick_device(uid, "phone", KICK_LOGGED_OUT))
        # On its own node too.
        self.assertTrue(await b.kick_device(uid, "laptop", KICK_LOGGED_OUT))
        self.assertEqual(laptop.kicks, [KICK_LOGGED_OUT])
        self.assertEqual((a.local(uid), b.local(uid)), ([], []))
        await eventually(lambda: a.online(uid).addCallback(lambda online: not online))

    async def test_online_devices(self) -> None:
        a, b, c = await self.node(1), await self.node(2), await self.node(3)
        uid = next(_uids)
        self.assertEqual(await c.online_devices(uid), [])
        self.assertFalse(await c.online(uid))
        phone = self.link(a, uid, "phone", connected_at=1_700_000_000_000)
        laptop = self.link(b, uid, "laptop", connected_at=1_700_000_000_500)
        await a.login(uid, phone)
        await b.login(uid, laptop)
        self.assertEqual(
            await c.online_devices(uid),
            [
                OnlineDevice("phone", "1", 1_700_000_000_000),
                OnlineDevice("laptop", "2", 1_700_000_000_500),
            ],
        )
        self.assertTrue(await c.online(uid))
        a.logout(uid, phone)
        await eventually(
            lambda: c.online_devices(uid).addCallback(lambda d: [x.device for x in d] == ["laptop"])
        )

    async def test_online_devices_while_redis_is_down_is_unavailable(self) -> None:
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        a = await self.node(1, redis=redis)
        uid = next(_uids)
        await a.login(uid, self.link(a, uid, "phone"))
        redis.stop()
        with self.assertRaises(Unavailable):
            await a.online_devices(uid)
        # Logins are checked against this node only meanwhile.
        other = self.link(a, uid, "phone")
        await a.login(uid, other)
        self.assertEqual(a.local(uid), [other])

    async def test_two_logins_of_one_device_in_one_turn(self) -> None:
        # One script call: the second replaces the first before either is
        # registered; the first is kicked, never registered.
        a = await self.node(1)
        uid = next(_uids)
        first, second = self.link(a, uid, "phone"), self.link(a, uid, "phone")
        await gatherResults([a.login(uid, first), a.login(uid, second)])
        self.assertEqual((first.kicks, second.kicks), ([KICK_REPLACED], []))
        self.assertEqual(a.local(uid), [second])
        await sleep(0.1)
        devices = await a.online_devices(uid)
        self.assertEqual(len(devices), 1)
        a.logout(uid, second)
        await eventually(lambda: a.online(uid).addCallback(lambda online: not online))

    async def test_a_connection_gone_before_its_login_completed_is_not_registered(
        self,
    ) -> None:
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        await b.stop()  # its kick confirmation never comes: the login waits 2 s
        old = DeviceLink(uid, "phone", last_active=reactor.seconds())
        await b._redis.command(  # type: ignore[attr-defined]
            "HSET",
            f"{self.prefix}:devices:{uid}",
            "phone",
            f"{b.value(old)}|0|0|99999999999999",
        )
        new = self.link(a, uid, "phone")
        d = a.login(uid, new)
        await sleep(0.2)
        a.logout(uid, new)  # the client went away meanwhile
        await d
        self.assertEqual(a.local(uid), [])
        await eventually(lambda: a.online_devices(uid).addCallback(lambda d: d == []))

    async def test_the_uid_given_counts_not_the_link_s(self) -> None:
        # Regression: the gateway sets link.uid only once logged in; the
        # presence was written under a key without the uid.
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        phone = self.link(a, uid, "phone")
        phone.uid = None  # type: ignore[assignment]
        await a.login(uid, phone)
        self.assertEqual([d.device for d in await b.online_devices(uid)], ["phone"])
        phone.uid = uid
        await a.refresh()
        b.push(uid, {"t": "msg"})
        await eventually(lambda: phone.pushes)

    async def test_a_link_without_a_device_fails_its_login_only(self) -> None:
        a = await self.node(1)
        uid = next(_uids)
        bad = self.link(a, uid, "phone")
        bad.device = None  # type: ignore[assignment]
        good = self.link(a, next(_uids), "phone")
        results = await gatherResults(
            [a.login(uid, bad).addErrback(lambda f: f.trap(TypeError)), a.login(good.uid, good)]
        )
        self.assertEqual(results[0], TypeError)
        self.assertEqual((a.local(uid), a.local(good.uid)), ([], [good]))

    async def test_a_stale_refresh_entry_does_not_kick_the_device_s_new_connection(self) -> None:
        """
        Regression: the device reconnected here while a refresh chunk holding
        its old connection was in flight; the script found the field held by
        the new one and the node kicked whatever the device had now: the new
        connection.
        """
        a = await self.node(1)
        uid = next(_uids)
        o1 = self.link(a, uid, "phone")
        await a.login(uid, o1)
        original = a._redis.presence_refresh
        o2 = self.link(a, uid, "phone")

        async def refresh(*args: Any, **kw: Any) -> Any:
            # Its login script runs before the refresh's (entries built before).
            await a.login(uid, o2)
            return await original(*args, **kw)

        a._redis.presence_refresh = refresh  # type: ignore[method-assign]
        await a.refresh()
        self.assertEqual((o1.kicks, o2.kicks), ([KICK_REPLACED], []))
        self.assertEqual(a.local(uid), [o2])
        await sleep(0.1)
        self.assertEqual([d.device for d in await a.online_devices(uid)], ["phone"])

    async def test_a_stale_refresh_entry_does_not_restore_a_closed_connection(self) -> None:
        """
        Regression: a connection closed (its logout removed its field) while
        a refresh chunk holding it was in flight; the script restored the
        field: a ghost device online until the TTL, counting towards
        max_online.
        """
        a = await self.node(1)
        uid = next(_uids)
        o1 = self.link(a, uid, "phone")
        await a.login(uid, o1)
        original = a._redis.presence_refresh

        async def refresh(*args: Any, **kw: Any) -> Any:
            a.logout(uid, o1)
            await a._logouts.idle()
            self.assertEqual(await a.online_devices(uid), [])
            return await original(*args, **kw)

        a._redis.presence_refresh = refresh  # type: ignore[method-assign]
        await a.refresh()
        self.assertEqual(await a.online_devices(uid), [])  # removed before it returned
        a._redis.presence_refresh = original  # type: ignore[method-assign]
        await a.refresh()  # nothing written back either
        self.assertEqual(await a.online_devices(uid), [])

    async def blip_login(self, b: ClusterPresence, link: DeviceLink) -> None:
        """Log C{link} in on C{b} while its login script cannot reach Redis."""
        original = b._redis.presence_login

        async def down(*args: Any, **kw: Any) -> Any:
            raise HotUnavailable("blip")

        b._redis.presence_login = down  # type: ignore[method-assign]
        try:
            await b.login(link.uid, link)  # checked on b only
        finally:
            b._redis.presence_login = original  # type: ignore[method-assign]

    async def test_a_login_checked_locally_wins_once_redis_answers(self) -> None:
        """
        Regression: a device reconnected to another node during a Redis
        blip (its login checked there only); once Redis answered, that
        node's refresh found the field held by the older connection and
        kicked its own, newer one.
        """
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        old = self.link(a, uid, "phone", connected_at=1000)
        await a.login(uid, old)
        new = self.link(b, uid, "phone", connected_at=2000)
        await self.blip_login(b, new)
        await b.refresh()  # as when Redis answers again: replayed as a login
        self.assertEqual((old.kicks, new.kicks), ([KICK_REPLACED], []))  # confirmed
        self.assertEqual(b.kicks_unconfirmed, 0)
        await a.refresh()
        await b.refresh()
        self.assertEqual((old.kicks, new.kicks), ([KICK_REPLACED], []))
        self.assertEqual((a.local(uid), b.local(uid)), ([], [new]))
        devices = await a.online_devices(uid)
        self.assertEqual([(d.device, d.node) for d in devices], [("phone", "2")])

    async def test_the_recovery_replays_the_logins_checked_locally(self) -> None:
        # Regression, as above, by the recovery that runs when the breaker closes.
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        old, laptop = self.link(a, uid, "phone"), self.link(a, uid, "laptop")
        await a.login(uid, old)
        await a.login(uid, laptop)
        new = self.link(b, uid, "phone")
        await self.blip_login(b, new)
        self.assertEqual(b._others.get(uid), set())  # no idea of a meanwhile
        b._recover("redis answers again")
        await eventually(lambda: old.kicks, timeout=3)
        await eventually(lambda: not b._recovering, timeout=3)
        self.assertEqual((old.kicks, new.kicks, laptop.kicks), ([KICK_REPLACED], [], []))
        # b learned that a holds the user (and told the laptop to sync).
        self.assertEqual(b._others.get(uid), {"1"})
        await eventually(lambda: {"t": "sync"} in laptop.pushes, timeout=2)
        b.push(uid, {"t": "msg"})
        await eventually(lambda: {"t": "msg"} in laptop.pushes, timeout=2)

    async def test_a_replayed_login_older_than_the_device_s_connection_is_kicked(
        self,
    ) -> None:
        # Newest wins: a connection made through Redis after the local-only
        # login keeps the device; the replayed one goes.
        a, b = await self.node(1), await self.node(2)
        uid = next(_uids)
        older = self.link(b, uid, "phone", connected_at=1000)
        await self.blip_login(b, older)
        newer = self.link(a, uid, "phone", connected_at=2000)
        await a.login(uid, newer)
        await b.refresh()
        self.assertEqual((older.kicks, newer.kicks), ([KICK_REPLACED], []))
        self.assertEqual((a.local(uid), b.local(uid)), ([newer], []))
        await sleep(0.1)
        devices = await b.online_devices(uid)
        self.assertEqual([(d.device, d.node) for d in devices], [("phone", "1")])
