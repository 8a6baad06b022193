"""
Frame schemas of wire protocol v1.

A request frame is C{{"t": OP, "id": INT, ...fields}}. L{parse_request} checks
the envelope and hands the frame to the schema class registered for OP, whose
C{parse} validates the fields and returns a frozen, typed request object or
raises L{ImError} (C{invalid} for missing or mistyped fields, C{too_large} for
oversize values).

Replies and pushes are plain dicts built by L{ok}, L{error} and L{push}.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import attrs

from imserver.errors import ErrorCode, ImError
from imserver.wire.codec import Frame

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
#: Characters of a client's value an error message repeats, at most.
MAX_ECHO = 32

# ---------------------------------------------------------------------------
# Field extractors: each reads one key of a frame and raises ImError naming it.


def _invalid(message: str) -> ImError:
    return ImError(ErrorCode.INVALID, message)


def _is_int(value: object) -> bool:
    return type(value) is int


def req_int(frame: Frame, key: str, *, minimum: int = 1, maximum: int = INT64_MAX) -> int:
    """A required integer (not a bool) in [minimum, maximum]."""
    if key not in frame:
        raise _invalid(f"missing field {key!r}")
    return _check_int(frame[key], key, minimum, maximum)


def opt_int(
    frame: Frame,
    key: str,
    default: int | None,
    *,
    minimum: int = 1,
    maximum: int = INT64_MAX,
) -> int | None:
    """An optional integer; C{nil} or absence gives C{default}."""
    value = frame.get(key)
    if value is None:
        return default
    return _check_int(value, key, minimum, maximum)


def _check_int(value: object, key: str, minimum: int, maximum: int) -> int:
    if not _is_int(value):
        raise _invalid(f"field {key!r} must be an integer")
    assert isinstance(value, int)
    if value < minimum:
        raise _invalid(f"field {key!r} must be >= {minimum}")
    if value > maximum:
        raise ImError(ErrorCode.TOO_LARGE, f"field {key!r} must be <= {maximum}")
    return value


def opt_limit(frame: Frame, key: str, default: int, maximum: int) -> int:
    """A page size: 1..maximum, default when absent; above maximum is C{too_large}."""
    value = opt_int(frame, key, default, minimum=1, maximum=maximum)
    assert value is not None
    return value


def req_str(frame: Frame, key: str, *, max_len: int, min_len: int = 1) -> str:
    """A required string of min_len..max_len characters."""
    if key not in frame:
        raise _invalid(f"missing field {key!r}")
    return _check_str(frame[key], key, min_len, max_len)


def opt_str(frame: Frame, key: str, *, max_len: int, min_len: int = 0) -> str | None:
    """An optional string; C{nil} or absence gives None."""
    value = frame.get(key)
    if value is None:
        return None
    return _check_str(value, key, min_len, max_len)


def _check_str(value: object, key: str, min_len: int, max_len: int) -> str:
    if type(value) is not str:
        raise _invalid(f"field {key!r} must be a string")
    assert isinstance(value, str)
    if len(value) < min_len:
        raise _invalid(f"field {key!r} must have at least {min_len} characters")
    if len(value) > max_len:
        raise ImError(ErrorCode.TOO_LARGE, f"field {key!r} must have at most {max_len} characters")
    return value


def req_int_list(frame: Frame, key: str, *, max_items: int, minimum: int = 1) -> tuple[int, ...]:
    """A required non-empty list of integers, at most max_items long."""
    value = frame.get(key)
    if type(value) is not list:
        raise _invalid(f"field {key!r} must be a list of integers")
    assert isinstance(value, list)
    if not value:
        raise _invalid(f"field {key!r} must not be empty")
    if len(value) > max_items:
        raise ImError(ErrorCode.TOO_LARGE, f"field {key!r} holds at most {max_items} items")
    return tuple(_check_int(item, key, minimum, INT64_MAX) for item in value)


_JSON_SCALARS = (str, int, float, bool, type(None))


def check_plain(value: object, key: str, depth: int = 0) -> None:
    """
    Check that C{value} is plain data: nil, bool, int64, float, str, lists and
    maps with string keys, nested at most 16 deep (what JSON can also carry).
    """
    if depth > 16:
        raise _invalid(f"field {key!r} is nested too deeply")
    kind = type(value)
    if kind is dict:
        assert isinstance(value, dict)
        for k, v in value.items():
            if type(k) is not str:
                raise _invalid(f"field {key!r}: map keys must be strings")
            check_plain(v, key, depth + 1)
    elif kind is list:
        assert isinstance(value, list)
        for v in value:
            check_plain(v, key, depth + 1)
    elif kind is int:
        assert isinstance(value, int)
        if not INT64_MIN <= value <= INT64_MAX:
            raise _invalid(f"field {key!r}: integer out of int64 range")
    elif kind not in _JSON_SCALARS:
        raise _invalid(f"field {key!r}: values of type {kind.__name__} are not allowed")


# ---------------------------------------------------------------------------
# Requests

#: The device of a client that names none (every client of protocol v1 before devices).
DEFAULT_DEVICE = "default"
#: Characters of a device name, at most.
MAX_DEVICE = 64
#: What protocol v1 accepted in auth's device before devices had a meaning.
V1_MAX_DEVICE = 128


def device_name(given: str | None) -> str:
    """
    The device an auth names: absent or empty (as v1 allowed) is
    L{DEFAULT_DEVICE}; a name over L{MAX_DEVICE} characters (v1 allowed
    128) becomes a stable one of L{MAX_DEVICE}: its start and a digest of
    the whole, so two long names stay two devices.
    """
    if not given:
        return DEFAULT_DEVICE
    if len(given) <= MAX_DEVICE:
        return given
    digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{given[: MAX_DEVICE - 17]}~{digest}"


@attrs.frozen
class Request:
    """Base of all typed requests; C{op} is the frame's C{t}."""

    op: ClassVar[str] = ""
    id: int

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Request:
        return cls(id=req_id)


