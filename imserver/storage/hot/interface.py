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

from collections.abc import Sequence

from zope.interface import Interface

from imserver.storage.model import ConvRow, Message, Profile, UserSnapshot

#: Newest message ids kept per session in the window.
WINDOW_SIZE = 200
#: A fan-out later than this after its commit is treated as a replay.
LIVE_MS = 5000
#: How long acked and recalled ids are remembered (tombstones): a fan-out
#: older than this cannot be told from a replay of an acked message.
GONE_MS = 60_000


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
        """Forget the users' copies, the sessions' windows and the cached messages."""

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
