"""
SQL faults that must stay local: a cid the database compares differently
from the server (issue 9, defect 1), one failing item of a group commit, and
a COMMIT whose reply is lost (defect 2). On both engines where it applies;
the MariaDB cases run on the harness's real mariadbd.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import time
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from imserver.config import LimitsConfig, SqliteTarget, parse_config
from imserver.errors import ErrorCode, ImError
from imserver.storage.sql import queries as q
from imserver.storage.sql.database import TOKEN_KEEP_SECONDS, Database, Txn
from imserver.storage.sql.engines import SqliteEngine, create_engine
from imserver.storage.sql.migrate import _migrate_txn, available, migrate
from imserver.storage.store import OUTBOX_STALE_MS
from tests.harness import shared_mariadb
from tests.mysql_proxy import MysqlProxy
from tests.stack import Stack, make_stack
from tests.support import eventually, reactor, within

_uids = itertools.count(50_000)
BIG = LimitsConfig(send_per_second=1e6, send_burst=10**6, recall_seconds=3600)

#: Strings that are equal for some database collation but not for Python.
LOOKALIKES = [
    "p",
    "p ",
    "p  ",
    "P",
    "p\t",
    "\u00e9",  # é, composed
    "e\u0301",  # é, decomposed
    "ss",
    "\u00df",  # ß
    "\u0131",  # dotless i
    "i",
    "\uff50",  # fullwidth p
    "p\x00",  # as a C string: "p"
    "\U0001f600" * 64,  # the longest cid: 64 characters, 256 bytes of UTF-8
]


async def _settled(ds: list[Any]) -> list[tuple[bool, Any]]:
    """Every result of a list of Deferreds, failures included, in order."""
    results: list[tuple[bool, Any]] = await gatherResults(
        [d.addCallbacks(lambda r: (True, r), lambda f: (False, f.value)) for d in ds]
    )
    return results


def _history_txn(txn: Txn, sender: int) -> list[tuple[str, int]]:
    rows = txn.query(
        "SELECT cid, id FROM t_msg_record_list WHERE senderUid = ? ORDER BY id", (sender,)
    )
    return [(_text(r[0]), int(r[1])) for r in rows]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)


class CidContract:
    """Application equality of cids is the database's equality (defect 1)."""

    backend = ""

    async def stack(self, **kw: Any) -> Stack:
        kw.setdefault("limits", BIG)
        return await make_stack(self, self.backend, **kw)  # type: ignore[arg-type]

    async def users(self, stack: Stack, n: int) -> list[int]:
        uids = [next(_uids) for _ in range(n)]
        for uid in uids:
            await stack.chat.login(uid)
        return uids

    async def test_trailing_space_cid_after_an_earlier_one(self) -> None:
        """
        "p" committed earlier, then "p " in a group commit with other users'
        sends: every send is answered ok, "p " is a new message.
        """
        stack = await self.stack()
        a, b, c, d = await self.users(stack, 4)
        first = await stack.chat.send(a, b, "p", "text", "one")
        # The first send runs alone; the rest wait and share the next batch.
        sends = [
            stack.chat.send(c, d, "warm", "text", "x"),
            stack.chat.send(a, b, "p ", "text", "two"),
            stack.chat.send(c, d, "c1", "text", "x"),
            stack.chat.send(d, c, "d1", "text", "x"),
        ]
        results = await _settled(sends)
        for ok, value in results:
            self.assertTrue(ok, value)
            self.assertFalse(value["dup"])
        self.assertNotEqual(results[1][1]["msg_id"], first["msg_id"])
        history = await stack.store.db.run("h", _history_txn, a)
        self.assertEqual(history, [("p", first["msg_id"]), ("p ", results[1][1]["msg_id"])])
        again = await stack.chat.send(a, b, "p ", "text", "retry")
        self.assertEqual(again["msg_id"], results[1][1]["msg_id"])
        self.assertTrue(again["dup"])

    async def test_lookalike_cids_in_one_batch(self) -> None:
        """
        Cids a collation might confuse, all in one batch with another user's
        send: each is its own message; the same ones again are duplicates.
        """
        stack = await self.stack()
        a, b, c, d = await self.users(stack, 4)
        sends = [stack.chat.send(c, d, "warm", "text", "x")]
        sends += [stack.chat.send(a, b, cid, "text", cid) for cid in LOOKALIKES]
        sends.append(stack.chat.send(c, d, "other", "text", "x"))
        results = await _settled(sends)
        for ok, value in results:
            self.assertTrue(ok, value)
            self.assertFalse(value["dup"])
        ids = [r[1]["msg_id"] for r in results[1:-1]]
        self.assertEqual(len(set(ids)), len(LOOKALIKES))
        history = await stack.store.db.run("h", _history_txn, a)
        self.assertEqual(history, list(zip(LOOKALIKES, ids, strict=True)))
        # Retries of each, again in one batch: each one's own message.
        again = await _settled(
            [stack.chat.send(c, d, "warm2", "text", "x")]
            + [stack.chat.send(a, b, cid, "text", "again") for cid in LOOKALIKES]
        )
        self.assertEqual([r[1]["msg_id"] for r in again[1:]], ids)
        self.assertTrue(all(r[1]["dup"] for r in again[1:]))
        # Read back through the store: the cid comes back as sent.
        found = await stack.store.messages(ids)
        self.assertEqual([found[i].cid for i in ids], LOOKALIKES)


