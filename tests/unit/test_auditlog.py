"""Reading audit lines back: what sidecar/audit.py writes parses into the same records; extra fields, summary
lines, blank and broken lines are tolerated."""

from __future__ import annotations

import json

from sidecar.audit import AuditLog
from sidecar.auditlog import parse_lines
from sidecar.config import AuditSettings
from sidecar.identity import SpiffeId
from sidecar.metrics import Metrics
from sidecar.policy import RequestAttrs, authorize, compile_policy

POLICY = compile_policy(
    {"rules": [{"name": "checkout-reads-stock", "action": "allow", "methods": ["GET"], "paths": ["/api/stock/*"],
                "callers": ["spiffe://example.org/ns/shop/sa/checkout"]}]},
    "p",
)  # fmt: skip


def test_round_trip_with_the_writer() -> None:
    lines: list[str] = []
    log = AuditLog(AuditSettings(), write=lines.append, clock=lambda: 1_795_000_000.25, metrics=Metrics(process=False),
                   rng=lambda: 0.0)  # fmt: skip
    checkout = SpiffeId.parse("spiffe://example.org/ns/shop/sa/checkout")
    for peer, path, status in ((checkout, "/api/stock/42", 200), (checkout, "/admin", 403), (None, "-", 0)):
        log.decision(listener="inbound", peer=peer, method="GET", path=path,
                     decision=authorize(POLICY, RequestAttrs(checkout, "GET", path)), status=status, bytes_in=0,
                     bytes_out=5, duration=0.001)  # fmt: skip
    parsed = parse_lines("".join(lines).splitlines())
    assert parsed.skipped == 0
    first, second, third = parsed.records
    assert (first.line, first.peer, first.method, first.path, first.rule, first.decision, first.status) == (
        1, str(checkout), "GET", "/api/stock/42", "checkout-reads-stock", "allow", 200)  # fmt: skip
    assert first.time == 1_795_000_000.25 and first.mode == "enforce"
    assert (second.decision, second.rule) == ("deny", "default-deny")
    assert third.peer == "-"


def test_tolerant_of_extra_fields_and_other_lines() -> None:
    good = {"time": "2026-11-29T10:00:00.123Z", "listener": "inbound", "peer": "spiffe://a.test/x", "method": "GET",
            "path": "/", "rule": "r", "decision": "allow", "mode": "enforce", "status": 200,
            "request_id": "abc", "traceparent": "00-...", "tls_version": "TLSv1.3"}  # fmt: skip
    lines = [
        json.dumps(good),
        "",
        '{"time": "2026-11-29T10:00:01.000Z", "event": "dropped", "dropped": 4}',
        "not json",
        "[1, 2]",
        json.dumps({**good, "status": "200", "time": 5}),  # wrong types: kept, with defaults
        '{"time": "2026-11-29T10:00:02.000Z", "listener": "inbound", "peer": "spiffe://a.test/x"',  # torn last line
    ]
    parsed = parse_lines(lines, first_line=10)
    assert [r.line for r in parsed.records] == [10, 15]
    assert parsed.skipped == 4
    assert parsed.records[0].time == 1795946400.123
    assert (parsed.records[1].status, parsed.records[1].time) == (0, 0.0)
