"""
Generate the protocol test vectors in docs/vectors/ (see README.md there).

    python docs/vectors/generate.py           # rewrite the JSON files
    python docs/vectors/generate.py --check   # exit 1 if a file differs

The vectors are written here by hand, in the shapes (and key order) a real
server sends: tests/test_vectors.py checks the committed files are this
script's output, that the server decodes and answers them as they say, and
that a real server's replies have the same shapes. The script needs only
the standard library and msgpack, so an SDK author can run it anywhere; its
output depends on nothing but this file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgpack

HERE = Path(__file__).resolve().parent
FORMAT = 1
#: Integers JSON (and JavaScript's Number) carry exactly; beyond, {"$int": "..."}.
SAFE_INT = 2**53 - 1
#: The server setting the length vectors are written against (its default).
MAX_FRAME_BYTES = 65536

# ---------------------------------------------------------------------------
# The world the vectors describe: alice (42) is the connected user, bob (7)
# her peer, carol (9) someone she blocks; ids in the server's shapes.

#: The tokens are HS256 JWTs signed with this secret.
SECRET = "imserver-test-vectors-secret"
ALICE, BOB, CAROL = 42, 7, 9
#: A uid beyond 2**53: uids are any positive int64.
BIG_UID = 2**53 + 1
SESSION = 493692073500681
OTHER_SESSION = 493692073520137
M0, M1, M2, M3 = 493692073500680, 493692073504776, 493692073508872, 493692073512968
TS = 1764400000000
ALICE_PROFILE = {"nickname": "alice", "avatar": "https://example.com/a.png"}
BOB_PROFILE = {"nickname": "bob", "avatar": ""}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwt(claims: Mapping[str, Any]) -> str:
    """An HS256 JWT, built by hand so that the bytes never depend on a library."""

    def part(obj: Mapping[str, Any]) -> str:
        return b64url(json.dumps(obj, separators=(",", ":")).encode())

    signing = part({"alg": "HS256", "typ": "JWT"}) + "." + part(claims)
    mac = hmac.new(SECRET.encode(), signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64url(mac)


TOKEN = jwt({"sub": str(ALICE), "iat": 1764400000, "exp": 4102444800})


def msg(
    msg_id: int,
    frm: int,
    to: int,
    cid: str,
    body: Any,
    ts: int,
    *,
    kind: str = "text",
    edited: int | None = None,
) -> dict[str, Any]:
    """The msg object (docs/protocol.md, "The msg object"), in the server's key order."""
    obj: dict[str, Any] = {
        "msg_id": msg_id,
        "session_id": SESSION,
        "from": frm,
        "to": to,
        "cid": cid,
        "type": kind,
        "body": body,
        "ts": ts,
        "sender": ALICE_PROFILE if frm == ALICE else BOB_PROFILE,
    }
    if edited is not None:
        obj["edited"] = edited
    return obj


FROM_BOB = msg(M1, BOB, ALICE, "b-19", "are you there?", TS + 4)
FROM_BOB_CARD = msg(
    M2,
    BOB,
    ALICE,
    "b-20",
    {"title": "Lunch?", "lat": 52.52, "tags": ["a", "b"]},
    TS + 8,
    kind="card",
)
FROM_ALICE = msg(M0, ALICE, BOB, "c-7f3a", "hello", TS)
EDITED = msg(M0, ALICE, BOB, "c-7f3a", "hello, world", TS, edited=TS + 60_000)

# ---------------------------------------------------------------------------
# Requests: the client's frames, encoded the canonical way (exact bytes).
# (name, op, fields, description); ids are given in file order: 1, 2, 3, ...

