"""
Blocking (docs/protocol.md, "Blocking"): who refuses whom.

Every send asks, so the answer comes from a node cache: per user, the set of
users it blocks (its OUTGOING blocks only: at most C{max_blocks}, nearly
always empty), at most L{CACHE_USERS} users (least recently used go first).
A pair is blocked when either user's entry names the other, so a pair is
known here once both users are. (Who blocks a user is not kept: a spammer
blocked by 100,000 accounts would be a 100,000-entry set on every node.) A
miss loads the users not known in one SQL query; while sends wait for such
loads, every later send queues behind them and all are let through in the
order they came (their ids are given out then), so msg_ids still follow the
order of the sends on this node (and commits the order of msg_ids), as they
did without blocks. Misses are rare (a user's first send on a node), so the
queue is nearly always empty; it is bounded all the same: beyond
L{MAX_QUEUED_SENDS} a send is refused with C{unavailable} at once, and a load
that takes longer than L{LOAD_TIMEOUT_SECONDS} (a SQL stall) fails its
waiting sends with C{unavailable} (its late answer is dropped).

Changes are applied here after their commit and broadcast to the other
nodes (C{presence.broadcast("block", [blocker, blocked, now_blocked])}),
which apply them within a moment: a send racing a block on another node may
pass. A broadcast lost (Redis down) is made up for by the refresh: an entry
older than L{REFRESH_SECONDS} is reloaded in the background when used (once a
second, the users found stale meanwhile in one query on the background pool:
a node's refreshes cost one small query a second, however many users it
serves), and what it finds changed is applied (and told to the listeners) as
a change.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.errors import ErrorCode, ImError
from imserver.services.presence import IClientLink, IPresence
from imserver.storage.blocks import EMPTY, BlockStore
from imserver.storage.store import Store

#: Told (blocker, blocked, now_blocked) of every change, on this node or another.
BlockListener = Callable[[int, int, bool], None]
#: A change: (blocker, blocked, now_blocked).
Change = tuple[int, int, bool]
#: The users one user blocks.
Outgoing = frozenset[int]

#: Users whose blocks a node keeps (an entry without blocks is a few dozen bytes).
CACHE_USERS = 100_000
#: An entry used after this long is reloaded (in the background: the stale
#: entry answers meanwhile). It bounds how long a lost broadcast is missed.
REFRESH_SECONDS = 60.0
#: Stale entries are gathered this long, then refreshed together.
REFRESH_BATCH_SECONDS = 1.0
#: Users one refresh reloads at most (more wait for the next one).
REFRESH_BATCH_USERS = 1000
#: Sends waiting for a block check at most; more are refused with unavailable.
MAX_QUEUED_SENDS = 5000
#: A load's waiting sends fail with unavailable after this long.
LOAD_TIMEOUT_SECONDS = 5.0
#: The broadcast kind of block changes.
BROADCAST = "block"
#: Why a send is refused while the block checks cannot keep up.
BEHIND = "the server is overloaded; retry shortly"

Result = dict[str, Any]


@attrs.define(eq=False)
class _Queued:
    """A send's check waiting for its turn: its answer once known, then its Deferred fires."""

    sender: int
    to: int
    result: Deferred[bool]
    answer: bool | Failure | None = None
    #: Told once the send has gone on (L{BlockService.idle}).
    gone: list[Deferred[None]] = attrs.Factory(list)


@attrs.define(eq=False)
class _Load:
    """A load of some users' blocks on its way: who waits, what changed meanwhile."""

    uids: tuple[int, ...]
    waiters: list[Deferred[dict[int, Outgoing]]] = attrs.Factory(list)
    changes: list[Change] = attrs.Factory(list)
    timer: IDelayedCall | None = None
    #: Given up (timed out): its answer, when it comes, is dropped.
    abandoned: bool = False


def _changed(blocks: Outgoing, uid: int, change: Change) -> Outgoing:
    """C{uid}'s outgoing blocks once C{change} is applied."""
    blocker, blocked, now = change
    if uid != blocker or (blocked in blocks) == now:
        return blocks
    new = blocks | {blocked} if now else blocks - {blocked}
    return new if new else EMPTY


