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
import uvloop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.errors import SvidError
from sidecar.identity import TrustDomain
from sidecar.svid import X509Bundle, X509Context, X509Svid
from sidecar.tls import TlsContexts, classify_handshake_error, peer_chain_der, verify_peer_connection
from tests.integration.test_inbound import (  # app, pki: the inbound tests' fixtures, reused
    CHECKOUT,
    INVENTORY,
    TD,
    App,
    Pki,
    app,  # noqa: F401
    pki,  # noqa: F401
    run,
    start_sidecar,
)
from tests.pki import CA, Leaf


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


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


def test_contexts_enforce_tls12_and_client_certs(pki: Pki) -> None:  # noqa: F811
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
    pki: Pki, app: App  # noqa: F811
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


async def test_no_sni_client_gets_newest_svid(pki: Pki, app: App) -> None:  # noqa: F811
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


async def test_rsa_svid_server_and_client(pki: Pki, app: App, tmp_path: Path) -> None:  # noqa: F811
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


async def test_verify_peer_connection_uses_peer_trust_domain(pki: Pki) -> None:  # noqa: F811
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


async def test_tls12_session_id_resumption_is_still_spiffe_checked(pki: Pki, app: App) -> None:  # noqa: F811
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
