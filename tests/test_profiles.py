"""The in-process profile cache (L{imserver.chat.profiles.ProfileCache})."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from imserver.chat.profiles import ProfileCache
from imserver.storage.model import Profile
from imserver.storage.store import Store


class FakeStore:
    """The store's C{profiles} (Redis, then SQL), counting the reads."""

    def __init__(self) -> None:
        self.rows: dict[int, Profile] = {}
        self.reads: list[list[int]] = []

    async def profiles(self, uids: Sequence[int]) -> dict[int, Profile]:
        self.reads.append(list(uids))
        return {uid: self.rows[uid] for uid in uids if uid in self.rows}


class ProfileCacheTests(TestCase):
    def cache(self, **kwargs: Any) -> tuple[ProfileCache, FakeStore, Clock]:
        store, clock = FakeStore(), Clock()
        return ProfileCache(cast(Store, store), clock, ttl=10, **kwargs), store, clock

    def get(self, cache: ProfileCache, *uids: int) -> dict[int, Profile]:
        return self.successResultOf(Deferred.fromCoroutine(cache.get(uids)))

    def test_get_reads_missing_profiles_once_until_they_expire(self) -> None:
        cache, store, clock = self.cache()
        store.rows[1] = Profile(1, "ann", "", 1)
        self.assertEqual(self.get(cache, 1, 2), {1: store.rows[1]})
        self.assertEqual(self.get(cache, 1), {1: store.rows[1]})
        self.assertEqual(store.reads, [[1, 2]])
        clock.advance(11)
        store.rows[1] = Profile(1, "ann2", "", 2)
        self.assertEqual(self.get(cache, 1), {1: store.rows[1]})
        self.assertEqual(store.reads, [[1, 2], [1]])

    def test_shared_get_always_reads_the_store(self) -> None:
        # Another node may have changed it a moment ago.
        cache, store, _ = self.cache(shared=True)
        store.rows[1] = Profile(1, "ann", "", 1)
        cache.put(store.rows[1])
        store.rows[1] = Profile(1, "ann2", "", 2)
        self.assertEqual(self.get(cache, 1), {1: store.rows[1]})
        self.assertEqual(store.reads, [[1]])
        # ... and what it read serves the send path.
        self.assertEqual(cache.peek(1), store.rows[1])

    def test_put_keeps_the_newest_version(self) -> None:
        cache = self.cache()[0]
        cache.put(Profile(1, "new", "", 5))
        cache.put(Profile(1, "old", "", 4))
        self.assertEqual(cache.peek(1), Profile(1, "new", "", 5))

    def test_peek_serves_a_stale_profile_and_refreshes_it(self) -> None:
        cache, store, clock = self.cache()
        self.assertIsNone(cache.peek(1))
        cache.put(Profile(1, "old", "", 1))
        store.rows[1] = Profile(1, "new", "", 2)
        clock.advance(11)
        self.assertEqual(cache.peek(1), Profile(1, "old", "", 1))
        self.assertEqual(cache.peek(1), Profile(1, "new", "", 2))
        self.assertEqual(store.reads, [[1]])
