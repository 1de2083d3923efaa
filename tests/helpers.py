"""Helpers shared by the in-process integration tests (real loopback sockets and TLS): the test PKI of the
running example, the recording app behind the sidecar, outside clients (curl, openssl, raw TLS, aiohttp),
an inbound listener started in this process, and `until` for conditions that become true eventually.

Plain functions and classes; the fixtures built on them are in tests/conftest.py. Test modules import
from here (and from tests/example.py, tests/processes.py, tests/pki.py), never from each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import inspect
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.audit import AuditLog
from sidecar.config import AuditSettings, HostPort, InboundSettings, Limits, ListenerMode, Timeouts
from sidecar.identity import TrustDomain
from sidecar.inbound import InboundServer, PolicyRef
from sidecar.metrics import Metrics
from sidecar.policy import compile_policy
from sidecar.svid import X509Bundle, X509Context, X509Svid
from sidecar.tls import TlsContexts
from tests.example import CHECKOUT, INVENTORY, REPORTING, TD, policy_data
from tests.pki import CA, Leaf

# ---------------------------------------------------------------------------------------------------------
# Waiting


async def until(cond: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll `cond` (a plain or an async callable) until it is true; `TimeoutError` after `timeout` s."""
    async with asyncio.timeout(timeout):
        while True:
            value = cond()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return
            await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------------------------------
# PKI of the running example


@dataclass
class Pki:
    """One trust domain: inventory (`server`, DNS SAN localhost for curl) and checkout under an
    intermediate, reporting straight under the root; `dir` holds the PEM files curl and openssl read."""

    root: CA
    server: Leaf
    checkout: Leaf
    reporting: Leaf
    dir: Path

    @property
    def inventory(self) -> Leaf:
        return self.server

    def context(self, leaf: Leaf | None = None, root: CA | None = None) -> X509Context:
        leaf = leaf or self.server
        root = root or self.root
        svid = X509Svid.from_pem(leaf.chain_pem(), leaf.key_pem())
        bundle = X509Bundle.from_der(TrustDomain.parse(TD), root.bundle_der())
        return X509Context((svid,), {bundle.trust_domain: bundle})

    def files(self, name: str, leaf: Leaf) -> tuple[str, str]:
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert.write_bytes(leaf.chain_pem())
        key.write_bytes(leaf.key_pem())
        key.chmod(0o600)
        return str(cert), str(key)

    @property
    def ca_file(self) -> str:
        p = self.dir / "ca.pem"
        if not p.exists():
            p.write_bytes(self.root.bundle_pem())
        return str(p)

    def client_ssl(self, leaf: Leaf | None) -> ssl.SSLContext:
        c = ssl.create_default_context(cafile=self.ca_file)
        c.check_hostname = False  # the server is identified by its SPIFFE ID, not a DNS name
        if leaf is not None:
            c.load_cert_chain(*self.files(f"c{id(leaf)}", leaf))
        return c


def make_pki(d: Path) -> Pki:
    root = CA.root(TD)
    inter = root.intermediate()
    return Pki(root, inter.leaf(INVENTORY, dns=["localhost"]), inter.leaf(CHECKOUT), root.leaf(REPORTING), d)


# ---------------------------------------------------------------------------------------------------------
# The recording app (the workload behind the sidecar)


@dataclass
class Seen:
    method: str  # "WS" for a WebSocket session
    path: str  # the raw target as the app received it (path and query)
    headers: Any  # CIMultiDictProxy: case-insensitive, repeated fields kept
    body_len: int
    body_sha: str

    @property
    def xfcc(self) -> str:
        return str(self.headers.get("X-Forwarded-Client-Cert", ""))


@dataclass
class App:
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)


async def _record(request: web.Request, app: App) -> Seen:
    h = hashlib.sha256()
    n = 0
    async for chunk in request.content.iter_any():
        h.update(chunk)
        n += len(chunk)
        if request.path == "/api/slow-upload":
            await asyncio.sleep(0.002)
    seen = Seen(request.method, request.raw_path, request.headers.copy(), n, h.hexdigest())
    app.seen.append(seen)
    return seen


