"""Test PKI: SPIFFE CAs and X.509-SVIDs built with `cryptography`, good ones and deliberately bad ones.

Small API, shared by every test that needs certificates::

    root = CA.root("a.test")                    # self-signed CA, URI SAN spiffe://a.test
    inter = root.intermediate()                 # CA signed by root (CA:TRUE, keyCertSign)
    svid = inter.leaf("spiffe://a.test/web")    # good leaf; svid.chain = (leaf, inter)
    svid.chain_der(), svid.key_der()            # Workload API encodings (concatenated DER, PKCS#8 DER)
    svid.chain_pem(), svid.key_pem()            # file encodings (tls.crt / tls.key)
    root.bundle_der(), root.bundle_pem()        # the trust bundle (root only)

Bad leaves are built with `CA.leaf(...)` keyword arguments (see its docstring), or by name with
`bad_leaf(ca, kind)` for the kinds in `BAD_LEAF_KINDS`. CAs may carry name constraints and an EKU
(`CA.root(..., name_constraints=uri_constraints(...), eku=[...])`). Certificates `cryptography` refuses to
build (a duplicated extension) are made by editing DER and re-signing: `duplicate_extension(...)`.
Keys are EC P-256 (fast to generate). Everything here is test-only: no secrets, no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

PrivateKey = ec.EllipticCurvePrivateKey

_UNSET = object()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> PrivateKey:
    """A fresh EC P-256 key (what SPIRE uses by default)."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False,
    key_encipherment: bool = False, key_agreement: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=key_encipherment,
        data_encipherment=False, key_agreement=key_agreement, key_cert_sign=key_cert_sign,
        crl_sign=crl_sign, encipher_only=False, decipher_only=False,
    )


@dataclass(frozen=True)
class Leaf:
    """An issued leaf: `cert`, its `key`, and `chain` = (leaf, intermediates...) without the root."""

    cert: x509.Certificate
    key: PrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]

    def chain_der(self) -> bytes:
        """Concatenated DER, leaf first: the Workload API's `x509_svid` field."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.chain)

    def der_list(self) -> list[bytes]:
        """One DER blob per certificate, leaf first: what a TLS peer presents."""
        return [c.public_bytes(serialization.Encoding.DER) for c in self.chain]

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_der(self) -> bytes:
        """PKCS#8 DER, unencrypted: the Workload API's `x509_svid_key` field."""
        return self.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