def _poison_txn(txn: Txn) -> None:
    """A trigger that refuses one cid: a message the database will not store."""
    if txn.engine.kind == "mysql":
        txn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON t_msg_record_list FOR EACH ROW"
            " IF NEW.cid = 'poison' THEN"
            " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poisoned'; END IF"
        )
    else:
        txn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON t_msg_record_list"
            " WHEN NEW.cid = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
        )


class IsolationContract(CidContract):
    """One message the database refuses fails alone, not its whole batch."""

    async def test_one_bad_item_fails_alone(self) -> None:
        stack = await self.stack()
        a, b, c, d = await self.users(stack, 4)
        await stack.store.db.run("poison", _poison_txn)
        stack.presence.online_users.update((b, c, d))
        cids = ["warm", "a1", "poison", "a2", "c1", "d1", "poison", "a3"]
        pairs = [(c, d), (a, b), (a, b), (a, b), (c, d), (d, c), (c, d), (a, b)]
        results = await _settled(
            [
                stack.chat.send(x, y, cid, "text", cid)
                for (x, y), cid in zip(pairs, cids, strict=True)
            ]
        )
        for cid, (ok, value) in zip(cids, results, strict=True):
            if cid == "poison":
                self.assertFalse(ok)
                self.assertIsInstance(value, ImError)
                self.assertEqual(value.code, ErrorCode.INTERNAL)
                self.assertEqual(value.message, "this message could not be stored")
            else:
                self.assertTrue(ok, value)
                self.assertFalse(value["dup"])
        await stack.settle()
        # Every other message is stored once, in order, and pushed.
        self.assertEqual(
            [cid for cid, _ in await stack.store.db.run("h", _history_txn, a)], ["a1", "a2", "a3"]
        )
        self.assertEqual([f["cid"] for f in stack.presence.take(b, "msg")], ["a1", "a2", "a3"])
        # (d's own d1 reaches d's devices too: sent without a connection to leave out.)
        received = [f["cid"] for f in stack.presence.take(d, "msg") if f["to"] == d]
        self.assertEqual(received, ["warm", "c1"])
        sync = await stack.chat.sync(b, 100, 0, None)
        self.assertEqual([m["cid"] for m in sync["msgs"]], ["a1", "a2", "a3"])
        # The sender may retry: still refused, and nothing else is hurt.
        with self.assertRaises(ImError):
            await stack.chat.send(a, b, "poison", "text", "again")


class EmbeddedCidTests(IsolationContract, TestCase):
    backend = "embedded"


class MariaDBCidTests(IsolationContract, TestCase):
    backend = "redis"


# ---------------------------------------------------------------------------
# Defect 2: a COMMIT whose reply is lost


def _keep(outcome: Any, seen: list[Any]) -> Any:
    seen.append(outcome)
    return outcome


