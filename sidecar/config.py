"""Sidecar settings: frozen dataclasses parsed once from YAML + environment + CLI (pure core).

The loader collects every problem with its location (`file:line: field.path: message`) and raises
`ConfigError`; a bad config never starts and never replaces a good one. Line numbers come from PyYAML's
node marks (`parse_yaml` composes the node tree and records the line of every field path), and are passed
to `compile_policy` so that policy problems carry them too. The schema is documented, with comments, in
config/inventory.yaml. `parse_settings` is pure (file reads and the environment are injected);
`load_settings` is the thin reader around it.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

import yaml

from .addr import HostPort as HostPort
from .addr import is_loopback as is_loopback
from .addr import parse_host_port as parse_host_port
from .endpoint import TcpEndpoint, UnixEndpoint
from .errors import ConfigError, IdentityError, Problem
from .http1 import ROUTING_OVERRIDE_HEADERS
from .identity import CallerPattern, TrustDomain
from .policy import Policy, compile_policy
from .problems import Problems
from .values import (
    Invalid,
    endpoint,
    env_port,
    header_name_list,
    host_port,
    jwt_audience,
    one_of,
    path_prefix,
    server_pattern,
)


class ListenerMode(enum.Enum):
    HTTP = "http"
    TCP = "tcp"


class AppProtocol(enum.Enum):
    """What the app behind the inbound listener speaks. HTTP/2 callers (ALPN h2) reach an `http1` app
    translated to HTTP/1.1 (gRPC cannot be: it needs trailers); an `h2c` app gets HTTP/2 with prior knowledge
    over a few multiplexed connections; a `grpc` app too, and non-gRPC requests are refused (415)."""

    HTTP1 = "http1"
    H2C = "h2c"
    GRPC = "grpc"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines in seconds; every await on the request path runs under one of these."""

    handshake: float = 5.0
    request_head: float = 10.0
    idle: float = 60.0
    upstream_connect: float = 2.0
    upstream_response: float = 30.0
    drain: float = 20.0
    # Outbound: a target that failed to connect is answered with a fast 503 for this long (no jitter:
    # one probe connection per route per period, and deterministic behaviour for the app).
    target_down_backoff: float = 2.0
    # A peer that takes no response bytes for this long (our write buffer stays full), or stops sending a
    # request body mid-way for `request_body_stall`, is cut off: it would otherwise pin its connection and
    # the upstream one indefinitely. Measured between progress, not over the whole exchange.
    write_stall: float = 10.0
    request_body_stall: float = 30.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 10_000
    # Accepted sockets still in the TLS handshake (unauthenticated): a smaller budget of their own, so
    # silent sockets cannot take every max_connections slot from verified peers. None: a quarter of
    # max_connections, at most 256 (`pending_handshakes`).
    max_pending_handshakes: int | None = None
    max_header_bytes: int = 64 * 1024
    max_request_line_bytes: int = 8 * 1024
    max_body_bytes: int | None = None  # None: unlimited (streamed, bounded memory either way)
    upstream_pool_size: int = 64

    @property
    def pending_handshakes(self) -> int:
        """The effective limit on connections still in the TLS handshake (never above max_connections)."""
        if self.max_pending_handshakes is None:
            return max(1, min(256, self.max_connections // 4))
        return min(self.max_pending_handshakes, self.max_connections)


@dataclass(frozen=True, slots=True)
class WorkloadApiSettings:
    endpoint: UnixEndpoint | TcpEndpoint


@dataclass(frozen=True, slots=True)
class PemSourceSettings:
    cert_chain: Path
    key: Path
    bundle: Path
    trust_domain: TrustDomain | None = None
    federated: tuple[tuple[TrustDomain, Path], ...] = ()
    poll_interval: float = 1.0
    # One JWKS file per trust domain: the JWT bundles JWT-SVIDs are validated against (reloaded live).
    jwt_bundles: tuple[tuple[TrustDomain, Path], ...] = ()


@dataclass(frozen=True, slots=True)
class InboundSettings:
    listen: HostPort
    app: HostPort
    mode: ListenerMode = ListenerMode.HTTP
    policy: Policy | None = None  # compiled; None only before loading
    policy_file: Path | None = None  # when set, reloaded live (downward API file or YAML)
    # Request fields never forwarded to the app (routing/method overrides, http1.ROUTING_OVERRIDE_HEADERS);
    # lower-case names. Replaces the default list when configured; [] forwards them all.
    strip_request_headers: tuple[str, ...] = ROUTING_OVERRIDE_HEADERS
    # A validated step-up JWT-SVID is not forwarded to the app by default (the app gets its subject and
    # audience in x-spiffe-jwt-subject / -audience); true forwards the Authorization field as received.
    forward_jwt: bool = False
    app_protocol: AppProtocol = AppProtocol.HTTP1


class AuthorizationMode(enum.Enum):
    """What an attached JWT-SVID does to an `Authorization` field the app sent itself."""

    REPLACE = "replace"  # ours replaces it: a token the app holds (perhaps its own caller's) never leaves
    KEEP = "keep"  # the app's is sent as it is and ours is not attached


@dataclass(frozen=True, slots=True)
class OutboundJwt:
    """Attach a JWT-SVID for `audience` (fetched with FetchJWTSVID, renewed at half-life) as
    `Authorization: Bearer` to requests whose path is `path_prefix` or below it (whole segments)."""

    audience: str
    path_prefix: str = "/"
    authorization: AuthorizationMode = AuthorizationMode.REPLACE


@dataclass(frozen=True, slots=True)
class OutboundTarget:
    """Where an outbound route goes and which server SPIFFE ID it must present (checked after the
    handshake, before a byte is sent). `target.host` may be a DNS name: resolved per connection attempt.
    `jwt`: the JWT-SVIDs attached to its requests, by path prefix (the longest matching prefix wins)."""

    target: HostPort
    expect: CallerPattern
    jwt: tuple[OutboundJwt, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboundRoute:
    """A fixed local port for one target: the app speaks plain HTTP/1.1 (or TCP) to `listen` (loopback)."""

    name: str
    listen: HostPort
    to: OutboundTarget
    mode: ListenerMode = ListenerMode.HTTP


@dataclass(frozen=True, slots=True)
class OutboundProxySettings:
    """An HTTP proxy port (for apps honouring HTTP_PROXY): the request's Host picks the route."""

    listen: HostPort
    routes: tuple[tuple[str, OutboundTarget], ...]  # (lower-case host without port, target)


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 15000))


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """`listen`: the read-only /metrics listener for Prometheus (None: only the admin /metrics);
    `max_callers`: distinct caller SPIFFE IDs labelled by name, the rest count as `other`."""

    listen: HostPort | None = None
    max_callers: int = 50


@dataclass(frozen=True, slots=True)
class AuditSettings:
    path: str = "-"  # "-" is stdout
    sample_allows: float = 1.0  # fraction of allow decisions logged; denies are always logged
    deny_per_second: float = 100.0  # token bucket for deny lines; dropped lines are counted and reported
    deny_burst: int = 200


@dataclass(frozen=True, slots=True)
class Settings:
    source: WorkloadApiSettings | PemSourceSettings
    inbound: InboundSettings | None
    admin: AdminSettings = field(default_factory=AdminSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    log_level: str = "info"
    outbound: tuple[OutboundRoute, ...] = ()
    outbound_proxy: OutboundProxySettings | None = None
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


# --------------------------------------------------------------------------------------------------
# Parser. Pure: file reads and the environment are injected; every problem is collected with
# `file:line: field.path` and raised together as one ConfigError.

ENV_SOCKET: Final = "SPIFFE_ENDPOINT_SOCKET"  # SPIFFE Workload Endpoint §4: the standard variable
ENV_INBOUND_PORT: Final = "SPIFFE_SIDECAR_INBOUND_PORT"
ENV_APP_PORT: Final = "SPIFFE_SIDECAR_APP_PORT"
ENV_ADMIN_PORT: Final = "SPIFFE_SIDECAR_ADMIN_PORT"
ENV_METRICS_PORT: Final = "SPIFFE_SIDECAR_METRICS_PORT"  # the /metrics listener (all interfaces unless listen is set)

LOG_LEVELS: Final = ("debug", "info", "warning", "error")

_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_DEPTH: Final = 64  # YAML aliases can build deep or cyclic graphs; a config never needs this


@dataclass(frozen=True, slots=True)
class YamlDocument:
    """A YAML document as plain Python data plus the 1-based line of every field path.

    Field paths look like `inbound.policy.rules[2].callers[0]`; the root is "".
    """

    data: Any
    lines: Mapping[str, int]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_yaml(text: str, source: str, *, collect: list[Problem] | None = None) -> YamlDocument:
    """Parse one YAML document keeping line numbers; raise ConfigError (with line) if it is not YAML.

    Mapping keys must be strings and unique (PyYAML silently keeps the last duplicate; a duplicated
    policy key must never silently change what is allowed). With `collect`, those key problems are
    appended there and the document (first occurrence of a duplicate kept) returned, so the caller can
    report the problems of the content in the same pass; the caller must then refuse the whole.
    """
    try:
        # The reader rejects control characters already in the constructor.
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(source, "invalid YAML: " + " ".join(str(exc).split()))]) from None
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = exc.problem or exc.context or "invalid YAML"
            raise ConfigError([Problem(f"{source}{line}", f"invalid YAML: {problem}")]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([Problem(source, f"invalid YAML: {exc}")]) from None
        if node is None:
            return YamlDocument(None, {})
        lines: dict[str, int] = {}
        problems = Problems(source)
        data = _build(loader, node, "", lines, problems, 0)
    finally:
        loader.dispose()
    if problems:
        if collect is None:
            raise problems.error()
        collect.extend(problems)
    return YamlDocument(data, lines)


def _build(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: str,
    lines: dict[str, int],
    problems: Problems,
    depth: int,
) -> Any:
    line = node.start_mark.line + 1
    lines[path] = line
    if depth > _MAX_DEPTH:
        problems.add(path, "nesting too deep (recursive alias?)", line=line)
        return None
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            key = loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                problems.add(path or "<root>", "keys must be strings", line=key_line)
                continue
            child = _join(path, key)
            if key in out:
                problems.add(child, "duplicate key", line=key_line)
                continue
            out[key] = _build(loader, value_node, child, lines, problems, depth + 1)
            lines[child] = key_line  # the key's line reads better than the value's for nested blocks
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _build(loader, item, f"{path}[{i}]", lines, problems, depth + 1)
            for i, item in enumerate(node.value)
        ]
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        problems.add(path, f"bad value: {exc}", line=line)
        return None


