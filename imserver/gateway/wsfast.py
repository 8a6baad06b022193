"""
A leaner per-message path through autobahn for the gateway's WebSocket adapter.

Why: autobahn frames every message in Python through a dozen method calls
(C{processData} -> C{onFrameBegin} -> C{onMessageBegin} -> ... ->
C{onMessageEnd} -> an observer event and a txaio callback), formats the
arguments of a debug log line for every chunk it receives and every frame it
sends (with debug logging off), and unmasks each client frame with a new cffi
masker object (about 12 us a frame however short). Profiled under
C{bench pairs --transport ws}, that made WebSocket cost the server about 1.5
times TCP's CPU per message (docs/performance.md, "WebSocket beside TCP").

L{FastServerProtocol} handles the common case itself and leaves everything
else to autobahn, unchanged:

  - received: a complete, final (FIN), masked, binary frame with RSV 0 and a
    7- or 16-bit length, within both payload limits, that starts a message,
    on an open connection without compression, frame logging or timing: it
    is unmasked here with one integer XOR (L{unmask}) and handed to
    C{onMessage}; a short one (up to L{INT_XOR_MAX}) not yet complete is left
    in the buffer until it is. Any other frame (control frames, fragments,
    text, 64-bit lengths, oversize or longer incomplete frames, protocol
    violations) goes to autobahn's C{processData}, which answers it exactly
    as before;
  - sent: a binary message on an open connection without compression,
    fragmentation, queued (sync) writes or frame logging is framed here (the
    server does not mask) and written; anything else goes to autobahn's
    C{sendMessage}.

Both keep autobahn's traffic counters as it does. These are overrides of
autobahn internals (the attribute names and the state they read), verified
against the versions in L{VERIFIED} (the range pyproject.toml pins): on any
other version L{ENABLED} is false and autobahn's own path runs.
tests/test_wsfast.py fails when autobahn's code under these overrides
changes, so an upgrade is re-checked, not trusted.

The C{wsaccel} package (C masking) was the classic remedy, but autobahn 26
does not use it (it imports only its own cffi "NVX" masker, which is the
slow part for short frames) and its author has stopped maintaining it.
"""

from __future__ import annotations

import re
from typing import Any

import autobahn
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker

#: The autobahn versions these overrides were checked against: [low, high) as
#: (major, minor) pairs; the same range as the dependency in pyproject.toml.
VERIFIED = ((26, 11), (27, 0))

#: Payloads up to this many bytes are unmasked with one integer XOR; longer
#: ones with autobahn's own (SIMD) masker, faster past about 3 KiB.
INT_XOR_MAX = 2048

_OPEN = WebSocketProtocol.STATE_OPEN
#: FIN set, RSV 0, opcode 2 (binary): the first byte of a whole binary message.
_FIN_BINARY = 0x82


