"""The policies in a file given to `check -f` / `explain -f` (pure): whatever a newcomer has at hand.

Recognised, in this order:
* a downward API annotations file (`key="go-quoted value"` lines, what the injected sidecar reads);
* compact policy lines (`allow GET /api/* from spiffe://...`, the inbound-policy annotation's syntax);
* Kubernetes manifests (multi-document YAML: Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets,
  Jobs, CronJobs, Lists): every pod template with `spiffe-sidecar.io/` annotations or the opt-in label;
* a mapping of annotations (`spiffe-sidecar.io/inbound-policy: |` ..., bare or under `metadata.annotations`);
* a policy file (`rules:` and `mode:`, or a bare list of rules), as `policy_file` in a config.
Every problem of every workload is collected and raised as one ConfigError.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import yaml

from .annotations import INJECT_LABEL, PREFIX, SidecarAnnotations, parse_downward_api, parse_pod_annotations
from .config import load_policy
from .errors import ConfigError, Problem
from .policy import Policy

__all__ = ["Workload", "load_policies"]

_DOWNWARD_LINE: Final = re.compile(r'[A-Za-z0-9][A-Za-z0-9._/-]*="')
_COMPACT_ACTIONS: Final = frozenset({"allow", "deny", "audit-deny"})
_TEMPLATE_KINDS: Final = frozenset(
    {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"}
)


@dataclass(frozen=True, slots=True)
class Workload:
    """One policy found in the file: `name` is `Deployment/inventory`, or the file name for a bare policy."""

    name: str
    policy: Policy
    annotations: SidecarAnnotations | None = None


def _first_token(text: str) -> str:
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            return s.split(None, 1)[0]
    return ""


def _templates(doc: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(kind/name, pod template metadata) of every pod template in a manifest document."""
    if not isinstance(doc, Mapping):
        return
    kind = doc.get("kind")
    meta: Mapping[str, Any] = doc["metadata"] if isinstance(doc.get("metadata"), Mapping) else {}
    name = f"{kind}/{meta.get('name') or meta.get('generateName') or '?'}"
    spec: Mapping[str, Any] = doc["spec"] if isinstance(doc.get("spec"), Mapping) else {}
    template: Any = None
    if kind == "List":
        for item in doc.get("items") or []:
            yield from _templates(item)
        return
    if kind == "Pod":
        template = doc
    elif kind in _TEMPLATE_KINDS:
        template = spec.get("template")
    elif kind == "CronJob":
        job = spec.get("jobTemplate")
        job_spec = job.get("spec") if isinstance(job, Mapping) else None
        template = job_spec.get("template") if isinstance(job_spec, Mapping) else None
    if isinstance(template, Mapping) and isinstance(template.get("metadata"), Mapping):
        yield name, template["metadata"]


def _ours(meta: Mapping[str, Any]) -> Mapping[str, Any] | None:
    annotations: Mapping[str, Any] = meta["annotations"] if isinstance(meta.get("annotations"), Mapping) else {}
    labels: Mapping[str, Any] = meta["labels"] if isinstance(meta.get("labels"), Mapping) else {}
    if labels.get(INJECT_LABEL) == "true" or any(isinstance(k, str) and k.startswith(PREFIX) for k in annotations):
        return annotations
    return None


def _from_annotations(name: str, annotations: Mapping[str, Any], problems: list[Problem]) -> Workload | None:
    try:
        ann = parse_pod_annotations({str(k): v for k, v in annotations.items()})
    except ConfigError as exc:
        problems.extend(Problem(f"{name}: {p.where}", p.message) for p in exc.problems)
        return None
    return Workload(name, ann.policy, ann)


def load_policies(text: str, source: str) -> list[Workload]:
    """Every policy in the file (module docstring); ConfigError listing every problem of every workload."""
    problems: list[Problem] = []
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and all(_DOWNWARD_LINE.match(ln) for ln in lines):
        try:
            raw = parse_downward_api(text.rstrip("\n"))
        except ValueError as exc:
            raise ConfigError([Problem(source, str(exc))]) from None
        w = _from_annotations(source, raw, problems)
        if w is None:
            raise ConfigError(problems)
        return [w]
    if _first_token(text) in _COMPACT_ACTIONS:
        w = _from_annotations(source, {PREFIX + "inbound-policy": text}, problems)
        if w is None:
            raise ConfigError(problems)
        return [w]
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(source, "invalid YAML: " + " ".join(str(exc).split()))]) from None
    if any(isinstance(d, Mapping) and "kind" in d for d in docs):
        found: list[Workload] = []
        for doc in docs:
            for name, meta in _templates(doc):
                annotations = _ours(meta)
                if annotations is not None and (w := _from_annotations(f"{source}: {name}", annotations, problems)):
                    found.append(w)
        if problems:
            raise ConfigError(problems)
        if not found:
            message = f"no pod template with {PREFIX} annotations or the {INJECT_LABEL} label"
            raise ConfigError([Problem(source, message)])
        return found
    if len(docs) == 1 and isinstance(docs[0], Mapping):
        doc = docs[0]
        top_meta = doc.get("metadata")
        found_ann = top_meta.get("annotations") if isinstance(top_meta, Mapping) else doc
        if isinstance(found_ann, Mapping) and any(str(k).startswith(PREFIX) for k in found_ann):
            w = _from_annotations(source, found_ann, problems)
            if w is None:
                raise ConfigError(problems)
            return [w]
    return [Workload(source, load_policy(text, source))]
