"""sidecar.jwtsvid: JWT-SVID validation per JWT-SVID §1-§6 and spec notes §4, JWT bundles, the cache."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.errors import JwtSvidError, SidecarError
from sidecar.identity import SpiffeId, TrustDomain
from sidecar.jwtsvid import (
    DEFAULT_LEEWAY,
    MAX_TOKEN_BYTES,
    JwtBundle,
    JwtSvidReason,
    JwtValidationCache,
    bearer_token,
    bundles_from_workload_api,
    validate,
)
from spire.ca import new_jwt_authority
from spire.jwtsvid import jwks_json, mint_jwt_svid

TD = TrustDomain("example.org")
PARTNER = TrustDomain("partner.org")
NOW = 1_900_000_000.0
WEB = "spiffe://example.org/ns/shop/sa/web"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC384_KEY = ec.generate_private_key(ec.SECP384R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PARTNER_KEY = ec.generate_private_key(ec.SECP256R1())
BUNDLES = {
    TD: JwtBundle.from_keys(TD, {"ec": EC_KEY.public_key(), "ec384": EC384_KEY.public_key(),
                                 "rsa": RSA_KEY.public_key()}),
    PARTNER: JwtBundle.from_keys(PARTNER, {"p1": PARTNER_KEY.public_key()}),
}


def claims(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": WEB, "aud": ["svc"], "exp": int(NOW) + 300, "iat": int(NOW)}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def sign(body: dict[str, Any] | None = None, *, kid: str | None = "ec", key: Any = EC_KEY, alg: str = "ES256",
         **headers: Any) -> str:
    h: dict[str, Any] = {"typ": "JWT", **headers}
    if kid is not None:
        h["kid"] = kid
    return jwt.encode(body if body is not None else claims(), key, algorithm=alg, headers=h)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any] | str, payload: dict[str, Any] | str, signature: bytes = b"sig") -> str:
    """A compact JWS assembled by hand (for what no library will sign)."""
    h = header if isinstance(header, str) else json.dumps(header)
    p = payload if isinstance(payload, str) else json.dumps(payload)
    return f"{b64(h.encode())}.{b64(p.encode())}.{b64(signature)}"


def reason(token: str, audience: str = "svc", now: float = NOW, bundles: Any = None) -> str:
    with pytest.raises(JwtSvidError) as ei:
        validate(token, audience=audience, bundles=BUNDLES if bundles is None else bundles, now=now)
    return ei.value.reason


# --- valid tokens -----------------------------------------------------------------------------------------


def test_token_minted_by_the_embedded_spire_validates() -> None:
    start = dt.datetime.fromtimestamp(NOW, dt.UTC)
    auth = new_jwt_authority(TD, 3600, start)
    sid = SpiffeId.parse(WEB)
    token = mint_jwt_svid(auth, sid, ["svc", "other"], 300, start)
    bundles = {TD: JwtBundle.from_workload_api(TD, jwks_json([auth]))}
    got = validate(token, audience="other", bundles=bundles, now=NOW + 1)
    assert got.subject == sid and got.audience == ("svc", "other") and got.kid == auth.kid
    assert got.expiry == NOW + 300 and got.issued_at == NOW
    assert got.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(got) and token.split(".")[2] not in repr(got)
    assert dict(got.claims) == jwt.decode(token, options={"verify_signature": False})
    assert isinstance(JwtSvidError("x", "y"), SidecarError)


@pytest.mark.parametrize(
    ("kid", "key", "alg"),
    [("ec", EC_KEY, "ES256"), ("ec384", EC384_KEY, "ES384"), ("rsa", RSA_KEY, "RS256"), ("rsa", RSA_KEY, "RS512"),
     ("rsa", RSA_KEY, "PS256"), ("rsa", RSA_KEY, "PS384")],
)
def test_every_allowed_algorithm_family_validates(kid: str, key: Any, alg: str) -> None:
    assert str(validate(sign(kid=kid, key=key, alg=alg), audience="svc", bundles=BUNDLES, now=NOW).subject) == WEB


def test_audience_as_string_or_array_typ_optional_and_jose() -> None:
    for token in (sign(claims(aud="svc")), sign(claims(aud=["a", "svc"])), sign(typ="JOSE"),
                  jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec", "typ": None})):
        assert validate(token, audience="svc", bundles=BUNDLES, now=NOW).subject == SpiffeId.parse(WEB)
    with pytest.raises(ValueError, match="audience is required"):
        validate(sign(), audience="", bundles=BUNDLES, now=NOW)


def test_time_claims_honour_the_leeway() -> None:
    assert DEFAULT_LEEWAY == 60.0  # SPIRE/go-spiffe (go-jose DefaultLeeway)
    exp = int(NOW) - 10
    token = sign(claims(exp=exp))
    assert validate(token, audience="svc", bundles=BUNDLES, now=exp + DEFAULT_LEEWAY).expiry == exp
    assert reason(token, now=exp + DEFAULT_LEEWAY + 1) == "expired"
    with pytest.raises(JwtSvidError, match="expired"):
        validate(token, audience="svc", bundles=BUNDLES, now=NOW, leeway=0)
    assert reason(sign(claims(iat=int(NOW) + 61))) == "issued_in_future"
    assert validate(sign(claims(iat=int(NOW) + 60)), audience="svc", bundles=BUNDLES, now=NOW)
    assert reason(sign(claims(nbf=int(NOW) + 61))) == "not_yet_valid"
    assert validate(sign(claims(nbf=int(NOW) + 59.5)), audience="svc", bundles=BUNDLES, now=NOW)


# --- forged and broken tokens -----------------------------------------------------------------------------

_PUBLIC_PEM = EC_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
_ES256 = {"alg": "ES256", "kid": "ec"}


def _hs256_with_public_key() -> str:
    """The classic key-confusion forgery: HMAC keyed with the verifier's public key bytes."""
    h = b64(json.dumps({"alg": "HS256", "kid": "ec", "typ": "JWT"}).encode())
    p = b64(json.dumps(claims()).encode())
    mac = hmac.new(_PUBLIC_PEM, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(mac)}"


