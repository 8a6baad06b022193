"""
The storage layer as the business layer sees it: L{Store}.

One class over two parts chosen by the composition root: a L{Database}
(SQLite or MySQL, the truth) and an L{IHotStore} (Redis or in-process, the
seed's hot index). The business layer never knows which.

* Writes commit in SQL first (group-committed: concurrent sends share one
  transaction), together with an outbox row naming what the hot copy must
  learn; then the hot copy is updated and the outbox row deleted. If the hot
  store fails, the affected users and sessions become "suspect": their reads
  go to SQL, and the retry queue invalidates their hot copies as soon as the
  hot store answers, so they are rebuilt from SQL. After a crash the outbox
  rows are replayed (L{replay_outbox}).
* The hot step of an ack, a read, a recall, a profile change or a login
  runs after the reply (as the fan-out of a send does): replies never wait
  for Redis. Until it is done the user's reads here go to SQL, so the user
  still reads their own writes.
* Reads try the hot copy. A user without a ready copy (first use, after a
  FLUSHALL, after an invalidation) is loaded from SQL, then read again; if
  the hot store is down the read is answered from SQL.
* Devices, the user's stream and catch-up are SQL only: the methods here
  delegate to L{DeviceStore} (C{imserver.storage.devices}).
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.batching import Batcher, ItemFailure
from imserver.errors import ErrorCode, ImError, Unavailable
from imserver.retry import RetryPolicy, RetryQueue, Task
from imserver.storage.convcopy import ConvCopy
from imserver.storage.devices import DeviceStore, LoginItem, check_device
from imserver.storage.edits import EditStore
from imserver.storage.hot.interface import HotUnavailable, IHotStore
from imserver.storage.lru import LRU
from imserver.storage.model import (
    RECORD_NORMAL,
    CatchupPage,
    Committed,
    Conversation,
    ConvRow,
    DeadLetter,
    DeviceRow,
    DueNotification,
    Login,
    Message,
    MuteResult,
    NewMessage,
    Outbox,
    Positions,
    Profile,
    ReadResult,
    RecallResult,
    Refused,
    SendOutcome,
    chunks,
    session_pair,
)
from imserver.storage.sql import queries as q
from imserver.storage.sql.database import CommitUnknown, Database
from imserver.storage.sql.migrate import migrate

T = TypeVar("T")
R = TypeVar("R")

#: Retries of failed hot-store writes: from 0.5 s up to 30 s apart, for about
#: 20 minutes, then a dead letter (the outbox row still gets it replayed).
REPAIR_POLICY = RetryPolicy(base=0.5, factor=2.0, max_delay=30.0, max_attempts=45)
#: Outbox rows older than this are replayed by any node's sweeper.
OUTBOX_STALE_MS = 60_000
#: A send row's fan-out still unfinished here after this is left to the sweepers.
OUTBOX_COUNTDOWN_MAX_MS = 5 * OUTBOX_STALE_MS
#: With no commit or ack to carry them, finished outbox rows are deleted after this.
OUTBOX_FLUSH_SECONDS = 0.5
#: Users, sessions or messages per invalidate call of a repair (parked or not).
REPAIR_CHUNK = 500


class IdSource(Protocol):
    """Where outbox and dead-letter ids come from (the node's id generator)."""

    def next_id(self) -> int: ...


#: How often repairs given up on (retries exhausted, or no room in the retry
#: queue) are tried again; their users and sessions stay on SQL meanwhile.
PARKED_REPAIR_SECONDS = 30.0


class FanoutOutcome(enum.IntEnum):
    """How the fan-out of committed messages ended (the worse outcome wins for a row)."""

    #: Indexed in the hot store and pushed: the outbox row is finished.
    DONE = 0
    #: Pushed, but the hot write failed (a repair is queued): the row only repairs.
    REPAIR = 1
    #: An unexpected error: the row stays as it is, for the sweeper to replay.
    REPLAY = 2


@attrs.define
class OutboxCountdown:
    """A send batch's outbox row while its messages are fanned out."""

    left: int
    #: When its first message went to the fan-out (ms, the store's clock).
    started_ms: int
    outcome: FanoutOutcome = FanoutOutcome.DONE


#: An item of the acks Batcher: (uid, msg_ids, device_id, seq).
AckItem = tuple[int, Sequence[int], int, int | None]


class Store:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        db: Database,
        hot: IHotStore,
        *,
        ids: IdSource,
        node_id: int,
        background: Database | None = None,
        notify_delay_ms: int | None = None,
        repair_policy: RetryPolicy = REPAIR_POLICY,
        max_batch: int = 500,
        max_queue: int = 50_000,
    ) -> None:
        self._reactor = reactor
        self.db = db
        #: Outbox, notification and dead-letter work: its own pool, so it
        #: never holds up the real-time path.
        self.background = background or db
        self.hot = hot
        self.ids = ids
        self.node_id = node_id
        self.notify_delay_ms = notify_delay_ms
        self.retries = RetryQueue(reactor, repair_policy, self._dead_letter)
        # Outbox rows whose follow-up is finished: deleted by the next
        # commit or ack transaction (no round trip of their own), or after
        # OUTBOX_FLUSH_SECONDS by a background transaction if none comes.
        self._done_outbox: list[int] = []
        self._done_flush: IDelayedCall | None = None
        # Outbox rows to downgrade to 'repair', written together (see
        # outbox_downgrade), and the transactions writing them (drain waits).
        self._downgrades: list[int] = []
        self._downgrade_flush: IDelayedCall | None = None
        self._downgrading: set[Deferred[None]] = set()
        # Send batches' outbox rows whose messages are being fanned out.
        self._countdowns: dict[int, OutboxCountdown] = {}
        # Send rows a duplicate claimed, being finished (finish_unfinished).
        self._finishing: set[int] = set()
        # The part of suspect_users / suspect_sessions held by repairs given
        # up on (parked): tried again every parked_repair_seconds until the
        # hot store answers.
        self.parked_repair_seconds = PARKED_REPAIR_SECONDS
        self._parked_users: Counter[int] = Counter()
        self._parked_sessions: Counter[int] = Counter()
        self._parked_msgs: set[int] = set()
        self._parked_profiles: dict[int, Profile] = {}
        self._parked_call: IDelayedCall | None = None
        # One commit at a time: two concurrent batches upserting the same
        # conversation rows deadlock in InnoDB, and the retried one would
        # report unread counts that include later messages.
        self.sends: Batcher[NewMessage, SendOutcome] = Batcher(
            "send", self._commit_batch, max_batch=max_batch, max_queue=max_queue
        )
        # Acks and logins: one transaction for many users, and one bad item
        # fails alone (see _isolating).
        self.acks: Batcher[AckItem, list[tuple[int, int, int]]] = Batcher(
            "ack", self._ack_requests, max_batch=max_batch, max_queue=max_queue
        )
        #: Device logins and plain user logins (L{ensure_user}) share a batch.
        self.device_store = DeviceStore(self)
        #: Edits, hides and clears (issue 11: imserver.storage.edits).
        self.edits = EditStore(self)
        self.logins: Batcher[LoginItem, Login | Profile] = Batcher(
            "login", self._login_requests, max_batch=max_batch, max_queue=max_queue
        )
        self._known_users: set[int] = set()
        self._pairs: LRU[tuple[int, int], int] = LRU(200_000)
        # The stream heads this node saw last (see saw_seq).
        self._heads: LRU[int, int] = LRU(200_000)
        # The conversation rows and unread totals its send batches left.
        self.conv_copy = ConvCopy()
        self._members: LRU[int, tuple[int, int]] = LRU(200_000)
        # Users and sessions whose hot copy may be wrong (count of repairs
        # not done yet): their reads go to SQL.
        self.suspect_users: Counter[int] = Counter()
        self.suspect_sessions: Counter[int] = Counter()
        # Users with a hot step running after its reply: their reads go to SQL.
        self._hot_busy: Counter[int] = Counter()
        self._hot_busy_sessions: Counter[int] = Counter()
        self._after_reply: set[Deferred[None]] = set()
        # The repair that failures join until it runs (one per attempt, not per failure).
        self._open_repair: _Repair | None = None
        self._stopped = False
        # Read by metrics.
        self.hot_fallbacks = 0
        self.loads = 0
        self.finished_early = 0

    def _now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)

    async def start(self) -> list[int]:
        """Apply migrations and connect the hot store; return migrations applied."""
        applied = await migrate(self.db, self._now_ms())
        await self.hot.start()
        return applied

    async def stop(self) -> None:
        self._stopped = True
        if self._done_flush is not None and self._done_flush.active():
            self._done_flush.cancel()
        if self._downgrade_flush is not None and self._downgrade_flush.active():
            self._downgrade_flush.cancel()
        if self._parked_call is not None and self._parked_call.active():
            self._parked_call.cancel()
        self.retries.cancel_all()
        await self.hot.stop()
        self.db.close()
        self.background.close()

    def hot_back(self) -> None:
        """The hot store answers again after an outage: repair now, not after the backoff."""
        n = self.retries.expedite()
        if n:
            self.log.info("hot store back: running {n} repairs now", n=n)
        if self._parked_call is not None and self._parked_call.active():
            self._parked_call.cancel()
            self._run_parked()

    async def health(self) -> dict[str, str]:
        status = {"sql": "ok", "redis": "embedded" if self.hot.kind == "embedded" else "ok"}
        try:
            await self.db.run("health", _select_one_txn)
        except Exception:
            status["sql"] = "down"
        try:
            await self.hot.ping()
        except HotUnavailable:
            status["redis"] = "down"
        circuit = self.hot.circuit_state()
        if circuit is not None and circuit != "closed":
            # Calls to Redis fail fast now (see imserver.storage.hot.connection).
            status["redis_circuit"] = circuit
        return status

    # -- users ---------------------------------------------------------------

    async def ensure_user(self, uid: int) -> Profile:
        """The user's profile, creating the user on first sight (login)."""
        if uid in self._known_users:
            found = await self.profiles([uid])
            if uid in found:
                return found[uid]
        profile = await self.logins.submit((uid, None, "", 0))
        assert isinstance(profile, Profile)
        return profile

    async def login(
        self, uid: int, device: str, client: str, issued_at: float | None = None
    ) -> Login:
        """
        A device's login: the user created on first sight, the device's row
        created (cursor = the head) or refreshed (client, lastSeen). Batched
        with the other logins of the moment. A revoked device logs in all
        the same: C{device.revoked_at} is the caller's to check; its row is
        not refreshed unless C{issued_at} (the token's) is past the second
        of its revocation.
        """
        check_device(device)
        issued_ms = 0 if issued_at is None else math.ceil(issued_at) * 1000
        login = await self.logins.submit((uid, device, client, issued_ms))
        assert isinstance(login, Login)
        return login

    async def _login_requests(
        self, items: Sequence[LoginItem]
    ) -> Sequence[Login | Profile | ItemFailure]:
        return await self._isolating(
            "login",
            items,
            self.device_store.login_batch,
            lambda item: f"uid {item[0]}" + ("" if item[1] is None else f" device {item[1]!r}"),
        )

    async def profiles(self, uids: Iterable[int]) -> dict[int, Profile]:
        wanted = list(dict.fromkeys(uids))
        try:
            found = await self.hot.profiles(wanted)
        except HotUnavailable:
            found = {}
        missing = [uid for uid in wanted if uid not in found]
        if missing:
            rows = await self.db.run("profiles", q.get_profiles_txn, missing)
            found.update((p.uid, p) for p in rows)
            self._known_users.update(p.uid for p in rows)
            # A cache fill, after the reply; if it fails the next read fills it.
            self._run_after_reply(self._put_profiles(rows, changed=False), ())
        return found

    async def _put_profiles(self, profiles: Sequence[Profile], changed: bool = True) -> None:
        try:
            await self.hot.put_profiles(profiles)
        except HotUnavailable as e:
            if not changed:
                return
            # A stale cached profile would outlive its TTL otherwise. With
            # the retry queue full (or the retries given up), the write
            # waits with the parked repairs: the change is committed, so it
            # never fails the request.
            if self.retries.full:
                self._park_profiles(profiles)
                return
            self.retries.add(
                Task(
                    "profile",
                    profiles[0].uid,
                    lambda: self.hot.put_profiles(profiles),
                    on_dead=lambda: self._park_profiles(profiles),
                ),
                str(e),
            )

    async def set_profile(
        self, uid: int, nickname: str | None, avatar: str | None
    ) -> Profile | None:
        profile = await self.db.run(
            "set_profile", q.set_profile_txn, uid, nickname, avatar, self._now_ms()
        )
        if profile is not None:
            # After the reply: the caller caches the new profile on this node.
            self._run_after_reply(self._put_profiles([profile]), ())
        return profile

    async def upsert_user(
        self, uid: int, nickname: str | None, avatar: str | None
    ) -> tuple[Profile, bool]:
        profile, created = await self.db.run(
            "upsert_user", q.upsert_user_txn, uid, nickname, avatar, self._now_ms()
        )
        self._known_users.add(uid)
        self._run_after_reply(self._put_profiles([profile]), ())
        return profile, created

    # -- sending ---------------------------------------------------------------

    def session_hint(self, a: int, b: int) -> int | None:
        """The pair's session id if this node has seen it."""
        return self._pairs.get(session_pair(a, b))

    def commit(self, message: NewMessage) -> Deferred[SendOutcome]:
        """Commit one message (with whatever else is being sent now)."""
        return self.sends.submit(message)

    async def _commit_batch(self, msgs: Sequence[NewMessage]) -> list[SendOutcome]:
        started = self._reactor.seconds()
        check = sorted({m.recipient for m in msgs if m.recipient not in self._known_users})
        msgs = [
            m
            if m.session_id is not None
            else attrs.evolve(m, session_id=self._pairs.get(session_pair(m.sender, m.recipient)))
            for m in msgs
        ]
        done = self._take_done_outbox()
        try:
            outcomes = await self._commit_group(msgs, check, started, done)
        except Unavailable as e:
            self._put_back_done_outbox(done)
            self._commit_unavailable(msgs, e)
            raise
        except Exception as e:
            self._put_back_done_outbox(done)
            if not self._isolable(e):
                raise  # a lock conflict the retries did not clear
            # Not an outage: most likely one message the database refuses.
            # It must not fail the others: find it.
            outcomes = await self._isolate(msgs, check, started, e)
        for outcome in outcomes:
            if isinstance(outcome, Committed):
                m = outcome.message
                self._known_users.add(m.recipient)
                self._remember_session(m.session_id, m.sender, m.recipient)
                self.saw_seq(m.recipient, outcome.recipient_seq)
                self.saw_seq(m.sender, outcome.sender_seq)
        self.conv_copy.learn(outcomes)
        return outcomes

    def saw_seq(self, uid: int, seq: int | None) -> None:
        """
        A committed seq of the user's stream: the head is at least that. The
        next send batch takes the heads seen here as its guess, checked by
        its first statement (L{q.commit_messages_txn}): a head that moved
        elsewhere costs that batch one locking read, never a wrong seq.
        """
        if seq and self._heads.get(uid, 0) < seq:
            self._heads.put(uid, seq)

    async def _commit_group(
        self,
        msgs: Sequence[NewMessage],
        check: Sequence[int],
        started: float,
        done: Sequence[int],
    ) -> list[SendOutcome]:
        """One group-commit transaction, with its own outbox row."""
        now_ms = self._now_ms()
        heads = self._heads
        cached = {u: heads[u] for m in msgs for u in (m.sender, m.recipient) if u in heads}
        known = self.conv_copy.known(msgs, cached)
        return await self.db.run(
            "send",
            q.commit_messages_txn,
            msgs,
            check,
            now_ms,
            self._outbox("send", now_ms),
            self.notify_delay_ms,
            started,
            done,
            cached,
            known,
        )

    def _commit_unavailable(self, msgs: Sequence[NewMessage], e: Unavailable) -> None:
        # The commit may or may not have happened (the database could not be
        # asked): distrust every copy these messages could have changed (if
        # it happened, its outbox row gets it replayed too).
        self._hot_failed(
            {u for m in msgs for u in (m.sender, m.recipient)},
            {m.session_id for m in msgs if m.session_id is not None},
            (),
            str(e),
        )

    async def _isolate(
        self,
        msgs: Sequence[NewMessage],
        check: Sequence[int],
        started: float,
        error: Exception,
    ) -> list[SendOutcome]:
        """
        A group commit failed, and not for an outage (nor a deadlock: those
        are retried): commit the batch in halves, recursively, so only the
        messages the database refuses are refused and the others of the batch
        (other users' sends) commit. The halves commit in order, so commit
        order and per-sender order are kept. A systematic failure costs
        about two transactions per message, and is logged once per message.
        """
        if len(msgs) == 1:
            [m] = msgs
            self.log.error(
                "send {msg_id} from {uid} (cid {cid!r}) cannot be stored: {error!r}",
                msg_id=m.msg_id,
                uid=m.sender,
                cid=m.cid,
                error=error,
            )
            return [Refused(ErrorCode.INTERNAL, "this message could not be stored")]
        half = len(msgs) // 2
        outcomes: list[SendOutcome] = []
        for part in (msgs[:half], msgs[half:]):
            try:
                outcomes += await self._commit_group(part, check, started, ())
            except Unavailable as e:
                self._commit_unavailable(part, e)
                outcomes += [Refused(ErrorCode.UNAVAILABLE, str(e.message))] * len(part)
            except Exception as e:
                outcomes += await self._isolate(part, check, started, e)
        return outcomes

    def _isolable(self, e: Exception) -> bool:
        """
        A batch failure that may be one item's fault: not an outage (no item
        could succeed) and not a lock conflict still there after the
        retries (halves would only wait on the same locks again).
        """
        return not isinstance(e, Unavailable) and not self.db.engine.is_retryable(e)

    async def _isolating(
        self,
        what: str,
        items: Sequence[T],
        run: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        describe: Callable[[T], str],
    ) -> Sequence[R | ItemFailure]:
        """
        Run a batch in one transaction (C{run}); if it fails for anything but
        an outage or a lock conflict, run it again in halves, recursively, so
        that only the items the database refuses fail (with C{internal} and a
        clear message, logged once each) and the others commit, in order, as
        the send group commit does. An outage still fails the whole batch.
        """
        try:
            return await run(items)
        except Exception as e:
            if not self._isolable(e):
                raise
            return await self._halves(what, items, run, describe, e)

    async def _halves(
        self,
        what: str,
        items: Sequence[T],
        run: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        describe: Callable[[T], str],
        error: Exception,
    ) -> list[R | ItemFailure]:
        if len(items) == 1:
            self.log.error(
                "{what} of {item} cannot be stored: {error!r}",
                what=what,
                item=describe(items[0]),
                error=error,
            )
            return [Failure(ImError(ErrorCode.INTERNAL, f"this {what} could not be stored"))]
        half = len(items) // 2
        out: list[R | ItemFailure] = []
        for part in (items[:half], items[half:]):
            try:
                out += await run(part)
            except Exception as e:
                if self._isolable(e):
                    out += await self._halves(what, part, run, describe, e)
                else:
                    # Not this part's fault: its items fail with the error, the
                    # parts already committed keep their results.
                    out += [Failure(e)] * len(part)
        return out

    async def fanout(self, committed: Sequence[Committed]) -> bool:
        """
        Index committed messages in the hot store (in commit order). False if
        the hot store failed: the users and sessions are then suspect and
        being repaired.
        """
        now = self._reactor.seconds()
        messages = [(c.message, int((now - c.started) * 1000)) for c in committed]
        rows: dict[tuple[int, int], ConvRow] = {}
        for c in committed:
            for row in (c.recipient_row, c.sender_row):
                key = (row.uid, row.session_id)
                if key not in rows or rows[key].version < row.version:
                    rows[key] = row
        try:
            await self.hot.fanout(messages, list(rows.values()))
        except Exception as e:
            if not isinstance(e, HotUnavailable):
                # Not an outage, but the copy may lack these messages all the same.
                self.log.failure("hot store fan-out failed unexpectedly", Failure())
            self._hot_failed(
                {u for c in committed for u in (c.message.sender, c.message.recipient)},
                {c.message.session_id for c in committed},
                (),
                str(e),
            )
            return False
        return True

    def fanout_started(self, committed: Committed) -> None:
        """A committed message goes to the fan-out: count it down on its outbox row."""
        if committed.outbox_id and committed.outbox_id not in self._countdowns:
            self._countdowns[committed.outbox_id] = OutboxCountdown(
                committed.outbox_count, self._now_ms()
            )

    def fanout_finished(self, committed: Sequence[Committed], outcome: FanoutOutcome) -> None:
        """
        The fan-out of these messages ended. A row whose messages have all
        ended is deleted (all L{FanoutOutcome.DONE}), downgraded to a repair
        (one L{FanoutOutcome.REPAIR}: a replay must not push again), or left
        as it is for the sweeper (one L{FanoutOutcome.REPLAY}). Each message
        must end exactly once, whatever happened to it.
        """
        if outcome is FanoutOutcome.REPLAY and committed:
            # What the hot copy holds is unknown: read these from SQL until
            # they are repaired, not from a stale copy until the sweep.
            self._hot_failed(
                {u for c in committed for u in (c.message.sender, c.message.recipient)},
                {c.message.session_id for c in committed},
                (),
                "fan-out did not finish",
            )
        done: list[int] = []
        downgrade: list[int] = []
        for c in committed:
            entry = self._countdowns.get(c.outbox_id)
            if entry is None:
                continue
            entry.left -= 1
            entry.outcome = max(entry.outcome, outcome)
            if entry.left <= 0:
                del self._countdowns[c.outbox_id]
                if entry.outcome is FanoutOutcome.DONE:
                    done.append(c.outbox_id)
                elif entry.outcome is FanoutOutcome.REPAIR:
                    downgrade.append(c.outbox_id)
        for outbox_id in done:
            self.outbox_done(outbox_id)
        self.outbox_downgrade(downgrade)

    async def renew_outbox_claims(self) -> None:
        """
        Keep this node's claim on the send rows whose fan-out is still
        running: a row counts as stale L{OUTBOX_STALE_MS} after its commit,
        but a fan-out backlog can take longer, and other nodes' sweepers
        must not replay it meanwhile (called by each sweep). An entry older
        than L{OUTBOX_COUNTDOWN_MAX_MS} is given up on (a message of its row
        never ended here: a bug): dropped, not renewed, so that a sweeper
        replays the row (its pushes again, harmlessly).
        """
        now = self._now_ms()
        old = [
            i for i, c in self._countdowns.items() if now - c.started_ms > OUTBOX_COUNTDOWN_MAX_MS
        ]
        for outbox_id in old:
            entry = self._countdowns.pop(outbox_id)
            self.log.warn(
                "fan-out of outbox row {id} unfinished after {s} s ({left} messages left):"
                " left to the sweeper",
                id=outbox_id,
                s=(now - entry.started_ms) // 1000,
                left=entry.left,
            )
        ids = sorted(self._countdowns)
        if ids:
            await self.background.run("outbox_renew", q.outbox_renew_txn, ids, self.node_id, now)

    @property
    def outbox_countdowns(self) -> int:
        """Send batches' outbox rows whose fan-out is not over yet."""
        return len(self._countdowns)

    # -- delivery state --------------------------------------------------------

    def ack(
        self, uid: int, msg_ids: Sequence[int], device_id: int = 0, seq: int | None = None
    ) -> Deferred[list[tuple[int, int, int]]]:
        """
        Clear pending messages; fires with the (msg_id, sender, session_id)
        that were pending (their recipient's deliveredUpTo moved with them).
        C{msg_ids} may be empty. With C{seq}, the cursor of the user's
        device C{device_id} moves up to it (never back), in the same
        transaction.
        """
        return self.acks.submit((uid, msg_ids, device_id, seq))

    async def _ack_requests(
        self, items: Sequence[AckItem]
    ) -> Sequence[list[tuple[int, int, int]] | ItemFailure]:
        return await self._isolating(
            "ack", items, self._ack_batch, lambda r: f"uid {r[0]} (msg_ids {list(r[1])[:8]})"
        )

    async def _ack_batch(self, items: Sequence[AckItem]) -> list[list[tuple[int, int, int]]]:
        requests = [(uid, msg_ids) for uid, msg_ids, _, _ in items]
        cursors = [
            (uid, device_id, seq)
            for uid, _, device_id, seq in items
            if device_id and seq is not None
        ]
        outbox = self._outbox("ack")
        done = self._take_done_outbox()
        try:
            removed = await self.db.run("ack", q.ack_txn, requests, outbox, done, cursors)
        except Exception as e:
            self._put_back_done_outbox(done)
            if isinstance(e, CommitUnknown):
                # Maybe acked: the retry will find nothing pending and skip
                # the hot step, so distrust these users' copies now (as a
                # send does), not only when the sweeper replays the row.
                self._hot_failed({uid for uid, _ in requests}, (), (), str(e))
            raise
        acked = [
            (uid, [(msg_id, sender) for msg_id, sender, _ in triples])
            for (uid, _), triples in zip(requests, removed, strict=True)
            if triples
        ]
        if acked:
            uids = {uid for uid, _ in acked}
            self._run_after_reply(
                self._follow_up(outbox.id, self.hot.ack(acked), uids, (), ()), uids
            )
        else:
            self.outbox_done(outbox.id)
        return removed

    async def pending(
        self, uid: int, after: int, limit: int, sender: int | None
    ) -> list[tuple[int, int]]:
        found = await self._hot_user_read(uid, lambda: self.hot.pending(uid, after, limit, sender))
        if found is not None:
            return found
        return await self.db.run("pending", q.pending_txn, uid, after, limit, sender)

    async def offline_summary(self, uid: int) -> list[tuple[int, int, int]]:
        found = await self._hot_user_read(uid, lambda: self.hot.offline_summary(uid))
        if found is None:
            found = await self.db.run("offline_summary", q.offline_summary_txn, uid)
        return sorted(found, key=lambda s: s[2], reverse=True)

    # -- reading and unread ------------------------------------------------------

    async def read(self, uid: int, session_id: int, msg_id: int) -> ReadResult:
        outbox = self._outbox("read")
        try:
            result = await self.db.run(
                "read", q.read_txn, uid, session_id, msg_id, outbox, self._now_ms()
            )
        except CommitUnknown as e:
            # Maybe read: as for an ack.
            self._hot_failed((uid,), (session_id,), (), str(e))
            raise
        if result.advanced_to is not None:
            self.saw_seq(uid, result.reader_seq)
            self.saw_seq(result.row.peer, result.peer_seq)
            self._run_after_reply(
                self._follow_up(outbox.id, self.hot.apply_rows([result.row]), {uid}, (), ()),
                (uid,),
            )
        return result

    async def unread(self, uid: int) -> list[tuple[int, int]]:
        convs = await self._hot_user_read(uid, lambda: self.hot.convs(uid, None, 0))
        if convs is None:
            return await self.db.run("unread", q.unread_txn, uid)
        return [(sid, total - read) for sid, _, total, read in convs if total > read]

    # -- devices and catch-up (see imserver.storage.devices) -----------------------

    async def catchup(self, uid: int, device_id: int, after: int, limit: int) -> CatchupPage:
        """
        The user's stream after C{after} (at most C{limit} events), skipping
        C{device_id}'s own sends; C{after} becomes the device's cursor.
        """
        return await self.device_store.catchup(uid, device_id, after, limit)

    async def head(self, uid: int) -> int:
        """The user's stream head (0 before any event, or for an unknown user)."""
        return await self.device_store.head(uid)

    async def devices(self, uid: int) -> list[DeviceRow]:
        return await self.device_store.devices(uid)

    async def device(self, uid: int, device: str) -> DeviceRow | None:
        return await self.device_store.device(uid, device)

    async def revoke_device(self, uid: int, device: str) -> DeviceRow | None:
        """Set the device's revokedAt to now; None if the user has no such device."""
        return await self.device_store.revoke_device(uid, device)

    async def touch_devices(self, device_ids: Sequence[int]) -> None:
        """These devices are connected: lastSeen = now (background pool)."""
        await self.device_store.touch_devices(device_ids)

    async def forget_devices(self, forget_ms: int) -> int:
        """Delete devices unseen for C{forget_ms} and older stream events (background)."""
        return await self.device_store.forget_devices(forget_ms)

    # -- recall ------------------------------------------------------------------

    async def recall(
        self,
        uid: int,
        msg_id: int,
        window_ms: int,
        then: Callable[[RecallResult], None] | None = None,
    ) -> RecallResult:
        """
        Recall a message. Its hot step runs after the reply, then C{then}
        with the result (the recall push: the recipient is told once the hot
        copy has it).
        A message recalled already (a retry after C{unavailable}, whose
        first try may have committed) has its copies invalidated and
        C{then} run again: pushes are idempotent by msg_id.
        """
        outbox = self._outbox("recall")
        try:
            result = await self.db.run(
                "recall", q.recall_txn, uid, msg_id, self._now_ms(), window_ms, outbox
            )
        except CommitUnknown as e:
            # Maybe recalled: distrust every copy it may have changed that
            # can be named without SQL (the retry finds it recalled already
            # and invalidates the rest).
            users, sessions = {uid}, set()
            try:
                cached = (await self.hot.messages([msg_id])).get(msg_id)
            except Exception:
                cached = None
            if cached is not None:
                users.add(cached.recipient)
                sessions.add(cached.session_id)
            self._hot_failed(users, sessions, (msg_id,), str(e))
            raise
        m = result.message
        self.saw_seq(m.sender, result.sender_seq)
        self.saw_seq(m.recipient, result.recipient_seq)
        self._run_after_reply(
            self._recall_follow_up(0 if result.already else outbox.id, result, then),
            (m.sender, m.recipient),
            (m.session_id,),
        )
        return result

    async def _recall_follow_up(
        self, outbox_id: int, result: RecallResult, then: Callable[[RecallResult], None] | None
    ) -> None:
        m = result.message
        users, sessions, msgs = (m.sender, m.recipient), (m.session_id,), (m.msg_id,)
        try:
            if result.already:
                step = self.hot.invalidate(users, sessions, msgs)
            else:
                step = self.hot.recall(m, result.recipient_row)
            await self._follow_up(outbox_id, step, users, sessions, msgs)
        finally:
            if then is not None:
                then(result)

    # -- receipts and mute (issue 11) ---------------------------------------------

    async def positions(
        self, uids: Sequence[int], session_ids: Sequence[int]
    ) -> dict[tuple[int, int], Positions]:
        """
        The (uid, session_id) rows' read, delivered and mute positions: one
        SQL query (the hot copy does not hold them; a page asks once).
        """
        if not uids or not session_ids:
            return {}
        return await self.db.run("positions", q.positions_txn, uids, session_ids)

    async def mute(self, uid: int, session_id: int, until: int) -> MuteResult:
        """
        Set the user's muteUntil in a session (SQL only: the hot copy holds
        no mute, so there is nothing to invalidate and no outbox row).
        """
        result = await self.db.run("mute", q.mute_txn, uid, session_id, until, self._now_ms())
        self.saw_seq(uid, result.seq)
        return result

    # -- conversations, history, messages ----------------------------------------

    async def convs(self, uid: int, before: int | None, limit: int) -> list[Conversation]:
        entries = await self._hot_user_read(uid, lambda: self.hot.convs(uid, before, limit))
        if entries is None:
            rows = await self.db.run("convs", q.convs_txn, uid, before, limit)
            peers = {r.session_id: r.peer for r in rows}
            entries = [(r.session_id, r.last_msg_id, r.total, r.read) for r in rows]
        else:
            members = await self.session_members([e[0] for e in entries])
            peers = {sid: lo if hi == uid else hi for sid, (lo, hi) in members.items()}
        last = await self.last_messages([e[0] for e in entries], viewer=uid)
        return [
            Conversation(sid, peers[sid], last_id, total, read, last.get(sid))
            for sid, last_id, total, read in entries
            if sid in peers
        ]

    async def last_messages(
        self, session_ids: Sequence[int], viewer: int | None = None
    ) -> dict[int, Message]:
        """Each session's newest normal message (that C{viewer} did not hide)."""
        if viewer is not None and session_ids and await self.edits.hides(viewer):
            return await self.edits.last_messages(viewer, session_ids)
        usable = [sid for sid in session_ids if self._hot_session(sid)]
        try:
            ids = await self.hot.last_in_windows(usable) if usable else {}
        except HotUnavailable:
            ids = {}
        found = await self.messages(list(ids.values()))
        out = {
            sid: found[msg_id]
            for sid, msg_id in ids.items()
            if msg_id in found and found[msg_id].status == RECORD_NORMAL
        }
        rest = [sid for sid in session_ids if sid not in out]
        if rest:
            out.update(await self.db.run("last_messages", q.last_normal_txn, rest))
        return out

    async def history(
        self, session_id: int, before: int | None, limit: int, viewer: int | None = None
    ) -> list[Message]:
        """Up to C{limit} normal messages below C{before} (that C{viewer} did not
        hide), newest first."""
        if viewer is not None and await self.edits.hides(viewer):
            return await self.edits.history(viewer, session_id, before, limit)
        if self._hot_session(session_id):
            try:
                ids = await self.hot.window(session_id, before, limit)
            except HotUnavailable:
                ids = []
            if len(ids) == limit:
                found = await self.messages(ids)
                page = [found.get(i) for i in ids]
                if all(m is not None and m.status == RECORD_NORMAL for m in page):
                    return [m for m in page if m is not None]
        return await self.db.run("history", q.history_txn, session_id, before, limit)

    async def messages(self, msg_ids: Sequence[int]) -> dict[int, Message]:
        """Messages by id (cached ones from the hot store, the rest from SQL)."""
        if not msg_ids:
            return {}
        try:
            found = await self.hot.messages(msg_ids)
        except HotUnavailable:
            found = {}
        missing = [i for i in msg_ids if i not in found]
        if missing:
            found.update(
                (m.msg_id, m) for m in await self.db.run("messages", q.messages_txn, missing)
            )
        return found

    async def normal_messages(self, msg_ids: Sequence[int]) -> list[Message]:
        """The messages of these ids that exist and are not recalled, in the order given."""
        found = await self.messages(msg_ids)
        return [found[i] for i in msg_ids if i in found and found[i].status == RECORD_NORMAL]

    # -- sessions ----------------------------------------------------------------

    def _remember_session(self, sid: int, a: int, b: int) -> None:
        pair = session_pair(a, b)
        self._pairs.put(pair, sid)
        self._members.put(sid, pair)

    async def session_members(self, session_ids: Sequence[int]) -> dict[int, tuple[int, int]]:
        found = {sid: self._members[sid] for sid in session_ids if sid in self._members}
        missing = [sid for sid in session_ids if sid not in found]
        if missing:
            for sid, pair in (
                await self.db.run("session_members", q.session_members_txn, missing)
            ).items():
                self._remember_session(sid, *pair)
                found[sid] = pair
        return found

    async def session_for_pair(self, a: int, b: int) -> int | None:
        pair = session_pair(a, b)
        sid = self._pairs.get(pair)
        if sid is None:
            sid = await self.db.run("session_for_pair", q.session_for_pair_txn, *pair)
            if sid is not None:
                self._remember_session(sid, *pair)
        return sid

    async def total_unread(self, uid: int) -> int:
        return sum(count for _, count in await self.unread(uid))

    # -- the hot copy: loading and repair ----------------------------------------

    def _run_after_reply(
        self,
        step: Coroutine[Any, Any, None],
        uids: Iterable[int],
        session_ids: Iterable[int] = (),
    ) -> None:
        """
        Run a hot-store step in the background (it handles its own
        failures); the users' (and sessions') reads go to SQL until it is
        done, so a reply never waits for Redis and a user still reads their
        own writes.
        """
        busy = Counter(uids)
        busy_sessions = Counter(session_ids)
        self._hot_busy.update(busy)
        self._hot_busy_sessions.update(busy_sessions)

        def done(_: object) -> None:
            self._hot_busy -= busy
            self._hot_busy_sessions -= busy_sessions
            self._after_reply.discard(d)

        d = Deferred.fromCoroutine(step)
        self._after_reply.add(d)
        d.addErrback(lambda f: self.log.failure("hot-store step after a reply failed", f))
        d.addBoth(done)

    def _hot_session(self, session_id: int) -> bool:
        """Whether the session's hot window can be trusted now."""
        return session_id not in self.suspect_sessions and session_id not in self._hot_busy_sessions

    async def _hot_user_read(self, uid: int, read: Callable[[], Awaitable[T | None]]) -> T | None:
        if uid in self.suspect_users or uid in self._hot_busy:
            self.hot_fallbacks += 1
            return None
        try:
            result = await read()
            if result is None and await self._load(uid):
                result = await read()
        except HotUnavailable:
            result = None
        if result is None:
            self.hot_fallbacks += 1
        return result

    async def _load(self, uid: int) -> bool:
        """Copy the user's state from SQL into the hot store."""
        self.loads += 1
        # The copy was gone: maybe a hide on another node invalidated it.
        self.edits.reloaded(uid)
        token = await self.hot.load_begin(uid)
        snapshot = await self.db.run("snapshot", q.snapshot_txn, uid)
        return await self.hot.load_finish(uid, token, snapshot)

    # -- outbox, repairs, replay -------------------------------------------------

    def _outbox(self, kind: str, now_ms: int | None = None) -> Outbox:
        """A new outbox row, created now (or at C{now_ms}, the time its transaction is given)."""
        created_at = self._now_ms() if now_ms is None else now_ms
        return Outbox(self.ids.next_id(), self.node_id, kind, created_at=created_at)

    async def _follow_up(
        self,
        outbox_id: int,
        step: Awaitable[None],
        uids: Iterable[int],
        session_ids: Iterable[int],
        msg_ids: Iterable[int],
    ) -> None:
        """
        Run a hot-store step that follows a commit; settle its outbox row.
        It never fails the request: the commit happened, so even an
        unexpected error (logged) only makes the copies suspect and
        repaired. (Raised, it would also make a batch run its halves again.)
        """
        try:
            await step
        except Exception as e:
            if not isinstance(e, HotUnavailable):
                self.log.failure("hot-store step after a commit failed", Failure())
            self._hot_failed(uids, session_ids, msg_ids, str(e))
            self.outbox_downgrade([outbox_id])
        else:
            self.outbox_done(outbox_id)

    def outbox_done(self, outbox_id: int) -> None:
        """
        The follow-up of this outbox row is complete: delete it, with the
        next commit or ack (or after L{OUTBOX_FLUSH_SECONDS} of quiet). A
        delete lost in a crash only means the row is replayed, harmlessly.
        """
        if outbox_id:
            self._done_outbox.append(outbox_id)
            self._arm_done_flush()

    def _take_done_outbox(self) -> list[int]:
        done, self._done_outbox = self._done_outbox, []
        return done

    def _put_back_done_outbox(self, done: list[int]) -> None:
        if done:
            self._done_outbox.extend(done)
            self._arm_done_flush()

    def _arm_done_flush(self) -> None:
        if self._done_flush is None and not self._stopped:
            self._done_flush = self._reactor.callLater(
                OUTBOX_FLUSH_SECONDS,
                lambda: Deferred.fromCoroutine(self._flush_done_outbox()),
            )

    async def _flush_done_outbox(self) -> None:
        self._done_flush = None
        done = self._take_done_outbox()
        if not done:
            return
        try:
            await self.background.run("outbox_done", q.delete_outbox, done)
        except Exception as e:
            self.log.warn("outbox rows not deleted yet: {error}", error=e)
            self._put_back_done_outbox(done)

    @property
    def outbox_backlog(self) -> int:
        """Outbox rows done but not deleted yet."""
        return len(self._done_outbox)

    def outbox_downgrade(self, outbox_ids: Sequence[int]) -> None:
        """
        Pushes done, hot repair pending: a replay must only repair. Written
        by one background transaction for all the rows of the next
        L{OUTBOX_FLUSH_SECONDS} (while Redis is out every fan-out batch
        fails: one transaction each would halve the send rate); a crash
        meanwhile only means the rows' messages are pushed again.
        """
        ids = [i for i in outbox_ids if i]
        if not ids:
            return
        self._downgrades.extend(ids)
        if self._downgrade_flush is None and not self._stopped:
            self._downgrade_flush = self._reactor.callLater(
                OUTBOX_FLUSH_SECONDS, self._flush_downgrades
            )

    def _flush_downgrades(self) -> None:
        self._downgrade_flush = None
        ids, self._downgrades = self._downgrades, []
        if ids:
            d = Deferred.fromCoroutine(
                self.background.run("outbox_downgrade", q.outbox_downgrade_txn, ids)
            )
            d.addErrback(lambda f: self.log.warn("outbox downgrade failed: {error}", error=f.value))
            # drain() waits for it: a row left 'send' would push again on replay.
            self._downgrading.add(d)
            d.addBoth(lambda _: self._downgrading.discard(d))

    def _hot_failed(
        self,
        uids: Iterable[int],
        session_ids: Iterable[int],
        msg_ids: Iterable[int],
        error: str,
    ) -> None:
        """A hot-store write failed: serve these from SQL, and repair them."""
        uids, session_ids, msg_ids = sorted(set(uids)), sorted(set(session_ids)), list(msg_ids)
        self.suspect_users.update(uids)
        self.suspect_sessions.update(session_ids)
        if self._stopped:
            return
        # Failures join the repair waiting for its next attempt: while Redis
        # is out that is one task (and one warning) per attempt, not one per
        # failed batch.
        repair = self._open_repair
        if repair is None:
            if self.retries.full:
                # Never fail the request that was committed: the repair waits
                # with the ones given up on.
                self._park(uids, session_ids, msg_ids)
                return
            repair = self._open_repair = _Repair(self.node_id)
            self.log.warn(
                "hot store write failed ({error}): repairing {n} users", error=error, n=len(uids)
            )
            task = Task(
                "repair",
                uids[0] if uids else 0,
                lambda: self._repair(repair),
                repair.row,
                on_dead=lambda: self._repair_dead(repair),
            )
            self.retries.add(task, error)
        repair.users.update(uids)
        repair.sessions.update(session_ids)
        repair.msgs.update(msg_ids)

    async def _repair(self, repair: _Repair) -> None:
        """
        Invalidate the copies a repair names. Failures during the attempt
        join a new repair; an attempt that fails makes its repair the one
        failures join again (or, if failures opened a new one meanwhile,
        joins it and ends), so an outage, however long, keeps one repair
        task with its backoff growing, not a new task per attempt.
        """
        if self._open_repair is repair:
            self._open_repair = None
        try:
            await self._invalidate_chunked(repair.users, repair.sessions, repair.msgs)
        except Exception:
            if self._stopped:
                raise
            newer = self._open_repair
            if newer is None:
                self._open_repair = repair
                raise
            # The newer repair's task does this one's work too.
            newer.users.update(repair.users)
            newer.sessions.update(repair.sessions)
            newer.msgs.update(repair.msgs)

    async def _invalidate_chunked(
        self, users: Counter[int], sessions: Counter[int], msgs: set[int]
    ) -> None:
        """
        Invalidate these copies chunk by chunk: messages first, then
        sessions, then users (a user served from the hot store again must
        not meet a stale cached message). Each chunk done leaves the given
        collections and, by the counts taken at the start, the suspects;
        if a chunk fails the rest stays in them. (Counts added meanwhile,
        by failures after the start, stay suspect.)
        """
        user_counts, session_counts = dict(users), dict(sessions)
        for part in chunks(sorted(msgs), REPAIR_CHUNK):
            await self.hot.invalidate((), (), part)
            msgs.difference_update(part)
        for part in chunks(sorted(session_counts), REPAIR_CHUNK):
            await self.hot.invalidate((), part)
            done = Counter({sid: session_counts[sid] for sid in part})
            # -= drops the counts that reach zero.
            sessions -= done
            self.suspect_sessions -= done
        for part in chunks(sorted(user_counts), REPAIR_CHUNK):
            await self.hot.invalidate(part, ())
            done = Counter({uid: user_counts[uid] for uid in part})
            users -= done
            self.suspect_users -= done

    def _repair_dead(self, repair: _Repair) -> None:
        """A repair's retries are exhausted: park it; later failures open a new one."""
        if self._open_repair is repair:
            self._open_repair = None
        self._park(repair.users, repair.sessions, repair.msgs)

    async def _dead_letter(self, task: Task) -> None:
        letter = DeadLetter(
            self.ids.next_id(),
            task.kind,
            task.ref,
            task.describe(),
            task.last_error,
            task.attempts,
            self._now_ms(),
        )
        await self.add_dead_letter(letter)

    async def add_dead_letter(self, letter: DeadLetter) -> bool:
        """Record a dead letter; False (logged) if it could not be written."""
        try:
            await self.background.run("dead_letter", q.dead_letter_txn, letter)
        except Exception as e:
            self.log.error("cannot record dead letter {letter}: {error}", letter=letter, error=e)
            return False
        return True

    def _park(
        self, uids: Iterable[int], session_ids: Iterable[int], msg_ids: Iterable[int]
    ) -> None:
        """
        A repair given up on keeps its users and sessions suspect (their
        reads stay on SQL, which is right) and is merged with the other
        parked ones, all invalidated together every C{parked_repair_seconds}
        until the hot store answers: without it they would stay suspect for
        the life of the process. (A C{Counter} of users or sessions adds its
        counts: one per failure that marked them suspect.)
        """
        self._parked_users.update(uids)
        self._parked_sessions.update(session_ids)
        self._parked_msgs.update(msg_ids)
        self._arm_parked()

    def _park_profiles(self, profiles: Iterable[Profile]) -> None:
        """A profile write given up on waits with the parked repairs (newest version kept)."""
        for p in profiles:
            held = self._parked_profiles.get(p.uid)
            if held is None or held.version <= p.version:
                self._parked_profiles[p.uid] = p
        self._arm_parked()

    @property
    def parked_repairs(self) -> int:
        """Users and sessions waiting for a repair given up on."""
        return len(self._parked_users) + len(self._parked_sessions)

    def _arm_parked(self) -> None:
        parked = any(
            (self._parked_users, self._parked_sessions, self._parked_msgs, self._parked_profiles)
        )
        if parked and self._parked_call is None and not self._stopped:
            self._parked_call = self._reactor.callLater(
                self.parked_repair_seconds, self._run_parked
            )

    def _run_parked(self) -> None:
        self._parked_call = None
        d = Deferred.fromCoroutine(self._repair_parked())
        d.addErrback(lambda f: self.log.failure("parked repairs failed", f))
        # Whatever happened, try again later while anything is parked.
        d.addBoth(lambda _: self._arm_parked())

    async def _repair_parked(self) -> None:
        """Write the parked profiles, then invalidate the parked copies (see
        L{_invalidate_chunked}: each chunk done is no longer suspect)."""
        users, sessions = len(self._parked_users), len(self._parked_sessions)
        profiles = dict(self._parked_profiles)
        try:
            for part in chunks(sorted(profiles), REPAIR_CHUNK):
                await self.hot.put_profiles([profiles[uid] for uid in part])
                for uid in part:
                    if self._parked_profiles.get(uid) is profiles[uid]:
                        del self._parked_profiles[uid]
            await self._invalidate_chunked(
                self._parked_users, self._parked_sessions, self._parked_msgs
            )
        except HotUnavailable as e:
            self.log.warn(
                "parked repairs of {n} users still waiting: {error}",
                n=len(self._parked_users),
                error=e,
            )
        else:
            if users or sessions:
                self.log.info(
                    "parked repairs done: {users} users, {sessions} sessions",
                    users=users,
                    sessions=sessions,
                )

    async def dead_letters(self, before: int | None, limit: int) -> list[DeadLetter]:
        return await self.background.run("dead_letters", q.dead_letters_txn, before, limit)

    async def replay_outbox(
        self,
        own: bool,
        limit: int = 500,
        push: Callable[[Sequence[Outbox]], Awaitable[None]] | None = None,
    ) -> list[Outbox]:
        """
        Redo the hot-store follow-up of outbox rows whose transactions
        committed but whose follow-up never finished: this node's rows from
        its previous life (C{own}), or any node's rows older than
        L{OUTBOX_STALE_MS}. Returns the rows replayed; rows whose repair
        fails stay for the next attempt. C{push} (the caller re-pushing the
        messages of C{send} rows) runs before the rows are deleted: if it
        raises, they stay too, and are replayed again.
        """
        now = self._now_ms()
        rows = await self.background.run(
            "outbox_claim",
            q.outbox_claim_txn,
            self.node_id,
            now,
            None if own else now - OUTBOX_STALE_MS,
            limit,
        )
        done = []
        # The claim holds for OUTBOX_STALE_MS: stop well before another node
        # may claim the same rows, and at the first outage (every other row
        # would wait for its timeout in turn); the rest stay claimed.
        deadline = now + OUTBOX_STALE_MS // 2
        for row in rows:
            if self._now_ms() >= deadline:
                break
            try:
                await self.hot.invalidate(
                    row.users, row.sessions, row.msgs if row.kind in ("recall", "edit") else ()
                )
            except HotUnavailable:
                break
            done.append(row)
        if done and push is not None:
            await push(done)
        if done:
            await self.background.run("outbox_done", q.delete_outbox, [r.id for r in done])
        return done

    def finish_unfinished(
        self, row: Outbox, push: Callable[[Sequence[Outbox]], Awaitable[None]]
    ) -> None:
        """
        A send answered as a duplicate found its original's outbox row
        unfinished and claimed it (L{q.commit_messages_txn}): replay it now,
        after the reply, rather than in a minute by the sweeper, so that a
        connected recipient gets a message whose first send was answered
        C{unavailable} (its commit's outcome unknown) as soon as the retry
        is. The steps are a replay's (invalidate, C{push}, delete), so they
        are idempotent: clients dedupe pushes by msg_id. Not when this node
        is still at it (the row's fan-out runs, or has ended, here: it
        settles the row itself), nor twice for one row.
        """
        if (
            row.id in self._countdowns
            or row.id in self._finishing
            or row.id in self._done_outbox
            or row.id in self._downgrades
        ):
            return
        self._finishing.add(row.id)
        self.finished_early += 1
        self._run_after_reply(self._finish_row(row, push), row.users)

    async def _finish_row(
        self, row: Outbox, push: Callable[[Sequence[Outbox]], Awaitable[None]]
    ) -> None:
        try:
            try:
                await self.hot.invalidate(row.users, row.sessions, ())
                indexed = True
            except Exception as e:
                if not isinstance(e, HotUnavailable):
                    self.log.failure("hot store invalidate failed unexpectedly", Failure())
                self._hot_failed(row.users, row.sessions, (), str(e))
                indexed = False
            try:
                await push([row])
            except Exception as e:
                # The row stays, claimed: the sweeper replays it once stale.
                self.log.warn(
                    "pushes of unfinished outbox row {id} failed: {error}", id=row.id, error=e
                )
                return
            if indexed:
                self.outbox_done(row.id)
            else:
                self.outbox_downgrade([row.id])
        finally:
            self._finishing.discard(row.id)

    async def outbox_size(self) -> int:
        return await self.background.run("outbox_size", q.outbox_size_txn)

    # -- offline notifications ----------------------------------------------------

    async def claim_notifications(self, lease_ms: int, limit: int) -> list[DueNotification]:
        return await self.background.run(
            "notify_claim", q.notify_claim_txn, self.node_id, self._now_ms(), lease_ms, limit
        )

    async def notifications_done(self, msg_ids: Sequence[int], release: Sequence[int] = ()) -> None:
        """Delete finished notifications and hand back (unclaim) the ones
        claimed but not started, in one transaction."""
        if msg_ids or release:
            await self.background.run(
                "notify_done", q.notify_done_txn, msg_ids, self.node_id, release
            )

    async def retry_notification(self, msg_id: int, due_ms: int) -> None:
        await self.background.run("notify_retry", q.notify_retry_txn, msg_id, due_ms)

    async def notify_backlog(self) -> int:
        return await self.background.run("notify_backlog", q.notify_backlog_txn)

    async def pending_count(self, uid: int) -> int:
        return await self.db.run("pending_count", q.pending_count_txn, uid)

    async def drain(self) -> None:
        """Wait until no commit, ack or login is queued or running, and
        delete the outbox rows of finished follow-ups."""
        for batcher in (self.sends, self.acks, self.logins):
            await batcher.idle()
        while self._after_reply:
            await next(iter(self._after_reply))
        if self._done_flush is not None and self._done_flush.active():
            self._done_flush.cancel()
        await self._flush_done_outbox()
        if self._downgrade_flush is not None and self._downgrade_flush.active():
            self._downgrade_flush.cancel()
        self._downgrade_flush = None
        self._flush_downgrades()
        while self._downgrading:
            await next(iter(self._downgrading))


@attrs.define(eq=False)
class _Repair:
    """What one repair task invalidates: every failure that joined it (counts per failure)."""

    node_id: int
    users: Counter[int] = attrs.Factory(Counter)
    sessions: Counter[int] = attrs.Factory(Counter)
    msgs: set[int] = attrs.Factory(set)

    def row(self) -> bytes:
        """A dead letter describes the repair as an outbox row would."""
        return Outbox(
            0,
            self.node_id,
            "repair",
            tuple(sorted(self.users)),
            tuple(sorted(self.sessions)),
            tuple(sorted(self.msgs)),
        ).payload()


def _select_one_txn(txn: Any) -> None:
    txn.query_one("SELECT 1")
