"""
A user's devices and stream in SQL: L{DeviceStore}, held by L{Store}.

Logins (batched with the store's C{logins} Batcher: one transaction for
many), the device list, revocation, the lastSeen refresh and the forget
sweep (both on the background pool), and catch-up. Nothing here touches the
hot store except the profile copy a login refreshes: catch-up is SQL only.
Kept apart from L{Store} so that the store does not grow into one object
doing everything; the store's pinned methods delegate here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from twisted.logger import Logger

from imserver.errors import ErrorCode, ImError
from imserver.storage.model import CatchupPage, DeviceRow, Login, Profile
from imserver.storage.sql import queries as q
from imserver.storage.sql.database import Txn

if TYPE_CHECKING:
    from imserver.storage.store import Store

#: A device name: 1..64 characters (stored as UTF-8 in at most 256 bytes).
DEVICE_MAX_CHARS = 64
#: What a client may name itself (t_device.client).
CLIENT_MAX_CHARS = 128
#: Most events a catch-up page may hold.
CATCHUP_MAX_LIMIT = 500
#: Forget chunks one sweep runs at most (each its own short transaction).
FORGET_MAX_CHUNKS = 100

#: A login item of the store's logins Batcher: (uid, device, client, issued
#: ms); device None is a login without a device (L{Store.ensure_user}): only
#: the user. A device revoked at or after C{issued ms} (the token's whole
#: second, rounded up; 0: no C{iat}) keeps its client and lastSeen: the
#: chat layer refuses that login.
LoginItem = tuple[int, str | None, str, int]


def check_device(device: str) -> None:
    """Bad input gets a clear error, never a database error."""
    if not isinstance(device, str) or not 1 <= len(device) <= DEVICE_MAX_CHARS:
        raise ImError(ErrorCode.INVALID, f"device must be 1..{DEVICE_MAX_CHARS} characters")
    try:
        device.encode("utf-8")
    except UnicodeEncodeError:
        raise ImError(ErrorCode.INVALID, "device must be valid Unicode text") from None


def _client_text(client: str) -> str:
    """What a client calls itself is informational: cut to size, never refused."""
    text = str(client)[:CLIENT_MAX_CHARS]
    return text.encode("utf-8", "replace").decode("utf-8")


class DeviceStore:
    log = Logger()

    def __init__(self, store: Store) -> None:
        self._store = store

    def _now_ms(self) -> int:
        return self._store._now_ms()

    # -- logins ------------------------------------------------------------------

    async def login_batch(self, items: Sequence[LoginItem]) -> list[Login | Profile]:
        """
        One transaction for a batch of logins: the users created if new, the
        devices upserted. An item without a device gives the user's
        L{Profile}; with one, its L{Login}.
        """
        store = self._store
        with_device = [
            (uid, device, _client_text(client), store.ids.next_id(), issued_ms)
            for uid, device, client, issued_ms in items
            if device is not None
        ]
        plain = sorted({uid for uid, device, _, _ in items if device is None})
        logins, profiles = await store.db.run(
            "login", _login_txn, with_device, plain, self._now_ms()
        )
        by_uid = {p.uid: p for p in profiles}
        by_uid.update((login.profile.uid, login.profile) for login in logins)
        store._known_users.update(by_uid)
        for login in logins:
            # A committed head (never ahead of the stream): the next send batch's guess.
            store.saw_seq(login.profile.uid, login.head)
        # After the reply: a copy missing meanwhile is read from SQL.
        store._run_after_reply(store._put_profiles(list(by_uid.values()), changed=False), ())
        found = iter(logins)
        return [by_uid[uid] if device is None else next(found) for uid, device, _, _ in items]

    # -- reads and writes of devices -------------------------------------------

    async def head(self, uid: int) -> int:
        return await self._store.db.run("head", q.head_txn, uid)

    async def devices(self, uid: int) -> list[DeviceRow]:
        return await self._store.db.run("devices", q.devices_txn, uid)

    async def device(self, uid: int, device: str) -> DeviceRow | None:
        check_device(device)
        return await self._store.db.run("device", q.device_txn, uid, device)

    async def revoke_device(self, uid: int, device: str) -> DeviceRow | None:
        check_device(device)
        return await self._store.db.run(
            "revoke_device", q.revoke_device_txn, uid, device, self._now_ms()
        )

    async def touch_devices(self, device_ids: Sequence[int]) -> None:
        if device_ids:
            await self._store.background.run(
                "touch_devices", q.touch_devices_txn, list(device_ids), self._now_ms()
            )

    async def forget_devices(self, forget_ms: int) -> int:
        """
        Delete devices unseen for C{forget_ms}, and stream events older than
        that, in short chunked transactions; return the devices deleted.
        """
        before = self._now_ms() - forget_ms
        devices = events = 0
        for _ in range(FORGET_MAX_CHUNKS):
            d, e = await self._store.background.run(
                "forget_devices", q.forget_txn, before, self._now_ms()
            )
            devices += d
            events += e
            if d < q.FORGET_CHUNK and e < q.FORGET_CHUNK:
                break
        if devices or events:
            self.log.info(
                "forgot {devices} devices and {events} stream events",
                devices=devices,
                events=events,
            )
        return devices

    # -- catch-up ----------------------------------------------------------------

    async def catchup(self, uid: int, device_id: int, after: int, limit: int) -> CatchupPage:
        if not isinstance(after, int) or after < 0:
            raise ImError(ErrorCode.INVALID, "after must be an integer >= 0")
        if not isinstance(limit, int) or not 1 <= limit <= CATCHUP_MAX_LIMIT:
            raise ImError(ErrorCode.INVALID, f"limit must be 1..{CATCHUP_MAX_LIMIT}")
        return await self._store.db.run("catchup", q.catchup_txn, uid, device_id, after, limit)


def _login_txn(
    txn: Txn,
    with_device: Sequence[tuple[int, str, str, int, int]],
    plain: Sequence[int],
    now_ms: int,
) -> tuple[list[Login], list[Profile]]:
    logins = q.login_txn(txn, with_device, now_ms) if with_device else []
    profiles = q.ensure_users_txn(txn, plain, now_ms) if plain else []
    return logins, profiles
