"""spire.jwtsvid: minting, JWT key rotation and JWKS bundles (validation: tests/unit/test_jwtsvid.py)."""

from __future__ import annotations

import base64
import datetime as dt
import json

import jwt
import pytest

from sidecar.errors import JwtSvidError
from sidecar.identity import SpiffeId, TrustDomain
from sidecar.jwtsvid import JwtBundle, validate
from spire.ca import ACTIVATE_AT, PREPARE_AT, new_jwt_authority
from spire.jwtsvid import JwtKeyManager, jwks_json, mint_jwt_svid

TD = TrustDomain("example.org")
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
WEB = SpiffeId.parse("spiffe://example.org/web")
AUTH = new_jwt_authority(TD, 3600, NOW, kid="kid-1")


def bundles(*auths: object) -> dict[TrustDomain, JwtBundle]:
    return {TD: JwtBundle.from_workload_api(TD, jwks_json(list(auths)))}  # type: ignore[arg-type]


def test_mint_header_and_claims() -> None:
    token = mint_jwt_svid(AUTH, WEB, ["svc", "other"], 300, NOW)
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "kid-1", "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims == {"sub": str(WEB), "aud": ["svc", "other"], "exp": int(NOW.timestamp()) + 300,
                      "iat": int(NOW.timestamp())}
    v = validate(token, audience="other", bundles=bundles(AUTH), now=NOW.timestamp())
    assert v.subject == WEB and v.audience == ("svc", "other")


def test_mint_drops_empty_audiences_and_refuses_none_left_or_foreign_ids() -> None:
    token = mint_jwt_svid(AUTH, WEB, ["", "svc", ""], 60, NOW)
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == ["svc"]  # as SPIRE's server
    with pytest.raises(JwtSvidError):
        mint_jwt_svid(AUTH, SpiffeId.parse("spiffe://other.org/x"), ["a"], 60, NOW)
    for aud in ([], [""], ["", ""]):
        with pytest.raises(JwtSvidError):
            mint_jwt_svid(AUTH, WEB, aud, 60, NOW)


def test_token_never_outlives_its_key() -> None:
    short = new_jwt_authority(TD, 100, NOW)
    token = mint_jwt_svid(short, WEB, ["svc"], 3600, NOW)
    assert jwt.decode(token, options={"verify_signature": False})["exp"] == int(NOW.timestamp()) + 100


def test_jwks_forms() -> None:
    (key,) = json.loads(jwks_json([AUTH]))["keys"]
    assert "use" not in key  # what SPIRE's Workload API sends (standard JWKS)
    assert key["kid"] == "kid-1" and key["kty"] == "EC" and key["crv"] == "P-256"
    assert len(base64.urlsafe_b64decode(key["x"] + "==")) == 32
    (spiffe,) = json.loads(jwks_json([AUTH], spiffe_bundle=True))["keys"]
    assert spiffe == {**key, "use": "jwt-svid"}
    # Round trip through pyjwt's JWK parser (what py-spiffe uses).
    assert jwt.PyJWK(key).key.public_numbers() == AUTH.public_key.public_numbers()


def test_jwt_key_rotation_steps() -> None:
    """Prepare at 1/2 (published, not signing), activate at 2/3 with a new kid, keep the old key until the
    last token it signed has expired, then drop it."""
    mgr = JwtKeyManager(TD, 600, NOW)
    first = mgr.active
    assert mgr.next_event() == mgr.prepare_at() == NOW + first.lifetime * PREPARE_AT
    assert mgr.tick(NOW + dt.timedelta(seconds=1)) == []
    events = mgr.tick(mgr.prepare_at())
    assert events and f"prepared JWT key 2 kid={mgr.bundle()[1].kid}" in events[0]
    assert [a.generation for a in mgr.bundle()] == [1, 2]
    t_tok = mgr.prepare_at()
    old_token = mgr.mint(WEB, ["svc"], 120, t_tok)
    assert jwt.get_unverified_header(old_token)["kid"] == first.kid
    t_act = NOW + first.lifetime * ACTIVATE_AT
    events = mgr.tick(t_act)
    assert any("activated JWT key 2" in e for e in events)
    assert mgr.active.generation == 2 and mgr.active.kid != first.kid
    assert [a.generation for a in mgr.bundle()] == [2, 1]
    new_token = mgr.mint(WEB, ["svc"], 120, t_act)
    assert jwt.get_unverified_header(new_token)["kid"] == mgr.active.kid
    b = {TD: JwtBundle.from_keys(TD, mgr.public_keys())}
    for token in (old_token, new_token):
        assert validate(token, audience="svc", bundles=b, now=t_act.timestamp()).subject == WEB
    old_exp = dt.datetime.fromtimestamp(jwt.decode(old_token, options={"verify_signature": False})["exp"], dt.UTC)
    assert mgr.tick(old_exp - dt.timedelta(seconds=1)) == []
    assert mgr.tick(old_exp) == ["removed JWT key 1 from the bundle"]
    assert [a.generation for a in mgr.bundle()] == [2]


def test_unused_jwt_key_leaves_at_once_and_keys_hide_their_secret() -> None:
    mgr = JwtKeyManager(TD, 600, NOW)
    first = mgr.active
    mgr.activate(NOW)
    assert [a.generation for a in mgr.bundle()] == [2] and mgr.active.kid != first.kid
    assert first.kid in repr(first) and "EllipticCurvePrivateKey" not in repr(first)
