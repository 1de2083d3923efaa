"""Admin server on a real loopback socket: healthz, readyz flipping with SVID expiry and listener state,
Prometheus metrics, and /config that never shows key material."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from sidecar.admin import AdminServer, MetricsServer, config_view, readiness
from sidecar.config import HostPort, Settings, load_policy, parse_settings
from sidecar.identity import TrustDomain
from sidecar.metrics import Metrics
from sidecar.svid import X509Bundle, X509Context, X509Svid
from tests.pki import CA

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)

POLICY = """\
rules:
  - name: checkout-reads-stock
    action: allow
    methods: [GET]
    paths: ["/api/stock/*"]
    callers: ["spiffe://a.test/ns/shop/sa/checkout"]
"""


@dataclass
class State:
    expiry: dt.datetime | None = None
    bound: bool = False
    now: dt.datetime = NOW
    view: dict[str, object] = field(default_factory=lambda: {"hello": "world"})


@pytest.fixture
async def admin() -> AsyncIterator[tuple[AdminServer, State, str, Metrics]]:
    state = State()
    metrics = Metrics()
    server = AdminServer(
        HostPort("127.0.0.1", 0),
        metrics=metrics,
        svid_expiry=lambda: state.expiry,
        listeners_bound=lambda: state.bound,
        config_view=lambda: state.view,
        clock=lambda: state.now,
    )
    port = await server.start()
    assert port > 0 and server.port == port
    try:
        yield server, state, f"http://127.0.0.1:{port}", metrics
    finally:
        await server.stop()


async def get(url: str) -> tuple[int, str, str]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
        return resp.status, await resp.text(), resp.headers.get("Content-Type", "")


async def test_healthz(admin: tuple[AdminServer, State, str, Metrics]) -> None:
    _, _, base, _ = admin
    assert (await get(base + "/healthz"))[:2] == (200, "ok\n")


async def test_readyz_flips_with_svid_and_listeners(admin: tuple[AdminServer, State, str, Metrics]) -> None:
    _, state, base, _ = admin
    status, body, _ = await get(base + "/readyz")
    assert (status, body) == (503, "not ready: no X.509-SVID yet\n")

    state.expiry = NOW + dt.timedelta(minutes=30)
    status, body, _ = await get(base + "/readyz")
    assert (status, body) == (503, "not ready: listeners not bound\n")

    state.bound = True
    assert (await get(base + "/readyz"))[:2] == (200, "ready\n")

    state.now = NOW + dt.timedelta(minutes=31)  # the held SVID expired (source could not renew it)
    status, body, _ = await get(base + "/readyz")
    assert status == 503 and "expired" in body

    state.expiry = state.now + dt.timedelta(hours=1)  # a fresh SVID arrived
    assert (await get(base + "/readyz"))[0] == 200

    state.bound = False  # draining
    assert (await get(base + "/readyz"))[0] == 503


def test_readiness_is_pure() -> None:
    assert readiness(None, True, NOW) == "no X.509-SVID yet"
    assert readiness(NOW, True, NOW) is not None  # expiry is exclusive: at notAfter it is expired
    assert readiness(NOW + dt.timedelta(seconds=1), True, NOW) is None


async def test_metrics_are_prometheus_text_with_svid_expiry(admin: tuple[AdminServer, State, str, Metrics]) -> None:
    _, state, base, metrics = admin
    metrics.policy_reloads.labels(result="ok").inc()
    state.expiry = NOW + dt.timedelta(hours=1)
    status, body, content_type = await get(base + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert 'spiffe_sidecar_policy_reloads_total{result="ok"} 1.0' in body
    expected = (NOW + dt.timedelta(hours=1)).timestamp()
    values = [
        float(line.split()[1])
        for line in body.splitlines()
        if line.startswith("spiffe_sidecar_svid_expiry_timestamp_seconds ")
    ]
    assert values == [expected]


async def test_no_mutating_endpoints(admin: tuple[AdminServer, State, str, Metrics]) -> None:
    _, _, base, _ = admin
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for path in ("/config", "/readyz", "/metrics", "/healthz"):
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                async with session.request(method, base + path) as resp:
                    assert resp.status == 405, (method, path)
        async with session.get(base + "/quitquitquit") as resp:
            assert resp.status == 404


async def test_config_shows_settings_policy_identity_and_never_keys(
    admin: tuple[AdminServer, State, str, Metrics], tmp_path: Path
) -> None:
    _, state, base, _ = admin
    root = CA.root("a.test")
    leaf = root.leaf("spiffe://a.test/ns/shop/sa/inventory")
    (tmp_path / "tls.crt").write_bytes(leaf.chain_pem())
    (tmp_path / "tls.key").write_bytes(leaf.key_pem())
    (tmp_path / "ca.crt").write_bytes(root.bundle_pem())
    (tmp_path / "policy.yaml").write_text(POLICY)
    text = """\
