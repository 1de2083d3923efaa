"""TlsContexts over real loopback TLS: what the contexts enforce, ECDSA and RSA SVIDs, and rotation
(open connections keep going, every new handshake presents the newest SVID and trusts the newest bundles)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.config import HostPort, OutboundTarget, Timeouts
from sidecar.errors import SvidError
from sidecar.identity import CallerPattern, TrustDomain
from sidecar.metrics import Metrics
from sidecar.outbound import build_routes
from sidecar.svid import Purpose, X509Bundle, X509Context, X509Svid
from sidecar.tls import TlsContexts, classify_handshake_error, peer_chain_der, verify_peer_connection
from tests.example import CHECKOUT, INVENTORY, TD
from tests.helpers import App, Pki, run, start_sidecar
from tests.pki import CA, Leaf, uri_constraints

pytestmark = pytest.mark.uvloop  # the sidecar runs on uvloop; test the same transports


def _ctx(leaf: Leaf, *roots: CA) -> X509Context:
    svid = X509Svid.from_pem(leaf.chain_pem(), leaf.key_pem())
    td = TrustDomain.parse(TD)
    der = b"".join(r.bundle_der() for r in roots)
    return X509Context((svid,), {td: X509Bundle.from_der(td, der)})


async def _served_leaf(port: int, client: ssl.SSLContext) -> bytes:
    """The leaf certificate the server presents on a NEW handshake (DER)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
    obj = writer.get_extra_info("ssl_object")
    der = obj.getpeercert(binary_form=True)
    writer.close()
    assert der is not None
    return bytes(der)


def test_contexts_enforce_tls12_and_client_certs(pki: Pki) -> None:
    tls = TlsContexts(pki.context())
    snap = tls.current
    assert snap.server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert snap.server.verify_mode == ssl.CERT_REQUIRED
    assert snap.client.verify_mode == ssl.CERT_REQUIRED and not snap.client.check_hostname
    assert str(snap.own_id) == INVENTORY
    # the key never stays on a filesystem: memfds are closed after loading
    assert not [f for f in os.listdir("/proc/self/fd") if "svid" in os.path.realpath(f"/proc/self/fd/{f}")]
    assert "PRIVATE" not in repr(snap)


def test_no_snapshot_yet() -> None:
    tls = TlsContexts()
    assert not tls.ready
    with pytest.raises(SvidError) as ei:
        _ = tls.current
    assert ei.value.reason == "no_svid"


def test_classify_handshake_errors() -> None:
    assert classify_handshake_error(TimeoutError()).reason == "handshake_timeout"
    assert classify_handshake_error(ConnectionResetError()).reason == "tls_error"


async def test_rotation_new_handshakes_use_new_svid_open_connections_continue(
    pki: Pki, app: App
) -> None:
    sc = await start_sidecar(pki, app.port)
    client = pki.client_ssl(pki.checkout)
    try:
        first = await _served_leaf(sc.port, client)
        assert first == pki.server.der_list()[0]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client, limit=1)) as s:
            url = f"https://127.0.0.1:{sc.port}/api/stock/1"
            async with s.get(url) as r:
                assert r.status == 200
            # rotate: new server leaf (same trust domain, new intermediate)
            new_leaf = pki.root.intermediate().leaf(INVENTORY)
            sc.tls.update(_ctx(new_leaf, pki.root))
            assert await _served_leaf(sc.port, client) == new_leaf.der_list()[0]
            # the open keep-alive connection still works (aiohttp reuses it: limit=1)
            async with s.get(url) as r:
                assert r.status == 200
            assert sc.server.open_connections == 1
            # rotate the bundle too: only a new root is trusted now. The open connection's peer no longer
            # verifies against the newest bundles: its next request closes it, unanswered (aiohttp then
            # tries a new connection, whose handshake fails: the client does not trust the new root).
            new_root = CA.root(TD)
            sc.tls.update(_ctx(new_root.leaf(INVENTORY), new_root))
            with pytest.raises(aiohttp.ClientError):
                async with s.get(url) as r:
                    pass
            assert app.seen[-1].path == "/api/stock/1" and len(app.seen) == 2
        # a new handshake with a client certificate from the old root is refused now
        _, out, _ = await run("/usr/bin/curl", "-sS", "-k", "--max-time", "5", "--cert",
                              pki.files("co", pki.checkout)[0], "--key", pki.files("co", pki.checkout)[1],
                              f"https://127.0.0.1:{sc.port}/api/stock/2")
        assert b"stock" not in out
        assert sc.metric("spiffe_sidecar_handshake_failures_total", listener="inbound", reason="bad_chain") >= 1
    finally:
        await sc.server.drain(1)


