"""
The business layer of several devices per user: logins, catch-up, the
device list, logging a device out and revoking it, and the upkeep of the
device rows.

Every device follows its user's one stream (docs/data-model.md, "The user's
stream"): a device's catch-up is the stream after its position, read from
SQL in pages, so what it costs is what the device missed. Pushes carry the
stream's C{seq}; the gateway uses it to give a catching-up connection each
event once (docs/protocol.md, "Devices").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from imserver.chat.profiles import ProfileCache
from imserver.config import DevicesConfig
from imserver.errors import ErrorCode, ImError, Unavailable
from imserver.periodic import Periodic
from imserver.services.presence import KICK_LOGGED_OUT, KICK_REVOKED, IPresence, OnlineDevice
from imserver.storage.model import Login, Message, Profile, StreamEvent, pack_body
from imserver.storage.store import Store

Result = dict[str, Any]
#: Builds a msg object (the chat layer's L{imserver.chat.service.message_object}).
MessageObject = Callable[[Message, "Profile | None"], Result]

#: How often a node writes the last-seen time of the devices connected to it
#: (a device connected for weeks must not be forgotten).
TOUCH_SECONDS = 600.0
#: How often forgotten devices (and stream events as old) are deleted.
FORGET_SECONDS = 3600.0
DAY_MS = 86_400_000
#: A revoked device is kicked again this long after its revocation.
REVOKE_AGAIN_SECONDS = 5.0
#: Devices that disconnected within this long share one last-seen write.
LEFT_FLUSH_SECONDS = 1.0


class DeviceService:
    log = Logger()

    def __init__(
        self,
        *,
        store: Store,
        presence: IPresence,
        profiles: ProfileCache,
        config: DevicesConfig,
        clock: IReactorTime,
        message_object: MessageObject,
        max_reply_bytes: int,
        reply_reserve: int,
    ) -> None:
        self.store = store
        self.presence = presence
        self.profiles = profiles
        self.config = config
        self.clock = clock
        self._message_object = message_object
        self._budget = max_reply_bytes - reply_reserve
        self._touch = Periodic(clock, TOUCH_SECONDS, self._touch_connected, "device last-seen")
        self._forget = Periodic(clock, FORGET_SECONDS, self._forget_old, "device forget")
        self._left: set[int] = set()
        self._left_call: IDelayedCall | None = None
        self._again: set[IDelayedCall] = set()
        # Read by metrics.
        self.catchups = 0
        self.caught_up_events = 0
        self.refused_revoked = 0

    def start(self) -> None:
        self._touch.start()
        self._forget.start(now=True)

    async def stop(self) -> None:
        await self._touch.stop()
        await self._forget.stop()
        if self._left_call is not None and self._left_call.active():
            self._left_call.cancel()
            self._flush_left()
        for call in self._again:
            if call.active():
                call.cancel()
        self._again.clear()

    # -- login -----------------------------------------------------------------

    async def login(self, uid: int, device: str, client: str, issued_at: float | None) -> Login:
        """
        Create the user and the device if need be. A device revoked by the
        admin API refuses the tokens issued before its revocation or in the
        same second (a token's C{iat} has whole seconds: one minted a moment
        before the revocation must not pass), and tokens without C{iat}.
        """
        login = await self.store.login(uid, device, client, issued_at)
        revoked = login.device.revoked_at
        if revoked and (issued_at is None or issued_at <= revoked // 1000):
            self.refused_revoked += 1
            raise ImError(
                ErrorCode.AUTH_FAILED,
                "this device was signed out: sign in again for a new token",
            )
        self.profiles.put(login.profile)
        return login

    # -- catch-up ----------------------------------------------------------------

    async def catchup(self, uid: int, device_id: int, after: int, limit: int) -> Result:
        """
        The device's stream after C{after}, one page that fits in a reply:
        C{events} in seq order, C{seq} the position after them (the next
        page's C{after}) and C{more}. Asking for the events after a position
        tells the server the device has everything up to it.
        """
        page = await self.store.catchup(uid, device_id, after, limit)
        self.catchups += 1
        senders = await self.profiles.get(
            {e.message.sender for e in page.events if e.message is not None}
        )
        events: list[Result] = []
        used = 0
        position, more = page.seq, page.more
        for event in page.events:
            if event.kind == "edit" and event.message is None:
                continue  # recalled since: its recall event follows
            item = self._event(event, senders)
            used += len(pack_body(item))
            if events and used > self._budget:
                # Cut by size: the next page starts after the last one kept.
                position, more = events[-1]["seq"], True
                break
            events.append(item)
        self.caught_up_events += len(events)
        return {"events": events, "seq": position, "more": more}

    def _event(self, event: StreamEvent, senders: dict[int, Profile]) -> Result:
        if event.kind == "msg":
            assert event.message is not None
            item = self._message_object(event.message, senders.get(event.message.sender))
            item["t"] = "msg"
        elif event.kind == "read":
            item = {"t": "read", "session_id": event.session_id, "by": event.by}
            item["msg_id"] = event.msg_id
        elif event.kind == "mute":
            # msg_id holds the new muteUntil (see EVENT_MUTE).
            item = {"t": "mute", "session_id": event.session_id, "until": event.msg_id}
        elif event.kind == "edit":
            # The message as it is now (issue 11: edits).
            assert event.message is not None
            item = self._message_object(event.message, senders.get(event.message.sender))
            item["t"] = "edit"
        elif event.kind == "hide":
            item = {"t": "hide", "msg_ids": list(event.msg_ids)}
        elif event.kind == "clear":
            item = {"t": "clear", "session_id": event.session_id, "up_to": event.msg_id}
        else:
            item = {"t": "recall", "msg_id": event.msg_id, "session_id": event.session_id}
            item["by"] = event.by
        item["seq"] = event.seq
        return item

    # -- the device list -----------------------------------------------------------

    async def devices(self, uid: int) -> Result:
        rows = await self.store.devices(uid)
        try:
            online = {d.device: d for d in await self.presence.online_devices(uid)}
        except Unavailable:
            # Redis is down: this node's connections are all that is known.
            online = {
                link.device: OnlineDevice(link.device, "", link.connected_at)
                for link in self.presence.local(uid)
            }
        devices = []
        for row in sorted(rows, key=lambda r: r.last_seen, reverse=True):
            on = online.get(row.device)
            devices.append(
                {
                    "device": row.device,
                    "client": row.client,
                    "online": on is not None,
                    "node": None if on is None else on.node,
                    "since": None if on is None else on.since,
                    "last_seen": row.last_seen,
                }
            )
        return {"devices": devices}

    async def logout_device(self, uid: int, device: str) -> Result:
        return {"kicked": await self.presence.kick_device(uid, device, KICK_LOGGED_OUT)}

    async def revoke(self, uid: int, device: str) -> bool:
        """Revoke a device (the admin API): kicked, its older tokens refused."""
        row = await self.store.revoke_device(uid, device)
        if row is None:
            return False
        await self.presence.kick_device(uid, device, KICK_REVOKED)
        # A login of the device that read its row before the revocation may
        # still be on its way into presence (its kicks take up to 2 s): kick
        # once more when it must have arrived.
        call = self.clock.callLater(
            REVOKE_AGAIN_SECONDS, self._kick_again, uid, device, row.revoked_at
        )
        self._again.add(call)
        self.log.info("device {device!r} of uid {uid} revoked", device=device, uid=uid)
        return True

    def _kick_again(self, uid: int, device: str, revoked_at: int) -> None:
        self._again = {c for c in self._again if c.active()}
        d = Deferred.fromCoroutine(self._kick_if_older(uid, device, revoked_at))
        d.addErrback(
            lambda f: self.log.warn(
                "second kick of revoked device {device!r} of uid {uid} failed: {error}",
                device=device,
                uid=uid,
                error=f.value,
            )
        )

    async def _kick_if_older(self, uid: int, device: str, revoked_at: int) -> None:
        """Kick the device if its connection began before the revocation (not a new sign-in)."""
        for online in await self.presence.online_devices(uid):
            if online.device == device and online.since < revoked_at:
                await self.presence.kick_device(uid, device, KICK_REVOKED)

    # -- upkeep --------------------------------------------------------------------

    async def _touch_connected(self) -> None:
        ids: Sequence[int] = sorted(
            {getattr(link, "device_id", 0) for link in self.presence.links()} - {0}
        )
        if ids:
            await self.store.touch_devices(ids)

    async def _forget_old(self) -> None:
        forgotten = await self.store.forget_devices(int(self.config.forget_days * DAY_MS))
        if forgotten:
            self.log.info(
                "forgot {n} devices unseen for {days} days",
                n=forgotten,
                days=self.config.forget_days,
            )

    def left(self, device_id: int) -> None:
        """A device's connection closed: its last-seen time is written within a second."""
        if not device_id:
            return
        self._left.add(device_id)
        if self._left_call is None:
            self._left_call = self.clock.callLater(LEFT_FLUSH_SECONDS, self._flush_left)

    def _flush_left(self) -> None:
        self._left_call = None
        ids, self._left = sorted(self._left), set()
        d = Deferred.fromCoroutine(self.store.touch_devices(ids))
        d.addErrback(
            lambda f: self.log.warn(
                "last-seen of {n} devices not written: {error}", n=len(ids), error=f.value
            )
        )
