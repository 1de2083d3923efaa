"""Outbound mTLS origination over real loopback TLS: the app (aiohttp client / raw sockets) speaks plain
HTTP to checkout's outbound listener, which calls inventory's real inbound listener (in this process)
with checkout's SVID and checks inventory's SPIFFE ID (running example: checkout may GET /api/stock/*).
JWT-SVIDs attached to the app's calls come from an embedded SPIRE over real unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import re
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import jwt
import pytest

from sidecar.audit import AuditLog
from sidecar.config import (
    AuditSettings,
    AuthorizationMode,
    HostPort,
    InboundSettings,
    Limits,
    ListenerMode,
    OutboundJwt,
    OutboundTarget,
    Timeouts,
)
from sidecar.endpoint import UnixEndpoint
from sidecar.errors import SvidError
from sidecar.identity import CallerPattern, TrustDomain
from sidecar.inbound import InboundServer, PolicyRef
from sidecar.jwtsource import JwtBundleHolder, JwtSvidFetcher
from sidecar.metrics import Metrics
from sidecar.outbound import OutboundServer, Route
from sidecar.policy import compile_policy
from sidecar.sources import SourceEvent, WorkloadApiSource
from sidecar.svid import X509Bundle, X509Context, X509Svid
from sidecar.tls import TlsContexts, verify_peer_connection
from spire.entries import parse_config
from spire.server import EmbeddedSpire
from tests.example import CHECKOUT, INVENTORY, REPORTING, TD, policy_data
from tests.helpers import App, Pki, until
from tests.pki import CA, Leaf

pytestmark = pytest.mark.uvloop  # the sidecar runs on uvloop; test the same transports

POLICY = policy_data(
    {"name": "checkout-slow", "action": "allow", "methods": ["GET"], "paths": ["/slow"], "callers": [CHECKOUT]}
)
TIMEOUTS = Timeouts(handshake=5, request_head=5, idle=10, upstream_connect=2, upstream_response=10, drain=5)


@dataclass
class Inventory:
    server: InboundServer
    tls: TlsContexts
    port: int
    audit_lines: list[dict[str, Any]] = dataclasses.field(default_factory=list)


TCP_POLICY = {"rules": [{"name": "checkout-tcp", "action": "allow", "callers": [CHECKOUT]}]}


async def start_inventory(
    pki: Pki,
    app: App,
    leaf: Leaf | None = None,
    *,
    mode: ListenerMode = ListenerMode.HTTP,
    policy: dict[str, Any] | None = None,
    jwt_bundles: JwtBundleHolder | None = None,
    forward_jwt: bool = False,
) -> Inventory:
    metrics = Metrics()
    lines: list[dict[str, Any]] = []
    audit = AuditLog(AuditSettings(), write=lambda s: lines.append(json.loads(s)), metrics=metrics, rng=lambda: 0.0)
    tls = TlsContexts(pki.context(leaf or pki.inventory))
    if policy is None:
        policy = TCP_POLICY if mode is ListenerMode.TCP else POLICY
    server = InboundServer(
        InboundSettings(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", app.port), mode=mode,
                        forward_jwt=forward_jwt),
        timeouts=TIMEOUTS, limits=Limits(), tls=tls, policy=PolicyRef(compile_policy(policy, "p")),
        audit=audit, metrics=metrics, jwt_bundles=jwt_bundles,
    )  # fmt: skip
    return Inventory(server, tls, await server.start(), lines)


@pytest.fixture
async def inventory(pki: Pki, app: App) -> AsyncIterator[Inventory]:
    inv = await start_inventory(pki, app)
    yield inv
    await inv.server.drain(1.0)


@dataclass
class Checkout:
    server: OutboundServer
    tls: TlsContexts
    metrics: Metrics
    audit_lines: list[dict[str, Any]]
    port: int

    def route(self, key: str = "inventory") -> Route:
        return self.server.routes[key]

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


async def start_checkout(
    pki: Pki,
    targets: dict[str, tuple[int, str]],
    *,
    by_host: bool = False,
    mode: ListenerMode = ListenerMode.HTTP,
    pool_size: int = 8,
    down_backoff: float | None = 2.0,
    timeouts: Timeouts = TIMEOUTS,
    clock: Callable[[], float] = time.monotonic,
    tls_clock: Callable[[], float] = time.time,
    jwt_by_route: Mapping[str, tuple[OutboundJwt, ...]] | None = None,
    jwt_svids: JwtSvidFetcher | None = None,
) -> Checkout:
    """Checkout's outbound listener; route `key` attaches the JWT-SVIDs of `jwt_by_route[key]` (fetched by
    `jwt_svids`)."""
    metrics = Metrics()
    lines: list[dict[str, Any]] = []
    audit = AuditLog(AuditSettings(), write=lambda s: lines.append(json.loads(s)), metrics=metrics, rng=lambda: 0.0)
    tls = TlsContexts(pki.context(pki.checkout), clock=tls_clock)
    jwts = jwt_by_route or {}
    routes = {
        key: Route(key, OutboundTarget(HostPort("localhost", port), CallerPattern.parse(expect), jwts.get(key, ())),
                   tls=tls, metrics=metrics, timeouts=timeouts, pool_size=pool_size, down_backoff=down_backoff,
                   clock=clock, jwt_svids=jwt_svids)
        for key, (port, expect) in targets.items()
    }  # fmt: skip
    server = OutboundServer(
        "test", HostPort("127.0.0.1", 0), routes, by_host=by_host, mode=mode, timeouts=timeouts,
        limits=Limits(upstream_pool_size=pool_size), tls=tls, audit=audit, metrics=metrics,
    )  # fmt: skip
    return Checkout(server, tls, metrics, lines, await server.start())


async def get(port: int, path: str, **kw: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}", **kw) as r:
        return r.status, await r.text()


async def test_request_goes_out_over_mtls_with_our_identity(pki: Pki, app: App, inventory: Inventory) -> None:
    co = await start_checkout(pki, {"inventory": (inventory.port, INVENTORY)})
    try:
        status, body = await get(co.port, "/api/stock/42")
        assert status == 200, body
        assert app.seen[0].path == "/api/stock/42"
        leaf_sha = hashlib.sha256(pki.checkout.der_list()[0]).hexdigest()
        assert app.seen[0].xfcc == f"By={INVENTORY};Hash={leaf_sha};URI={CHECKOUT}"
        line = co.audit_lines[-1]
        assert line["listener"] == "outbound" and line["status"] == 200 and line["peer"] == INVENTORY
        assert co.route().handshakes == 1 and co.route().mismatches == 0
    finally:
        await co.server.drain(1.0)


async def test_server_id_mismatch_is_refused_before_any_byte(pki: Pki, app: App) -> None:
    # The target is a real sidecar with a valid SVID of the trust domain, but reporting's, not inventory's.
    impostor = await start_inventory(pki, app, leaf=pki.reporting)
    co = await start_checkout(pki, {"inventory": (impostor.port, INVENTORY)})
    try:
        status, body = await get(co.port, "/api/stock/42")
        assert status == 502
        data = json.loads(body)
        assert data["error"] == "server identity rejected"
        assert data["expected"] == INVENTORY and REPORTING in data["detail"]
        assert app.seen == []  # not a byte of the request reached the target's app
        assert co.route().mismatches == 1
        assert co.metric("spiffe_sidecar_outbound_server_id_mismatches_total", route="inventory") == 1
        # The audit line names the ID the server presented (not the route's pattern) and the route.
        line = co.audit_lines[-1]
        assert (line["listener"], line["peer"], line["rule"], line["decision"], line["status"]) == (
            "outbound", REPORTING, "inventory", "deny", 502
        )
        assert INVENTORY in line["reason"]
    finally:
        await co.server.drain(1.0)
        await impostor.server.drain(1.0)


async def test_target_down_gets_fast_503_during_backoff(pki: Pki) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()  # nothing listens there now
    co = await start_checkout(pki, {"inventory": (dead_port, INVENTORY)}, down_backoff=30.0)
    try:
        status, body = await get(co.port, "/api/stock/1")
        assert status == 502 and json.loads(body)["error"] == "target unreachable"
        assert co.route().is_down()
        for _ in range(5):
            status, body = await get(co.port, "/api/stock/1")
            assert status == 503 and "marked down" in body
        assert co.metric("spiffe_sidecar_upstream_errors_total", listener="outbound", kind="down") == 5
        assert co.route().handshakes == 0
    finally:
        await co.server.drain(1.0)


async def test_target_recovers_after_backoff(pki: Pki, app: App) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    co = await start_checkout(pki, {"inventory": (port, INVENTORY)}, down_backoff=0.2)
    try:
        assert (await get(co.port, "/api/stock/1"))[0] == 502
        inv = await start_inventory(pki, app)
        co.route().pool.port = inv.port  # the service comes back (at a new address, as after a redeploy)
        await asyncio.sleep(0.3)
        assert (await get(co.port, "/api/stock/1"))[0] == 200
        await inv.server.drain(1.0)
    finally:
        await co.server.drain(1.0)


HANDSHAKES_SEEN: list[int] = []


async def test_pool_reuse_many_requests_few_handshakes(pki: Pki, app: App, inventory: Inventory) -> None:
    co = await start_checkout(pki, {"inventory": (inventory.port, INVENTORY)}, pool_size=4)
    n_clients, per_client = 4, 50
    try:
        async def client() -> None:
            # Each client uses its own keep-alive connection to the outbound listener.
            async with aiohttp.ClientSession() as s:
                for i in range(per_client):
                    async with s.get(f"http://127.0.0.1:{co.port}/api/stock/{i}") as r:
                        assert r.status == 200
                        await r.read()

        async with asyncio.timeout(60):
            await asyncio.gather(*(client() for _ in range(n_clients)))
        handshakes = co.route().handshakes
        HANDSHAKES_SEEN.append(handshakes)
        print(f"pool reuse: {n_clients * per_client} requests used {handshakes} mTLS handshakes")
        assert len(app.seen) == n_clients * per_client
        assert 1 <= handshakes <= 4  # bounded by the pool size, not the number of requests
        assert co.metric("spiffe_sidecar_outbound_handshakes_total", route="inventory") == handshakes
        assert co.route().pool.size <= 4
    finally:
        await co.server.drain(1.0)


async def test_rotation_drains_pooled_connections_gracefully(pki: Pki, app: App, inventory: Inventory) -> None:
    co = await start_checkout(pki, {"inventory": (inventory.port, INVENTORY)}, pool_size=4)
    try:
        assert (await get(co.port, "/api/stock/1"))[0] == 200
        assert co.route().handshakes == 1 and co.route().pool.idle_count == 1
        # A slow request holds a pooled connection while our SVID rotates.
        slow = asyncio.ensure_future(get(co.port, "/slow"))
        for _ in range(100):
            if any(s.path == "/slow" for s in app.seen):
                break
            await asyncio.sleep(0.02)
        new_leaf = pki.root.intermediate().leaf(CHECKOUT)
        co.tls.update(pki.context(new_leaf))
        co.server.retire()
        assert co.route().pool.idle_count == 0  # idle ones closed at once
        status, body = await slow
        assert status == 200, body  # the in-flight request finished on its old connection
        assert co.route().pool.size == 0  # ... which then closed instead of returning to the pool
        assert (await get(co.port, "/api/stock/2"))[0] == 200
        new_sha = hashlib.sha256(new_leaf.der_list()[0]).hexdigest()
        assert app.seen[-1].xfcc.endswith(f"Hash={new_sha};URI={CHECKOUT}")  # new connection, new SVID
        assert co.route().handshakes == 2  # the slow request reused the first; the new request made one
    finally:
        await co.server.drain(1.0)


async def test_http_proxy_mode_routes_by_host(pki: Pki, app: App, inventory: Inventory) -> None:
    impostor = await start_inventory(pki, app, leaf=pki.reporting)
    co = await start_checkout(
        pki,
        {"inventory.shop.svc": (inventory.port, INVENTORY), "reports.shop.svc": (impostor.port, INVENTORY)},
        by_host=True,
    )
    try:
        # An app honouring HTTP_PROXY sends the absolute form.
        proxy = f"http://127.0.0.1:{co.port}"
        async with aiohttp.ClientSession() as s:
            async with s.get("http://inventory.shop.svc:8443/api/stock/7", proxy=proxy) as r:
                assert r.status == 200
                assert (await r.json())["path"] == "/api/stock/7"
            async with s.get("http://reports.shop.svc/api/stock/7", proxy=proxy) as r:
                assert r.status == 502  # routed to the impostor, refused on its ID
            async with s.get("http://unknown.shop.svc/x", proxy=proxy) as r:
                assert r.status == 502 and "no outbound route" in await r.text()
        # Origin form with a Host header picks the route too.
        status, _ = await get(co.port, "/api/stock/8", headers={"Host": "Inventory.Shop.Svc:8443"})
        assert status == 200
        assert [s.path for s in app.seen] == ["/api/stock/7", "/api/stock/8"]
    finally:
        await co.server.drain(1.0)
        await impostor.server.drain(1.0)


async def test_tcp_mode_relays_bytes_over_verified_mtls(pki: Pki, app: App, inventory: Inventory) -> None:
    co = await start_checkout(pki, {"inventory": (inventory.port, INVENTORY)}, mode=ListenerMode.TCP)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", co.port)
        writer.write(b"GET /api/stock/3 HTTP/1.1\r\nHost: inventory\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(10):
            data = await reader.read()
        writer.close()
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert app.seen[-1].path == "/api/stock/3"
    finally:
        await co.server.drain(1.0)


async def test_tcp_mode_mismatch_closes_without_sending(pki: Pki, app: App) -> None:
    impostor = await start_inventory(pki, app, leaf=pki.reporting)
    co = await start_checkout(pki, {"inventory": (impostor.port, INVENTORY)}, mode=ListenerMode.TCP)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", co.port)
        writer.write(b"GET /api/stock/3 HTTP/1.1\r\nHost: inventory\r\n\r\n")
        async with asyncio.timeout(10):
            data = await reader.read()
        writer.close()
        assert data == b"" and app.seen == []
        assert co.route().mismatches == 1
    finally:
        await co.server.drain(1.0)
        await impostor.server.drain(1.0)


# --- labels and audit (errors raised in the relay code shared with inbound.py) --------------------------


async def test_errors_in_shared_relay_code_count_under_the_outbound_label(
    pki: Pki, app: App, inventory: Inventory
) -> None:
    # The upstream-response timeout is raised by inbound._Exchange code that outbound reuses.
    short = Timeouts(handshake=5, request_head=5, idle=10, upstream_connect=2, upstream_response=0.3, drain=5)
    co = await start_checkout(pki, {"inventory": (inventory.port, INVENTORY)}, timeouts=short)
    try:
        status, _ = await get(co.port, "/slow")  # the app answers after 1 s
        assert status == 504
        assert co.metric("spiffe_sidecar_upstream_errors_total", listener="outbound", kind="timeout") == 1
        assert co.metric("spiffe_sidecar_upstream_errors_total", listener="inbound", kind="timeout") == 0
        assert co.metric("spiffe_sidecar_request_duration_seconds_count", listener="outbound") == 1
        assert co.metric("spiffe_sidecar_request_duration_seconds_count", listener="inbound") == 0
        line = co.audit_lines[-1]
        assert (line["listener"], line["peer"], line["rule"]) == ("outbound", INVENTORY, "inventory")
        assert line["status"] == 504
    finally:
        await co.server.drain(1.0)


async def test_audit_peer_is_the_verified_server_id_not_the_pattern(pki: Pki, app: App, inventory: Inventory) -> None:
    # Two routes on one proxy port, each expecting a pattern: every line names the server actually verified.
    other = await start_inventory(pki, app, leaf=pki.reporting)
    shop = f"spiffe://{TD}/ns/shop/**"
    co = await start_checkout(
        pki, {"inventory.shop.svc": (inventory.port, shop), "reports.shop.svc": (other.port, shop)}, by_host=True
    )
    try:
        async with aiohttp.ClientSession() as s:  # one app connection, requests alternate between routes
            for host in ("inventory.shop.svc", "reports.shop.svc", "inventory.shop.svc", "nowhere.shop.svc"):
                async with s.get(f"http://127.0.0.1:{co.port}/api/stock/1", headers={"Host": host}) as r:
                    await r.read()
        got = [(line["rule"], line["peer"], line["status"]) for line in co.audit_lines]
        assert got == [
            ("inventory.shop.svc", INVENTORY, 200),
            ("reports.shop.svc", REPORTING, 200),  # same policy on both servers: only their IDs differ
            ("inventory.shop.svc", INVENTORY, 200),
            ("no-route", "-", 502),
        ], got
    finally:
        await co.server.drain(1.0)
        await other.server.drain(1.0)


# --- target-down backoff (configurable, deterministic with an injected clock) --------------------------


async def test_down_backoff_comes_from_timeouts_and_follows_the_clock(pki: Pki) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    now = [1000.0]
    timeouts = Timeouts(handshake=5, request_head=5, idle=10, upstream_connect=2, upstream_response=10, drain=5,
                        target_down_backoff=5.0)  # fmt: skip
    co = await start_checkout(
        pki, {"inventory": (dead_port, INVENTORY)}, timeouts=timeouts, down_backoff=None, clock=lambda: now[0]
    )
    try:
        assert co.route().down_backoff == 5.0
        assert (await get(co.port, "/api/stock/1"))[0] == 502  # the connect fails: marked down until 1005
        assert co.route().down_until == 1005.0
        for t in (1000.0, 1003.0, 1004.999):
            now[0] = t
            assert (await get(co.port, "/api/stock/1"))[0] == 503
        assert co.metric("spiffe_sidecar_upstream_errors_total", listener="outbound", kind="connect") == 1
        now[0] = 1005.0  # backoff over: the next request tries the target again (and fails again)
        assert (await get(co.port, "/api/stock/1"))[0] == 502
        assert co.metric("spiffe_sidecar_upstream_errors_total", listener="outbound", kind="connect") == 2
        assert co.metric("spiffe_sidecar_upstream_errors_total", listener="outbound", kind="down") == 3
        assert co.route().down_until == 1010.0
    finally:
        await co.server.drain(1.0)


# --- the server check uses the snapshot of the handshake ---------------------------------------------


async def test_server_check_uses_the_snapshot_the_connection_was_made_with(
    pki: Pki, app: App, inventory: Inventory
) -> None:
    co = await start_checkout(pki, {"inventory": (inventory.port, INVENTORY)})
    route = co.route()
    try:
        ctx = route.client_context()  # what the pool takes for a new connection
        # A rotation lands before the handshake completes: the new bundle (a new root for the trust
        # domain) does not trust inventory's chain. The connection was made with the old context, so it
        # must be checked against the old bundles (the ones OpenSSL verified it with).
        new_root = CA.root(TD)
        new_leaf = new_root.leaf(CHECKOUT)
        new_ctx = X509Context(
            (X509Svid.from_pem(new_leaf.chain_pem(), new_leaf.key_pem()),),
            {TrustDomain.parse(TD): X509Bundle.from_der(TrustDomain.parse(TD), new_root.bundle_der())},
        )
        co.tls.update(new_ctx)
        _, writer = await asyncio.open_connection("127.0.0.1", inventory.port, ssl=ctx, server_hostname="localhost")
        try:
            obj = writer.get_extra_info("ssl_object")
            assert route.snapshot_of(obj) is not None and route.snapshot_of(obj) is not co.tls.current
            route.verify_server(obj)  # passes: inventory verified against the snapshot of this handshake
            with pytest.raises(SvidError) as info:  # what checking against the newest snapshot would say
                verify_peer_connection(obj, co.tls.current, dt.datetime.now(dt.UTC))
            assert info.value.reason == "bad_chain"
        finally:
            writer.close()
        # A connection made with a context this route never handed out is refused (fail closed).
        foreign = pki.context(pki.checkout)
        other = TlsContexts(foreign)
        _, writer = await asyncio.open_connection(
            "127.0.0.1", inventory.port, ssl=other.client, server_hostname="localhost"
        )
        try:
            with pytest.raises(SvidError) as info:
                route.verify_server(writer.get_extra_info("ssl_object"))
            assert info.value.reason == "stale_snapshot"
        finally:
            writer.close()
    finally:
        await co.server.drain(1.0)


async def test_expired_own_svid_gets_503_not_an_expired_handshake(pki: Pki, app: App, inventory: Inventory) -> None:
    now = [time.time()]
    co = await start_checkout(pki, {"inventory": (inventory.port, INVENTORY)}, tls_clock=lambda: now[0])
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{co.port}/api/stock/1") as r:
                assert r.status == 200
            now[0] += 10 * 365 * 86400.0  # our SVID has expired and no new one came
            co.server.retire()  # no pooled connection: the next request needs a new handshake
            async with s.get(f"http://127.0.0.1:{co.port}/api/stock/2") as r:
                assert r.status == 503 and "no valid X.509-SVID" in await r.text()
        assert co.metric("spiffe_sidecar_upstream_errors_total", listener="outbound", kind="no_svid") == 1
        assert co.route().handshakes == 1
        # A new app connection is refused at once, with the reason counted.
        with pytest.raises(aiohttp.ClientError):
            await get(co.port, "/api/stock/3")
        assert co.metric("spiffe_sidecar_handshake_failures_total", listener="outbound", reason="own_svid_expired") == 1
    finally:
        await co.server.drain(1.0)


# --- the outbound TCP relay keeps every deadline of the inbound one, and audits each connection (issue 10 #8)


async def test_outbound_tcp_relay_closes_when_idle_and_audits_the_connection(pki: Pki, app: App) -> None:
    inv = await start_inventory(pki, app, mode=ListenerMode.TCP)
    co = await start_checkout(pki, {"inventory": (inv.port, INVENTORY)}, mode=ListenerMode.TCP,
                              timeouts=dataclasses.replace(TIMEOUTS, idle=0.5))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", co.port)
        writer.write(b"GET /api/stock/3 HTTP/1.1\r\nHost: inventory\r\n\r\n")  # keep-alive: nothing closes it
        async with asyncio.timeout(10):
            data = await reader.readuntil(b"}")
            assert data.startswith(b"HTTP/1.1 200")
            assert await reader.read() == b""  # no byte either way for timeouts.idle: closed
        writer.close()
        await until(lambda: bool(co.audit_lines))
        line = co.audit_lines[-1]
        assert (line["listener"], line["peer"], line["rule"], line["decision"]) == (
            "outbound", INVENTORY, "inventory", "allow")
        assert line["method"] == "-" and line["bytes_in"] > 30 and line["bytes_out"] == len(data)
    finally:
        await co.server.drain(1.0)
        await inv.server.drain(1.0)


async def test_outbound_tcp_relay_cuts_off_an_app_that_stops_reading(pki: Pki) -> None:
    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        block = b"f" * 65536
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(block)
                await writer.drain()

    srv = await asyncio.start_server(firehose, "127.0.0.1", 0)
    inv = await start_inventory(pki, App(srv.sockets[0].getsockname()[1]), mode=ListenerMode.TCP)
    co = await start_checkout(pki, {"inventory": (inv.port, INVENTORY)}, mode=ListenerMode.TCP,
                              timeouts=dataclasses.replace(TIMEOUTS, write_stall=1, idle=60))
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", co.port, limit=1024)
        cast(asyncio.Transport, writer.transport).pause_reading()  # the app never reads
        writer.write(b"go")
        await until(lambda: bool(co.audit_lines), timeout=20)  # the relay ended: one audit line
        writer.transport.abort()
        assert co.metric("spiffe_sidecar_peer_stalls_total", listener="outbound", kind="write") == 1
        assert co.audit_lines[-1]["status"] == 408 and co.audit_lines[-1]["bytes_out"] > 64 * 1024
    finally:
        await co.server.drain(1.0)
        await inv.server.drain(1.0)
        srv.close()


async def test_outbound_tcp_relay_ends_when_the_server_certificate_expires(pki: Pki) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    short = pki.root.intermediate().leaf(INVENTORY, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2))
    inv = await start_inventory(pki, App(srv.sockets[0].getsockname()[1]), leaf=short, mode=ListenerMode.TCP)
    co = await start_checkout(pki, {"inventory": (inv.port, INVENTORY)}, mode=ListenerMode.TCP,
                              timeouts=dataclasses.replace(TIMEOUTS, idle=60))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", co.port)
        async with asyncio.timeout(10):
            while True:  # keep the relay busy: only the expiry can end it
                writer.write(b"x")
                # A poll: the relay staying open for 0.1 s is expected until the certificate expires; the
                # enclosing 10 s deadline fails the test if it never closes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        if await reader.read() == b"":
                            break
        writer.close()
        assert co.metric("spiffe_sidecar_handshake_failures_total", listener="outbound", reason="expired") == 1
    finally:
        await co.server.drain(1.0)
        await inv.server.drain(1.0)
        srv.close()


# --- review of the rebuilt data plane ---------------------------------------------------------------------


async def _scripted_tls_server(pki: Pki, leaf: Leaf, answers: list[bytes]) -> tuple[asyncio.AbstractServer, int]:
    """A target at byte level with `leaf`'s SVID: the n-th request head it receives (one per connection's
    read, bodiless requests) is answered with answers[n], the last one repeated."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*pki.files(f"scripted{id(leaf)}", leaf))
    script = list(answers)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(65536):
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    writer.write(script.pop(0) if len(script) > 1 else script[0])
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    return srv, srv.sockets[0].getsockname()[1]


