"""Reading audit log lines back (pure): the records `callers` and `suggest-policy` work from.

The writer is sidecar/audit.py: one JSON object per decision with at least `time`, `listener`, `peer`,
`method`, `path`, `rule`, `decision`, `mode`, `status`. Extra fields are ignored (the line grows over
time: request id, trace id, ...), and so are lines that are not decisions (`{"event": "dropped", ...}`),
blank lines and lines that are not JSON (a log shipper's prefix, a torn last line): they are counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["AuditRecord", "ParsedLog", "parse_lines"]


@dataclass(frozen=True, slots=True)
class AuditRecord:
    line: int  # 1-based line number in the file
    time: float  # Unix seconds (0.0 when the line had no parsable time)
    listener: str
    peer: str  # "-" when no identity was established
    method: str  # "-" for a TCP-mode connection
    path: str  # the normalised path the policy matched ("-" for a TCP-mode connection)
    rule: str
    decision: str  # allow | deny | would-deny
    mode: str
    status: int


@dataclass(slots=True)
class ParsedLog:
    records: list[AuditRecord] = field(default_factory=list)
    skipped: int = 0  # lines that are not decision records


def _time(value: object) -> float:
    if not isinstance(value, str):
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def parse_lines(lines: Iterable[str], *, first_line: int = 1) -> ParsedLog:
    """Decision records from audit log lines; anything else is counted in `skipped`."""
    out = ParsedLog()
    for n, raw in enumerate(lines, start=first_line):
        text = raw.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            out.skipped += 1
            continue
        if not isinstance(obj, dict):
            out.skipped += 1
            continue
        fields = [obj.get(k) for k in ("listener", "peer", "method", "path", "rule", "decision")]
        if not all(isinstance(v, str) and v for v in fields):
            out.skipped += 1
            continue
        status = obj.get("status")
        listener, peer, method, path, rule, decision = fields
        out.records.append(
            AuditRecord(
                line=n,
                time=_time(obj.get("time")),
                listener=str(listener),
                peer=str(peer),
                method=str(method),
                path=str(path),
                rule=str(rule),
                decision=str(decision),
                mode=str(obj.get("mode", "")),
                status=status if isinstance(status, int) and not isinstance(status, bool) else 0,
            )
        )
    return out
