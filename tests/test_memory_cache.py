"""The embedded hot store's message and profile caches are bounded by bytes, not only by count."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imserver.config import parse_config
from imserver.storage.hot.memory import MESSAGE_OVERHEAD, MemoryHotStore
from imserver.storage.model import Message, Profile

BODY = 32 * 1024


def message(msg_id: int, size: int = BODY) -> Message:
    return Message(
        msg_id=msg_id,
        session_id=1,
        sender=1,
        recipient=2,
        cid=f"c{msg_id:06d}",
        type="text",
        body=bytes(size),
        ts=msg_id,
    )


def run(coro: Coroutine[Any, Any, Any]) -> None:
    """The memory store's coroutines never wait: drive one to its end."""
    try:
        coro.send(None)
    except StopIteration:
        return
    raise AssertionError("the memory store waited")


class CacheBoundTests(SynchronousTestCase):
    def store(self, **kwargs: int) -> MemoryHotStore:
        return MemoryHotStore(Clock(), **kwargs)

    def cached(self, hot: MemoryHotStore, ids: range) -> list[int]:
        found: dict[int, Message] = {}

        async def read() -> None:
            found.update(await hot.messages(list(ids)))

        run(read())
        return sorted(found)

    def fan_out(self, hot: MemoryHotStore, messages: list[Message]) -> None:
        run(hot.fanout([(m, 0) for m in messages], []))

    def test_large_bodies_are_bounded_by_bytes(self) -> None:
        """Defect 7d: with 32 KB bodies the count bound alone let the cache
        reach gigabytes; now the oldest are evicted once the bytes are over."""
        cap = 1024 * 1024
        hot = self.store(max_cache_bytes=cap)
        self.fan_out(hot, [message(i) for i in range(1, 1001)])
        self.assertLessEqual(hot.cache_bytes, cap)
        kept = self.cached(hot, range(1, 1001))
        per = BODY + MESSAGE_OVERHEAD
        self.assertEqual(len(kept), cap // (per + len("c000001") + len("text")))
        # The most recent are the ones kept (least recently cached go first).
        self.assertEqual(kept, list(range(1001 - len(kept), 1001)))

    def test_small_bodies_still_bounded_by_count(self) -> None:
        hot = self.store(max_messages=10)
        self.fan_out(hot, [message(i, 10) for i in range(1, 101)])
        self.assertEqual(self.cached(hot, range(1, 101)), list(range(91, 101)))

    def test_the_accounting_follows_every_removal(self) -> None:
        hot = self.store(max_cache_bytes=10 * 1024 * 1024)
        messages = [message(i, 1000 * i) for i in range(1, 21)]
        self.fan_out(hot, messages)
        expected = sum(len(m.body) + len(m.cid) + len(m.type) + MESSAGE_OVERHEAD for m in messages)
        self.assertEqual(hot.cache_bytes, expected)
        # Cached again (a replayed fan-out): not counted twice.
        self.fan_out(hot, messages[:5])
        self.assertEqual(hot.cache_bytes, expected)
        run(hot.recall(messages[0], None))
        run(hot.invalidate([], [], [m.msg_id for m in messages[1:10]]))
        run(hot.invalidate([], [], [m.msg_id for m in messages[10:]]))
        self.assertEqual(hot.cache_bytes, 0)
        self.assertEqual(self.cached(hot, range(1, 21)), [])

    def test_a_message_larger_than_the_cap_is_not_kept(self) -> None:
        hot = self.store(max_cache_bytes=4096)
        self.fan_out(hot, [message(1, 100), message(2, 10_000)])
        self.assertEqual(self.cached(hot, range(1, 3)), [1])
        self.assertLessEqual(hot.cache_bytes, 4096)

    def test_profiles_are_bounded_by_bytes_too(self) -> None:
        hot = self.store(max_cache_bytes=4 * 1024 * 1024)
        profiles = [Profile(uid, "n" * 64, "a" * 512 * 4, 1) for uid in range(1, 10_001)]
        run(hot.put_profiles(profiles))
        self.assertLessEqual(hot.profile_bytes, hot.max_profile_bytes)
        self.assertEqual(hot.max_profile_bytes, 1024 * 1024)
        found: dict[int, Profile] = {}

        async def read() -> None:
            found.update(await hot.profiles(list(range(1, 10_001))))

        run(read())
        self.assertLess(len(found), 10_000)
        self.assertIn(10_000, found)
        self.assertNotIn(1, found)

    def test_config_key(self) -> None:
        config = parse_config({"storage": {"embedded_cache_bytes": 1 << 20}})
        self.assertEqual(config.storage.embedded_cache_bytes, 1 << 20)
        self.assertEqual(parse_config({}).storage.embedded_cache_bytes, 128 * 1024 * 1024)
