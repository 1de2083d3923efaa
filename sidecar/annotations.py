"""Pod annotations under `spiffe-sidecar.io/` and the downward API file that carries them (pure core).

The webhook (to reject a pod whose policy does not compile) and the sidecar (annotations mode, live
reload) run the same parser, so a pod that was admitted always starts with the policy that was checked.

Opt-in is the LABEL `spiffe-sidecar.io/inject: "true"` on the pod or its namespace (the webhook's
objectSelector/namespaceSelector see labels only, kubernetes-notes §2.3). Annotations (all optional):

| key (after the prefix) | value |
|---|---|
| `inject` | `"false"` opts a pod out even when its namespace opted in |
| `app-port` | the app's port on 127.0.0.1 (default: the first container's first TCP containerPort) |
| `inbound-port` | the mTLS port (default 8443) |
| `inbound-mode` | `http` (per-request policy, default) or `tcp` (decided once per connection) |
| `app-protocol` | what the app speaks: `http1` (default), `h2c` or `grpc` (HTTP/2 with prior knowledge) |
| `inbound-policy` | the policy: a YAML block with the config file's schema, or one rule per line |
| `policy-mode` | `enforce` (default) or `audit` (dry run: denies are logged and forwarded) |
| `outbound` | one target per line: `127.0.0.1:15001 -> inventory.shop.svc:8443 expect spiffe://...`, |
|  | then optionally `jwt aud=<AUD> [path=<PREFIX>] [authorization=replace|keep]` (repeatable): attach a |
|  | JWT-SVID for AUD to requests under PREFIX (default `/`), replacing (default) or keeping the app's own |
| `cpu-request` `memory-request` `cpu-limit` `memory-limit` | Kubernetes quantities for the sidecar |
| `native-sidecar` | `true`/`false`: override the injector's default (native initContainer vs classic) |
| `strict-bypass-check` | `true`: the sidecar refuses to become ready while the app port answers on the pod IP |
| `metrics-port` | the read-only /metrics port on the pod IP (default: the injector's, 15020) |
| `strip-request-headers` | request headers never forwarded to the app (comma-separated); replaces the |
|  | default routing-override list (`X-Original-URL`, `X-HTTP-Method-Override`, ...); `none` strips none |
| `status` | written by the injector (JSON); never set it by hand |

Compact policy lines (`#` starts a comment line; blank lines are ignored):

    <allow|deny|audit-deny> <METHODS|*> <PATH>... from <CALLER>... [jwt aud=<AUD> [sub=<P>,...] [unbound]]
        [as <rule-name>]
    <allow|deny|audit-deny> grpc <package.Service/Method|package.Service/*>... from <CALLER>... [...]

METHODS is one token, comma-separated (`GET,HEAD`); paths and callers are whitespace-separated (callers
also comma-separated). A rule without `as` is named `line-<N>` after its line in the annotation.
`audit-deny` is a deny rule in audit mode. Both forms compile with `policy.compile_policy`, so the rule
model (deny > allow > default deny, path and caller patterns) is exactly the config file's.

The downward API file (kubernetes-notes §3.1, `fieldpath.FormatMap`): sorted `key="value"` lines joined
by `\\n`, values quoted with Go's `strconv.Quote`. It is parsed with a small Go-unquote written here: no
eval of pod-controlled text.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml

from . import config as _config
from .addr import HostPort, is_loopback
from .config import (
    AppProtocol,
    AuthorizationMode,
    ListenerMode,
    OutboundJwt,
    OutboundRoute,
    OutboundTarget,
    parse_yaml,
)
from .errors import ConfigError, Problem
from .hints import did_you_mean
from .http1 import ROUTING_OVERRIDE_HEADERS
from .identity import PatternKind
from .policy import AUDIT, Mode, Policy, compile_policy
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
    port_number,
    server_pattern,
)

__all__ = [
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_INBOUND_PORT",
    "ENV_LISTEN_HOST",
    "ENV_POD_IP",
    "ENV_PROBES",
    "ENV_PROBE_PORT",
    "INJECT_LABEL",
    "KEYS",
    "PREFIX",
    "STATUS_ANNOTATION",
    "OutboundLine",
    "PodRuntime",
    "ProbeRoute",
    "SidecarAnnotations",
    "annotation_source",
    "annotations_mode",
    "go_unquote",
    "load_annotations_policy",
    "parse_downward_api",
    "parse_pod_annotations",
    "parse_probe_routes",
    "pod_runtime",
    "policy_from_annotations",
    "settings_from_annotations",
]

PREFIX: Final = "spiffe-sidecar.io/"
INJECT_LABEL: Final = PREFIX + "inject"  # the opt-in label; as an annotation, "false" opts out
STATUS_ANNOTATION: Final = PREFIX + "status"
DEFAULT_INBOUND_PORT: Final = 8443

KEYS: Final = (
    "inject",
    "app-port",
    "inbound-port",
    "inbound-mode",
    "app-protocol",
    "inbound-policy",
    "policy-mode",
    "outbound",
    "cpu-request",
    "memory-request",
    "cpu-limit",
    "memory-limit",
    "native-sidecar",
    "strict-bypass-check",
    "metrics-port",
    "strip-request-headers",
    "status",
)
_KEYS_SET: Final = frozenset(KEYS)
_T = TypeVar("_T")

# Annotation names (the part after the prefix), Kubernetes "Syntax and character set" (notes §5).
_NAME_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_PREFIX_RE: Final = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
# resource.Quantity's serialised form (apimachinery quantity.go); negative quantities are useless here.
_QUANTITY_RE: Final = re.compile(
    r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?"
)
_ACTIONS: Final = {"allow": ("allow", None), "deny": ("deny", None), "audit-deny": ("deny", AUDIT)}
_MAX_LINES: Final = 1000  # a pod annotation is a config, not a database; keeps parsing bounded


def annotation_source(key: str) -> str:
    """How problems name an annotation: `annotation spiffe-sidecar.io/inbound-policy`."""
    return f"annotation {PREFIX}{key}"


def _problems() -> Problems:
    """A collector naming each problem's annotation (and line inside it): `annotation_source(key)[:line]`."""
    return Problems.per_key(annotation_source(""))


