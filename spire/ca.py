"""The in-process CA of the embedded SPIRE: signing authorities, X509-SVID issuance, key rotation (pure).

No I/O, no clock: every function takes `now`. Certificates follow spiffe/spiffe standards/X509-SVID.md:

* leaf (§3.1, §4): exactly one URI SAN (the non-root SPIFFE ID), CA=false, keyUsage critical
  digitalSignature|keyEncipherment|keyAgreement, EKU serverAuth+clientAuth (§4.4: both if present), SKI/AKI.
* signing CA (§3.2, §4): self-signed, CA=true, keyUsage critical keyCertSign|cRLSign, URI SAN
  `spiffe://<td>` (no path, no trailing slash: SPIFFE-ID §2.2), SKI.
* keys: ECDSA P-256; the Workload API wants chains as DER leaf first and keys as unencrypted PKCS#8 (§3.3).
* rotation (`KeyRotation`): one overlap scheme for CAs and JWT signing keys (spire.jwtsvid.JwtKeyManager).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import ClassVar, Final, Generic, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.errors import SidecarError
from sidecar.identity import SpiffeId, TrustDomain

# Certificates are backdated so that a peer whose clock is slightly behind still accepts them (SPIRE does the
# same); rotation and expiry are computed from the issue time, not from notBefore.
BACKDATE: Final = dt.timedelta(seconds=10)
PREPARE_AT: Final = 1 / 2  # fraction of CA lifetime: the next CA joins the bundle
ACTIVATE_AT: Final = 2 / 3  # fraction of CA lifetime: the next CA starts signing


class CaError(SidecarError):
    """A request the CA refuses (e.g. an ID outside its trust domain)."""


def _ceil_second(t: dt.datetime) -> dt.datetime:
    # X.509 times have one-second resolution; never round a notAfter *down* below what rotation assumed.
    return t if t.microsecond == 0 else t.replace(microsecond=0) + dt.timedelta(seconds=1)


def _floor_second(t: dt.datetime) -> dt.datetime:
    return t.replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class X509Authority:
    """A signing CA certificate and its key."""

    trust_domain: TrustDomain
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    issued_at: dt.datetime
    generation: int

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.issued_at


def new_x509_authority(
    trust_domain: TrustDomain, ttl: float, now: dt.datetime, generation: int = 1
) -> X509Authority:
    """A fresh self-signed signing CA for `trust_domain` valid for `ttl` seconds from `now`."""
    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spiffe-sidecar embedded SPIRE"),
            # A distinct subject per generation keeps chain building unambiguous while two CAs overlap.
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain.name} CA {generation}"),
        ]
    )
    not_after = _ceil_second(now + dt.timedelta(seconds=ttl))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_floor_second(now - BACKDATE))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain.id_string())]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .sign(key, hashes.SHA256())
    )
    return X509Authority(trust_domain, cert, key, now, generation)


@dataclass(frozen=True, slots=True)
class IssuedX509Svid:
    """An X509-SVID as the CA issued it. `private_key` is secret: never log or print it."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]  # leaf first
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    issued_at: dt.datetime
    authority_generation: int

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial_number(self) -> int:
        return self.leaf.serial_number

    @property
    def rotate_at(self) -> dt.datetime:
        """Half-life: when the next SVID for this entry is issued."""
        return self.issued_at + (self.not_after - self.issued_at) / 2

    def chain_der(self) -> bytes:
        """DER certificates concatenated, leaf first (Workload API `x509_svid`)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.chain)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pkcs8_der(self) -> bytes:
        """Unencrypted PKCS#8 DER (Workload API `x509_svid_key`). Secret."""
        return self.private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM. Secret: write it with mode 0600."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


