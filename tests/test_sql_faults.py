"""
SQL faults that must stay local: a cid the database compares differently
from the server (issue 9, defect 1), one failing item of a group commit, and
a COMMIT whose reply is lost (defect 2). On both engines where it applies;
the MariaDB cases run on the harness's real mariadbd.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from imserver.config import LimitsConfig
from imserver.errors import ErrorCode, ImError
from imserver.storage.sql.database import Txn
from tests.stack import Stack, make_stack

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


async def _settled(d: Any) -> list[tuple[bool, Any]]:
    """Every result of a list of Deferreds, failures included, in order."""
    results: list[tuple[bool, Any]] = await gatherResults(
        [d.addCallbacks(lambda r: (True, r), lambda f: (False, f.value)) for d in d]
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
        self.assertEqual([f["cid"] for f in stack.presence.take(d, "msg")], ["warm", "c1"])
        sync = await stack.chat.sync(b, 100, 0, None)
        self.assertEqual([m["cid"] for m in sync["msgs"]], ["a1", "a2", "a3"])
        # The sender may retry: still refused, and nothing else is hurt.
        with self.assertRaises(ImError):
            await stack.chat.send(a, b, "poison", "text", "again")


class EmbeddedCidTests(IsolationContract, TestCase):
    backend = "embedded"


class MariaDBCidTests(IsolationContract, TestCase):
    backend = "redis"
