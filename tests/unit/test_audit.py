"""Audit log: JSON shape, allow sampling, deny rate limit with dropped counts (injected clock and rng);
the file writer's per-tick batching (flushed by the end of the loop iteration, on close, at exit)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import audit as audit_module
from sidecar.audit import AuditLog, access_members, open_writer
from sidecar.config import AuditSettings
from sidecar.identity import SpiffeId
from sidecar.metrics import Metrics
from tests import example

CHECKOUT = SpiffeId.parse(example.CHECKOUT)


@dataclass(frozen=True)
class D:
    verdict: str
    rule: str = "checkout-reads-stock"
    reason: str = "because"
    mode: str = "enforce"


ALLOW = D("allow")
DENY = D("deny", rule="default-deny", reason="no allow rule")
WOULD_DENY = D("would-deny", rule="default-deny", mode="audit")


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Rng:
    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def __call__(self) -> float:
        return self.values.pop(0)


def make(
    settings: AuditSettings, clock: Clock | None = None, rng: Rng | None = None
) -> tuple[AuditLog, list[str], Metrics]:
    lines: list[str] = []
    metrics = Metrics()
    log = AuditLog(settings, write=lines.append, clock=clock or Clock(), metrics=metrics, rng=rng or Rng([]))
    return log, lines, metrics


def emit(log: AuditLog, decision: D, path: str = "/api/stock/42") -> None:
    log.decision(
        listener="inbound",
        peer=CHECKOUT,
        method="GET",
        path=path,
        decision=decision,
        status=403 if decision.verdict == "deny" else 200,
        bytes_in=12,
        bytes_out=345,
        duration=0.0012345,
    )


def dropped_metric(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("spiffe_sidecar_audit_lines_dropped_total")
    return 0.0 if value is None else value


def test_json_shape_of_an_allow_line() -> None:
    log, lines, _ = make(AuditSettings(), clock=Clock(1_700_000_000.25))
    emit(log, ALLOW)
    assert len(lines) == 1 and lines[0].endswith("\n") and lines[0].count("\n") == 1
    record = json.loads(lines[0])
    assert list(record) == [
        "time", "listener", "peer", "method", "path", "rule", "decision", "mode", "reason",
        "status", "bytes_in", "bytes_out", "duration_ms",
    ]  # fmt: skip
    assert record["time"] == "2023-11-14T22:13:20.250Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert record["peer"] == "spiffe://example.org/ns/shop/sa/checkout"
    assert record["decision"] == "allow" and record["rule"] == "checkout-reads-stock"
    assert record["status"] == 200 and record["bytes_in"] == 12 and record["bytes_out"] == 345
    assert record["duration_ms"] == 1.234


def test_deny_and_would_deny() -> None:
    log, lines, _ = make(AuditSettings())
    emit(log, DENY, "/admin/users")
    emit(log, WOULD_DENY)
    deny, would = (json.loads(line) for line in lines)
    assert deny["decision"] == "deny" and deny["status"] == 403 and deny["reason"] == "no allow rule"
    assert would["decision"] == "would-deny" and would["mode"] == "audit" and would["status"] == 200


def test_missing_peer_is_a_dash() -> None:
    log, lines, _ = make(AuditSettings())
    log.decision(
        listener="inbound",
        peer=None,
        method="-",
        path="-",
        decision=DENY,
        status=0,
        bytes_in=0,
        bytes_out=0,
        duration=0.0,
    )
    assert json.loads(lines[0])["peer"] == "-"


def test_allows_are_sampled_denies_are_not() -> None:
    log, lines, _ = make(AuditSettings(sample_allows=0.5), rng=Rng([0.1, 0.7, 0.49, 0.5]))
    for _ in range(4):
        emit(log, ALLOW)
    assert len(lines) == 2  # 0.1 and 0.49 are below 0.5
    for _ in range(3):
        emit(log, DENY)  # never consults the rng (Rng is empty now: it would raise)
    assert len(lines) == 5


def test_sample_zero_logs_no_allows_and_one_logs_all() -> None:
    log, lines, _ = make(AuditSettings(sample_allows=0.0), rng=Rng([0.0] * 3))
    for _ in range(3):
        emit(log, ALLOW)
    assert lines == []
    log, lines, _ = make(AuditSettings(sample_allows=1.0))
    for _ in range(3):
        emit(log, ALLOW)  # the rng is not even consulted
    assert len(lines) == 3


def test_deny_rate_limit_counts_and_reports_dropped_lines() -> None:
    clock = Clock()
    log, lines, metrics = make(AuditSettings(deny_per_second=2, deny_burst=3), clock=clock)
    for _ in range(10):
        emit(log, DENY)
    assert len(lines) == 3  # the burst
    assert log.dropped_pending == 7
    assert dropped_metric(metrics) == 7
    assert all("dropped" not in json.loads(line) for line in lines)

    emit(log, ALLOW)  # allows are not rate limited and do not carry the deny drop count
    assert "dropped" not in json.loads(lines[-1])

    clock.t += 0.5  # one token back at 2/s
    emit(log, DENY)
    record = json.loads(lines[-1])
    assert record["decision"] == "deny" and record["dropped"] == 7
    assert log.dropped_pending == 0

    emit(log, DENY)  # bucket empty again
    assert log.dropped_pending == 1 and dropped_metric(metrics) == 8


def test_bucket_refills_up_to_the_burst_only() -> None:
    clock = Clock()
    log, lines, _ = make(AuditSettings(deny_per_second=100, deny_burst=2), clock=clock)
    clock.t += 3600
    for _ in range(5):
        emit(log, DENY)
    assert len(lines) == 2


def test_clock_stepping_back_adds_no_tokens() -> None:
    clock = Clock()
    log, lines, _ = make(AuditSettings(deny_per_second=1, deny_burst=1), clock=clock)
    emit(log, DENY)
    clock.t -= 100
    emit(log, DENY)
    clock.t += 0.5
    emit(log, DENY)
    assert len(lines) == 1


def test_flush_dropped_writes_a_summary_line() -> None:
    clock = Clock()
    log, lines, _ = make(AuditSettings(deny_per_second=1, deny_burst=1), clock=clock)
    for _ in range(4):
        emit(log, DENY)
    assert log.flush_dropped() == 3
    summary = json.loads(lines[-1])
    assert summary["event"] == "dropped" and summary["dropped"] == 3 and summary["time"].endswith("Z")
    assert log.flush_dropped() == 0 and len(lines) == 2


def test_file_writer_appends_lines(tmp_path: Path) -> None:
    target = tmp_path / "audit.log"
    target.write_text('{"old": true}\n')
    write, close = open_writer(str(target))
    log = AuditLog(AuditSettings(), write=write, clock=Clock(), metrics=Metrics(), rng=Rng([]))
    emit(log, ALLOW)
    emit(log, DENY)
    # no event loop running: written through, visible to readers before close
    assert len(target.read_text().splitlines()) == 3
    close()
    records = [json.loads(x) for x in target.read_text().splitlines()]
    assert records[0] == {"old": True} and records[2]["decision"] == "deny"


class CountingOut(io.StringIO):
    """An in-memory text stream that counts write() and flush() calls."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