REQUESTS: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "auth",
        "auth",
        {"token": TOKEN, "device": "iphone-15", "client": "app/2.3", "since": 120},
        "every field of auth: a device that has its stream up to seq 120",
    ),
    ("auth/minimal", "auth", {"token": TOKEN}, 'the token alone: the device "default"'),
    ("ping", "ping", {}, "the heartbeat"),
    (
        "send",
        "send",
        {"to": BOB, "cid": "c-7f3a", "type": "text", "body": "hello"},
        "a text message",
    ),
    (
        "send/map-body",
        "send",
        {
            "to": BOB,
            "cid": "c-7f3b",
            "type": "card",
            "body": {
                "title": "Lunch?",
                "lat": 52.52,
                "seats": 300,
                "tags": ["a", "b"],
                "ok": True,
                "note": None,
            },
        },
        "a map body: plain data (float64, uint16, array, bool, nil); type is free for the app",
    ),
    (
        "send/long-body",
        "send",
        {"to": BOB, "cid": "c-7f3c", "body": "x" * 40 + "é" * 130},
        'no type ("text"); a body of 300 UTF-8 bytes (str16); non-ASCII',
    ),
    ("ack", "ack", {"msg_ids": [M1, M2]}, "ack pending messages"),
    ("ack/seq", "ack", {"seq": 131}, "confirm the stream position (devices)"),
    ("sync", "sync", {"limit": 100, "after": M1, "from": BOB}, "a page of pending messages"),
    ("sync/minimal", "sync", {}, "the first page, default limit"),
    ("offline_summary", "offline_summary", {}, ""),
    ("read", "read", {"session_id": SESSION, "msg_id": M2}, "read up to M2"),
    ("unread", "unread", {}, ""),
    ("convs", "convs", {"limit": 20, "before": M3}, "the next page of conversations"),
    ("history", "history", {"peer": BOB, "before": M3, "limit": 20}, "history by peer"),
    ("history/session", "history", {"session_id": SESSION}, "history by session"),
    ("recall", "recall", {"msg_id": M0}, ""),
    ("profile", "profile", {"uids": [ALICE, BOB, BIG_UID]}, "a uid beyond 2**53"),
    (
        "set_profile",
        "set_profile",
        {"nickname": "alice", "avatar": "https://example.com/a.png", "presence": "contacts"},
        "",
    ),
    ("catchup", "catchup", {"after": 120, "limit": 100}, "a page of the stream after seq 120"),
    ("devices", "devices", {}, ""),
    ("logout_device", "logout_device", {"device": "ipad"}, ""),
    ("block", "block", {"uid": CAROL}, ""),
    ("unblock", "unblock", {"uid": CAROL}, ""),
    ("blocked", "blocked", {"after": 0, "limit": 100}, ""),
    ("mute", "mute", {"session_id": SESSION, "until": 4102444800000}, "mute until 2100"),
    ("mute/off", "mute", {"session_id": SESSION, "until": 0}, "unmute"),
    ("edit", "edit", {"msg_id": M0, "body": "hello, world"}, ""),
    ("hide", "hide", {"msg_ids": [M1]}, ""),
    ("clear", "clear", {"session_id": SESSION}, ""),
    ("presence", "presence", {"uids": [BOB, CAROL]}, ""),
    ("watch", "watch", {"uids": [BOB]}, ""),
    ("watch/nobody", "watch", {"uids": []}, "watch nobody"),
    ("typing", "typing", {"to": BOB, "active": True}, ""),
]

#: Requests whose id is no counter's: the int64 encodings.
ODD_IDS: list[tuple[str, int, str]] = [
    ("ping/id-uint8", 200, "an id of 128..255: uint8 (0xcc)"),
    ("ping/id-uint32", 70000, "uint32 (0xce)"),
    ("ping/id-big", 2**62, 'above 2**53: uint64 (0xcf), {"$int"} in JSON'),
    ("ping/id-max", 2**63 - 1, "the largest int64"),
    ("ping/id-negative", -5, "ids are int64: negative fixint (0xfb)"),
    ("ping/id-int16", -200, "int16 (0xd1)"),
    ("ping/id-min", -(2**63), "the smallest int64: int64 (0xd3)"),
]


def requests() -> dict[str, dict[str, Any]]:
    frames: dict[str, dict[str, Any]] = {}
    for i, (name, op, fields, _) in enumerate(REQUESTS, 1):
        frames[name] = {"t": op, "id": i, **fields}
    for name, req_id, _ in ODD_IDS:
        frames[name] = {"t": "ping", "id": req_id}
    return frames


REQUEST_FRAMES = requests()

# ---------------------------------------------------------------------------
# Replies: (name, request name, result fields, description); decode only.

