"""Prometheus metrics of one sidecar process, in their own registry (injected, never global).

The per-request series are `HotCounter`/`HotHistogram`: the same exposition as prometheus_client's
Counter/Histogram (names, labels, `_total`/`_bucket`/`_count`/`_sum` samples, cumulative float buckets),
but a child is a few plain numbers updated with one or two operations and no lock. The stock classes take
a lock per value and check observability on every call (about 0.4 us per inc and 0.9 us per observe
here). They live on the event loop thread; a scrape from the same loop reads them consistently.
`_created` series are switched off for the whole process (`disable_created_metrics`): each would double
the series count for a timestamp nobody graphs, and Prometheus 2.x ingests them as series of their own.

Per-request API for the data plane (one call per finished exchange, about 0.3 us):

    rec = metrics.recorder("inbound")          # once per listener; rec.latency is the listener's histogram
    rec.record(caller, verdict, rule, mode, method, status)
    rec.latency.observe(seconds)

- `caller`: the peer's SPIFFE ID as a str (compute it once per connection); "-" when there is none
  (outbound: the app). Above `max_callers` distinct callers the rest share the label `other`.
- `verdict`: "allow" | "deny" | "would-deny" (`Decision.verdict`); `rule` and `mode` as in the Decision.
- `method`: the request method as sent ("-" for a TCP-mode connection): counted as GET, HEAD, POST, PUT,
  DELETE, PATCH, OPTIONS or `other`.
- `status`: the status sent to the caller (0 when none was sent): counted as 1xx..5xx, or `none`.

`record` feeds `spiffe_sidecar_caller_requests_total{listener,caller,method,status_class,decision,rule}`,
the `callers()` rows behind the admin `/callers` endpoint (counts and last seen per caller), and the
older `spiffe_sidecar_requests_total{listener,decision,rule,mode}`, which is summed from them at scrape
time. A data plane that calls `record` must therefore no longer call `requests.labels(...).inc()` (that
API stays for the current data plane and is added to the same sum).
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

import prometheus_client.metrics as _pm
from prometheus_client import CollectorRegistry, Counter, Gauge, Info, ProcessCollector, disable_created_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

__all__ = [
    "DEFAULT_MAX_CALLERS",
    "METHOD_CLASSES",
    "OTHER",
    "CallerRequests",
    "CallerRow",
    "HotCounter",
    "HotHistogram",
    "Metrics",
    "RequestRecorder",
    "method_class",
    "status_class",
]

DEFAULT_MAX_CALLERS: Final = 50
OTHER: Final = "other"
METHOD_CLASSES: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# Bound on the raw-key cache of a recorder (methods and statuses are caller-chosen): cleared when full.
_HOT_KEYS_MAX: Final = 4096

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


def method_class(method: str) -> str:
    """The method label: one of METHOD_CLASSES, else `other` (methods are caller-chosen tokens)."""
    return method if method in METHOD_CLASSES else OTHER


def status_class(status: int) -> str:
    """The status label: `1xx`..`5xx`, or `none` when no valid status was sent."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


class _Slot:
    """The count and the last time (Unix seconds) of one label set of CallerRequests."""

    __slots__ = ("last", "value")

    def __init__(self) -> None:
        self.value = 0
        self.last = 0.0


@dataclass(frozen=True, slots=True)
class CallerRow:
    """One series of spiffe_sidecar_caller_requests_total with its last-seen time (for /callers)."""

    listener: str
    caller: str
    method: str
    status_class: str
    decision: str
    rule: str
    mode: str
    requests: int
    last_seen: float


# Internal key of a CallerRequests slot: the exposed labels plus `mode` (the legacy family needs it).
_Key = tuple[str, str, str, str, str, str, str]


