"""Prometheus metrics of one sidecar process, in their own registry (injected, never global).

The two per-request series (`requests`, `request_latency`) are `HotCounter`/`HotHistogram`: the same
exposition as prometheus_client's Counter/Histogram (names, labels, `_total`/`_bucket`/`_count`/`_sum`/
`_created` samples, cumulative float buckets), but a child is a few plain numbers updated with one or two
operations and no lock. The stock classes take a lock per value and check observability on every call
(about 0.4 us per inc and 0.9 us per observe here). They live on the event loop thread; a scrape from
the same loop reads them consistently.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

import prometheus_client.metrics as _pm
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

__all__ = ["HotCounter", "HotHistogram", "Metrics"]

# Request latency buckets in seconds: sub-millisecond resolution for a local proxy.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def _use_created() -> bool:
    # prometheus_client's own switch (PROMETHEUS_DISABLE_CREATED_SERIES), read at scrape time like its classes.
    return bool(getattr(_pm, "_use_created", True))


class CounterChild:
    """One labelled counter series: a float."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class HistogramChild:
    """One labelled histogram series: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("_bounds", "_first", "counts", "created", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self._bounds = bounds
        self._first = bounds[0]
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        # The first bucket whose upper bound is >= amount (prometheus_client scans for `amount <= bound`).
        # bisect_left also gives 0 for NaN, which the stock scan counts in no bucket: check that case.
        i = bisect_left(self._bounds, amount)
        if i or amount <= self._first:
            self.counts[i] += 1


_C = TypeVar("_C", CounterChild, HistogramChild)


class _Labelled(Generic[_C]):
    """Label handling shared by the hot metrics: `labels(**kw)` or `labels(*values)`, values str()-ed,
    one child per label tuple, created on first use (as prometheus_client does)."""

    _type = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        if not labelnames:
            raise ValueError("hot metrics are labelled; use the stock classes for unlabelled series")
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._sorted_names = sorted(self._labelnames)
        self._children: dict[tuple[str, ...], _C] = {}
        registry.register(self)

    def _new_child(self) -> _C:
        raise NotImplementedError

    def labels(self, *values: object, **kw: object) -> _C:
        if values and kw:
            raise ValueError("Can't pass both *args and **kwargs")
        if kw:
            if sorted(kw) != self._sorted_names:
                raise ValueError("Incorrect label names")
            key = tuple(str(kw[n]) for n in self._labelnames)
        else:
            if len(values) != len(self._labelnames):
                raise ValueError("Incorrect label count")
            key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def describe(self) -> Iterable[Metric]:
        return [Metric(self._name, self._documentation, self._type)]

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self._name, self._documentation, self._type)
        created = _use_created()
        names = self._labelnames
        for key, child in list(self._children.items()):
            labels = dict(zip(names, key, strict=True))
            self._add_samples(metric, labels, child)
            if created:
                metric.add_sample(self._name + "_created", labels, child.created)
        return [metric]

    def _add_samples(self, metric: Metric, labels: dict[str, str], child: _C) -> None:
        raise NotImplementedError


class HotCounter(_Labelled[CounterChild]):
    """A labelled counter with prometheus_client.Counter's exposition (`<name>_total`, `<name>_created`)."""

    _type = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _add_samples(self, metric: Metric, labels: dict[str, str], child: CounterChild) -> None:
        metric.add_sample(self._name + "_total", labels, child.value)


class HotHistogram(_Labelled[HistogramChild]):
    """A labelled histogram with prometheus_client.Histogram's exposition and bucket semantics."""

    _type = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if bounds and bounds[-1] != math.inf:
            bounds.append(math.inf)
        if len(bounds) < 2:
            raise ValueError("Must have at least two buckets")
        self._bounds = bounds
        self._le: list[str] = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._bounds)

    def _add_samples(self, metric: Metric, labels: dict[str, str], child: HistogramChild) -> None:
        name = self._name
        acc = 0.0
        for le, n in zip(self._le, list(child.counts), strict=True):
            acc += n
            metric.add_sample(name + "_bucket", {**labels, "le": le}, acc)
        metric.add_sample(name + "_count", labels, acc)
        if self._bounds[0] >= 0:
            metric.add_sample(name + "_sum", labels, child.sum)


