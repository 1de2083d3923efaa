"""suggest-policy: the suggested annotation, compiled by the real policy compiler, allows every request the audit
log saw allowed or would-deny, and nothing from a caller never seen; paths are generalised as documented."""

from __future__ import annotations

import json
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.annotations import PREFIX, policy_from_annotations
from sidecar.auditlog import AuditRecord, parse_lines
from sidecar.identity import SpiffeId
from sidecar.policy import Policy, RequestAttrs, authorize, authorize_connection
from sidecar.suggest import render_annotation, suggest

CALLERS = [f"spiffe://example.org/ns/shop/sa/{n}" for n in ("checkout", "reporting", "billing", "ops")]
STRANGER = SpiffeId.parse("spiffe://example.org/ns/other/sa/stranger")


def line(peer: str, method: str, path: str, decision: str = "would-deny", **extra: Any) -> str:
    rec = {"time": "2026-11-29T10:00:00.000Z", "listener": "inbound", "peer": peer, "method": method, "path": path,
           "rule": "default-deny", "decision": decision, "mode": "audit", "reason": "r", "status": 200,
           "bytes_in": 0, "bytes_out": 10, "duration_ms": 0.2, **extra}  # fmt: skip
    return json.dumps(rec)


def compiled(lines: list[str]) -> tuple[Policy, str]:
    text = render_annotation(suggest(parse_lines(lines).records), "audit.log")
    annotations = yaml.safe_load(text)  # ready to paste: it is YAML
    return policy_from_annotations(annotations), text


def allowed(policy: Policy, rec: AuditRecord) -> bool:
    peer = SpiffeId.parse(rec.peer)
    if rec.method == "-":
        return authorize_connection(policy, peer).allowed
    return authorize(policy, RequestAttrs(peer, rec.method, rec.path)).allowed


segment = st.one_of(
    st.from_regex(r"[a-z][a-z0-9_-]{0,5}", fullmatch=True),
    st.integers(0, 10**6).map(str),
    st.uuids().map(str),
    st.sampled_from(["api", "stock", "v1", "admin", "static", "items"]),
)
paths = st.lists(segment, min_size=0, max_size=5).flatmap(
    lambda segs: st.sampled_from(["/" + "/".join(segs), "/" + "/".join(segs) + "/"]).map(
        lambda p: "/" if p == "//" else p
    )
)
records = st.lists(
    st.tuples(
        st.sampled_from(CALLERS),
        st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "get", "M-SEARCH", "-"]),
        paths,
        st.sampled_from(["allow", "would-deny", "deny"]),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records, st.lists(st.tuples(st.sampled_from(["GET", "POST", "BREW"]), paths), min_size=1, max_size=5))
def test_suggestion_allows_everything_seen_and_nothing_from_strangers(
    recs: list[tuple[str, str, str, str]], probes: list[tuple[str, str]]
) -> None:
    lines = [line(p, m, "-" if m == "-" else path, d) for p, m, path, d in recs]
    policy, text = compiled(lines)
    parsed = parse_lines(lines).records
    for rec in parsed:
        if rec.decision in ("allow", "would-deny"):
            assert allowed(policy, rec), (rec, text)
    for method, path in probes:
        assert not authorize(policy, RequestAttrs(STRANGER, method, path)).allowed, text
        assert not authorize_connection(policy, STRANGER).allowed
    seen_callers = {r.peer for r in parsed if r.decision != "deny"}
    assert {c for r in policy.rules for c in (x.text for x in r.callers)} <= seen_callers


def test_generalises_ids_collapses_many_siblings_and_subtrees() -> None:
    c, r = CALLERS[0], CALLERS[1]
    lines = [line(c, "GET", f"/api/stock/{i}") for i in range(30)]
    lines += [line(c, "HEAD", "/api/stock/7"), line(c, "GET", "/api/stock/summary"), line(c, "POST", "/api/orders")]
    lines += [line(r, "GET", f"/static/{f}") for f in ("a.css", "b.js", "img/x.png", "img/y.png", "fonts/z.woff")]
    lines += [line(r, "GET", f"/reports/{name}") for name in ("daily", "weekly")]
    lines += [line(r, "DELETE", "/admin/reset", "deny"), '{"time": "x", "event": "dropped", "dropped": 3}', "garbage"]
    policy, text = compiled(lines)
    rules = {tuple(sorted(x.text for x in rule.callers)): rule for rule in policy.rules}
    compact = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("allow")]
    assert compact == [
        f"allow GET /api/stock/* from {c} as checkout-get-api",  # ids -> *, summary covered, HEAD by GET
        f"allow GET /reports/daily /reports/weekly /static/** from {r} as reporting-get-reports",
        f"allow POST /api/orders from {c} as checkout-post-api",
    ]
    assert "# 32 requests, lines 1-32" in text and "not covered: 1 enforced denials" in text
    assert not authorize(
        policy, RequestAttrs(SpiffeId.parse(r), "DELETE", "/admin/reset")
    ).allowed  # denied stays denied
    assert {r.name for r in rules.values()} <= {"checkout-get-api", "checkout-post-api", "reporting-get-reports"}


def test_callers_with_the_same_traffic_share_a_rule_and_tcp_lines_cover_the_caller() -> None:
    a, b, t = CALLERS[0], CALLERS[1], CALLERS[2]
    lines = [line(a, "GET", "/healthz"), line(b, "GET", "/healthz"), line(t, "-", "-")]
    lines.append(line("-", "GET", "/healthz"))  # no identity: ignored
    lines.append(json.dumps({**json.loads(line(a, "GET", "/x")), "listener": "outbound"}))  # another listener
    policy, _ = compiled(lines)
    shared = [r for r in policy.rules if len(r.callers) == 2]
    assert [r.name for r in shared] == ["shared-get-healthz"]
    assert authorize_connection(policy, SpiffeId.parse(t)).allowed
    assert not authorize(policy, RequestAttrs(SpiffeId.parse(a), "GET", "/x")).allowed


def test_empty_log_suggests_nothing_and_still_compiles() -> None:
    policy, text = compiled([])
    assert policy.rules == () and "nothing to allow" in text
    assert PREFIX + "inbound-policy: |" in text