class LostCommitTests(TestCase):
    """
    The realtime pool reaches mariadbd through L{MysqlProxy}, which loses
    the reply of one COMMIT (the server committed) or withholds the COMMIT
    (it did not). The outcome must come from the database, not from a rerun.
    """

    timeout = 120

    async def setUp(self) -> None:
        url = shared_mariadb().fresh_database()
        name = url.rsplit("/", 1)[1]
        self.proxy = MysqlProxy(shared_mariadb().port)
        self.addCleanup(self.proxy.close)
        config = parse_config({"storage": {"sql": self.proxy.url(name)}})
        db = Database(reactor, create_engine(config.storage.sql), name="test", max_connections=3)
        self.stack = await make_stack(self, "redis", limits=BIG, db=db)
        self.a, self.b = next(_uids), next(_uids)
        for uid in (self.a, self.b):
            await self.stack.chat.login(uid)
        self.stack.presence.online_users.update((self.a, self.b))
        # Both hot copies loaded, so "indexed" can be read from the hot store.
        await self.stack.chat.sync(self.a, 10, 0, None)
        await self.stack.chat.sync(self.b, 10, 0, None)
        # The pair's blocks known: no block load before the commits these tests break.
        await self.stack.chat.blocks.either(self.a, self.b)
        # Every pool thread holds its connection: a transaction that opened a
        # new one while the proxy refuses them would fail before its COMMIT.
        # So do the commit threads of the send and ack batches.
        await gatherResults(
            [Deferred.fromCoroutine(db.run("warm", _hold_txn)) for _ in range(3)]
            + [Deferred.fromCoroutine(db.run(lane, _hold_txn)) for lane in db.lanes]
        )

    async def quiet(self) -> None:
        """Nothing of the stack's own in flight: the next COMMIT is the test's."""
        await self.stack.settle()
        self.stack.presence.pushes.clear()

    async def send(self, cid: str) -> dict[str, Any]:
        reply: dict[str, Any] = await self.stack.chat.send(self.a, self.b, cid, "text", cid)
        await self.stack.settle()
        return reply

    def assertLost(self, outcome: str) -> None:
        """The database was asked about one lost commit, and said C{outcome}."""
        counts = {"committed": 0, "rolled_back": 0, "unknown": 0, outcome: 1}
        self.assertEqual(self.stack.store.db.lost_commits, counts)

    async def assertStoredOnce(self, cid: str, msg_id: int) -> None:
        history = await self.stack.store.db.run("h", _history_txn, self.a)
        self.assertEqual([h for h in history if h[0] == cid], [(cid, msg_id)])

    async def test_lost_commit_of_a_send(self) -> None:
        await self.quiet()
        self.proxy.arm("after", b"INSERT INTO t_msg_record_list")
        reply = await self.send("c1")
        self.assertTrue(self.proxy.fired.is_set())
        self.assertLost("committed")
        self.assertFalse(reply["dup"])
        await self.assertStoredOnce("c1", reply["msg_id"])
        pushed = self.stack.presence.take(self.b, "msg")
        self.assertEqual([(f["msg_id"], f["cid"]) for f in pushed], [(reply["msg_id"], "c1")])
        # Indexed once: the recipient's hot pending list and the session window.
        self.assertEqual(
            await self.stack.hot.pending(self.b, 0, 100, None), [(reply["msg_id"], self.a)]
        )
        self.assertEqual(
            await self.stack.hot.window(reply["session_id"], None, 10), [reply["msg_id"]]
        )
        self.assertEqual(self.stack.chat.duplicates, 0)
        again = await self.send("c1")
        self.assertEqual({**again, "dup": False}, reply)
        self.assertTrue(again["dup"])

    async def test_lost_commit_of_a_group_commit(self) -> None:
        """Several users' sends in the batch whose COMMIT reply is lost: each
        answered once, ok, with its unread counts, pushed and indexed once."""
        c, d = next(_uids), next(_uids)
        for uid in (c, d):
            await self.stack.chat.login(uid)
        self.stack.presence.online_users.update((c, d))
        await self.stack.chat.sync(d, 10, 0, None)
        await self.quiet()
        self.proxy.arm("after", b"'g2'")  # the second batch: the first runs alone
        sends = [
            (self.a, self.b, "g1"),
            (self.a, self.b, "g2"),
            (c, d, "g3"),
            (self.a, self.b, "g4"),
        ]
        results = await _settled(
            [self.stack.chat.send(x, y, cid, "text", cid) for x, y, cid in sends]
        )
        await self.stack.settle()
        self.assertLost("committed")
        for ok, value in results:
            self.assertTrue(ok, value)
            self.assertFalse(value["dup"])
        ids = [value["msg_id"] for _, value in results]
        pushed_b = self.stack.presence.take(self.b, "msg")
        self.assertEqual([f["msg_id"] for f in pushed_b], [ids[0], ids[1], ids[3]])
        self.assertEqual([f["unread"] for f in pushed_b], [1, 2, 3])
        self.assertEqual([f["msg_id"] for f in self.stack.presence.take(d, "msg")], [ids[2]])
        self.assertEqual(
            [i for i, _ in await self.stack.hot.pending(self.b, 0, 100, None)],
            [ids[0], ids[1], ids[3]],
        )
        self.assertEqual(await self.stack.hot.pending(d, 0, 100, None), [(ids[2], c)])
        self.assertEqual((await self.stack.chat.unread(self.b))["sessions"][0]["count"], 3)

    async def test_lost_commit_of_a_group_commit_keeps_the_seqs(self) -> None:
        """The seqs of a batch whose COMMIT reply is lost are the committed
        ones: what the senders are told is what catch-up reads."""
        store = self.stack.store
        seen: list[Any] = []
        commit = store.commit
        self.patch(store, "commit", lambda m: commit(m).addCallback(_keep, seen))
        await self.quiet()
        self.proxy.arm("after", b"'k2'")  # the second batch: the first runs alone
        results = await _settled(
            [self.stack.chat.send(self.a, self.b, cid, "text", cid) for cid in ("k1", "k2", "k3")]
        )
        await self.stack.settle()
        self.assertLost("committed")
        self.assertTrue(all(ok for ok, _ in results), results)
        self.assertEqual([c.recipient_seq for c in seen], [1, 2, 3])
        self.assertEqual([c.sender_seq for c in seen], [1, 2, 3])
        page = await store.catchup(self.b, 0, 0, 10)
        self.assertEqual(
            [(e.seq, e.msg_id) for e in page.events],
            [(c.recipient_seq, c.message.msg_id) for c in seen],
        )
        self.assertEqual(await store.head(self.a), 3)

    async def test_withheld_commit_of_a_send_reruns(self) -> None:
        await self.quiet()
        before = len(self.proxy.queries)
        self.proxy.arm("before", b"INSERT INTO t_msg_record_list")
        reply = await self.send("c2")
        self.assertTrue(self.proxy.fired.is_set())
        self.assertLost("rolled_back")
        self.assertFalse(reply["dup"])
        await self.assertStoredOnce("c2", reply["msg_id"])
        inserts = [s for s in self.proxy.queries[before:] if b"INTO t_msg_record_list" in s]
        self.assertEqual(len(inserts), 2)  # the first try, rolled back, and the rerun
        pushed = self.stack.presence.take(self.b, "msg")
        self.assertEqual([f["msg_id"] for f in pushed], [reply["msg_id"]])
        self.assertEqual(
            await self.stack.hot.pending(self.b, 0, 100, None), [(reply["msg_id"], self.a)]
        )

    async def test_withheld_commits_of_a_read_and_an_ack_rerun(self) -> None:
        sent = await self.send("w1")
        await self.quiet()
        self.proxy.arm("before", b"UPDATE t_conv SET readUpTo")
        reply = await self.stack.chat.read(self.b, sent["session_id"], sent["msg_id"])
        self.assertLost("rolled_back")
        self.assertEqual(reply["unread"], 0)
        self.assertEqual(len(self.stack.presence.take(self.a, "read")), 1)
        self.proxy.arm("before", b"DELETE FROM t_pending WHERE msgId IN")
        await self.stack.chat.ack(self.b, [sent["msg_id"]])
        self.assertEqual(self.stack.store.db.lost_commits["rolled_back"], 2)
        self.assertEqual(self.stack.chat.acked, 1)
        await self.stack.settle()
        self.assertEqual(await self.stack.hot.pending(self.b, 0, 100, None), [])

    async def test_lost_commit_of_a_recall(self) -> None:
        sent = await self.send("r1")
        await self.quiet()
        self.proxy.arm("after", b"SET recordStatus")
        await self.stack.chat.recall(self.a, sent["msg_id"])
        self.assertTrue(self.proxy.fired.is_set())
        self.assertLost("committed")
        await self.stack.settle()  # the push follows the hot step, after the reply
        pushed = self.stack.presence.take(self.b, "recall")
        self.assertEqual([f["msg_id"] for f in pushed], [sent["msg_id"]])
        self.assertEqual(await self.stack.hot.pending(self.b, 0, 100, None), [])
        self.assertEqual(await self.stack.store.history(sent["session_id"], None, 10), [])

    async def test_stalled_commit_of_a_recall(self) -> None:
        """
        The connection is lost while its COMMIT is held up on the way (a
        partition): the server's session lives on, and tries to commit
        after the node asked. The node's check fences it off: the recall
        happens once, by its rerun, and is pushed.
        """
        sent = await self.send("z1")
        await self.quiet()
        self.proxy.arm("stall", b"SET recordStatus")
        await self.stack.chat.recall(self.a, sent["msg_id"])
        self.assertLost("rolled_back")
        self.assertTrue(self.proxy.replied.wait(10))  # the stalled COMMIT came, and failed
        await self.stack.settle()  # the push follows the hot step, after the reply
        pushed = self.stack.presence.take(self.b, "recall")
        self.assertEqual([f["msg_id"] for f in pushed], [sent["msg_id"]])
        [message] = (await self.stack.store.messages([sent["msg_id"]])).values()
        self.assertEqual(message.status, 1)

    async def test_lost_commit_of_a_read(self) -> None:
        sent = await self.send("d1")
        await self.quiet()
        self.proxy.arm("after", b"UPDATE t_conv SET readUpTo")
        reply = await self.stack.chat.read(self.b, sent["session_id"], sent["msg_id"])
        self.assertTrue(self.proxy.fired.is_set())
        self.assertLost("committed")
        self.assertEqual(reply["unread"], 0)
        pushed = self.stack.presence.take(self.a, "read")
        self.assertEqual([f["msg_id"] for f in pushed], [sent["msg_id"]])
        self.assertEqual((await self.stack.chat.unread(self.b))["sessions"], [])

    async def test_lost_commit_of_an_ack(self) -> None:
        sent = await self.send("k1")
        await self.quiet()
        self.proxy.arm("after", b"DELETE FROM t_pending WHERE msgId IN")
        await self.stack.chat.ack(self.b, [sent["msg_id"]])
        self.assertTrue(self.proxy.fired.is_set())
        self.assertLost("committed")
        self.assertEqual(self.stack.chat.acked, 1)
        await self.stack.settle()
        self.assertEqual(await self.stack.hot.pending(self.b, 0, 100, None), [])
        self.assertEqual(
            await self.stack.store.db.run("p", q.pending_txn, self.b, 0, 100, None), []
        )

    async def test_commit_whose_outcome_cannot_be_asked(self) -> None:
        """
        The reply of a COMMIT is lost and the database cannot be reached to
        ask: C{unavailable} (maybe committed). The client's retry with the
        same cid then finds the message: one message, answered C{dup}.
        """
        await self.quiet()
        self.proxy.arm("after", b"INSERT INTO t_msg_record_list")
        self.proxy.refuse = True
        with self.assertRaises(ImError) as e:
            await self.stack.chat.send(self.a, self.b, "u1", "text", "u1")
        self.assertEqual(e.exception.code, ErrorCode.UNAVAILABLE)
        self.assertLost("unknown")
        self.proxy.refuse = False
        again = await self.send("u1")
        self.assertTrue(again["dup"])
        await self.assertStoredOnce("u1", again["msg_id"])

    async def test_lost_commit_whose_reread_fails(self) -> None:
        """
        The COMMIT's reply of a send is lost, the database says it
        committed, and the connection the send re-reads its rows on is lost
        too: the send happened, but its results cannot be read. It is
        C{unavailable} (maybe done), never run again: a rerun would find its
        own message and answer C{dup: true} to a first try, with no push.
        The retry is C{dup: true} and pushed.
        """
        await self.quiet()
        self.proxy.arm("after", b"INSERT INTO t_msg_record_list")
        self.proxy.kill_prefix = b"SELECT " + q.CONV_COLUMNS.encode()
        with self.assertRaises(ImError) as e:
            await self.stack.chat.send(self.a, self.b, "v1", "text", "v1")
        self.assertEqual(e.exception.code, ErrorCode.UNAVAILABLE)
        self.assertIsNone(self.proxy.kill_prefix)
        self.assertLost("committed")
        self.assertEqual(self.stack.chat.duplicates, 0)
        again = await self.send("v1")
        self.assertTrue(again["dup"])
        await self.assertStoredOnce("v1", again["msg_id"])
        pushed = self.stack.presence.take(self.b, "msg")
        self.assertEqual([f["msg_id"] for f in pushed], [again["msg_id"]])

    async def test_lost_commit_of_an_ack_whose_reread_fails(self) -> None:
        """An ack committed, its reply and then its re-read lost: C{unavailable},
        not a rerun that fails on its own outbox row (C{internal})."""
        sent = await self.send("k2")
        await self.quiet()
        self.proxy.arm("after", b"DELETE FROM t_pending WHERE msgId IN")
        self.proxy.kill_prefix = b"SELECT id, recipientUid"
        with self.assertRaises(ImError) as e:
            await self.stack.chat.ack(self.b, [sent["msg_id"]])
        self.assertEqual(e.exception.code, ErrorCode.UNAVAILABLE)
        self.assertIsNone(self.proxy.kill_prefix)
        self.assertLost("committed")
        self.assertEqual(
            await self.stack.store.db.run("p", q.pending_txn, self.b, 0, 100, None), []
        )
        await self.stack.chat.ack(self.b, [sent["msg_id"]])

    async def test_unknown_commit_retried_is_pushed_at_once(self) -> None:
        """
        The send whose outcome nobody could tell committed; its client's
        retry (same cid) is answered C{dup: true}, and the fan-out its first
        try never had happens now: the connected recipient is pushed the
        message once, without waiting for the outbox sweeper (60 s), and the
        batch's outbox row is finished. A second retry pushes nothing more.
        """
        await self.quiet()
        self.proxy.arm("after", b"INSERT INTO t_msg_record_list")
        self.proxy.refuse = True
        with self.assertRaises(ImError) as e:
            await self.stack.chat.send(self.a, self.b, "u2", "text", "u2")
        self.assertEqual(e.exception.code, ErrorCode.UNAVAILABLE)
        self.assertLost("unknown")
        self.proxy.refuse = False
        self.assertEqual(self.stack.presence.take(self.b, "msg"), [])
        again = await self.send("u2")
        self.assertTrue(again["dup"])
        pushed = self.stack.presence.take(self.b, "msg")
        self.assertEqual([(f["msg_id"], f["cid"]) for f in pushed], [(again["msg_id"], "u2")])
        self.assertEqual(await self.stack.store.outbox_size(), 0)
        third = await self.send("u2")
        self.assertEqual(third, again)
        self.assertEqual(self.stack.presence.take(self.b, "msg"), [])
        await self.assertStoredOnce("u2", again["msg_id"])
        # Its copies are right once repaired: pending and in the session window.
        await eventually(lambda: self.stack.store.suspect_users[self.b] == 0)
        sync = await self.stack.chat.sync(self.b, 10, 0, None)
        self.assertEqual([m["msg_id"] for m in sync["msgs"]], [again["msg_id"]])


