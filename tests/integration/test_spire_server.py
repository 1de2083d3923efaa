"""spire.server: the embedded SPIRE on real unix sockets, with py-spiffe (grpcio) as the outside client."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import JwtSource, JwtSvid, TrustDomain, WorkloadApiClient, X509Bundle, X509Source
from spiffe._proto import workload_pb2 as spb
from spiffe._proto import workload_pb2_grpc as sgrpc

from sidecar.errors import ConfigError
from spire.entries import SpireConfig, parse_config
from spire.server import EmbeddedSpire, SpireThread, write_svid_pem

UID = os.getuid()
CHECKOUT = "spiffe://example.org/ns/shop/sa/checkout"
INVENTORY = "spiffe://example.org/ns/shop/sa/inventory"
HEADER = ("workload.spiffe.io", "true")
DEADLINE = 20.0  # generous: the machine is shared

CONFIG = f"""
trust_domain: example.org
federation:
  - trust_domain: partner.org
entries:
  - spiffe_id: {CHECKOUT}
    socket: checkout.sock
    hint: checkout
    federates_with: [partner.org]
  - spiffe_id: {INVENTORY}
    selectors: ["unix:uid:{UID}"]
    hint: inventory
  - spiffe_id: spiffe://example.org/ns/other/sa/nobody
    selectors: ["unix:uid:12345"]
  - spiffe_id: spiffe://example.org/ns/shop/sa/locked
    socket: locked.sock
    selectors: ["unix:uid:12345"]
"""


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short path: unix socket paths are limited to ~107 bytes, pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="spire-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def config(sock_dir: Path, text: str = CONFIG, **kw: Any) -> SpireConfig:
    return parse_config(text, "entries.yaml", socket_dir=str(sock_dir), **kw)


def verify(leaf: x509.Certificate, roots: list[x509.Certificate], at: dt.datetime | None = None) -> None:
    verifier = PolicyBuilder().store(Store(roots)).time(at or dt.datetime.now(dt.UTC)).build_client_verifier()
    verifier.verify(leaf, [])


def raw_stub(path: Path) -> tuple[grpc.Channel, Any]:
    ch = grpc.insecure_channel(f"unix:{path}")
    return ch, sgrpc.SpiffeWorkloadAPIStub(ch)  # type: ignore[no-untyped-call]


def n_certs(der: bytes) -> int:
    return len(X509Bundle.parse_raw(TrustDomain("example.org"), der).x509_authorities)


def rpc_code(fn: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code()


async def test_fetch_x509_context_static_socket_and_uid(sock_dir: Path) -> None:
    async with EmbeddedSpire(config(sock_dir)) as spire:
        assert spire.socket_path_for(CHECKOUT) == sock_dir / "checkout.sock"
        assert spire.socket_path_for(INVENTORY) == sock_dir / "api.sock"
        assert oct(os.stat(sock_dir / "checkout.sock").st_mode & 0o777) == "0o600"

        def fetch(endpoint: str) -> Any:
            with WorkloadApiClient(socket_path=endpoint) as c:
                return c.fetch_x509_context(timeout=DEADLINE), c.fetch_x509_bundles(timeout=DEADLINE)

        for sid in (CHECKOUT, INVENTORY):
            ctx, bundles = await asyncio.to_thread(fetch, spire.endpoint_for(sid))
            svid = ctx.default_svid
            assert str(svid.spiffe_id) == sid
            assert len(ctx.x509_svids) == 1
            roots = list(ctx.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("example.org")).x509_authorities)
            assert roots == list(spire.x509_authorities())
            verify(svid.leaf, roots)
            pub = svid.private_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            assert pub == svid.leaf.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            assert svid.leaf.serial_number == spire.current_svid(sid).serial_number
            assert bundles.get_bundle_for_trust_domain(TrustDomain("example.org")) is not None
        assert spire.bundle_pem().startswith(b"-----BEGIN CERTIFICATE-----")


async def test_raw_response_fields(sock_dir: Path) -> None:
    """Hints, DER chain and PKCS#8 key as sent; federated_bundles only for the federating entry."""
    async with EmbeddedSpire(config(sock_dir)) as spire:

        def first(path: Path) -> tuple[Any, Any]:
            ch, stub = raw_stub(path)
            with ch:
                x = next(stub.FetchX509SVID(spb.X509SVIDRequest(), metadata=[HEADER], timeout=DEADLINE))
                b = next(stub.FetchX509Bundles(spb.X509BundlesRequest(), metadata=[HEADER], timeout=DEADLINE))
                return x, b

        x, b = await asyncio.to_thread(first, sock_dir / "checkout.sock")
        (svid,) = x.svids
        assert svid.hint == "checkout" and svid.spiffe_id == CHECKOUT
        assert x509.load_der_x509_certificate(svid.x509_svid).serial_number == spire.current_svid(
            CHECKOUT
        ).serial_number
        serialization.load_der_private_key(svid.x509_svid_key, None)
        assert dict(x.federated_bundles) == {"spiffe://partner.org": spire.x509_authorities("partner.org")[0]
                                             .public_bytes(serialization.Encoding.DER)}
        assert set(b.bundles) == {"spiffe://example.org", "spiffe://partner.org"}

        x, b = await asyncio.to_thread(first, sock_dir / "api.sock")
        assert [s.spiffe_id for s in x.svids] == [INVENTORY]
        assert dict(x.federated_bundles) == {}
        assert set(b.bundles) == {"spiffe://example.org"}


