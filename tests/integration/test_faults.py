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
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from spire.entries import parse_config
from spire.server import EmbeddedSpire
from tests.integration.test_app import (
    BROKEN_POLICY,
    CHECKOUT,
    INVENTORY,
    POLICY,
    REPORTING,
    Sidecar,
    admin_get,
    metric,
    running_sidecar,
    wait_metric,
    write_pki,
)

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
WAIT = 30.0  # generous deadline for anything to happen on a shared 2-core machine


# ---------------------------------------------------------------------------------------------------------
# Clients and traffic


@dataclass
class Result:
    status: int  # 0 when no HTTP response arrived
    error: str = ""
    server_leaf: x509.Certificate | None = None


def client_context(cert: Path, key: Path, bundle_pem: bytes, *, verify: bool = True) -> ssl.SSLContext:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False  # SPIFFE: the server is identified by its URI SAN, not a DNS name
    if verify:
        c.load_verify_locations(cadata=bundle_pem.decode())
    else:
        c.verify_mode = ssl.CERT_NONE
    c.load_cert_chain(str(cert), str(key))
    return c


async def one_request(port: int, ctx: ssl.SSLContext, path: str, *, timeout: float = 20.0) -> Result:
    """One request on a fresh TLS connection (a new handshake); `Connection: close`."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            sslobj = writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            leaf = x509.load_der_x509_certificate(der) if der else None
            writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read()
            while chunk := await reader.read(65536):
                data += chunk
        if not data.startswith(b"HTTP/1.1 "):
            return Result(0, f"no response: {data[:60]!r}", leaf)
        return Result(int(data[9:12]), "", leaf)
    except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return Result(0, f"{type(exc).__name__}: {exc}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@dataclass
class Traffic:
    """A steady request loop in the background; every result is kept for the assertions."""

    port: int
    ctx: Callable[[], ssl.SSLContext]
    path: str = "/api/stock/1"
    expect: int = 200
    pause: float = 0.05
    results: list[Result] = field(default_factory=list)
    keepalive_ok: int = 0
    keepalive_failed: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return len(self.results) + self.keepalive_ok + len(self.keepalive_failed)

    @property
    def failures(self) -> list[str]:
        bad = [f"{r.status} {r.error}" for r in self.results if r.status != self.expect]
        return bad + self.keepalive_failed

    async def _fresh_loop(self) -> None:
        while not self._stop.is_set():
            self.results.append(await one_request(self.port, self.ctx(), self.path))
            await asyncio.sleep(self.pause)

    async def _keepalive_loop(self) -> None:
        # One keep-alive connection for the whole run: rotation must leave open connections alone.
        conn = aiohttp.TCPConnector(ssl=self.ctx(), limit=1)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=20)) as s:
            while not self._stop.is_set():
                try:
                    async with s.get(f"https://127.0.0.1:{self.port}{self.path}") as r:
                        await r.read()
                        if r.status == self.expect:
                            self.keepalive_ok += 1
                        else:
                            self.keepalive_failed.append(f"keep-alive {r.status}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.keepalive_failed.append(f"keep-alive {type(exc).__name__}: {exc}")
                await asyncio.sleep(self.pause)

    def start(self, *, keepalive: bool = True) -> Traffic:
        self._tasks.append(asyncio.create_task(self._fresh_loop()))
        if keepalive:
            self._tasks.append(asyncio.create_task(self._keepalive_loop()))
        return self

    async def stop(self) -> None:
        self._stop.set()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*self._tasks)

    async def wait_for(self, n: int) -> None:
        """Until at least `n` more fresh-connection requests have completed."""
        target = len(self.results) + n
        async with asyncio.timeout(WAIT):
            while len(self.results) < target:
                await asyncio.sleep(0.05)


def figures(scenario: str, sent: int, failed: int, **extra: object) -> None:
    more = "".join(f" {k}={v}" for k, v in extra.items())
    print(f"\nFIGURES scenario={scenario} sent={sent} failed={failed}{more}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def until(cond: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> None:
    async with asyncio.timeout(timeout):
        while not await _value(cond()):
            await asyncio.sleep(0.1)
    del what


async def _value(v: Any) -> Any:
    return await v if asyncio.iscoroutine(v) else v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------
# The embedded SPIRE as the Workload API


def spire_entries(svid_ttl: str) -> str:
    return f"""\
trust_domain: {TD}
svid_ttl: {svid_ttl}
ca_ttl: 1h
entries:
  - spiffe_id: {INVENTORY}
    socket: inventory.sock
    dns_names: [localhost]
"""


def write_client(spire: EmbeddedSpire, d: Path, name: str, sid: str, ttl: float = 600) -> tuple[Path, Path]:
    svid = spire.mint_x509_svid(sid, ttl=ttl)
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    cert.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.chain))
    key.write_bytes(svid.key_pem())
    key.chmod(0o600)
    return cert, key


def wl_config(d: Path, app_port: int, *, extra: str = "") -> Path:
    (d / "policy.yaml").write_text(POLICY)
    config = d / "inventory.yaml"
    config.write_text(
        f"""\
