"""The session registry of one node: uid -> device -> the connection logged in here."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from imserver.services.presence import (
    KICK_REPLACED,
    KICK_TOO_MANY,
    ChangeListener,
    GoneListener,
    IClientLink,
    IPresence,
    OnlineDevice,
)
from imserver.storage.model import Profile


@implementer(IPresence)
class LocalRegistry:
    """
    Presence for a single node: per uid one connection per device, the
    newest wins, and at most C{max_online} devices (the least recently
    active one goes).

    Lookups are a dict access and a loop over the user's few connections,
    so pushing to a local user costs nothing beyond encoding the frame.
    """

    log = Logger()

    def __init__(self, max_online: int = 5, node: str = "") -> None:
        self.max_online = max_online
        #: Named in L{online_devices}.
        self.node = node
        self._links: dict[int, dict[str, IClientLink]] = {}
        # Presence transitions (a single node: its users' first and last
        # connection); a cluster listens to ClusterPresence instead.
        self._changes: list[ChangeListener] = []
        self._gone: list[GoneListener] = []

    def __len__(self) -> int:
        """How many users have a connection here."""
        return len(self._links)

    def login(self, uid: int, link: IClientLink) -> Deferred[None]:
        self.register(uid, link, self.max_online)
        return succeed(None)

    def register(self, uid: int, link: IClientLink, limit: int | None) -> list[IClientLink]:
        """
        Make C{link} its device's connection, kicking an older one of the
        same device and, beyond C{limit} devices (None: no limit, the
        cluster decides), the least recently active others. Returns the
        connections kicked (already forgotten).
        """
        devices = self._links.get(uid)
        if devices is None:
            self._links[uid] = {link.device: link}
            self._changed(uid, True, 0)
            return []
        kicked: list[IClientLink] = []
        old = devices.get(link.device)
        devices[link.device] = link
        if old is not None and old is not link:
            self.log.info(
                "uid {uid} device {device} logged in again: kicking the older connection",
                uid=uid,
                device=link.device,
            )
            old.kick(KICK_REPLACED)
            kicked.append(old)
        if limit is not None:
            while len(devices) > max(limit, 1):
                name, victim = min(
                    ((d, other) for d, other in devices.items() if other is not link),
                    key=lambda item: item[1].last_active,
                )
                del devices[name]
                self.log.info(
                    "uid {uid}: more than {limit} devices: kicking {device}",
                    uid=uid,
                    limit=limit,
                    device=name,
                )
                victim.kick(KICK_TOO_MANY)
                kicked.append(victim)
        for old in kicked:
            self._left(uid, old)
        return kicked

    def logout(self, uid: int, link: IClientLink) -> None:
        self.remove(uid, link)

    def remove(self, uid: int, link: IClientLink) -> bool:
        """L{logout}: whether C{link} was still its device's connection."""
        devices = self._links.get(uid)
        if devices is None or devices.get(link.device) is not link:
            return False
        del devices[link.device]
        if not devices:
            del self._links[uid]
        self._left(uid, link)
        if not devices:
            self._changed(uid, False, 0)
        return True

    def _changed(self, uid: int, online: bool, at: int) -> None:
        for listener in self._changes:
            try:
                listener(uid, online, at, True)
            except Exception:
                self.log.failure("a presence listener failed for uid {uid}", uid=uid)

    def _left(self, uid: int, link: IClientLink) -> None:
        for listener in self._gone:
            try:
                listener(uid, link)
            except Exception:
                self.log.failure("a presence listener failed for uid {uid}", uid=uid)

    def on_change(self, listener: ChangeListener) -> None:
        self._changes.append(listener)

    def on_link_gone(self, listener: GoneListener) -> None:
        self._gone.append(listener)

    def local(self, uid: int) -> list[IClientLink]:
        devices = self._links.get(uid)
        return [] if devices is None else list(devices.values())

    def device_link(self, uid: int, device: str) -> IClientLink | None:
        """The device's connection here, if any."""
        devices = self._links.get(uid)
        return None if devices is None else devices.get(device)

    def has(self, uid: int) -> bool:
        """Whether the user has a connection here."""
        return uid in self._links

    def push(self, uid: int, frame: Mapping[str, Any], exclude: IClientLink | None = None) -> bool:
        return self.push_local(uid, frame, exclude)

    def push_local(
        self, uid: int, frame: Mapping[str, Any], exclude: IClientLink | None = None
    ) -> bool:
        devices = self._links.get(uid)
        if devices is None:
            return False
        took = False
        # A copy: a push that fails may close the connection (and log it out).
        for link in list(devices.values()):
            if link is not exclude:
                link.push(frame)
                took = True
        return took

    def push_remote(
        self, uid: int, frame: Mapping[str, Any], exclude: IClientLink | None = None
    ) -> None:
        pass

    def kick_device(self, uid: int, device: str, reason: str) -> Deferred[bool]:
        link = self.device_link(uid, device)
        if link is None:
            return succeed(False)
        self.remove(uid, link)
        link.kick(reason)
        return succeed(True)

    def online_devices(self, uid: int) -> Deferred[list[OnlineDevice]]:
        return succeed(
            [OnlineDevice(link.device, self.node, link.connected_at) for link in self.local(uid)]
        )

    def share_profile(self, profile: Profile) -> None:
        pass

    def online(self, uid: int) -> Deferred[bool]:
        return succeed(uid in self._links)

    def broadcast(self, kind: str, data: Any) -> None:
        pass

    def on_broadcast(self, kind: str, callback: Callable[[Any], None]) -> None:
        pass

    def several(self, also: Callable[[int], bool]) -> list[tuple[int, IClientLink]]:
        """The links of the users with several devices here, or for whom C{also} says so."""
        return [
            (uid, link)
            for uid, devices in self._links.items()
            if len(devices) > 1 or also(uid)
            for link in devices.values()
        ]

    def pairs(self) -> list[tuple[int, IClientLink]]:
        """(uid, link) of every connection here."""
        return [(uid, link) for uid, devices in self._links.items() for link in devices.values()]

    def links(self) -> Iterator[IClientLink]:
        return iter([link for devices in self._links.values() for link in devices.values()])
