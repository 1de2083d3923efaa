"""The Helm chart rendered by a real Helm engine (helm-python-sdk, offline), every object schema-checked,
plus the examples, the Dockerfile, and the webhook process serving with the chart's own cert and settings."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as hp  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography import x509

from sidecar.annotations import PREFIX, parse_pod_annotations
from sidecar.identity import SpiffeId
from sidecar.inject import InjectSettings
from sidecar.inject_cli import inject_documents
from sidecar.metrics import Metrics
from sidecar.policy import RequestAttrs, authorize
from tests import promtools

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "spiffe-sidecar"
EXAMPLES = ROOT / "helm" / "examples" / "demo.yaml"
RELEASE, NAMESPACE = "rel", "spiffe-system"
FULLNAME = f"{RELEASE}-spiffe-sidecar"
SVC_HOST = f"{FULLNAME}.{NAMESPACE}.svc"
VERSIONS = [f"1.{m}.0" for m in range(29, 38)]
CRDS = {
    ("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
}

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "cert-manager": {"certManager": {"enabled": True}},
    "cert-manager-issuer": {
        "certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}
    },
    "classic": {"injection": {"native": False}},
    "network-policy": {"networkPolicy": {"enabled": True, "namespaces": ["shop", "billing"]}},
    "monitoring": {
        "monitoring": {
            "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "prometheusRule": {"enabled": True},
            "dashboard": {"enabled": True, "namespace": "grafana"},
        },
        "networkPolicy": {
            "enabled": True,
            "namespaces": ["shop"],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        },
    },
    "minimal": {
        "webhook": {
            "replicas": 1,
            "namespaceOptIn": False,
            "failurePolicy": "Ignore",
            "reinvocationPolicy": "IfNeeded",
            "objectSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}]},
        },
        "clusterSPIFFEID": {"enabled": False},
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = hp.Chart.load(str(CHART))
    out = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            assert text.strip()
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values) for name, values in VARIANTS.items()}


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def settings_of(docs: list[dict[str, Any]]) -> InjectSettings:
    cm = one(docs, "ConfigMap")
    return InjectSettings.from_mapping(yaml.safe_load(cm["data"]["settings.yaml"]), "configmap")


def test_lint_strict() -> None:
    report = hp.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert all(m["severity"] < 2 for m in report["messages"]), report["messages"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_object_validates(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    for doc in rendered[variant]:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue  # no bundled schema: checked by hand below
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_objects_per_variant(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base = ["ConfigMap", "Deployment", "MutatingWebhookConfiguration", "Service", "ServiceAccount"]
    assert kinds(rendered["default"]) == sorted(
        [*base, "ClusterSPIFFEID", "ClusterSPIFFEID", "PodDisruptionBudget", "Secret"]
    )
    assert kinds(rendered["cert-manager"]) == sorted(
        [*base, "Certificate", "ClusterSPIFFEID", "ClusterSPIFFEID", "Issuer", "PodDisruptionBudget"]
    )
    assert "Issuer" not in kinds(rendered["cert-manager-issuer"])
    assert kinds(rendered["network-policy"]).count("NetworkPolicy") == 2
    assert kinds(rendered["minimal"]) == sorted([*base, "Secret"])
    assert {"PodMonitor", "PrometheusRule"} <= set(kinds(rendered["monitoring"]))
    assert kinds(rendered["monitoring"]).count("ConfigMap") == 2  # settings + dashboard


def test_no_rbac_and_no_token(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # The webhook makes no API calls: no Role/ClusterRole at all, and no token mounted.
    for docs in rendered.values():
        assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} & set(kinds(docs))
        assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
        assert one(docs, "Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_webhook_configuration_by_hand(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        mwc = one(docs, "MutatingWebhookConfiguration")
        values = VARIANTS[name].get("webhook", {})
        hooks = mwc["webhooks"]
        expected_names = ["pod.inject.spiffe-sidecar.io"]
        if values.get("namespaceOptIn", True):
            expected_names.insert(0, "namespace.inject.spiffe-sidecar.io")
        assert [h["name"] for h in hooks] == expected_names
        for h in hooks:
            # kubernetes-validate does not check enums (notes §6.1): check them here.
            assert h["sideEffects"] in ("None", "NoneOnDryRun") and h["sideEffects"] == "None"
            assert h["failurePolicy"] in ("Fail", "Ignore") and h["failurePolicy"] == values.get(
                "failurePolicy", "Fail"
            )
            assert h["reinvocationPolicy"] in ("Never", "IfNeeded")
            assert h["reinvocationPolicy"] == values.get("reinvocationPolicy", "Never")
            assert h["matchPolicy"] in ("Exact", "Equivalent")
            assert h["admissionReviewVersions"] == ["v1"] and 1 <= h["timeoutSeconds"] <= 30
            assert h["rules"] == [
                {
                    "operations": ["CREATE"],
                    "apiGroups": [""],
                    "apiVersions": ["v1"],
                    "resources": ["pods"],
                    "scope": "Namespaced",
                }
            ]
            assert h["clientConfig"]["service"] == {
                "name": FULLNAME,
                "namespace": NAMESPACE,
                "path": "/mutate",
                "port": 443,
            }
            ns_exprs = h["namespaceSelector"]["matchExpressions"]
            excluded = next(e for e in ns_exprs if e["key"] == "kubernetes.io/metadata.name")
            assert excluded["operator"] == "NotIn" and {NAMESPACE, "kube-system"} <= set(excluded["values"])
            obj_exprs = h["objectSelector"]["matchExpressions"]
            assert {
                "key": "spiffe-sidecar.io/inject",
                "operator": "In" if h["name"].startswith("pod") else "NotIn",
                "values": ["true"] if h["name"].startswith("pod") else ["false"],
            } in obj_exprs
            if name == "minimal":
                assert {"key": "tier", "operator": "In", "values": ["web"]} in obj_exprs
        # The Service the webhook points at exists and selects the webhook pods.
        svc = one(docs, "Service")
        dep = one(docs, "Deployment")
        assert svc["metadata"]["name"] == FULLNAME
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30, check=False)


def test_generated_cert_matches_ca_bundle(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    docs = rendered["default"]
    secret = one(docs, "Secret")
    mwc = one(docs, "MutatingWebhookConfiguration")
    assert secret["metadata"]["name"] == f"{FULLNAME}-tls" and secret["type"] == "kubernetes.io/tls"
    for h in mwc["webhooks"]:
        assert h["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    (tmp_path / "ca.crt").write_bytes(base64.b64decode(mwc["webhooks"][0]["clientConfig"]["caBundle"]))
    (tmp_path / "tls.crt").write_bytes(base64.b64decode(secret["data"]["tls.crt"]))
    (tmp_path / "tls.key").write_bytes(base64.b64decode(secret["data"]["tls.key"]))
    r = openssl("verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "tls.crt"))
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert SVC_HOST in sans and f"{SVC_HOST}.cluster.local" in sans
    # The key belongs to the cert.
    pub_cert = openssl("x509", "-in", str(tmp_path / "tls.crt"), "-noout", "-pubkey").stdout
    pub_key = openssl("pkey", "-in", str(tmp_path / "tls.key"), "-pubout").stdout
    assert pub_cert and pub_cert == pub_key
    # The Deployment mounts that Secret as a directory (rotations arrive by ..data swap).
    dep = one(docs, "Deployment")
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == secret["metadata"]["name"]
    mounts = dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert all("subPath" not in m for m in mounts)


def test_cert_manager_variant(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["cert-manager"]
    mwc = one(docs, "MutatingWebhookConfiguration")
    cert = one(docs, "Certificate")
    issuer = one(docs, "Issuer")
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/{cert['metadata']['name']}"
    assert all("caBundle" not in h["clientConfig"] for h in mwc["webhooks"])
    assert cert["spec"]["secretName"] == f"{FULLNAME}-tls"
    assert cert["spec"]["dnsNames"] == [SVC_HOST, f"{SVC_HOST}.cluster.local"]
    assert cert["spec"]["issuerRef"] == {
        "name": issuer["metadata"]["name"],
        "kind": "Issuer",
        "group": "cert-manager.io",
    }
    assert issuer["spec"] == {"selfSigned": {}}
    custom = one(rendered["cert-manager-issuer"], "Certificate")
    assert custom["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}


def test_cluster_spiffe_ids_by_hand(rendered: dict[str, list[dict[str, Any]]]) -> None:
    ids = [d for d in rendered["default"] if d["kind"] == "ClusterSPIFFEID"]
    known = {
        "spiffeIDTemplate",
        "podSelector",
        "namespaceSelector",
        "dnsNameTemplates",
        "workloadSelectorTemplates",
        "ttl",
        "jwtTtl",
        "federatesWith",
        "admin",
        "downstream",
        "autoPopulateDNSNames",
        "fallback",
        "className",
    }
    for d in ids:
        assert d["apiVersion"] == "spire.spiffe.io/v1alpha1" and "namespace" not in d["metadata"]  # cluster-scoped
        assert set(d["spec"]) <= known
        assert d["spec"]["spiffeIDTemplate"] == (
            "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"
        )
        assert d["spec"]["className"] == "spire-mgmt-spire"
    by_name = {d["metadata"]["name"]: d["spec"] for d in ids}
    pods = by_name[f"{FULLNAME}-pods"]
    assert pods["podSelector"] == {"matchLabels": {"spiffe-sidecar.io/inject": "true"}}
    nss = by_name[f"{FULLNAME}-namespaces"]
    assert nss["namespaceSelector"] == {"matchLabels": {"spiffe-sidecar.io/inject": "true"}}
    # Non-overlapping: a pod in an opted-in namespace is only selected by the namespace one.
    assert pods["namespaceSelector"]["matchExpressions"][0]["operator"] == "NotIn"


def test_network_policy(rendered: dict[str, list[dict[str, Any]]]) -> None:
    nps = [d for d in rendered["network-policy"] if d["kind"] == "NetworkPolicy"]
    assert sorted(d["metadata"]["namespace"] for d in nps) == ["billing", "shop"]
    for d in nps:
        assert d["spec"]["podSelector"] == {"matchLabels": {"spiffe-sidecar.io/inject": "true"}}
        assert d["spec"]["policyTypes"] == ["Ingress"]
        rule, metrics = d["spec"]["ingress"]
        assert "from" not in rule  # any source: mTLS authenticates callers; kubelet probes come from node IPs
        assert rule["ports"] == [{"port": 8443, "protocol": "TCP"}, {"port": 15021, "protocol": "TCP"}]
        assert metrics == {"ports": [{"port": 15020, "protocol": "TCP"}]}  # no metricsFrom: any scraper
    (np,) = [d for d in rendered["monitoring"] if d["kind"] == "NetworkPolicy"]
    assert np["spec"]["ingress"][1]["from"] == VARIANTS["monitoring"]["networkPolicy"]["metricsFrom"]


def test_deployment_shape(rendered: dict[str, list[dict[str, Any]]]) -> None:
    dep = one(rendered["default"], "Deployment")
    pdb = one(rendered["default"], "PodDisruptionBudget")
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2 and pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    (c,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] and c["securityContext"]["runAsUser"] == 65532
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["args"][0] == "webhook"
    assert "--settings=/etc/spiffe-sidecar-webhook/settings/settings.yaml" in c["args"]


def test_injection_settings_reach_the_webhook(rendered: dict[str, list[dict[str, Any]]]) -> None:
    s = settings_of(rendered["default"])
    dep = one(rendered["default"], "Deployment")
    assert s.image == dep["spec"]["template"]["spec"]["containers"][0]["image"] == "spiffe-sidecar:0.1.0"
    assert s.native is True and {NAMESPACE, "kube-system"} <= s.excluded_namespaces
    assert settings_of(rendered["classic"]).native is False


@pytest.mark.parametrize(
    "values",
    [
        {"webhook": {"failurePolicy": "Sometimes"}},
        {"webhook": {"reinvocationPolicy": "Always"}},
        {"webhook": {"matchPolicy": "Fuzzy"}},
        {"webhook": {"timeoutSeconds": 31}},
        {"injection": {"native": "yes"}},
        {"webhook": {"typo": 1}},
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(hp.HelmValuesError):
        render(values)


def test_dockerfile_matches_chart() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) == 2 and all(f.startswith("python:3.11-slim") for f in froms)  # multi-stage
    # One base for both stages, pinned by digest (a tag moves under a rebuild).
    assert all(re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", f) for f in froms)
    assert froms[0] == froms[1]
    final = text.split("\nFROM ")[-1]
    assert "pip wheel" not in final and not re.search(r"apt-get|gcc|build-essential", final)
    assert re.search(r"^USER 65532:65532$", final, re.M)
    assert re.search(r'^ENTRYPOINT \["spiffe-sidecar"\]$', final, re.M)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    image = f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    assert f"docker build -t {image} ." in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in pyproject
    assert InjectSettings().image == image


def test_image_wheel_has_no_dev_spire_no_py_spiffe_no_grpcio(tmp_path: Path) -> None:
    """Build the wheel from exactly what the Dockerfile copies into its builder stage (setuptools.build_meta,
    what `pip wheel .` runs) and check what the production image would install."""
    import zipfile

    text = (ROOT / "Dockerfile").read_text()
    builder = text.split("\nFROM ")[1]
    copied = [w for line in re.findall(r"^COPY (.+)$", builder, re.M) for w in line.split()[:-1]]
    assert "spire" not in copied and "sidecar" in copied
    src = tmp_path / "src"
    src.mkdir()
    for name in copied:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path / "out"
    out.mkdir()
    code = f"from setuptools import build_meta; build_meta.build_wheel({str(out)!r})"
    build = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300,
                           check=False)  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert not [n for n in names if n.startswith("spire/")] and "sidecar/cli.py" in names
    runtime = [ln.split(":", 1)[1].strip() for ln in meta.splitlines()
               if ln.startswith("Requires-Dist:") and "extra ==" not in ln]  # fmt: skip
    names_only = {re.split(r"[<>=\[;! ]", r, maxsplit=1)[0].lower() for r in runtime}
    assert not names_only & {"spiffe", "grpcio", "grpcio-tools"}, runtime
    assert "rm -f /usr/local/bin/spiffe-spire" in text  # its console script would point at nothing


def test_the_sidecar_runs_without_spire_py_spiffe_or_grpcio(tmp_path: Path) -> None:
    """What the image runs (check, run, webhook, inject) imports none of the test-only or dev packages."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('spire', 'spiffe', 'grpc', 'grpc_tools'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import sidecar.app, sidecar.webhook, sidecar.inject_cli\n"
        "from sidecar.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, "check", "-f", str(EXAMPLES)], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Deployment/inventory: OK" in result.stdout