CATCHUP_EVENTS = [
    {**FROM_BOB, "t": "msg", "seq": 121},
    {**FROM_BOB_CARD, "t": "msg", "seq": 122},
    {"t": "read", "session_id": SESSION, "by": BOB, "msg_id": M0, "seq": 123},
    {"t": "recall", "msg_id": M3, "session_id": SESSION, "by": BOB, "seq": 124},
    {"t": "mute", "session_id": SESSION, "until": 4102444800000, "seq": 125},
    {**EDITED, "t": "edit", "seq": 126},
    {"t": "hide", "msg_ids": [M1], "seq": 127},
    {"t": "clear", "session_id": SESSION, "up_to": M2, "seq": 128},
]

OK_REPLIES: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "ok/auth",
        "auth",
        {
            "uid": ALICE,
            "heartbeat": 30.0,
            "server_time": TS,
            "device": "iphone-15",
            "seq": 120,
            "head": 131,
            "new_device": False,
        },
        "heartbeat is a float (seconds); seq: where catch-up starts, head: the stream's end",
    ),
    (
        "ok/auth/new-device",
        "auth/minimal",
        {
            "uid": ALICE,
            "heartbeat": 30.0,
            "server_time": TS,
            "device": "default",
            "seq": 131,
            "head": 131,
            "new_device": True,
        },
        "a device's first login starts at the head",
    ),
    (
        "ok/auth/reset",
        "auth",
        {
            "uid": ALICE,
            "heartbeat": 30.0,
            "server_time": TS,
            "device": "iphone-15",
            "seq": 131,
            "head": 131,
            "new_device": True,
            "reset": True,
        },
        "the device was forgotten: drop the local copy, rebuild from convs and history",
    ),
    ("ok/ping", "ping", {"server_time": TS + 123}, ""),
    (
        "ok/send",
        "send",
        {"msg_id": M0, "session_id": SESSION, "ts": TS, "dup": False, "seq": 132},
        "",
    ),
    (
        "ok/send/dup",
        "send",
        {"msg_id": M0, "session_id": SESSION, "ts": TS, "dup": True, "seq": 132},
        "a retry with the same cid: the original's ids",
    ),
    ("ok/ack", "ack", {}, "no result fields"),
    ("ok/ack/seq", "ack/seq", {}, ""),
    (
        "ok/sync",
        "sync",
        {"msgs": [FROM_BOB, FROM_BOB_CARD], "more": False},
        "pending messages, oldest first (the body map has a float)",
    ),
    (
        "ok/sync/skipped",
        "sync/minimal",
        {"msgs": [], "more": True, "after": M2},
        "only unreadable pending entries that far: ask again with after",
    ),
    (
        "ok/offline_summary",
        "offline_summary",
        {"senders": [{"uid": BOB, "count": 2, "last_msg_id": M2}]},
        "",
    ),
    ("ok/read", "read", {"unread": 0, "total_unread": 3, "seq": 133}, ""),
    (
        "ok/read/unmoved",
        "read",
        {"unread": 0, "total_unread": 3},
        "the position did not move: no seq",
    ),
    (
        "ok/unread",
        "unread",
        {
            "total": 5,
            "sessions": [
                {"session_id": SESSION, "count": 2},
                {"session_id": OTHER_SESSION, "count": 3},
            ],
        },
        "",
    ),
    (
        "ok/unread/cut",
        "unread",
        {"total": 5, "sessions": [{"session_id": SESSION, "count": 2}], "more": True},
        "the list was cut to fit a frame; total still counts all",
    ),
    (
        "ok/convs",
        "convs",
        {
            "convs": [
                {
                    "session_id": SESSION,
                    "peer": {"uid": BOB, **BOB_PROFILE},
                    "last": FROM_BOB_CARD,
                    "last_msg_id": M2,
                    "unread": 2,
                    "peer_read": M0,
                    "peer_delivered": M0,
                    "muted_until": 0,
                },
                {
                    "session_id": OTHER_SESSION,
                    "peer": {"uid": CAROL, "nickname": "", "avatar": ""},
                    "last": None,
                    "last_msg_id": M3,
                    "unread": 0,
                    "peer_read": 0,
                    "peer_delivered": 0,
                    "muted_until": 4102444800000,
                },
            ],
            "more": False,
        },
        "last is null when every message is recalled or cleared",
    ),
    (
        "ok/history",
        "history",
        {
            "msgs": [FROM_BOB_CARD, FROM_BOB, EDITED],
            "more": True,
            "peer_read": M0,
            "peer_delivered": M0,
        },
        "newest first; an edited message carries edited",
    ),
    ("ok/recall", "recall", {"seq": 134}, ""),
    ("ok/recall/again", "recall", {}, "recalled before: no seq"),
    (
        "ok/profile",
        "profile",
        {
            "users": [
                {"uid": ALICE, **ALICE_PROFILE},
                {"uid": BOB, **BOB_PROFILE},
                {"uid": BIG_UID, "nickname": "big", "avatar": ""},
            ]
        },
        "a uid beyond 2**53",
    ),
    (
        "ok/set_profile",
        "set_profile",
        {"user": {"uid": ALICE, **ALICE_PROFILE}, "presence": "contacts"},
        "",
    ),
    (
        "ok/catchup",
        "catchup",
        {"events": CATCHUP_EVENTS, "seq": 128, "more": False},
        "one event of each kind, in seq order (events have the shapes of the pushes)",
    ),
    (
        "ok/catchup/more",
        "catchup",
        {"events": [], "seq": 140, "more": True},
        "the page stepped over the device's own sends: ask again",
    ),
    (
        "ok/devices",
        "devices",
        {
            "devices": [
                {
                    "device": "iphone-15",
                    "client": "app/2.3",
                    "online": True,
                    "node": "1",
                    "since": TS - 5000,
                    "last_seen": TS - 5000,
                },
                {
                    "device": "ipad",
                    "client": "",
                    "online": False,
                    "node": None,
                    "since": None,
                    "last_seen": TS - 86_400_000,
                },
            ]
        },
        "node and since are null when offline",
    ),
    ("ok/logout_device", "logout_device", {"kicked": True}, ""),
    ("ok/block", "block", {}, ""),
    ("ok/unblock", "unblock", {}, ""),
    ("ok/blocked", "blocked", {"uids": [CAROL], "more": False}, ""),
    ("ok/mute", "mute", {"muted_until": 4102444800000, "seq": 135}, ""),
    ("ok/mute/off", "mute/off", {"muted_until": 0, "seq": 136}, ""),
    ("ok/edit", "edit", {"edited": TS + 60_000, "seq": 137}, ""),
    ("ok/edit/again", "edit", {"edited": TS + 60_000}, "the same body again: no seq"),
    ("ok/hide", "hide", {"seq": 138}, ""),
    ("ok/clear", "clear", {"up_to": M2, "seq": 139}, ""),
    ("ok/clear/empty", "clear", {"up_to": 0}, "a conversation with no message yet"),
    (
        "ok/presence",
        "presence",
        {
            "users": [
                {"uid": BOB, "online": True, "last_seen": TS - 5000},
                {"uid": CAROL, "online": False, "last_seen": 0},
            ]
        },
        "last_seen 0: never seen (or not visible to the caller)",
    ),
    ("ok/watch", "watch", {"users": [{"uid": BOB, "online": False, "last_seen": TS - 60_000}]}, ""),
    ("ok/watch/nobody", "watch/nobody", {"users": []}, ""),
    ("ok/typing", "typing", {}, ""),
] + [(f"ok/{name}", name, {"server_time": TS}, "") for name, _, _ in ODD_IDS]