class CallerRequests:
    """`spiffe_sidecar_caller_requests_total`: requests by listener, caller (bounded), method class, status
    class, decision and rule. Fed through `RequestRecorder.record`; a custom collector because label
    children are precomputed per raw key (see RequestRecorder) and several raw keys share one slot."""

    name = "spiffe_sidecar_caller_requests"
    documentation = (
        "Requests (TCP mode: connections) by caller SPIFFE ID (bounded: beyond max_callers distinct callers "
        "the rest count as 'other'), method class, response status class, decision and rule."
    )
    labelnames = ("listener", "caller", "method", "status_class", "decision", "rule")

    def __init__(self, registry: CollectorRegistry, max_callers: int = DEFAULT_MAX_CALLERS) -> None:
        self.max_callers = max_callers
        self._caller_labels: dict[str, str] = {}
        self.slots: dict[_Key, _Slot] = {}
        registry.register(self)

    def caller_label(self, caller: str) -> str:
        label = self._caller_labels.get(caller)
        if label is None:
            label = caller if len(self._caller_labels) < self.max_callers else OTHER
            if label != OTHER:
                self._caller_labels[caller] = label
        return label

    def slot(self, key: _Key) -> _Slot:
        s = self.slots.get(key)
        if s is None:
            s = self.slots[key] = _Slot()
        return s

    def rows(self) -> list[CallerRow]:
        """Every series with its count and last-seen time (the admin /callers endpoint)."""
        return [CallerRow(*key, s.value, s.last) for key, s in list(self.slots.items()) if s.value]

    def describe(self) -> Iterable[Metric]:
        return [Metric(self.name, self.documentation, "counter")]

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self.name, self.documentation, "counter")
        sums: dict[tuple[str, ...], int] = {}
        for key, s in list(self.slots.items()):
            exposed = key[:6]  # mode is not a label here (the decision says would-deny)
            sums[exposed] = sums.get(exposed, 0) + s.value
        for labels, value in sums.items():
            metric.add_sample(self.name + "_total", dict(zip(self.labelnames, labels, strict=True)), float(value))
        return [metric]


class RequestRecorder:
    """The per-request entry point of one listener (module docstring). `record` looks up a slot by the raw
    values and bumps it; the label work (caller bound, method and status class) runs once per new raw key."""

    __slots__ = ("_clock", "_family", "_hot", "latency", "listener")

    def __init__(
        self, family: CallerRequests, listener: str, latency: HistogramChild, clock: Callable[[], float]
    ) -> None:
        self._family = family
        self.listener = listener
        self.latency = latency
        self._clock = clock
        self._hot: dict[tuple[str, str, str, str, str, int], _Slot] = {}

    def record(self, caller: str, verdict: str, rule: str, mode: str, method: str, status: int) -> None:
        """Count one finished request (or TCP connection); see the module docstring for the arguments."""
        key = (caller, verdict, rule, mode, method, status)
        slot = self._hot.get(key)
        if slot is None:
            slot = self._miss(key)
        slot.value += 1
        slot.last = self._clock()

    def _miss(self, key: tuple[str, str, str, str, str, int]) -> _Slot:
        caller, verdict, rule, mode, method, status = key
        fam = self._family
        slot = fam.slot(
            (self.listener, fam.caller_label(caller), method_class(method), status_class(status), verdict, rule, mode)
        )
        if len(self._hot) >= _HOT_KEYS_MAX:
            self._hot.clear()
        self._hot[key] = slot
        return slot


