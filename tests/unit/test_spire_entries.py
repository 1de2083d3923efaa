"""spire.entries: parsing registration entries, with every problem located at file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.identity import SpiffeId, TrustDomain
from spire.entries import (
    DEFAULT_CA_TTL,
    DEFAULT_JWT_KEY_TTL,
    DEFAULT_JWT_TTL,
    DEFAULT_SVID_TTL,
    Selector,
    load_config,
    parse_config,
    parse_duration,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config" / "spire"

GOOD = """\
trust_domain: example.org
svid_ttl: 10m
jwt_ttl: 90
ca_ttl: 1h30m
jwt_key_ttl: 2h
allowed_foreign_jwt_claims: [groups, tenant]
socket_dir: /run/spire
federation:
  - trust_domain: partner.org
entries:
  - spiffe_id: spiffe://example.org/ns/shop/sa/checkout
    socket: checkout.sock
    hint: checkout
    ttl: 30s
    federates_with: [partner.org]
    dns_names: [localhost, checkout.shop.svc]
  - spiffe_id: spiffe://example.org/ns/shop/sa/inventory
    selectors: ["unix:uid:1000", "unix:gid:50"]
    jwt_ttl: 1m
  - spiffe_id: spiffe://partner.org/gw
    socket: /abs/gw.sock
"""


def problems(text: str, source: str = "entries.yaml", **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, source, **kw)  # type: ignore[arg-type]
    return [str(p) for p in ei.value.problems]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_example_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.entries
    assert cfg.trust_domain == TrustDomain("example.org")


def test_good_file_parses_every_field() -> None:
    cfg = parse_config(GOOD)
    assert cfg.trust_domain == TrustDomain("example.org")
    assert cfg.federated_trust_domains == (TrustDomain("partner.org"),)
    assert cfg.trust_domains == (TrustDomain("example.org"), TrustDomain("partner.org"))
    assert (cfg.svid_ttl, cfg.jwt_ttl, cfg.ca_ttl) == (600, 90, 5400)
    checkout, inventory, gw = cfg.entries
    assert checkout.spiffe_id == SpiffeId.parse("spiffe://example.org/ns/shop/sa/checkout")
    assert checkout.socket == "checkout.sock" and checkout.hint == "checkout" and checkout.ttl == 30
    assert checkout.federates_with == (TrustDomain("partner.org"),)
    assert checkout.dns_names == ("localhost", "checkout.shop.svc")
    assert inventory.selectors == (Selector("unix", "uid", 1000), Selector("unix", "gid", 50))
    assert inventory.socket is None and inventory.jwt_ttl == 60
    assert cfg.svid_ttl_for(checkout) == 30 and cfg.svid_ttl_for(inventory) == 600
    assert cfg.jwt_key_ttl == 7200 and cfg.allowed_foreign_jwt_claims == {"groups", "tenant"}
    assert cfg.jwt_ttl_for(inventory) == 60 and cfg.jwt_ttl_for(checkout) == 90
    assert checkout.where == "entries.yaml:11: entries[0]"
    # Socket resolution: shared under socket_dir, relative static names too, absolute paths as given.
    assert cfg.shared_socket_path() == Path("/run/spire/api.sock")
    assert cfg.socket_path_for(checkout) == Path("/run/spire/checkout.sock")
    assert cfg.socket_path_for(inventory) == Path("/run/spire/api.sock")
    assert cfg.socket_path_for(gw) == Path("/abs/gw.sock")


def test_defaults_and_cli_overrides() -> None:
    text = "trust_domain: a.org\nentries:\n  - spiffe_id: spiffe://b.org/x\n    socket: x.sock\n"
    cfg = parse_config(text.replace("b.org", "a.org"))
    assert (cfg.svid_ttl, cfg.jwt_ttl, cfg.ca_ttl) == (DEFAULT_SVID_TTL, DEFAULT_JWT_TTL, DEFAULT_CA_TTL)
    assert cfg.jwt_key_ttl == DEFAULT_JWT_KEY_TTL and cfg.allowed_foreign_jwt_claims == frozenset()
    cfg = parse_config(text, trust_domain="b.org", svid_ttl=5, ca_ttl=60, jwt_key_ttl=600, socket="/tmp/s/api.sock")
    assert cfg.trust_domain == TrustDomain("b.org")
    assert (cfg.svid_ttl, cfg.ca_ttl, cfg.jwt_key_ttl) == (5, 60, 600)
    # A relative static socket lives next to the shared socket.
    assert cfg.socket_path_for(cfg.entries[0]) == Path("/tmp/s/x.sock")


def test_entry_matching_uses_all_selectors() -> None:
    inventory = parse_config(GOOD).entries[1]
    assert inventory.matches(1000, 50)
    assert not inventory.matches(1000, 51)
    assert not inventory.matches(0, 50)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("1.5", 1.5), ("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("2d", 172800)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "0", "-1s", "1x", "h", "1h 30m", "s1", "1hh"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_every_problem_is_reported_with_file_line_and_field() -> None:
    text = """\