svid_source: {{workload_api: {{}}}}
inbound: {{listen: "127.0.0.1:0", app: "127.0.0.1:{app_port}", policy_file: policy.yaml}}
admin: {{listen: "127.0.0.1:0"}}
audit: {{path: audit.log}}
{extra}"""
    )
    return config


class AgentRelay:
    """The agent socket the sidecar dials: relays to the embedded SPIRE's socket. `stop()` is the agent
    process going away (listening socket and every open connection closed, socket file removed);
    `start()` is it coming back on the same path.

    A relay, because `EmbeddedSpire.stop()` leaves already-open Workload API streams hanging (see the
    report: the sidecar never notices); a dying agent process closes them.
    """

    def __init__(self, listen: Path, target: Path) -> None:
        self.listen = listen
        self.target = target
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_unix_connection(str(self.target))
        except OSError:
            w.close()
            return
        self.writers |= {w, uw}
        try:
            await asyncio.gather(self._pipe(r, uw), self._pipe(ur, w))
        finally:
            self.writers -= {w, uw}

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._handle, path=str(self.listen))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in list(self.writers):
            w.transport.abort()
        with contextlib.suppress(FileNotFoundError):
            self.listen.unlink()


@contextlib.asynccontextmanager
async def spire_and_sidecar(
    tmp: Path, app_port: int, svid_ttl: str
) -> AsyncIterator[tuple[EmbeddedSpire, AgentRelay, Sidecar]]:
    cfg = parse_config(spire_entries(svid_ttl), "entries.yaml", socket_dir=str(tmp / "spire"))
    spire = EmbeddedSpire(cfg)
    await spire.start()
    relay = AgentRelay(tmp / "agent.sock", spire.socket_path_for(INVENTORY))
    await relay.start()
    try:
        env = {"SPIFFE_ENDPOINT_SOCKET": f"unix://{relay.listen}"}
        async with running_sidecar(wl_config(tmp, app_port), env=env) as sc:
            yield spire, relay, sc
    finally:
        await relay.stop()
        await spire.stop()


async def config_leaf_sha(sc: Sidecar) -> str:
    view = json.loads((await admin_get(sc, "/config"))[1])
    return str(view["identity"]["svids"][0]["leaf_sha256"])


def count_lines(sc: Sidecar, needle: str) -> int:
    return sum(needle in line for line in sc.lines)


# ---------------------------------------------------------------------------------------------------------
# A controllable app: normal, slow, closes before answering, closes mid-response


@dataclass
class FaultyApp:
    port: int = 0
    open: int = 0
    accepted: int = 0
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.accepted += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if b"/slow" in path:
                    # Slower than upstream_response; returns early when the sidecar gives up and closes.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5):
                            await reader.read(1)
                    return
                if b"/close" in path:
                    return  # close without a response
                if b"/cut" in path:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
                    await writer.drain()
                    return  # close mid-body
                body = b"ok " + path
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", port or self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


@pytest.fixture
async def faulty_app() -> AsyncIterator[FaultyApp]:
    app = FaultyApp()
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def pem_config(
    tmp: Path,
    app_port: int,
    *,
    listen: str = "127.0.0.1:0",
    admin: str = "127.0.0.1:0",
    timeouts: str = "{drain: 10s, upstream_response: 1s, upstream_connect: 1s}",
) -> Path:
    write_pki(tmp)
    (tmp / "policy.yaml").write_text(POLICY)
    config = tmp / "inventory.yaml"
    config.write_text(
        f"""\
svid_source:
  pem: {{cert_chain: tls.crt, key: tls.key, bundle: ca.crt, trust_domain: {TD}, poll_interval: 250ms}}
inbound: {{listen: "{listen}", app: "127.0.0.1:{app_port}", policy_file: policy.yaml}}
admin: {{listen: "{admin}"}}
audit: {{path: audit.log}}
timeouts: {timeouts}
"""
    )
    return config


def pem_client(sc: Sidecar, who: str = "checkout") -> ssl.SSLContext:
    return client_context(sc.dir / f"{who}.crt", sc.dir / f"{who}.key", (sc.dir / "ca.crt").read_bytes())


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
        assert all(r.status == 0 for r in attempts), [r.status for r in attempts]

        await relay.start()
        await until(lambda: _ready(sc))
        ok = await one_request(sc.inbound_port, client_context(cert, key, spire.bundle_pem()), "/api/stock/1")
        assert ok.status == 200, ok.error
    figures("svid_expired_during_outage", 5, 0, refused_while_expired=sum(r.status == 0 for r in attempts))


async def _ready(sc: Sidecar) -> bool:
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


async def _quiet_fds(sc: Sidecar, baseline: int) -> int:
    # Pooled upstream connections are evicted after at most 4 s idle; wait for the gauge and the fd table.
    async def settled() -> bool:
        gauge = await metric(sc, 'spiffe_sidecar_open_connections{listener="inbound"}')
        return gauge == 0 and open_fds(sc.proc.pid) <= baseline

    with contextlib.suppress(TimeoutError):
        await until(settled, timeout=15)
    return open_fds(sc.proc.pid)


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
GOOD_VARIANT = (
    POLICY
    + f"""\
  - name: checkout-orders
    action: allow
    methods: [GET]
    paths: ["/api/orders/*"]
    callers: ["{CHECKOUT}"]
"""
)


def _swap(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


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
            _swap(policy, data)
            await wait_metric(sc, 'spiffe_sidecar_policy_reloads_total{result="error"}', i + 1)
            if i == 3:  # the kubelet's swap can leave no file for a moment
                policy.unlink()
                await asyncio.sleep(1.5)
            if i % 2 == 1:  # interleave good versions: each swap is one reference assignment
                _swap(policy, (GOOD_VARIANT if i % 4 == 1 else POLICY).encode())
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
