"""
Offline notifications: the delayed queue and the webhook.

Every committed message gets a row in C{t_notify}, due C{delay_seconds}
later (written in the message's own transaction, so it survives crashes).
L{Notifier} polls for due rows (claiming them, so that several nodes share
the work), drops those whose message was acked or recalled meanwhile, or
whose recipient muted the conversation (C{mute}: its muteUntil is later
than the claim), and POSTs the rest to C{[notify].webhook}:

    POST /push  Content-Type: application/json
    X-Imserver-Signature: sha256=<hex HMAC-SHA256 of the body with [notify].secret>
    {"uid": 2, "from": 1, "msg_id": ..., "session_id": ..., "preview": "hello", "total_unread": 3}

A non-2xx answer or a timeout schedules a retry (exponential backoff with
jitter, kept in SQL); after C{max_attempts} the notification becomes a dead
letter. Delivery is at least once: the receiver dedupes by C{msg_id}.

Claims are leases, and a poll never outlives its own: every notification is
bounded (L{Notifier.budget}, from the webhook's timeouts), the lease is
derived from that bound, and a poll starts no notification that could end
after its lease minus a margin; the ones it did not start are handed back.
Stopping waits (bounded) for the poll in progress, so what was posted is
recorded and never posted again by the next node.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    TimeoutError,
    ensureDeferred,
    succeed,
)
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from imserver.config import NotifyConfig
from imserver.errors import Unavailable
from imserver.periodic import Periodic
from imserver.retry import RetryPolicy
from imserver.storage.model import RECORD_NORMAL, DeadLetter, DueNotification, unpack_body
from imserver.storage.store import Store

PREVIEW_CHARS = 100
POLL_SECONDS = 0.5
#: The shortest lease on claimed notifications (a crashed node's claims
#: are taken over after it).
MIN_LEASE_SECONDS = 60.0
#: Kept free at the end of a lease: the poll's bookkeeping, clock skew between nodes.
LEASE_MARGIN_SECONDS = 10.0
#: What reading the recipient's unread total may take, besides the webhook's timeouts.
UNREAD_SECONDS = 5.0
BATCH = 200
CONCURRENCY = 20


def preview(kind: str, body: Any) -> str:
    """What a notification shows: the text, cut to 100 characters."""
    if isinstance(body, str):
        text = body
    elif isinstance(body, dict) and isinstance(body.get("text"), str):
        text = body["text"]
    else:
        text = f"[{kind}]"
    return text[:PREVIEW_CHARS]


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookError(Exception):
    pass


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is already in memory."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Webhook:
    """POSTs JSON with a signature; raises L{WebhookError} unless 2xx."""

    def __init__(self, reactor: Any, url: str, secret: str, timeout: float) -> None:
        self._reactor = reactor
        self.url = url.encode()
        self.secret = secret
        self.timeout = timeout
        self._agent = Agent(reactor, connectTimeout=timeout)

    async def post(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        headers = Headers(
            {
                b"content-type": [b"application/json"],
                b"user-agent": [b"imserver"],
                b"x-imserver-signature": [sign(self.secret, body).encode()],
            }
        )
        d = self._agent.request(b"POST", self.url, headers, BytesProducer(body))
        d.addTimeout(self.timeout, self._reactor)
        try:
            response = await d
            answer = readBody(response)
            answer.addTimeout(self.timeout, self._reactor)
            await answer
        except Exception as e:
            raise WebhookError(f"{e.__class__.__name__}: {e}") from None
        if not 200 <= response.code < 300:
            raise WebhookError(f"HTTP {response.code}")


class Notifier:
    """
    The delayed queue's worker (one per node).

    @param total_unread: the recipient's unread total, for the payload.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        store: Store,
        config: NotifyConfig,
        total_unread: Callable[[int], Awaitable[int]],
        *,
        post: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        assert config.webhook is not None
        self._reactor = reactor
        self._store = store
        self.config = config
        self._total_unread = total_unread
        self._post = (
            post or Webhook(reactor, config.webhook, config.secret, config.timeout_seconds).post
        )
        self.policy = RetryPolicy(
            base=1.0, factor=2.0, max_delay=300.0, max_attempts=config.max_attempts
        )
        self._rng = rng or random.Random()
        self._loop = Periodic(reactor, POLL_SECONDS, self.poll, "notification poll")
        self._limit = DeferredSemaphore(CONCURRENCY)
        #: The longest one notification may take: the unread total, then the
        #: webhook's connect + answer and body (each bounded by its timeout).
        self.budget = UNREAD_SECONDS + 2 * config.timeout_seconds
        #: Longer than the longest poll can use: a poll starts no notification
        #: later than C{lease - margin - budget} after its claim.
        self.lease_seconds = max(MIN_LEASE_SECONDS, 2 * self.budget + LEASE_MARGIN_SECONDS)
        self._stopping = False
        self._polls = 0
        self._idle: list[Deferred[None]] = []
        # Read by metrics.
        self.sent = 0
        self.skipped = 0
        self.retries = 0
        self.dead = 0
        self.failures = 0

    def start(self) -> None:
        # Not a leftover of __init__'s: a stopped notifier may be started again.
        self._stopping = False
        self._loop.start()

    def stop(self, timeout: float | None = None) -> Deferred[None]:
        """
        Stop polling; fires once the poll in progress has recorded what it
        posted (its notifications not started yet are handed back), or
        after C{timeout} (default: one notification's budget plus the
        margin), whichever comes first.
        """
        self._stopping = True
        self._loop.stop()
        if not self._polls:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        bound = self.budget + LEASE_MARGIN_SECONDS if timeout is None else timeout
        d.addTimeout(bound, self._reactor)

        def late(f: Failure) -> None:
            f.trap(TimeoutError)
            self.log.warn(
                "notification poll still running after {seconds}s; its posts may be repeated",
                seconds=bound,
            )

        return d.addErrback(late)

    def poll(self) -> Deferred[int]:
        """Handle every due notification once; fires with how many were due."""
        self._polls += 1
        d = Deferred.fromCoroutine(self._poll())
        d.addBoth(self._poll_ended)
        return d

    def _poll_ended(self, result: Any) -> Any:
        self._polls -= 1
        if not self._polls:
            idle, self._idle = self._idle, []
            for d in idle:
                if not d.called:
                    d.callback(None)
        return result

    async def _poll(self) -> int:
        if self._stopping:
            return 0
        claimed_at = self._reactor.seconds()
        try:
            due = await self._store.claim_notifications(int(self.lease_seconds * 1000), BATCH)
        except Exception as e:
            self.log.warn("cannot read due notifications: {error}", error=e)
            return 0
        # Nothing starts after this: it could end after the lease.
        start_by = claimed_at + self.lease_seconds - LEASE_MARGIN_SECONDS - self.budget
        done = []
        send = []
        for n in due:
            # Muted by its recipient (at claim time): dropped, not held for later.
            if n.pending and n.message.status == RECORD_NORMAL and not n.muted:
                send.append(n)
            else:
                done.append(n.message.msg_id)
        self.skipped += len(done)
        release: list[int] = []
        outcomes = await DeferredList(
            [self._limit.run(self._notify_now, n, start_by, release) for n in send],
            consumeErrors=True,
        )
        for n, (_, result) in zip(send, outcomes, strict=True):
            if isinstance(result, Failure):
                # Its lease runs out and it is claimed again. A backend
                # outage is expected: a warning, without traceback.
                if result.check(Unavailable):
                    self.log.warn(
                        "notification of message {msg_id} not handled: {error}",
                        msg_id=n.message.msg_id,
                        error=str(result.value),
                    )
                else:
                    self.log.failure(
                        "notification of message {msg_id} not handled",
                        result,
                        msg_id=n.message.msg_id,
                    )
            elif result:
                done.append(n.message.msg_id)
        # One transaction for the poll's finished rows, sent or skipped, and
        # the ones handed back unstarted.
        try:
            await self._store.notifications_done(done, release)
        except Exception as e:
            self.log.warn(
                "notifications sent but not recorded ({error}): they are sent again", error=e
            )
        return len(due)

    def _notify_now(
        self, n: DueNotification, start_by: float, release: list[int]
    ) -> Deferred[bool]:
        """Start one notification, bounded by the budget; too late to start
        (or stopping), it goes to C{release}, to be handed back."""
        if self._stopping or self._reactor.seconds() > start_by:
            release.append(n.message.msg_id)
            return succeed(False)
        return Deferred.fromCoroutine(self._notify(n))

    async def _bounded(self, step: Any, deadline: float) -> Any:
        """Await C{step}, cancelled at C{deadline} (reactor seconds)."""
        d = ensureDeferred(step)
        d.addTimeout(max(0.0, deadline - self._reactor.seconds()), self._reactor)
        return await d

    async def _unread(self, uid: int, deadline: float) -> int:
        """The recipient's unread total, or L{Unavailable} at the deadline (SQL stuck)."""
        try:
            total: int = await self._bounded(self._total_unread(uid), deadline)
        except TimeoutError:
            raise Unavailable("the unread total was not read in time") from None
        return total

    async def _notify(self, n: DueNotification) -> bool:
        """Post one notification; True once it is finished (sent or dead)."""
        m = n.message
        deadline = self._reactor.seconds() + self.budget
        payload = {
            "uid": m.recipient,
            "from": m.sender,
            "msg_id": m.msg_id,
            "session_id": m.session_id,
            "preview": preview(m.type, unpack_body(m.body)),
            "total_unread": await self._unread(m.recipient, deadline),
        }
        try:
            await self._bounded(self._post(payload), deadline)
        except Exception as e:
            return await self._failed(n, payload, f"{e.__class__.__name__}: {e}")
        self.sent += 1
        return True

    async def _failed(self, n: DueNotification, payload: dict[str, Any], error: str) -> bool:
        """Count a failed post: dead-lettered (True) or due again later (False)."""
        attempts = n.attempts + 1
        self.failures += 1
        if self.policy.exhausted(attempts):
            self.dead += 1
            self.log.error(
                "notification of message {msg_id} failed {n} times: {error}",
                msg_id=n.message.msg_id,
                n=attempts,
                error=error,
            )
            return await self._store.add_dead_letter(
                DeadLetter(
                    self._store.ids.next_id(),
                    "notify",
                    n.message.msg_id,
                    json.dumps(payload).encode(),
                    error,
                    attempts,
                    int(self._reactor.seconds() * 1000),
                )
            )  # not written: the row stays, claimed again when its lease ends
        self.retries += 1
        delay = self.policy.delay(attempts, self._rng)
        due = int((self._reactor.seconds() + delay) * 1000)
        self.log.info(
            "notification of message {msg_id} failed ({error}); retry in {delay:.1f}s",
            msg_id=n.message.msg_id,
            error=error,
            delay=delay,
        )
        await self._store.retry_notification(n.message.msg_id, due)
        return False
