"""JWT-SVID minting, JWT bundles (JWKS) and validation per spiffe/spiffe standards/JWT-SVID.md (pure).

Validation follows the steps of the spec notes §4.2: compact JWS only, `alg` allowlist checked before
anything else (JWT-SVID §2.1), `typ` JWT/JOSE if present (§2.3), `sub` a SPIFFE ID whose trust domain
selects the bundle (Workload API §6.3), key by `kid` (required, as go-spiffe and SPIRE do), signature,
`exp` present and not past (Appendix A, small leeway), `aud` present and containing the audience (§3.2).
Time checks use the injected `now`, never the system clock.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.errors import IdentityError, SvidError
from sidecar.identity import SpiffeId, TrustDomain

from .ca import JwtAuthority

ALLOWED_ALGS: Final = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
ALLOWED_TYPS: Final = frozenset({"JWT", "JOSE"})
DEFAULT_LEEWAY: Final = 5.0


class JwtSvidError(SvidError):
    """A JWT-SVID that does not validate; `reason` is a short stable code, `detail` says why."""


@dataclass(frozen=True, slots=True)
class ValidatedJwtSvid:
    spiffe_id: SpiffeId
    claims: Mapping[str, Any] = field(repr=False)


def _b64url_uint(n: int, length: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(length, "big")).rstrip(b"=").decode("ascii")


def jwk_for(authority: JwtAuthority) -> dict[str, str]:
    """The public JWK of a JWT authority with `use: jwt-svid` and `kid` (JWT-SVID §6)."""
    nums = authority.public_key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url_uint(nums.x, 32),
        "y": _b64url_uint(nums.y, 32),
        "kid": authority.kid,
        "use": "jwt-svid",
    }


def jwks_json(authorities: Sequence[JwtAuthority]) -> bytes:
    """A JWT bundle as the Workload API serves it: RFC 7517 JWK Set JSON with only jwt-svid keys."""
    return json.dumps({"keys": [jwk_for(a) for a in authorities]}, separators=(",", ":")).encode()


def mint_jwt_svid(
    authority: JwtAuthority,
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    ttl: float,
    now: dt.datetime,
) -> str:
    """A compact ES256 JWT-SVID with header alg/kid/typ only (JWT-SVID §2) and claims sub/aud/exp/iat."""
    if spiffe_id.trust_domain != authority.trust_domain:
        raise JwtSvidError("wrong_trust_domain", f"{spiffe_id} is not in {authority.trust_domain}")
    if not audience:
        raise JwtSvidError("no_audience", "aud MUST have at least one value (JWT-SVID §3.2)")
    iat = int(now.timestamp())
    claims: dict[str, Any] = {
        "sub": str(spiffe_id),
        "aud": list(audience),
        "exp": iat + max(1, round(ttl)),
        "iat": iat,
    }
    return jwt.encode(
        claims, authority.private_key, algorithm="ES256", headers={"kid": authority.kid, "typ": "JWT"}
    )


def validate_jwt_svid(
    token: str,
    audience: str,
    bundles: Mapping[TrustDomain, Mapping[str, Any]],
    now: dt.datetime,
    leeway: float = DEFAULT_LEEWAY,
) -> ValidatedJwtSvid:
    """Validate `token` for `audience` against per-trust-domain key maps (kid -> public key)."""
    if not audience:
        raise JwtSvidError("no_audience", "an audience is required to validate a JWT-SVID")
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise JwtSvidError("malformed", "not a JWS in compact serialization (JWT-SVID §1)")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:
        raise JwtSvidError("malformed", f"bad header: {e}") from None
    alg = header.get("alg")
    if alg not in ALLOWED_ALGS:  # checked before any other processing (JWT-SVID §4)
        raise JwtSvidError("bad_alg", f"alg {alg!r} is not allowed (JWT-SVID §2.1)")
    typ = header.get("typ")
    if typ is not None and typ not in ALLOWED_TYPS:
        raise JwtSvidError("bad_typ", f"typ {typ!r} must be JWT or JOSE (JWT-SVID §2.3)")
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise JwtSvidError("malformed", f"bad payload: {e}") from None
    sub = unverified.get("sub")
    if not isinstance(sub, str) or not sub:
        raise JwtSvidError("no_sub", "sub claim is missing (JWT-SVID §3.1)")
    try:
        spiffe_id = SpiffeId.parse(sub)
    except IdentityError as e:
        raise JwtSvidError("bad_sub", f"sub is not a SPIFFE ID: {e.reason}") from None
    keys = bundles.get(spiffe_id.trust_domain)
    if keys is None:
        raise JwtSvidError("no_bundle", f"no JWT bundle for trust domain {spiffe_id.trust_domain}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtSvidError("no_kid", "token header has no kid")
    key = keys.get(kid)
    if key is None:
        raise JwtSvidError("unknown_kid", f"kid {kid!r} is not in the bundle of {spiffe_id.trust_domain}")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[alg],
            options={"verify_exp": False, "verify_aud": False, "verify_iat": False, "verify_nbf": False},
        )
    except (jwt.PyJWTError, TypeError, ValueError) as e:
        # pyjwt raises TypeError when alg and key type disagree (e.g. RS256 token, EC key).
        raise JwtSvidError("bad_signature", f"signature does not verify: {e}") from None
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise JwtSvidError("no_exp", "exp claim is missing or not a number (JWT-SVID §3.3)")
    ts = now.timestamp()
    if ts > exp + leeway:
        raise JwtSvidError("expired", f"token expired at {int(exp)}")
    nbf = claims.get("nbf")
    if isinstance(nbf, int | float) and ts + leeway < nbf:
        raise JwtSvidError("not_yet_valid", f"token not valid before {int(nbf)}")
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud  # JWT-SVID.schema says string, §3.2 allows an array
    if not isinstance(auds, list) or not auds or not all(isinstance(a, str) for a in auds):
        raise JwtSvidError("no_aud", "aud claim is missing (JWT-SVID §3.2)")
    if audience not in auds:
        raise JwtSvidError("wrong_aud", f"expected audience {audience!r}, token has {auds}")
    return ValidatedJwtSvid(spiffe_id, claims)


def public_keys(authorities: Sequence[JwtAuthority]) -> dict[str, ec.EllipticCurvePublicKey]:
    return {a.kid: a.public_key for a in authorities}