@dataclass(frozen=True, slots=True)
class OutboundLine:
    """One line of the `outbound` annotation: a plain listener for the app (`listen`, loopback) relayed over
    mTLS to `to.target`, whose SVID must match `to.expect` (an exact ID or a pattern; `*` is refused: the
    server must be named). `line` is its line in the annotation (it names routes whose targets repeat)."""

    listen: HostPort
    to: OutboundTarget
    line: int


@dataclass(frozen=True, slots=True)
class SidecarAnnotations:
    """Everything the `spiffe-sidecar.io/` annotations of one pod say, validated and compiled."""

    inject: bool | None  # None: not set; False: opted out
    app_port: int | None
    inbound_port: int
    inbound_mode: ListenerMode
    policy: Policy  # always set: no inbound-policy means "no rules" (every request denied)
    policy_mode: str
    outbound: tuple[OutboundLine, ...]
    cpu_request: str | None
    memory_request: str | None
    cpu_limit: str | None
    memory_limit: str | None
    native_sidecar: bool | None
    strict_bypass_check: bool
    has_policy: bool  # False when the inbound-policy annotation is absent
    metrics_port: int | None = None  # None: the injector's default
    strip_request_headers: tuple[str, ...] = ROUTING_OVERRIDE_HEADERS
    app_protocol: AppProtocol = AppProtocol.HTTP1


@dataclass(frozen=True, slots=True)
class ProbeRoute:
    """One kubelet probe the sidecar's probe port forwards: `path` on the probe port -> the app's
    `app_path` on 127.0.0.1:`app_port` (`scheme` HTTP or HTTPS, as the original probe)."""

    path: str
    app_port: int
    app_path: str
    scheme: str = "HTTP"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "port": self.app_port, "appPath": self.app_path, "scheme": self.scheme}


# ---------------------------------------------------------------------------------------------------------
# Pod annotations


def _checked(c: Problems, key: str, raw: str, check: Callable[[str], _T | Invalid]) -> _T | None:
    """`check` on the trimmed value; a refusal names the annotation and shows the value as written."""
    result = check(raw.strip())
    if isinstance(result, Invalid):
        c.add(key, result.short(raw))
        return None
    return result


def _boolean(text: str) -> bool | Invalid:
    folded = text.lower()
    if folded in ("true", "false"):
        return folded == "true"
    return Invalid('"true" or "false"', text)


def _port(text: str) -> int | Invalid:
    return port_number(text, allow_zero=False)


def _listener_mode(text: str) -> ListenerMode | Invalid:
    return one_of(text, ListenerMode)


def _app_protocol(text: str) -> AppProtocol | Invalid:
    return one_of(text, AppProtocol)


def _policy_mode(text: str) -> Mode | Invalid:
    return one_of(text, Mode)


