"""Generate the chart's Grafana dashboard (helm/spiffe-sidecar/files/dashboard.json) with grafana-foundation-sdk.

    .venv/bin/python helm/dashboard.py            # rewrite the JSON
    .venv/bin/python helm/dashboard.py --check    # exit 1 when the committed JSON differs (the tests run this)

The JSON is committed so that the chart needs no Python to install; the test suite regenerates it and
fails when the two differ. Panels use a `datasource` template variable (never `__inputs`/`${DS_...}`,
which only the import UI resolves) and the `namespace`/`pod` labels that a PodMonitor or the
prometheus.io scrape jobs add to every series.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

OUT = Path(__file__).resolve().parent / "spiffe-sidecar" / "files" / "dashboard.json"
UID = "spiffe-sidecar"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'namespace=~"$namespace", pod=~"$pod"'
RATE = "$__rate_interval"

# (title, unit, legend, expr, width): the questions an operator asks, in reading order.
PANELS: list[tuple[str, str, str, str, int]] = [
    ("Requests/s by caller and decision", "reqps", "{{caller}} {{decision}}",
     f"sum by (caller, decision) (rate(spiffe_sidecar_caller_requests_total{{{SEL}}}[{RATE}]))", 12),
    ("Denied and would-deny requests/s by rule", "reqps", "{{rule}} {{decision}}",
     f'sum by (rule, decision) (rate(spiffe_sidecar_requests_total{{{SEL}, decision=~"deny|would-deny"}}[{RATE}]))',
     12),
    ("Request latency (p50, p99)", "s", "{{quantile}}",
     f'label_replace(histogram_quantile(0.5, sum by (le) (rate(spiffe_sidecar_request_duration_seconds_bucket'
     f'{{{SEL}}}[{RATE}]))), "quantile", "p50", "", "") or label_replace(histogram_quantile(0.99, sum by (le) '
     f'(rate(spiffe_sidecar_request_duration_seconds_bucket{{{SEL}}}[{RATE}]))), "quantile", "p99", "", "")', 12),
    ("Responses/s by status class", "reqps", "{{status_class}}",
     f"sum by (status_class) (rate(spiffe_sidecar_caller_requests_total{{{SEL}}}[{RATE}]))", 12),
    ("Handshake failures/s by reason", "ops", "{{reason}}",
     f"sum by (reason) (rate(spiffe_sidecar_handshake_failures_total{{{SEL}}}[{RATE}]))", 12),
    ("Upstream errors/s by kind", "ops", "{{listener}} {{kind}}",
     f"sum by (listener, kind) (rate(spiffe_sidecar_upstream_errors_total{{{SEL}}}[{RATE}]))", 12),
]
STATS: list[tuple[str, str, str]] = [
    ("SVID time to expiry (soonest)", "s", f"min(spiffe_sidecar_svid_expiry_timestamp_seconds{{{SEL}}} - time())"),
    ("Sidecars ready", "short", f"sum(spiffe_sidecar_ready{{{SEL}}})"),
    ("Workload API up", "short", f"min(spiffe_sidecar_svid_source_up{{{SEL}}})"),
]
CALLERS_TABLE = f"sum by (caller, rule, decision) (increase(spiffe_sidecar_caller_requests_total{{{SEL}}}[$__range]))"


def _query(expr: str, legend: str = "", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().ref_id("A").expr(expr).legend_format(legend or "__auto")
    return q.instant() if instant else q.range()


def _variable(name: str, label: str, query: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name).label(label).datasource(DS).query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True).all_value(".*")
    )  # fmt: skip


def build() -> dict[str, Any]:
    d = (
        dashboard.Dashboard("spiffe-sidecar").uid(UID).tags(["spiffe", "mtls", "spiffe-sidecar"])
        .description("Callers, decisions, latency, handshake failures and SVID expiry of spiffe-sidecar pods.")
        .refresh("30s").time("now-1h", "now").timezone("browser")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(_variable("namespace", "Namespace", "label_values(spiffe_sidecar_build_info, namespace)"))
        .with_variable(_variable("pod", "Pod", 'label_values(spiffe_sidecar_build_info{namespace=~"$namespace"}, pod)'))
    )  # fmt: skip
    for title, unit, expr in STATS:
        d = d.with_panel(stat.Panel().title(title).datasource(DS).unit(unit).height(4).span(8)
                         .with_target(_query(expr, instant=True)))  # fmt: skip
    for title, unit, legend, expr, width in PANELS:
        d = d.with_panel(timeseries.Panel().title(title).datasource(DS).unit(unit).height(8).span(width)
                         .with_target(_query(expr, legend)))  # fmt: skip
    d = d.with_panel(
        table.Panel().title("Who calls me: requests by caller, rule and decision over the time range")
        .datasource(DS).height(8).span(24).with_target(_query(CALLERS_TABLE, instant=True).format("table"))
    )  # fmt: skip
    encoded = JSONEncoder(sort_keys=True, indent=2).encode(d.build())
    data: dict[str, Any] = _drop_nulls(json.loads(encoded))
    return data


def _drop_nulls(value: Any) -> Any:
    # The SDK writes unset panel options as null; Grafana fills defaults only for absent keys.
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing it")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run .venv/bin/python helm/dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
