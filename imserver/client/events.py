"""
The events a L{imserver.client.Client} emits: one frozen class per kind,
named as the pushes of docs/protocol.md, with the wire's field names (but
C{from_} for C{typing}'s C{from}, a Python keyword). C{replay} is true for
events that come from catch-up or sync rather than a live push.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs


@attrs.frozen
class Message:
    name: ClassVar[str] = "message"
    msg: dict[str, Any]
    unread: int | None = None
    total_unread: int | None = None
    seq: int | None = None
    replay: bool = False


@attrs.frozen
class Read:
    name: ClassVar[str] = "read"
    session_id: int
    by: int
    msg_id: int
    unread: int | None = None
    total_unread: int | None = None
    seq: int | None = None
    replay: bool = False


@attrs.frozen
class Recall:
    name: ClassVar[str] = "recall"
    msg_id: int
    session_id: int
    by: int
    seq: int | None = None
    replay: bool = False


@attrs.frozen
class Edit:
    name: ClassVar[str] = "edit"
    msg: dict[str, Any]
    seq: int | None = None
    replay: bool = False


@attrs.frozen
class Delivered:
    name: ClassVar[str] = "delivered"
    session_id: int
    msg_id: int
    by: int


@attrs.frozen
class Hide:
    name: ClassVar[str] = "hide"
    msg_ids: list[int]
    seq: int | None = None
    replay: bool = False


@attrs.frozen
class Clear:
    name: ClassVar[str] = "clear"
    session_id: int
    up_to: int
    seq: int | None = None
    replay: bool = False


@attrs.frozen
class Mute:
    name: ClassVar[str] = "mute"
    session_id: int
    until: int
    seq: int | None = None
    replay: bool = False


@attrs.frozen
class Typing:
    name: ClassVar[str] = "typing"
    from_: int
    active: bool


@attrs.frozen
class Presence:
    name: ClassVar[str] = "presence"
    uid: int
    online: bool
    last_seen: int


@attrs.frozen
class Profile:
    name: ClassVar[str] = "profile"
    user: dict[str, Any]
    presence: str | None = None


@attrs.frozen
class Block:
    name: ClassVar[str] = "block"
    uid: int
    blocked: bool


@attrs.frozen
class Kick:
    name: ClassVar[str] = "kick"
    reason: str


@attrs.frozen
class Reset:
    """The server forgot this device: drop local state, rebuild from convs/history."""

    name: ClassVar[str] = "reset"


@attrs.frozen
class StateChanged:
    name: ClassVar[str] = "state"
    state: str
    reason: str | None = None
    retry_in: float | None = None


@attrs.frozen
class Push:
    """Every push frame as it arrived, known or not (before any de-duplication)."""

    name: ClassVar[str] = "push"
    frame: dict[str, Any]


Event = (
    Message
    | Read
    | Recall
    | Edit
    | Delivered
    | Hide
    | Clear
    | Mute
    | Typing
    | Presence
    | Profile
    | Block
    | Kick
    | Reset
    | StateChanged
    | Push
)

#: The names C{Client.on} accepts.
NAMES = frozenset(
    cls.name
    for cls in (
        Message,
        Read,
        Recall,
        Edit,
        Delivered,
        Hide,
        Clear,
        Mute,
        Typing,
        Presence,
        Profile,
        Block,
        Kick,
        Reset,
        StateChanged,
        Push,
    )
)

_MSG_EXTRA = ("t", "id", "unread", "total_unread", "seq")


def msg_object(frame: Mapping[str, Any]) -> dict[str, Any]:
    """The msg object of a C{msg} or C{edit} frame (the envelope and counters left out)."""
    return {k: v for k, v in frame.items() if k not in _MSG_EXTRA}


def from_frame(frame: Mapping[str, Any], replay: bool = False) -> Event | None:
    """
    The event of a push (or catch-up event) frame, or None for one this SDK
    does not know (or a malformed one: the C{push} event still shows it).
    """
    t = frame.get("t")
    f = frame.get
    try:
        if t == "msg":
            return Message(msg_object(frame), f("unread"), f("total_unread"), f("seq"), replay)
        if t == "read":
            return Read(
                frame["session_id"],
                frame["by"],
                frame["msg_id"],
                f("unread"),
                f("total_unread"),
                f("seq"),
                replay,
            )
        if t == "recall":
            return Recall(frame["msg_id"], frame["session_id"], frame["by"], f("seq"), replay)
        if t == "edit":
            return Edit(msg_object(frame), f("seq"), replay)
        if t == "delivered":
            return Delivered(frame["session_id"], frame["msg_id"], frame["by"])
        if t == "hide":
            return Hide(list(frame["msg_ids"]), f("seq"), replay)
        if t == "clear":
            return Clear(frame["session_id"], frame["up_to"], f("seq"), replay)
        if t == "mute":
            return Mute(frame["session_id"], frame["until"], f("seq"), replay)
        if t == "typing":
            return Typing(frame["from"], frame["active"])
        if t == "presence":
            return Presence(frame["uid"], frame["online"], frame["last_seen"])
        if t == "profile":
            return Profile(dict(frame["user"]), f("presence"))
        if t == "block":
            return Block(frame["uid"], frame["blocked"])
        if t == "kick":
            return Kick(str(f("reason", "")))
    except (KeyError, TypeError):
        return None
    return None