def _quantity(text: str) -> str | Invalid:
    if _QUANTITY_RE.fullmatch(text):
        return text
    return Invalid("a Kubernetes quantity such as 100m, 0.5, 64Mi or 1Gi", text)


def _check_key(c: Problems, full_key: str) -> str | None:
    """The name after our prefix, or None (with a problem) when it is not one we know."""
    name = full_key[len(PREFIX) :]
    if len(name) > 63 or _NAME_RE.fullmatch(name) is None:
        c.add(name, "annotation names are 1-63 characters [A-Za-z0-9_.-], starting and ending alphanumeric")
        return None
    if name not in _KEYS_SET:
        c.add(name, f"unknown annotation{did_you_mean(name, KEYS)} (expected one of: {', '.join(KEYS)})")
        return None
    return name


def parse_pod_annotations(annotations: Mapping[str, str]) -> SidecarAnnotations:
    """Validate and compile the `spiffe-sidecar.io/` annotations of a pod (others are ignored).

    Raises ConfigError listing every problem; each names the annotation (and the line inside it for
    multi-line values). Unknown keys under the prefix are errors: a typo must not silently drop policy.
    """
    c = _problems()
    values: dict[str, str] = {}
    for full_key, value in annotations.items():
        if not isinstance(full_key, str) or not full_key.startswith(PREFIX):
            continue
        name = _check_key(c, full_key)
        if name is None:
            continue
        if not isinstance(value, str):
            c.add(name, f"annotation values are strings, got {type(value).__name__}")
            continue
        values[name] = value

    inject = _checked(c, "inject", values["inject"], _boolean) if "inject" in values else None
    app_port = _checked(c, "app-port", values["app-port"], _port) if "app-port" in values else None
    inbound_port = DEFAULT_INBOUND_PORT
    if "inbound-port" in values:
        inbound_port = _checked(c, "inbound-port", values["inbound-port"], _port) or DEFAULT_INBOUND_PORT
    if app_port is not None and app_port == inbound_port:
        c.add("app-port", f"the app port and the inbound port must differ (both {app_port})")

    mode = ListenerMode.HTTP
    if "inbound-mode" in values:
        mode = _checked(c, "inbound-mode", values["inbound-mode"], _listener_mode) or ListenerMode.HTTP
    policy_mode = _checked(c, "policy-mode", values["policy-mode"], _policy_mode) if "policy-mode" in values else None
    app_protocol = AppProtocol.HTTP1
    if "app-protocol" in values:
        app_protocol = _checked(c, "app-protocol", values["app-protocol"], _app_protocol) or AppProtocol.HTTP1
        if app_protocol is not AppProtocol.HTTP1 and mode is ListenerMode.TCP:
            c.add("app-protocol", "applies to inbound-mode http only (a tcp listener relays bytes as they are)")

    policy = _policy(c, values.get("inbound-policy"), policy_mode)
    if policy is not None and mode is ListenerMode.TCP and policy.path_specific_rules:
        c.add(
            "inbound-mode",
            "a tcp listener cannot enforce rules that name paths or methods: " + ", ".join(policy.path_specific_rules),
        )

    outbound = _outbound(c, values["outbound"]) if "outbound" in values else ()
    resources = {
        k: (_checked(c, k, values[k], _quantity) if k in values else None)
        for k in ("cpu-request", "memory-request", "cpu-limit", "memory-limit")
    }
    native = _checked(c, "native-sidecar", values["native-sidecar"], _boolean) if "native-sidecar" in values else None
    strict = False
    if "strict-bypass-check" in values:
        strict = bool(_checked(c, "strict-bypass-check", values["strict-bypass-check"], _boolean))
    metrics_port = _checked(c, "metrics-port", values["metrics-port"], _port) if "metrics-port" in values else None
    strip: tuple[str, ...] = ROUTING_OVERRIDE_HEADERS
    if "strip-request-headers" in values:
        text = values["strip-request-headers"].strip()
        names = [] if text == "none" else [n.strip() for n in text.replace("\n", ",").split(",") if n.strip()]
        strip, problems = header_name_list(names)
        for problem in problems:
            c.add("strip-request-headers", problem)
    if "status" in values:
        try:
            json.loads(values["status"])
        except ValueError:
            c.add("status", "written by the injector as JSON; remove it to inject again")

    if c or policy is None:
        raise c.error()
    return SidecarAnnotations(
        inject=inject,
        app_port=app_port,
        inbound_port=inbound_port,
        inbound_mode=mode,
        policy=policy,
        policy_mode=policy.mode,
        outbound=outbound,
        cpu_request=resources["cpu-request"],
        memory_request=resources["memory-request"],
        cpu_limit=resources["cpu-limit"],
        memory_limit=resources["memory-limit"],
        native_sidecar=native,
        strict_bypass_check=strict,
        has_policy="inbound-policy" in values,
        metrics_port=metrics_port,
        strip_request_headers=strip,
        app_protocol=app_protocol,
    )


