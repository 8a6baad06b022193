"""
The business layer: every operation of wire protocol v1 after auth.

The send path is the seed's: filter -> enrich -> block check -> dedupe ->
ids -> durable commit -> reply -> fan-out. Ids are assigned in the order
requests arrive (the block check, when it must wait for SQL, lets sends
through in that order: see chat.blocks), and commits and fan-outs run as
ordered batches, so
messages sent on one connection are stored, pushed and listed in the order
they were sent. The reply goes out once the message is committed; the
fan-out (hot index, then push) follows in the background. Reads of a user's
state first wait for that user's fan-outs still running on this node, so a
client always reads its own writes.

Every reply fits in one frame of C{max_reply_bytes} (the server's
C{max_frame_bytes}): list replies are cut by encoded size as well as by
count (see L{ChatService._fill}), and the send limit on bodies is lowered,
if need be, so that any message that can be sent fits in a page of its own.

Results are plain dicts with the wire protocol's field names; the layer
knows nothing of frames or connections (pushes go through L{IPresence}).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.batching import Batcher
from imserver.chat.blocks import BlockService
from imserver.chat.devices import DeviceService
from imserver.chat.edits import EditService
from imserver.chat.presence import PresenceService
from imserver.chat.profiles import ProfileCache
from imserver.config import DevicesConfig, LimitsConfig
from imserver.errors import ErrorCode, ImError
from imserver.periodic import Periodic
from imserver.services.filter import ContentFilter
from imserver.services.ids import IdGenerator, id_time_ms
from imserver.services.presence import DEFAULT_DEVICE, IClientLink, IPresence
from imserver.storage.model import (
    Committed,
    Duplicate,
    Login,
    Message,
    NewMessage,
    Positions,
    Profile,
    RecallResult,
    Refused,
    SendOutcome,
    pack_body,
    unpack_body,
)
from imserver.storage.store import FanoutOutcome, Store

Result = dict[str, Any]
#: A fan-out item: the committed message, its body, when its send began, the
#: sending connection, and its push frames once they went to this node's
#: connections (None: not yet).
FanoutItem = tuple[Committed, Any, float, "IClientLink | None", "tuple[Result, Result] | None"]
#: Observes a latency: (name, seconds). The composition root wires metrics.
Observer = Callable[[str, float], None]

#: Committed messages allowed to wait for their fan-out; beyond it sends
#: are refused (unavailable) instead of queueing without bound.
MAX_FANOUT_BACKLOG = 50_000
#: How often the outbox sweeper looks for stale rows of any node.
SWEEP_SECONDS = 30.0
#: Bytes of a list reply beyond its items: the frame's map, t, id (an int64),
#: the list's key and header, more, total (measured: at most 53).
REPLY_RESERVE = 128
#: Bytes of a list item beyond its message body, at worst: a convs entry
#: with the peer's profile and a last message with its sender's (nicknames
#: of 64 and avatars of 512 four-byte characters, cid and type at their
#: limits) is 5,220; tests/test_reply_size.py checks it.
ITEM_RESERVE = 8192
#: Items read for a list reply before the first ones are measured; the next
#: read asks for what the bytes left are likely to hold.
FIRST_READ = 32
#: Why a send between a blocked pair is refused (either way: docs/protocol.md, "Blocking").
BLOCKED = "messages between you and this user are blocked"
#: Entries a page may read past C{limit} while it is still empty (pending ids
#: whose messages are recalled or missing give no item): beyond them sync
#: answers an empty page with C{after}, the cursor to go on from.
SYNC_SKIP = 1000

T = TypeVar("T")
C = TypeVar("C")


def _ignore(name: str, seconds: float) -> None:
    pass


#: A session row not found (yet): nothing read, delivered or muted.
NO_POSITIONS = Positions()


def peer_positions(theirs: Positions) -> dict[str, int]:
    """
    The peer's receipts as replies show them: C{peer_read}, and
    C{peer_delivered} (a read message was delivered too, also when its ack
    never came: read on another device, say).
    """
    return {"peer_read": theirs.read, "peer_delivered": max(theirs.delivered, theirs.read)}


def sender_info(profile: Profile | None) -> dict[str, str]:
    if profile is None:
        return {"nickname": "", "avatar": ""}
    return {"nickname": profile.nickname, "avatar": profile.avatar}


def message_object(m: Message, sender: Profile | None, body: Any = None) -> Result:
    """A msg object as the protocol defines it (C{edited} only once edited)."""
    obj = {
        "msg_id": m.msg_id,
        "session_id": m.session_id,
        "from": m.sender,
        "to": m.recipient,
        "cid": m.cid,
        "type": m.type,
        "body": unpack_body(m.body) if body is None else body,
        "ts": m.ts,
        "sender": sender_info(sender),
    }
    if m.edited:
        obj["edited"] = m.edited
    return obj


class ChatService:
    log = Logger()

    def __init__(
        self,
        *,
        store: Store,
        presence: IPresence,
        ids: IdGenerator,
        content: ContentFilter,
        limits: LimitsConfig,
        clock: IReactorTime,
        observe: Observer = _ignore,
        shared_profiles: bool = False,
        max_reply_bytes: int = 65536,
        devices: DevicesConfig | None = None,
    ) -> None:
        #: No reply is larger than this (the server's max_frame_bytes).
        self.max_reply_bytes = max_reply_bytes
        deliverable = max(16, max_reply_bytes - REPLY_RESERVE - ITEM_RESERVE)
        if limits.max_body_bytes > deliverable:
            self.log.warn(
                "[limits].max_body_bytes {body} lowered to {deliverable}: a larger body "
                "would not fit in a reply of max_frame_bytes {frame}",
                body=limits.max_body_bytes,
                deliverable=deliverable,
                frame=max_reply_bytes,
            )
            limits = attrs.evolve(limits, max_body_bytes=deliverable)
        self.store = store
        self.observe = observe
        self.presence = presence
        self.ids = ids
        self.content = content
        self.limits = limits
        self.clock = clock
        # Other nodes may change profiles: see ProfileCache.
        self.profiles = ProfileCache(store, clock, shared=shared_profiles)
        #: Who refuses whom: sends, presence and typing ask it (issue 11).
        self.blocks = BlockService(
            store=store, presence=presence, clock=clock, max_blocks=limits.max_blocks
        )
        # -- presence and typing (issue 11) --
        #: Who is online as others may see it, watchers, typing (chat/presence.py).
        self.presence_service = PresenceService(
            store=store, presence=presence, blocks=self.blocks, clock=clock
        )
        # -- receipts and mute (issue 11) --
        # -- edit, hide, clear (issue 11) --
        self.edits = EditService(
            store=store,
            presence=presence,
            profiles=self.profiles,
            blocks=self.blocks,
            content=content,
            limits=limits,
            settled=self._settled,
            message_object=message_object,
        )
        self.devices = DeviceService(
            store=store,
            presence=presence,
            profiles=self.profiles,
            config=devices or DevicesConfig(),
            clock=clock,
            message_object=message_object,
            max_reply_bytes=max_reply_bytes,
            reply_reserve=REPLY_RESERVE,
        )
        #: The real-time queue: fan-out of committed messages, in commit order.
        self.fanouts: Batcher[FanoutItem, None] = Batcher(
            "fanout",
            self._fanout_batch,
            max_batch=500,
            max_queue=10 * MAX_FANOUT_BACKLOG,
            gather=clock,
        )
        self._inflight: dict[int, int] = {}
        self._settled_waiters: dict[int, list[Deferred[None]]] = {}
        self._sweeper = Periodic(clock, SWEEP_SECONDS, self._sweep, "outbox sweep")
        # Read by metrics.
        self.sent = 0
        self.duplicates = 0
        self.pushed = 0
        self.acked = 0
        self.replayed = 0

    # -- login -----------------------------------------------------------------

    async def login(
        self,
        uid: int,
        device: str = DEFAULT_DEVICE,
        client: str = "",
        issued_at: float | None = None,
    ) -> Login:
        """A connection authenticated: the user and its device (L{DeviceService.login})."""
        return await self.devices.login(uid, device, client, issued_at)

    # -- send --------------------------------------------------------------------

    def send(
        self,
        sender: int,
        to: int,
        cid: str,
        kind: str,
        body: Any,
        origin: IClientLink | None = None,
    ) -> Deferred[Result]:
        """
        Send a message; the Deferred fires with the reply once it is
        committed. (The hottest path: a callback chain rather than a
        coroutine, whose trampoline cost is measurable per message.)
        C{origin}, the sending connection, gets the reply; the sender's
        other devices get the message pushed.

        @raise ImError: at once, for a request refused before committing
            (C{forbidden} for a blocked pair: the Deferred fails instead when
            this node had to load the pair's blocks first; C{unavailable} when
            too many sends wait for block loads, or the load timed out).
        """
        started = self.clock.seconds()
        if to == sender:
            raise ImError(ErrorCode.INVALID, "you cannot send a message to yourself")
        if self.fanouts.depth + self.store.sends.depth >= MAX_FANOUT_BACKLOG:
            raise ImError(ErrorCode.UNAVAILABLE, "the server is overloaded; retry shortly")
        body = self.content.apply(body)
        blob = pack_body(body)
        if len(blob) > self.limits.max_body_bytes:
            raise ImError(
                ErrorCode.TOO_LARGE, f"the body is larger than {self.limits.max_body_bytes} bytes"
            )
        blocked = self.blocks.for_send(sender, to, started)
        if isinstance(blocked, Deferred):
            # Not known here yet: one SQL query first (in order, see chat.blocks).
            return blocked.addCallback(
                self._send_unless_blocked, sender, to, cid, kind, body, blob, started, origin
            )
        return self._send_unless_blocked(
            blocked, sender, to, cid, kind, body, blob, started, origin
        )

    def _send_unless_blocked(
        self,
        blocked: bool,
        sender: int,
        to: int,
        cid: str,
        kind: str,
        body: Any,
        blob: bytes,
        started: float,
        origin: IClientLink | None,
    ) -> Deferred[Result]:
        """Refuse a blocked pair (C{forbidden}), else give the message its id and commit it."""
        if blocked:
            self.blocks.refused += 1
            raise ImError(ErrorCode.FORBIDDEN, BLOCKED)
        # Ids in the order sends reach the commit queue (after any block check).
        msg_id = self.ids.next_id()
        hint = self.store.session_hint(sender, to)
        d = self.store.commit(
            NewMessage(
                msg_id=msg_id,
                sender=sender,
                recipient=to,
                cid=cid,
                type=kind,
                body=blob,
                ts=id_time_ms(msg_id),
                session_id=hint,
                new_session_id=self.ids.next_id() if hint is None else 0,
                sender_device=getattr(origin, "device_id", 0),
            )
        )
        return d.addCallback(self._committed, body, started, origin)

    def _committed(
        self, outcome: SendOutcome, body: Any, started: float, origin: IClientLink | None
    ) -> Result:
        elapsed = self.clock.seconds() - started
        if isinstance(outcome, Committed):
            # First: once committed, the message must reach its fan-out (and
            # its outbox row's countdown) whatever fails below.
            self.sent += 1
            self._start_fanout(outcome, body, started, origin)
        self.observe("send_to_commit", elapsed)
        if isinstance(outcome, Refused):
            raise ImError(ErrorCode(outcome.code), outcome.message)
        if isinstance(outcome, Duplicate):
            self.duplicates += 1
            if outcome.unfinished is not None:
                # The original's fan-out never finished: finish it now.
                self.store.finish_unfinished(outcome.unfinished, self._push_replayed)
            reply: Result = {
                "msg_id": outcome.msg_id,
                "session_id": outcome.session_id,
                "ts": outcome.ts,
                "dup": True,
            }
            if outcome.seq:
                reply["seq"] = outcome.seq
            return reply
        m = outcome.message
        reply = {"msg_id": m.msg_id, "session_id": m.session_id, "ts": m.ts, "dup": False}
        if outcome.sender_seq:
            reply["seq"] = outcome.sender_seq
        return reply

    def _start_fanout(
        self, committed: Committed, body: Any, started: float, origin: IClientLink | None
    ) -> None:
        """
        Index in the hot store through the real-time queue, and push: to
        every device of the recipient and every other device of the sender.

        Devices connected to this node are pushed at once (in commit order:
        commit batches complete in order): an ack racing the indexing is
        safe (acked ids are tombstoned), and the users' reads here wait for
        the indexing. Devices on other nodes are pushed once the message is
        indexed, so that a read there right after the push finds it.
        """
        m = committed.message
        uids = (m.sender, m.recipient)
        for uid in uids:
            self._inflight[uid] = self._inflight.get(uid, 0) + 1
        self.store.fanout_started(committed)
        frames = None
        try:
            sender = self.profiles.peek(m.sender)
            if sender is not None:
                frames = self._frames(committed, body, sender)
                self._push_local(committed, frames, started, origin)
        except Exception:
            # The send is committed: answer it; the fan-out tries the push again.
            self.log.failure("push of message {msg_id} failed", Failure(), msg_id=m.msg_id)
            frames = None
        try:
            # _fanout_batch logs its own failures: the item always succeeds.
            d = self.fanouts.submit((committed, body, started, origin, frames))
        except Exception as e:
            # Queue full: the sweeper replays the outbox row.
            self.log.warn(
                "fan-out of message {msg_id} not queued: {error}", msg_id=m.msg_id, error=e
            )
            self.store.fanout_finished([committed], FanoutOutcome.REPLAY)
            self._fanned_out(None, uids)
            return
        d.addBoth(self._fanned_out, uids)

    def _fanned_out(self, _: object, uids: Sequence[int]) -> None:
        for uid in uids:
            left = self._inflight[uid] - 1
            if left:
                self._inflight[uid] = left
                continue
            del self._inflight[uid]
            for d in self._settled_waiters.pop(uid, ()):
                d.callback(None)

    async def _settled(self, uid: int) -> None:
        """Wait for the user's fan-outs running on this node (read your writes)."""
        if uid in self._inflight:
            d: Deferred[None] = Deferred()
            self._settled_waiters.setdefault(uid, []).append(d)
            await d

    def _frames(self, c: Committed, body: Any, sender: Profile | None) -> tuple[Result, Result]:
        """The msg push for the recipient's devices, and the one for the sender's
        others: each with that user's stream seq; unread counts are the recipient's."""
        m = c.message
        mine = message_object(m, sender, body)
        mine["t"] = "msg"
        theirs = dict(mine)
        theirs["unread"] = c.unread
        theirs["total_unread"] = c.total_unread
        if c.recipient_seq:
            theirs["seq"] = c.recipient_seq
        if c.sender_seq:
            mine["seq"] = c.sender_seq
        return theirs, mine

    def _push_local(
        self,
        c: Committed,
        frames: tuple[Result, Result],
        started: float,
        origin: IClientLink | None,
    ) -> None:
        m = c.message
        if self.presence.push_local(m.recipient, frames[0]):
            self.pushed += 1
            self.observe("send_to_push", self.clock.seconds() - started)
        self.presence.push_local(m.sender, frames[1], origin)

    def _push_remote(
        self, c: Committed, frames: tuple[Result, Result], origin: IClientLink | None
    ) -> None:
        m = c.message
        self.presence.push_remote(m.recipient, frames[0])
        self.presence.push_remote(m.sender, frames[1], origin)

    async def _fanout_batch(self, items: Sequence[FanoutItem]) -> list[None]:
        """The real-time queue: index a batch in the hot store, then push to
        the devices on other nodes, and to this node's for the messages not
        pushed at commit (sender's profile not at hand). Every message's
        outbox row learns how its fan-out ended, whatever the error."""
        committed = [item[0] for item in items]
        outcome = FanoutOutcome.REPLAY
        unpushed: list[Committed] = []
        try:
            indexed = await self.store.fanout(committed)
            late = [item[0] for item in items if item[4] is None]
            senders: dict[int, Profile] = {}
            if late:
                try:
                    senders = await self.profiles.get({c.message.sender for c in late})
                except Exception as e:
                    # Pushed without the sender's profile; the client fetches it.
                    self.log.warn("sender profiles not read: {error}", error=e)
            failure = None
            for c, body, started, origin, frames in items:
                try:
                    if frames is None:
                        frames = self._frames(c, body, senders.get(c.message.sender))
                        self._push_local(c, frames, started, origin)
                    self._push_remote(c, frames, origin)
                except Exception:
                    # One broken push spares the others; its row is replayed.
                    failure = Failure()
                    unpushed.append(c)
            if failure is not None:
                self.log.failure("{n} pushes failed", failure, n=len(unpushed))
            outcome = FanoutOutcome.DONE if indexed else FanoutOutcome.REPAIR
        except Exception:
            # Once per batch, not once per message. The outbox rows stay and
            # are replayed by the sweeper.
            self.log.failure("fan-out of {n} messages failed", Failure(), n=len(items))
            unpushed = []
        if unpushed:
            left = set(map(id, unpushed))
            self.store.fanout_finished(unpushed, FanoutOutcome.REPLAY)
            committed = [c for c in committed if id(c) not in left]
        self.store.fanout_finished(committed, outcome)
        return [None] * len(items)

    # -- delivery state ------------------------------------------------------------

    def ack(
        self, uid: int, msg_ids: Sequence[int], device_id: int = 0, seq: int | None = None
    ) -> Deferred[Result]:
        """
        Clear pending messages (a callback chain, like L{send}); C{seq}: the
        device has its user's stream up to there (its catch-up position).
        The senders of the messages this call removed are told (delivery
        receipts, L{_acked}).
        """
        return self.store.ack(uid, msg_ids, device_id, seq).addCallback(self._acked, uid)

    def _acked(self, removed: Sequence[tuple[int, int, int]], uid: int) -> Result:
        """
        A delivery receipt per session: C{delivered} with the highest
        message this call removed, to its sender's devices. Only the first
        ack of a message (of any device: pending is per user) removes it, so
        a second device's ack of the same ids tells nobody. No seq: it is a
        position, recoverable from convs and history (C{peer_delivered}).
        """
        self.acked += len(removed)
        if removed:
            best: dict[int, tuple[int, int]] = {}
            for msg_id, sender, sid in removed:
                if sid and msg_id > best.get(sid, (0, 0))[0]:
                    best[sid] = (msg_id, sender)
            for sid, (msg_id, sender) in best.items():
                push = {"t": "delivered", "session_id": sid, "msg_id": msg_id, "by": uid}
                blocked = self.blocks.either_now(uid, sender)
                if blocked is None:
                    # Not in this node's cache: load, then decide, after the
                    # reply (the ack's reply never waits for a receipt).
                    self._receipt_after_load(uid, sender, push)
                elif not blocked:
                    self._receipt(sender, push)
        return {}

    def _receipt(self, to: int, push: Result) -> None:
        """Push a receipt; committed already, so a failure only costs the push."""
        try:
            self.presence.push(to, push)
        except Exception:
            # The ack or read stands; the position is in convs/history.
            self.log.failure("{t} push to {uid} failed", Failure(), t=push["t"], uid=to)

    def _receipt_after_load(self, by: int, to: int, push: Result) -> None:
        """
        No receipts between a blocked pair (either way): when the block
        cache does not know the pair, ask it (it loads), then push or not.
        A load that fails pushes nothing: a receipt is a position that
        convs/history have, never worth crossing a block that may exist.
        """

        def decided(blocked: bool) -> None:
            if not blocked:
                self._receipt(to, push)

        d = Deferred.fromCoroutine(self.blocks.either(by, to))
        d.addCallback(decided)
        d.addErrback(
            lambda f: self.log.warn(
                "{t} receipt to {uid} dropped: block check failed: {error}",
                t=push["t"],
                uid=to,
                error=f.value,
            )
        )

    async def sync(self, uid: int, limit: int, after: int, sender: int | None) -> Result:
        await self._settled(uid)
        last = after

        async def read(after: int, n: int) -> tuple[list[Result], int, bool]:
            nonlocal last
            page = await self.store.pending(uid, after, n + 1, sender)
            more = len(page) > n
            ids = [msg_id for msg_id, _ in page[:n]]
            messages = await self.store.normal_messages(ids)
            last = ids[-1] if ids else after
            return await self._objects(messages), last, more

        msgs, more = await self._fill(limit, after, read, SYNC_SKIP)
        if more and not msgs:
            # Only entries without a readable message, as far as this page
            # looked: the client cannot continue from a last message.
            return {"msgs": msgs, "more": more, "after": last}
        return {"msgs": msgs, "more": more}

    async def offline_summary(self, uid: int) -> Result:
        await self._settled(uid)
        senders = [
            {"uid": sender, "count": count, "last_msg_id": last}
            for sender, count, last in await self.store.offline_summary(uid)
        ]
        return self._cut({}, "senders", senders)

    async def _objects(self, messages: Sequence[Message]) -> list[Result]:
        senders = await self.profiles.get({m.sender for m in messages})
        return [message_object(m, senders.get(m.sender)) for m in messages]

    # -- reply size ------------------------------------------------------------------

    async def _fill(
        self,
        limit: int,
        cursor: C,
        read: Callable[[C, int], Awaitable[tuple[list[Result], C, bool]]],
        skip: int = 0,
    ) -> tuple[list[Result], bool]:
        """
        A page of at most C{limit} entries that fits in a reply.

        C{read(cursor, n)} gives the next items after C{cursor} for up to
        C{n} entries (some entries may give no item: a recalled message),
        the cursor after them and whether entries follow. Items are read a
        few at a time (not a whole C{limit} of 32 KB bodies for a page of two)
        and kept while the page's encoded size fits; the first item always
        does. A page cut short says C{more}, and the client's cursor (the
        last item's) continues at the first item left out.

        While the page is empty, up to C{skip} more entries are read past
        C{limit} (entries that give no item must not make an empty page with
        C{more} when items follow); the page still holds at most C{limit}.
        """
        budget = self.max_reply_bytes - REPLY_RESERVE
        page: list[Result] = []
        used = 0
        left = limit
        n = min(limit, FIRST_READ)
        while True:
            items, cursor, more = await read(cursor, n)
            left -= n
            for item in items:
                size = len(pack_body(item))
                if page and (used + size > budget or len(page) == limit):
                    return page, True
                page.append(item)
                used += size
            if not more:
                return page, more
            if left <= 0:
                if page or skip <= 0:
                    return page, more
                # Nothing yet: read on past the entries that gave no item.
                left = n = min(skip, max(limit, FIRST_READ))
                skip -= n
                continue
            # As many as the bytes left are likely to hold, and one more.
            average = used // len(page) if page else 1
            n = max(1, min(left, (budget - used) // max(average, 1) + 1))

    def _cut(self, result: Result, key: str, items: list[T]) -> Result:
        """
        C{result} with C{key}: C{items}, as many as fit in a reply (at least
        one); C{more: true} is added only when some were left out.
        """
        budget = self.max_reply_bytes - REPLY_RESERVE
        used = 0
        for i, item in enumerate(items):
            used += len(pack_body(item))
            if i and used > budget:
                return {**result, key: items[:i], "more": True}
        return {**result, key: items}

    # -- read and unread -------------------------------------------------------------

    async def read(
        self, uid: int, session_id: int, msg_id: int, origin: IClientLink | None = None
    ) -> Result:
        """
        Move the read position. A move is pushed to the peer's devices (a
        read receipt) and to the reader's other devices, with the reader's
        unread counts (the badge clears everywhere).
        """
        result = await self.store.read(uid, session_id, msg_id)
        reply: Result = {"unread": result.row.unread, "total_unread": result.total_unread}
        if result.advanced_to is not None:
            receipt: Result = {
                "t": "read",
                "session_id": session_id,
                "by": uid,
                "msg_id": result.advanced_to,
            }
            own = dict(receipt, **reply)
            if result.peer_seq:
                receipt["seq"] = result.peer_seq
            if result.reader_seq:
                own["seq"] = reply["seq"] = result.reader_seq
            # No read receipt between a blocked pair (decided in the read's
            # transaction: then it is not in the peer's stream either).
            if not result.peer_blocked:
                self.presence.push(result.row.peer, receipt)
            self.presence.push(uid, own, origin)
        return reply

    async def _blocked_pair(self, a: int, b: int) -> bool:
        """
        Whether a blocks b or b blocks a, for receipts: from the cache, else
        loaded; a failed load counts as blocked (a receipt is only a
        position, convs/history have it; it must not cross a block).
        """
        known = self.blocks.either_now(a, b)
        if known is not None:
            return known
        try:
            return await self.blocks.either(a, b)
        except Exception as e:
            self.log.warn("block check for receipts failed: {error}", error=e)
            return True

    async def unread(self, uid: int) -> Result:
        await self._settled(uid)
        sessions = await self.store.unread(uid)
        return self._cut(
            {"total": sum(count for _, count in sessions)},
            "sessions",
            [{"session_id": sid, "count": count} for sid, count in sessions],
        )

    # -- conversations and history -----------------------------------------------------

    async def convs(self, uid: int, limit: int, before: int | None) -> Result:
        await self._settled(uid)

        async def read(before: int | None, n: int) -> tuple[list[Result], int | None, bool]:
            page = await self.store.convs(uid, before, n + 1)
            more = len(page) > n
            page = page[:n]
            users = await self.profiles.get(
                {c.peer for c in page} | {c.last.sender for c in page if c.last is not None}
            )
            positions = await self.store.positions(
                [uid, *{c.peer for c in page}], [c.session_id for c in page]
            )
            now_ms = self._now_ms()
            convs = []
            for c in page:
                peer = users.get(c.peer)
                theirs = positions.get((c.peer, c.session_id), NO_POSITIONS)
                if await self._blocked_pair(uid, c.peer):
                    # Receipts do not cross a block: its positions are hidden.
                    theirs = NO_POSITIONS
                mine = positions.get((uid, c.session_id), NO_POSITIONS)
                convs.append(
                    {
                        "session_id": c.session_id,
                        "peer": {"uid": c.peer, **sender_info(peer)},
                        "last": None
                        if c.last is None
                        else message_object(c.last, users.get(c.last.sender)),
                        "last_msg_id": c.last_msg_id,
                        "unread": c.unread,
                        **peer_positions(theirs),
                        "muted_until": mine.mute_until if mine.mute_until > now_ms else 0,
                    }
                )
            return convs, page[-1].last_msg_id if page else before, more

        convs, more = await self._fill(limit, before, read)
        return {"convs": convs, "more": more}

    async def history(
        self, uid: int, peer: int | None, session_id: int | None, before: int | None, limit: int
    ) -> Result:
        if session_id is None:
            assert peer is not None
            if peer == uid:
                raise ImError(ErrorCode.INVALID, "there is no conversation with yourself")
            session_id = await self.store.session_for_pair(uid, peer)
            if session_id is None:
                return {"msgs": [], "more": False, **peer_positions(NO_POSITIONS)}
        else:
            peer = await self._check_member(uid, session_id)
        await self._settled(uid)
        sid = session_id
        # Once per request, before the pages: a receipt racing the read only
        # makes the positions older than the messages, never newer.
        theirs = (await self.store.positions([peer], [sid])).get((peer, sid), NO_POSITIONS)
        if await self._blocked_pair(uid, peer):
            theirs = NO_POSITIONS  # hidden while blocked, as in convs

        async def read(before: int | None, n: int) -> tuple[list[Result], int | None, bool]:
            page = await self.store.history(sid, before, n + 1, viewer=uid)
            more = len(page) > n
            page = page[:n]
            return await self._objects(page), page[-1].msg_id if page else before, more

        msgs, more = await self._fill(limit, before, read)
        return {"msgs": msgs, "more": more, **peer_positions(theirs)}

    async def _check_member(self, uid: int, session_id: int) -> int:
        """The caller's peer in the session; not_found or forbidden otherwise."""
        members = (await self.store.session_members([session_id])).get(session_id)
        if members is None:
            raise ImError(ErrorCode.NOT_FOUND, "no such session")
        if uid not in members:
            raise ImError(ErrorCode.FORBIDDEN, "you are not part of this session")
        low, high = members
        return low if high == uid else high

    # -- mute (issue 11) -------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    async def mute(
        self, uid: int, session_id: int, until: int, origin: IClientLink | None = None
    ) -> Result:
        """
        Mute a conversation for oneself until C{until} (ms since epoch; 0 or
        a past time: unmute, stored as 0): no webhook notification of its
        messages meanwhile. A change goes to one's other devices (with its
        seq: catch-up has it too); the same value again changes nothing.
        """
        stored = until if until > self._now_ms() else 0
        result = await self.store.mute(uid, session_id, stored)
        reply: Result = {"muted_until": result.until}
        if result.seq is not None:
            reply["seq"] = result.seq
            self.presence.push(
                uid,
                {"t": "mute", "session_id": session_id, "until": result.until, "seq": result.seq},
                origin,
            )
        return reply

    # -- recall ----------------------------------------------------------------------

    async def recall(self, uid: int, msg_id: int, origin: IClientLink | None = None) -> Result:
        """Recall a message: pushed to the recipient's devices and the sender's others."""
        await self._settled(uid)

        def tell(result: RecallResult) -> None:
            # Also when recalled already: the retry of a recall whose first
            # reply was lost must still tell the recipient (clients dedupe).
            m = result.message
            frame: Result = {
                "t": "recall",
                "msg_id": m.msg_id,
                "session_id": m.session_id,
                "by": uid,
            }
            theirs, mine = dict(frame), frame
            if result.recipient_seq:
                theirs["seq"] = result.recipient_seq
            if result.sender_seq:
                mine["seq"] = result.sender_seq
            self.presence.push(m.recipient, theirs)
            self.presence.push(m.sender, mine, origin)

        result = await self.store.recall(uid, msg_id, self.limits.recall_seconds * 1000, tell)
        return {"seq": result.sender_seq} if result.sender_seq else {}

    # -- profiles ------------------------------------------------------------------------

    async def profile(self, uids: Sequence[int]) -> Result:
        found = await self.profiles.get(uids)
        users = [found[uid].public() for uid in dict.fromkeys(uids) if uid in found]
        return self._cut({}, "users", users)

    async def set_profile(
        self,
        uid: int,
        nickname: str | None,
        avatar: str | None,
        origin: IClientLink | None = None,
        presence: str | None = None,
        show_presence: bool = False,
    ) -> Result:
        """
        Change one's profile and (C{presence}) who sees one's presence; one's
        other devices are told, with the setting. The reply carries it with
        C{show_presence} (the wire op's; the HTTP API's reply is as before).
        """
        if nickname is None and avatar is None:
            found = (await self.profiles.get([uid])).get(uid)
            if found is None:
                raise ImError(ErrorCode.NO_SUCH_USER, f"user {uid} does not exist")
            profile = found
        else:
            changed = await self.store.set_profile(uid, nickname, avatar)
            if changed is None:
                raise ImError(ErrorCode.NO_SUCH_USER, f"user {uid} does not exist")
            profile = changed
            self.profile_changed(profile)
        if presence is not None:
            await self.presence_service.set_share(uid, presence)
            share = presence
        else:
            share = await self.presence_service.share(uid)
        self.presence.push(
            uid, {"t": "profile", "user": profile.public(), "presence": share}, origin
        )
        if show_presence:
            return {"user": profile.public(), "presence": share}
        return {"user": profile.public()}

    # -- devices ---------------------------------------------------------------------------

    async def catchup(self, uid: int, device_id: int, after: int, limit: int) -> Result:
        return await self.devices.catchup(uid, device_id, after, limit)

    async def devices_of(self, uid: int) -> Result:
        return await self.devices.devices(uid)

    async def logout_device(self, uid: int, device: str) -> Result:
        return await self.devices.logout_device(uid, device)

    async def revoke_device(self, uid: int, device: str) -> bool:
        return await self.devices.revoke(uid, device)

    async def upsert_user(
        self, uid: int, nickname: str | None, avatar: str | None
    ) -> tuple[Profile, bool]:
        """Create or update a user (the admin API); whether it was created."""
        profile, created = await self.store.upsert_user(uid, nickname, avatar)
        self.profile_changed(profile)
        return profile, created

    def profile_changed(self, profile: Profile) -> None:
        """A profile was written: cache it here, and tell the other nodes."""
        self.profiles.put(profile)
        self.presence.share_profile(profile)

    async def drain(self) -> None:
        """Wait until every commit and fan-out queued so far is done."""
        await self.blocks.idle()  # sends waiting for their block check first
        await self.store.sends.idle()
        await self.fanouts.idle()
        await self.presence_service.flush()
        await self.store.drain()

    # -- recovery ------------------------------------------------------------------------

    async def recover(self) -> int:
        """
        Finish what this node's previous life left undone (its outbox rows);
        call before accepting clients. Returns the rows replayed.
        """
        total = 0
        while True:
            # Rows are deleted once their messages are pushed, not before.
            rows = await self.store.replay_outbox(own=True, push=self._push_replayed)
            if not rows:
                return total
            total += len(rows)

    def start_sweeper(self) -> None:
        """Replay any node's outbox rows left stale (a node died) every 30 s."""
        self._sweeper.start()

    def stop_sweeper(self) -> Deferred[None]:
        """Stop sweeping; fires once the sweep in progress, if any, has finished."""
        return self._sweeper.stop()

    async def _sweep(self) -> None:
        # Rows still being fanned out here are not stale, however old: keep
        # them from every sweeper (before and after a replay that may last 30 s).
        await self.store.renew_outbox_claims()
        rows = await self.store.replay_outbox(own=False, push=self._push_replayed)
        if rows:
            self.log.info("replayed {n} stale outbox rows", n=len(rows))
        await self.store.renew_outbox_claims()

    async def _push_replayed(self, rows: Sequence[Any]) -> None:
        """Push the messages of replayed send rows (clients dedupe by msg_id)."""
        ids = [msg_id for row in rows if row.kind == "send" for msg_id in row.msgs]
        self.replayed += len(rows)
        if not ids:
            return
        messages = await self.store.normal_messages(ids)
        senders = await self.profiles.get({m.sender for m in messages})
        unread: dict[int, tuple[int, dict[int, int]]] = {}
        for m in messages:
            if m.recipient not in unread:
                sessions = dict(await self.store.unread(m.recipient))
                unread[m.recipient] = (sum(sessions.values()), sessions)
            total, sessions = unread[m.recipient]
            mine = message_object(m, senders.get(m.sender))
            mine["t"] = "msg"
            # Without seqs (not kept with the message): clients dedupe by msg_id.
            frame = dict(mine, unread=sessions.get(m.session_id, 0), total_unread=total)
            if self.presence.push(m.recipient, frame):
                self.pushed += 1
            self.presence.push(m.sender, mine)