FORGED: dict[str, tuple[Any, str]] = {
    "foreign_key_under_known_kid": (lambda: sign(key=ec.generate_private_key(ec.SECP256R1())), "bad_signature"),
    "alg_none_unsigned": (lambda: jwt.encode(claims(), None, algorithm="none", headers={"kid": "ec"}),
                          "bad_algorithm"),
    "alg_none_with_signature": (lambda: raw_token({"alg": "none", "kid": "ec"}, claims()), "bad_algorithm"),
    "hs256_with_public_key_as_secret": (_hs256_with_public_key, "bad_algorithm"),
    "eddsa": (lambda: sign(key=ed25519.Ed25519PrivateKey.generate(), alg="EdDSA"), "bad_algorithm"),
    "alg_not_a_string": (lambda: raw_token({"alg": ["ES256"], "kid": "ec"}, claims()), "bad_algorithm"),
    "rs256_under_an_ec_kid": (lambda: sign(key=RSA_KEY, alg="RS256"), "bad_algorithm"),
    "es384_under_a_p256_kid": (lambda: sign(key=EC384_KEY, alg="ES384"), "bad_algorithm"),
    "wrong_audience": (lambda: sign(claims(aud=["other"])), "wrong_audience"),
    "audience_prefix_only": (lambda: sign(claims(aud="sv")), "wrong_audience"),
    "expired": (lambda: sign(claims(exp=int(NOW) - 61)), "expired"),
    "future_iat": (lambda: sign(claims(iat=int(NOW) + 3600)), "issued_in_future"),
    "future_nbf": (lambda: sign(claims(nbf=int(NOW) + 3600)), "not_yet_valid"),
    "unfederated_trust_domain": (lambda: sign(claims(sub="spiffe://evil.org/x")), "untrusted_trust_domain"),
    # The partner's key is trusted only for partner.org subjects, never for ours (Workload API §6.3).
    "other_trust_domains_key": (lambda: sign(claims(sub=WEB), kid="p1", key=PARTNER_KEY), "unknown_kid"),
    "kid_missing": (lambda: sign(kid=None), "missing_kid"),
    "kid_empty": (lambda: sign(kid=""), "missing_kid"),
    "kid_unknown": (lambda: sign(kid="nope"), "unknown_kid"),
    "typ_wrong": (lambda: sign(typ="at+jwt"), "bad_typ"),
    "extra_header_parameter": (lambda: sign(jku="https://evil.example/jwks"), "bad_header"),
    "header_too_large": (lambda: sign(x5u="a" * MAX_TOKEN_BYTES), "too_large"),
    "exp_missing": (lambda: sign(claims(exp=None)), "missing_exp"),
    "exp_not_a_number": (lambda: sign(claims(exp="tomorrow")), "malformed"),
    "exp_infinity": (lambda: raw_token(_ES256, f'{{"sub":"{WEB}","aud":"svc","exp":Infinity}}'), "malformed"),
    "aud_missing": (lambda: sign(claims(aud=None)), "missing_audience"),
    "aud_empty": (lambda: sign(claims(aud=[])), "missing_audience"),
    "aud_not_strings": (lambda: sign(claims(aud=[1])), "malformed"),
    "sub_missing": (lambda: sign(claims(sub=None)), "invalid_subject"),
    "sub_not_spiffe": (lambda: sign(claims(sub="https://example.org/x")), "invalid_subject"),
    "sub_root_id": (lambda: sign(claims(sub="spiffe://example.org")), "invalid_subject"),
    "duplicate_claim": (lambda: raw_token(_ES256, f'{{"sub":"{WEB}","sub":"x"}}'), "malformed"),
    "claims_not_object": (lambda: raw_token(_ES256, "[1]"), "malformed"),
    "two_parts": (lambda: sign().rsplit(".", 1)[0], "malformed"),
    "four_parts": (lambda: sign() + ".x", "malformed"),
    "json_serialization": (lambda: json.dumps({"payload": "x", "signatures": []}), "malformed"),
    "padded_base64": (lambda: sign().replace(".", "=.", 1), "malformed"),
    "empty": (lambda: "", "missing_token"),
    "non_ascii": (lambda: sign() + "é", "malformed"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_or_broken_tokens_are_refused_with_a_reason(case: str) -> None:
    make, code = FORGED[case]
    assert reason(make()) == code
    assert code in set(JwtSvidReason)


def test_signature_is_checked_before_claims() -> None:
    """A forged token learns nothing about its claims: a bad signature is reported, not `expired`."""
    token = sign(claims(exp=int(NOW) - 3600), key=ec.generate_private_key(ec.SECP256R1()))
    assert reason(token) == "bad_signature"


def test_empty_bundle_trusts_nothing() -> None:
    empty = {TD: JwtBundle.from_workload_api(TD, b'{"keys":[]}')}
    assert reason(sign(), bundles=empty) == "unknown_kid"


# --- Authorization header ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["Bearer a.b.c", "bearer a.b.c", "BEARER   a.b.c", " Bearer a.b.c \t",
                                   b"Bearer a.b.c", "Bearer a.b.c"])
