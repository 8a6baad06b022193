"""
One connection of a L{imserver.client.Client}: its requests (failed with
C{disconnected} when it goes, also when the client drops it without waiting
for the transport to say so, as a dead peer may never answer) and its
heartbeat (docs/sdk.md: a ping after C{heartbeat} seconds without sending,
dropped when the ping is not answered within C{ping_timeout} or nothing at
all came for C{heartbeat + ping_timeout}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.client.protocol import (
    ConnectionClosed,
    IMClientProtocol,
    RequestFailed,
    client_error,
)

log = Logger()


class Connection:
    """
    One transport connection: requests counted for the heartbeat, failed
    with C{disconnected} when it goes (also when the client drops it without
    waiting for the transport to say so).
    """

    def __init__(
        self,
        proto: IMClientProtocol,
        clock: IReactorTime,
        ping_timeout: float,
        on_push: Callable[[Connection, dict[str, Any]], None],
    ) -> None:
        self._clock = clock
        self._ping_timeout = ping_timeout
        self._on_push = on_push
        self.proto = proto
        self.lost: Deferred[None] = Deferred()
        self.gone = False
        self.authed = False
        self.reason = "connection lost"
        self.kicked: str | None = None
        self.goaway = False
        #: Pushes held while catching up (None once live: handled at once).
        self.held: list[dict[str, Any]] | None = []
        now = self._clock.seconds()
        self.last_sent = now
        self.last_received = now
        self._heartbeat: float | None = None
        self._ping_deadline: float | None = None
        self._timer: IDelayedCall | None = None
        self._drop_timer: IDelayedCall | None = None
        self._inflight: set[Deferred[dict[str, Any]]] = set()
        proto.on_push = self._push
        proto.closed.addBoth(self._closed)

    def _closed(self, _: object) -> None:
        self.gone_now()

    def _push(self, frame: dict[str, Any]) -> None:
        self.last_received = self._clock.seconds()
        if not self.gone:
            self._on_push(self, frame)

    def request(self, op: str, **fields: Any) -> Deferred[dict[str, Any]]:
        if self.gone:
            return fail(client_error("disconnected", "not connected"))
        outer: Deferred[dict[str, Any]] = Deferred()
        self._inflight.add(outer)
        self.last_sent = self._clock.seconds()

        def done(result: object) -> None:
            self._inflight.discard(outer)
            if isinstance(result, Failure):
                if result.check(RequestFailed):
                    self.last_received = self._clock.seconds()
                elif result.check(ConnectionClosed):
                    if self.kicked is not None:
                        result = Failure(client_error("kicked", f"kicked: {self.kicked}"))
                    else:
                        result = Failure(client_error("disconnected", "the connection closed"))
            else:
                self.last_received = self._clock.seconds()
            if outer.called:
                return
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)  # type: ignore[arg-type]

        self.proto.request(op, **fields).addBoth(done)
        return outer

    def start_heartbeat(self, interval: float) -> None:
        self._heartbeat = interval if interval > 0 else None
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.gone or self._heartbeat is None:
            return
        timeout = self._ping_timeout
        due = self.last_received + self._heartbeat + timeout
        if self._ping_deadline is not None:
            due = min(due, self._ping_deadline)
        else:
            due = min(due, self.last_sent + self._heartbeat)
        self._timer = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.gone or self._heartbeat is None:
            return
        # The same sums as _schedule's (a difference could round below them and spin).
        now = self._clock.seconds()
        if now >= self.last_received + self._heartbeat + self._ping_timeout:
            self.drop("timeout: nothing received")
            return
        if self._ping_deadline is not None and now >= self._ping_deadline:
            self.drop("timeout: ping not answered")
            return
        if self._ping_deadline is None and now >= self.last_sent + self._heartbeat:
            self._ping_deadline = now + self._ping_timeout

            def answered(_: object) -> None:
                self._ping_deadline = None

            self.request("ping").addBoth(answered)
        self._schedule()

    def drop_after(self, seconds: float, reason: str) -> None:
        """Drop it unless it is gone by then (the server said it closes)."""
        if not self.gone and self._drop_timer is None:
            self._drop_timer = self._clock.callLater(seconds, self.drop, reason)

    def drop(self, reason: str) -> None:
        """Close it now, without waiting for the transport (a dead peer may never answer)."""
        if self.gone:
            return
        self.reason = reason
        log.info("dropping the connection: {reason}", reason=reason)
        transport = getattr(self.proto, "transport", None)
        if transport is not None:
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()
        self.gone_now()

    def gone_now(self, error: RequestFailed | None = None) -> None:
        """
        Gone: the requests in flight fail with C{error}, by default
        C{kicked} after a kick and C{disconnected} otherwise.
        """
        if self.gone:
            return
        self.gone = True
        for timer in (self._timer, self._drop_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._drop_timer = None
        if error is None:
            if self.kicked is not None:
                error = client_error("kicked", f"kicked: {self.kicked}")
            else:
                error = client_error("disconnected", "the connection closed")
        inflight, self._inflight = self._inflight, set()
        for d in inflight:
            if not d.called:
                d.errback(error)
        self.lost.callback(None)
