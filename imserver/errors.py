"""
The error vocabulary of imserver.

Every layer may raise L{ImError}: the gateway turns it into a wire error reply,
the HTTP API into a JSON error. The codes are part of wire protocol v1
(docs/protocol.md); this module is a leaf so that every layer can import it
without pointing a dependency upwards.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_FRAME = "bad_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    UNAUTHENTICATED = "unauthenticated"
    AUTH_FAILED = "auth_failed"
    UNKNOWN_OP = "unknown_op"
    INVALID = "invalid"
    NO_SUCH_USER = "no_such_user"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONTENT_BLOCKED = "content_blocked"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    TOO_LATE = "too_late"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ImError(Exception):
    """
    A failure with a protocol error code, safe to show to the client.

    @ivar code: one of L{ErrorCode}.
    @ivar message: human-readable text for the client.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Unavailable(ImError):
    """A backend (SQL or Redis) cannot answer right now; the request may be retried."""

    def __init__(self, message: str = "the service is temporarily unavailable") -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)
