"""
Presence and typing (docs/protocol.md, "Presence and typing").

Who is online comes from L{IPresence}: it reports user-level transitions
(a user's first device connected anywhere, the last one gone), one
broadcast per transition across the cluster. Each node keeps, in memory,
the watchers of its own connections (uid -> watching connection -> may it
see the user), decided when the connection watches and again when
something that decides it changes (the user's C{share} setting, a block);
so a transition costs a dict lookup and one push per visible local watcher,
never a SQL query. Pushes are coalesced per (node, uid): the first change
is pushed at once, later ones within L{COALESCE_SECONDS} wait for the
window's end, where only the last state is pushed (a flap back to where it
was pushes nothing more).

last_seen is when the user was last connected: while online, when the
current session began (answers: the connect time of the user's
longest-connected device; pushes: when the login that brought the user
online completed); once offline, when the last device left. The node that sees
a transition writes it to SQL (t_presence, batched every second).

A node that dies sends no offline: every L{CHECK_SECONDS} each node asks
presence about (a bounded number of) the watched users it believes online
elsewhere, and tells the ones found without devices as gone.

Typing is never stored: a push to the peer's devices.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from imserver.chat.blocks import BlockService
from imserver.errors import ErrorCode, ImError, Unavailable
from imserver.services.presence import IClientLink, IPresence
from imserver.storage.presence import DEFAULT_SHARE, SHARE_CODES, PresenceRow, PresenceStore
from imserver.storage.store import Store

Result = dict[str, Any]
#: At most one presence push per watched user per watcher in this long.
COALESCE_SECONDS = 3.0
#: last_seen writes of this long share one statement.
SEEN_FLUSH_SECONDS = 1.0
#: The broadcast kind of share changes: [uid, share].
SHARE_KIND = "presence_share"
#: Last transitions remembered for users nobody here watches (their SQL
#: write may be a second behind the broadcast).
MAX_HEARD = 50_000
#: How often the watched users believed online elsewhere are checked, and
#: how many a check asks about at most (asked together): a node that
#: dies sends no offline, its users' presence expires by TTL.
CHECK_SECONDS = 30.0
CHECK_MAX = 500
#: What a user one may not see looks like: never seen.
HIDDEN = (False, 0)
#: What L{PresenceService._online} answers when presence cannot say (Redis
#: down and no connection here): neither online nor offline.
UNKNOWN = -1
#: A watch whose targets' decisions keep changing under it decides again at
#: most this often, then shows those targets hidden (the next change decides).
MAX_REDECIDE = 3

State = tuple[bool, int]


def entry(uid: int, state: State) -> Result:
    return {"uid": uid, "online": state[0], "last_seen": state[1]}


class PresenceService:
    log = Logger()

    def __init__(
        self,
        *,
        store: Store,
        presence: IPresence,
        blocks: BlockService,
        clock: IReactorTime,
        window: float = COALESCE_SECONDS,
    ) -> None:
        self.store = store
        self.sql = PresenceStore(store.db, store.background)
        self.presence = presence
        self.blocks = blocks
        self.clock = clock
        self.window = window
        #: target uid -> watching connection here -> whether it may see the target.
        self._watchers: dict[int, dict[IClientLink, bool]] = {}
        #: connection -> (its uid, the uids it watches, the watch's number).
        self._watching: dict[IClientLink, tuple[int, frozenset[int], int]] = {}
        self._watches = 0
        #: For watched targets: the last state known, the last pushed, the share setting.
        self._state: dict[int, State] = {}
        self._pushed: dict[int, State] = {}
        self._shares: dict[int, str] = {}
        self._windows: dict[int, IDelayedCall] = {}
        #: The last offline time heard of each user (any node's), newest last.
        self._heard: OrderedDict[int, int] = OrderedDict()
        #: last_seen writes waiting for their flush: uid -> ms.
        self._seen: dict[int, int] = {}
        self._seen_call: IDelayedCall | None = None
        self._check_call: IDelayedCall | None = None
        self._check_after = 0
        #: Decisions under way (share and block changes).
        self._busy: set[Deferred[None]] = set()
        #: target uid -> a counter bumped by each share or block change about it:
        #: a watch that saw it move while it waited decides again.
        self._decisions: dict[int, int] = {}
        #: Connections that left presence: a watch queued behind their kick
        #: must not register them (nothing would unwatch them again).
        self._left: weakref.WeakSet[IClientLink] = weakref.WeakSet()
        presence.on_change(self._changed)
        presence.on_link_gone(self._gone)
        presence.on_broadcast(SHARE_KIND, self._share_heard)
        blocks.on_change(self._block_changed)
        # Read by metrics and tests.
        self.pushes = 0
        self.coalesced = 0
        self.typing_pushes = 0
        self.verified = 0

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # -- presence {uids} and watch {uids} ------------------------------------------

    async def query(self, uid: int, uids: Sequence[int]) -> Result:
        """The presence of these users as C{uid} may see it (hidden: never seen)."""
        targets = list(dict.fromkeys(uids))
        visible, rows = await self._decide(uid, targets)
        states = await self._states(targets, visible, rows)
        return {"users": [entry(t, states[t]) for t in targets]}

    async def watch(self, uid: int, link: IClientLink, uids: Sequence[int]) -> Result:
        """
        Make C{uids} the connection's watched users (replacing its set; none
        stops watching) and answer their state now, as L{query} does.
        """
        targets = list(dict.fromkeys(uids))
        self._unwatch(link)
        if not targets:
            return {"users": []}
        if link in self._left:
            # Gone (kicked, closed) before this queued request ran: answer, but
            # register nothing.
            return await self.query(uid, targets)
        self._watches += 1
        number = self._watches
        # Registered before the first wait (not visible yet): a transition
        # meanwhile is kept in the state the reply then shows.
        self._watching[link] = (uid, frozenset(targets), number)
        for t in targets:
            self._watchers.setdefault(t, {})[link] = False
        self._arm_check()
        before = {t: self._decisions.get(t, 0) for t in targets}
        visible, rows = await self._decide(uid, targets)
        states = await self._states(targets, visible, rows)
        # A share or block change heard during the wait may have been decided
        # (for this link: not visible yet) before this decision, read before
        # the change: decide those targets again.
        for _ in range(MAX_REDECIDE):
            moved = [t for t in targets if self._decisions.get(t, 0) != before[t]]
            if not moved or self._watching.get(link, (0, 0, 0))[2] != number:
                break
            before.update({t: self._decisions.get(t, 0) for t in moved})
            again, again_rows = await self._decide(uid, moved)
            visible.update(again)
            rows.update(again_rows)
            states.update(await self._states(moved, again, again_rows))
        else:
            for t in targets:
                if self._decisions.get(t, 0) != before[t]:
                    visible[t], states[t] = False, HIDDEN
        current = self._watching.get(link)
        if current is None or current[2] != number:
            # Replaced, or the connection went, during the wait.
            return {"users": [entry(t, states[t]) for t in targets]}
        for t in targets:
            watchers = self._watchers.get(t)
            if watchers is not None and link in watchers:
                watchers[link] = visible[t]
            self._shares[t] = rows[t].share
            if visible[t]:
                known = self._state.setdefault(t, states[t])
                self._pushed.setdefault(t, known)
                states[t] = known
        return {"users": [entry(t, states[t]) for t in targets]}

    def watched(self, link: IClientLink) -> frozenset[int]:
        """The uids the connection watches (tests, metrics)."""
        current = self._watching.get(link)
        return frozenset() if current is None else current[1]

    def watchers(self, uid: int) -> int:
        """How many connections here watch C{uid}."""
        return len(self._watchers.get(uid, ()))

    def watched_users(self) -> int:
        """How many users connections here watch (metrics)."""
        return len(self._watchers)

    def watch_entries(self) -> int:
        """How many (connection, watched user) pairs there are here (metrics)."""
        return sum(len(targets) for _, targets, _ in self._watching.values())

    def _unwatch(self, link: IClientLink) -> None:
        current = self._watching.pop(link, None)
        if current is None:
            return
        for t in current[1]:
            watchers = self._watchers.get(t)
            if watchers is None:
                continue
            watchers.pop(link, None)
            if not watchers:
                self._drop(t)

    def _drop(self, target: int) -> None:
        """Nobody here watches C{target} any more: forget what was kept for it."""
        del self._watchers[target]
        self._state.pop(target, None)
        self._pushed.pop(target, None)
        self._decisions.pop(target, None)
        self._shares.pop(target, None)
        call = self._windows.pop(target, None)
        if call is not None and call.active():
            call.cancel()

    def _gone(self, uid: int, link: IClientLink) -> None:
        self._left.add(link)
        self._unwatch(link)

    async def _decide(
        self, uid: int, targets: Sequence[int]
    ) -> tuple[dict[int, bool], dict[int, PresenceRow]]:
        """Who among C{targets} C{uid} may see (one SQL query for the rows, one for contacts)."""
        rows = await self.sql.load(targets)
        return await self._visible(uid, targets, {t: rows[t].share for t in targets}), rows

    async def _visible(
        self, watcher: int, targets: Iterable[int], shares: dict[int, str]
    ) -> dict[int, bool]:
        targets = list(targets)
        ask = [t for t in targets if t != watcher and shares.get(t, DEFAULT_SHARE) == "contacts"]
        contacts = await self.sql.contacts(watcher, ask) if ask else set()
        out: dict[int, bool] = {}
        for t in targets:
            share = shares.get(t, DEFAULT_SHARE)
            if t == watcher:
                out[t] = True
            elif share == "nobody" or (share == "contacts" and t not in contacts):
                out[t] = False
            else:
                out[t] = not await self._blocked(watcher, t)
        return out

    async def _blocked(self, a: int, b: int) -> bool:
        known = self.blocks.either_now(a, b)
        if known is None:
            known = await self.blocks.either(a, b)
        return bool(known)

    async def _states(
        self, targets: Sequence[int], visible: dict[int, bool], rows: dict[int, PresenceRow]
    ) -> dict[int, State]:
        """
        The state of the visible targets: online with the connect time of the
        user's longest-connected device (from presence: asked together,
        concurrent), else offline since the last_seen SQL has (or is about to
        write). A user watched here already costs nothing: its state follows
        the transitions (and L{check}), as its watchers were pushed.
        """
        shown = [t for t in targets if visible[t]]
        # Users watched here already: their state follows the transitions.
        ask = [t for t in shown if t not in self._state]
        found = await gatherResults([self._online(t) for t in ask]) if ask else []
        # Unknown (Redis down, not connected here): answered as offline since
        # the last_seen known, as before presence could say.
        since = {t: f for t, f in zip(ask, found, strict=True) if f != UNKNOWN}
        states: dict[int, State] = {t: HIDDEN for t in targets}
        for t in shown:
            known = self._state.get(t)
            if known is not None and t not in since:
                states[t] = known
                continue
            connected = since.get(t)
            if connected is not None:
                # A transition heard meanwhile is what its watchers were pushed.
                states[t] = known if known is not None and known[0] else (True, connected)
                continue
            seen = max(rows[t].last_seen, self._seen.get(t, 0), self._heard.get(t, 0))
            if known is not None and not known[0]:
                seen = max(seen, known[1])
            states[t] = (False, seen)
        return states

    def _online(self, uid: int) -> Deferred[int | None]:
        """
        When the user's longest-connected device connected; None when offline;
        L{UNKNOWN} when presence cannot say (Redis down, no connection here:
        the user may be online on another node).
        """

        async def online() -> int | None:
            try:
                since = [d.since for d in await self.presence.online_devices(uid)]
            except Unavailable:
                # Redis is down: this node's connections are all that is known.
                since = [link.connected_at for link in self.presence.local(uid)]
                if not since:
                    return UNKNOWN
            return int(min(since)) if since else None

        return Deferred.fromCoroutine(online())

    # -- users whose node died --------------------------------------------------------

    def _arm_check(self) -> None:
        if self._check_call is None and self._watchers:
            self._check_call = self.clock.callLater(CHECK_SECONDS, self._check_tick)

    def _check_tick(self) -> None:
        self._check_call = None
        self._later(self.check(), "presence check", 0)

    async def check(self) -> None:
        """
        Ask about up to L{CHECK_MAX} watched users believed online with no
        connection here, in uid order from where the last check stopped: one
        found without devices went offline unseen (its node died), and is
        told as a transition seen here.
        """
        try:
            online = sorted(
                t for t, state in self._state.items() if state[0] and not self.presence.local(t)
            )
            batch = [t for t in online if t > self._check_after][:CHECK_MAX]
            if len(batch) < CHECK_MAX:
                batch += [t for t in online if t <= self._check_after][: CHECK_MAX - len(batch)]
            # Asked together: a cluster's presence shares one script call among them.
            found = await gatherResults([self._online(t) for t in batch]) if batch else []
            for t, since in zip(batch, found, strict=True):
                self._check_after = t
                # Unknown (Redis down) is not offline: checked again next time.
                if since is None and self._state.get(t, HIDDEN)[0]:
                    self._changed(t, False, 0, True)
        finally:
            self._arm_check()

    # -- transitions -------------------------------------------------------------------

    def _changed(self, uid: int, online: bool, at: int, here: bool) -> None:
        if not at:
            at = self._now_ms()
        if here:
            self._write_seen(uid, at)
        if not online:
            self._heard[uid] = max(at, self._heard.get(uid, 0))
            self._heard.move_to_end(uid)
            if len(self._heard) > MAX_HEARD:
                self._heard.popitem(last=False)
        if uid not in self._watchers:
            return
        known = self._state.get(uid)
        if known is not None and (at < known[1] or (at == known[1] and online != known[0])):
            # Older than what is known: heard late (transitions are stamped by
            # Redis's clock, as their scripts ran), or a node's own clock (Redis
            # was down). If it disagrees, presence says which is right.
            if online != known[0]:
                self._later(self._verify(uid), "presence check of {uid}", uid)
            return
        self._state[uid] = (online, at)
        if uid in self._windows:
            self.coalesced += 1
            return
        self._emit(uid)

    async def _verify(self, uid: int) -> None:
        """Set a watched user's state from presence itself (after transitions disagreed)."""
        self.verified += 1
        since = await self._online(uid)
        if since == UNKNOWN:
            return  # Redis down: the transitions heard stand
        online = since is not None
        known = self._state.get(uid)
        if known is not None and known[0] != online:
            self._changed(uid, online, max(self._now_ms(), known[1] + 1), False)

    def _emit(self, uid: int) -> None:
        state = self._state.get(uid)
        if state is None or state == self._pushed.get(uid):
            return
        self._pushed[uid] = state
        frame = {"t": "presence", **entry(uid, state)}
        # A copy: a push that fails may close its connection (and unwatch it).
        for link, visible in list(self._watchers[uid].items()):
            if visible:
                link.push(frame)
                self.pushes += 1
        self._windows[uid] = self.clock.callLater(self.window, self._window_end, uid)

    def _window_end(self, uid: int) -> None:
        self._windows.pop(uid, None)
        if uid in self._watchers:
            self._emit(uid)

    def _write_seen(self, uid: int, at: int) -> None:
        self._seen[uid] = max(at, self._seen.get(uid, 0))
        if self._seen_call is None:
            self._seen_call = self.clock.callLater(SEEN_FLUSH_SECONDS, self._flush_seen)

    def _flush_seen(self) -> Deferred[None]:
        self._seen_call = None
        seen, self._seen = self._seen, {}
        d = Deferred.fromCoroutine(self.sql.seen(sorted(seen.items())))
        d.addErrback(
            lambda f: self.log.warn(
                "last_seen of {n} users not written: {error}", n=len(seen), error=f.value
            )
        )
        return d

    async def flush(self) -> None:
        """
        Write the last_seen times waiting for their flush and stop the
        timers (at shutdown, from ChatService.drain): a coalesced push still
        waiting is dropped, its watchers are being disconnected; the next
        watch starts the checks again.
        """
        if self._check_call is not None and self._check_call.active():
            self._check_call.cancel()
        self._check_call = None
        windows, self._windows = self._windows, {}
        for call in windows.values():
            if call.active():
                call.cancel()
        if self._seen_call is not None and self._seen_call.active():
            self._seen_call.cancel()
        if self._seen:
            await self._flush_seen()
        self._seen_call = None

    # -- who may see whom changes --------------------------------------------------------

    async def share(self, uid: int) -> str:
        """The user's C{share} setting."""
        return (await self.sql.load([uid]))[uid].share

    async def set_share(self, uid: int, share: str) -> None:
        """Store the setting; every node's watchers of C{uid} are decided again."""
        if share not in SHARE_CODES:
            raise ImError(ErrorCode.INVALID, "presence must be everyone, contacts or nobody")
        await self.sql.set_share(uid, share)
        self.presence.broadcast(SHARE_KIND, [uid, share])
        await self._share_changed(uid, share)

    def _share_heard(self, data: Any) -> None:
        uid, share = int(data[0]), str(data[1])
        self._later(self._share_changed(uid, share), "share change of {uid}", uid)

    async def _share_changed(self, uid: int, share: str) -> None:
        if uid not in self._watchers:
            return
        self._decisions[uid] = self._decisions.get(uid, 0) + 1
        self._shares[uid] = share
        await self._decide_again(uid, list(self._watchers[uid]))

    def _block_changed(self, blocker: int, blocked: int, now_blocked: bool) -> None:
        for target, watcher in ((blocker, blocked), (blocked, blocker)):
            if target in self._watchers:
                self._decisions[target] = self._decisions.get(target, 0) + 1
            links = [
                link
                for link in self._watchers.get(target, ())
                if self._watching.get(link, (0,))[0] == watcher
            ]
            if links:
                self._later(self._decide_again(target, links), "block change of {uid}", target)

    async def _decide_again(self, target: int, links: Sequence[IClientLink]) -> None:
        """
        Decide again whether these watchers of C{target} may see it; a
        watcher that can now is pushed the state, one that no longer can is
        pushed the hidden state (never seen).
        """
        share = self._shares.get(target, DEFAULT_SHARE)
        by_uid: dict[int, list[IClientLink]] = {}
        for link in links:
            current = self._watching.get(link)
            if current is not None:
                by_uid.setdefault(current[0], []).append(link)
        if not by_uid:
            return
        ask = [u for u in by_uid if u != target]
        contacts = await self.sql.contacts(target, ask) if share == "contacts" and ask else set()
        for watcher, mine in by_uid.items():
            if watcher == target:
                may = True
            elif share == "nobody" or (share == "contacts" and watcher not in contacts):
                may = False
            else:
                may = not await self._blocked(watcher, target)
            watchers = self._watchers.get(target)
            if watchers is None:
                return
            if may and target not in self._state:
                rows = await self.sql.load([target])
                state = (await self._states([target], {target: True}, rows))[target]
                self._state.setdefault(target, state)
                self._pushed.setdefault(target, state)
            for link in mine:
                if link not in watchers or watchers[link] == may:
                    continue
                watchers[link] = may
                state = self._state.get(target, HIDDEN) if may else HIDDEN
                link.push({"t": "presence", **entry(target, state)})
                self.pushes += 1

    def _later(self, work: Any, what: str, uid: int) -> None:
        d: Deferred[None] = Deferred.fromCoroutine(work)
        d.addErrback(lambda f: self.log.failure(what + " failed", f, uid=uid))
        if not d.called:
            self._busy.add(d)
            d.addBoth(lambda _: self._busy.discard(d))

    async def settled(self) -> None:
        """Wait for the decisions started by share and block changes (tests)."""
        while self._busy:
            await gatherResults(list(self._busy))

    # -- typing --------------------------------------------------------------------------

    async def typing(self, uid: int, to: int, active: bool) -> Result:
        """
        Tell the peer's devices; only between users who have a conversation.
        A block (either way) answers as if pushed: typing must not reveal it.
        """
        if to == uid:
            raise ImError(ErrorCode.FORBIDDEN, "you cannot tell yourself you are typing")
        if await self.store.session_for_pair(uid, to) is None:
            raise ImError(ErrorCode.FORBIDDEN, "you have no conversation with this user")
        if await self._blocked(uid, to):
            return {}
        self.presence.push(to, {"t": "typing", "from": uid, "active": active})
        self.typing_pushes += 1
        return {}