async def test_lines_of_one_loop_iteration_go_out_in_one_write() -> None:
    out = CountingOut()
    writer = audit_module._TickWriter(out, None)
    log = AuditLog(AuditSettings(), write=writer.write, clock=Clock(), metrics=Metrics(), rng=Rng([]))
    for _ in range(5):
        emit(log, ALLOW)
    emit(log, DENY)
    await asyncio.sleep(0)  # the end of this iteration: the flush scheduled by the first line has run
    assert out.writes == 1 and out.flushes == 1
    lines = out.getvalue().splitlines()
    assert len(lines) == 6 and [json.loads(x)["decision"] for x in lines] == ["allow"] * 5 + ["deny"]
    emit(log, ALLOW)
    await asyncio.sleep(0)
    assert out.writes == 2 and len(out.getvalue().splitlines()) == 7


async def test_file_lines_are_flushed_by_the_end_of_the_tick_and_on_close(tmp_path: Path) -> None:
    target = tmp_path / "audit.log"
    write, close = open_writer(str(target))
    log = AuditLog(AuditSettings(), write=write, clock=Clock(), metrics=Metrics(), rng=Rng([]))
    emit(log, ALLOW)
    await asyncio.sleep(0)
    assert len(target.read_text().splitlines()) == 1  # visible to readers while the sidecar runs
    emit(log, ALLOW)
    emit(log, DENY)
    log.flush_dropped()
    close()  # same iteration as the writes: close writes what is pending, nothing is lost
    records = [json.loads(x) for x in target.read_text().splitlines()]
    assert [r["decision"] for r in records] == ["allow", "allow", "deny"]
    await asyncio.sleep(0)  # the flush scheduled before close finds nothing to write and does not fail


async def test_a_large_batch_is_written_before_the_tick_ends() -> None:
    out = CountingOut()
    writer = audit_module._TickWriter(out, None)
    line = "x" * 1000 + "\n"
    for _ in range(100):  # 100 KB in one iteration: bounded memory, written in chunks of >= 64 KiB
        writer.write(line)
    assert out.writes == 1 and len(out.getvalue()) >= 64 * 1024
    await asyncio.sleep(0)
    assert out.writes == 2 and out.getvalue() == line * 100


@pytest.mark.parametrize("via", ["asyncio.run", "run_until_complete"])
def test_pending_lines_are_written_when_the_process_exits_without_close(tmp_path: Path, via: str) -> None:
    # run_until_complete + SystemExit leaves the tick's flush callback unrun: the exit hook writes it.
    target = tmp_path / "audit.log"
    runner = "asyncio.run(main())" if via == "asyncio.run" else "asyncio.new_event_loop().run_until_complete(main())"
    script = f"""
import asyncio, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from sidecar.audit import open_writer
write, close = open_writer({str(target)!r})
async def main():
    write("one\\n")
    write("two\\n")
    raise SystemExit(0)
{runner}
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert target.read_text() == "one\ntwo\n"


def test_access_members_keep_their_order_escape_and_leave_out_empty_values() -> None:
    text = access_members(source="10.0.0.1:5", request_id="r1", user_agent='curl "x"\n', tls="", protocol="HTTP/1.1")
    assert text == ',"request_id":"r1","user_agent":"curl \\"x\\"\\n","protocol":"HTTP/1.1","source":"10.0.0.1:5"'
    with pytest.raises(TypeError):
        access_members(bogus="x")
    log, lines, _ = make(AuditSettings())
    log.decision(listener="inbound", peer=None, method="GET", path="/", decision=ALLOW, status=200, bytes_in=1,
                 bytes_out=2, duration=0.0, access=text)
    record = json.loads(lines[0])
    assert list(record)[-4:] == ["request_id", "user_agent", "protocol", "source"]
    assert record["user_agent"] == 'curl "x"\n'


@given(st.text())
def test_json_string_is_the_json_encoders(value: str) -> None:
    from sidecar.audit import _ENCODE, json_string

    assert json_string(value) == _ENCODE(value)
    assert json.loads(json_string(value)) == value