#: (name, request name, code, message, description): errors that answer a request.
ERROR_REPLIES: list[tuple[str, str, str, str, str]] = [
    (
        "error/unauthenticated",
        "ping",
        "unauthenticated",
        "auth must come first",
        "a request before auth; the server closes",
    ),
    ("error/auth_failed", "auth", "auth_failed", "token expired", "the server closes"),
    ("error/unknown_op", "malformed/unknown-op", "unknown_op", "unknown op 'teleport'", ""),
    ("error/invalid", "malformed/send-to-string", "invalid", "field 'to' must be an integer", ""),
    ("error/no_such_user", "send", "no_such_user", "user 7 does not exist", ""),
    ("error/forbidden", "send", "forbidden", "messages between you and this user are blocked", ""),
    ("error/not_found", "recall", "not_found", "no such message", ""),
    (
        "error/content_blocked",
        "send",
        "content_blocked",
        "the message contains blocked content",
        "",
    ),
    (
        "error/rate_limited",
        "send",
        "rate_limited",
        "too many messages; slow down",
        "retry later with the same cid",
    ),
    (
        "error/too_large",
        "malformed/sync-limit-too-large",
        "too_large",
        "field 'limit' must be <= 500",
        "",
    ),
    ("error/too_late", "recall", "too_late", "messages can be recalled for 120s", ""),
    (
        "error/unavailable",
        "send",
        "unavailable",
        "the service is temporarily unavailable",
        "retry later with the same cid",
    ),
    ("error/internal", "history", "internal", "internal server error", ""),
]

