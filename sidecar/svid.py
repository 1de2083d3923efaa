"""X.509-SVIDs, X.509 bundles and peer chain validation (pure; `cryptography` only, no I/O).

Own SVIDs (from the Workload API or PEM files) are checked like go-spiffe's `x509svid.Parse`; peer chains
like the "recommended validator" of the spec notes (§2.2): X509-SVID §5.2 leaf checks, then RFC 5280 path
validation (`sidecar.x509path`) against the bundle of the *peer ID's* trust domain only (SPIFFE_Federation
§4.2: bundles are never merged), for the direction at hand (`Purpose`, X509-SVID §4.4). `verify_peer` runs
once per TLS handshake, so successful results are cached by purpose, chain digest and bundle digest; time
is re-checked against `now` on every call.

Every certificate is parsed completely where it enters (extensions included), and any parse failure,
whatever `cryptography` calls it, is an SvidError(malformed_certificate): no input stops a source.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .errors import IdentityError, SvidError
from .identity import SpiffeId, TrustDomain
from .x509path import PathError, Purpose, TrustAnchors, validate_path

__all__ = [
    "PeerIdentity",
    "PeerVerifier",
    "Purpose",
    "SvidPrivateKey",
    "SvidReason",
    "X509Bundle",
    "X509Context",
    "X509Svid",
    "split_der_certificates",
    "verify_peer",
]

# Key types usable for a TLS identity; anything else (DSA, X25519, ...) is refused at load time.
SvidPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey

_ExtT = TypeVar("_ExtT", bound=x509.ExtensionType)

# Longest peer chain we look at (leaf + intermediates). SPIRE's deepest real shape is leaf + agent/downstream
# CAs; anything longer is refused before any parsing work.
MAX_PEER_CHAIN: Final = 8


class SvidReason(enum.StrEnum):
    """Stable reason codes carried by `SvidError.reason` (metrics labels, audit lines, tests)."""

    # peer and own SVIDs
    NO_CERTIFICATE = "no_certificate"
    MALFORMED_CERTIFICATE = "malformed_certificate"
    NO_URI_SAN = "no_uri_san"
    MULTIPLE_URI_SANS = "multiple_uri_sans"
    INVALID_SPIFFE_ID = "invalid_spiffe_id"
    ROOT_PATH_ID = "root_path_id"
    LEAF_IS_CA = "leaf_is_ca"
    NO_DIGITAL_SIGNATURE = "no_digital_signature"
    KEY_CERT_SIGN = "key_cert_sign"
    CRL_SIGN = "crl_sign"
    # peer only
    UNTRUSTED_TRUST_DOMAIN = "untrusted_trust_domain"
    BAD_CHAIN = "bad_chain"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    EKU_LACKS_PURPOSE = "eku_lacks_purpose"  # clientAuth/serverAuth missing for the direction (§4.4)
    NAME_CONSTRAINT_VIOLATION = "name_constraint_violation"  # a name outside a CA's subtrees (§4.2)
    NAME_CONSTRAINT_UNSUPPORTED = "name_constraint_unsupported"  # subtrees of a type we do not evaluate
    # own SVIDs / contexts only
    BAD_INTERMEDIATE = "bad_intermediate"
    MALFORMED_KEY = "malformed_key"
    UNSUPPORTED_KEY = "unsupported_key"
    KEY_MISMATCH = "key_mismatch"
    ID_MISMATCH = "id_mismatch"
    NO_SVID = "no_svid"
    BUNDLE_MISMATCH = "bundle_mismatch"


# ---------------------------------------------------------------------------------------------------------
# DER / PEM helpers


def split_der_certificates(data: bytes) -> list[bytes]:
    """Split concatenated DER certificates (the Workload API encoding, spec notes §3.3) into blobs.

    Only the outer SEQUENCE framing is read here; each blob is parsed by `cryptography` afterwards.
    Raises SvidError(malformed_certificate) on truncated or non-SEQUENCE data.
    """
    out: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 2 or data[pos] != 0x30:
            raise SvidError(SvidReason.MALFORMED_CERTIFICATE, f"no DER SEQUENCE at byte {pos}")
        first = data[pos + 1]
        if first < 0x80:
            length, header = first, 2
        else:
            n = first & 0x7F
            # DER: long form only for >= 128 and at most 4 length bytes for anything certificate-sized.
            if n == 0 or n > 4 or end - pos < 2 + n:
                raise SvidError(SvidReason.MALFORMED_CERTIFICATE, f"bad DER length at byte {pos}")
            length = int.from_bytes(data[pos + 2 : pos + 2 + n], "big")
            header = 2 + n
        stop = pos + header + length
        if stop > end:
            raise SvidError(SvidReason.MALFORMED_CERTIFICATE, f"truncated DER certificate at byte {pos}")
        out.append(data[pos:stop])
        pos = stop
    return out


def _parsed(cert: x509.Certificate) -> x509.Certificate:
    """`cert`, fully decoded: `cryptography` parses names, keys and extensions lazily, so a certificate that
    loads can still fail on first use (a duplicated extension raises `x509.DuplicateExtension`, which is
    not a ValueError). Decoding everything here turns every such failure into one SvidError, at the
    boundary. Decoded values are cached by `cryptography`, so this costs nothing later."""
    try:
        _ = cert.extensions, cert.subject, cert.issuer, cert.not_valid_after_utc, cert.not_valid_before_utc
        cert.public_key()
    except Exception as e:  # whatever the parser raises: DuplicateExtension, ValueError, UnsupportedAlgorithm...
        raise SvidError(SvidReason.MALFORMED_CERTIFICATE, _short(e)) from None
    return cert


def _load_der(blob: bytes) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(blob)
    except Exception as e:  # ValueError, InvalidVersion (not a ValueError), ...
        raise SvidError(SvidReason.MALFORMED_CERTIFICATE, _short(e)) from None
    return _parsed(cert)


def _load_der_chain(data: bytes) -> tuple[x509.Certificate, ...]:
    return tuple(_load_der(b) for b in split_der_certificates(data))


def _load_pem_chain(data: bytes) -> tuple[x509.Certificate, ...]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except Exception as e:
        raise SvidError(SvidReason.MALFORMED_CERTIFICATE, _short(e)) from None
    return tuple(_parsed(c) for c in certs)


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _as_svid_key(key: object) -> SvidPrivateKey:
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
                  | ed448.Ed448PrivateKey):
        return key
    raise SvidError(SvidReason.UNSUPPORTED_KEY, f"{type(key).__name__} cannot be used for TLS")


def _spki(key: object) -> bytes:
    pub = key.public_key()  # type: ignore[attr-defined]
    spki: bytes = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return spki


# ---------------------------------------------------------------------------------------------------------
# Leaf checks shared by own and peer SVIDs


def _extension(cert: x509.Certificate, kind: type[_ExtT]) -> _ExtT | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_leaf(cert: x509.Certificate) -> SpiffeId:
    """X509-SVID §2, §3.1, §4.1, §4.3, §5.2 leaf rules; returns the leaf's SPIFFE ID.

    Order matters for stable reasons: identity first (what is it?), then what it may do.
    """
    san = _extension(_parsed(cert), x509.SubjectAlternativeName)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san is not None else []
    if not uris:
        raise SvidError(SvidReason.NO_URI_SAN, "leaf has no URI SAN (X509-SVID §2)")
    if len(uris) > 1:
        raise SvidError(SvidReason.MULTIPLE_URI_SANS, f"leaf has {len(uris)} URI SANs (X509-SVID §2)")
    try:
        sid = SpiffeId.parse(uris[0])
    except IdentityError as e:
        raise SvidError(SvidReason.INVALID_SPIFFE_ID, str(e)) from None
    if sid.is_root:
        raise SvidError(SvidReason.ROOT_PATH_ID, f"{sid} has no path; a leaf needs one (X509-SVID §3.1)")
    bc = _extension(cert, x509.BasicConstraints)
    ku = _extension(cert, x509.KeyUsage)
    if bc is not None and bc.ca:
        raise SvidError(SvidReason.LEAF_IS_CA, f"{sid}: leaf has CA=true (X509-SVID §4.1)")
    if ku is not None and ku.key_cert_sign:
        raise SvidError(SvidReason.KEY_CERT_SIGN, f"{sid}: leaf has keyCertSign (X509-SVID §4.3)")
    if ku is not None and ku.crl_sign:
        raise SvidError(SvidReason.CRL_SIGN, f"{sid}: leaf has cRLSign (X509-SVID §4.3)")
    if ku is None or not ku.digital_signature:
        raise SvidError(SvidReason.NO_DIGITAL_SIGNATURE, f"{sid}: leaf lacks digitalSignature (X509-SVID §4.3)")
    return sid


def _check_intermediate(cert: x509.Certificate, index: int) -> None:
    """go-spiffe Parse: every certificate after the leaf is a signing certificate (X509-SVID §3.2, §4.1)."""
    bc = _extension(_parsed(cert), x509.BasicConstraints)
    ku = _extension(cert, x509.KeyUsage)
    if bc is None or not bc.ca:
        raise SvidError(SvidReason.BAD_INTERMEDIATE, f"chain certificate {index} is not a CA (X509-SVID §4.1)")
    if ku is None or not ku.key_cert_sign:
        raise SvidError(SvidReason.BAD_INTERMEDIATE, f"chain certificate {index} lacks keyCertSign (X509-SVID §4.3)")


# ---------------------------------------------------------------------------------------------------------
# Bundles, SVIDs, contexts


@dataclass(frozen=True, slots=True)
class X509Bundle:
    """The X.509 authorities of one trust domain; always kept bound to its trust domain (Bundle §3)."""

    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...]
    # Identity of the content (sha256 over the DER of the authorities), for caches keyed by bundle.
    digest: bytes = field(init=False, repr=False, compare=False)
    # Built once: the path builder's anchors for this trust domain only (None for an empty bundle).
    _anchors: TrustAnchors | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        auth = tuple(_parsed(c) for c in self.authorities)
        object.__setattr__(self, "authorities", auth)
        h = hashlib.sha256(self.trust_domain.name.encode())
        for c in auth:
            h.update(_der(c))
        object.__setattr__(self, "digest", h.digest())
        object.__setattr__(self, "_anchors", TrustAnchors(auth) if auth else None)

    @classmethod
    def from_der(cls, trust_domain: TrustDomain, der_bytes: bytes) -> X509Bundle:
        """Concatenated DER certificates, as the Workload API sends them (spec notes §3.3)."""
        return cls(trust_domain, _load_der_chain(der_bytes))

    @classmethod
    def from_pem(cls, trust_domain: TrustDomain, pem_bytes: bytes) -> X509Bundle:
        """A PEM file of CA certificates (ca.crt, svid_bundle.pem)."""
        return cls(trust_domain, _load_pem_chain(pem_bytes))

    def to_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.authorities)

    def to_der(self) -> bytes:
        return b"".join(_der(c) for c in self.authorities)


@dataclass(frozen=True, slots=True)
class X509Svid:
    """An own X.509-SVID: chain (leaf first) and its private key, validated on construction.

    Construction checks what go-spiffe's `x509svid.Parse` checks: one URI SAN holding `spiffe_id` with a
    non-root path, leaf CA=false with digitalSignature and without keyCertSign/cRLSign, every further
    certificate CA=true with keyCertSign, and the private key matching the leaf. Expiry is not checked
    here (sources decide what to do with an expired SVID). Raises SvidError(reason, detail).
    """

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    private_key: SvidPrivateKey = field(repr=False, compare=False)
    hint: str = ""
    _leaf_sha256: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        chain = tuple(self.cert_chain)
        object.__setattr__(self, "cert_chain", chain)
        if not chain:
            raise SvidError(SvidReason.NO_CERTIFICATE, "empty certificate chain")
        leaf_id = _check_leaf(chain[0])
        if leaf_id != self.spiffe_id:
            raise SvidError(SvidReason.ID_MISMATCH, f"leaf URI SAN is {leaf_id}, expected {self.spiffe_id}")
        for i, cert in enumerate(chain[1:], start=1):
            _check_intermediate(cert, i)
        key = _as_svid_key(self.private_key)
        if _spki(key) != _spki(chain[0]):
            raise SvidError(SvidReason.KEY_MISMATCH, f"{leaf_id}: private key does not match the leaf certificate")
        object.__setattr__(self, "_leaf_sha256", hashlib.sha256(_der(chain[0])).hexdigest())

    @classmethod
    def _from_certs(cls, chain: tuple[x509.Certificate, ...], key: object, hint: str) -> X509Svid:
        if not chain:
            raise SvidError(SvidReason.NO_CERTIFICATE, "empty certificate chain")
        sid = _check_leaf(chain[0])
        return cls(sid, chain, _as_svid_key(key), hint)

    @classmethod
    def from_der(cls, chain_der: bytes, key_der: bytes, hint: str = "") -> X509Svid:
        """Workload API encoding: concatenated DER chain (leaf first) and unencrypted PKCS#8 DER key."""
        chain = _load_der_chain(chain_der)
        if not chain:
            raise SvidError(SvidReason.NO_CERTIFICATE, "empty certificate chain")
        try:
            key = serialization.load_der_private_key(key_der, password=None)
        except (ValueError, TypeError) as e:
            raise SvidError(SvidReason.MALFORMED_KEY, _short(e)) from None
        return cls._from_certs(chain, key, hint)

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes, hint: str = "") -> X509Svid:
        """File encoding (tls.crt/tls.key, svid.pem/svid_key.pem): PEM chain and PKCS#8/SEC1/PKCS#1 key."""
        chain = _load_pem_chain(chain_pem)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise SvidError(SvidReason.MALFORMED_KEY, _short(e)) from None
        return cls._from_certs(chain, key, hint)

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]

    @property
    def expires_at(self) -> dt.datetime:
        """The leaf's notAfter (UTC)."""
        return self.cert_chain[0].not_valid_after_utc

    @property
    def leaf_sha256_hex(self) -> str:
        """Hex sha256 of the leaf DER (x-forwarded-client-cert `Hash=`)."""
        return self._leaf_sha256

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.cert_chain)

    def key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM, for `SSLContext.load_cert_chain`. Never log it."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


