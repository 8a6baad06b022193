"""
Natural batching (group commit) of concurrent requests.

L{Batcher} runs at most C{concurrency} batches at a time. An item submitted
while they are all busy waits, and every waiting item goes into the next
batch (up to C{max_batch}): under light load each item runs alone at once,
with no added delay; under heavy load batches grow by themselves, so one
SQL transaction or one Redis round trip carries many items.

With C{concurrency=1} batches run strictly one after another in submission
order, which the send path relies on for ordering.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.errors import ErrorCode, ImError

I = TypeVar("I")  # noqa: E741
O = TypeVar("O")  # noqa: E741


class QueueFull(ImError):
    def __init__(self, name: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, f"the {name} queue is full; retry shortly")


class Batcher(Generic[I, O]):
    """
    @param run: runs one batch; returns one result per item, in order. If it
        raises, every item of the batch fails with that error.
    @param max_queue: items allowed to wait; beyond it L{submit} fails with
        C{unavailable} instead of growing memory without bound.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        run: Callable[[Sequence[I]], Awaitable[Sequence[O]]],
        *,
        max_batch: int = 500,
        concurrency: int = 1,
        max_queue: int = 100_000,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.on_batch = on_batch
        self._run = run
        self.max_batch = max_batch
        self.concurrency = concurrency
        self.max_queue = max_queue
        self._waiting: deque[tuple[I, Deferred[O]]] = deque()
        self._running = 0
        self._idle: list[Deferred[None]] = []
        # Read by metrics.
        self.batches = 0
        self.items = 0
        self.last_batch_size = 0

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting those running)."""
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._running > 0 or bool(self._waiting)

    def submit(self, item: I) -> Deferred[O]:
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(self.name)
        d: Deferred[O] = Deferred()
        self._waiting.append((item, d))
        if self._running < self.concurrency:
            self._start()
        return d

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
        self.batches += 1
        self.items += take
        self.last_batch_size = take
        if self.on_batch is not None:
            self.on_batch(take)
        d = Deferred.fromCoroutine(self._run_batch([item for item, _ in batch]))
        d.addCallbacks(
            self._batch_done, self._batch_failed, callbackArgs=(batch,), errbackArgs=(batch,)
        )

    async def _run_batch(self, items: list[I]) -> Sequence[O]:
        return await self._run(items)

    def _batch_done(self, results: Sequence[O], batch: list[tuple[I, Deferred[O]]]) -> None:
        if len(results) != len(batch):
            self._batch_failed(
                Failure(
                    RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
                ),
                batch,
            )
            return
        # Callers see results before the next batch can start, so results
        # reach them in batch order even when a batch completes synchronously.
        for (_, d), result in zip(batch, results, strict=True):
            d.callback(result)
        self._finish()

    def _batch_failed(self, failure: Failure, batch: list[tuple[I, Deferred[O]]]) -> None:
        for _, d in batch:
            d.errback(failure)
        self._finish()

    def _finish(self) -> None:
        self._running -= 1
        if self._waiting and self._running < self.concurrency:
            self._start()
        elif not self.busy:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)