def policy_from_annotations(annotations: Mapping[str, str]) -> Policy:
    """The compiled inbound policy of a pod's annotations (ConfigError when any annotation is bad)."""
    return parse_pod_annotations(annotations).policy


def _lines(c: Problems, key: str, text: str) -> list[tuple[int, str]] | None:
    """The (line number, stripped line) of a multi-line annotation, without blank and `#` comment lines;
    None (a problem) when it has more than _MAX_LINES lines."""
    raw_lines = text.split("\n")
    if len(raw_lines) > _MAX_LINES:
        c.add(key, f"more than {_MAX_LINES} lines")
        return None
    return [(n, s) for n, raw in enumerate(raw_lines, start=1) if (s := raw.strip()) and not s.startswith("#")]


def _is_compact(text: str) -> bool:
    for line in text.split("\n"):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        first = s.split(None, 1)[0]
        return first.lower() in _ACTIONS  # `ALLOW ...` is a compact line with a typo, not YAML
    return False


def _policy(c: Problems, text: str | None, policy_mode: Mode | None) -> Policy | None:
    key = "inbound-policy"
    source = annotation_source(key)
    data: Any
    lines: Mapping[str, int] | None
    if text is None or not text.strip():
        data, lines = {"rules": []}, None
    elif _is_compact(text):
        parsed = _compact_rules(c, text)
        if parsed is None:
            return None
        data, lines = parsed
    else:
        try:
            doc = parse_yaml(text, source, collect=c.items)  # key problems do not hide the others
        except ConfigError as exc:
            c.extend(exc.problems)
            return None
        except yaml.YAMLError as exc:
            # parse_yaml builds its SafeLoader outside its own try: control characters raise ReaderError.
            c.add(key, f"invalid YAML: {getattr(exc, 'reason', None) or exc}")
            return None
        data, lines = doc.data, doc.lines
        if isinstance(data, list):  # a bare list of rules is accepted as `rules:`
            lines = {("rules" + k if k else "rules"): v for k, v in lines.items()}
            data = {"rules": data}
    if policy_mode is not None and isinstance(data, dict):
        if "mode" in data and data["mode"] != policy_mode:
            c.add("policy-mode", f"conflicts with 'mode: {data['mode']}' inside {PREFIX}{key}; set it in one place")
            return None
        data = {**data, "mode": policy_mode}
    try:
        return compile_policy(data, source, lines)
    except ConfigError as exc:
        c.extend(exc.problems)
        return None


def _compact_rules(c: Problems, text: str) -> tuple[dict[str, Any], dict[str, int]] | None:
    key = "inbound-policy"
    rules: list[dict[str, Any]] = []
    lines: dict[str, int] = {}
    before = len(c)
    numbered = _lines(c, key, text)
    if numbered is None:
        return None
    for n, s in numbered:
        tokens = s.split()
        if tokens[0] not in _ACTIONS:
            hint = did_you_mean(tokens[0], _ACTIONS)
            c.add(key, f"a rule line starts with allow, deny or audit-deny, got {tokens[0]!r}{hint}", line=n)
            continue
        action, mode = _ACTIONS[tokens[0]]
        name = f"line-{n}"
        if len(tokens) >= 2 and tokens[-2] == "as":
            name = tokens[-1]
            tokens = tokens[:-2]
        if "from" not in tokens:
            c.add(key, "expected '<action> <METHODS> <PATH>... from <CALLER>... [as <name>]' (no 'from')", line=n)
            continue
        at = tokens.index("from")
        head, callers_tok = tokens[1:at], tokens[at + 1 :]
        jwt: dict[str, Any] | None = None
        if "jwt" in callers_tok:
            cut = callers_tok.index("jwt")
            callers_tok, options = callers_tok[:cut], callers_tok[cut + 1 :]
            jwt = _compact_jwt(c, key, options, n)
            if jwt is None:
                continue
        if len(head) < 2:
            c.add(key, "expected methods (or '*') and at least one path (or 'grpc' and a method) before 'from'",
                  line=n)  # fmt: skip
            continue
        callers = [x for tok in callers_tok for x in tok.split(",") if x]
        if not callers:
            c.add(key, "expected at least one caller after 'from' (a SPIFFE ID pattern or '*')", line=n)
            continue
        methods = [m for m in head[0].split(",") if m]
        rule: dict[str, Any] = {"name": name, "action": action}
        if mode is not None:
            rule["mode"] = mode
        if head[0] == "grpc":  # `allow grpc inventory.v1.Inventory/GetStock from ...`: the YAML form's grpc:
            rule["grpc"] = head[1:]
        else:
            if methods != ["*"]:
                rule["methods"] = methods
            rule["paths"] = head[1:]
        rule["callers"] = callers
        if jwt is not None:
            rule["jwt"] = jwt
        lines[f"rules[{len(rules)}]"] = n
        rules.append(rule)
    if len(c) != before and not rules:
        return None
    # Lines with syntax problems are reported above; the others are still compiled, so that their
    # problems (a bad caller, a bad path) come out in the same pass. The policy is never used: any problem
    # makes parse_pod_annotations raise.
    return {"rules": rules}, lines


