"""Kubernetes mode end to end, without a cluster: `spiffe-sidecar run --from-annotations DIR/annotations`.

Everything the injector gives the sidecar container is reproduced: the environment (ports, probes, pod
IP, SPIFFE_ENDPOINT_SOCKET pointing at the embedded SPIRE's inventory socket) and the downward API volume
in the kubelet's AtomicWriter layout (`..<timestamp>/annotations`, `..data -> ..<timestamp>`,
`annotations -> ..data/annotations`; an update writes a new timestamped dir, points `..data_tmp` at it
and renames `..data_tmp` onto `..data`). The file content is what `fieldpath.FormatMap` writes: sorted
`key="Go-quoted value"` lines. Callers are checkout and reporting with SVIDs from the same SPIRE.

The listen host is overridden to 127.0.0.1 (SPIFFE_SIDECAR_LISTEN_HOST): tests use loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.example import CHECKOUT, INVENTORY, REPORTING, TD
from tests.helpers import App, serve
from tests.processes import SCRIPT, clean_env, collect_lines, wait_for_line

pytestmark = pytest.mark.timeout(120)

ENTRIES = f"""\
trust_domain: {TD}
svid_ttl: 1h
entries:
  - spiffe_id: {CHECKOUT}
    socket: checkout.sock
  - spiffe_id: {INVENTORY}
    socket: inventory.sock
    dns_names: [localhost]
  - spiffe_id: {REPORTING}
    socket: reporting.sock