def recording_app(state: App) -> web.Application:
    """Every request is recorded in `state.seen` and answered with JSON {method, path, xfcc, len, sha}.

    `.../slow` answers after `?s=` seconds (default 1; `state.slow_started` is set when one arrives),
    `/api/big` sends 10 MiB, `/api/chunked` a chunked body, `/ws` echoes WebSocket text messages."""

    async def any_handler(request: web.Request) -> web.StreamResponse:
        seen = await _record(request, state)
        if request.path.endswith("/slow"):
            state.slow_started.set()
            await asyncio.sleep(float(request.query.get("s", "1")))
        if request.path == "/api/big":
            resp = web.StreamResponse()
            resp.content_length = 10 * 1024 * 1024
            await resp.prepare(request)
            block = b"x" * 65536
            for _ in range(160):
                await resp.write(block)
            return resp
        if request.path == "/api/chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(5):
                await resp.write(b"part%d;" % i)
            await resp.write_eof()
            return resp
        return web.json_response(
            {"method": seen.method, "path": seen.path, "xfcc": seen.headers.get("X-Forwarded-Client-Cert"),
             "len": seen.body_len, "sha": seen.body_sha}
        )  # fmt: skip

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        state.seen.append(Seen("WS", request.raw_path, request.headers.copy(), 0, ""))
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
        return ws

    a = web.Application(client_max_size=64 * 1024 * 1024)
    a.router.add_get("/ws", ws_handler)
    a.router.add_route("*", "/{tail:.*}", any_handler)
    return a


async def serve(app: web.Application, host: str = "127.0.0.1") -> tuple[web.AppRunner, int]:
    """Serve an aiohttp app on an ephemeral port. Cleanup cancels handlers still running after 0.5 s (a
    test's deliberately slow or silent handler must not hold the teardown for its whole sleep)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    return runner, int(runner.addresses[0][1])


async def start_app() -> tuple[App, web.AppRunner]:
    """The recording app on 127.0.0.1; the caller cleans up the runner."""
    state = App()
    runner, state.port = await serve(recording_app(state))
    return state, runner


@contextlib.asynccontextmanager
async def running_app() -> AsyncIterator[App]:
    state, runner = await start_app()
    try:
        yield state
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------------------------
# Outside clients


async def run(*argv: str, stdin: bytes = b"", timeout: float = 20.0) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def curl(pki: Pki, port: int, path: str, leaf: Leaf | None, *extra: str) -> tuple[int, str, str]:
    """curl to https://localhost:port/path with `leaf` as its client certificate (None: none).
    Returns (http status or 0, body, stderr)."""
    argv = ["/usr/bin/curl", "-sS", "--max-time", "10", "--cacert", pki.ca_file,
            "--resolve", f"localhost:{port}:127.0.0.1", "-o", "-", "-w", "\n%{http_code}"]  # fmt: skip
    if leaf is not None:
        cert, key = pki.files(f"curl{id(leaf)}", leaf)
        argv += ["--cert", cert, "--key", key]
    _rc, out, err = await run(*argv, *extra, f"https://localhost:{port}{path}")
    text = out.decode()
    body, _, code = text.rpartition("\n")
    return (int(code) if code.strip().isdigit() else 0), body, err.decode()


class ServerHung(AssertionError):
    """The server neither closed the connection nor stopped sending within the test's deadline."""


