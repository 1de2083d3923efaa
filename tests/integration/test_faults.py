"""Fault tests (issue 7.2): the whole sidecar as a subprocess, real sockets, faults injected from outside.

Each scenario asserts what the caller sees and that nothing is lost, and prints one `FIGURES` line
(requests sent / failed) for the issue-7 report (`pytest -s` shows them):

* the Workload API goes away mid-traffic and comes back (and the SVID expiring while it is away);
* CA rotation and a bundle change while traffic flows;
* the app down, slow, or closing mid-response: 502/504, no hang, no leaked connections (fd count);
* SIGTERM with requests in flight; SIGKILL and a restart on the same ports;
* bad policy reloads while traffic flows: every decision made during the reloads is checked.

Identity comes from the embedded SPIRE (Workload API source) or from PEM files (tests/pki.py); callers are
raw TLS clients built here (one fresh handshake per request, so every request exercises the newest SVID and
bundle) plus a keep-alive aiohttp session.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.example import BROKEN_POLICY, CHECKOUT, INVENTORY, POLICY, POLICY_WITH_ORDERS, REPORTING
from tests.helpers import free_port
from tests.processes import (
    POLICY_POLL,
    WAIT,
    FaultyApp,
    SidecarProcess,
    Traffic,
    admin_get,
    client_context,
    count_lines,
    figures,
    metric,
    one_request,
    open_fds,
    pem_client,
    pem_config,
    replace_file,
    running_sidecar,
    spire_and_sidecar,
    wait_metric,
    write_client,
)
from tests.processes import wait_until as until

pytestmark = pytest.mark.timeout(120)


async def config_leaf_sha(sc: SidecarProcess) -> str:
    view = json.loads((await admin_get(sc, "/config"))[1])
    return str(view["identity"]["svids"][0]["leaf_sha256"])


@pytest.fixture
async def faulty_app() -> AsyncIterator[FaultyApp]:
    app = FaultyApp()
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


# ---------------------------------------------------------------------------------------------------------
# 1. The Workload API goes away and comes back


async def test_workload_api_outage_keeps_serving_then_reconnects(tmp_path: Path, faulty_app: FaultyApp) -> None:
    async with spire_and_sidecar(tmp_path, faulty_app.port, "60s") as (spire, relay, sc):
        cert, key = write_client(spire, tmp_path, "checkout", CHECKOUT)
        bundle = spire.bundle_pem()
        traffic = Traffic(sc.inbound_port, lambda: client_context(cert, key, bundle)).start()
        await traffic.wait_for(5)
        first_leaf = await config_leaf_sha(sc)

        await relay.stop()  # the agent goes away mid-traffic
        await until(lambda: count_lines(sc, "svid source workload_api: stream_error") >= 1)
        await traffic.wait_for(20)  # traffic keeps flowing on the last good SVID ...
        assert await admin_get(sc, "/readyz") == (200, "ready\n")  # ... and the pod stays ready

        await relay.start()  # the agent is back: the sidecar reconnects by itself (backoff)
        await until(lambda: count_lines(sc, "svid source workload_api: connected") >= 2)
        rotations = await metric(sc, "spiffe_sidecar_svid_rotations_total")
        new = spire.force_rotate(INVENTORY)  # and picks up the next SVID over the new stream
        await wait_metric(sc, "spiffe_sidecar_svid_rotations_total", rotations + 1, timeout=WAIT)
        assert await config_leaf_sha(sc) != first_leaf
        await traffic.wait_for(5)
        await traffic.stop()

    leaf = traffic.results[-1].server_leaf
    assert leaf is not None and leaf.serial_number == new.serial_number  # new handshakes use the new SVID
    assert traffic.failures == [], traffic.failures[:5]
    # It backed off rather than spinning (jittered exponential backoff from 0.1 s).
    assert 1 <= count_lines(sc, "svid source workload_api: stream_error") < 30
    figures("workload_api_outage", traffic.sent, len(traffic.failures))


async def test_svid_expiring_during_the_outage_fails_closed(tmp_path: Path, faulty_app: FaultyApp) -> None:
    """Readiness drops when the held SVID expires; new handshakes are then refused, never served with the
    expired certificate; when the agent returns the pod recovers without help."""
    async with spire_and_sidecar(tmp_path, faulty_app.port, "4s") as (spire, relay, sc):
        cert, key = write_client(spire, tmp_path, "checkout", CHECKOUT)
        bundle = spire.bundle_pem()
        ok = await one_request(sc.inbound_port, client_context(cert, key, bundle), "/api/stock/1")
        assert ok.status == 200, ok.error

        await relay.stop()
        view = json.loads((await admin_get(sc, "/config"))[1])
        held = dt.datetime.fromisoformat(view["identity"]["svids"][0]["expires_at"])
        await until(lambda: dt.datetime.now(dt.UTC) > held + dt.timedelta(seconds=0.5))
        status, body = await admin_get(sc, "/readyz")
        assert status == 503, body

        # A client that does not check the server (so that we see what the sidecar would present).
        lax = client_context(cert, key, bundle, verify=False)
        attempts = [await one_request(sc.inbound_port, lax, "/api/stock/1") for _ in range(3)]
        now = dt.datetime.now(dt.UTC)
        served_expired = [r for r in attempts if r.server_leaf is not None and r.server_leaf.not_valid_after_utc < now]
        assert served_expired == [], "the sidecar completed handshakes with its expired X.509-SVID"
        # Refused, not left hanging: a connection still open at the client's deadline is no refusal.
        assert all(r.refused for r in attempts), [(r.status, r.error) for r in attempts]

        await relay.start()
        await until(lambda: _ready(sc))
        ok = await one_request(sc.inbound_port, client_context(cert, key, spire.bundle_pem()), "/api/stock/1")
        assert ok.status == 200, ok.error
    figures("svid_expired_during_outage", 5, 0, refused_while_expired=sum(r.status == 0 for r in attempts))


async def _ready(sc: SidecarProcess) -> bool:
    return (await admin_get(sc, "/readyz"))[0] == 200


# ---------------------------------------------------------------------------------------------------------
# 2. CA rotation and a bundle change under traffic


async def test_ca_rotation_and_bundle_change_under_traffic(tmp_path: Path, faulty_app: FaultyApp) -> None:
    async with spire_and_sidecar(tmp_path, faulty_app.port, "10m") as (spire, _relay, sc):
        old_cert, old_key = write_client(spire, tmp_path, "checkout-old", CHECKOUT)
        client = {"cert": old_cert, "key": old_key}

        # A well-behaved SPIFFE peer: each new connection uses its current SVID and its current bundle.
        def ctx() -> ssl.SSLContext:
            return client_context(client["cert"], client["key"], spire.bundle_pem())

        traffic = Traffic(sc.inbound_port, ctx).start()
        await traffic.wait_for(5)
        old_ca = spire.x509_authorities()[-1].subject
        for round_ in range(2):
            rotations = await metric(sc, "spiffe_sidecar_svid_rotations_total")
            spire.rotate_ca()  # bundle change first (new CA published), SVIDs move later
            await wait_metric(sc, "spiffe_sidecar_svid_rotations_total", rotations + 1, timeout=WAIT)
            await traffic.wait_for(5)
            rotations = await metric(sc, "spiffe_sidecar_svid_rotations_total")
            spire.force_rotate(INVENTORY)  # the sidecar's own SVID now comes from the new CA
            await wait_metric(sc, "spiffe_sidecar_svid_rotations_total", rotations + 1, timeout=WAIT)
            # the caller moves to a new-CA SVID too: the sidecar must trust it through the pushed bundle
            client["cert"], client["key"] = write_client(spire, tmp_path, f"checkout-{round_}", CHECKOUT)
            await traffic.wait_for(10)
        await traffic.stop()

    leaf = traffic.results[-1].server_leaf
    assert leaf is not None and leaf.issuer != old_ca
    assert traffic.failures == [], traffic.failures[:5]
    figures("ca_rotation_bundle_change", traffic.sent, len(traffic.failures))


# ---------------------------------------------------------------------------------------------------------
# 3. The app down, slow, or closing mid-response


async def _quiet_fds(sc: SidecarProcess, baseline: int) -> int:
    """Open fds once no inbound connection is open (a hang fails here) and the fd table is back to
    `baseline` or 15 s have passed (pooled upstream connections are evicted after at most 4 s idle). That
    second wait may time out: the caller asserts `fds <= baseline` with both numbers in the message."""
    await until(lambda: _no_open_connections(sc), timeout=15)
    with contextlib.suppress(TimeoutError):
        await until(lambda: open_fds(sc.proc.pid) <= baseline, timeout=15)
    return open_fds(sc.proc.pid)


async def _no_open_connections(sc: SidecarProcess) -> bool:
    return await metric(sc, 'spiffe_sidecar_open_connections{listener="inbound"}') == 0


async def test_app_down_slow_or_cut_gives_502_504_without_hangs_or_leaks(tmp_path: Path, faulty_app: FaultyApp) -> None:
    async with running_sidecar(pem_config(tmp_path, faulty_app.port)) as sc:
        ctx = pem_client(sc)
        assert (await one_request(sc.inbound_port, ctx, "/api/stock/warm")).status == 200
        baseline = await _quiet_fds(sc, 10_000)

        n = 10
        slow, closed, ok = await asyncio.gather(
            asyncio.gather(*(one_request(sc.inbound_port, ctx, f"/api/stock/slow{i}") for i in range(n))),
            asyncio.gather(*(one_request(sc.inbound_port, ctx, f"/api/stock/close{i}") for i in range(n))),
            asyncio.gather(*(one_request(sc.inbound_port, ctx, f"/api/stock/{i}") for i in range(n))),
        )
        assert [r.status for r in slow] == [504] * n  # upstream_response: 1s
        assert [r.status for r in closed] == [502] * n
        assert [r.status for r in ok] == [200] * n

        # Closing mid-response: the status line is gone already, so the caller sees a cut body (not a
        # hang, not a well-framed short body).
        conn = aiohttp.TCPConnector(ssl=ctx, force_close=True)
        cut_errors = 0
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=20)) as s:
            for i in range(n):
                try:
                    async with s.get(f"https://127.0.0.1:{sc.inbound_port}/api/stock/cut{i}") as r:
                        await r.read()
                except aiohttp.ClientPayloadError:
                    cut_errors += 1
        assert cut_errors == n

        await faulty_app.stop()  # the app is down
        down = [await one_request(sc.inbound_port, ctx, f"/api/stock/down{i}") for i in range(n)]
        assert [r.status for r in down] == [502] * n

        end = await _quiet_fds(sc, baseline)
        assert await metric(sc, 'spiffe_sidecar_open_connections{listener="inbound"}') == 0
        assert end <= baseline, f"fds {baseline} -> {end}: leaked connections"
        assert faulty_app.open == 0
        await faulty_app.start(faulty_app.port)  # and back: served again without a restart
        assert (await one_request(sc.inbound_port, ctx, "/api/stock/back")).status == 200
    sent = 5 * n + 2
    figures("app_down_slow_cut", sent, 0, expected_502=2 * n, expected_504=n, cut=n, fds_before=baseline, fds_after=end)


# ---------------------------------------------------------------------------------------------------------
# 4. SIGTERM with requests in flight; SIGKILL and restart


async def test_sigterm_drains_in_flight_refuses_new_and_exits_0(tmp_path: Path) -> None:
    started = 0
    release = asyncio.Event()

    async def slow_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal started
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            started += 1
            async with asyncio.timeout(WAIT):
                await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(slow_app, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        config = pem_config(tmp_path, port, timeouts="{drain: 15s, upstream_response: 30s}")
        async with running_sidecar(config) as sc:
            ctx = pem_client(sc)
            n = 5
            inflight = [asyncio.create_task(one_request(sc.inbound_port, ctx, f"/api/stock/{i}")) for i in range(n)]
            await until(lambda: started == n)
            sc.proc.send_signal(signal.SIGTERM)
            await until(lambda: count_lines(sc, "draining") >= 1)
            refused = await one_request(sc.inbound_port, ctx, "/api/stock/new", timeout=5)
            assert refused.status == 0 and "Refused" in refused.error, refused
            release.set()
            results = await asyncio.gather(*inflight)
            assert [r.status for r in results] == [200] * n
            async with asyncio.timeout(WAIT):
                assert await sc.proc.wait() == 0, "\n".join(sc.lines)
    finally:
        srv.close()
    figures("sigterm_drain", n + 1, 0, completed=n, refused_new=1)


async def test_sigkill_and_restart_recovers_on_the_same_ports(tmp_path: Path, faulty_app: FaultyApp) -> None:
    inbound, admin = free_port(), free_port()
    config = pem_config(tmp_path, faulty_app.port, listen=f"127.0.0.1:{inbound}", admin=f"127.0.0.1:{admin}")
    async with running_sidecar(config) as sc:
        ctx = pem_client(sc)
        conn = aiohttp.TCPConnector(ssl=ctx, limit=4)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=10)) as s:
            for i in range(4):  # leave keep-alive connections open: the kill leaves sockets behind
                async with s.get(f"https://127.0.0.1:{inbound}/api/stock/{i}") as r:
                    assert r.status == 200
            sc.proc.kill()
            async with asyncio.timeout(WAIT):
                assert await sc.proc.wait() == -signal.SIGKILL
    # The kubelet restarts the container: same config, same ports, no manual step.
    async with running_sidecar(config) as sc2:
        assert sc2.inbound_port == inbound and sc2.admin_port == admin
        assert await admin_get(sc2, "/readyz") == (200, "ready\n")
        results = [await one_request(inbound, pem_client(sc2), f"/api/stock/{i}") for i in range(5)]
        assert [r.status for r in results] == [200] * 5
    figures("sigkill_restart", 9, 0)


# ---------------------------------------------------------------------------------------------------------
# 5. Bad policy reloads while traffic flows: never an allow-all moment


BAD_VERSIONS: list[tuple[str, bytes]] = [
    ("unknown field", BROKEN_POLICY.encode()),
    ("not YAML", b"rules: [\n  - {name: x, action: allow"),
    ("not a mapping", b"- allow everything\n"),
    ("not UTF-8", b"\xff\xfe rules: []"),
    ("bad caller pattern", b'rules:\n  - {name: all, action: allow, paths: ["/**"], callers: ["spiffe://*"]}\n'),
    ("bad path", b'rules:\n  - {name: all, action: allow, paths: ["admin"], callers: ["*"]}\n'),
    ("empty file", b""),
]
async def test_bad_policy_reloads_never_open_an_allow_all_moment(tmp_path: Path, faulty_app: FaultyApp) -> None:
    async with running_sidecar(pem_config(tmp_path, faulty_app.port)) as sc:
        allowed = Traffic(sc.inbound_port, lambda: pem_client(sc), pause=0.02).start(keepalive=True)
        denied_peer = Traffic(sc.inbound_port, lambda: pem_client(sc, "reporting"), expect=403, pause=0.02).start(
            keepalive=True
        )
        denied_path = Traffic(
            sc.inbound_port, lambda: pem_client(sc), path="/admin/users", expect=403, pause=0.02
        ).start(keepalive=False)
        policy = sc.dir / "policy.yaml"
        ok = 0
        for i, (_what, data) in enumerate(BAD_VERSIONS):
            replace_file(policy, data)
            await wait_metric(sc, 'spiffe_sidecar_policy_reloads_total{result="error"}', i + 1)
            if i == 3:  # the kubelet's swap can leave no file for a moment
                policy.unlink()
                await asyncio.sleep(10 * POLICY_POLL)  # the watcher finds no file several times
            if i % 2 == 1:  # interleave good versions: each swap is one reference assignment
                replace_file(policy, (POLICY_WITH_ORDERS if i % 4 == 1 else POLICY).encode())
                ok += 1
                await wait_metric(sc, 'spiffe_sidecar_policy_reloads_total{result="ok"}', ok)
        for t in (allowed, denied_peer, denied_path):
            await t.wait_for(3)
            await t.stop()

    for t in (allowed, denied_peer, denied_path):
        assert t.failures == [], (t.path, t.expect, t.failures[:5])
    # The audit log is the record of every decision made during the reloads.
    records = [json.loads(line) for line in (sc.dir / "audit.log").read_text().splitlines() if line.startswith("{")]
    decisions = [r for r in records if "decision" in r]
    assert decisions
    assert not [r for r in decisions if r["peer"] == REPORTING and r["decision"] != "deny"]
    assert not [r for r in decisions if r["path"].startswith("/admin") and r["decision"] != "deny"]
    sent = allowed.sent + denied_peer.sent + denied_path.sent
    failed = len(allowed.failures) + len(denied_peer.failures) + len(denied_path.failures)
    figures(
        "bad_policy_reloads",
        sent,
        failed,
        bad_versions=len(BAD_VERSIONS),
        good_versions=ok,
        decisions_audited=len(decisions),
    )
