"""Soak (issue 7.4): the sidecar subprocess on the embedded SPIRE under a steady request rate, with SVID
rotation, policy reloads and a Workload API outage in the middle.

Short form (CI, about a minute): `SOAK_SECONDS` unset -> 40 s of soak after a 10 s warm-up, SVIDs
rotating every 10 s. Long form: `SOAK_SECONDS=600` (SVIDs rotating every 30 s), run by
`python benchmarks/soak.py`, which also sets `SOAK_RESULT` to write the figures as JSON.

Asserted: zero failed requests (no fault is injected that a caller should see), RSS growth under 5 %
between the end of the warm-up and the end of the run, and no growth in open file descriptors. Both are
measured at quiet moments (traffic stopped, pooled upstream connections evicted) so that in-flight
connections do not count.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import platform
from pathlib import Path

import pytest

from tests.example import CHECKOUT, POLICY, POLICY_WITH_ORDERS, REPORTING
from tests.processes import (
    FaultyApp,
    SidecarProcess,
    Traffic,
    client_context,
    count_lines,
    metric,
    open_fds,
    replace_file,
    spire_and_sidecar,
    wait_metric,
    wait_until,
    write_client,
)

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "40"))
LONG = SOAK_SECONDS >= 300
WARMUP = 60.0 if LONG else 10.0
SVID_TTL = "60s" if LONG else "20s"  # rotation at half-life: every 30 s (long) / 10 s (short)
POLICY_EVERY = 20.0 if LONG else 8.0
PAUSE = 0.02  # per loop; two loops (fresh handshake each, and keep-alive): a steady few dozen req/s

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SOAK_SECONDS + WARMUP + 180))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def quiet_sample(sc: SidecarProcess) -> tuple[int, int]:
    """(RSS KiB, open fds) once no connection is open and pooled upstream connections were evicted."""

    async def quiet() -> bool:
        return await metric(sc, 'spiffe_sidecar_open_connections{listener="inbound"}') == 0

    await wait_until(quiet)
    await asyncio.sleep(5.0)  # > the upstream pool's 4 s idle eviction
    return rss_kib(sc.proc.pid), open_fds(sc.proc.pid)


async def test_soak(tmp_path: Path) -> None:
    app = FaultyApp()
    await app.start()
    try:
        # The production policy poll interval: the soak runs the sidecar as deployed.
        async with spire_and_sidecar(tmp_path, app.port, SVID_TTL, policy_poll=None) as (spire, relay, sc):
            cert, key = write_client(spire, tmp_path, "checkout", CHECKOUT, ttl=SOAK_SECONDS + WARMUP + 600)
            rcert, rkey = write_client(
                spire,
                tmp_path,
                "reporting",
                REPORTING,
                ttl=SOAK_SECONDS + WARMUP + 600,
            )

            def allowed() -> Traffic:
                return Traffic(sc.inbound_port, lambda: client_context(cert, key, spire.bundle_pem()), pause=PAUSE)

            def denied() -> Traffic:
                return Traffic(
                    sc.inbound_port,
                    lambda: client_context(rcert, rkey, spire.bundle_pem()),
                    expect=403,
                    pause=PAUSE * 5,
                )

            # Warm-up: the same traffic, then a quiet sample as the baseline.
            warm = [allowed().start(), denied().start(keepalive=False)]
            await asyncio.sleep(WARMUP)
            for t in warm:
                await t.stop()
            rss0, fds0 = await quiet_sample(sc)
            rotations0 = await metric(sc, "spiffe_sidecar_svid_rotations_total")

            loops = [allowed().start(), denied().start(keepalive=False)]
            loop = asyncio.get_running_loop()
            start = loop.time()
            reloads = 0
            outage_done = False
            next_policy = start + POLICY_EVERY
            while (elapsed := loop.time() - start) < SOAK_SECONDS:
                if loop.time() >= next_policy:
                    reloads += 1
                    replace_file(sc.dir / "policy.yaml", (POLICY_WITH_ORDERS if reloads % 2 else POLICY).encode())
                    await wait_metric(sc, 'spiffe_sidecar_policy_reloads_total{result="ok"}', reloads)
                    next_policy += POLICY_EVERY
                if not outage_done and elapsed >= SOAK_SECONDS / 2:
                    outage_done = True
                    connected = count_lines(sc, "svid source workload_api: connected")
                    await relay.stop()  # the agent restarts mid-run
                    await asyncio.sleep(2.0)
                    await relay.start()

                    def reconnected(c: int = connected) -> bool:
                        return count_lines(sc, "svid source workload_api: connected") > c

                    await wait_until(reconnected)
                await asyncio.sleep(0.25)
            for t in loops:
                await t.stop()
            rotations = await metric(sc, "spiffe_sidecar_svid_rotations_total") - rotations0
            rss1, fds1 = await quiet_sample(sc)
            assert (await metric(sc, 'spiffe_sidecar_policy_reloads_total{result="error"}')) == 0
    finally:
        await app.stop()

    sent = sum(t.sent for t in loops)
    failures = [f for t in loops for f in t.failures]
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "soak_seconds": SOAK_SECONDS,
        "warmup_seconds": WARMUP,
        "svid_ttl": SVID_TTL,
        "requests_sent": sent,
        "requests_failed": len(failures),
        "failures_sample": failures[:10],
        "svid_rotations": rotations,
        "policy_reloads": reloads,
        "workload_api_restarts": 1,
        "rss_kib_after_warmup": rss0,
        "rss_kib_end": rss1,
        "rss_growth_pct": round(100.0 * (rss1 - rss0) / rss0, 2),
        "open_fds_after_warmup": fds0,
        "open_fds_end": fds1,
    }
    print("\nFIGURES soak " + json.dumps(result))
    if out := os.environ.get("SOAK_RESULT"):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")

    assert failures == [], failures[:10]
    assert rotations >= 2, rotations  # SVIDs rotated during the run (and the restart resent one)
    assert rss1 <= rss0 * 1.05, f"RSS {rss0} KiB -> {rss1} KiB"
    assert fds1 <= fds0, f"open fds {fds0} -> {fds1}"
