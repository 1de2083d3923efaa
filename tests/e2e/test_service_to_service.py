"""The demo's scenario, asserted here on its own: real `spiffe-spire run` and `spiffe-sidecar run`
processes (built from config/), real apps, real mTLS between the sidecars. Uses the demo's process
harness (`Cluster`) but none of its checks."""

from __future__ import annotations

import asyncio
import io
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from sidecar.demo import INVENTORY_HOST, SHOP_ID, Cluster, Report

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT, REPORTING, INVENTORY = (SHOP_ID.format(n) for n in ("checkout", "reporting", "inventory"))
pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="s2s-") as d:
        async with Cluster(ROOT / "config", Path(d), svid_ttl=6.0, report=Report(io.StringIO())) as c:
            yield c
        for sc in c.sidecars.values():  # every process was stopped
            assert sc.proc.returncode is not None


async def test_checkout_reads_stock_and_inventory_sees_its_id(cluster: Cluster) -> None:
    status, body = await cluster.call(cluster.ports["checkout_out"], "GET", "/api/stock/42")
    assert status == 200, body
    assert json.loads(body)["xfcc"].endswith(f"URI={CHECKOUT}")
    assert (await cluster.audit_for("inventory", "GET", "/api/stock/42", CHECKOUT)).startswith("allow")


async def test_admin_is_denied_to_checkout(cluster: Cluster) -> None:
    status, _ = await cluster.call(cluster.ports["checkout_out"], "POST", "/admin/reset")
    assert status == 403
    assert "no-admin" in await cluster.audit_for("inventory", "POST", "/admin/reset", CHECKOUT)


async def test_reporting_is_denied_through_its_http_proxy_port(cluster: Cluster) -> None:
    status, _ = await cluster.call(cluster.ports["reporting_proxy"], "GET", "/api/stock/42", proxy_host=INVENTORY_HOST)
    assert status == 403
    assert (await cluster.audit_for("inventory", "GET", "/api/stock/42", REPORTING)).startswith("deny")


async def test_client_without_certificate_is_refused(cluster: Cluster) -> None:
    before = len(cluster.apps["inventory"].seen)
    assert (await cluster.plain_client(cluster.ports["inventory"])).startswith("refused")
    assert len(cluster.apps["inventory"].seen) == before


async def test_wrong_server_id_is_refused_by_checkouts_sidecar(cluster: Cluster) -> None:
    status, body = await cluster.call(cluster.ports["checkout_impostor_out"], "GET", "/api/stock/42")
    assert status == 502
    data = json.loads(body)
    assert data["expected"] == INVENTORY and REPORTING in data["detail"]
    assert cluster.sidecars["impostor"].audit_lines() == []
    assert await cluster.metric("checkout", "spiffe_sidecar_outbound_server_id_mismatches_total",
                                route="inventory-impostor") >= 1  # fmt: skip


async def test_rotation_under_load_has_no_failures(cluster: Cluster) -> None:
    from sidecar.demo import _burst

    ok, failed, hashes = await _burst(cluster, seconds=8.0, workers=3)
    assert failed == 0 and ok > 0
    assert len(hashes) >= 2  # checkout presented more than one SVID during the burst
    handshakes = await cluster.metric("checkout", "spiffe_sidecar_outbound_handshakes_total", route="inventory")
    assert handshakes < ok / 10  # pooled: far fewer handshakes than requests


async def test_live_policy_change_allows_reporting(cluster: Cluster) -> None:
    from sidecar.demo import _REPORTING_RULE

    pid = cluster.sidecars["inventory"].proc.pid
    await cluster.rewrite_policy(_REPORTING_RULE)
    status = 0
    for _ in range(80):  # bounded: 20 s
        status, _ = await cluster.call(
            cluster.ports["reporting_proxy"], "GET", "/api/stock/1", proxy_host=INVENTORY_HOST
        )
        if status == 200:
            break
        await asyncio.sleep(0.25)
    assert status == 200
    assert "reporting-reads-stock" in await cluster.audit_for("inventory", "GET", "/api/stock/1", REPORTING)
    assert cluster.sidecars["inventory"].proc.pid == pid and cluster.sidecars["inventory"].proc.returncode is None
