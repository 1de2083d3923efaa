"""Who calls me: admin rows and audit records summed per caller, the table a terminal shows."""

from __future__ import annotations

import json

from sidecar.admin import callers_view
from sidecar.auditlog import parse_lines
from sidecar.callers import render_table, rows_from_admin, rows_from_audit, summarise
from sidecar.metrics import Metrics
from tests import example

C = example.CHECKOUT
R = example.REPORTING


def test_admin_rows_from_the_recorder_summed_per_caller() -> None:
    clock = iter([100.0, 200.0, 300.0, 400.0])
    m = Metrics(process=False, clock=lambda: next(clock))
    rec = m.recorder("inbound")
    rec.record(C, "allow", "checkout-reads-stock", "enforce", "GET", 200)
    rec.record(C, "allow", "checkout-reads-stock", "enforce", "HEAD", 200)
    rec.record(C, "deny", "no-admin", "enforce", "POST", 403)
    rec.record(R, "would-deny", "default-deny", "audit", "GET", 200)
    view = json.loads(json.dumps(callers_view(m)))  # as it crosses the wire
    view["rows"].append({"caller": "broken"})  # tolerated
    (checkout, reporting) = summarise(rows_from_admin(view))
    assert (checkout.caller, checkout.requests, checkout.denied, checkout.would_deny) == (C, 3, 1, 0)
    assert checkout.by_rule == {("checkout-reads-stock", "allow"): 2, ("no-admin", "deny"): 1}
    assert checkout.last_seen == 300.0
    assert (reporting.requests, reporting.would_deny, reporting.last_seen) == (1, 1, 400.0)


def _line(peer: str, rule: str, decision: str, t: str, listener: str = "inbound") -> str:
    return json.dumps({"time": t, "listener": listener, "peer": peer, "method": "GET", "path": "/x", "rule": rule,
                       "decision": decision, "mode": "enforce", "status": 200, "extra": 1})  # fmt: skip


def test_audit_rows_and_the_table() -> None:
    lines = [
        _line(C, "checkout-reads-stock", "allow", "2026-11-29T10:00:00.000Z"),
        _line(C, "checkout-reads-stock", "allow", "2026-11-29T10:05:00.000Z"),
        _line(R, "default-deny", "deny", "2026-11-29T09:00:00.000Z"),
        _line(R, "x", "allow", "2026-11-29T09:00:00.000Z", listener="proxy"),  # outbound: not a caller of ours
        '{"event": "dropped", "dropped": 2}',
    ]
    summaries = summarise(rows_from_audit(parse_lines(lines).records))
    assert [(s.caller, s.requests, s.denied) for s in summaries] == [(C, 2, 0), (R, 1, 1)]
    now = summaries[0].last_seen + 30
    table = render_table(summaries, now=now).splitlines()
    assert table[0].split()[:5] == ["CALLER", "REQUESTS", "DENIED", "WOULD-DENY", "LAST"]
    assert table[1].startswith(C) and "30s ago" in table[1] and "checkout-reads-stock allow: 2" in table[1]
    assert table[2].startswith(R) and "1h ago" in table[2] and "default-deny deny: 1" in table[2]
    assert render_table([], now=now) == "no callers seen yet\n"
    assert len(summarise(rows_from_audit(parse_lines(lines).records), listener=None)) == 2
