"""
The hot store: the seed's Redis index, as an interface with two
implementations (L{imserver.storage.hot.redis.RedisHotStore},
L{imserver.storage.hot.memory.MemoryHotStore}).

The hot store is a copy, never the truth: SQL is. Every read may answer
None ("no trustworthy copy here"), and then the caller asks SQL and may
(re)load the copy. A user's copy (pending lists, conversation list,
counters) is complete only while its marker says "ready"; see
C{lua/prelude.lua} for the states. Writes are idempotent and
order-insensitive: counters carry versions, lists only grow or shrink by
set operations, and acked or recalled ids leave tombstones so a late or
replayed fan-out cannot make them pending again. A write too late to judge
makes the next reader reload from SQL instead.

Any method may raise L{HotUnavailable}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zope.interface import Attribute, Interface

from imserver.storage.model import ConvRow, Message, Profile, UserSnapshot

#: Newest message ids kept per session in the window.
WINDOW_SIZE = 200
#: A fan-out later than this after its commit is treated as a replay.
LIVE_MS = 5000
#: An invalidated message is not cached by a fan-out for LIVE_MS + this (the
#: fan-out's age is measured on the nodes' clocks: a margin for their skew).
STALE_MARGIN_MS = 2000
#: How long acked and recalled ids are remembered (tombstones): a fan-out
#: older than this cannot be told from a replay of an acked message.
GONE_MS = 60_000


#: A login or refresh for the bus: (uid, device, conn, since_ms, idle_ms),
#: idle_ms being how long ago the connection's last request was.
LoginEntry = tuple[int, str, str, int, int]
#: What a login did: the kicks (device, conn, reason, nonce: empty when the
#: conn is on the asking node), the other nodes holding the user, and the
#: nonces of the join notices those nodes confirm.
LoginAnswer = tuple[list[tuple[str, str, str, str]], list[str], list[str]]


class HotUnavailable(Exception):
    """The hot store did not answer (down, timed out, or refused)."""


class IHotStore(Interface):
    kind: str

    async def start() -> None:
        """Connect (if there is anything to connect to)."""

    async def stop() -> None:
        """Disconnect."""

    async def ping() -> None:
        """Raise L{HotUnavailable} unless the store answers."""

    def circuit_state() -> str | None:
        """
        The state of the circuit breaker in front of the store (C{closed},
        C{open}, C{half-open}: calls fail fast unless closed), or None if
        it has none (the in-process store). Read by the health check.
        """

    # -- writes -------------------------------------------------------------

    async def fanout(messages: Sequence[tuple[Message, int]], rows: Sequence[ConvRow]) -> None:
        """
        Index committed messages, in commit order: cache each message, add it
        to its session's window and to its recipient's pending lists, and
        apply the conversation rows of both users. C{messages} pairs each
        message with its age: milliseconds since its commit transaction began.
        """

    async def ack(acked: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> None:
        """For each (uid, pairs): the (msg_id, sender) pairs are no longer pending."""

    async def recall(message: Message, row: ConvRow | None) -> None:
        """Drop a recalled message from the window, the cache and pending."""

    async def apply_rows(rows: Sequence[ConvRow]) -> None:
        """Apply conversation rows (newer versions only)."""

    async def invalidate(
        uids: Sequence[int], session_ids: Sequence[int], msg_ids: Sequence[int] = ()
    ) -> None:
        """
        Forget the users' copies, the sessions' windows and the cached
        messages; a fan-out does not cache a forgotten message again for
        live_ms + STALE_MARGIN_MS (its record predates what invalidated it).
        """

    async def load_begin(uid: int) -> str:
        """Start (re)loading a user's copy (its pending lists are emptied);
        returns the load's token."""

    async def load_finish(uid: int, token: str, snapshot: UserSnapshot) -> bool:
        """Add a snapshot read from SQL after L{load_begin} (minus ids
        tombstoned meanwhile) and mark the copy ready; False if another load
        or an invalidation came since."""

    # -- reads --------------------------------------------------------------

    async def pending(
        uid: int, after: int, limit: int, sender: int | None
    ) -> list[tuple[int, int]] | None:
        """Up to C{limit} pending (msg_id, sender) above C{after}, oldest first."""

    async def offline_summary(uid: int) -> list[tuple[int, int, int]] | None:
        """(sender, count, last_msg_id) for every sender with pending messages."""

    async def convs(
        uid: int, before: int | None, limit: int
    ) -> list[tuple[int, int, int, int]] | None:
        """(session_id, last_msg_id, total, read), newest first; limit 0: all."""

    async def window(session_id: int, before: int | None, limit: int) -> list[int]:
        """Newest msg ids of the session's window below C{before}, newest first."""

    async def last_in_windows(session_ids: Sequence[int]) -> dict[int, int]:
        """The newest msg id in each session's window (absent if empty)."""

    async def messages(msg_ids: Sequence[int]) -> dict[int, Message]:
        """The cached messages among C{msg_ids}."""

    async def profiles(uids: Sequence[int]) -> dict[int, Profile]:
        """The cached profiles among C{uids}."""

    async def put_profiles(profiles: Sequence[Profile]) -> None:
        """Cache profiles (a cached profile is only replaced by a newer version)."""


