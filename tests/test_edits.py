"""
edit, hide and clear (issue 11) in the business layer and storage, on both
backends: the rules and errors, the pushes and their seqs, what history,
sync, convs and unread show after them, catch-up's rendering of kinds 3-5,
and two nodes sharing the database and the hot store.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from imserver.config import LimitsConfig
from imserver.errors import ErrorCode, ImError
from imserver.services.ids import IdGenerator
from imserver.storage import edits as storage_edits
from imserver.storage.sql.database import Txn
from imserver.storage.sql.migrate import migrate
from tests.stack import RecordingTxn, Stack, make_stack
from tests.support import sleep

_uids = itertools.count(90_000)
BIG = LimitsConfig(send_per_second=1e6, send_burst=10**6, recall_seconds=3600)


def _age_txn(txn: Txn, msg_id: int, ms: int) -> None:
    txn.execute("UPDATE t_msg_record_list SET ts = ts - ? WHERE id = ?", (ms, msg_id))


def _pending_before_conv(sql: list[str]) -> tuple[int, int]:
    """(index of the t_pending DELETE, index of the first t_conv lock: UPDATE, FOR UPDATE)."""
    delete = next(i for i, x in enumerate(sql) if x.startswith("DELETE FROM t_pending"))
    conv = next(
        i
        for i, x in enumerate(sql)
        if x.startswith("UPDATE t_conv") or ("t_conv" in x and "FOR UPDATE" in x)
    )
    return delete, conv


class EditsContract:
    backend = ""

    async def stack(self, **kw: Any) -> Stack:
        assert isinstance(self, TestCase)
        kw.setdefault("limits", BIG)
        return await make_stack(self, self.backend, **kw)

    async def users(self, stack: Stack, n: int = 2) -> list[int]:
        uids = [next(_uids) for _ in range(n)]
        for uid in uids:
            await stack.chat.login(uid)
            stack.presence.online_users.add(uid)
        return uids

    async def refused(self, code: ErrorCode, call: Any) -> None:
        assert isinstance(self, TestCase)
        try:
            await call
        except ImError as e:
            self.assertEqual(e.code, code, e.message)
        else:
            self.fail(f"expected {code}")

    async def send(self, stack: Stack, a: int, b: int, body: Any, n: int = 1) -> list[int]:
        return [
            (await stack.chat.send(a, b, f"c{next(_uids)}", "text", body))["msg_id"]
            for _ in range(n)
        ]

    async def history(self, stack: Stack, uid: int, peer: int) -> list[dict[str, Any]]:
        return list((await stack.chat.history(uid, peer, None, None, 100))["msgs"])

    # -- edit --------------------------------------------------------------------

    async def test_edit_rules(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack(words=["badword"])
        a, b, c = await self.users(stack, 3)
        [m] = await self.send(stack, a, b, "hello")
        edits = stack.chat.edits
        await self.refused(ErrorCode.FORBIDDEN, edits.edit(b, m, "by the recipient"))
        await self.refused(ErrorCode.FORBIDDEN, edits.edit(c, m, "by an outsider"))
        await self.refused(ErrorCode.NOT_FOUND, edits.edit(a, m + 12345, "no such"))
        await self.refused(ErrorCode.CONTENT_BLOCKED, edits.edit(a, m, "a badword"))
        await self.refused(ErrorCode.TOO_LARGE, edits.edit(a, m, "x" * (BIG.max_body_bytes + 1)))
        [late] = await self.send(stack, a, b, "old")
        await stack.store.db.run("age", _age_txn, late, BIG.edit_seconds * 1000 + 1000)
        await self.refused(ErrorCode.TOO_LATE, edits.edit(a, late, "too late"))
        [gone] = await self.send(stack, a, b, "recalled")
        await stack.chat.recall(a, gone)
        await self.refused(ErrorCode.NOT_FOUND, edits.edit(a, gone, "recalled"))
        # Nothing of it changed the message.
        [first] = [x for x in await self.history(stack, b, a) if x["msg_id"] == m]
        self.assertEqual(first["body"], "hello")
        self.assertNotIn("edited", first)

    async def test_edit_is_pushed_and_read_everywhere(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        a, b = await self.users(stack)
        ids = await self.send(stack, a, b, "first", 3)
        await stack.settle()
        # Warm every hot path: windows, cached messages, convs, pending.
        self.assertEqual(len(await self.history(stack, b, a)), 3)
        await stack.chat.convs(b, 10, None)
        stack.presence.take(a)
        stack.presence.take(b)
        reply = await stack.chat.edits.edit(a, ids[-1], {"text": "second"})
        await stack.settle()
        self.assertGreater(reply["edited"], 0)
        [theirs] = stack.presence.take(b, "edit")
        [mine] = stack.presence.take(a, "edit")
        for frame in (theirs, mine):
            self.assertEqual(frame["body"], {"text": "second"})
            self.assertEqual(frame["edited"], reply["edited"])
            self.assertEqual(frame["msg_id"], ids[-1])
        self.assertEqual(mine["seq"], reply["seq"])
        self.assertEqual(theirs["seq"], await stack.store.head(b))
        for uid, peer in ((a, b), (b, a)):
            [last, *_] = await self.history(stack, uid, peer)
            self.assertEqual((last["body"], last["edited"]), ({"text": "second"}, reply["edited"]))
            [conv] = (await stack.chat.convs(uid, 10, None))["convs"]
            self.assertEqual(conv["last"]["body"], {"text": "second"})
            self.assertEqual(conv["last"]["edited"], reply["edited"])
        synced = (await stack.chat.sync(b, 10, 0, None))["msgs"]
        self.assertEqual([x.get("edited", 0) for x in synced], [0, 0, reply["edited"]])
        self.assertEqual(synced[-1]["body"], {"text": "second"})

    async def test_edits_are_idempotent_and_ordered(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        a, b = await self.users(stack)
        [m] = await self.send(stack, a, b, "v0")
        same = await stack.chat.edits.edit(a, m, "v0")
        self.assertEqual(same, {"edited": 0})
        edited = []
        for i in range(1, 5):
            reply = await stack.chat.edits.edit(a, m, f"v{i}")
            edited.append(reply["edited"])
        self.assertEqual(edited, sorted(set(edited)))  # strictly increasing
        head = await stack.store.head(b)
        await stack.settle()
        stack.presence.take(b)
        again = await stack.chat.edits.edit(a, m, "v4")
        await stack.settle()
        self.assertEqual(again, {"edited": edited[-1]})
        self.assertEqual(await stack.store.head(b), head)  # no event
        # The retry still tells the devices (a lost first reply), without a seq.
        [told] = stack.presence.take(b, "edit")
        self.assertNotIn("seq", told)
        self.assertEqual(told["edited"], edited[-1])
        [last] = await self.history(stack, b, a)
        self.assertEqual((last["body"], last["edited"]), ("v4", edited[-1]))

    async def test_catchup_renders_edits_as_the_current_state(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        a, b = await self.users(stack)
        [m, gone] = await self.send(stack, a, b, "v0", 2)
        start = await stack.store.head(b)
        await stack.chat.edits.edit(a, m, "v1")
        await stack.chat.edits.edit(a, m, "v2")
        await stack.chat.edits.edit(a, gone, "edited, then recalled")
        await stack.chat.recall(a, gone)
        page = await stack.chat.catchup(b, 0, start, 100)
        kinds = [(e["t"], e.get("body")) for e in page["events"]]
        # Both edits show the message as it is now; the recalled one's edit is left out.
        self.assertEqual(kinds, [("edit", "v2"), ("edit", "v2"), ("recall", None)])
        self.assertEqual(page["seq"], await stack.store.head(b))
        seqs = [e["seq"] for e in page["events"]]
        self.assertEqual(seqs, sorted(seqs))

    # -- hide ----------------------------------------------------------------------

    async def test_hide_rules(self) -> None:
        stack = await self.stack()
        a, b, c = await self.users(stack, 3)
        [m] = await self.send(stack, a, b, "x")
        [other] = await self.send(stack, b, c, "y")
        hide = stack.chat.edits.hide
        await self.refused(ErrorCode.FORBIDDEN, hide(a, [m, other]))
        await self.refused(ErrorCode.NOT_FOUND, hide(a, [m, m + 12345]))
        sid = stack.store.session_hint(b, c)
        assert sid is not None
        await self.refused(ErrorCode.FORBIDDEN, stack.chat.edits.clear(a, sid))
        await self.refused(ErrorCode.NOT_FOUND, stack.chat.edits.clear(a, 12345))

    async def test_hide_is_per_user_and_counts_as_read(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        a, b = await self.users(stack)
        ids = await self.send(stack, a, b, "m", 4)
        await stack.settle()
        self.assertEqual((await stack.chat.unread(b))["total"], 4)
        await self.history(stack, b, a)  # warm
        stack.presence.take(b)
        reply = await stack.chat.edits.hide(b, [ids[1], ids[3]])
        await stack.settle()
        [told] = stack.presence.take(b, "hide")
        self.assertEqual(told, {"t": "hide", "msg_ids": [ids[1], ids[3]], "seq": reply["seq"]})
        self.assertEqual(stack.presence.broadcasts[-1], ("hidden", {"uid": b}))
        self.assertEqual([x["msg_id"] for x in await self.history(stack, b, a)], [ids[2], ids[0]])
        self.assertEqual(len(await self.history(stack, a, b)), 4)  # the peer keeps them
        self.assertEqual((await stack.chat.unread(b))["total"], 2)
        synced = (await stack.chat.sync(b, 10, 0, None))["msgs"]
        self.assertEqual([x["msg_id"] for x in synced], [ids[0], ids[2]])
        [conv] = (await stack.chat.convs(b, 10, None))["convs"]
        self.assertEqual((conv["last"]["msg_id"], conv["unread"]), (ids[2], 2))
        [conv] = (await stack.chat.convs(a, 10, None))["convs"]
        self.assertEqual(conv["last"]["msg_id"], ids[3])
        # Again (a retry whose reply was lost): nothing changes, but it answers and
        # tells as the first try did (the first try's push and broadcast may be lost).
        stack.presence.broadcasts.clear()
        self.assertEqual(await stack.chat.edits.hide(b, [ids[1]]), {"seq": reply["seq"]})
        await stack.settle()
        self.assertEqual(
            stack.presence.take(b, "hide"),
            [{"t": "hide", "msg_ids": [ids[1]], "seq": reply["seq"]}],
        )
        self.assertEqual(stack.presence.broadcasts, [("hidden", {"uid": b})])
        self.assertEqual((await stack.chat.unread(b))["total"], 2)
        # Reads recount without the hidden ones; a recall of a hidden one keeps unread right.
        sid = conv["session_id"]
        self.assertEqual((await stack.chat.read(b, sid, ids[0]))["unread"], 1)
        await stack.chat.recall(a, ids[3])
        self.assertEqual((await stack.chat.unread(b))["total"], 1)
        await stack.chat.recall(a, ids[2])
        self.assertEqual((await stack.chat.unread(b))["total"], 0)
        # The sender hides its own message too.
        await stack.chat.edits.hide(a, [ids[0]])
        self.assertEqual([x["msg_id"] for x in await self.history(stack, a, b)], [ids[1]])

    async def test_clear(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        a, b = await self.users(stack)
        ids = await self.send(stack, a, b, "m", 3)
        ids += await self.send(stack, b, a, "n", 1)
        await stack.settle()
        sid = stack.store.session_hint(a, b)
        assert sid is not None
        stack.presence.take(b)
        reply = await stack.chat.edits.clear(b, sid)
        await stack.settle()
        self.assertEqual(reply["up_to"], ids[-1])
        [told] = stack.presence.take(b, "clear")
        self.assertEqual(
            told, {"t": "clear", "session_id": sid, "up_to": ids[-1], "seq": reply["seq"]}
        )
        self.assertEqual(await self.history(stack, b, a), [])
        self.assertEqual(len(await self.history(stack, a, b)), 4)
        self.assertEqual((await stack.chat.unread(b))["total"], 0)
        self.assertEqual((await stack.chat.sync(b, 10, 0, None))["msgs"], [])
        [conv] = (await stack.chat.convs(b, 10, None))["convs"]
        self.assertIsNone(conv["last"])
        # A retry (its reply lost): the same answer, told again, broadcast again.
        stack.presence.broadcasts.clear()
        self.assertEqual(
            await stack.chat.edits.clear(b, sid), {"up_to": ids[-1], "seq": reply["seq"]}
        )
        await stack.settle()
        self.assertEqual(stack.presence.take(b, "clear"), [told])
        self.assertEqual(stack.presence.broadcasts, [("hidden", {"uid": b})])
        # What comes after the clear shows.
        [new] = await self.send(stack, a, b, "after")
        self.assertEqual([x["msg_id"] for x in await self.history(stack, b, a)], [new])
        [conv] = (await stack.chat.convs(b, 10, None))["convs"]
        self.assertEqual((conv["last"]["msg_id"], conv["unread"]), (new, 1))
        self.assertEqual(
            [x["msg_id"] for x in (await stack.chat.sync(b, 10, 0, None))["msgs"]], [new]
        )
        # Hiding what is cleared already changes nothing.
        self.assertEqual(await stack.chat.edits.hide(b, [ids[0]]), {})

    async def test_hide_and_clear_delete_pending_before_locking_conv(self) -> None:
        """
        An ack deletes t_pending, then updates t_conv: hide and clear take them
        in that order too (review finding 5: the inverse order deadlocked).
        """
        assert isinstance(self, TestCase)
        stack = await self.stack()
        a, b = await self.users(stack)
        ids = await self.send(stack, a, b, "m", 3)
        await stack.settle()
        sid = stack.store.session_hint(a, b)
        assert sid is not None
        now = stack.store._now_ms()
        seen: list[list[str]] = []

        def recorded(txn: Txn, call: Any, *args: Any) -> Any:
            rec = RecordingTxn(txn)
            seen.append(rec.sql)
            return call(rec, *args)

        db = stack.store.db
        await db.run("probe", recorded, storage_edits.hide_txn, b, [ids[0]], now)
        await db.run("probe", recorded, storage_edits.clear_txn, b, sid, now)
        for sql in seen[-2:]:
            delete, conv = _pending_before_conv(sql)
            self.assertLess(delete, conv, sql)

    async def test_a_message_committed_after_the_clear_shows(self) -> None:
        """
        Msg ids are per-node time stamps, not commit order: a message with an
        id below clearedUpTo that commits after the clear shows as usual
        (review finding 9), until the next clear.
        """
        assert isinstance(self, TestCase)
        stack = await self.stack()
        a, b = await self.users(stack)
        ids = await self.send(stack, a, b, "m", 2)
        await stack.settle()
        sid = stack.store.session_hint(a, b)
        assert sid is not None
        first = await stack.chat.edits.clear(b, sid)
        self.assertEqual(first["up_to"], ids[-1])
        # Another node whose clock is behind: its message's id is below the clear's.
        behind = Clock()
        behind.advance(reactor.seconds() - 5)  # type: ignore[attr-defined]
        stack.chat.ids = IdGenerator(7, behind)
        [late] = await self.send(stack, a, b, "late")
        await stack.settle()
        self.assertLess(late, first["up_to"])
        self.assertEqual([x["msg_id"] for x in await self.history(stack, b, a)], [late])
        [conv] = (await stack.chat.convs(b, 10, None))["convs"]
        self.assertEqual((conv["last"]["msg_id"], conv["unread"]), (late, 1))
        self.assertEqual((await stack.chat.unread(b))["total"], 1)
        self.assertEqual(
            [x["msg_id"] for x in (await stack.chat.sync(b, 10, 0, None))["msgs"]], [late]
        )
        # The next clear is not a repeat: it takes the late one too.
        again = await stack.chat.edits.clear(b, sid)
        await stack.settle()
        self.assertEqual(again["up_to"], first["up_to"])
        self.assertGreater(again["seq"], first["seq"])
        self.assertEqual(await self.history(stack, b, a), [])
        self.assertEqual((await stack.chat.unread(b))["total"], 0)
        self.assertEqual((await stack.chat.sync(b, 10, 0, None))["msgs"], [])
        self.assertEqual(len(await self.history(stack, a, b)), 3)

    async def test_catchup_renders_hide_and_clear(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        a, b = await self.users(stack)
        ids = await self.send(stack, a, b, "m", 3)
        sid = stack.store.session_hint(a, b)
        assert sid is not None
        start = await stack.store.head(b)
        hidden = await stack.chat.edits.hide(b, [ids[0], ids[1]])
        cleared = await stack.chat.edits.clear(b, sid)
        page = await stack.chat.catchup(b, 0, start, 100)
        self.assertEqual(
            page["events"],
            [
                {"t": "hide", "msg_ids": [ids[0], ids[1]], "seq": hidden["seq"]},
                {"t": "clear", "session_id": sid, "up_to": ids[2], "seq": cleared["seq"]},
            ],
        )
        # The peer's stream has none of it.
        self.assertEqual(
            (await stack.chat.catchup(a, 0, await stack.store.head(a), 100))["events"], []
        )

    async def test_edit_between_a_blocked_pair_is_forbidden(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack)
        [m] = await self.send(stack, a, b, "x")

        async def either(x: int, y: int) -> bool:
            return {x, y} == {a, b}

        assert isinstance(self, TestCase)
        self.patch(stack.chat.blocks, "either", either)
        await self.refused(ErrorCode.FORBIDDEN, stack.chat.edits.edit(a, m, "y"))
        # One's own view stays one's own: hiding is not refused.
        self.assertIn("seq", await stack.chat.edits.hide(b, [m]))

    async def test_a_lost_follow_up_is_replayed_from_the_outbox(self) -> None:
        """A crash between an edit's commit and its invalidation: the outbox row's
        replay forgets the cached old body (and the hider's copy, for a hide)."""
        assert isinstance(self, TestCase)
        stack = await self.stack()
        a, b = await self.users(stack)
        [m] = await self.send(stack, a, b, "old")
        await stack.settle()
        await self.history(stack, b, a)
        store = stack.store

        def lost(step: Any, uids: Any, session_ids: Any = ()) -> None:
            step.close()  # the node died before running it

        self.patch(store, "_run_after_reply", lost)
        await stack.chat.edits.edit(a, m, "new")
        self.assertEqual((await store.hot.messages([m]))[m].body, b"\xa3old")
        await sleep(0.01)  # a row is claimable from the next millisecond on
        replayed = await store.replay_outbox(own=True)
        # (The send's own row may still be there too: done rows are deleted lazily.)
        self.assertIn("edit", [r.kind for r in replayed])
        self.assertEqual([x["body"] for x in await self.history(stack, b, a)], ["new"])

    async def test_users_who_never_hid_read_without_asking_sql_each_time(self) -> None:
        assert isinstance(self, TestCase)
        stack = await self.stack()
        a, b = await self.users(stack)
        await self.send(stack, a, b, "m", 2)
        edits = stack.store.edits
        await self.history(stack, b, a)
        await stack.chat.convs(b, 10, None)  # (loads b's hot copy: asked again once)
        asked = edits.hides_checked
        self.assertLessEqual(asked, 2)
        for _ in range(3):
            await self.history(stack, b, a)
            await stack.chat.convs(b, 10, None)
            await stack.chat.sync(b, 10, 0, None)
        self.assertEqual(edits.hides_checked, asked)


class EmbeddedEditsTests(EditsContract, TestCase):
    backend = "embedded"


class MariaDBEditsTests(EditsContract, TestCase):
    backend = "redis"

    async def test_migration_0007_runs_again_after_a_partial_apply(self) -> None:
        """
        MySQL commits DDL statement by statement: 0007 stopped half-way (one
        column added, not recorded as applied) runs again whole on the next
        start (its SQLite twin is one transaction there: no partial apply).
        """
        stack = await self.stack()
        db = stack.store.db

        def half_undone(txn: Txn) -> None:
            txn.execute("ALTER TABLE t_conv DROP COLUMN clearedUpTo")
            txn.execute("DELETE FROM t_schema_version WHERE version = 7")

        await db.run("undo", half_undone)
        self.assertEqual(await migrate(db, stack.store._now_ms()), [7])
        # The column is back (and the re-run kept what was there).
        a, b = await self.users(stack)
        await self.send(stack, a, b, "m")
        await stack.settle()
        sid = stack.store.session_hint(a, b)
        assert sid is not None
        self.assertIn("seq", await stack.chat.edits.clear(b, sid))


class TwoNodeTests(TestCase):
    """Two nodes on one database and one hot store (as a cluster shares Redis)."""

    async def nodes(self) -> tuple[Stack, Stack]:
        one = await make_stack(self, "redis", limits=BIG, node_id=1)
        two = await make_stack(self, "redis", limits=BIG, node_id=2, db=one.store.db)
        # Share one's hot store (its Redis prefix), as the nodes of a cluster do.
        own = two.store.hot
        two.store.hot = two.hot = one.hot

        def restore() -> None:
            two.store.hot = two.hot = own  # two stops its own (cleanups run last first)

        self.addCleanup(restore)
        return one, two

    async def test_edit_on_one_read_on_two(self) -> None:
        one, two = await self.nodes()
        a, b = next(_uids), next(_uids)
        for node in (one, two):
            await node.chat.login(a)
            await node.chat.login(b)
        [m] = [(await one.chat.send(a, b, "c", "text", "before"))["msg_id"]]
        await one.settle()
        page = await two.chat.history(b, a, None, None, 10)
        self.assertEqual(page["msgs"][0]["body"], "before")
        await one.chat.edits.edit(a, m, "after")
        await one.settle()
        for node in (one, two):
            [msg] = (await node.chat.history(b, a, None, None, 10))["msgs"]
            self.assertEqual(msg["body"], "after")
            [conv] = (await node.chat.convs(b, 10, None))["convs"]
            self.assertEqual(conv["last"]["body"], "after")
            [synced] = (await node.chat.sync(b, 10, 0, None))["msgs"]
            self.assertEqual(synced["body"], "after")

    async def test_a_late_fan_out_on_another_node_does_not_cache_the_old_body(self) -> None:
        """
        The send's fan-out on one node runs after the edit on the other node
        invalidated the message: it must not cache the old body again (review
        finding 10: it did, until a timer on the editing node forgot it again).
        """
        one, two = await self.nodes()
        a, b = next(_uids), next(_uids)
        for node in (one, two):
            await node.chat.login(a)
            await node.chat.login(b)
        hot = one.hot
        held: list[tuple[Any, Any]] = []
        real = hot.fanout

        async def late(messages: Any, rows: Any) -> None:
            held.append((messages, rows))

        self.patch(hot, "fanout", late)
        m = (await one.chat.send(a, b, "c", "text", "before"))["msg_id"]
        await one.settle()
        self.assertEqual(len(held), 1)
        await two.chat.edits.edit(a, m, "after")
        await two.settle()
        # Now node one's fan-out runs (within LIVE_MS of the commit).
        await real(*held[0])
        cached = (await hot.messages([m])).get(m)
        self.assertTrue(cached is None or cached.edited > 0, cached)
        for node in (one, two):
            [msg] = (await node.chat.history(b, a, None, None, 10))["msgs"]
            self.assertEqual(msg["body"], "after")
            [conv] = (await node.chat.convs(b, 10, None))["convs"]
            self.assertEqual(conv["last"]["body"], "after")

    async def test_concurrent_edits_on_two_nodes_last_commit_wins(self) -> None:
        one, two = await self.nodes()
        a, b = next(_uids), next(_uids)
        for node in (one, two):
            await node.chat.login(a)
            await node.chat.login(b)
        m = (await one.chat.send(a, b, "c", "text", "v"))["msg_id"]
        await one.settle()
        bodies = [f"v{i}" for i in range(12)]
        replies = await gatherResults(
            [
                ensureDeferred((one, two)[i % 2].chat.edits.edit(a, m, body))
                for i, body in enumerate(bodies)
            ]
        )
        edited = [r["edited"] for r in replies]
        self.assertEqual(len(set(edited)), len(edited))  # each edit its own, strictly ordered
        winner = bodies[edited.index(max(edited))]
        await one.settle()
        await two.settle()
        for node in (one, two):
            [msg] = (await node.chat.history(b, a, None, None, 10))["msgs"]
            self.assertEqual((msg["body"], msg["edited"]), (winner, max(edited)))
        # Both streams have one event per edit, in commit (= edited) order.
        page = await one.chat.catchup(b, 0, 1, 100)
        self.assertEqual(len(page["events"]), len(bodies))

    async def test_hide_on_one_read_on_two(self) -> None:
        one, two = await self.nodes()
        a, b = next(_uids), next(_uids)
        for node in (one, two):
            await node.chat.login(a)
            await node.chat.login(b)
        ids = [(await one.chat.send(a, b, f"c{i}", "text", i))["msg_id"] for i in range(2)]
        await one.settle()
        # Node two learned that b never hid anything.
        self.assertEqual(len((await two.chat.history(b, a, None, None, 10))["msgs"]), 2)
        await one.chat.edits.hide(b, [ids[1]])
        await one.settle()
        [(_, data)] = one.presence.broadcasts
        two.chat.edits._hidden_elsewhere(data)  # what ClusterPresence delivers
        [msg] = (await two.chat.history(b, a, None, None, 10))["msgs"]
        self.assertEqual(msg["msg_id"], ids[0])
        [conv] = (await two.chat.convs(b, 10, None))["convs"]
        self.assertEqual((conv["last"]["msg_id"], conv["unread"]), (ids[0], 1))
        self.assertEqual(
            [x["msg_id"] for x in (await two.chat.sync(b, 10, 0, None))["msgs"]], [ids[0]]
        )

    async def test_a_lost_broadcast_is_made_up_for_by_a_reload(self) -> None:
        """The hide invalidated the user's hot copy, shared by the nodes: the
        node that reloads it asks SQL again whether the user hides messages."""
        one, two = await self.nodes()
        a, b = next(_uids), next(_uids)
        for node in (one, two):
            await node.chat.login(a)
            await node.chat.login(b)
        m = (await one.chat.send(a, b, "c", "text", "x"))["msg_id"]
        await one.settle()
        await two.chat.history(b, a, None, None, 10)
        await two.chat.sync(b, 10, 0, None)
        await one.chat.edits.hide(b, [m])
        await one.settle()
        self.assertEqual((await two.chat.sync(b, 10, 0, None))["msgs"], [])
        self.assertEqual((await two.chat.history(b, a, None, None, 10))["msgs"], [])

    async def test_a_lost_broadcast_is_made_up_for_by_the_ttl(self) -> None:
        from imserver.storage import edits

        one, two = await self.nodes()
        a, b = next(_uids), next(_uids)
        for node in (one, two):
            await node.chat.login(a)
            await node.chat.login(b)
        [m] = [(await one.chat.send(a, b, "c", "text", "x"))["msg_id"]]
        await two.chat.history(b, a, None, None, 10)
        await one.chat.edits.hide(b, [m])
        self.patch(edits, "CLEAN_TTL", 0.0)
        self.assertEqual((await two.chat.history(b, a, None, None, 10))["msgs"], [])