async def test_no_sni_client_gets_newest_svid(pki: Pki, app: App) -> None:
    sc = await start_sidecar(pki, app.port)
    try:
        new_leaf = pki.root.intermediate().leaf(INVENTORY)
        sc.tls.update(_ctx(new_leaf, pki.root))
        cert, key = pki.files("co", pki.checkout)
        _, out, _ = await run("openssl", "s_client", "-connect", f"127.0.0.1:{sc.port}", "-noservername",
                              "-cert", cert, "-cert_chain", cert, "-key", key, "-CAfile", pki.ca_file, "-ign_eof",
                              stdin=b"GET /api/stock/7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"HTTP/1.1 200" in out
        pem = new_leaf.cert.public_bytes(serialization.Encoding.PEM)
        assert pem.strip() in out  # s_client prints the server certificate
    finally:
        await sc.server.drain(1)


async def test_rsa_svid_server_and_client(pki: Pki, app: App, tmp_path: Path) -> None:
    rsa_server = pki.root.leaf(INVENTORY, key=rsa.generate_private_key(65537, 2048))  # type: ignore[arg-type]
    rsa_client = pki.root.leaf(CHECKOUT, key=rsa.generate_private_key(65537, 2048))  # type: ignore[arg-type]
    sc = await start_sidecar(pki, app.port)
    try:
        sc.tls.update(_ctx(rsa_server, pki.root))
        assert await _served_leaf(sc.port, pki.client_ssl(rsa_client)) == rsa_server.der_list()[0]
        conn = aiohttp.TCPConnector(ssl=pki.client_ssl(rsa_client))
        async with aiohttp.ClientSession(connector=conn) as s, s.get(f"https://127.0.0.1:{sc.port}/api/stock/1") as r:
            assert r.status == 200
        assert app.seen[-1].headers["X-Forwarded-Client-Cert"].endswith(f"URI={CHECKOUT}")
    finally:
        await sc.server.drain(1)


async def test_verify_peer_connection_uses_peer_trust_domain(pki: Pki) -> None:
    """Plain ssl sockets: the server side sees the client's chain (leaf first) and verifies it."""
    tls = TlsContexts(pki.context())
    got: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        got.set_result(peer_chain_der(obj))
        peer = verify_peer_connection(obj, tls.current, dt.datetime.now(dt.UTC))
        writer.write(str(peer.spiffe_id).encode())
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls.server)
    port = srv.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=pki.client_ssl(pki.checkout))
    async with asyncio.timeout(5):
        assert (await reader.read()).decode() == CHECKOUT
    writer.close()
    assert await got == pki.checkout.der_list()  # leaf + intermediate
    srv.close()


async def test_tls12_session_id_resumption_is_still_spiffe_checked(pki: Pki, app: App) -> None:
    # Tickets are off, but OpenSSL's server session cache resumes TLS 1.2 sessions by ID. Each resumed
    # connection is still verified: the peer chain comes with the session, and the app sees the caller.
    import socket

    sc = await start_sidecar(pki, app.port)
    client = pki.client_ssl(pki.checkout)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    req = b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    def one(session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession | None, bytes]:
        raw_sock = socket.create_connection(("127.0.0.1", sc.port), timeout=10)
        with raw_sock, client.wrap_socket(raw_sock, session=session) as s:
            s.sendall(req)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return bool(s.session_reused), s.session, out

    try:
        reused, session, out = await asyncio.to_thread(one, None)
        assert not reused and session is not None and out.startswith(b"HTTP/1.1 200 ")
        reused, _, out = await asyncio.to_thread(one, session)
        assert reused and out.startswith(b"HTTP/1.1 200 ")
        assert [s.headers["X-Forwarded-Client-Cert"].rsplit(";", 1)[1] for s in app.seen] == [f"URI={CHECKOUT}"] * 2
        # A rotation is a new context with an empty cache: the old session is not resumed.
        sc.tls.update(_ctx(pki.root.intermediate().leaf(INVENTORY), pki.root))
        reused, _, out = await asyncio.to_thread(one, session)
        assert not reused and out.startswith(b"HTTP/1.1 200 ")
    finally:
        await sc.server.drain(1)


# ---------------------------------------------------------------------------------------------------------
# Chains OpenSSL and our verifier must agree on (issue 10 items 10 and 11)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Server:
    """A plain TLS server over a TlsContexts; its handler runs the inbound SPIFFE check and answers with
    the peer's ID or the refusal reason."""

    def __init__(self, tls: TlsContexts) -> None:
        self.tls = tls
        self.port = 0
        self._srv: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = verify_peer_connection(writer.get_extra_info("ssl_object"), self.tls.current, _now())
            writer.write(str(peer.spiffe_id).encode())
        except SvidError as e:
            writer.write(e.reason.encode())
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> _Server:
        self._srv = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls.server)
        self.port = self._srv.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._srv is not None
        self._srv.close()


