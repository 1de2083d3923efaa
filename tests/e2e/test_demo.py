"""The demo is not the only place its scenario is checked, but it must itself run and pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_every_step_passes() -> None:
    exe = Path(sys.executable).parent / "spiffe-sidecar"
    proc = subprocess.run(
        [str(exe), "demo", "--svid-ttl", "4"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every step behaved as expected" in proc.stdout
    assert "FAIL" not in proc.stdout
    assert "PRIVATE KEY" not in proc.stdout + proc.stderr