async def test_federated_bundle_reaches_py_spiffe(sock_dir: Path) -> None:
    async with EmbeddedSpire(config(sock_dir)) as spire:

        def tds(endpoint: str) -> set[str]:
            with WorkloadApiClient(socket_path=endpoint) as c:
                ctx = c.fetch_x509_context(timeout=DEADLINE)
            return {str(b.trust_domain) for b in ctx.x509_bundle_set.bundles}

        assert await asyncio.to_thread(tds, spire.endpoint_for(CHECKOUT)) == {"example.org", "partner.org"}
        assert await asyncio.to_thread(tds, spire.endpoint_for(INVENTORY)) == {"example.org"}


async def test_security_header_is_enforced(sock_dir: Path) -> None:
    async with EmbeddedSpire(config(sock_dir)):

        def codes() -> list[grpc.StatusCode]:
            ch, stub = raw_stub(sock_dir / "api.sock")
            with ch:
                req = spb.X509SVIDRequest()
                out = [
                    rpc_code(lambda: next(stub.FetchX509SVID(req, timeout=DEADLINE))),
                    rpc_code(lambda: next(stub.FetchX509SVID(req, metadata=[("workload.spiffe.io", "True")],
                                                             timeout=DEADLINE))),
                    rpc_code(lambda: next(stub.FetchX509SVID(req, metadata=[HEADER, HEADER], timeout=DEADLINE))),
                    rpc_code(lambda: next(stub.FetchJWTBundles(spb.JWTBundlesRequest(), timeout=DEADLINE))),
                    rpc_code(lambda: stub.FetchJWTSVID(spb.JWTSVIDRequest(audience=["a"]), timeout=DEADLINE)),
                    rpc_code(lambda: stub.ValidateJWTSVID(
                        spb.ValidateJWTSVIDRequest(audience="a", svid="x.y.z"), timeout=DEADLINE)),
                ]
                return out

        assert await asyncio.to_thread(codes) == [grpc.StatusCode.INVALID_ARGUMENT] * 6


async def test_caller_without_entry_is_denied(sock_dir: Path) -> None:
    text = "trust_domain: example.org\nentries:\n  - spiffe_id: spiffe://example.org/x\n" \
           "    selectors: ['unix:uid:12345']\n"
    async with EmbeddedSpire(config(sock_dir, text)):

        def codes() -> list[grpc.StatusCode]:
            ch, stub = raw_stub(sock_dir / "api.sock")
            with ch:
                return [
                    rpc_code(lambda: next(stub.FetchX509SVID(spb.X509SVIDRequest(), metadata=[HEADER],
                                                             timeout=DEADLINE))),
                    rpc_code(lambda: next(stub.FetchX509Bundles(spb.X509BundlesRequest(), metadata=[HEADER],
                                                                timeout=DEADLINE))),
                    rpc_code(lambda: stub.FetchJWTSVID(spb.JWTSVIDRequest(audience=["a"]), metadata=[HEADER],
                                                       timeout=DEADLINE)),
                ]

        assert await asyncio.to_thread(codes) == [grpc.StatusCode.PERMISSION_DENIED] * 3


