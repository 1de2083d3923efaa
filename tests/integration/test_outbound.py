"""Outbound mTLS origination over real loopback TLS: the app (aiohttp client / raw sockets) speaks plain
HTTP to checkout's outbound listener, which calls inventory's real inbound listener (in this process)
with checkout's SVID and checks inventory's SPIFFE ID (running example: checkout may GET /api/stock/*)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from sidecar.audit import AuditLog
from sidecar.config import AuditSettings, HostPort, InboundSettings, Limits, ListenerMode, OutboundTarget, Timeouts
from sidecar.errors import SvidError
from sidecar.identity import CallerPattern, TrustDomain
from sidecar.inbound import InboundServer, PolicyRef
from sidecar.metrics import Metrics
from sidecar.outbound import OutboundServer, Route
from sidecar.policy import compile_policy
from sidecar.svid import X509Bundle, X509Context, X509Svid
from sidecar.tls import TlsContexts, verify_peer_connection
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


TCP_POLICY = {"rules": [{"name": "checkout-tcp", "action": "allow", "callers": [CHECKOUT]}]}


async def start_inventory(
    pki: Pki, app: App, leaf: Leaf | None = None, *, mode: ListenerMode = ListenerMode.HTTP
) -> Inventory:
    metrics = Metrics()
    audit = AuditLog(AuditSettings(), write=lambda s: None, metrics=metrics, rng=lambda: 0.0)
    tls = TlsContexts(pki.context(leaf or pki.inventory))
    policy = TCP_POLICY if mode is ListenerMode.TCP else POLICY
    server = InboundServer(
        InboundSettings(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", app.port), mode=mode),
        timeouts=TIMEOUTS, limits=Limits(), tls=tls, policy=PolicyRef(compile_policy(policy, "p")),
        audit=audit, metrics=metrics,
    )  # fmt: skip
    return Inventory(server, tls, await server.start())


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
) -> Checkout:
    metrics = Metrics()
    lines: list[dict[str, Any]] = []
    audit = AuditLog(AuditSettings(), write=lambda s: lines.append(json.loads(s)), metrics=metrics, rng=lambda: 0.0)
    tls = TlsContexts(pki.context(pki.checkout), clock=tls_clock)
    routes = {
        key: Route(key, OutboundTarget(HostPort("localhost", port), CallerPattern.parse(expect)), tls=tls,
                   metrics=metrics, timeouts=timeouts, pool_size=pool_size, down_backoff=down_backoff, clock=clock)
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
        writer.transport.pause_reading()  # the app never reads
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