_VERSIONS = itertools.count(1)


def _next_version() -> int:
    return next(_VERSIONS)


@dataclass(frozen=True, slots=True, eq=False)
class X509Context:
    """An immutable snapshot: own SVIDs (first = default identity, Workload API §8) + bundles by trust domain.

    `version` increases with every snapshot built in this process; use it (or identity) as a cache key.
    """

    svids: tuple[X509Svid, ...]
    bundles: Mapping[TrustDomain, X509Bundle]
    version: int = field(default_factory=_next_version)

    def __post_init__(self) -> None:
        svids = tuple(self.svids)
        if not svids:
            raise SvidError(SvidReason.NO_SVID, "an X509Context needs at least one SVID")
        frozen = MappingProxyType(dict(self.bundles))
        for td, bundle in frozen.items():
            if bundle.trust_domain != td:
                raise SvidError(
                    SvidReason.BUNDLE_MISMATCH, f"bundle of {bundle.trust_domain} stored under {td}"
                )
        object.__setattr__(self, "svids", svids)
        object.__setattr__(self, "bundles", frozen)

    @property
    def default_svid(self) -> X509Svid:
        return self.svids[0]

    @property
    def expires_at(self) -> dt.datetime:
        """The default SVID's expiry: past it, this context must not be served."""
        return self.svids[0].expires_at

    def bundle_for(self, td: TrustDomain) -> X509Bundle | None:
        return self.bundles.get(td)

    def all_authorities(self) -> tuple[x509.Certificate, ...]:
        """Union of all bundles, de-duplicated. ONLY for OpenSSL's trust store (so that the handshake can
        complete); the SPIFFE decision is `verify_peer`, per trust domain (Federation §4.2)."""
        seen: set[bytes] = set()
        out: list[x509.Certificate] = []
        for td in sorted(self.bundles, key=lambda t: t.name):
            for c in self.bundles[td].authorities:
                d = _der(c)
                if d not in seen:
                    seen.add(d)
                    out.append(c)
        return tuple(out)


