"""`spiffe-sidecar inject -f manifest.yaml [-o out.yaml] [--classic] [--all]`: offline injection.

Runs the webhook's own `inject()` over the pod templates of a multi-document manifest, so `kubectl apply`
of the output gives the same pods the webhook would produce (handy for GitOps and for clusters without
the webhook). Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs and `List`s are
handled; other kinds pass through unchanged. Only pod templates carrying the opt-in label
`spiffe-sidecar.io/inject: "true"` are injected, unless `--all`. YAML comments are not preserved.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from .annotations import INJECT_LABEL
from .errors import ConfigError, Problem

if TYPE_CHECKING:
    # Imported where used: the command line imports this module for `inject`'s options on every command,
    # `spiffe-sidecar run` included, which needs neither the injector nor jsonpatch.
    from .inject import InjectSettings

__all__ = ["add_inject_arguments", "inject_documents", "inject_main"]

_TEMPLATE_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"})


def add_inject_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f", "--filename", required=True, metavar="FILE", help="manifest (multi-document YAML); - for stdin"
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--classic", action="store_true", help="classic sidecars (first container + postStart wait)")
    p.add_argument("--all", action="store_true", help="inject every pod template, not only opted-in ones")
    p.add_argument("--namespace", default="default", help="namespace for objects without one (default: default)")
    p.add_argument("--image", help="sidecar image (default: the injector default)")
    p.add_argument("--settings", type=Path, metavar="FILE", help="injector settings YAML (the chart's ConfigMap)")


def _pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(description, holder) pairs where holder has `metadata` and `spec` of a pod (edited in place)."""
    kind = doc.get("kind")
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else None
    name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc.get("metadata"), dict) else "?"
    if kind == "Pod":
        yield f"Pod/{name}", doc
    elif kind in _TEMPLATE_KINDS and spec is not None and isinstance(spec.get("template"), dict):
        yield f"{kind}/{name}", spec["template"]
    elif kind == "CronJob" and spec is not None:
        job = spec.get("jobTemplate")
        if (
            isinstance(job, dict)
            and isinstance(job.get("spec"), dict)
            and isinstance(job["spec"].get("template"), dict)
        ):
            yield f"CronJob/{name}", job["spec"]["template"]


def inject_documents(
    docs: list[Any], *, settings: InjectSettings, default_namespace: str, all_pods: bool, log: TextIO
) -> list[Any]:
    """Inject into every opted-in pod template of `docs` (in place on copies); ConfigError with every problem."""
    from .inject import inject

    problems: list[Problem] = []
    out: list[Any] = []
    for doc in docs:
        if not isinstance(doc, dict):
            out.append(doc)
            continue
        if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            items = inject_documents(
                doc["items"], settings=settings, default_namespace=default_namespace, all_pods=all_pods, log=log
            )
            out.append({**doc, "items": items})
            continue
        meta = doc.get("metadata")
        namespace = str((meta.get("namespace") if isinstance(meta, dict) else None) or default_namespace)
        new_doc = doc
        for what, holder in list(_pod_specs(doc)):
            labels = (holder.get("metadata") or {}).get("labels") or {}
            if not all_pods and labels.get(INJECT_LABEL) != "true":
                print(f'skipped {what}: no label {INJECT_LABEL}: "true" (use --all)', file=log)
                continue
            pod = {"metadata": holder.get("metadata") or {}, "spec": holder.get("spec") or {}}
            try:
                result = inject(pod, namespace=namespace, settings=settings)
            except ConfigError as exc:
                problems.extend(Problem(f"{namespace}/{what}: {p.where}", p.message) for p in exc.problems)
                continue
            if not result.injected:
                print(f"skipped {what}: {result.skipped}", file=log)
                continue
            if new_doc is doc:
                new_doc = _copy(doc)
            # Re-find the holder in the copy (same traversal) and replace its metadata/spec.
            for what2, holder2 in _pod_specs(new_doc):
                if what2 == what:
                    holder2["metadata"] = result.pod["metadata"]
                    holder2["spec"] = result.pod["spec"]
            for w in result.warnings:
                print(f"warning: {what}: {w}", file=log)
            print(f"injected {namespace}/{what}", file=log)
        out.append(new_doc)
    if problems:
        raise ConfigError(problems)
    return out


def _copy(doc: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(doc)


def inject_main(args: argparse.Namespace, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Exit status: 0 done, 2 bad input (every problem printed to stderr, nothing written)."""
    from .webhook import load_inject_settings

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    try:
        settings = load_inject_settings(args.settings, args.image)
        if args.classic:
            settings = settings.with_native(False)
        source = "<stdin>" if args.filename == "-" else args.filename
        try:
            text = stdin.read() if args.filename == "-" else Path(args.filename).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([Problem(source, f"cannot read: {getattr(exc, 'strerror', None) or exc}")]) from None
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            raise ConfigError([Problem(source, f"invalid YAML: {exc}")]) from None
        result = inject_documents(
            docs, settings=settings, default_namespace=args.namespace, all_pods=args.all, log=sys.stderr
        )
    except ConfigError as exc:
        for p in exc.problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    rendered = yaml.safe_dump_all(result, sort_keys=False, default_flow_style=False, width=120)
    if args.output:
        Path(args.output).write_text(rendered, encoding="utf-8")
    else:
        stdout.write(rendered)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m sidecar.inject_cli`) until cli.py wires `spiffe-sidecar inject`."""
    p = argparse.ArgumentParser(prog="spiffe-sidecar inject", description="Inject the sidecar into manifests.")
    add_inject_arguments(p)
    return inject_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
