"""sidecar.x509path: RFC 5280 path building, and agreement with `cryptography`'s verifier where it can judge.

The verifier of `cryptography` (WebPKI profile) was the chain check until it had to go (it refuses every URI
name constraint, X509-SVID §4.2). On every chain without name constraints, our path validation must accept
and refuse exactly what it accepted and refused, with the leaf EKU left aside as it was (the differential
test); what it could not do is tested in test_svid.py (name constraints, EKU per direction, stray certs).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from sidecar import x509path
from sidecar.svid import SvidReason
from sidecar.x509path import (
    MAX_SIGNATURE_CHECKS,
    PathError,
    Purpose,
    TrustAnchors,
    _dns_matches,
    _host_matches,
    validate_path,
)
from tests.pki import utcnow

NOW = utcnow()
AnyKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
UNKNOWN = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1")


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: AnyKey


def _key(kind: str = "ec") -> AnyKey:
    if kind == "rsa1024":
        return rsa.generate_private_key(65537, 1024)
    if kind == "rsa2048":
        return rsa.generate_private_key(65537, 2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "secp256k1":
        return ec.generate_private_key(ec.SECP256K1())
    return ec.generate_private_key(ec.SECP256R1())


def issue(
    issuer: Issued | None,
    name: str,
    *,
    ca: bool = True,
    bc: bool = True,
    bc_critical: bool = True,
    key_cert_sign: bool = True,
    path_length: int | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = None,
    key: str = "ec",
    hash_alg: hashes.HashAlgorithm | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    unknown_critical: bool = False,
    uri: str | None = None,
    issuer_name: x509.Name | None = None,
) -> Issued:
    """A certificate built directly with cryptography (a CA unless `ca=False`), signed by `issuer` (or self)."""
    k = _key(key)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key = issuer.key if issuer else k
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name or (issuer.cert.subject if issuer else subject))
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - dt.timedelta(hours=1))
        .not_valid_after(not_after or NOW + dt.timedelta(hours=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
    )
    if issuer is not None:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    if bc:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None),
                            critical=bc_critical)
    b = b.add_extension(
        x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                      data_encipherment=False, key_agreement=False, key_cert_sign=ca and key_cert_sign,
                      crl_sign=ca, encipher_only=False, decipher_only=False),
        critical=True,
    )
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if uri is not None:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
    if unknown_critical:
        b = b.add_extension(x509.UnrecognizedExtension(UNKNOWN, b"\x05\x00"), critical=True)
    algorithm = None if isinstance(signer_key, ed25519.Ed25519PrivateKey) else (hash_alg or hashes.SHA256())
    return Issued(b.sign(signer_key, algorithm), k)  # type: ignore[arg-type]


def leaf(issuer: Issued, **kw: object) -> Issued:
    kw.setdefault("eku", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    return issue(issuer, "leaf", ca=False, uri="spiffe://a.test/w", **kw)  # type: ignore[arg-type]


Case = tuple[x509.Certificate, list[x509.Certificate], list[x509.Certificate]]  # leaf, presented, anchors


def _chain(*levels: Callable[[Issued | None], Issued], leaf_kw: dict[str, object] | None = None,
           extra: Sequence[x509.Certificate] = ()) -> Case:
    """root = levels[0](None), each next level issued by the previous; a leaf below the last."""
    cas: list[Issued] = []
    for make in levels:
        cas.append(make(cas[-1] if cas else None))
    end = leaf(cas[-1], **(leaf_kw or {}))
    return end.cert, [c.cert for c in reversed(cas[1:])] + list(extra), [cas[0].cert]


def _root(**kw: object) -> Callable[[Issued | None], Issued]:
    return lambda parent: issue(parent, "root", **kw)  # type: ignore[arg-type]


def _inter(name: str = "inter", **kw: object) -> Callable[[Issued | None], Issued]:
    return lambda parent: issue(parent, name, **kw)  # type: ignore[arg-type]


PAST = dict(not_before=NOW - dt.timedelta(days=3), not_after=NOW - dt.timedelta(days=2))
FUTURE = dict(not_before=NOW + dt.timedelta(days=2), not_after=NOW + dt.timedelta(days=3))
CLIENT_ONLY = [ExtendedKeyUsageOID.CLIENT_AUTH]
SERVER_ONLY = [ExtendedKeyUsageOID.SERVER_AUTH]

CASES: dict[str, Callable[[], Case]] = {
    "root_only": lambda: _chain(_root()),
    "one_intermediate": lambda: _chain(_root(), _inter()),
    "three_intermediates": lambda: _chain(_root(), _inter("i1"), _inter("i2"), _inter("i3")),
    "rsa_chain": lambda: _chain(_root(key="rsa2048"), _inter(key="rsa2048"), leaf_kw={"key": "rsa2048"}),
    "expired_root": lambda: _chain(_root(**PAST), _inter()),
    "future_root": lambda: _chain(_root(**FUTURE), _inter()),
    "expired_intermediate": lambda: _chain(_root(), _inter(**PAST)),
    "future_intermediate": lambda: _chain(_root(), _inter(**FUTURE)),
    "expired_leaf": lambda: _chain(_root(), leaf_kw=PAST),
    "intermediate_not_ca": lambda: _chain(_root(), _inter(ca=False)),
    "intermediate_without_bc": lambda: _chain(_root(), _inter(bc=False)),
    "intermediate_bc_not_critical": lambda: _chain(_root(), _inter(bc_critical=False)),
    "intermediate_without_key_cert_sign": lambda: _chain(_root(), _inter(key_cert_sign=False)),
    "root_not_ca": lambda: _chain(_root(ca=False), _inter()),
    "path_len_0_with_one_below": lambda: _chain(_root(path_length=0), _inter()),
    "path_len_0_on_last": lambda: _chain(_root(), _inter(path_length=0)),
    "path_len_1_with_two_below": lambda: _chain(_root(path_length=1), _inter("i1"), _inter("i2")),
    "path_len_1_with_one_below": lambda: _chain(_root(path_length=1), _inter("i1")),
    "path_len_1_then_0": lambda: _chain(_root(path_length=1), _inter("i1", path_length=0), _inter("i2")),
    "unknown_critical_on_intermediate": lambda: _chain(_root(), _inter(unknown_critical=True)),
    "unknown_critical_on_leaf": lambda: _chain(_root(), leaf_kw={"unknown_critical": True}),
    "rsa_1024_intermediate": lambda: _chain(_root(), _inter(key="rsa1024")),
    "secp256k1_intermediate": lambda: _chain(_root(), _inter(key="secp256k1")),
    "ed25519_leaf_key": lambda: _chain(_root(), leaf_kw={"key": "ed25519"}),
    "rsa_1024_leaf_key": lambda: _chain(_root(), leaf_kw={"key": "rsa1024"}),
    "ed25519_root": lambda: _chain(_root(key="ed25519"), _inter()),
    "rsa_1024_root": lambda: _chain(_root(key="rsa1024"), _inter()),
    "ed25519_intermediate": lambda: _chain(_root(), _inter(key="ed25519")),
    "sha224_signature": lambda: _chain(_root(), _inter(hash_alg=hashes.SHA224())),
    "sha512_signature": lambda: _chain(_root(), _inter(hash_alg=hashes.SHA512())),
    "intermediate_eku_client": lambda: _chain(_root(), _inter(eku=CLIENT_ONLY)),
    "intermediate_eku_server": lambda: _chain(_root(), _inter(eku=SERVER_ONLY)),
    "root_eku_server": lambda: _chain(_root(eku=SERVER_ONLY), _inter()),
    "missing_intermediate": lambda: (lambda c: (c[0], [], c[2]))(_chain(_root(), _inter())),
    "reversed_intermediates": lambda: (lambda c: (c[0], c[1][::-1], c[2]))(
        _chain(_root(), _inter("i1"), _inter("i2"), _inter("i3"))
    ),
    "unrelated_extra_certificates": lambda: _chain(_root(), _inter(), extra=[issue(None, "x").cert,
                                                                            issue(None, "y").cert]),
    "unrelated_expired_extra": lambda: _chain(_root(), _inter(), extra=[issue(None, "x", **PAST).cert]),
    "same_name_other_key_root": lambda: (lambda c: (c[0], c[1], [issue(None, "root").cert]))(_chain(_root())),
    "wrong_issuer_name": lambda: (lambda r: (leaf(r).cert, [], [issue(None, "other").cert]))(issue(None, "root")),
}


def _cryptography_accepts(case: Case) -> bool:
    end, presented, anchors = case
    verifier = (
        PolicyBuilder().store(Store(anchors)).time(NOW).max_chain_depth(8)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    try:
        verifier.verify(end, presented)
    except VerificationError:
        return False
    return True


def _ours_accepts(case: Case) -> bool:
    end, presented, anchors = case
    try:
        validate_path(end, presented, TrustAnchors(anchors), NOW, Purpose.CLIENT)
    except PathError:
        return False
    return True


@pytest.mark.parametrize("name", list(CASES))
def test_agrees_with_cryptography_verifier_without_name_constraints(name: str) -> None:
    case = CASES[name]()
    assert _ours_accepts(case) == _cryptography_accepts(case)


def test_differential_cases_cover_both_verdicts() -> None:
    verdicts = {n: _ours_accepts(make()) for n, make in CASES.items()}
    assert 8 <= sum(verdicts.values()) <= len(verdicts) - 15, verdicts


def test_reasons_of_path_failures() -> None:
    def reason(case: Case, purpose: Purpose = Purpose.CLIENT) -> str:
        end, presented, anchors = case
        with pytest.raises(PathError) as ei:
            validate_path(end, presented, TrustAnchors(anchors), NOW, purpose)
        return ei.value.reason

    assert reason(CASES["expired_root"]()) == "expired"
    assert reason(CASES["future_intermediate"]()) == "not_yet_valid"
    assert reason(CASES["intermediate_eku_server"]()) == "eku_lacks_purpose"
    assert reason(CASES["intermediate_eku_client"](), Purpose.SERVER) == "eku_lacks_purpose"
    for name in ("path_len_0_with_one_below", "unknown_critical_on_leaf", "sha224_signature", "missing_intermediate",
                 "same_name_other_key_root", "rsa_1024_intermediate"):
        assert reason(CASES[name]()) == "bad_chain", name


def test_reason_codes_are_svid_reasons() -> None:
    for name in ("BAD_CHAIN", "EXPIRED", "NOT_YET_VALID", "EKU_LACKS_PURPOSE", "NAME_CONSTRAINT_VIOLATION",
                 "NAME_CONSTRAINT_UNSUPPORTED"):
        assert SvidReason(getattr(x509path, name)).name == name


def test_valid_path_is_the_built_path_and_its_window() -> None:
    end, presented, anchors = CASES["unrelated_extra_certificates"]()
    path = validate_path(end, presented, TrustAnchors(anchors), NOW, Purpose.SERVER)
    assert path.certs == (end, presented[0], anchors[0])
    assert path.not_after == min(c.not_valid_after_utc for c in path.certs)
    assert path.not_before == max(c.not_valid_before_utc for c in path.certs)


def test_many_same_named_candidates_are_bounded() -> None:
    # Seven intermediates with one name, none the real issuer: the search gives up after a bounded number
    # of signature checks instead of trying every order.
    root = issue(None, "root")
    real = issue(root, "inter")
    decoys = [issue(root, "inter", issuer_name=real.cert.subject).cert for _ in range(7)]
    end = leaf(issue(None, "inter")).cert  # issued by a stranger of the same name
    with pytest.raises(PathError) as ei:
        validate_path(end, decoys, TrustAnchors([root.cert]), NOW, Purpose.CLIENT)
    assert ei.value.reason == "bad_chain"
    assert MAX_SIGNATURE_CHECKS >= 7


@pytest.mark.parametrize(
    ("host", "constraint", "ok"),
    [
        ("a.test", "a.test", True),
        ("a.test", "A.TEST", True),
        ("a.test", ".a.test", False),
        ("x.a.test", ".a.test", True),
        ("x.y.a.test", ".a.test", True),
        ("xa.test", ".a.test", False),
        ("x.a.test", "a.test", False),
        ("a.test", "", False),
    ],
)
def test_uri_host_matching(host: str, constraint: str, ok: bool) -> None:
    assert _host_matches(host, constraint) is ok


@pytest.mark.parametrize(
    ("name", "constraint", "ok"),
    [
        ("example.org", "example.org", True),
        ("www.example.org", "example.org", True),
        ("www.example.org", ".example.org", True),
        ("example.org", ".example.org", False),
        ("badexample.org", "example.org", False),
        ("WWW.Example.org.", "example.ORG", True),
        ("anything", "", True),
    ],
)
def test_dns_matching(name: str, constraint: str, ok: bool) -> None:
    assert _dns_matches(name, constraint) is ok
