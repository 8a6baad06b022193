"""
sync past pending entries that have no readable message (recalled, or
missing): a whole C{limit} of them gave an empty page with C{more: true},
and a client paging from its last msg_id asked for the same page forever.
Now sync reads on past them (a bounded number); past that bound the empty
page carries C{after}, the cursor to continue from.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from twisted.trial.unittest import TestCase

import imserver.chat.service as service
from imserver.config import LimitsConfig
from imserver.storage.model import RECORD_RECALLED
from imserver.storage.sql.database import Txn, marks
from tests.stack import Stack, make_stack

_uids = itertools.count(90_000)
BIG = LimitsConfig(send_per_second=1e6, send_burst=10**6, recall_seconds=3600)


def _recalled_but_pending_txn(txn: Txn, msg_ids: Sequence[int]) -> None:
    """Messages recalled whose pending rows were left (as a partial write could)."""
    txn.execute(
        f"UPDATE t_msg_record_list SET recordStatus = ? WHERE id IN ({marks(len(msg_ids))})",
        (RECORD_RECALLED, *msg_ids),
    )


def _missing_but_pending_txn(txn: Txn, msg_ids: Sequence[int]) -> None:
    """Pending rows whose messages are gone."""
    txn.execute(f"DELETE FROM t_msg_record_list WHERE id IN ({marks(len(msg_ids))})", msg_ids)


class SyncSkipContract:
    backend = ""

    async def stack(self) -> Stack:
        return await make_stack(self, self.backend, limits=BIG)  # type: ignore[arg-type]

    async def setup_pending(self, unreadable: int, readable: int) -> tuple[Stack, int, list[int]]:
        """C{unreadable} pending messages with no readable message, then
        C{readable} normal ones; returns the recipient and the readable ids."""
        stack = await self.stack()
        a, b = next(_uids), next(_uids)
        for uid in (a, b):
            await stack.chat.login(uid)
        ids = [
            (await stack.chat.send(a, b, f"c{k}", "text", k))["msg_id"]
            for k in range(unreadable + readable)
        ]
        await stack.settle()
        bad = ids[:unreadable]
        half = len(bad) // 2
        await stack.store.db.run("recalled", _recalled_but_pending_txn, bad[:half])
        await stack.store.db.run("missing", _missing_but_pending_txn, bad[half:])
        # Every copy is read from SQL again.
        await stack.flush_hot()
        return stack, b, ids[unreadable:]

    async def sync_all(self, stack: Stack, uid: int, limit: int) -> tuple[list[int], int]:
        """Page through sync as a client does; the ids and the number of pages."""
        synced: list[int] = []
        after = 0
        for pages in range(1, 1000):
            page = await stack.chat.sync(uid, limit, after, None)
            synced += [m["msg_id"] for m in page["msgs"]]
            if not page["more"]:
                return synced, pages
            if page["msgs"]:
                after = page["msgs"][-1]["msg_id"]
                self.assertNotIn("after", page)
            else:
                # An empty page must say where to go on from.
                self.assertGreater(page["after"], after)
                after = page["after"]
        self.fail("sync never reached the end")

    async def test_a_whole_limit_of_unreadable_entries_is_skipped(self) -> None:
        stack, b, good = await self.setup_pending(unreadable=6, readable=3)
        page = await stack.chat.sync(b, 6, 0, None)
        self.assertEqual([m["msg_id"] for m in page["msgs"]], good)
        self.assertFalse(page["more"])
        # A page still holds at most limit messages.
        page = await stack.chat.sync(b, 2, 0, None)
        self.assertEqual([m["msg_id"] for m in page["msgs"]], good[:2])
        self.assertTrue(page["more"])
        page = await stack.chat.sync(b, 2, good[1], None)
        self.assertEqual([m["msg_id"] for m in page["msgs"]], good[2:])
        self.assertFalse(page["more"])

    async def test_only_unreadable_entries(self) -> None:
        stack, b, _ = await self.setup_pending(unreadable=5, readable=0)
        page = await stack.chat.sync(b, 2, 0, None)
        self.assertEqual(page, {"msgs": [], "more": False})

    async def test_past_the_bound_an_empty_page_gives_a_cursor(self) -> None:
        self.patch(service, "SYNC_SKIP", 10)
        stack, b, good = await self.setup_pending(unreadable=40, readable=4)
        synced, pages = await self.sync_all(stack, b, 3)
        self.assertEqual(synced, good)
        self.assertGreater(pages, 2)


class EmbeddedSyncSkipTests(SyncSkipContract, TestCase):
    backend = "embedded"


class MariaDBSyncSkipTests(SyncSkipContract, TestCase):
    backend = "redis"
