"""
Regression tests for the review of the receipts (issue 11), on both
backends: one delivery receipt per message however many devices or nodes
ack it (finding 4), and no receipts across a block (finding 11).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from imserver.storage.sql import queries as q
from tests.stack import Stack
from tests.support import reactor
from tests.test_receipts import ReceiptsHelpers


class ReceiptFixesContract(ReceiptsHelpers):
    async def pair(self, n: int = 2) -> tuple[Stack, int, int, list[Any]]:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        replies = await self.sent(stack, a, b, n)
        await stack.settle()
        stack.presence.take(a)
        stack.presence.take(b)
        return stack, a, b, replies

    async def test_two_devices_acking_in_one_batch_give_one_receipt(self) -> None:
        """Two devices of b ack the same id and their acks share a batch
        (queued behind a first ack): one delivered push, to the first."""
        stack, a, b, replies = await self.pair()
        first, second = replies[0]["msg_id"], replies[1]["msg_id"]
        got = await gatherResults(
            [
                stack.store.ack(b, [first], 1),
                stack.store.ack(b, [second], 1),
                stack.store.ack(b, [second], 2),
            ]
        )
        self.assertEqual([[m for m, _, _ in r] for r in got], [[first], [second], []])
        await self._chat_acks_in_one_batch(stack, a, b)

    async def _chat_acks_in_one_batch(self, stack: Stack, a: int, b: int) -> None:
        replies = await self.sent(stack, a, b, 2, "x")
        await stack.settle()
        stack.presence.take(a)
        first, second = replies[0]["msg_id"], replies[1]["msg_id"]
        await gatherResults(
            [
                stack.chat.ack(b, [first], 1),
                stack.chat.ack(b, [second], 1),
                stack.chat.ack(b, [second], 2),
            ]
        )
        pushes = stack.presence.take(a, "delivered")
        self.assertEqual([p["msg_id"] for p in pushes], [first, second])

    async def test_no_delivered_receipt_across_a_block(self) -> None:
        stack, a, b, replies = await self.pair()
        await stack.chat.blocks.block(a, b)
        await stack.chat.ack(b, [replies[0]["msg_id"]])
        self.assertEqual(stack.presence.take(a, "delivered"), [])
        # Unknown to the node's cache: loaded, then decided (still blocked).
        stack.chat.blocks._cache.clear()
        await stack.chat.ack(b, [replies[1]["msg_id"]])
        await stack.settle()
        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(stack.presence.take(a, "delivered"), [])

    async def test_delivered_receipt_after_a_cache_miss(self) -> None:
        """Not blocked and not in the cache: the receipt comes after the load."""
        stack, a, b, replies = await self.pair(1)
        stack.chat.blocks._cache.clear()
        await stack.chat.ack(b, [replies[0]["msg_id"]])
        for _ in range(100):
            pushes = stack.presence.take(a, "delivered")
            if pushes:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual([p["msg_id"] for p in pushes], [replies[0]["msg_id"]])

    async def test_no_read_receipt_across_a_block(self) -> None:
        stack, a, b, replies = await self.pair()
        sid = replies[0]["session_id"]
        await stack.chat.blocks.block(b, a)
        stack.presence.take(b)
        head = await stack.store.db.run("head", q.head_txn, a)
        await stack.chat.read(b, sid, replies[0]["msg_id"])
        self.assertEqual(stack.presence.take(a, "read"), [])
        stack.chat.blocks._cache.clear()
        await stack.chat.read(b, sid, replies[1]["msg_id"])
        self.assertEqual(stack.presence.take(a, "read"), [])
        # Not in a's stream either: catch-up has nothing of it, no seq gap.
        self.assertEqual(await stack.store.db.run("head", q.head_txn, a), head)
        # The reader's own devices still hear of it (their badge), with seqs.
        own = stack.presence.take(b, "read")
        self.assertEqual([p["msg_id"] for p in own], [r["msg_id"] for r in replies])
        self.assertTrue(all(p.get("seq") for p in own))
        # Unblocked: receipts again.
        await stack.chat.blocks.unblock(b, a)
        more = await self.sent(stack, a, b, 1, "u")
        await stack.settle()
        await stack.chat.read(b, sid, more[0]["msg_id"])
        [receipt] = stack.presence.take(a, "read")
        self.assertEqual(receipt["msg_id"], more[0]["msg_id"])
        self.assertEqual(receipt["seq"], head + 2)  # the new msg, then this read

    async def test_positions_hidden_while_blocked(self) -> None:
        stack, a, b, replies = await self.pair()
        sid = replies[0]["session_id"]
        ids = [r["msg_id"] for r in replies]
        await stack.chat.ack(b, ids)
        await stack.chat.read(b, sid, ids[0])

        async def seen_by_a() -> tuple[tuple[int, int], tuple[int, int]]:
            [conv] = (await stack.chat.convs(a, 20, None))["convs"]
            history = await stack.chat.history(a, None, sid, None, 20)
            return (conv["peer_read"], conv["peer_delivered"]), (
                history["peer_read"],
                history["peer_delivered"],
            )

        shown = ((ids[0], ids[1]), (ids[0], ids[1]))
        self.assertEqual(await seen_by_a(), shown)
        await stack.chat.blocks.block(b, a)
        self.assertEqual(await seen_by_a(), ((0, 0), (0, 0)))
        stack.chat.blocks._cache.clear()
        self.assertEqual(await seen_by_a(), ((0, 0), (0, 0)))
        await stack.chat.blocks.unblock(b, a)
        self.assertEqual(await seen_by_a(), shown)


class EmbeddedReceiptFixesTests(ReceiptFixesContract, TestCase):
    backend = "embedded"


class MariaDBReceiptFixesTests(ReceiptFixesContract, TestCase):
    backend = "redis"