LEAF_KEY_USAGE: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=True,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def issue_x509_svid(
    authority: X509Authority,
    spiffe_id: SpiffeId,
    ttl: float,
    now: dt.datetime,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
) -> IssuedX509Svid:
    """Sign a leaf X509-SVID for `spiffe_id`; notAfter is capped at the authority's notAfter."""
    if spiffe_id.is_root:
        raise CaError(f"{spiffe_id}: a leaf SVID needs a non-root path (X509-SVID §3.1)")
    if spiffe_id.trust_domain != authority.trust_domain:
        raise CaError(f"{spiffe_id}: not in trust domain {authority.trust_domain} of this CA")
    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    not_after = min(_ceil_second(now + dt.timedelta(seconds=ttl)), authority.not_after)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    sans += [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    ca_ski = authority.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        # A non-empty subject, so the URI SAN need not be critical (X509-SVID §3.1, RFC 5280 §4.1.2.6).
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spiffe-sidecar embedded SPIRE"),
                    x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id.path.rsplit("/", 1)[-1][:64]),
                ]
            )
        )
        .issuer_name(authority.certificate.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_floor_second(now - BACKDATE))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(LEAF_KEY_USAGE, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(authority.private_key, hashes.SHA256())
    )
    return IssuedX509Svid(spiffe_id, (cert,), key, now, authority.generation)


class _Signer(Protocol):
    @property
    def generation(self) -> int: ...
    @property
    def issued_at(self) -> dt.datetime: ...
    @property
    def not_after(self) -> dt.datetime: ...
    @property
    def lifetime(self) -> dt.timedelta: ...


_A = TypeVar("_A", bound=_Signer)


class KeyRotation(Generic[_A]):
    """The signing keys of one trust domain over time (mutable, pure: the caller passes `now`).

    Rotation with overlap (SPIFFE Trust Domain and Bundle §4, "publish keys before use"):
    * at PREPARE_AT of the active key's life a next key is created and joins the bundle, signing nothing;
    * at ACTIVATE_AT it becomes the active key; the old one moves to `retiring`;
    * a retiring key leaves the bundle only once everything it signed has expired (nothing outlives its
      key, so that is at the latest its own notAfter).
    Subclasses say what a key is (`_new`) and what it signs (`noun`, `signs`).
    """

    noun: ClassVar[str] = "key"
    signs: ClassVar[str] = "credentials"

    def __init__(self, trust_domain: TrustDomain, ttl: float, now: dt.datetime) -> None:
        self.trust_domain = trust_domain
        self.ttl = ttl
        self._generation = 1
        self.active: _A = self._new(now, self._generation)
        self.prepared: _A | None = None
        # generation -> latest expiry of anything it signed
        self._signed_until: dict[int, dt.datetime] = {}
        self.retiring: list[_A] = []

    def _new(self, now: dt.datetime, generation: int) -> _A:
        raise NotImplementedError

    def _name(self, a: _A) -> str:
        return f"{self.noun} {a.generation}"

    def bundle(self) -> tuple[_A, ...]:
        """Every key a relying party must trust now: active, prepared (pre-published), retiring."""
        out = [self.active]
        if self.prepared is not None:
            out.append(self.prepared)
        out += self.retiring
        return tuple(out)

    def record(self, generation: int, expires: dt.datetime) -> None:
        """Note that the key of `generation` signed something valid until `expires`."""
        prev = self._signed_until.get(generation)
        if prev is None or expires > prev:
            self._signed_until[generation] = expires

    def prepare(self, now: dt.datetime) -> bool:
        """Create the next key and publish it in the bundle; False if one is already prepared."""
        if self.prepared is not None:
            return False
        self._generation += 1
        self.prepared = self._new(now, self._generation)
        return True

    def activate(self, now: dt.datetime) -> None:
        """Make the prepared key (created now if needed) the signer; the old one starts retiring."""
        self.prepare(now)
        assert self.prepared is not None
        old = self.active
        self.active, self.prepared = self.prepared, None
        self.retiring.append(old)
        self.prune(now)

    def prune(self, now: dt.datetime) -> bool:
        """Drop retiring keys whose every credential has expired; True if the bundle changed."""
        keep = [a for a in self.retiring if self._retire_at(a) > now]
        changed = len(keep) != len(self.retiring)
        for a in self.retiring:
            if a not in keep:
                self._signed_until.pop(a.generation, None)
        self.retiring = keep
        return changed

    def _retire_at(self, a: _A) -> dt.datetime:
        return min(self._signed_until.get(a.generation, a.issued_at), a.not_after)

    def prepare_at(self) -> dt.datetime:
        return self.active.issued_at + self.active.lifetime * PREPARE_AT

    def activate_at(self) -> dt.datetime:
        return self.active.issued_at + self.active.lifetime * ACTIVATE_AT

    def next_event(self) -> dt.datetime:
        """When `tick` next has something to do."""
        times = [self.activate_at() if self.prepared is not None else self.prepare_at()]
        times += [self._retire_at(a) for a in self.retiring]
        return min(times)

    def tick(self, now: dt.datetime) -> list[str]:
        """Apply every rotation step due at `now`; returns what happened (for logs), empty if nothing."""
        events: list[str] = []
        if self.prepared is None and now >= self.prepare_at():
            self.prepare(now)
            assert self.prepared is not None
            events.append(f"prepared {self._name(self.prepared)} (joins the bundle, not signing yet)")
        if self.prepared is not None and now >= self.activate_at():
            old = self.active
            self.activate(now)
            events.append(
                f"activated {self._name(self.active)}; {self.noun} {old.generation} retires once its "
                f"{self.signs} expire"
            )
        before = {a.generation for a in self.retiring}
        if self.prune(now):
            gone = before - {a.generation for a in self.retiring}
            events.append(f"removed {self.noun} {', '.join(map(str, sorted(gone)))} from the bundle")
        return events


