"""`spiffe-sidecar demo`: the running example on one machine, against the embedded development SPIRE.

Everything is a real process or a real socket on loopback: the embedded SPIRE runs as its own
`spiffe-spire run` process with one Workload API socket per workload; the workloads fetch their
X.509-SVIDs over gRPC with the sidecar's own Workload API client. The demo prints what it sees, checks
every step, exits 0 only if each one behaved as expected, and stops every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client.parser import text_string_to_metric_families

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
    audit: str = "-"


@dataclass
class Report:
    out: TextIO
    steps: list[Step] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def check(self, name: str, expected: str, observed: str, ok: bool, audit: str = "-") -> None:
        self.steps.append(Step(name, expected, observed, ok, audit))
        self.say(f"  [{'ok' if ok else 'FAIL'}] {name}: {observed}" + (f"  (audit: {audit})" if audit != "-" else ""))

    def table(self) -> str:
        headers = ("step", "expected", "observed", "decision / reason (audit log)", "result")
        cut = (42, 42, 58, 58, 6)  # keep the table readable in a terminal; the lines above have it all
        rows = [
            tuple(_short(v, n) for v, n in zip((s.name, s.expected, s.observed, s.audit, "ok" if s.ok else "FAIL"),
                                               cut, strict=True))
            for s in self.steps
        ]
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(5)]
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
    if not entries.is_file():
        raise DemoFailure(f"{entries} not found: pass --config-dir <the repository's config/ directory>")
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

# ---------------------------------------------------------------------------------------------------------
# Stage 2: checkout, inventory and reporting, each behind its own `spiffe-sidecar run` process

SHOP_ID = "spiffe://example.org/ns/shop/sa/{}"
INVENTORY_HOST = "inventory.shop.svc.cluster.local"  # the route name in config/reporting.yaml
_REPORTING_RULE = """
  - name: reporting-reads-stock     # added live by the demo
    action: allow
    methods: [GET]
    paths: ["/api/stock/*"]
    callers: ["spiffe://example.org/ns/shop/sa/reporting"]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DemoApp:
    """A small app on loopback that answers every request with what it saw (path, XFCC)."""

    name: str
    port: int
    seen: list[dict[str, str]]
    runner: web.AppRunner


async def start_app(name: str) -> DemoApp:
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        xfcc = request.headers.get("X-Forwarded-Client-Cert", "")
        seen.append({"method": request.method, "path": request.raw_path, "xfcc": xfcc,
                     "jwt_subject": request.headers.get("X-Spiffe-Jwt-Subject", ""),
                     "authorization": "present" if "Authorization" in request.headers else ""})  # fmt: skip
        return web.json_response({"app": name, "path": request.raw_path, "xfcc": xfcc})

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return DemoApp(name, port, seen, runner)


@dataclass
class SidecarProc:
    name: str
    proc: asyncio.subprocess.Process
    dir: Path
    admin_port: int
    log_tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=30))
    drain_task: asyncio.Task[None] | None = None

    @property
    def audit_file(self) -> Path:
        return self.dir / "audit.log"

    def audit_lines(self) -> list[dict[str, Any]]:
        try:
            text = self.audit_file.read_text(encoding="utf-8")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return [x for x in out if "decision" in x]


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after a grace period."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(10):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


