"""
Natural batching (group commit) of concurrent requests.

L{Batcher} runs at most C{concurrency} batches at a time. An item submitted
while they are all busy waits, and every waiting item goes into the next
batch (up to C{max_batch}): under light load each item runs alone at once,
with no added delay; under heavy load batches grow by themselves, so one
SQL transaction or one Redis round trip carries many items.

Results reach the callers in the order the batches started, whatever the
concurrency: with C{concurrency=2} a second batch runs while the first
commits, and its results wait for the first one's. The send path relies on
that for ordering.

One bad item must not fail the others: a batch function may give, in place
of an item's result, a L{Failure} (or an exception instance), which fails
that item's Deferred alone (see L{Batcher}). Raising fails the whole batch:
that is for outages, where no item could succeed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.errors import ErrorCode, ImError

I = TypeVar("I")  # noqa: E741
O = TypeVar("O")  # noqa: E741


class QueueFull(ImError):
    def __init__(self, name: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, f"the {name} queue is full; retry shortly")


#: What a batch function may give for an item it could not do (the item's
#: Deferred fails with it, the other items are not touched).
ItemFailure = Failure | BaseException
_FAILED = (Failure, BaseException)
#: A batch's results: one per item, each a result or an L{ItemFailure}.
Results = Sequence[O | ItemFailure]


class Batcher(Generic[I, O]):
    """
    @param run: runs one batch; returns one result per item, in order. A
        result that is a L{Failure} or an exception instance fails that
        item alone (so results of type O must not be exceptions). If C{run}
        raises, every item of the batch fails with that error.
    @param max_queue: items allowed to wait; beyond it L{submit} fails with
        C{unavailable} instead of growing memory without bound.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        run: Callable[[Sequence[I]], Awaitable[Results[O]]],
        *,
        max_batch: int = 500,
        concurrency: int = 1,
        max_queue: int = 100_000,
        on_batch: Callable[[int], None] | None = None,
        gather: IReactorTime | None = None,
    ) -> None:
        self.name = name
        self.on_batch = on_batch
        #: With a clock, a batch starts on the next reactor turn rather than
        #: at once, so items submitted in one turn (all the messages of one
        #: commit) share it even when batches complete synchronously.
        self.gather = gather
        self._start_call: IDelayedCall | None = None
        self._run = run
        self.max_batch = max_batch
        self.concurrency = concurrency
        self.max_queue = max_queue
        self._waiting: deque[tuple[I, Deferred[O]]] = deque()
        self._running = 0
        self._started = 0
        self._delivered = 0
        self._finished: dict[int, tuple[Results[O] | Failure, list[tuple[I, Deferred[O]]]]] = {}
        self._idle: list[Deferred[None]] = []

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting those running)."""
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return (
            self._running > 0
            or bool(self._waiting)
            or bool(self._finished)
            or self._start_call is not None
        )

    def submit(self, item: I) -> Deferred[O]:
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(self.name)
        d: Deferred[O] = Deferred()
        self._waiting.append((item, d))
        if self._running < self.concurrency:
            if self.gather is None:
                self._start()
            elif self._start_call is None:
                self._start_call = self.gather.callLater(0, self._gathered)
        return d

    def _gathered(self) -> None:
        self._start_call = None
        while self._waiting and self._running < self.concurrency:
            self._start()

    def idle(self) -> Deferred[None]:
        """Fires once nothing is waiting or running."""
        d: Deferred[None] = Deferred()
        if not self.busy:
            d.callback(None)
        else:
            self._idle.append(d)
        return d

    def _start(self) -> None:
        take = min(self.max_batch, len(self._waiting))
        batch = [self._waiting.popleft() for _ in range(take)]
        self._running += 1
        if self.on_batch is not None:
            self.on_batch(take)
        seq = self._started
        self._started += 1
        d = Deferred.fromCoroutine(self._run_batch([item for item, _ in batch]))
        d.addBoth(self._completed, seq, batch)

    async def _run_batch(self, items: list[I]) -> Results[O]:
        return await self._run(items)

    def _completed(
        self, outcome: Results[O] | Failure, seq: int, batch: list[tuple[I, Deferred[O]]]
    ) -> None:
        """
        A batch finished. Results are handed out in the order batches
        started, even when a later one finishes first (concurrency > 1) or
        at once (a synchronous run): a batch that finishes early waits for
        the ones before it.
        """
        self._running -= 1
        self._finished[seq] = (outcome, batch)
        while self._delivered in self._finished:
            outcome, batch = self._finished.pop(self._delivered)
            self._delivered += 1
            self._deliver(outcome, batch)
        while self._waiting and self._running < self.concurrency:
            self._start()
        if not self.busy:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def _deliver(self, outcome: Results[O] | Failure, batch: list[tuple[I, Deferred[O]]]) -> None:
        if not isinstance(outcome, Failure) and len(outcome) != len(batch):
            outcome = Failure(
                RuntimeError(f"{self.name}: {len(outcome)} results for {len(batch)} items")
            )
        if isinstance(outcome, Failure):
            for _, d in batch:
                d.errback(outcome)
        else:
            for (_, d), result in zip(batch, outcome, strict=True):
                # One isinstance per item: nothing is allocated for successes.
                if isinstance(result, _FAILED):
                    d.errback(result)
                else:
                    d.callback(result)