"""

POLICY = f"""\
allow GET /api/stock/* from {CHECKOUT} as checkout-reads-stock
deny * /admin/** from * as no-admin
"""
POLICY_WITH_REPORTING = POLICY + f"allow GET /api/stock/* from {REPORTING} as reporting-reads-stock\n"
# Compiles as YAML? No: the first rule line starts with "allow", so it is compact, and line 3 is broken.
BROKEN_POLICY = POLICY + "allow GET /api/stock/* from spiffe://Example.org/x\n"


def go_quote(value: str) -> str:
    """strconv.Quote for the characters these tests use (printable ASCII and newline)."""
    out = []
    for ch in value:
        if ch == "\n":
            out.append("\\n")
        elif ch in '"\\':
            out.append("\\" + ch)
        else:
            assert " " <= ch <= "~", ch
            out.append(ch)
    return '"' + "".join(out) + '"'


def annotations_text(policy: str, **extra: str) -> str:
    annotations = {
        "spiffe-sidecar.io/inbound-policy": policy,
        "spiffe-sidecar.io/status": '{"version":"0.1.0"}',
        "kubectl.kubernetes.io/last-applied-configuration": '{"kind":"Deployment"}\n',
        **{f"spiffe-sidecar.io/{k}": v for k, v in extra.items()},
    }
    return "\n".join(f"{k}={go_quote(v)}" for k, v in sorted(annotations.items()))


class AtomicDir:
    """The kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go), reduced to one file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self._n = 0

    @property
    def file(self) -> Path:
        return self.root / "annotations"

    def write(self, text: str) -> None:
        self._n += 1
        ts = self.root / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{os.getpid()}{self._n:04d}"
        ts.mkdir()
        (ts / "annotations").write_text(text)
        data, tmp = self.root / "..data", self.root / "..data_tmp"
        old = data.resolve() if data.is_symlink() else None
        tmp.symlink_to(ts.name)
        tmp.replace(data)  # rename(2): atomic switch of the whole directory
        if not self.file.is_symlink():
            self.file.symlink_to("..data/annotations")
        if old is not None:
            shutil.rmtree(old)


@dataclass
class Pod:
    proc: asyncio.subprocess.Process
    lines: list[str]
    inbound_port: int
    admin_port: int
    probe_port: int
    keys: Path
    podinfo: AtomicDir
    ctx: dict[str, ssl.SSLContext] = field(default_factory=dict)

    def client(self, who: str) -> ssl.SSLContext:
        if who not in self.ctx:
            ctx = ssl.create_default_context(cafile=str(self.keys / "bundle.pem"))
            ctx.load_cert_chain(self.keys / f"{who}.crt", self.keys / f"{who}.key")
            self.ctx[who] = ctx
        return self.ctx[who]


def _port(line: str, pattern: str) -> int:
    m = re.search(pattern, line)
    assert m is not None, line
    return int(m.group(1))


@contextlib.asynccontextmanager
async def running_pod(tmp: Path, app: App, annotations: str) -> AsyncIterator[Pod]:
    from spire.entries import parse_config
    from spire.server import EmbeddedSpire, write_svid_pem

    config = parse_config(ENTRIES, "entries.yaml", socket_dir=str(tmp / "spire"))
    async with EmbeddedSpire(config) as spire:
        keys = tmp / "keys"
        for name, sid in (("checkout", CHECKOUT), ("reporting", REPORTING)):
            write_svid_pem(spire.current_svid(sid), keys, name)
        (keys / "bundle.pem").write_bytes(spire.bundle_pem())
        podinfo = AtomicDir(tmp / "podinfo")
        podinfo.write(annotations)
        probes = [{"path": "/healthz", "port": app.port, "appPath": "/healthz", "scheme": "HTTP"}]
        env = clean_env(
            {
                "SPIFFE_ENDPOINT_SOCKET": f"unix://{spire.socket_path_for(INVENTORY)}",
                "SPIFFE_SIDECAR_INBOUND_PORT": "0",
                "SPIFFE_SIDECAR_APP_PORT": str(app.port),
                "SPIFFE_SIDECAR_ADMIN_PORT": "0",
                "SPIFFE_SIDECAR_PROBE_PORT": "0",
                "SPIFFE_SIDECAR_PROBES": json.dumps(probes),
                "SPIFFE_SIDECAR_POD_IP": "127.0.0.2",
                "SPIFFE_SIDECAR_LISTEN_HOST": "127.0.0.1",
            }
        )
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT), "run", "--from-annotations", str(podinfo.file), "--log-level", "info",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp,
        )  # fmt: skip
        lines: list[str] = []
        assert proc.stderr is not None
        reader = asyncio.create_task(collect_lines(proc.stderr, lines))
        try:
            ready = await wait_for_line(lines, r"ready: inbound 127\.0\.0\.1:\d+", proc)
            admin = await wait_for_line(lines, r"admin listening on 127\.0\.0\.1:\d+", proc)
            probe = await wait_for_line(lines, r"probe listening on 127\.0\.0\.1:\d+", proc)
            assert INVENTORY in ready
            pod = Pod(
                proc,
                lines,
                _port(ready, r"ready: inbound 127\.0\.0\.1:(\d+)"),
                _port(admin, r"admin listening on 127\.0\.0\.1:(\d+)"),
                _port(probe, r"probe listening on 127\.0\.0\.1:(\d+)"),
                keys,
                podinfo,
            )
            yield pod
        finally:
            if proc.returncode is None:
                proc.terminate()
                # Cleanup: a pod that ignores SIGTERM is killed below; the test that checks the clean exit
                # asserts returncode 0 afterwards, so a hang still fails it.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(15):
                        await proc.wait()
            if proc.returncode is None:
                proc.kill()
                async with asyncio.timeout(10):
                    await proc.wait()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def call(session: aiohttp.ClientSession, pod: Pod, who: str, path: str) -> int:
    async with session.get(
        f"https://127.0.0.1:{pod.inbound_port}{path}", ssl=pod.client(who), server_hostname="localhost"
    ) as resp:
        await resp.read()
        return resp.status


async def plain(pod: Pod, port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


async def metric(pod: Pod, name: str, labels: str = "") -> float:
    _, body = await plain(pod, pod.admin_port, "/metrics")
    for line in body.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    return 0.0


async def test_policy_from_annotations_reloads_live_and_keeps_the_last_good(tmp_path: Path, app: App) -> None:
    async with (
        running_pod(tmp_path, app, annotations_text(POLICY)) as pod,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
    ):
        podinfo = pod.podinfo
        assert await call(session, pod, "checkout", "/api/stock/42") == 200
        assert await call(session, pod, "reporting", "/api/stock/42") == 403
        assert await call(session, pod, "checkout", "/admin/reset") == 403
        assert ("GET", "/api/stock/42") in [(s.method, s.path) for s in app.seen]
        assert not any(s.path.startswith("/admin") for s in app.seen)

        # Probe port: the app's probe path is forwarded, readyz mirrors admin, nothing else.
        assert await plain(pod, pod.probe_port, "/spiffe-sidecar/readyz") == (200, "ready\n")
        assert (await plain(pod, pod.probe_port, "/healthz"))[0] == 200
        assert (await plain(pod, pod.probe_port, "/api/stock/42"))[0] == 404
        assert (await plain(pod, pod.admin_port, "/readyz")) == (200, "ready\n")
        # The app listens on 127.0.0.1 only: not reachable on the "pod IP".
        assert await metric(pod, "spiffe_sidecar_app_port_exposed") == 0

        # Rewrite the annotations (reporting allowed) while checkout keeps calling: no failed request.
        failures: list[str] = []
        stop = asyncio.Event()
        sent = 0

        async def steady() -> None:
            nonlocal sent
            while not stop.is_set():
                status = await call(session, pod, "checkout", "/api/stock/7")
                sent += 1
                if status != 200:
                    failures.append(f"checkout got {status}")
                await asyncio.sleep(0.02)

        driver = asyncio.create_task(steady())
        try:
            podinfo.write(annotations_text(POLICY_WITH_REPORTING))
            async with asyncio.timeout(30):
                while await call(session, pod, "reporting", "/api/stock/42") != 200:
                    await asyncio.sleep(0.2)
            assert await metric(pod, "spiffe_sidecar_policy_reloads_total", '{result="ok"}') == 1

            # A broken edit: logged, counted, and the last good policy stays; decisions during the reload
            # are exactly the old policy's.
            decisions: list[tuple[int, int]] = []
            podinfo.write(annotations_text(BROKEN_POLICY))
            async with asyncio.timeout(30):
                while await metric(pod, "spiffe_sidecar_policy_reloads_total", '{result="error"}') < 1:
                    decisions.append(
                        (
                            await call(session, pod, "reporting", "/api/stock/1"),
                            await call(session, pod, "checkout", "/admin/x"),
                        )
                    )
            for _ in range(5):
                decisions.append(
                    (
                        await call(session, pod, "reporting", "/api/stock/1"),
                        await call(session, pod, "checkout", "/admin/x"),
                    )
                )
            assert set(decisions) == {(200, 403)}
        finally:
            stop.set()
            async with asyncio.timeout(30):
                await driver
        assert failures == [], failures[:5]
        assert sent > 10
        rejected = [ln for ln in pod.lines if "policy reload rejected" in ln]
        assert len(rejected) == 1, pod.lines[-20:]
        problems = "\n".join(pod.lines)
        assert "annotation spiffe-sidecar.io/inbound-policy:3" in problems
        assert "secret" not in problems.lower() and "PRIVATE KEY" not in problems

    # SIGTERM: drained and exited 0.
    assert pod.proc.returncode == 0, pod.lines[-10:]


async def test_strict_bypass_check_holds_readiness(tmp_path: Path) -> None:
    from aiohttp import web

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    exposed = web.Application()
    exposed.router.add_get("/{tail:.*}", ok)
    runner, port = await serve(exposed, "0.0.0.0")  # the mistake: every interface, so also the pod IP
    state = App(port=port)
    try:
        text = annotations_text(POLICY, **{"strict-bypass-check": "true"})
        async with running_pod(tmp_path, state, text) as pod:
            warning = await wait_for_line(pod.lines, r"WARNING .*answers on the pod IP 127\.0\.0\.2", pod.proc)
            assert "bind the app to 127.0.0.1" in warning
            status, body = await plain(pod, pod.admin_port, "/readyz")
            assert status == 503 and "bind the app to 127.0.0.1" in body
            assert await plain(pod, pod.probe_port, "/spiffe-sidecar/readyz") == (status, body)
            assert await plain(pod, pod.probe_port, "/spiffe-sidecar/healthz") == (200, "ok\n")
            assert await metric(pod, "spiffe_sidecar_app_port_exposed") == 1
    finally:
        await runner.cleanup()


async def test_bad_annotations_exit_2_with_the_annotation_named(tmp_path: Path) -> None:
    podinfo = AtomicDir(tmp_path / "podinfo")
    podinfo.write(annotations_text(BROKEN_POLICY, **{"inbound-mode": "udp"}))
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPT), "run", "--from-annotations", str(podinfo.file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 2, text
    assert "annotation spiffe-sidecar.io/inbound-policy:3" in text
    assert "annotation spiffe-sidecar.io/inbound-mode" in text
    assert "Traceback" not in text