class _RequestsFamily(HotCounter):
    """`spiffe_sidecar_requests_total{listener,decision,rule,mode}`: its own children (the legacy
    `labels().inc()` API) plus CallerRequests summed over caller, method and status at scrape time."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry,
                 detail: CallerRequests) -> None:  # fmt: skip
        self._detail = detail
        super().__init__(name, documentation, labelnames, registry)

    def collect(self) -> Iterable[Metric]:
        sums: dict[tuple[str, ...], float] = {key: child.value for key, child in list(self._children.items())}
        for key, s in list(self._detail.slots.items()):
            if s.value:
                listener, _caller, _method, _status, verdict, rule, mode = key
                k = (listener, verdict, rule, mode)  # labelnames order
                sums[k] = sums.get(k, 0.0) + s.value
        metric = Metric(self._name, self._documentation, self._type)
        for labels, value in sums.items():
            metric.add_sample(self._name + "_total", dict(zip(self._labelnames, labels, strict=True)), value)
        return [metric]


def _version() -> str:
    try:
        return importlib.metadata.version("spiffe-sidecar")
    except importlib.metadata.PackageNotFoundError:  # a source tree without install
        return "0.0.0+unknown"


class Metrics:
    """All series the sidecar exports. Label values are bounded sets (rule names, reason codes, callers up
    to `max_callers`). `process=True` adds the process_* series (CPU, memory, fds, start time; Linux)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_callers: int = DEFAULT_MAX_CALLERS,
        process: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide (module docstring)
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._clock = clock
        if process:
            ProcessCollector(registry=r)
        self.build_info = Info("spiffe_sidecar_build", "The running spiffe-sidecar's version.", registry=r)
        self.build_info.info({"version": _version(), "python": platform.python_version()})
        # Per request: the hot classes (module docstring).
        self.caller_requests = CallerRequests(r, max_callers)
        self.requests = _RequestsFamily(
            "spiffe_sidecar_requests",
            "Authorization decisions (TCP mode: per connection), by listener, decision, rule and mode.",
            ["listener", "decision", "rule", "mode"],
            r,
            self.caller_requests,
        )
        self.request_latency = HotHistogram(
            "spiffe_sidecar_request_duration_seconds",
            "Time from request head to the end of the response, per listener.",
            ["listener"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # HTTP/2 (sidecar/h2conn.py): streams by protocol (HTTP/1 requests are the rest of requests_total), and
        # the HTTP/2 defences that fired (refused and early-reset streams, connections closed by the engine).
        self.http2_streams = Counter(
            "spiffe_sidecar_http2_streams",
            "HTTP/2 streams decided, by listener, protocol (h2 or grpc) and decision; HTTP/1 requests are the rest "
            "of spiffe_sidecar_requests_total.",
            ["listener", "protocol", "decision"],
            registry=r,
        )
        self.http2_events = Counter(
            "spiffe_sidecar_http2_events",
            "HTTP/2 defences that fired, by event: refused_stream (past the new streams per read), early_reset "
            "(reset before it was started: never decided), rapid_reset, flood (CONTINUATION, header list size or "
            "count) and protocol (connections closed by the HTTP/2 engine).",
            ["listener", "event"],
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
        self.svid_lifetime = Gauge(
            "spiffe_sidecar_svid_lifetime_seconds",
            "Validity period (notAfter - notBefore) of the current default X.509-SVID; renewal is due at half.",
            registry=r,
        )
        self.ready = Gauge("spiffe_sidecar_ready", "1 while /readyz answers 200, else 0.", registry=r)
        self.source_connected = Gauge(
            "spiffe_sidecar_svid_source_up",
            "1 while the SVID source works (Workload API stream open, or PEM files read), else 0.",
            registry=r,
        )
        self.source_errors = Counter(
            "spiffe_sidecar_svid_source_errors",
            "SVID source failures (Workload API stream errors, rejected updates), by kind.",
            ["kind"],
            registry=r,
        )
        self.rotations = Counter(
            "spiffe_sidecar_svid_rotations", "New X.509 contexts (SVID or bundle updates) applied.", registry=r
        )
        # JWT-SVIDs (sidecar/jwtsource.py): the bundles tokens are validated against, and the app's tokens.
        self.jwt_bundles_generation = Gauge(
            "spiffe_sidecar_jwt_bundles_generation",
            "Generation of the JWT bundles in use (grows on every change); 0 until the first arrive.",
            registry=r,
        )
        self.jwt_bundles_updated = Gauge(
            "spiffe_sidecar_jwt_bundles_updated_timestamp_seconds",
            "When the JWT bundles in use last changed (their age is time() minus this).",
            registry=r,
        )
        self.jwt_svid_fetch_errors = Counter(
            "spiffe_sidecar_jwt_svid_fetch_errors",
            "Failed FetchJWTSVID calls for outbound calls (first fetches and background renewals).",
            registry=r,
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

    def recorder(self, listener: str) -> RequestRecorder:
        """The per-request entry point for one listener (module docstring); call once per listener."""
        return RequestRecorder(
            self.caller_requests, listener, self.request_latency.labels(listener=listener), self._clock
        )

    def callers(self) -> list[CallerRow]:
        """Every caller series with its count and last-seen time (admin /callers)."""
        return self.caller_requests.rows()
