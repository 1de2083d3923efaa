"""The whole sidecar as a subprocess (`spiffe-sidecar run -c FILE`), as an operator runs it.

Identity comes from PEM files built with tests/pki.py (the pem source); the app is an aiohttp server in
this test; callers are curl with client certificates. Checked: readyz, an allowed and a denied request,
live policy reload (a bad update keeps the old policy; a good one takes effect), /config without keys,
audit lines, and SIGTERM draining an in-flight request, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.example import BROKEN_POLICY, CHECKOUT, INVENTORY, POLICY, POLICY_WITH_REPORTING, REPORTING, TD
from tests.helpers import App, until
from tests.processes import (
    SCRIPT,
    SidecarProcess,
    admin_get,
    clean_env,
    collect_lines,
    curl_as,
    replace_file,
    running_sidecar,
    stop_process,
    wait_for_line,
    wait_metric,
    write_config,
    write_pki,
)

pytestmark = pytest.mark.timeout(90)


def app_saw(body: str) -> tuple[str, str]:
    """(method, target) from the recording app's JSON answer, as relayed to curl."""
    data = json.loads(body)
    return data["method"], data["path"]


@pytest.fixture(params=["uvloop", "asyncio"])  # uvloop is what ships; `--loop asyncio` is the debug path
async def sidecar(tmp_path: Path, app: App, request: pytest.FixtureRequest) -> AsyncIterator[SidecarProcess]:
    write_pki(tmp_path)
    config = write_config(tmp_path, app.port)
    async with running_sidecar(config, loop=request.param) as sc:
        yield sc


async def test_sidecar_end_to_end(sidecar: SidecarProcess, app: App) -> None:
    sc = sidecar
    assert await admin_get(sc, "/healthz") == (200, "ok\n")
    assert await admin_get(sc, "/readyz") == (200, "ready\n")

    # Allowed: checkout GET /api/stock/42 reaches the app with our XFCC.
    status, body = await curl_as(sc, "checkout", "/api/stock/42")
    assert status == 200, body + "\n".join(sc.lines)
    assert app_saw(body) == ("GET", "/api/stock/42"), "\n".join(sc.lines)
    got = app.seen[-1]
    assert (got.method, got.path) == ("GET", "/api/stock/42")
    assert f"URI={CHECKOUT}" in got.xfcc and f"By={INVENTORY}" in got.xfcc

    # Denied: reporting may call nothing; nobody may call /admin/**. The app sees neither.
    seen = len(app.seen)
    assert (await curl_as(sc, "reporting", "/api/stock/42"))[0] == 403
    assert (await curl_as(sc, "checkout", "/admin/users"))[0] == 403
    assert (await curl_as(sc, "checkout", "/api/stock/../../admin/users"))[0] == 403
    assert len(app.seen) == seen

    # /config: effective config + policy + public identity facts, never key material.
    status, body = await admin_get(sc, "/config")
    assert status == 200
    view = json.loads(body)
    assert view["identity"]["svids"][0]["spiffe_id"] == INVENTORY
    assert "PRIVATE KEY" not in body
    key_body = "".join((sc.dir / "tls.key").read_text().splitlines()[1:-1])
    assert key_body[:40] not in body

    # A bad policy update is rejected: the last good policy stays in force.
    replace_file(sc.dir / "policy.yaml", BROKEN_POLICY)
    await wait_metric(sc, 'spiffe_sidecar_policy_reloads_total{result="error"}', 1)
    assert (await curl_as(sc, "checkout", "/api/stock/7"))[0] == 200
    assert (await curl_as(sc, "reporting", "/api/stock/7"))[0] == 403
    assert (await curl_as(sc, "reporting", "/admin/x"))[0] == 403
    assert any("policy reload rejected" in line for line in sc.lines)
    assert any("rules[0].colour" in line for line in sc.lines)

    # A good update takes effect without a restart.
    replace_file(sc.dir / "policy.yaml", POLICY_WITH_REPORTING)
    await wait_metric(sc, 'spiffe_sidecar_policy_reloads_total{result="ok"}', 1)
    assert (await curl_as(sc, "reporting", "/api/stock/7"))[0] == 200
    assert (await curl_as(sc, "reporting", "/admin/x"))[0] == 403

    # Audit lines: one JSON object per decision, with rule and reason.
    records = [json.loads(line) for line in (sc.dir / "audit.log").read_text().splitlines()]
    decisions = {(r["peer"], r["path"], r["decision"], r["rule"]) for r in records}
    assert (CHECKOUT, "/api/stock/42", "allow", "checkout-reads-stock") in decisions
    assert (REPORTING, "/api/stock/42", "deny", "default-deny") in decisions
    assert (CHECKOUT, "/admin/users", "deny", "no-admin") in decisions

    # SIGTERM with a request in flight: the request completes, the process exits 0.
    slow = asyncio.create_task(curl_as(sc, "checkout", "/api/stock/slow?s=2"))
    async with asyncio.timeout(20):
        await app.slow_started.wait()
    sc.proc.send_signal(signal.SIGTERM)
    status, body = await slow
    assert status == 200, body
    assert app_saw(body) == ("GET", "/api/stock/slow?s=2")
    async with asyncio.timeout(10 + 10):  # timeouts.drain + generous slack
        code = await sc.proc.wait()
    assert code == 0, "\n".join(sc.lines)
    assert any("draining" in line for line in sc.lines)
    assert not any("Traceback" in line for line in sc.lines), "\n".join(sc.lines)