async def _call(server: _Server, client: TlsContexts, ssl_ctx: ssl.SSLContext | None = None) -> tuple[str, str]:
    """(what the server said about us, what our outbound check says about the server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ssl_ctx or client.client)
    try:
        try:
            ours = str(verify_peer_connection(writer.get_extra_info("ssl_object"), client.current, _now()).spiffe_id)
        except SvidError as e:
            ours = e.reason
        async with asyncio.timeout(5):
            return (await reader.read()).decode(), ours
    finally:
        writer.close()


async def _handshake_refusal(server: _Server, client: TlsContexts) -> str:
    """The reason our outbound side gives when OpenSSL refuses the server's chain during the handshake."""
    with pytest.raises(ssl.SSLCertVerificationError) as ei:
        await asyncio.open_connection("127.0.0.1", server.port, ssl=client.client)
    return classify_handshake_error(ei.value).reason


async def test_uri_name_constrained_chains_over_real_tls() -> None:
    # X509-SVID §4.2: signing certificates MAY carry URI name constraints. OpenSSL checks them in the
    # handshake (RFC 5280 §4.2.1.10, host of the URI); our check after it must agree, both directions.
    root = CA.root(TD)
    for permitted, excluded in (([TD], []), ([], [f".{TD}"]), ([TD], [f".{TD}"])):
        inter = root.intermediate(name_constraints=uri_constraints(permitted, excluded))
        async with _Server(TlsContexts(_ctx(inter.leaf(INVENTORY), root))) as server:
            client = TlsContexts(_ctx(inter.leaf(CHECKOUT), root))
            assert await _call(server, client) == (CHECKOUT, INVENTORY)
    # A server chain outside its constraints: OpenSSL refuses it, and says why in our words.
    for permitted, excluded in (([], [TD]), (["other.test"], [])):
        inter = root.intermediate(name_constraints=uri_constraints(permitted, excluded))
        async with _Server(TlsContexts(_ctx(inter.leaf(INVENTORY), root))) as server:
            client = TlsContexts(_ctx(root.leaf(CHECKOUT), root))
            assert await _handshake_refusal(server, client) == "name_constraint_violation"


SERVER_AUTH, CLIENT_AUTH = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH


async def test_outbound_route_checks_the_server_for_server_auth() -> None:
    # A server whose CA is limited to serverAuth (X509-SVID §4.4: CAs MAY carry an EKU). OpenSSL accepts
    # it for a server; the route's own check must judge it as a server too, not as a client.
    root = CA.root(TD)
    server_ca = root.intermediate(eku=[SERVER_AUTH])
    checkout = TlsContexts(_ctx(root.leaf(CHECKOUT), root))
    async with _Server(TlsContexts(_ctx(server_ca.leaf(INVENTORY), root))) as server:
        target = OutboundTarget(HostPort("127.0.0.1", server.port), CallerPattern.parse(INVENTORY))
        route = build_routes([("inventory", target)], tls=checkout, metrics=Metrics(), timeouts=Timeouts(),
                             pool_size=1)["inventory"]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=route.client_context())
        try:
            obj = writer.get_extra_info("ssl_object")
            route.verify_server(obj)  # passes: serverAuth is what a server needs
            assert str(verify_peer_connection(obj, checkout.current, _now()).spiffe_id) == INVENTORY
            with pytest.raises(SvidError) as ei:  # the same chain judged as a client's
                verify_peer_connection(obj, checkout.current, _now(), purpose=Purpose.CLIENT)
            assert ei.value.reason == "eku_lacks_purpose"
            async with asyncio.timeout(5):
                assert (await reader.read()).decode() == CHECKOUT
        finally:
            writer.close()


async def test_openssl_purpose_refusal_is_not_reported_as_bad_chain() -> None:
    # A server presenting a client-only leaf: OpenSSL refuses it in the handshake (its ssl_server purpose
    # check, X509_V_ERR_INVALID_PURPOSE). That is a key-usage/EKU problem, not an untrusted chain.
    root = CA.root(TD)
    async with _Server(TlsContexts(_ctx(root.leaf(INVENTORY, eku=[CLIENT_AUTH]), root))) as server:
        client = TlsContexts(_ctx(root.leaf(CHECKOUT), root))
        assert await _handshake_refusal(server, client) == "unsuitable_purpose"
