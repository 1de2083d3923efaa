"""spiffe-spire as a real process: check/run, exit codes, signals, logs, the bundle file."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from spiffe import WorkloadApiClient

from spire.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "spire" / "entries.yaml"
CHECKOUT = "spiffe://example.org/ns/shop/sa/checkout"
DEADLINE = 20.0


def spire_cmd() -> list[str]:
    script = Path(sys.executable).parent / "spiffe-spire"
    return [str(script)] if script.exists() else [sys.executable, "-m", "spire.cli"]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="spire-cli-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--entries", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "ok: trust domain example.org, 3 entries" in out


def test_check_bad_file_exits_2_with_one_line_per_problem(tmp_path: Path, sock_dir: Path) -> None:
    bad = tmp_path / "entries.yaml"
    bad.write_text(
        "trust_domain: example.org\n"
        "entries:\n"
        "  - spiffe_id: spiffe://example.org/a/\n"
        "    socket: a.sock\n"
        "  - spiffe_id: spiffe://example.org/b\n"
        "    selectors: [unix:user:root]\n"
    )
    for command in ("check", "run"):
        proc = subprocess.run(
            [*spire_cmd(), command, "--entries", str(bad), "--socket-dir", str(sock_dir)],
            capture_output=True, text=True, timeout=DEADLINE, check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == [
            f"{bad}:3: entries[0].spiffe_id: path cannot have a trailing slash (SPIFFE-ID §2.2)",
            f"{bad}:6: entries[1].selectors[0]: 'unix:user:root' is not a supported selector; "
            "use unix:uid:N or unix:gid:N",
        ]
        assert proc.stdout == ""
    assert list(sock_dir.iterdir()) == []  # nothing started


def test_jwt_key_ttl_flag_is_checked_against_jwt_ttl(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--entries", str(EXAMPLE), "--jwt-key-ttl", "1h"]) == 0
    assert main(["check", "--entries", str(EXAMPLE), "--jwt-key-ttl", "5m"]) == 2
    assert "JWT-SVID ttl (300s) must be shorter than the JWT key ttl (300s)" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["run", "--entries", str(EXAMPLE), "--svid-ttl", "soon"])
    assert ei.value.code == 2
    # No socket location anywhere: refused before starting.
    assert main(["run", "--entries", str(EXAMPLE)]) == 2
    assert main(["check", "--entries", str(tmp_path / "missing.yaml")]) == 2


class Proc:
    """A running `spiffe-spire run` whose stderr lines are read on a thread (an event, not polling)."""

    def __init__(self, args: list[str]) -> None:
        self.p = subprocess.Popen(
            [*spire_cmd(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, needle: str) -> str:
        while True:
            line = self.lines.get(timeout=DEADLINE)
            if line is None:
                raise AssertionError(f"process ended before {needle!r}: {self.seen}")
            self.seen.append(line)
            if needle in line:
                return line

    def stop(self, sig: int) -> int:
        self.p.send_signal(sig)
        rc = self.p.wait(DEADLINE)
        while (line := self.lines.get(timeout=DEADLINE)) is not None:
            self.seen.append(line)
        return rc


@pytest.mark.parametrize(("loop", "sig"), [("uvloop", signal.SIGTERM), ("asyncio", signal.SIGINT)])
def test_run_serves_logs_and_stops_cleanly(sock_dir: Path, loop: str, sig: int) -> None:
    bundle = sock_dir / "out" / "bundle.pem"
    proc = Proc(["run", "--entries", str(EXAMPLE), "--socket-dir", str(sock_dir), "--svid-ttl", "2s",
                 "--bundle-out", str(bundle), "--loop", loop])
    try:
        proc.wait_line("ready:")
        assert (sock_dir / "checkout.sock").exists()
        assert bundle.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        with WorkloadApiClient(socket_path=f"unix://{sock_dir}/checkout.sock") as c:
            svid = c.fetch_x509_svid(timeout=DEADLINE)
        assert str(svid.spiffe_id) == CHECKOUT
        # TTL 2 s: a rotation is logged (one line per issuance).
        proc.wait_line(f"issued X509-SVID spiffe_id={CHECKOUT} entry=0")
        rotated = proc.wait_line(f"issued X509-SVID spiffe_id={CHECKOUT} entry=0")
        assert "serial=" in rotated and "not_after=" in rotated
    finally:
        rc = proc.stop(sig)
    assert rc == 0, proc.seen
    log = "\n".join(proc.seen)
    assert "PRIVATE KEY" not in log and "stopping" in log
    assert not (sock_dir / "checkout.sock").exists()
    assert os.stat(bundle).st_mode & 0o777 == 0o644


def test_run_logs_in_the_sidecars_format_and_level_names(sock_dir: Path) -> None:
    import json

    proc = Proc(["run", "--entries", str(EXAMPLE), "--socket-dir", str(sock_dir), "--log-level", "Info",
                 "--log-format", "json"])  # fmt: skip
    try:
        ready = json.loads(proc.wait_line("ready:"))
        assert ready["level"] == "info" and ready["logger"] == "spire" and ready["time"].endswith("Z")
    finally:
        assert proc.stop(signal.SIGTERM) == 0
    text = Proc(["run", "--entries", str(EXAMPLE), "--socket-dir", str(sock_dir), "--log-level", "DEBUG"])
    try:
        line = text.wait_line("ready:")
        # The same text format as spiffe-sidecar's: `<UTC time>Z LEVEL logger: message`.
        assert line.split(" ", 3)[1:3] == ["INFO", "spire:"] and line.split(" ", 1)[0].endswith("Z")
    finally:
        assert text.stop(signal.SIGTERM) == 0
    out = subprocess.run([*spire_cmd(), "--version"], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0 and out.stdout.startswith("spiffe-spire ")
