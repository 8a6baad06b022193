"""The session registry of one node: uid -> the connection that is logged in here."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from imserver.services.presence import KICK_LOGIN_ELSEWHERE, IClientLink, IPresence
from imserver.storage.model import Profile


@implementer(IPresence)
class LocalRegistry:
    """
    Presence for a single node: one connection per uid, the newest wins.

    Lookups are a dict access, so pushing to a local user costs nothing
    beyond encoding the frame.
    """

    log = Logger()

    def __init__(self) -> None:
        self._links: dict[int, IClientLink] = {}

    def __len__(self) -> int:
        return len(self._links)

    def login(self, uid: int, link: IClientLink) -> Deferred[None]:
        old = self._links.get(uid)
        self._links[uid] = link
        if old is not None and old is not link:
            self.log.info("uid {uid} logged in again: kicking the older connection", uid=uid)
            old.kick(KICK_LOGIN_ELSEWHERE)
        return succeed(None)

    def logout(self, uid: int, link: IClientLink) -> None:
        if self._links.get(uid) is link:
            del self._links[uid]

    def local(self, uid: int) -> IClientLink | None:
        return self._links.get(uid)

    def push(self, uid: int, frame: Mapping[str, Any]) -> bool:
        link = self._links.get(uid)
        if link is None:
            return False
        link.push(frame)
        return True

    def share_profile(self, profile: Profile) -> None:
        pass

    def online(self, uid: int) -> Deferred[bool]:
        return succeed(uid in self._links)

    def links(self) -> Iterator[IClientLink]:
        return iter(list(self._links.values()))