class AuthorityManager(KeyRotation[X509Authority]):
    """The signing CAs of one trust domain over time (see `KeyRotation`)."""

    noun = "CA"
    signs = "SVIDs"

    def __init__(self, trust_domain: TrustDomain, ca_ttl: float, now: dt.datetime) -> None:
        super().__init__(trust_domain, ca_ttl, now)

    @property
    def ca_ttl(self) -> float:
        return self.ttl

    def _new(self, now: dt.datetime, generation: int) -> X509Authority:
        return new_x509_authority(self.trust_domain, self.ttl, now, generation)

    def bundle_der(self) -> bytes:
        return b"".join(a.der for a in self.bundle())

    def bundle_pem(self) -> bytes:
        return b"".join(a.pem for a in self.bundle())

    def issue(
        self,
        spiffe_id: SpiffeId,
        ttl: float,
        now: dt.datetime,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
    ) -> IssuedX509Svid:
        svid = issue_x509_svid(self.active, spiffe_id, ttl, now, dns_names, ip_addresses)
        self.record(svid.authority_generation, svid.not_after)
        return svid


@dataclass(frozen=True, slots=True)
class JwtAuthority:
    """A JWT-SVID signing key of a trust domain (ES256). `kid` is published in the JWT bundle and changes
    with every key (JWT-SVID §6.1)."""

    trust_domain: TrustDomain
    kid: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    issued_at: dt.datetime
    not_after: dt.datetime
    generation: int = 1

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.issued_at


def new_jwt_authority(
    trust_domain: TrustDomain, ttl: float, now: dt.datetime, generation: int = 1, kid: str | None = None
) -> JwtAuthority:
    """A fresh P-256 JWT key valid for `ttl` seconds from `now`, with a random `kid` unless one is given."""
    return JwtAuthority(
        trust_domain,
        kid if kid is not None else secrets.token_urlsafe(24),
        ec.generate_private_key(ec.SECP256R1()),
        now,
        now + dt.timedelta(seconds=ttl),
        generation,
    )
