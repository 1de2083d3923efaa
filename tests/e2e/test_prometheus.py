"""A real Prometheus (Debian's package, tests/promtools.py) scrapes a running `spiffe-sidecar run` on its
read-only metrics listener, and `promtool check metrics` lints what the sidecar serves.

The sidecar is the operator's process (PEM identity, an aiohttp app behind it, curl callers with client
certificates, as in tests/integration/test_app.py); Prometheus is started with a static scrape config
pointing at the sidecar's metrics port, and is queried through its own HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import promtools
from tests.example import CHECKOUT, INVENTORY, TD
from tests.helpers import start_app
from tests.processes import wait_for_line, write_pki

pytestmark = pytest.mark.timeout(180)

SCRIPT = Path(sys.executable).parent / "spiffe-sidecar"
DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "spiffe-sidecar" / "files" / "dashboard.json"
POLICY = f"""\
rules:
  - name: checkout-reads-stock
    action: allow
    methods: [GET]
    paths: ["/api/stock/*"]
    callers: ["{CHECKOUT}"]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _curl(port: int, d: Path, path: str, who: str = "checkout") -> str:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(d / "ca.crt"),
        "--cert", str(d / f"{who}.crt"), "--key", str(d / f"{who}.key"), f"https://localhost:{port}{path}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    return out.decode()


@contextlib.asynccontextmanager
async def sidecar_with_metrics(tmp: Path, app_port: int) -> AsyncIterator[tuple[int, int]]:
    """(inbound port, metrics port) of a running sidecar with `metrics.listen` set."""
    write_pki(tmp)
    (tmp / "policy.yaml").write_text(POLICY)
    config = tmp / "inventory.yaml"
    config.write_text(
        f"""\
svid_source:
  pem: {{cert_chain: tls.crt, key: tls.key, bundle: ca.crt, trust_domain: {TD}}}
inbound: {{listen: "127.0.0.1:0", app: "127.0.0.1:{app_port}", policy_file: policy.yaml}}
admin: {{listen: "127.0.0.1:0"}}
metrics: {{listen: "127.0.0.1:0", max_callers: 10}}
audit: {{path: audit.log}}
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPIFFE_SIDECAR_", "SPIFFE_ENDPOINT"))}
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPT), "run", "-c", str(config), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env=env, cwd=tmp,
    )  # fmt: skip
    lines: list[str] = []

    async def collect() -> None:
        assert proc.stderr is not None
        while raw := await proc.stderr.readline():
            lines.append(raw.decode(errors="replace").rstrip("\n"))

    reader = asyncio.create_task(collect())
    try:
        ready = await wait_for_line(lines, r"ready: inbound 127\.0\.0\.1:\d+", proc)
        scrape = await wait_for_line(lines, r"metrics listening on 127\.0\.0\.1:\d+", proc)
        assert INVENTORY in ready
        inbound = int(re.search(r"ready: inbound 127\.0\.0\.1:(\d+)", ready).group(1))  # type: ignore[union-attr]
        metrics = int(re.search(r"metrics listening on 127\.0\.0\.1:(\d+)", scrape).group(1))  # type: ignore[union-attr]
        yield inbound, metrics
        proc.send_signal(15)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0, "\n".join(lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


@contextlib.asynccontextmanager
async def prometheus(tmp: Path, target_port: int) -> AsyncIterator[str]:
    """A real Prometheus scraping 127.0.0.1:target_port every second; yields its base URL."""
    binary = promtools.tool("prometheus")
    port = _free_port()
    (tmp / "prometheus.yml").write_text(
        f"""\
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: spiffe-sidecar
    static_configs: [{{targets: ["127.0.0.1:{target_port}"]}}]
"""
    )
    proc = await asyncio.create_subprocess_exec(
        str(binary), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            async with asyncio.timeout(20):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def until(base: str, promql: str, seconds: float = 60) -> list[dict[str, Any]]:
    """The first non-empty result of `promql` (Prometheus needs a few scrapes)."""
    async with asyncio.timeout(seconds):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                result = await query(base, promql)
                if result:
                    return result
            await asyncio.sleep(0.5)


async def test_prometheus_scrapes_the_sidecar_and_promtool_accepts_its_metrics(tmp_path: Path) -> None:
    state, runner = await start_app()
    try:
        async with sidecar_with_metrics(tmp_path, state.port) as (inbound, metrics_port):
            assert await _curl(inbound, tmp_path, "/api/stock/42") == "200"
            assert await _curl(inbound, tmp_path, "/admin/reset") == "403"
            assert await _curl(inbound, tmp_path, "/api/stock/42", who="reporting") == "403"

            # What the scraper reads, linted by promtool (text format, as curl gets it).
            body = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{metrics_port}/metrics"], capture_output=True,
                                  text=True, timeout=30, check=True).stdout  # fmt: skip
            lint = promtools.promtool("check", "metrics", stdin=body)
            assert lint.returncode == 0, lint.stdout + lint.stderr
            assert "_created" not in body
            assert subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                   f"http://127.0.0.1:{metrics_port}/config"], capture_output=True, text=True,
                                  timeout=30, check=True).stdout == "404"  # fmt: skip

            async with prometheus(tmp_path, metrics_port) as prom:
                up = await until(prom, 'up{job="spiffe-sidecar"} == 1')
                assert up[0]["value"][1] == "1"
                allowed = await until(
                    prom, 'spiffe_sidecar_requests_total{decision="allow",rule="checkout-reads-stock"}'
                )
                assert float(allowed[0]["value"][1]) >= 1
                denied = await until(prom, 'sum(spiffe_sidecar_requests_total{decision="deny"})')
                assert float(denied[0]["value"][1]) == 2
                build = await until(prom, "spiffe_sidecar_build_info")
                assert build[0]["metric"]["version"]
                assert await until(prom, "spiffe_sidecar_ready == 1")
                assert await until(prom, "spiffe_sidecar_svid_expiry_timestamp_seconds - time() > 0")
                assert await until(prom, "process_resident_memory_bytes > 0")
                assert await query(prom, '{__name__=~".+_created"}') == []  # no doubled series
                series = await query(prom, 'count({job="spiffe-sidecar"})')
                callers = await query(prom, "sum by (caller, decision, status_class) "
                                            "(spiffe_sidecar_caller_requests_total)")  # fmt: skip
                # Every query of the chart's dashboard is valid PromQL for this Prometheus (Grafana's
                # variables filled in as it would), and the caller/decision panels find data.
                for expr in dashboard_queries():
                    await query(prom, expr)
                targets = await _targets(prom)
                assert targets[0]["health"] == "up" and targets[0]["lastError"] == ""
                print(
                    f"\nprometheus scraped 127.0.0.1:{metrics_port}: {series[0]['value'][1]} series, "
                    f"up=1, allow={allowed[0]['value'][1]}, deny={denied[0]['value'][1]}, "
                    f"build_info={json.dumps(build[0]['metric'], sort_keys=True)}, "
                    f"by caller: {[(c['metric'], c['value'][1]) for c in callers]}"
                )
    finally:
        await runner.cleanup()


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    subst = {"$namespace": ".*", "$pod": ".*", "$__rate_interval": "1m", "$__range": "5m"}
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for k, v in subst.items():
                expr = expr.replace(k, v)
            out.append(expr)
    return out


async def _targets(base: str) -> list[dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(f"{base}/api/v1/targets") as resp:
        body = await resp.json()
    active: list[dict[str, Any]] = body["data"]["activeTargets"]
    return active