def test_bearer_token(value: str | bytes) -> None:
    assert bearer_token(value) == "a.b.c"


@pytest.mark.parametrize(
    ("value", "code"),
    [(None, "missing_token"), ("", "missing_token"), ("Basic dXNlcjpwYXNz", "missing_token"),
     ("Bearer", "missing_token"), ("Bearer   ", "missing_token"), ("Bearera.b.c", "missing_token"),
     ("Bearer a.b.c d", "malformed"), ("Bearer a,b", "malformed"), ("Bearer\ta.b.c", "missing_token"),
     (b"Bearer \xff", "malformed"), ("Bearer a.b.\u0130", "malformed"), ("B\u0130arer a.b.c", "malformed"),
     ("Bearer " + "a" * MAX_TOKEN_BYTES + "x" * 100, "too_large")],
)
def test_bearer_token_refusals(value: str | bytes | None, code: str) -> None:
    with pytest.raises(JwtSvidError) as ei:
        bearer_token(value)
    assert ei.value.reason == code


# --- bundles ----------------------------------------------------------------------------------------------


def jwk(key: Any, kid: str | None, use: str | None = "jwt-svid", **extra: Any) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPublicKey):
        d: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    else:
        d = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
    if kid is not None:
        d["kid"] = kid
    if use is not None:
        d["use"] = use
    d.update(extra)
    return d


