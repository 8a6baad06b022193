"""
The storage contract: the same tests on the embedded default (SQLite +
in-process hot store) and on MariaDB + Redis, through the business layer
where that is natural and through the store and hot store where the test is
about keeping the hot copy equal to SQL.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from imserver.config import LimitsConfig
from imserver.errors import ErrorCode, ImError
from imserver.storage.hot.interface import GONE_MS, LIVE_MS, WINDOW_SIZE
from imserver.storage.model import Committed, Duplicate
from imserver.storage.sql import queries as q
from tests.harness import RedisServer
from tests.stack import RecordingTxn, Stack, make_stack
from tests.support import eventually

_uids = itertools.count(1000)
BIG = LimitsConfig(send_per_second=1e6, send_burst=10**6, recall_seconds=3600)


class StoreContract:
    backend = ""

    async def stack(self, **kw: Any) -> Stack:
        kw.setdefault("limits", BIG)
        return await make_stack(self, self.backend, **kw)

    async def users(self, stack: Stack, n: int) -> list[int]:
        uids = [next(_uids) for _ in range(n)]
        for uid in uids:
            await stack.chat.login(uid)
        return uids

    async def sql_truth(self, stack: Stack, uid: int) -> dict[str, Any]:
        """What SQL says about a user, for comparing with the hot answers."""
        db = stack.store.db
        pending = await db.run("t", q.pending_txn, uid, 0, 10_000, None)
        unread = await db.run("t", q.unread_txn, uid)
        convs = await db.run("t", q.convs_txn, uid, None, 1000)
        return {
            "pending": [i for i, _ in pending],
            "unread": sorted(unread),
            "convs": [(r.session_id, r.last_msg_id, r.unread) for r in convs],
        }

    async def served(self, stack: Stack, uid: int) -> dict[str, Any]:
        """What the service answers about a user."""
        chat = stack.chat
        sync = await chat.sync(uid, 500, 0, None)
        unread = await chat.unread(uid)
        convs = await chat.convs(uid, 100, None)
        return {
            "pending": [m["msg_id"] for m in sync["msgs"]],
            "unread": sorted((s["session_id"], s["count"]) for s in unread["sessions"]),
            "convs": [(c["session_id"], c["last_msg_id"], c["unread"]) for c in convs["convs"]],
        }

    async def assertConsistent(self, stack: Stack, *uids: int) -> None:
        await stack.settle()
        for uid in uids:
            self.assertEqual(await self.served(stack, uid), await self.sql_truth(stack, uid))

    # -- sending ---------------------------------------------------------------

    async def test_dedupe_and_refusals(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        first = await stack.chat.send(a, b, "c1", "text", "hi")
        again = await stack.chat.send(a, b, "c1", "text", "something else")
        self.assertEqual(again, {**first, "dup": True})
        with self.assertRaises(ImError) as e:
            await stack.chat.send(a, 10**15, "c2", "text", "x")
        self.assertEqual(e.exception.code, ErrorCode.NO_SUCH_USER)
        reply = await stack.chat.send(b, a, "c1", "text", "same cid, other sender")
        self.assertEqual(reply["session_id"], first["session_id"])
        self.assertFalse(reply["dup"])

    async def test_duplicates_inside_one_batch(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        results = await gatherResults(
            [stack.store.commit(_new(stack, a, b, cid)) for cid in ("x", "y", "x", "x")]
        )
        self.assertIsInstance(results[0], Committed)
        self.assertIsInstance(results[1], Committed)
        for dup in results[2:]:
            self.assertIsInstance(dup, Duplicate)
            self.assertEqual(dup.msg_id, results[0].message.msg_id)

    # -- the hot copy ------------------------------------------------------------

    async def test_consistent_through_a_conversation(self) -> None:
        stack = await self.stack()
        a, b, c = await self.users(stack, 3)
        for i in range(5):
            await stack.chat.send(a, b, f"ab{i}", "text", f"m{i}")
            await stack.chat.send(c, b, f"cb{i}", "text", f"m{i}")
        await self.assertConsistent(stack, a, b, c)
        sync = await stack.chat.sync(b, 3, 0, None)
        await stack.chat.ack(b, [m["msg_id"] for m in sync["msgs"]])
        session = sync["msgs"][0]["session_id"]
        await stack.chat.read(b, session, sync["msgs"][-1]["msg_id"])
        r = await stack.chat.send(a, b, "late", "text", "x")
        await stack.chat.recall(a, r["msg_id"])
        await self.assertConsistent(stack, a, b, c)

    async def test_flush_rebuilds_from_sql(self) -> None:
        stack = await self.stack()
        a, b, c = await self.users(stack, 3)
        for i in range(4):
            await stack.chat.send(a, b, f"a{i}", "text", "x")
            await stack.chat.send(b, c, f"b{i}", "text", "x")
        await self.assertConsistent(stack, a, b, c)
        before = {uid: await self.served(stack, uid) for uid in (a, b, c)}
        await stack.flush_hot()
        for uid in (a, b, c):
            self.assertEqual(await self.served(stack, uid), before[uid])
        # And it keeps working after the rebuild.
        await stack.chat.send(c, a, "after", "text", "x")
        await self.assertConsistent(stack, a, b, c)

    async def test_message_committed_during_a_load_is_kept(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        first = await stack.chat.send(a, b, "before", "text", "x")
        await stack.settle()
        token = await stack.hot.load_begin(b)
        snapshot = await stack.store.db.run("s", q.snapshot_txn, b)
        during = await stack.chat.send(a, b, "during", "text", "x")  # after the snapshot
        await stack.settle()
        self.assertTrue(await stack.hot.load_finish(b, token, snapshot))
        pending = await stack.hot.pending(b, 0, 10, None)
        self.assertEqual(pending, [(first["msg_id"], a), (during["msg_id"], a)])
        await self.assertConsistent(stack, b)

    async def test_one_ack_batch_clears_its_users_rows_in_one_delete(self) -> None:
        """Acks of several users in one batch: one DELETE for all of them
        (not one per user), and it clears only each acking user's own rows."""
        stack = await self.stack()
        a, b, c, d, e, f = await self.users(stack, 6)
        ab = (await stack.chat.send(a, b, "ab", "text", "x"))["msg_id"]
        cd = (await stack.chat.send(c, d, "cd", "text", "x"))["msg_id"]
        ef = (await stack.chat.send(e, f, "ef", "text", "x"))["msg_id"]
        await stack.settle()
        seen: list[list[str]] = []

        def recorded(txn: Any, requests: Any) -> Any:
            rec = RecordingTxn(txn)
            seen.append(rec.sql)
            return q.ack_txn(rec, requests)

        removed = await stack.store.db.run("ack", recorded, [(b, [ab, ef]), (d, [cd]), (a, [ab])])
        self.assertEqual([[m for m, _, _ in r] for r in removed], [[ab], [cd], []])
        deletes = [s for s in seen[-1] if s.startswith("DELETE FROM t_pending")]
        self.assertEqual(len(deletes), 1)
        for uid, pending in ((b, []), (d, []), (f, [ef])):
            rows = await stack.store.db.run("t", q.pending_txn, uid, 0, 10, None)
            self.assertEqual([i for i, _ in rows], pending)

    async def test_ack_during_a_load_is_kept(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        r = await stack.chat.send(a, b, "one", "text", "x")
        await stack.settle()
        token = await stack.hot.load_begin(b)
        snapshot = await stack.store.db.run("s", q.snapshot_txn, b)  # still pending here
        await stack.chat.ack(b, [r["msg_id"]])
        self.assertTrue(await stack.hot.load_finish(b, token, snapshot))
        self.assertEqual(await stack.hot.pending(b, 0, 10, None), [])
        self.assertEqual((await stack.chat.sync(b, 10, 0, None))["msgs"], [])

    async def test_a_newer_load_supersedes_an_older_one(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        await stack.chat.send(a, b, "one", "text", "x")
        await stack.settle()
        old = await stack.hot.load_begin(b)
        old_snapshot = await stack.store.db.run("s", q.snapshot_txn, b)
        new = await stack.hot.load_begin(b)
        self.assertFalse(await stack.hot.load_finish(b, old, old_snapshot))
        self.assertIsNone(await stack.hot.pending(b, 0, 10, None))
        snapshot = await stack.store.db.run("s", q.snapshot_txn, b)
        self.assertTrue(await stack.hot.load_finish(b, new, snapshot))
        self.assertEqual(len(await stack.hot.pending(b, 0, 10, None)), 1)

    async def test_late_fanout_cannot_resurrect_an_acked_message(self) -> None:
        """An acked id is tombstoned: a fan-out of it arriving afterwards (even
        onto a copy loaded later) does not make it pending again."""
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        r = await stack.chat.send(a, b, "x", "text", "x")
        await stack.settle()
        await stack.chat.ack(b, [r["msg_id"]])  # b has no hot copy yet
        await stack.settle()  # the ack's hot step runs after its reply
        self.assertEqual((await stack.chat.sync(b, 10, 0, None))["msgs"], [])  # loads it
        [message] = (await stack.store.messages([r["msg_id"]])).values()
        await stack.hot.fanout([(message, 3)], [])  # the late fan-out
        self.assertEqual(await stack.hot.pending(b, 0, 10, None), [])
        self.assertEqual((await stack.chat.offline_summary(b))["senders"], [])

    async def test_fanout_older_than_the_tombstones_reloads(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        r = await stack.chat.send(a, b, "x", "text", "x")
        await stack.chat.sync(b, 10, 0, None)
        [message] = (await stack.store.messages([r["msg_id"]])).values()
        await stack.hot.fanout([(message, GONE_MS + 1)], [])
        self.assertIsNone(await stack.hot.pending(b, 0, 10, None))
        self.assertEqual(len((await stack.chat.sync(b, 10, 0, None))["msgs"]), 1)

    async def test_fanout_onto_a_ready_copy_adds_without_reloading(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        await stack.chat.sync(b, 10, 0, None)
        loads = stack.store.loads
        for i in range(5):
            await stack.chat.send(a, b, f"n{i}", "text", "x")
            self.assertEqual(len((await stack.chat.sync(b, 10, 0, None))["msgs"]), i + 1)
        self.assertEqual(stack.store.loads, loads)

    async def test_late_fanout_drops_the_window(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        for i in range(3):
            await stack.chat.send(a, b, f"w{i}", "text", "x")
        await stack.settle()
        sid = stack.store.session_hint(a, b)
        assert sid is not None
        self.assertEqual(len(await stack.hot.window(sid, None, 10)), 3)
        [message] = (await stack.store.messages(await stack.hot.window(sid, None, 1))).values()
        await stack.hot.fanout([(message, LIVE_MS + 1)], [])
        self.assertEqual(await stack.hot.window(sid, None, 10), [])
        history = await stack.chat.history(a, b, None, None, 10)
        self.assertEqual(len(history["msgs"]), 3)

    async def test_history_across_the_window_edge(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        sent = []
        for i in range(WINDOW_SIZE + 30):
            sent.append(
                (await stack.chat.send(a if i % 2 else b, b if i % 2 else a, f"h{i}", "text", i))[
                    "msg_id"
                ]
            )
        recalled = sent[-5]
        await stack.chat.recall(a if (len(sent) - 5) % 2 else b, recalled)
        expected = [i for i in reversed(sent) if i != recalled]
        seen: list[int] = []
        before = None
        while True:
            page = await stack.chat.history(a, b, None, before, 37)
            seen += [m["msg_id"] for m in page["msgs"]]
            if not page["more"]:
                break
            before = page["msgs"][-1]["msg_id"]
        self.assertEqual(seen, expected)

    async def test_convs_last_message_after_recall(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        first = await stack.chat.send(a, b, "1", "text", "first")
        second = await stack.chat.send(a, b, "2", "text", "second")
        await stack.chat.recall(a, second["msg_id"])
        [conv] = (await stack.chat.convs(b, 10, None))["convs"]
        self.assertEqual(conv["last"]["msg_id"], first["msg_id"])
        self.assertEqual(conv["last_msg_id"], second["msg_id"])
        self.assertEqual(conv["unread"], 1)
        await stack.chat.recall(a, first["msg_id"])
        [conv] = (await stack.chat.convs(b, 10, None))["convs"]
        self.assertIsNone(conv["last"])
        self.assertEqual(conv["unread"], 0)

    async def test_read_is_monotonic_and_capped(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        ids = [(await stack.chat.send(a, b, f"r{i}", "text", "x"))["msg_id"] for i in range(4)]
        sid = stack.store.session_hint(a, b)
        assert sid is not None
        self.assertEqual((await stack.chat.read(b, sid, ids[2]))["unread"], 1)
        self.assertEqual((await stack.chat.read(b, sid, ids[0]))["unread"], 1)
        # Reading "the future" only reads what exists.
        self.assertEqual((await stack.chat.read(b, sid, 2**53 - 1))["unread"], 0)
        later = await stack.chat.send(a, b, "later", "text", "x")
        self.assertEqual((await stack.chat.unread(b))["total"], 1)
        self.assertEqual(later["session_id"], sid)
        await self.assertConsistent(stack, a, b)

    async def test_read_and_recall_permissions(self) -> None:
        stack = await self.stack()
        a, b, c = await self.users(stack, 3)
        r = await stack.chat.send(a, b, "p", "text", "x")
        cases = [
            (stack.chat.read(c, r["session_id"], r["msg_id"]), ErrorCode.FORBIDDEN),
            (stack.chat.read(a, 12345, r["msg_id"]), ErrorCode.NOT_FOUND),
            (stack.chat.recall(b, r["msg_id"]), ErrorCode.FORBIDDEN),
            (stack.chat.recall(c, r["msg_id"]), ErrorCode.FORBIDDEN),
            (stack.chat.recall(a, 777), ErrorCode.NOT_FOUND),
            (stack.chat.history(c, None, r["session_id"], None, 10), ErrorCode.FORBIDDEN),
            (stack.chat.history(c, None, 999, None, 10), ErrorCode.NOT_FOUND),
        ]
        for call, code in cases:
            with self.assertRaises(ImError) as e:
                await call
            self.assertEqual(e.exception.code, code)


class EmbeddedStoreTests(StoreContract, TestCase):
    backend = "embedded"


class HealthTests(TestCase):
    async def test_the_circuit_state_comes_from_the_hot_store(self) -> None:
        """Store.health asks the hot store for its breaker's state (through
        IHotStore, not the Redis implementation's attributes)."""
        stack = await make_stack(self, "embedded")
        self.assertIsNone(stack.hot.circuit_state())
        self.assertEqual(await stack.store.health(), {"sql": "ok", "redis": "embedded"})
        self.patch(stack.hot, "circuit_state", lambda: "open")
        health = await stack.store.health()
        self.assertEqual(health["redis_circuit"], "open")


class RedisStoreTests(StoreContract, TestCase):
    backend = "redis"

    async def test_two_nodes_first_use_and_dedupe(self) -> None:
        """Two stores on one database (two nodes): one session per pair, one
        message per (sender, cid), however the first sends race."""
        one = await self.stack(node_id=1)
        # Same database, separate caches and batchers: another node.
        other = await make_stack(self, "redis", limits=BIG, node_id=2, db=one.store.db)
        a, b = await self.users(one, 2)
        replies = await gatherResults(
            [
                ensureDeferred(one.chat.send(a, b, "race-1", "text", "from node 1")),
                ensureDeferred(other.chat.send(b, a, "race-2", "text", "from node 2")),
                ensureDeferred(one.chat.send(a, b, "same", "text", "x")),
                ensureDeferred(other.chat.send(a, b, "same", "text", "x")),
            ]
        )
        self.assertEqual(len({r["session_id"] for r in replies}), 1)
        self.assertEqual(replies[2]["msg_id"], replies[3]["msg_id"])
        self.assertEqual(sorted(r["dup"] for r in replies[2:]), [False, True])


class RedisOutageTests(TestCase):
    """The hot store goes away and comes back: answers stay right."""

    timeout = 120

    async def test_outage_and_repair(self) -> None:
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        stack = await make_stack(self, "redis", limits=BIG, redis=redis)
        a, b = next(_uids), next(_uids)
        for uid in (a, b):
            await stack.chat.login(uid)
        await stack.chat.send(a, b, "before", "text", "x")
        await stack.chat.sync(b, 10, 0, None)

        redis.stop()
        during = [await stack.chat.send(a, b, f"d{i}", "text", "x") for i in range(3)]
        await stack.settle()
        self.assertIn(b, stack.store.suspect_users)
        sync = await stack.chat.sync(b, 10, 0, None)
        self.assertEqual(len(sync["msgs"]), 4)
        await stack.chat.ack(b, [during[0]["msg_id"]])
        self.assertEqual((await stack.chat.unread(b))["total"], 4)

        redis.start()  # empty: as after a restart without persistence
        await eventually(lambda: not stack.store.suspect_users, timeout=20)
        sync = await stack.chat.sync(b, 10, 0, None)
        self.assertEqual([m["msg_id"] for m in sync["msgs"]][1:], [r["msg_id"] for r in during[1:]])
        self.assertEqual((await stack.chat.unread(b))["total"], 4)
        self.assertIsNotNone(await stack.hot.pending(b, 0, 10, None))


def _new(stack: Stack, a: int, b: int, cid: str) -> Any:
    from imserver.storage.model import NewMessage, pack_body

    ids = stack.chat.ids
    msg_id = ids.next_id()
    return NewMessage(msg_id, a, b, cid, "text", pack_body("x"), 0, None, ids.next_id())
