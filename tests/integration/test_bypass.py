"""The bypass check with real sockets: 127.0.0.2 plays the pod IP (it is loopback, like every 127/8).

An app bound to 0.0.0.0 answers on 127.0.0.2 (exposed); an app bound to 127.0.0.1 does not (closed).
Checked: the result, the WARNING line naming the fix, the gauge, and /readyz held back in strict mode
only (through a real AdminServer).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from sidecar.admin import AdminServer
from sidecar.bypass import BypassCheck, BypassMonitor, Exposure, probe_exposure
from sidecar.config import HostPort
from sidecar.metrics import Metrics

pytestmark = pytest.mark.timeout(30)

POD_IP = "127.0.0.2"


async def _listener(host: str) -> tuple[asyncio.Server, int]:
    async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_server(handle, host, 0, family=socket.AF_INET)
    return server, int(server.sockets[0].getsockname()[1])


@pytest.fixture
async def exposed_app() -> AsyncIterator[int]:
    server, port = await _listener("0.0.0.0")  # the mistake the check exists for
    async with server:
        yield port


@pytest.fixture
async def local_app() -> AsyncIterator[int]:
    server, port = await _listener("127.0.0.1")
    async with server:
        yield port


def gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("spiffe_sidecar_app_port_exposed")


async def test_probe_exposure(exposed_app: int, local_app: int) -> None:
    assert (await probe_exposure(POD_IP, exposed_app))[0] is Exposure.EXPOSED
    assert await probe_exposure(POD_IP, local_app) == (Exposure.CLOSED, "connection refused")
    # The loopback app still answers where the sidecar forwards to.
    assert (await probe_exposure("127.0.0.1", local_app))[0] is Exposure.EXPOSED


async def test_exposed_app_is_reported_once_with_the_fix(exposed_app: int, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    monitor = BypassMonitor(BypassCheck(POD_IP, exposed_app), metrics.app_port_exposed)
    with caplog.at_level(logging.INFO, logger="spiffe_sidecar.bypass"):
        assert await monitor.check_once() is Exposure.EXPOSED
        assert await monitor.check_once() is Exposure.EXPOSED
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # on change only, not on every check
    message = warnings[0].getMessage()
    assert f"app port {exposed_app} answers on the pod IP {POD_IP}" in message
    assert "bind the app to 127.0.0.1" in message
    assert gauge(metrics) == 1
    assert monitor.hold_reason() is None  # not strict: report, don't hold readiness


async def test_local_app_is_fine(local_app: int, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    monitor = BypassMonitor(BypassCheck(POD_IP, local_app, strict=True), metrics.app_port_exposed)
    with caplog.at_level(logging.INFO, logger="spiffe_sidecar.bypass"):
        assert await monitor.check_once() is Exposure.CLOSED
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert gauge(metrics) == 0
    assert monitor.hold_reason() is None


async def _readyz(port: int) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"http://127.0.0.1:{port}/readyz") as resp,
    ):
        return resp.status, await resp.text()


async def _admin(hold: Callable[[], str | None], metrics: Metrics) -> AdminServer:
    from datetime import UTC, datetime, timedelta

    later = datetime.now(UTC) + timedelta(hours=1)
    admin = AdminServer(
        HostPort("127.0.0.1", 0),
        metrics=metrics,
        svid_expiry=lambda: later,
        listeners_bound=lambda: True,
        config_view=dict,
        hold=hold,
    )
    await admin.start()
    return admin


async def test_strict_holds_readiness_until_the_app_binds_loopback(caplog: pytest.LogCaptureFixture) -> None:
    server, port = await _listener("0.0.0.0")
    metrics = Metrics()
    monitor = BypassMonitor(BypassCheck(POD_IP, port, strict=True, interval=0.05), metrics.app_port_exposed)
    admin = await _admin(monitor.hold_reason, metrics)
    assert admin.port is not None
    try:
        with caplog.at_level(logging.INFO, logger="spiffe_sidecar.bypass"):
            await monitor.check_once()
            status, body = await _readyz(admin.port)
            assert status == 503
            assert f"app port {port} answers on the pod IP {POD_IP}" in body and "bind the app to 127.0.0.1" in body
            assert admin.ready_reason() == body.removeprefix("not ready: ").strip()

            # The app is fixed (restarted on 127.0.0.1, same port): the running monitor notices.
            server.close()
            await server.wait_closed()
            fixed = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", port)
            task = asyncio.create_task(monitor.run())
            try:
                async with asyncio.timeout(10):
                    while monitor.state is not Exposure.CLOSED:
                        await asyncio.sleep(0.05)
            finally:
                task.cancel()
                fixed.close()
        assert await _readyz(admin.port) == (200, "ready\n")
        assert gauge(metrics) == 0
        assert any("no longer answers" in r.getMessage() for r in caplog.records)
    finally:
        await admin.stop()