@dataclass(frozen=True)
class CA:
    """A signing authority of trust domain `td`; `parents` are the CAs above it (nearest first)."""

    td: str
    cert: x509.Certificate
    key: PrivateKey = field(repr=False)
    parents: tuple[CA, ...] = ()

    @classmethod
    def root(
        cls, td: str = "a.test", *, not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None, key: PrivateKey | None = None,
        name_constraints: x509.NameConstraints | None = None, eku: Sequence[ObjectIdentifier] | None = None,
    ) -> CA:
        """A self-signed root CA for `td` with URI SAN `spiffe://<td>` (valid -1h..+1 day by default).
        `name_constraints` and `eku` add those extensions (X509-SVID §4.2, §4.4: a CA MAY carry them)."""
        key = key or new_key()
        now = utcnow()
        name = _name(f"{td} root CA")
        b = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(hours=1))
            .not_valid_after(not_after or now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{td}")]),
                           critical=False)
        )
        cert = _ca_extras(b, name_constraints, eku).sign(key, hashes.SHA256())
        return cls(td, cert, key)

    def _builder(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
                 not_before: dt.datetime | None, not_after: dt.datetime | None) -> x509.CertificateBuilder:
        now = utcnow()
        return (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(minutes=5))
            .not_valid_after(not_after or now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )

    def intermediate(
        self, td: str | None = None, *, key_cert_sign: bool = True, ca: bool = True,
        not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
        name_constraints: x509.NameConstraints | None = None, eku: Sequence[ObjectIdentifier] | None = None,
        path_length: int | None = None, key: PrivateKey | None = None, subject: x509.Name | None = None,
    ) -> CA:
        """An intermediate CA signed by this CA (SPIRE's "upstream"/agent CA shape). `name_constraints`,
        `eku` and `path_length` add those; `key` and `subject` reuse a key/name (a re-issued CA)."""
        td = td or self.td
        key = key or new_key()
        b = (
            self._builder(subject or _name(f"{td} intermediate CA"), key.public_key(), not_before, not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
            .add_extension(_key_usage(key_cert_sign=key_cert_sign, crl_sign=True), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{td}")]),
                           critical=False)
        )
        cert = _ca_extras(b, name_constraints, eku).sign(self.key, hashes.SHA256())
        return CA(td, cert, key, (self, *self.parents))

    def leaf(
        self,
        spiffe_id: str | None = None,
        *,
        uris: Sequence[str] | None = None,
        dns: Iterable[str] = (),
        ca: bool = False,
        digital_signature: bool = True,
        key_cert_sign: bool = False,
        crl_sign: bool = False,
        key_usage: bool = True,
        eku: bool | Sequence[ObjectIdentifier] = True,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key: PrivateKey | None = None,
        chain_extra: Sequence[x509.Certificate] | None = None,
    ) -> Leaf:
        """Issue a leaf X.509-SVID shaped like SPIRE's (X509-SVID §4), unless told otherwise.

        `spiffe_id` defaults to `spiffe://<td>/workload`. `uris` overrides the URI SANs entirely (`[]` for
        none, two for "multiple"). `dns` adds DNS SANs. `ca`, `digital_signature`, `key_cert_sign`,
        `crl_sign` set the flags; `key_usage=False` omits the KeyUsage extension; `eku=False` omits
        ExtendedKeyUsage, a list of OIDs replaces SPIRE's (serverAuth, clientAuth). Validity defaults to
        -5 min .. +1 h. `chain_extra` replaces the intermediates put after the leaf in `Leaf.chain`
        (default: this CA's intermediates, excluding the root).
        """
        key = key or new_key()
        sid = spiffe_id if spiffe_id is not None else f"spiffe://{self.td}/workload"
        uri_list = list(uris) if uris is not None else [sid]
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uri_list]
        names += [x509.DNSName(d) for d in dns]
        b = self._builder(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]),
                          key.public_key(), not_before, not_after)
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        if key_usage:
            b = b.add_extension(
                _key_usage(digital_signature=digital_signature, key_cert_sign=key_cert_sign,
                           crl_sign=crl_sign, key_encipherment=True, key_agreement=True),
                critical=True,
            )
        if eku is True:
            eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if eku:
            b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if names:
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        extra = tuple(chain_extra) if chain_extra is not None else self.intermediates()
        return Leaf(cert, key, (cert, *extra))

    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """This CA and its parents below the root (nearest first); empty for a root."""
        if not self.parents:
            return ()
        return (self.cert, *(p.cert for p in self.parents[:-1]))

    @property
    def root_ca(self) -> CA:
        return self.parents[-1] if self.parents else self

    def bundle_der(self) -> bytes:
        """The trust bundle (this CA's root) as DER: the Workload API's `bundle` field."""
        return self.root_ca.cert.public_bytes(serialization.Encoding.DER)

    def bundle_pem(self) -> bytes:
        return self.root_ca.cert.public_bytes(serialization.Encoding.PEM)


def _ca_extras(
    b: x509.CertificateBuilder, name_constraints: x509.NameConstraints | None,
    eku: Sequence[ObjectIdentifier] | None,
) -> x509.CertificateBuilder:
    if name_constraints is not None:
        b = b.add_extension(name_constraints, critical=True)  # RFC 5280 §4.2.1.10: MUST be critical
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return b


def uri_constraints(permitted: Sequence[str] = (), excluded: Sequence[str] = ()) -> x509.NameConstraints:
    """URI name constraints (RFC 5280 §4.2.1.10: a host `a.test` or a domain `.a.test`)."""
    return x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(p) for p in permitted] or None,
        excluded_subtrees=[x509.UniformResourceIdentifier(e) for e in excluded] or None,
    )


# ---------------------------------------------------------------------------------------------------------
# Hand-made DER: what `cryptography` refuses to build