def test_spiffe_bundle_takes_only_good_jwt_svid_keys_and_says_why_not() -> None:
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    k256 = ec.generate_private_key(ec.SECP256K1()).public_key()
    priv = jwk(EC_KEY.public_key(), "priv")
    priv["d"] = "AAAA"
    doc = {
        "spiffe_sequence": 7,
        "spiffe_refresh_hint": 300,
        "keys": [
            jwk(EC_KEY.public_key(), "good"),
            jwk(RSA_KEY.public_key(), "rsa", alg="PS256"),
            {"kty": "EC", "use": "x509-svid", "x5c": ["AAAA"], "crv": "P-256"},  # not a JWT key: ignored
            jwk(EC_KEY.public_key(), "nouse", use=None),  # no use: ignored (§4.2)
            jwk(EC_KEY.public_key(), "wit", use="wit-svid"),  # another use: ignored
            {"kty": "XYZ", "use": "jwt-svid", "kid": "unknown-kty"},  # unknown kty: ignored
            jwk(EC_KEY.public_key(), None),
            {"kty": "oct", "use": "jwt-svid", "kid": "hmac", "k": "c2VjcmV0"},
            priv,
            jwk(small_rsa, "small"),
            jwk(k256, "k256"),
            jwk(EC_KEY.public_key(), "misfit", alg="RS256"),
            {"kty": "EC", "use": "jwt-svid", "kid": "bad-point", "crv": "P-256", "x": b64(b"\1" * 32),
             "y": b64(b"\2" * 32)},
            jwk(EC_KEY.public_key(), "dup"),
            jwk(EC384_KEY.public_key(), "dup"),
            "not an object",
        ],
    }
    b = JwtBundle.from_spiffe_bundle(TD, json.dumps(doc).encode())
    assert sorted(b.keys) == ["good", "rsa"]
    assert b.keys["rsa"].algorithms == {"PS256"} and b.keys["good"].algorithms == {"ES256"}
    assert b.sequence == 7
    why = {r.kid: r.reason for r in b.rejected}
    assert set(why) == {None, "hmac", "priv", "small", "k256", "misfit", "bad-point", "dup"}
    assert "MUST carry" in why[None] or "object" in why[None]
    assert "private" in why["priv"] and "1024 bits" in why["small"] and "secp256k1" in why["k256"]
    assert "more than once" in why["dup"]
    # The Workload API form (what SPIRE sends: standard JWKS without `use`) takes `nouse` too.
    w = JwtBundle.from_workload_api(TD, json.dumps(doc).encode())
    assert sorted(w.keys) == ["good", "nouse", "rsa"]


