"""The admin server (loopback by default): /healthz, /readyz, /metrics, /config, /callers. Read-only.

`MetricsServer` is the second, scrapeable listener (on the pod IP, like Linkerd's 4191 or Istio's
15020): it serves GET /metrics and nothing else, so Prometheus can scrape a pod without the admin
endpoints (/config, /callers) ever leaving it.

/readyz is what the injected startupProbe/readinessProbe use: ready means an unexpired X.509-SVID is held
AND the listeners are bound, so traffic is only sent to a sidecar that can complete an mTLS handshake.
/config shows the effective settings and the compiled policy; it is built from settings and policy
descriptions only, never from key material (X509Svid keeps its key out of repr and out of these views).

Both listeners are `control.ControlServer`s: GET and HEAD only, 404 for any other path, 405 (`Allow:
GET,HEAD`) for another method on a known one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import HostPort, Settings, describe_settings
from .control import DEFAULT_LIMITS, JSON, ControlServer, Limits, Response, route_table
from .metrics import Metrics
from .policy import Policy
from .svid import X509Context

__all__ = ["AdminServer", "MetricsServer", "callers_view", "config_view", "readiness"]

log = logging.getLogger("spiffe_sidecar.admin")


def readiness(svid_expires_at: datetime | None, listeners_bound: bool, now: datetime) -> str | None:
    """None when ready, else a short reason (pure; the /readyz body)."""
    if svid_expires_at is None:
        return "no X.509-SVID yet"
    if svid_expires_at <= now:
        return f"X.509-SVID expired at {svid_expires_at.isoformat()}"
    if not listeners_bound:
        return "listeners not bound"
    return None


def config_view(settings: Settings, policy: Policy | None, context: X509Context | None) -> dict[str, Any]:
    """What /config serves: effective settings, the compiled policy, and the public facts of the current
    identity (SPIFFE IDs, expiry, leaf hash, trust domains). Built field by field: no key material."""
    view = describe_settings(settings)
    view["policy"] = None if policy is None else policy.to_dict()
    if context is None:
        view["identity"] = None
    else:
        view["identity"] = {
            "svids": [
                {
                    "spiffe_id": str(svid.spiffe_id),
                    "hint": svid.hint,
                    "expires_at": svid.expires_at.isoformat(),
                    "leaf_sha256": svid.leaf_sha256_hex,
                }
                for svid in context.svids
            ],
            "trust_domains": sorted(td.name for td in context.bundles),
        }
    return view


def callers_view(metrics: Metrics) -> dict[str, Any]:
    """What /callers serves: every caller series with its count and last-seen time (Unix seconds); the
    `spiffe-sidecar callers` command aggregates it (sidecar/callers.py)."""
    return {
        "max_callers": metrics.caller_requests.max_callers,
        "rows": [
            {
                "listener": r.listener,
                "caller": r.caller,
                "method": r.method,
                "status_class": r.status_class,
                "decision": r.decision,
                "rule": r.rule,
                "mode": r.mode,
                "requests": r.requests,
                "last_seen": r.last_seen,
            }
            for r in metrics.callers()
        ],
    }


def _exposition(metrics: Metrics, svid_expiry: datetime | None, ready: bool) -> Response:
    # Gauges read at scrape time: set just before rendering.
    if svid_expiry is not None:
        metrics.svid_expiry.set(svid_expiry.timestamp())
    metrics.ready.set(1 if ready else 0)
    body = generate_latest(metrics.registry)
    # The text format (not OpenMetrics) for every client: the same bytes promtool lints and Prometheus scrapes.
    return Response(200, body, CONTENT_TYPE_LATEST)


class MetricsServer:
    """GET /metrics only (every other path 404, every other method 405), for Prometheus on the pod IP.
    `svid_expiry()` and `ready()` are read at scrape time, as the admin server does."""

    def __init__(
        self,
        listen: HostPort,
        *,
        metrics: Metrics,
        svid_expiry: Callable[[], datetime | None],
        ready: Callable[[], bool],
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._metrics = metrics
        self._svid_expiry = svid_expiry
        self._ready = ready
        self._server = ControlServer(listen, "metrics", route_table({"/metrics": self._scrape}), log=log, limits=limits)

    @property
    def port(self) -> int | None:
        return self._server.port

    async def start(self) -> int:
        return await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    def _scrape(self) -> Response:
        return _exposition(self._metrics, self._svid_expiry(), self._ready())


class AdminServer:
    """Serves the admin endpoints on `listen`. State is read through injected callables at request time.

    - `svid_expiry()`: expiry of the current default SVID, or None when none is held.
    - `listeners_bound()`: True once every data-plane listener is bound (False again while draining).
    - `config_view()`: a JSON-serialisable description of the effective config and compiled policy.
    - `hold()`: an extra reason to stay not-ready (the strict bypass check), or None.
    """

    def __init__(
        self,
        listen: HostPort,
        *,
        metrics: Metrics,
        svid_expiry: Callable[[], datetime | None],
        listeners_bound: Callable[[], bool],
        config_view: Callable[[], Mapping[str, Any]],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        hold: Callable[[], str | None] = lambda: None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._metrics = metrics
        self._svid_expiry = svid_expiry
        self._listeners_bound = listeners_bound
        self._config_view = config_view
        self._clock = clock
        self._hold = hold
        routes = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics_handler,
            "/config": self._config,
            "/callers": self._callers,
        }
        self._server = ControlServer(listen, "admin", route_table(routes), log=log, limits=limits)

    @property
    def port(self) -> int | None:
        """The bound port (useful with listen port 0), or None before start()."""
        return self._server.port

    async def start(self) -> int:
        return await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    def _healthz(self) -> Response:
        return Response.text(200, "ok\n")

    def ready_reason(self) -> str | None:
        """None when ready, else why not; the probe port's /spiffe-sidecar/readyz answers the same."""
        return readiness(self._svid_expiry(), self._listeners_bound(), self._clock()) or self._hold()

    def _readyz(self) -> Response:
        reason = self.ready_reason()
        if reason is None:
            return Response.text(200, "ready\n")
        return Response.text(503, f"not ready: {reason}\n")

    def _metrics_handler(self) -> Response:
        return _exposition(self._metrics, self._svid_expiry(), self.ready_reason() is None)

    def _callers(self) -> Response:
        return Response(200, json.dumps(callers_view(self._metrics)).encode("utf-8"), JSON)

    def _config(self) -> Response:
        body = json.dumps(self._config_view(), indent=2, sort_keys=False, default=str)
        return Response(200, (body + "\n").encode("utf-8"), JSON)