def _der_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, end) of the DER element at `pos` (definite lengths only)."""
    first = data[pos + 1]
    if first < 0x80:
        return data[pos], pos + 2, pos + 2 + first
    n = first & 0x7F
    start = pos + 2 + n
    return data[pos], start, start + int.from_bytes(data[pos + 2 : start], "big")


def _der_children(data: bytes, start: int, end: int) -> list[bytes]:
    out = []
    while start < end:
        _, _, stop = _der_tlv(data, start)
        out.append(data[start:stop])
        start = stop
    return out


def _der_encode(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def tbs_span(cert_der: bytes) -> tuple[int, int]:
    """[start, end) of the tbsCertificate inside a certificate's DER: the bytes the signature covers."""
    _, content, _ = _der_tlv(cert_der, 0)
    _, _, end = _der_tlv(cert_der, content)
    return content, end


def resign(tbs: bytes, cert_der: bytes, signer: CA) -> bytes:
    """A certificate with `tbs` as its tbsCertificate, signed by `signer` (ECDSA-SHA256, like `cert_der`)."""
    _, content, end = _der_tlv(cert_der, 0)
    _, sig_alg, _ = _der_children(cert_der, content, end)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(tbs)
    signature = signer.key.sign(digest.finalize(), ec.ECDSA(Prehashed(hashes.SHA256())))
    return _der_encode(0x30, tbs + sig_alg + _der_encode(0x03, b"\x00" + signature))


def duplicate_extension(cert: x509.Certificate, signer: CA, oid: ObjectIdentifier) -> bytes:
    """`cert` with its extension `oid` present twice, validly re-signed by `signer` (DER).

    RFC 5280 §4.2: "A certificate MUST NOT include more than one instance of a particular extension".
    `cryptography` parses such a certificate lazily and raises `x509.DuplicateExtension` (not a ValueError)
    on first access to `.extensions`: the signature is fine, only the extension list is wrong.
    """
    der = cert.public_bytes(serialization.Encoding.DER)
    _, tbs_content, tbs_end = _der_tlv(der, tbs_span(der)[0])
    fields = _der_children(der, tbs_content, tbs_end)
    i = next(k for k, f in enumerate(fields) if f[0] == 0xA3)  # [3] EXPLICIT Extensions
    _, seq_at, _ = _der_tlv(fields[i], 0)
    _, ext_content, ext_end = _der_tlv(fields[i], seq_at)
    exts = _der_children(fields[i], ext_content, ext_end)
    oid_der = _der_encode(0x06, _oid_body(oid))
    dup = next(e for e in exts if oid_der in e[:16])
    fields[i] = _der_encode(0xA3, _der_encode(0x30, b"".join([*exts, dup])))
    return resign(_der_encode(0x30, b"".join(fields)), der, signer)


def _oid_body(oid: ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    out = bytes([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return out


# Bad leaf kinds, named after the `svid` reason code each must produce when used as a peer leaf.
BAD_LEAF_KINDS = (
    "leaf_is_ca", "multiple_uri_sans", "root_path_id", "no_uri_san", "key_cert_sign", "crl_sign",
    "no_digital_signature", "no_key_usage", "expired", "not_yet_valid", "invalid_spiffe_id",
)


def bad_leaf(ca: CA, kind: str) -> Leaf:
    """A leaf issued by `ca` that is wrong in exactly one way, `kind` (one of BAD_LEAF_KINDS)."""
    now = utcnow()
    sid = f"spiffe://{ca.td}/bad"
    match kind:
        case "leaf_is_ca":
            return ca.leaf(sid, ca=True)
        case "multiple_uri_sans":
            return ca.leaf(sid, uris=[sid, f"https://{ca.td}/x"])
        case "root_path_id":
            return ca.leaf(f"spiffe://{ca.td}")
        case "no_uri_san":
            return ca.leaf(sid, uris=[], dns=["bad.example"])
        case "key_cert_sign":
            return ca.leaf(sid, key_cert_sign=True)
        case "crl_sign":
            return ca.leaf(sid, crl_sign=True)
        case "no_digital_signature":
            return ca.leaf(sid, digital_signature=False)
        case "no_key_usage":
            return ca.leaf(sid, key_usage=False)
        case "expired":
            return ca.leaf(sid, not_before=now - dt.timedelta(hours=2), not_after=now - dt.timedelta(hours=1))
        case "not_yet_valid":
            return ca.leaf(sid, not_before=now + dt.timedelta(hours=1), not_after=now + dt.timedelta(hours=2))
        case "invalid_spiffe_id":
            return ca.leaf(f"spiffe://{ca.td.upper()}/bad")
    raise ValueError(f"unknown bad leaf kind {kind!r}")