def _hold_txn(txn: Txn) -> None:
    """Keep a pool thread (and its connection) busy for a moment."""
    time.sleep(0.05)
    txn.query_one("SELECT 1", ())


class _FlakySqlite(SqliteEngine):
    """
    SQLite whose next commit fails as a lost connection would: C{"after"}
    the commit happened, C{"before"} it did not (then the connection is
    closed, which rolls it back).
    """

    fail: str | None = None
    #: Transactions that fail at their start (the database "is down").
    down = 0

    def begin(self, cursor: Any) -> None:
        if self.down:
            self.down -= 1
            raise sqlite3.OperationalError("disk I/O error (injected, down)")
        super().begin(cursor)

    #: Scripts without a commit (reads after a lost commit) that fail.
    fail_reads = 0

    def run_script(
        self, cursor: Any, statements: Any, commit: bool, token: Any | None = None
    ) -> list[Any]:
        if not commit and self.fail_reads:
            self.fail_reads -= 1
            raise sqlite3.OperationalError("disk I/O error (injected, read)")
        return super().run_script(cursor, statements, commit, token)

    def commit(self, cursor: Any, token: Any | None) -> None:
        mode, self.fail = self.fail, None
        if mode == "before":
            raise sqlite3.OperationalError("disk I/O error (injected, before commit)")
        super().commit(cursor, token)
        if mode == "after":
            raise sqlite3.OperationalError("disk I/O error (injected, after commit)")
        if mode == "unknown":
            # Committed, and the check that would ask fails too.
            self.down = 1
            raise sqlite3.OperationalError("disk I/O error (injected, after commit)")