async def test_policy_watcher_keeps_the_last_good_policy(tmp_path: Path) -> None:
    from sidecar.app import PolicyWatcher
    from sidecar.config import load_policy
    from sidecar.identity import SpiffeId
    from sidecar.inbound import PolicyRef
    from sidecar.metrics import Metrics
    from sidecar.policy import RequestAttrs, authorize

    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    ref = PolicyRef(load_policy(POLICY, str(path)))
    metrics = Metrics()
    watcher = PolicyWatcher(path, ref, metrics, initial_text=POLICY)
    reporting = SpiffeId.parse(REPORTING)

    def reloads(result: str) -> float:
        value = metrics.registry.get_sample_value("spiffe_sidecar_policy_reloads_total", {"result": result})
        return value or 0.0

    assert await watcher.check_once() is None  # unchanged
    replace_file(path, BROKEN_POLICY)
    assert await watcher.check_once() is False
    assert await watcher.check_once() is None  # the same bad content is judged once
    assert reloads("error") == 1 and reloads("ok") == 0
    assert not authorize(ref.policy, RequestAttrs(reporting, "GET", "/api/stock/1")).allowed
    path.unlink()  # mid-swap: no file for a moment
    assert await watcher.check_once() is None
    replace_file(path, POLICY_WITH_REPORTING)
    assert await watcher.check_once() is True
    assert authorize(ref.policy, RequestAttrs(reporting, "GET", "/api/stock/1")).allowed
    assert reloads("ok") == 1
    path.write_bytes(b"\xff\xfe not utf-8")
    assert await watcher.check_once() is False
    assert authorize(ref.policy, RequestAttrs(reporting, "GET", "/api/stock/1")).allowed



async def test_policy_watcher_polls_at_the_interval_it_is_given(tmp_path: Path) -> None:
    from sidecar.app import PolicyWatcher
    from sidecar.config import load_policy
    from sidecar.inbound import PolicyRef
    from sidecar.metrics import Metrics

    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    metrics = Metrics()
    watcher = PolicyWatcher(path, PolicyRef(load_policy(POLICY, str(path))), metrics, initial_text=POLICY)
    task = asyncio.create_task(watcher.run(0.01))
    try:
        replace_file(path, POLICY_WITH_REPORTING)
        # Well under the 1 s default: the interval given is the one used.
        await until(lambda: metrics.registry.get_sample_value("spiffe_sidecar_policy_reloads_total",
                                                              {"result": "ok"}) == 1, timeout=0.5)  # fmt: skip
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_bad_policy_poll_interval_in_the_environment_exits_2(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sidecar.app import ENV_POLICY_POLL_INTERVAL, run
    from sidecar.config import load_settings

    (tmp_path / "policy.yaml").write_text(POLICY)
    config = tmp_path / "side.yaml"
    config.write_text(
        f"""\
svid_source: {{workload_api: {{socket: "unix://{tmp_path}/no-agent.sock"}}}}
inbound: {{listen: "127.0.0.1:0", app: "127.0.0.1:1", policy_file: policy.yaml}}
admin: {{listen: "127.0.0.1:0"}}
"""
    )
    settings = load_settings(config, {})
    for bad in ("soon", "0", "-1", "nan"):
        async with asyncio.timeout(10):
            assert await run(settings, environ={ENV_POLICY_POLL_INTERVAL: bad}) == 2
        assert any(f"{ENV_POLICY_POLL_INTERVAL}={bad!r}" in r.getMessage() for r in caplog.records), bad

SPIRE_ENTRIES = f"""\
trust_domain: {TD}
svid_ttl: 4s
entries:
  - spiffe_id: {INVENTORY}
    socket: inventory.sock
    dns_names: [localhost]
"""


def _pem(svid: object) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization

    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.chain)  # type: ignore[attr-defined]
    key = svid.private_key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key