def _compact_jwt(c: Problems, key: str, options: list[str], n: int) -> dict[str, Any] | None:
    """`jwt aud=<audience> [sub=<pattern>,...] [unbound]` after the callers: a step-up rule (the YAML
    form's `jwt: {audience, subjects, bind}`)."""
    jwt: dict[str, Any] = {}
    for opt in options:
        name, eq, value = opt.partition("=")
        if opt == "unbound":
            jwt["bind"] = False
        elif eq and name == "aud" and "audience" not in jwt:
            jwt["audience"] = value
        elif eq and name == "sub" and "subjects" not in jwt:
            jwt["subjects"] = [x for x in value.split(",") if x]
        else:
            c.add(key, f"after 'jwt' expected aud=<audience>, sub=<pattern>,... or unbound, got {opt!r}", line=n)
            return None
    if "audience" not in jwt:
        c.add(key, "'jwt' needs aud=<audience> (the audience the token must carry)", line=n)
        return None
    return jwt


def _outbound(c: Problems, text: str) -> tuple[OutboundLine, ...]:
    key = "outbound"
    out: list[OutboundLine] = []
    seen: dict[HostPort, int] = {}
    for n, s in _lines(c, key, text) or ():
        tokens = s.split()
        if len(tokens) < 5 or tokens[1] != "->" or tokens[3] != "expect":
            c.add(key, "expected '<listen host:port> -> <target host:port> expect <SPIFFE ID> [jwt aud=<audience> "
                  "[path=<prefix>] [authorization=replace|keep]]...'", line=n)  # fmt: skip
            continue
        jwt = _outbound_jwt(c, key, tokens[5:], n)
        if jwt is None:
            continue
        listen = host_port(tokens[0], allow_zero=False)
        if isinstance(listen, Invalid):
            c.add(key, f"listen address: {listen.message}", line=n)
            continue
        if not is_loopback(listen.host):
            # The outbound listener is plain HTTP: anything but loopback would let others use our identity.
            c.add(key, f"the listen address must be loopback (e.g. 127.0.0.1), got {listen.host!r}", line=n)
            continue
        target = host_port(tokens[2], allow_zero=False)
        if isinstance(target, Invalid):
            c.add(key, f"target address: {target.message}", line=n)
            continue
        expect = server_pattern(tokens[4])
        if isinstance(expect, Invalid):
            c.add(key, f"expect: {expect.message}", line=n)
            continue
        if expect.kind is PatternKind.ANY:
            c.add(key, "expect '*' would accept any server: name the server's SPIFFE ID", line=n)
            continue
        if listen in seen:
            c.add(key, f"listen address {listen} already used on line {seen[listen]}", line=n)
            continue
        seen[listen] = n
        out.append(OutboundLine(listen, OutboundTarget(target, expect, jwt), n))
    return tuple(out)