async def test_static_socket_still_checks_its_selectors(sock_dir: Path) -> None:
    async with EmbeddedSpire(config(sock_dir)):

        def code() -> grpc.StatusCode:
            ch, stub = raw_stub(sock_dir / "locked.sock")
            with ch:
                return rpc_code(lambda: next(stub.FetchX509SVID(spb.X509SVIDRequest(), metadata=[HEADER],
                                                                timeout=DEADLINE)))

        assert await asyncio.to_thread(code) == grpc.StatusCode.PERMISSION_DENIED


async def test_jwt_round_trip(sock_dir: Path) -> None:
    async with EmbeddedSpire(config(sock_dir)) as spire:
        endpoint = spire.endpoint_for(CHECKOUT)

        def run() -> None:
            with WorkloadApiClient(socket_path=endpoint) as c:
                token = c.fetch_jwt_svid({"inventory"}, timeout=DEADLINE)
                assert str(token.spiffe_id) == CHECKOUT and token.audience == {"inventory"}
                assert str(c.validate_jwt_svid(token.token, "inventory", timeout=DEADLINE).spiffe_id) == CHECKOUT
                bundles = c.fetch_jwt_bundles(timeout=DEADLINE)
                own = bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
                assert own is not None
                local = JwtSvid.parse_and_validate(token.token, own, {"inventory"})
                assert str(local.spiffe_id) == CHECKOUT
                assert bundles.get_bundle_for_trust_domain(TrustDomain("partner.org")) is not None
            source = JwtSource(socket_path=endpoint, timeout_in_seconds=DEADLINE)
            try:
                svid = source.fetch_svid({"a", "b"}, timeout=DEADLINE)
                assert svid.audience == {"a", "b"}
                assert source.get_bundle_for_trust_domain(TrustDomain("example.org")) is not None
            finally:
                source.close()

        await asyncio.to_thread(run)


async def test_jwt_mandatory_fields_and_bad_tokens(sock_dir: Path) -> None:
    async with EmbeddedSpire(config(sock_dir)) as spire:
        foreign = spire.mint_jwt_svid("spiffe://partner.org/x", ["svc"])  # inventory does not federate

        def run() -> tuple[list[grpc.StatusCode], Any]:
            ch, stub = raw_stub(sock_dir / "api.sock")
            with ch:
                md = [HEADER]
                codes = [
                    rpc_code(lambda: stub.FetchJWTSVID(spb.JWTSVIDRequest(), metadata=md, timeout=DEADLINE)),
                    rpc_code(lambda: stub.FetchJWTSVID(spb.JWTSVIDRequest(audience=[""]), metadata=md,
                                                       timeout=DEADLINE)),
                    rpc_code(lambda: stub.FetchJWTSVID(spb.JWTSVIDRequest(audience=["a"], spiffe_id="bad"),
                                                       metadata=md, timeout=DEADLINE)),
                    rpc_code(lambda: stub.FetchJWTSVID(spb.JWTSVIDRequest(audience=["a"], spiffe_id=CHECKOUT),
                                                       metadata=md, timeout=DEADLINE)),
                    rpc_code(lambda: stub.ValidateJWTSVID(spb.ValidateJWTSVIDRequest(svid="a.b.c"),
                                                          metadata=md, timeout=DEADLINE)),
                    rpc_code(lambda: stub.ValidateJWTSVID(spb.ValidateJWTSVIDRequest(audience="a"),
                                                          metadata=md, timeout=DEADLINE)),
                    rpc_code(lambda: stub.ValidateJWTSVID(spb.ValidateJWTSVIDRequest(audience="a", svid="a.b.c"),
                                                          metadata=md, timeout=DEADLINE)),
                    rpc_code(lambda: stub.ValidateJWTSVID(spb.ValidateJWTSVIDRequest(audience="svc", svid=foreign),
                                                          metadata=md, timeout=DEADLINE)),
                ]
                resp = stub.FetchJWTSVID(spb.JWTSVIDRequest(audience=["svc"]), metadata=md, timeout=DEADLINE)
                ok = stub.ValidateJWTSVID(
                    spb.ValidateJWTSVIDRequest(audience="svc", svid=resp.svids[0].svid), metadata=md,
                    timeout=DEADLINE,
                )
                return codes, (resp, ok)

        codes, (resp, ok) = await asyncio.to_thread(run)
        inv, denied = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
        assert codes == [inv, inv, inv, denied, inv, inv, inv, inv]
        assert [(s.spiffe_id, s.hint) for s in resp.svids] == [(INVENTORY, "inventory")]
        assert ok.spiffe_id == INVENTORY
        assert ok.claims["sub"] == INVENTORY and list(ok.claims["aud"]) == ["svc"]
        assert ok.claims["exp"] > time.time()


