"""sidecar.svid: own SVID parsing, bundles, contexts, and peer validation (X509-SVID §5.2, Federation §4.2)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.errors import SvidError
from sidecar.identity import SpiffeId, TrustDomain
from sidecar.svid import (
    PeerVerifier,
    Purpose,
    SvidReason,
    X509Bundle,
    X509Context,
    X509Svid,
    split_der_certificates,
    verify_peer,
)
from tests.pki import (
    BAD_LEAF_KINDS,
    CA,
    bad_leaf,
    duplicate_extension,
    new_key,
    tbs_span,
    uri_constraints,
    utcnow,
)

A = TrustDomain.parse("a.test")
B = TrustDomain.parse("b.test")


@pytest.fixture(scope="module")
def root_a() -> CA:
    return CA.root("a.test")


@pytest.fixture(scope="module")
def root_b() -> CA:
    return CA.root("b.test")


def bundles(*cas: CA) -> dict[TrustDomain, X509Bundle]:
    return {TrustDomain.parse(ca.td): X509Bundle.from_der(TrustDomain.parse(ca.td), ca.bundle_der()) for ca in cas}


def reason_of(
    chain: list[bytes], bmap: dict[TrustDomain, X509Bundle], now: dt.datetime | None = None, **kw: Purpose
) -> str:
    with pytest.raises(SvidError) as ei:
        PeerVerifier().verify(chain, bmap, now or utcnow(), **kw)
    return ei.value.reason


REASONS = {r.value for r in SvidReason}


# ----------------------------------------------------------------------------------------------- peer: good


def test_good_leaf(root_a: CA) -> None:
    leaf = root_a.leaf("spiffe://a.test/ns/shop/sa/checkout")
    peer = verify_peer(leaf.der_list(), bundles(root_a), utcnow())
    assert peer.spiffe_id == SpiffeId.parse("spiffe://a.test/ns/shop/sa/checkout")
    assert peer.leaf_sha256_hex == hashlib.sha256(leaf.der_list()[0]).hexdigest()
    assert peer.expires_at == min(leaf.cert.not_valid_after_utc, root_a.cert.not_valid_after_utc)


def test_good_leaf_with_dns_san(root_a: CA) -> None:
    leaf = root_a.leaf("spiffe://a.test/web", dns=["web.shop.svc", "web"])
    assert verify_peer(leaf.der_list(), bundles(root_a), utcnow()).spiffe_id == SpiffeId.parse("spiffe://a.test/web")


def test_good_leaf_via_intermediate(root_a: CA) -> None:
    inter = root_a.intermediate()
    leaf = inter.leaf("spiffe://a.test/inventory")
    assert len(leaf.der_list()) == 2
    peer = verify_peer(leaf.der_list(), bundles(root_a), utcnow())
    assert str(peer.spiffe_id) == "spiffe://a.test/inventory"


def test_good_leaf_via_two_intermediates(root_a: CA) -> None:
    leaf = root_a.intermediate().intermediate().leaf("spiffe://a.test/deep")
    assert len(leaf.der_list()) == 3
    assert str(verify_peer(leaf.der_list(), bundles(root_a), utcnow()).spiffe_id) == "spiffe://a.test/deep"


def test_leaf_without_eku_is_accepted(root_a: CA) -> None:
    # Spec notes §2.2 step 6: EKU is not required of validators.
    leaf = root_a.leaf("spiffe://a.test/w", eku=False)
    verify_peer(leaf.der_list(), bundles(root_a), utcnow())


def test_federated_peer_with_own_bundle_is_accepted(root_a: CA, root_b: CA) -> None:
    leaf = root_b.leaf("spiffe://b.test/partner")
    assert verify_peer(leaf.der_list(), bundles(root_a, root_b), utcnow()).spiffe_id.trust_domain == B


# ----------------------------------------------------------------------------------------------- peer: bad


@pytest.mark.parametrize("kind", [k for k in BAD_LEAF_KINDS if k != "no_key_usage"])
def test_every_bad_leaf_kind_has_its_reason(root_a: CA, kind: str) -> None:
    leaf = bad_leaf(root_a, kind)
    assert reason_of(leaf.der_list(), bundles(root_a)) == kind


def test_leaf_without_key_usage_lacks_digital_signature(root_a: CA) -> None:
    assert reason_of(bad_leaf(root_a, "no_key_usage").der_list(), bundles(root_a)) == "no_digital_signature"


def test_no_certificate(root_a: CA) -> None:
    assert reason_of([], bundles(root_a)) == "no_certificate"


@pytest.mark.parametrize("blob", [b"", b"\x30", b"garbage", b"\x30\x03\x02\x01\x01"])
def test_malformed_certificate(root_a: CA, blob: bytes) -> None:
    assert reason_of([blob], bundles(root_a)) == "malformed_certificate"


def test_malformed_intermediate(root_a: CA) -> None:
    leaf = root_a.leaf()
    assert reason_of([leaf.der_list()[0], b"\x30\x00"], bundles(root_a)) == "malformed_certificate"


def test_wrong_scheme_uri_san_is_invalid_spiffe_id(root_a: CA) -> None:
    leaf = root_a.leaf(uris=["sparfe://a.test/x"])
    assert reason_of(leaf.der_list(), bundles(root_a)) == "invalid_spiffe_id"


def test_spiffe_and_https_uri_sans_are_multiple(root_a: CA) -> None:
    leaf = root_a.leaf(uris=["spiffe://a.test/x", "https://a.test/x"])
    assert reason_of(leaf.der_list(), bundles(root_a)) == "multiple_uri_sans"


def test_untrusted_trust_domain(root_a: CA, root_b: CA) -> None:
    leaf = root_b.leaf("spiffe://b.test/w")
    assert reason_of(leaf.der_list(), bundles(root_a)) == "untrusted_trust_domain"


def test_unknown_ca_same_trust_domain_is_bad_chain(root_a: CA) -> None:
    other = CA.root("a.test")
    assert reason_of(other.leaf("spiffe://a.test/w").der_list(), bundles(root_a)) == "bad_chain"


def test_missing_intermediate_is_bad_chain(root_a: CA) -> None:
    leaf = root_a.intermediate().leaf("spiffe://a.test/w")
    assert reason_of(leaf.der_list()[:1], bundles(root_a)) == "bad_chain"


def test_intermediate_without_key_cert_sign_is_bad_chain(root_a: CA) -> None:
    leaf = root_a.intermediate(key_cert_sign=False).leaf("spiffe://a.test/w")
    assert reason_of(leaf.der_list(), bundles(root_a)) == "bad_chain"


def test_leaf_used_as_issuer_is_bad_chain(root_a: CA) -> None:
    good = root_a.leaf("spiffe://a.test/issuer")
    fake_ca = CA("a.test", good.cert, good.key, (root_a,))
    leaf = fake_ca.leaf("spiffe://a.test/victim")
    assert reason_of(leaf.der_list(), bundles(root_a)) == "bad_chain"


def test_empty_bundle_revokes_everything(root_a: CA) -> None:
    leaf = root_a.leaf("spiffe://a.test/w")
    assert reason_of(leaf.der_list(), {A: X509Bundle(A, ())}) == "bad_chain"


def test_expired_intermediate_is_expired(root_a: CA) -> None:
    now = utcnow()
    inter = root_a.intermediate(not_before=now - dt.timedelta(hours=3), not_after=now - dt.timedelta(hours=1))
    leaf = inter.leaf("spiffe://a.test/w", not_before=now - dt.timedelta(hours=2))
    assert reason_of(leaf.der_list(), bundles(root_a)) == "expired"


def test_too_long_chain_is_bad_chain(root_a: CA) -> None:
    leaf = root_a.leaf()
    assert reason_of(leaf.der_list() * 9, bundles(root_a)) == "bad_chain"


# Federation (Federation §4.2): a b.test leaf signed by a.test's CA must never pass.


def test_federation_foreign_leaf_signed_by_our_ca_only_a_known(root_a: CA) -> None:
    leaf = root_a.leaf("spiffe://b.test/w")
    assert reason_of(leaf.der_list(), bundles(root_a)) == "untrusted_trust_domain"


def test_federation_foreign_leaf_signed_by_our_ca_b_has_own_bundle(root_a: CA, root_b: CA) -> None:
    leaf = root_a.leaf("spiffe://b.test/w")
    assert reason_of(leaf.der_list(), bundles(root_a, root_b)) == "bad_chain"


def test_federation_our_leaf_signed_by_partner_ca(root_a: CA, root_b: CA) -> None:
    leaf = root_b.leaf("spiffe://a.test/admin")
    assert reason_of(leaf.der_list(), bundles(root_a, root_b)) == "bad_chain"


# Certificates that are not on the path (issue 10 item 12): validity is checked on the built path only.


def _expired_root(td: str) -> CA:
    now = utcnow()
    return CA.root(td, not_before=now - dt.timedelta(days=3), not_after=now - dt.timedelta(days=2))


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_unrelated_expired_certificate_appended_is_ignored(root_a: CA) -> None:
    leaf = root_a.intermediate().leaf("spiffe://a.test/w")
    for extra in (_expired_root("z.test").cert, _expired_root("a.test").cert, bad_leaf(root_a, "expired").cert):
        peer = PeerVerifier().verify([*leaf.der_list(), _der(extra)], bundles(root_a), utcnow())
        assert str(peer.spiffe_id) == "spiffe://a.test/w"
        # the peer's expiry is the path's, not the stray certificate's
        assert peer.expires_at == min(c.not_valid_after_utc for c in (*leaf.chain, root_a.cert))


def test_unrelated_not_yet_valid_certificate_appended_is_ignored(root_a: CA) -> None:
    now = utcnow()
    future = CA.root("a.test", not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=2))
    leaf = root_a.leaf("spiffe://a.test/w")
    assert str(verify_peer([*leaf.der_list(), _der(future.cert)], bundles(root_a), now).spiffe_id) == (
        "spiffe://a.test/w"
    )


def test_expired_reissue_of_the_intermediate_next_to_the_valid_one(root_a: CA) -> None:
    # A CA re-issued with the same name and key (SPIRE's upstream rotation): the expired copy presented
    # first must not hide the valid path through the new one.
    now = utcnow()
    new = root_a.intermediate()
    old = root_a.intermediate(key=new.key, subject=new.cert.subject,
                              not_before=now - dt.timedelta(days=3), not_after=now - dt.timedelta(days=2))
    leaf = new.leaf("spiffe://a.test/w")
    chain = [leaf.der_list()[0], _der(old.cert), _der(new.cert)]
    assert str(PeerVerifier().verify(chain, bundles(root_a), now).spiffe_id) == "spiffe://a.test/w"
    # with only the expired copy there is no valid path, and the reason says why
    assert reason_of([leaf.der_list()[0], _der(old.cert)], bundles(root_a)) == "expired"


# URI name constraints (issue 10 item 10): X509-SVID §4.2 lets signing certificates carry them; the
# SPIFFE ID's trust domain is the URI's host, matched per RFC 5280 §4.2.1.10 (`a.test` is that host,
# `.a.test` any host below it, never a.test itself).


def _nc_chain(constraints: x509.NameConstraints, leaf_td: str = "a.test", *, on_root: bool = False,
              dns: tuple[str, ...] = ()) -> tuple[list[bytes], dict[TrustDomain, X509Bundle]]:
    root = CA.root(leaf_td, name_constraints=constraints if on_root else None)
    inter = root.intermediate(name_constraints=None if on_root else constraints)
    leaf = inter.leaf(f"spiffe://{leaf_td}/w", dns=dns)
    return leaf.der_list(), bundles(root)


@pytest.mark.parametrize(
    ("permitted", "excluded", "leaf_td"),
    [
        (["a.test"], [], "a.test"),
        ([".a.test"], [], "east.a.test"),
        (["b.test", "a.test"], [], "a.test"),
        ([], [".a.test"], "a.test"),
        ([], ["b.test"], "a.test"),
        (["a.test"], [".a.test"], "a.test"),
        (["A.Test"], [], "a.test"),  # hosts compare case-insensitively
    ],
)
@pytest.mark.parametrize("on_root", [False, True], ids=["on_intermediate", "on_root"])
def test_uri_name_constraints_that_permit_the_trust_domain(
    permitted: list[str], excluded: list[str], leaf_td: str, on_root: bool
) -> None:
    chain, bmap = _nc_chain(uri_constraints(permitted, excluded), leaf_td, on_root=on_root)
    assert str(verify_peer(chain, bmap, utcnow()).spiffe_id) == f"spiffe://{leaf_td}/w"
    assert str(verify_peer(chain, bmap, utcnow(), purpose=Purpose.SERVER).spiffe_id) == f"spiffe://{leaf_td}/w"


@pytest.mark.parametrize(
    ("permitted", "excluded", "leaf_td"),
    [
        (["b.test"], [], "a.test"),  # permitted-fail
        ([".a.test"], [], "a.test"),  # a domain constraint never matches its own host
        (["a.test"], [], "east.a.test"),  # a host constraint never matches a host below it
        (["A.test.evil"], [], "a.test"),
        ([], ["a.test"], "a.test"),  # excluded hit
        ([], [".a.test"], "east.a.test"),
        (["a.test"], ["a.test"], "a.test"),  # excluded wins over permitted
    ],
)
def test_uri_name_constraints_that_refuse_the_trust_domain(
    permitted: list[str], excluded: list[str], leaf_td: str
) -> None:
    chain, bmap = _nc_chain(uri_constraints(permitted, excluded), leaf_td)
    assert reason_of(chain, bmap) == "name_constraint_violation"


def test_uri_name_constraints_of_the_bundle_root_apply_too() -> None:
    # As OpenSSL does: the root's constraints bind the whole path below it (here the intermediate's own
    # URI SAN spiffe://a.test breaks a `.a.test` constraint, like the leaf's would).
    chain, bmap = _nc_chain(uri_constraints(["b.test"]), "a.test", on_root=True)
    assert reason_of(chain, bmap) == "name_constraint_violation"


def test_constraints_of_every_ca_on_the_path_apply() -> None:
    root = CA.root("a.test", name_constraints=uri_constraints(["a.test", "b.test"]))
    inter = root.intermediate(name_constraints=uri_constraints(excluded=["a.test"]))
    leaf = inter.intermediate().leaf("spiffe://a.test/w")
    assert reason_of(leaf.der_list(), bundles(root)) == "name_constraint_violation"


def test_dns_name_constraints_do_not_constrain_the_spiffe_id() -> None:
    # A DNS subtree constrains DNS SANs only (RFC 5280 §4.2.1.10: a constraint applies to names of its
    # own type): the URI SAN passes; a DNS SAN outside the subtree does not.
    dns_only = x509.NameConstraints(permitted_subtrees=[x509.DNSName("svc.cluster.local")], excluded_subtrees=None)
    chain, bmap = _nc_chain(dns_only, "a.test")
    assert str(verify_peer(chain, bmap, utcnow()).spiffe_id) == "spiffe://a.test/w"
    chain, bmap = _nc_chain(dns_only, "a.test", dns=("web.shop.svc.cluster.local",))
    verify_peer(chain, bmap, utcnow())
    chain, bmap = _nc_chain(dns_only, "a.test", dns=("web.evil.example",))
    assert reason_of(chain, bmap) == "name_constraint_violation"


def test_name_constraints_of_a_type_we_cannot_evaluate_fail_closed() -> None:
    # directoryName subtrees constrain every subject below; we do not evaluate them, so a chain where
    # they apply is refused rather than passed unchecked.
    dn = x509.NameConstraints(
        permitted_subtrees=[x509.DirectoryName(x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "X")]))],
        excluded_subtrees=None,
    )
    chain, bmap = _nc_chain(dn, "a.test")
    assert reason_of(chain, bmap) == "name_constraint_unsupported"


# EKU per direction (issue 10 item 11; X509-SVID §4.4): a client needs clientAuth, a server serverAuth,
# when an EKU is present, on the leaf and on every CA of the path. No EKU at all is accepted.

CLIENT_AUTH, SERVER_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH


@pytest.mark.parametrize(
    ("eku", "as_client", "as_server"),
    [
        ([SERVER_AUTH, CLIENT_AUTH], True, True),
        ([SERVER_AUTH], False, True),
        ([CLIENT_AUTH], True, False),
        ([ExtendedKeyUsageOID.CODE_SIGNING], False, False),
        ([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], False, False),  # as OpenSSL: not a TLS purpose
        ([], True, True),  # no EKU extension at all
    ],
    ids=["both", "server_only", "client_only", "code_signing", "any", "absent"],
)
def test_leaf_eku_is_checked_for_the_direction(
    root_a: CA, eku: list[x509.ObjectIdentifier], as_client: bool, as_server: bool
) -> None:
    chain = root_a.leaf("spiffe://a.test/w", eku=eku or False).der_list()
    for purpose, ok in ((Purpose.CLIENT, as_client), (Purpose.SERVER, as_server)):
        if ok:
            PeerVerifier().verify(chain, bundles(root_a), utcnow(), purpose=purpose)
        else:
            assert reason_of(chain, bundles(root_a), purpose=purpose) == "eku_lacks_purpose"
    if not as_client:  # the default purpose is the inbound one: verifying a client
        with pytest.raises(SvidError) as ei:
            verify_peer(chain, bundles(root_a), utcnow())
        assert ei.value.reason == "eku_lacks_purpose"


@pytest.mark.parametrize(
    ("eku", "as_client", "as_server"),
    [([SERVER_AUTH], False, True), ([CLIENT_AUTH], True, False), ([SERVER_AUTH, CLIENT_AUTH], True, True)],
    ids=["server_only", "client_only", "both"],
)
@pytest.mark.parametrize("where", ["intermediate", "root"])
def test_ca_eku_is_checked_for_the_direction(
    eku: list[x509.ObjectIdentifier], as_client: bool, as_server: bool, where: str
) -> None:
    root = CA.root("a.test", eku=eku if where == "root" else None)
    inter = root.intermediate(eku=eku if where == "intermediate" else None)
    chain = inter.leaf("spiffe://a.test/w").der_list()
    for purpose, ok in ((Purpose.CLIENT, as_client), (Purpose.SERVER, as_server)):
        if ok:
            PeerVerifier().verify(chain, bundles(root), utcnow(), purpose=purpose)
        else:
            assert reason_of(chain, bundles(root), purpose=purpose) == "eku_lacks_purpose"


def test_no_digital_signature_and_wrong_eku_have_their_own_reasons(root_a: CA) -> None:
    no_ds = bad_leaf(root_a, "no_digital_signature").der_list()
    server_only = root_a.leaf("spiffe://a.test/w", eku=[SERVER_AUTH]).der_list()
    assert reason_of(no_ds, bundles(root_a)) == "no_digital_signature"
    assert reason_of(server_only, bundles(root_a)) == "eku_lacks_purpose"


def test_cache_key_includes_the_purpose(root_a: CA) -> None:
    v = PeerVerifier()
    chain = root_a.leaf("spiffe://a.test/w", eku=[CLIENT_AUTH]).der_list()
    v.verify(chain, bundles(root_a), utcnow(), purpose=Purpose.CLIENT)
    with pytest.raises(SvidError) as ei:
        v.verify(chain, bundles(root_a), utcnow(), purpose=Purpose.SERVER)
    assert ei.value.reason == "eku_lacks_purpose"
    v.verify(chain, bundles(root_a), utcnow(), purpose=Purpose.CLIENT)  # still a hit for the client


def test_reason_codes_are_distinct_strings() -> None:
    values = [r.value for r in SvidReason]
    assert len(values) == len(set(values))
    assert SvidReason.BAD_CHAIN.value == "bad_chain"
    assert str(SvidReason.EXPIRED) == "expired"


# ----------------------------------------------------------------------------------------------- cache


def test_cache_rechecks_time_and_bundle(root_a: CA) -> None:
    v = PeerVerifier(maxsize=2)
    leaf = root_a.leaf("spiffe://a.test/w")
    chain = leaf.der_list()
    now = utcnow()
    first = v.verify(chain, bundles(root_a), now)
    assert v.verify(chain, bundles(root_a), now) == first  # hit
    with pytest.raises(SvidError) as ei:
        v.verify(chain, bundles(root_a), now + dt.timedelta(days=2))
    assert ei.value.reason == "expired"
    with pytest.raises(SvidError) as ei:
        v.verify(chain, bundles(root_a), now - dt.timedelta(hours=2))
    assert ei.value.reason == "not_yet_valid"
    # The bundle was rotated to another CA: the cached success must not be used.
    with pytest.raises(SvidError) as ei:
        v.verify(chain, bundles(CA.root("a.test")), now)
    assert ei.value.reason == "bad_chain"
    # The trust domain was removed.
    with pytest.raises(SvidError) as ei:
        v.verify(chain, {}, now)
    assert ei.value.reason == "untrusted_trust_domain"


def test_cache_is_bounded(root_a: CA) -> None:
    v = PeerVerifier(maxsize=3)
    bmap = bundles(root_a)
    for i in range(6):
        v.verify(root_a.leaf(f"spiffe://a.test/w{i}").der_list(), bmap, utcnow())
    assert len(v._cache) == 3


# ----------------------------------------------------------------------------------------------- parse failures
# Issue 10 item 9: every parse failure is an SvidError with its reason, never another exception (a
# DuplicateExtension used to escape and end the PEM source's task, and with it the sidecar).

DUPLICABLE = [ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
              ExtensionOID.SUBJECT_KEY_IDENTIFIER]


@pytest.mark.parametrize("oid", DUPLICABLE, ids=lambda o: o._name)
def test_duplicated_extension_is_malformed_everywhere(root_a: CA, oid: x509.ObjectIdentifier) -> None:
    leaf = root_a.intermediate().leaf("spiffe://a.test/dup")
    der = duplicate_extension(leaf.cert, root_a, oid)  # validly signed; only the extension list is wrong
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    rest = leaf.der_list()[1:]
    # as a peer leaf, and as a peer's intermediate
    assert reason_of([der, *rest], bundles(root_a)) == "malformed_certificate"
    dup_inter = duplicate_extension(leaf.chain[1], root_a, oid)
    assert reason_of([leaf.der_list()[0], dup_inter], bundles(root_a)) == "malformed_certificate"
    # as an own SVID (Workload API and PEM encodings) and in a bundle
    for parse in (
        lambda: X509Svid.from_der(der + b"".join(rest), leaf.key_der()),
        lambda: X509Svid.from_pem(pem + leaf.chain_pem().split(b"-----END CERTIFICATE-----\n", 1)[1], leaf.key_pem()),
        lambda: X509Svid.from_der(leaf.der_list()[0] + dup_inter, leaf.key_der()),
        lambda: X509Bundle.from_der(A, duplicate_extension(root_a.cert, root_a, oid)),
        lambda: X509Bundle.from_pem(A, pem),
    ):
        with pytest.raises(SvidError) as ei:
            parse()
        assert ei.value.reason == "malformed_certificate"
        assert "duplicate" in ei.value.detail.lower()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=4))
def test_random_bytes_never_crash(chain: list[bytes]) -> None:
    with pytest.raises(SvidError):
        verify_peer(chain, {A: X509Bundle(A, ())}, utcnow())


_MUTATION_ROOT = CA.root("a.test")
_MUTATION_SEED = _MUTATION_ROOT.leaf("spiffe://a.test/mutant")
_MUTATION_BUNDLES = bundles(_MUTATION_ROOT)
_SEED_DER = _MUTATION_SEED.der_list()[0]
_SEED_TBS = tbs_span(_SEED_DER)
# One byte that turns the subjectKeyIdentifier OID (2.5.29.14) into subjectAltName's (2.5.29.17): two SANs.
_DUP_SAN = [(_SEED_DER.index(bytes.fromhex("0603551d0e")) + 4, 0x11)]
Mutations = list[tuple[int, int]]
_mutations = st.lists(st.tuples(st.integers(0, len(_SEED_DER) - 1), st.integers(0, 255)), min_size=1, max_size=4)


def _mutate(mutations: Mutations) -> tuple[bytes, bool]:
    """The mutated seed, and whether the bytes its signature covers changed."""
    der = bytearray(_SEED_DER)
    for i, v in mutations:
        der[i] = v
    start, end = _SEED_TBS
    return bytes(der), der[start:end] != _SEED_DER[start:end]


@settings(max_examples=150, deadline=None)
@example(_DUP_SAN)
@given(_mutations)
def test_mutated_certificate_is_rejected_with_a_reason(mutations: Mutations) -> None:
    # A change to the signed bytes (tbsCertificate) can never verify under the CA's key, so each such
    # mutation MUST be refused, with a reason code; only changes outside them (outer framing, the
    # signature's wrapping) may leave a certificate that still verifies, as the same identity.
    der, signed_changed = _mutate(mutations)
    try:
        peer = PeerVerifier().verify([der], _MUTATION_BUNDLES, utcnow())
    except SvidError as e:
        assert e.reason in REASONS
        return
    assert not signed_changed, f"accepted a certificate whose signed bytes changed: {mutations}"
    assert str(peer.spiffe_id) == "spiffe://a.test/mutant"


@settings(max_examples=150, deadline=None)
@example(_DUP_SAN)
@given(_mutations)
def test_mutated_own_svid_and_bundle_parse_or_fail_with_a_reason(mutations: Mutations) -> None:
    # Own SVIDs and bundles come from the Workload API or files; their signatures are not ours to check,
    # but whatever the bytes, the only failure is an SvidError with a reason (what sources catch).
    der, _ = _mutate(mutations)
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"
    for parse in (
        lambda: X509Svid.from_der(der, _MUTATION_SEED.key_der()),
        lambda: X509Svid.from_pem(pem, _MUTATION_SEED.key_pem()),
        lambda: X509Bundle.from_der(A, der),
        lambda: X509Bundle.from_pem(A, pem),
    ):
        try:
            parse()
        except SvidError as e:
            assert e.reason in REASONS


# ----------------------------------------------------------------------------------------------- own SVIDs


def test_svid_from_der_and_pem_roundtrip(root_a: CA) -> None:
    leaf = root_a.intermediate().leaf("spiffe://a.test/web")
    svid = X509Svid.from_der(leaf.chain_der(), leaf.key_der(), hint="internal")
    assert svid.spiffe_id == SpiffeId.parse("spiffe://a.test/web")
    assert svid.hint == "internal"
    assert svid.leaf == leaf.cert
    assert len(svid.cert_chain) == 2
    assert svid.expires_at == leaf.cert.not_valid_after_utc
    assert svid.expires_at.tzinfo is not None
    assert svid.leaf_sha256_hex == hashlib.sha256(leaf.der_list()[0]).hexdigest()
    again = X509Svid.from_pem(svid.chain_pem(), svid.key_pem())
    assert again.cert_chain == svid.cert_chain
    assert svid.key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    # The key never shows in a repr.
    assert "PrivateKey" not in repr(svid) and "BEGIN" not in repr(svid)


def test_svid_accepts_sec1_key_pem(root_a: CA) -> None:
    leaf = root_a.leaf("spiffe://a.test/w")
    sec1 = leaf.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    assert X509Svid.from_pem(leaf.chain_pem(), sec1).spiffe_id == SpiffeId.parse("spiffe://a.test/w")


@pytest.mark.parametrize(
    "kind", ["leaf_is_ca", "multiple_uri_sans", "root_path_id", "no_uri_san", "key_cert_sign", "crl_sign",
             "no_digital_signature", "invalid_spiffe_id"],
)
def test_own_svid_rejects_bad_leaves(root_a: CA, kind: str) -> None:
    leaf = bad_leaf(root_a, kind)
    with pytest.raises(SvidError) as ei:
        X509Svid.from_der(leaf.chain_der(), leaf.key_der())
    assert ei.value.reason == kind


def test_own_svid_expired_is_still_parsed(root_a: CA) -> None:
    # Like go-spiffe Parse: time is the source's business, not the parser's.
    leaf = bad_leaf(root_a, "expired")
    assert X509Svid.from_der(leaf.chain_der(), leaf.key_der()).expires_at < utcnow()


def test_own_svid_key_mismatch(root_a: CA) -> None:
    leaf = root_a.leaf("spiffe://a.test/w")
    other = new_key().private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(SvidError) as ei:
        X509Svid.from_der(leaf.chain_der(), other)
    assert ei.value.reason == "key_mismatch"
    assert "BEGIN" not in str(ei.value)


def test_own_svid_bad_intermediate(root_a: CA) -> None:
    leaf = root_a.leaf("spiffe://a.test/w")
    peer = root_a.leaf("spiffe://a.test/other")  # a leaf, not a CA, placed as "intermediate"
    with pytest.raises(SvidError) as ei:
        X509Svid.from_der(leaf.chain_der() + peer.chain_der(), leaf.key_der())
    assert ei.value.reason == "bad_intermediate"


@pytest.mark.parametrize(
    ("chain", "key", "reason"),
    [
        (b"", b"", "no_certificate"),
        (b"\x30\x82\x05", b"", "malformed_certificate"),
        (None, b"not a key", "malformed_key"),
    ],
)
def test_own_svid_malformed(root_a: CA, chain: bytes | None, key: bytes, reason: str) -> None:
    chain_der = chain if chain is not None else root_a.leaf().chain_der()
    with pytest.raises(SvidError) as ei:
        X509Svid.from_der(chain_der, key)
    assert ei.value.reason == reason


def test_own_svid_encrypted_pem_key_is_malformed(root_a: CA) -> None:
    leaf = root_a.leaf()
    enc = leaf.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(SvidError) as ei:
        X509Svid.from_pem(leaf.chain_pem(), enc)
    assert ei.value.reason == "malformed_key"


def test_own_svid_rsa_key(root_a: CA) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # An RSA leaf key signed by the EC CA: key type of the leaf does not matter to the parser.
    leaf = root_a.leaf("spiffe://a.test/rsa", key=key)  # type: ignore[arg-type]
    svid = X509Svid.from_pem(leaf.chain_pem(), leaf.key_pem())
    assert isinstance(svid.private_key, rsa.RSAPrivateKey)


def test_own_svid_constructor_checks_id(root_a: CA) -> None:
    leaf = root_a.leaf("spiffe://a.test/w")
    with pytest.raises(SvidError) as ei:
        X509Svid(SpiffeId.parse("spiffe://a.test/other"), (leaf.cert,), leaf.key)
    assert ei.value.reason == "id_mismatch"
    assert isinstance(leaf.key, ec.EllipticCurvePrivateKey)


# ----------------------------------------------------------------------------------------------- bundles


def test_split_der_and_bundle_roundtrip(root_a: CA, root_b: CA) -> None:
    der = root_a.bundle_der() + root_b.bundle_der()
    assert split_der_certificates(der) == [root_a.bundle_der(), root_b.bundle_der()]
    bundle = X509Bundle.from_der(A, der)
    assert bundle.authorities == (root_a.cert, root_b.cert)
    assert X509Bundle.from_pem(A, bundle.to_pem()) == bundle
    assert bundle.to_der() == der
    assert X509Bundle.from_der(A, b"").authorities == ()


@pytest.mark.parametrize("blob", [b"\x31\x00", b"\x30\x85\x00\x00\x00\x00\x01", b"\x30\x05\x00", b"\x30"])
def test_split_der_rejects_bad_framing(blob: bytes) -> None:
    with pytest.raises(SvidError) as ei:
        split_der_certificates(blob)
    assert ei.value.reason == "malformed_certificate"


def test_bundle_digest_tracks_content(root_a: CA) -> None:
    b1 = X509Bundle.from_der(A, root_a.bundle_der())
    b2 = X509Bundle.from_der(A, root_a.bundle_der())
    assert b1.digest == b2.digest and b1 == b2
    assert X509Bundle.from_der(B, root_a.bundle_der()).digest != b1.digest


# ----------------------------------------------------------------------------------------------- context


def test_context(root_a: CA, root_b: CA) -> None:
    l1 = root_a.leaf("spiffe://a.test/one")
    l2 = root_a.leaf("spiffe://a.test/two")
    s1 = X509Svid.from_der(l1.chain_der(), l1.key_der())
    s2 = X509Svid.from_der(l2.chain_der(), l2.key_der())
    src = bundles(root_a, root_b)
    ctx = X509Context((s1, s2), src)
    src.clear()  # the context keeps its own immutable copy
    assert ctx.default_svid is s1
    assert ctx.expires_at == s1.expires_at
    assert ctx.bundle_for(B) is not None and ctx.bundle_for(TrustDomain.parse("c.test")) is None
    with pytest.raises(TypeError):
        ctx.bundles[A] = ctx.bundles[B]  # type: ignore[index]
    assert set(ctx.all_authorities()) == {root_a.cert, root_b.cert}
    ctx2 = X509Context((s1,), ctx.bundles)
    assert ctx2.version > ctx.version
    with pytest.raises(AttributeError):
        ctx.version = 0  # type: ignore[misc]


def test_context_all_authorities_deduplicates(root_a: CA) -> None:
    leaf = root_a.leaf("spiffe://a.test/one")
    s = X509Svid.from_der(leaf.chain_der(), leaf.key_der())
    same = X509Bundle.from_der(B, root_a.bundle_der())
    ctx = X509Context((s,), {A: X509Bundle.from_der(A, root_a.bundle_der()), B: same})
    assert ctx.all_authorities() == (root_a.cert,)


def test_context_rejects_empty_and_mismatched(root_a: CA) -> None:
    with pytest.raises(SvidError) as ei:
        X509Context((), {})
    assert ei.value.reason == "no_svid"
    leaf = root_a.leaf()
    s = X509Svid.from_der(leaf.chain_der(), leaf.key_der())
    with pytest.raises(SvidError) as ei:
        X509Context((s,), {B: X509Bundle.from_der(A, root_a.bundle_der())})
    assert ei.value.reason == "bundle_mismatch"


def test_x509_types_are_frozen(root_a: CA) -> None:
    leaf = root_a.leaf()
    s = X509Svid.from_der(leaf.chain_der(), leaf.key_der())
    with pytest.raises(AttributeError):
        s.hint = "x"  # type: ignore[misc]
    assert isinstance(s.leaf, x509.Certificate)
