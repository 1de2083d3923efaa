"""Config loader: examples load, every problem is listed with file:line and field path, env overrides."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from sidecar.config import (
    AuditSettings,
    AuthorizationMode,
    HostPort,
    ListenerMode,
    OutboundJwt,
    PemSourceSettings,
    Settings,
    Timeouts,
    WorkloadApiSettings,
    describe_settings,
    load_policy,
    load_settings,
    parse_duration,
    parse_host_port,
    parse_settings,
    parse_yaml,
    warnings,
)
from sidecar.errors import ConfigError
from tests.example import POLICY

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"

MINIMAL = """\
svid_source:
  workload_api: {socket: "unix:///run/spire/agent.sock"}
inbound:
  listen: "127.0.0.1:8443"
  app: "127.0.0.1:8080"
  policy_file: policy.yaml
"""


def _files(**files: str) -> dict[Path, str]:
    return {Path("/cfg") / name: text for name, text in files.items()}


def parse(text: str, environ: dict[str, str] | None = None, files: dict[Path, str] | None = None) -> Settings:
    store = _files(**{"policy.yaml": POLICY}) if files is None else files

    def read_file(path: Path) -> str:
        try:
            return store[path]
        except KeyError:
            raise FileNotFoundError(2, "No such file or directory", str(path)) from None

    return parse_settings(
        textwrap.dedent(text), "side.yaml", environ=environ or {}, base_dir=Path("/cfg"), read_file=read_file
    )


def problems(text: str, environ: dict[str, str] | None = None, files: dict[Path, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, environ, files)
    return [str(p) for p in info.value.problems]


# --- the examples ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["inventory.yaml", "checkout.yaml", "reporting.yaml"])
def test_every_example_config_loads(name: str) -> None:
    env = {"SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent.sock"}
    settings = load_settings(CONFIG_DIR / name, env)
    assert settings.inbound is not None
    assert settings.inbound.policy is not None
    assert settings.inbound.policy.describe()


def test_inventory_example_is_the_documented_schema() -> None:
    settings = load_settings(CONFIG_DIR / "inventory.yaml", {})
    assert isinstance(settings.source, WorkloadApiSettings)
    assert str(settings.source.endpoint) == "unix:///run/spire/agent-sockets/spire-agent.sock"
    assert settings.inbound is not None
    assert settings.inbound.listen == HostPort("0.0.0.0", 8443)
    assert settings.inbound.app == HostPort("127.0.0.1", 8080)
    assert settings.inbound.mode is ListenerMode.HTTP
    assert settings.inbound.policy_file == CONFIG_DIR / "inventory-policy.yaml"
    assert settings.admin.listen == HostPort("127.0.0.1", 15000)
    assert settings.timeouts == Timeouts()
    assert settings.audit == AuditSettings()
    assert warnings(settings) == []


def test_checkout_example_uses_pem_files() -> None:
    settings = load_settings(CONFIG_DIR / "checkout.yaml", {})
    assert isinstance(settings.source, PemSourceSettings)
    assert settings.source.cert_chain == Path("/var/run/secrets/spiffe.io/tls.crt")
    assert settings.source.trust_domain is not None and settings.source.trust_domain.name == "example.org"
    assert settings.timeouts.drain == 10.0


def test_reporting_example_needs_the_socket_from_env() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(CONFIG_DIR / "reporting.yaml", {})
    assert [p.message for p in info.value.problems] == [
        "no Workload API socket: set svid_source.workload_api.socket or SPIFFE_ENDPOINT_SOCKET"
    ]
    assert re.match(r".*reporting\.yaml:\d+: svid_source\.workload_api\.socket$", info.value.problems[0].where)


# --- a good config -----------------------------------------------------------------------------------


def test_minimal_config_defaults() -> None:
    s = parse(MINIMAL)
    assert s.inbound is not None and s.inbound.policy_file == Path("/cfg/policy.yaml")
    assert s.admin.listen == HostPort("127.0.0.1", 15000)
    assert s.limits.max_body_bytes is None
    assert s.log_level == "info"


def test_durations_and_limits() -> None:
    s = parse(
        MINIMAL
        + """\
