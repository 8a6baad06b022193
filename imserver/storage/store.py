"""
The storage layer as the business layer sees it: L{Store}.

One class over two parts chosen by the composition root: a L{Database}
(SQLite or MySQL, the truth) and an L{IHotStore} (Redis or in-process, the
seed's hot index). The business layer never knows which.

* Writes commit in SQL first (group-committed: concurrent sends share one
  transaction), then update the hot copy. If the hot store fails, the
  affected users and sessions become "suspect": their reads go to SQL, and a
  repair loop invalidates their hot copies as soon as the hot store answers,
  so they are rebuilt from SQL.
* Reads try the hot copy. A user without a ready copy (first use, after a
  FLUSHALL, after an invalidation) is loaded from SQL, then read again; if
  the hot store is down the read is answered from SQL.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from imserver.batching import Batcher
from imserver.errors import Unavailable
from imserver.storage.hot.interface import HotUnavailable, IHotStore
from imserver.storage.model import (
    RECORD_NORMAL,
    Committed,
    Conversation,
    ConvRow,
    Message,
    NewMessage,
    Profile,
    ReadResult,
    RecallResult,
    SendOutcome,
)
from imserver.storage.sql import queries as q
from imserver.storage.sql.database import Database
from imserver.storage.sql.migrate import migrate

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

REPAIR_INTERVAL = 1.0


class LRU(OrderedDict[K, V]):
    """A dict that forgets its oldest entries beyond C{size}."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: K, value: V) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


