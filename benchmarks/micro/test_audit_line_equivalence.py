"""The fast audit line builder (sidecar/audit.py) emits exactly the bytes json.dumps of the dict would.

Kept next to the micro-benchmarks because it guards the optimisation they measure (run by `make bench`)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.audit import ACCESS_FIELDS, AuditLog, access_members
from sidecar.config import AuditSettings
from sidecar.metrics import Metrics


@dataclass(frozen=True)
class D:
    allowed: bool
    enforced: bool
    rule: str
    reason: str
    mode: str

    @property
    def verdict(self) -> str:
        return "allow" if self.allowed else ("deny" if self.enforced else "would-deny")


def reference(now_ms: int, listener: str, peer: str | None, method: str, path: str, d: D, status: int,
              bytes_in: int, bytes_out: int, duration: float, access: dict[str, str] | None = None) -> str:
    import time
    sec, frac = divmod(now_ms, 1000)
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:03d}Z",
        "listener": listener,
        "peer": "-" if peer is None else peer,
        "method": method,
        "path": path,
        "rule": d.rule,
        "decision": "allow" if d.allowed else ("deny" if d.enforced else "would-deny"),
        "mode": d.mode,
        "reason": d.reason,
        "status": status,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration_ms": round(duration * 1000.0, 3),
    }
    for name in ACCESS_FIELDS:
        if access and access.get(name):
            record[name] = access[name]
    return json.dumps(record, separators=(",", ":")) + "\n"


text = st.text(max_size=40)


@settings(max_examples=400, deadline=None)
@given(
    now_ms=st.integers(0, 4_000_000_000_000),
    listener=text, peer=st.none() | text, method=text, path=text,
    allowed=st.booleans(), enforced=st.booleans(), rule=text, reason=text, mode=text,
    status=st.integers(0, 999), bytes_in=st.integers(0, 2**40), bytes_out=st.integers(0, 2**40),
    duration=st.floats(0, 3600, allow_nan=False),
    access=st.dictionaries(st.sampled_from(ACCESS_FIELDS), text, max_size=len(ACCESS_FIELDS)),
)
def test_line_is_byte_identical_to_json_dumps(
    now_ms: int, listener: str, peer: str | None, method: str, path: str, allowed: bool, enforced: bool,
    rule: str, reason: str, mode: str, status: int, bytes_in: int, bytes_out: int, duration: float,
    access: dict[str, str],
) -> None:
    lines: list[str] = []
    log = AuditLog(AuditSettings(), write=lines.append, clock=lambda: (now_ms + 0.5) / 1000.0, metrics=Metrics(),
                   rng=lambda: 0.0)
    d = D(allowed, enforced, rule, reason, mode)
    for _ in range(2):  # second call goes through the cached prefix
        log.decision(listener=listener, peer=peer, method=method, path=path, decision=d, status=status,
                     bytes_in=bytes_in, bytes_out=bytes_out, duration=duration, access=access_members(**access))
    expected = reference(now_ms, listener, peer, method, path, d, status, bytes_in, bytes_out, duration, access)
    assert lines == [expected, expected]