timeouts: {handshake: 250ms, request_head: 1m, idle: 90, upstream_connect: 1.5, upstream_response: 2s, drain: 1h}
limits: {max_connections: 5, max_body_bytes: 1048576, upstream_pool_size: 2}
audit: {path: audit.log, sample_allows: 0.25, deny_per_second: 5, deny_burst: 10}
log_level: DEBUG
"""
    )
    assert s.timeouts == Timeouts(0.25, 60.0, 90.0, 1.5, 2.0, 3600.0)
    assert s.limits.max_connections == 5 and s.limits.max_body_bytes == 1048576 and s.limits.upstream_pool_size == 2
    assert s.audit == AuditSettings(path="/cfg/audit.log", sample_allows=0.25, deny_per_second=5.0, deny_burst=10)
    assert s.log_level == "debug"


@pytest.mark.parametrize(
    ("text", "seconds"), [("250ms", 0.25), ("5s", 5.0), ("1m", 60.0), ("2h", 7200.0), (3, 3.0), (0.5, 0.5)]
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5", "5 minutes", "-1s", "0s", 0, -2, True, None, "1d", "nan", float("inf")])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:80", HostPort("127.0.0.1", 80)), ("[::1]:8443", HostPort("::1", 8443)), ("localhost:0", None)],
)
def test_parse_host_port(text: str, expected: HostPort | None) -> None:
    if expected is None:
        assert parse_host_port(text, allow_zero_port=True) == HostPort("localhost", 0)
        with pytest.raises(ValueError):
            parse_host_port(text, allow_zero_port=False)
    else:
        assert parse_host_port(text, allow_zero_port=False) == expected
        assert str(expected) == text


@pytest.mark.parametrize("bad", ["8080", ":8080", "::1:80", "[::1]80", "[nothost]:1", "h:70000", "h:x", 8080])
def test_parse_host_port_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_host_port(bad, allow_zero_port=True)


def test_pem_source_paths_are_relative_to_the_config_file() -> None:
    s = parse(
        """\
        svid_source:
          pem: {cert_chain: tls.crt, key: tls.key, bundle: ca.crt, poll_interval: 250ms,
                federated: {other.org: other-ca.pem}}
        inbound: {listen: "127.0.0.1:0", app: "127.0.0.1:1", policy_file: policy.yaml}
        """
    )
    assert isinstance(s.source, PemSourceSettings)
    assert s.source.cert_chain == Path("/cfg/tls.crt")
    assert s.source.key == Path("/cfg/tls.key")
    assert s.source.bundle == Path("/cfg/ca.crt")
    assert s.source.poll_interval == 0.25
    assert [(td.name, p) for td, p in s.source.federated] == [("other.org", Path("/cfg/other-ca.pem"))]


def test_pem_jwt_bundles_one_jwks_file_per_trust_domain() -> None:
    s = parse(
        """\
        svid_source:
          pem:
            cert_chain: tls.crt
            key: tls.key
            bundle: ca.crt
            jwt_bundles: {example.org: jwks.json, partner.org: /etc/partner/jwks.json}
        inbound: {listen: "127.0.0.1:0", app: "127.0.0.1:1", policy_file: policy.yaml}
        """
    )
    assert isinstance(s.source, PemSourceSettings)
    assert [(td.name, p) for td, p in s.source.jwt_bundles] == [
        ("example.org", Path("/cfg/jwks.json")),
        ("partner.org", Path("/etc/partner/jwks.json")),
    ]
    assert describe_settings(s)["svid_source"]["pem"]["jwt_bundles"] == {
        "example.org": "/cfg/jwks.json", "partner.org": "/etc/partner/jwks.json"
    }  # fmt: skip


def test_pem_jwt_bundles_problems_carry_file_line_and_field() -> None:
    found = problems(
        """\
        svid_source:
          pem:
            cert_chain: tls.crt
            key: tls.key
            bundle: ca.crt
            jwt_bundles:
              Example.ORG: jwks.json
              example.org: ""
        inbound: {listen: "127.0.0.1:0", app: "127.0.0.1:1", policy_file: policy.yaml}
        """
    )
    assert len(found) == 2
    assert found[0].startswith("side.yaml:7: svid_source.pem.jwt_bundles.Example.ORG: ")
    assert found[1] == "side.yaml:8: svid_source.pem.jwt_bundles.example.org: expected a bundle file name, got ''"
    listed = problems(
        """\
        svid_source:
          pem: {cert_chain: a, key: b, bundle: c, jwt_bundles: [jwks.json]}
        inbound: {listen: "127.0.0.1:0", app: "127.0.0.1:1", policy_file: policy.yaml}
        """
    )
    assert listed == [
        "side.yaml:2: svid_source.pem.jwt_bundles: expected a mapping of trust domain -> bundle file, got a list"
    ]


def test_tcp_mode_needs_connection_level_rules() -> None:
    tcp_policy = 'rules:\n  - {name: db-clients, action: allow, callers: ["spiffe://example.org/ns/shop/**"]}\n'
    tcp = MINIMAL + "  mode: tcp\n"
    s = parse(tcp, files=_files(**{"policy.yaml": tcp_policy}))
    assert s.inbound is not None and s.inbound.mode is ListenerMode.TCP
    found = problems(tcp)  # the HTTP example policy names paths and methods
    assert found == [
        "side.yaml:7: inbound.mode: a tcp listener cannot enforce rules that name paths or methods: "
        "checkout-reads-stock, no-admin"
    ]


def test_inline_policy() -> None:
    s = parse(
        """\
        svid_source: {workload_api: {socket: "unix:///s.sock"}}
        inbound:
          listen: "127.0.0.1:8443"
          app: "127.0.0.1:8080"
          policy:
            rules:
              - {name: a, action: allow, methods: [GET], paths: ["/x"], callers: ["*"]}
        """
    )
    assert s.inbound is not None and s.inbound.policy is not None and s.inbound.policy_file is None


# --- environment overrides ---------------------------------------------------------------------------


def test_env_overrides_ports_and_socket() -> None:
    text = MINIMAL.replace('workload_api: {socket: "unix:///run/spire/agent.sock"}', "workload_api: {}")
    s = parse(
        text,
        {
            "SPIFFE_ENDPOINT_SOCKET": "unix:///env/agent.sock",
            "SPIFFE_SIDECAR_INBOUND_PORT": "9443",
            "SPIFFE_SIDECAR_APP_PORT": "9080",
            "SPIFFE_SIDECAR_ADMIN_PORT": "9000",
        },
    )
    assert isinstance(s.source, WorkloadApiSettings)
    assert "/env/agent.sock" in str(s.source.endpoint)
    assert s.inbound is not None
    assert s.inbound.listen == HostPort("127.0.0.1", 9443)
    assert s.inbound.app == HostPort("127.0.0.1", 9080)
    assert s.admin.listen == HostPort("127.0.0.1", 9000)


def test_configured_socket_wins_over_env() -> None:
    s = parse(MINIMAL, {"SPIFFE_ENDPOINT_SOCKET": "unix:///env/agent.sock"})
    assert isinstance(s.source, WorkloadApiSettings)
    assert "/run/spire/agent.sock" in str(s.source.endpoint)


def test_no_svid_source_section_uses_env() -> None:
    text = MINIMAL.split("inbound:")[1]
    s = parse("inbound:" + text, {"SPIFFE_ENDPOINT_SOCKET": "unix:///env/agent.sock"})
    assert isinstance(s.source, WorkloadApiSettings)


def test_bad_env_values_are_problems_located_at_the_variable() -> None:
    found = problems(
        MINIMAL.replace('{socket: "unix:///run/spire/agent.sock"}', "{}"),
        {
            "SPIFFE_ENDPOINT_SOCKET": "unix://relative/agent.sock",
            "SPIFFE_SIDECAR_INBOUND_PORT": "http",
            "SPIFFE_SIDECAR_APP_PORT": "0",
            "SPIFFE_SIDECAR_ADMIN_PORT": "65536",
        },
    )
    wheres = sorted(p.split(": ", 1)[0] for p in found)
    assert wheres == [
        "env SPIFFE_ENDPOINT_SOCKET",
        "env SPIFFE_SIDECAR_ADMIN_PORT",
        "env SPIFFE_SIDECAR_APP_PORT",
        "env SPIFFE_SIDECAR_INBOUND_PORT",
    ]


# --- problems: all of them, with file:line and field path --------------------------------------------

BROKEN = """\
svid_source:
  workload_api: {socket: "http://nope"}
