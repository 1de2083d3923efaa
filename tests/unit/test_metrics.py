"""Hot metrics: the same exposition as prometheus_client's Counter and Histogram for the same events."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from sidecar.metrics import OTHER, HotCounter, HotHistogram, Metrics, method_class, status_class

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LABELS = ["listener", "decision", "rule", "mode"]
_CREATED = re.compile(r"^(\S+_created\{?.*?\}?) \S+$", re.M)


def _same_text(a: bytes, b: bytes) -> None:
    # _created samples are creation timestamps: equal series, different instants.
    left, right = (_CREATED.sub(r"\1 T", x.decode()) for x in (a, b))
    assert left == right


def generate_openmetrics(registry: CollectorRegistry) -> bytes:
    text: bytes = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
    return text


def _pair() -> tuple[CollectorRegistry, CollectorRegistry]:
    return CollectorRegistry(), CollectorRegistry()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["inbound", "in-2"]),
            st.sampled_from(["allow", "deny", "would-deny"]),
            st.sampled_from(["r1", "default-deny", 'we"ird\\rule']),
            st.integers(min_value=0, max_value=3),
        ),
        max_size=40,
    )
)
def test_counter_exposition_matches_prometheus_client(events: list[tuple[str, str, str, int]]) -> None:
    stock_reg, hot_reg = _pair()
    stock = Counter("spiffe_sidecar_requests", "Decisions.", LABELS, registry=stock_reg)
    hot = HotCounter("spiffe_sidecar_requests", "Decisions.", LABELS, registry=hot_reg)
    for listener, decision, rule, amount in events:
        for metric in (stock, hot):
            child = metric.labels(listener=listener, decision=decision, rule=rule, mode="enforce")
            child.inc() if amount == 1 else child.inc(amount)
    _same_text(generate_latest(stock_reg), generate_latest(hot_reg))
    _same_text(generate_openmetrics(stock_reg), generate_openmetrics(hot_reg))
    for listener, decision, rule, _ in events:
        labels = {"listener": listener, "decision": decision, "rule": rule, "mode": "enforce"}
        assert stock_reg.get_sample_value("spiffe_sidecar_requests_total", labels) == hot_reg.get_sample_value(
            "spiffe_sidecar_requests_total", labels
        )


durations = st.one_of(
    st.floats(min_value=0.0, max_value=20.0, allow_nan=False),
    st.sampled_from([*BUCKETS, 0.0, 1e-9, 10.000001, math.inf, -1.0]),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["inbound", "outbound"]), durations), max_size=60))
def test_histogram_exposition_matches_prometheus_client(events: list[tuple[str, float]]) -> None:
    stock_reg, hot_reg = _pair()
    stock = Histogram("spiffe_sidecar_request_duration_seconds", "Latency.", ["listener"], buckets=BUCKETS,
                      registry=stock_reg)  # fmt: skip
    hot = HotHistogram("spiffe_sidecar_request_duration_seconds", "Latency.", ["listener"], buckets=BUCKETS,
                       registry=hot_reg)  # fmt: skip
    for listener, d in events:
        stock.labels(listener=listener).observe(d)
        hot.labels(listener).observe(d)
    _same_text(generate_latest(stock_reg), generate_latest(hot_reg))
    _same_text(generate_openmetrics(stock_reg), generate_openmetrics(hot_reg))


def test_nan_is_summed_but_counted_in_no_bucket_like_the_stock_histogram() -> None:
    stock_reg, hot_reg = _pair()
    stock = Histogram("h", "h", ["l"], buckets=BUCKETS, registry=stock_reg)
    hot = HotHistogram("h", "h", ["l"], buckets=BUCKETS, registry=hot_reg)
    for metric in (stock, hot):
        metric.labels(l="x").observe(0.00001)
        metric.labels(l="x").observe(math.nan)
    _same_text(generate_latest(stock_reg), generate_latest(hot_reg))
    assert hot_reg.get_sample_value("h_count", {"l": "x"}) == 1.0


def test_label_errors_match_prometheus_client() -> None:
    hot = HotCounter("c", "c", ["a", "b"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="Incorrect label names"):
        hot.labels(a="1")
    with pytest.raises(ValueError, match="Incorrect label count"):
        hot.labels("1")
    with pytest.raises(ValueError, match="both"):
        hot.labels("1", b="2")
    with pytest.raises(ValueError, match="non-negative"):
        hot.labels("1", "2").inc(-1)
    assert hot.labels(1, 2) is hot.labels(a="1", b="2")  # values are str()-ed, one child per label tuple


def test_duplicate_names_are_refused_by_the_registry() -> None:
    reg = CollectorRegistry()
    HotCounter("spiffe_sidecar_requests", "x", ["l"], registry=reg)
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("spiffe_sidecar_requests", "x", ["l"], registry=reg)


def test_metrics_bundle_exports_the_hot_series() -> None:
    m = Metrics()
    m.requests.labels(listener="inbound", decision="allow", rule="r", mode="enforce").inc()
    m.request_latency.labels(listener="inbound").observe(0.0003)
    text = generate_latest(m.registry).decode()
    assert 'spiffe_sidecar_requests_total{decision="allow",listener="inbound",mode="enforce",rule="r"} 1.0' in text
    assert 'spiffe_sidecar_request_duration_seconds_bucket{le="0.0005",listener="inbound"} 1.0' in text
    assert "# TYPE spiffe_sidecar_request_duration_seconds histogram" in text


# -- the per-request API (RequestRecorder) ------------------------------------------------------------------


def _samples(m: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in m.registry.collect():
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_record_labels_classes_and_the_legacy_sum() -> None:
    m = Metrics(clock=lambda: 1000.0)
    rec = m.recorder("inbound")
    rec.record("spiffe://a.test/x", "allow", "r1", "enforce", "GET", 200)
    rec.record("spiffe://a.test/x", "allow", "r1", "enforce", "GET", 204)
    rec.record("spiffe://a.test/x", "deny", "default-deny", "enforce", "PROPFIND", 403)
    rec.record("-", "would-deny", "no-admin", "audit", "-", 0)
    m.requests.labels(listener="inbound", decision="allow", rule="r1", mode="enforce").inc()  # legacy API
    detail = _samples(m, "spiffe_sidecar_caller_requests_total")
    key = (("caller", "spiffe://a.test/x"), ("decision", "allow"), ("listener", "inbound"), ("method", "GET"),
           ("rule", "r1"), ("status_class", "2xx"))  # fmt: skip
    assert detail[key] == 2.0
    assert any(dict(k)["method"] == "other" and dict(k)["status_class"] == "4xx" for k in detail)
    assert any(dict(k)["status_class"] == "none" and dict(k)["caller"] == "-" for k in detail)
    legacy = _samples(m, "spiffe_sidecar_requests_total")
    assert legacy[(("decision", "allow"), ("listener", "inbound"), ("mode", "enforce"), ("rule", "r1"))] == 3.0
    assert sum(legacy.values()) == 5.0
    rows = m.callers()
    assert sum(r.requests for r in rows) == 4 and {r.last_seen for r in rows} == {1000.0}


def test_method_and_status_classes() -> None:
    assert [method_class(x) for x in ("GET", "HEAD", "OPTIONS", "get", "BREW", "-")] == [
        "GET", "HEAD", "OPTIONS", "other", "other", "other"]  # fmt: skip
    assert [status_class(x) for x in (100, 200, 302, 404, 503, 599, 0, 600, -1)] == [
        "1xx", "2xx", "3xx", "4xx", "5xx", "5xx", "none", "none", "none"]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=0, max_value=5),
    st.lists(st.tuples(st.integers(0, 12), st.sampled_from(["GET", "POST", "X"]), st.sampled_from([200, 403, 0])),
             max_size=80),
)  # fmt: skip
def test_callers_are_bounded_and_every_request_counted(max_callers: int, events: list[tuple[int, str, int]]) -> None:
    m = Metrics(max_callers=max_callers, process=False)
    rec = m.recorder("inbound")
    for n, method, status in events:
        rec.record(f"spiffe://a.test/c{n}", "allow", "r", "enforce", method, status)
    detail = _samples(m, "spiffe_sidecar_caller_requests_total")
    callers = {dict(k)["caller"] for k in detail}
    assert len(callers - {OTHER}) <= max_callers
    seen: list[str] = []
    for n, _, _ in events:  # the first max_callers distinct callers keep their own label
        if f"spiffe://a.test/c{n}" not in seen:
            seen.append(f"spiffe://a.test/c{n}")
    assert callers - {OTHER} == set(seen[:max_callers])
    assert sum(detail.values()) == len(events) == sum(r.requests for r in m.callers())


def test_recorder_raw_key_cache_is_bounded() -> None:
    m = Metrics(max_callers=1, process=False)
    rec = m.recorder("inbound")
    for i in range(10_000):  # caller-chosen methods: each is a new raw key
        rec.record("spiffe://a.test/x", "deny", "default-deny", "enforce", f"M{i}", 403)
    assert len(rec._hot) <= 4096
    assert sum(_samples(m, "spiffe_sidecar_caller_requests_total").values()) == 10_000


def test_no_created_series_build_info_and_process_metrics() -> None:
    m = Metrics()
    m.recorder("inbound").record("spiffe://a.test/x", "allow", "r", "enforce", "GET", 200)
    m.rotations.inc()
    m.handshake_failures.labels(listener="inbound", reason="bad").inc()
    text = generate_latest(m.registry).decode()
    assert "_created" not in text
    assert re.search(r'^spiffe_sidecar_build_info\{python="[\d.]+",version="[^"]+"\} 1\.0$', text, re.M)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds"):  # fmt: skip
        assert re.search(rf"^{name} \S+$", text, re.M), name
    assert "python_gc" not in text  # only the collectors we chose
