"""Hot-path micro-benchmarks: path normalisation, policy decisions (10 and 1,000 rules), identity header
rewrite, SPIFFE ID parsing, the audit line, the per-request metrics call, JWT-SVID validation (cached and
not), and the whole inbound per-request glue without sockets.

1,000 rules cost about what 10 do: `sidecar.policy` compiles path patterns into a segment trie (exact
segment -> child, one `*` child, `**` subtree buckets) and indexes each bucket's rules by kind, method and
caller (exact IDs in a dict), so a decision walks the request path's segments, not the rule list.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.audit import AuditLog
from sidecar.config import AuditSettings
from sidecar.http1 import build_request_head, check_request_headers, xfcc_value
from sidecar.identity import SpiffeId, TrustDomain
from sidecar.jwtsvid import JwtBundle, JwtValidationCache, bearer_token, validate
from sidecar.metrics import Metrics
from sidecar.policy import Policy, RequestAttrs, authorize, compile_policy, normalize_target

CHECKOUT = SpiffeId.parse("spiffe://example.org/ns/shop/sa/checkout")
INVENTORY = SpiffeId.parse("spiffe://example.org/ns/shop/sa/inventory")
HEADERS = [
    (b"Host", b"inventory"),
    (b"User-Agent", b"curl/8.0"),
    (b"Accept", b"*/*"),
    (b"X-Forwarded-Client-Cert", b"By=spiffe://evil/x;URI=spiffe://evil/y"),  # spoofed: must be dropped
    (b"Connection", b"keep-alive"),
]


def policy_with(n: int) -> Policy:
    """The running example plus n - 3 filler rules over distinct paths and callers (allow and deny)."""
    rules: list[dict[str, Any]] = [
        {"name": "checkout-reads-stock", "action": "allow", "methods": ["GET"], "paths": ["/api/stock/*"],
         "callers": ["spiffe://example.org/ns/shop/sa/checkout"]},
        {"name": "no-admin", "action": "deny", "paths": ["/admin/**"], "callers": ["*"]},
        {"name": "health", "action": "allow", "paths": ["/healthz"], "callers": ["*"]},
    ]
    for i in range(n - len(rules)):
        rules.append({
            "name": f"filler-{i}",
            "action": "deny" if i % 10 == 0 else "allow",
            "methods": ["GET", "POST"] if i % 3 else ["*"],
            "paths": [f"/svc{i}/items/*", f"/svc{i}/v{i % 7}/**"],
            "callers": [f"spiffe://example.org/ns/team{i % 40}/sa/app{i}", f"spiffe://example.org/ns/ops{i % 5}/**"],
        })
    return compile_policy({"rules": rules}, f"bench-{n}")


@pytest.mark.parametrize("raw", [b"/api/stock/42", b"/api/./stock/%34%32?x=1", b"/a/b/../../api//stock/42"])
def test_normalize_target(benchmark: Any, raw: bytes) -> None:
    target = benchmark(normalize_target, raw)
    assert target.path == "/api/stock/42"


@pytest.mark.parametrize("rules", [10, 1000])
@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "/api/stock/42", True), ("GET", "/admin/users", False), ("POST", "/nothing/here", False)],
)
def test_authorize(benchmark: Any, rules: int, method: str, path: str, allowed: bool) -> None:
    policy = policy_with(rules)
    decision = benchmark(authorize, policy, RequestAttrs(CHECKOUT, method, path))
    assert decision.allowed is allowed


def test_identity_header_rewrite(benchmark: Any) -> None:
    """Strip the spoofed XFCC and hop-by-hop fields, add ours, re-frame: the head sent to the app."""
    xfcc = xfcc_value(INVENTORY, "ab" * 32, CHECKOUT)

    def rewrite() -> bytes:
        framing = check_request_headers(HEADERS, version="1.1")
        return build_request_head(b"GET", b"/api/stock/42", HEADERS, xfcc=xfcc, chunked=framing.chunked,
                                  content_length=framing.content_length, upgrade=framing.upgrade,
                                  host_fallback=b"127.0.0.1:8080")

    head = benchmark(rewrite)
    assert b"evil" not in head and xfcc in head


@pytest.mark.parametrize("text", ["spiffe://example.org/ns/shop/sa/checkout", "spiffe://example.org"])
def test_spiffe_id_parse(benchmark: Any, text: str) -> None:
    assert str(benchmark(SpiffeId.parse, text)) == text


def test_audit_line(benchmark: Any) -> None:
    decision = authorize(policy_with(10), RequestAttrs(CHECKOUT, "GET", "/api/stock/42"))
    lines: list[str] = []
    log = AuditLog(AuditSettings(), write=lambda line: None, metrics=Metrics(), rng=lambda: 0.0)

    def emit() -> None:
        log.decision(listener="inbound", peer=str(CHECKOUT), method="GET", path="/api/stock/42",
                     decision=decision, status=200, bytes_in=0, bytes_out=71, duration=0.000345)

    benchmark(emit)
    assert lines == []


def test_request_metrics_record(benchmark: Any) -> None:
    """The per-request metrics call (caller x method x status x decision x rule), target < 0.5 us."""
    metrics = Metrics()
    rec = metrics.recorder("inbound")
    caller = str(CHECKOUT)

    def record() -> None:
        rec.record(caller, "allow", "checkout-reads-stock", "enforce", "GET", 200)

    benchmark(record)
    (row,) = metrics.callers()
    assert row.caller == caller and row.requests >= 1


def _jwt_svid() -> tuple[str, dict[TrustDomain, JwtBundle], float]:
    """An ES256 JWT-SVID as SPIRE mints them, and the bundles that trust it."""
    key = ec.generate_private_key(ec.SECP256R1())
    td = TrustDomain("example.org")
    now = time.time()
    token = jwt.encode({"sub": str(CHECKOUT), "aud": ["inventory"], "exp": int(now) + 300, "iat": int(now)},
                       key, algorithm="ES256", headers={"kid": "k1", "typ": "JWT"})
    return token, {td: JwtBundle.from_keys(td, {"k1": key.public_key()})}, now


def test_jwt_svid_validate_uncached(benchmark: Any) -> None:
    """Header parse, strict JWS decode, bundle by the subject's trust domain, ES256 verify, claim checks."""
    token, bundles, now = _jwt_svid()
    header = f"Bearer {token}"

    def check() -> SpiffeId:
        return validate(bearer_token(header), audience="inventory", bundles=bundles, now=now).subject

    assert benchmark(check) == CHECKOUT


def test_jwt_svid_validate_cached(benchmark: Any) -> None:
    """A repeated token: sha256 of the token and a dictionary lookup (what a keep-alive caller pays)."""
    token, bundles, now = _jwt_svid()
    header = f"Bearer {token}"
    cache = JwtValidationCache()

    def check() -> SpiffeId:
        return cache.validate(bearer_token(header), audience="inventory", bundles=bundles, generation=1,
                              now=now).subject

    assert benchmark(check) == CHECKOUT
    assert len(cache) == 1


def test_inbound_glue_per_request(benchmark: Any) -> None:
    """100 keep-alive requests through sidecar.inbound's protocols with stand-in transports (no TLS, no
    kernel): the Python cost per request is this figure / 100."""
    import inbound_glue  # benchmarks/micro/inbound_glue.py

    loop = asyncio.new_event_loop()
    try:
        async def setup() -> tuple[Any, Any, Any]:
            return inbound_glue.build()

        rig = loop.run_until_complete(setup())

        async def hundred() -> float:
            return inbound_glue.feed(*rig, 100)

        benchmark.pedantic(lambda: loop.run_until_complete(hundred()), rounds=200, warmup_rounds=5)
    finally:
        loop.close()
