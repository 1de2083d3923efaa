"""Helpers for tests that run the whole sidecar as a subprocess (`spiffe-sidecar run -c FILE`), as an
operator runs it: config and PEM files of the running example, the process with its log lines, curl and
admin clients, and the fault-injection tools (an app that misbehaves on request, a Workload API agent that
goes away and comes back, steady traffic that records every result).

Plain functions and classes (no fixtures); see tests/helpers.py for the in-process ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from spire.entries import parse_config
from spire.server import EmbeddedSpire
from tests.example import CHECKOUT, INVENTORY, POLICY, REPORTING, TD
from tests.helpers import until
from tests.pki import CA

SCRIPT = Path(sys.executable).parent / "spiffe-sidecar"
WAIT = 30.0  # generous deadline for anything to happen on a shared 2-core machine
# The sidecar checks its policy file every POLICY_POLL s in these tests (production: every 1 s), so that a
# reload shows in milliseconds instead of costing a second per edit.
POLICY_POLL = 0.05
ENV_POLICY_POLL_INTERVAL = "SPIFFE_SIDECAR_POLICY_POLL_INTERVAL"  # sidecar/app.py


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the sidecar's own variables (a developer's shell may set
    them), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPIFFE_SIDECAR_", "SPIFFE_ENDPOINT"))}
    env.update(extra or {})
    return env


def poll_env(policy_poll: float | None = POLICY_POLL) -> dict[str, str]:
    """The environment that sets the sidecar's policy poll interval (None: the production default)."""
    return {} if policy_poll is None else {ENV_POLICY_POLL_INTERVAL: str(policy_poll)}


