"""
Blocking (docs/protocol.md, "Blocking") in the business layer, on both
backends: block / unblock idempotent, limits and errors, sends refused both
ways with C{forbidden} (history kept), unblock lets sends through, the
C{blocked} pages, the other devices' push, the node cache (no SQL per send
on a hit, one load per miss, sends kept in order while it loads, changes
during a load, the refresh that finds a lost broadcast); on MariaDB + Redis
also two nodes: a block on one refuses a send on the other shortly after.
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver.chat.blocks import BlockService
from imserver.config import LimitsConfig, parse_config
from imserver.errors import ErrorCode, ImError
from imserver.services.cluster import ClusterPresence
from imserver.services.registry import LocalRegistry
from imserver.storage.hot.bus import RedisBus
from imserver.storage.hot.connection import RedisConnection
from imserver.storage.sql.database import Database, Txn
from imserver.storage.sql.engines import create_engine
from imserver.wire import frames
from tests.harness import fresh_prefix, shared_redis
from tests.stack import Stack, make_stack
from tests.support import eventually, reactor, within

_uids = itertools.count(310_000)


@attrs.define(eq=False)
class Link:
    """A device's connection, as RecordingPresence needs it."""

    uid: int
    device: str
    connected_at: int = 0
    device_id: int = 0
    pushes: list[dict[str, Any]] = attrs.Factory(list)

    def push(self, frame: Any) -> None:
        self.pushes.append(dict(frame))

    def kick(self, reason: str) -> None:
        pass


def _insert_block_txn(txn: Txn, uid: int, other: int) -> None:
    txn.execute("INSERT INTO t_block (uid, blockedUid, createdAt) VALUES (?, ?, 0)", (uid, other))


