"""
Presence and push routing: who is connected, and how a frame reaches them.

The business layer pushes through L{IPresence}; the gateway implements
L{IClientLink} for each authenticated connection and registers it here. The
interfaces live in the service layer so that both can depend on them while
dependencies keep pointing down: the single-node registry is
L{imserver.gateway.registry.LocalRegistry}; a cluster adds a Redis-backed
implementation beside it without the protocol knowing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from imserver.storage.model import Profile

#: The reason of the kick a connection gets when its user logs in again.
KICK_LOGIN_ELSEWHERE = "login_elsewhere"


class IClientLink(Interface):
    """One authenticated connection, as the layers below the gateway see it."""

    uid = Attribute("The authenticated uid (int).")
    epoch = Attribute("A number unique to this connection on this node (int).")

    def push(frame: Mapping[str, Any]) -> None:
        """Send a push frame (C{{"t": event, ...}}) to the client."""

    def kick(reason: str) -> None:
        """Tell the client why, then close the connection."""


class IPresence(Interface):
    """Who is online, and delivery of pushes to them."""

    def login(uid: int, link: IClientLink) -> Deferred[None]:
        """
        Make C{link} the user's connection; an older connection of the same
        uid (on any node) is kicked with reason C{login_elsewhere}.
        """

    def logout(uid: int, link: IClientLink) -> None:
        """Forget C{link}, only if it is still the user's current connection."""

    def local(uid: int) -> IClientLink | None:
        """The user's connection on this node, if any."""

    def push(uid: int, frame: Mapping[str, Any]) -> bool:
        """
        Push to the user's connection. Return True if a connection on this
        node took it. Otherwise False: the user is offline, or (in a cluster)
        the push was handed on to the node that holds the user.
        """

    def links() -> Iterable[IClientLink]:
        """All connections registered on this node."""

    def share_profile(profile: Profile) -> None:
        """
        Hand a changed profile to the other nodes, which replace their cached
        copy (a single node has nobody to tell).
        """

    def online(uid: int) -> Deferred[bool]:
        """Whether the user is connected anywhere (this node, or another one)."""