def _outbound_jwt(c: Problems, key: str, tokens: list[str], n: int) -> tuple[OutboundJwt, ...] | None:
    """The `jwt aud=<audience> [path=<prefix>] [authorization=replace|keep]` clauses after `expect`: attach
    a JWT-SVID for that audience to requests under that path (the YAML form's `jwt:` list)."""
    if tokens and tokens[0] != "jwt":
        c.add(key, f"after the expected server ID only 'jwt aud=<audience> ...' may follow, got {tokens[0]!r}", line=n)
        return None
    clauses: list[list[str]] = []
    for tok in tokens:
        if tok == "jwt":
            clauses.append([])
        else:
            clauses[-1].append(tok)
    out: list[OutboundJwt] = []
    for options in clauses:
        fields: dict[str, str] = {}
        for opt in options:
            name, eq, value = opt.partition("=")
            if not eq or name not in ("aud", "path", "authorization") or name in fields:
                c.add(key, f"after 'jwt' expected aud=<audience>, path=<prefix> or authorization=replace|keep, "
                      f"got {opt!r}", line=n)  # fmt: skip
                return None
            fields[name] = value
        if "aud" not in fields:
            c.add(key, "'jwt' needs aud=<audience> (the audience of the JWT-SVID to attach)", line=n)
            return None
        audience = jwt_audience(fields["aud"])
        prefix = path_prefix(fields.get("path", "/"))
        mode = one_of(fields.get("authorization", "replace"), AuthorizationMode)
        for what, got in (("aud", audience), ("path", prefix), ("authorization", mode)):
            if isinstance(got, Invalid):
                c.add(key, f"jwt {what}: {got.message}", line=n)
                return None
        assert isinstance(audience, str) and isinstance(prefix, str) and isinstance(mode, AuthorizationMode)
        if any(j.path_prefix.rstrip("/") == prefix.rstrip("/") for j in out):
            c.add(key, f"jwt path={prefix} appears twice", line=n)
            return None
        out.append(OutboundJwt(audience, prefix, mode))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# Downward API file


_SIMPLE_ESCAPES: Final = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
}
_HEXDIGITS: Final = frozenset("0123456789abcdefABCDEF")


def go_unquote(quoted: str) -> str:
    """Inverse of Go's `strconv.Quote` (the `"..."` form of `strconv.Unquote`); raises ValueError.

    Escapes: \\a \\b \\f \\n \\r \\t \\v \\\\ \\" , \\xHH and \\OOO (bytes, which must form UTF-8 together with
    their neighbours), \\uHHHH and \\UHHHHHHHH (valid Unicode scalar values). Raw `"`, newline or a lone
    backslash are errors, as in Go.
    """
    if len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
        raise ValueError("not a double-quoted string")
    body = quoted[1:-1]
    out: list[str] = []
    pending = bytearray()  # \x and octal escapes are bytes; decode them as UTF-8 once the run ends

    def flush() -> None:
        if pending:
            try:
                out.append(pending.decode("utf-8"))
            except UnicodeDecodeError:
                raise ValueError("\\x or octal escapes do not form valid UTF-8") from None
            pending.clear()

    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch == '"' or ch == "\n":
            raise ValueError(f"unescaped {ch!r} inside a quoted string")
        if ch != "\\":
            flush()
            out.append(ch)
            i += 1
            continue
        if i + 1 >= n:
            raise ValueError("lone backslash at the end of a quoted string")
        esc = body[i + 1]
        if esc in _SIMPLE_ESCAPES:
            flush()
            out.append(_SIMPLE_ESCAPES[esc])
            i += 2
        elif esc in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i + 2 : i + 2 + width]
            if len(digits) != width or not all(d in _HEXDIGITS for d in digits):
                raise ValueError(f"\\{esc} needs {width} hex digits")
            value = int(digits, 16)
            if esc == "x":
                pending.append(value)
            else:
                if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                    raise ValueError(f"\\{esc}{digits} is not a Unicode scalar value")
                flush()
                out.append(chr(value))
            i += 2 + width
        elif esc in "01234567":
            digits = body[i + 1 : i + 4]
            if len(digits) != 3 or not all(d in "01234567" for d in digits) or int(digits, 8) > 255:
                raise ValueError("octal escapes are three digits up to \\377")
            pending.append(int(digits, 8))
            i += 4
        else:
            raise ValueError(f"unknown escape \\{esc}")
    flush()
    return "".join(out)


def _valid_annotation_key(key: str) -> bool:
    prefix, sep, name = key.rpartition("/")
    if sep and (len(prefix) > 253 or _PREFIX_RE.fullmatch(prefix.lower()) is None):
        return False
    return len(name) <= 63 and _NAME_RE.fullmatch(name) is not None


def parse_downward_api(text: str) -> dict[str, str]:
    """Parse the kubelet's downward API annotations file (`key="go-quoted value"` per line, sorted,
    no trailing newline; an empty file is no annotations). Raises ValueError naming the line."""
    out: dict[str, str] = {}
    if not text:
        return out
    for n, line in enumerate(text.split("\n"), start=1):
        if not line:
            continue  # tolerate a trailing newline (a hand-written file)
        key, sep, quoted = line.partition("=")
        if not sep:
            raise ValueError(f'line {n}: expected key="value"')
        if not _valid_annotation_key(key):
            raise ValueError(f"line {n}: {key[:80]!r} is not an annotation key")
        if key in out:
            raise ValueError(f"line {n}: duplicate key {key!r}")
        try:
            out[key] = go_unquote(quoted)
        except ValueError as exc:
            raise ValueError(f"line {n} ({key}): {exc}") from None
    return out


