"""spire.ca: certificate fields per the X509-SVID spec, and CA rotation with overlap."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from sidecar.identity import SpiffeId, TrustDomain
from spire.ca import (
    ACTIVATE_AT,
    PREPARE_AT,
    AuthorityManager,
    CaError,
    issue_x509_svid,
    new_jwt_authority,
    new_x509_authority,
)

TD = TrustDomain("example.org")
T0 = dt.datetime(2030, 1, 1, 12, 0, 0, 250_000, tzinfo=dt.UTC)
WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")


def uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def verify(leaf: x509.Certificate, roots: list[x509.Certificate], at: dt.datetime) -> None:
    """RFC 5280 path validation (cryptography's verifier, client profile: checks EKU clientAuth too)."""
    verifier = PolicyBuilder().store(Store(roots)).time(at).build_client_verifier()
    verifier.verify(leaf, [])


def test_ca_certificate_fields() -> None:
    ca = new_x509_authority(TD, 3600, T0)
    c = ca.certificate
    assert c.issuer == c.subject  # self-signed
    c.verify_directly_issued_by(c)
    bc = c.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    ku = c.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert uris(c) == ["spiffe://example.org"]  # no path, no trailing slash (SPIFFE-ID §2.2)
    assert c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(c.public_key(), ec.EllipticCurvePublicKey)
    assert c.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert c.not_valid_after_utc == dt.datetime(2030, 1, 1, 13, 0, 1, tzinfo=dt.UTC)  # rounded up
    assert c.not_valid_before_utc < T0
    assert "private_key" not in repr(ca) or "EllipticCurvePrivateKey" not in repr(ca)


def test_leaf_fields_follow_x509_svid_spec() -> None:
    ca = new_x509_authority(TD, 3600, T0)
    svid = issue_x509_svid(ca, WEB, 60, T0, dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    leaf = svid.leaf
    assert svid.chain == (leaf,)
    assert uris(leaf) == [str(WEB)]  # exactly one URI SAN (§2)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False  # §4.1
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical  # §4.3
    assert ku.value.digital_signature and ku.value.key_encipherment and ku.value.key_agreement
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}  # §4.4
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key()).digest
    assert leaf.subject.rfc4514_string()  # non-empty subject: the URI SAN need not be critical
    assert not leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).critical
    # Validity: ttl from the issue time, rounded up to a second; backdated notBefore.
    assert svid.not_after == dt.datetime(2030, 1, 1, 12, 1, 1, tzinfo=dt.UTC)
    assert svid.rotate_at == T0 + (svid.not_after - T0) / 2
    verify(leaf, [ca.certificate], T0)


def test_workload_api_encodings() -> None:
    ca = new_x509_authority(TD, 3600, T0)
    svid = issue_x509_svid(ca, WEB, 60, T0)
    assert x509.load_der_x509_certificate(svid.chain_der()) == svid.leaf  # one DER cert, the leaf
    key = serialization.load_der_private_key(svid.key_pkcs8_der(), password=None)
    assert svid.key_pkcs8_der().startswith(b"\x30")  # PKCS#8 PrivateKeyInfo SEQUENCE
    assert key.public_key() == svid.leaf.public_key()
    assert b"BEGIN PRIVATE KEY" in svid.key_pem()  # PKCS#8, unencrypted
    assert "EllipticCurvePrivateKey" not in repr(svid)


def test_leaf_is_capped_at_ca_expiry_and_refuses_bad_ids() -> None:
    ca = new_x509_authority(TD, 30, T0)
    svid = issue_x509_svid(ca, WEB, 3600, T0)
    assert svid.not_after == ca.not_after
    with pytest.raises(CaError, match="non-root"):
        issue_x509_svid(ca, SpiffeId.parse("spiffe://example.org"), 60, T0)
    with pytest.raises(CaError, match="not in trust domain"):
        issue_x509_svid(ca, SpiffeId.parse("spiffe://other.org/x"), 60, T0)


def test_rotation_overlap_keeps_every_svid_verifiable() -> None:
    """Drive the manager through two full CA lifetimes with a fake clock; at every step, every SVID
    issued so far that is still valid verifies against the bundle of that moment."""
    ca_ttl = 60.0
    mgr = AuthorityManager(TD, ca_ttl, T0)
    issued = []
    bundles_sizes = set()
    signers = set()
    t = T0
    for _ in range(240):  # 2 s steps over 480 s: several rotations
        t += dt.timedelta(seconds=2)
        mgr.tick(t)
        svid = mgr.issue(WEB, 10, t)
        issued.append(svid)
        signers.add(svid.authority_generation)
        bundle = [a.certificate for a in mgr.bundle()]
        bundles_sizes.add(len(bundle))
        for s in issued:
            if s.not_after > t:
                verify(s.leaf, bundle, t)
    assert len(signers) >= 6
    assert bundles_sizes >= {1, 2}  # alone between rotations, overlapping around them


def test_rotation_steps() -> None:
    mgr = AuthorityManager(TD, 60, T0)
    first = mgr.active
    assert mgr.next_event() == mgr.prepare_at() == T0 + first.lifetime * PREPARE_AT
    assert mgr.tick(T0 + dt.timedelta(seconds=1)) == []
    # Prepare: the next CA joins the bundle but does not sign.
    events = mgr.tick(mgr.prepare_at())
    assert events and "prepared CA 2" in events[0]
    assert [a.generation for a in mgr.bundle()] == [1, 2]
    svid = mgr.issue(WEB, 30, mgr.prepare_at())
    assert svid.authority_generation == 1
    # Activate: CA 2 signs; CA 1 stays until the SVID it signed has expired.
    t_act = T0 + first.lifetime * ACTIVATE_AT
    events = mgr.tick(t_act)
    assert any("activated CA 2" in e for e in events)
    assert mgr.active.generation == 2 and [a.generation for a in mgr.bundle()] == [2, 1]
    assert mgr.issue(WEB, 30, t_act).authority_generation == 2
    mgr.tick(svid.not_after - dt.timedelta(seconds=1))
    assert 1 in [a.generation for a in mgr.bundle()]
    events = mgr.tick(svid.not_after)
    assert "removed CA 1 from the bundle" in events
    assert 1 not in [a.generation for a in mgr.bundle()]


def test_forced_activation_of_unused_ca_drops_it() -> None:
    mgr = AuthorityManager(TD, 60, T0)
    mgr.activate(T0)  # nothing signed by CA 1: it can leave at once
    assert [a.generation for a in mgr.bundle()] == [2]


def test_wrong_ca_does_not_verify() -> None:
    a = new_x509_authority(TD, 60, T0)
    b = new_x509_authority(TD, 60, T0, generation=2)
    svid = issue_x509_svid(a, WEB, 30, T0)
    with pytest.raises(VerificationError):
        verify(svid.leaf, [b.certificate], T0)


def test_jwt_authority_key_is_p256_and_hidden() -> None:
    j = new_jwt_authority(TD, 60, T0, kid="kid1")
    assert j.public_key.curve.name == "secp256r1"
    assert "kid1" in repr(j) and "EllipticCurvePrivateKey" not in repr(j)
