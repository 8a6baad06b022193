"""
Length-prefixed framing: a 4-byte unsigned big-endian length N, then N bytes.

L{FrameDecoder} is fed whatever the transport delivers and hands back complete
frame bodies, like L{twisted.protocols.basic.Int32StringReceiver} but without
the protocol: it never touches a transport, so it is trivially testable and
reusable by clients and benchmarks.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
MAX_LENGTH_FIELD = 2**32 - 1


class FrameTooLarge(Exception):
    """A length prefix of zero or above the limit: the stream cannot be resynchronised."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame length {length} outside 1..{limit}")
        self.length = length
        self.limit = limit


def encode_frame(body: bytes) -> bytes:
    """Prefix C{body} with its length."""
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """
    Incremental decoder of length-prefixed frames.

    Bytes of an incomplete frame are kept as a list of chunks and joined once
    the frame is complete, so a large frame arriving in many small reads costs
    linear, not quadratic, copying.
    """

    __slots__ = ("_chunks", "_have", "_need", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int) -> None:
        if not 1 <= max_frame_bytes <= MAX_LENGTH_FIELD:
            raise ValueError(f"max_frame_bytes must be in 1..{MAX_LENGTH_FIELD}")
        self.max_frame_bytes = max_frame_bytes
        # An empty tuple while no incomplete frame is held: no list per idle
        # connection (issue 13: memory per connection).
        self._chunks: list[bytes] | tuple[()] = ()
        self._have = 0
        self._need = HEADER_SIZE

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete frame are held."""
        return self._have

    def feed(self, data: bytes) -> list[bytes]:
        """
        Add received bytes; return the bodies of all frames now complete.

        @raise FrameTooLarge: a length prefix is 0 or above C{max_frame_bytes}.
            The decoder is then unusable: the connection must be closed.
        """
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            data = b"".join(self._chunks)
            self._chunks = ()
            self._have = 0
        frames: list[bytes] = []
        offset = 0
        end = len(data)
        limit = self.max_frame_bytes
        unpack_from = HEADER.unpack_from
        need = HEADER_SIZE
        while end - offset >= HEADER_SIZE:
            (length,) = unpack_from(data, offset)
            if length == 0 or length > limit:
                raise FrameTooLarge(length, limit)
            stop = offset + HEADER_SIZE + length
            if stop > end:
                need = HEADER_SIZE + length
                break
            frames.append(data[offset + HEADER_SIZE : stop])
            offset = stop
        else:
            need = HEADER_SIZE
        if offset < end:
            rest = data[offset:]
            self._chunks = [rest]
            self._have = len(rest)
            self._need = need
        return frames