inbound:
  listen: "0.0.0.0"
  app: "127.0.0.1:99999"
  mode: udp
  policy_file: policy.yaml
  colour: blue
admin: {listen: "127.0.0.1:x"}
audit: {sample_allows: 2, deny_burst: 0, path: ""}
timeouts: {handshake: 5 seconds, drain: -1}
limits: {max_connections: many, max_body_bytes: -1, max_headers: 3}
log_level: loud
extra: true
"""


def test_broken_config_lists_all_problems_with_line_and_field() -> None:
    found = problems(BROKEN)
    expected = {
        "side.yaml:2: svid_source.workload_api.socket",
        "side.yaml:4: inbound.listen",
        "side.yaml:5: inbound.app",
        "side.yaml:6: inbound.mode",
        "side.yaml:8: inbound.colour",
        "side.yaml:9: admin.listen",
        "side.yaml:10: audit.sample_allows",
        "side.yaml:10: audit.deny_burst",
        "side.yaml:10: audit.path",
        "side.yaml:11: timeouts.handshake",
        "side.yaml:11: timeouts.drain",
        "side.yaml:12: limits.max_connections",
        "side.yaml:12: limits.max_body_bytes",
        "side.yaml:12: limits.max_headers",
        "side.yaml:13: log_level",
        "side.yaml:14: extra",
    }
    wheres = [": ".join(p.split(": ", 2)[:2]) for p in found]
    assert set(wheres) == expected, found
    assert len(found) == len(expected), found
    assert all(len(p.split(": ", 2)) == 3 and p.split(": ", 2)[2] for p in found)  # each has a message


def test_policy_file_problems_carry_the_policy_files_lines() -> None:
    bad_policy = """\
rules:
  - name: a
    action: allow
    paths: ["/x"]
    callers: ["spiffe://EXAMPLE.org/x"]
    colour: red