class Cluster:
    """The running example as real processes on loopback: the embedded SPIRE (one socket per workload),
    three apps, and a sidecar per workload built from config/ (ports, sockets and files replaced), plus
    an impostor 'inventory' sidecar whose SVID source is reporting's socket. Used by the demo and by
    tests/e2e/test_service_to_service.py."""

    def __init__(self, config_dir: Path, work: Path, *, svid_ttl: float, report: Report) -> None:
        self.config_dir = config_dir
        self.work = work
        self.svid_ttl = svid_ttl
        self.report = report
        self.sockets = work / "spire-s2s"
        self.apps: dict[str, DemoApp] = {}
        self.sidecars: dict[str, SidecarProc] = {}
        self.ports: dict[str, int] = {}
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Cluster:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @property
    def policy_file(self) -> Path:
        return self.work / "sidecars" / "inventory" / "inventory-policy.yaml"

    async def _start(self) -> None:
        self.sockets.mkdir(mode=0o700)
        entries = self.config_dir / "spire" / "entries.yaml"
        await self._stack.enter_async_context(
            embedded_spire(entries, self.sockets, svid_ttl=f"{self.svid_ttl}s", report=self.report)
        )
        for name in ("checkout", "inventory", "reporting"):
            app = await start_app(name)
            self.apps[name] = app
            self._stack.push_async_callback(app.runner.cleanup)
        for key in ("inventory", "impostor", "checkout_out", "checkout_impostor_out", "checkout_plain_out",
                    "reporting_proxy", "checkout_in", "reporting_in"):  # fmt: skip
            self.ports[key] = free_port()
        configs = {
            "inventory": self._inventory_config("inventory", self.ports["inventory"]),
            "impostor": self._inventory_config("reporting", self.ports["impostor"]),
            "checkout": self._checkout_config(),
            "reporting": self._reporting_config(),
        }
        started = await asyncio.gather(
            *(self._start_sidecar(name, cfg) for name, cfg in configs.items()), return_exceptions=True
        )
        for result in started:
            if isinstance(result, BaseException):
                raise result
        self.report.say(
            "sidecars running: "
            + ", ".join(f"{n} (pid {s.proc.pid})" for n, s in self.sidecars.items())
        )

    # -- configs: the examples in config/, with loopback ports, per-workload sockets and local files -----

    def _load(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load((self.config_dir / name).read_text(encoding="utf-8"))
        return data

    def _common(self, cfg: dict[str, Any], socket_name: str, inbound_port: int, app: str) -> dict[str, Any]:
        cfg["svid_source"] = {"workload_api": {"socket": f"unix://{self.sockets / socket_name}.sock"}}
        cfg["inbound"]["listen"] = f"127.0.0.1:{inbound_port}"
        cfg["inbound"]["app"] = f"127.0.0.1:{self.apps[app].port}"
        cfg["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
        cfg["audit"] = {**cfg.get("audit", {}), "path": "audit.log", "sample_allows": 1.0}
        cfg["timeouts"] = {**cfg.get("timeouts", {}), "drain": "2s"}
        return cfg

    def _inventory_config(self, socket_name: str, port: int) -> dict[str, Any]:
        cfg = self._common(self._load("inventory.yaml"), socket_name, port, "inventory")
        cfg["inbound"]["policy_file"] = "inventory-policy.yaml"
        return cfg

    def _checkout_config(self) -> dict[str, Any]:
        cfg = self._common(self._load("checkout.yaml"), "checkout", self.ports["checkout_in"], "checkout")
        base = cfg["outbound"][0]
        inventory = f"localhost:{self.ports['inventory']}"
        cfg["outbound"] = [
            # checkout.yaml's route with the JWT-SVID its comment describes (the demo runs checkout on the
            # Workload API): calls under /api/stock carry a token for inventory's step-up rule.
            {**base, "listen": f"127.0.0.1:{self.ports['checkout_out']}", "target": inventory,
             "jwt": {"audience": "inventory", "path": "/api/stock"}},
            {**base, "name": "inventory-impostor", "listen": f"127.0.0.1:{self.ports['checkout_impostor_out']}",
             "target": f"localhost:{self.ports['impostor']}"},
            # The same target without a JWT-SVID: mTLS alone (what a step-up rule refuses).
            {**base, "name": "inventory-mtls-only", "listen": f"127.0.0.1:{self.ports['checkout_plain_out']}",
             "target": inventory},
        ]  # fmt: skip
        return cfg

    def _reporting_config(self) -> dict[str, Any]:
        cfg = self._common(self._load("reporting.yaml"), "reporting", self.ports["reporting_in"], "reporting")
        proxy = cfg["outbound_proxy"]
        proxy["listen"] = f"127.0.0.1:{self.ports['reporting_proxy']}"
        proxy["routes"][INVENTORY_HOST]["target"] = f"localhost:{self.ports['inventory']}"
        return cfg

    async def _start_sidecar(self, name: str, cfg: dict[str, Any]) -> None:
        d = self.work / "sidecars" / name
        d.mkdir(parents=True)
        if "policy_file" in cfg["inbound"]:
            shutil.copyfile(self.config_dir / "inventory-policy.yaml", d / "inventory-policy.yaml")
        path = d / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        proc = await asyncio.create_subprocess_exec(
            _bin("spiffe-sidecar"), "run", "-c", str(path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        admin_port = int(cfg["admin"]["listen"].rsplit(":", 1)[1])
        sc = SidecarProc(name, proc, d, admin_port)
        self._stack.push_async_callback(self._stop_sidecar, sc)
        self.sidecars[name] = sc
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(30):
                while True:
                    line = await proc.stderr.readline()
                    if not line:
                        raise DemoFailure(f"{name} sidecar exited ({await proc.wait()}): " + " | ".join(sc.log_tail))
                    sc.log_tail.append(line.decode(errors="replace").rstrip())
                    if READY_MARK in line:
                        break
        except TimeoutError:
            raise DemoFailure(f"{name} sidecar not ready within 30s: " + " | ".join(sc.log_tail)) from None
        sc.drain_task = asyncio.create_task(self._keep_tail(proc.stderr, sc))

    @staticmethod
    async def _keep_tail(stream: asyncio.StreamReader, sc: SidecarProc) -> None:
        while line := await stream.readline():
            sc.log_tail.append(line.decode(errors="replace").rstrip())

    @staticmethod
    async def _stop_sidecar(sc: SidecarProc) -> None:
        await stop_process(sc.proc)
        if sc.drain_task is not None:
            sc.drain_task.cancel()

    # -- what the apps do ----------------------------------------------------------------------------------

    async def call(self, port: int, method: str, path: str, *, proxy_host: str | None = None) -> tuple[int, str]:
        """A plain HTTP request from an app to its sidecar's outbound port (or, with `proxy_host`, to its
        HTTP proxy port in absolute form, as an app honouring HTTP_PROXY sends it)."""
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            if proxy_host is None:
                url, proxy = f"http://127.0.0.1:{port}{path}", None
            else:
                url, proxy = f"http://{proxy_host}{path}", f"http://127.0.0.1:{port}"
            async with session.request(method, url, proxy=proxy) as resp:
                return resp.status, await resp.text()

    async def audit_for(self, sidecar: str, method: str, path: str, peer: str, *, within: float = 5.0) -> str:
        """The newest matching audit line's verdict and reason. The sidecar writes the line once the
        exchange is finished, which can be just after the caller already has its response: poll briefly."""
        deadline = time.monotonic() + within
        while True:
            for line in reversed(self.sidecars[sidecar].audit_lines()):
                if line.get("method") == method and line.get("path") == path and line.get("peer") == peer:
                    return f"{line['decision']}: {line['reason']}"
            if time.monotonic() >= deadline:
                return "no audit line"
            await asyncio.sleep(0.05)  # another process writes the file: nothing to wait on but time

    async def metric(self, sidecar: str, name: str, **labels: str) -> float:
        port = self.sidecars[sidecar].admin_port
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    async def plain_client(self, port: int) -> str:
        """A client without a certificate: what happens to it (it should never get an HTTP answer)."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
                writer.write(b"GET /api/stock/42 HTTP/1.1\r\nHost: inventory\r\n\r\n")
                data = await reader.read(100)
                writer.close()
        except ssl.SSLError as e:
            return f"refused: TLS alert {e.reason or e}"
        except (ConnectionError, TimeoutError) as e:
            return f"refused: {type(e).__name__}"
        return "refused: closed without a response" if not data else f"ANSWERED: {data[:40]!r}"

    async def rewrite_policy(self, extra_rules: str) -> None:
        text = self.policy_file.read_text(encoding="utf-8").rstrip("\n") + "\n" + extra_rules
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.policy_file)  # atomic, like the kubelet's symlink swap


def _short(text: str, n: int = 72) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


async def run_service_stage(config_dir: Path, work: Path, report: Report, *, svid_ttl: float) -> None:
    """Stage 2: checkout -> inventory through both sidecars, with every refusal the policy promises."""
    report.say("\n== Stage 2: checkout -> inventory, each workload behind its own sidecar ==")
    checkout, reporting = SHOP_ID.format("checkout"), SHOP_ID.format("reporting")
    async with Cluster(config_dir, work, svid_ttl=svid_ttl, report=report) as c:
        p = c.ports

        status, body = await c.call(p["checkout_out"], "GET", "/api/stock/42")
        seen = c.apps["inventory"].seen[-1]["xfcc"] if c.apps["inventory"].seen else ""
        report.check("checkout -> inventory GET /api/stock/42", "200, caller's ID in inventory's XFCC",
                     f"{status}, inventory saw {_short(seen.split(';')[-1], 60)}",
                     status == 200 and seen.endswith(f"URI={checkout}"),
                     _short(await c.audit_for("inventory", "GET", "/api/stock/42", checkout)))  # fmt: skip

        status, body = await c.call(p["checkout_out"], "POST", "/admin/reset")
        report.check("checkout -> inventory POST /admin/reset", "403", str(status), status == 403,
                     _short(await c.audit_for("inventory", "POST", "/admin/reset", checkout)))  # fmt: skip

        reserve = "/api/stock/42/reserve"  # a step-up rule: mTLS as checkout and a JWT-SVID for inventory
        status, body = await c.call(p["checkout_plain_out"], "POST", reserve)
        report.check(f"checkout -> inventory POST {reserve}, mTLS only", "401 (step-up: no JWT-SVID)", str(status),
                     status == 401, _short(await c.audit_for("inventory", "POST", reserve, checkout)))  # fmt: skip
        status, body = await c.call(p["checkout_out"], "POST", reserve)
        got = c.apps["inventory"].seen[-1] if c.apps["inventory"].seen else {}
        report.check(f"checkout -> inventory POST {reserve}, JWT-SVID attached by checkout's sidecar",
                     "200, inventory's app told the token's subject",
                     f"{status}, x-spiffe-jwt-subject: {_short(got.get('jwt_subject') or '-', 50)}",
                     status == 200 and got.get("jwt_subject") == checkout and not got.get("authorization"),
                     _short(await c.audit_for("inventory", "POST", reserve, checkout)))  # fmt: skip

        status, body = await c.call(p["reporting_proxy"], "GET", "/api/stock/42", proxy_host=INVENTORY_HOST)
        report.check("reporting -> inventory GET /api/stock/42", "403", f"{status} (via reporting's HTTP proxy port)",
                     status == 403,
                     _short(await c.audit_for("inventory", "GET", "/api/stock/42", reporting)))  # fmt: skip

        before = len(c.apps["inventory"].seen)
        observed = await c.plain_client(p["inventory"])
        refused = await c.metric("inventory", "spiffe_sidecar_handshake_failures_total",
                                 reason="no_client_certificate")  # fmt: skip
        report.check("client without a certificate -> inventory", "refused at the handshake", observed,
                     observed.startswith("refused") and len(c.apps["inventory"].seen) == before,
                     f"no request; handshake_failures{{no_client_certificate}}={refused:g}")  # fmt: skip

        status, body = await c.call(p["checkout_impostor_out"], "GET", "/api/stock/42")
        try:
            detail = json.loads(body).get("detail", "")
        except ValueError:
            detail = body
        reached = c.sidecars["impostor"].audit_lines()
        report.check("checkout -> server with reporting's SVID", "502 from checkout's sidecar",
                     f"{status}: {_short(detail, 70)}",
                     status == 502 and reporting in detail and not reached,
                     "impostor's audit log: no request reached it")  # fmt: skip

        mark = len(c.sidecars["inventory"].audit_lines())
        ok_count, failures, hashes = await _burst(c, seconds=max(svid_ttl * 1.5, 4.0))
        lines = c.sidecars["inventory"].audit_lines()[mark:]
        verdicts = collections.Counter(f"{x['decision']} by {x['rule']}" for x in lines)
        report.check(f"burst, SVIDs rotating every {svid_ttl / 2:g}s", "zero failures, several SVIDs",
                     f"{ok_count} ok, {failures} failed, checkout presented {len(hashes)} SVIDs",
                     failures == 0 and ok_count > 0 and len(hashes) >= 2
                     and set(verdicts) == {"allow by checkout-reads-stock"},
                     ", ".join(f"{n} x {v}" for v, n in verdicts.items()) or "no audit lines")  # fmt: skip

        await c.rewrite_policy(_REPORTING_RULE)
        status, waited = 0, 0.0
        started = time.monotonic()
        async with asyncio.timeout(30):
            while True:
                status, _ = await c.call(p["reporting_proxy"], "GET", "/api/stock/42", proxy_host=INVENTORY_HOST)
                waited = time.monotonic() - started
                if status == 200 or waited > 20:
                    break
                await asyncio.sleep(0.25)
        report.check("live policy change: reporting may GET stock", "200 without a restart",
                     f"{status} after {waited:.1f}s, same inventory pid {c.sidecars['inventory'].proc.pid}",
                     status == 200 and c.sidecars["inventory"].proc.returncode is None,
                     _short(await c.audit_for("inventory", "GET", "/api/stock/42", reporting)))  # fmt: skip


async def _burst(c: Cluster, *, seconds: float, workers: int = 4) -> tuple[int, int, set[str]]:
    """Requests from checkout through both sidecars for `seconds` (several SVID rotations); returns
    (ok, failed, distinct checkout leaf hashes that inventory saw)."""
    ok = failed = 0
    hashes: set[str] = set()
    deadline = time.monotonic() + seconds
    port = c.ports["checkout_out"]

    async def worker(n: int) -> None:
        nonlocal ok, failed
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            i = 0
            while time.monotonic() < deadline:
                i += 1
                try:
                    async with session.get(f"http://127.0.0.1:{port}/api/stock/{n * 100000 + i}") as resp:
                        data = await resp.json() if resp.status == 200 else None
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    data = None
                if data is None:
                    failed += 1
                    continue
                ok += 1
                xfcc = str(data.get("xfcc", ""))
                hashes.update(part for part in xfcc.split(";") if part.startswith("Hash="))

    async with asyncio.timeout(seconds + 30):
        await asyncio.gather(*(worker(n) for n in range(workers)))
    return ok, failed, hashes


async def run(config_dir: Path, out: TextIO, *, svid_ttl: float, keep: bool) -> int:
    report = Report(out)
    work = Path(tempfile.mkdtemp(prefix="spiffe-sidecar-demo-"))
    os.chmod(work, 0o700)
    try:
        report.say("spiffe-sidecar demo: checkout may call inventory's GET /api/stock/*; nobody may call")
        report.say("inventory's /admin/**; reporting may call nothing.")
        await run_svid_stage(config_dir, work, report, svid_ttl=svid_ttl)
        await run_service_stage(config_dir, work, report, svid_ttl=svid_ttl)
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


__all__ = ["Cluster", "DemoFailure", "Report", "main", "run", "run_service_stage"]
