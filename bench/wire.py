"""
Frames for the load workers and the relay, pre-encoded where possible.

A C{send} frame is built by one C{struct.pack} of constant pre-packed msgpack
pieces around the varying fields, all fixed width (uint64 as C{0xcf} + 8
bytes, the cid as 8 hex digits), so the length prefix is a constant too::

    {"t": "send", "id": SEQ, "to": TO, "cid": "%08x" % SEQ,
     "body": {"q": SEQ, "s": T_NS[, "p": PAD]}}

C{q} is the sender's sequence number (0, 1, 2, ...) and C{s} the send time
(scheduled time in open loop) in CLOCK_MONOTONIC nanoseconds, which every
process on the machine shares. The request id is the sequence number, so a
reply maps straight back to its message.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgpack

from imserver.wire.codec import encode
from imserver.wire.framing import HEADER

SendBuilder = Callable[[int, int], bytes]


def packb(obj: Any) -> bytes:
    """One msgpack value (a piece of a pre-encoded frame)."""
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def send_builder(to: int, pad: int = 0) -> SendBuilder:
    """C{build(seq, t_ns) -> frame bytes} for sends to C{to}."""
    u64 = b"\xcf"
    head = b"\x85" + packb("t") + packb("send") + packb("id") + u64
    mid1 = packb("to") + packb(to) + packb("cid") + b"\xa8"  # fixstr of 8 chars
    mid2 = packb("body") + (b"\x83" if pad else b"\x82") + packb("q") + u64
    mid3 = packb("s") + u64
    tail = packb("p") + packb("x" * pad) if pad else b""
    length = len(head) + 8 + len(mid1) + 8 + len(mid2) + 8 + len(mid3) + 8 + len(tail)
    head = HEADER.pack(length) + head
    pack = struct.Struct(f">{len(head)}sQ{len(mid1)}s8s{len(mid2)}sQ{len(mid3)}sQ{len(tail)}s").pack

    def build(seq: int, t_ns: int) -> bytes:
        return pack(head, seq, mid1, b"%08x" % seq, mid2, seq, mid3, t_ns, tail)

    sample = msgpack.unpackb(build(7, 123)[4:], raw=False)
    expected: dict[str, Any] = {"q": 7, "s": 123}
    if pad:
        expected["p"] = "x" * pad
    assert sample == {"t": "send", "id": 7, "to": to, "cid": "00000007", "body": expected}
    return build


def auth_frame(
    token: str, req_id: int = 1, device: str | None = None, since: int | None = None
) -> bytes:
    """C{auth}; C{device} and C{since} (several devices per user) only when given,
    so a one-device client sends exactly the frame of wire protocol v1."""
    fields: dict[str, Any] = {"t": "auth", "id": req_id, "token": token, "client": "bench/1"}
    if device is not None:
        fields["device"] = device
    if since is not None:
        fields["since"] = since
    return encode(fields)


#: A ping with a constant id: heartbeat replies are counted, not matched.
PING = encode({"t": "ping", "id": 2})


def ack_frame(req_id: int, msg_ids: list[int]) -> bytes:
    return encode({"t": "ack", "id": req_id, "msg_ids": msg_ids})


def ack_seq_frame(req_id: int, seq: int) -> bytes:
    """C{ack} of a stream position: the device has every event up to C{seq}."""
    return encode({"t": "ack", "id": req_id, "seq": seq})


def catchup_frame(req_id: int, limit: int, after: int | None = None) -> bytes:
    """C{catchup}; without C{after} the server pages from the connection's position."""
    fields: dict[str, Any] = {"t": "catchup", "id": req_id, "limit": limit}
    if after is not None:
        fields["after"] = after
    return encode(fields)


def sync_frame(req_id: int, limit: int, after: int) -> bytes:
    fields: dict[str, Any] = {"t": "sync", "id": req_id, "limit": limit}
    if after:
        fields["after"] = after
    return encode(fields)


def request(op: str, req_id: int, **fields: Any) -> bytes:
    """Any request frame (the ops of issue 11 in bench/socialload.py)."""
    return encode({"t": op, "id": req_id, **fields})
