"""Newcomer hints: did-you-mean, the unreachable Workload API explained from real socket errors, policies that
enforce nothing."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from sidecar.endpoint import TcpEndpoint, UnixEndpoint
from sidecar.hints import did_you_mean, policy_warnings, workload_api_unreachable
from sidecar.policy import compile_policy
from sidecar.sources import SourceEvent, WorkloadApiSource


@pytest.mark.parametrize(
    ("value", "choices", "hint"),
    [
        ("ALLOW", ("allow", "deny"), " (did you mean 'allow'?)"),  # Istio's spelling
        ("Deny", ("allow", "deny"), " (did you mean 'deny'?)"),
        ("alow", ("allow", "deny"), " (did you mean 'allow'?)"),
        (" deny ", ("allow", "deny"), " (did you mean 'deny'?)"),
        ("permit", ("allow", "deny"), ""),
        ("allow", ("allow", "deny"), ""),  # not a miss
        (3, ("allow", "deny"), ""),
        ("", ("allow", "deny"), ""),
        ("enforcing", ("enforce", "audit"), " (did you mean 'enforce'?)"),
        ("methdos", ("name", "action", "mode", "methods", "paths", "callers"), " (did you mean 'methods'?)"),
    ],
)
def test_did_you_mean(value: object, choices: tuple[str, ...], hint: str) -> None:
    assert did_you_mean(value, choices) == hint


def _connect_error(path: Path) -> OSError:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError as exc:
            return exc
    raise AssertionError("connected")


def test_missing_socket_names_the_path_and_the_likely_causes(tmp_path: Path) -> None:
    path = tmp_path / "spire-agent.sock"
    text = workload_api_unreachable(UnixEndpoint(str(path)), _connect_error(path))
    assert str(path) in text and "does not exist" in text
    assert "SPIRE agent running" in text and "CSI" in text and "SPIFFE_ENDPOINT_SOCKET" in text
    assert "FileNotFoundError" not in text and "Errno" not in text


def test_stale_socket_means_no_agent(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening: what a crashed agent leaves behind
    text = workload_api_unreachable(UnixEndpoint(str(path)), _connect_error(path))
    assert str(path) in text and "not running" in text


def test_tcp_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError as exc:
            text = workload_api_unreachable(TcpEndpoint("127.0.0.1", port), exc)
    assert f"127.0.0.1:{port}" in text and "refused" in text


async def test_the_source_reports_the_hint_for_a_missing_socket(tmp_path: Path) -> None:
    events: list[SourceEvent] = []
    path = tmp_path / "nowhere" / "agent.sock"
    source = WorkloadApiSource(UnixEndpoint(str(path)), on_event=events.append, backoff_initial=0.05)
    task = asyncio.create_task(source.run())
    try:
        async with asyncio.timeout(10):
            while not any(e.kind == "stream_error" for e in events):
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    error = next(e for e in events if e.kind == "stream_error")
    assert str(path) in error.detail and "SPIRE agent" in error.detail


def test_audit_mode_without_rules_is_said_loudly() -> None:
    (warning,) = policy_warnings(compile_policy({"mode": "audit", "rules": []}, "p"))
    assert "EVERY REQUEST IS FORWARDED" in warning
    assert "audit mode" in policy_warnings(compile_policy({"mode": "audit", "rules": [
        {"name": "r", "action": "deny", "callers": ["*"]}]}, "p"))[0]  # fmt: skip
    assert policy_warnings(compile_policy({"rules": []}, "p")) == []