async def test_svid_rotation_pushed_on_live_stream(sock_dir: Path) -> None:
    """TTL 2 s: a new SVID must arrive on an open stream at half-life (asserted with a generous deadline)."""
    async with EmbeddedSpire(config(sock_dir, svid_ttl=2.0)) as spire:
        endpoint = spire.endpoint_for(INVENTORY)

        def watch() -> list[int]:
            serials: list[int] = []
            done = threading.Event()
            source = X509Source(socket_path=endpoint, timeout_in_seconds=DEADLINE)

            def on_update() -> None:
                serials.append(source.get_x509_context().default_svid.leaf.serial_number)
                if len(set(serials)) >= 3:
                    done.set()

            try:
                serials.append(source.get_x509_context().default_svid.leaf.serial_number)
                source.subscribe_for_updates(on_update)
                done.wait(DEADLINE)
            finally:
                source.close()
            return serials

        serials = await asyncio.to_thread(watch)
        assert len(set(serials)) >= 3, serials


async def test_ca_rotation_keeps_every_svid_verifiable(sock_dir: Path) -> None:
    """Real timers: CA ttl 6 s, SVID ttl 2 s. Every SVID seen on the stream verifies against the bundle of
    every later message received before it expires; at least two CA rotations are observed."""
    async with EmbeddedSpire(config(sock_dir, svid_ttl=2.0, ca_ttl=6.0)) as spire:
        endpoint = spire.endpoint_for(INVENTORY)

        def watch() -> list[tuple[dt.datetime, x509.Certificate, list[x509.Certificate]]]:
            seen: list[tuple[dt.datetime, x509.Certificate, list[x509.Certificate]]] = []
            done = threading.Event()
            issuers: set[str] = set()

            def on_success(ctx: Any) -> None:
                leaf = ctx.default_svid.leaf
                roots = list(ctx.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("example.org"))
                             .x509_authorities)
                seen.append((dt.datetime.now(dt.UTC), leaf, roots))
                issuers.add(leaf.issuer.rfc4514_string())
                if len(issuers) >= 3:
                    done.set()

            with WorkloadApiClient(socket_path=endpoint) as c:
                handle = c.stream_x509_contexts(on_success, lambda e: None)
                try:
                    done.wait(DEADLINE + 10)
                finally:
                    handle.cancel()
            return seen

        seen = await asyncio.to_thread(watch)
    issuers = {leaf.issuer.rfc4514_string() for _, leaf, _ in seen}
    assert len(issuers) >= 3, issuers
    assert max(len(roots) for _, _, roots in seen) >= 2  # overlap was published
    checked = 0
    for i, (_, leaf, _) in enumerate(seen):
        for at, _, roots in seen[i:]:
            if at < leaf.not_valid_after_utc - dt.timedelta(milliseconds=200):
                verify(leaf, roots, at)
                checked += 1
    assert checked > len(seen)


async def test_rotate_ca_pushes_bundle_on_both_streams(sock_dir: Path) -> None:
    async with EmbeddedSpire(config(sock_dir)) as spire:

        def open_streams() -> tuple[grpc.Channel, Any, Any]:
            ch, stub = raw_stub(sock_dir / "api.sock")
            xs = stub.FetchX509SVID(spb.X509SVIDRequest(), metadata=[HEADER], timeout=DEADLINE)
            bs = stub.FetchX509Bundles(spb.X509BundlesRequest(), metadata=[HEADER], timeout=DEADLINE)
            return ch, xs, bs

        ch, xs, bs = await asyncio.to_thread(open_streams)
        try:
            first_x = await asyncio.to_thread(next, xs)
            first_b = await asyncio.to_thread(next, bs)
            assert first_b.bundles["spiffe://example.org"] == first_x.svids[0].bundle
            old_serial = first_x.svids[0].x509_svid
            spire.rotate_ca()  # new CA joins the bundle; SVIDs stay with the old CA until half-life
            b2 = await asyncio.to_thread(next, bs)
            x2 = await asyncio.to_thread(next, xs)
            assert n_certs(first_b.bundles["spiffe://example.org"]) == 1
            assert n_certs(b2.bundles["spiffe://example.org"]) == 2
            assert x2.svids[0].bundle == b2.bundles["spiffe://example.org"]
            assert x2.svids[0].x509_svid == old_serial
            new = spire.force_rotate(INVENTORY)  # now signed by the new CA
            x3 = await asyncio.to_thread(next, xs)
            assert x509.load_der_x509_certificate(x3.svids[0].x509_svid).serial_number == new.serial_number
            assert new.authority_generation == 2
        finally:
            xs.cancel()
            bs.cancel()
            ch.close()


