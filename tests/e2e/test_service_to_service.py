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


async def test_step_up_needs_the_jwt_svid_checkouts_sidecar_attaches(cluster: Cluster) -> None:
    reserve = "/api/stock/42/reserve"  # inventory's checkout-reserves-stock: mTLS as checkout + a JWT-SVID
    status, _ = await cluster.call(cluster.ports["checkout_plain_out"], "POST", reserve)
    assert status == 401
    line = await cluster.audit_for("inventory", "POST", reserve, CHECKOUT)
    assert line.startswith("deny") and "no valid JWT-SVID" in line, line
    status, body = await cluster.call(cluster.ports["checkout_out"], "POST", reserve)
    assert status == 200, body
    seen = cluster.apps["inventory"].seen[-1]
    assert seen["path"] == reserve and seen["jwt_subject"] == CHECKOUT and seen["authorization"] == ""
    # Both ends name the token (subject, audience, kid), neither logs it. The sidecars write their lines once
    # the exchange is finished, which can be just after the caller has its response: wait for them.
    inv = await _audit_line(cluster, "inventory", "jwt_subject")
    assert inv["decision"] == "allow" and inv["rule"] == "checkout-reserves-stock" and inv["status"] == 200
    out = await _audit_line(cluster, "checkout", "jwt_audience")
    assert (inv["jwt_subject"], inv["jwt_audience"]) == (out["jwt_subject"], out["jwt_audience"]) == (
        CHECKOUT, "inventory")
    assert inv["jwt_kid"] == out["jwt_kid"] != "-"
    for sc in ("inventory", "checkout"):
        text = cluster.sidecars[sc].audit_file.read_text(encoding="utf-8")
        assert "eyJ" not in text and "Bearer" not in text
    assert await cluster.metric("inventory", "spiffe_sidecar_jwt_bundles_generation") >= 1


async def _audit_line(cluster: Cluster, sidecar: str, member: str) -> dict[str, object]:
    """The newest audit line of `sidecar` that has `member`, waiting up to 5 s for one to be written."""
    async with asyncio.timeout(5):
        while True:
            lines = [x for x in cluster.sidecars[sidecar].audit_lines() if x.get(member)]
            if lines:
                return lines[-1]
            await asyncio.sleep(0.05)  # another process writes the file: nothing to wait on but time


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
