"""Who calls me (pure core behind `spiffe-sidecar callers`): per caller, requests by rule and decision, denies,
would-denies and when it was last seen, from either source:

* a running sidecar's admin `/callers` (the per-request counters, sidecar/metrics.py; callers beyond the
  sidecar's `max_callers` are counted together as `other`); or
* an audit log file (sidecar/auditlog.py; every logged decision, so sampled allows are undercounted).

Both become `CallerRow`-like rows (caller, rule, decision, requests, last seen) and are summed here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .auditlog import AuditRecord

__all__ = ["CallerSummary", "Row", "render_table", "rows_from_admin", "rows_from_audit", "summarise"]


@dataclass(frozen=True, slots=True)
class Row:
    listener: str
    caller: str
    rule: str
    decision: str
    requests: int
    last_seen: float  # Unix seconds; 0.0 unknown


@dataclass(slots=True)
class CallerSummary:
    caller: str
    requests: int = 0
    denied: int = 0
    would_deny: int = 0
    last_seen: float = 0.0
    by_rule: dict[tuple[str, str], int] = field(default_factory=dict)  # (rule, decision) -> requests


def rows_from_admin(view: Mapping[str, Any]) -> list[Row]:
    """Rows from the admin /callers JSON (unknown keys ignored; a malformed row is skipped)."""
    out: list[Row] = []
    for r in view.get("rows", []):
        try:
            out.append(Row(str(r["listener"]), str(r["caller"]), str(r["rule"]), str(r["decision"]),
                           int(r["requests"]), float(r.get("last_seen", 0.0))))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            continue
    return out


def rows_from_audit(records: Iterable[AuditRecord]) -> list[Row]:
    return [Row(r.listener, r.peer, r.rule, r.decision, 1, r.time) for r in records]


def summarise(rows: Iterable[Row], *, listener: str | None = "inbound") -> list[CallerSummary]:
    """One summary per caller (of `listener`; None: all), busiest first."""
    by_caller: dict[str, CallerSummary] = {}
    for r in rows:
        if listener is not None and r.listener != listener:
            continue
        s = by_caller.get(r.caller)
        if s is None:
            s = by_caller[r.caller] = CallerSummary(r.caller)
        s.requests += r.requests
        if r.decision == "deny":
            s.denied += r.requests
        elif r.decision == "would-deny":
            s.would_deny += r.requests
        s.last_seen = max(s.last_seen, r.last_seen)
        key = (r.rule, r.decision)
        s.by_rule[key] = s.by_rule.get(key, 0) + r.requests
    return sorted(by_caller.values(), key=lambda s: (-s.requests, s.caller))


def _ago(last_seen: float, now: float) -> str:
    if not last_seen:
        return "-"
    secs = max(0, int(now - last_seen))
    if secs < 60:
        return f"{secs}s ago"
    if secs < 3600:
        return f"{secs // 60}m ago"
    if secs < 86400:
        return f"{secs // 3600}h ago"
    return time.strftime("%Y-%m-%d", time.gmtime(last_seen))


def render_table(summaries: list[CallerSummary], *, now: float) -> str:
    """A terminal table: caller, requests, denied, would-deny, last seen, then `rule decision: n` per line."""
    if not summaries:
        return "no callers seen yet\n"
    header = ("CALLER", "REQUESTS", "DENIED", "WOULD-DENY", "LAST SEEN", "BY RULE (decision: requests)")
    rows = [
        (s.caller, str(s.requests), str(s.denied), str(s.would_deny), _ago(s.last_seen, now),
         ", ".join(f"{rule} {decision}: {n}" for (rule, decision), n in
                   sorted(s.by_rule.items(), key=lambda kv: (-kv[1], kv[0]))))
        for s in summaries
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    lines = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0]), *(r[i].rjust(widths[i]) for i in (1, 2, 3)), r[4].ljust(widths[4]), r[5]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"