def test_spire_thread_for_blocking_callers(sock_dir: Path) -> None:
    with SpireThread(config(sock_dir)) as t:
        with WorkloadApiClient(socket_path=t.spire.endpoint_for(CHECKOUT)) as c:
            before = c.fetch_x509_svid(timeout=DEADLINE).leaf.serial_number
            new = t.call(lambda s: s.force_rotate(CHECKOUT))
            after = c.fetch_x509_svid(timeout=DEADLINE).leaf.serial_number
        assert before != after == new.serial_number
    assert not (sock_dir / "checkout.sock").exists()


async def test_injected_clock_drives_rotation(sock_dir: Path) -> None:
    """With a controlled clock, `tick()` applies exactly what is due: SVID at half-life, CA steps."""
    t = [dt.datetime.now(dt.UTC)]
    async with EmbeddedSpire(config(sock_dir, svid_ttl=600.0, ca_ttl=3600.0), now=lambda: t[0]) as spire:
        first = spire.current_svid(INVENTORY)
        v = spire.version
        t[0] += dt.timedelta(seconds=200)
        spire.tick()
        assert spire.current_svid(INVENTORY) is first and spire.version == v
        t[0] = first.rotate_at
        spire.tick()
        second = spire.current_svid(INVENTORY)
        assert second.serial_number != first.serial_number
        assert await spire.wait_change(v, 1.0) > v
        t[0] = first.issued_at + dt.timedelta(seconds=1801)  # CA half-life: next CA published
        spire.tick()
        assert len(spire.x509_authorities()) == 2
        assert spire.current_svid(INVENTORY).authority_generation == 1
        t[0] = first.issued_at + dt.timedelta(seconds=2401)  # 2/3: next CA signs
        spire.tick()
        assert spire.current_svid(INVENTORY).authority_generation == 2
        assert len(spire.x509_authorities()) == 2  # the old CA stays while its SVIDs live


async def test_static_socket_may_not_shadow_the_shared_one(sock_dir: Path) -> None:
    text = "trust_domain: example.org\nentries:\n  - spiffe_id: spiffe://example.org/x\n    socket: api.sock\n"
    spire = EmbeddedSpire(config(sock_dir, text))
    with pytest.raises(ConfigError) as ei:
        await spire.start()
    assert str(ei.value.problems[0]).startswith("entries.yaml:3: entries[0].socket: ")
    assert list(sock_dir.iterdir()) == []


async def test_mint_and_write_svid_files_for_outside_clients(sock_dir: Path) -> None:
    async with EmbeddedSpire(config(sock_dir)) as spire:
        svid = spire.mint_x509_svid("spiffe://example.org/ns/shop/sa/curl", ttl=60, dns_names=("localhost",))
        crt, key = write_svid_pem(svid, sock_dir / "pki", "curl")
        assert os.stat(key).st_mode & 0o777 == 0o600
        assert b"PRIVATE KEY" in key.read_bytes()
        leaf = x509.load_pem_x509_certificate(crt.read_bytes())
        verify(leaf, list(spire.x509_authorities()))
        # openssl agrees that the chain verifies against the served bundle.
        (sock_dir / "ca.pem").write_bytes(spire.bundle_pem())
        proc = await asyncio.create_subprocess_exec(
            "openssl", "verify", "-CAfile", str(sock_dir / "ca.pem"), str(crt),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), DEADLINE)
        assert proc.returncode == 0, out


