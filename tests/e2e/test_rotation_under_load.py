"""Rotation under traffic (issue 3): SVIDs of both sides rotate every ~1.5 s while a client keeps sending.
And (issue 13) JWT signing keys rotating under step-up traffic: tokens minted by py-spiffe's JwtSource.

The sidecar is a real `spiffe-sidecar run` process whose identity streams from the embedded SPIRE; the
client gets *its* rotating SVID from py-spiffe's `X509Source` (a Workload API client we did not write)
and talks to the sidecar with the stdlib's `http.client` over TLS: one connection kept alive for the
whole run, and a fresh connection (with the client's newest SVID) every few requests. Zero failures
allowed, and both sides must actually have rotated.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import JwtSource, X509Source

from tests.example import CHECKOUT, INVENTORY, POLICY, TD
from tests.helpers import App, start_app
from tests.processes import admin_get, running_sidecar

pytestmark = pytest.mark.timeout(120)

TTL_SECONDS = 3
RUN_SECONDS = 9.0  # about six rotations of each side

ENTRIES = f"""\
trust_domain: {TD}
svid_ttl: {TTL_SECONDS}s
entries:
  - spiffe_id: {CHECKOUT}
    socket: checkout.sock
  - spiffe_id: {INVENTORY}
    socket: inventory.sock
"""


@dataclass
class Tally:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    client_leaves: set[int] = field(default_factory=set)
    server_leaves: set[int] = field(default_factory=set)
    new_connections: int = 0
    reconnects: int = 0


def _context(source: X509Source, keydir: Path, tally: Tally) -> ssl.SSLContext:
    """A client context from py-spiffe's newest SVID (stdlib ssl loads keys from files only)."""
    svid = source.get_x509_context().default_svid
    tally.client_leaves.add(svid.leaf.serial_number)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert bundle is not None
    cadata = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in bundle.x509_authorities)
    fd, name = tempfile.mkstemp(dir=keydir, suffix=".pem")
    try:
        os.write(fd, chain + key)
        os.close(fd)
        ctx = ssl.create_default_context(cadata=cadata)
        ctx.check_hostname = False  # SPIFFE identifies by URI SAN, checked below
        ctx.load_cert_chain(name)
    finally:
        os.unlink(name)
    return ctx


def _connect(port: int, source: X509Source, keydir: Path, tally: Tally) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=_context(source, keydir, tally), timeout=10)
    conn.connect()
    assert conn.sock is not None
    der = conn.sock.getpeercert(binary_form=True)
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == [INVENTORY], uris
    tally.server_leaves.add(leaf.serial_number)
    tally.new_connections += 1
    return conn


def _get(conn: http.client.HTTPSConnection, path: str) -> int:
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def drive(port: int, socket_path: Path, keydir: Path, stop: threading.Event, tally: Tally) -> None:
    source = X509Source(socket_path=f"unix://{socket_path}", timeout_in_seconds=15)
    try:
        kept = _connect(port, source, keydir, tally)
        i = 0
        deadline = time.monotonic() + RUN_SECONDS
        while time.monotonic() < deadline and not stop.is_set():
            i += 1
            try:
                try:
                    status = _get(kept, f"/api/stock/{i}")  # the long-lived keep-alive connection
                except (OSError, http.client.RemoteDisconnected):
                    # The sidecar closes a kept-alive connection once the client SVID on it expired.
                    tally.reconnects += 1
                    kept.close()
                    kept = _connect(port, source, keydir, tally)
                    status = _get(kept, f"/api/stock/{i}")
                if status != 200:
                    tally.failures.append(f"kept-alive request {i}: {status}")
                else:
                    tally.ok += 1
                if i % 5 == 0:  # a fresh connection with the client's newest SVID
                    fresh = _connect(port, source, keydir, tally)
                    try:
                        for j in range(3):
                            status = _get(fresh, f"/api/stock/{i}-{j}")
                            if status != 200:
                                tally.failures.append(f"new-connection request {i}-{j}: {status}")
                            else:
                                tally.ok += 1
                    finally:
                        fresh.close()
            except (OSError, http.client.HTTPException) as e:
                tally.failures.append(f"request {i}: {type(e).__name__}: {e}")
            time.sleep(0.01)
        kept.close()
    finally:
        source.close()


async def test_rotation_under_traffic_has_zero_failures(tmp_path: Path) -> None:
    from spire.entries import parse_config
    from spire.server import EmbeddedSpire

    state, runner = await start_app()
    app: App = state
    keydir = tmp_path / "keys"
    keydir.mkdir(mode=0o700)
    try:
        spire_config = parse_config(ENTRIES, "entries.yaml", socket_dir=str(tmp_path / "spire"))
        async with EmbeddedSpire(spire_config) as spire:
            (tmp_path / "policy.yaml").write_text(POLICY)
            config = tmp_path / "inventory.yaml"
            config.write_text(
                f"""\
svid_source: {{workload_api: {{socket: "unix://{spire.socket_path_for(INVENTORY)}"}}}}
inbound: {{listen: "127.0.0.1:0", app: "127.0.0.1:{app.port}", policy_file: policy.yaml}}
admin: {{listen: "127.0.0.1:0"}}
audit: {{path: audit.log}}
"""
            )
            async with running_sidecar(config) as sc:
                assert await admin_get(sc, "/readyz") == (200, "ready\n")
                tally = Tally()
                stop = threading.Event()
                worker = asyncio.to_thread(
                    drive, sc.inbound_port, spire.socket_path_for(CHECKOUT), keydir, stop, tally
                )
                try:
                    async with asyncio.timeout(RUN_SECONDS + 60):
                        await worker
                finally:
                    stop.set()
                assert await admin_get(sc, "/readyz") == (200, "ready\n")
    finally:
        await runner.cleanup()

    print(
        f"rotation under traffic: {tally.ok} requests ok, {len(tally.failures)} failed, "
        f"{tally.new_connections} connections, {len(tally.client_leaves)} client SVIDs, "
        f"{len(tally.server_leaves)} server SVIDs"
    )
    assert tally.failures == [], tally.failures[:10]
    assert tally.reconnects >= 1  # the kept-alive connection outlived its client SVID: closed, not served
    assert tally.ok > 50
    # Both sides really rotated during the run: several client SVIDs presented, several server leaves seen.
    assert len(tally.client_leaves) >= 3, tally.client_leaves
    assert len(tally.server_leaves) >= 3, tally.server_leaves