R = TypeVar("R", bound=type[Request])

REQUESTS: dict[str, type[Request]] = {}


def request(cls: R) -> R:
    """Class decorator: register a schema under its op name."""
    if cls.op in REQUESTS:
        raise ValueError(f"duplicate op {cls.op!r}")
    REQUESTS[cls.op] = cls
    return cls


@request
@attrs.frozen
class Auth(Request):
    op: ClassVar[str] = "auth"
    token: str
    #: The app install (1..64 characters); absent: L{DEFAULT_DEVICE}, so every
    #: client that predates devices is one device of its user.
    device: str = DEFAULT_DEVICE
    client: str | None = None
    #: The stream position the client's local state is complete up to: the
    #: connection starts in catch-up mode (docs/protocol.md, "Devices").
    since: int | None = None

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Auth:
        # Protocol v1 took any device string of up to 128 characters: those
        # clients keep working (see device_name).
        device = opt_str(frame, "device", max_len=V1_MAX_DEVICE)
        return cls(
            id=req_id,
            token=req_str(frame, "token", max_len=4096),
            device=device_name(device),
            client=opt_str(frame, "client", max_len=128),
            since=opt_int(frame, "since", None, minimum=0),
        )


@request
@attrs.frozen
class Ping(Request):
    op: ClassVar[str] = "ping"


def request_id(frame: Frame) -> int | None:
    """The frame's C{id} if it is a valid int64, else None."""
    value = frame.get("id")
    if type(value) is int and INT64_MIN <= value <= INT64_MAX:
        assert isinstance(value, int)
        return value
    return None


def parse_request(frame: Frame, known: Mapping[str, type[Request]] = REQUESTS) -> Request:
    """
    Validate the envelope and the fields of a request frame.

    @param known: the ops to accept; any other C{t} is C{unknown_op}.
    @raise ImError: C{invalid} (bad envelope or fields), C{unknown_op},
        C{too_large}.
    """
    op = frame.get("t")
    if type(op) is not str:
        raise _invalid("field 't' must be the op name")
    req_id = request_id(frame)
    if req_id is None:
        raise _invalid("field 'id' must be an int64")
    schema = known.get(op)
    if schema is None:
        # The op is the client's: echo only its start (its repr can take
        # four bytes per byte received, and the error must fit in a frame).
        shown = repr(op) if len(op) <= MAX_ECHO else f"{op[:MAX_ECHO]!r}... ({len(op)} characters)"
        raise ImError(ErrorCode.UNKNOWN_OP, f"unknown op {shown}")
    return schema.parse(req_id, frame)


# ---------------------------------------------------------------------------
# Replies and pushes


def ok(req_id: int, result: Mapping[str, Any] | None = None) -> Frame:
    """A success reply; the result's fields sit beside C{t} and C{id}."""
    frame: Frame = {"t": "ok", "id": req_id}
    if result:
        frame.update(result)
    return frame


def error(code: ErrorCode, message: str, req_id: int | None = None) -> Frame:
    """An error reply; C{id} is omitted when the request had none."""
    frame: Frame = {"t": "error", "code": str(code), "message": message}
    if req_id is not None:
        frame["id"] = req_id
    return frame


