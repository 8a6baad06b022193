"""
The outbox: sends are queued per peer and sent one at a time in order,
retried with the same cid until the server answers, so a message is stored
once however often the connection drops (docs/sdk.md, "An outbox").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from imserver.client.backoff import Backoff, RandomSource
from imserver.client.protocol import RequestFailed

log = Logger()

#: Answers after which the same send (same cid) is tried again after a delay.
RETRY_LATER = frozenset({"unavailable", "internal", "rate_limited", "timeout"})
#: The connection went away: try again as soon as the client is live again.
RETRY_NOW = frozenset({"disconnected"})
#: The client stopped: the entry stays (and in the store) but nobody sends it.
STOPPED = frozenset({"closed", "kicked", "auth_failed"})

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def random_id(rng: RandomSource, length: int) -> str:
    return "".join(_ALPHABET[int(rng.random() * len(_ALPHABET)) % 36] for _ in range(length))


@attrs.define(eq=False)
class Entry:
    cid: str
    to: int
    body: Any
    type: str | None = None
    #: Who waits for the result (None for an entry loaded from the store).
    result: Deferred[dict[str, Any]] | None = None
    #: Loaded from the store, then found to be another user's: never sent.
    discarded: bool = False

    def state(self) -> dict[str, Any]:
        return {"cid": self.cid, "to": self.to, "type": self.type, "body": self.body}


Transmit = Callable[[Entry], Awaitable[dict[str, Any]]]


class Outbox:
    """
    @param transmit: sends one entry once it can (waiting for a live
        connection), fires with the reply or fails with L{RequestFailed}.
    @param sleep: a delay on the client's clock.
    @param changed: called when the set of entries changed (to save it).
    """

    def __init__(
        self,
        device: str,
        rng: RandomSource,
        transmit: Transmit,
        sleep: Callable[[float], Deferred[None]],
        backoff: Backoff,
        changed: Callable[[], None],
    ) -> None:
        self._device = device
        self._instance = random_id(rng, 8)
        self._n = 0
        self._transmit = transmit
        self._sleep = sleep
        self._backoff = backoff
        self._changed = changed
        self._queues: OrderedDict[int, list[Entry]] = OrderedDict()
        self._running: set[int] = set()
        self._stopped: RequestFailed | None = None

    def new_cid(self) -> str:
        """C{<device>.<random>.<n>}: unique per sender, at most 64 characters."""
        self._n += 1
        suffix = f".{self._instance}.{self._n}"
        return self._device[: 64 - len(suffix)] + suffix

    @property
    def entries(self) -> list[Entry]:
        return [e for queue in self._queues.values() for e in queue]

    def state(self) -> list[dict[str, Any]]:
        return [e.state() for e in self.entries]

    def restore(self, saved: list[dict[str, Any]]) -> None:
        """Entries saved by an earlier run (sent on start, nobody waiting)."""
        for item in saved:
            self._queues.setdefault(int(item["to"]), []).append(
                Entry(str(item["cid"]), int(item["to"]), item["body"], item.get("type"))
            )

    def discard_restored(self) -> None:
        """Forget the entries an earlier run saved (nobody waits on them): another user's."""
        for peer, queue in list(self._queues.items()):
            for e in queue:
                if e.result is None:
                    e.discarded = True
            queue[:] = [e for e in queue if not e.discarded]
            if not queue:
                del self._queues[peer]
        self._changed()

    def add(self, entry: Entry) -> None:
        if self._stopped is not None:
            raise self._stopped
        self._queues.setdefault(entry.to, []).append(entry)
        self._changed()
        self.kick(entry.to)

    def start(self) -> None:
        for peer in list(self._queues):
            self.kick(peer)

    def kick(self, peer: int) -> None:
        if peer in self._running or self._stopped is not None:
            return
        self._running.add(peer)
        d = Deferred.fromCoroutine(self._drain(peer))
        d.addErrback(lambda f: log.failure("outbox for {peer} failed", f, peer=peer))

    def stop(self, error: RequestFailed) -> None:
        """
        Reject every waiter with C{error}; the entries stay (they are in the
        store). A send's Deferred nobody waits on yet keeps its failure for
        whoever looks later, but is not reported as "Unhandled error in
        Deferred" if nobody ever does: the send is not lost (kept for the
        next Client). Twisted has no public way to say so: this clears the
        Deferred's pending unhandled-failure record (C{_debugInfo}).
        """
        self._stopped = error
        for entry in self.entries:
            if entry.result is not None and not entry.result.called:
                result, entry.result = entry.result, None
                waited = bool(result.callbacks)
                result.errback(error)
                info = getattr(result, "_debugInfo", None)
                if not waited and info is not None:
                    info.failResult = None

    async def _drain(self, peer: int) -> None:
        try:
            queue = self._queues.get(peer)
            while queue and self._stopped is None:
                entry = queue[0]
                outcome = await self._send(entry)
                if entry.discarded:
                    queue = self._queues.get(peer)  # no longer in it
                    continue
                if self._stopped is not None or (
                    isinstance(outcome, RequestFailed) and outcome.code in STOPPED
                ):
                    return  # stop() rejects the waiters; the entries stay
                queue.pop(0)
                if not queue:
                    del self._queues[peer]
                self._changed()
                if entry.result is not None:
                    result, entry.result = entry.result, None
                    if isinstance(outcome, RequestFailed):
                        result.errback(outcome)
                    else:
                        result.callback(outcome)
                queue = self._queues.get(peer)
        finally:
            self._running.discard(peer)

    async def _send(self, entry: Entry) -> dict[str, Any] | RequestFailed:
        attempt = 0
        while self._stopped is None:
            try:
                return await self._transmit(entry)
            except RequestFailed as e:
                if e.code in STOPPED:
                    return e
                if e.code in RETRY_NOW:
                    continue
                if e.code not in RETRY_LATER:
                    return e
                delay = self._backoff.delay(attempt)
                attempt += 1
                log.info(
                    "send {cid} answered {code}: retry in {delay:.2f}s",
                    cid=entry.cid,
                    code=e.code,
                    delay=delay,
                )
                await self._sleep(delay)
        assert self._stopped is not None
        return self._stopped