class BlocksContract:
    backend = ""

    async def stack(self, **kw: Any) -> Stack:
        assert isinstance(self, TestCase)
        return await make_stack(self, self.backend, **kw)

    async def users(self, stack: Stack, n: int) -> list[int]:
        uids = [next(_uids) for _ in range(n)]
        for uid in uids:
            await stack.store.ensure_user(uid)
        return uids

    async def refused(self, d: Any, code: ErrorCode) -> ImError:
        """C{d} (a call that raises, or a Deferred or coroutine that fails) fails with C{code}."""
        assert isinstance(self, TestCase)
        try:
            result = d() if callable(d) else d
            if isinstance(result, Deferred) or hasattr(result, "__await__"):
                await result
        except ImError as e:
            self.assertEqual(e.code, code, e)
            return e
        self.fail(f"expected {code}")

    async def sent(self, stack: Stack, a: int, b: int, cid: str) -> dict[str, Any]:
        reply: dict[str, Any] = await stack.chat.send(a, b, cid, "text", "hi")
        return reply

    # -- the ops -------------------------------------------------------------------

    async def test_block_and_unblock_are_idempotent(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        blocks = stack.chat.blocks
        a, b = await self.users(stack, 2)
        self.assertEqual(await blocks.block(a, b), {})
        self.assertEqual(await blocks.block(a, b), {})
        self.assertEqual(await blocks.blocked(a, 0, 100), {"uids": [b], "more": False})
        self.assertEqual(await blocks.blocked(b, 0, 100), {"uids": [], "more": False})
        self.assertTrue(await blocks.either(a, b))
        self.assertTrue(await blocks.either(b, a))
        self.assertEqual(await blocks.unblock(a, b), {})
        self.assertEqual(await blocks.unblock(a, b), {})
        self.assertEqual(await blocks.blocked(a, 0, 100), {"uids": [], "more": False})
        self.assertFalse(await blocks.either(a, b))
        # Blocking each other: two rows, one unblock leaves the other.
        await blocks.block(a, b)
        await blocks.block(b, a)
        await blocks.unblock(a, b)
        self.assertTrue(await blocks.either(a, b))
        self.assertEqual(await blocks.blocked(b, 0, 100), {"uids": [a], "more": False})

    async def test_errors_and_the_limit(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack(limits=LimitsConfig(max_blocks=3))
        blocks = stack.chat.blocks
        a, *others = await self.users(stack, 5)
        await self.refused(blocks.block(a, a), ErrorCode.INVALID)
        await self.refused(blocks.unblock(a, a), ErrorCode.INVALID)
        await self.refused(blocks.block(a, next(_uids)), ErrorCode.NO_SUCH_USER)
        await self.refused(blocks.block(next(_uids), a), ErrorCode.NO_SUCH_USER)
        # Unblocking someone unknown (or not blocked) changes nothing and is fine.
        self.assertEqual(await blocks.unblock(a, next(_uids)), {})
        for other in others[:3]:
            await blocks.block(a, other)
        await self.refused(blocks.block(a, others[3]), ErrorCode.TOO_LARGE)
        # At the limit, blocking one already blocked is still fine; room again after an unblock.
        await blocks.block(a, others[0])
        await blocks.unblock(a, others[0])
        await blocks.block(a, others[3])
        page = await blocks.blocked(a, 0, 100)
        self.assertEqual(page["uids"], sorted(others[1:4]))
        # Nothing of a refused block was kept, nor broadcast.
        self.assertFalse(await blocks.either(a, a + 10_000_000))
        told = [data for kind, data in stack.presence.broadcasts if kind == "block"]
        self.assertNotIn([a, a, True], told)

    async def test_blocked_pages(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        blocks = stack.chat.blocks
        a, *others = await self.users(stack, 8)
        for other in reversed(others):
            await blocks.block(a, other)
        pages = []
        after = 0
        while True:
            page = await blocks.blocked(a, after, 3)
            pages.append(page["uids"])
            if not page["more"]:
                break
            after = page["uids"][-1]
        self.assertEqual(pages, [sorted(others)[:3], sorted(others)[3:6], sorted(others)[6:]])
        self.assertEqual(await blocks.blocked(a, max(others), 3), {"uids": [], "more": False})

    # -- sends ----------------------------------------------------------------------

    async def test_sends_are_refused_both_ways_and_history_stays(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        chat = stack.chat
        a, b, c = await self.users(stack, 3)
        first = await self.sent(stack, a, b, "before")
        await self.sent(stack, b, a, "reply")
        await stack.settle()
        await chat.blocks.block(b, a)
        for sender, to, cid in ((a, b, "x1"), (b, a, "x2")):
            e = await self.refused(
                lambda s=sender, t=to, c=cid: chat.send(s, t, c, "text", "no"), ErrorCode.FORBIDDEN
            )
            self.assertIn("blocked", e.message)
        self.assertEqual(chat.blocks.refused, 2)
        # Others are not affected.
        await self.sent(stack, a, c, "to c")
        await self.sent(stack, c, b, "to b")
        await stack.settle()
        # History stays, for both.
        for uid, peer in ((a, b), (b, a)):
            history = await chat.history(uid, peer, None, None, 20)
            self.assertEqual([m["cid"] for m in history["msgs"]], ["reply", "before"])
        pending = await chat.sync(b, 100, 0, a)
        self.assertEqual([m["msg_id"] for m in pending["msgs"]], [first["msg_id"]])
        await chat.blocks.unblock(b, a)
        await self.sent(stack, a, b, "after")
        await self.sent(stack, b, a, "after too")
        await stack.settle()
        history = await chat.history(a, b, None, None, 20)
        self.assertEqual(
            [m["cid"] for m in history["msgs"]], ["after too", "after", "reply", "before"]
        )

    async def test_a_miss_loads_once_then_sends_ask_no_sql(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        blocks = stack.chat.blocks
        a, b, c = await self.users(stack, 3)
        self.assertIsNone(blocks.either_now(a, b))
        await self.sent(stack, a, b, "m1")
        self.assertEqual(blocks.loaded, 1)
        # Both users were loaded: their sends to each other need nothing more.
        self.assertIs(blocks.either_now(b, a), False)
        self.assertIsNone(blocks.either_now(b, c))
        await self.sent(stack, a, c, "first to c")
        self.assertEqual(blocks.loaded, 2)  # c only
        for i in range(20):
            await self.sent(stack, a, b, f"a{i}")
            await self.sent(stack, b, a, f"b{i}")
            await self.sent(stack, a, c, f"c{i}")
        self.assertEqual(blocks.loaded, 2)
        transactions = stack.store.db.transactions
        self.assertIs(blocks.for_send(a, b, reactor.seconds()), False)
        self.assertEqual(stack.store.db.transactions, transactions)

    async def test_a_block_found_by_a_load_refuses_the_send(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        await stack.store.db.run("t", _insert_block_txn, a, b)
        # Not cached: send fails through its Deferred, after the load.
        d = stack.chat.send(b, a, "c1", "text", "hi")
        self.assertIsInstance(d, Deferred)
        await self.refused(d, ErrorCode.FORBIDDEN)
        # Now cached: refused at once.
        self.assertRaises(ImError, stack.chat.send, a, b, "c2", "text", "hi")

    async def test_sends_waiting_for_a_load_keep_their_order(self) -> None:
        """
        Sends that come while blocks load (a sender's to several peers, one
        known here already, and other senders', known or not) are committed
        in the order sent: their msg_ids increase in that order, as they do
        without blocks (tests/test_properties.py checks it too).
        """
        assert isinstance(self, TestCase)
        stack = await self.stack()
        chat = stack.chat
        a, b, c, d, e, f = await self.users(stack, 6)
        await chat.blocks.either(c, d)  # c and d known here, the others not
        replies = [
            chat.send(a, b, "1", "text", "x"),
            chat.send(a, c, "2", "text", "x"),
            chat.send(e, f, "3", "text", "x"),
            chat.send(c, d, "4", "text", "x"),
            chat.send(a, b, "5", "text", "x"),
            chat.send(f, e, "6", "text", "x"),
            chat.send(a, c, "7", "text", "x"),
        ]
        self.assertEqual(chat.blocks.queued_sends, 7)
        # A drain waits for them too (their commits, their fan-outs).
        await chat.drain()
        self.assertTrue(all(d.called for d in replies))
        results = await gatherResults(replies)
        ids = [r["msg_id"] for r in results]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(chat.blocks.loaded, 3)
        self.assertEqual(chat.blocks.queued_sends, 0)
        # Known now: no wait.
        self.assertNotIsInstance(chat.blocks.for_send(e, a, reactor.seconds()), Deferred)

    async def test_a_load_failure_fails_the_waiting_sends(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        real = stack.chat.blocks.sql.load

        async def down(uids: Any, background: bool = False) -> Any:
            raise ImError(ErrorCode.UNAVAILABLE, "the database is unavailable")

        stack.chat.blocks.sql.load = down  # type: ignore[method-assign]
        await self.refused(stack.chat.send(a, b, "c1", "text", "hi"), ErrorCode.UNAVAILABLE)
        stack.chat.blocks.sql.load = real  # type: ignore[method-assign]
        await self.sent(stack, a, b, "c1")

    async def test_a_change_during_a_load_is_not_lost(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        blocks = stack.chat.blocks
        a, b = await self.users(stack, 2)
        asked = Deferred.fromCoroutine(blocks.either(a, b))
        # Committed and heard (another node's broadcast) while the query runs.
        blocks._heard([b, a, True])
        self.assertTrue(await asked)
        self.assertIs(blocks.either_now(a, b), True)

    async def test_the_refresh_finds_a_lost_broadcast(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        told: list[tuple[int, int, bool]] = []
        blocks = BlockService(
            store=stack.store,
            presence=stack.presence,
            clock=reactor,
            max_blocks=10,
            refresh_seconds=0.0,
        )
        self.addCleanup(blocks.stop)
        blocks.on_change(lambda *change: told.append(change))
        a, b, c, d = await self.users(stack, 4)
        self.assertFalse(await blocks.either(a, b))
        self.assertFalse(await blocks.either(c, d))
        self.assertEqual(blocks.loaded, 2)
        # Another node blocked; its broadcast never came.
        await stack.store.db.run("t", _insert_block_txn, a, b)
        # The stale entries answer, and wait for the next refresh.
        self.assertIs(blocks.either_now(a, b), False)
        self.assertIs(blocks.for_send(c, d, reactor.seconds()), False)
        self.assertIs(blocks.either_now(d, c), False)
        await eventually(lambda: blocks.loaded > 2)
        # One load for the three stale users (a, c, d: b was not used).
        self.assertEqual(blocks.loaded, 3)
        await eventually(lambda: blocks.either_now(a, b))
        self.assertEqual(told, [(a, b, True)])
        # a's entry (its outgoing blocks) holds it.
        self.assertIn(b, blocks._cache[a][0])

    async def test_the_cache_is_bounded(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        blocks = BlockService(
            store=stack.store, presence=stack.presence, clock=reactor, max_blocks=10, cache_size=4
        )
        uids = await self.users(stack, 6)
        for i in range(0, 6, 2):
            self.assertFalse(await blocks.either(uids[i], uids[i + 1]))
        # The least recently used went first.
        self.assertEqual(list(blocks._cache), uids[2:])
        self.assertIsNone(blocks.either_now(uids[0], uids[1]))

    async def test_a_user_blocked_by_many_is_an_empty_entry(self) -> None:
        """
        Only outgoing blocks are cached (review finding 7): a user blocked by
        many holds nothing of them; each blocker's entry answers for its pair.
        """
        assert isinstance(self, TestCase)
        stack = await self.stack()
        blocks = stack.chat.blocks
        spammer, x, *blockers = await self.users(stack, 32)
        for u in blockers:
            await stack.store.db.run("t", _insert_block_txn, u, spammer)
        self.assertFalse(await blocks.either(spammer, x))
        self.assertEqual(blocks._cache[spammer][0], frozenset())
        for u in blockers:
            self.assertTrue(await blocks.either(spammer, u))
            self.assertIs(blocks.for_send(spammer, u, reactor.seconds()), True)
            self.assertIs(blocks.either_now(u, spammer), True)
        self.assertEqual(blocks._cache[spammer][0], frozenset())
        self.assertEqual(sum(len(entry[0]) for entry in blocks._cache.values()), len(blockers))
        # Another node's unblock: the blocker's entry learns it.
        blocks._heard([blockers[0], spammer, False])
        self.assertIs(blocks.for_send(spammer, blockers[0], reactor.seconds()), False)
        self.assertIs(blocks.for_send(spammer, blockers[1], reactor.seconds()), True)

    def hang_loads(self, stack: Stack) -> list[tuple[Any, Deferred[Any]]]:
        """Make the blocks' loads wait until the test fires them: (uids, Deferred) each."""
        assert isinstance(self, TestCase)
        held: list[tuple[Any, Deferred[Any]]] = []
        real = stack.chat.blocks.sql.load

        async def hang(uids: Any, background: bool = False) -> Any:
            d: Deferred[Any] = Deferred()
            held.append((uids, d))
            return await d

        stack.chat.blocks.sql.load = hang  # type: ignore[method-assign]

        def restore() -> None:
            stack.chat.blocks.sql.load = real  # type: ignore[method-assign]

        self.addCleanup(restore)
        return held

    async def test_the_sends_waiting_for_loads_are_bounded(self) -> None:
        """Beyond max_queued waiting sends, a send is unavailable at once (finding 8)."""
        assert isinstance(self, TestCase)
        stack = await self.stack()
        chat = stack.chat
        a, b, c, d, e, f = await self.users(stack, 6)
        real = chat.blocks.sql.load
        chat.blocks.max_queued = 3
        held = self.hang_loads(stack)
        replies = [
            chat.send(a, b, "1", "text", "x"),
            chat.send(c, d, "2", "text", "x"),
            chat.send(a, b, "3", "text", "x"),
        ]
        self.assertEqual(chat.blocks.queued_sends, 3)
        e1 = self.assertRaises(ImError, chat.send, e, f, "4", "text", "x")
        self.assertEqual(e1.code, ErrorCode.UNAVAILABLE)
        self.assertEqual(chat.blocks.queued_sends, 3)
        for uids, held_d in held:
            held_d.callback(await real(uids))
        ids = [r["msg_id"] for r in await within(gatherResults(replies))]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(chat.blocks.queued_sends, 0)
        chat.blocks.sql.load = real  # type: ignore[method-assign]
        await self.sent(stack, e, f, "4")

    async def test_a_stalled_load_fails_its_sends_with_unavailable(self) -> None:
        """
        A load slower than load_timeout fails the sends waiting for it, and
        those behind it go on; its late answer is dropped (finding 8).
        """
        assert isinstance(self, TestCase)
        stack = await self.stack()
        chat = stack.chat
        a, b, c, d = await self.users(stack, 4)
        await chat.blocks.either(c, d)  # c and d known here
        chat.blocks.load_timeout = 0.2
        held = self.hang_loads(stack)
        stalled = chat.send(a, b, "1", "text", "x")
        behind = chat.send(c, d, "2", "text", "x")
        await within(self.refused(stalled, ErrorCode.UNAVAILABLE))
        self.assertIn("msg_id", await within(behind))
        self.assertEqual(chat.blocks.queued_sends, 0)
        # The stalled query answers at last (with a block the SQL never had): dropped.
        [(uids, held_d)] = held
        self.assertEqual(sorted(uids), sorted((a, b)))
        held_d.callback({a: frozenset({b}), b: frozenset()})
        self.assertIsNone(chat.blocks.either_now(a, b))
        # The next send loads again.
        again = chat.send(a, b, "1", "text", "x")
        self.assertEqual(len(held), 2)
        held[1][1].callback({a: frozenset(), b: frozenset()})
        self.assertIn("msg_id", await within(again))

    # -- telling -----------------------------------------------------------------------

    async def test_the_other_devices_are_told_and_the_nodes_too(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        presence = stack.presence
        a, b = await self.users(stack, 2)
        phone, laptop = Link(a, "phone"), Link(a, "laptop")
        await presence.login(a, phone)
        await presence.login(a, laptop)
        told: list[tuple[int, int, bool]] = []
        stack.chat.blocks.on_change(lambda *change: told.append(change))
        await stack.chat.blocks.block(a, b, phone)
        await stack.chat.blocks.unblock(a, b, phone)
        frames = [
            {"t": "block", "uid": b, "blocked": True},
            {"t": "block", "uid": b, "blocked": False},
        ]
        self.assertEqual(presence.take(a, "block"), frames)
        self.assertEqual(
            [(f, link) for _, f, link in presence.excluded],
            [(frames[0], phone), (frames[1], phone)],
        )
        self.assertEqual(presence.take(b), [])
        self.assertEqual(presence.broadcasts, [("block", [a, b, True]), ("block", [a, b, False])])
        self.assertEqual(told, [(a, b, True), (a, b, False)])

    async def test_broadcasts_heard(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        blocks = stack.chat.blocks
        a, b = await self.users(stack, 2)
        told: list[tuple[int, int, bool]] = []
        blocks.on_change(lambda *change: told.append(change))
        self.assertFalse(await blocks.either(a, b))
        for bad in (None, [1, 2], [1, "2", True], [1, 2, 1], {"a": 1}):
            blocks._heard(bad)
        self.assertEqual(told, [])
        self.flushLoggedErrors()
        blocks._heard([a, b, True])
        self.assertIs(blocks.either_now(b, a), True)
        self.assertRaises(ImError, stack.chat.send, b, a, "c", "text", "hi")
        blocks._heard([a, b, False])
        self.assertIs(blocks.either_now(b, a), False)
        # A listener that fails does not stop the others.
        blocks.on_change(lambda *change: 1 / 0)  # type: ignore[func-returns-value]
        blocks._heard([a, b, True])
        self.assertEqual(told, [(a, b, True), (a, b, False), (a, b, True)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class EmbeddedBlocksTests(BlocksContract, TestCase):
    backend = "embedded"


class MariaDBBlocksTests(BlocksContract, TestCase):
    backend = "redis"

    async def cluster(self, stack: Stack, node_id: int, prefix: str) -> ClusterPresence:
        """A ClusterPresence for this node, its BlockService built on it."""
        target = parse_config({"storage": {"redis": shared_redis().url}}).storage.redis
        assert target is not None
        connection = RedisConnection(reactor, target, timeout=1.0)
        await connection.start()
        presence = ClusterPresence(
            reactor, LocalRegistry(), RedisBus(connection, prefix), node_id, ttl_seconds=30
        )
        presence.start()

        async def stop() -> None:
            await presence.stop()
            await connection.stop()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        await eventually(lambda: presence.pubsub_state() == "ok")
        stack.chat.blocks = BlockService(
            store=stack.store, presence=presence, clock=reactor, max_blocks=100
        )
        return presence

    async def test_a_block_on_one_node_refuses_a_send_on_another(self) -> None:
        one = await self.stack(node_id=1)
        engine = create_engine(one.store.db.engine.target)  # type: ignore[attr-defined]
        db = Database(reactor, engine, name="node2", max_connections=8)
        two = await make_stack(self, "redis", node_id=2, db=db)
        prefix = fresh_prefix()
        await self.cluster(one, 1, prefix)
        await self.cluster(two, 2, prefix)
        told: list[tuple[int, int, bool]] = []
        two.chat.blocks.on_change(lambda *change: told.append(change))
        a, b = await self.users(one, 2)
        # Node two knows the pair (not blocked): its sends ask no SQL.
        await self.sent(two, b, a, "hello")
        self.assertIs(two.chat.blocks.either_now(a, b), False)
        await one.chat.blocks.block(a, b)
        await eventually(lambda: two.chat.blocks.either_now(a, b), timeout=5)
        self.assertEqual(told, [(a, b, True)])
        self.assertRaises(ImError, two.chat.send, b, a, "refused", "text", "hi")
        await one.chat.blocks.unblock(a, b)
        await eventually(lambda: two.chat.blocks.either_now(a, b) is False, timeout=5)
        await within(self.sent(two, b, a, "again"))
        self.assertEqual(two.chat.blocks.loaded, 1)


class BlockFramesTests(SynchronousTestCase):
    """The ops' fields: bad input is invalid or too_large, never a crash."""

    def parse(self, **fields: Any) -> Any:
        return frames.parse_request({"id": 1, **fields})

    def code(self, **fields: Any) -> str:
        try:
            self.parse(**fields)
        except ImError as e:
            return str(e.code)
        raise AssertionError(f"{fields} parsed")

    def test_block_and_unblock(self) -> None:
        for op, kind in (("block", frames.Block), ("unblock", frames.Unblock)):
            self.assertEqual(self.parse(t=op, uid=7), kind(id=1, uid=7))
            for bad in (0, -1, "7", 1.0, True, None, [7]):
                self.assertEqual(self.code(t=op, uid=bad), "invalid")
            self.assertEqual(self.code(t=op), "invalid")
            self.assertEqual(self.code(t=op, uid=2**63), "too_large")

    def test_blocked(self) -> None:
        self.assertEqual(self.parse(t="blocked"), frames.Blocked(id=1, after=0, limit=100))
        self.assertEqual(
            self.parse(t="blocked", after=9, limit=500), frames.Blocked(id=1, after=9, limit=500)
        )
        self.assertEqual(self.code(t="blocked", limit=501), "too_large")
        for fields in ({"limit": 0}, {"after": -1}, {"after": "1"}, {"limit": 2.0}):
            self.assertEqual(self.code(t="blocked", **fields), "invalid")
