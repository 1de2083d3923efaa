"""TLS contexts built from X.509-SVID snapshots, and the SPIFFE check that follows every handshake.

Rotation is a reference swap (DESIGN "Rotation = swap a reference"): `TlsContexts.update()` builds a
fresh server and client `ssl.SSLContext` from an `X509Context` and replaces one immutable `TlsSnapshot`.
A live `SSLContext` is never mutated; open connections keep the context they were handshaked with.

The inbound listener accepts plain TCP and wraps each accepted socket with the snapshot current at that
moment (`loop.connect_accepted_socket(ssl=snapshot.server)`), so every new handshake uses the newest SVID
and bundles. OpenSSL verifies the peer chain against the union of all bundles (it has no per-trust-domain
store); `verify_peer_connection()` then runs `svid.verify_peer` on the presented chain with the bundle of
the peer ID's own trust domain (X509-SVID §5.2, federation: never the union) before a byte is read, for the
peer's TLS role (a server checks a client for clientAuth, a client a server for serverAuth, §4.4).

Private keys reach OpenSSL only through `load_cert_chain`, which needs a path: we use an anonymous
memfd (never on a filesystem) and fall back to a 0700 temp dir with 0600 files removed right after loading.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives import serialization

from .errors import SvidError
from .identity import SpiffeId
from .svid import PeerIdentity, Purpose, X509Context, verify_peer

__all__ = [
    "ALPN_H2",
    "HandshakeFailure",
    "TlsContexts",
    "TlsSnapshot",
    "build_client_context",
    "build_server_context",
    "classify_handshake_error",
    "peer_chain_der",
    "verify_peer_connection",
]

# ALPN of an inbound listener that serves HTTP/2 and HTTP/1.1 (the server's order wins: h2 first).
ALPN_H2: Final = ("h2", "http/1.1")

# Cipher policy: OpenSSL 3 defaults (TLS 1.3 suites always on); for TLS 1.2 keep only AEAD + ECDHE.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

# OpenSSL X509_V_ERR_* codes mapped to the stable reason codes of sidecar.svid, so a peer rejected by
# OpenSSL and one rejected by our own check are counted under the same names.
_VERIFY_CODES = {
    2: "bad_chain",  # unable to get issuer certificate
    9: "not_yet_valid",
    10: "expired",
    18: "bad_chain",  # self-signed leaf
    19: "bad_chain",  # self-signed certificate in chain
    20: "bad_chain",  # unable to get local issuer certificate
    21: "bad_chain",  # unable to verify the first certificate
    24: "bad_chain",  # invalid CA certificate (an issuer that is not a CA)
    # "unsuitable certificate purpose": OpenSSL's ssl_client/ssl_server check of keyUsage (digitalSignature
    # or keyAgreement) and EKU, on the leaf or a CA. It does not say which, so it is neither of our own
    # `no_digital_signature` / `eku_lacks_purpose`, and it is not an untrusted chain either.
    26: "unsuitable_purpose",
    7: "bad_chain",  # certificate signature failure
    47: "name_constraint_violation",  # permitted subtree violation
    48: "name_constraint_violation",  # excluded subtree violation
    49: "name_constraint_unsupported",  # name constraints minimum and maximum not supported
    51: "name_constraint_unsupported",  # unsupported name constraint type
    52: "name_constraint_unsupported",  # unsupported or invalid name constraint syntax
    53: "name_constraint_unsupported",  # unsupported or invalid name syntax
}


@dataclass(frozen=True, slots=True)
class TlsSnapshot:
    """One consistent generation: the X509Context and the contexts built from it."""

    x509: X509Context
    server: ssl.SSLContext = field(repr=False)
    client: ssl.SSLContext = field(repr=False)
    own_id: SpiffeId
    generation: int
    expires_at: float = 0.0  # epoch seconds of the default SVID's notAfter: one float compare per use
    # The server context that also offers HTTP/2 (ALPN `h2`, `http/1.1`): inbound listeners in HTTP mode.
    server_h2: ssl.SSLContext | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class HandshakeFailure:
    """Why a connection was refused before any request: `reason` is a stable metric label."""

    reason: str
    detail: str


class TlsContexts:
    """Holder of the newest `TlsSnapshot`. `update()` is called by the composition root on each new
    X509Context (on the loop thread); readers take `.current` once per connection."""

    def __init__(self, ctx: X509Context | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self._current: TlsSnapshot | None = None
        # The generation of the newest snapshot (0: none yet). A connection verified under an older one
        # re-checks its peer before its next request (bundles may have dropped the peer's CA).
        self.generation = 0
        self._clock = clock
        if ctx is not None:
            self.update(ctx)

    def update(self, ctx: X509Context) -> TlsSnapshot:
        """Build fresh contexts from `ctx` and swap them in. Raises ssl.SSLError / SvidError on a
        snapshot OpenSSL cannot load; the previous snapshot then stays current."""
        server = build_server_context(ctx)
        server_h2 = build_server_context(ctx, alpn=ALPN_H2)
        client = build_client_context(ctx)
        generation = self.generation + 1
        snap = TlsSnapshot(ctx, server, client, ctx.default_svid.spiffe_id, generation, ctx.expires_at.timestamp(),
                           server_h2)  # fmt: skip
        self._current = snap  # the swap: one reference assignment
        self.generation = generation
        return snap

    @property
    def current(self) -> TlsSnapshot:
        """The newest snapshot. Fails closed: raises SvidError when there is none, or when its SVID has
        expired (the agent went away and no new SVID came in time): an expired certificate is never
        presented on a new connection, inbound or outbound."""
        snap = self._current
        if snap is None:
            raise SvidError("no_svid", "no X.509-SVID has been received yet")
        if self._clock() >= snap.expires_at:
            raise SvidError("own_svid_expired", "our X.509-SVID expired and no new one has arrived")
        return snap

    @property
    def latest(self) -> TlsSnapshot | None:
        """The newest snapshot even if our own SVID has expired (its bundles still say which peers are
        trusted); None before the first one."""
        return self._current

    @property
    def ready(self) -> bool:
        snap = self._current
        return snap is not None and self._clock() < snap.expires_at

    @property
    def server(self) -> ssl.SSLContext:
        return self.current.server

    @property
    def client(self) -> ssl.SSLContext:
        return self.current.client


def _base_context(protocol: ssl._SSLMethod, ctx: X509Context) -> ssl.SSLContext:
    c = ssl.SSLContext(protocol)
    c.minimum_version = ssl.TLSVersion.TLSv1_2
    c.set_ciphers(_TLS12_CIPHERS)
    # No renegotiation (a peer could otherwise re-handshake with another identity mid-connection), no
    # compression (CRIME).
    c.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    c.verify_mode = ssl.CERT_REQUIRED
    authorities = ctx.all_authorities()
    if authorities:
        c.load_verify_locations(
            cadata=b"".join(a.public_bytes(serialization.Encoding.DER) for a in authorities)
        )
    svid = ctx.default_svid
    with _key_files(svid.chain_pem(), svid.key_pem()) as (cert_path, key_path):
        c.load_cert_chain(cert_path, key_path)
    return c


def build_server_context(ctx: X509Context, *, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """Server side: client certificate REQUIRED, TLS >= 1.2, the union of bundles as OpenSSL's store.
    `alpn`: the application protocols offered, in our order of preference (RFC 7301; RFC 9113 §3.2: `h2`,
    never `h2c`). A client that offers none of them, or no ALPN at all, gets none: HTTP/1.1."""
    c = _base_context(ssl.PROTOCOL_TLS_SERVER, ctx)
    if alpn:
        c.set_alpn_protocols(list(alpn))
    # Session tickets are off (TLS 1.3 `num_tickets = 0`, TLS 1.2 OP_NO_TICKET): a ticket is state the
    # client carries, valid across rotations. TLS 1.2 session-ID resumption still works (OpenSSL's
    # server-side cache; CPython cannot turn it off) and that is acceptable: the cache belongs to this
    # context, so it never outlives a rotation (a new snapshot is a new, empty context), and a resumed
    # session keeps the peer chain, so `verify_peer_connection` checks every resumed connection again
    # (validity at `now`, the bundle of this snapshot) exactly like a full handshake.
    c.num_tickets = 0
    c.options |= ssl.OP_NO_TICKET
    return c


def build_client_context(ctx: X509Context) -> ssl.SSLContext:
    """Client side (outbound): our SVID presented, server chain verified by OpenSSL against the union;
    the caller must still run `verify_peer_connection` and check the expected server SPIFFE ID.
    Hostname checking is off: SPIFFE identifies by URI SAN, not DNS name (X509-SVID §5.1)."""
    c = _base_context(ssl.PROTOCOL_TLS_CLIENT, ctx)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_REQUIRED
    return c


@contextlib.contextmanager
def _key_files(chain_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """Paths holding the chain and key for exactly as long as `load_cert_chain` needs them."""
    memfd_create: Callable[..., int] | None = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for name, data in (("svid-chain", chain_pem), ("svid-key", key_pem)):
                fd = memfd_create(name, os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, data)
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="spiffe-sidecar-") as d:  # mode 0700
        paths = []
        for name, data in (("chain.pem", chain_pem), ("key.pem", key_pem)):
            p = os.path.join(d, name)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            paths.append(p)
        try:
            yield paths[0], paths[1]
        finally:
            for p in paths:
                os.unlink(p)


def peer_chain_der(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The chain the peer presented, leaf first, as DER (empty when it presented none).

    CPython 3.11 exposes it only on the private `_sslobj` (`get_unverified_chain`, public from 3.13);
    on the server side CPython prepends the peer leaf that OpenSSL leaves out of the chain.
    """
    inner = getattr(ssl_object, "_sslobj", None)
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is None:  # pragma: no cover - very old CPython; leaf only
        leaf = ssl_object.getpeercert(binary_form=True)
        return [leaf] if leaf else []
    chain: Sequence[object] | None = getter()
    if not chain:
        return []
    der = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]
    return [c.public_bytes(der) for c in chain]  # type: ignore[attr-defined]