class Metrics:
    """All series the sidecar exports. Label values are bounded sets (rule names, reason codes)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Per request: the hot classes (module docstring).
        self.requests = HotCounter(
            "spiffe_sidecar_requests",
            "Authorization decisions on the inbound listener.",
            ["listener", "decision", "rule", "mode"],
            registry=r,
        )
        self.request_latency = HotHistogram(
            "spiffe_sidecar_request_duration_seconds",
            "Time from request head to the end of the response, per listener.",
            ["listener"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.handshake_failures = Counter(
            "spiffe_sidecar_handshake_failures",
            "TLS handshakes or SPIFFE peer checks that failed, by reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.bad_requests = Counter(
            "spiffe_sidecar_bad_requests", "Requests rejected with 4xx before authorization.", ["reason"], registry=r
        )
        self.upstream_errors = Counter(
            "spiffe_sidecar_upstream_errors", "Failures talking to the next hop.", ["listener", "kind"], registry=r
        )
        self.peer_stalls = Counter(
            "spiffe_sidecar_peer_stalls",
            "Exchanges cut off because the peer stopped reading the response (kind=write) or stopped "
            "sending its request body (kind=request_body); see timeouts.write_stall/request_body_stall.",
            ["listener", "kind"],
            registry=r,
        )
        self.open_connections = Gauge(
            "spiffe_sidecar_open_connections", "Open downstream connections.", ["listener"], registry=r
        )
        self.connection_limit_hits = Counter(
            "spiffe_sidecar_connection_limit_hits",
            "Connections refused at the connection limit.",
            ["listener"],
            registry=r,
        )
        self.handshake_limit_hits = Counter(
            "spiffe_sidecar_handshake_limit_hits",
            "Unauthenticated connections dropped (oldest first) because limits.max_pending_handshakes "
            "sockets were still in the TLS handshake.",
            ["listener"],
            registry=r,
        )
        self.svid_expiry = Gauge(
            "spiffe_sidecar_svid_expiry_timestamp_seconds", "Expiry time of the current default X.509-SVID.", registry=r
        )
        self.rotations = Counter(
            "spiffe_sidecar_svid_rotations", "New X.509 contexts (SVID or bundle updates) applied.", registry=r
        )
        self.policy_reloads = Counter(
            "spiffe_sidecar_policy_reloads", "Policy reload attempts, by result.", ["result"], registry=r
        )
        self.audit_dropped = Counter(
            "spiffe_sidecar_audit_lines_dropped", "Deny audit lines dropped by the rate limit.", registry=r
        )
        # Outbound (the app's own calls, mTLS to the target).
        self.outbound_handshakes = Counter(
            "spiffe_sidecar_outbound_handshakes",
            "mTLS handshakes completed to outbound targets (each new pooled connection is one).",
            ["route"],
            registry=r,
        )
        self.outbound_server_id_mismatches = Counter(
            "spiffe_sidecar_outbound_server_id_mismatches",
            "Outbound targets that presented a valid SVID with the wrong SPIFFE ID.",
            ["route"],
            registry=r,
        )
        self.outbound_pool_connections = Gauge(
            "spiffe_sidecar_outbound_pool_connections",
            "Pooled mTLS connections (idle + leased + connecting) per outbound route.",
            ["route"],
            registry=r,
        )
        # Kubernetes mode (sidecar/bypass.py, sidecar/probes.py).
        self.app_port_exposed = Gauge(
            "spiffe_sidecar_app_port_exposed",
            "1 while the app port answers on the pod IP (callers could bypass the sidecar), else 0.",
            registry=r,
        )
        self.probe_requests = Counter(
            "spiffe_sidecar_probe_requests",
            "Requests on the probe port, by route (a configured probe path, sidecar-healthz/readyz, or "
            "not-found) and result (the status class, or upstream-error).",
            ["route", "result"],
            registry=r,
        )