"""
    found = problems(MINIMAL, files=_files(**{"policy.yaml": bad_policy}))
    assert found, found
    assert all(p.startswith("/cfg/policy.yaml:") for p in found), found
    assert any(re.match(r"/cfg/policy\.yaml:5: .*rules\[0\]\.callers\[0\]", p) for p in found), found
    assert any(re.match(r"/cfg/policy\.yaml:6: .*rules\[0\]\.colour", p) for p in found), found


def test_inline_policy_problems_are_under_inbound_policy() -> None:
    found = problems(
        """\
        svid_source: {workload_api: {socket: "unix:///s.sock"}}
        inbound:
          listen: "127.0.0.1:8443"
          app: "127.0.0.1:8080"
          policy:
            rules:
              - {name: a, action: maybe, paths: ["/x"], callers: ["*"]}
        """
    )
    assert any(re.match(r"side\.yaml:7: inbound\.policy\.rules\[0\]\.action", p) for p in found), found


def test_missing_policy_file_is_a_problem() -> None:
    found = problems(MINIMAL, files={})
    assert len(found) == 1
    assert found[0].startswith("side.yaml:6: inbound.policy_file: cannot read /cfg/policy.yaml")


def test_exactly_one_of_policy_and_policy_file() -> None:
    found = problems(MINIMAL.replace("  policy_file: policy.yaml\n", ""))
    assert found == ["side.yaml:3: inbound: set exactly one of policy (inline) or policy_file"]


def test_missing_required_fields() -> None:
    found = problems(
        """\
        svid_source:
          pem: {key: k.pem}
        inbound: {policy_file: policy.yaml}
        """
    )
    assert sorted(found) == sorted(
        [
            "side.yaml:2: svid_source.pem.cert_chain: required",
            "side.yaml:2: svid_source.pem.bundle: required",
            "side.yaml:3: inbound.listen: required",
            "side.yaml:3: inbound.app: required",
        ]
    )


def test_both_sources_is_a_problem() -> None:
    found = problems(
        MINIMAL.replace(
            'workload_api: {socket: "unix:///run/spire/agent.sock"}',
            'workload_api: {socket: "unix:///a"}\n  pem: {cert_chain: a, key: b, bundle: c}',
        )
    )
    assert found == ["side.yaml:1: svid_source: set exactly one of workload_api or pem"]


def test_duplicate_keys_are_problems() -> None:
    found = problems(MINIMAL + "log_level: info\nlog_level: debug\n")
    assert found == ["side.yaml:8: log_level: duplicate key"]


def test_invalid_yaml_names_the_line() -> None:
    found = problems("svid_source:\n  workload_api: {socket: [\n")
    assert len(found) == 1 and found[0].startswith("side.yaml:3: invalid YAML")


@pytest.mark.parametrize("text", ["", "[1, 2]", "just a string"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    found = problems(text) if text else problems("~")
    assert found, found


def test_parse_yaml_records_lines() -> None:
    doc = parse_yaml("a:\n  b:\n    - x: 1\n    - y: 2\n", "f")
    assert doc.data == {"a": {"b": [{"x": 1}, {"y": 2}]}}
    assert doc.lines["a"] == 1 and doc.lines["a.b"] == 2
    assert doc.lines["a.b[0]"] == 3 and doc.lines["a.b[1].y"] == 4


def test_load_policy_reports_lines() -> None:
    assert load_policy(POLICY, "p.yaml").describe()
    with pytest.raises(ConfigError) as info:
        load_policy("rules:\n  - name: a\n    action: nope\n", "p.yaml")
    assert all(p.where.startswith("p.yaml:") for p in info.value.problems)


def test_load_settings_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "missing.yaml", {})
    assert info.value.problems[0].message.startswith("cannot read config")


# --- warnings and descriptions -----------------------------------------------------------------------


def test_non_loopback_admin_is_allowed_but_warned() -> None:
    s = parse(MINIMAL + 'admin: {listen: "0.0.0.0:15000"}\n')
    assert s.admin.listen == HostPort("0.0.0.0", 15000)
    assert any("admin.listen 0.0.0.0:15000 is not a loopback address" in w for w in warnings(s))
    assert warnings(parse(MINIMAL + 'admin: {listen: "[::1]:15000"}\n')) == []


def test_describe_settings_is_json_ready() -> None:
    import json

    s = parse(MINIMAL)
    view = describe_settings(s)
    text = json.dumps(view)
    assert "unix:///run/spire/agent.sock" in text or "/run/spire/agent.sock" in text
    assert view["inbound"]["policy_file"] == "/cfg/policy.yaml"


def test_control_characters_are_a_config_error_not_a_crash() -> None:
    # PyYAML's reader rejects them in its constructor, before any parsing (found by fuzzing annotations).
    from sidecar.config import parse_yaml

    with pytest.raises(ConfigError) as exc:
        parse_yaml("a: \x1b", "x.yaml")
    assert "\n" not in str(exc.value) and "x.yaml: invalid YAML" in str(exc.value)


# --- outbound ----------------------------------------------------------------------------------------


def test_checkout_and_reporting_examples_have_outbound_routes() -> None:
    env = {"SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent.sock"}
    chk = load_settings(CONFIG_DIR / "checkout.yaml", env)
    assert len(chk.outbound) == 1
    r = chk.outbound[0]
    assert r.name == "inventory" and r.listen == HostPort("127.0.0.1", 15001) and r.mode is ListenerMode.HTTP
    assert r.to.target == HostPort("inventory.shop.svc.cluster.local", 8443)
    assert r.to.expect.text == "spiffe://example.org/ns/shop/sa/inventory"
    rep = load_settings(CONFIG_DIR / "reporting.yaml", env)
    assert rep.outbound_proxy is not None and rep.outbound_proxy.listen == HostPort("127.0.0.1", 15080)
    assert [h for h, _ in rep.outbound_proxy.routes] == ["inventory.shop.svc.cluster.local"]
    assert load_settings(CONFIG_DIR / "inventory.yaml", env).outbound == ()


OUTBOUND = MINIMAL + """
outbound:
  - listen: "127.0.0.1:15001"
    target: "inventory.shop.svc:8443"
    expect: "spiffe://example.org/ns/shop/sa/inventory"
  - name: raw
    listen: "127.0.0.1:0"
    target: "db:5432"
    expect: "spiffe://example.org/ns/data/**"
    mode: tcp
