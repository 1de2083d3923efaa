"""RFC 5280 certification path building and validation for SPIFFE peer chains (pure; `cryptography` only).

Why not `cryptography.x509.verification` (used until issue 10): it refuses every chain whose CAs carry URI
name constraints ("unsupported name constraint"), which X509-SVID §4.2 allows on signing certificates, and
it checks one EKU on every CA whatever the direction. Here `cryptography` parses and checks signatures; the
path is built and checked in this module, with the same policy its WebPKI profile applied before:

* the path runs from the leaf to a certificate of the trust domain's bundle (the trust anchor), through the
  presented intermediates in any order; certificates that end up off the path are ignored, time included
  (issue 10 item 12); candidates are tried depth first, bounded in depth and in signature checks;
* every certificate on the path, the anchor included, must be valid at `now`;
* CAs (intermediates and anchor): basicConstraints critical with cA, keyUsage with keyCertSign (X509-SVID
  §4.1, §4.3), pathLenConstraint (RFC 5280 §4.2.1.9), no unrecognised critical extension (§4.2);
* EKU (X509-SVID §4.4, RFC 5280 §4.2.1.12): where present, on the leaf and on every CA, it must hold the
  direction's purpose (`Purpose`): clientAuth for a peer that is a TLS client, serverAuth for a server.
  anyExtendedKeyUsage alone does not count (OpenSSL's ssl_client/ssl_server purposes refuse it too);
  no EKU at all is accepted (spec notes §2.2: validators need not require one);
* name constraints (RFC 5280 §4.2.1.10) of every CA on the path, the anchor's too (as OpenSSL applies
  them), bind every certificate below it except self-issued intermediates (§6.1.3 b, c). URI subtrees are
  matched on the URI's host, i.e. a SPIFFE ID's trust domain: `a.test` is that host, `.a.test` any host
  below it (never a.test itself). dNSName and iPAddress subtrees are matched on names of their own type
  only, so they never constrain a SPIFFE ID. Any other subtree type (directoryName, rfc822Name, ...) is not
  evaluated: where names of that type occur below it, the chain is refused (fail closed);
* algorithms as WebPKI: CA keys RSA >= 2048 bits or EC P-256/P-384/P-521, signatures RSA PKCS#1 v1.5 / PSS
  or ECDSA with SHA-256/384/512.

Certificates come in parsed by `sidecar.svid` (extensions already decoded). Failures raise `PathError` whose
`reason` is one of the `sidecar.svid.SvidReason` values listed below.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, SignatureAlgorithmOID

__all__ = ["PathError", "Purpose", "TrustAnchors", "ValidPath", "validate_path"]

# Reason codes (values of sidecar.svid.SvidReason).
BAD_CHAIN: Final = "bad_chain"
EXPIRED: Final = "expired"
NOT_YET_VALID: Final = "not_yet_valid"
EKU_LACKS_PURPOSE: Final = "eku_lacks_purpose"
NAME_CONSTRAINT_VIOLATION: Final = "name_constraint_violation"
NAME_CONSTRAINT_UNSUPPORTED: Final = "name_constraint_unsupported"

# Intermediates between leaf and anchor; and signature checks per validation (a hostile peer presents at
# most sidecar.svid.MAX_PEER_CHAIN certificates, but same-named ones multiply the candidate paths).
MAX_INTERMEDIATES: Final = 8
MAX_SIGNATURE_CHECKS: Final = 32


class Purpose(enum.StrEnum):
    """The TLS role the peer authenticates in, for its EKU (X509-SVID §4.4)."""

    CLIENT = "client"  # inbound: the peer is a TLS client (id-kp-clientAuth)
    SERVER = "server"  # outbound: the peer is a TLS server (id-kp-serverAuth)

    @property
    def eku(self) -> x509.ObjectIdentifier:
        return ExtendedKeyUsageOID.CLIENT_AUTH if self is Purpose.CLIENT else ExtendedKeyUsageOID.SERVER_AUTH


class PathError(Exception):
    """No valid path: `reason` is a reason code (module constants), `detail` one line."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class ValidPath:
    """A validated path, leaf first and trust anchor last, and the window in which all of it is valid."""

    certs: tuple[x509.Certificate, ...]
    not_before: dt.datetime
    not_after: dt.datetime