async def raw_exchange(pki: Pki, port: int, data: bytes, leaf: Leaf | None = None, *,
                       timeout: float = 5.0) -> bytes:
    """Send raw bytes over a client-authenticated TLS connection; read until the server closes.

    A server that keeps the connection open past `timeout` fails the test (`ServerHung`): every caller
    expects a close (an error response, `Connection: close`, a refused request)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=pki.client_ssl(leaf or pki.checkout))
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
    except TimeoutError:
        raise ServerHung(f"the server did not close within {timeout}s; received {out[:300]!r}") from None
    except (ConnectionError, ssl.SSLError):
        pass  # a reset or an unclean TLS close is a close
    finally:
        writer.close()
    return out


def session(pki: Pki, leaf: Leaf | None = None, limit: int = 1) -> aiohttp.ClientSession:
    """An aiohttp client over mTLS as `leaf` (default checkout), at most `limit` connections."""
    conn = aiohttp.TCPConnector(ssl=pki.client_ssl(leaf or pki.checkout), limit=limit)
    return aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30))


# ---------------------------------------------------------------------------------------------------------
# The inbound listener in this process

# The running example plus what the inbound tests exercise beyond GET /api/stock/* (uploads, WebSocket).
CHECKOUT_TEST_API: dict[str, object] = {
    "name": "checkout-test-api", "action": "allow", "methods": ["GET", "POST", "PUT", "HEAD"],
    "paths": ["/api/**", "/ws"], "callers": [CHECKOUT],
}  # fmt: skip
INBOUND_POLICY = policy_data(CHECKOUT_TEST_API)

DEFAULT_TIMEOUTS = Timeouts(handshake=3, request_head=3, idle=5, upstream_connect=1, upstream_response=5, drain=5)


@dataclass
class Sidecar:
    server: InboundServer
    tls: TlsContexts
    policy: PolicyRef
    metrics: Metrics
    audit_lines: list[dict[str, Any]]
    port: int

    def metric(self, name: str, **labels: str) -> float:
        v = self.metrics.registry.get_sample_value(name, labels)
        return v or 0.0


async def start_sidecar(
    pki: Pki,
    app_port: int,
    *,
    policy: dict[str, Any] = INBOUND_POLICY,
    mode: ListenerMode = ListenerMode.HTTP,
    timeouts: Timeouts | None = None,
    limits: Limits | None = None,
    strip: tuple[str, ...] | None = None,
    jwt_bundles: Any = None,
    forward_jwt: bool = False,
) -> Sidecar:
    """An InboundServer for inventory on 127.0.0.1 (ephemeral port) in front of `app_port`; audit lines
    are kept as dicts. The caller drains it (`sidecar_with` does). `jwt_bundles`: a JwtBundleHolder;
    `forward_jwt`: inbound.forward_jwt."""
    metrics = Metrics()
    lines: list[dict[str, Any]] = []
    audit = AuditLog(AuditSettings(), write=lambda s: lines.append(json.loads(s)), metrics=metrics,
                     rng=lambda: 0.0)  # fmt: skip
    tls = TlsContexts(pki.context())
    ref = PolicyRef(compile_policy(policy, "test-policy"))
    settings = InboundSettings(
        HostPort("127.0.0.1", 0), HostPort("127.0.0.1", app_port), mode=mode, forward_jwt=forward_jwt
    )
    if strip is not None:
        settings = dataclasses.replace(settings, strip_request_headers=strip)
    server = InboundServer(
        settings,
        timeouts=timeouts or DEFAULT_TIMEOUTS,
        limits=limits or Limits(),
        tls=tls,
        policy=ref,
        audit=audit,
        metrics=metrics,
        jwt_bundles=jwt_bundles,
    )
    port = await server.start()
    return Sidecar(server, tls, ref, metrics, lines, port)


@contextlib.asynccontextmanager
async def sidecar_with(pki: Pki, app: App, **kw: Any) -> AsyncIterator[Sidecar]:
    """`start_sidecar` in front of `app`, drained on exit."""
    sc = await start_sidecar(pki, app.port, **kw)
    try:
        yield sc
    finally:
        await sc.server.drain(1.0)


def free_port() -> int:
    """A loopback port nothing listens on now (bound, then closed): a dead app, or a port to reuse."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
