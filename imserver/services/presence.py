"""
Presence and push routing: who is connected, and how a frame reaches them.

A user may have several devices online at once (up to C{max_online}), one
connection per device. The business layer pushes through L{IPresence}; the
gateway implements L{IClientLink} for each authenticated connection and
registers it here. The interfaces live in the service layer so that both can
depend on them while dependencies keep pointing down: the single-node
registry is L{imserver.services.registry.LocalRegistry}; a cluster adds a
Redis-backed implementation beside it (L{imserver.services.cluster}) without
the protocol knowing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from imserver.storage.model import Profile

#: The device of a connection that names none (the wire protocol's default).
DEFAULT_DEVICE = "default"
#: Kick reasons. A second auth on the same (uid, device):
KICK_REPLACED = "replaced"
#: Beyond C{[devices] max_online}: the least recently active other device goes.
KICK_TOO_MANY = "too_many_devices"
#: C{logout_device} from another device of the user.
KICK_LOGGED_OUT = "logged_out"
#: The admin API revoked the device.
KICK_REVOKED = "revoked"
#: The old name of L{KICK_REPLACED}, kept for imports.
KICK_LOGIN_ELSEWHERE = KICK_REPLACED

#: Told (uid, online, at ms, here) of a user-level presence transition: the
#: user's first device anywhere logged in or the last one left, C{at} when
#: (0: now, for the listener's clock to say). Listeners order transitions by
#: C{at}: a login's, not its connection's start (that may precede the logout
#: of the user's previous last device); a cluster stamps them with Redis's
#: clock as its scripts ran (one clock for every node).
#: C{here}: this node saw it happen (the other nodes heard of it).
ChangeListener = Callable[[int, bool, int, bool], None]
#: Told (uid, link) when a connection of this node leaves presence.
GoneListener = Callable[[int, "IClientLink"], None]


class IClientLink(Interface):
    """One authenticated connection, as the layers below the gateway see it."""

    uid = Attribute("The authenticated uid (int).")
    epoch = Attribute("A number unique to this connection on this node (int).")
    device = Attribute("The device name (str), 'default' when the client gave none.")
    connected_at = Attribute("When the connection authenticated, ms since the epoch (int).")
    last_active = Attribute("Reactor seconds of the connection's last request (float).")

    def push(frame: Mapping[str, Any]) -> None:
        """Send a push frame (C{{"t": event, ...}}) to the client."""

    def kick(reason: str) -> None:
        """Tell the client why, then close the connection."""


@attrs.frozen
class OnlineDevice:
    """A device connected somewhere in the cluster."""

    device: str
    node: str
    since: int  # the connection's connected_at, ms


class IPresence(Interface):
    """Who is online (per device), and delivery of pushes to them."""

    max_online = Attribute("Devices a user may have online at once (int).")

    def login(uid: int, link: IClientLink) -> Deferred[None]:
        """
        Make C{link} its device's connection. An older connection of the same
        (uid, device), on any node, is kicked with C{replaced}; beyond
        C{max_online} devices the least recently active other device is
        kicked with C{too_many_devices}. Fires once those are closed (or, on
        another node, after a confirmation timeout).
        """

    def logout(uid: int, link: IClientLink) -> None:
        """Forget C{link}, only if it is still its device's connection."""

    def local(uid: int) -> Sequence[IClientLink]:
        """The user's connections on this node (empty if none)."""

    def push(uid: int, frame: Mapping[str, Any], exclude: IClientLink | None = None) -> bool:
        """
        Push to every connection of the user except C{exclude}, on this node
        and on the others. True if a connection on this node took it.
        """

    def push_local(uid: int, frame: Mapping[str, Any], exclude: IClientLink | None = None) -> bool:
        """As L{push}, this node's connections only."""

    def push_remote(uid: int, frame: Mapping[str, Any], exclude: IClientLink | None = None) -> None:
        """As L{push}, the other nodes' connections only (a no-op on a single node)."""

    def kick_device(uid: int, device: str, reason: str) -> Deferred[bool]:
        """Kick the device's connection wherever it is; True if one was found."""

    def online_devices(uid: int) -> Deferred[list[OnlineDevice]]:
        """The user's connected devices, on every node."""

    def links() -> Iterable[IClientLink]:
        """All connections registered on this node."""

    def share_profile(profile: Profile) -> None:
        """
        Hand a changed profile to the other nodes, which replace their cached
        copy (a single node has nobody to tell).
        """

    def online(uid: int) -> Deferred[bool]:
        """Whether the user is connected anywhere (this node, or another one)."""

    def broadcast(kind: str, data: Any) -> None:
        """
        Tell every other node C{data} (plain msgpack data) under C{kind}:
        their C{on_broadcast(kind)} callbacks get it, at most once, maybe not
        at all (Redis down: best effort, as for profiles). A single node has
        nobody to tell.
        """

    def on_broadcast(kind: str, callback: Callable[[Any], None]) -> None:
        """Call C{callback(data)} for each broadcast of C{kind} from another node."""

    def on_change(listener: ChangeListener) -> None:
        """
        Call C{listener} on each user-level transition (online: some device
        connected on some node; offline: none any more), seen here or on
        another node: one broadcast per transition in a cluster.
        """

    def on_link_gone(listener: GoneListener) -> None:
        """Call C{listener} when a connection of this node leaves presence (closed, kicked)."""
