"""The probe port (Kubernetes mode): a plain-HTTP listener for the kubelet, on every interface.

The kubelet probes from the node to the pod IP, but the app listens on 127.0.0.1 and the admin server
(/config, /metrics) must never leave the pod. The injector therefore points every httpGet probe of the app
at this port (same path) and lists the original (port, path, scheme) in SPIFFE_SIDECAR_PROBES. This
listener must never become a side door into the app, so it answers exactly:

* `GET|HEAD /spiffe-sidecar/healthz`: 200 while the process is alive;
* `GET|HEAD /spiffe-sidecar/readyz`: the same answer as the admin /readyz;
* `GET|HEAD <route.path>` for each configured route: a fresh GET (or HEAD) to 127.0.0.1:<port><appPath>.
  What is sent is the route's fixed `appPath` (never the caller's target or query), no request body, no
  Upgrade/Connection/XFCC/X-Forwarded-* headers and no header whose name contains `_` (CGI/WSGI servers
  read `X_Forwarded_Client_Cert` as `X-Forwarded-Client-Cert`); an HTTPS app's certificate is not
  verified (the kubelet does not either). Other headers are relayed: the kubelet sends few of its own
  (Host, User-Agent, Accept, Connection), but a probe's `httpHeaders` (often an Authorization or a
  tenant header the health endpoint needs) reach this port unchanged and must reach the app.
  The status is relayed (1xx becomes 502) with at most 64 KiB of body and only Content-Type;
  `Location` is dropped so the kubelet never follows a redirect into another path of this port.

Everything else is 404 (other methods too: the port reveals nothing about what exists). The request
target is normalised exactly as on the inbound listener (`policy.normalize_target`: dot segments, `//`,
percent-decoding of unreserved bytes; ambiguous encodings are refused) and then compared for equality,
so `/healthz/../admin` is `/admin` (404) and `%2e%2e` is `..`. The query is ignored for matching unless
two routes differ only by their query.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import web
from yarl import URL

from . import httpsite
from .annotations import ProbeRoute
from .config import HostPort
from .http1 import BadRequest
from .metrics import Metrics
from .policy import normalize_target

__all__ = ["HEALTHZ_PATH", "READYZ_PATH", "ProbeServer", "ProbeTable", "SidecarRoute"]

log = logging.getLogger("spiffe_sidecar.probes")

# The same strings as sidecar/inject.py (which imports annotations, not us); kept in sync by a test.
HEALTHZ_PATH: Final = "/spiffe-sidecar/healthz"
READYZ_PATH: Final = "/spiffe-sidecar/readyz"
_METHODS: Final = frozenset({"GET", "HEAD"})
MAX_BODY: Final = 64 * 1024  # the kubelet reads 10 KiB of a probe response; the rest is never needed
UPSTREAM_TIMEOUT: Final = 10.0  # the kubelet's own timeoutSeconds is shorter; this bounds our task
# Request headers never passed to the app: hop-by-hop (RFC 9110 §7.6.1), framing (no body is sent),
# Host (the client sets 127.0.0.1:<port>), and identity headers the app may trust from the sidecar.
_DROP_HEADERS: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-type",
        "expect",
        "host",
        "accept-encoding",  # the body is relayed decoded, without Content-Encoding
        "x-forwarded-client-cert",
        "forwarded",
        "x-real-ip",
    }
)


def _relayed(name: str) -> bool:
    """Whether a caller's request header reaches the app (see the module docstring)."""
    lname = name.lower()
    return not ("_" in lname or lname in _DROP_HEADERS or lname.startswith("x-forwarded-"))


@dataclass(frozen=True, slots=True)
class SidecarRoute:
    """One of the sidecar's own probe paths (`healthz` or `readyz`)."""

    name: str


class ProbeTable:
    """Exact-match lookup of normalised request targets (pure)."""

    def __init__(self, routes: Iterable[ProbeRoute]) -> None:
        self._exact: dict[bytes, ProbeRoute | SidecarRoute] = {}
        self._by_path: dict[str, list[ProbeRoute | SidecarRoute]] = {}
        own = [(HEALTHZ_PATH, SidecarRoute("healthz")), (READYZ_PATH, SidecarRoute("readyz"))]
        entries: list[tuple[str, ProbeRoute | SidecarRoute]] = [*own]
        for r in routes:
            entries.append((r.path, r))
        for path, route in entries:
            try:
                target = normalize_target(path.encode("ascii"))
            except (BadRequest, UnicodeEncodeError) as exc:
                raise ValueError(f"probe route {path!r} is not a clean request target: {exc}") from None
            if target.forward in self._exact:
                continue  # the sidecar's own paths win; the injector never emits duplicates
            self._exact[target.forward] = route
            self._by_path.setdefault(target.path, []).append(route)

    def match(self, raw_target: str) -> ProbeRoute | SidecarRoute | None:
        """The route for a raw request target, or None (then 404)."""
        try:
            target = normalize_target(raw_target.encode("ascii"))
        except (BadRequest, UnicodeEncodeError):
            return None
        hit = self._exact.get(target.forward)
        if hit is not None:
            return hit
        candidates = self._by_path.get(target.path)
        if candidates is not None and len(candidates) == 1:
            return candidates[0]  # query ignored for matching
        return None