outbound_proxy:
  listen: "127.0.0.1:15080"
  routes:
    Inventory.Shop.Svc:
      target: "inventory.shop.svc:8443"
      expect: "spiffe://example.org/ns/shop/sa/inventory"
"""


def test_outbound_routes_and_proxy() -> None:
    s = parse(OUTBOUND)
    a, b = s.outbound
    assert a.name == "inventory.shop.svc:8443" and a.mode is ListenerMode.HTTP
    assert b.name == "raw" and b.mode is ListenerMode.TCP and b.listen.port == 0
    assert s.outbound_proxy is not None
    assert [h for h, _ in s.outbound_proxy.routes] == ["inventory.shop.svc"]  # Host matching is case-insensitive
    d = describe_settings(s)
    assert d["outbound"][1]["expect"] == "spiffe://example.org/ns/data/**"
    assert d["outbound_proxy"]["routes"]["inventory.shop.svc"]["target"] == "inventory.shop.svc:8443"


def test_outbound_problems_carry_file_line_and_field() -> None:
    text = MINIMAL + """
outbound:
  - listen: "0.0.0.0:15001"
    target: "inventory:8443"
    expect: "spiffe://example.org"
    mode: udp
  - listen: "127.0.0.1:15002"
    expect: "spiffe://example.org/sa/x"
  - listen: "127.0.0.1:15002"
    target: "x:1"
    expect: "spiffe://example.org/sa/x"
    colour: blue
outbound_proxy:
  listen: "127.0.0.1:15080"
  routes:
    "a:80": {target: "a:80", expect: "spiffe://example.org/a"}
"""
    got = problems(text)
    joined = "\n".join(got)
    assert re.search(r":\d+: outbound\[0\]\.listen: outbound listeners bind to loopback only", joined)
    assert re.search(r":\d+: outbound\[0\]\.expect: .*root ID", joined)
    assert re.search(r":\d+: outbound\[0\]\.mode: expected http or tcp", joined)
    assert re.search(r":\d+: outbound\[1\]\.target: required", joined)
    assert re.search(r":\d+: outbound\[2\]\.colour: unknown key", joined)
    assert re.search(r":\d+: outbound_proxy\.routes\.a:80: expected a host name without port", joined)
    # every problem has a line number
    assert all(re.match(r"[^:]+:\d+: ", p) for p in got), got


def test_outbound_listen_ports_must_not_clash() -> None:
    text = MINIMAL + """
outbound:
  - listen: "127.0.0.1:15001"
    target: "a:1"
    expect: "spiffe://example.org/a"
outbound_proxy:
  listen: "127.0.0.1:15001"
  routes: {a: {target: "a:1", expect: "spiffe://example.org/a"}}
"""
    assert any("outbound_proxy.listen" in p and "also used by outbound[0].listen" in p for p in problems(text))


CLIENT_ONLY = """\
svid_source:
  workload_api: {socket: "unix:///run/spire/agent.sock"}
outbound:
  - name: inventory
    listen: "127.0.0.1:15001"
    target: "inventory.shop.svc:8443"
    expect: "spiffe://example.org/ns/shop/sa/inventory"