def verify_peer_connection(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    snapshot: TlsSnapshot,
    now: dt.datetime,
    *,
    purpose: Purpose | None = None,
) -> PeerIdentity:
    """The SPIFFE check after the handshake: the presented chain against the bundle of the peer ID's own
    trust domain in the snapshot the handshake used. Raises SvidError(reason, detail).

    `purpose` is the peer's TLS role for its EKU (X509-SVID §4.4). By default it follows from our side of
    the connection: our server side (inbound) checks a client, our client side (outbound) a server; so no
    caller can judge a server by a client's rules by forgetting to say which it is."""
    chain = peer_chain_der(ssl_object)
    if not chain:
        raise SvidError("no_client_certificate", "the peer presented no certificate")
    if purpose is None:
        purpose = Purpose.CLIENT if ssl_object.server_side else Purpose.SERVER
    return verify_peer(chain, snapshot.x509.bundles, now, purpose)


def classify_handshake_error(exc: BaseException) -> HandshakeFailure:
    """Map a handshake exception to a stable reason code and a one-line detail (no key material)."""
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "handshake is taking longer" in str(exc)
    ):
        return HandshakeFailure("handshake_timeout", "TLS handshake did not finish in time")
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        return HandshakeFailure(_VERIFY_CODES.get(code, "bad_chain"), f"{exc.verify_message} ({code})")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"):
            return HandshakeFailure("no_client_certificate", "the client presented no certificate")
        if reason == "CERTIFICATE_VERIFY_FAILED":
            return HandshakeFailure("bad_chain", str(exc.args[1] if len(exc.args) > 1 else exc))
        return HandshakeFailure("tls_error", reason or type(exc).__name__)
    if isinstance(exc, ConnectionError | OSError):
        return HandshakeFailure("tls_error", f"{type(exc).__name__}: connection closed during handshake")
    return HandshakeFailure("tls_error", type(exc).__name__)
