"""Token verification: the only place a JWT is read or made.

Error handling: every way a token can be wrong (missing, oversized, bad signature,
an algorithm off the allow-list, expired, no `sub`) raises `protocol.Unauthorized`
(close 4001); the token itself never reaches a log or an error message.

Start-up: PyJWT is imported where a token is first read or made, not with this module.
Importing it imports `cryptography` (for RS256/ES256), with trio the largest import here,
which nothing needs before the first request; the server imports it right after it
listens (`server.warm_up`), so a client does not usually wait for it either.
"""

from __future__ import annotations

import time
from typing import Any

import protocol as wire

MAX_TOKEN_BYTES = 8 * 1024

class TokenVerifier:
    """Checks JWTs: signature, `exp`, a `sub`, and an algorithm allow-list (never `none`)."""

    def __init__(
        self,
        *,
        secret: str | None,
        public_key_pem: str | None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        self._audience = audience
        self._issuer = issuer
        self._keys: dict[str, Any] = {}
        if secret:
            self._keys["HS256"] = secret
        if public_key_pem:
            self._keys["RS256"] = public_key_pem
            self._keys["ES256"] = public_key_pem

    def verify(self, token: str | None) -> tuple[str, float | None]:
        """Return (user id, expiry as a UNIX time or None). Raises Unauthorized."""
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise wire.Unauthorized()
        import jwt  # on first use: see "Start-up" above

        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            if not isinstance(algorithm, str) or algorithm not in self._keys:
                raise wire.Unauthorized()
            key = self._keys[algorithm]
            required = ["sub"] + ["aud"] * bool(self._audience) + ["iss"] * bool(self._issuer)
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": required},
            )
        except jwt.PyJWTError:
            raise wire.Unauthorized() from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise wire.Unauthorized()
        for claim in _TIME_CLAIMS:
            if claim in claims and not _is_time(claims[claim]):
                # PyJWT reads "exp": "<digits>" as a number and never enforces it
                # afterwards; an expiry we cannot enforce is no expiry we accept.
                raise wire.Unauthorized(f"`{claim}` is not a time")
        expiry = claims.get("exp")
        return subject, float(expiry) if expiry is not None else None


_TIME_CLAIMS = ("exp", "nbf", "iat")
# 9999-12-31T23:59:59Z: past it a time claim is nonsense (and 10**400 overflows a float).
_LATEST_TIME_S = 253_402_300_799


def _is_time(value: object) -> bool:
    """A JSON number (not a bool, not a string) that is a plausible UNIX time."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    # Compared, never converted: an int like 10**400 has no float (OverflowError);
    # NaN compares false and an infinity is out of range.
    return 0 <= value <= _LATEST_TIME_S


def issue_token(secret: str, subject: str, ttl_s: int) -> str:
    now = int(time.time())
    import jwt  # on first use: see "Start-up" above

    return jwt.encode({"sub": subject, "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256")
