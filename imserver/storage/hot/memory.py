"""
The in-process hot store of the embedded default (one node).

It keeps exactly the structures and rules of the Redis scripts in
C{lua/}, in plain Python: the same markers, the same window and pending
rules, the same versioned rows. It never fails and never loses data while the
process runs; after a restart it starts empty and every user's copy is
loaded from SQL on first use, as after a Redis FLUSHALL.

Its caches of messages and profiles are bounded by count and by (estimated)
bytes, least recently cached first out: a count alone let 100,000 messages
with 32 KiB bodies take gigabytes. A message evicted is read from SQL.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict, deque
from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from imserver.storage.hot.interface import (
    GONE_MS,
    LIVE_MS,
    STALE_MARGIN_MS,
    WINDOW_SIZE,
    IHotStore,
)
from imserver.storage.model import ConvRow, Message, Profile, UserSnapshot

#: Bytes a cached message costs beyond its body, cid and type: the record,
#: its ints and the cache's entry (measured with tracemalloc: about 330).
MESSAGE_OVERHEAD = 400
#: The same for a profile beyond its nickname and avatar.
PROFILE_OVERHEAD = 300
#: The default byte bound of the message cache ([storage].embedded_cache_bytes);
#: profiles may take a quarter of it on top.
CACHE_BYTES = 128 * 1024 * 1024


def message_cost(m: Message) -> int:
    return len(m.body) + len(m.cid) + len(m.type) + MESSAGE_OVERHEAD


def profile_cost(p: Profile) -> int:
    return len(p.nickname) + len(p.avatar) + PROFILE_OVERHEAD


def _remove_sorted(items: list[int], ids: set[int]) -> list[int]:
    return [i for i in items if i not in ids]


def _insert(items: list[int], value: int) -> None:
    """Add to a sorted list of unique ids (a sorted-set ZADD)."""
    if not items or items[-1] < value:
        items.append(value)
        return
    i = bisect.bisect_left(items, value)
    if items[i] != value:
        items.insert(i, value)


@implementer(IHotStore)
class MemoryHotStore:
    kind = "embedded"

    def __init__(
        self,
        clock: IReactorTime,
        *,
        window_size: int = WINDOW_SIZE,
        live_ms: int = LIVE_MS,
        max_messages: int = 100_000,
        max_profiles: int = 100_000,
        max_cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self._clock = clock
        self.window_size = window_size
        self.live_ms = live_ms
        # msg_id -> until when a fan-out may not cache it (see invalidate).
        self._stale: dict[int, int] = {}
        self.max_messages = max_messages
        self.max_profiles = max_profiles
        self.max_cache_bytes = max_cache_bytes
        self.max_profile_bytes = max_cache_bytes // 4
        #: Estimated bytes held by the message and profile caches.
        self.cache_bytes = 0
        self.profile_bytes = 0
        self._markers: dict[int, str] = {}
        self._gone: dict[int, dict[int, int]] = {}  # uid -> msg_id -> when (ms)
        self._gone_order: deque[tuple[int, int, int]] = deque()  # (when, uid, msg_id)
        self._pending: dict[int, dict[int, list[int]]] = {}
        self._conv: dict[int, dict[int, int]] = {}  # uid -> sid -> last msg id
        self._rows: dict[tuple[int, int], tuple[int, int, int]] = {}  # (sid, uid) -> total, read, v
        self._windows: dict[int, list[int]] = {}
        self._messages: OrderedDict[int, Message] = OrderedDict()
        self._profiles: OrderedDict[int, Profile] = OrderedDict()
        self._nonces = itertools.count(1)

    def _now(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    def circuit_state(self) -> str | None:
        return None

    # -- helpers shared by the writes (the prelude of the scripts) ---------

    def _ready(self, uid: int) -> bool:
        return self._markers.get(uid, "").startswith("R")

    def _apply_row(self, row: ConvRow, loading: bool = False) -> None:
        if not loading and row.uid not in self._markers:
            return
        key = (row.session_id, row.uid)
        current = self._rows.get(key)
        if current is not None and current[2] >= row.version:
            return
        self._rows[key] = (row.total, row.read, row.version)
        convs = self._conv.setdefault(row.uid, {})
        if convs.get(row.session_id, 0) < row.last_msg_id:
            convs[row.session_id] = row.last_msg_id

    def _is_gone(self, uid: int, msg_id: int, now: int) -> bool:
        when = self._gone.get(uid, {}).get(msg_id)
        return when is not None and when >= now - GONE_MS

    def _remove_pending(self, uid: int, sender: int, ids: set[int]) -> None:
        lists = self._pending.get(uid)
        if lists and sender in lists:
            remaining = _remove_sorted(lists[sender], ids)
            if remaining:
                lists[sender] = remaining
            else:
                del lists[sender]
        now = self._now()
        gone = self._gone.setdefault(uid, {})
        for msg_id in ids:
            gone[msg_id] = now
            self._gone_order.append((now, uid, msg_id))
        # Expire in time order: each tombstone is looked at once more, at most.
        order = self._gone_order
        while order and order[0][0] < now - GONE_MS:
            when, old_uid, msg_id = order.popleft()
            tombstones = self._gone.get(old_uid)
            if tombstones is not None and tombstones.get(msg_id) == when:
                del tombstones[msg_id]
                if not tombstones:
                    del self._gone[old_uid]

    # -- writes ------------------------------------------------------------

    async def fanout(
        self, messages: Sequence[tuple[Message, int]], rows: Sequence[ConvRow]
    ) -> None:
        now = self._now()
        for message, age in messages:
            if age <= self.live_ms:
                if not self._stale or self._stale.get(message.msg_id, 0) <= now:
                    self._cache_message(message)
                window = self._windows.setdefault(message.session_id, [])
                if not window or message.msg_id > window[0]:
                    _insert(window, message.msg_id)
                    del window[: -self.window_size]
            else:
                self._windows.pop(message.session_id, None)
            state = self._markers.get(message.recipient)
            if state is None or state == "D":
                continue
            if age >= GONE_MS:
                self._markers[message.recipient] = "D"
            elif not self._is_gone(message.recipient, message.msg_id, now):
                lists = self._pending.setdefault(message.recipient, {})
                _insert(lists.setdefault(message.sender, []), message.msg_id)
        for row in rows:
            self._apply_row(row)

    def _cache_message(self, message: Message) -> None:
        cache = self._messages
        self._uncache_message(message.msg_id)
        cost = message_cost(message)
        if cost > self.max_cache_bytes:
            return  # it would push out everything else: read from SQL instead
        cache[message.msg_id] = message
        self.cache_bytes += cost
        while cache and (len(cache) > self.max_messages or self.cache_bytes > self.max_cache_bytes):
            _, evicted = cache.popitem(last=False)
            self.cache_bytes -= message_cost(evicted)

    def _uncache_message(self, msg_id: int) -> None:
        old = self._messages.pop(msg_id, None)
        if old is not None:
            self.cache_bytes -= message_cost(old)

    async def ack(self, acked: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> None:
        for uid, removed in acked:
            by_sender: dict[int, set[int]] = {}
            for msg_id, sender in removed:
                by_sender.setdefault(sender, set()).add(msg_id)
            for sender, ids in by_sender.items():
                self._remove_pending(uid, sender, ids)

    async def recall(self, message: Message, row: ConvRow | None) -> None:
        window = self._windows.get(message.session_id)
        if window and message.msg_id in window:
            window.remove(message.msg_id)
        self._uncache_message(message.msg_id)
        self._remove_pending(message.recipient, message.sender, {message.msg_id})
        if row is not None:
            self._apply_row(row)

    async def apply_rows(self, rows: Sequence[ConvRow]) -> None:
        for row in rows:
            self._apply_row(row)

    async def invalidate(
        self, uids: Sequence[int], session_ids: Sequence[int], msg_ids: Sequence[int] = ()
    ) -> None:
        for uid in uids:
            self._markers.pop(uid, None)
        for sid in session_ids:
            self._windows.pop(sid, None)
        if msg_ids:
            now = self._now()
            if len(self._stale) > 10_000:
                self._stale = {i: t for i, t in self._stale.items() if t > now}
            until = now + self.live_ms + STALE_MARGIN_MS
            for msg_id in msg_ids:
                self._uncache_message(msg_id)
                self._stale[msg_id] = until

    async def load_begin(self, uid: int) -> str:
        token = str(next(self._nonces))
        self._pending.pop(uid, None)
        self._markers[uid] = "L" + token
        return token

    async def load_finish(self, uid: int, token: str, snapshot: UserSnapshot) -> bool:
        if self._markers.get(uid) != "L" + token:
            return False
        now = self._now()
        lists = self._pending.setdefault(uid, {})
        for msg_id, sender in snapshot.pending:
            if not self._is_gone(uid, msg_id, now):
                _insert(lists.setdefault(sender, []), msg_id)
        for row in snapshot.convs:
            self._apply_row(row, loading=True)
        self._markers[uid] = f"R{self._now()}"
        return True

    # -- reads -------------------------------------------------------------

    async def pending(
        self, uid: int, after: int, limit: int, sender: int | None
    ) -> list[tuple[int, int]] | None:
        if not self._ready(uid):
            return None
        lists = self._pending.get(uid, {})
        senders = [sender] if sender is not None else list(lists)
        found: list[tuple[int, int]] = []
        for s in senders:
            ids = lists.get(s, [])
            start = bisect.bisect_right(ids, after)
            found.extend((msg_id, s) for msg_id in ids[start : start + limit])
        found.sort()
        return found[:limit]

    async def offline_summary(self, uid: int) -> list[tuple[int, int, int]] | None:
        if not self._ready(uid):
            return None
        return [(s, len(ids), ids[-1]) for s, ids in self._pending.get(uid, {}).items() if ids]

    async def convs(
        self, uid: int, before: int | None, limit: int
    ) -> list[tuple[int, int, int, int]] | None:
        if not self._ready(uid):
            return None
        entries = sorted(
            (
                (last, sid)
                for sid, last in self._conv.get(uid, {}).items()
                if before is None or last < before
            ),
            reverse=True,
        )
        if limit:
            entries = entries[:limit]
        out = []
        for last, sid in entries:
            row = self._rows.get((sid, uid))
            if row is None:
                self._markers.pop(uid, None)
                return None
            out.append((sid, last, row[0], row[1]))
        return out

    async def window(self, session_id: int, before: int | None, limit: int) -> list[int]:
        ids = self._windows.get(session_id, [])
        stop = len(ids) if before is None else bisect.bisect_left(ids, before)
        return list(reversed(ids[max(0, stop - limit) : stop]))

    async def last_in_windows(self, session_ids: Sequence[int]) -> dict[int, int]:
        return {sid: self._windows[sid][-1] for sid in session_ids if self._windows.get(sid)}

    async def messages(self, msg_ids: Sequence[int]) -> dict[int, Message]:
        return {i: self._messages[i] for i in msg_ids if i in self._messages}

    async def profiles(self, uids: Sequence[int]) -> dict[int, Profile]:
        return {uid: self._profiles[uid] for uid in uids if uid in self._profiles}

    async def put_profiles(self, profiles: Sequence[Profile]) -> None:
        cache = self._profiles
        for profile in profiles:
            current = cache.get(profile.uid)
            if current is None or current.version < profile.version:
                if current is not None:
                    self.profile_bytes -= profile_cost(current)
                cache[profile.uid] = profile
                self.profile_bytes += profile_cost(profile)
            cache.move_to_end(profile.uid)
        while cache and (
            len(cache) > self.max_profiles or self.profile_bytes > self.max_profile_bytes
        ):
            _, evicted = cache.popitem(last=False)
            self.profile_bytes -= profile_cost(evicted)
