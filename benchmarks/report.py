"""Turn a harness result dict into benchmarks/results/<date>-<machine>.json, a Markdown table and PNG plots.

Also usable on a saved JSON: python benchmarks/report.py results/<file>.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PCTS = ("p50", "p90", "p99", "p99.9")


def _get(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)  # type: ignore[assignment]
    return d


def add_derived(results: dict[str, Any]) -> None:
    """Latency added over `baseline` at the same load (same tool), and ratios to nginx within this run."""
    base = results["shapes"].get("baseline", {}).get("loads", {})
    for shape, entry in results["shapes"].items():
        for name, res in entry["loads"].items():
            b = base.get(name)
            if shape == "baseline" or not b or b.get("tool") != res.get("tool"):
                continue
            res["added_ms"] = {
                p: (round(res["latency_ms"][p] - b["latency_ms"][p], 4)
                    if res.get("latency_ms", {}).get(p) is not None and b.get("latency_ms", {}).get(p) is not None
                    else None)
                for p in PCTS
            }
    ratios: dict[str, Any] = {}
    for kind in ("inbound", "chain"):
        ours = results["shapes"].get(f"{kind}-sidecar")
        ref = results["shapes"].get(f"{kind}-nginx")
        if not ours or not ref:
            continue
        r: dict[str, Any] = {}
        for name, res in ours["loads"].items():
            other = ref["loads"].get(name)
            if not other:
                continue
            if name.startswith("open"):
                for p in ("p50", "p99"):
                    a, b = _get(res, "added_ms", p), _get(other, "added_ms", p)
                    if a is None or b is None:
                        continue
                    key = f"{name} added {p} (ours/nginx)"
                    # An added latency within 20 us of the baseline (or below it) is noise: no ratio.
                    r[key] = round(a / b, 2) if b > 0.02 else f"n/a (ours +{a} ms, nginx +{b} ms)"
            else:
                a, b = res.get("achieved_rps"), other.get("achieved_rps")
                if a and b:
                    r[f"{name} req/s (ours/nginx)"] = round(a / b, 2)
            # CPU per request of the whole proxy path (both proxies in a chain): the steadiest figure here.
            ca = sum(v["cpu_s_per_1000_req"] for v in res.get("proxies", {}).values())
            cb = sum(v["cpu_s_per_1000_req"] for v in other.get("proxies", {}).values())
            if ca and cb:
                us = f"{round(ca * 1000)} us vs {round(cb * 1000)} us"
                r[f"{name} CPU per request (ours/nginx)"] = f"{round(ca / cb, 2)} ({us})"
        ratios[kind] = r
    results["ratios_vs_nginx"] = ratios
    # What the step-up costs: the chain with a JWT-SVID attached and validated on every request, minus the
    # plain chain, CPU per request of both sidecars (same run, same loads).
    plain, jwt = results["shapes"].get("chain-sidecar"), results["shapes"].get("chain-jwt-sidecar")
    if plain and jwt:
        cost: dict[str, str] = {}
        for name, res in jwt["loads"].items():
            other = plain["loads"].get(name)
            ca = sum(v["cpu_s_per_1000_req"] for v in res.get("proxies", {}).values())
            cb = sum(v["cpu_s_per_1000_req"] for v in (other or {}).get("proxies", {}).values())
            if ca and cb:
                cost[name] = f"{round((ca - cb) * 1000)} us ({round(ca * 1000)} us vs {round(cb * 1000)} us)"
        results["jwt_step_up_cpu_per_request"] = cost


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark {results['date']} on {results['machine']} ({results['cpus']} CPUs)",
        "",
        f"quick: {results['quick']}; load average before/after: {results.get('loadavg_before')} / "
        f"{results.get('loadavg_after')}; wall time {results.get('wall_s')} s. Loopback only. The machine is "
        "shared: compare ratios within this run, not absolute numbers across runs.",
        "",
        "Latency in ms (open loop: from dispatch at the scheduled rate, queueing included); "
        "added = minus `baseline` at the same load "
        "with the same tool; CPU = CPU seconds per 1000 requests per proxy process; RSS = peak MB.",
        "",
        "| shape | load | tool | req/s | p50 | p90 | p99 | p99.9 | added p50 | added p99 | errors "
        "| CPU s/1k req | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, entry in results["shapes"].items():
        for name, res in entry["loads"].items():
            lat = res.get("latency_ms", {})
            add = res.get("added_ms", {})
            procs = res.get("proxies", {})
            cpu = " / ".join(f"{k.split('-')[0]} {v['cpu_s_per_1000_req']}" for k, v in procs.items()) or "-"
            rss = " / ".join(f"{k.split('-')[0]} {v['peak_rss_mb']}" for k, v in procs.items()) or "-"
            lines.append(
                f"| {shape} | {name} | {res.get('tool')} | {res.get('achieved_rps')} | "
                + " | ".join(str(lat.get(p)) for p in PCTS)
                + f" | {add.get('p50', '')} | {add.get('p99', '')} | {res.get('errors')} | {cpu} | {rss} |"
            )
    lines += ["", "Idle RSS (MB) after start: "
              + "; ".join(f"{s}: {e.get('idle_rss_mb')}" for s, e in results["shapes"].items() if e.get("idle_rss_mb")),
              ""]
    rot = results.get("rotation")
    if rot:
        lat = rot.get("latency_ms", {})
        lines += [
            "## Rotation under load",
            "",
            f"Chain (our outbound -> our inbound), open loop 1000 req/s, 16 connections, SVID TTL "
            f"{rot.get('svid_ttl_s')} s (renewed at half-life): {rot.get('completed')} requests, "
            f"**errors {rot.get('errors')}**, distinct SVIDs seen by the inbound sidecar: "
            f"{rot.get('distinct_svids_seen')}, latency p50 {lat.get('p50')} / p99 {lat.get('p99')} / "
            f"p99.9 {lat.get('p99.9')} / max {lat.get('max')} ms.",
            "",
        ]
    ratios = results.get("ratios_vs_nginx", {})
    if ratios:
        lines += ["## Ratios to nginx (same run)", ""]
        for kind, r in ratios.items():
            for k, v in r.items():
                lines.append(f"- {kind}: {k} = {v}")
        lines.append("")
    cost = results.get("jwt_step_up_cpu_per_request", {})
    if cost:
        lines += ["## JWT-SVID step-up: added CPU per request (chain-jwt-sidecar minus chain-sidecar, both sidecars)",
                  ""]
        lines += [f"- {name}: {v}" for name, v in cost.items()]
        lines.append("")
    return "\n".join(lines)


def plots(results: dict[str, Any], stem: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out: list[Path] = []
    shapes = results["shapes"]
    base = shapes.get("baseline", {}).get("loads", {})
    rates = [n for n in ("open-500", "open-1000", "open-2000", "open-5000") if n in base]
    if rates:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, p in zip(axes, ("p50", "p99"), strict=True):
            for shape, entry in shapes.items():
                xs, ys = [], []
                for n in rates:
                    v = _get(entry, "loads", n, "latency_ms", p)
                    if v is not None:
                        xs.append(int(n.split("-")[1]))
                        ys.append(v)
                ax.plot(xs, ys, marker="o", label=shape)
            ax.set_xlabel("offered load, req/s (16 connections)")
            ax.set_ylabel(f"{p} latency, ms (open loop, CO-corrected)")
            ax.set_yscale("log")
            ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = stem.with_name(stem.name + "-latency.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = [s for s in shapes if s != "baseline"]
    for ax, load, label in ((axes[0], "closed-32", "closed loop, 32 connections: req/s"),
                            (axes[1], "newconn", "new TLS connection per request: conn/s")):
        vals = [_get(shapes[s], "loads", load, "achieved_rps") or 0 for s in names]
        ax.bar(range(len(names)), vals)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
    # CPU per request at 1000 req/s, all proxies of a shape together (a chain has two).
    cpu = []
    for s in names:
        proxies = _get(shapes[s], "loads", "open-1000", "proxies") or {}
        cpu.append(sum(p.get("cpu_s_per_1000_req") or 0 for p in proxies.values()) * 1000)
    axes[2].bar(range(len(names)), cpu)
    axes[2].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axes[2].set_title("CPU per request at 1000 req/s, us (all proxies of the shape)", fontsize=10)
    fig.tight_layout()
    path = stem.with_name(stem.name + "-throughput.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    out.append(path)
    return out


def write(results: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    add_derived(results)
    stem = out_dir / f"{results['date'][:10]}-{results['machine']}{'-quick' if results['quick'] else ''}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown(results) + "\n")
    return [json_path, md_path, *plots(results, stem)]


if __name__ == "__main__":
    src = Path(sys.argv[1])
    data = json.loads(src.read_text())
    print("\n".join(str(p) for p in write(data, src.parent)))
