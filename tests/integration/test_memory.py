"""Floods of idle mTLS connections against a real `spiffe-sidecar run` process: the memory they took comes
back once they are gone, round after round (issue 10 item 2, threat model T37, sidecar/memory.py).

Each round opens CONNS mTLS connections (handshake done, client certificate verified) from this process
and sends nothing; once all are held, this side closes them (the full form, `make bench` with
benchmarks/memory_bench.py: 5 rounds of 2,000 that the sidecar's head deadline closes, nginx beside it;
here the deadline would fire before a loaded 2-core machine has opened them all). RSS (VmRSS) and open
fds of the sidecar process are read from /proc before, while the connections are held, and after.

`MEMORY_TEST_MALLOC=off` runs the same test against the behaviour before the fix (glibc's defaults, no
trimming): it fails, on the "given back" assertion.
"""

from __future__ import annotations

import asyncio
import os
import resource
import ssl
from pathlib import Path

import pytest

from tests.processes import pem_client, pem_config, running_sidecar

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(90)]  # uvloop: the transports the sidecar ships with

ROUNDS = 3
CONNS = 600
CONCURRENT_HANDSHAKES = 100
MAX_GROWTH = 1.15  # RSS after the last round / RSS after the first
# RSS kept after the last round / RSS the first round's held connections took. Before the fix nothing came
# back (>= 1); after it ~0.3-0.5: fragmentation, and dead connections' Python objects in reference cycles
# that wait for the next full collection of the cyclic GC.
MAX_RETAINED = 0.75
# KiB of RSS per held idle mTLS connection. The issue asks for 20; on CPython's ssl over OpenSSL 3.0 the
# TLS state alone is ~28 KiB (server SSLObject after an mTLS handshake, measured alone) and nginx on the
# same machine holds one in ~25 KiB: this bound guards today's ~42 KiB against regressions (a per-connection
# buffer would add its whole size), it does not claim the target.
MAX_KIB_PER_CONN = 56


def status(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open fds) of `pid`."""
    with open(f"/proc/{pid}/status") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Idle(asyncio.Protocol):
    """A client connection that never sends a byte; counts itself in `lost` once closed."""

    def __init__(self, lost: list[int]) -> None:
        self.lost = lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(1)


async def open_idle(port: int, ctx: ssl.SSLContext, n: int, lost: list[int]) -> list[asyncio.BaseTransport]:
    """Open `n` mTLS connections, at most CONCURRENT_HANDSHAKES at a time."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONCURRENT_HANDSHAKES)
    transports: list[asyncio.BaseTransport] = []

    async def one() -> None:
        async with gate:
            transport, _ = await loop.create_connection(lambda: Idle(lost), "127.0.0.1", port, ssl=ctx)
            transports.append(transport)

    await asyncio.gather(*(one() for _ in range(n)))
    return transports


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))


async def test_rounds_of_idle_mtls_connections_give_their_memory_back(tmp_path: Path) -> None:
    mode = os.environ.get("MEMORY_TEST_MALLOC", "on")
    _raise_fd_limit(4 * CONNS)  # this process holds the client ends; the sidecar inherits the limit
    config = pem_config(tmp_path, 9, timeouts="{request_head: 60s, handshake: 10s, drain: 1s}")
    async with running_sidecar(config, env={"SPIFFE_SIDECAR_MALLOC": mode}) as sc:
        pid = sc.proc.pid
        ctx = pem_client(sc)
        await asyncio.sleep(0.5)
        base_rss, base_fds = status(pid)
        rounds: list[dict[str, int]] = []
        for _ in range(ROUNDS):
            before_rss, before_fds = status(pid)
            lost: list[int] = []
            transports = await open_idle(sc.inbound_port, ctx, CONNS, lost)
            await asyncio.sleep(0.3)  # the sidecar finishes the last handshakes (our side is done first)
            held_rss, held_fds = status(pid)
            for t in transports:
                t.close()  # TLS close_notify, then the sidecar closes its end
            async with asyncio.timeout(30):
                while len(lost) < len(transports) or status(pid)[1] > base_fds + 2:
                    await asyncio.sleep(0.1)
            # The Reclaimer samples the count once a second and trims once it has stopped falling.
            for _ in range(30):
                await asyncio.sleep(0.1)
                if status(pid)[0] < held_rss - (held_rss - before_rss) // 2:
                    break
            await asyncio.sleep(0.2)
            rounds.append(
                {"opened": len(transports), "held": held_fds - before_fds, "before": before_rss, "held_rss": held_rss,
                 "after": status(pid)[0]}
            )  # fmt: skip
    first, last = rounds[0], rounds[-1]
    per_conn = (first["held_rss"] - first["before"]) / max(1, first["held"])
    after_mb = [round(r["after"] / 1024, 1) for r in rounds]
    retained = (last["after"] - base_rss) / max(1, first["held_rss"] - base_rss)
    print(
        f"\nFIGURES scenario=idle_mtls_rounds mode={mode} conns={CONNS} base_mb={base_rss / 1024:.1f} "
        f"held_mb={[round(r['held_rss'] / 1024, 1) for r in rounds]} after_mb={after_mb} "
        f"held={[r['held'] for r in rounds]} kib_per_held_conn={per_conn:.1f} retained={retained:.2f}"
    )
    assert all(r["opened"] == CONNS for r in rounds), f"handshakes failed: {rounds}"
    assert first["held"] >= CONNS - 2, f"only {first['held']} of {CONNS} connections were open at once: {rounds}"
    assert last["after"] <= MAX_GROWTH * first["after"], (
        f"RSS after each round {after_mb} MB: the last is more than {MAX_GROWTH:.2f}x the first "
        "(memory of closed connections accumulates)"
    )
    assert retained <= MAX_RETAINED, (
        f"after {ROUNDS} rounds the sidecar still holds {(last['after'] - base_rss) / 1024:.1f} MB over its "
        f"{base_rss / 1024:.1f} MB start, {retained:.0%} of what {first['held']} held connections took "
        f"({(first['held_rss'] - base_rss) / 1024:.1f} MB): freed memory is not given back to the OS"
    )
    assert per_conn <= MAX_KIB_PER_CONN, (
        f"{per_conn:.1f} KiB of RSS per held idle mTLS connection (at most {MAX_KIB_PER_CONN}; was ~42)"
    )