def bundles_by_trust_domain(bundles: Iterable[X509Bundle]) -> dict[TrustDomain, X509Bundle]:
    """Index bundles by trust domain; the first bundle of a trust domain wins."""
    out: dict[TrustDomain, X509Bundle] = {}
    for b in bundles:
        out.setdefault(b.trust_domain, b)
    return out


# ---------------------------------------------------------------------------------------------------------
# Peer validation


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """An authenticated peer: its SPIFFE ID, its leaf's sha256 (hex), and when the verified chain expires."""

    spiffe_id: SpiffeId
    leaf_sha256_hex: str
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    peer: PeerIdentity
    bundle_digest: bytes
    not_before: dt.datetime  # latest notBefore over the verified path
    not_after: dt.datetime  # earliest notAfter over the verified path


class PeerVerifier:
    """Validates peer X.509-SVID chains; caches successes (bounded LRU keyed by purpose and chain digest).

    A cache hit is only used when the peer's trust domain still maps to a bundle with the same digest,
    and the verified path's validity window is re-checked against `now` on every call.
    """

    __slots__ = ("_cache", "_maxsize")

    def __init__(self, maxsize: int = 4096) -> None:
        self._maxsize = maxsize
        self._cache: OrderedDict[bytes, _CacheEntry] = OrderedDict()

    def clear(self) -> None:
        self._cache.clear()

    def verify(
        self,
        chain: Sequence[bytes],
        ctx_bundles: Mapping[TrustDomain, X509Bundle],
        now: dt.datetime,
        purpose: Purpose = Purpose.CLIENT,
    ) -> PeerIdentity:
        """Authenticate a peer chain (leaf first, DER each) presented in the TLS role `purpose`.
        Raises SvidError with a `SvidReason`."""
        if not chain:
            raise SvidError(SvidReason.NO_CERTIFICATE, "peer presented no certificate")
        if len(chain) > MAX_PEER_CHAIN:
            raise SvidError(SvidReason.BAD_CHAIN, f"peer chain has {len(chain)} certificates (max {MAX_PEER_CHAIN})")
        # The purpose is part of the key: a chain good for a client may lack serverAuth (X509-SVID §4.4).
        h = hashlib.sha256(purpose.value.encode() + b"\0")
        for blob in chain:
            h.update(len(blob).to_bytes(4, "big"))
            h.update(blob)
        key = h.digest()
        hit = self._cache.get(key)
        if hit is not None:
            bundle = ctx_bundles.get(hit.peer.spiffe_id.trust_domain)
            if bundle is not None and bundle.digest == hit.bundle_digest:
                self._cache.move_to_end(key)
                if now > hit.not_after:
                    raise SvidError(SvidReason.EXPIRED, f"{hit.peer.spiffe_id}: chain expired at {hit.not_after}")
                if now < hit.not_before:
                    raise SvidError(
                        SvidReason.NOT_YET_VALID, f"{hit.peer.spiffe_id}: chain not valid before {hit.not_before}"
                    )
                return hit.peer
        entry = self._verify_uncached(chain, ctx_bundles, now, purpose)
        self._cache[key] = entry
        if len(self._cache) > self._maxsize:
            self._cache.popitem(last=False)
        return entry.peer

    @staticmethod
    def _verify_uncached(
        chain: Sequence[bytes], ctx_bundles: Mapping[TrustDomain, X509Bundle], now: dt.datetime, purpose: Purpose
    ) -> _CacheEntry:
        certs = [_load_der(bytes(b)) for b in chain]
        leaf = certs[0]
        sid = _check_leaf(leaf)
        # Select the bundle by the peer ID's trust domain (Workload API §4.6; Federation §4.2).
        bundle = ctx_bundles.get(sid.trust_domain)
        if bundle is None:
            raise SvidError(SvidReason.UNTRUSTED_TRUST_DOMAIN, f"{sid}: no bundle for trust domain {sid.trust_domain}")
        if bundle._anchors is None:
            # An empty bundle revokes every SVID of the trust domain (Trust Domain and Bundle §4.1.3).
            raise SvidError(SvidReason.BAD_CHAIN, f"{sid}: the bundle of {sid.trust_domain} is empty")
        # RFC 5280 path to THAT bundle; presented certificates off the path are ignored, their validity too.
        try:
            path = validate_path(leaf, certs[1:], bundle._anchors, now, purpose)
        except PathError as e:
            raise SvidError(SvidReason(e.reason), f"{sid}: {e.detail} (bundle of {sid.trust_domain})") from None
        peer = PeerIdentity(sid, hashlib.sha256(chain[0]).hexdigest(), path.not_after)
        return _CacheEntry(peer, bundle.digest, path.not_before, path.not_after)


_DEFAULT_VERIFIER: Final = PeerVerifier()


def verify_peer(
    chain: Sequence[bytes],
    ctx_bundles: Mapping[TrustDomain, X509Bundle],
    now: dt.datetime,
    purpose: Purpose = Purpose.CLIENT,
) -> PeerIdentity:
    """Authenticate a peer's presented chain (DER each, leaf first) with the process-wide cached verifier.

    `purpose` is the peer's TLS role: CLIENT (inbound, the default) or SERVER (outbound). Checks, in order:
    every presented certificate parses; exactly one URI SAN holding a valid SPIFFE ID with a non-root
    path; leaf CA=false, no keyCertSign, no cRLSign, digitalSignature set; a bundle exists for the ID's
    trust domain; an RFC 5280 path to THAT bundle (never the union) on which every certificate is valid at
    `now`, EKUs allow `purpose` and name constraints hold (`sidecar.x509path`). Raises SvidError whose
    `reason` is a `SvidReason` value.
    """
    return _DEFAULT_VERIFIER.verify(chain, ctx_bundles, now, purpose)
