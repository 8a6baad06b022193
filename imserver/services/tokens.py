"""
Client tokens: JWT signed with HS256.

C{sub} is the uid as a decimal string (a positive int64) and C{exp} is
required. Every time claim (C{exp}, and C{iat} and C{nbf} when present) must
be a finite number within the years 1970..9999: JSON lets a minter write NaN
or Infinity, and a NaN or infinite C{exp} would never expire. Only HS256 is
accepted, so C{alg: none} and every asymmetric or other-HMAC token is refused.
An optional C{device} claim (a string of 1..64 characters) binds the token
to one device of the user: the gateway refuses it for any other. Expiry and
C{nbf} are checked against an injected clock
(L{twisted.internet.interfaces.IReactorTime}), not the wall clock, so they
can be tested with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import attrs
import jwt

from imserver.errors import ErrorCode, ImError

ALGORITHM = "HS256"
INT64_MAX = 2**63 - 1
#: Characters of a device name, at most (as the wire protocol's auth).
MAX_DEVICE = 64
#: 9999-12-31T23:59:59Z: no real token has a time claim past it.
MAX_TIME = 253402300799
TIME_CLAIMS = ("exp", "iat", "nbf")


@attrs.frozen
class Claims:
    """What a verified token says."""

    uid: int
    #: C{iat}, if the token has one (a revoked device refuses older tokens).
    issued_at: float | None = None
    #: The only device this token may authenticate, if it names one.
    device: str | None = None


class InvalidToken(ImError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.AUTH_FAILED, message)


@attrs.frozen
class TokenService:
    """Mints and verifies client tokens with one secret."""

    secret: str = attrs.field(repr=False)
    leeway_seconds: int = 0

    def mint(
        self, uid: int, *, now: float, ttl_seconds: int = 86400, device: str | None = None
    ) -> str:
        if not 1 <= uid <= INT64_MAX:
            raise ValueError("uid must be a positive int64")
        if ttl_seconds <= 0:
            raise ValueError("ttl must be positive")
        if not 0 <= now <= MAX_TIME - ttl_seconds:
            raise ValueError("the token would expire after the year 9999")
        claims: dict[str, object] = {
            "sub": str(uid),
            "iat": int(now),
            "exp": int(now) + ttl_seconds,
        }
        if device is not None:
            if not 1 <= len(device) <= MAX_DEVICE:
                raise ValueError(f"a device name has 1..{MAX_DEVICE} characters")
            claims["device"] = device
        return jwt.encode(claims, self.secret, algorithm=ALGORITHM)

    def verify(self, token: str, *, now: float) -> int:
        """Return the uid a valid token names (see L{verify_claims})."""
        return self.verify_claims(token, now=now).uid

    def verify_claims(self, token: str, *, now: float) -> Claims:
        """
        Return what a valid token says: its uid, C{iat} and C{device}.

        @raise InvalidToken: bad signature, wrong algorithm, malformed,
            missing or past C{exp}, a future C{nbf}, a time claim that is
            not a finite number in range, a C{sub} that is not a positive
            int64, or a C{device} that is not a name of 1..64 characters.
        """
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                # The time claims are checked below, on the injected clock.
                options={
                    "require": ["exp", "sub"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidTokenError as e:
            raise InvalidToken(f"invalid token: {e}") from None
        for name in TIME_CLAIMS:
            if name in claims:
                _check_time(name, claims[name])
        if now > claims["exp"] + self.leeway_seconds:
            raise InvalidToken("token expired")
        if "nbf" in claims and now < claims["nbf"] - self.leeway_seconds:
            raise InvalidToken("token not valid yet")
        sub = claims["sub"]
        if not (isinstance(sub, str) and sub.isascii() and sub.isdigit() and len(sub) <= 19):
            raise InvalidToken("invalid token: sub must be a decimal uid")
        uid = int(sub)
        if not 1 <= uid <= INT64_MAX:
            raise InvalidToken("invalid token: sub must be a positive int64")
        device = claims.get("device")
        if device is not None and not (isinstance(device, str) and 1 <= len(device) <= MAX_DEVICE):
            raise InvalidToken(
                f"invalid token: device must be a name of 1..{MAX_DEVICE} characters"
            )
        issued = claims.get("iat")
        return Claims(uid, None if issued is None else float(issued), device)


def _check_time(name: str, value: object) -> None:
    """A time claim is a finite number of seconds in 0..MAX_TIME (NaN fails
    the range test too: every comparison with it is false)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_TIME:
        raise InvalidToken(f"invalid token: {name} must be a time in seconds")