class SqliteLostCommitTests(TestCase):
    """The same outcomes on the embedded engine, with the failure injected."""

    async def setUp(self) -> None:
        self.engine = _FlakySqlite(SqliteTarget(os.path.abspath(self.mktemp())))
        db = Database(reactor, self.engine, name="test")
        self.stack = await make_stack(self, "embedded", limits=BIG, db=db)
        self.a, self.b = next(_uids), next(_uids)
        for uid in (self.a, self.b):
            await self.stack.chat.login(uid)
        self.stack.presence.online_users.update((self.a, self.b))
        # The pair's blocks are known to the node before any fault is armed
        # (a send's block check reads them from SQL on its first use).
        await self.stack.chat.blocks.either(self.a, self.b)

    def lost(self) -> dict[str, int]:
        return self.stack.store.db.lost_commits

    async def send(self, cid: str) -> dict[str, Any]:
        reply: dict[str, Any] = await self.stack.chat.send(self.a, self.b, cid, "text", cid)
        await self.stack.settle()
        return reply

    async def test_send_ack_read_recall(self) -> None:
        self.engine.fail = "after"
        sent = await self.send("s1")
        self.assertFalse(sent["dup"])
        self.assertEqual(self.lost()["committed"], 1)
        self.assertEqual(
            [f["msg_id"] for f in self.stack.presence.take(self.b, "msg")], [sent["msg_id"]]
        )
        self.engine.fail = "before"
        other = await self.send("s2")
        self.assertFalse(other["dup"])
        self.assertEqual(self.lost()["rolled_back"], 1)
        history = await self.stack.store.db.run("h", _history_txn, self.a)
        self.assertEqual(history, [("s1", sent["msg_id"]), ("s2", other["msg_id"])])

        self.engine.fail = "after"
        reply = await self.stack.chat.read(self.b, sent["session_id"], sent["msg_id"])
        self.assertEqual(reply["unread"], 1)
        self.assertEqual(len(self.stack.presence.take(self.a, "read")), 1)
        self.engine.fail = "after"
        await self.stack.chat.ack(self.b, [sent["msg_id"], other["msg_id"]])
        self.assertEqual(self.stack.chat.acked, 2)
        self.engine.fail = "after"
        await self.stack.chat.recall(self.a, other["msg_id"])
        await self.stack.settle()
        self.assertEqual(len(self.stack.presence.take(self.b, "recall")), 1)
        self.assertEqual(self.lost(), {"committed": 4, "rolled_back": 1, "unknown": 0})
        await self.stack.settle()
        self.assertEqual((await self.stack.chat.sync(self.b, 10, 0, None))["msgs"], [])
        self.assertEqual((await self.stack.chat.unread(self.b))["sessions"], [])

    async def unknown_send(self, cid: str) -> None:
        """A send that commits while its outcome cannot be asked: unavailable."""
        self.engine.fail = "unknown"
        with self.assertRaises(ImError) as e:
            await self.stack.chat.send(self.a, self.b, cid, "text", cid)
        self.assertEqual(e.exception.code, ErrorCode.UNAVAILABLE)
        self.assertEqual(self.lost()["unknown"], 1)
        self.assertEqual(self.stack.presence.take(self.b, "msg"), [])

    async def test_unknown_commit_retried_is_pushed_at_once(self) -> None:
        """As on MariaDB: the retry is C{dup: true} and the recipient is
        pushed the message once, at once; the outbox row is finished."""
        await self.unknown_send("u1")
        again = await self.send("u1")
        self.assertTrue(again["dup"])
        pushed = self.stack.presence.take(self.b, "msg")
        self.assertEqual([(f["msg_id"], f["cid"]) for f in pushed], [(again["msg_id"], "u1")])
        self.assertEqual(await self.stack.store.outbox_size(), 0)
        self.assertEqual(await self.send("u1"), again)
        self.assertEqual(self.stack.presence.take(self.b, "msg"), [])

    async def test_lost_commit_whose_reread_fails(self) -> None:
        """As on MariaDB: committed, its rows not readable: C{unavailable},
        not a rerun answering C{dup: true}; the retry is pushed."""
        self.engine.fail = "after"
        self.engine.fail_reads = 1
        with self.assertRaises(ImError) as e:
            await self.stack.chat.send(self.a, self.b, "v1", "text", "v1")
        self.assertEqual(e.exception.code, ErrorCode.UNAVAILABLE)
        self.assertEqual(self.engine.fail_reads, 0)
        self.assertEqual(self.lost()["committed"], 1)
        again = await self.send("v1")
        self.assertTrue(again["dup"])
        pushed = self.stack.presence.take(self.b, "msg")
        self.assertEqual([f["msg_id"] for f in pushed], [again["msg_id"]])

    async def test_retry_of_an_old_send_leaves_its_row_to_the_sweeper(self) -> None:
        """A retry of a message whose unfinished row is past the stale bound
        (a reconnect storm retrying old sends) claims nothing and reads no
        outbox row inside the send commit: the row is the sweepers'."""
        await self.unknown_send("u4")
        now = self.stack.store._now_ms()
        self.patch(self.stack.store, "_now_ms", lambda: now + OUTBOX_STALE_MS + 1)
        again = await self.send("u4")
        self.assertTrue(again["dup"])
        self.assertEqual(self.stack.presence.take(self.b, "msg"), [])
        self.assertEqual(await self.stack.store.outbox_size(), 1)
        self.assertEqual(q.OUTBOX_STALE_MS, OUTBOX_STALE_MS)

    async def test_quick_retry_of_a_committed_send_pushes_once(self) -> None:
        """An ordinary retry (the first reply lost on the way to the client),
        while the first send's fan-out runs on this node: C{dup: true}, and
        the node's own fan-out is the only push."""
        gate: Deferred[None] = Deferred()
        fanout = self.stack.hot.fanout

        async def held(*args: Any) -> Any:
            await gate
            return await fanout(*args)

        self.patch(self.stack.hot, "fanout", held)
        sent = await self.stack.chat.send(self.a, self.b, "q1", "text", "q1")
        again = await self.stack.chat.send(self.a, self.b, "q1", "text", "q1")
        gate.callback(None)
        await self.stack.settle()
        self.assertTrue(again["dup"])
        self.assertEqual(again["msg_id"], sent["msg_id"])
        pushed = self.stack.presence.take(self.b, "msg")
        self.assertEqual([f["msg_id"] for f in pushed], [sent["msg_id"]])
        self.assertEqual(self.stack.store.finished_early, 0)

    async def test_unknown_ack_and_read_are_not_served_stale(self) -> None:
        """An ack and a read whose outcome is unknown (both committed):
        C{unavailable}; their retries find nothing left to do, and the
        user's sync and unread counts must not come from the hot copy that
        never heard of them."""
        sent = await self.send("n1")
        self.stack.presence.take(self.b)
        self.engine.fail = "unknown"
        with self.assertRaises(ImError) as e:
            await self.stack.chat.read(self.b, sent["session_id"], sent["msg_id"])
        self.assertEqual(e.exception.code, ErrorCode.UNAVAILABLE)
        self.assertEqual((await self.stack.chat.unread(self.b))["sessions"], [])
        self.engine.fail = "unknown"
        with self.assertRaises(ImError) as e:
            await self.stack.chat.ack(self.b, [sent["msg_id"]])
        self.assertEqual(e.exception.code, ErrorCode.UNAVAILABLE)
        self.assertEqual(self.lost()["unknown"], 2)
        await self.stack.chat.ack(self.b, [sent["msg_id"]])
        self.assertEqual((await self.stack.chat.sync(self.b, 10, 0, None))["msgs"], [])
        await self.stack.settle()
        await eventually(lambda: self.stack.store.suspect_users[self.b] == 0)
        self.assertEqual((await self.stack.chat.sync(self.b, 10, 0, None))["msgs"], [])
        self.assertEqual((await self.stack.chat.unread(self.b))["sessions"], [])

    async def test_unknown_recall_retried_pushes_and_is_not_served_stale(self) -> None:
        """Regression: a recall whose outcome is unknown (it committed) is
        C{unavailable}; its retry found the message recalled already and
        did nothing: the recipient was never told, and the hot copy kept the
        message in sync, history and the unread count until the sweeper. The
        retry is C{{}} and pushes the recall (again: clients dedupe by msg_id)."""
        await self.stack.chat.sync(self.b, 10, 0, None)  # b has a hot copy
        sent = await self.send("r1")
        self.stack.presence.take(self.b)
        self.engine.fail = "unknown"
        with self.assertRaises(ImError) as e:
            await self.stack.chat.recall(self.a, sent["msg_id"])
        self.assertEqual(e.exception.code, ErrorCode.UNAVAILABLE)
        self.assertEqual(self.lost()["unknown"], 1)
        self.assertEqual((await self.stack.chat.sync(self.b, 10, 0, None))["msgs"], [])
        self.assertEqual(await self.stack.chat.recall(self.a, sent["msg_id"]), {})
        await self.stack.settle()
        [push] = self.stack.presence.take(self.b, "recall")
        self.assertEqual(push["msg_id"], sent["msg_id"])
        await eventually(lambda: not self.stack.store.suspect_users)
        self.assertEqual((await self.stack.chat.sync(self.b, 10, 0, None))["msgs"], [])
        self.assertEqual((await self.stack.chat.unread(self.b))["sessions"], [])
        history = await self.stack.chat.history(self.b, None, sent["session_id"], None, 10)
        self.assertEqual(history["msgs"], [])

    async def test_recall_replies_before_the_hot_store(self) -> None:
        """Regression: a recall waited for its hot-store step before replying
        (a slow Redis held every recall). Until the step is done the users
        read from SQL, so the sender's own history no longer has the message."""
        sent = await self.send("r2")
        gate: Deferred[None] = Deferred()
        recall = self.stack.hot.recall

        async def held(*args: Any) -> Any:
            await gate
            return await recall(*args)

        self.patch(self.stack.hot, "recall", held)
        try:
            reply = await within(self.stack.chat.recall(self.a, sent["msg_id"]), 5)
            self.assertEqual(set(reply), {"seq"})
            history = await self.stack.chat.history(self.a, None, sent["session_id"], None, 10)
        finally:
            gate.callback(None)
        self.assertEqual(history["msgs"], [])
        await self.stack.settle()
        [push] = self.stack.presence.take(self.b, "recall")
        self.assertEqual(push["msg_id"], sent["msg_id"])

    async def test_retry_whose_own_outcome_is_unknown(self) -> None:
        """The first retry claims the row, and its own commit's outcome is
        unknown too (C{unavailable} again): the next retry still finishes the
        row, at once."""
        await self.unknown_send("u4")
        self.engine.fail = "unknown"
        with self.assertRaises(ImError) as e:
            await self.stack.chat.send(self.a, self.b, "u4", "text", "u4")
        self.assertEqual(e.exception.code, ErrorCode.UNAVAILABLE)
        self.assertEqual(self.lost()["unknown"], 2)
        again = await self.send("u4")
        self.assertTrue(again["dup"])
        pushed = self.stack.presence.take(self.b, "msg")
        self.assertEqual([f["msg_id"] for f in pushed], [again["msg_id"]])
        self.assertEqual(await self.stack.store.outbox_size(), 0)

    async def test_unknown_commit_replayed_by_a_sweeper_meanwhile(self) -> None:
        """A sweeper (here: another node's) claimed the row first: the
        retry is C{dup: true} and leaves the push to the sweeper's replay,
        so the message is not pushed by both."""
        await self.unknown_send("u3")
        now = self.stack.store._now_ms()
        claimed = await self.stack.store.background.run(
            "claim", q.outbox_claim_txn, 999, now, now + 1, 10
        )
        self.assertEqual(len(claimed), 1)
        again = await self.send("u3")
        self.assertTrue(again["dup"])
        self.assertEqual(self.stack.presence.take(self.b, "msg"), [])
        self.assertEqual(await self.stack.store.outbox_size(), 1)