"""


def test_outbound_only_config_is_valid() -> None:
    # A pure client (it calls others, nobody calls it) needs no inbound listener.
    s = parse(CLIENT_ONLY)
    assert s.inbound is None and [r.name for r in s.outbound] == ["inventory"]
    assert describe_settings(s)["inbound"] is None
    proxy_only = parse("""\
        svid_source: {workload_api: {socket: "unix:///run/spire/agent.sock"}}
        outbound_proxy:
          listen: "127.0.0.1:15080"
          routes: {inventory.shop.svc: {target: "inventory.shop.svc:8443", expect: "spiffe://example.org/a"}}
    """)
    assert proxy_only.inbound is None and proxy_only.outbound_proxy is not None


@pytest.mark.parametrize("extra", ["", "outbound: []\n", "outbound:\n"])
def test_a_config_without_any_listener_is_a_problem(extra: str) -> None:
    text = 'svid_source: {workload_api: {socket: "unix:///run/spire/agent.sock"}}\n' + extra
    assert problems(text) == [
        "side.yaml:1: nothing to run: configure at least one of inbound, outbound or outbound_proxy"
    ]


def test_target_down_backoff_is_a_timeout() -> None:
    assert parse(CLIENT_ONLY).timeouts.target_down_backoff == 2.0
    s = parse(CLIENT_ONLY + "timeouts: {target_down_backoff: 500ms}\n")
    assert s.timeouts.target_down_backoff == 0.5
    assert describe_settings(s)["timeouts"]["target_down_backoff"] == 0.5
    assert load_settings(CONFIG_DIR / "checkout.yaml", {}).timeouts.target_down_backoff == 2.0
    got = problems(CLIENT_ONLY + "timeouts: {target_down_backoff: 0s}\n")
    assert len(got) == 1
    assert re.match(r"side\.yaml:\d+: timeouts\.target_down_backoff: duration must be positive", got[0])
    assert "target_down_backoff" in (CONFIG_DIR / "inventory.yaml").read_text()  # documented in the schema


def test_metrics_listener_from_the_file_or_the_environment() -> None:
    assert parse(MINIMAL).metrics.listen is None  # only the admin /metrics by default
    s = parse(MINIMAL + 'metrics: {listen: "0.0.0.0:15020", max_callers: 5}\n')
    assert s.metrics.listen == HostPort("0.0.0.0", 15020) and s.metrics.max_callers == 5
    assert parse(MINIMAL, {"SPIFFE_SIDECAR_METRICS_PORT": "9102"}).metrics.listen == HostPort("0.0.0.0", 9102)
    s = parse(MINIMAL + 'metrics: {listen: "10.0.0.7:15020"}\n', {"SPIFFE_SIDECAR_METRICS_PORT": "9102"})
    assert s.metrics.listen == HostPort("10.0.0.7", 9102)
    assert sorted(problems(MINIMAL + "metrics: {listen: nowhere, max_callers: -1, path: /m}\n")) == [
        "side.yaml:7: metrics.listen: expected \"host:port\", got 'nowhere'",
        "side.yaml:7: metrics.max_callers: must be >= 0, got -1",
        "side.yaml:7: metrics.path: unknown key (expected one of: listen, max_callers)",
    ]


def test_strip_request_headers_default_list_and_replacement() -> None:
    s = parse(MINIMAL)
    assert s.inbound is not None and "x-original-url" in s.inbound.strip_request_headers
    s = parse(MINIMAL + "  strip_request_headers: [X-Internal-Token, x-internal-token]\n")
    assert s.inbound is not None and s.inbound.strip_request_headers == ("x-internal-token",)
    s = parse(MINIMAL + "  strip_request_headers: []\n")
    assert s.inbound is not None and s.inbound.strip_request_headers == ()
    found = problems(MINIMAL + '  strip_request_headers: ["X Bad", "ok"]\n')
    assert found == ["side.yaml:7: inbound.strip_request_headers: 'X Bad' is not a header name (RFC 9110 §5.1)"]


def test_duplicate_keys_do_not_hide_the_other_problems() -> None:
    text = (
        "rules:\n"
        "  - name: a\n"
        "    action: allow\n"
        "    action: deny\n"
        '    callers: ["spiffe://Bad/x"]\n'
    )
    with pytest.raises(ConfigError) as info:
        load_policy(text, "p.yaml")
    assert [p.where for p in info.value.problems] == ["p.yaml:4: rules[0].action", "p.yaml:5: rules[0].callers[0]"]
    # A config file too: the duplicate and the rest in one report, and nothing is accepted.
    found = problems(MINIMAL + "admin: {listen: '127.0.0.1:1'}\nadmin: {listen: x}\nlimits: {max_connections: 0}\n")
    assert any("duplicate key" in p for p in found) and any("max_connections" in p for p in found)


# --- outbound JWT-SVIDs and inbound.forward_jwt ------------------------------------------------------

JWT_ROUTE = CLIENT_ONLY  # its one route ends at line 7 (expect); `jwt:` below is on line 8


def test_outbound_jwt_one_mapping_takes_the_defaults() -> None:
    s = parse(JWT_ROUTE + "    jwt: {audience: inventory}\n")
    (route,) = s.outbound
    assert route.to.jwt == (OutboundJwt("inventory", "/", AuthorizationMode.REPLACE),)
    assert describe_settings(s)["outbound"][0]["jwt"] == [
        {"audience": "inventory", "path": "/", "authorization": "replace"}
    ]
    # A route without `jwt` attaches nothing, and says so in /config.
    plain = parse(JWT_ROUTE)
    assert plain.outbound[0].to.jwt == () and describe_settings(plain)["outbound"][0]["jwt"] == []


def test_outbound_jwt_list_form_one_entry_per_path() -> None:
    s = parse(JWT_ROUTE + """\
    jwt:
      - {audience: inventory, path: /api/stock, authorization: keep}
      - audience: spiffe://example.org/ns/shop/sa/inventory
        path: /api/orders/