def parse_duration(value: Any) -> float:
    """`250ms`, `5s`, `1m`, `1h`, or a number of seconds -> seconds (> 0). Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 250ms, 5s, 1m or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())) is not None:
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration like 250ms, 5s, 1m or a number of seconds, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


def _mapping(c: Problems, value: Any, path: str, keys: frozenset[str]) -> dict[str, Any] | None:
    if value is None:
        return {}
    if not isinstance(value, dict):
        c.add(path, f"expected a mapping, got {_kind(value)}")
        return None
    for key in value:
        if key not in keys:
            c.add(_join(path, key), f"unknown key (expected one of: {', '.join(sorted(keys))})")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _duration(c: Problems, m: Mapping[str, Any], key: str, path: str, default: float) -> float:
    if key not in m:
        return default
    try:
        return parse_duration(m[key])
    except ValueError as exc:
        c.add(_join(path, key), str(exc))
        return default


def _int(c: Problems, m: Mapping[str, Any], key: str, path: str, default: int, low: int) -> int:
    value = _optional_int(c, m, key, path, default, low, nullable=False)
    return default if value is None else value


def _optional_int(
    c: Problems, m: Mapping[str, Any], key: str, path: str, default: int | None, low: int, *, nullable: bool = True
) -> int | None:
    if key not in m:
        return default
    value = m[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        c.add(_join(path, key), f"expected an integer >= {low}{' or null' if nullable else ''}, got {value!r}")
        return default
    if value < low:
        c.add(_join(path, key), f"must be >= {low}, got {value}")
        return default
    return value


def _number(c: Problems, m: Mapping[str, Any], key: str, path: str, default: float, low: float, high: float) -> float:
    if key not in m:
        return default
    value = m[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        c.add(_join(path, key), f"expected a number, got {value!r}")
        return default
    if not low <= value <= high:
        c.add(_join(path, key), f"must be between {low:g} and {high:g}, got {value}")
        return default
    return float(value)


def _bool(c: Problems, m: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = m.get(key, default)
    if not isinstance(value, bool):
        c.add(_join(path, key), f"expected true or false, got {value!r}")
        return default
    return value


def _string(c: Problems, m: Mapping[str, Any], key: str, path: str) -> str | None:
    value = m.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        c.add(_join(path, key), f"expected a non-empty string, got {value!r}")
        return None
    return value


def _required_path(c: Problems, m: Mapping[str, Any], key: str, path: str, base_dir: Path) -> Path | None:
    if key not in m:
        c.add(_join(path, key), "required")
        return None
    text = _string(c, m, key, path)
    return None if text is None else base_dir / text


def _host_port(
    c: Problems, m: Mapping[str, Any], key: str, path: str, default: HostPort | None, *, allow_zero: bool
) -> HostPort | None:
    if key not in m:
        if default is None:
            c.add(_join(path, key), "required")
        return default
    hp = host_port(m[key], allow_zero=allow_zero)
    if isinstance(hp, Invalid):
        c.add(_join(path, key), hp.message)
        return default
    return hp


def _env_port(c: Problems, environ: Mapping[str, str], name: str, *, allow_zero: bool) -> int | None:
    port = env_port(environ, name, allow_zero=allow_zero)
    if isinstance(port, Invalid):
        c.env(name, port.message)
        return None
    return port


def _listener_mode(c: Problems, m: Mapping[str, Any], path: str) -> ListenerMode:
    mode = one_of(m.get("mode", ListenerMode.HTTP.value), ListenerMode)
    if isinstance(mode, Invalid):
        c.add(_join(path, "mode"), mode.message)
        return ListenerMode.HTTP
    return mode


_TOP_KEYS: Final = frozenset(
    {
        "svid_source", "inbound", "outbound", "outbound_proxy", "admin", "audit", "timeouts", "limits", "log_level",
        "metrics",
    }
)  # fmt: skip
_METRICS_KEYS: Final = frozenset({"listen", "max_callers"})
_OUTBOUND_KEYS: Final = frozenset({"name", "listen", "target", "expect", "mode", "jwt"})
_PROXY_KEYS: Final = frozenset({"listen", "routes"})
_PROXY_ROUTE_KEYS: Final = frozenset({"target", "expect", "jwt"})
_OUTBOUND_JWT_KEYS: Final = frozenset({"audience", "path", "authorization"})
_SOURCE_KEYS: Final = frozenset({"workload_api", "pem"})
_WORKLOAD_API_KEYS: Final = frozenset({"socket"})
_PEM_KEYS: Final = frozenset(
    {"cert_chain", "key", "bundle", "trust_domain", "poll_interval", "federated", "jwt_bundles"}
)
_INBOUND_KEYS: Final = frozenset(
    {"listen", "app", "mode", "policy", "policy_file", "strip_request_headers", "forward_jwt", "app_protocol"}
)
_ADMIN_KEYS: Final = frozenset({"listen"})
_AUDIT_KEYS: Final = frozenset({"path", "sample_allows", "deny_per_second", "deny_burst"})
_TIMEOUT_KEYS: Final = frozenset(f.name for f in fields(Timeouts))
_LIMIT_KEYS: Final = frozenset(f.name for f in fields(Limits))


def parse_settings(
    text: str,
    source: str,
    *,
    environ: Mapping[str, str],
    base_dir: Path,
    read_file: Callable[[Path], str],
) -> Settings:
    """Parse a sidecar config file (YAML text) into Settings, or raise ConfigError listing every problem.

    `source` names the file in problem locations; relative paths in the file resolve against `base_dir`;
    `read_file` reads `inbound.policy_file` (injected so this stays pure). `environ` supplies the few
    overrides Kubernetes sets (SPIFFE_ENDPOINT_SOCKET when no socket is configured, and the
    SPIFFE_SIDECAR_*_PORT variables).
    """
    early: list[Problem] = []
    doc = parse_yaml(text, source, collect=early)
    c = Problems(source, doc.lines)
    c.extend(early)  # duplicate keys: reported with everything else, and the config refused
    top = _mapping(c, doc.data, "", _TOP_KEYS)
    if top is None:
        raise c.error()

    svid_source = _parse_source(c, top.get("svid_source"), environ, base_dir)
    inbound = _parse_inbound(c, top, environ, base_dir, read_file) if "inbound" in top else None
    outbound = _parse_outbound(c, top.get("outbound"))
    outbound_proxy = _parse_outbound_proxy(c, top["outbound_proxy"]) if "outbound_proxy" in top else None
    _check_listen_clash(c, outbound, outbound_proxy)
    if isinstance(svid_source, PemSourceSettings):
        _check_no_outbound_jwt(c, outbound, outbound_proxy)
    if "inbound" not in top and "outbound_proxy" not in top and not top.get("outbound"):
        # A sidecar with no listener would only hold an SVID; an outbound-only one (a pure client) is fine.
        c.add("", "nothing to run: configure at least one of inbound, outbound or outbound_proxy")

    admin = AdminSettings()
    admin_m = _mapping(c, top.get("admin"), "admin", _ADMIN_KEYS)
    if admin_m is not None:
        listen = _host_port(c, admin_m, "listen", "admin", admin.listen, allow_zero=True)
        assert listen is not None  # a default is given
        admin = AdminSettings(listen)
    if (port := _env_port(c, environ, ENV_ADMIN_PORT, allow_zero=True)) is not None:
        admin = AdminSettings(HostPort(admin.listen.host, port))

    metrics = _parse_metrics(c, top.get("metrics"), environ)

    audit = AuditSettings()
    audit_m = _mapping(c, top.get("audit"), "audit", _AUDIT_KEYS)
    if audit_m is not None:
        audit_path = audit.path
        if "path" in audit_m and (p := _string(c, audit_m, "path", "audit")) is not None:
            audit_path = p if p == "-" else str(base_dir / p)
        audit = AuditSettings(
            path=audit_path,
            sample_allows=_number(c, audit_m, "sample_allows", "audit", audit.sample_allows, 0.0, 1.0),
            deny_per_second=_number(c, audit_m, "deny_per_second", "audit", audit.deny_per_second, 0.001, 1e9),
            deny_burst=_int(c, audit_m, "deny_burst", "audit", audit.deny_burst, 1),
        )

    timeouts = Timeouts()
    t_m = _mapping(c, top.get("timeouts"), "timeouts", _TIMEOUT_KEYS)
    if t_m is not None:
        timeouts = Timeouts(
            **{f.name: _duration(c, t_m, f.name, "timeouts", getattr(timeouts, f.name)) for f in fields(Timeouts)}
        )

    limits = Limits()
    l_m = _mapping(c, top.get("limits"), "limits", _LIMIT_KEYS)
    if l_m is not None:
        limits = Limits(
            max_connections=_int(c, l_m, "max_connections", "limits", limits.max_connections, 1),
            max_pending_handshakes=_optional_int(
                c, l_m, "max_pending_handshakes", "limits", limits.max_pending_handshakes, 1
            ),
            max_header_bytes=_int(c, l_m, "max_header_bytes", "limits", limits.max_header_bytes, 1024),
            max_request_line_bytes=_int(c, l_m, "max_request_line_bytes", "limits", limits.max_request_line_bytes, 256),
            max_body_bytes=_optional_int(c, l_m, "max_body_bytes", "limits", limits.max_body_bytes, 0),
            upstream_pool_size=_int(c, l_m, "upstream_pool_size", "limits", limits.upstream_pool_size, 1),
        )

    log_level = "info"
    if "log_level" in top:
        value = top["log_level"]
        if isinstance(value, str) and value.lower() in LOG_LEVELS:
            log_level = value.lower()
        else:
            c.add("log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")

    if c or svid_source is None:
        raise ConfigError(sorted(c, key=_problem_order))
    return Settings(
        source=svid_source,
        inbound=inbound,
        admin=admin,
        audit=audit,
        timeouts=timeouts,
        limits=limits,
        log_level=log_level,
        outbound=outbound,
        outbound_proxy=outbound_proxy,
        metrics=metrics,
    )


def _parse_metrics(c: Problems, value: Any, environ: Mapping[str, str]) -> MetricsSettings:
    default = MetricsSettings()
    m = _mapping(c, value, "metrics", _METRICS_KEYS)
    listen = default.listen
    max_callers = default.max_callers
    if m is not None:
        listen = _host_port(c, m, "listen", "metrics", None, allow_zero=True) if "listen" in m else None
        max_callers = _int(c, m, "max_callers", "metrics", default.max_callers, 0)
    if (port := _env_port(c, environ, ENV_METRICS_PORT, allow_zero=True)) is not None:
        listen = HostPort("0.0.0.0" if listen is None else listen.host, port)  # Prometheus scrapes the pod IP
    return MetricsSettings(listen, max_callers)


def _problem_order(p: Problem) -> tuple[int, int]:
    # File order (by line), then environment problems (no line) last; sorted() keeps ties stable.
    m = re.match(r"[^:]*:(\d+)", p.where)
    return (0, int(m.group(1))) if m else (1, 0)


def _parse_source(
    c: Problems, value: Any, environ: Mapping[str, str], base_dir: Path
) -> WorkloadApiSettings | PemSourceSettings | None:
    path = "svid_source"
    m = _mapping(c, value, path, _SOURCE_KEYS)
    if m is None:
        return None
    if "workload_api" in m and "pem" in m:
        c.add(path, "set exactly one of workload_api or pem")
        return None
    if "pem" in m:
        return _parse_pem(c, m["pem"], f"{path}.pem", base_dir)
    wpath = f"{path}.workload_api"
    w = _mapping(c, m.get("workload_api"), wpath, _WORKLOAD_API_KEYS)
    if w is None:
        return None
    socket = _string(c, w, "socket", wpath)
    where = _join(wpath, "socket")
    from_env = socket is None and "socket" not in w
    if from_env:
        socket = environ.get(ENV_SOCKET)
        if not socket:
            c.add(where, f"no Workload API socket: set {where} or {ENV_SOCKET}")
            return None
    if socket is None:
        return None
    parsed = endpoint(socket)
    if isinstance(parsed, Invalid):
        if from_env:
            c.env(ENV_SOCKET, parsed.message)
        else:
            c.add(where, parsed.message)
        return None
    return WorkloadApiSettings(parsed)


def _parse_pem(c: Problems, value: Any, path: str, base_dir: Path) -> PemSourceSettings | None:
    m = _mapping(c, value, path, _PEM_KEYS)
    if m is None:
        return None
    before = len(c)
    cert_chain = _required_path(c, m, "cert_chain", path, base_dir)
    key = _required_path(c, m, "key", path, base_dir)
    bundle = _required_path(c, m, "bundle", path, base_dir)
    trust_domain: TrustDomain | None = None
    if (td_text := _string(c, m, "trust_domain", path)) is not None:
        try:
            trust_domain = TrustDomain.parse(td_text)
        except IdentityError as exc:
            c.add(_join(path, "trust_domain"), str(exc))
    poll_interval = _duration(c, m, "poll_interval", path, 1.0)
    federated = _bundle_files(c, m, "federated", path, base_dir)
    jwt_bundles = _bundle_files(c, m, "jwt_bundles", path, base_dir)
    if len(c) != before or cert_chain is None or key is None or bundle is None:
        return None
    return PemSourceSettings(
        cert_chain=cert_chain,
        key=key,
        bundle=bundle,
        trust_domain=trust_domain,
        federated=federated,
        poll_interval=poll_interval,
        jwt_bundles=jwt_bundles,
    )


def _bundle_files(
    c: Problems, m: Mapping[str, Any], key: str, path: str, base_dir: Path
) -> tuple[tuple[TrustDomain, Path], ...]:
    """A mapping trust domain name -> file (`federated` PEM bundles, `jwt_bundles` JWKS files)."""
    out: list[tuple[TrustDomain, Path]] = []
    fpath = _join(path, key)
    f_m = m.get(key)
    if f_m is not None and not isinstance(f_m, dict):
        c.add(fpath, f"expected a mapping of trust domain -> bundle file, got {_kind(f_m)}")
    elif f_m:
        for td_name, file in f_m.items():
            try:
                td = TrustDomain.parse(td_name)
            except IdentityError as exc:
                c.add(_join(fpath, td_name), str(exc))
                continue
            if not isinstance(file, str) or not file:
                c.add(_join(fpath, td_name), f"expected a bundle file name, got {file!r}")
                continue
            out.append((td, base_dir / file))
    return tuple(out)


def _parse_inbound(
    c: Problems,
    top: Mapping[str, Any],
    environ: Mapping[str, str],
    base_dir: Path,
    read_file: Callable[[Path], str],
) -> InboundSettings | None:
    path = "inbound"
    m = _mapping(c, top["inbound"], path, _INBOUND_KEYS)
    if m is None:
        return None
    listen = _host_port(c, m, "listen", path, None, allow_zero=True)
    app = _host_port(c, m, "app", path, None, allow_zero=False)
    if listen is not None and (port := _env_port(c, environ, ENV_INBOUND_PORT, allow_zero=True)) is not None:
        listen = HostPort(listen.host, port)
    if app is not None and (port := _env_port(c, environ, ENV_APP_PORT, allow_zero=False)) is not None:
        app = HostPort(app.host, port)
    mode = _listener_mode(c, m, path)

    policy: Policy | None = None
    policy_file: Path | None = None
    if ("policy" in m) == ("policy_file" in m):
        c.add(path, "set exactly one of policy (inline) or policy_file")
    elif "policy" in m:
        prefix = _join(path, "policy")
        policy = _compile(c, m["policy"], c.source, c.lines, prefix)
    else:
        text_name = _string(c, m, "policy_file", path)
        if text_name is not None:
            policy_file = base_dir / text_name
            try:
                text = read_file(policy_file)
            except OSError as exc:
                c.add(_join(path, "policy_file"), f"cannot read {policy_file}: {exc.strerror or exc}")
            else:
                try:
                    policy = load_policy(text, str(policy_file))
                except ConfigError as exc:
                    c.extend(exc.problems)
    if policy is not None and mode is ListenerMode.TCP and policy.path_specific_rules:
        # A TCP listener decides once per connection, on the caller only (authorize_connection).
        c.add(
            _join(path, "mode"),
            "a tcp listener cannot enforce rules that name paths or methods: " + ", ".join(policy.path_specific_rules),
        )
    strip: tuple[str, ...] = ROUTING_OVERRIDE_HEADERS
    if "strip_request_headers" in m:
        strip, problems = header_name_list(m["strip_request_headers"])
        for problem in problems:
            c.add(_join(path, "strip_request_headers"), problem)
    forward_jwt = _bool(c, m, "forward_jwt", path, False)
    app_protocol = one_of(m.get("app_protocol", AppProtocol.HTTP1.value), AppProtocol)
    if isinstance(app_protocol, Invalid):
        c.add(_join(path, "app_protocol"), app_protocol.message)
        app_protocol = AppProtocol.HTTP1
    elif app_protocol is not AppProtocol.HTTP1 and mode is ListenerMode.TCP:
        c.add(_join(path, "app_protocol"), "applies to mode http only (a tcp listener relays bytes as they are)")
    if listen is None or app is None or policy is None:
        return None
    return InboundSettings(
        listen=listen, app=app, mode=mode, policy=policy, policy_file=policy_file, strip_request_headers=strip,
        forward_jwt=forward_jwt, app_protocol=app_protocol,
    )  # fmt: skip


def _loopback_listen(c: Problems, m: Mapping[str, Any], path: str) -> HostPort | None:
    listen = _host_port(c, m, "listen", path, None, allow_zero=True)
    if listen is not None and not is_loopback(listen.host):
        # Outbound ports carry the app's plain traffic and our identity: only the pod's own app may use them.
        c.add(_join(path, "listen"), f"outbound listeners bind to loopback only, got {listen.host}")
        return None
    return listen


def _outbound_target(c: Problems, m: Mapping[str, Any], path: str) -> OutboundTarget | None:
    target = _host_port(c, m, "target", path, None, allow_zero=False)
    expect: CallerPattern | None = None
    if "expect" not in m:
        c.add(_join(path, "expect"), "required: the server SPIFFE ID (pattern) the target must present")
    elif (text := _string(c, m, "expect", path)) is not None:
        pattern = server_pattern(text)
        if isinstance(pattern, Invalid):
            c.add(_join(path, "expect"), pattern.message)
        else:
            expect = pattern
    jwt = _outbound_jwt(c, m.get("jwt"), _join(path, "jwt")) if "jwt" in m else ()
    if target is None or expect is None or jwt is None:
        return None
    return OutboundTarget(target, expect, jwt)


def _outbound_jwt(c: Problems, value: Any, path: str) -> tuple[OutboundJwt, ...] | None:
    """`jwt: {audience, path, authorization}` or a list of them (one per path prefix)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        c.add(path, "expected {audience: <aud>, path: <prefix>, authorization: replace|keep} or a list of them")
        return None
    before = len(c)
    out: list[OutboundJwt] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        ipath = f"{path}[{i}]" if isinstance(value, list) else path
        m = _mapping(c, item, ipath, _OUTBOUND_JWT_KEYS)
        if m is None:
            continue
        audience = jwt_audience(m.get("audience"))
        if "audience" not in m:
            c.add(_join(ipath, "audience"), "required: the audience of the JWT-SVID to attach (JWT-SVID §3)")
        elif isinstance(audience, Invalid):
            c.add(_join(ipath, "audience"), audience.message)
        prefix = path_prefix(m.get("path", "/"))
        if isinstance(prefix, Invalid):
            c.add(_join(ipath, "path"), prefix.message)
        elif (prefix.rstrip("/") or "/") in seen:  # /api/stock and /api/stock/ cover the same paths
            c.add(_join(ipath, "path"), f"path prefix {prefix!r} already has a JWT-SVID on this route")
        else:
            seen.add(prefix.rstrip("/") or "/")
        mode = AuthorizationMode.REPLACE
        if "authorization" in m:
            got = one_of(m["authorization"], AuthorizationMode)
            if isinstance(got, Invalid):
                c.add(_join(ipath, "authorization"), got.message)
            else:
                mode = got
        if isinstance(audience, str) and isinstance(prefix, str):
            out.append(OutboundJwt(audience, prefix, mode))
    return None if len(c) != before else tuple(out)


