"""Client tokens: what L{TokenService.verify} accepts and refuses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imserver.errors import ErrorCode
from imserver.services.tokens import MAX_TIME, Claims, InvalidToken, TokenService

SECRET = "test-secret-0123456789-abcdefghijklmnop"
NOW = 1_764_400_000.0


def forge(claims: dict[str, Any], secret: str = SECRET) -> str:
    """
    An HS256 token with these claims, signed by hand: Python's json writes
    NaN and Infinity, which a careless (or hostile) token minter can send.
    """

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signed = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return (signed + b"." + b64(sig)).decode()


class TokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tokens = TokenService(SECRET)

    def assertRefused(self, token: str, now: float = NOW) -> InvalidToken:
        e = self.assertRaises(InvalidToken, self.tokens.verify, token, now=now)
        self.assertEqual(e.code, ErrorCode.AUTH_FAILED)
        return e

    def test_round_trip_and_expiry(self) -> None:
        token = self.tokens.mint(42, now=NOW, ttl_seconds=60)
        self.assertEqual(self.tokens.verify(token, now=NOW + 60), 42)
        self.assertRefused(token, now=NOW + 61)

    def test_mint_refuses_a_token_verify_would_refuse(self) -> None:
        self.assertRaises(ValueError, self.tokens.mint, 1, now=NOW, ttl_seconds=int(MAX_TIME))
        self.assertRaises(ValueError, self.tokens.mint, 1, now=float("nan"))
        token = self.tokens.mint(1, now=NOW, ttl_seconds=int(MAX_TIME - NOW))
        self.assertEqual(self.tokens.verify(token, now=NOW), 1)

    def test_device_claim_and_iat(self) -> None:
        token = self.tokens.mint(42, now=NOW, device="phone")
        self.assertEqual(self.tokens.verify_claims(token, now=NOW), Claims(42, NOW, "phone"))
        plain = self.tokens.mint(42, now=NOW)
        self.assertEqual(self.tokens.verify_claims(plain, now=NOW), Claims(42, NOW, None))
        no_iat = forge({"sub": "7", "exp": NOW + 5})
        self.assertEqual(self.tokens.verify_claims(no_iat, now=NOW), Claims(7, None, None))
        self.assertRaises(ValueError, self.tokens.mint, 1, now=NOW, device="")
        self.assertRaises(ValueError, self.tokens.mint, 1, now=NOW, device="x" * 65)

    def test_bad_device_claim_is_refused(self) -> None:
        for device in ("", "x" * 65, 5, None, ["phone"], True):
            with self.subTest(device=device):
                claims: dict[str, Any] = {"sub": "7", "exp": NOW + 5, "device": device}
                if device is None:
                    # null counts as absent
                    self.assertEqual(self.tokens.verify_claims(forge(claims), now=NOW).device, None)
                    continue
                self.assertRefused(forge(claims))

    def test_forged_helper_matches_pyjwt(self) -> None:
        self.assertEqual(self.tokens.verify(forge({"sub": "7", "exp": NOW + 5}), now=NOW), 7)

    def test_non_finite_exp_is_refused(self) -> None:
        """Defect 7a: NaN compares false with everything, Infinity is never
        past: both made a token that never expires."""
        for exp in (float("nan"), float("inf"), float("-inf")):
            with self.subTest(exp=exp):
                self.assertRefused(forge({"sub": "1", "exp": exp}))

    def test_absurd_exp_is_refused(self) -> None:
        for exp in (MAX_TIME + 1, 1e300, 2**64, -1, -1e300):
            with self.subTest(exp=exp):
                self.assertRefused(forge({"sub": "1", "exp": exp}))
        self.assertEqual(self.tokens.verify(forge({"sub": "1", "exp": MAX_TIME}), now=NOW), 1)

    def test_bool_exp_is_refused(self) -> None:
        self.assertRefused(forge({"sub": "1", "exp": True}))

    def test_bad_iat_and_nbf_are_refused(self) -> None:
        for claim in ("iat", "nbf"):
            for value in (float("nan"), float("inf"), MAX_TIME + 1, -5, "soon", True, None):
                with self.subTest(claim=claim, value=value):
                    self.assertRefused(forge({"sub": "1", "exp": NOW + 60, claim: value}))

    def test_nbf_is_checked_against_the_injected_clock(self) -> None:
        token = forge({"sub": "1", "exp": NOW + 60, "nbf": NOW + 10})
        self.assertRefused(token, now=NOW)
        self.assertEqual(self.tokens.verify(token, now=NOW + 10), 1)

    def test_iat_in_range_is_accepted(self) -> None:
        self.assertEqual(
            self.tokens.verify(forge({"sub": "3", "exp": NOW + 1, "iat": 0}), now=NOW), 3
        )

    def test_bad_sub_is_refused(self) -> None:
        for sub in ("0", "-1", str(2**63), "1e3", "NaN", "Infinity", " 1", "\u0661", 1, 1.0, None):
            with self.subTest(sub=sub):
                self.assertRefused(forge({"sub": sub, "exp": NOW + 60}))

    @given(
        st.dictionaries(
            st.sampled_from(["sub", "exp", "iat", "nbf"]),
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats()
            | st.text(max_size=25)
            | st.lists(st.integers(), max_size=2),
        )
    )
    def test_any_claims_give_a_uid_or_auth_failed(self, claims: dict[str, Any]) -> None:
        try:
            uid = self.tokens.verify(forge(claims), now=NOW)
        except InvalidToken:
            return
        self.assertTrue(1 <= uid < 2**63)
        exp = claims["exp"]
        self.assertTrue(NOW <= exp <= MAX_TIME)