async def test_stop_ends_open_streams(sock_dir: Path) -> None:
    """stop() ends already-open Workload API streams: the client sees an error (not a silent hang), so it
    reconnects. grpclib's Server.close() alone cancels the handlers but leaves the HTTP/2 connections open."""
    spire = EmbeddedSpire(config(sock_dir))
    await spire.start()
    first = threading.Event()
    outcome: list[object] = []

    def watch(path: Path) -> None:
        ch, stub = raw_stub(path)
        try:
            stream = stub.FetchX509SVID(spb.X509SVIDRequest(), metadata=[HEADER], timeout=DEADLINE * 2)
            next(stream)
            first.set()
            next(stream)  # nothing changes: only the end of the stream returns from here
            outcome.append("another message")
        except grpc.RpcError as e:
            outcome.append(e.code())
        finally:
            first.set()
            ch.close()

    try:
        watcher = asyncio.create_task(asyncio.to_thread(watch, spire.socket_path_for(INVENTORY)))
        assert await asyncio.to_thread(first.wait, DEADLINE)
        assert outcome == []
    finally:
        await spire.stop()
    async with asyncio.timeout(DEADLINE):  # well below the call's own deadline (DEADLINE * 2)
        await watcher
    assert outcome == [grpc.StatusCode.UNAVAILABLE], outcome
    assert not spire.socket_path_for(INVENTORY).exists()


# --- issue 13: closer to a real SPIRE agent ----------------------------------------------------------------

OUTSIDE_CLIENT = Path(__file__).with_name("grpc_outside_client.py")
NO_ENTRY_FOR_US = (
    "trust_domain: example.org\nentries:\n  - spiffe_id: spiffe://example.org/x\n    selectors: ['unix:uid:12345']\n"
)


def forge(spire: EmbeddedSpire, sub: str, aud: Any, *, exp_in: float = 300, td: str | None = None,
          **claims: Any) -> str:
    """A token signed with the trust domain's current JWT key, with any claims (PyJWT, not our minting)."""
    key = spire.jwt_authorities(td)[0]
    now = int(time.time())
    body = {"sub": sub, "aud": aud, "exp": int(now + exp_in), "iat": now, **claims}
    return jwt.encode(body, key.private_key, algorithm="ES256", headers={"kid": key.kid, "typ": "JWT"})


def validate_raw(path: Path, token: str, audience: str) -> tuple[grpc.StatusCode, Any]:
    """ValidateJWTSVID over grpcio: (code, response or None); the claims come back as a Struct."""
    ch, stub = raw_stub(path)
    with ch:
        try:
            resp = stub.ValidateJWTSVID(spb.ValidateJWTSVIDRequest(audience=audience, svid=token),
                                        metadata=[HEADER], timeout=DEADLINE)
        except grpc.RpcError as e:
            return e.code(), None
        return grpc.StatusCode.OK, resp


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def test_validate_jwt_svid_serves_callers_without_an_entry(sock_dir: Path) -> None:
    """SPIRE validates for anyone on the socket, against its own trust domain's bundle (federated bundles
    come only with entries); a caller with no identity is not refused."""
    async with EmbeddedSpire(config(sock_dir, NO_ENTRY_FOR_US)) as spire:
        token = spire.mint_jwt_svid("spiffe://example.org/x", ["svc"])
        endpoint = spire.endpoint_for("spiffe://example.org/x")

        def run() -> str:
            with WorkloadApiClient(socket_path=endpoint) as c:
                return str(c.validate_jwt_svid(token, "svc", timeout=DEADLINE).spiffe_id)

        assert await asyncio.to_thread(run) == "spiffe://example.org/x"
        code, _ = await asyncio.to_thread(validate_raw, sock_dir / "api.sock", token, "other")
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # still validated: wrong audience