def _parse_outbound(c: Problems, value: Any) -> tuple[OutboundRoute, ...]:
    path = "outbound"
    if value is None:
        return ()
    if not isinstance(value, list):
        c.add(path, f"expected a list of routes, got {_kind(value)}")
        return ()
    routes: list[OutboundRoute] = []
    names: set[str] = set()
    for i, item in enumerate(value):
        rpath = f"{path}[{i}]"
        m = _mapping(c, item, rpath, _OUTBOUND_KEYS)
        if m is None:
            continue
        before = len(c)
        listen = _loopback_listen(c, m, rpath)
        to = _outbound_target(c, m, rpath)
        mode = _listener_mode(c, m, rpath)
        if mode is ListenerMode.TCP and to is not None and to.jwt:
            c.add(_join(rpath, "jwt"), "a tcp route carries no HTTP fields: a JWT-SVID needs mode http")
        name = _string(c, m, "name", rpath) or (str(to.target) if to is not None else f"route{i}")
        if name in names:
            c.add(_join(rpath, "name"), f"duplicate route name {name!r}")
        names.add(name)
        if len(c) == before and listen is not None and to is not None:
            routes.append(OutboundRoute(name, listen, to, mode))
    return tuple(routes)


def _parse_outbound_proxy(c: Problems, value: Any) -> OutboundProxySettings | None:
    path = "outbound_proxy"
    m = _mapping(c, value, path, _PROXY_KEYS)
    if m is None:
        return None
    before = len(c)
    listen = _loopback_listen(c, m, path)
    rpath = _join(path, "routes")
    routes: list[tuple[str, OutboundTarget]] = []
    r_m = m.get("routes")
    if not isinstance(r_m, dict) or not r_m:
        c.add(rpath, "required: a mapping of Host -> {target, expect}")
    else:
        for host, item in r_m.items():
            hpath = _join(rpath, host)
            key = host.strip().lower()
            if not key or ":" in key or "/" in key or " " in key:
                c.add(hpath, "expected a host name without port (the Host header picks the route)")
                continue
            hm = _mapping(c, item, hpath, _PROXY_ROUTE_KEYS)
            if hm is None:
                continue
            to = _outbound_target(c, hm, hpath)
            if to is not None:
                routes.append((key, to))
    if len(c) != before or listen is None:
        return None
    return OutboundProxySettings(listen, tuple(routes))