""")
    assert s.outbound[0].to.jwt == (
        OutboundJwt("inventory", "/api/stock", AuthorizationMode.KEEP),
        OutboundJwt("spiffe://example.org/ns/shop/sa/inventory", "/api/orders/", AuthorizationMode.REPLACE),
    )
    assert describe_settings(s)["outbound"][0]["jwt"] == [
        {"audience": "inventory", "path": "/api/stock", "authorization": "keep"},
        {"audience": "spiffe://example.org/ns/shop/sa/inventory", "path": "/api/orders/", "authorization": "replace"},
    ]


def test_outbound_jwt_on_proxy_routes() -> None:
    s = parse("""\
        svid_source: {workload_api: {socket: "unix:///run/spire/agent.sock"}}
        outbound_proxy:
          listen: "127.0.0.1:15080"
          routes:
            Inventory.Shop.Svc:
              target: "inventory.shop.svc:8443"
              expect: "spiffe://example.org/ns/shop/sa/inventory"
              jwt: [{audience: inventory, path: /api/stock}, {audience: inv-admin, path: /admin, authorization: keep}]
            reports.shop.svc: {target: "reports.shop.svc:8443", expect: "spiffe://example.org/ns/shop/sa/reporting"}
    """)
    assert s.outbound_proxy is not None
    routes = dict(s.outbound_proxy.routes)
    assert routes["inventory.shop.svc"].jwt == (
        OutboundJwt("inventory", "/api/stock"), OutboundJwt("inv-admin", "/admin", AuthorizationMode.KEEP)
    )
    assert routes["reports.shop.svc"].jwt == ()
    view = describe_settings(s)["outbound_proxy"]["routes"]
    assert view["inventory.shop.svc"]["jwt"] == [
        {"audience": "inventory", "path": "/api/stock", "authorization": "replace"},
        {"audience": "inv-admin", "path": "/admin", "authorization": "keep"},
    ]
    assert view["reports.shop.svc"]["jwt"] == []


_AUDIENCE_RULE = "expected an audience (printable ASCII, no spaces, at most 256 characters)"


@pytest.mark.parametrize(
    ("jwt", "expected"),
    [
        ("{}", "outbound[0].jwt.audience: required: the audience of the JWT-SVID to attach (JWT-SVID §3)"),
        ("{path: /api}", "outbound[0].jwt.audience: required: the audience of the JWT-SVID to attach (JWT-SVID §3)"),
        ('{audience: ""}', f"outbound[0].jwt.audience: {_AUDIENCE_RULE}, got ''"),
        ('{audience: "in ventory"}', f"outbound[0].jwt.audience: {_AUDIENCE_RULE}, got 'in ventory'"),
        ("{audience: 42}", f"outbound[0].jwt.audience: {_AUDIENCE_RULE}, got 42"),
        ('{audience: "invéntory"}', f"outbound[0].jwt.audience: {_AUDIENCE_RULE}, got 'invéntory'"),
        ("{audience: a, path: api/stock}",
         "outbound[0].jwt.path: expected a path prefix starting with '/', got 'api/stock'"),
        ("{audience: a, path: 7}", "outbound[0].jwt.path: expected a path prefix starting with '/', got 7"),
        ('{audience: a, path: "/api?x=1"}',
         "outbound[0].jwt.path: path prefix '/api?x=1': no query, spaces or control characters"),
        ('{audience: a, path: "/api#top"}',
         "outbound[0].jwt.path: path prefix '/api#top': no query, spaces or control characters"),
        ('{audience: a, path: "/api stock"}',
         "outbound[0].jwt.path: path prefix '/api stock': no query, spaces or control characters"),
        # Requests are matched after normalisation: a prefix that is not normalised could never match.
        *[(f'{{audience: a, path: "{bad}"}}',
           f"outbound[0].jwt.path: path prefix '{bad}': write it normalised (no %-escapes, '.' or '..' segments, "
           "or '//')") for bad in ("/api/%73tock", "/api/./stock", "/api/../admin", "/api//stock", "/..")],
        ("{audience: a, authorization: drop}", "outbound[0].jwt.authorization: expected replace or keep, got 'drop'"),
        ("{audience: a, authorization: true}", "outbound[0].jwt.authorization: expected replace or keep, got True"),
        ("{audience: a, header: x-token}",
         "outbound[0].jwt.header: unknown key (expected one of: audience, authorization, path)"),
        ("inventory", "outbound[0].jwt: expected a mapping, got a string"),
        ("[inventory]", "outbound[0].jwt[0]: expected a mapping, got a string"),
        ("[]", "outbound[0].jwt: expected {audience: <aud>, path: <prefix>, authorization: replace|keep} or a list "
               "of them"),
        ("[{audience: a, path: /api}, {audience: b, path: /api}]",
         "outbound[0].jwt[1].path: path prefix '/api' already has a JWT-SVID on this route"),
        # A trailing slash covers the same paths (whole segments): the same prefix twice.
        ("[{audience: a, path: /api}, {audience: b, path: /api/}]",
         "outbound[0].jwt[1].path: path prefix '/api/' already has a JWT-SVID on this route"),
        ("[{audience: a}, {audience: b, path: /}]",
         "outbound[0].jwt[1].path: path prefix '/' already has a JWT-SVID on this route"),
    ],
)  # fmt: skip
def test_outbound_jwt_problems_carry_line_and_field(jwt: str, expected: str) -> None:
    assert problems(JWT_ROUTE + f"    jwt: {jwt}\n") == [f"side.yaml:8: {expected}"]


def test_outbound_jwt_problems_of_every_list_entry_are_listed() -> None:
    found = problems(JWT_ROUTE + """\
    jwt:
      - {audience: inventory, path: /api}
      - {path: /x, authorization: maybe}
      - {audience: "a b", path: nope}