class ISubscription(Interface):
    """Pub/sub channels this node listens on (kept subscribed across reconnects)."""

    subscribed = Attribute("Whether the channels are subscribed now (bool).")

    def restart() -> None:
        """
        Drop the subscriber connection, whatever state it is in, and make a
        new one (the node found it useless: see L{IClusterBus.heartbeat}).
        """

    async def stop() -> None:
        """Unsubscribe and disconnect."""


class IClusterBus(Interface):
    """
    What the cluster's nodes share besides SQL: presences, pushes routed to
    the node holding a user, broadcasts, and the data's generation (which
    changes when the bus loses its data: FLUSHALL, a restart without
    persistence). Presences are per device; a connection ("conn") is
    C{node:incarnation:epoch}. Any method may raise L{HotUnavailable}.
    """

    async def ping() -> None:
        """Raise L{HotUnavailable} unless the bus answers."""

    async def generation(fresh: str) -> str:
        """
        The bus's generation, set to C{fresh} first if the bus has none
        (it lost its data, or never had any): a value different from the
        last one seen means everything written before is gone.
        """

    async def heartbeat(fresh: str, node: str, probe: bytes) -> tuple[str, int]:
        """
        The generation (as L{generation}), and how many subscribers got
        C{probe}, published to C{node}'s own channel in the same call: 0
        means the node's subscription is gone, whatever the node believes.
        """

    async def presence_login(
        node: str,
        nonce: str,
        entries: Sequence[LoginEntry],
        ttl_ms: int,
        max_online: int,
        replay: bool = False,
    ) -> tuple[list[LoginAnswer], str | None, int]:
        """
        Make each (uid, device, conn, since_ms, idle_ms) its device's
        connection: the older connection of the device is kicked
        (C{replaced}), and beyond C{max_online} the least recently active
        other device (C{too_many_devices}); a kick on another node is
        published to it with a nonce (C{nonce:n}), which it confirms; so is
        the join notice to each other node holding the user (when C{node}
        did not hold it yet). Per entry: the kicks (device, conn, reason,
        nonce: empty when the conn is on C{node}), the other nodes holding
        the user and the join nonces; the generation; and Redis's clock (ms:
        transitions are stamped with it, one clock for every node). C{replay}: the
        logins were checked on C{node} only (Redis was down); one whose
        device a newer connection (a later since_ms) holds takes nothing and
        its answer kicks it instead (its own conn, C{replaced}, nonce empty).
        """

    async def presence_devices(uid: int) -> list[tuple[str, str, int]]:
        """The user's live devices: (device, conn, since_ms)."""

    async def presence_devices_many(uids: Sequence[int]) -> list[list[tuple[str, str, int]]]:
        """L{presence_devices} of each of C{uids}, in one script call."""

    async def presence_logout(
        node: str, entries: Sequence[tuple[int, str, str]]
    ) -> tuple[list[int], int]:
        """
        Forget (uid, device, conn) devices that are still that conn's; users
        C{node} no longer holds are announced to the nodes still holding them.
        Returns the uids left without a device on any node, and Redis's clock (ms).
        """

    async def presence_active(entries: Sequence[tuple[int, str, str, int]]) -> int:
        """
        Write the last activity of these (uid, device, conn, idle_ms) devices
        whose field still holds that conn; returns how many were written.
        """

    async def presence_refresh(
        node: str, entries: Sequence[LoginEntry], ttl_ms: int
    ) -> tuple[list[tuple[int, str, str]], dict[int, set[str]], str | None]:
        """
        Extend (or restore) devices with their last activity: the (uid,
        device, conn) now held by another connection (conn: the entry's,
        stale), the other nodes holding each
        user (users held by C{node} alone are absent), and the generation.
        """

    async def presence_kick(
        uid: int, device: str, reason: str, node: str, nonce: str
    ) -> str | None:
        """
        Forget the device's connection and, if another node than C{node}
        holds it, tell that node to kick it (it confirms to C{nonce}). The
        conn, or None if the device is not online.
        """

    async def route(node: str, pushes: Sequence[tuple[int, bytes, str]]) -> tuple[int, str | None]:
        """
        Publish (uid, frame, exclude conn or "") pushes to the other nodes
        holding their users: how many went out (per node), and the generation.
        """

    async def send(node: str, message: bytes) -> None:
        """Publish to one node's channel."""

    async def broadcast(message: bytes) -> None:
        """Publish to every node."""

    def subscribe(
        node: str,
        on_message: Callable[[bytes], None],
        on_subscribed: Callable[[bool], None] | None = None,
    ) -> ISubscription:
        """
        Listen on this node's channel and on the one every node hears;
        C{on_subscribed(again)} each time the subscription is (re)made.
        """

    def when_back(callback: Callable[[], None]) -> None:
        """Call C{callback} each time the bus answers again after an outage."""

    def state() -> str:
        """C{ok}, or why calls fail at once now (e.g. C{open})."""
