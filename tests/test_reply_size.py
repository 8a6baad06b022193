"""
Defect 7c: every reply fits in one frame of C{max_frame_bytes}.

List replies (sync, history, convs, and unread, offline_summary, profile)
are cut by encoded size as well as by count; a page holds at least one item,
any message that can be sent fits in a page on its own, and the page's
cursor continues exactly where it stopped. On both backends, with large
bodies.
"""

from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from imserver.chat.service import ITEM_RESERVE, REPLY_RESERVE, ChatService
from imserver.config import LimitsConfig
from imserver.errors import ErrorCode, ImError
from imserver.services.filter import ContentFilter
from imserver.wire import frames
from imserver.wire.codec import pack
from tests.stack import Stack, make_stack

_uids = itertools.count(50_000)
BIG = LimitsConfig(send_per_second=1e6, send_burst=10**6, recall_seconds=3600)
FRAME = 65536
BODY = 30_000
#: The longest profile fields set_profile allows, in 4-byte UTF-8 characters.
WIDE = "\U0001f600"


def reply_size(result: dict[str, Any]) -> int:
    """The body size of the reply frame carrying C{result}, with the largest id."""
    return len(pack(frames.ok(2**63 - 1, result)))


if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object


class ReplySizeContract(_Base):
    backend = ""

    async def stack(self) -> Stack:
        return await make_stack(self, self.backend, limits=BIG)

    async def users(self, stack: Stack, n: int) -> list[int]:
        uids = [next(_uids) for _ in range(n)]
        await gatherResults([ensureDeferred(stack.chat.login(uid)) for uid in uids])
        return uids

    def check_frame(self, result: dict[str, Any], limit: int = FRAME) -> None:
        size = reply_size(result)
        self.assertLessEqual(size, limit, f"a reply of {size} bytes")

    async def send_many(self, stack: Stack, a: int, b: int, sizes: list[int]) -> list[int]:
        ids = []
        for i, size in enumerate(sizes):
            r = await stack.chat.send(a, b, f"c{i}", "text", f"{i}:".ljust(size, "x"))
            ids.append(r["msg_id"])
        await stack.settle()
        return ids

    # -- paged replies ---------------------------------------------------------

    async def test_sync_pages_are_bounded_by_bytes(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        sizes = [BODY] * 9 + [10] * 30 + [BODY, 5, BODY, 20_000, 20_000, 50]
        ids = await self.send_many(stack, a, b, sizes)
        seen: list[int] = []
        after, pages = 0, 0
        while True:
            page = await stack.chat.sync(b, 500, after, None)
            self.check_frame(page)
            self.assertTrue(page["msgs"])
            seen += [m["msg_id"] for m in page["msgs"]]
            after = seen[-1]
            pages += 1
            if not page["more"]:
                break
        # Nothing skipped, nothing repeated, in order.
        self.assertEqual(seen, ids)
        self.assertGreater(pages, 5)
        # Cut by count too, as before.
        page = await stack.chat.sync(b, 3, 0, None)
        self.assertEqual([m["msg_id"] for m in page["msgs"]], ids[:2])  # two 30 KB bodies fit
        page = await stack.chat.sync(b, 3, ids[10], None)
        self.assertEqual([m["msg_id"] for m in page["msgs"]], ids[11:14])
        self.assertTrue(page["more"])
        # One sender's conversation.
        page = await stack.chat.sync(b, 500, 0, a)
        self.check_frame(page)
        self.assertEqual([m["msg_id"] for m in page["msgs"]], ids[:2])

    async def test_history_pages_are_bounded_by_bytes(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        sizes = [BODY, 10, 10, BODY, BODY, BODY, 100, 200, BODY, 3, BODY]
        ids = await self.send_many(stack, a, b, sizes)
        for who, peer in ((a, b), (b, a)):
            seen: list[int] = []
            before = None
            while True:
                page = await stack.chat.history(who, peer, None, before, 100)
                self.check_frame(page)
                self.assertTrue(page["msgs"])
                seen += [m["msg_id"] for m in page["msgs"]]
                before = seen[-1]
                if not page["more"]:
                    break
            self.assertEqual(seen, ids[::-1])

    async def test_convs_pages_are_bounded_by_bytes(self) -> None:
        stack = await self.stack()
        (b,) = await self.users(stack, 1)
        senders = await self.users(stack, 12)
        last = {}
        for i, a in enumerate(senders):
            r = await stack.chat.send(a, b, "big", "text", "y" * (BODY if i % 3 else 10))
            last[r["session_id"]] = r["msg_id"]
        await stack.settle()
        seen: list[int] = []
        before = None
        while True:
            page = await stack.chat.convs(b, 100, before)
            self.check_frame(page)
            self.assertTrue(page["convs"])
            seen += [c["session_id"] for c in page["convs"]]
            before = page["convs"][-1]["last_msg_id"]
            if not page["more"]:
                break
        self.assertEqual(seen, sorted(last, key=last.__getitem__, reverse=True))

    async def test_the_largest_message_still_fits_a_page_of_its_own(self) -> None:
        """A page always holds one item; the largest body the send limit
        allows, with the longest profile, cid and type, fits in a frame."""
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        for uid in (a, b):
            await stack.chat.set_profile(uid, WIDE * 64, WIDE * 512)
        # The largest body: a map of one long string, packed to the limit.
        body = {"k": "z" * (BIG.max_body_bytes - 6)}
        self.assertEqual(len(pack(body)), BIG.max_body_bytes)
        for i in range(3):
            await stack.chat.send(a, b, WIDE * 63 + str(i), WIDE * 32, body)
        await stack.settle()
        page = await stack.chat.sync(b, 100, 0, None)
        self.check_frame(page)
        self.assertEqual(len(page["msgs"]), 1)
        self.assertTrue(page["more"])
        page = await stack.chat.history(b, a, None, None, 100)
        self.check_frame(page)
        self.assertEqual(len(page["msgs"]), 1)
        page = await stack.chat.convs(b, 100, None)
        self.check_frame(page)
        (conv,) = page["convs"]
        self.assertLessEqual(len(pack(conv)), BIG.max_body_bytes + ITEM_RESERVE)

    async def test_a_body_that_could_not_be_delivered_is_refused(self) -> None:
        """max_frame_bytes below max_body_bytes + ITEM_RESERVE: the send
        limit is lowered to what a reply can carry."""
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        frame = 16384
        chat = ChatService(
            store=stack.store,
            presence=stack.presence,
            ids=stack.store.ids,  # type: ignore[arg-type]
            content=ContentFilter([], "reject"),
            limits=BIG,
            clock=stack.chat.clock,
            max_reply_bytes=frame,
        )
        limit = frame - REPLY_RESERVE - ITEM_RESERVE
        self.assertEqual(chat.limits.max_body_bytes, limit)
        with self.assertRaises(ImError) as e:
            await chat.send(a, b, "too-big", "text", "q" * limit)
        self.assertEqual(e.exception.code, ErrorCode.TOO_LARGE)
        await chat.send(a, b, "fits", "text", "q" * (limit - 8))
        await chat.drain()
        page = await chat.sync(b, 100, 0, None)
        self.assertEqual(len(page["msgs"]), 1)
        self.check_frame(page, frame)

    async def test_random_sizes_and_limits_page_exactly(self) -> None:
        """Any mix of sizes, limits and reply bounds: every page fits (or is a
        single item), and paging returns everything once, in order."""
        stack = await self.stack()
        rng = random.Random(7)
        a, b = await self.users(stack, 2)
        sizes = [rng.choice([1, 50, 400, 1500, 3000, 6000]) for _ in range(60)]
        ids = await self.send_many(stack, a, b, sizes)
        for _ in range(12):
            bound = rng.choice([512, 2048, 4096, 9000, 20000])
            limit = rng.randint(1, 70)
            stack.chat.max_reply_bytes = bound
            synced: list[int] = []
            after = 0
            while True:
                page = await stack.chat.sync(b, limit, after, None)
                self.assertTrue(0 < len(page["msgs"]) <= limit)
                if len(page["msgs"]) > 1:
                    self.check_frame(page, bound)
                synced += [m["msg_id"] for m in page["msgs"]]
                after = synced[-1]
                if not page["more"]:
                    break
            self.assertEqual(synced, ids)
            listed: list[int] = []
            before = None
            while True:
                page = await stack.chat.history(a, b, None, before, limit)
                self.assertTrue(0 < len(page["msgs"]) <= limit)
                if len(page["msgs"]) > 1:
                    self.check_frame(page, bound)
                listed += [m["msg_id"] for m in page["msgs"]]
                before = listed[-1]
                if not page["more"]:
                    break
            self.assertEqual(listed, ids[::-1])

    # -- lists without a cursor: cut, with more: true --------------------------

    async def test_unread_and_offline_summary_are_bounded(self) -> None:
        stack = await self.stack()
        (b,) = await self.users(stack, 1)
        senders = await self.users(stack, 120)
        await gatherResults([stack.chat.send(a, b, "m", "text", "hi") for a in senders])
        await stack.settle()
        stack.chat.max_reply_bytes = 2048
        unread = await stack.chat.unread(b)
        self.check_frame(unread, 2048)
        self.assertTrue(unread["more"])
        self.assertEqual(unread["total"], 120)
        self.assertLess(len(unread["sessions"]), 120)
        summary = await stack.chat.offline_summary(b)
        self.check_frame(summary, 2048)
        self.assertTrue(summary["more"])
        self.assertLess(len(summary["senders"]), 120)
        # The most recent first, as uncut.
        stack.chat.max_reply_bytes = FRAME
        full = await stack.chat.offline_summary(b)
        self.assertNotIn("more", full)
        self.assertEqual(full["senders"][: len(summary["senders"])], summary["senders"])
        full_unread = await stack.chat.unread(b)
        self.assertNotIn("more", full_unread)
        self.assertEqual(full_unread["sessions"][: len(unread["sessions"])], unread["sessions"])

    async def test_profile_is_bounded(self) -> None:
        stack = await self.stack()
        uids = await self.users(stack, 100)
        for uid in uids:
            await stack.chat.set_profile(uid, WIDE * 64, WIDE * 512)
        reply = await stack.chat.profile(uids)
        self.check_frame(reply)
        self.assertTrue(reply["more"])
        got = [u["uid"] for u in reply["users"]]
        self.assertEqual(got, uids[: len(got)])
        # Ask again for the rest: all of them, in order, once.
        while reply.get("more"):
            reply = await stack.chat.profile(uids[uids.index(got[-1]) + 1 :])
            self.check_frame(reply)
            got += [u["uid"] for u in reply["users"]]
        self.assertEqual(got, uids)


class EmbeddedReplySizeTests(ReplySizeContract, TestCase):
    backend = "embedded"


class RedisReplySizeTests(ReplySizeContract, TestCase):
    backend = "redis"