# ---------------------------------------------------------------------------
# Pushes: (name, frame, description); never with an id; decode only.

PUSHES: list[tuple[str, dict[str, Any], str]] = [
    (
        "msg",
        {**FROM_BOB, "t": "msg", "unread": 1, "total_unread": 3, "seq": 121},
        "to the recipient: its unread counts in the session and in all",
    ),
    (
        "msg/own-device",
        {**FROM_ALICE, "t": "msg", "seq": 132},
        "to the sender's other devices: no unread counts",
    ),
    (
        "msg/replayed",
        {**FROM_BOB_CARD, "t": "msg", "unread": 2, "total_unread": 4},
        "replayed after a server crash: no seq (dedupe by msg_id)",
    ),
    (
        "read",
        {"t": "read", "session_id": SESSION, "by": BOB, "msg_id": M0, "seq": 122},
        "the peer read up to msg_id",
    ),
    (
        "read/own-device",
        {
            "t": "read",
            "session_id": SESSION,
            "by": ALICE,
            "msg_id": M2,
            "unread": 0,
            "total_unread": 3,
            "seq": 133,
        },
        "another device of the reader: the badge clears everywhere",
    ),
    ("recall", {"t": "recall", "msg_id": M3, "session_id": SESSION, "by": BOB, "seq": 123}, ""),
    ("edit", {**EDITED, "t": "edit", "seq": 125}, "the message with its new body and edited"),
    (
        "delivered",
        {"t": "delivered", "session_id": SESSION, "msg_id": M0, "by": BOB},
        "a position: no seq",
    ),
    ("hide", {"t": "hide", "msg_ids": [M1], "seq": 126}, "another device of the user hid them"),
    ("clear", {"t": "clear", "session_id": SESSION, "up_to": M2, "seq": 127}, ""),
    ("mute", {"t": "mute", "session_id": SESSION, "until": 4102444800000, "seq": 124}, ""),
    ("typing", {"t": "typing", "from": BOB, "active": True}, ""),
    ("presence", {"t": "presence", "uid": BOB, "online": True, "last_seen": TS - 5000}, ""),
    (
        "presence/hidden",
        {"t": "presence", "uid": BOB, "online": False, "last_seen": 0},
        "the watcher lost sight of the user: the never-seen state",
    ),
    (
        "profile",
        {"t": "profile", "user": {"uid": ALICE, **ALICE_PROFILE}, "presence": "everyone"},
        "another device of the user changed the profile",
    ),
    ("block", {"t": "block", "uid": CAROL, "blocked": True}, ""),
    ("block/unblocked", {"t": "block", "uid": CAROL, "blocked": False}, ""),
    (
        "kick/replaced",
        {"t": "kick", "reason": "replaced"},
        "then the server closes; do not reconnect automatically",
    ),
    ("kick/too_many_devices", {"t": "kick", "reason": "too_many_devices"}, ""),
    ("kick/logged_out", {"t": "kick", "reason": "logged_out"}, ""),
    ("kick/revoked", {"t": "kick", "reason": "revoked"}, ""),
    (
        "goaway",
        {"t": "goaway", "reason": "shutdown"},
        "then the server closes; reconnect after a short random delay",
    ),
    ("sync", {"t": "sync"}, "pushes may have been lost: catch up (or sync) again"),
    (
        "error/auth-timeout",
        {"t": "error", "code": "unauthenticated", "message": "no auth within the time allowed"},
        "no auth in time; the server closes",
    ),
    (
        "error/bad_frame",
        {"t": "error", "code": "bad_frame", "message": "body is not a map"},
        "an error without id answers no request",
    ),
    (
        "error/frame_too_large",
        {"t": "error", "code": "frame_too_large", "message": "frame length 0 outside 1..65536"},
        "the server closes",
    ),
    (
        "error/invalid-no-id",
        {"t": "error", "code": "invalid", "message": "field 'id' must be an int64"},
        "a request whose id could not be read",
    ),
    (
        "error/inbox-overflow",
        {
            "t": "error",
            "code": "rate_limited",
            "message": "more than 327680 bytes of requests waiting; wait for replies",
        },
        "the server closes",
    ),
]

