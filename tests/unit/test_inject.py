"""Pod mutation: native/classic sidecar, volumes, probes, idempotency, and schema validity across versions."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes_validate.utils import ValidationError  # type: ignore[import-untyped]

from sidecar.annotations import STATUS_ANNOTATION, parse_probe_routes
from sidecar.errors import ConfigError
from sidecar.inject import (
    HEALTHZ_PATH,
    MIRROR_ANNOTATION,
    PODINFO_VOLUME,
    READYZ_PATH,
    WORKLOAD_API_VOLUME,
    InjectSettings,
    inject,
    mutate,
    patch_for,
)

SETTINGS = InjectSettings(image="registry.example/spiffe-sidecar:0.1.0")
SUPPORTED = [f"1.{m}.0" for m in range(29, 38)]  # every bundled schema from 1.29 (native sidecars beta on)

POLICY = """\
allow GET /api/stock/* from spiffe://example.org/ns/shop/sa/checkout
deny * /admin/** from *
"""


def pod(**annotations: str) -> dict[str, Any]:
    """A pod as the API server sends it for a Deployment: generateName, no name, no namespace."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "inventory-7d9f8-",
            "labels": {"app": "inventory", "spiffe-sidecar.io/inject": "true"},
            "annotations": {f"spiffe-sidecar.io/{k.replace('_', '-')}": v for k, v in annotations.items()},
        },
        "spec": {
            "serviceAccountName": "inventory",
            "containers": [
                {
                    "name": "app",
                    "image": "python:3.11-slim",
                    "ports": [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9100}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 3},
                    "livenessProbe": {
                        "httpGet": {
                            "path": "/healthz",
                            "port": 8080,
                            "httpHeaders": [{"name": "X-Probe", "value": "1"}],
                        }
                    },
                    "startupProbe": {"httpGet": {"path": "/healthz", "port": 9100}},
                }
            ],
        },
    }


def sidecar_of(p: dict[str, Any], native: bool = True) -> dict[str, Any]:
    c: dict[str, Any] = (p["spec"]["initContainers"] if native else p["spec"]["containers"])[0]
    assert c["name"] == "spiffe-sidecar"
    return c


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_native_sidecar_shape() -> None:
    original = pod(app_port="8080", inbound_policy=POLICY, cpu_limit="2", memory_request="32Mi")
    before = copy.deepcopy(original)
    out = mutate(original, namespace="shop", settings=SETTINGS)
    assert original == before  # input untouched
    c = sidecar_of(out)
    assert c["restartPolicy"] == "Always" and "lifecycle" not in c
    assert c["image"] == SETTINGS.image
    assert c["args"][:3] == ["run", "--from-annotations", "/etc/spiffe-sidecar/annotations"]
    assert c["startupProbe"]["httpGet"] == {"path": READYZ_PATH, "port": 15021, "scheme": "HTTP"}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 60
    assert c["readinessProbe"]["httpGet"]["path"] == READYZ_PATH
    assert c["livenessProbe"]["httpGet"]["path"] == HEALTHZ_PATH
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 65532 and sc["readOnlyRootFilesystem"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["resources"] == {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "2", "memory": "256Mi"}}
    assert {"name": "spiffe-mtls", "containerPort": 8443, "protocol": "TCP"} in c["ports"]
    env = env_of(c)
    assert env["SPIFFE_ENDPOINT_SOCKET"] == "unix:///spiffe-workload-api/spire-agent.sock"
    assert (env["SPIFFE_SIDECAR_INBOUND_PORT"], env["SPIFFE_SIDECAR_APP_PORT"]) == ("8443", "8080")
    assert (env["SPIFFE_SIDECAR_ADMIN_PORT"], env["SPIFFE_SIDECAR_PROBE_PORT"]) == ("15000", "15021")
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts[WORKLOAD_API_VOLUME] == {
        "name": WORKLOAD_API_VOLUME,
        "mountPath": "/spiffe-workload-api",
        "readOnly": True,
    }
    assert "subPath" not in mounts[PODINFO_VOLUME]  # subPath mounts never see downward API updates
    vols = {v["name"]: v for v in out["spec"]["volumes"]}
    assert vols[WORKLOAD_API_VOLUME]["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
    assert vols[PODINFO_VOLUME]["downwardAPI"]["items"] == [
        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}
    ]
    status = json.loads(out["metadata"]["annotations"][STATUS_ANNOTATION])
    assert status == {
        "version": "0.1.0",
        "native": True,
        "containers": ["spiffe-sidecar"],
        "volumes": [WORKLOAD_API_VOLUME, PODINFO_VOLUME],
    }
    assert out["spec"]["containers"][0]["name"] == "app"  # app containers stay where they were


def test_sidecar_goes_first_among_init_containers() -> None:
    p = pod(app_port="8080")
    p["spec"]["initContainers"] = [{"name": "migrate", "image": "busybox"}]
    out = mutate(p, namespace="shop", settings=SETTINGS)
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["spiffe-sidecar", "migrate"]


def test_probes_rewritten_to_probe_port() -> None:
    result = inject(pod(app_port="8080"), namespace="shop", settings=SETTINGS)
    app = result.pod["spec"]["containers"][0]
    assert app["readinessProbe"] == {
        "httpGet": {"path": "/ready", "port": 15021, "scheme": "HTTP"},
        "periodSeconds": 3,
    }
    # /healthz is wanted on two app ports: the first seen (startup, readiness, liveness order) keeps the
    # path, the other gets its own path on the probe port.
    assert app["startupProbe"]["httpGet"] == {"path": "/healthz", "port": 15021, "scheme": "HTTP"}
    assert app["livenessProbe"]["httpGet"]["path"] == "/spiffe-sidecar/app-probe/app/livenessProbe"
    assert app["livenessProbe"]["httpGet"]["httpHeaders"] == [{"name": "X-Probe", "value": "1"}]
    routes = parse_probe_routes(env_of(sidecar_of(result.pod))["SPIFFE_SIDECAR_PROBES"])
    assert routes == result.probe_routes
    assert {(r.path, r.app_port, r.app_path) for r in routes} == {
        ("/ready", 8080, "/ready"),
        ("/healthz", 9100, "/healthz"),
        ("/spiffe-sidecar/app-probe/app/livenessProbe", 8080, "/healthz"),
    }


def test_probes_left_alone_when_not_ours() -> None:
    p = pod(app_port="8080")
    app = p["spec"]["containers"][0]
    app["readinessProbe"] = {"httpGet": {"path": "/x", "port": 8080, "host": "10.0.0.1"}}
    app["livenessProbe"] = {"tcpSocket": {"port": "http"}}
    app["startupProbe"] = {"exec": {"command": ["true"]}}
    result = inject(p, namespace="shop", settings=SETTINGS)
    out_app = result.pod["spec"]["containers"][0]
    assert out_app["readinessProbe"] == app["readinessProbe"]
    assert out_app["livenessProbe"] == app["livenessProbe"] and out_app["startupProbe"] == app["startupProbe"]
    assert result.probe_routes == ()
    assert any("tcpSocket" in w for w in result.warnings)


def test_classic_sidecar() -> None:
    out = mutate(pod(app_port="8080", native_sidecar="false"), namespace="shop", settings=SETTINGS)
    assert "initContainers" not in out["spec"]
    c = sidecar_of(out, native=False)
    assert "restartPolicy" not in c
    cmd = c["lifecycle"]["postStart"]["exec"]["command"]
    assert cmd[:2] == ["python3", "-c"] and "/spiffe-sidecar/readyz" in cmd[2]
    compile(cmd[2], "<postStart>", "exec")  # the one-liner is valid Python
    assert [x["name"] for x in out["spec"]["containers"]] == ["spiffe-sidecar", "app"]
    # Valid even where native sidecars do not exist.
    kubernetes_validate.validate(out, "1.27.0", strict=True)
    kubernetes_validate.validate(out, "1.29.0", strict=True)
    # The chart default can be classic and a pod can ask for native.
    out = mutate(pod(app_port="8080", native_sidecar="true"), namespace="shop", settings=SETTINGS.with_native(False))
    assert sidecar_of(out)["restartPolicy"] == "Always"


def test_classic_warns_for_jobs() -> None:
    p = pod(app_port="8080")
    p["spec"]["restartPolicy"] = "Never"
    result = inject(p, namespace="shop", settings=SETTINGS.with_native(False))
    assert any("Job" in w for w in result.warnings)


def test_patch_escaping_idempotency_and_validity() -> None:
    p = pod(app_port="8080", inbound_policy=POLICY)
    del p["metadata"]["annotations"]  # absent parents: the diff adds whole objects
    p["metadata"]["annotations"] = {"spiffe-sidecar.io/app-port": "8080"}
    ops = patch_for(p, namespace="shop", settings=SETTINGS)
    paths = {op["path"] for op in ops}
    assert "/metadata/annotations/spiffe-sidecar.io~1status" in paths
    assert "/spec/initContainers" in paths and any(x.startswith("/spec/volumes") for x in paths)
    patched = jsonpatch.apply_patch(p, ops)
    assert patched == mutate(p, namespace="shop", settings=SETTINGS)
    assert patch_for(patched, namespace="shop", settings=SETTINGS) == []
    for version in SUPPORTED:
        kubernetes_validate.validate(patched, version, strict=True)
    with pytest.raises(ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(patched, "1.27.0", strict=True)


def test_already_injected_by_name_in_either_list() -> None:
    for where in ("containers", "initContainers"):
        p = pod(app_port="8080")
        p["spec"].setdefault(where, []).insert(0, {"name": "spiffe-sidecar", "image": "x"})
        result = inject(p, namespace="shop", settings=SETTINGS)
        assert not result.injected and result.skipped == "already injected" and result.pod == p


@pytest.mark.parametrize(
    ("change", "namespace", "reason"),
    [
        (lambda p: p["metadata"]["annotations"].update({"spiffe-sidecar.io/inject": "false"}), "shop", "false"),
        (lambda p: p["metadata"]["annotations"].update({MIRROR_ANNOTATION: "abc"}), "shop", "mirror pod"),
        (lambda p: None, "kube-system", "excluded"),
    ],
)
def test_skips(change: Any, namespace: str, reason: str) -> None:
    p = pod(app_port="8080", inbound_policy="this would not compile")
    change(p)
    result = inject(p, namespace=namespace, settings=SETTINGS)
    assert not result.injected and reason in (result.skipped or "")
    assert patch_for(p, namespace=namespace, settings=SETTINGS) == []


def test_bad_annotations_raise_with_the_annotation_name() -> None:
    with pytest.raises(ConfigError) as exc:
        mutate(
            pod(app_port="8080", inbound_policy="allow GET /x from spife://bad"), namespace="shop", settings=SETTINGS
        )
    assert str(exc.value).startswith("annotation spiffe-sidecar.io/inbound-policy:1: rules[0].callers[0]")


def test_app_port_inferred_or_required() -> None:
    result = inject(pod(), namespace="shop", settings=SETTINGS)
    assert env_of(sidecar_of(result.pod))["SPIFFE_SIDECAR_APP_PORT"] == "8080"
    assert any("app-port not set" in w for w in result.warnings)
    p = pod()
    del p["spec"]["containers"][0]["ports"]
    with pytest.raises(ConfigError, match="app-port"):
        mutate(p, namespace="shop", settings=SETTINGS)


@pytest.mark.parametrize(
    ("annotations", "edit", "message"),
    [
        ({"app_port": "15021"}, None, "probe port"),
        ({"app_port": "8080", "inbound_port": "9100"}, None, "uses port 9100"),
        ({"app_port": "8080", "inbound_port": "15000"}, None, "admin or probe"),
        ({"app_port": "8080"}, lambda p: p["spec"].update({"hostNetwork": True}), "hostNetwork"),
        (
            {"app_port": "8080"},
            lambda p: p["spec"]["containers"][0]["ports"][1].update({"name": "spiffe-mtls"}),
            "named",
        ),
        (
            {"app_port": "8080"},
            lambda p: p["spec"].update({"volumes": [{"name": WORKLOAD_API_VOLUME, "emptyDir": {}}]}),
            "different volume",
        ),
    ],
)
def test_conflicts(annotations: dict[str, str], edit: Any, message: str) -> None:
    p = pod(**annotations)
    if edit:
        edit(p)
    with pytest.raises(ConfigError, match=message):
        mutate(p, namespace="shop", settings=SETTINGS)


def test_existing_identical_volume_is_reused() -> None:
    p = pod(app_port="8080")
    p["spec"]["volumes"] = [{"name": WORKLOAD_API_VOLUME, "csi": {"driver": "csi.spiffe.io", "readOnly": True}}]
    out = mutate(p, namespace="shop", settings=SETTINGS)
    assert [v["name"] for v in out["spec"]["volumes"]] == [WORKLOAD_API_VOLUME, PODINFO_VOLUME]


def test_settings_from_mapping() -> None:
    s = InjectSettings.from_mapping({"image": "a:b", "native": False, "excludedNamespaces": ["x"]}, "cm")
    assert (s.image, s.native, s.excluded_namespaces) == ("a:b", False, frozenset({"x"}))
    with pytest.raises(ConfigError) as exc:
        InjectSettings.from_mapping({"image": "", "native": "yes", "adminPort": 15021, "typo": 1}, "cm")
    text = str(exc.value)
    assert "typo" in text and "native" in text and "image must" in text and "must differ" in text


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from(["/", "/a", "/healthz", "/spiffe-sidecar/readyz"]), min_size=1, max_size=3),
    st.lists(st.sampled_from([8080, 9100, "http", "metrics"]), min_size=1, max_size=3),
    st.booleans(),
)
def test_property_idempotent_and_valid(paths: list[str], ports: list[Any], native: bool) -> None:
    p = pod(app_port="8080")
    app = p["spec"]["containers"][0]
    for kind, path, port in zip(("readinessProbe", "livenessProbe", "startupProbe"), paths, ports, strict=False):
        app[kind] = {"httpGet": {"path": path, "port": port}}
    result = inject(p, namespace="shop", settings=SETTINGS.with_native(native))
    patched = jsonpatch.apply_patch(p, patch_for(p, namespace="shop", settings=SETTINGS.with_native(native)))
    assert patched == result.pod
    assert patch_for(patched, namespace="shop", settings=SETTINGS) == []
    kubernetes_validate.validate(patched, "1.29.0", strict=True)
    # Every rewritten probe points at the probe port and has exactly one route.
    routes = {r.path: r for r in result.probe_routes}
    for c in patched["spec"]["containers"]:
        if c["name"] == "app":
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                if kind in c:
                    assert c[kind]["httpGet"]["port"] == 15021 and c[kind]["httpGet"]["path"] in routes


def test_metrics_port_and_prometheus_annotations() -> None:
    out = mutate(pod(app_port="8080"), namespace="shop", settings=SETTINGS)
    c = sidecar_of(out)
    assert {"name": "spiffe-metrics", "containerPort": 15020, "protocol": "TCP"} in c["ports"]
    assert env_of(c)["SPIFFE_SIDECAR_METRICS_PORT"] == "15020"
    ann = out["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == (
        "true", "15020", "/metrics")  # fmt: skip
    # The annotation moves the port; the injected pod is still valid.
    out = mutate(pod(app_port="8080", metrics_port="9102"), namespace="shop", settings=SETTINGS)
    assert out["metadata"]["annotations"]["prometheus.io/port"] == "9102"
    assert env_of(sidecar_of(out))["SPIFFE_SIDECAR_METRICS_PORT"] == "9102"
    kubernetes_validate.validate(out, "1.29.0", strict=True)


def test_the_apps_own_prometheus_annotations_are_kept() -> None:
    p = pod(app_port="8080")
    p["metadata"]["annotations"]["prometheus.io/port"] = "9100"
    result = inject(p, namespace="shop", settings=SETTINGS)
    assert result.pod["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    assert "prometheus.io/scrape" not in result.pod["metadata"]["annotations"]
    assert any("prometheus.io/ annotations of its own" in w for w in result.warnings)


def test_metrics_port_off_and_clashes() -> None:
    out = mutate(pod(app_port="8080"), namespace="shop", settings=InjectSettings(metrics_port=0))
    assert not any(k.startswith("prometheus.io/") for k in out["metadata"]["annotations"])
    assert "SPIFFE_SIDECAR_METRICS_PORT" not in env_of(sidecar_of(out))
    with pytest.raises(ConfigError, match=r"metrics-port.*probe port"):
        mutate(pod(app_port="8080", metrics_port="15021"), namespace="shop", settings=SETTINGS)
    with pytest.raises(ConfigError, match="must differ"):
        InjectSettings.from_mapping({"metricsPort": 15000}, "cm")