class _QuietLogger(logging.LoggerAdapter[logging.Logger]):
    """aiohttp logs every unparsable request with `logger.exception`; anyone can send those."""

    def exception(self, msg: object, *args: object, exc_info: object = True, **kwargs: object) -> None:
        del exc_info, args, kwargs
        self.debug("bad request on the probe port: %s", msg)


def _route_label(route: ProbeRoute | SidecarRoute | None) -> str:
    if route is None:
        return "not-found"
    if isinstance(route, SidecarRoute):
        return f"sidecar-{route.name}"
    return route.path


class ProbeServer:
    """Serves the probe port; `ready_reason()` is the admin server's readiness (None when ready)."""

    def __init__(
        self,
        listen: HostPort,
        routes: Iterable[ProbeRoute],
        *,
        ready_reason: Callable[[], str | None],
        metrics: Metrics,
        upstream_timeout: float = UPSTREAM_TIMEOUT,
    ) -> None:
        self._listen = listen
        self._table = ProbeTable(routes)
        self._ready_reason = ready_reason
        self._metrics = metrics
        self._timeout = upstream_timeout
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port: int | None = None

    @property
    def port(self) -> int | None:
        return self._port

    async def start(self) -> int:
        # ssl=False: an HTTPS probe target is not verified, exactly like the kubelet's own probe.
        connector = aiohttp.TCPConnector(ssl=False, limit=16, force_close=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        # Malformed requests from the network are the caller's problem: log them at DEBUG, without tracebacks.
        server = web.Server(self._handle, logger=_QuietLogger(log))
        runner = web.ServerRunner(server, access_log=None, handle_signals=False)
        try:
            self._port = await httpsite.bind(runner, self._listen, "probe", log)
        except OSError:
            await self._session.close()
            self._session = None
            raise
        self._runner = runner
        return self._port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        route = self._table.match(request.raw_path) if request.method in _METHODS else None
        if route is None:
            response, result = web.Response(status=404, text="not found\n"), "4xx"
        elif isinstance(route, SidecarRoute):
            response = self._own(route)
            result = f"{response.status // 100}xx"
        else:
            response, result = await self._forward(request, route)
        if request.body_exists:
            response.force_close()  # never read (or forward) a body; don't reuse a connection that has one
        self._metrics.probe_requests.labels(route=_route_label(route), result=result).inc()
        return response

    def _own(self, route: SidecarRoute) -> web.Response:
        if route.name == "healthz":
            return web.Response(text="ok\n")
        reason = self._ready_reason()
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def _forward(self, request: web.BaseRequest, route: ProbeRoute) -> tuple[web.Response, str]:
        session = self._session
        if session is None:
            return web.Response(status=503, text="stopping\n"), "upstream-error"
        scheme = "https" if route.scheme == "HTTPS" else "http"
        url = f"{scheme}://127.0.0.1:{route.app_port}{route.app_path}"
        headers = [(k, v) for k, v in request.headers.items() if _relayed(k)]
        try:
            async with asyncio.timeout(self._timeout):
                async with session.request(
                    request.method,
                    URL(url, encoded=True),  # appPath verbatim, as the kubelet would have sent it
                    headers=headers,
                    allow_redirects=False,
                    data=None,
                ) as resp:
                    body = b"" if request.method == "HEAD" else await resp.content.read(MAX_BODY)
                    status = resp.status
                    content_type = resp.headers.get("Content-Type")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.info("probe %s -> %s failed: %s", route.path, url, type(exc).__name__)
            return web.Response(status=503, text="probe target did not answer\n"), "upstream-error"
        if status < 200:
            return web.Response(status=502, text="unexpected informational response\n"), "upstream-error"
        response = web.Response(status=status, body=body)
        if content_type is not None:
            response.headers["Content-Type"] = content_type
        return response, f"{status // 100}xx"