async def test_fetch_jwt_svid_drops_empty_audience_values(sock_dir: Path) -> None:
    """SPIRE drops empty audience values and refuses only when none is left (credtemplate dropEmptyValues)."""
    async with EmbeddedSpire(config(sock_dir)):

        def run() -> tuple[Any, grpc.StatusCode]:
            ch, stub = raw_stub(sock_dir / "api.sock")
            with ch:
                resp = stub.FetchJWTSVID(spb.JWTSVIDRequest(audience=["svc", ""]), metadata=[HEADER],
                                         timeout=DEADLINE)
                only_empty = rpc_code(lambda: stub.FetchJWTSVID(spb.JWTSVIDRequest(audience=["", ""]),
                                                                metadata=[HEADER], timeout=DEADLINE))
                return resp, only_empty

        resp, only_empty = await asyncio.to_thread(run)
        claims = jwt.decode(resp.svids[0].svid, options={"verify_signature": False})
        assert claims["aud"] == ["svc"]
        assert only_empty == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("claim", "offset", "ok"),
    [
        ("exp", -30, True),  # expired 30 s ago: inside SPIRE's 60 s leeway (go-jose DefaultLeeway)
        ("exp", -90, False),
        ("iat", 30, True),
        ("iat", 600, False),  # issued in the future: refused
        ("nbf", 30, True),
        ("nbf", 600, False),
    ],
    ids=["exp-30s", "exp-90s", "iat+30s", "iat+600s", "nbf+30s", "nbf+600s"],
)
async def test_validate_jwt_svid_time_claims_like_spire(sock_dir: Path, claim: str, offset: int, ok: bool) -> None:
    async with EmbeddedSpire(config(sock_dir)) as spire:
        claims = {"exp_in": offset} if claim == "exp" else {claim: int(time.time()) + offset}
        token = forge(spire, INVENTORY, ["svc"], **claims)
        code, _ = await asyncio.to_thread(validate_raw, sock_dir / "api.sock", token, "svc")
        assert code == (grpc.StatusCode.OK if ok else grpc.StatusCode.INVALID_ARGUMENT)


async def test_foreign_trust_domain_claims_are_filtered(sock_dir: Path) -> None:
    """As SPIRE's agent: for a subject outside the agent's own trust domain only sub, aud and exp (plus
    `allowed_foreign_jwt_claims`) come back; a single-string aud comes back as a list."""
    extra = {"custom": "x", "jti": "abc", "nbf": int(time.time()) - 5}
    text = CONFIG.replace("federation:", "allowed_foreign_jwt_claims: [custom]\nfederation:")
    for cfg_text, kept in ((CONFIG, set()), (text, {"custom"})):
        async with EmbeddedSpire(config(sock_dir, cfg_text)) as spire:
            foreign = forge(spire, "spiffe://partner.org/x", "svc", td="partner.org", **extra)
            own = forge(spire, INVENTORY, "svc", **extra)
            code, resp = await asyncio.to_thread(validate_raw, sock_dir / "checkout.sock", foreign, "svc")
            assert code == grpc.StatusCode.OK
            assert set(resp.claims) == {"sub", "aud", "exp"} | kept
            assert list(resp.claims["aud"]) == ["svc"]
            code, resp = await asyncio.to_thread(validate_raw, sock_dir / "checkout.sock", own, "svc")
            assert code == grpc.StatusCode.OK
            assert set(resp.claims) == {"sub", "aud", "exp", "iat", "custom", "jti", "nbf"}
            assert list(resp.claims["aud"]) == ["svc"]


async def test_health_and_reflection_for_outside_clients(sock_dir: Path) -> None:
    """grpc.health.v1 and server reflection on every socket, as SPIRE's agent serves them (the Workload
    Endpoint spec §7: SHOULD support reflection); neither needs the security header nor an identity. The
    client is grpcio with grpcio-health-checking and grpcio-reflection, in its own process."""
    async with EmbeddedSpire(config(sock_dir, NO_ENTRY_FOR_US)):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(OUTSIDE_CLIENT), f"unix:{sock_dir / 'api.sock'}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), DEADLINE * 2)
    assert proc.returncode == 0, err.decode()
    got = json.loads(out)
    assert got["check:"] == got["check:SpiffeWorkloadAPI"] == "SERVING"
    assert got["check:no.such.Service"] == "NOT_FOUND"
    assert got["watch:first"] == "SERVING"
    # grpclib's reflection lists the services it was given, not itself (grpc-go would add its own two).
    assert got["services"] == ["SpiffeWorkloadAPI", "grpc.health.v1.Health"]
    assert got["methods"]["FetchX509SVID"] == ["X509SVIDRequest", "X509SVIDResponse", True]
    assert got["methods"]["ValidateJWTSVID"] == ["ValidateJWTSVIDRequest", "ValidateJWTSVIDResponse", False]
    assert got["claims_type"] == "google.protobuf.Struct"