trust_domain: example.org
svid_ttl: 1x
entries:
  - spiffe_id: spiffe://example.org/a
    selectors: [unix:uid:1]
  - spiffe_id: spiffe://Example.org/b
    selectors: ["k8s:ns:default"]
  - spiffe_id: spiffe://example.org/c/
    socket: c.sock
    federates_with: [other.org]
    colour: blue
  - spiffe_id: spiffe://example.org/d
  - spiffe_id: spiffe://other.org/e
    selectors: []
  - selectors: [unix:uid:2]
  - spiffe_id: spiffe://example.org
    socket: root.sock
"""
    got = problems(text, "cfg/entries.yaml")
    assert got == [
        "cfg/entries.yaml:2: svid_ttl: '1x' is not a duration; use e.g. 500ms, 30s, 5m, 1h or 1h30m",
        "cfg/entries.yaml:6: entries[1].spiffe_id: trust domain characters are limited to lowercase "
        "letters, numbers, dots, dashes, and underscores (SPIFFE-ID §2.1)",
        "cfg/entries.yaml:7: entries[1].selectors[0]: 'k8s:ns:default' is not a supported selector; "
        "use unix:uid:N or unix:gid:N",
        "cfg/entries.yaml:8: entries[2].spiffe_id: path cannot have a trailing slash (SPIFFE-ID §2.2)",
        "cfg/entries.yaml:10: entries[2].federates_with[0]: trust domain other.org is not listed under "
        "federation",
        "cfg/entries.yaml:11: entries[2].colour: unknown key; expected one of: dns_names, federates_with, "
        "hint, jwt_ttl, selectors, socket, spiffe_id, ttl",
        "cfg/entries.yaml:12: entries[3]: needs selectors (e.g. [unix:uid:1000]) or its own socket "
        "(socket: name.sock)",
        "cfg/entries.yaml:13: entries[4].spiffe_id: trust domain other.org is neither example.org nor "
        "listed under federation",
        "cfg/entries.yaml:15: entries[5].spiffe_id: missing",
        "cfg/entries.yaml:16: entries[6].spiffe_id: a workload ID needs a path (X509-SVID §3.1)",
    ]


def test_empty_selectors_on_shared_socket() -> None:
    text = "trust_domain: a.org\nentries:\n  - spiffe_id: spiffe://a.org/x\n    selectors: []\n"
    assert problems(text) == [
        "entries.yaml:4: entries[0].selectors: empty; an entry on the shared socket needs a selector"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["entries.yaml: file is empty; expected trust_domain and entries"]),
        ("- a\n- b\n", ["entries.yaml:1: (top level): expected a mapping"]),
        ("trust_domain: [\n", None),  # YAML syntax error: located, message varies by yaml version
        (
            "entries:\n  - spiffe_id: spiffe://a.org/x\n    socket: x\n",
            ["entries.yaml:1: trust_domain: missing (or pass --trust-domain)"],
        ),
        ("trust_domain: a.org\n", ["entries.yaml:1: entries: missing; list at least one registration entry"]),
        ("trust_domain: a.org\nentries: []\n", ["entries.yaml:2: entries: empty; list at least one "
                                                  "registration entry"]),
        (
            "trust_domain: a.org\ntrust_domain: b.org\nentries:\n  - {spiffe_id: spiffe://a.org/x, socket: s}\n",
            ["entries.yaml:2: trust_domain: duplicate key"],
        ),
        (
            "trust_domain: a.org\nsvid_ttl: 2h\nca_ttl: 1h\nentries:\n  - {spiffe_id: spiffe://a.org/x, "
            "socket: s}\n",
            ["entries.yaml:2: svid_ttl: SVID ttl (7200s) must be shorter than the CA ttl (3600s)"],
        ),
        (
            "trust_domain: a.org\njwt_ttl: 1h\njwt_key_ttl: 30m\nallowed_foreign_jwt_claims: [ok, '', 3]\n"
            "entries:\n  - {spiffe_id: spiffe://a.org/x, socket: s}\n",
            ["entries.yaml:2: jwt_ttl: JWT-SVID ttl (3600s) must be shorter than the JWT key ttl (1800s)",
             "entries.yaml:4: allowed_foreign_jwt_claims[1]: empty claim name",
             "entries.yaml:4: allowed_foreign_jwt_claims[2]: expected a string"],
        ),
        (
            "trust_domain: a.org\nentries:\n  - {spiffe_id: spiffe://a.org/x, socket: s, hint: h}\n"
            "  - {spiffe_id: spiffe://a.org/y, socket: s, hint: h}\n"
            "  - {spiffe_id: spiffe://a.org/z, socket: t, hint: h}\n",
            ["entries.yaml:4: entries[1].hint: hint 'h' is already used by entries[0] on the same socket"],
        ),
        (
            "trust_domain: a.org\nfederation:\n  - trust_domain: a.org\n  - {}\nentries:\n"
            "  - {spiffe_id: spiffe://a.org/x, socket: s, federates_with: [a.org], dns_names: ['-bad']}\n",
            [
                "entries.yaml:3: federation[0].trust_domain: trust domain a.org is listed twice",
                "entries.yaml:4: federation[1].trust_domain: missing",
                "entries.yaml:6: entries[0].federates_with[0]: an entry does not federate with its own "
                "trust domain",
                "entries.yaml:6: entries[0].dns_names[0]: '-bad' is not a DNS name",
            ],
        ),
        (
            "trust_domain: a.org\nentries:\n  - {spiffe_id: 42, socket: s, ttl: [1]}\n",
            ["entries.yaml:3: entries[0].spiffe_id: expected a string",
             "entries.yaml:3: entries[0].ttl: expected a duration like 30s, 5m or 1h"],
        ),
    ],
)
def test_file_level_problems(text: str, expected: list[str] | None) -> None:
    got = problems(text)
    if expected is None:
        assert len(got) == 1 and got[0].startswith("entries.yaml:") and "invalid YAML" in got[0]
    else:
        assert got == expected


def test_cli_trust_domain_override_is_validated() -> None:
    got = problems(GOOD, trust_domain="Bad.Org")
    assert got[0].startswith("--trust-domain: trust domain characters are limited")


def test_load_config_reports_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "missing.yaml")
    assert str(ei.value.problems[0]).startswith(str(tmp_path / "missing.yaml") + ": cannot read")


def test_shared_socket_needs_a_location() -> None:
    cfg = parse_config("trust_domain: a.org\nentries:\n  - {spiffe_id: spiffe://a.org/x, selectors: "
                       "['unix:uid:1']}\n")
    with pytest.raises(ConfigError):
        cfg.shared_socket_path()
