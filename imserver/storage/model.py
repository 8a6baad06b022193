"""Plain records passed between the storage layer and the business layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import attrs
import msgpack

from imserver.wire.codec import packb

T = TypeVar("T")

RECORD_NORMAL = 0
RECORD_RECALLED = 1


def pack_body(body: Any) -> bytes:
    return packb(body)  # a Packer kept per thread (issue 13)


def unpack_body(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False)


def session_pair(a: int, b: int) -> tuple[int, int]:
    """The two users of a session, lower uid first (t_session's uidLow, uidHigh)."""
    return (a, b) if a < b else (b, a)


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """C{items} in slices of at most C{size}, so no statement or command grows without bound."""
    return [items[i : i + size] for i in range(0, len(items), size)]


@attrs.frozen
class Profile:
    uid: int
    nickname: str = ""
    avatar: str = ""
    version: int = 0

    def public(self) -> dict[str, Any]:
        return {"uid": self.uid, "nickname": self.nickname, "avatar": self.avatar}


@attrs.frozen
class NewMessage:
    """A message to commit; ids and time are assigned before it is queued."""

    msg_id: int
    sender: int
    recipient: int
    cid: str
    type: str
    body: bytes  # msgpack
    ts: int
    # The pair's session id if known (cache), else a fresh id to create it with.
    session_id: int | None
    new_session_id: int
    #: The sending device's t_device id (0 unknown): catch-up skips a device's own sends.
    sender_device: int = 0


@attrs.frozen
class Message:
    """A stored message."""

    msg_id: int
    session_id: int
    sender: int
    recipient: int
    cid: str
    type: str
    body: bytes  # msgpack
    ts: int
    status: int = RECORD_NORMAL
    #: When the body was last edited (ms), 0 never (issue 11).
    edited: int = 0


@attrs.frozen
class ConvRow:
    """
    One user's entry for one session: its place in the conversation list and
    the seed's unread pair (unread = total - read). C{version} increases with
    every change, so copies can refuse stale writes.
    """

    uid: int
    session_id: int
    peer: int
    last_msg_id: int
    total: int
    read: int
    version: int

    @property
    def unread(self) -> int:
        return self.total - self.read


@attrs.frozen
class ConvState:
    """
    What a send batch's commit left in its users' conversation rows: the
    rows it wrote, every user's unread total, and each user's stream head
    before and after. A transaction that changes a conversation row (or a
    user's unread total) takes the user's t_user lock and moves the user's
    stream head, so these values stay exact for as long as the head is
    still C{after}: the next batch that finds it so (its first statement
    checks) computes its rows from them instead of reading them back.
    """

    before: Mapping[int, int]
    after: Mapping[int, int]
    rows: Mapping[tuple[int, int], ConvRow]
    totals: Mapping[int, int]


@attrs.frozen
class Committed:
    """A message committed now, with everything its fan-out needs."""

    message: Message
    # The conversation rows of recipient and sender after this batch.
    recipient_row: ConvRow
    sender_row: ConvRow
    # Unread for the recipient as of this message (session, all sessions).
    unread: int
    total_unread: int
    # When its commit transaction began (reactor seconds): fan-out age.
    started: float = 0.0
    # The outbox row of the commit batch this message was in, and how many
    # committed messages that row covers.
    outbox_id: int = 0
    outbox_count: int = 0
    # The message's numbers in the sender's and the recipient's streams.
    sender_seq: int = 0
    recipient_seq: int = 0
    #: The batch's conversation state (one object shared by its messages),
    #: for the node's copy (L{ConvState}); not part of the message's value.
    state: ConvState | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class Duplicate:
    """The (sender, cid) was already used: the original message's ids."""

    msg_id: int
    session_id: int
    ts: int
    #: The original's send outbox row, if its fan-out never finished (its
    #: commit's outcome was unknown, say) and this transaction claimed it:
    #: the caller finishes it now (invalidate and push, as a replay does).
    #: On one duplicate of the row only.
    unfinished: Outbox | None = None
    #: The sender's stream seq of the original (0: stored before streams).
    seq: int = 0


@attrs.frozen
class Refused:
    code: str
    message: str


SendOutcome = Committed | Duplicate | Refused


@attrs.frozen
class ReadResult:
    row: ConvRow
    total_unread: int
    # The new read position if it moved (then the peer is told), else None.
    advanced_to: int | None
    # The read's numbers in the reader's and the peer's streams, if it moved.
    reader_seq: int | None = None
    peer_seq: int | None = None
    # The two block each other: the peer is not told (no event, no push).
    peer_blocked: bool = False


@attrs.frozen
class RecallResult:
    message: Message
    # The recipient's conversation row if the recall changed it.
    recipient_row: ConvRow | None
    was_pending: bool
    already: bool
    # The recall's numbers in the two streams; None for a repeated recall.
    sender_seq: int | None = None
    recipient_seq: int | None = None


@attrs.frozen
class Conversation:
    """One entry of a conversation list page."""

    session_id: int
    peer: int
    last_msg_id: int
    total: int
    read: int
    last: Message | None

    @property
    def unread(self) -> int:
        return self.total - self.read


@attrs.frozen
class Outbox:
    """
    The outbox row a transaction writes: what to redo if its hot-store
    follow-up never finishes (see docs/queues.md).
    """

    id: int
    node_id: int
    kind: str  # send, ack, read, recall
    users: tuple[int, ...] = ()
    sessions: tuple[int, ...] = ()
    msgs: tuple[int, ...] = ()
    created_at: int = 0

    def payload(self) -> bytes:
        return pack_body({"u": list(self.users), "s": list(self.sessions), "m": list(self.msgs)})

    @classmethod
    def from_row(cls, row: Any) -> Outbox:
        data = unpack_body(bytes(row[3]))
        return cls(
            id=int(row[0]),
            node_id=int(row[1]),
            kind=str(row[2]),
            users=tuple(data["u"]),
            sessions=tuple(data["s"]),
            msgs=tuple(data["m"]),
            created_at=int(row[4]),
        )


@attrs.frozen
class DueNotification:
    """A message whose offline notification is due."""

    message: Message
    attempts: int
    pending: bool
    #: The recipient muted the session (until after the claim): no webhook.
    muted: bool = False


@attrs.frozen
class DeadLetter:
    id: int
    kind: str
    ref: int
    payload: bytes
    error: str
    attempts: int
    created_at: int


@attrs.frozen
class UserSnapshot:
    """A user's hot state as SQL has it, for (re)building the hot copy."""

    uid: int
    pending: tuple[tuple[int, int], ...]  # (msg_id, sender)
    convs: tuple[ConvRow, ...]


@attrs.frozen
class DeviceRow:
    """One device of a user (t_device); times in ms, C{revoked_at} 0 = never."""

    id: int
    uid: int
    device: str
    client: str
    #: The stream position the device confirmed (ack seq, catch-up after).
    cursor: int
    created_at: int
    last_seen: int
    revoked_at: int


@attrs.frozen
class Login:
    profile: Profile
    device: DeviceRow
    #: The row was made by this login (a new device, or a forgotten one).
    created: bool
    #: The user's stream head as of the login.
    head: int


EVENT_READ = 1
EVENT_RECALL = 2
EVENT_EDIT = 3
EVENT_HIDE = 4
EVENT_CLEAR = 5
#: A mute of the user's own (issue 11): msgId holds the new muteUntil (ms, 0 = unmuted).
EVENT_MUTE = 6
EVENT_KINDS = {
    EVENT_READ: "read",
    EVENT_RECALL: "recall",
    EVENT_EDIT: "edit",
    EVENT_HIDE: "hide",
    EVENT_CLEAR: "clear",
    EVENT_MUTE: "mute",
}


@attrs.frozen
class StreamEvent:
    """One event of a user's stream, as catch-up returns it."""

    seq: int
    kind: str  # "msg" | "read" | "recall" | "edit" | "hide" | "clear"
    session_id: int
    #: msg: the message; read: the new read position; recall: the message.
    msg_id: int
    #: msg: the sender; read: the reader; recall: the sender.
    by: int
    message: Message | None = None  # kinds "msg" and "edit" (its current state)
    #: hide: the messages it hid.
    msg_ids: tuple[int, ...] = ()


@attrs.frozen
class CatchupPage:
    events: tuple[StreamEvent, ...]
    #: Where the next page starts: the last event's seq on a full page, else the head.
    seq: int
    more: bool
    head: int


@attrs.frozen
class Positions:
    """One user's positions in one session (t_conv): read, delivered, muted until (ms)."""

    read: int = 0
    delivered: int = 0
    mute_until: int = 0


@attrs.frozen
class MuteResult:
    """A mute's outcome: the value stored, and its seq in the caller's stream if it changed."""

    until: int
    seq: int | None = None
