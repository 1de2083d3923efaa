"""`spiffe-sidecar inject` as a real process on multi-document manifests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import yaml

ROOT = Path(__file__).resolve().parents[2]
LABEL = {"spiffe-sidecar.io/inject": "true"}


def template(labels: dict[str, str] | None = None, **annotations: str) -> dict[str, Any]:
    return {
        "metadata": {
            "labels": {"app": "x", **(labels or {})},
            "annotations": {"spiffe-sidecar.io/app-port": "8080", **annotations},
        },
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "busybox",
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
                }
            ]
        },
    }


def workload(kind: str, name: str, tpl: dict[str, Any], namespace: str | None = "shop") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    selector = {"matchLabels": {"app": "x"}}
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {**meta, **tpl["metadata"]}, "spec": tpl["spec"]}
    if kind == "CronJob":
        tpl["spec"]["restartPolicy"] = "OnFailure"
        return {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": meta,
            "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": tpl}}},
        }
    if kind == "Job":
        tpl["spec"]["restartPolicy"] = "Never"
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {"template": tpl}}
    spec: dict[str, Any] = {"selector": selector, "template": tpl}
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": meta, "spec": spec}


MANIFEST = [
    workload("Deployment", "opted-in", template(LABEL)),
    workload("Deployment", "not-opted-in", template()),
    workload("StatefulSet", "db", template(LABEL)),
    workload("DaemonSet", "agent", template(LABEL), namespace=None),
    workload("Job", "once", template(LABEL)),
    workload("CronJob", "often", template(LABEL)),
    workload("Pod", "bare", template(LABEL)),
    workload("Deployment", "opted-out", template(LABEL, **{"spiffe-sidecar.io/inject": "false"})),
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": "shop"}, "data": {"a": "b"}},
    {"apiVersion": "v1", "kind": "List", "items": [workload("Deployment", "in-list", template(LABEL))]},
]


def run(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.inject_cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        spec: dict[str, Any] = doc["spec"]
        return spec
    if doc["kind"] == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(doc["spec"]["template"]["spec"])


def sidecar_names(spec: dict[str, Any]) -> tuple[list[str], list[str]]:
    return [c["name"] for c in spec.get("initContainers", [])], [c["name"] for c in spec["containers"]]


def test_multi_document_manifest(tmp_path: Path) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(yaml.safe_dump_all(MANIFEST, sort_keys=False))
    out = tmp_path / "out.yaml"
    r = run("-f", str(src), "-o", str(out))
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    assert len(docs) == len(MANIFEST)
    by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] != "List"}
    for name in ("opted-in", "db", "agent", "once", "often", "bare"):
        init, _ = sidecar_names(pod_spec(by_name[name]))
        assert init == ["spiffe-sidecar"], name
    for name in ("not-opted-in", "opted-out", "cfg"):
        original = next(d for d in MANIFEST if d.get("metadata", {}).get("name") == name)
        assert by_name[name] == original  # passed through unchanged
    (in_list,) = docs[-1]["items"]
    assert sidecar_names(pod_spec(in_list))[0] == ["spiffe-sidecar"]
    for d in docs:
        for item in d.get("items", [d]):
            kubernetes_validate.validate(item, "1.29.0", strict=True)
    assert "injected shop/Deployment/opted-in" in r.stderr
    assert "injected default/DaemonSet/agent" in r.stderr  # no namespace: --namespace default
    assert "skipped Deployment/not-opted-in" in r.stderr and "skipped Deployment/opted-out" in r.stderr
    # Idempotent: injecting the output again changes nothing.
    again = run("-f", str(out))
    assert again.returncode == 0 and list(yaml.safe_load_all(again.stdout)) == docs
    assert "already injected" in again.stderr


def test_stdin_all_and_classic() -> None:
    r = run("-f", "-", "--all", "--classic", stdin=yaml.safe_dump_all(MANIFEST[:2]))
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(r.stdout))
    for d in docs:
        init, containers = sidecar_names(pod_spec(d))
        assert init == [] and containers == ["spiffe-sidecar", "app"]
        sidecar = pod_spec(d)["containers"][0]
        assert "postStart" in sidecar["lifecycle"]
        kubernetes_validate.validate(d, "1.27.0", strict=True)  # classic works on old clusters


def test_examples_file() -> None:
    r = run("-f", "helm/examples/demo.yaml", "--image", "registry.example/spiffe-sidecar:dev")
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(r.stdout))
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 3
    for d in deployments:
        assert pod_spec(d)["initContainers"][0]["image"] == "registry.example/spiffe-sidecar:dev"


def test_bad_annotations_fail_with_every_problem(tmp_path: Path) -> None:
    bad = [
        workload("Deployment", "a", template(LABEL, **{"spiffe-sidecar.io/inbound-policy": "allow GET x from *"})),
        workload("Deployment", "b", template(LABEL, **{"spiffe-sidecar.io/inbound-prt": "1"})),
    ]
    src = tmp_path / "bad.yaml"
    src.write_text(yaml.safe_dump_all(bad))
    out = tmp_path / "out.yaml"
    r = run("-f", str(src), "-o", str(out))
    assert r.returncode == 2 and r.stdout == "" and not out.exists()
    assert "error: shop/Deployment/a: annotation spiffe-sidecar.io/inbound-policy:1: rules[0].paths[0]" in r.stderr
    assert "error: shop/Deployment/b: annotation spiffe-sidecar.io/inbound-prt: unknown annotation" in r.stderr


def test_unreadable_and_invalid_input(tmp_path: Path) -> None:
    r = run("-f", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    (tmp_path / "x.yaml").write_text("a: [\n")
    r = run("-f", str(tmp_path / "x.yaml"))
    assert r.returncode == 2 and "invalid YAML" in r.stderr
