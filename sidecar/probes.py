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
  `Location` is dropped so the kubelet never follows a redirect into another path of this port. An app
  that cannot be reached, does not answer within `upstream_timeout`, answers malformed or cuts its body
  short gets 503 (the kubelet fails a probe whose body ends early, too).

Everything else is 404 (other methods too: the port reveals nothing about what exists). The request
target is normalised exactly as on the inbound listener (`policy.normalize_target`: dot segments, `//`,
percent-decoding of unreserved bytes; ambiguous encodings are refused) and then compared for equality,
so `/healthz/../admin` is `/admin` (404) and `%2e%2e` is `..`. The query is ignored for matching unless
two routes differ only by their query.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final

from .annotations import ProbeRoute
from .config import HostPort
from .control import (
    DEFAULT_LIMITS,
    ControlServer,
    FetchError,
    Limits,
    Request,
    Response,
    fetch,
    insecure_client_context,
)
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
_MAX_UPSTREAM: Final = 16
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
        "accept-encoding",  # the body is relayed as is and without Content-Encoding: ask for none
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


def _route_label(route: ProbeRoute | SidecarRoute | None) -> str:
    if route is None:
        return "not-found"
    if isinstance(route, SidecarRoute):
        return f"sidecar-{route.name}"
    return route.path


_NOT_FOUND: Final = Response.text(404, "not found\n")


class ProbeServer:
    """Serves the probe port; `ready_reason()` is the admin server's readiness (None when ready).

    A `control.ControlServer` (malformed requests: a fixed 400 and one DEBUG line, no traceback); a
    request with a body is answered and its connection closed, the body never read nor forwarded."""

    def __init__(
        self,
        listen: HostPort,
        routes: Iterable[ProbeRoute],
        *,
        ready_reason: Callable[[], str | None],
        metrics: Metrics,
        upstream_timeout: float = UPSTREAM_TIMEOUT,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._table = ProbeTable(routes)
        self._ready_reason = ready_reason
        self._metrics = metrics
        self._timeout = upstream_timeout
        self._server = ControlServer(listen, "probe", self._handle, log=log, limits=limits)
        # At most this many probes reach the app at once (the kubelet sends a few per period); more wait.
        self._slots = asyncio.Semaphore(_MAX_UPSTREAM)
        self._tls: ssl.SSLContext | None = None  # built at the first HTTPS probe

    @property
    def port(self) -> int | None:
        return self._server.port

    async def start(self) -> int:
        return await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    def _handle(self, request: Request) -> Response | Coroutine[Any, Any, Response]:
        route = self._table.match(request.target) if request.method in _METHODS else None
        if route is None:
            self._count(route, "4xx")
            return _NOT_FOUND
        if isinstance(route, SidecarRoute):
            response = self._own(route)
            self._count(route, f"{response.status // 100}xx")
            return response
        return self._forward(request, route)

    def _count(self, route: ProbeRoute | SidecarRoute | None, result: str) -> None:
        self._metrics.probe_requests.labels(route=_route_label(route), result=result).inc()

    def _own(self, route: SidecarRoute) -> Response:
        if route.name == "healthz":
            return Response.text(200, "ok\n")
        reason = self._ready_reason()
        if reason is None:
            return Response.text(200, "ready\n")
        return Response.text(503, f"not ready: {reason}\n")

    async def _forward(self, request: Request, route: ProbeRoute) -> Response:
        response, result = await self._ask_app(request, route)
        self._count(route, result)
        return response

    async def _ask_app(self, request: Request, route: ProbeRoute) -> tuple[Response, str]:
        tls: ssl.SSLContext | None = None
        if route.scheme == "HTTPS":
            if self._tls is None:
                self._tls = insecure_client_context()
            tls = self._tls
        headers = [(k, v) for k, v in request.headers if _relayed(k)]
        if not any(k.lower() == "accept" for k, _ in headers):
            headers.append(("Accept", "*/*"))  # what the kubelet's own probes send
        where = f"{'https' if tls else 'http'}://127.0.0.1:{route.app_port}{route.app_path}"
        try:
            async with asyncio.timeout(self._timeout):
                async with self._slots:
                    fetched = await fetch(
                        request.method, "127.0.0.1", route.app_port, route.app_path, headers,
                        tls=tls, within=self._timeout, max_body=MAX_BODY,
                    )  # fmt: skip
        except TimeoutError:
            log.info("probe %s -> %s failed: %s", route.path, where, "TimeoutError")
            return Response.text(503, "probe target did not answer\n"), "upstream-error"
        except FetchError as exc:
            log.info("probe %s -> %s failed: %s", route.path, where, exc)
            return Response.text(503, "probe target did not answer\n"), "upstream-error"
        status = fetched.status
        if status < 200:
            return Response.text(502, "unexpected informational response\n"), "upstream-error"
        # Only the status, the body and Content-Type: never Location (module docstring), Set-Cookie, ...
        return Response(status, fetched.body, fetched.content_type), f"{status // 100}xx"