async def test_review_a_targets_response_never_carries_another_targets_head(pki: Pki) -> None:
    """Two routes on the proxy port. A compromised (but correctly identified) target sends, after a
    response, the start of a 204 head with a Set-Cookie. Until a94534e the pooled connection was reused
    with that half head in its reader; the next response completed it, and the reader cached it under the
    bytes of that read ("HTTP/1.1 200 OK ... content-length: 3"), so an honest target's identical response
    reached the app with the other target's status and fields, and its body after a 204 (the app's
    connection desynchronised). The old data plane (cec59bc) parsed each response with a fresh parser and
    cached nothing: every response arrived as sent."""
    honest = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"
    evil, evil_port = await _scripted_tls_server(pki, pki.reporting, [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" + b"HTTP/1.1 204 No Content\r\nSet-Cookie: s=evil\r\nX-A: ",
        honest,
    ])  # fmt: skip
    good, good_port = await _scripted_tls_server(pki, pki.inventory, [honest])
    co = await start_checkout(pki, {"evil.svc": (evil_port, REPORTING), "good.svc": (good_port, INVENTORY)},
                              by_host=True)  # fmt: skip
    got: dict[bytes, bytes] = {}
    try:
        for host in (b"evil.svc", b"evil.svc", b"good.svc"):
            reader, writer = await asyncio.open_connection("127.0.0.1", co.port)
            writer.write(b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            data = b""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    while chunk := await reader.read(65536):
                        data += chunk
            got[host] = data
            writer.close()
    finally:
        await co.server.drain(1.0)
        evil.close()
        good.close()
    assert got[b"good.svc"] == honest, got


# --- JWT-SVIDs attached to the app's calls (issue 13) ------------------------------------------------------
# Checkout's route fetches JWT-SVIDs from an embedded SPIRE (FetchJWTSVID on checkout's socket); inventory
# validates them against the JWT bundles of the same SPIRE (FetchJWTBundles on inventory's socket). The mTLS
# SVIDs still come from `Pki`: a step-up binds the token's subject to the mTLS peer, and both name CHECKOUT.

SPIRE_ENTRIES = f"""
trust_domain: {TD}
entries:
  - spiffe_id: {CHECKOUT}
    socket: checkout.sock
  - spiffe_id: {INVENTORY}
    socket: inventory.sock
"""
WAIT = 15.0
JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}")  # the base64url of '{"' starts every JWS header
APP_TOKEN = "Bearer app-own-token"  # what an app might hold itself (perhaps its own caller's token)

