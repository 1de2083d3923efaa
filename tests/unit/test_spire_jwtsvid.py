"""spire.jwtsvid: minting, JWKS bundles and validation per JWT-SVID (spec notes §4.2)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.identity import SpiffeId, TrustDomain
from spire.ca import new_jwt_authority
from spire.jwtsvid import JwtSvidError, jwks_json, mint_jwt_svid, public_keys, validate_jwt_svid

TD = TrustDomain("example.org")
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
WEB = SpiffeId.parse("spiffe://example.org/web")
AUTH = new_jwt_authority(TD, "kid-1")
BUNDLES = {TD: public_keys([AUTH])}


def forge(claims: dict[str, Any], headers: dict[str, Any] | None = None, alg: str = "ES256") -> str:
    h = {"kid": "kid-1", **(headers or {})}
    return jwt.encode(claims, AUTH.private_key, algorithm=alg, headers=h)


def good_claims(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": str(WEB), "aud": ["svc"], "exp": int(NOW.timestamp()) + 60}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def reason(token: str, audience: str = "svc", now: dt.datetime = NOW) -> str:
    with pytest.raises(JwtSvidError) as ei:
        validate_jwt_svid(token, audience, BUNDLES, now)
    return ei.value.reason


def test_mint_header_and_claims() -> None:
    token = mint_jwt_svid(AUTH, WEB, ["svc", "other"], 300, NOW)
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "kid-1", "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims == {"sub": str(WEB), "aud": ["svc", "other"], "exp": int(NOW.timestamp()) + 300,
                      "iat": int(NOW.timestamp())}
    v = validate_jwt_svid(token, "other", BUNDLES, NOW)
    assert v.spiffe_id == WEB and v.claims["aud"] == ["svc", "other"]


def test_mint_refuses_foreign_id_and_empty_audience() -> None:
    with pytest.raises(JwtSvidError):
        mint_jwt_svid(AUTH, SpiffeId.parse("spiffe://other.org/x"), ["a"], 60, NOW)
    with pytest.raises(JwtSvidError):
        mint_jwt_svid(AUTH, WEB, [], 60, NOW)


def test_jwks_has_only_jwt_svid_keys_with_kid() -> None:
    doc = json.loads(jwks_json([AUTH]))
    (key,) = doc["keys"]
    assert key["use"] == "jwt-svid" and key["kid"] == "kid-1" and key["kty"] == "EC" and key["crv"] == "P-256"
    assert len(base64.urlsafe_b64decode(key["x"] + "==")) == 32
    # Round trip through pyjwt's JWK parser (what py-spiffe uses).
    pub = jwt.PyJWK(key).key
    assert pub.public_numbers() == AUTH.public_key.public_numbers()


def test_single_string_audience_is_accepted() -> None:
    assert validate_jwt_svid(forge(good_claims(aud="svc")), "svc", BUNDLES, NOW).spiffe_id == WEB


@pytest.mark.parametrize(
    ("token_fn", "code"),
    [
        (lambda: "a.b", "malformed"),
        (lambda: "..", "malformed"),
        (lambda: jwt.encode(good_claims(), key="", algorithm="none"), "malformed"),  # empty signature part
        (lambda: jwt.encode(good_claims(), "secret" * 6, algorithm="HS256", headers={"kid": "kid-1"}), "bad_alg"),
        (lambda: forge(good_claims(), {"typ": "at+jwt"}), "bad_typ"),
        (lambda: forge(good_claims(sub=None)), "no_sub"),
        (lambda: forge(good_claims(sub="spiffe://example.org/")), "bad_sub"),
        (lambda: forge(good_claims(sub="spiffe://other.org/x")), "no_bundle"),
        (lambda: jwt.encode(good_claims(), AUTH.private_key, algorithm="ES256"), "no_kid"),
        (lambda: forge(good_claims(), {"kid": "nope"}), "unknown_kid"),
        (lambda: forge(good_claims(exp=None)), "no_exp"),
        (lambda: forge(good_claims(exp=int(NOW.timestamp()) - 30)), "expired"),
        (lambda: forge(good_claims(aud=None)), "no_aud"),
        (lambda: forge(good_claims(aud=[])), "no_aud"),
        (lambda: forge(good_claims(aud=["other"])), "wrong_aud"),
        (lambda: forge(good_claims(nbf=int(NOW.timestamp()) + 60)), "not_yet_valid"),
    ],
)
def test_validation_rejects(token_fn: Any, code: str) -> None:
    assert reason(token_fn()) == code


def test_alg_none_with_signature_part_is_rejected_before_anything() -> None:
    header = base64.urlsafe_b64encode(b'{"alg":"none","kid":"kid-1"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps(good_claims()).encode()).rstrip(b"=").decode()
    assert reason(f"{header}.{body}.c2ln") == "bad_alg"


def test_signature_by_another_key_is_rejected() -> None:
    other = new_jwt_authority(TD, "kid-1")  # same kid, different key
    token = mint_jwt_svid(other, WEB, ["svc"], 60, NOW)
    assert reason(token) == "bad_signature"


def test_rsa_token_against_ec_key_is_rejected() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(good_claims(), key, algorithm="RS256", headers={"kid": "kid-1"})
    assert reason(token) == "bad_signature"


def test_leeway_and_empty_audience() -> None:
    token = forge(good_claims(exp=int(NOW.timestamp()) - 3))
    assert validate_jwt_svid(token, "svc", BUNDLES, NOW).spiffe_id == WEB  # within the 5 s leeway
    with pytest.raises(JwtSvidError):
        validate_jwt_svid(token, "", BUNDLES, NOW)
