"""Pod annotations (both policy forms), the downward API file (Go %q) and probe routes."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import annotations as ann_mod
from sidecar.annotations import (
    DEFAULT_INBOUND_PORT,
    KEYS,
    PREFIX,
    ProbeRoute,
    go_unquote,
    parse_downward_api,
    parse_pod_annotations,
    parse_probe_routes,
    policy_from_annotations,
)
from sidecar.config import (
    AuthorizationMode,
    HostPort,
    ListenerMode,
    OutboundJwt,
    WorkloadApiSettings,
    describe_settings,
)
from sidecar.errors import ConfigError
from sidecar.identity import SpiffeId
from sidecar.policy import RequestAttrs, authorize
from tests import example
from tests.example import POLICY

CHECKOUT = SpiffeId.parse(example.CHECKOUT)
REPORTING = SpiffeId.parse(example.REPORTING)

COMPACT = """\
# the running example
allow GET /api/stock/* from spiffe://example.org/ns/shop/sa/checkout as checkout-reads-stock

deny * /admin/** from * as no-admin
"""

YAML_FORM = POLICY  # the running example as a policy file


def ann(**kw: str) -> dict[str, str]:
    return {PREFIX + k.replace("_", "-"): v for k, v in kw.items()}


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [str(p) for p in exc.value.problems]


# ---------------------------------------------------------------------------------------------------------
# Policy: both forms, one model


@pytest.mark.parametrize("text", [COMPACT, YAML_FORM], ids=["compact", "yaml"])
def test_running_example_in_both_forms(text: str) -> None:
    policy = policy_from_annotations(ann(inbound_policy=text))
    assert authorize(policy, RequestAttrs(CHECKOUT, "GET", "/api/stock/42")).allowed
    assert not authorize(policy, RequestAttrs(CHECKOUT, "POST", "/api/stock/42")).allowed
    d = authorize(policy, RequestAttrs(CHECKOUT, "GET", "/admin"))
    assert not d.allowed and d.rule == "no-admin"
    d = authorize(policy, RequestAttrs(REPORTING, "GET", "/api/stock/42"))
    assert not d.allowed and d.rule == "default-deny"
    assert [r.name for r in policy.rules] == ["checkout-reads-stock", "no-admin"]


def test_compact_and_yaml_compile_to_the_same_rules() -> None:
    a = policy_from_annotations(ann(inbound_policy=COMPACT))
    b = policy_from_annotations(ann(inbound_policy=YAML_FORM))
    assert [r.to_dict() for r in a.rules] == [r.to_dict() for r in b.rules]


def test_compact_details() -> None:
    text = (
        "allow GET,HEAD /a/* /b/** from spiffe://example.org/ns/shop/**, spiffe://example.org/ns/x/sa/y\n"
        "audit-deny * /b/secret from spiffe://example.org/ns/shop/sa/checkout\n"
    )
    policy = policy_from_annotations(ann(inbound_policy=text))
    first, second = policy.rules
    assert first.name == "line-1" and first.methods == frozenset({"GET", "HEAD"})
    assert [p.text for p in first.paths] == ["/a/*", "/b/**"]
    assert [c.text for c in first.callers] == ["spiffe://example.org/ns/shop/**", "spiffe://example.org/ns/x/sa/y"]
    assert second.name == "line-2" and second.action == "deny" and second.mode == "audit" and second.methods is None
    d = authorize(policy, RequestAttrs(CHECKOUT, "GET", "/b/secret"))
    assert d.forward and not d.enforced


def test_yaml_bare_list_and_policy_mode() -> None:
    text = '- {name: r, action: allow, paths: ["/x"], callers: ["*"]}\n'
    a = parse_pod_annotations(ann(inbound_policy=text, policy_mode="audit"))
    assert a.policy.mode == "audit" and a.policy_mode == "audit" and a.has_policy
    assert [r.name for r in a.policy.rules] == ["r"]


def test_no_policy_denies_everything() -> None:
    a = parse_pod_annotations({})
    assert not a.has_policy and a.policy.rules == ()
    assert not authorize(a.policy, RequestAttrs(CHECKOUT, "GET", "/")).forward
    assert a.inbound_port == DEFAULT_INBOUND_PORT and a.inbound_mode is ListenerMode.HTTP
    assert a.inject is None and a.native_sidecar is None and not a.strict_bypass_check


def test_compact_problems_name_annotation_and_line() -> None:
    text = "allow GET /ok from *\nallow GET api from spife://x\npermit GET /x from *\ndeny GET /x\n"
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(ann(inbound_policy=text))
    msgs = problems(exc)
    src = f"annotation {PREFIX}inbound-policy"
    assert any(m.startswith(f"{src}:3:") and "allow, deny or audit-deny" in m for m in msgs)
    assert any(m.startswith(f"{src}:4:") and "no 'from'" in m for m in msgs)
    # Grammar problems stop before compiling; fix them and the rule problems show with their lines.
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(ann(inbound_policy="allow GET /ok from *\nallow GET api from spife://x\n"))
    msgs = problems(exc)
    assert any(m.startswith(f"{src}:2: rules[1].paths[0]") for m in msgs), msgs
    assert any(m.startswith(f"{src}:2: rules[1].callers[0]") and "spiffe://" in m for m in msgs), msgs


def test_yaml_problems_name_annotation_and_line() -> None:
    text = YAML_FORM.replace('callers: ["*"]', 'callers: ["*"]\n    typo: 1')
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(ann(inbound_policy=text))
    assert problems(exc) == [
        f"annotation {PREFIX}inbound-policy:11: rules[1].typo: unknown key 'typo' (expected one of: "
        "action, callers, grpc, jwt, methods, mode, name, paths)"
    ]
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(ann(inbound_policy="rules: [\n"))
    assert problems(exc)[0].startswith(f"annotation {PREFIX}inbound-policy:")


def test_every_problem_is_collected() -> None:
    bad = ann(
        app_port="http",
        inbound_port="70000",
        inbound_mode="udp",
        policy_mode="dry",
        cpu_request="lots",
        native_sidecar="yes",
        strict_bypass_check="1",
        inject="maybe",
        status="{not json",
    )
    bad[PREFIX + "inbound-polcy"] = "x"
    bad[PREFIX + "x" * 64] = "x"
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(bad)
    keys = {m.split(":")[0].removeprefix(f"annotation {PREFIX}") for m in problems(exc)}
    assert keys == {
        "app-port",
        "inbound-port",
        "inbound-mode",
        "policy-mode",
        "cpu-request",
        "native-sidecar",
        "strict-bypass-check",
        "inject",
        "status",
        "inbound-polcy",
        "x" * 64,
    }


def test_other_prefixes_are_ignored() -> None:
    a = parse_pod_annotations({"kubectl.kubernetes.io/restartedAt": "now", "other.io/inbound-policy": "junk"})
    assert a.policy.rules == ()


def test_scalars() -> None:
    a = parse_pod_annotations(
        ann(
            app_port="8080",
            inbound_port=" 9443 ",
            inbound_mode="tcp",
            inbound_policy="allow * /** from spiffe://example.org/ns/shop/sa/checkout",
            cpu_request="100m",
            memory_request="64Mi",
            cpu_limit="1.5",
            memory_limit="1Gi",
            native_sidecar="False",
            strict_bypass_check="true",
            inject="true",
        )
    )
    assert (a.app_port, a.inbound_port, a.inbound_mode) == (8080, 9443, ListenerMode.TCP)
    assert (a.cpu_request, a.memory_request, a.cpu_limit, a.memory_limit) == ("100m", "64Mi", "1.5", "1Gi")
    assert a.native_sidecar is False and a.strict_bypass_check and a.inject is True


def test_tcp_mode_refuses_path_rules_and_same_ports() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(ann(inbound_mode="tcp", inbound_policy=COMPACT, app_port="8443"))
    msgs = problems(exc)
    assert any("inbound-mode" in m and "checkout-reads-stock" in m for m in msgs)
    assert any("app-port" in m and "must differ" in m for m in msgs)


def test_policy_mode_conflict() -> None:
    with pytest.raises(ConfigError, match="set it in one place"):
        parse_pod_annotations(ann(inbound_policy="mode: enforce\nrules: []\n", policy_mode="audit"))
    a = parse_pod_annotations(ann(inbound_policy="mode: audit\nrules: []\n", policy_mode="audit"))
    assert a.policy.mode == "audit"


def test_outbound() -> None:
    text = (
        "# app -> inventory\n"
        "127.0.0.1:15001 -> inventory.shop.svc:8443 expect spiffe://example.org/ns/shop/sa/inventory\n"
        "[::1]:15002 -> 10.0.0.7:8443 expect spiffe://example.org/ns/shop/sa/*\n"
    )
    a = parse_pod_annotations(ann(outbound=text))
    first, second = a.outbound
    assert (str(first.listen), str(first.to.target), first.to.expect.text, first.line) == (
        "127.0.0.1:15001",
        "inventory.shop.svc:8443",
        "spiffe://example.org/ns/shop/sa/inventory",
        2,
    )
    assert second.listen.host == "::1" and second.to.expect.matches(SpiffeId.parse("spiffe://example.org/ns/shop/sa/x"))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0.0.0.0:15001 -> a:1 expect spiffe://td/x", "loopback"),
        ("127.0.0.1:15001 -> a:1 expect *", "name the server"),
        ("127.0.0.1:15001 -> a:1 expect spiffe://TD/x", "expect"),
        ("127.0.0.1:15001 => a:1 expect spiffe://td/x", "expected '<listen"),
        ("127.0.0.1:0 -> a:1 expect spiffe://td/x", "listen address"),
        ("127.0.0.1:1 -> a expect spiffe://td/x", "target address"),
    ],
)
def test_outbound_errors(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(ann(outbound="\n" + line))
    (msg,) = problems(exc)
    assert msg.startswith(f"annotation {PREFIX}outbound:2: ") and message in msg


def test_outbound_duplicate_listen() -> None:
    line = "127.0.0.1:15001 -> a:1 expect spiffe://td/x"
    with pytest.raises(ConfigError, match="already used on line 1"):
        parse_pod_annotations(ann(outbound=f"{line}\n{line}"))



_INVENTORY_LINE = "127.0.0.1:15001 -> inventory.shop.svc:8443 expect spiffe://example.org/ns/shop/sa/inventory"


def test_outbound_jwt_clause_defaults() -> None:
    a = parse_pod_annotations(ann(outbound=_INVENTORY_LINE + " jwt aud=inventory"))
    (line,) = a.outbound
    assert line.to.jwt == (OutboundJwt("inventory", "/", AuthorizationMode.REPLACE),)
    assert str(line.to.target) == "inventory.shop.svc:8443" and line.line == 1
    assert parse_pod_annotations(ann(outbound=_INVENTORY_LINE)).outbound[0].to.jwt == ()


def test_outbound_jwt_clauses_repeat_one_per_path() -> None:
    text = (
        "# app -> inventory, a token on the stock and order APIs\n"
        f"{_INVENTORY_LINE} jwt aud=inventory path=/api/stock authorization=keep"
        "   jwt   path=/api/orders/ aud=spiffe://example.org/ns/shop/sa/inventory\n"
        "127.0.0.1:15002 -> reports.shop.svc:8443 expect spiffe://example.org/ns/shop/sa/reporting\n"
    )
    a = parse_pod_annotations(ann(outbound=text))
    first, second = a.outbound
    assert first.to.jwt == (
        OutboundJwt("inventory", "/api/stock", AuthorizationMode.KEEP),
        OutboundJwt("spiffe://example.org/ns/shop/sa/inventory", "/api/orders/", AuthorizationMode.REPLACE),
    )
    assert (first.line, second.line, second.to.jwt) == (2, 3, ())
    # The clauses reach the sidecar's settings (what the outbound listener attaches, /config shows).
    env = {"SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent.sock", "SPIFFE_SIDECAR_APP_PORT": "8080"}
    settings = ann_mod.settings_from_annotations(a, env)
    assert [r.to.jwt for r in settings.outbound] == [first.to.jwt, ()]
    assert describe_settings(settings)["outbound"][0]["jwt"] == [
        {"audience": "inventory", "path": "/api/stock", "authorization": "keep"},
        {"audience": "spiffe://example.org/ns/shop/sa/inventory", "path": "/api/orders/", "authorization": "replace"},
    ]


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (" jwt", "'jwt' needs aud=<audience> (the audience of the JWT-SVID to attach)"),
        (" jwt path=/api/stock", "'jwt' needs aud=<audience> (the audience of the JWT-SVID to attach)"),
        (" jwt aud=inventory jwt", "'jwt' needs aud=<audience> (the audience of the JWT-SVID to attach)"),
        (" jwt aud=inventory header=x-token",
         "after 'jwt' expected aud=<audience>, path=<prefix> or authorization=replace|keep, got 'header=x-token'"),
        (" jwt aud=inventory AUD=other",
         "after 'jwt' expected aud=<audience>, path=<prefix> or authorization=replace|keep, got 'AUD=other'"),
        (" jwt aud=inventory aud=other",
         "after 'jwt' expected aud=<audience>, path=<prefix> or authorization=replace|keep, got 'aud=other'"),
        (" jwt aud=inventory keep",
         "after 'jwt' expected aud=<audience>, path=<prefix> or authorization=replace|keep, got 'keep'"),
        (" jwt aud=", "jwt aud: expected an audience (printable ASCII, no spaces, at most 256 characters), got ''"),
        (" jwt aud=inventory path=api/stock", "jwt path: expected a path prefix starting with '/', got 'api/stock'"),
        (" jwt aud=inventory path=/api?x=1",
         "jwt path: path prefix '/api?x=1': no query, spaces or control characters"),
        (" jwt aud=inventory path=/api#x", "jwt path: path prefix '/api#x': no query, spaces or control characters"),
        (" jwt aud=inventory authorization=drop", "jwt authorization: expected replace or keep, got 'drop'"),
        (" jwt aud=inventory authorization=Keep", "jwt authorization: expected replace or keep, got 'Keep'"),
        (" jwt aud=a path=/api jwt aud=b path=/api", "jwt path=/api appears twice"),
        (" jwt aud=a path=/api jwt aud=b path=/api/", "jwt path=/api/ appears twice"),
        (" jwt aud=a jwt aud=b", "jwt path=/ appears twice"),
        (" garbage", "after the expected server ID only 'jwt aud=<audience> ...' may follow, got 'garbage'"),
        (" aud=inventory",
         "after the expected server ID only 'jwt aud=<audience> ...' may follow, got 'aud=inventory'"),
    ],
)  # fmt: skip
def test_outbound_jwt_clause_errors_name_the_line(tail: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(ann(outbound=f"# routes\n\n127.0.0.1:15000 -> a:1 expect spiffe://td/a\n{_INVENTORY_LINE}{tail}"))
    assert problems(exc) == [f"annotation {PREFIX}outbound:4: {message}"]


def test_outbound_jwt_clause_problems_of_several_lines_are_all_listed() -> None:
    text = f"{_INVENTORY_LINE} jwt\n127.0.0.1:15002 -> b:1 expect spiffe://td/b jwt aud=b authorization=never\n"
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(ann(outbound=text))
    assert problems(exc) == [
        f"annotation {PREFIX}outbound:1: 'jwt' needs aud=<audience> (the audience of the JWT-SVID to attach)",
        f"annotation {PREFIX}outbound:2: jwt authorization: expected replace or keep, got 'never'",
    ]


def test_outbound_without_expect_still_gets_the_usage_message() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(ann(outbound="127.0.0.1:15001 -> a:1 jwt aud=inventory"))
    (msg,) = problems(exc)
    assert msg.startswith(f"annotation {PREFIX}outbound:1: expected '<listen host:port> -> <target host:port> "
                          "expect <SPIFFE ID> [jwt aud=<audience>")  # fmt: skip


# Hypothesis: the parser never crashes; it accepts or raises ConfigError with a reason per problem.
_values = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["true", "false", "8080", "0", "tcp", "http", "audit", "100m", "64Mi", COMPACT, YAML_FORM]),
    st.lists(
        st.sampled_from(
            ["allow", "deny", "audit-deny", "GET", "*", "/a/*", "/**", "from", "as", "x", "spiffe://td/a", ",", "-:"]
        ),
        max_size=10,
    ).map(" ".join),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*KEYS, "bogus"]).map(lambda k: PREFIX + k), _values, max_size=6))
def test_fuzz_pod_annotations(annotations: dict[str, str]) -> None:
    try:
        a = parse_pod_annotations(annotations)
    except ConfigError as exc:
        assert exc.problems and all(p.where.startswith(f"annotation {PREFIX}") and p.message for p in exc.problems)
    else:
        assert a.policy is not None


# ---------------------------------------------------------------------------------------------------------
# Downward API: Go strconv.Quote encoder (a mirror of Go's, for fixtures) and the file format


def go_quote(s: str) -> str:
    """Python mirror of Go's strconv.Quote for valid UTF-8 (appendQuotedWith/appendEscapedRune)."""
    out = ['"']
    for ch in s:
        r = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == " " or (r >= 0x20 and r != 0x7F and unicodedata.category(ch)[0] in "LMNPS"):
            out.append(ch)  # unicode.IsPrint: letters, marks, numbers, punctuation, symbols, ASCII space
        elif ch in "\a\b\f\n\r\t\v":
            out.append("\\" + "abfnrtv"["\a\b\f\n\r\t\v".index(ch)])
        elif r < 0x20 or r == 0x7F:
            out.append(f"\\x{r:02x}")
        elif r < 0x10000:
            out.append(f"\\u{r:04x}")
        else:
            out.append(f"\\U{r:08x}")
    out.append('"')
    return "".join(out)


def format_map(m: dict[str, str]) -> str:
    """fieldpath.FormatMap: sorted `key=%q` lines, no trailing newline."""
    return "\n".join(f"{k}={go_quote(m[k])}" for k in sorted(m))


# (value, exactly what Go 1.19's strconv.Quote prints): the cases from kubernetes-notes §3.1.
GO_FIXTURES = [
    ("", '""'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("a\nb\tc\rd\ae\bf\fg\vh", '"a\\nb\\tc\\rd\\ae\\bf\\fg\\vh"'),
    ("\x1b[0m\x7f\x00", '"\\x1b[0m\\x7f\\x00"'),
    ("nb\u00a0sp", '"nb\\u00a0sp"'),
    ("l\u2028sep", '"l\\u2028sep"'),
    ("\ufeffbom", '"\\ufeffbom"'),
    ("\U0010ffff", '"\\U0010ffff"'),
    ("é 日本 😀", '"é 日本 😀"'),
]


@pytest.mark.parametrize(("value", "quoted"), GO_FIXTURES)
def test_go_quote_fixtures(value: str, quoted: str) -> None:
    assert go_quote(value) == quoted
    assert go_unquote(quoted) == value


def test_go_unquote_accepts_go_escapes_quote_never_emits() -> None:
    assert go_unquote('"\\101\\303\\251"') == "Aé"  # octal bytes forming UTF-8
    assert go_unquote('"\\xc3\\xa9"') == "é"
    assert go_unquote('"\\u00E9"') == "é"


@pytest.mark.parametrize(
    "bad",
    ['"', "abc", '"a"b"', '"\\"', '"\\q"', '"\\x4"', '"\\ud800"', '"\\U00110000"', '"\\xff"', '"\\400"', '"a\nb"'],
)
def test_go_unquote_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        go_unquote(bad)


def test_parse_downward_api_file() -> None:
    m = {
        PREFIX + "inbound-policy": COMPACT,
        PREFIX + "app-port": "8080",
        "kubectl.kubernetes.io/default-container": "app",
        "plain": 'quote " and \\ and \x01',
    }
    text = format_map(m)
    assert not text.endswith("\n") and text.splitlines()[0].startswith("kubectl.kubernetes.io/")
    assert parse_downward_api(text) == m
    assert parse_downward_api("") == {}
    assert parse_downward_api(text + "\n") == m
    # The file goes straight into the annotation parser, as in the sidecar's live reload.
    assert [r.name for r in policy_from_annotations(parse_downward_api(text)).rules] == [
        "checkout-reads-stock",
        "no-admin",
    ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("novalue", "expected key="),
        ('bad key="x"', "not an annotation key"),
        ('a="1"\na="2"', "duplicate"),
        ('a="unterminated', "line 1 (a)"),
        ('a=__import__("os")', "line 1 (a)"),
    ],
)
def test_parse_downward_api_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_downward_api(text)


_keys = st.from_regex(
    r"([a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9])?", fullmatch=True
)
_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _text, max_size=8))
def test_downward_round_trip(m: dict[str, str]) -> None:
    assert parse_downward_api(format_map(m)) == m


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=120))
def test_fuzz_downward_api(text: str) -> None:
    try:
        out = parse_downward_api(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


# ---------------------------------------------------------------------------------------------------------
# Probe routes


def test_probe_routes() -> None:
    routes = (
        ProbeRoute("/healthz", 8080, "/healthz"),
        ProbeRoute("/spiffe-sidecar/app-probe/a/x", 9090, "/h", "HTTPS"),
    )
    assert parse_probe_routes(json.dumps([r.to_json() for r in routes])) == routes
    assert parse_probe_routes("") == ()
    for bad in [
        "{}",
        "[1]",
        '[{"path": "x", "port": 1}]',
        '[{"path": "/x", "port": 0}]',
        "not json",
        '[{"path": "/x", "port": 1}, {"path": "/x", "port": 2}]',
        '[{"path": "/x", "port": 1, "scheme": "FTP"}]',
    ]:
        with pytest.raises(ValueError):
            parse_probe_routes(bad)


# --- annotations mode (`run --from-annotations`): Settings, PodRuntime, the reload loader -----------------

_ENV = {
    "SPIFFE_ENDPOINT_SOCKET": "unix:///spiffe-workload-api/spire-agent.sock",
    "SPIFFE_SIDECAR_INBOUND_PORT": "8443",
    "SPIFFE_SIDECAR_APP_PORT": "8080",
    "SPIFFE_SIDECAR_ADMIN_PORT": "15000",
    "SPIFFE_SIDECAR_PROBE_PORT": "15021",
    "SPIFFE_SIDECAR_PROBES": '[{"path":"/healthz","port":8080,"appPath":"/healthz","scheme":"HTTP"}]',
    "SPIFFE_SIDECAR_POD_IP": "10.1.2.3",
}
_FILE = Path("/etc/spiffe-sidecar/annotations")
_CHECKOUT = "spiffe://example.org/ns/shop/sa/checkout"


def _downward(values: dict[str, str]) -> str:
    return "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(values.items()))  # JSON = Go %q for ASCII


def test_annotations_mode_builds_settings_and_runtime() -> None:
    text = _downward(
        {
            "spiffe-sidecar.io/inbound-policy": f"allow GET /api/* from {_CHECKOUT}",
            "spiffe-sidecar.io/outbound": "127.0.0.1:15001 -> inventory.shop.svc:8443 expect "
            "spiffe://example.org/ns/shop/sa/inventory",
            "spiffe-sidecar.io/strict-bypass-check": "true",
            "other.io/x": "ignored",
        }
    )
    settings, pod = ann_mod.annotations_mode(text, _ENV, _FILE, log_level="debug")
    assert isinstance(settings.source, WorkloadApiSettings)
    assert settings.inbound is not None
    assert settings.inbound.listen == HostPort("0.0.0.0", 8443)
    assert settings.inbound.app == HostPort("127.0.0.1", 8080)
    assert settings.inbound.policy_file == _FILE
    assert settings.admin.listen == HostPort("127.0.0.1", 15000)
    assert settings.log_level == "debug"
    (route,) = settings.outbound
    assert (route.name, route.listen, route.to.target) == (
        "inventory.shop.svc:8443",
        HostPort("127.0.0.1", 15001),
        HostPort("inventory.shop.svc", 8443),
    )
    assert pod.probe_listen == HostPort("0.0.0.0", 15021)
    assert [r.path for r in pod.probe_routes] == ["/healthz"]
    assert (pod.pod_ip, pod.app_port, pod.strict_bypass_check) == ("10.1.2.3", 8080, True)
    peer = SpiffeId.parse(_CHECKOUT)
    assert settings.inbound.policy is not None
    assert authorize(settings.inbound.policy, RequestAttrs(peer, "GET", "/api/x")).allowed


def test_annotations_mode_defaults_from_annotations_when_env_is_absent() -> None:
    env = {"SPIFFE_ENDPOINT_SOCKET": _ENV["SPIFFE_ENDPOINT_SOCKET"], "SPIFFE_SIDECAR_LISTEN_HOST": "127.0.0.1"}
    text = _downward({"spiffe-sidecar.io/app-port": "9090", "spiffe-sidecar.io/inbound-port": "9443"})
    settings, pod = ann_mod.annotations_mode(text, env, _FILE)
    assert settings.inbound is not None
    assert (settings.inbound.listen, settings.inbound.app) == (HostPort("127.0.0.1", 9443), HostPort("127.0.0.1", 9090))
    assert settings.admin.listen == HostPort("127.0.0.1", 15000)
    assert (pod.probe_listen, pod.probe_routes, pod.pod_ip, pod.strict_bypass_check) == (None, (), None, False)


def test_annotations_mode_names_every_environment_problem() -> None:
    env = {
        "SPIFFE_SIDECAR_INBOUND_PORT": "99999",
        "SPIFFE_SIDECAR_LISTEN_HOST": "every",
    }
    with pytest.raises(ConfigError) as err:
        ann_mod.annotations_mode("", env, _FILE)
    where = sorted(p.where for p in err.value.problems)
    assert where == [
        "annotation spiffe-sidecar.io/app-port",
        "env SPIFFE_ENDPOINT_SOCKET",
        "env SPIFFE_SIDECAR_INBOUND_PORT",
        "env SPIFFE_SIDECAR_LISTEN_HOST",
    ]
    bad_runtime = {**_ENV, "SPIFFE_SIDECAR_PROBES": "{", "SPIFFE_SIDECAR_POD_IP": "pod"}
    with pytest.raises(ConfigError) as err:
        ann_mod.annotations_mode("", bad_runtime, _FILE)
    assert sorted(p.where for p in err.value.problems) == ["env SPIFFE_SIDECAR_POD_IP", "env SPIFFE_SIDECAR_PROBES"]


def test_reload_loader_rejects_a_bad_file_or_a_bad_annotation() -> None:
    good = _downward({"spiffe-sidecar.io/inbound-policy": f"allow GET /a from {_CHECKOUT}"})
    assert ann_mod.load_annotations_policy(good, str(_FILE)).rules
    with pytest.raises(ConfigError) as err:
        ann_mod.load_annotations_policy('spiffe-sidecar.io/inbound-policy="unterminated', str(_FILE))
    assert err.value.problems[0].where == str(_FILE)
    # A typo in another of our annotations is refused too (the webhook would refuse it at admission).
    typo = _downward(
        {"spiffe-sidecar.io/inbound-policy": f"allow GET /a from {_CHECKOUT}", "spiffe-sidecar.io/polcy": "x"}
    )
    with pytest.raises(ConfigError) as err:
        ann_mod.load_annotations_policy(typo, str(_FILE))
    assert err.value.problems[0].where == "annotation spiffe-sidecar.io/polcy"


def test_injected_environment_names_match() -> None:
    from sidecar import inject

    pod = {
        "metadata": {"labels": {"spiffe-sidecar.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 8080}]}]},
    }
    out = inject.mutate(pod, namespace="shop", settings=inject.InjectSettings())
    (sc,) = [c for c in out["spec"]["initContainers"] if c["name"] == "spiffe-sidecar"]
    names = {e["name"] for e in sc["env"]}
    assert {ann_mod.ENV_PROBE_PORT, ann_mod.ENV_PROBES, ann_mod.ENV_POD_IP} <= names
    assert ann_mod.ENV_LISTEN_HOST not in names  # a test/ops override, never injected


def test_metrics_port_annotation_and_the_injected_metrics_listener() -> None:
    ann = ann_mod.parse_pod_annotations({"spiffe-sidecar.io/metrics-port": "9102"})
    assert ann.metrics_port == 9102
    assert ann_mod.parse_pod_annotations({}).metrics_port is None
    with pytest.raises(ConfigError, match="metrics-port"):
        ann_mod.parse_pod_annotations({"spiffe-sidecar.io/metrics-port": "http"})
    text = _downward({"spiffe-sidecar.io/inbound-policy": f"allow GET /api/* from {_CHECKOUT}"})
    settings, _ = ann_mod.annotations_mode(text, {**_ENV, "SPIFFE_SIDECAR_METRICS_PORT": "15020"}, _FILE)
    assert settings.metrics.listen == HostPort("0.0.0.0", 15020)  # the pod IP: Prometheus scrapes it
    settings, _ = ann_mod.annotations_mode(text, {k: v for k, v in _ENV.items() if "METRICS" not in k}, _FILE)
    assert settings.metrics.listen is None


def test_strip_request_headers_annotation() -> None:
    assert "x-http-method-override" in parse_pod_annotations({}).strip_request_headers
    a = parse_pod_annotations(ann(strip_request_headers="X-Internal-Token, X-Debug"))
    assert a.strip_request_headers == ("x-internal-token", "x-debug")
    assert parse_pod_annotations(ann(strip_request_headers="none")).strip_request_headers == ()
    with pytest.raises(ConfigError) as info:
        parse_pod_annotations(ann(strip_request_headers="X Bad"))
    assert "strip-request-headers" in str(info.value) and "not a header name" in str(info.value)


def test_syntax_problems_do_not_hide_the_others() -> None:
    text = f"ALLOW GET /x from *\nallow GET /y from spiffe://Bad.org/x\nallow GET api from {_CHECKOUT}\n"
    with pytest.raises(ConfigError) as info:
        ann_mod.parse_pod_annotations({"spiffe-sidecar.io/inbound-policy": text, "spiffe-sidecar.io/polcy-mode": "x"})
    problems = [str(p) for p in info.value.problems]
    assert len(problems) == 4, problems
    assert "unknown annotation (did you mean 'policy-mode'?)" in problems[0]
    assert problems[1].startswith("annotation spiffe-sidecar.io/inbound-policy:1: ")
    assert "got 'ALLOW' (did you mean 'allow'?)" in problems[1]
    assert problems[2].startswith("annotation spiffe-sidecar.io/inbound-policy:2: rules[0].callers[0]")
    assert problems[3].startswith("annotation spiffe-sidecar.io/inbound-policy:3: rules[1].paths[0]")


def test_compact_step_up_rules() -> None:
    text = (
        "allow POST /api/stock/*/reserve from spiffe://example.org/ns/shop/sa/checkout jwt aud=inventory as reserve\n"
        "allow * /ops/** from * jwt aud=ops sub=spiffe://example.org/ns/ops/**,spiffe://example.org/ns/sre/** unbound\n"
    )
    policy = parse_pod_annotations(ann(inbound_policy=text)).policy
    reserve, ops = policy.rules
    assert reserve.name == "reserve" and reserve.jwt is not None and reserve.jwt.audience == "inventory"
    assert reserve.jwt.bound and [p.text for p in reserve.jwt.subjects] == ["*"]
    assert ops.jwt is not None and not ops.jwt.bound and len(ops.jwt.subjects) == 2
    for bad, fragment in [
        ("allow GET /x from * jwt", "needs aud="),
        ("allow GET /x from * jwt aud=a bogus", "after 'jwt' expected"),
        ("deny GET /x from * jwt aud=a", "only an allow rule"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_pod_annotations(ann(inbound_policy=bad))
        assert fragment in str(info.value) and "inbound-policy:1" in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------------------------
# HTTP/2 and gRPC (issue 12): app-protocol, and gRPC methods in the compact syntax


def test_app_protocol_annotation() -> None:
    from sidecar.config import AppProtocol

    assert parse_pod_annotations(ann()).app_protocol is AppProtocol.HTTP1
    assert parse_pod_annotations(ann(**{"app-protocol": "grpc"})).app_protocol is AppProtocol.GRPC
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(ann(**{"app-protocol": "http3"}))
    assert any(m.startswith(f"annotation {PREFIX}app-protocol:") for m in problems(exc))
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(ann(inbound_policy="allow * ** from *", **{"app-protocol": "h2c", "inbound-mode": "tcp"}))
    assert any("applies to inbound-mode http only" in m for m in problems(exc))


def test_compact_grpc_rules() -> None:
    text = (f"allow grpc inventory.v1.Inventory/GetStock inventory.v1.Inventory/List* from {example.CHECKOUT}\n")
    with pytest.raises(ConfigError) as exc:
        parse_pod_annotations(ann(inbound_policy=text))
    assert any(m.startswith(f"annotation {PREFIX}inbound-policy:1: rules[0].grpc[1]") for m in problems(exc))
    text = (f"allow grpc inventory.v1.Inventory/GetStock from {example.CHECKOUT} as stock\n"
            "deny grpc inventory.v1.Admin/* from *\n")
    policy = policy_from_annotations(ann(inbound_policy=text))
    assert [r.name for r in policy.rules] == ["stock", "line-2"]
    assert policy.rules[0].grpc == ("inventory.v1.Inventory/GetStock",)
    assert authorize(policy, RequestAttrs(CHECKOUT, "POST", "/inventory.v1.Inventory/GetStock")).rule == "stock"
    assert authorize(policy, RequestAttrs(CHECKOUT, "POST", "/inventory.v1.Admin/Reset")).rule == "line-2"
