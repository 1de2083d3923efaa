"""JWT-SVID validation and JWT bundles (pure: no I/O, no clock; PyJWT does the JWS, `cryptography` the keys).

Validation follows spiffe/spiffe standards/JWT-SVID.md and the spec notes §4.2, in this order:

1. the `Authorization` field: `Bearer` (scheme case-insensitive, RFC 9110 §11.1) + one b64token (RFC 6750
   §2.1), size-capped before anything is parsed;
2. compact serialization only (JWT-SVID §1), strict base64url, duplicate JSON members and NaN/Infinity refused;
3. `alg` in the nine-value allowlist before anything is trusted (§2.1, §4): `none`, HS*, EdDSA refused;
4. header parameters only `alg`, `kid`, `typ` (§2: anything else MUST NOT be included); `typ` JWT/JOSE (§2.3);
5. `kid` required: optional in §2.2, but bundle keys MUST carry one (§6.1) and go-spiffe and SPIRE require it;
6. `sub` a SPIFFE ID with a path (§3.1); its trust domain alone selects the bundle (Workload API §6.3) and the
   key is looked up by `kid` in that bundle only, and must fit `alg` (ES256 needs P-256, RS*/PS* RSA);
7. the signature, then the claims: `exp` required (§3.3), `exp`/`nbf`/`iat` with `leeway` seconds of slack
   (Appendix A allows a small one; SPIRE and go-spiffe use go-jose's 60 s and refuse a future `iat`), `aud`
   as a string or an array (JWT-SVID.schema vs §3.2) that must hold the expected audience, never skipped.

`JwtValidationCache` remembers successes by sha256 of the token, so a repeated token costs a hash and a
dictionary lookup; entries leave at expiry, on a newer bundle generation, or when their bundle changed.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, get_default_algorithms

from .errors import IdentityError, JwtSvidError
from .identity import SCHEME, SpiffeId, TrustDomain

__all__ = [
    "ALLOWED_ALGORITHMS",
    "DEFAULT_LEEWAY",
    "MAX_TOKEN_BYTES",
    "JwtBundle",
    "JwtKey",
    "JwtSvidClaims",
    "JwtSvidReason",
    "JwtValidationCache",
    "RejectedKey",
    "bearer_token",
    "bundles_from_workload_api",
    "validate",
]

# JWT-SVID §2.1: RFC 7518 §3.3-3.5 only; validators MUST reject anything else.
ALLOWED_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
ALLOWED_TYPS: Final = frozenset({"JWT", "JOSE"})  # JWT-SVID §2.3
ALLOWED_HEADER_PARAMS: Final = frozenset({"alg", "kid", "typ"})  # JWT-SVID §2
# What SPIRE and go-spiffe accept (go-jose's DefaultLeeway); JWT-SVID Appendix A: "a small amount".
DEFAULT_LEEWAY: Final = 60.0
# A JWT-SVID is well under 2 KiB (ES256 ~ 600 bytes, RS4096 with a long ID ~ 1.5 KiB); the cap is checked
# before any decoding so an attacker-sized header costs nothing.
MAX_TOKEN_BYTES: Final = 8192
MAX_AUTHORIZATION_BYTES: Final = MAX_TOKEN_BYTES + 64
MAX_BUNDLE_BYTES: Final = 1 << 20
MIN_RSA_BITS: Final = 2048

_RSA_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# RFC 7518 §3.4: each ES* names its curve.
_EC_ALGS: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_B64TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 §2.1
_ALGORITHMS: Final = {name: alg for name, alg in get_default_algorithms().items() if name in ALLOWED_ALGORITHMS}
_JWS: Final = jwt.PyJWS()

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class JwtSvidReason(enum.StrEnum):
    """Stable reason codes carried by `JwtSvidError.reason` (metrics labels, audit lines, tests)."""

    MISSING_TOKEN = "missing_token"  # noqa: S105 - a reason code, not a secret
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    BAD_ALGORITHM = "bad_algorithm"
    BAD_HEADER = "bad_header"
    BAD_TYP = "bad_typ"
    MISSING_KID = "missing_kid"
    INVALID_SUBJECT = "invalid_subject"
    UNTRUSTED_TRUST_DOMAIN = "untrusted_trust_domain"
    UNKNOWN_KID = "unknown_kid"
    BAD_SIGNATURE = "bad_signature"
    MISSING_EXP = "missing_exp"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    ISSUED_IN_FUTURE = "issued_in_future"
    MISSING_AUDIENCE = "missing_audience"
    WRONG_AUDIENCE = "wrong_audience"
    BAD_BUNDLE = "bad_bundle"


def _fail(reason: JwtSvidReason, detail: str) -> JwtSvidError:
    return JwtSvidError(reason, detail)


# ---------------------------------------------------------------------------------------------------------
# JWT bundles


@dataclass(frozen=True, slots=True)
class JwtKey:
    """One JWT authority: its `kid`, public key, and the allowed algorithms that fit the key."""

    kid: str
    public_key: PublicKey = field(repr=False)
    algorithms: frozenset[str]


@dataclass(frozen=True, slots=True)
class RejectedKey:
    """A `jwt-svid` JWK that was not loaded, and why (for the edge to log; the rest of the bundle loads)."""

    index: int
    kid: str | None
    reason: str


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True, slots=True, eq=False)
class JwtBundle:
    """The JWT authorities of one trust domain, by `kid`; always bound to its trust domain (Bundle §3).

    An empty bundle is valid and trusts nothing (Trust Domain and Bundle §4.1.3: no keys = all revoked).
    """

    trust_domain: TrustDomain
    keys: Mapping[str, JwtKey]
    rejected: tuple[RejectedKey, ...] = ()
    sequence: int | None = None
    # Identity of the content (trust domain, kids, keys), for caches keyed by bundle.
    digest: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        keys = MappingProxyType(dict(self.keys))
        object.__setattr__(self, "keys", keys)
        h = hashlib.sha256(self.trust_domain.name.encode())
        for kid in sorted(keys):
            k = keys[kid]
            h.update(b"\0" + kid.encode() + b"\0" + ",".join(sorted(k.algorithms)).encode() + _spki(k.public_key))
        object.__setattr__(self, "digest", h.digest())

    @classmethod
    def from_workload_api(cls, trust_domain: TrustDomain, data: bytes) -> JwtBundle:
        """A value of `JWTBundlesResponse.bundles`: a JWK Set holding only JWT-SVID keys (Workload API §6.2.2).

        Keys without `use` are taken: SPIRE sends these sets as standard JWKS, without the SPIFFE `use`
        member (bundleutil.StandardJWKS). Keys that declare another use are never used for JWT-SVIDs.
        """
        return _parse_jwks(trust_domain, data, use_required=False)

    @classmethod
    def from_spiffe_bundle(cls, trust_domain: TrustDomain, data: bytes) -> JwtBundle:
        """A SPIFFE bundle (Trust Domain and Bundle §4): only `use: jwt-svid` keys (JWT-SVID §6); keys with
        another, unknown or missing `use`, or an unknown `kty`, are ignored as §4.2 requires."""
        return _parse_jwks(trust_domain, data, use_required=True)

    @classmethod
    def from_keys(cls, trust_domain: TrustDomain, keys: Mapping[str, PublicKey]) -> JwtBundle:
        """From public keys by `kid` (e.g. a signer's own keys); keys that fit no allowed algorithm raise."""
        out: dict[str, JwtKey] = {}
        for kid, key in keys.items():
            try:
                out[kid] = JwtKey(kid, key, _algorithms_for(key, None))
            except _BadKey as e:
                raise _fail(JwtSvidReason.BAD_BUNDLE, f"{trust_domain}: kid {kid!r}: {e}") from None
        return cls(trust_domain, out)


class _BadKey(Exception):
    pass


def _algorithms_for(key: object, declared: object) -> frozenset[str]:
    """The allowed algorithms a public key can verify (RFC 7518 §3.3-3.5); `declared` is the JWK's `alg`."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise _BadKey(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} are required")
        algs = _RSA_ALGS
    elif isinstance(key, ec.EllipticCurvePublicKey):
        name = _EC_ALGS.get(key.curve.name)
        if name is None:
            raise _BadKey(f"curve {key.curve.name} fits no JWT-SVID algorithm (JWT-SVID §2.1)")
        algs = frozenset({name})
    else:
        raise _BadKey(f"{type(key).__name__} is not a public RSA or EC key")
    if declared is not None:
        if not isinstance(declared, str) or declared not in algs:
            raise _BadKey(f"alg {declared!r} does not fit this key (RFC 7517 §4.4)")
        algs = frozenset({declared})
    return algs


def _load_jwk(jwk: Mapping[str, Any]) -> PublicKey | None:
    """The public key of a JWK; None for an unknown `kty` (ignored, Trust Domain and Bundle §4.2)."""
    kty = jwk.get("kty")
    if kty in ("oct", "OKP"):
        raise _BadKey(f"kty {kty} verifies no allowed JWT-SVID algorithm (JWT-SVID §2.1)")
    if kty not in ("RSA", "EC"):
        return None
    if _PRIVATE_MEMBERS & jwk.keys():
        raise _BadKey("holds private key material; a bundle carries public keys only")
    members = ("n", "e") if kty == "RSA" else ("crv", "x", "y")
    for m in members:
        if not isinstance(jwk.get(m), str):
            raise _BadKey(f"member {m!r} is missing or not a string")
    try:
        key = RSAAlgorithm.from_jwk(dict(jwk)) if kty == "RSA" else ECAlgorithm.from_jwk(dict(jwk))
    except (jwt.PyJWTError, ValueError, TypeError) as e:
        raise _BadKey(f"not a valid {kty} key: {_short(e)}") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):  # pragma: no cover - d refused above
        raise _BadKey("not a public key")
    return key


def _parse_jwks(trust_domain: TrustDomain, data: bytes, *, use_required: bool) -> JwtBundle:
    if len(data) > MAX_BUNDLE_BYTES:
        raise _fail(JwtSvidReason.BAD_BUNDLE, f"{trust_domain}: bundle of {len(data)} bytes is over the cap")
    try:
        doc = json.loads(data, object_pairs_hook=_unique_members, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise _fail(JwtSvidReason.BAD_BUNDLE, f"{trust_domain}: not a JSON JWK Set: {_short(e)}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise _fail(JwtSvidReason.BAD_BUNDLE, f"{trust_domain}: `keys` MUST be an array (Trust Domain and Bundle §4.1)")
    seq = doc.get("spiffe_sequence")
    sequence = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else None
    keys: dict[str, JwtKey] = {}
    rejected: list[RejectedKey] = []
    duplicated: set[str] = set()
    for i, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            rejected.append(RejectedKey(i, None, "not a JSON object"))
            continue
        use = jwk.get("use")
        if (use is None and use_required) or (use is not None and use != "jwt-svid"):
            continue  # not a JWT-SVID key: ignored, never an error (Trust Domain and Bundle §4.2)
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            rejected.append(RejectedKey(i, None, "no kid; jwt-svid keys MUST carry one (JWT-SVID §6.1)"))
            continue
        try:
            key = _load_jwk(jwk)
            if key is None:
                continue
            algs = _algorithms_for(key, jwk.get("alg"))
        except _BadKey as e:
            rejected.append(RejectedKey(i, kid, str(e)))
            continue
        if kid in keys or kid in duplicated:
            # Two keys under one kid: a token could verify under either; trust neither.
            duplicated.add(kid)
            keys.pop(kid, None)
            rejected.append(RejectedKey(i, kid, "kid appears more than once; every key with it is dropped"))
            continue
        keys[kid] = JwtKey(kid, key, algs)
    return JwtBundle(trust_domain, keys, tuple(rejected), sequence)


def bundles_from_workload_api(bundles: Mapping[str, bytes]) -> dict[TrustDomain, JwtBundle]:
    """`JWTBundlesResponse.bundles` -> bundles by trust domain. Keys are `spiffe://<td>` (what SPIRE sends);
    bare names are accepted as go-spiffe does. Each message is the full state (Workload API §4.3): the caller
    replaces, never merges."""
    out: dict[TrustDomain, JwtBundle] = {}
    for name, data in bundles.items():
        try:
            td = TrustDomain.parse(name)
        except IdentityError as e:
            raise _fail(JwtSvidReason.BAD_BUNDLE, f"bundle key {e}") from None
        if name.startswith(SCHEME) and name != td.id_string():
            raise _fail(JwtSvidReason.BAD_BUNDLE, f"bundle key {name!r} is a SPIFFE ID with a path")
        if td in out:
            raise _fail(JwtSvidReason.BAD_BUNDLE, f"trust domain {td} appears twice")
        out[td] = JwtBundle.from_workload_api(td, data)
    return out


# ---------------------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True, slots=True)
class JwtSvidClaims:
    """A validated JWT-SVID. Holds the sha256 of the token, never the token (a bearer secret)."""

    subject: SpiffeId
    audience: tuple[str, ...]
    expiry: float
    kid: str
    token_hash: str  # hex sha256 of the token: correlates log lines without the secret
    issued_at: float | None = None
    # Every verified claim (e.g. for ValidateJWTSVID); kept out of reprs and logs.
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


def bearer_token(value: str | bytes | None, *, max_bytes: int = MAX_AUTHORIZATION_BYTES) -> str:
    """The token of an `Authorization: Bearer <token>` field value (JWT-SVID §5.2, RFC 6750 §2.1).

    The scheme is case-insensitive (RFC 9110 §11.1); one or more spaces separate it from the token. The
    caller refuses a request with more than one Authorization field before calling this.
    """
    if not value:
        raise _fail(JwtSvidReason.MISSING_TOKEN, "no Authorization field")
    if len(value) > max_bytes:
        raise _fail(JwtSvidReason.TOO_LARGE, f"Authorization field of {len(value)} bytes (max {max_bytes})")
    if isinstance(value, bytes):
        value = value.decode("latin-1")  # field values are octets (RFC 9110 §5.5); only ASCII is taken below
    if not value.isascii():
        raise _fail(JwtSvidReason.MALFORMED, "Authorization field is not ASCII")
    text = value.strip(" \t")  # optional whitespace around a field value is not part of it (RFC 9110 §5.5)
    scheme, _, rest = text.partition(" ")
    if scheme.lower() != "bearer":
        raise _fail(JwtSvidReason.MISSING_TOKEN, f"Authorization scheme {scheme[:16]!r} is not Bearer")
    token = rest.lstrip(" ")
    if not token:
        raise _fail(JwtSvidReason.MISSING_TOKEN, "Bearer without a token")
    if _B64TOKEN.fullmatch(token) is None:
        raise _fail(JwtSvidReason.MALFORMED, "Bearer credentials are not one b64token (RFC 6750 §2.1)")
    return token


def validate(
    token: str,
    *,
    audience: str,
    bundles: Mapping[TrustDomain, JwtBundle],
    now: float,
    leeway: float = DEFAULT_LEEWAY,
) -> JwtSvidClaims:
    """Validate a compact JWT-SVID for `audience` at unix time `now` against bundles by trust domain.

    Raises `JwtSvidError` (reason in `JwtSvidReason`) for any token that must not be trusted, and ValueError
    for an empty `audience` (a programming error: the audience check is never skipped).
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise _fail(JwtSvidReason.TOO_LARGE, f"token of {len(token)} bytes (max {MAX_TOKEN_BYTES})")
    return _validate(token, _digest(token), audience, bundles, now, leeway)[0]


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a compact JWS, decoded WITHOUT checking anything (for `spiffe-sidecar explain`, which
    says so): a ValueError with a short reason when it is not a compact JWS with a JSON object payload.
    The token itself never appears in the error."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        raise ValueError("not a compact JWS (three base64url parts separated by dots)")
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise ValueError("its payload is not base64url-encoded JSON") from None
    if not isinstance(claims, dict):
        raise ValueError("its payload is not a JSON object")
    return claims


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7519 §4 / RFC 7515 §5.2: reject duplicate member names rather than pick one silently.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate member {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json would take NaN/Infinity: `exp: Infinity`


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 §2), or None when absent."""
    v = claims.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _fail(JwtSvidReason.MALFORMED, f"{name} is not a NumericDate")
    return float(v)


def _validate(
    token: str,
    digest: bytes,
    audience: str,
    bundles: Mapping[TrustDomain, JwtBundle],
    now: float,
    leeway: float,
) -> tuple[JwtSvidClaims, JwtBundle]:
    if not audience:
        raise ValueError("an audience is required; validating without one would skip the aud check")
    if not token:
        raise _fail(JwtSvidReason.MISSING_TOKEN, "empty token")
    if not token.isascii() or token.count(".") != 2:
        raise _fail(JwtSvidReason.MALFORMED, "not a JWS in compact serialization (JWT-SVID §1)")
    if "=" in token:  # compact JWS is unpadded base64url (RFC 7515 §2); PyJWT would take padding
        raise _fail(JwtSvidReason.MALFORMED, "padded base64url in a compact JWS")
    try:
        parts = _JWS.decode_complete(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError) as e:
        raise _fail(JwtSvidReason.MALFORMED, _short(e)) from None
    header: dict[str, Any] = parts["header"]
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:  # before anything else (JWT-SVID §4)
        raise _fail(JwtSvidReason.BAD_ALGORITHM, f"alg {_shown(alg)} is not allowed (JWT-SVID §2.1)")
    extra = header.keys() - ALLOWED_HEADER_PARAMS
    if extra:
        raise _fail(JwtSvidReason.BAD_HEADER, f"header parameters {sorted(extra)[:4]} are not allowed (JWT-SVID §2)")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ not in ALLOWED_TYPS):
        raise _fail(JwtSvidReason.BAD_TYP, f"typ {_shown(typ)} is neither JWT nor JOSE (JWT-SVID §2.3)")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _fail(JwtSvidReason.MISSING_KID, "token header has no kid")
    try:
        claims = json.loads(parts["payload"], object_pairs_hook=_unique_members, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise _fail(JwtSvidReason.MALFORMED, f"claims are not JSON: {_short(e)}") from None
    if not isinstance(claims, dict):
        raise _fail(JwtSvidReason.MALFORMED, "claims are not a JSON object")
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise _fail(JwtSvidReason.INVALID_SUBJECT, "sub is missing (JWT-SVID §3.1)")
    try:
        subject = SpiffeId.parse(sub)
    except IdentityError as e:
        raise _fail(JwtSvidReason.INVALID_SUBJECT, f"sub is not a SPIFFE ID: {e.reason}") from None
    if subject.is_root:
        raise _fail(JwtSvidReason.INVALID_SUBJECT, f"sub {subject} is a trust domain, not a workload")
    # The subject's trust domain alone picks the bundle (Workload API §6.3; Federation §4.2: never merged).
    bundle = bundles.get(subject.trust_domain)
    if bundle is None:
        raise _fail(JwtSvidReason.UNTRUSTED_TRUST_DOMAIN, f"no JWT bundle for trust domain {subject.trust_domain}")
    key = bundle.keys.get(kid)
    if key is None:
        raise _fail(JwtSvidReason.UNKNOWN_KID, f"kid {_shown(kid)} is not in the bundle of {subject.trust_domain}")
    if alg not in key.algorithms:
        raise _fail(JwtSvidReason.BAD_ALGORITHM, f"alg {alg} does not fit key {_shown(kid)}")
    try:
        ok = _ALGORITHMS[alg].verify(token[: token.rfind(".")].encode("ascii"), key.public_key, parts["signature"])
    except (jwt.PyJWTError, ValueError, TypeError):
        ok = False
    if not ok:
        raise _fail(JwtSvidReason.BAD_SIGNATURE, f"signature does not verify with kid {_shown(kid)}")
    # Claims, checked only once the signature vouches for them.
    exp = _numeric(claims, "exp")
    if exp is None:
        raise _fail(JwtSvidReason.MISSING_EXP, "exp is missing (JWT-SVID §3.3)")
    if now - leeway > exp:
        raise _fail(JwtSvidReason.EXPIRED, f"expired at {exp:.0f}, now {now:.0f} (leeway {leeway:g}s)")
    nbf = _numeric(claims, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise _fail(JwtSvidReason.NOT_YET_VALID, f"not valid before {nbf:.0f}, now {now:.0f}")
    iat = _numeric(claims, "iat")
    if iat is not None and now + leeway < iat:
        raise _fail(JwtSvidReason.ISSUED_IN_FUTURE, f"issued at {iat:.0f}, after now {now:.0f}")
    aud = claims.get("aud")
    # JWT-SVID.schema says a string, §3.2 allows several values (an RFC 7519 array): take both.
    if isinstance(aud, str):
        auds: tuple[str, ...] = (aud,)
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        auds = tuple(aud)
    elif aud is None:
        auds = ()
    else:
        raise _fail(JwtSvidReason.MALFORMED, "aud is neither a string nor an array of strings")
    if not auds:
        raise _fail(JwtSvidReason.MISSING_AUDIENCE, "aud is missing (JWT-SVID §3.2)")
    if audience not in auds:
        raise _fail(JwtSvidReason.WRONG_AUDIENCE, f"audience {audience!r} is not among {len(auds)} in aud")
    return JwtSvidClaims(subject, auds, exp, kid, digest.hex(), iat, MappingProxyType(claims)), bundle


def _shown(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------------------
# Cache


class JwtValidationCache:
    """Successful validations by (sha256 of token, audience, bundle generation), bounded, dropped at expiry.

    A hit also checks that the subject's trust domain still maps to the very bundle content that validated
    the token, so a bundle rotation the caller forgot to count as a new generation still takes effect.
    Failures are not cached. Not thread-safe: one event loop owns it.
    """

    __slots__ = ("_entries", "_generation", "leeway", "max_entries")

    def __init__(self, max_entries: int = 4096, *, leeway: float = DEFAULT_LEEWAY) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.leeway = leeway
        self._entries: dict[tuple[bytes, str, int], tuple[JwtSvidClaims, float, bytes]] = {}
        self._generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def validate(
        self,
        token: str,
        *,
        audience: str,
        bundles: Mapping[TrustDomain, JwtBundle],
        generation: int,
        now: float,
    ) -> JwtSvidClaims:
        """`validate()` with memory; `generation` changes whenever the bundles do."""
        if len(token) > MAX_TOKEN_BYTES:
            raise _fail(JwtSvidReason.TOO_LARGE, f"token of {len(token)} bytes (max {MAX_TOKEN_BYTES})")
        digest = _digest(token)
        key = (digest, audience, generation)
        hit = self._entries.get(key)
        if hit is not None:
            claims, until, bundle_digest = hit
            bundle = bundles.get(claims.subject.trust_domain)
            if now <= until and bundle is not None and bundle.digest == bundle_digest:
                return claims
            del self._entries[key]
        claims, bundle = _validate(token, digest, audience, bundles, now, self.leeway)
        if generation > self._generation:
            self._entries.clear()  # entries of older generations can never hit again
            self._generation = generation
        if len(self._entries) >= self.max_entries:
            self.prune(now)
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]  # oldest first
        self._entries[key] = (claims, claims.expiry + self.leeway, bundle.digest)
        return claims

    def prune(self, now: float) -> int:
        """Drop every expired entry; returns how many."""
        dead = [k for k, (_, until, _) in self._entries.items() if now > until]
        for k in dead:
            del self._entries[k]
        return len(dead)
