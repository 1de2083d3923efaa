"""JWT-SVID minting, JWT signing-key rotation and JWT bundles (JWKS) of the embedded SPIRE (pure).

Tokens follow spiffe/spiffe standards/JWT-SVID.md: header alg/kid/typ only (§2), claims sub/aud/exp/iat
(§3). Keys rotate like the CAs (`KeyRotation`): the next key is published before it signs, every key gets a
new `kid`, and a retired key stays in the bundle until the last token it signed has expired. Validation is
the sidecar's own (`sidecar.jwtsvid`), so the Workload API and the data plane judge tokens alike.
Time comes from the caller's `now`, never the system clock.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from collections.abc import Sequence
from typing import Any

import jwt

from sidecar.errors import JwtSvidError
from sidecar.identity import SpiffeId

from .ca import JwtAuthority, KeyRotation, new_jwt_authority

__all__ = ["JwtKeyManager", "JwtSvidError", "jwk_for", "jwks_json", "jwt_svid_expiry", "mint_jwt_svid"]


def _b64url_uint(n: int, length: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(length, "big")).rstrip(b"=").decode("ascii")


def jwk_for(authority: JwtAuthority, *, spiffe_bundle: bool = False) -> dict[str, str]:
    """The public JWK of a JWT key, with its `kid` (JWT-SVID §6.1). `use: jwt-svid` is set in the SPIFFE
    bundle form only: SPIRE serves Workload API JWT bundles as standard JWKS, without `use`."""
    nums = authority.public_key.public_numbers()
    out = {"kty": "EC", "crv": "P-256", "x": _b64url_uint(nums.x, 32), "y": _b64url_uint(nums.y, 32),
           "kid": authority.kid}
    if spiffe_bundle:
        out["use"] = "jwt-svid"
    return out


def jwks_json(authorities: Sequence[JwtAuthority], *, spiffe_bundle: bool = False) -> bytes:
    """A JWT bundle: an RFC 7517 JWK Set of JWT keys only (Workload API §6.2.2), or with `spiffe_bundle` the
    SPIFFE bundle form (Trust Domain and Bundle §4, `use: jwt-svid` on every key)."""
    keys = [jwk_for(a, spiffe_bundle=spiffe_bundle) for a in authorities]
    return json.dumps({"keys": keys}, separators=(",", ":")).encode()


def jwt_svid_expiry(authority: JwtAuthority, ttl: float, now: dt.datetime) -> int:
    """`exp` of a token minted now: `ttl` later, but never after the key itself (SPIRE's expiration cap)."""
    return min(int(now.timestamp()) + max(1, round(ttl)), math.floor(authority.not_after.timestamp()))


def mint_jwt_svid(
    authority: JwtAuthority,
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    ttl: float,
    now: dt.datetime,
) -> str:
    """A compact ES256 JWT-SVID with header alg/kid/typ only (JWT-SVID §2) and claims sub/aud/exp/iat.

    Empty audience values are dropped, as SPIRE's server does; none left is refused (§3.2: at least one).
    """
    if spiffe_id.trust_domain != authority.trust_domain:
        raise JwtSvidError("wrong_trust_domain", f"{spiffe_id} is not in {authority.trust_domain}")
    aud = [a for a in audience if a]
    if not aud:
        raise JwtSvidError("no_audience", "aud MUST have at least one value (JWT-SVID §3.2)")
    claims: dict[str, Any] = {
        "sub": str(spiffe_id),
        "aud": aud,
        "exp": jwt_svid_expiry(authority, ttl, now),
        "iat": int(now.timestamp()),
    }
    return jwt.encode(
        claims, authority.private_key, algorithm="ES256", headers={"kid": authority.kid, "typ": "JWT"}
    )


class JwtKeyManager(KeyRotation[JwtAuthority]):
    """The JWT signing keys of one trust domain over time: prepare at 1/2 of a key's life, activate at 2/3,
    retire once every token it signed has expired (see `KeyRotation`). SPIRE activates later (at 5/6)."""

    noun = "JWT key"
    signs = "tokens"

    def _new(self, now: dt.datetime, generation: int) -> JwtAuthority:
        return new_jwt_authority(self.trust_domain, self.ttl, now, generation)

    def _name(self, a: JwtAuthority) -> str:
        return f"JWT key {a.generation} kid={a.kid}"

    def mint(self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: float, now: dt.datetime) -> str:
        """A token signed by the active key; its expiry keeps that key in the bundle."""
        token = mint_jwt_svid(self.active, spiffe_id, audience, ttl, now)
        expires = dt.datetime.fromtimestamp(jwt_svid_expiry(self.active, ttl, now), dt.UTC)
        self.record(self.active.generation, expires)
        return token

    def public_keys(self) -> dict[str, Any]:
        """kid -> public key of every key in the bundle."""
        return {a.kid: a.public_key for a in self.bundle()}