# Inventory: reserving stock needs a JWT-SVID for audience `inventory` bound to the peer (step-up: the app
# gets the subject, not the token); reading /api/** is a plain allow (Authorization reaches the app as sent).
JWT_POLICY = policy_data(
    {"name": "checkout-reserves-stock", "action": "allow", "methods": ["POST"], "paths": ["/api/stock/*/reserve"],
     "callers": [CHECKOUT], "jwt": {"audience": "inventory"}},
    {"name": "checkout-reads-api", "action": "allow", "methods": ["GET"], "paths": ["/api/**"], "callers": [CHECKOUT]},
)  # fmt: skip
# Checkout's route to inventory: a token for inventory under /api/stock (replacing the app's), another
# audience under the longer /api/stock/audit, and under /api/orders one that keeps an app's own Authorization.
CHECKOUT_JWT = (
    OutboundJwt("inventory", "/api/stock"),
    OutboundJwt("auditor", "/api/stock/audit/"),
    OutboundJwt("inventory", "/api/orders", AuthorizationMode.KEEP),
)


@dataclass
class JwtShop:
    spire: EmbeddedSpire
    bundles: JwtBundleHolder  # inventory's, following its FetchJWTBundles stream
    fetcher: JwtSvidFetcher  # checkout's
    events: list[SourceEvent]  # the fetcher's
    inventory: Inventory
    checkout: Checkout

    def fetched(self) -> int:
        return sum(1 for e in self.events if e.kind == "jwt_svid_fetched")

    def token(self) -> str:
        token = self.fetcher.cached("inventory")
        assert token is not None
        return token


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="jwto-", dir="/tmp"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    async with asyncio.timeout(5):
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def jwt_shop(
    pki: Pki,
    app: App,
    sock_dir: Path,
    *,
    checkout_socket: Path | None = None,
    fetch_timeout: float = 5.0,
    min_remaining: float = 5.0,
    forward_jwt: bool = False,
    jwt_ttl: float | None = None,
    routes: Mapping[str, tuple[OutboundJwt, ...]] | None = None,
    by_host: bool = False,
) -> AsyncIterator[JwtShop]:
    """SPIRE, inventory (JWT_POLICY, bundles from SPIRE) and checkout (CHECKOUT_JWT on route `inventory`, or
    `routes`, all to inventory), its fetcher on `checkout_socket` (default: checkout's SPIRE socket)."""
    async with contextlib.AsyncExitStack() as stack:
        spire = await stack.enter_async_context(
            EmbeddedSpire(parse_config(SPIRE_ENTRIES, socket_dir=str(sock_dir), jwt_ttl=jwt_ttl))
        )
        source = WorkloadApiSource(UnixEndpoint(str(spire.socket_path_for(INVENTORY))))
        bundles = JwtBundleHolder()
        stack.callback(bundles.follow(source))
        stack.push_async_callback(_cancel, asyncio.create_task(source.run()))
        await bundles.wait_for(1, WAIT)
        events: list[SourceEvent] = []
        endpoint = UnixEndpoint(str(checkout_socket or spire.socket_path_for(CHECKOUT)))
        fetcher = await stack.enter_async_context(
            JwtSvidFetcher(
                endpoint, timeout=fetch_timeout, min_remaining=min_remaining, retry_initial=0.1, on_event=events.append
            )
        )
        inv = await start_inventory(pki, app, policy=JWT_POLICY, jwt_bundles=bundles, forward_jwt=forward_jwt)
        stack.push_async_callback(inv.server.drain, 1.0)
        routes = {"inventory": CHECKOUT_JWT} if routes is None else routes
        co = await start_checkout(pki, {key: (inv.port, INVENTORY) for key in routes}, jwt_by_route=routes,
                                  jwt_svids=fetcher, by_host=by_host)  # fmt: skip
        stack.push_async_callback(co.server.drain, 1.0)
        yield JwtShop(spire, bundles, fetcher, events, inv, co)