async def test_jwt_key_rotation_is_pushed_and_old_keys_stay_while_their_tokens_live(sock_dir: Path) -> None:
    """rotate_jwt_key: a new kid signs at once, the FetchJWTBundles stream pushes both keys, tokens of the old
    key keep validating; the old key leaves the bundle (pushed again) once its last token has expired."""
    t = [dt.datetime.now(dt.UTC)]
    async with EmbeddedSpire(config(sock_dir), now=lambda: t[0]) as spire:
        endpoint = spire.endpoint_for(INVENTORY)
        source = await asyncio.to_thread(JwtSource, socket_path=endpoint, timeout_in_seconds=DEADLINE)
        updated = threading.Event()
        source.subscribe_for_updates(updated.set)
        td = TrustDomain("example.org")

        def kids() -> set[str]:
            bundle = source.get_bundle_for_trust_domain(td)
            assert bundle is not None
            return set(bundle.jwt_authorities)

        async def kids_become(want: Callable[[set[str]], bool]) -> set[str]:
            """Wait for a pushed bundle whose kids satisfy `want` (pushes are events, not polled)."""
            while not want(got := kids()):
                assert await asyncio.to_thread(updated.wait, DEADLINE), got
                updated.clear()
            return got

        try:
            (kid1,) = kids()
            old = (await asyncio.to_thread(source.fetch_svid, {"svc"}, timeout=DEADLINE)).token
            assert kid_of(old) == kid1
            spire.rotate_jwt_key()
            both = await kids_become(lambda k: len(k) == 2)
            assert kid1 in both
            new = (await asyncio.to_thread(source.fetch_svid, {"svc"}, timeout=DEADLINE)).token
            kid2 = kid_of(new)
            assert kid2 != kid1 and both == {kid1, kid2}
            for token in (old, new):
                code, _ = await asyncio.to_thread(validate_raw, sock_dir / "api.sock", token, "svc")
                assert code == grpc.StatusCode.OK
            old_exp = jwt.decode(old, options={"verify_signature": False})["exp"]
            t[0] = dt.datetime.fromtimestamp(old_exp - 1, dt.UTC)
            spire.tick()
            assert {a.kid for a in spire.jwt_authorities()} == {kid1, kid2}  # one second of life left
            t[0] = dt.datetime.fromtimestamp(old_exp, dt.UTC)
            spire.tick()
            assert await kids_become(lambda k: kid1 not in k) == {kid2}
        finally:
            source.close()


async def test_jwt_keys_rotate_on_their_own_and_never_strand_a_token(sock_dir: Path) -> None:
    """Real timers: JWT key ttl 3 s, JWT-SVID ttl 1 s. Tokens are fetched all along; every bundle pushed while a
    token lives holds its kid, and several kids are seen."""
    text = CONFIG.replace("federation:", "jwt_key_ttl: 3s\njwt_ttl: 1s\nfederation:")
    async with EmbeddedSpire(config(sock_dir, text)) as spire:
        endpoint = spire.endpoint_for(INVENTORY)

        def run() -> tuple[list[tuple[float, set[str]]], list[tuple[float, str, float]]]:
            bundles: list[tuple[float, set[str]]] = []
            tokens: list[tuple[float, str, float]] = []
            lock = threading.Lock()

            def on_bundles(bs: Any) -> None:
                b = bs.get_bundle_for_trust_domain(TrustDomain("example.org"))
                with lock:
                    bundles.append((time.time(), set(b.jwt_authorities)))

            with WorkloadApiClient(socket_path=endpoint) as c:
                handle = c.stream_jwt_bundles(on_bundles, lambda e: None)
                try:
                    stop = time.time() + 8
                    while time.time() < stop:
                        resp = c.fetch_jwt_svid({"svc"}, timeout=DEADLINE)
                        with lock:
                            tokens.append((time.time(), kid_of(resp.token), float(resp.expiry)))
                        time.sleep(0.2)
                finally:
                    handle.cancel()
            return bundles, tokens

        bundles, tokens = await asyncio.to_thread(run)
    assert len({kid for _, kid, _ in tokens}) >= 3
    assert max(len(kids) for _, kids in bundles) >= 2  # the next key is published before it signs
    checked = 0
    for fetched, kid, exp in tokens:
        for at, kids in bundles:
            if fetched < at < exp - 0.2:
                assert kid in kids, (kid, at, exp)
                checked += 1
    assert checked > 0