def verified(version: str) -> bool:
    """Whether autobahn C{version} ("26.11.1") is in L{VERIFIED}."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return False
    major_minor = (int(match[1]), int(match[2]))
    return VERIFIED[0] <= major_minor < VERIFIED[1]


#: Whether L{FastServerProtocol} takes its fast paths (the installed autobahn is verified).
ENABLED = verified(autobahn.__version__)


def unmask(mask: bytes, payload: bytes) -> bytes:
    """
    C{payload} XORed with the 4-byte C{mask} repeated (RFC 6455 5.3), as
    autobahn's C{create_xor_masker(mask, len(payload)).process(payload)} would
    give: for short payloads as one big-integer XOR (two conversions in C, no
    object per frame), for long ones through autobahn's masker.
    """
    n = len(payload)
    if n > INT_XOR_MAX:
        result: bytes = create_xor_masker(mask, n).process(payload)
        return result
    key = int.from_bytes((mask * ((n >> 2) + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


class FastServerProtocol(WebSocketServerProtocol):
    """
    autobahn's server protocol with the common receive and send cases done
    in a few lines (see the module docstring); C{fast_framing} false (the
    default when autobahn is not L{VERIFIED}) is autobahn's path throughout.
    """

    fast_framing: bool = ENABLED

    # Attributes autobahn sets up (typed here for mypy; autobahn is untyped).
    data: bytes
    state: int
    current_frame: Any
    inside_message: bool
    failedByMe: bool
    trafficStats: Any
    transport: Any
    applyMask: bool
    logFrames: bool
    logOctets: bool
    maskServerFrames: bool
    maxMessagePayloadSize: int
    maxFramePayloadSize: int
    autoFragmentSize: int

    def dataReceived(self, data: bytes) -> None:
        # autobahn's Twisted adapter formats a debug line's arguments first.
        if self.fast_framing:
            self._dataReceived(data)
        else:
            super().dataReceived(data)

    def processData(self) -> bool:
        """
        One complete plain binary frame at the head of the buffer, handled
        here; anything else by autobahn. Returns, as autobahn's does, whether
        to call again (data is left).
        """
        if not (
            self.fast_framing
            and self.current_frame is None
            and not self.inside_message
            and self.state == _OPEN
            and not self.failedByMe
            and self.applyMask
            and self._perMessageCompress is None
            and not self.logFrames
            and not self.trackedTimings
            and self.autoPingTimeoutCall is None
        ):
            return bool(super().processData())
        data = self.data
        buffered = len(data)
        # Masked (a client's frame must be), 7-bit or 16-bit length.
        if buffered < 6 or data[0] != _FIN_BINARY or data[1] < 0x80:
            return bool(super().processData())
        length = data[1] & 0x7F
        if length < 126:
            start = 6
        elif length == 126 and buffered >= 8:
            length = (data[2] << 8) | data[3]
            if length < 126:  # not minimal: autobahn's protocol violation
                return bool(super().processData())
            start = 8
        else:
            return bool(super().processData())
        end = start + length
        max_message = self.maxMessagePayloadSize
        max_frame = self.maxFramePayloadSize
        if 0 < max_message < length or 0 < max_frame < length or self.websocket_version == 0:
            return bool(super().processData())
        if end > buffered:
            # A short frame cut by the TCP read: wait for its rest here (the
            # copy is small) rather than have autobahn take it in pieces.
            if length <= INT_XOR_MAX:
                return False
            return bool(super().processData())
        payload = unmask(data[start - 4 : start], data[start:end])
        self.data = data[end:]
        stats = self.trafficStats
        stats.incomingOctetsWebSocketLevel += length
        stats.incomingOctetsAppLevel += length
        stats.incomingWebSocketFrames += 1
        stats.incomingWebSocketMessages += 1
        self._onMessage(payload, True)
        return len(self.data) > 0

    def sendMessage(
        self,
        payload: bytes,
        isBinary: bool = False,
        fragmentSize: int | None = None,
        sync: bool = False,
        doNotCompress: bool = False,
    ) -> None:
        n = len(payload)
        if (
            self.fast_framing
            and isBinary
            and fragmentSize is None
            and not sync
            and self.state == _OPEN
            and self._perMessageCompress is None
            and not self.send_queue
            and not self.logFrames
            and not self.logOctets
            and not self.trackedTimings
            and not self.maskServerFrames
            and not 0 < self.maxMessagePayloadSize < n
            and not 0 < self.autoFragmentSize < n
            and type(payload) is bytes
        ):
            if n < 126:
                header = bytes((_FIN_BINARY, n))
            elif n < 0x10000:
                header = bytes((_FIN_BINARY, 126, n >> 8, n & 0xFF))
            else:
                header = bytes((_FIN_BINARY, 127)) + n.to_bytes(8, "big")
            stats = self.trafficStats
            stats.outgoingWebSocketMessages += 1
            stats.outgoingOctetsAppLevel += n
            stats.outgoingOctetsWebSocketLevel += n
            stats.outgoingWebSocketFrames += 1
            stats.outgoingOctetsWireLevel += len(header) + n
            self.transport.write(header + payload)
            return
        super().sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)
