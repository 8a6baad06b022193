"""
The op table: wire requests -> business calls.

Each handler unpacks a typed request (L{imserver.wire.frames}) into a call on
L{ChatService} for the authenticated uid. Sending is rate-limited per
connection (a token bucket from C{[limits]}), here in the connection layer;
every other op but ack goes through the gateway's fair queue.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred

from imserver.chat.service import ChatService
from imserver.config import LimitsConfig
from imserver.errors import ErrorCode, ImError
from imserver.gateway.protocol import ClientProtocol, LoginHook, Op, Result
from imserver.services.ratelimit import TokenBucket
from imserver.services.tokens import Claims
from imserver.wire import frames


def _call(coro: Coroutine[Any, Any, Result]) -> Deferred[Result]:
    return Deferred.fromCoroutine(coro)


def limited(conn: ClientProtocol, name: str, rate: float, burst: int) -> None:
    """
    Take a token of the connection's bucket C{name}, created at first use.

    @raise ImError: C{rate_limited} when it is empty.
    """
    buckets = conn.buckets
    if buckets is None:
        buckets = conn.buckets = {}
    bucket = buckets.get(name)
    if bucket is None:
        bucket = buckets[name] = TokenBucket(rate, burst, conn.gateway.clock)
    if not bucket.take():
        raise ImError(ErrorCode.RATE_LIMITED, f"too many {name} requests; slow down")


def business_ops(chat: ChatService, limits: LimitsConfig) -> dict[str, Op]:
    """The ops of wire protocol v1 beyond auth and ping."""

    def uid(conn: ClientProtocol) -> int:
        assert conn.uid is not None
        return conn.uid

    def send(conn: ClientProtocol, r: frames.Request) -> Deferred[dict[str, Any]]:
        assert isinstance(r, frames.Send)
        bucket = conn.send_bucket
        if bucket is None:
            bucket = conn.send_bucket = TokenBucket(
                limits.send_per_second, limits.send_burst, conn.gateway.clock
            )
        if not bucket.take():
            raise ImError(ErrorCode.RATE_LIMITED, "too many messages; slow down")
        return chat.send(uid(conn), r.to, r.cid, r.type, r.body, conn)

    def ack(conn: ClientProtocol, r: frames.Request) -> Deferred[dict[str, Any]]:
        assert isinstance(r, frames.Ack)
        return chat.ack(uid(conn), r.msg_ids, conn.device_id, r.seq)

    def sync(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Sync)
        return _call(chat.sync(uid(conn), r.limit, r.after, r.sender))

    def offline_summary(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        return _call(chat.offline_summary(uid(conn)))

    def read(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Read)
        return _call(chat.read(uid(conn), r.session_id, r.msg_id, conn))

    def unread(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        return _call(chat.unread(uid(conn)))

    def convs(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Convs)
        return _call(chat.convs(uid(conn), r.limit, r.before))

    def history(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.History)
        return _call(chat.history(uid(conn), r.peer, r.session_id, r.before, r.limit))

    def recall(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Recall)
        return _call(chat.recall(uid(conn), r.msg_id, conn))

    def profile(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.GetProfile)
        return _call(chat.profile(r.uids))

    def set_profile(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.SetProfile)
        return _call(
            chat.set_profile(uid(conn), r.nickname, r.avatar, conn, r.presence, show_presence=True)
        )

    async def _catchup(conn: ClientProtocol, r: frames.Catchup) -> Result:
        after = conn.position if r.after is None else r.after
        page = await chat.catchup(uid(conn), conn.device_id, after, r.limit)
        page["more"] = conn.caught_up(page["seq"], page["more"])
        return page

    def catchup(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Catchup)
        return _call(_catchup(conn, r))

    def devices(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        return _call(chat.devices_of(uid(conn)))

    def logout_device(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.LogoutDevice)
        if r.device == conn.device:
            raise ImError(ErrorCode.INVALID, "this is the device you are on: close the connection")
        return _call(chat.logout_device(uid(conn), r.device))

    def social(conn: ClientProtocol) -> None:
        limited(conn, "social", limits.social_per_second, limits.social_burst)

    # -- presence and typing (issue 11) --
    def presence(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.GetPresence)
        social(conn)
        return _call(chat.presence_service.query(uid(conn), r.uids))

    def watch(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Watch)
        social(conn)
        return _call(chat.presence_service.watch(uid(conn), conn, r.uids))

    def typing(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Typing)
        limited(conn, "typing", limits.typing_per_second, limits.typing_burst)
        return _call(chat.presence_service.typing(uid(conn), r.to, r.active))

    # -- receipts and mute (issue 11) --

    def mute(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Mute)
        social(conn)
        return _call(chat.mute(uid(conn), r.session_id, r.until, conn))

    # -- blocks (issue 11) --

    def block(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Block)
        social(conn)
        return _call(chat.blocks.block(uid(conn), r.uid, conn))

    def unblock(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Unblock)
        social(conn)
        return _call(chat.blocks.unblock(uid(conn), r.uid, conn))

    def blocked(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Blocked)
        return _call(chat.blocks.blocked(uid(conn), r.after, r.limit))

    # -- edit, hide, clear (issue 11) --

    def edit(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Edit)
        social(conn)
        return _call(chat.edits.edit(uid(conn), r.msg_id, r.body, conn))

    def hide(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Hide)
        social(conn)
        return _call(chat.edits.hide(uid(conn), r.msg_ids, conn))

    def clear(conn: ClientProtocol, r: frames.Request) -> Deferred[Result]:
        assert isinstance(r, frames.Clear)
        social(conn)
        return _call(chat.edits.clear(uid(conn), r.session_id, conn))

    table: dict[type[frames.Request], Callable[[ClientProtocol, frames.Request], Any]] = {
        frames.Send: send,
        frames.Ack: ack,
        frames.Sync: sync,
        frames.OfflineSummary: offline_summary,
        frames.Read: read,
        frames.Unread: unread,
        frames.Convs: convs,
        frames.History: history,
        frames.Recall: recall,
        frames.GetProfile: profile,
        frames.SetProfile: set_profile,
        frames.Catchup: catchup,
        frames.Devices: devices,
        frames.LogoutDevice: logout_device,
        # -- presence and typing (issue 11) --
        frames.GetPresence: presence,
        frames.Watch: watch,
        frames.Typing: typing,
        # -- receipts and mute (issue 11) --
        frames.Mute: mute,
        # -- blocks (issue 11) --
        frames.Block: block,
        frames.Unblock: unblock,
        frames.Blocked: blocked,
        # -- edit, hide, clear (issue 11) --
        frames.Edit: edit,
        frames.Hide: hide,
        frames.Clear: clear,
    }
    # Group-committed already, in order, and rate-limited: not queued fairly.
    direct = {frames.Send, frames.Ack}
    return {
        schema.op: Op(schema, handler, fair=schema not in direct)
        for schema, handler in table.items()
    }


def login_hook(chat: ChatService) -> LoginHook:
    """
    Create the user on first login (a user exists once it has authenticated)
    and its device on the device's first, refuse a revoked device's older
    tokens, and say where the device's stream stands (docs/protocol.md,
    "Devices"): with C{since}, the connection waits for its catch-up.
    """

    async def login(claims: Claims, conn: ClientProtocol, request: frames.Auth) -> Result:
        login = await chat.login(claims.uid, request.device, request.client or "", claims.issued_at)
        conn.device_id = login.device.id
        since = request.since
        reset = False
        if since is None:
            start = login.head if login.created else login.device.cursor
        elif (login.created and since > 0) or since > login.head:
            # Forgotten (or never seen, or ahead of the stream): the client's
            # state cannot be caught up; it rebuilds from convs/history.
            reset = True
            start = login.head
        else:
            start = login.head if login.created else since
        conn.position = start
        conn.catching_up = conn.filter_stream = since is not None
        result: dict[str, Any] = {
            "device": request.device,
            "seq": start,
            "head": login.head,
            "new_device": login.created,
        }
        if reset:
            result["reset"] = True
        return result

    return login
