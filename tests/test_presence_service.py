"""
Presence and typing in the business layer (issue 11), on both backends:
presence and watch answers, who may see whom (everyone / contacts / nobody /
blocked, oneself always), watcher pushes on transitions and on changes of
what decides them, coalescing (a Clock-driven window), last_seen in SQL,
typing, and set_profile's presence field; and the single node's registry
reporting user-level transitions.
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver.chat.blocks import BlockService
from imserver.chat.presence import CHECK_SECONDS, COALESCE_SECONDS, PresenceService
from imserver.errors import ErrorCode, ImError, Unavailable
from imserver.metrics import PresenceCollector
from imserver.services.presence import OnlineDevice
from imserver.services.registry import LocalRegistry
from imserver.storage.presence import PresenceStore
from imserver.wire import frames
from tests.stack import RecordingPresence, Stack, make_stack

_uids = itertools.count(110_000)
_epochs = itertools.count(1)


@attrs.define(eq=False)
class Link:
    """A connection as presence sees it: what was pushed to it."""

    uid: int
    device: str = "default"
    epoch: int = attrs.Factory(lambda: next(_epochs))
    connected_at: int = 1_000
    last_active: float = 0.0
    pushed: list[dict[str, Any]] = attrs.Factory(list)
    kicked: list[str] = attrs.Factory(list)

    def push(self, frame: Any) -> None:
        self.pushed.append(dict(frame))

    def kick(self, reason: str) -> None:
        self.kicked.append(reason)

    def take(self) -> list[dict[str, Any]]:
        out, self.pushed = self.pushed, []
        return out


class FakeBlocks(BlockService):
    """The BlockService interface with pairs the test says (the real one is another helper's)."""

    def __init__(self) -> None:
        self.pairs: set[frozenset[int]] = set()
        self._listeners = []

    async def either(self, a: int, b: int) -> bool:
        return frozenset((a, b)) in self.pairs

    def either_now(self, a: int, b: int) -> bool | None:
        return None  # never cached: the service must ask either()

    def block(self, a: int, b: int, now: bool = True) -> None:
        if now:
            self.pairs.add(frozenset((a, b)))
        else:
            self.pairs.discard(frozenset((a, b)))
        for listener in self._listeners:
            listener(a, b, now)


def hidden(uid: int) -> dict[str, Any]:
    return {"uid": uid, "online": False, "last_seen": 0}


class PresenceContract:
    backend = ""

    async def setUp(self) -> None:  # type: ignore[override]
        assert isinstance(self, TestCase)
        self.stack: Stack = await make_stack(self, self.backend)
        self.clock = Clock()
        self.presence = RecordingPresence()
        self.blocks = FakeBlocks()
        self.devices: dict[int, list[Link]] = {}
        self.service = PresenceService(
            store=self.stack.store, presence=self.presence, blocks=self.blocks, clock=self.clock
        )

    async def users(self, n: int) -> list[int]:
        uids = [next(_uids) for _ in range(n)]
        for uid in uids:
            await self.stack.store.ensure_user(uid)
        return uids

    async def talk(self, a: int, b: int) -> None:
        """Make a and b contacts: a conversation (a t_session row)."""
        await self.stack.chat.send(a, b, f"c-{a}-{b}", "text", "hi")
        await self.stack.settle()

    def online(self, uid: int, at: int = 5_000, here: bool = True) -> None:
        """The user's first device connects (at C{at}): presence reports the transition."""
        link = Link(uid, connected_at=at)
        self.devices.setdefault(uid, []).append(link)
        self.presence.login(uid, link)
        self.presence.change(uid, True, at, here)

    def offline(self, uid: int, at: int = 9_000, here: bool = True) -> None:
        for link in self.devices.pop(uid, []):
            self.presence.logout(uid, link)
        self.presence.change(uid, False, at, here)

    # -- presence {uids} ------------------------------------------------------------

    async def test_default_is_contacts(self) -> None:
        me, friend, stranger = await self.users(3)
        await self.talk(me, friend)
        self.online(friend, at=5_000)
        self.online(stranger, at=6_000)
        await self.service.flush()
        answer = await self.service.query(me, [friend, stranger, me])
        self.assertEqual(
            answer["users"],
            [
                {"uid": friend, "online": True, "last_seen": 5_000},
                hidden(stranger),
                {"uid": me, "online": False, "last_seen": 0},
            ],
        )

    async def test_everyone_and_nobody(self) -> None:
        me, friend, stranger = await self.users(3)
        await self.talk(me, friend)
        await self.service.set_share(friend, "nobody")
        await self.service.set_share(stranger, "everyone")
        self.online(friend)
        self.online(stranger, at=7_000)
        await self.service.flush()
        answer = await self.service.query(me, [friend, stranger])
        self.assertEqual(
            answer["users"], [hidden(friend), {"uid": stranger, "online": True, "last_seen": 7_000}]
        )
        # Oneself always.
        self.online(me, at=8_000)
        await self.service.flush()
        answer = await self.service.query(friend, [friend])
        self.assertEqual(answer["users"], [{"uid": friend, "online": True, "last_seen": 5_000}])

    async def test_blocked_either_way_sees_nothing(self) -> None:
        me, friend, other = await self.users(3)
        await self.talk(me, friend)
        await self.service.set_share(other, "everyone")
        self.online(friend)
        self.online(other)
        self.blocks.block(friend, me)  # friend blocks me
        self.blocks.block(me, other)  # I block other
        answer = await self.service.query(me, [friend, other])
        self.assertEqual(answer["users"], [hidden(friend), hidden(other)])
        answer = await self.service.query(other, [me])
        self.assertEqual(answer["users"], [hidden(me)])

    async def test_last_seen_is_durable(self) -> None:
        [user] = await self.users(1)
        self.online(user, at=10_000)
        self.offline(user, at=20_000)
        # A transition heard from another node is written by that node, not here.
        self.presence.change(user, True, 30_000, False)
        await self.service.flush()
        rows = await PresenceStore(self.stack.store.db, self.stack.store.background).load([user])
        self.assertEqual(rows[user].last_seen, 20_000)
        # Never goes back.
        self.offline(user, at=15_000)
        await self.service.flush()
        rows = await PresenceStore(self.stack.store.db, self.stack.store.background).load([user])
        self.assertEqual(rows[user].last_seen, 20_000)
        self.assertEqual((await self.service.query(user, [user]))["users"][0]["last_seen"], 20_000)

    # -- watch ------------------------------------------------------------------------

    async def test_watch_answers_and_pushes(self) -> None:
        me, friend, stranger = await self.users(3)
        await self.talk(me, friend)
        link = Link(me)
        answer = await self.service.watch(me, link, [friend, stranger])
        self.assertEqual(answer["users"], [hidden(friend), hidden(stranger)])
        self.online(friend, at=5_000)
        self.online(stranger, at=5_000)
        self.assertEqual(
            link.take(), [{"t": "presence", "uid": friend, "online": True, "last_seen": 5_000}]
        )
        self.assertEqual(self.service.watchers(friend), 1)
        # Replaced: friend no longer watched.
        answer = await self.service.watch(me, link, [stranger])
        self.assertEqual(answer["users"], [hidden(stranger)])
        self.assertEqual(self.service.watchers(friend), 0)
        self.clock.advance(COALESCE_SECONDS)
        self.offline(friend)
        self.assertEqual(link.take(), [])
        # [] watches nobody.
        self.assertEqual(await self.service.watch(me, link, []), {"users": []})
        self.assertEqual(self.service.watched(link), frozenset())

    async def test_watch_initial_state(self) -> None:
        me, friend = await self.users(2)
        await self.talk(me, friend)
        self.online(friend, at=4_000)
        await self.service.flush()
        answer = await self.service.watch(me, Link(me), [friend])
        self.assertEqual(answer["users"], [{"uid": friend, "online": True, "last_seen": 4_000}])

    async def test_users_watched_here_cost_no_presence_call(self) -> None:
        """A user watched on this node already is answered from memory."""
        me, other, friend = await self.users(3)
        await self.talk(me, friend)
        await self.talk(other, friend)
        self.online(friend, at=5_000)
        asked: list[int] = []
        real = self.presence.online_devices

        def counting(uid: int) -> Any:
            asked.append(uid)
            return real(uid)

        assert isinstance(self, TestCase)
        self.patch(self.presence, "online_devices", counting)
        await self.service.watch(me, Link(me), [friend])
        self.assertEqual(asked, [friend])
        answer = await self.service.watch(other, Link(other), [friend])
        answer2 = await self.service.query(other, [friend])
        self.assertEqual(asked, [friend])
        self.assertEqual(answer, answer2)
        self.assertEqual(answer["users"], [{"uid": friend, "online": True, "last_seen": 5_000}])

    async def test_coalescing(self) -> None:
        """At most one push per watcher per window; the last state wins."""
        me, friend = await self.users(2)
        await self.talk(me, friend)
        link = Link(me)
        await self.service.watch(me, link, [friend])
        self.online(friend, at=1_000)
        self.offline(friend, at=1_100)
        self.online(friend, at=1_200)
        self.offline(friend, at=1_300)
        self.assertEqual(
            link.take(), [{"t": "presence", "uid": friend, "online": True, "last_seen": 1_000}]
        )
        self.clock.advance(COALESCE_SECONDS - 0.1)
        self.assertEqual(link.take(), [])
        self.clock.advance(0.1)
        self.assertEqual(
            link.take(), [{"t": "presence", "uid": friend, "online": False, "last_seen": 1_300}]
        )
        self.assertEqual(self.service.coalesced, 3)
        # An older transition heard late (another node's) is ignored.
        self.online(friend, at=1_400)
        # Heard from another node, older than what is known: presence (still
        # online) is asked, and says the state known is right.
        self.presence.change(friend, False, 1_300, False)
        await self.service.settled()
        self.assertEqual(link.take(), [])
        self.clock.advance(COALESCE_SECONDS)
        self.assertEqual(
            link.take(), [{"t": "presence", "uid": friend, "online": True, "last_seen": 1_400}]
        )
        self.clock.advance(COALESCE_SECONDS)
        self.assertEqual(link.take(), [])
        # After a quiet window the next change goes at once.
        self.offline(friend, at=2_000)
        self.assertEqual(len(link.take()), 1)

    async def test_many_watchers_one_transition(self) -> None:
        """One transition: one push per visible watcher, from the in-memory index."""
        [star] = await self.users(1)
        await self.service.set_share(star, "everyone")
        fans = await self.users(20)
        links = [Link(fan) for fan in fans]
        self.blocks.block(star, fans[0])
        for fan, link in zip(fans, links, strict=True):
            await self.service.watch(fan, link, [star])
        self.online(star, at=3_000)
        self.assertEqual([len(link.take()) for link in links], [0] + [1] * 19)

    async def test_link_gone_stops_watching(self) -> None:
        me, friend = await self.users(2)
        await self.talk(me, friend)
        link = Link(me)
        await self.presence.login(me, link)
        await self.service.watch(me, link, [friend])
        self.presence.logout(me, link)
        self.assertEqual(self.service.watchers(friend), 0)
        self.online(friend)
        self.assertEqual(link.take(), [])

    async def test_share_change_decides_again(self) -> None:
        me, friend, stranger = await self.users(3)
        await self.talk(me, friend)
        mine, theirs = Link(me), Link(stranger)
        self.online(friend, at=5_000)
        await self.service.watch(me, mine, [friend])
        await self.service.watch(stranger, theirs, [friend])
        await self.service.set_share(friend, "nobody")
        self.assertEqual(mine.take(), [{"t": "presence", **hidden(friend)}])
        self.assertEqual(theirs.take(), [])
        await self.service.set_share(friend, "everyone")
        shown = {"t": "presence", "uid": friend, "online": True, "last_seen": 5_000}
        self.assertEqual(mine.take(), [shown])
        self.assertEqual(theirs.take(), [shown])
        # From another node: the broadcast, heard.
        self.assertIn(("presence_share", [friend, "everyone"]), self.presence.broadcasts)
        await self.service._share_changed(friend, "contacts")
        self.assertEqual(mine.take(), [])
        self.assertEqual(theirs.take(), [{"t": "presence", **hidden(friend)}])

    async def test_block_change_decides_again(self) -> None:
        me, friend = await self.users(2)
        await self.talk(me, friend)
        link = Link(me)
        self.online(friend, at=5_000)
        await self.service.watch(me, link, [friend])
        self.blocks.block(friend, me)
        await self.service.settled()
        self.assertEqual(link.take(), [{"t": "presence", **hidden(friend)}])
        self.clock.advance(COALESCE_SECONDS)
        self.offline(friend)
        self.assertEqual(link.take(), [])
        self.blocks.block(friend, me, now=False)
        await self.service.settled()
        self.assertEqual(
            link.take(), [{"t": "presence", "uid": friend, "online": False, "last_seen": 9_000}]
        )

    async def test_a_user_whose_node_died_goes_offline(self) -> None:
        """Its node sent no offline; a check finds it without devices."""
        me, friend = await self.users(2)
        await self.talk(me, friend)
        link = Link(me)
        self.online(friend, at=5_000)
        await self.service.watch(me, link, [friend])
        # Its devices were on another node, which died: gone without a transition.
        self.presence._links.pop(friend)
        self.clock.advance(CHECK_SECONDS - 1)
        await self.service.settled()
        self.assertEqual(link.take(), [])
        self.clock.advance(1)
        await self.service.settled()
        [push] = link.take()
        self.assertEqual((push["uid"], push["online"]), (friend, False))
        # Checked again later: nothing more.
        self.clock.advance(CHECK_SECONDS)
        await self.service.settled()
        self.assertEqual(link.take(), [])

    async def test_transitions_out_of_order_are_checked(self) -> None:
        """
        An online stamped before the offline it follows (a node whose clock is
        behind): presence is asked, and the user shows online.
        """
        me, friend = await self.users(2)
        await self.talk(me, friend)
        link = Link(me)
        await self.service.watch(me, link, [friend])
        self.online(friend, at=5_000)
        self.offline(friend, at=9_000)
        self.clock.advance(COALESCE_SECONDS)
        link.take()
        # Back on a node whose clock is two seconds behind.
        self.online(friend, at=8_000, here=False)
        await self.service.settled()
        self.assertEqual(self.service.verified, 1)
        self.clock.advance(COALESCE_SECONDS)
        [push] = link.take()
        self.assertIs(push["online"], True)
        self.assertGreater(push["last_seen"], 9_000)
        # An older one that agrees changes nothing, and asks nothing.
        self.online(friend, at=7_000, here=False)
        await self.service.settled()
        self.assertEqual(self.service.verified, 1)

    async def test_a_switch_of_devices_ends_online(self) -> None:
        """
        A device whose connection began before the user's last one left, and
        whose login completes after: online (transitions are ordered by when
        they happen, not by when connections began). On a single node's registry.
        """
        registry = LocalRegistry()
        service = PresenceService(
            store=self.stack.store, presence=registry, blocks=self.blocks, clock=self.clock
        )
        me, friend = await self.users(2)
        await self.talk(me, friend)
        watcher = Link(me)
        registry.login(me, watcher)
        self.clock.advance(10)
        phone = Link(friend, "phone", connected_at=10_000)
        registry.login(friend, phone)
        await service.watch(me, watcher, [friend])
        self.clock.advance(5)
        laptop = Link(friend, "laptop", connected_at=14_000)  # its auth began a second ago
        registry.logout(friend, phone)
        self.clock.advance(0.01)
        registry.login(friend, laptop)
        self.clock.advance(COALESCE_SECONDS)
        pushed = watcher.take()
        self.assertEqual(
            [(p["online"], p["last_seen"]) for p in pushed], [(False, 15_000), (True, 15_010)]
        )
        answer = await service.query(me, [friend])
        self.assertEqual(answer["users"], [{"uid": friend, "online": True, "last_seen": 15_010}])
        await service.flush()

    # -- typing ---------------------------------------------------------------------------

    async def test_typing(self) -> None:
        me, friend, stranger = await self.users(3)
        await self.talk(me, friend)
        self.presence.online_users.add(friend)
        self.assertEqual(await self.service.typing(me, friend, True), {})
        self.assertEqual(
            self.presence.take(friend, "typing"), [{"t": "typing", "from": me, "active": True}]
        )
        for to in (me, stranger):
            with self.assertRaises(ImError) as e:
                await self.service.typing(me, to, True)
            self.assertEqual(e.exception.code, ErrorCode.FORBIDDEN)
        self.blocks.block(friend, me)
        self.assertEqual(await self.service.typing(me, friend, False), {})
        self.assertEqual(self.presence.take(friend, "typing"), [])

    async def test_authorization_matrix(self) -> None:
        """
        Every op of this feature x a user outside the conversation, one who
        blocks the other, one blocked by the other (and a contact, and
        oneself): what the caller gets and what the peer is pushed.
        """
        me, contact, outsider, blocker, blocked = await self.users(5)
        for peer in (contact, blocker, blocked):
            await self.talk(me, peer)
        self.blocks.block(blocker, me)
        self.blocks.block(me, blocked)
        for peer in (contact, outsider, blocker, blocked):
            self.online(peer, at=5_000)
            self.presence.online_users.add(peer)
        await self.service.set_share(outsider, "contacts")
        shown = {"online": True, "last_seen": 5_000}
        expected = {
            me: {"online": False, "last_seen": 0},  # oneself (offline here)
            contact: shown,
            outsider: {"online": False, "last_seen": 0},
            blocker: {"online": False, "last_seen": 0},
            blocked: {"online": False, "last_seen": 0},
        }
        peers = [me, contact, outsider, blocker, blocked]
        answer = await self.service.query(me, peers)
        self.assertEqual(answer["users"], [{"uid": p, **expected[p]} for p in peers])
        link = Link(me)
        answer = await self.service.watch(me, link, peers)
        self.assertEqual(answer["users"], [{"uid": p, **expected[p]} for p in peers])
        self.clock.advance(COALESCE_SECONDS)
        for peer in peers[1:]:
            self.offline(peer, at=9_000)
        self.assertEqual([p["uid"] for p in link.take()], [contact])
        # typing: the contact gets it; an outsider and oneself are forbidden; across
        # a block either way: {} and nothing pushed.
        outcomes = {}
        for peer in peers:
            self.presence.online_users.add(peer)
            try:
                outcomes[peer] = await self.service.typing(me, peer, True)
            except ImError as e:
                outcomes[peer] = str(e.code)
        self.assertEqual(
            outcomes,
            {me: "forbidden", contact: {}, outsider: "forbidden", blocker: {}, blocked: {}},
        )
        pushed = {p: self.presence.take(p, "typing") for p in peers}
        self.assertEqual({p for p, frames in pushed.items() if frames}, {contact})

    # -- review regressions (findings 1-3) ------------------------------------------------

    async def test_watch_queued_behind_a_kick_registers_nothing(self) -> None:
        """A watch that runs after its connection left presence leaves no watcher behind."""
        me, friend = await self.users(2)
        await self.talk(me, friend)
        link = Link(me)
        await self.presence.login(me, link)
        self.presence.logout(me, link)  # kicked: presence is told first
        answer = await self.service.watch(me, link, [friend])  # queued, runs afterwards
        self.assertEqual(answer["users"], [hidden(friend)])
        self.assertEqual(self.service.watchers(friend), 0)
        self.assertEqual(self.service.watched(link), frozenset())

    async def test_check_while_presence_is_unknown_marks_nobody_offline(self) -> None:
        """Redis down: a user online on another node is not declared offline by the check."""
        me, friend = await self.users(2)
        await self.talk(me, friend)
        link = Link(me)
        await self.presence.login(me, link)
        assert isinstance(self, TestCase)
        self.patch(
            self.presence,
            "online_devices",
            lambda uid: succeed([OnlineDevice("default", "2", 4_000)] if uid == friend else []),
        )
        self.presence.change(friend, True, 4_000, False)
        reply = await self.service.watch(me, link, [friend])
        self.assertEqual(reply["users"], [{"uid": friend, "online": True, "last_seen": 4_000}])
        link.take()
        self.patch(self.presence, "online_devices", lambda uid: fail(Unavailable("redis down")))
        await self.service.check()
        # A late transition that disagrees is not "verified" offline either.
        self.presence.change(friend, False, 3_000, False)
        await self.service.settled()
        self.assertEqual(link.take(), [])
        self.assertEqual(self.service._state[friend], (True, 4_000))

    async def test_share_nobody_during_watch_is_kept(self) -> None:
        """A share change heard while a watch is deciding is not overwritten by it."""
        stranger, star = await self.users(2)
        await self.service.set_share(star, "everyone")
        self.online(star, at=5_000)
        link = Link(stranger)
        real = self.service.sql.load
        gate: Deferred[None] = Deferred()

        async def slow(uids: Any) -> Any:
            rows = await real(uids)
            await gate
            return rows

        assert isinstance(self, TestCase)
        self.patch(self.service.sql, "load", slow)
        watching = Deferred.fromCoroutine(self.service.watch(stranger, link, [star]))
        self.patch(self.service.sql, "load", real)
        await self.service.set_share(star, "nobody")
        gate.callback(None)
        self.assertEqual((await watching)["users"], [hidden(star)])
        self.clock.advance(COALESCE_SECONDS)
        self.offline(star, at=9_000)
        self.assertEqual(link.take(), [])

    async def test_block_during_watch_is_kept(self) -> None:
        """A block heard while a watch is deciding is not overwritten by it."""
        me, friend = await self.users(2)
        await self.talk(me, friend)
        self.online(friend, at=5_000)
        link = Link(me)
        real = self.service._online
        gate: Deferred[None] = Deferred()
        started: Deferred[None] = Deferred()

        def slow(uid: int) -> Deferred[int | None]:
            async def go() -> int | None:
                got = await real(uid)
                if not started.called:
                    started.callback(None)
                await gate
                return got

            return Deferred.fromCoroutine(go())

        assert isinstance(self, TestCase)
        self.patch(self.service, "_online", slow)
        watching = Deferred.fromCoroutine(self.service.watch(me, link, [friend]))
        await started
        self.blocks.block(friend, me)
        await self.service.settled()
        gate.callback(None)
        self.assertEqual((await watching)["users"], [hidden(friend)])
        link.take()
        self.clock.advance(COALESCE_SECONDS)
        self.offline(friend, at=9_000)
        self.assertEqual(link.take(), [])

    async def test_metrics(self) -> None:
        """The counters and the watch index's size, as /metrics shows them."""
        me, other, friend = await self.users(3)
        await self.talk(me, friend)
        await self.service.watch(me, Link(me), [friend, other])
        await self.service.watch(other, Link(other), [friend])
        self.online(friend, at=5_000)
        self.offline(friend, at=6_000)
        await self.service.typing(me, friend, True)
        got = {m.name: m.samples[0].value for m in PresenceCollector(self.service).collect()}
        self.assertEqual(
            got,
            {
                "imserver_presence_pushes": 1,
                "imserver_presence_coalesced": 1,
                "imserver_typing_pushes": 1,
                "imserver_presence_verified": 0,
                "imserver_presence_watched_users": 2,
                "imserver_presence_watch_entries": 3,
            },
        )

    # -- through the chat service ----------------------------------------------------------

    async def test_set_profile_presence(self) -> None:
        me, other = await self.users(2)
        chat = self.stack.chat
        reply = await chat.set_profile(me, None, None, presence="everyone", show_presence=True)
        self.assertEqual(
            reply, {"user": {"uid": me, "nickname": "", "avatar": ""}, "presence": "everyone"}
        )
        reply = await chat.set_profile(me, "me", None, show_presence=True)
        self.assertEqual(reply["presence"], "everyone")
        # Without show_presence (the HTTP API), the reply is as before; the push has it.
        reply = await chat.set_profile(me, "me", None)
        self.assertEqual(reply, {"user": {"uid": me, "nickname": "me", "avatar": ""}})
        self.assertEqual(await chat.presence_service.share(me), "everyone")
        # Others' profile does not show it.
        self.assertEqual(
            (await chat.profile([me]))["users"], [{"uid": me, "nickname": "me", "avatar": ""}]
        )
        with self.assertRaises(ImError) as e:
            await chat.set_profile(me, None, None, presence="friends")
        self.assertEqual(e.exception.code, ErrorCode.INVALID)
        self.stack.presence.online_users.add(other)
        self.stack.presence.change(other, True, 1_234)
        answer = await chat.presence_service.query(me, [other])
        self.assertEqual(answer["users"], [hidden(other)])

    async def test_chat_blocks_are_asked(self) -> None:
        """The chat service's own BlockService decides (monkeypatched: the stub blocks nobody)."""
        me, friend = await self.users(2)
        await self.talk(me, friend)
        chat = self.stack.chat

        async def either(a: int, b: int) -> bool:
            return {a, b} == {me, friend}

        assert isinstance(self, TestCase)
        self.patch(chat.blocks, "either", either)
        self.patch(chat.blocks, "either_now", lambda a, b: None)
        self.stack.presence.online_users.add(friend)
        self.assertEqual(
            (await chat.presence_service.query(me, [friend]))["users"], [hidden(friend)]
        )
        self.assertEqual(await chat.presence_service.typing(me, friend, True), {})
        self.assertEqual(self.stack.presence.take(friend, "typing"), [])


class EmbeddedPresenceTests(PresenceContract, TestCase):
    backend = "embedded"


class MariaDBPresenceTests(PresenceContract, TestCase):
    backend = "redis"


class RegistryTransitionTests(SynchronousTestCase):
    """A single node's registry reports its users' first and last connection."""

    def test_first_and_last(self) -> None:
        registry = LocalRegistry(max_online=2)
        changes: list[tuple[int, bool, int, bool]] = []
        gone: list[tuple[int, Link]] = []
        registry.on_change(lambda *change: changes.append(change))
        registry.on_link_gone(lambda uid, link: gone.append((uid, link)))
        phone, desk, tablet = Link(7, "phone"), Link(7, "desk"), Link(7, "tab")
        registry.login(7, phone)
        registry.login(7, desk)
        self.assertEqual(changes, [(7, True, 0, True)])
        registry.login(7, tablet)  # beyond max_online: one goes, the user stays
        self.assertEqual(len(gone), 1)
        for link in (phone, desk, tablet):
            registry.logout(7, link)
        self.assertEqual(changes, [(7, True, 0, True), (7, False, 0, True)])
        self.assertEqual(len(gone), 3)

    def test_replaced_device(self) -> None:
        registry = LocalRegistry()
        changes: list[Any] = []
        registry.on_change(lambda *change: changes.append(change))
        old, new = Link(7, "phone"), Link(7, "phone")
        registry.login(7, old)
        registry.login(7, new)
        registry.logout(7, old)  # its close comes after the replacement
        self.assertEqual(changes, [(7, True, 0, True)])
        self.assertEqual(old.kicked, ["replaced"])


class FrameTests(SynchronousTestCase):
    def parse(self, **fields: Any) -> frames.Request:
        return frames.parse_request({"id": 1, **fields})

    def code(self, **fields: Any) -> str:
        with self.assertRaises(ImError) as e:
            self.parse(**fields)
        return str(e.exception.code)

    def test_presence(self) -> None:
        self.assertEqual(self.parse(t="presence", uids=[1, 2]), frames.GetPresence(1, (1, 2)))
        self.assertEqual(self.code(t="presence", uids=[]), "invalid")
        self.assertEqual(self.code(t="presence", uids=list(range(1, 102))), "too_large")
        self.assertEqual(self.code(t="presence"), "invalid")

    def test_watch(self) -> None:
        self.assertEqual(self.parse(t="watch", uids=[]), frames.Watch(1, ()))
        self.assertEqual(len(self.parse(t="watch", uids=list(range(1, 501))).uids), 500)  # type: ignore[attr-defined]
        self.assertEqual(self.code(t="watch", uids=list(range(1, 502))), "too_large")
        self.assertEqual(self.code(t="watch", uids=["1"]), "invalid")
        self.assertEqual(self.code(t="watch"), "invalid")

    def test_typing(self) -> None:
        self.assertEqual(self.parse(t="typing", to=2, active=True), frames.Typing(1, 2, True))
        self.assertEqual(self.code(t="typing", to=2, active=1), "invalid")
        self.assertEqual(self.code(t="typing", to=2), "invalid")
        self.assertEqual(self.code(t="typing", active=False), "invalid")

    def test_set_profile(self) -> None:
        self.assertEqual(
            self.parse(t="set_profile", presence="nobody"),
            frames.SetProfile(1, None, None, "nobody"),
        )
        self.assertEqual(self.code(t="set_profile", presence="friends"), "invalid")
        self.assertEqual(self.code(t="set_profile", presence=1), "invalid")
        self.assertEqual(self.code(t="set_profile"), "invalid")