def _differences(uid: int, old: Outgoing, new: Outgoing) -> list[Change]:
    """The changes that make C{old} into C{new} (a refresh that found broadcasts missed)."""
    return [*((uid, v, True) for v in new - old), *((uid, v, False) for v in old - new)]


class BlockService:
    log = Logger()

    def __init__(
        self,
        *,
        store: Store,
        presence: IPresence,
        clock: IReactorTime,
        max_blocks: int,
        cache_size: int = CACHE_USERS,
        refresh_seconds: float = REFRESH_SECONDS,
        max_queued: int = MAX_QUEUED_SENDS,
        load_timeout: float = LOAD_TIMEOUT_SECONDS,
    ) -> None:
        self.store = store
        self.presence = presence
        self.clock = clock
        self.max_blocks = max_blocks
        self.cache_size = cache_size
        self.refresh_seconds = refresh_seconds
        self.max_queued = max_queued
        self.load_timeout = load_timeout
        self.sql = BlockStore(store.db, store.background)
        self._listeners: list[BlockListener] = []
        # uid -> (whom it blocks, when loaded).
        self._cache: OrderedDict[int, tuple[Outgoing, float]] = OrderedDict()
        self._loads: dict[int, _Load] = {}
        # Entries found stale, for the next refresh (an ordered set).
        self._stale: dict[int, None] = {}
        self._refresh_call: IDelayedCall | None = None
        # Sends whose check waits for a load, and those behind them, in order.
        self._queue: deque[_Queued] = deque()
        #: Read by tests and metrics: SQL loads, sends refused.
        self.loaded = 0
        self.refused = 0
        presence.on_broadcast(BROADCAST, self._heard)

    # -- asking ------------------------------------------------------------------

    async def either(self, a: int, b: int) -> bool:
        """Whether C{a} blocks C{b} or C{b} blocks C{a} (loads what it needs)."""
        known = self.either_now(a, b)
        if known is not None:
            return known
        missing = [uid for uid in (a, b) if uid not in self._cache]
        loads: list[_Load] = []
        for uid in missing:
            load = self._loads.get(uid)
            if load is not None and not any(load is other for other in loads):
                loads.append(load)
        waits = [self._wait(load) for load in loads]
        new = [uid for uid in missing if uid not in self._loads]
        if new:
            waits.append(self._start_load(new, wait=True))
        found: dict[int, Outgoing] = {}
        for d in waits:
            found.update(await d)
        # The cache first: changes applied since a load answered are in it.
        out_a = self._cache[a][0] if a in self._cache else found.get(a, EMPTY)
        out_b = self._cache[b][0] if b in self._cache else found.get(b, EMPTY)
        return b in out_a or a in out_b

    def either_now(self, a: int, b: int) -> bool | None:
        """As L{either}, from this node's cache only; None when not known here."""
        entry_a = self._cache.get(a)
        if entry_a is None:
            return None
        entry_b = self._cache.get(b)
        if entry_b is None:
            return None
        self._used(a, entry_a[1])
        self._used(b, entry_b[1])
        return b in entry_a[0] or a in entry_b[0]

    def for_send(self, sender: int, to: int, now: float) -> bool | Deferred[bool]:
        """
        Whether a send at C{now} is between a blocked pair: at once from the
        cache (the hot path: two lookups, no clock call), or a Deferred when
        the answer needs a load or sends wait for one (it fires in the order
        of the sends, see the module docstring).

        @raise ImError: C{unavailable}, when L{max_queued} sends wait already.
        """
        if not self._queue:
            mine = self._cache.get(sender)
            if mine is not None:
                theirs = self._cache.get(to)
                if theirs is not None:
                    self._cache.move_to_end(sender)
                    self._cache.move_to_end(to)
                    if mine[1] + self.refresh_seconds < now:
                        self._stale_entry(sender)
                    if theirs[1] + self.refresh_seconds < now:
                        self._stale_entry(to)
                    return to in mine[0] or sender in theirs[0]
        elif len(self._queue) >= self.max_queued:
            raise ImError(ErrorCode.UNAVAILABLE, BEHIND)
        return self._queued(sender, to)

    def _queued(self, sender: int, to: int) -> Deferred[bool]:
        item = _Queued(sender, to, Deferred())
        self._queue.append(item)
        d = Deferred.fromCoroutine(self.either(sender, to))
        d.addCallbacks(self._answered, self._answered, (item,), errbackArgs=(item,))
        return item.result

    def _answered(self, answer: bool | Failure, item: _Queued) -> None:
        item.answer = answer
        while self._queue and self._queue[0].answer is not None:
            done = self._queue.popleft()
            if isinstance(done.answer, Failure):
                done.result.errback(done.answer)
            else:
                done.result.callback(bool(done.answer))
            for waiter in done.gone:
                waiter.callback(None)

    async def idle(self) -> None:
        """Wait until the sends queued for a block check so far have gone on (drain)."""
        if self._queue:
            d: Deferred[None] = Deferred()
            self._queue[-1].gone.append(d)
            await d

    @property
    def queued_sends(self) -> int:
        return len(self._queue)

    @property
    def cached_users(self) -> int:
        return len(self._cache)

    def on_change(self, listener: BlockListener) -> None:
        """Call C{listener} on every block or unblock, here or on another node."""
        self._listeners.append(listener)

    # -- the ops -----------------------------------------------------------------------

    async def block(self, uid: int, other: int, origin: IClientLink | None = None) -> Result:
        """C{uid} blocks C{other} (idempotent); C{uid}'s other devices are told."""
        if uid == other:
            raise ImError(ErrorCode.INVALID, "you cannot block yourself")
        now_ms = int(self.clock.seconds() * 1000)
        await self.sql.block(uid, other, self.max_blocks, now_ms)
        self._committed((uid, other, True), origin)
        return {}

    async def unblock(self, uid: int, other: int, origin: IClientLink | None = None) -> Result:
        """C{uid} no longer blocks C{other} (idempotent); C{uid}'s other devices are told."""
        if uid == other:
            raise ImError(ErrorCode.INVALID, "you cannot unblock yourself")
        await self.sql.unblock(uid, other)
        self._committed((uid, other, False), origin)
        return {}

    async def blocked(self, uid: int, after: int, limit: int) -> Result:
        """A page of the users C{uid} blocks, ascending: C{{uids, more}}."""
        uids = await self.sql.blocked(uid, after, limit + 1)
        return {"uids": uids[:limit], "more": len(uids) > limit}

    def _committed(self, change: Change, origin: IClientLink | None) -> None:
        # Also when nothing changed (a retry after unavailable): telling again is harmless.
        blocker, blocked, now = change
        self._apply(change)
        self.presence.broadcast(BROADCAST, [blocker, blocked, now])
        self.presence.push(blocker, {"t": "block", "uid": blocked, "blocked": now}, origin)

    # -- the cache ---------------------------------------------------------------------

    def _used(self, uid: int, loaded: float) -> None:
        self._cache.move_to_end(uid)
        if loaded + self.refresh_seconds < self.clock.seconds():
            self._stale_entry(uid)

    def _stale_entry(self, uid: int) -> None:
        if uid in self._stale or uid in self._loads:
            return
        self._stale[uid] = None
        if self._refresh_call is None:
            self._refresh_call = self.clock.callLater(REFRESH_BATCH_SECONDS, self._refresh)

    def _refresh(self) -> None:
        self._refresh_call = None
        uids: list[int] = []
        while self._stale and len(uids) < REFRESH_BATCH_USERS:
            uid = next(iter(self._stale))
            del self._stale[uid]
            if uid in self._cache and uid not in self._loads:
                uids.append(uid)
        if self._stale:
            self._refresh_call = self.clock.callLater(REFRESH_BATCH_SECONDS, self._refresh)
        if uids:
            self._start_load(uids, background=True)

    def stop(self) -> None:
        """No more refreshes (the loads on their way finish)."""
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = None
        self._stale.clear()

    def _put(self, uid: int, blocks: Outgoing) -> None:
        self._cache[uid] = (blocks, self.clock.seconds())
        self._cache.move_to_end(uid)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _wait(self, load: _Load) -> Deferred[dict[int, Outgoing]]:
        d: Deferred[dict[int, Outgoing]] = Deferred()
        load.waiters.append(d)
        return d

    def _start_load(
        self, uids: Sequence[int], wait: bool = False, background: bool = False
    ) -> Deferred[dict[int, Outgoing]]:
        """
        Load these users (none of them loading now); with C{wait}, the first
        waiter. A refresh (C{background}) takes the background pool: a miss
        holds a send, a refresh holds nothing. Given up after L{load_timeout}.
        """
        load = _Load(tuple(dict.fromkeys(uids)))
        for uid in load.uids:
            self._loads[uid] = load
        waiter: Deferred[dict[int, Outgoing]] = Deferred()
        if wait:
            load.waiters.append(waiter)
        load.timer = self.clock.callLater(self.load_timeout, self._timed_out, load)
        d = Deferred.fromCoroutine(self._load(load, background))
        d.addErrback(lambda f: self.log.failure("loading blocks failed", f))
        return waiter

    def _timed_out(self, load: _Load) -> None:
        """A load too slow (a SQL stall): its sends fail now, the next miss loads again."""
        load.timer = None
        load.abandoned = True
        self._done(load)
        self.log.warn(
            "loading blocks of {users} users took over {seconds} s: given up",
            users=len(load.uids),
            seconds=self.load_timeout,
        )
        failure = Failure(ImError(ErrorCode.UNAVAILABLE, "the database is slow; retry shortly"))
        waiters, load.waiters = load.waiters, []
        for waiter in waiters:
            waiter.errback(failure)

    async def _load(self, load: _Load, background: bool) -> None:
        self.loaded += 1
        try:
            found = await self.sql.load(load.uids, background)
        except Exception:
            failure = Failure()
            if load.abandoned:
                return
            self._done(load)
            if not load.waiters:
                # A background refresh: the entry stays, and its next use tries again.
                self.log.warn("refreshing blocks failed: {error}", error=failure.value)
            for waiter in load.waiters:
                waiter.errback(failure)
            return
        if load.abandoned:
            # Changes made since it was given up were not kept for it: drop it.
            return
        self._done(load)
        # What changed while the query ran may be missing from its rows.
        for change in load.changes:
            for uid in found:
                found[uid] = _changed(found[uid], uid, change)
        missed: list[Change] = []
        for uid, blocks in found.items():
            old = self._cache.get(uid)
            if old is not None and old[0] != blocks:
                missed.extend(_differences(uid, old[0], blocks))
            self._put(uid, blocks)
        for waiter in load.waiters:
            waiter.callback(found)
        for change in dict.fromkeys(missed):
            self.log.info(
                "blocks of {blocker} -> {blocked} found changed by a refresh",
                blocker=change[0],
                blocked=change[1],
            )
            self._apply(change)

    def _done(self, load: _Load) -> None:
        if load.timer is not None and load.timer.active():
            load.timer.cancel()
        load.timer = None
        for uid in load.uids:
            if self._loads.get(uid) is load:
                del self._loads[uid]

    def _apply(self, change: Change) -> None:
        """A change committed (here or elsewhere): into the cache, then to the listeners."""
        blocker = change[0]
        # Only the blocker's entry holds it (outgoing blocks: see the module docstring).
        load = self._loads.get(blocker)
        if load is not None:
            load.changes.append(change)
        entry = self._cache.get(blocker)
        if entry is not None:
            self._cache[blocker] = (_changed(entry[0], blocker, change), entry[1])
        for listener in self._listeners:
            try:
                listener(*change)
            except Exception:
                self.log.failure("a block listener failed", Failure())

    def _heard(self, data: Any) -> None:
        """A change made on another node."""
        if (
            not isinstance(data, list | tuple)
            or len(data) != 3
            or not all(type(v) is int for v in data[:2])
            or type(data[2]) is not bool
        ):
            self.log.warn("unreadable block broadcast: {data!r}", data=data)
            return
        self._apply((data[0], data[1], data[2]))