# ---------------------------------------------------------------------------------------------------------
# Probe routes (SPIFFE_SIDECAR_PROBES, written by the injector)


def parse_probe_routes(text: str) -> tuple[ProbeRoute, ...]:
    """Parse the injector's SPIFFE_SIDECAR_PROBES JSON (a list of {path, port, appPath, scheme});
    raises ValueError. The probe port forwards exactly these paths and nothing else."""
    try:
        data = json.loads(text) if text.strip() else []
    except ValueError as exc:
        raise ValueError(f"probe routes are not JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError("probe routes must be a JSON list")
    out: list[ProbeRoute] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        if not isinstance(item, dict) or set(item) - {"path", "port", "appPath", "scheme"}:
            raise ValueError(f"probe route {i}: expected an object with path, port, appPath, scheme")
        path, port, app_path = item.get("path"), item.get("port"), item.get("appPath", item.get("path"))
        scheme = item.get("scheme", "HTTP")
        if not isinstance(path, str) or not path.startswith("/") or path in seen:
            raise ValueError(f"probe route {i}: path must be a unique string starting with '/'")
        if not isinstance(app_path, str) or not app_path.startswith("/"):
            raise ValueError(f"probe route {i}: appPath must start with '/'")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"probe route {i}: port must be 1-65535")
        if scheme not in ("HTTP", "HTTPS"):
            raise ValueError(f"probe route {i}: scheme must be HTTP or HTTPS")
        seen.add(path)
        out.append(ProbeRoute(path, port, app_path, scheme))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# Annotations mode: `spiffe-sidecar run --from-annotations FILE` (the injected sidecar's command line)

# The injected environment (sidecar/inject.py writes these; it imports this module, so the names of the
# variables it owns are repeated here and a test keeps them equal).
ENV_PROBE_PORT: Final = "SPIFFE_SIDECAR_PROBE_PORT"
ENV_PROBES: Final = "SPIFFE_SIDECAR_PROBES"
ENV_POD_IP: Final = "SPIFFE_SIDECAR_POD_IP"  # downward API status.podIP, for the bypass check
ENV_LISTEN_HOST: Final = "SPIFFE_SIDECAR_LISTEN_HOST"  # inbound + probe bind address; default every IPv4
DEFAULT_LISTEN_HOST: Final = "0.0.0.0"  # the pod's mTLS and probe ports must be reachable in the cluster
DEFAULT_ADMIN_PORT: Final = 15000


@dataclass(frozen=True, slots=True)
class PodRuntime:
    """The Kubernetes-only parts of annotations mode that `config.Settings` has no field for.

    `probe_listen` is None when no probe port is configured; `pod_ip` None disables the bypass check.
    `strict_bypass_check` is read at start (like the ports: changing it needs a new pod).
    """

    annotations_file: Path
    initial_text: str  # the file content the starting policy was compiled from (the reload baseline)
    probe_listen: HostPort | None
    probe_routes: tuple[ProbeRoute, ...]
    pod_ip: str | None
    app_port: int
    strict_bypass_check: bool


def _env_port(problems: Problems, environ: Mapping[str, str], name: str, *, allow_zero: bool) -> int | None:
    port = env_port(environ, name, allow_zero=allow_zero)
    if isinstance(port, Invalid):
        problems.env(name, port.short())
        return None
    return port