def _check_no_outbound_jwt(
    c: Problems, outbound: tuple[OutboundRoute, ...], proxy: OutboundProxySettings | None
) -> None:
    # JWT-SVIDs are minted by the Workload API (FetchJWTSVID); PEM files hold none to attach.
    named = [(f"outbound[{i}].jwt", r.to) for i, r in enumerate(outbound)]
    if proxy is not None:
        named += [(f"outbound_proxy.routes.{host}.jwt", to) for host, to in proxy.routes]
    for where, to in named:
        if to.jwt:
            c.add(where, "attaching a JWT-SVID needs svid_source.workload_api (the PEM source cannot mint one)")


def _check_listen_clash(
    c: Problems, outbound: tuple[OutboundRoute, ...], proxy: OutboundProxySettings | None
) -> None:
    seen: dict[HostPort, str] = {}
    named = [(f"outbound[{i}].listen", r.listen) for i, r in enumerate(outbound)]
    if proxy is not None:
        named.append(("outbound_proxy.listen", proxy.listen))
    for where, hp in named:
        if hp.port == 0:
            continue  # 0 picks a free port each
        if hp in seen:
            c.add(where, f"{hp} is also used by {seen[hp]}")
        seen[hp] = where


def _compile(c: Problems, data: Any, source: str, lines: Mapping[str, int], prefix: str) -> Policy | None:
    try:
        return compile_policy(data, source, lines, prefix=prefix)
    except ConfigError as exc:
        c.extend(exc.problems)
        return None


