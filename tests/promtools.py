"""Debian's `prometheus` package (prometheus + promtool) for the tests, fetched on first use.

CI starts from a clean Debian machine as root with nothing installed by hand, so the tests arrange the tools
themselves: `prometheus`/`promtool` on PATH are used as they are; otherwise the package is fetched with
`apt-get download` (running `apt-get update` first when the lists lack it and we are root) and unpacked
with `dpkg-deb -x` into `.venv/tools/prometheus` (reused by later runs). Unpacking, not installing: the
package's service would start a Prometheus of its own, and the binaries are static Go programs. Only a
machine without apt at all skips these tests, with a warning that says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".venv" / "tools" / "prometheus"


def _cached(name: str) -> Path | None:
    found = shutil.which(name)
    if found:
        return Path(found)
    p = CACHE / "usr" / "bin" / name
    return p if p.exists() else None


def _download(dest: Path) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, capture_output=True, text=True,
                           env=env, timeout=600, check=False)  # fmt: skip
        if r.returncode != 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600, check=True)
            r = subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, capture_output=True, text=True,
                               env=env, timeout=600, check=False)  # fmt: skip
        if r.returncode != 0:
            pytest.fail(f"apt-get download prometheus failed (run `apt-get update` as root?): {r.stderr.strip()}")
        (deb,) = Path(tmp).glob("prometheus_*.deb")
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True, timeout=300)
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)  # whole or not at all: an interrupted unpack is never mistaken for a cache


def tool(name: str) -> Path:
    """Path to `prometheus` or `promtool`; fetches Debian's package when neither PATH nor the cache has it."""
    found = _cached(name)
    if found is not None:
        return found
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        message = (
            f"SKIPPED LOUDLY: {name} is not installed and this machine has no apt-get/dpkg-deb to fetch "
            "Debian's `prometheus` package; install Prometheus 2.x to run the Prometheus tests"
        )
        warnings.warn(message, stacklevel=2)
        pytest.skip(message)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    _download(CACHE)
    found = _cached(name)
    assert found is not None, f"the prometheus package has no usr/bin/{name}"
    return found


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tool("promtool")), *args], input=stdin, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
