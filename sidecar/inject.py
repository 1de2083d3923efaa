"""Pod -> pod with the spiffe-sidecar injected (pure core; the webhook and `spiffe-sidecar inject` share it).

`mutate()` deep-copies the pod and edits the copy; `patch_for()` is the RFC 6902 diff of the two
(`jsonpatch.make_patch`), so RFC 6901 escaping (`spiffe-sidecar.io~1status`) and absent parents
(`add /spec/initContainers [...]`) come out right without hand-written paths (kubernetes-notes §2.2).

What is injected (kubernetes-notes §1, §3, §4):

* The sidecar as a native sidecar: the first `initContainers` entry with `restartPolicy: Always`
  (Kubernetes >= 1.29). Its startupProbe passes only once an SVID is held and the listeners are bound, so
  the app containers start after it (the kubelet starts the next container once `started` is true).
  Classic fallback (`native-sidecar: "false"` or `InjectSettings.native=False`): first in `containers`
  with a postStart exec hook that blocks until the sidecar is ready (Istio's holdApplicationUntilProxyStarts).
* Probes: the kubelet probes from the node to the pod IP, and the admin server (/config, /metrics) must
  stay on loopback. So the sidecar serves a separate plain-HTTP *probe port* (default 15021, every
  interface) with exactly: `/spiffe-sidecar/healthz`, `/spiffe-sidecar/readyz` (status only) and the app
  probe paths listed in `SPIFFE_SIDECAR_PROBES`, forwarded to the app on 127.0.0.1. Every httpGet
  liveness/readiness/startup probe of the app containers (without `host`) is rewritten to that port. The
  path is kept unless two probes need different targets for one path (or it collides with the sidecar's
  own), then it becomes `/spiffe-sidecar/app-probe/<container>/<kind>`.
* The SPIFFE CSI volume (`csi.spiffe.io`, readOnly) at /spiffe-workload-api and SPIFFE_ENDPOINT_SOCKET;
  a downward API volume with `metadata.annotations` (a directory mount, not subPath, so the kubelet's
  `..data` swap reaches the sidecar and the policy reloads live).
* Metrics: a read-only /metrics port on the pod IP (default 15020, the `metrics-port` annotation or
  `metricsPort`; 0 turns it off), the named containerPort `spiffe-metrics`, and the pod annotations
  `prometheus.io/scrape|port|path` for the scrape configs that honour them, unless the pod already has
  `prometheus.io/` annotations of its own (they are the app's: left alone, with a warning).
* `spiffe-sidecar.io/status` (JSON: version, injected names). A pod that has it, or that has a container
  or init container named like the sidecar, is left alone: a second `mutate()` is a no-op.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import jsonpatch

from .annotations import (
    ENV_POD_IP,
    ENV_PROBE_PORT,
    ENV_PROBES,
    INJECT_LABEL,
    STATUS_ANNOTATION,
    ProbeRoute,
    SidecarAnnotations,
    parse_pod_annotations,
)
from .config import ENV_ADMIN_PORT, ENV_APP_PORT, ENV_INBOUND_PORT, ENV_METRICS_PORT, ENV_SOCKET
from .errors import ConfigError, Problem

__all__ = [
    "ANNOTATIONS_DIR",
    "ENV_POD_IP",
    "ENV_POD_NAMESPACE",
    "ENV_PROBES",
    "ENV_PROBE_PORT",
    "HEALTHZ_PATH",
    "INJECTOR_VERSION",
    "METRICS_PORT_NAME",
    "MIRROR_ANNOTATION",
    "PODINFO_VOLUME",
    "READYZ_PATH",
    "WORKLOAD_API_VOLUME",
    "InjectResult",
    "InjectSettings",
    "inject",
    "mutate",
    "patch_for",
]

INJECTOR_VERSION: Final = "0.1.0"
MIRROR_ANNOTATION: Final = "kubernetes.io/config.mirror"  # static pods' mirrors: never mutate (notes §2.3)
WORKLOAD_API_VOLUME: Final = "spiffe-workload-api"
PODINFO_VOLUME: Final = "spiffe-sidecar-podinfo"
ANNOTATIONS_DIR: Final = "/etc/spiffe-sidecar"
READYZ_PATH: Final = "/spiffe-sidecar/readyz"
HEALTHZ_PATH: Final = "/spiffe-sidecar/healthz"
_APP_PROBE_PREFIX: Final = "/spiffe-sidecar/app-probe/"
ENV_POD_NAMESPACE: Final = "SPIFFE_SIDECAR_POD_NAMESPACE"
INBOUND_PORT_NAME: Final = "spiffe-mtls"
PROBE_PORT_NAME: Final = "spiffe-probe"
METRICS_PORT_NAME: Final = "spiffe-metrics"
PROMETHEUS_PREFIX: Final = "prometheus.io/"
_PROBE_KINDS: Final = ("startupProbe", "readinessProbe", "livenessProbe")
_IMAGE_RE: Final = re.compile(r"[^\s]+")
_DNS_LABEL_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class InjectSettings:
    """Injector-wide settings (chart values -> ConfigMap -> `InjectSettings.from_mapping`)."""

    image: str = "spiffe-sidecar:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    native: bool = True
    sidecar_name: str = "spiffe-sidecar"
    admin_port: int = 15000
    probe_port: int = 15021
    metrics_port: int = 15020  # 0: no metrics listener, no prometheus.io annotations
    csi_driver: str = "csi.spiffe.io"
    socket_dir: str = "/spiffe-workload-api"
    socket_name: str = "spire-agent.sock"
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"
    # Startup budget = failure_threshold x period: SPIRE registration is eventually consistent
    # (PermissionDenied until the entry exists, notes §1.2), so be tolerant.
    startup_failure_threshold: int = 120
    startup_period_seconds: int = 1
    wait_ready_seconds: int = 120  # classic mode: how long the postStart hook waits
    excluded_namespaces: frozenset[str] = field(default_factory=lambda: frozenset({"kube-system", "kube-public"}))
    log_level: str = "info"
    log_format: str = "text"  # or json, for log pipelines that parse lines

    @classmethod
    def from_mapping(cls, data: Any, source: str) -> InjectSettings:
        """Parse the injector ConfigMap (camelCase keys, like the chart values); ConfigError lists problems."""
        problems: list[Problem] = []
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError([Problem(source, "expected a mapping of injector settings")])
        fields_map = {
            "image": ("image", str),
            "imagePullPolicy": ("image_pull_policy", str),
            "native": ("native", bool),
            "sidecarName": ("sidecar_name", str),
            "adminPort": ("admin_port", int),
            "probePort": ("probe_port", int),
            "metricsPort": ("metrics_port", int),
            "csiDriver": ("csi_driver", str),
            "socketDir": ("socket_dir", str),
            "socketName": ("socket_name", str),
            "cpuRequest": ("cpu_request", str),
            "memoryRequest": ("memory_request", str),
            "cpuLimit": ("cpu_limit", str),
            "memoryLimit": ("memory_limit", str),
            "startupFailureThreshold": ("startup_failure_threshold", int),
            "startupPeriodSeconds": ("startup_period_seconds", int),
            "waitReadySeconds": ("wait_ready_seconds", int),
            "excludedNamespaces": ("excluded_namespaces", list),
            "logLevel": ("log_level", str),
            "logFormat": ("log_format", str),
        }
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in fields_map:
                problems.append(Problem(f"{source}: {key}", f"unknown key (expected one of: {', '.join(fields_map)})"))
                continue
            attr, typ = fields_map[key]
            ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
            if typ is list:
                ok = ok and all(isinstance(x, str) for x in value)
            if not ok:
                problems.append(Problem(f"{source}: {key}", f"expected {typ.__name__}, got {value!r}"))
                continue
            kwargs[attr] = frozenset(value) if typ is list else value
        settings = cls(**kwargs)
        for p in settings.problems():
            problems.append(Problem(source, p))
        if problems:
            raise ConfigError(problems)
        return settings

    def problems(self) -> list[str]:
        out: list[str] = []
        if not self.image or _IMAGE_RE.fullmatch(self.image) is None:
            out.append("image must be a non-empty image reference")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            out.append("imagePullPolicy must be Always, IfNotPresent or Never")
        if _DNS_LABEL_RE.fullmatch(self.sidecar_name) is None:
            out.append("sidecarName must be a DNS label")
        for name in ("admin_port", "probe_port"):
            if not 1 <= getattr(self, name) <= 65535:
                out.append(f"{name} must be 1-65535")
        if self.admin_port == self.probe_port:
            out.append("adminPort and probePort must differ")
        if not 0 <= self.metrics_port <= 65535:
            out.append("metrics_port must be 0-65535 (0: off)")
        elif self.metrics_port in (self.admin_port, self.probe_port):
            out.append("metricsPort must differ from adminPort and probePort")
        for name in ("startup_failure_threshold", "startup_period_seconds", "wait_ready_seconds"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1")
        if self.log_format not in ("text", "json"):
            out.append("logFormat must be text or json")
        if not self.socket_dir.startswith("/"):
            out.append("socketDir must be an absolute path")
        return out

    def with_native(self, native: bool) -> InjectSettings:
        return replace(self, native=native)


@dataclass(frozen=True, slots=True)
class InjectResult:
    """The mutated pod (a deep copy), whether it was injected, why not, and warnings for the user."""

    pod: dict[str, Any]
    injected: bool
    skipped: str | None = None
    warnings: tuple[str, ...] = ()
    probe_routes: tuple[ProbeRoute, ...] = ()


def mutate(pod: Mapping[str, Any], *, namespace: str, settings: InjectSettings) -> dict[str, Any]:
    """The pod with the sidecar injected (a deep copy; the input is never modified).

    Raises ConfigError when the pod's `spiffe-sidecar.io/` annotations do not compile or its ports clash.
    """
    return inject(pod, namespace=namespace, settings=settings).pod


def patch_for(pod: Mapping[str, Any], *, namespace: str, settings: InjectSettings) -> list[dict[str, Any]]:
    """The RFC 6902 JSON patch from `pod` to `mutate(pod)`; `[]` when nothing changes."""
    mutated = mutate(pod, namespace=namespace, settings=settings)
    ops: list[dict[str, Any]] = jsonpatch.make_patch(dict(pod), mutated).patch
    return ops


def _skip(pod: dict[str, Any], reason: str) -> InjectResult:
    return InjectResult(pod, False, reason)


def inject(pod: Mapping[str, Any], *, namespace: str, settings: InjectSettings) -> InjectResult:
    """`mutate()` with the details: skip reason, warnings (for AdmissionReview `warnings`), probe routes.

    `namespace` comes from the AdmissionReview request (the object's own field may be empty there).
    """
    out: dict[str, Any] = copy.deepcopy(dict(pod))
    metadata = out.get("metadata")
    if not isinstance(metadata, dict):
        metadata = out["metadata"] = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise ConfigError([Problem("pod", "metadata must be a mapping")])
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ConfigError([Problem("pod", "metadata.annotations must be a mapping")])
    if MIRROR_ANNOTATION in annotations:
        return _skip(out, "mirror pod")
    if namespace in settings.excluded_namespaces:
        return _skip(out, f"namespace {namespace} is excluded")
    opt = annotations.get(INJECT_LABEL)
    if isinstance(opt, str) and opt.strip().lower() == "false":
        return _skip(out, f'annotation {INJECT_LABEL}: "false"')
    spec = out.get("spec")
    if not isinstance(spec, dict):
        raise ConfigError([Problem("pod", "spec must be a mapping")])
    containers = spec.get("containers")
    init_containers = spec.get("initContainers") or []
    if not isinstance(containers, list) or not containers or not isinstance(init_containers, list):
        raise ConfigError([Problem("pod", "spec.containers must be a non-empty list")])
    # Already injected? Look in both lists (Linkerd #12395) and at the status marker (Istio, Vault).
    names = {c.get("name") for c in [*containers, *init_containers] if isinstance(c, dict)}
    if settings.sidecar_name in names or STATUS_ANNOTATION in annotations:
        return _skip(out, "already injected")

    ann = parse_pod_annotations({k: v for k, v in annotations.items() if isinstance(k, str)})
    native = settings.native if ann.native_sidecar is None else ann.native_sidecar
    warnings: list[str] = []
    problems: list[Problem] = []

    app_port = ann.app_port
    if app_port is None:
        app_port = _first_tcp_port(containers)
        if app_port is None:
            raise ConfigError(
                [
                    Problem(
                        "annotation spiffe-sidecar.io/app-port", "required: no container declares a TCP containerPort"
                    )
                ]
            )
        warnings.append(f"spiffe-sidecar.io/app-port not set: using containerPort {app_port}")

    used = _used_ports(containers, init_containers)
    metrics_port = settings.metrics_port if ann.metrics_port is None else ann.metrics_port
    ours = {ann.inbound_port: "inbound", settings.probe_port: "probe", settings.admin_port: "admin"}
    if len(ours) != 3:
        problems.append(
            Problem("annotation spiffe-sidecar.io/inbound-port", "clashes with the sidecar's admin or probe port")
        )
    if metrics_port:
        if metrics_port in ours:
            problems.append(
                Problem("annotation spiffe-sidecar.io/metrics-port", f"{metrics_port} is the sidecar's "
                        f"{ours[metrics_port]} port")
            )  # fmt: skip
        ours[metrics_port] = "metrics"
    for port, what in ours.items():
        if port == app_port:
            problems.append(Problem("annotation spiffe-sidecar.io/app-port", f"{port} is the sidecar's {what} port"))
        elif port in used:
            problems.append(Problem("pod", f"container {used[port]} uses port {port}, the sidecar's {what} port"))
    port_names = {p.get("name") for c in [*containers, *init_containers] if isinstance(c, dict) for p in _ports(c)}
    for pname in (INBOUND_PORT_NAME, PROBE_PORT_NAME, METRICS_PORT_NAME):
        if pname in port_names:
            problems.append(Problem("pod", f"a container already has a port named {pname}"))
    if spec.get("hostNetwork") is True:
        problems.append(Problem("pod", "hostNetwork pods cannot be injected: the sidecar would bind node ports"))
    if problems:
        raise ConfigError(problems)

    routes = _rewrite_probes(containers, app_port, settings.probe_port, warnings)
    sidecar = _sidecar_container(settings, ann, app_port, routes, native, metrics_port)
    if native:
        spec["initContainers"] = [sidecar, *init_containers]
    else:
        spec["containers"] = [sidecar, *containers]
        if spec.get("restartPolicy") in ("Never", "OnFailure"):
            warnings.append("classic sidecar: a Job-style pod never completes while the sidecar runs; use native")
    _add_volumes(spec, settings)

    status = {
        "version": INJECTOR_VERSION,
        "native": native,
        "containers": [settings.sidecar_name],
        "volumes": [WORKLOAD_API_VOLUME, PODINFO_VOLUME],
    }
    new_annotations = dict(annotations)
    if metrics_port:
        if any(isinstance(k, str) and k.startswith(PROMETHEUS_PREFIX) for k in annotations):
            warnings.append(
                "the pod has prometheus.io/ annotations of its own: kept; scrape the sidecar's "
                f"{METRICS_PORT_NAME} port ({metrics_port}) with the chart's PodMonitor"
            )
        else:
            new_annotations[PROMETHEUS_PREFIX + "scrape"] = "true"
            new_annotations[PROMETHEUS_PREFIX + "port"] = str(metrics_port)
            new_annotations[PROMETHEUS_PREFIX + "path"] = "/metrics"
    new_annotations[STATUS_ANNOTATION] = json.dumps(status, separators=(",", ":"), sort_keys=True)
    metadata["annotations"] = new_annotations
    return InjectResult(out, True, None, tuple(warnings), routes)


def _ports(container: Mapping[str, Any]) -> list[dict[str, Any]]:
    ports = container.get("ports") or []
    return [p for p in ports if isinstance(p, dict)] if isinstance(ports, list) else []


def _first_tcp_port(containers: list[Any]) -> int | None:
    for c in containers:
        if isinstance(c, dict):
            for p in _ports(c):
                port = p.get("containerPort")
                if p.get("protocol", "TCP") == "TCP" and isinstance(port, int) and not isinstance(port, bool):
                    return port
    return None


def _used_ports(*lists: list[Any]) -> dict[int, str]:
    out: dict[int, str] = {}
    for lst in lists:
        for c in lst:
            if isinstance(c, dict):
                for p in _ports(c):
                    port = p.get("containerPort")
                    if isinstance(port, int):
                        out.setdefault(port, str(c.get("name")))
    return out


def _resolve_port(container: Mapping[str, Any], port: Any) -> int | None:
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if isinstance(port, str):
        if port.isdigit():
            return int(port)
        for p in _ports(container):
            if p.get("name") == port and isinstance(p.get("containerPort"), int):
                value: int = p["containerPort"]
                return value
    return None


def _rewrite_probes(
    containers: list[Any], app_port: int, probe_port: int, warnings: list[str]
) -> tuple[ProbeRoute, ...]:
    """Point every httpGet probe at the sidecar's probe port; return the routes it must forward."""
    routes: dict[str, ProbeRoute] = {}
    for c in containers:
        if not isinstance(c, dict):
            continue
        cname = str(c.get("name"))
        for kind in _PROBE_KINDS:
            probe = c.get(kind)
            if not isinstance(probe, dict):
                continue
            get = probe.get("httpGet")
            if not isinstance(get, dict):
                if isinstance(probe.get("tcpSocket"), dict) or isinstance(probe.get("grpc"), dict):
                    sock = probe.get("tcpSocket") or probe.get("grpc") or {}
                    if _resolve_port(c, sock.get("port")) == app_port:
                        warnings.append(
                            f"{cname} {kind}: tcpSocket/grpc probes on the app port fail once the app binds "
                            "127.0.0.1; use httpGet (rewritten) or exec"
                        )
                continue
            if get.get("host"):
                continue  # probes another host: not ours to reroute
            port = _resolve_port(c, get.get("port"))
            if port is None:
                warnings.append(f"{cname} {kind}: httpGet port {get.get('port')!r} not found; probe left unchanged")
                continue
            app_path = get.get("path") or "/"
            if not isinstance(app_path, str) or not app_path.startswith("/"):
                app_path = "/" + str(app_path)
            scheme = get.get("scheme") or "HTTP"
            route = ProbeRoute(app_path, port, app_path, str(scheme))
            existing = routes.get(app_path)
            if app_path.startswith("/spiffe-sidecar/") or (existing is not None and existing != route):
                route = ProbeRoute(f"{_APP_PROBE_PREFIX}{cname}/{kind}", port, app_path, str(scheme))
            routes[route.path] = route
            get["port"] = probe_port
            get["path"] = route.path
            get["scheme"] = "HTTP"  # the probe port is plain HTTP; the sidecar uses `scheme` towards the app
    return tuple(routes.values())


def _sidecar_container(
    settings: InjectSettings,
    ann: SidecarAnnotations,
    app_port: int,
    routes: tuple[ProbeRoute, ...],
    native: bool,
    metrics_port: int,
) -> dict[str, Any]:
    def http_probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": settings.probe_port, "scheme": "HTTP"},
            "periodSeconds": period,
            "timeoutSeconds": 1,
            "failureThreshold": failures,
        }

    container: dict[str, Any] = {
        "name": settings.sidecar_name,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": [
            *("run", "--from-annotations", f"{ANNOTATIONS_DIR}/annotations"),
            *("--log-level", settings.log_level, "--log-format", settings.log_format),
        ],
        "env": [
            {"name": ENV_SOCKET, "value": f"unix://{settings.socket_dir}/{settings.socket_name}"},
            {"name": ENV_INBOUND_PORT, "value": str(ann.inbound_port)},
            {"name": ENV_APP_PORT, "value": str(app_port)},
            {"name": ENV_ADMIN_PORT, "value": str(settings.admin_port)},
            {"name": ENV_PROBE_PORT, "value": str(settings.probe_port)},
            {"name": ENV_PROBES, "value": json.dumps([r.to_json() for r in routes], separators=(",", ":"))},
            {"name": ENV_POD_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            # For the bypass check: does the app port answer on the pod IP? (sidecar/bypass.py)
            {"name": ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "ports": [
            {"name": INBOUND_PORT_NAME, "containerPort": ann.inbound_port, "protocol": "TCP"},
            {"name": PROBE_PORT_NAME, "containerPort": settings.probe_port, "protocol": "TCP"},
        ],
        "volumeMounts": [
            {"name": WORKLOAD_API_VOLUME, "mountPath": settings.socket_dir, "readOnly": True},
            # A directory mount (never subPath): the kubelet's ..data swap must reach us (notes §3.2).
            {"name": PODINFO_VOLUME, "mountPath": ANNOTATIONS_DIR, "readOnly": True},
        ],
        "resources": {
            "requests": {
                "cpu": ann.cpu_request or settings.cpu_request,
                "memory": ann.memory_request or settings.memory_request,
            },
            "limits": {
                "cpu": ann.cpu_limit or settings.cpu_limit,
                "memory": ann.memory_limit or settings.memory_limit,
            },
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "startupProbe": http_probe(READYZ_PATH, settings.startup_period_seconds, settings.startup_failure_threshold),
        "readinessProbe": http_probe(READYZ_PATH, 5, 3),
        "livenessProbe": http_probe(HEALTHZ_PATH, 10, 3),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if metrics_port:
        container["env"].append({"name": ENV_METRICS_PORT, "value": str(metrics_port)})
        container["ports"].append({"name": METRICS_PORT_NAME, "containerPort": metrics_port, "protocol": "TCP"})
    if native:
        container["restartPolicy"] = "Always"
    else:
        # postStart blocks the kubelet from starting the next container until we are ready (notes §1.4).
        container["lifecycle"] = {"postStart": {"exec": {"command": _wait_ready_command(settings)}}}
    return container


def _wait_ready_command(settings: InjectSettings) -> list[str]:
    url = f"http://127.0.0.1:{settings.probe_port}{READYZ_PATH}"
    script = (
        "import time,urllib.request as u\n"
        f"for _ in range({settings.wait_ready_seconds}):\n"
        "    try:\n"
        f"        u.urlopen({url!r},timeout=1).close()\n"
        "        raise SystemExit(0)\n"
        "    except OSError:\n"
        "        time.sleep(1)\n"
        "raise SystemExit(1)\n"
    )
    return ["python3", "-c", script]


def _add_volumes(spec: dict[str, Any], settings: InjectSettings) -> None:
    wanted = [
        {"name": WORKLOAD_API_VOLUME, "csi": {"driver": settings.csi_driver, "readOnly": True}},
        {
            "name": PODINFO_VOLUME,
            "downwardAPI": {"items": [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]},
        },
    ]
    volumes = spec.get("volumes") or []
    if not isinstance(volumes, list):
        raise ConfigError([Problem("pod", "spec.volumes must be a list")])
    by_name = {v.get("name"): v for v in volumes if isinstance(v, dict)}
    added = []
    for vol in wanted:
        have = by_name.get(vol["name"])
        if have is None:
            added.append(vol)
        elif have != vol:
            raise ConfigError([Problem("pod", f"a different volume named {vol['name']} already exists")])
    spec["volumes"] = [*volumes, *added]
