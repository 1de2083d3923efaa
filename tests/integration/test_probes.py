"""The probe port over real loopback sockets: exactly the probe paths reach the app, nothing else does.

The app is an aiohttp server recording every request it receives (method, raw target, headers, body);
the client is a raw socket (so the request target reaches the probe port byte for byte, no client-side
normalisation) and curl for HEAD. Every refused request must get 404 AND leave the app untouched.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from sidecar import inject as inject_module
from sidecar.annotations import ProbeRoute
from sidecar.config import HostPort
from sidecar.metrics import Metrics
from sidecar.probes import HEALTHZ_PATH, READYZ_PATH, ProbeServer, ProbeTable, SidecarRoute
from tests.pki import CA

pytestmark = pytest.mark.timeout(60)


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class App:
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    tls_port: int = 0


@dataclass
class Probe:
    server: ProbeServer
    port: int
    app: App
    metrics: Metrics
    ready: list[str | None]


async def _start_app(tmp: Path) -> tuple[App, list[web.AppRunner]]:
    state = App()

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        state.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        if request.path == "/redirect":
            raise web.HTTPFound("/elsewhere")
        if request.path == "/sick":
            return web.Response(status=500, text="sick\n")
        return web.Response(text=f"app {request.path_qs}\n", headers={"X-App": "yes", "Set-Cookie": "a=b"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state.port = int(runner.addresses[0][1])

    # The same app over HTTPS with a certificate the probe must not verify (like the kubelet).
    leaf = CA.root("probe.test").leaf("spiffe://probe.test/app", dns=["app.internal"])
    (tmp / "app.crt").write_bytes(leaf.chain_pem())
    (tmp / "app.key").write_bytes(leaf.key_pem())
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "app.crt", tmp / "app.key")
    tls_runner = web.AppRunner(app, access_log=None)
    await tls_runner.setup()
    await web.TCPSite(tls_runner, "127.0.0.1", 0, ssl_context=ctx).start()
    state.tls_port = int(tls_runner.addresses[0][1])
    return state, [runner, tls_runner]


@pytest.fixture
async def probe(tmp_path: Path) -> AsyncIterator[Probe]:
    app, runners = await _start_app(tmp_path)
    routes = [
        ProbeRoute("/healthz", app.port, "/healthz"),
        ProbeRoute("/ready", app.port, "/internal/ready?verbose=1"),
        ProbeRoute("/tls-health", app.tls_port, "/healthz", "HTTPS"),
        ProbeRoute("/redirect", app.port, "/redirect"),
        ProbeRoute("/sick", app.port, "/sick"),
        ProbeRoute("/down", 1, "/down"),  # nothing listens on port 1
    ]
    ready: list[str | None] = ["no X.509-SVID yet"]
    metrics = Metrics()
    server = ProbeServer(
        HostPort("127.0.0.1", 0), routes, ready_reason=lambda: ready[0], metrics=metrics, upstream_timeout=5
    )
    port = await server.start()
    try:
        yield Probe(server, port, app, metrics, ready)
    finally:
        await server.stop()
        for r in runners:
            await r.cleanup()


async def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as is on a fresh connection; return (status, headers, body) of the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(15):
            writer.write(request)
            await writer.drain()
            data = await reader.read(1 << 20) if b"Connection: close" in request else b""
            if not data:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                method = request.split(b" ", 1)[0]
                body = b"" if method == b"HEAD" else await reader.readexactly(length)
                data = head + body
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def get(target: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: 10.0.0.7:15021\r\nUser-Agent: kube-probe/1.29\r\n{extra}\r\n".encode()


async def test_sidecar_paths_answer_without_touching_the_app(probe: Probe) -> None:
    assert (await raw(probe.port, get(HEALTHZ_PATH)))[::2] == (200, b"ok\n")
    status, _, body = await raw(probe.port, get(READYZ_PATH))
    assert (status, body) == (503, b"not ready: no X.509-SVID yet\n")
    probe.ready[0] = None
    assert (await raw(probe.port, get(READYZ_PATH + "?full=1")))[::2] == (200, b"ready\n")
    assert probe.app.seen == []
    # The injector's names for these paths are the probe port's.
    assert (inject_module.HEALTHZ_PATH, inject_module.READYZ_PATH) == (HEALTHZ_PATH, READYZ_PATH)


async def test_probe_paths_are_forwarded_to_the_fixed_app_path(probe: Probe) -> None:
    status, headers, body = await raw(probe.port, get("/healthz"))
    assert (status, body) == (200, b"app /healthz\n")
    assert "set-cookie" not in headers and "x-app" not in headers  # only Content-Type is relayed
    assert headers["content-type"].startswith("text/plain")
    # The route's appPath (with its own query) is what the app gets; the caller's query never is.
    status, _, body = await raw(probe.port, get("/ready?cmd=shutdown"))
    assert (status, body) == (200, b"app /internal/ready?verbose=1\n")
    assert [s.target for s in probe.app.seen] == ["/healthz", "/internal/ready?verbose=1"]
    assert probe.app.seen[0].headers["User-Agent"] == "kube-probe/1.29"
    assert probe.app.seen[0].headers["Host"] == f"127.0.0.1:{probe.app.port}"


async def test_https_probe_target_is_not_verified(probe: Probe) -> None:
    status, _, body = await raw(probe.port, get("/tls-health"))
    assert (status, body) == (200, b"app /healthz\n")


async def test_app_status_is_relayed_and_redirects_are_not_followable(probe: Probe) -> None:
    assert (await raw(probe.port, get("/sick")))[0] == 500
    status, headers, _ = await raw(probe.port, get("/redirect"))
    assert status == 302 and "location" not in headers  # the kubelet counts 3xx as success, follows nothing
    assert [s.target for s in probe.app.seen] == ["/sick", "/redirect"]


async def test_app_down_is_503(probe: Probe) -> None:
    status, _, body = await raw(probe.port, get("/down"))
    assert (status, body) == (503, b"probe target did not answer\n")


async def test_head_is_forwarded_as_head(probe: Probe) -> None:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "-I", "-o", "/dev/null", "-w", "%{http_code}",
        f"http://127.0.0.1:{probe.port}/healthz",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert out == b"200", err
    assert [(s.method, s.target) for s in probe.app.seen] == [("HEAD", "/healthz")]


SIDE_DOORS = [
    "/admin",
    "/",
    "/healthz/../admin",
    "/healthz/%2e%2e/admin",
    "/%2e%2e/admin",
    "/healthz/..%2fadmin",
    "/healthz%2f..%2fadmin",
    "/healthz/.%2e/admin",
    "/healthz/..;/admin",
    "//admin",
    "/HEALTHZ",
    "/healthz/",
    "/healthz/x",
    "/healthz%00",
    "/healthz\\..\\admin",
    "/internal/ready",  # the app path itself is not a probe path
    "/spiffe-sidecar/admin",
    "/spiffe-sidecar/readyz/../../admin",
    "http://127.0.0.1/healthz",  # absolute form
    "*",
]


@pytest.mark.parametrize("target", SIDE_DOORS)
async def test_other_paths_are_404_and_never_reach_the_app(probe: Probe, target: str) -> None:
    status, _, _ = await raw(probe.port, get(target, extra="Connection: close\r\n"))
    assert status == (400 if target == "*" else 404)  # `*` is refused by the HTTP parser itself
    assert probe.app.seen == []


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "PROPFIND"])
async def test_other_methods_are_404_and_never_reach_the_app(probe: Probe, method: str) -> None:
    target = "127.0.0.1:1" if method == "CONNECT" else "/healthz"
    body = "Content-Length: 5\r\nConnection: close\r\n\r\nhello"
    status, _, _ = await raw(probe.port, get(target, method=method, extra=body)[:-2])
    assert status == 404
    assert probe.app.seen == []


async def test_dot_segments_that_resolve_to_a_probe_path_get_only_the_probe(probe: Probe) -> None:
    # Normalisation as on the inbound listener: this IS /healthz, and the app gets the fixed app path.
    status, _, _ = await raw(probe.port, get("/admin/../healthz"))
    assert status == 200
    assert [s.target for s in probe.app.seen] == ["/healthz"]


async def test_no_body_no_upgrade_no_identity_headers_are_forwarded(probe: Probe) -> None:
    extra = (
        "Content-Length: 11\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "X-Forwarded-Client-Cert: By=spiffe://x/y;URI=spiffe://evil/admin\r\n\r\nsmuggled!!!"
    )
    status, _, _ = await raw(probe.port, get("/healthz", extra=extra)[:-2])
    assert status == 200  # not 101: the probe port never upgrades
    (seen,) = probe.app.seen
    assert seen.body == b""
    lowered = {k.lower() for k in seen.headers}
    assert not lowered & {"upgrade", "x-forwarded-client-cert", "content-length", "transfer-encoding"}
    assert "upgrade" not in seen.headers.get("Connection", "").lower()


async def test_requests_are_counted(probe: Probe) -> None:
    await raw(probe.port, get("/healthz"))
    await raw(probe.port, get("/admin", extra="Connection: close\r\n"))
    await raw(probe.port, get("/down"))
    sample = probe.metrics.registry.get_sample_value
    assert sample("spiffe_sidecar_probe_requests_total", {"route": "/healthz", "result": "2xx"}) == 1
    assert sample("spiffe_sidecar_probe_requests_total", {"route": "not-found", "result": "4xx"}) == 1
    assert sample("spiffe_sidecar_probe_requests_total", {"route": "/down", "result": "upstream-error"}) == 1


def test_table_query_only_differences_and_own_paths() -> None:
    table = ProbeTable(
        [
            ProbeRoute("/h?a=1", 8080, "/h?a=1"),
            ProbeRoute("/h?a=2", 8081, "/h?a=2"),
            ProbeRoute("/live", 8080, "/live"),
            ProbeRoute(HEALTHZ_PATH, 8080, "/x"),  # a collision with ours: ours wins
        ]
    )
    a1, a2 = table.match("/h?a=1"), table.match("/h?a=2")
    assert isinstance(a1, ProbeRoute) and a1.app_port == 8080
    assert isinstance(a2, ProbeRoute) and a2.app_port == 8081
    assert table.match("/h") is None  # ambiguous without the query
    assert table.match("/h?a=3") is None
    assert isinstance(table.match("/live?x=1"), ProbeRoute)
    assert table.match(HEALTHZ_PATH) == SidecarRoute("healthz")
    with pytest.raises(ValueError, match="not a clean request target"):
        ProbeTable([ProbeRoute("/a/%2f", 1, "/")])


async def test_underscore_and_forwarding_headers_are_not_relayed(probe: Probe) -> None:
    # CGI/WSGI servers read X_Forwarded_Client_Cert as X-Forwarded-Client-Cert; the probe port is
    # unauthenticated, so nothing identity-like may pass. A probe's own httpHeaders (Authorization) do.
    extra = (
        "X_Forwarded_Client_Cert: URI=spiffe://example.org/ns/shop/sa/admin\r\n"
        "X-Forwarded-User: admin\r\nX-Real-IP: 10.0.0.1\r\nX_Custom: 1\r\n"
        "Authorization: Bearer probe-token\r\n"
    )
    status, _, _ = await raw(probe.port, get("/healthz", extra=extra))
    assert status == 200
    (seen,) = probe.app.seen
    lowered = {k.lower() for k in seen.headers}
    assert not [k for k in lowered if "_" in k or k.startswith("x-forwarded") or k == "x-real-ip"]
    assert seen.headers["Authorization"] == "Bearer probe-token"
    assert seen.headers["User-Agent"] == "kube-probe/1.29"