def _tokens_txn(txn: Txn) -> list[tuple[int, int]]:
    return [(int(r[0]), int(r[1])) for r in txn.query("SELECT at, token FROM t_commit")]


def _write_txn(txn: Txn, uid: int) -> None:
    txn.execute("INSERT INTO t_user (uid, createTime, updateTime) VALUES (?, ?, ?)", (uid, 0, 0))


def _old_token_txn(txn: Txn, at: int) -> None:
    txn.execute("INSERT INTO t_commit (at, token) VALUES (?, ?)", (at, 1))


class TokenContract:
    """Commit tokens: one per write transaction, none for reads, old ones pruned."""

    def make_db(self) -> Database:
        raise NotImplementedError

    async def test_tokens(self) -> None:
        db = self.make_db()
        self.addCleanup(db.close)  # type: ignore[attr-defined]
        await migrate(db, 0)
        self.assertEqual(await db.run("t", _tokens_txn), [])  # migrations write none
        await db.run("w", _write_txn, 1)
        tokens = await db.run("t", _tokens_txn)
        self.assertEqual(len(tokens), 1)  # reads write none either
        await db.run("old", _old_token_txn, int(time.time()) - TOKEN_KEEP_SECONDS - 5)
        db._pruned_at = -1e9  # due now
        await db.run("w", _write_txn, 2)
        await eventually(lambda: not db._pruning)
        left = await db.run("t", _tokens_txn)
        # Those of the three write transactions; not the old one.
        self.assertEqual(len(left), 3)
        self.assertIn(tokens[0], left)
        self.assertNotIn(1, [token for _, token in left])