svid_source: {pem: {cert_chain: tls.crt, key: tls.key, bundle: ca.crt, trust_domain: a.test}}
inbound: {listen: "127.0.0.1:0", app: "127.0.0.1:8080", policy_file: policy.yaml}
"""
    settings: Settings = parse_settings(
        text, "side.yaml", environ={}, base_dir=tmp_path, read_file=lambda p: p.read_text()
    )
    svid = X509Svid.from_pem(leaf.chain_pem(), leaf.key_pem())
    td = TrustDomain.parse("a.test")
    context = X509Context((svid,), {td: X509Bundle.from_der(td, root.bundle_der())})
    assert settings.inbound is not None
    state.view = config_view(settings, settings.inbound.policy, context)

    status, body, content_type = await get(base + "/config")
    assert status == 200 and content_type.startswith("application/json")
    view = json.loads(body)
    assert view["inbound"]["listen"] == "127.0.0.1:0"
    assert view["svid_source"]["pem"]["key"] == str(tmp_path / "tls.key")  # the path, not the contents
    assert [r["name"] for r in view["policy"]["rules"]] == ["checkout-reads-stock"]
    assert view["identity"]["svids"][0]["spiffe_id"] == "spiffe://a.test/ns/shop/sa/inventory"
    assert view["identity"]["svids"][0]["leaf_sha256"] == svid.leaf_sha256_hex
    assert view["identity"]["trust_domains"] == ["a.test"]

    # No key material in any form.
    assert "PRIVATE KEY" not in body
    key_der = leaf.key_der()
    key_b64_body = "".join(leaf.key_pem().decode().splitlines()[1:-1])
    for needle in (key_b64_body, key_b64_body[:40], base64.b64encode(key_der).decode()[:40], key_der.hex()[:40]):
        assert needle not in body
    private_value = leaf.key.private_numbers().private_value
    assert str(private_value) not in body and format(private_value, "x") not in body


def test_config_view_without_identity_or_policy() -> None:
    # An outbound-only sidecar: no inbound listener, hence no inbound policy.
    settings = parse_settings(
        'svid_source: {workload_api: {socket: "unix:///s.sock"}}\n'
        "outbound: [{name: inv, listen: '127.0.0.1:15001', target: 'inventory:8443',"
        " expect: 'spiffe://example.org/ns/shop/sa/inventory'}]\n",
        "side.yaml",
        environ={},
        base_dir=Path("/"),
        read_file=lambda p: "",
    )
    view = config_view(settings, None, None)
    assert view["identity"] is None and view["policy"] is None and view["inbound"] is None
    json.dumps(view)
    assert load_policy(POLICY, "p.yaml").to_dict()["rules"]


async def test_callers_endpoint_serves_the_recorder_rows(admin: tuple[AdminServer, State, str, Metrics]) -> None:
    _, _, base, metrics = admin
    rec = metrics.recorder("inbound")
    rec.record("spiffe://a.test/ns/shop/sa/checkout", "allow", "checkout-reads-stock", "enforce", "GET", 200)
    rec.record("spiffe://a.test/ns/shop/sa/checkout", "allow", "checkout-reads-stock", "enforce", "GET", 200)
    rec.record("spiffe://a.test/ns/shop/sa/reporting", "deny", "default-deny", "enforce", "GET", 403)
    status, body, content_type = await get(base + "/callers")
    assert status == 200 and content_type.startswith("application/json")
    view = json.loads(body)
    assert view["max_callers"] == 50
    by_caller = {(r["caller"], r["decision"]): r for r in view["rows"]}
    ok = by_caller[("spiffe://a.test/ns/shop/sa/checkout", "allow")]
    assert ok["requests"] == 2 and ok["rule"] == "checkout-reads-stock" and ok["status_class"] == "2xx"
    assert ok["last_seen"] > 0
    assert by_caller[("spiffe://a.test/ns/shop/sa/reporting", "deny")]["requests"] == 1


@pytest.fixture
async def scrape() -> AsyncIterator[tuple[str, Metrics]]:
    metrics = Metrics()
    server = MetricsServer(
        HostPort("127.0.0.1", 0), metrics=metrics, svid_expiry=lambda: NOW, ready=lambda: True
    )
    port = await server.start()
    try:
        yield f"http://127.0.0.1:{port}", metrics
    finally:
        await server.stop()


async def test_metrics_listener_serves_only_metrics(scrape: tuple[str, Metrics]) -> None:
    base, metrics = scrape
    metrics.recorder("inbound").record("spiffe://a.test/x", "allow", "r", "enforce", "GET", 200)
    status, body, content_type = await get(base + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert "spiffe_sidecar_ready 1.0" in body and "spiffe_sidecar_build_info{" in body
    assert 'caller="spiffe://a.test/x"' in body and "_created" not in body
    for path in ("/config", "/callers", "/readyz", "/healthz", "/"):
        assert (await get(base + path))[0] == 404, path  # the admin endpoints never leave the pod
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for method in ("POST", "PUT", "DELETE"):
            async with session.request(method, base + "/metrics") as resp:
                assert resp.status == 405