def test_examples_reproduce_the_running_example(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = [d for d in yaml.safe_load_all(EXAMPLES.read_text()) if d]
    for d in docs:
        kubernetes_validate.validate(d, "1.29.0", strict=True)
    deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deps) == {"checkout", "inventory", "reporting"}
    ann = {n: parse_pod_annotations(d["spec"]["template"]["metadata"]["annotations"]) for n, d in deps.items()}
    inv = ann["inventory"].policy
    checkout = SpiffeId.parse("spiffe://example.org/ns/shop/sa/checkout")
    reporting = SpiffeId.parse("spiffe://example.org/ns/shop/sa/reporting")
    assert authorize(inv, RequestAttrs(checkout, "GET", "/api/stock/42")).allowed
    assert not authorize(inv, RequestAttrs(checkout, "GET", "/admin/users")).forward
    assert not authorize(inv, RequestAttrs(reporting, "GET", "/api/stock/42")).forward
    assert not authorize(inv, RequestAttrs(reporting, "GET", "/")).forward
    (out,) = ann["checkout"].outbound
    assert out.to.expect.text == "spiffe://example.org/ns/shop/sa/inventory"
    for d in deps.values():
        assert d["spec"]["template"]["metadata"]["labels"][PREFIX + "inject"] == "true"
        assert d["spec"]["template"]["spec"]["serviceAccountName"] == d["metadata"]["name"]
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == [ann[svc["metadata"]["name"]].inbound_port]
    # Injected with the chart's own settings (native and classic), every object is still valid.
    for variant in ("default", "classic"):
        injected = inject_documents(
            docs,
            settings=settings_of(rendered[variant]),
            default_namespace="shop",
            all_pods=False,
            log=io.StringIO(),
        )
        for d in injected:
            kubernetes_validate.validate(d, "1.29.0", strict=True)
        pods = [d["spec"]["template"]["spec"] for d in injected if d["kind"] == "Deployment"]
        key = "initContainers" if variant == "default" else "containers"
        assert all(p[key][0]["name"] == "spiffe-sidecar" for p in pods)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def webhook_process(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """`webhook_main` in its own process with the chart's Secret and ConfigMap as mounted files."""
    docs = rendered["default"]
    secret = one(docs, "Secret")
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    (tmp_path / "settings.yaml").write_text(one(docs, "ConfigMap")["data"]["settings.yaml"])
    port = _free_port()
    code = (
        "import argparse, sys\n"
        "from sidecar.webhook import add_webhook_arguments, webhook_main\n"
        "p = argparse.ArgumentParser(); add_webhook_arguments(p)\n"
        "sys.exit(webhook_main(p.parse_args(sys.argv[1:])))\n"
    )
    args = [
        sys.executable,
        "-c",
        code,
        f"--cert={tmp_path / 'tls.crt'}",
        f"--key={tmp_path / 'tls.key'}",
        f"--listen=127.0.0.1:{port}",
        f"--settings={tmp_path / 'settings.yaml'}",
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until it prints "listening" (or exits)
        assert "listening" in line, line + proc.stdout.read()
        yield port, tmp_path
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_webhook_serves_with_chart_cert_and_settings(webhook_process: tuple[int, Path]) -> None:
    port, files = webhook_process
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"generateName": "x-", "annotations": {"spiffe-sidecar.io/app-port": "8080"}},
                "spec": {"containers": [{"name": "app", "image": "busybox"}]},
            },
        },
    }
    deadline = time.monotonic() + 20
    while True:  # bounded: the process printed "listening" already; retry only a transient refusal
        r = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                str(files / "ca.crt"),
                "--resolve",
                f"{SVC_HOST}:{port}:127.0.0.1",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
                f"https://{SVC_HOST}:{port}/mutate",
            ],
            input=json.dumps(review),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if r.returncode != 7 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["response"]["uid"] == review["request"]["uid"] and out["response"]["allowed"] is True
    patch = json.loads(base64.b64decode(out["response"]["patch"]))
    init = next(op for op in patch if op["path"] == "/spec/initContainers")
    assert init["value"][0]["image"] == "spiffe-sidecar:0.1.0"