def test_embedded_spire_jwks_parse_in_both_forms() -> None:
    auth = new_jwt_authority(TD, 3600, dt.datetime.fromtimestamp(NOW, dt.UTC))
    for data in (jwks_json([auth]), jwks_json([auth], spiffe_bundle=True)):
        b = JwtBundle.from_workload_api(TD, data)
        assert list(b.keys) == [auth.kid] and b.rejected == ()
    assert list(JwtBundle.from_spiffe_bundle(TD, jwks_json([auth], spiffe_bundle=True)).keys) == [auth.kid]


@pytest.mark.parametrize("data", [b"", b"nope", b"[]", b'{"keys": {}}', b'{"nokeys": []}', b'{"keys":[],"keys":[]}',
                                  b"[" * 100_000])
def test_malformed_bundle_documents_are_refused(data: bytes) -> None:
    with pytest.raises(JwtSvidError) as ei:
        JwtBundle.from_spiffe_bundle(TD, data)
    assert ei.value.reason == "bad_bundle"


def test_bundle_digest_follows_content() -> None:
    a = JwtBundle.from_keys(TD, {"k": EC_KEY.public_key()})
    assert a.digest == JwtBundle.from_keys(TD, {"k": EC_KEY.public_key()}).digest
    assert a.digest != JwtBundle.from_keys(TD, {"k2": EC_KEY.public_key()}).digest
    assert a.digest != JwtBundle.from_keys(PARTNER, {"k": EC_KEY.public_key()}).digest
    with pytest.raises(JwtSvidError):
        JwtBundle.from_keys(TD, {"k": rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()})


def test_bundles_from_workload_api_response() -> None:
    data = json.dumps({"keys": [jwk(EC_KEY.public_key(), "ec", use=None)]}).encode()
    got = bundles_from_workload_api({"spiffe://example.org": data, "partner.org": data})
    assert set(got) == {TD, PARTNER} and list(got[TD].keys) == ["ec"]
    for bad in ({"spiffe://example.org/x": data}, {"Example.org": data},
                {"example.org": data, "spiffe://example.org": data}):
        with pytest.raises(JwtSvidError) as ei:
            bundles_from_workload_api(bad)
        assert ei.value.reason == "bad_bundle"


# --- cache ------------------------------------------------------------------------------------------------


def test_cache_hit_costs_no_validation_and_ends_at_expiry() -> None:
    cache = JwtValidationCache(max_entries=8)
    token = sign(claims(exp=int(NOW) + 10))
    first = cache.validate(token, audience="svc", bundles=BUNDLES, generation=1, now=NOW)
    assert cache.validate(token, audience="svc", bundles=BUNDLES, generation=1, now=NOW + 5) is first
    assert len(cache) == 1
    # Another audience is its own entry, validated on its own.
    with pytest.raises(JwtSvidError, match="wrong_audience"):
        cache.validate(token, audience="other", bundles=BUNDLES, generation=1, now=NOW)
    # Past exp + leeway the entry is gone and the token is validated again (and refused).
    with pytest.raises(JwtSvidError, match="expired"):
        cache.validate(token, audience="svc", bundles=BUNDLES, generation=1, now=NOW + 10 + DEFAULT_LEEWAY + 1)
    assert len(cache) == 0


def test_cache_follows_bundle_rotation() -> None:
    cache = JwtValidationCache()
    token = sign()
    cache.validate(token, audience="svc", bundles=BUNDLES, generation=1, now=NOW)
    rotated = {TD: JwtBundle.from_keys(TD, {"ec2": EC_KEY.public_key()})}
    # Same generation (a caller that forgot to bump it): the changed bundle still wins.
    with pytest.raises(JwtSvidError, match="unknown_kid"):
        cache.validate(token, audience="svc", bundles=rotated, generation=1, now=NOW)
    # A new generation drops every older entry.
    cache.validate(token, audience="svc", bundles=BUNDLES, generation=1, now=NOW)
    cache.validate(sign(claims(aud="x")), audience="x", bundles=BUNDLES, generation=2, now=NOW)
    assert len(cache) == 1