def _env_ip(problems: Problems, environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        problems.env(name, f"expected an IP address, got {raw!r}")
        return None


def settings_from_annotations(
    annotations: Mapping[str, str] | SidecarAnnotations,
    environ: Mapping[str, str],
    *,
    annotations_file: Path | None = None,
    log_level: str = "info",
) -> _config.Settings:
    """The frozen Settings of an injected sidecar: policy, mode and outbound targets from the annotations;
    ports and the Workload API socket from the injected environment (which wins over the annotations: the
    pod spec's ports were fixed at admission). `annotations_file` becomes `inbound.policy_file`, reloaded
    live with `load_annotations_policy`. Raises ConfigError naming the annotation or `env NAME`."""
    ann = annotations if isinstance(annotations, SidecarAnnotations) else parse_pod_annotations(annotations)
    problems = _problems()

    source: _config.WorkloadApiSettings | None = None
    socket = environ.get(_config.ENV_SOCKET, "").strip()
    if not socket:
        problems.env(_config.ENV_SOCKET, "required: the Workload API socket (injected)")
    elif isinstance(parsed := endpoint(socket), Invalid):
        problems.env(_config.ENV_SOCKET, parsed.message)
    else:
        source = _config.WorkloadApiSettings(parsed)

    host = _env_ip(problems, environ, ENV_LISTEN_HOST) or DEFAULT_LISTEN_HOST
    inbound_port = _env_port(problems, environ, _config.ENV_INBOUND_PORT, allow_zero=True)
    app_port = _env_port(problems, environ, _config.ENV_APP_PORT, allow_zero=False) or ann.app_port
    if app_port is None:
        problems.add("app-port", f"required (or env {_config.ENV_APP_PORT}): the app's port")
    admin_port = _env_port(problems, environ, _config.ENV_ADMIN_PORT, allow_zero=True)
    metrics_port = _env_port(problems, environ, _config.ENV_METRICS_PORT, allow_zero=True)

    names = [str(o.to.target) for o in ann.outbound]
    outbound = tuple(
        OutboundRoute(
            name=str(o.to.target) if names.count(str(o.to.target)) == 1 else f"outbound-line-{o.line}",
            listen=o.listen,
            to=o.to,
        )
        for o in ann.outbound
    )
    if problems or source is None or app_port is None:
        raise problems.error()
    inbound = _config.InboundSettings(
        listen=HostPort(host, ann.inbound_port if inbound_port is None else inbound_port),
        app=HostPort("127.0.0.1", app_port),
        mode=ann.inbound_mode,
        policy=ann.policy,
        policy_file=annotations_file,
        strip_request_headers=ann.strip_request_headers,
        app_protocol=ann.app_protocol,
    )
    return _config.Settings(
        source=source,
        inbound=inbound,
        admin=_config.AdminSettings(HostPort("127.0.0.1", DEFAULT_ADMIN_PORT if admin_port is None else admin_port)),
        log_level=log_level,
        outbound=outbound,
        # The injector sets the port (metrics-port annotation or its default); Prometheus scrapes the pod IP.
        metrics=_config.MetricsSettings(None if metrics_port is None else HostPort(host, metrics_port)),
    )


def pod_runtime(
    annotations: SidecarAnnotations,
    environ: Mapping[str, str],
    settings: _config.Settings,
    annotations_file: Path,
    initial_text: str,
) -> PodRuntime:
    """Probe port, probe routes and the bypass check from the injected environment (ConfigError)."""
    problems = _problems()
    probe_port = _env_port(problems, environ, ENV_PROBE_PORT, allow_zero=True)
    routes: tuple[ProbeRoute, ...] = ()
    try:
        routes = parse_probe_routes(environ.get(ENV_PROBES, ""))
    except ValueError as exc:
        problems.env(ENV_PROBES, str(exc))
    pod_ip = _env_ip(problems, environ, ENV_POD_IP)
    if problems:
        raise problems.error()
    assert settings.inbound is not None  # settings_from_annotations always builds one
    host = settings.inbound.listen.host
    return PodRuntime(
        annotations_file=annotations_file,
        initial_text=initial_text,
        probe_listen=None if probe_port is None else HostPort(host, probe_port),
        probe_routes=routes,
        pod_ip=pod_ip,
        app_port=settings.inbound.app.port,
        strict_bypass_check=annotations.strict_bypass_check,
    )


def _parse_file(text: str, source: str) -> SidecarAnnotations:
    try:
        raw = parse_downward_api(text)
    except ValueError as exc:
        raise ConfigError([Problem(source, str(exc))]) from None
    return parse_pod_annotations(raw)


def load_annotations_policy(text: str, source: str) -> Policy:
    """The policy loader for the live reload of a downward API annotations file (same signature as
    `config.load_policy`): ConfigError when the file or ANY of our annotations is bad, so a pod edit
    that would be refused at admission is refused here too and the last good policy stays."""
    return _parse_file(text, source).policy


def annotations_mode(
    text: str, environ: Mapping[str, str], annotations_file: Path, *, log_level: str = "info"
) -> tuple[_config.Settings, PodRuntime]:
    """Everything `run --from-annotations FILE` needs, from the file's text and the environment."""
    ann = _parse_file(text, str(annotations_file))
    settings = settings_from_annotations(ann, environ, annotations_file=annotations_file, log_level=log_level)
    return settings, pod_runtime(ann, environ, settings, annotations_file, text)