def push(event: str, **fields: Any) -> Frame:
    """A server push: C{{"t": event, ...}}, never with an C{id}."""
    frame: Frame = {"t": event}
    frame.update(fields)
    return frame


# ---------------------------------------------------------------------------
# Messaging requests (docs/protocol.md, "Messaging")

MAX_ACK = 500
MAX_PROFILE_UIDS = 100


@request
@attrs.frozen
class Send(Request):
    op: ClassVar[str] = "send"
    to: int
    cid: str
    type: str
    body: str | dict[str, Any]

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Send:
        if "body" not in frame:
            raise _invalid("missing field 'body'")
        body = frame["body"]
        if type(body) is not str and type(body) is not dict:
            raise _invalid("field 'body' must be a string or a map")
        check_plain(body, "body")
        kind = opt_str(frame, "type", max_len=32, min_len=1)
        return cls(
            id=req_id,
            to=req_int(frame, "to"),
            cid=req_str(frame, "cid", max_len=64),
            type="text" if kind is None else kind,
            body=body,
        )


@request
@attrs.frozen
class Ack(Request):
    op: ClassVar[str] = "ack"
    msg_ids: tuple[int, ...]
    #: This device has every event of its user's stream up to here (devices).
    seq: int | None = None

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Ack:
        seq = opt_int(frame, "seq", None, minimum=0)
        if seq is not None and frame.get("msg_ids") is None:
            return cls(id=req_id, msg_ids=(), seq=seq)
        return cls(id=req_id, msg_ids=req_int_list(frame, "msg_ids", max_items=MAX_ACK), seq=seq)


@request
@attrs.frozen
class Sync(Request):
    op: ClassVar[str] = "sync"
    limit: int
    after: int
    sender: int | None

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Sync:
        after = opt_int(frame, "after", 0, minimum=0)
        assert after is not None
        return cls(
            id=req_id,
            limit=opt_limit(frame, "limit", 100, 500),
            after=after,
            sender=opt_int(frame, "from", None),
        )


@request
@attrs.frozen
class OfflineSummary(Request):
    op: ClassVar[str] = "offline_summary"


@request
@attrs.frozen
class Read(Request):
    op: ClassVar[str] = "read"
    session_id: int
    msg_id: int

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Read:
        return cls(
            id=req_id, session_id=req_int(frame, "session_id"), msg_id=req_int(frame, "msg_id")
        )


@request
@attrs.frozen
class Unread(Request):
    op: ClassVar[str] = "unread"


@request
@attrs.frozen
class Convs(Request):
    op: ClassVar[str] = "convs"
    limit: int
    before: int | None

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Convs:
        return cls(
            id=req_id,
            limit=opt_limit(frame, "limit", 20, 100),
            before=opt_int(frame, "before", None),
        )


@request
@attrs.frozen
class History(Request):
    op: ClassVar[str] = "history"
    peer: int | None
    session_id: int | None
    before: int | None
    limit: int

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> History:
        peer = opt_int(frame, "peer", None)
        session_id = opt_int(frame, "session_id", None)
        if (peer is None) == (session_id is None):
            raise _invalid("give exactly one of 'peer' and 'session_id'")
        return cls(
            id=req_id,
            peer=peer,
            session_id=session_id,
            before=opt_int(frame, "before", None),
            limit=opt_limit(frame, "limit", 20, 100),
        )


@request
@attrs.frozen
class Recall(Request):
    op: ClassVar[str] = "recall"
    msg_id: int

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Recall:
        return cls(id=req_id, msg_id=req_int(frame, "msg_id"))


@request
@attrs.frozen
class GetProfile(Request):
    op: ClassVar[str] = "profile"
    uids: tuple[int, ...]

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> GetProfile:
        return cls(id=req_id, uids=req_int_list(frame, "uids", max_items=MAX_PROFILE_UIDS))


@request
@attrs.frozen
class SetProfile(Request):
    op: ClassVar[str] = "set_profile"
    nickname: str | None
    avatar: str | None
    #: Who sees one's presence (docs/protocol.md, "Presence and typing").
    presence: str | None = None

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> SetProfile:
        nickname = opt_str(frame, "nickname", max_len=64)
        avatar = opt_str(frame, "avatar", max_len=512)
        presence = opt_str(frame, "presence", max_len=16)
        if presence is not None and presence not in PRESENCE_SHARES:
            raise _invalid("field 'presence' must be 'everyone', 'contacts' or 'nobody'")
        if nickname is None and avatar is None and presence is None:
            raise _invalid("give 'nickname', 'avatar', 'presence' or several")
        return cls(id=req_id, nickname=nickname, avatar=avatar, presence=presence)


# ---------------------------------------------------------------------------
# Devices (docs/protocol.md, "Devices")

