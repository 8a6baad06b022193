"""
Frame bodies: one msgpack map with string keys.

L{decode_body} turns the bytes of one frame into a dict or raises L{BadFrame};
it never raises anything else, whatever the input (see the hypothesis tests).
Extension types, the timestamp (-1) included, are always a L{BadFrame}.
L{encode} packs a dict and prefixes the length.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import msgpack

from imserver.wire.framing import HEADER

Frame = dict[str, Any]


class BadFrame(Exception):
    """The body is not a msgpack map with string keys."""


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def decode_body(raw: bytes) -> Frame:
    """Decode one frame body; raise L{BadFrame} unless it is a map with str keys."""
    try:
        obj = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            # msgpack decodes ext type -1 (its timestamp) itself, without
            # calling ext_hook; no ext of any type may carry data, so every
            # timestamp fails (its data is 4, 8 or 12 bytes) and the hook
            # refuses the empty ones.
            ext_hook=_reject_ext,
            max_ext_len=0,
        )
    except Exception as e:
        raise BadFrame(f"body is not valid msgpack: {e.__class__.__name__}") from None
    if type(obj) is not dict:
        raise BadFrame("body is not a map")
    for key in obj:
        if type(key) is not str:
            raise BadFrame("map keys must be strings")
    return obj


_packers = threading.local()
#: A packer whose buffer grew past this is dropped, not kept for the thread.
KEEP_PACKER_BYTES = 64 * 1024


def packb(obj: Any) -> bytes:
    """
    C{msgpack.packb(obj, use_bin_type=True)}, with one C{Packer} kept per
    thread: C{packb} builds a Packer (and mallocs and frees its 256 KiB
    buffer) on every call, ~0.5 of the ~1.2 us of a push frame (issue 13).
    Per thread because a Packer is not thread-safe (the SQL threads pack
    outbox payloads); one that packed something large is dropped.
    """
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True, buf_size=4096)
    data: bytes = packer.pack(obj)
    if len(data) > KEEP_PACKER_BYTES:
        del _packers.packer
    return data


def pack(obj: Mapping[str, Any]) -> bytes:
    """The msgpack body of a frame, without its length prefix."""
    return packb(obj)


def encode(obj: Mapping[str, Any]) -> bytes:
    """A complete frame: length prefix and msgpack body."""
    body = packb(obj)
    return HEADER.pack(len(body)) + body
