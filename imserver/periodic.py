"""
L{Periodic}: background work that runs every N seconds and survives its own
failures.

A bare C{LoopingCall} stops for good the first time its function fails, which
for a server's background loops (outbox sweeper, notification poll, presence
refresh) means the work silently ends until the process restarts. Here a tick
that fails is logged and the next one runs on time. Ticks never overlap: the
next is scheduled once the previous has finished.

A backend outage (L{Unavailable}: the database is down) is an ordinary,
expected condition that the next tick retries: it is a warning without a
traceback, as on the real-time path. Anything else is a bug and stays
critical, with its traceback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.errors import Unavailable


class Periodic:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        seconds: float,
        tick: Callable[[], Awaitable[object]],
        what: str,
        outages: tuple[type[Exception], ...] = (Unavailable,),
    ) -> None:
        self.seconds = seconds
        #: Errors that mean "a backend is down": warned of, no traceback.
        self.outages = outages
        self.what = what
        self._tick = tick
        self._loop = LoopingCall(self._start_tick)
        self._loop.clock = clock
        self._ticking = False
        self._stopped: list[Deferred[None]] = []
        #: Ticks that raised (read by tests and logs).
        self.failures = 0

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def start(self, now: bool = False) -> None:
        self._loop.start(self.seconds, now=now).addErrback(
            lambda f: self.log.failure("{what} stopped", f, what=self.what)
        )

    def stop(self) -> Deferred[None]:
        """Stop ticking; fires once the tick in progress, if any, has finished
        (so that a shutdown closes the pools a tick uses only after it)."""
        if self._loop.running:
            self._loop.stop()
        if not self._ticking:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stopped.append(d)
        return d

    def _start_tick(self) -> Deferred[None]:
        self._ticking = True
        return Deferred.fromCoroutine(self._run()).addBoth(self._tick_ended)

    def _tick_ended(self, result: object) -> object:
        self._ticking = False
        waiting, self._stopped = self._stopped, []
        for d in waiting:
            d.callback(None)
        return result

    async def _run(self) -> None:
        try:
            await self._tick()
        except self.outages as e:
            self.failures += 1
            self.log.warn(
                "{what} failed: {error}; next try in {seconds}s",
                what=self.what,
                error=str(e),
                seconds=self.seconds,
            )
        except Exception:
            self.failures += 1
            self.log.failure(
                "{what} failed; next try in {seconds}s",
                Failure(),
                what=self.what,
                seconds=self.seconds,
            )