# ---------------------------------------------------------------------------
# Malformed frames: what the client sends, what the server answers.


def frame_bytes(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


#: A bare msgpack bin, a str key, etc., for bodies msgpack-python would not produce from JSON.
def raw(*parts: bytes) -> bytes:
    return b"".join(parts)


PING = msgpack.packb({"t": "ping", "id": 1})

#: (name, state, body or None, hex override or None, frame or None,
#:  expected error (code, id or None), closes, description)
MALFORMED: list[dict[str, Any]] = [
    {
        "name": "not-a-map",
        "body": msgpack.packb([1, 2, 3]),
        "code": "bad_frame",
        "description": "an array",
    },
    {"name": "not-a-map/string", "body": msgpack.packb("ping"), "code": "bad_frame"},
    {
        "name": "int-keys",
        "body": raw(b"\x82\x01", msgpack.packb("ping"), b"\xa2id\x01"),
        "code": "bad_frame",
        "description": 'a map with an int key: {1: "ping", "id": 1}',
    },
    {
        "name": "binary-keys",
        "body": raw(b"\x82\xc4\x01t", msgpack.packb("ping"), b"\xa2id\x01"),
        "code": "bad_frame",
        "description": 'the key "t" as msgpack bin, not str',
    },
    {
        "name": "truncated",
        "body": PING[:6],
        "code": "bad_frame",
        "description": "the ping map cut after 6 bytes (the length prefix says 6)",
    },
    {
        "name": "trailing-bytes",
        "body": PING + b"\xc0",
        "code": "bad_frame",
        "description": "a valid map followed by nil",
    },
    {
        "name": "invalid-msgpack",
        "body": b"\xc1",
        "code": "bad_frame",
        "description": "0xc1 is never used",
    },
    {
        "name": "timestamp-ext",
        "body": raw(b"\x82\xa1t\xa4ping\xa2id\xd6\xff\x00\x00\x00\x00"),
        "code": "bad_frame",
        "description": "an extension type (-1, the timestamp) as a value",
    },
    {"name": "missing-t", "frame": {"id": 5}, "code": "invalid", "id": 5},
    {"name": "t-not-string", "frame": {"t": 1, "id": 5}, "code": "invalid", "id": 5},
    {
        "name": "missing-id",
        "frame": {"t": "ping"},
        "code": "invalid",
        "description": "no id: the error has none",
    },
    {"name": "id-string", "frame": {"t": "ping", "id": "5"}, "code": "invalid"},
    {"name": "id-float", "frame": {"t": "ping", "id": 5.0}, "code": "invalid"},
    {"name": "id-bool", "frame": {"t": "ping", "id": True}, "code": "invalid"},
    {
        "name": "id-above-int64",
        "frame": {"t": "ping", "id": 2**64 - 1},
        "code": "invalid",
        "description": "uint64 2**64-1 is not an int64",
    },
    {"name": "unknown-op", "frame": {"t": "teleport", "id": 7}, "code": "unknown_op", "id": 7},
    {
        "name": "send-to-string",
        "frame": {"t": "send", "id": 8, "to": "7", "cid": "c-1", "body": "hi"},
        "code": "invalid",
        "id": 8,
    },
    {
        "name": "send-to-bool",
        "frame": {"t": "send", "id": 8, "to": True, "cid": "c-1", "body": "hi"},
        "code": "invalid",
        "id": 8,
        "description": "a bool is not an int",
    },
    {
        "name": "send-to-zero",
        "frame": {"t": "send", "id": 8, "to": 0, "cid": "c-1", "body": "hi"},
        "code": "invalid",
        "id": 8,
        "description": "ids are >= 1",
    },
    {
        "name": "send-binary-body",
        "frame": {"t": "send", "id": 9, "to": 7, "cid": "c-1", "body": b"hi"},
        "code": "invalid",
        "id": 9,
        "description": "body as msgpack bin: strings must be str",
    },
    {
        "name": "send-binary-in-map-body",
        "frame": {"t": "send", "id": 9, "to": 7, "cid": "c-1", "body": {"img": b"\x89PNG"}},
        "code": "invalid",
        "id": 9,
    },
    {
        "name": "send-missing-cid",
        "frame": {"t": "send", "id": 10, "to": 7, "body": "hi"},
        "code": "invalid",
        "id": 10,
    },
    {
        "name": "send-empty-cid",
        "frame": {"t": "send", "id": 10, "to": 7, "cid": "", "body": "hi"},
        "code": "invalid",
        "id": 10,
    },
    {
        "name": "send-body-number",
        "frame": {"t": "send", "id": 10, "to": 7, "cid": "c-1", "body": 5},
        "code": "invalid",
        "id": 10,
        "description": "body is a string or a map",
    },
    {
        "name": "read-msg_id-float",
        "frame": {"t": "read", "id": 11, "session_id": SESSION, "msg_id": 1.5},
        "code": "invalid",
        "id": 11,
    },
    {
        "name": "typing-active-int",
        "frame": {"t": "typing", "id": 12, "to": 7, "active": 1},
        "code": "invalid",
        "id": 12,
    },
    {
        "name": "history-peer-and-session",
        "frame": {"t": "history", "id": 13, "peer": 7, "session_id": SESSION},
        "code": "invalid",
        "id": 13,
        "description": "give exactly one",
    },
    {
        "name": "ack-empty",
        "frame": {"t": "ack", "id": 14, "msg_ids": []},
        "code": "invalid",
        "id": 14,
    },
    {
        "name": "sync-limit-too-large",
        "frame": {"t": "sync", "id": 15, "limit": 501},
        "code": "too_large",
        "id": 15,
    },
    {
        "name": "send-cid-too-long",
        "frame": {"t": "send", "id": 16, "to": 7, "cid": "c" * 65, "body": "hi"},
        "code": "too_large",
        "id": 16,
    },
    {
        "name": "length-zero",
        "hex": "00000000",
        "code": "frame_too_large",
        "closes": True,
        "transports": ["tcp"],
        "description": "a length prefix of 0",
    },
    {
        "name": "length-above-max",
        "hex": "00010001",
        "code": "frame_too_large",
        "closes": True,
        "transports": ["tcp"],
        "description": "a prefix of 65537 > max_frame_bytes: answered before the body comes",
    },
    {
        "name": "before-auth/ping",
        "state": "new",
        "frame": {"t": "ping", "id": 1},
        "code": "unauthenticated",
        "id": 1,
        "closes": True,
        "description": "any first frame but auth",
    },
    {
        "name": "before-auth/bad-token",
        "state": "new",
        "frame": {"t": "auth", "id": 1, "token": "not-a-jwt"},
        "code": "auth_failed",
        "id": 1,
        "closes": True,
    },
    {
        "name": "before-auth/no-token",
        "state": "new",
        "frame": {"t": "auth", "id": 1},
        "code": "auth_failed",
        "id": 1,
        "closes": True,
    },
    {
        "name": "before-auth/not-a-map",
        "state": "new",
        "body": msgpack.packb([1]),
        "code": "bad_frame",
        "description": "the connection still waits for auth",
    },
]


# ---------------------------------------------------------------------------
# JSON forms


def to_json(value: Any) -> Any:
    """A decoded msgpack value as JSON (README.md, "Values")."""
    if value is None or type(value) in (bool, str):
        return value
    if type(value) is int:
        return value if -SAFE_INT <= value <= SAFE_INT else {"$int": str(value)}
    if type(value) is float:
        return {"$float": value}
    if type(value) is bytes:
        return {"$bin": value.hex()}
    if type(value) is list:
        return [to_json(v) for v in value]
    if type(value) is dict:
        for key in value:
            assert type(key) is str, key
            assert key not in ("$int", "$float", "$bin"), key
        return {k: to_json(v) for k, v in value.items()}
    raise TypeError(f"no JSON form for {value!r}")


def pack(frame: Mapping[str, Any]) -> bytes:
    body: bytes = msgpack.packb(frame, use_bin_type=True)
    return body


def vector(name: str, frame: Mapping[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    body = pack(frame)
    out: dict[str, Any] = {"name": name}
    if description:
        out["description"] = description
    out.update(extra)
    out["frame"] = to_json(frame)
    out["hex"] = frame_bytes(body).hex()
    out["body_hex"] = body.hex()
    return out


def request_vectors() -> list[dict[str, Any]]:
    notes = {name: d for name, _, _, d in REQUESTS} | {name: d for name, _, d in ODD_IDS}
    return [vector(name, f, notes[name], exact=True) for name, f in REQUEST_FRAMES.items()]


def malformed_frames() -> dict[str, dict[str, Any]]:
    return {f"malformed/{m['name']}": m["frame"] for m in MALFORMED if "frame" in m}


def reply_vectors() -> list[dict[str, Any]]:
    known = REQUEST_FRAMES | malformed_frames()
    out = []
    for name, request, result, description in OK_REPLIES:
        frame = {"t": "ok", "id": known[request]["id"], **result}
        out.append(vector(name, frame, description, exact=False, request=request))
    for name, request, code, message, description in ERROR_REPLIES:
        frame = {"t": "error", "code": code, "message": message, "id": known[request]["id"]}
        out.append(vector(name, frame, description, exact=False, request=request))
    return out


def push_vectors() -> list[dict[str, Any]]:
    return [vector(name, frame, d, exact=False) for name, frame, d in PUSHES]


def malformed_vectors() -> list[dict[str, Any]]:
    out = []
    for m in MALFORMED:
        v: dict[str, Any] = {"name": m["name"]}
        if m.get("description"):
            v["description"] = m["description"]
        v["state"] = m.get("state", "ready")
        v["transports"] = m.get("transports", ["tcp", "websocket"])
        if "frame" in m:
            body = pack(m["frame"])
            v["frame"] = to_json(m["frame"])
        else:
            body = m.get("body")
            v["frame"] = None
        if body is None:
            v["hex"] = m["hex"]
            v["body_hex"] = None
        else:
            v["hex"] = frame_bytes(body).hex()
            v["body_hex"] = body.hex()
        reply: dict[str, Any] = {"t": "error", "code": m["code"]}
        if m.get("id") is not None:
            reply["id"] = m["id"]
        v["reply"] = reply
        v["closes"] = m.get("closes", False)
        out.append(v)
    return out


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def document(kind: str, about: str, vectors: Iterable[dict[str, Any]]) -> str:
    """JSON, laid out for reading and diffs: one line per field of a vector."""
    vectors = list(vectors)
    head = {"format": FORMAT, "kind": kind, "about": about, "max_frame_bytes": MAX_FRAME_BYTES}
    lines = ["{"]
    lines += [f" {_dump(k)}: {_dump(v)}," for k, v in head.items()]
    lines.append(' "vectors": [')
    items = []
    for v in vectors:
        fields = ",\n".join(f"   {_dump(k)}: {_dump(x)}" for k, x in v.items())
        items.append("  {\n" + fields + "\n  }")
    lines.append(",\n".join(items))
    lines += [" ]", "}"]
    text = "\n".join(lines) + "\n"
    assert json.loads(text)["vectors"] == json.loads(_dump(vectors))
    return text


def build() -> dict[str, str]:
    """File name -> content of every generated file."""
    return {
        "requests.json": document(
            "request",
            "Client to server. exact: an encoder must produce hex/body_hex byte for byte "
            "(smallest encodings, keys in the order given).",
            request_vectors(),
        ),
        "replies.json": document(
            "reply",
            "Server to client, one per request (matched by id; request names the vector "
            "answered). Decode only: compare values, not bytes.",
            reply_vectors(),
        ),
        "pushes.json": document(
            "push",
            "Server to client, never with an id (errors without id included). Decode only.",
            push_vectors(),
        ),
        "malformed.json": document(
            "malformed",
            "Client to server frames the server refuses: reply is what it answers (match code "
            "and id; message is free text), closes whether it then closes the connection.",
            malformed_vectors(),
        ),
    }


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, content in build().items():
        path = HERE / name
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != content:
                stale.append(name)
        else:
            path.write_text(content, encoding="utf-8")
    if stale:
        print(f"stale: {', '.join(stale)}; run python docs/vectors/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