# -- monitoring: PodMonitor, PrometheusRule (promtool), Grafana dashboard ---------------------------------

ALERTS_TEST = ROOT / "helm" / "alerts.test.yaml"
_METRIC_RE = re.compile(r"\b((?:spiffe_sidecar|process)_[a-z_]+)\b")


def exported_metric_names() -> set[str]:
    """Every sample name the sidecar can export (families with a sample of each kind)."""
    m = Metrics()
    m.recorder("inbound").record("spiffe://a.test/x", "allow", "r", "enforce", "GET", 200)
    names: set[str] = set()
    for family in m.registry.collect():
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "info": ["_info"]}
        names.update(family.name + s for s in suffixes.get(family.type, []))
        names.update(s.name for s in family.samples)
    return names


def test_pod_monitor_scrapes_the_injected_metrics_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pm = one(rendered["monitoring"], "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = pm["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel", "podTargetLabels"}
    assert set(spec["namespaceSelector"]) <= {"any", "matchNames"}  # the CRD knows only these (notes §3)
    (endpoint,) = spec["podMetricsEndpoints"]
    # The port name the injector gives the sidecar's metrics port.
    from sidecar.inject import METRICS_PORT_NAME

    assert endpoint["port"] == METRICS_PORT_NAME and endpoint["path"] == "/metrics"
    assert spec["selector"] == {"matchLabels": {"spiffe-sidecar.io/inject": "true"}}
    assert settings_of(rendered["default"]).metrics_port == 15020


def test_prometheus_rule_passes_promtool(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    rule = one(rendered["monitoring"], "PrometheusRule")
    # promtool reads plain rule files (notes §4): check the rendered .spec, exactly what the operator loads.
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    check = promtools.promtool("check", "rules", str(tmp_path / "rules.yaml"))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    test = promtools.promtool("test", "rules", str(ALERTS_TEST))
    assert test.returncode == 0, test.stdout + test.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERTS_TEST.read_text()))
    defined = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert tested == defined  # every alert has a test
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    assert set(_METRIC_RE.findall(exprs)) <= exported_metric_names()


def test_dashboard_is_generated_and_queries_real_metrics(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("chart_dashboard", ROOT / "helm" / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "files/dashboard.json is stale: run .venv/bin/python helm/dashboard.py"
    cm = next(d for d in rendered["monitoring"] if d["kind"] == "ConfigMap" and "dashboard" in d["metadata"]["name"])
    assert cm["metadata"]["namespace"] == "grafana" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(cm["data"]["spiffe-sidecar.json"])
    assert board == json.loads((CHART / "files" / "dashboard.json").read_text())
    assert "__inputs" not in board  # provisioning never resolves ${DS_...} (notes §5)
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "namespace", "pod"]
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"])
    used = {name for e in exprs for name in _METRIC_RE.findall(e)}
    assert used <= exported_metric_names(), used - exported_metric_names()
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("caller", "rule", "latency", "handshake", "expiry", "upstream"):
        assert topic in titles