class TrustAnchors:
    """The CA certificates of one trust domain's bundle, indexed by subject for path building."""

    __slots__ = ("_by_subject",)

    def __init__(self, certs: Sequence[x509.Certificate]) -> None:
        self._by_subject: dict[x509.Name, list[x509.Certificate]] = {}
        for c in certs:
            self._by_subject.setdefault(c.subject, []).append(c)

    def issuers_of(self, cert: x509.Certificate) -> list[x509.Certificate]:
        return self._by_subject.get(cert.issuer, [])


# ---------------------------------------------------------------------------------------------------------
# Per-certificate checks


_RECOGNISED_CRITICAL: Final = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.NAME_CONSTRAINTS,
})
_SIGNATURE_ALGORITHMS: Final = frozenset({
    SignatureAlgorithmOID.ECDSA_WITH_SHA256, SignatureAlgorithmOID.ECDSA_WITH_SHA384,
    SignatureAlgorithmOID.ECDSA_WITH_SHA512, SignatureAlgorithmOID.RSA_WITH_SHA256,
    SignatureAlgorithmOID.RSA_WITH_SHA384, SignatureAlgorithmOID.RSA_WITH_SHA512, SignatureAlgorithmOID.RSASSA_PSS,
})
_PSS_HASHES: Final = frozenset({"sha256", "sha384", "sha512"})
_CURVES: Final = frozenset({"secp256r1", "secp384r1", "secp521r1"})


_ExtT = TypeVar("_ExtT", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, kind: type[_ExtT]) -> x509.Extension[_ExtT] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _what(index: int) -> str:
    return "leaf" if index == 0 else f"path certificate {index}"


def _check_basics(cert: x509.Certificate, index: int, now: dt.datetime) -> None:
    """What every certificate on the path needs: known critical extensions (RFC 5280 §4.2), validity."""
    for e in cert.extensions:
        if e.critical and e.oid not in _RECOGNISED_CRITICAL:
            raise PathError(BAD_CHAIN, f"{_what(index)} has an unrecognised critical extension {e.oid.dotted_string}")
    if now > cert.not_valid_after_utc:
        raise PathError(EXPIRED, f"{_what(index)} expired at {cert.not_valid_after_utc.isoformat()}")
    if now < cert.not_valid_before_utc:
        raise PathError(NOT_YET_VALID, f"{_what(index)} not valid before {cert.not_valid_before_utc.isoformat()}")


def _check_eku(cert: x509.Certificate, index: int, purpose: Purpose) -> None:
    ext = _ext(cert, x509.ExtendedKeyUsage)
    if ext is not None and purpose.eku not in ext.value:
        name = "clientAuth" if purpose is Purpose.CLIENT else "serverAuth"
        raise PathError(
            EKU_LACKS_PURPOSE,
            f"{_what(index)}: extended key usage lacks {name}, needed by a TLS {purpose} (X509-SVID §4.4)",
        )


def _check_signature(child: x509.Certificate, issuer: x509.Certificate, index: int) -> None:
    """`child` (path certificate index - 1) signed by `issuer` (index), with an accepted algorithm."""
    oid = child.signature_algorithm_oid
    if oid not in _SIGNATURE_ALGORITHMS:
        raise PathError(BAD_CHAIN, f"{_what(index - 1)}: signature algorithm {oid.dotted_string} is not accepted")
    try:
        if oid == SignatureAlgorithmOID.RSASSA_PSS:
            algorithm = child.signature_hash_algorithm
            if algorithm is None or algorithm.name not in _PSS_HASHES:
                raise PathError(BAD_CHAIN, f"{_what(index - 1)}: RSA-PSS signature with an unaccepted hash")
        child.verify_directly_issued_by(issuer)
    except PathError:
        raise
    except Exception as e:  # InvalidSignature, or a key/parameter cryptography cannot use: not the issuer
        raise PathError(
            BAD_CHAIN, f"{_what(index - 1)}: signature does not verify with the key of a candidate issuer "
                       f"({type(e).__name__})"
        ) from None