async def test_sidecar_on_the_embedded_spire_follows_rotation(tmp_path: Path, app: App) -> None:
    """Workload API source (socket from $SPIFFE_ENDPOINT_SOCKET), SVIDs rotating every 2 s."""
    from spire.entries import parse_config
    from spire.server import EmbeddedSpire

    socket_dir = tmp_path / "spire"
    spire_config = parse_config(SPIRE_ENTRIES, "entries.yaml", socket_dir=str(socket_dir))
    async with EmbeddedSpire(spire_config) as spire:
        (tmp_path / "ca.crt").write_bytes(spire.bundle_pem())
        chain, key = _pem(spire.mint_x509_svid(CHECKOUT, ttl=120))
        (tmp_path / "checkout.crt").write_bytes(chain)
        (tmp_path / "checkout.key").write_bytes(key)
        (tmp_path / "policy.yaml").write_text(POLICY)
        config = tmp_path / "inventory.yaml"
        config.write_text(
            f"""\
svid_source: {{workload_api: {{}}}}
inbound: {{listen: "127.0.0.1:0", app: "127.0.0.1:{app.port}", policy_file: policy.yaml}}
admin: {{listen: "127.0.0.1:0"}}
audit: {{path: audit.log}}
"""
        )
        env = {"SPIFFE_ENDPOINT_SOCKET": f"unix://{spire.socket_path_for(INVENTORY)}"}
        async with running_sidecar(config, env=env) as sc:
            assert await admin_get(sc, "/readyz") == (200, "ready\n")
            assert (await curl_as(sc, "checkout", "/api/stock/1"))[0] == 200
            first = json.loads((await admin_get(sc, "/config"))[1])["identity"]["svids"][0]["leaf_sha256"]

            # Two rotations (TTL 4 s, new SVID at half-life) reach the sidecar over the stream ...
            await wait_metric(sc, "spiffe_sidecar_svid_rotations_total", 3, timeout=30)
            later = json.loads((await admin_get(sc, "/config"))[1])["identity"]["svids"][0]["leaf_sha256"]
            assert later != first
            # ... and new handshakes use the new SVID.
            assert (await curl_as(sc, "checkout", "/api/stock/2"))[0] == 200
            assert await admin_get(sc, "/readyz") == (200, "ready\n")

            sc.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                assert await sc.proc.wait() == 0, "\n".join(sc.lines)


async def test_no_svid_within_the_deadline_exits_1(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from sidecar.app import run
    from sidecar.config import load_settings

    (tmp_path / "policy.yaml").write_text(POLICY)
    config = tmp_path / "side.yaml"
    config.write_text(
        f"""\
svid_source: {{workload_api: {{socket: "unix://{tmp_path}/no-agent.sock"}}}}
inbound: {{listen: "127.0.0.1:0", app: "127.0.0.1:1", policy_file: policy.yaml}}
admin: {{listen: "127.0.0.1:0"}}
"""
    )
    settings = load_settings(config, {})
    async with asyncio.timeout(30):
        assert await run(settings, environ={}, first_svid_timeout=1.0) == 1
    assert any("no X.509-SVID after 1s" in r.getMessage() for r in caplog.records)


async def test_outbound_only_sidecar_runs_without_inbound(tmp_path: Path, app: App) -> None:
    """A pure client (reporting-like): only `outbound` configured. It starts, is ready once its SVID is
    held and its outbound port is bound, and calls a real inventory sidecar with its own identity."""
    write_pki(tmp_path)
    inventory_config = write_config(tmp_path, app.port)
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    client_config = client_dir / "checkout.yaml"
    async with running_sidecar(inventory_config) as inventory:
        client_config.write_text(
            f"""\
svid_source:
  pem: {{cert_chain: ../checkout.crt, key: ../checkout.key, bundle: ../ca.crt, trust_domain: {TD}}}
outbound:
  - name: inventory
    listen: "127.0.0.1:0"
    target: "localhost:{inventory.inbound_port}"
    expect: "{INVENTORY}"
admin: {{listen: "127.0.0.1:0"}}
audit: {{path: audit.log}}
"""
        )
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT), "run", "-c", str(client_config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=clean_env(), cwd=client_dir,
        )  # fmt: skip
        lines: list[str] = []
        assert proc.stderr is not None
        reader = asyncio.create_task(collect_lines(proc.stderr, lines))
        try:
            ready = await wait_for_line(lines, r"ready: outbound inventory 127\.0\.0\.1:\d+", proc)
            admin_line = await wait_for_line(lines, r"admin listening on 127\.0\.0\.1:\d+", proc)
            assert CHECKOUT in ready and "policy none" in ready and "inbound" not in ready
            port = int(re.search(r"ready: outbound inventory 127\.0\.0\.1:(\d+)", ready).group(1))  # type: ignore[union-attr]
            client = SidecarProcess(proc, 0, int(admin_line.rsplit(":", 1)[1]), lines, client_dir)
            assert await admin_get(client, "/readyz") == (200, "ready\n")
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
                session.get(f"http://127.0.0.1:{port}/api/stock/42") as resp,
            ):
                assert resp.status == 200, await resp.text()
            seen = app.seen[-1]
            assert (seen.method, seen.path) == ("GET", "/api/stock/42") and f"URI={CHECKOUT}" in seen.xfcc
            view = json.loads((await admin_get(client, "/config"))[1])
            assert view["inbound"] is None and view["policy"] is None
            assert view["outbound"][0]["expect"] == INVENTORY
            # The outbound audit line names the server ID verified on inventory's certificate.
            async with asyncio.timeout(10):
                while not (client_dir / "audit.log").exists() or not (client_dir / "audit.log").read_text():
                    await asyncio.sleep(0.05)
            line = json.loads((client_dir / "audit.log").read_text().splitlines()[-1])
            assert (line["listener"], line["peer"], line["rule"], line["status"]) == (
                "outbound", INVENTORY, "inventory", 200
            )
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                assert await proc.wait() == 0, "\n".join(lines)
        finally:
            await stop_process(proc)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
