"""`check -f` / `explain -f` inputs: manifests, annotation mappings, the downward API file, compact lines and
policy files all give the same compiled policy; problems of every workload come out together."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sidecar.errors import ConfigError
from sidecar.identity import SpiffeId
from sidecar.policy import RequestAttrs, authorize
from sidecar.policyfile import load_policies

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = "spiffe://example.org/ns/shop/sa/checkout"
COMPACT = f"allow GET /api/stock/* from {CHECKOUT} as reads\n"


def _allows(text: str) -> bool:
    (w,) = load_policies(text, "f")
    return authorize(w.policy, RequestAttrs(SpiffeId.parse(CHECKOUT), "GET", "/api/stock/1")).allowed


def test_every_kind_of_input() -> None:
    assert _allows(COMPACT)
    assert _allows(yaml.safe_dump({"spiffe-sidecar.io/inbound-policy": COMPACT}))
    assert _allows(yaml.safe_dump({"metadata": {"annotations": {"spiffe-sidecar.io/inbound-policy": COMPACT}}}))
    assert _allows('spiffe-sidecar.io/inbound-policy="' + COMPACT.strip() + '"\nkubernetes.io/config.seen="x"')
    assert _allows(yaml.safe_dump({"rules": [{"name": "reads", "action": "allow", "methods": ["GET"],
                                             "paths": ["/api/stock/*"], "callers": [CHECKOUT]}]}))  # fmt: skip
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": {
        "spiffe-sidecar.io/inbound-policy": COMPACT}}, "spec": {"containers": []}}  # fmt: skip
    assert _allows(yaml.safe_dump(pod))
    listed = {"apiVersion": "v1", "kind": "List", "items": [pod]}
    assert [w.name for w in load_policies(yaml.safe_dump(listed), "f")] == ["f: Pod/p"]


def test_manifest_workloads_and_problems_of_all_of_them() -> None:
    demo = (ROOT / "helm" / "examples" / "demo.yaml").read_text()
    names = [w.name for w in load_policies(demo, "demo.yaml")]
    assert names == ["demo.yaml: Deployment/inventory", "demo.yaml: Deployment/checkout",
                     "demo.yaml: Deployment/reporting"]  # fmt: skip
    broken = demo.replace("allow GET /api/stock/*", "allow GET api/stock/*").replace(
        "action: allow", "action: ALLOW")
    with pytest.raises(ConfigError) as info:
        load_policies(broken, "demo.yaml")
    where = [p.where for p in info.value.problems]
    prefix = "annotation spiffe-sidecar.io/inbound-policy"
    assert any(w.startswith(f"demo.yaml: Deployment/inventory: {prefix}") for w in where)
    assert any(w.startswith(f"demo.yaml: Deployment/checkout: {prefix}") for w in where)


def test_errors() -> None:
    with pytest.raises(ConfigError, match="no pod template"):
        load_policies(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}), "f")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_policies("rules: [", "f")
    with pytest.raises(ConfigError, match="line 1"):
        load_policies('spiffe-sidecar.io/inbound-policy="unterminated', "f")