def _pair(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


class Store:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        db: Database,
        hot: IHotStore,
        *,
        max_batch: int = 500,
        max_queue: int = 50_000,
    ) -> None:
        self._reactor = reactor
        self.db = db
        self.hot = hot
        self.sends: Batcher[NewMessage, SendOutcome] = Batcher(
            "send", self._commit_batch, max_batch=max_batch, max_queue=max_queue
        )
        self.acks: Batcher[tuple[int, Sequence[int]], list[tuple[int, int]]] = Batcher(
            "ack", self._ack_batch, max_batch=max_batch, max_queue=max_queue
        )
        self.logins: Batcher[int, Profile] = Batcher(
            "login", self._ensure_batch, max_batch=max_batch, max_queue=max_queue
        )
        self._known_users: set[int] = set()
        self._pairs: LRU[tuple[int, int], int] = LRU(200_000)
        self._members: LRU[int, tuple[int, int]] = LRU(200_000)
        self.suspect_users: set[int] = set()
        self.suspect_sessions: set[int] = set()
        self._stale_profiles: dict[int, Profile] = {}
        self._repair: LoopingCall | None = None
        self._stopped = False
        # Read by metrics.
        self.hot_fallbacks = 0
        self.loads = 0

    def _now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)

    async def start(self) -> list[int]:
        """Apply migrations and connect the hot store; return migrations applied."""
        applied = await migrate(self.db, self._now_ms())
        await self.hot.start()
        return applied

    async def stop(self) -> None:
        self._stopped = True
        if self._repair is not None and self._repair.running:
            self._repair.stop()
        await self.hot.stop()
        self.db.close()

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
        return status

    # -- users ---------------------------------------------------------------

    async def ensure_user(self, uid: int) -> Profile:
        """The user's profile, creating the user on first sight (login)."""
        if uid in self._known_users:
            found = await self.profiles([uid])
            if uid in found:
                return found[uid]
        return await self.logins.submit(uid)

    async def _ensure_batch(self, uids: Sequence[int]) -> list[Profile]:
        profiles = await self.db.run("ensure_users", q.ensure_users_txn, uids, self._now_ms())
        by_uid = {p.uid: p for p in profiles}
        self._known_users.update(by_uid)
        await self._put_profiles(profiles)
        return [by_uid[uid] for uid in uids]

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
            await self._put_profiles(rows)
        return found

    async def _put_profiles(self, profiles: Sequence[Profile]) -> None:
        try:
            await self.hot.put_profiles(profiles)
        except HotUnavailable:
            self._stale_profiles.update((p.uid, p) for p in profiles)
            self._start_repair()

    async def set_profile(
        self, uid: int, nickname: str | None, avatar: str | None
    ) -> Profile | None:
        profile = await self.db.run(
            "set_profile", q.set_profile_txn, uid, nickname, avatar, self._now_ms()
        )
        if profile is not None:
            await self._put_profiles([profile])
        return profile

    async def upsert_user(
        self, uid: int, nickname: str | None, avatar: str | None
    ) -> tuple[Profile, bool]:
        profile, created = await self.db.run(
            "upsert_user", q.upsert_user_txn, uid, nickname, avatar, self._now_ms()
        )
        self._known_users.add(uid)
        await self._put_profiles([profile])
        return profile, created

    # -- sending ---------------------------------------------------------------

    def session_hint(self, a: int, b: int) -> int | None:
        """The pair's session id if this node has seen it."""
        return self._pairs.get(_pair(a, b))

    def commit(self, message: NewMessage) -> Deferred[SendOutcome]:
        """Commit one message (with whatever else is being sent now)."""
        return self.sends.submit(message)

    async def _commit_batch(self, msgs: Sequence[NewMessage]) -> list[SendOutcome]:
        started = self._reactor.seconds()
        check = sorted({m.recipient for m in msgs if m.recipient not in self._known_users})
        msgs = [
            m
            if m.session_id is not None
            else attrs.evolve(m, session_id=self._pairs.get(_pair(m.sender, m.recipient)))
            for m in msgs
        ]
        try:
            outcomes = await self.db.run("send", q.commit_messages_txn, msgs, check, self._now_ms())
        except Unavailable:
            # The commit may or may not have happened: distrust every copy
            # these messages could have changed.
            self._suspect(
                {u for m in msgs for u in (m.sender, m.recipient)},
                {m.session_id for m in msgs if m.session_id is not None},
            )
            raise
        result: list[SendOutcome] = []
        for outcome in outcomes:
            if isinstance(outcome, Committed):
                m = outcome.message
                self._known_users.add(m.recipient)
                self._remember_session(m.session_id, m.sender, m.recipient)
                outcome = attrs.evolve(outcome, started=started)
            result.append(outcome)
        return result

    async def fanout(self, committed: Sequence[Committed]) -> None:
        """Index committed messages in the hot store (in commit order)."""
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
        except HotUnavailable:
            self._suspect(
                {u for c in committed for u in (c.message.sender, c.message.recipient)},
                {c.message.session_id for c in committed},
            )

    # -- delivery state --------------------------------------------------------

    def ack(self, uid: int, msg_ids: Sequence[int]) -> Deferred[list[tuple[int, int]]]:
        """Clear pending messages; fires with the (msg_id, sender) that were pending."""
        return self.acks.submit((uid, msg_ids))

    async def _ack_batch(
        self, requests: Sequence[tuple[int, Sequence[int]]]
    ) -> list[list[tuple[int, int]]]:
        removed = await self.db.run("ack", q.ack_txn, requests)
        acked = [(uid, pairs) for (uid, _), pairs in zip(requests, removed, strict=True) if pairs]
        if acked:
            try:
                await self.hot.ack(acked)
            except HotUnavailable:
                self._suspect({uid for uid, _ in acked}, ())
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
        result = await self.db.run("read", q.read_txn, uid, session_id, msg_id)
        if result.advanced_to is not None:
            try:
                await self.hot.apply_rows([result.row])
            except HotUnavailable:
                self._suspect({uid}, ())
        return result

    async def unread(self, uid: int) -> list[tuple[int, int]]:
        convs = await self._hot_user_read(uid, lambda: self.hot.convs(uid, None, 0))
        if convs is None:
            return await self.db.run("unread", q.unread_txn, uid)
        return [(sid, total - read) for sid, _, total, read in convs if total > read]

    # -- recall ------------------------------------------------------------------

    async def recall(self, uid: int, msg_id: int, window_ms: int) -> RecallResult:
        result = await self.db.run("recall", q.recall_txn, uid, msg_id, self._now_ms(), window_ms)
        if not result.already:
            try:
                await self.hot.recall(result.message, result.recipient_row)
            except HotUnavailable:
                m = result.message
                self._suspect({m.sender, m.recipient}, {m.session_id})
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
        last = await self.last_messages([e[0] for e in entries])
        return [
            Conversation(sid, peers[sid], last_id, total, read, last.get(sid))
            for sid, last_id, total, read in entries
            if sid in peers
        ]

    async def last_messages(self, session_ids: Sequence[int]) -> dict[int, Message]:
        """Each session's newest normal message."""
        usable = [sid for sid in session_ids if sid not in self.suspect_sessions]
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

    async def history(self, session_id: int, before: int | None, limit: int) -> list[Message]:
        """Up to C{limit} normal messages below C{before}, newest first."""
        if session_id not in self.suspect_sessions:
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

    # -- sessions ----------------------------------------------------------------

    def _remember_session(self, sid: int, a: int, b: int) -> None:
        pair = _pair(a, b)
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
        pair = _pair(a, b)
        sid = self._pairs.get(pair)
        if sid is None:
            sid = await self.db.run("session_for_pair", q.session_for_pair_txn, *pair)
            if sid is not None:
                self._remember_session(sid, *pair)
        return sid

    async def total_unread(self, uid: int) -> int:
        return sum(count for _, count in await self.unread(uid))

    # -- the hot copy: loading and repair ----------------------------------------

    async def _hot_user_read(self, uid: int, read: Callable[[], Awaitable[T | None]]) -> T | None:
        if uid in self.suspect_users:
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
        token = await self.hot.load_begin(uid)
        snapshot = await self.db.run("snapshot", q.snapshot_txn, uid)
        return await self.hot.load_finish(uid, token, snapshot)

    def _suspect(self, uids: Iterable[int], session_ids: Iterable[int]) -> None:
        self.suspect_users.update(uids)
        self.suspect_sessions.update(session_ids)
        self._start_repair()

    def _start_repair(self) -> None:
        if self._stopped:
            return
        if self._repair is None or not self._repair.running:
            self.log.warn("hot store write failed: serving affected users from SQL until repaired")
            self._repair = LoopingCall(lambda: Deferred.fromCoroutine(self._repair_once()))
            self._repair.clock = self._reactor
            self._repair.start(REPAIR_INTERVAL, now=False).addErrback(
                lambda f: self.log.failure("hot store repair loop failed", f)
            )

    async def _repair_once(self) -> None:
        users, sessions = set(self.suspect_users), set(self.suspect_sessions)
        profiles = dict(self._stale_profiles)
        try:
            if users or sessions:
                await self.hot.invalidate(sorted(users), sorted(sessions))
            if profiles:
                await self.hot.put_profiles(list(profiles.values()))
        except HotUnavailable:
            return
        self.suspect_users -= users
        self.suspect_sessions -= sessions
        for uid in profiles:
            if self._stale_profiles.get(uid) is profiles[uid]:
                del self._stale_profiles[uid]
        if not (self.suspect_users or self.suspect_sessions or self._stale_profiles):
            self.log.info("hot store repaired")
            assert self._repair is not None
            self._repair.stop()

    async def drain(self) -> None:
        """Wait until no commit, ack or login is queued or running."""
        for batcher in (self.sends, self.acks, self.logins):
            await batcher.idle()


def _select_one_txn(txn: Any) -> None:
    txn.query_one("SELECT 1")