def _check_ca(cert: x509.Certificate, index: int, below: Sequence[x509.Certificate]) -> None:
    """X509-SVID §4.1/§4.3 and RFC 5280 §4.2.1.9 for a CA with the path `below` it (leaf first); and a
    signing key of the WebPKI sizes (the leaf's key only proves possession in the handshake: OpenSSL's)."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise PathError(BAD_CHAIN, f"{_what(index)} has a {key.key_size}-bit RSA key (minimum 2048)")
    elif not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES):
        raise PathError(BAD_CHAIN, f"{_what(index)} has an unsupported CA key type ({type(key).__name__})")
    bc = _ext(cert, x509.BasicConstraints)
    if bc is None or not bc.value.ca:
        raise PathError(BAD_CHAIN, f"{_what(index)} is not a CA (X509-SVID §4.1)")
    if not bc.critical:
        raise PathError(BAD_CHAIN, f"{_what(index)}: basicConstraints is not critical (RFC 5280 §4.2.1.9)")
    ku = _ext(cert, x509.KeyUsage)
    if ku is None or not ku.value.key_cert_sign:
        raise PathError(BAD_CHAIN, f"{_what(index)} lacks keyCertSign (X509-SVID §4.3)")
    if bc.value.path_length is not None:
        intermediates = sum(1 for c in below[1:] if not _self_issued(c))
        if intermediates > bc.value.path_length:
            raise PathError(
                BAD_CHAIN, f"{_what(index)} allows {bc.value.path_length} intermediates below it, the path has "
                           f"{intermediates} (RFC 5280 §4.2.1.9)"
            )


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


# ---------------------------------------------------------------------------------------------------------
# Name constraints (RFC 5280 §4.2.1.10)

_EVALUATED: Final = (x509.UniformResourceIdentifier, x509.DNSName, x509.IPAddress)


def _uri_host(uri: str) -> str | None:
    try:
        host = urllib.parse.urlsplit(uri).hostname
    except ValueError:
        return None
    return host or None


def _host_matches(host: str, constraint: str) -> bool:
    """URI subtree: `.example.org` is any host below example.org, `example.org` exactly that host."""
    c = constraint.lower()
    return host.endswith(c) if c.startswith(".") else host == c


def _dns_matches(name: str, constraint: str) -> bool:
    """dNSName subtree: the name itself or anything with labels added on the left (`.x` only the latter)."""
    n, c = name.lower().rstrip("."), constraint.lower().rstrip(".")
    if not c:
        return True
    if c.startswith("."):
        return n.endswith(c)
    return n == c or n.endswith("." + c)


def _matches(name: x509.GeneralName, subtree: x509.GeneralName) -> bool:
    if isinstance(subtree, x509.UniformResourceIdentifier) and isinstance(name, x509.UniformResourceIdentifier):
        host = _uri_host(name.value)
        return host is not None and _host_matches(host, subtree.value)
    if isinstance(subtree, x509.DNSName) and isinstance(name, x509.DNSName):
        return _dns_matches(name.value, subtree.value)
    if isinstance(subtree, x509.IPAddress) and isinstance(name, x509.IPAddress):
        net, addr = subtree.value, name.value
        return (
            isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network)
            and isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address)
            and addr.version == net.version
            and addr in net
        )
    return False


def _names(cert: x509.Certificate) -> Iterator[x509.GeneralName]:
    """The names a constraint can bind: SAN entries, the subject (directoryName) and its e-mail attributes."""
    san = _ext(cert, x509.SubjectAlternativeName)
    if san is not None:
        yield from san.value
    if len(cert.subject) > 0:
        yield x509.DirectoryName(cert.subject)
    for attr in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        yield x509.RFC822Name(str(attr.value))


def _check_name_constraints(cert: x509.Certificate, index: int, below: Sequence[x509.Certificate]) -> None:
    ext = _ext(cert, x509.NameConstraints)
    if ext is None:
        return
    permitted = list(ext.value.permitted_subtrees or ())
    excluded = list(ext.value.excluded_subtrees or ())
    constrained = {type(s) for s in (*permitted, *excluded)}
    for i, child in enumerate(below):
        if i > 0 and _self_issued(child):
            continue  # RFC 5280 §6.1.3 (b): self-issued intermediates are not bound
        for name in _names(child):
            kind = type(name)
            if kind not in constrained:
                continue
            if kind not in _EVALUATED:
                raise PathError(
                    NAME_CONSTRAINT_UNSUPPORTED,
                    f"{_what(index)} constrains {kind.__name__} names, which are not evaluated; {_what(i)} has one",
                )
            same = [s for s in permitted if type(s) is kind]
            if same and not any(_matches(name, s) for s in same):
                raise PathError(
                    NAME_CONSTRAINT_VIOLATION,
                    f"{_what(i)} name {_show(name)} is outside the permitted subtrees of {_what(index)}",
                )
            hit = next((s for s in excluded if type(s) is kind and _matches(name, s)), None)
            if hit is not None:
                raise PathError(
                    NAME_CONSTRAINT_VIOLATION,
                    f"{_what(i)} name {_show(name)} is in the excluded subtree {_show(hit)} of {_what(index)}",
                )


def _show(name: x509.GeneralName) -> str:
    text = str(getattr(name, "value", name))
    return repr(text if len(text) <= 100 else text[:97] + "...")


# ---------------------------------------------------------------------------------------------------------
# Path building


@dataclass(slots=True)
class _Search:
    intermediates: Sequence[x509.Certificate]
    anchors: TrustAnchors
    now: dt.datetime
    purpose: Purpose
    signature_checks: int = 0
    best: PathError | None = None  # the failure that got furthest
    best_depth: int = -1

    def fail(self, err: PathError, depth: int) -> None:
        if depth > self.best_depth:
            self.best, self.best_depth = err, depth

    def extend(self, path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        """A valid continuation of `path` (leaf first, all checked) up to an anchor, or None."""
        cur = path[-1]
        depth = len(path)
        candidates = [(c, True) for c in self.anchors.issuers_of(cur)]
        candidates += [(c, False) for c in self.intermediates if c.subject == cur.issuer]
        if not candidates:
            self.fail(PathError(BAD_CHAIN, f"no issuer for {_what(depth - 1)} in the chain or the bundle"), depth)
            return None
        for cand, is_anchor in candidates:
            if any(cand is c or cand == c for c in path):
                continue  # no certificate twice on one path (loops)
            if not is_anchor and depth > MAX_INTERMEDIATES:
                self.fail(PathError(BAD_CHAIN, f"path longer than {MAX_INTERMEDIATES} intermediates"), depth)
                continue
            if self.signature_checks >= MAX_SIGNATURE_CHECKS:
                self.fail(PathError(BAD_CHAIN, "too many candidate issuers"), depth)
                return None
            self.signature_checks += 1
            try:
                _check_signature(cur, cand, depth)
                _check_basics(cand, depth, self.now)
                _check_ca(cand, depth, path)
                _check_eku(cand, depth, self.purpose)
                _check_name_constraints(cand, depth, path)
            except PathError as e:
                self.fail(e, depth)
                continue
            if is_anchor:
                return [*path, cand]
            found = self.extend([*path, cand])
            if found is not None:
                return found
        return None


def validate_path(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: TrustAnchors,
    now: dt.datetime,
    purpose: Purpose,
) -> ValidPath:
    """Build and check a path from `leaf` to one of `anchors`; raises PathError with the failure that got
    furthest when there is none. `intermediates` may hold extra or unrelated certificates, in any order."""
    _check_basics(leaf, 0, now)
    _check_eku(leaf, 0, purpose)
    search = _Search(intermediates, anchors, now, purpose)
    path = search.extend([leaf])
    if path is None:
        assert search.best is not None
        raise search.best
    return ValidPath(
        tuple(path),
        max(c.not_valid_before_utc for c in path),
        min(c.not_valid_after_utc for c in path),
    )
