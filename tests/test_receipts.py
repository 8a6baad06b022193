"""
Delivery receipts (issue 11), on both backends: the first ack of a message
moves its recipient's deliveredUpTo in the ack's own transaction and pushes
C{delivered} (one per session per ack call, the highest msg_id) to the
sender's devices; a second device's ack of the same ids pushes nothing;
convs entries and history replies carry the peer's positions.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from imserver.config import LimitsConfig, SqliteTarget, parse_config
from imserver.storage.model import Positions
from imserver.storage.sql import queries as q
from imserver.storage.sql.database import Database, Txn
from imserver.storage.sql.engines import create_engine
from imserver.storage.sql.migrate import _migrate_txn, available, migrate
from tests.harness import shared_mariadb
from tests.stack import Stack, make_stack
from tests.support import reactor

BIG = LimitsConfig(send_per_second=1e6, send_burst=10**6, recall_seconds=3600)
_uids = itertools.count(81_000)


def _positions_txn(txn: Txn, uid: int, session_id: int) -> tuple[int, int]:
    row = txn.query_one(
        "SELECT readUpTo, deliveredUpTo FROM t_conv WHERE uid = ? AND sessionId = ?",
        (uid, session_id),
    )
    assert row is not None
    return int(row[0]), int(row[1])


class ReceiptsHelpers:
    """A stack on C{backend}, online users, sends (shared with test_receipts_fixes)."""

    backend = ""

    async def stack(self) -> Stack:
        assert isinstance(self, TestCase)
        return await make_stack(self, self.backend, limits=BIG)

    async def users(self, stack: Stack, n: int) -> list[int]:
        uids = [next(_uids) for _ in range(n)]
        for uid in uids:
            await stack.chat.login(uid)
            stack.presence.online_users.add(uid)
        return uids

    async def sent(self, stack: Stack, a: int, b: int, n: int, tag: str = "m") -> list[Any]:
        return [await stack.chat.send(a, b, f"{tag}{i}", "text", f"hi {i}") for i in range(n)]

    async def stored(self, stack: Stack, uid: int, session_id: int) -> tuple[int, int]:
        return await stack.store.db.run("positions", _positions_txn, uid, session_id)


class ReceiptsContract(ReceiptsHelpers):
    async def test_first_ack_pushes_the_highest_per_session(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        replies = await self.sent(stack, a, b, 3)
        await stack.settle()
        stack.presence.take(a)
        sid = replies[0]["session_id"]
        ids = [r["msg_id"] for r in replies]
        self.assertEqual(await stack.chat.ack(b, ids[:2]), {})
        self.assertEqual(
            stack.presence.take(a, "delivered"),
            [{"t": "delivered", "session_id": sid, "msg_id": ids[1], "by": b}],
        )
        self.assertEqual(await self.stored(stack, b, sid), (0, ids[1]))
        # The same ids again (another device of b's, or a retry): nothing.
        await stack.chat.ack(b, ids[:2])
        self.assertEqual(stack.presence.take(a, "delivered"), [])
        self.assertEqual(await self.stored(stack, b, sid), (0, ids[1]))
        # The rest, in any order: the highest.
        await stack.chat.ack(b, [ids[2], ids[0]])
        [push] = stack.presence.take(a, "delivered")
        self.assertEqual(push["msg_id"], ids[2])
        self.assertEqual(await self.stored(stack, b, sid), (0, ids[2]))
        # Nobody else was told anything about it.
        self.assertEqual(stack.presence.take(b, "delivered"), [])

    async def test_one_push_per_session_and_sender(self) -> None:
        stack = await self.stack()
        a, c, b = await self.users(stack, 3)
        from_a = await self.sent(stack, a, b, 2, "a")
        from_c = await self.sent(stack, c, b, 3, "c")
        await stack.settle()
        stack.presence.take(a)
        stack.presence.take(c)
        await stack.chat.ack(b, [r["msg_id"] for r in from_a + from_c])
        [to_a] = stack.presence.take(a, "delivered")
        [to_c] = stack.presence.take(c, "delivered")
        self.assertEqual(
            (to_a["session_id"], to_a["msg_id"]), (from_a[0]["session_id"], from_a[1]["msg_id"])
        )
        self.assertEqual(
            (to_c["session_id"], to_c["msg_id"]), (from_c[0]["session_id"], from_c[2]["msg_id"])
        )
        self.assertEqual(
            await self.stored(stack, b, from_a[0]["session_id"]), (0, from_a[1]["msg_id"])
        )
        self.assertEqual(
            await self.stored(stack, b, from_c[0]["session_id"]), (0, from_c[2]["msg_id"])
        )

    async def test_acks_sharing_a_batch_are_exact_per_user(self) -> None:
        """One batch for several users: each recipient's own ids only (another
        user's ids in the batch move nobody else's position)."""
        stack = await self.stack()
        a, b, c = await self.users(stack, 3)
        to_b = await self.sent(stack, a, b, 2, "b")
        to_c = await self.sent(stack, a, c, 2, "c")
        await stack.settle()
        stack.presence.take(a)
        # c acks b's messages too (ignored), b acks only its first.
        await gatherResults(
            [
                stack.chat.ack(b, [to_b[0]["msg_id"]]),
                stack.chat.ack(c, [to_b[1]["msg_id"], to_c[0]["msg_id"]]),
            ]
        )
        pushes = sorted(stack.presence.take(a, "delivered"), key=lambda p: p["by"])
        self.assertEqual(
            [(p["by"], p["msg_id"]) for p in pushes],
            sorted([(b, to_b[0]["msg_id"]), (c, to_c[0]["msg_id"])]),
        )
        self.assertEqual(await self.stored(stack, b, to_b[0]["session_id"]), (0, to_b[0]["msg_id"]))
        self.assertEqual(await self.stored(stack, c, to_c[0]["session_id"]), (0, to_c[0]["msg_id"]))

    async def test_an_ack_of_nothing_pending_pushes_nothing(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        [reply] = await self.sent(stack, a, b, 1)
        await stack.settle()
        stack.presence.take(a)
        await stack.chat.ack(a, [reply["msg_id"]])  # the sender's own message
        await stack.chat.ack(b, [reply["msg_id"] + 12345])  # unknown
        await stack.chat.ack(b, [])
        self.assertEqual(stack.presence.take(a, "delivered"), [])
        self.assertEqual(await self.stored(stack, b, reply["session_id"]), (0, 0))

    async def test_convs_and_history_show_the_peers_positions(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        replies = await self.sent(stack, a, b, 3)
        await stack.settle()
        sid = replies[0]["session_id"]
        ids = [r["msg_id"] for r in replies]

        async def seen_by_a() -> tuple[tuple[int, int], tuple[int, int]]:
            [conv] = (await stack.chat.convs(a, 20, None))["convs"]
            self.assertEqual(conv["session_id"], sid)
            history = await stack.chat.history(a, b, None, None, 20)
            by_session = await stack.chat.history(a, None, sid, None, 1)
            self.assertEqual(
                (by_session["peer_read"], by_session["peer_delivered"]),
                (history["peer_read"], history["peer_delivered"]),
            )
            return (conv["peer_read"], conv["peer_delivered"]), (
                history["peer_read"],
                history["peer_delivered"],
            )

        self.assertEqual(await seen_by_a(), ((0, 0), (0, 0)))
        await stack.chat.ack(b, ids[:2])
        self.assertEqual(await seen_by_a(), ((0, ids[1]), (0, ids[1])))
        # Read without an ack (another device read it): delivered too.
        await stack.chat.read(b, sid, ids[2])
        self.assertEqual(await seen_by_a(), ((ids[2], ids[2]), (ids[2], ids[2])))
        # b sees a's positions: a acked nothing of b's (b sent nothing).
        [conv] = (await stack.chat.convs(b, 20, None))["convs"]
        self.assertEqual((conv["peer_read"], conv["peer_delivered"]), (0, 0))
        self.assertEqual(conv["muted_until"], 0)
        # After the hot copy is lost, the same (positions are SQL's).
        await stack.flush_hot()
        self.assertEqual(await seen_by_a(), ((ids[2], ids[2]), (ids[2], ids[2])))

    async def test_history_without_a_session_has_zero_positions(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        reply = await stack.chat.history(a, b, None, None, 20)
        self.assertEqual(reply, {"msgs": [], "more": False, "peer_read": 0, "peer_delivered": 0})

    async def test_many_conversations_in_one_page(self) -> None:
        stack = await self.stack()
        [b] = await self.users(stack, 1)
        senders = await self.users(stack, 5)
        acked = {}
        for s in senders:
            [reply] = await self.sent(stack, s, b, 1, f"s{s}")
            acked[reply["session_id"]] = reply["msg_id"]
        await stack.settle()
        await stack.chat.ack(b, list(acked.values()))
        for s in senders:
            [conv] = (await stack.chat.convs(s, 20, None))["convs"]
            self.assertEqual(conv["peer_delivered"], acked[conv["session_id"]])
        page = (await stack.chat.convs(b, 20, None))["convs"]
        self.assertEqual(len(page), 5)
        self.assertEqual({c["peer_delivered"] for c in page}, {0})

    def make_db(self) -> Database:
        assert isinstance(self, TestCase)
        if self.backend == "embedded":
            target: Any = SqliteTarget(os.path.abspath(self.mktemp()))
        else:
            target = parse_config({"storage": {"sql": shared_mariadb().fresh_database()}})
            target = target.storage.sql
        db = Database(reactor, create_engine(target), name="t", max_connections=2)
        self.addCleanup(db.close)
        return db

    async def test_migration_on_an_existing_database(self) -> None:
        """0008 on rows written before it: nothing delivered, read as before, not muted."""
        db = self.make_db()
        before = [m for m in available(db.engine.kind) if m.version < 8]
        await db.run("migrate", _migrate_txn, before, 0)
        await db.run("conv", _old_conv_txn)
        self.assertIn(8, await migrate(db, 0))
        self.assertEqual(
            await db.run("p", q.positions_txn, [7, 8], [1]),
            {(7, 1): Positions(5, 0, 0), (8, 1): Positions(0, 0, 0)},
        )


def _old_conv_txn(txn: Txn) -> None:
    for uid, peer, read in ((7, 8, 5), (8, 7, 0)):
        txn.execute(
            "INSERT INTO t_conv (uid, sessionId, peerUid, lastMsgId, totalCount, readCount,"
            " readUpTo, version) VALUES (?, 1, ?, 9, 1, 1, ?, 1)",
            (uid, peer, read),
        )


class EmbeddedReceiptsTests(ReceiptsContract, TestCase):
    backend = "embedded"


class MariaDBReceiptsTests(ReceiptsContract, TestCase):
    backend = "redis"


class LostAckCommitTests(TestCase):
    """An ack whose commit happened but whose reply was lost (CommitConfirmed):
    the position is stored once, and the sender still gets its receipt."""

    async def test_lost_commit_of_an_ack(self) -> None:
        from tests.test_sql_faults import _FlakySqlite

        engine = _FlakySqlite(SqliteTarget(os.path.abspath(self.mktemp())))
        db = Database(reactor, engine, name="t")
        stack = await make_stack(self, "embedded", limits=BIG, db=db)
        a, b = next(_uids), next(_uids)
        for uid in (a, b):
            await stack.chat.login(uid)
        stack.presence.online_users.update((a, b))
        replies = [await stack.chat.send(a, b, f"c{i}", "text", "x") for i in range(2)]
        await stack.settle()
        stack.presence.take(a)
        sid = replies[0]["session_id"]
        engine.fail = "after"
        await stack.chat.ack(b, [r["msg_id"] for r in replies])
        self.assertEqual(stack.store.db.lost_commits["committed"], 1)
        [push] = stack.presence.take(a, "delivered")
        self.assertEqual((push["session_id"], push["msg_id"]), (sid, replies[1]["msg_id"]))
        row = await stack.store.db.run("p", _positions_txn, b, sid)
        self.assertEqual(row, (0, replies[1]["msg_id"]))
        self.assertEqual((await stack.chat.sync(b, 10, 0, None))["msgs"], [])