def replace_file(path: Path, data: str | bytes) -> None:
    """Replace `path` atomically, like the kubelet's ..data symlink swap."""
    tmp = path.with_suffix(".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------
# Config and PEM files


def write_pki(tmp: Path) -> None:
    """tls.crt/tls.key (inventory), ca.crt, checkout.crt/.key and reporting.crt/.key in `tmp`."""
    root = CA.root(TD)
    inventory = root.leaf(INVENTORY, dns=["localhost"])  # DNS SAN only so that curl can verify the server
    (tmp / "tls.crt").write_bytes(inventory.chain_pem())
    (tmp / "tls.key").write_bytes(inventory.key_pem())
    (tmp / "ca.crt").write_bytes(root.bundle_pem())
    for name, sid in (("checkout", CHECKOUT), ("reporting", REPORTING)):
        leaf = root.leaf(sid)
        (tmp / f"{name}.crt").write_bytes(leaf.chain_pem())
        (tmp / f"{name}.key").write_bytes(leaf.key_pem())
    (tmp / "tls.key").chmod(0o600)


def write_config(tmp: Path, app_port: int) -> Path:
    """Inventory's sidecar on PEM files (polled every 250 ms), the example policy in policy.yaml."""
    (tmp / "policy.yaml").write_text(POLICY)
    config = tmp / "inventory.yaml"
    config.write_text(
        f"""\
svid_source:
  pem: {{cert_chain: tls.crt, key: tls.key, bundle: ca.crt, trust_domain: {TD}, poll_interval: 250ms}}
inbound:
  listen: "127.0.0.1:0"
  app: "127.0.0.1:{app_port}"
  policy_file: policy.yaml
admin: {{listen: "127.0.0.1:0"}}
audit: {{path: audit.log}}
timeouts: {{drain: 10s}}
log_level: info
"""
    )
    return config


def pem_config(
    tmp: Path,
    app_port: int,
    *,
    listen: str = "127.0.0.1:0",
    admin: str = "127.0.0.1:0",
    timeouts: str = "{drain: 10s, upstream_response: 1s, upstream_connect: 1s}",
) -> Path:
    """`write_pki` and a config on those files with the given listen addresses and timeouts."""
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


# ---------------------------------------------------------------------------------------------------------
# The sidecar process


@dataclass
class SidecarProcess:
    proc: asyncio.subprocess.Process
    inbound_port: int
    admin_port: int
    lines: list[str]  # stderr (the log), line by line as it arrives
    dir: Path

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


async def collect_lines(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while raw := await stream.readline():
        lines.append(raw.decode(errors="replace").rstrip("\n"))


async def wait_for_line(lines: list[str], pattern: str, proc: asyncio.subprocess.Process, timeout: float = 30) -> str:
    """The first line matching `pattern`; fails when the process exits first or after `timeout`."""
    regex = re.compile(pattern)
    async with asyncio.timeout(timeout):
        while True:
            for line in lines:
                if regex.search(line):
                    return line
            if proc.returncode is not None:
                raise AssertionError(f"sidecar exited {proc.returncode}: " + "\n".join(lines))
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_sidecar(
    config: Path,
    *,
    loop: str = "uvloop",
    env: dict[str, str] | None = None,
    rules: int = 2,
    policy_poll: float | None = POLICY_POLL,
) -> AsyncIterator[SidecarProcess]:
    """`spiffe-sidecar run -c config` until ready; killed on exit if still running. The policy file is
    checked every `policy_poll` s (None: the production interval)."""
    env = {**poll_env(policy_poll), **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPT), "run", "-c", str(config), "--loop", loop,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=clean_env(env), cwd=config.parent,
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stderr is not None
    reader = asyncio.create_task(collect_lines(proc.stderr, lines))
    try:
        ready = await wait_for_line(lines, r"ready: inbound 127\.0\.0\.1:\d+", proc)
        admin = await wait_for_line(lines, r"admin listening on 127\.0\.0\.1:\d+", proc)
        inbound_port = int(re.search(r"ready: inbound 127\.0\.0\.1:(\d+)", ready).group(1))  # type: ignore[union-attr]
        admin_port = int(re.search(r"admin listening on 127\.0\.0\.1:(\d+)", admin).group(1))  # type: ignore[union-attr]
        assert INVENTORY in ready and f"{rules} rules" in ready
        yield SidecarProcess(proc, inbound_port, admin_port, lines, config.parent)
    finally:
        await stop_process(proc)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """Cleanup: kill a process the test left running. Tests that care how it ends (SIGTERM, exit 0) assert
    that before this runs; a wait that times out here after SIGKILL must not hide the test's own result."""
    if proc.returncode is None:
        proc.kill()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            await proc.wait()


async def curl_as(sc: SidecarProcess, who: str, path: str, method: str = "GET") -> tuple[int, str]:
    """curl as `who` (checkout|reporting) to the sidecar; returns (HTTP status or 0 on failure, body)."""
    d = sc.dir
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "20", "-X", method,
        "--resolve", f"localhost:{sc.inbound_port}:127.0.0.1",
        "--cacert", str(d / "ca.crt"), "--cert", str(d / f"{who}.crt"), "--key", str(d / f"{who}.key"),
        "-w", "\n%{http_code}", f"https://localhost:{sc.inbound_port}{path}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    body, _, code = out.decode().rpartition("\n")
    return int(code or 0), body + err.decode()


async def admin_get(sc: SidecarProcess, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(sc.admin + path) as resp,
    ):
        return resp.status, await resp.text()


async def metric(sc: SidecarProcess, name: str) -> float:
    _, body = await admin_get(sc, "/metrics")
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def wait_metric(sc: SidecarProcess, name: str, value: float, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while await metric(sc, name) < value:
            await asyncio.sleep(0.2)


def count_lines(sc: SidecarProcess, needle: str) -> int:
    return sum(needle in line for line in sc.lines)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------------------------------------------------
# Clients and traffic


@dataclass
class Result:
    status: int  # 0 when no HTTP response arrived
    error: str = ""
    server_leaf: x509.Certificate | None = None

    @property
    def refused(self) -> bool:
        """No response because the sidecar refused or closed the connection, not because nothing happened
        before the client's deadline (a hung connection is not a refusal)."""
        return self.status == 0 and not self.error.startswith("TimeoutError")


def client_context(cert: Path, key: Path, bundle_pem: bytes, *, verify: bool = True) -> ssl.SSLContext:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False  # SPIFFE: the server is identified by its URI SAN, not a DNS name
    if verify:
        c.load_verify_locations(cadata=bundle_pem.decode())
    else:
        c.verify_mode = ssl.CERT_NONE
    c.load_cert_chain(str(cert), str(key))
    return c


def pem_client(sc: SidecarProcess, who: str = "checkout") -> ssl.SSLContext:
    return client_context(sc.dir / f"{who}.crt", sc.dir / f"{who}.key", (sc.dir / "ca.crt").read_bytes())


async def one_request(port: int, ctx: ssl.SSLContext, path: str, *, timeout: float = 20.0) -> Result:
    """One request on a fresh TLS connection (a new handshake); `Connection: close`, read until the close.

    Never raises for what the server does: no response is status 0 with the error, and a connection still
    open after `timeout` is status 0 with a `TimeoutError: ...` error (`Result.refused` tells the two
    apart; callers expecting a status fail on either)."""
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
    except TimeoutError:
        return Result(0, f"TimeoutError: no close within {timeout}s")
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
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
                except (aiohttp.ClientError, TimeoutError) as exc:  # recorded as a failure, never dropped
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


# ---------------------------------------------------------------------------------------------------------
# A controllable app: normal, slow, closes before answering, closes mid-response


@dataclass
class FaultyApp:
    """Raw HTTP/1.1 app: `/slow...` never answers (returns when the sidecar gives up, at most 5 s),
    `/close...` closes without a response, `/cut...` closes mid-body; anything else gets `ok <path>`."""

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
                    # Slower than upstream_response: the timeout here is the expected outcome (the app's
                    # side of a 504), and it returns early when the sidecar gives up and closes.
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


# ---------------------------------------------------------------------------------------------------------
# The embedded SPIRE as the Workload API, behind an agent socket that can go away


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
    tmp: Path, app_port: int, svid_ttl: str, *, policy_poll: float | None = POLICY_POLL
) -> AsyncIterator[tuple[EmbeddedSpire, AgentRelay, SidecarProcess]]:
    cfg = parse_config(spire_entries(svid_ttl), "entries.yaml", socket_dir=str(tmp / "spire"))
    spire = EmbeddedSpire(cfg)
    await spire.start()
    relay = AgentRelay(tmp / "agent.sock", spire.socket_path_for(INVENTORY))
    await relay.start()
    try:
        env = {"SPIFFE_ENDPOINT_SOCKET": f"unix://{relay.listen}"}
        async with running_sidecar(wl_config(tmp, app_port), env=env, policy_poll=policy_poll) as sc:
            yield spire, relay, sc
    finally:
        await relay.stop()
        await spire.stop()


async def wait_until(cond: Callable[[], Any], timeout: float = WAIT) -> None:
    """`until` at the pace of a subprocess: conditions here often ask the admin endpoint."""
    await until(cond, timeout=timeout, interval=0.1)