async def call(port: int, method: str, path: str, **kw: Any) -> tuple[int, str]:
    """The app's request to checkout's outbound listener (a new app connection), under a deadline."""
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as s, s.request(method, f"http://127.0.0.1:{port}{path}",
                                                                      **kw) as r:  # fmt: skip
        return r.status, await r.text()


async def raw_call(port: int, target: str, fields: bytes = b"") -> bytes:
    """A GET with `target` and `fields` exactly as written (aiohttp would normalise them), read until the
    close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: inventory\r\nConnection: close\r\n%s\r\n" % (target.encode(), fields))
        async with asyncio.timeout(15):
            return await reader.read()
    finally:
        writer.close()


async def call_via_proxy(proxy: str, url: str) -> tuple[int, str]:
    """An app honouring HTTP_PROXY: the absolute form to checkout's proxy port, under a deadline."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s, s.get(url, proxy=proxy) as r:
        return r.status, await r.text()


def claims(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def authorization(app: App) -> list[str]:
    """The Authorization fields of the last request inventory's app received."""
    return list(app.seen[-1].headers.getall("Authorization", []))


def assert_no_token(lines: list[dict[str, Any]], *tokens: str) -> None:
    text = json.dumps(lines)
    assert JWT_LIKE.search(text) is None and "Bearer" not in text, text
    for token in tokens:
        assert token not in text and token.split(".")[2] not in text


@pytest.mark.timeout(60)
async def test_an_attached_jwt_svid_passes_inventorys_step_up(pki: Pki, app: App, sock_dir: Path) -> None:
    async with jwt_shop(pki, app, sock_dir) as shop:
        co, inv = shop.checkout, shop.inventory
        # Without a JWT-SVID (a route with none), mTLS as checkout is not enough for the step-up rule.
        plain = await start_checkout(pki, {"inventory": (inv.port, INVENTORY)})
        try:
            status, _ = await call(plain.port, "POST", "/api/stock/42/reserve")
            assert status == 401 and app.seen == []
            assert "jwt_subject" not in plain.audit_lines[-1]
        finally:
            await plain.server.drain(1.0)
        # The first request waits for the fetch (its body is held meanwhile), then goes out with the token.
        body = b'{"quantity": 3}'
        status, text = await call(co.port, "POST", "/api/stock/42/reserve", data=body)
        assert status == 200, text
        seen = app.seen[-1]
        assert seen.path == "/api/stock/42/reserve" and seen.body_sha == hashlib.sha256(body).hexdigest()
        assert seen.headers.getall("X-Spiffe-Jwt-Subject") == [CHECKOUT]
        assert seen.headers["X-Spiffe-Jwt-Audience"] == "inventory"
        assert "Authorization" not in seen.headers  # validated by inventory's sidecar, kept from its app
        kid = shop.spire.jwt_authorities()[0].kid
        line = inv.audit_lines[-1]
        assert (line["rule"], line["decision"], line["jwt_subject"], line["jwt_audience"], line["jwt_kid"]) == (
            "checkout-reserves-stock", "allow", CHECKOUT, "inventory", kid)  # fmt: skip
        out = co.audit_lines[-1]
        assert (out["listener"], out["status"], out["peer"], out["rule"]) == ("outbound", 200, INVENTORY, "inventory")
        assert (out["jwt_subject"], out["jwt_audience"], out["jwt_kid"]) == (CHECKOUT, "inventory", kid)
        assert "upstream_failure" not in out
        # The next one: the held token, on the pooled connection (no fetch, no handshake).
        status, text = await call(co.port, "POST", "/api/stock/43/reserve", data=body)
        assert status == 200, text
        assert app.seen[-1].headers.getall("X-Spiffe-Jwt-Subject") == [CHECKOUT]
        assert (co.audit_lines[-1]["jwt_subject"], co.audit_lines[-1]["jwt_kid"]) == (CHECKOUT, kid)
        assert shop.fetched() == 1 and co.route().handshakes == 1
        # The token is checkout's for inventory, signed by the trust domain's key (checked outside the sidecar).
        token = shop.token()
        authority = shop.spire.jwt_authorities()[0]
        got = jwt.decode(token, authority.public_key, algorithms=["ES256"], audience="inventory")
        assert got["sub"] == CHECKOUT and jwt.get_unverified_header(token)["kid"] == kid
        # Neither end logs it.
        assert_no_token(co.audit_lines, token)
        assert_no_token(inv.audit_lines, token)


@pytest.mark.timeout(60)
async def test_replace_sends_our_token_instead_of_the_apps(pki: Pki, app: App, sock_dir: Path) -> None:
    async with jwt_shop(pki, app, sock_dir) as shop:
        co = shop.checkout
        # A plain allow rule at inventory: Authorization reaches inventory's app as it arrives.
        status, text = await call(co.port, "GET", "/api/stock/42", headers={"Authorization": APP_TOKEN})
        assert status == 200, text
        token = shop.token()
        assert authorization(app) == [f"Bearer {token}"]
        assert claims(token)["sub"] == CHECKOUT and claims(token)["aud"] == ["inventory"]
        assert co.audit_lines[-1]["jwt_audience"] == "inventory"
        # The step-up rule would refuse the app's token (401): ours went in its place.
        status, text = await call(co.port, "POST", "/api/stock/42/reserve", headers={"Authorization": APP_TOKEN})
        assert status == 200, text
        # Two Authorization fields from the app, in any case: neither leaves.
        out = await raw_call(co.port, "/api/stock/7", b"Authorization: Basic YTpi\r\nAUTHORIZATION: %s\r\n"
                             % APP_TOKEN.encode())  # fmt: skip
        assert out.startswith(b"HTTP/1.1 200 "), out[:200]
        assert authorization(app) == [f"Bearer {token}"]
        assert not any("app-own-token" in v or "YTpi" in v for s in app.seen for v in s.headers.values())
        assert_no_token(co.audit_lines, token)


@pytest.mark.timeout(60)
async def test_a_forwarding_inventory_hands_its_app_checkouts_token(pki: Pki, app: App, sock_dir: Path) -> None:
    # inventory.forward_jwt: after the step-up, its app gets the token it validated: ours, not checkout's app's.
    async with jwt_shop(pki, app, sock_dir, forward_jwt=True) as shop:
        status, text = await call(shop.checkout.port, "POST", "/api/stock/42/reserve",
                                  headers={"Authorization": APP_TOKEN})  # fmt: skip
        assert status == 200, text
        assert authorization(app) == [f"Bearer {shop.token()}"]
        assert app.seen[-1].headers.getall("X-Spiffe-Jwt-Subject") == [CHECKOUT]
        assert shop.inventory.audit_lines[-1]["rule"] == "checkout-reserves-stock"


@pytest.mark.timeout(60)
async def test_keep_sends_the_apps_authorization_unchanged(pki: Pki, app: App, sock_dir: Path) -> None:
    async with jwt_shop(pki, app, sock_dir) as shop:
        co = shop.checkout
        basic = "Basic Y2hlY2tvdXQ6c2VjcmV0"
        for value in (basic, APP_TOKEN):
            status, text = await call(co.port, "GET", "/api/orders/1", headers={"Authorization": value})
            assert status == 200, text
            assert authorization(app) == [value]
            assert "jwt_subject" not in co.audit_lines[-1] and "jwt_audience" not in co.audit_lines[-1]
        assert shop.fetched() == 0  # nothing to attach: no token was even fetched
        # Without an Authorization of the app's own, ours is attached.
        status, text = await call(co.port, "GET", "/api/orders/2")
        assert status == 200, text
        assert authorization(app) == [f"Bearer {shop.token()}"]
        line = co.audit_lines[-1]
        assert (line["jwt_subject"], line["jwt_audience"]) == (CHECKOUT, "inventory") and line["jwt_kid"] != "-"


@pytest.mark.timeout(60)
async def test_prefixes_match_whole_segments_and_the_longest_wins(pki: Pki, app: App, sock_dir: Path) -> None:
    async with jwt_shop(pki, app, sock_dir) as shop:
        co = shop.checkout
        cases = [
            ("/api/stock", "inventory"),
            ("/api/stock/", "inventory"),
            ("/api/stock/42", "inventory"),
            ("/api/stock/42?fields=all", "inventory"),
            ("/api/stock/audit", "auditor"),  # the longer prefix ("/api/stock/audit/" covers its own path)
            ("/api/stock/audit/7", "auditor"),
            ("/api/stock/auditor", "inventory"),  # not a segment of /api/stock/audit
            ("/api/stockpile", None),
            ("/api/stock-levels", None),
            ("/api", None),
            ("/api/other", None),
            ("/", None),
        ]
        for path, audience in cases:
            status, text = await call(co.port, "GET", path)
            assert status in (200, 403), (path, text)
            line = co.audit_lines[-1]
            if audience is None:
                assert "jwt_audience" not in line, path
                if status == 200:
                    assert authorization(app) == [], path
            else:
                assert status == 200, (path, text)
                [value] = authorization(app)
                assert value.startswith("Bearer ") and claims(value[7:])["aud"] == [audience], path
                assert line["jwt_audience"] == audience, path
        assert shop.fetched() == 2  # one token per audience, each fetched once
        # The prefix is matched on the normalised path, the one forwarded: dot segments move a request in or
        # out of a prefix the way they move it at inventory.
        out = await raw_call(co.port, "/api/stock/../other")
        assert out.startswith(b"HTTP/1.1 200 ") and app.seen[-1].path == "/api/other"
        assert authorization(app) == [] and "jwt_audience" not in co.audit_lines[-1]
        out = await raw_call(co.port, "/api/x/../stock/%34%32")
        assert out.startswith(b"HTTP/1.1 200 ") and app.seen[-1].path == "/api/stock/42"
        assert claims(authorization(app)[0][7:])["aud"] == ["inventory"]


@pytest.mark.timeout(60)
async def test_the_proxy_port_picks_the_token_by_route_and_path(pki: Pki, app: App, sock_dir: Path) -> None:
    routes = {"inventory.shop.svc": (OutboundJwt("inventory", "/api/stock"),), "plain.shop.svc": ()}
    async with jwt_shop(pki, app, sock_dir, routes=routes, by_host=True) as shop:
        proxy = f"http://127.0.0.1:{shop.checkout.port}"
        for url, token in [
            ("http://inventory.shop.svc:8443/api/stock/7", True),
            ("http://inventory.shop.svc:8443/api/orders/7", False),
            ("http://plain.shop.svc/api/stock/7", False),  # the same inventory, a route without `jwt`
        ]:
            status, text = await call_via_proxy(proxy, url)
            assert status == 200, (url, text)
            assert authorization(app) == ([f"Bearer {shop.token()}"] if token else []), url
        # Origin form with a Host field picks the route too.
        status, _ = await call(shop.checkout.port, "GET", "/api/stock/8", headers={"Host": "inventory.shop.svc"})
        assert status == 200 and authorization(app) == [f"Bearer {shop.token()}"]


@pytest.mark.timeout(60)
async def test_no_jwt_svid_is_a_503_and_nothing_reaches_inventory(pki: Pki, app: App, sock_dir: Path) -> None:
    absent = sock_dir / "absent.sock"  # nothing listens there
    async with jwt_shop(pki, app, sock_dir, checkout_socket=absent, fetch_timeout=0.5) as shop:
        co, inv = shop.checkout, shop.inventory
        status, text = await call(co.port, "POST", "/api/stock/42/reserve", data=b'{"quantity": 3}')
        assert status == 503, text
        body = json.loads(text)
        assert (body["error"], body["route"]) == ("no JWT-SVID to attach", "inventory")
        assert "'inventory'" in body["detail"] and "absent.sock" in body["detail"] and "\n" not in body["detail"]
        assert app.seen == [] and inv.audit_lines == []  # not a byte reached inventory
        assert co.route().handshakes == 0  # no connection was even opened
        assert co.metric("spiffe_sidecar_upstream_errors_total", listener="outbound", kind="jwt_svid") == 1
        line = co.audit_lines[-1]
        assert (line["status"], line["upstream_failure"], line["rule"]) == (503, "jwt_svid", "inventory")
        assert "jwt_subject" not in line and "jwt_kid" not in line
        # A GET under the prefix fails the same way; a path outside every prefix, and `keep` with the
        # app's own Authorization, need no token and go through.
        assert (await call(co.port, "GET", "/api/stock/1"))[0] == 503
        assert co.metric("spiffe_sidecar_upstream_errors_total", listener="outbound", kind="jwt_svid") == 2
        status, _ = await call(co.port, "GET", "/api/stockpile")
        assert status == 200 and authorization(app) == []
        status, _ = await call(co.port, "GET", "/api/orders/1", headers={"Authorization": APP_TOKEN})
        assert status == 200 and authorization(app) == [APP_TOKEN]
        assert [s.path for s in app.seen] == ["/api/stockpile", "/api/orders/1"]
        assert co.metric("spiffe_sidecar_upstream_errors_total", listener="outbound", kind="jwt_svid") == 2


@pytest.mark.timeout(60)
async def test_a_silent_workload_api_gets_the_503_at_the_fetch_deadline(pki: Pki, app: App, sock_dir: Path) -> None:
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing, answers nothing

    silent = sock_dir / "silent.sock"
    server = await asyncio.start_unix_server(accept, path=str(silent))
    try:
        async with jwt_shop(pki, app, sock_dir, checkout_socket=silent, fetch_timeout=0.5) as shop:
            co = shop.checkout
            # An app that gives up while the fetch is pending: nothing is sent, the listener carries on.
            _, writer = await asyncio.open_connection("127.0.0.1", co.port)
            writer.write(b"GET /api/stock/9 HTTP/1.1\r\nHost: inventory\r\n\r\n")
            await until(lambda: bool(held))
            writer.close()
            t0 = time.monotonic()
            status, text = await call(co.port, "GET", "/api/stock/1")
            elapsed = time.monotonic() - t0
            assert status == 503 and "within 0.5s" in json.loads(text)["detail"], text
            assert 0.2 < elapsed < 3.0, elapsed
            assert app.seen == [] and co.route().handshakes == 0
            await until(lambda: co.server.open_connections == 0)
    finally:
        server.close()
        for w in held:
            w.close()
        async with asyncio.timeout(5):
            await server.wait_closed()


@pytest.mark.timeout(60)
async def test_a_renewed_token_signed_by_a_new_key_is_attached(pki: Pki, app: App, sock_dir: Path) -> None:
    async with jwt_shop(pki, app, sock_dir, jwt_ttl=4.0, min_remaining=1.0) as shop:
        co, inv = shop.checkout, shop.inventory
        assert (await call(co.port, "POST", "/api/stock/1/reserve"))[0] == 200
        first, old_kid = shop.token(), co.audit_lines[-1]["jwt_kid"]
        new = shop.spire.rotate_jwt_key()
        await shop.bundles.wait_for(2, WAIT)  # inventory has both keys
        await until(lambda: shop.fetched() >= 2, timeout=WAIT)  # checkout renewed at about half of 4 s
        assert shop.token() != first and new.kid != old_kid
        status, text = await call(co.port, "POST", "/api/stock/2/reserve")
        assert status == 200, text
        assert co.audit_lines[-1]["jwt_kid"] == new.kid == inv.audit_lines[-1]["jwt_kid"]
        assert app.seen[-1].headers.getall("X-Spiffe-Jwt-Subject") == [CHECKOUT]
        assert_no_token(co.audit_lines, first, shop.token())