""")
    assert found == [
        "side.yaml:10: outbound[0].jwt[1].audience: required: the audience of the JWT-SVID to attach (JWT-SVID §3)",
        "side.yaml:10: outbound[0].jwt[1].authorization: expected replace or keep, got 'maybe'",
        f"side.yaml:11: outbound[0].jwt[2].audience: {_AUDIENCE_RULE}, got 'a b'",
        "side.yaml:11: outbound[0].jwt[2].path: expected a path prefix starting with '/', got 'nope'",
    ]


def test_outbound_jwt_audience_length_limit() -> None:
    assert parse(JWT_ROUTE + f"    jwt: {{audience: {'a' * 256}}}\n").outbound[0].to.jwt[0].audience == "a" * 256
    (found,) = problems(JWT_ROUTE + f"    jwt: {{audience: {'a' * 257}}}\n")
    assert found.startswith(f"side.yaml:8: outbound[0].jwt.audience: {_AUDIENCE_RULE}, got 'aaa")


def test_outbound_jwt_needs_an_http_route() -> None:
    assert problems(JWT_ROUTE + "    mode: tcp\n    jwt: {audience: inventory}\n") == [
        "side.yaml:9: outbound[0].jwt: a tcp route carries no HTTP fields: a JWT-SVID needs mode http"
    ]
    assert parse(JWT_ROUTE + "    mode: http\n    jwt: {audience: inventory}\n").outbound[0].to.jwt


def test_outbound_jwt_needs_the_workload_api() -> None:
    text = """\
        svid_source:
          pem: {cert_chain: tls.crt, key: tls.key, bundle: ca.crt}
        outbound:
          - listen: "127.0.0.1:15001"
            target: "inventory.shop.svc:8443"
            expect: "spiffe://example.org/ns/shop/sa/inventory"
            jwt: {audience: inventory}
          - listen: "127.0.0.1:15002"
            target: "orders.shop.svc:8443"
            expect: "spiffe://example.org/ns/shop/sa/orders"
        outbound_proxy:
          listen: "127.0.0.1:15080"
          routes:
            inventory.shop.svc:
              target: "inventory.shop.svc:8443"
              expect: "spiffe://example.org/ns/shop/sa/inventory"
              jwt: [{audience: inventory}]
    """
    assert problems(text) == [
        "side.yaml:7: outbound[0].jwt: attaching a JWT-SVID needs svid_source.workload_api (the PEM source "
        "cannot mint one)",
        "side.yaml:17: outbound_proxy.routes.inventory.shop.svc.jwt: attaching a JWT-SVID needs "
        "svid_source.workload_api (the PEM source cannot mint one)",
    ]
    # The same routes without `jwt` are fine with PEM files.
    pem = parse(text.replace("jwt: {audience: inventory}", "mode: http").replace("jwt: [{audience: inventory}]", ""))
    assert isinstance(pem.source, PemSourceSettings) and all(not r.to.jwt for r in pem.outbound)


def test_the_checkout_example_documents_the_jwt_key() -> None:
    # checkout.yaml uses PEM files: its route shows `jwt` in a comment only, and loads without it.
    text = (CONFIG_DIR / "checkout.yaml").read_text()
    assert "#   jwt: {audience: inventory, path: /api/stock, authorization: replace}" in text
    assert load_settings(CONFIG_DIR / "checkout.yaml", {}).outbound[0].to.jwt == ()


def test_forward_jwt_defaults_to_false_and_takes_a_boolean() -> None:
    s = parse(MINIMAL)
    assert s.inbound is not None and s.inbound.forward_jwt is False
    assert describe_settings(s)["inbound"]["forward_jwt"] is False
    s = parse(MINIMAL + "  forward_jwt: true\n")
    assert s.inbound is not None and s.inbound.forward_jwt is True
    assert describe_settings(s)["inbound"]["forward_jwt"] is True
    s = parse(MINIMAL + "  forward_jwt: false\n")
    assert s.inbound is not None and s.inbound.forward_jwt is False


@pytest.mark.parametrize(("value", "shown"), [('"true"', "'true'"), ("1", "1"), ("", "None"), ("[true]", "[True]")])
def test_forward_jwt_must_be_true_or_false(value: str, shown: str) -> None:
    assert problems(MINIMAL + f"  forward_jwt: {value}\n") == [
        f"side.yaml:7: inbound.forward_jwt: expected true or false, got {shown}"
    ]
