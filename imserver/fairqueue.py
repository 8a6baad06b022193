"""
Fair admission of work to a shared resource (issue 9, defect 3).

Every connection's reads, syncs, history pages... end in the same SQL thread
pool. Handed over as they arrive, one client pipelining thousands of requests
fills the pool's queue and everybody else waits behind it. L{FairQueue}
admits at most C{concurrency} jobs at once (so the pool's queue stays short
and a group commit of sends gets in quickly) and, when jobs wait, starts them
round-robin by key (a connection): a flood waits behind itself, not in front
of other users. Within one key jobs start in submission order.

Light load costs nothing: with a free slot and nothing waiting for the key,
a job starts at once, in the caller's stack.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

T = TypeVar("T")

Job = Callable[[], Any]


class FairQueue(Generic[T]):
    """
    @param concurrency: jobs running at once, over all keys.
    @param per_key: jobs of one key running at once (default a quarter of
        C{concurrency}), so a few keys whose jobs hang cannot hold every slot.
    """

    def __init__(self, concurrency: int, per_key: int | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.per_key = per_key or max(1, concurrency // 4)
        self.running = 0
        #: Jobs waiting, over all keys.
        self.depth = 0
        self._waiting: dict[Hashable, deque[tuple[Job, Deferred[T]]]] = {}
        self._running_by: dict[Hashable, int] = {}
        # Keys with a waiting job and a free per-key slot, in turn order.
        self._turns: deque[Hashable] = deque()
        self._pumping = False

    def submit(self, key: Hashable, job: Callable[[], T | Deferred[T]]) -> Deferred[T]:
        """Run C{job()} (which may raise or return a Deferred) when admitted."""
        queue = self._waiting.get(key)
        running = self._running_by.get(key, 0)
        if queue is None and running < self.per_key and self.running < self.concurrency:
            return self._run(key, job)
        d: Deferred[T] = Deferred()
        if queue is None:
            queue = self._waiting[key] = deque()
            if running < self.per_key:
                self._turns.append(key)
        queue.append((job, d))
        self.depth += 1
        return d

    def discard(self, key: Hashable, reason: Failure) -> None:
        """Fail the jobs of C{key} that have not started (its client is gone)."""
        queue = self._waiting.pop(key, None)
        if queue is None:
            return
        if key in self._turns:
            self._turns.remove(key)
        self.depth -= len(queue)
        for _, d in queue:
            d.errback(reason)

    def _run(self, key: Hashable, job: Job) -> Deferred[T]:
        self.running += 1
        self._running_by[key] = self._running_by.get(key, 0) + 1
        d: Deferred[T] = maybeDeferred(job)
        d.addBoth(self._done, key)
        return d

    def _done(self, result: Any, key: Hashable) -> Any:
        self.running -= 1
        running = self._running_by[key] - 1
        if running:
            self._running_by[key] = running
        else:
            del self._running_by[key]
        if running == self.per_key - 1 and key in self._waiting:
            self._turns.append(key)  # it was at its per-key cap: back in the round
        self._pump()
        return result

    def _pump(self) -> None:
        if self._pumping:
            return  # a job that finished at once: the loop below goes on
        self._pumping = True
        try:
            while self._turns and self.running < self.concurrency:
                key = self._turns.popleft()
                queue = self._waiting[key]
                job, d = queue.popleft()
                self.depth -= 1
                if not queue:
                    del self._waiting[key]
                elif self._running_by.get(key, 0) + 1 < self.per_key:
                    self._turns.append(key)
                self._run(key, job).chainDeferred(d)
        finally:
            self._pumping = False