def load_policy(text: str, source: str) -> Policy:
    """Parse and compile a policy file (YAML); raise ConfigError with every problem and its line."""
    early: list[Problem] = []
    doc = parse_yaml(text, source, collect=early)
    try:
        policy = compile_policy(doc.data, source, doc.lines)
    except ConfigError as exc:
        raise ConfigError([*early, *exc.problems]) from None
    if early:
        raise ConfigError(early)
    return policy


def load_settings(path: Path, environ: Mapping[str, str]) -> Settings:
    """Read a config file from disk and parse it (the only I/O in this module: reading files)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([Problem(str(path), f"cannot read config: {reason}")]) from None
    return parse_settings(
        text, str(path), environ=environ, base_dir=path.parent, read_file=lambda p: p.read_text(encoding="utf-8")
    )


def warnings(settings: Settings) -> list[str]:
    """Things that are allowed but probably wrong; `spiffe-sidecar check` prints them."""
    out: list[str] = []
    if not is_loopback(settings.admin.listen.host):
        out.append(
            f"admin.listen {settings.admin.listen} is not a loopback address: /config and /metrics "
            "will be reachable from the network"
        )
    if settings.inbound is not None and not is_loopback(settings.inbound.app.host):
        out.append(f"inbound.app {settings.inbound.app} is not a loopback address: callers could bypass the sidecar")
    return out


def _describe_jwt(to: OutboundTarget) -> list[dict[str, str]]:
    return [{"audience": j.audience, "path": j.path_prefix, "authorization": j.authorization.value} for j in to.jwt]


def describe_settings(settings: Settings) -> dict[str, Any]:
    """The effective settings as JSON-ready data (for /config and `check`). Paths, never file contents."""
    src = settings.source
    source: dict[str, Any]
    if isinstance(src, WorkloadApiSettings):
        source = {"workload_api": {"socket": str(src.endpoint)}}
    else:
        source = {
            "pem": {
                "cert_chain": str(src.cert_chain),
                "key": str(src.key),
                "bundle": str(src.bundle),
                "trust_domain": None if src.trust_domain is None else src.trust_domain.name,
                "federated": {td.name: str(p) for td, p in src.federated},
                "jwt_bundles": {td.name: str(p) for td, p in src.jwt_bundles},
                "poll_interval": src.poll_interval,
            }
        }
    inbound: dict[str, Any] | None = None
    if settings.inbound is not None:
        ib = settings.inbound
        inbound = {
            "listen": str(ib.listen),
            "app": str(ib.app),
            "mode": ib.mode.value,
            "policy_file": None if ib.policy_file is None else str(ib.policy_file),
            "forward_jwt": ib.forward_jwt,
            "app_protocol": ib.app_protocol.value,
        }
    return {
        "svid_source": source,
        "inbound": inbound,
        "outbound": [
            {"name": r.name, "listen": str(r.listen), "target": str(r.to.target), "expect": r.to.expect.text,
             "mode": r.mode.value, "jwt": _describe_jwt(r.to)}
            for r in settings.outbound
        ],
        "outbound_proxy": None
        if settings.outbound_proxy is None
        else {
            "listen": str(settings.outbound_proxy.listen),
            "routes": {
                h: {"target": str(t.target), "expect": t.expect.text, "jwt": _describe_jwt(t)}
                for h, t in settings.outbound_proxy.routes
            },
        },
        "admin": {"listen": str(settings.admin.listen)},
        "metrics": {
            "listen": None if settings.metrics.listen is None else str(settings.metrics.listen),
            "max_callers": settings.metrics.max_callers,
        },
        "audit": {
            "path": settings.audit.path,
            "sample_allows": settings.audit.sample_allows,
            "deny_per_second": settings.audit.deny_per_second,
            "deny_burst": settings.audit.deny_burst,
        },
        "timeouts": {f.name: getattr(settings.timeouts, f.name) for f in fields(Timeouts)},
        "limits": {f.name: getattr(settings.limits, f.name) for f in fields(Limits)},
        "log_level": settings.log_level,
    }