def test_cache_is_bounded_and_prunes() -> None:
    cache = JwtValidationCache(max_entries=4)
    tokens = [sign(claims(jti=str(i), exp=int(NOW) + 1 + i)) for i in range(10)]
    for t in tokens:
        cache.validate(t, audience="svc", bundles=BUNDLES, generation=0, now=NOW)
        assert len(cache) <= 4
    # The four newest stay (exp NOW+7 .. NOW+10); those with exp NOW+7 and NOW+8 are dead half a second later.
    assert cache.prune(NOW + 8.5 + DEFAULT_LEEWAY) == 2
    assert len(cache) == 2
    with pytest.raises(JwtSvidError, match="too_large"):
        cache.validate("a" * (MAX_TOKEN_BYTES + 1), audience="svc", bundles=BUNDLES, generation=0, now=NOW)
    with pytest.raises(ValueError):
        JwtValidationCache(max_entries=0)


# --- properties -------------------------------------------------------------------------------------------

VALID = sign()
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ !é\x00"


@st.composite
def mutations(draw: st.DrawFn) -> str:
    t = VALID
    kind = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "swap", "dup", "flipbits"]))
    i = draw(st.integers(0, len(t) - 1))
    if kind == "replace":
        return t[:i] + draw(st.sampled_from(ALPHABET)) + t[i + 1 :]
    if kind == "insert":
        return t[:i] + draw(st.text(ALPHABET, min_size=1, max_size=3)) + t[i:]
    if kind == "delete":
        return t[:i] + t[i + draw(st.integers(1, 8)) :]
    if kind == "truncate":
        return t[:i]
    parts = t.split(".")
    if kind == "swap":
        a, b = draw(st.permutations(range(3)))[:2]
        parts[a], parts[b] = parts[b], parts[a]
        return ".".join(parts)
    if kind == "dup":
        j = draw(st.integers(0, 2))
        return ".".join([*parts[:j], parts[j], *parts[j:]])
    # flip bits in the decoded bytes of one part and re-encode canonically
    j = draw(st.integers(0, 2))
    raw = bytearray(base64.urlsafe_b64decode(parts[j] + "=" * (-len(parts[j]) % 4)))
    k = draw(st.integers(0, len(raw) - 1))
    raw[k] ^= draw(st.integers(1, 255))
    parts[j] = b64(bytes(raw))
    return ".".join(parts)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_any_mutation_of_a_valid_token_is_refused_with_a_reason(token: str) -> None:
    if token == VALID:
        return
    with pytest.raises(JwtSvidError) as ei:
        validate(token, audience="svc", bundles=BUNDLES, now=NOW)
    assert ei.value.reason in set(JwtSvidReason)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_any_text_is_refused_with_a_reason(text: str) -> None:
    with pytest.raises(JwtSvidError):
        validate(text, audience="svc", bundles=BUNDLES, now=NOW)
    with contextlib.suppress(JwtSvidError):
        bearer_token(text)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)
_jwk_like = st.fixed_dictionaries(
    {},
    optional={"kty": st.sampled_from(["EC", "RSA", "oct", "OKP", 1]), "use": st.sampled_from(["jwt-svid", "x", 2]),
              "kid": st.one_of(st.text(max_size=4), st.integers()), "crv": st.sampled_from(["P-256", "P-384", 3]),
              "x": _json, "y": _json, "n": _json, "e": _json, "alg": _json, "d": _json},
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_jwk_like, _json), max_size=5), st.booleans())
def test_any_jwks_loads_or_is_refused_with_a_reason(keys: list[Any], spiffe: bool) -> None:
    data = json.dumps({"keys": keys}).encode()
    try:
        b = JwtBundle.from_spiffe_bundle(TD, data) if spiffe else JwtBundle.from_workload_api(TD, data)
    except JwtSvidError as e:
        assert e.reason == "bad_bundle"
        return
    assert len(b.keys) + len(b.rejected) <= len(keys)