MAX_CATCHUP = 500


@request
@attrs.frozen
class Catchup(Request):
    op: ClassVar[str] = "catchup"
    after: int | None
    limit: int

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Catchup:
        return cls(
            id=req_id,
            after=opt_int(frame, "after", None, minimum=0),
            limit=opt_limit(frame, "limit", 100, MAX_CATCHUP),
        )


@request
@attrs.frozen
class Devices(Request):
    op: ClassVar[str] = "devices"


@request
@attrs.frozen
class LogoutDevice(Request):
    op: ClassVar[str] = "logout_device"
    device: str

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> LogoutDevice:
        return cls(id=req_id, device=req_str(frame, "device", max_len=MAX_DEVICE))


# ---------------------------------------------------------------------------
# Presence and typing (docs/protocol.md, "Presence and typing")

MAX_PRESENCE_UIDS = 100
MAX_WATCH = 500
PRESENCE_SHARES = ("everyone", "contacts", "nobody")


@request
@attrs.frozen
class GetPresence(Request):
    op: ClassVar[str] = "presence"
    uids: tuple[int, ...]

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> GetPresence:
        return cls(id=req_id, uids=req_int_list(frame, "uids", max_items=MAX_PRESENCE_UIDS))


@request
@attrs.frozen
class Watch(Request):
    op: ClassVar[str] = "watch"
    #: Replaces the connection's watched set; empty: watch nobody.
    uids: tuple[int, ...]

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Watch:
        if frame.get("uids") == []:
            return cls(id=req_id, uids=())
        return cls(id=req_id, uids=req_int_list(frame, "uids", max_items=MAX_WATCH))


@request
@attrs.frozen
class Typing(Request):
    op: ClassVar[str] = "typing"
    to: int
    active: bool

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Typing:
        active = frame.get("active")
        if type(active) is not bool:
            raise _invalid("field 'active' must be a bool")
        assert isinstance(active, bool)
        return cls(id=req_id, to=req_int(frame, "to"), active=active)


# ---------------------------------------------------------------------------
# Receipts and mute (docs/protocol.md, "Receipts", "Mute")


@request
@attrs.frozen
class Mute(Request):
    op: ClassVar[str] = "mute"
    session_id: int
    #: ms since epoch; 0 (or a time already past) unmutes.
    until: int

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Mute:
        return cls(
            id=req_id,
            session_id=req_int(frame, "session_id"),
            until=req_int(frame, "until", minimum=0),
        )


# ---------------------------------------------------------------------------
# Blocks (docs/protocol.md, "Blocking")

#: Uids a C{blocked} page holds, at most.
MAX_BLOCKED = 500


@request
@attrs.frozen
class Block(Request):
    op: ClassVar[str] = "block"
    uid: int

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Block:
        return cls(id=req_id, uid=req_int(frame, "uid"))


@request
@attrs.frozen
class Unblock(Request):
    op: ClassVar[str] = "unblock"
    uid: int

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Unblock:
        return cls(id=req_id, uid=req_int(frame, "uid"))


@request
@attrs.frozen
class Blocked(Request):
    op: ClassVar[str] = "blocked"
    #: The last uid of the previous page (0: from the start).
    after: int
    limit: int

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Blocked:
        return cls(
            id=req_id,
            after=opt_int(frame, "after", 0, minimum=0) or 0,
            limit=opt_limit(frame, "limit", 100, MAX_BLOCKED),
        )


# ---------------------------------------------------------------------------
# Edit, hide, clear (docs/protocol.md, "Editing and hiding")

#: Messages per hide request.
MAX_HIDE = 100


@request
@attrs.frozen
class Edit(Request):
    op: ClassVar[str] = "edit"
    msg_id: int
    body: str | dict[str, Any]

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Edit:
        if "body" not in frame:
            raise _invalid("missing field 'body'")
        body = frame["body"]
        if type(body) is not str and type(body) is not dict:
            raise _invalid("field 'body' must be a string or a map")
        check_plain(body, "body")
        return cls(id=req_id, msg_id=req_int(frame, "msg_id"), body=body)


@request
@attrs.frozen
class Hide(Request):
    op: ClassVar[str] = "hide"
    msg_ids: tuple[int, ...]

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Hide:
        return cls(id=req_id, msg_ids=req_int_list(frame, "msg_ids", max_items=MAX_HIDE))


@request
@attrs.frozen
class Clear(Request):
    op: ClassVar[str] = "clear"
    session_id: int

    @classmethod
    def parse(cls, req_id: int, frame: Frame) -> Clear:
        return cls(id=req_id, session_id=req_int(frame, "session_id"))
