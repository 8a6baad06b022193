"""
A short-lived in-process profile cache in front of the store's (Redis, then
SQL): sending enriches every message with its sender's profile, so this keeps
that off the network. Entries expire after C{ttl} seconds.

In a cluster (C{shared}) a profile may change on another node: that node
broadcasts it (L{ProfileCache.put} here), but a reply that reads profiles
must not race that broadcast, so L{ProfileCache.get} then reads the store
(whose Redis copy is written before the change is acknowledged) and only
the send path's L{ProfileCache.peek} uses the local copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from imserver.storage.model import Profile
from imserver.storage.store import Store


class ProfileCache:
    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        *,
        ttl: float = 10.0,
        size: int = 100_000,
        shared: bool = False,
    ) -> None:
        self._store = store
        self.shared = shared
        self._clock = clock
        self.ttl = ttl
        self.size = size
        self._entries: OrderedDict[int, tuple[float, Profile]] = OrderedDict()
        self._refreshing: set[int] = set()

    def put(self, profile: Profile) -> None:
        current = self._entries.get(profile.uid)
        if current is not None and current[1].version > profile.version:
            return
        self._entries[profile.uid] = (self._clock.seconds() + self.ttl, profile)
        self._entries.move_to_end(profile.uid)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def peek(self, uid: int) -> Profile | None:
        """
        The cached profile even if it is past its TTL (then a refresh starts
        in the background): for the send path, which must not wait.
        """
        entry = self._entries.get(uid)
        if entry is None:
            return None
        if entry[0] < self._clock.seconds() and uid not in self._refreshing:
            self._refreshing.add(uid)
            d = Deferred.fromCoroutine(self.get([uid]))
            d.addErrback(lambda f: None)  # the stale profile stays; a later peek retries
            d.addBoth(lambda _: self._refreshing.discard(uid))
        return entry[1]

    def cached(self, uid: int) -> Profile | None:
        entry = self._entries.get(uid)
        if entry is None or entry[0] < self._clock.seconds():
            return None
        return entry[1]

    async def get(self, uids: Iterable[int]) -> dict[int, Profile]:
        """Profiles of the users that exist among C{uids}."""
        found: dict[int, Profile] = {}
        missing = []
        for uid in dict.fromkeys(uids):
            profile = None if self.shared else self.cached(uid)
            if profile is None:
                missing.append(uid)
            else:
                found[uid] = profile
        if missing:
            for uid, profile in (await self._store.profiles(missing)).items():
                self.put(profile)
                found[uid] = profile
        return found
