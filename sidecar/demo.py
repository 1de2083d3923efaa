"""`spiffe-sidecar demo`: the running example on one machine, against the embedded development SPIRE.

Everything is a real process or a real socket on loopback: the embedded SPIRE runs as its own
`spiffe-spire run` process with one Workload API socket per workload; the workloads fetch their
X.509-SVIDs over gRPC with the sidecar's own Workload API client. The demo prints what it sees, checks
every step, exits 0 only if each one behaved as expected, and stops every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives.serialization import Encoding

from .endpoint import UnixEndpoint
from .errors import SidecarError, SvidError
from .sources import WorkloadApiSource
from .svid import X509Context, verify_peer

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
WORKLOADS = ("checkout", "inventory")
READY_MARK = b"ready:"


class DemoFailure(SidecarError):
    """A demo step did not behave as expected."""


@dataclass
class Step:
    name: str
    expected: str
    observed: str
    ok: bool


@dataclass
class Report:
    out: TextIO
    steps: list[Step] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def check(self, name: str, expected: str, observed: str, ok: bool) -> None:
        self.steps.append(Step(name, expected, observed, ok))
        self.say(f"  [{'ok' if ok else 'FAIL'}] {name}: {observed}")

    def table(self) -> str:
        headers = ("step", "expected", "observed", "result")
        rows = [(s.name, s.expected, s.observed, "ok" if s.ok else "FAIL") for s in self.steps]
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(4)]
        line = "+".join("-" * (w + 2) for w in widths)
        fmt = " | ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join([fmt.format(*headers), line, *(fmt.format(*r) for r in rows)])

    @property
    def passed(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)


def _bin(name: str) -> str:
    """The console script next to the running interpreter (the venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@contextlib.asynccontextmanager
async def embedded_spire(
    entries: Path, socket_dir: Path, *, svid_ttl: str, report: Report
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run `spiffe-spire run` as a child process until the block ends; wait for its ready line."""
    proc = await asyncio.create_subprocess_exec(
        _bin("spiffe-spire"), "run", "--entries", str(entries), "--socket-dir", str(socket_dir),
        "--svid-ttl", svid_ttl, "--log-level", "INFO",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            while True:
                line = await proc.stderr.readline()
                if not line:
                    raise DemoFailure(f"spiffe-spire exited with {await proc.wait()} before it was ready")
                if READY_MARK in line:
                    break
        report.say(f"embedded SPIRE running (pid {proc.pid}), sockets in {socket_dir}")
        drain = asyncio.create_task(_drain(proc.stderr))
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        with contextlib.suppress(NameError):
            drain.cancel()


async def _drain(stream: asyncio.StreamReader) -> None:
    # Keep reading the child's log so a full pipe never blocks it.
    while await stream.readline():
        pass


def _describe(ctx: X509Context) -> str:
    svid = ctx.default_svid
    tds = ", ".join(sorted(td.name for td in ctx.bundles))
    return f"{svid.spiffe_id} serial {_serial(ctx)} expires {svid.expires_at:%H:%M:%S} bundles [{tds}]"


async def run_svid_stage(config_dir: Path, work: Path, report: Report, *, svid_ttl: float) -> None:
    """Stage 1: two workloads receive their SVIDs from the embedded SPIRE, trust each other, and rotate."""
    report.say("\n== Stage 1: SVIDs from the embedded SPIRE ==")
    socket_dir = work / "spire"
    socket_dir.mkdir(mode=0o700)
    entries = config_dir / "spire" / "entries.yaml"
    async with embedded_spire(entries, socket_dir, svid_ttl=f"{svid_ttl}s", report=report):
        sources = {
            name: WorkloadApiSource(UnixEndpoint(str(socket_dir / f"{name}.sock"))) for name in WORKLOADS
        }
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(src.run()) for src in sources.values()]
            try:
                first: dict[str, X509Context] = {}
                for name, src in sources.items():
                    ctx = await src.wait_ready(timeout=15)
                    first[name] = ctx
                    want = f"spiffe://example.org/ns/shop/sa/{name}"
                    got = str(ctx.default_svid.spiffe_id)
                    report.check(f"{name} receives its X.509-SVID", want, _describe(ctx), got == want)

                # Each side verifies the other's chain against the bundle of the peer's trust domain.
                now = dt.datetime.now(dt.UTC)
                chk, inv = first["checkout"], first["inventory"]
                try:
                    peer = verify_peer(_der(chk), inv.bundles, now)
                    observed = f"inventory accepts {peer.spiffe_id}"
                    ok = peer.spiffe_id == chk.default_svid.spiffe_id
                except SvidError as e:
                    observed, ok = f"rejected: {e}", False
                report.check("inventory verifies checkout's SVID", "accepted (same trust domain)", observed, ok)

                # Rotation: a new SVID is pushed on the open stream at half-life (Workload API §4.3).
                changed = asyncio.Event()
                rotated: list[X509Context] = []

                def on_update(ctx: X509Context) -> None:
                    if ctx.default_svid.leaf.serial_number != chk.default_svid.leaf.serial_number:
                        rotated.append(ctx)
                        changed.set()

                unsubscribe = sources["checkout"].subscribe(on_update)
                started = time.monotonic()
                deadline = svid_ttl / 2 + 5
                try:
                    async with asyncio.timeout(deadline):
                        await changed.wait()
                    waited = time.monotonic() - started
                    new = rotated[0]
                    observed = (
                        f"serial {_serial(chk)} -> {_serial(new)} after {waited:.1f}s on the open stream"
                    )
                    ok = new.default_svid.spiffe_id == chk.default_svid.spiffe_id
                except TimeoutError:
                    observed, ok = f"no new SVID within {deadline:.0f}s", False
                finally:
                    unsubscribe()
                report.check("checkout's SVID rotates", f"new SVID within TTL/2 ({svid_ttl / 2:.0f}s) + slack",
                             observed, ok)  # fmt: skip
            finally:
                for t in tasks:
                    t.cancel()


def _serial(ctx: X509Context) -> str:
    return f"{ctx.default_svid.leaf.serial_number:x}"[:10]


def _der(ctx: X509Context) -> list[bytes]:
    return [c.public_bytes(Encoding.DER) for c in ctx.default_svid.cert_chain]


async def run(config_dir: Path, out: TextIO, *, svid_ttl: float, keep: bool) -> int:
    report = Report(out)
    work = Path(tempfile.mkdtemp(prefix="spiffe-sidecar-demo-"))
    os.chmod(work, 0o700)
    try:
        report.say("spiffe-sidecar demo: checkout may call inventory's GET /api/stock/*; nobody may call")
        report.say("inventory's /admin/**; reporting may call nothing.")
        await run_svid_stage(config_dir, work, report, svid_ttl=svid_ttl)
    except (SidecarError, OSError) as e:
        report.check("demo", "every step runs", f"stopped: {e}", False)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report.say("\n" + report.table())
    report.say("\nresult: " + ("every step behaved as expected" if report.passed else "SOME STEPS FAILED"))
    return 0 if report.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spiffe-sidecar demo")
    p.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR, help="where config/spire/entries.yaml is")
    p.add_argument("--svid-ttl", type=float, default=6.0, help="SVID lifetime in seconds (rotation at half-life)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    try:
        import uvloop

        return uvloop.run(run(args.config_dir, sys.stdout, svid_ttl=args.svid_ttl, keep=args.keep))
    except KeyboardInterrupt:
        return 130


__all__ = ["DemoFailure", "Report", "main", "run"]
