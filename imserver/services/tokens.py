"""
Client tokens: JWT signed with HS256.

C{sub} is the uid as a decimal string (a positive int64) and C{exp} is
required. Only HS256 is accepted, so C{alg: none} and every asymmetric or
other-HMAC token is refused. Expiry is checked against an injected clock
(L{twisted.internet.interfaces.IReactorTime}), not the wall clock, so it can
be tested with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import attrs
import jwt

from imserver.errors import ErrorCode, ImError

ALGORITHM = "HS256"
INT64_MAX = 2**63 - 1


class InvalidToken(ImError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.AUTH_FAILED, message)


@attrs.frozen
class TokenService:
    """Mints and verifies client tokens with one secret."""

    secret: str = attrs.field(repr=False)
    leeway_seconds: int = 0

    def mint(self, uid: int, *, now: float, ttl_seconds: int = 86400) -> str:
        if not 1 <= uid <= INT64_MAX:
            raise ValueError("uid must be a positive int64")
        if ttl_seconds <= 0:
            raise ValueError("ttl must be positive")
        claims = {"sub": str(uid), "iat": int(now), "exp": int(now) + ttl_seconds}
        return jwt.encode(claims, self.secret, algorithm=ALGORITHM)

    def verify(self, token: str, *, now: float) -> int:
        """
        Return the uid a valid token names.

        @raise InvalidToken: bad signature, wrong algorithm, malformed,
            missing or past C{exp}, or a C{sub} that is not a positive int64.
        """
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "sub"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidTokenError as e:
            raise InvalidToken(f"invalid token: {e}") from None
        exp = claims["exp"]
        if type(exp) not in (int, float):
            raise InvalidToken("invalid token: exp must be a number")
        if now > exp + self.leeway_seconds:
            raise InvalidToken("token expired")
        sub = claims["sub"]
        if not (isinstance(sub, str) and sub.isascii() and sub.isdigit() and len(sub) <= 19):
            raise InvalidToken("invalid token: sub must be a decimal uid")
        uid = int(sub)
        if not 1 <= uid <= INT64_MAX:
            raise InvalidToken("invalid token: sub must be a positive int64")
        return uid
