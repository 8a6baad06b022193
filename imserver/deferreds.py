"""
L{within}: wait for a Deferred for a bounded time without cancelling it.

C{Deferred.addTimeout} cancels the Deferred it bounds, and with it whatever
that Deferred awaits: on shutdown, a drain that awaits other tasks' work
(hot-store steps, a downgrade transaction) would have that work cancelled
mid-way, logged as C{CancelledError} and queued for repair. Here the timeout
is on a separate waiter; the work itself runs to its end.
"""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")


def within(d: Deferred[T], seconds: float, clock: IReactorTime) -> Deferred[T]:
    """
    A Deferred that fires with C{d}'s result, or fails with Twisted's
    C{TimeoutError} after C{seconds}; C{d} is never cancelled. C{d}'s result
    goes to the waiter (a failure after the timeout is dropped: the caller
    already handled the timeout).
    """
    waiter: Deferred[T] = Deferred()

    def done(result: T | Failure) -> None:
        if waiter.called:
            return
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)

    d.addBoth(done)
    waiter.addTimeout(seconds, clock)
    return waiter
