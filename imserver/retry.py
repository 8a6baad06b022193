"""
The retry queue: failed steps run again after an exponential backoff with
jitter, a bounded number of times, then go to the dead letters.

L{RetryPolicy} computes the delays; it is shared by the in-memory
L{RetryQueue} (hot-store repairs) and the durable retries of webhook
notifications (which keep their next time in SQL).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from imserver.errors import ErrorCode, ImError

#: Tasks L{RetryQueue.expedite} starts together, and the seconds between
#: such chunks: all at once would exceed what one Redis connection takes in
#: flight (MAX_IN_FLIGHT), and part would fail again as too busy.
EXPEDITE_CHUNK = 100
EXPEDITE_SPACING = 0.05


@attrs.frozen
class RetryPolicy:
    """
    Attempt N (1-based) that failed waits C{base * factor**(N-1)} seconds,
    at most C{max_delay}, scaled by a random factor in [1 - jitter, 1 + jitter];
    after C{max_attempts} failed attempts the work is dead.
    """

    base: float = 0.5
    factor: float = 2.0
    max_delay: float = 60.0
    max_attempts: int = 10
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random) -> float:
        raw = min(self.max_delay, self.base * self.factor ** (attempt - 1))
        return raw * rng.uniform(1 - self.jitter, 1 + self.jitter)

    def exhausted(self, attempts: int) -> bool:
        return attempts >= self.max_attempts


@attrs.define(eq=False)
class Task:
    """A unit of retryable work: C{run()} raises to fail."""

    kind: str
    ref: int
    run: Callable[[], Awaitable[object]]
    describe: Callable[[], bytes] = lambda: b""
    attempts: int = 0
    last_error: str = ""
    call: IDelayedCall | None = None
    #: Called when the retries are exhausted, before the dead letter is
    #: written: the owner's chance not to forget the work (e.g. park it).
    on_dead: Callable[[], None] | None = None


class RetryQueueFull(ImError):
    def __init__(self) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, "the retry queue is full")


class RetryQueue:
    """
    In-memory retries on an injected clock.

    @param dead: called with a task whose attempts are exhausted (records it
        as a dead letter).
    @param max_tasks: bound on waiting tasks; beyond it L{add} raises.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        policy: RetryPolicy,
        dead: Callable[[Task], Awaitable[None]],
        *,
        max_tasks: int = 100_000,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self.policy = policy
        self._dead = dead
        self.max_tasks = max_tasks
        self._rng = rng or random.Random()
        self._tasks: set[Task] = set()
        # Read by metrics.
        self.retries = 0
        self.dead_letters = 0

    @property
    def depth(self) -> int:
        return len(self._tasks)

    @property
    def full(self) -> bool:
        """L{add} would raise L{RetryQueueFull}."""
        return len(self._tasks) >= self.max_tasks

    def add(self, task: Task, error: str = "") -> None:
        """A first attempt of C{task} failed: schedule the next one."""
        if self.full:
            raise RetryQueueFull()
        task.attempts = max(task.attempts, 1)
        task.last_error = error or task.last_error
        self._tasks.add(task)
        self._schedule(task)

    def _schedule(self, task: Task) -> None:
        delay = self.policy.delay(task.attempts, self._rng)
        task.call = self._clock.callLater(delay, self._fire, task)

    def _fire(self, task: Task) -> None:
        task.call = None
        self.retries += 1
        d = Deferred.fromCoroutine(self._attempt(task))
        d.addErrback(lambda f: self.log.failure("retry of {kind} crashed", f, kind=task.kind))

    async def _attempt(self, task: Task) -> None:
        try:
            await task.run()
        except Exception as e:
            if task not in self._tasks:
                # Cancelled while it ran (the owner is stopping): drop it.
                return
            task.attempts += 1
            task.last_error = f"{e.__class__.__name__}: {e}"
            if self.policy.exhausted(task.attempts):
                self._tasks.discard(task)
                self.dead_letters += 1
                self.log.error(
                    "{kind} {ref} failed {attempts} times, dead-lettered: {error}",
                    kind=task.kind,
                    ref=task.ref,
                    attempts=task.attempts,
                    error=task.last_error,
                )
                if task.on_dead is not None:
                    task.on_dead()
                await self._dead(task)
            else:
                self._schedule(task)
        else:
            self._tasks.discard(task)

    def expedite(self, kind: str | None = None) -> int:
        """
        Run the waiting tasks (of C{kind}, or all) now instead of after their
        backoff: what they wait for is back. L{EXPEDITE_CHUNK} at a time,
        L{EXPEDITE_SPACING} apart. Returns how many.
        """
        n = 0
        for task in list(self._tasks):
            if (kind is None or task.kind == kind) and task.call is not None:
                if task.call.active():
                    task.call.cancel()
                delay = (n // EXPEDITE_CHUNK) * EXPEDITE_SPACING
                task.call = self._clock.callLater(delay, self._fire, task)
                n += 1
        return n

    def cancel_all(self) -> None:
        for task in self._tasks:
            if task.call is not None and task.call.active():
                task.call.cancel()
        self._tasks.clear()
