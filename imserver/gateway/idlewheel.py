"""
One timer for every connection's idle timeout (issue 13).

A L{twisted.internet.base.DelayedCall} per connection costs its instance
dict, a bound method, an argument tuple and a keyword dict: about 400
bytes and four objects the garbage collector walks, for each of 19,000
idle connections. The wheel instead files each connection in a bucket by
its deadline rounded up to C{resolution} seconds and keeps one reactor
timer, for the earliest bucket. A connection in a bucket costs one dict
entry; it is checked once per timeout period, like the lazy timer it
replaces: activity only records a timestamp.

A deadline is never met early and at most C{resolution} late.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


class Timed(Protocol):
    """What the wheel keeps: its bucket, so that it can leave it at once."""

    idle_bucket: dict[Timed, None] | None


class IdleWheel:
    """
    Deadline buckets of C{resolution} seconds and one C{callLater} for the
    earliest. C{expired(item)} is called for each item whose bucket is due
    (it may L{add} the item again, for a later deadline, or close it).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        expired: Callable[[Timed], None],
        resolution: float = 1.0,
    ) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self.clock = clock
        self.resolution = resolution
        self._expired = expired
        #: Bucket number (deadline / resolution, rounded up) -> its items.
        self._buckets: dict[int, dict[Timed, None]] = {}
        #: The bucket numbers, earliest first (a heap; a number may repeat).
        self._keys: list[int] = []
        self._call: IDelayedCall | None = None
        self._armed_key: int | None = None
        self._firing = False
        #: Items filed (a bucket emptied by discards stays until due).
        self.size = 0

    def add(self, item: Timed, deadline: float) -> None:
        """File C{item} to expire at C{deadline} (reactor seconds), or just after."""
        self.discard(item)
        key = math.ceil(deadline / self.resolution)
        if key * self.resolution < deadline:  # float rounding: never early
            key += 1
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            heapq.heappush(self._keys, key)
        bucket[item] = None
        item.idle_bucket = bucket
        self.size += 1
        if not self._firing and (self._armed_key is None or key < self._armed_key):
            self._arm(key)

    def discard(self, item: Timed) -> None:
        """C{item} leaves the wheel (closed); nothing if it is not in it."""
        bucket = item.idle_bucket
        if bucket is None:
            return
        item.idle_bucket = None
        if item in bucket:
            del bucket[item]
            self.size -= 1
            if not self.size and not self._firing:
                self._clear()

    def _clear(self) -> None:
        """Nothing left: no timer pending (a stopped server leaves no call behind)."""
        self._buckets.clear()
        self._keys.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._armed_key = None

    def _arm(self, key: int) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        delay = max(0.0, key * self.resolution - self.clock.seconds())
        self._armed_key = key
        self._call = self.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._call = self._armed_key = None
        now = self.clock.seconds()
        self._firing = True
        try:
            while self._keys and self._keys[0] * self.resolution <= now:
                bucket = self._buckets.pop(heapq.heappop(self._keys), None)
                if not bucket:
                    continue
                self.size -= len(bucket)
                for item in bucket:
                    # Out of the wheel first: expired() may add it again
                    # (to a later bucket) or close it (discard: nothing).
                    item.idle_bucket = None
                    try:
                        self._expired(item)
                    except Exception:
                        self.log.failure("idle check failed")
        finally:
            self._firing = False
            if not self.size:
                self._clear()
            elif self._keys:
                self._arm(self._keys[0])