def _old_message_txn(txn: Txn, cid: str) -> None:
    txn.execute(
        "INSERT INTO t_msg_record_list (id, sessionId, msgId, senderUid, recipientUid, cid,"
        " msgType, body, ts, createTime) VALUES (1, 1, 1, 7, 8, ?, 'text', ?, 0, "
        + txn.engine.datetime_from_ms
        + ")",
        (cid, b"x", 0),
    )


def _dup_of_txn(txn: Txn, cid: str) -> list[int]:
    return sorted(d.msg_id for d in q._used_cids(txn, [_probe(cid)]).values())


def _probe(cid: str) -> Any:
    from imserver.storage.model import NewMessage

    return NewMessage(2, 7, 8, cid, "text", b"x", 0, 1, 0)


class MigrationContract(TokenContract):
    async def test_exact_cids_on_an_existing_database(self) -> None:
        """Migration 0003 on a database that has messages already."""
        db = self.make_db()
        self.addCleanup(db.close)  # type: ignore[attr-defined]
        first_two = available(db.engine.kind)[:2]
        await db.run("migrate", _migrate_txn, first_two, 0)
        db.commit_tokens = False  # no t_commit yet: as the old code wrote
        await db.run("old", _old_message_txn, "p")
        db.commit_tokens = True
        # Every later migration applies on such a database too.
        applied = await migrate(db, 0)
        self.assertEqual(applied[:3], [3, 4, 5])
        self.assertEqual(await db.run("dup", _dup_of_txn, "p"), [1])
        self.assertEqual(await db.run("dup", _dup_of_txn, "p "), [])
        [message] = await db.run("m", q.messages_txn, [1])
        self.assertEqual(message.cid, "p")

    async def test_devices_on_an_existing_database(self) -> None:
        """Migration 0005 on a database with messages: old rows have no seqs
        (catch-up never shows them), the users' streams start at 0."""
        db = self.make_db()
        self.addCleanup(db.close)  # type: ignore[attr-defined]
        await db.run("migrate", _migrate_txn, available(db.engine.kind)[:4], 0)
        await db.run("old", _old_message_txn, "p")
        await db.run("users", q.ensure_users_txn, [7, 8], 0)
        # 0005 and every later one (the code below reads the latest schema).
        applied = await migrate(db, 0)
        self.assertEqual(applied[0], 5)
        self.assertEqual(await db.run("head", q.head_txn, 8), 0)
        page = await db.run("catchup", q.catchup_txn, 8, 0, 0, 10)
        self.assertEqual((page.events, page.seq, page.more, page.head), ((), 0, False, 0))
        [message] = await db.run("m", q.messages_txn, [1])
        self.assertEqual(message.cid, "p")


class SqliteTokenTests(MigrationContract, TestCase):
    def make_db(self) -> Database:
        return Database(
            reactor, create_engine(SqliteTarget(os.path.abspath(self.mktemp()))), name="t"
        )


class MariaDBTokenTests(MigrationContract, TestCase):
    def make_db(self) -> Database:
        config = parse_config({"storage": {"sql": shared_mariadb().fresh_database()}})
        return Database(reactor, create_engine(config.storage.sql), name="t", max_connections=2)