JWT_RUN_SECONDS = 9.0
JWT_ENTRIES = f"""\
trust_domain: {TD}
jwt_ttl: 2s
jwt_key_ttl: 3s
entries:
  - spiffe_id: {CHECKOUT}
    socket: checkout.sock
  - spiffe_id: {INVENTORY}
    socket: inventory.sock
"""
STEP_UP_POLICY = f"""\
rules:
  - name: checkout-reserves-stock
    action: allow
    methods: [POST]
    paths: ["/api/stock/*/reserve"]
    callers: ["{CHECKOUT}"]
    jwt: {{audience: inventory}}
"""


def drive_step_up(port: int, socket_path: Path, keydir: Path, stop: threading.Event, tally: Tally) -> None:
    """POST /api/stock/<i>/reserve with a JWT-SVID fetched from the Workload API by py-spiffe for every
    request (the outside minter), over one kept-alive mTLS connection (reconnecting when the client
    SVID on it expires, as above)."""
    x509 = X509Source(socket_path=f"unix://{socket_path}", timeout_in_seconds=15)
    tokens = JwtSource(socket_path=f"unix://{socket_path}", timeout_in_seconds=15)
    try:
        conn = _connect(port, x509, keydir, tally)
        i = 0
        deadline = time.monotonic() + JWT_RUN_SECONDS
        while time.monotonic() < deadline and not stop.is_set():
            i += 1
            token = tokens.fetch_svid({"inventory"}).token
            for attempt in range(2):
                try:
                    conn.request("POST", f"/api/stock/{i}/reserve", body=b"",
                                 headers={"Authorization": f"Bearer {token}"})  # fmt: skip
                    resp = conn.getresponse()
                    resp.read()
                except (OSError, http.client.RemoteDisconnected, http.client.CannotSendRequest) as e:
                    if attempt:
                        tally.failures.append(f"request {i}: {type(e).__name__}: {e}")
                        break
                    tally.reconnects += 1
                    conn.close()
                    conn = _connect(port, x509, keydir, tally)
                    continue
                if resp.status != 200:
                    tally.failures.append(f"request {i}: {resp.status}")
                else:
                    tally.ok += 1
                break
            time.sleep(0.02)
        conn.close()
    finally:
        tokens.close()
        x509.close()


async def test_jwt_key_rotation_under_step_up_traffic_has_zero_failures(tmp_path: Path) -> None:
    from spire.entries import parse_config
    from spire.server import EmbeddedSpire

    state, runner = await start_app()
    app: App = state
    keydir = tmp_path / "keys"
    keydir.mkdir(mode=0o700)
    try:
        spire_config = parse_config(JWT_ENTRIES, "entries.yaml", socket_dir=str(tmp_path / "spire"))
        async with EmbeddedSpire(spire_config) as spire:
            (tmp_path / "policy.yaml").write_text(STEP_UP_POLICY)
            config = tmp_path / "inventory.yaml"
            config.write_text(
                f"""\
svid_source: {{workload_api: {{socket: "unix://{spire.socket_path_for(INVENTORY)}"}}}}
inbound: {{listen: "127.0.0.1:0", app: "127.0.0.1:{app.port}", policy_file: policy.yaml}}
admin: {{listen: "127.0.0.1:0"}}
audit: {{path: audit.log}}
"""
            )
            async with running_sidecar(config, rules=1) as sc:
                tally = Tally()
                stop = threading.Event()
                worker = asyncio.to_thread(
                    drive_step_up, sc.inbound_port, spire.socket_path_for(CHECKOUT), keydir, stop, tally
                )
                try:
                    async with asyncio.timeout(JWT_RUN_SECONDS + 60):
                        await worker
                finally:
                    stop.set()
                audit = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines() if x.strip()]
    finally:
        await runner.cleanup()

    lines = [x for x in audit if x.get("path", "").endswith("/reserve")]
    kids = {x.get("jwt_kid") for x in lines if x.get("decision") == "allow"}
    print(f"JWT key rotation under traffic: {tally.ok} ok, {len(tally.failures)} failed, signing keys seen {len(kids)}")
    assert tally.failures == [], tally.failures[:10]
    assert tally.ok > 50
    assert len(lines) == tally.ok and all(x["decision"] == "allow" and x["status"] == 200 for x in lines)
    assert all(x["jwt_subject"] == CHECKOUT and x["jwt_audience"] == "inventory" for x in lines)
    assert len(kids) >= 3, kids  # the signing key really rotated (several times) during the run
    assert len(app.seen) == tally.ok
