"""sidecar/policy.py: target normalisation, compilation, evaluation (trie vs a naive evaluator)."""

from __future__ import annotations

import random
import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.errors import ConfigError, SidecarError
from sidecar.identity import CallerPattern, SpiffeId
from sidecar.policy import (
    AUDIT,
    DEFAULT_DENY,
    ENFORCE,
    BadRequest,
    Decision,
    Policy,
    RequestAttrs,
    Verdict,
    authorize,
    authorize_connection,
    check_jwt,
    compile_policy,
    explain,
    normalize_target,
)
from tests.example import CHECKOUT as CHECKOUT_ID
from tests.example import REPORTING as REPORTING_ID

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = SpiffeId.parse(CHECKOUT_ID)
REPORTING = SpiffeId.parse(REPORTING_ID)
OTHER_TD = SpiffeId.parse("spiffe://other.org/ns/shop/sa/checkout")


def load_inventory() -> Policy:
    path = ROOT / "config" / "inventory-policy.yaml"
    return compile_policy(yaml.safe_load(path.read_text()), str(path))


# ---------------------------------------------------------------------------------------------------------
# The running example


def test_inventory_example_three_facts() -> None:
    policy = load_inventory()
    # checkout may GET /api/stock/*
    d = explain(policy, CHECKOUT, "GET", "/api/stock/42")
    assert d.allowed and d.forward and d.rule == "checkout-reads-stock"
    # nobody may call /admin/** (including /admin itself)
    for caller in (CHECKOUT, REPORTING, OTHER_TD):
        for method in ("GET", "POST", "DELETE"):
            for path in ("/admin", "/admin/", "/admin/users/1"):
                d = explain(policy, caller, method, path)
                assert not d.forward and d.rule == "no-admin", (caller, method, path)
    # reporting may call nothing
    for method in ("GET", "POST", "HEAD"):
        for path in ("/", "/api/stock/42", "/api/stock", "/healthz"):
            d = explain(policy, REPORTING, method, path)
            assert not d.forward and d.rule == DEFAULT_DENY


# (caller, method, raw target) -> verdict, rule, forwarded target or None for a 400
TRANSCRIPT: list[tuple[SpiffeId, str, bytes, str, str, bytes | None]] = [
    (CHECKOUT, "GET", b"/api/stock/42", "allow", "checkout-reads-stock", b"/api/stock/42"),
    (
        CHECKOUT,
        "GET",
        b"/api/stock/42?fields=qty&x=%20",
        "allow",
        "checkout-reads-stock",
        b"/api/stock/42?fields=qty&x=%20",
    ),
    (CHECKOUT, "GET", b"/api/./stock//42", "allow", "checkout-reads-stock", b"/api/stock/42"),
    (CHECKOUT, "GET", b"/api/stock/%34%32", "allow", "checkout-reads-stock", b"/api/stock/42"),
    (CHECKOUT, "HEAD", b"/api/stock/42", "allow", "checkout-reads-stock", b"/api/stock/42"),
    (CHECKOUT, "POST", b"/api/stock/42", "deny", DEFAULT_DENY, b"/api/stock/42"),
    (CHECKOUT, "get", b"/api/stock/42", "deny", DEFAULT_DENY, b"/api/stock/42"),
    (CHECKOUT, "GET", b"/api/stock", "deny", DEFAULT_DENY, b"/api/stock"),
    (CHECKOUT, "GET", b"/api/stock/", "deny", DEFAULT_DENY, b"/api/stock/"),
    (CHECKOUT, "GET", b"/api/stock/42/history", "deny", DEFAULT_DENY, b"/api/stock/42/history"),
    (CHECKOUT, "GET", b"/admin", "deny", "no-admin", b"/admin"),
    (CHECKOUT, "GET", b"/admin/", "deny", "no-admin", b"/admin/"),
    (CHECKOUT, "GET", b"/api/stock/../../admin/x", "deny", "no-admin", b"/admin/x"),
    (CHECKOUT, "GET", b"/api/stock/%2e%2e/%2E%2E/admin", "deny", "no-admin", b"/admin"),
    (CHECKOUT, "GET", b"/%61dmin/users", "deny", "no-admin", b"/admin/users"),
    (CHECKOUT, "GET", b"//admin//users", "deny", "no-admin", b"/admin/users"),
    (CHECKOUT, "GET", b"/ADMIN", "deny", DEFAULT_DENY, b"/ADMIN"),
    (CHECKOUT, "GET", b"/administrator", "deny", DEFAULT_DENY, b"/administrator"),
    (CHECKOUT, "GET", b"/api/stock%2f42", "400", "", None),
    (CHECKOUT, "GET", b"/api/stock/..;/..;/admin", "400", "", None),
    (CHECKOUT, "GET", b"/api/stock/42#frag", "400", "", None),
    (CHECKOUT, "GET", b"/../admin", "400", "", None),
    (CHECKOUT, "GET", b"http://inventory/api/stock/42", "400", "", None),
    (REPORTING, "GET", b"/api/stock/42", "deny", DEFAULT_DENY, b"/api/stock/42"),
    (OTHER_TD, "GET", b"/api/stock/42", "deny", DEFAULT_DENY, b"/api/stock/42"),
]


@pytest.mark.parametrize(("peer", "method", "raw", "verdict", "rule", "forward"), TRANSCRIPT)
def test_inventory_transcript(
    peer: SpiffeId, method: str, raw: bytes, verdict: str, rule: str, forward: bytes | None
) -> None:
    policy = load_inventory()
    if forward is None:
        with pytest.raises(BadRequest):
            normalize_target(raw)
        return
    target = normalize_target(raw)
    assert target.forward == forward
    d = authorize(policy, RequestAttrs(peer, method, target.path))
    assert (d.verdict, d.rule) == (verdict, rule)
    assert d.mode == ENFORCE and d.enforced


def test_default_deny_reason_names_caller_and_request() -> None:
    d = authorize(load_inventory(), RequestAttrs(REPORTING, "GET", "/api/stock/42"))
    assert d.reason == ("caller spiffe://example.org/ns/shop/sa/reporting matches no allow rule for GET /api/stock/42")


def test_rule_decisions_are_precomputed() -> None:
    policy = load_inventory()
    a = authorize(policy, RequestAttrs(CHECKOUT, "GET", "/api/stock/1"))
    b = authorize(policy, RequestAttrs(CHECKOUT, "GET", "/api/stock/2"))
    assert a is b


# ---------------------------------------------------------------------------------------------------------
# normalize_target


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        (b"/", "/", ""),
        (b"/a", "/a", ""),
        (b"/a/", "/a/", ""),
        (b"/a?", "/a", ""),
        (b"/a?b=c?d", "/a", "b=c?d"),
        (b"/a/./b", "/a/b", ""),
        (b"/a/.", "/a/", ""),
        (b"/a/b/..", "/a/", ""),
        (b"/a/..", "/", ""),
        (b"/a//b", "/a/b", ""),
        (b"//", "/", ""),
        (b"/a//", "/a/", ""),
        (b"/.well-known/x", "/.well-known/x", ""),
        (b"/a/...", "/a/...", ""),
        (b"/a/.b/..c", "/a/.b/..c", ""),
        (b"/%41%7a%30%2d%2e%5f%7e", "/Az0-._~", ""),
        (b"/%3a%3A%40", "/%3A%3A%40", ""),
        (b"/%c3%a9", "/%C3%A9", ""),
        (b"/%25", "/%25", ""),
        (b"/%252e%252e/", "/%252e%252e/", ""),
        (b"/a;b=c/d", "/a/d", ""),  # params forwarded, not matched
        (b"/*", "/*", ""),
        (b"/a|{}", "/a|{}", ""),
        (b"/a?x=%2F%00a", None, None),  # %00 in the query
        (b"/a?x=%2f&y=%0a", "/a", "x=%2f&y=%0a"),  # the query is validated but forwarded untouched
    ],
)
def test_normalize_accepts(raw: bytes, path: str | None, query: str | None) -> None:
    if path is None:
        with pytest.raises(BadRequest):
            normalize_target(raw)
        return
    t = normalize_target(raw)
    assert (t.path, t.query) == (path, query)
    if b";" not in raw:  # path parameters are forwarded but not matched
        assert t.forward == (path + ("?" + query if query else "")).encode()


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "origin form"),
        (b"*", "origin form"),
        (b"a/b", "origin form"),
        (b"http://x/a", "origin form"),
        (b"/a%2fb", "encoded '/'"),
        (b"/a%2Fb", "encoded '/'"),
        (b"/a%5cb", "encoded '/' or '\\'"),
        (b"/a\\b", "backslash"),
        (b"/a\x00", "NUL"),
        (b"/a%00", "NUL"),
        (b"/a%0a", "control"),
        (b"/a%7f", "control"),
        (b"/a\x7f", "control"),
        (b"/a\tb", "control"),
        (b"/a b", "space"),
        (b"/a\xc3\xa9", "non-ASCII"),
        (b"/a?\xff", "non-ASCII"),
        (b"/a%", "percent"),
        (b"/a%4", "percent"),
        (b"/a%zz", "percent"),
        (b"/a%%41", "percent"),
        (b"/a?x=%g1", "percent"),
        (b"/a#b", "fragment"),
        (b"/a?b#c", "fragment"),
        (b"/..", "above the root"),
        (b"/a/../..", "above the root"),
        (b"/%2e%2e/a", "above the root"),
        (b"/a/..;/b", "'..;'"),
        (b"/a/.;x/b", "'..;'"),
        (b"/a/%2e%2e;/b", "'..;'"),
        (b"/api/..%3B/admin", "encoded ';'"),
        (b"/api/..%3b/admin", "encoded ';'"),
        (b"/a%3Bb", "encoded ';'"),
    ],
)
def test_normalize_rejects(raw: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest) as e:
        normalize_target(raw)
    assert fragment in e.value.reason
    assert isinstance(e.value, SidecarError)


def test_fast_path_returns_raw_bytes() -> None:
    raw = b"/api/stock/42?x=1"
    assert normalize_target(raw).forward is raw


_TOKENS = [
    "/",
    "//",
    "a",
    "b",
    "api",
    "admin",
    "stock",
    ".",
    "..",
    "%2e",
    "%2E%2e",
    "%2f",
    "%5C",
    "%41",
    "%61dmin",
    ";",
    "..;",
    "%3b",
    "?",
    "#",
    "%",
    "%0",
    "%00",
    "%25",
    "%7e",
    "~",
    "\\",
    " ",
    "\x00",
    "é",
    "*",
    "x=1",
]
_raw_targets = st.lists(st.sampled_from(_TOKENS), max_size=12).map(lambda ts: "".join(ts).encode("utf-8"))
_slash_targets = _raw_targets.map(lambda b: b"/" + b)


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.binary(max_size=64), _raw_targets, _slash_targets))
@example(b"/%2e%2e")
@example(b"/a/%2e/")
def test_normalize_never_raises_anything_else_and_is_idempotent(raw: bytes) -> None:
    try:
        t = normalize_target(raw)
    except BadRequest:
        return
    again = normalize_target(t.forward)
    assert again == t
    # The result is clean: no dot or empty segment inside, no '%' before an unreserved character.
    segs = t.path[1:].split("/")
    assert all(s not in (".", "..") for s in segs)
    assert all(segs[:-1])
    assert re.search(r"%(?![0-9A-F]{2})", t.path) is None


def _lenient_route(forward: bytes) -> str:
    """Where a lenient Java-style server routes a forwarded target: percent-decode the whole path, then
    drop `;params` from each segment, then resolve dot segments and merge empty ones (Tomcat, Spring)."""
    path = urllib.parse.unquote(forward.split(b"?", 1)[0].decode("ascii"), errors="strict")
    out: list[str] = []
    for seg in path[1:].split("/"):
        seg = seg.split(";", 1)[0]
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    return "/" + "/".join(out)


@settings(max_examples=600, deadline=None)
@given(_slash_targets)
@example(b"/api/..%3b/admin")
def test_a_lenient_app_routes_to_the_authorised_path(raw: bytes) -> None:
    """Whatever we forward, an app that decodes before it strips path parameters and normalises routes it
    to the path the policy matched (an encoded ';' after dot segments would break this: issue 10 #5)."""
    try:
        t = normalize_target(raw)
    except BadRequest:
        return
    authorised = urllib.parse.unquote(t.path).rstrip("/") or "/"
    assert (_lenient_route(t.forward).rstrip("/") or "/") == authorised


# ---------------------------------------------------------------------------------------------------------
# Safety properties


API_ONLY = compile_policy(
    {"rules": [{"name": "api", "action": "allow", "paths": ["/api/**"], "callers": ["*"]}]}, "api-only"
)
ADMIN_DENY = compile_policy(
    {
        "rules": [
            {"name": "all", "action": "allow", "callers": ["*"]},
            {"name": "no-admin", "action": "deny", "paths": ["/admin/**"], "callers": ["*"]},
        ]
    },
    "admin-deny",
)


@settings(max_examples=600, deadline=None)
@given(_slash_targets, st.sampled_from(["GET", "POST", "DELETE"]))
def test_nothing_under_admin_is_ever_allowed(raw: bytes, method: str) -> None:
    try:
        t = normalize_target(raw)
    except BadRequest:
        return
    under_admin = t.path == "/admin" or t.path.startswith("/admin/")
    under_api = t.path == "/api" or t.path.startswith("/api/")
    d = authorize(API_ONLY, RequestAttrs(CHECKOUT, method, t.path))
    assert d.forward == under_api
    if under_admin:
        assert not d.forward
        d = authorize(ADMIN_DENY, RequestAttrs(CHECKOUT, method, t.path))
        assert not d.forward and d.rule == "no-admin"


@settings(max_examples=300, deadline=None)
@given(_slash_targets, st.sampled_from([CHECKOUT, REPORTING]), st.sampled_from(["GET", "POST"]))
def test_audit_mode_changes_only_whether_not_what(raw: bytes, peer: SpiffeId, method: str) -> None:
    data = yaml.safe_load((ROOT / "config" / "inventory-policy.yaml").read_text())
    enforce = compile_policy(data, "enforce")
    audit = compile_policy({**data, "mode": "audit"}, "audit")
    try:
        t = normalize_target(raw)
    except BadRequest:
        return  # a 400 is a 400 in both modes (normalisation does not depend on the policy)
    de = authorize(enforce, RequestAttrs(peer, method, t.path))
    da = authorize(audit, RequestAttrs(peer, method, t.path))
    assert (de.allowed, de.rule) == (da.allowed, da.rule)
    assert da.forward and da.mode == AUDIT and not da.enforced
    assert de.forward == de.allowed
    assert normalize_target(raw) == t  # same forwarded target whatever the mode


# ---------------------------------------------------------------------------------------------------------
# The trie agrees with a naive O(rules) evaluator


def _naive_path_regex(pattern: str) -> re.Pattern[str]:
    if pattern in ("**", "/**"):
        return re.compile(r"/.*")
    segs = pattern[1:].split("/")
    subtree = segs[-1] == "**"
    if subtree:
        segs = segs[:-1]
    body = "".join("/" + ("[^/]+" if s == "*" else re.escape(s)) for s in segs)
    return re.compile(body + "(/.*)?" if subtree else body)


def naive(data: dict[str, Any], peer: SpiffeId, method: str | None, path: str | None) -> tuple[bool, bool, str]:
    """(allowed, enforced, rule) by scanning every rule; `method`/`path` None = connection level."""
    policy_audit = data.get("mode") == "audit"
    rules = []
    for r in data["rules"]:
        paths = r.get("paths", ["/**"])
        methods = r.get("methods", ["*"])
        if method is None:
            if methods != ["*"] or not any(p in ("**", "/**") for p in paths):
                continue
            ok_path = ok_method = True
        else:
            assert path is not None
            ok_path = any(_naive_path_regex(p).fullmatch(path) for p in paths)
            # A rule naming GET also covers HEAD (RFC 9110 §9.3.2).
            ok_method = methods == ["*"] or method in methods or (method == "HEAD" and "GET" in methods)
        ok_caller = any(CallerPattern.parse(c).matches(peer) for c in r["callers"])
        if ok_path and ok_method and ok_caller:
            rules.append(r)
    for r in rules:
        if r["action"] == "deny" and r.get("mode", "enforce") == "enforce":
            return False, not policy_audit, r["name"]
    allows = [r for r in rules if r["action"] == "allow"]
    if allows:
        soft = [r for r in rules if r["action"] == "deny"]
        if soft:
            return False, False, soft[0]["name"]
        return True, not policy_audit, allows[0]["name"]
    return False, not policy_audit, DEFAULT_DENY


PEERS = [
    CHECKOUT,
    REPORTING,
    OTHER_TD,
    SpiffeId.parse("spiffe://example.org/ns/shop/sa/web"),
    SpiffeId.parse("spiffe://example.org/ns/ops/sa/checkout"),
    SpiffeId.parse("spiffe://example.org/ns/shop"),
]
CALLERS = [
    "*",
    str(CHECKOUT),
    str(REPORTING),
    str(OTHER_TD),
    "spiffe://example.org/ns/shop/sa/*",
    "spiffe://example.org/ns/*/sa/checkout",
    "spiffe://example.org/ns/**",
    "spiffe://example.org/**",
    "spiffe://other.org/**",
]
SEGS = ["a", "b", "c"]
METHODS = ["GET", "POST", "HEAD"]

_pattern = st.builds(
    lambda segs, tail: "/" + "/".join(segs + tail) if segs or tail else "/",
    st.lists(st.sampled_from([*SEGS, "*"]), max_size=3),
    st.sampled_from([[], ["**"], [""]]),
).filter(lambda p: "//" not in p and p != "/**/" and not p.endswith("/**/"))


@st.composite
def _rules(draw: st.DrawFn, max_rules: int = 12) -> dict[str, Any]:
    rules: list[dict[str, Any]] = []
    for i in range(draw(st.integers(0, max_rules))):
        action = draw(st.sampled_from(["allow", "deny"]))
        rule: dict[str, Any] = {"name": f"r{i}", "action": action}
        if action == "deny" and draw(st.booleans()):
            rule["mode"] = draw(st.sampled_from(["audit", "enforce"]))
        if draw(st.booleans()):
            rule["paths"] = draw(st.lists(_pattern, min_size=1, max_size=3, unique=True))
        if draw(st.booleans()):
            rule["methods"] = draw(
                st.one_of(st.just(["*"]), st.lists(st.sampled_from(METHODS), min_size=1, max_size=2, unique=True))
            )
        rule["callers"] = draw(
            st.one_of(st.just(["*"]), st.lists(st.sampled_from(CALLERS[1:]), min_size=1, max_size=3, unique=True))
        )
        rules.append(rule)
    data: dict[str, Any] = {"rules": rules}
    if draw(st.booleans()):
        data["mode"] = draw(st.sampled_from(["audit", "enforce"]))
    return data


_paths = st.builds(
    lambda segs, slash: "/" + "/".join(segs) + ("/" if slash and segs else ""),
    st.lists(st.sampled_from([*SEGS, "d"]), max_size=4),
    st.booleans(),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rules(), st.lists(st.tuples(st.sampled_from(PEERS), st.sampled_from(METHODS), _paths), max_size=8))
def test_trie_agrees_with_naive(data: dict[str, Any], requests: list[tuple[SpiffeId, str, str]]) -> None:
    policy = compile_policy(data, "random")
    for peer, method, path in requests:
        d = authorize(policy, RequestAttrs(peer, method, path))
        assert (d.allowed, d.enforced, d.rule) == naive(data, peer, method, path), (peer, method, path)
        assert d.forward == (d.allowed or not d.enforced)
    for peer in PEERS:
        d = authorize_connection(policy, peer)
        assert (d.allowed, d.enforced, d.rule) == naive(data, peer, None, None), peer


def _big_policy(n: int, seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    segs = [f"s{i}" for i in range(20)]
    rules = []
    for i in range(n):
        depth = rnd.randint(0, 4)
        parts = [rnd.choice([*segs, "*"]) if rnd.random() < 0.2 else rnd.choice(segs[:6]) for _ in range(depth)]
        tail = rnd.choice([[], ["**"]])
        path = "/" + "/".join(parts + tail) if parts or tail else "/"
        action = "deny" if rnd.random() < 0.15 else "allow"
        rule: dict[str, Any] = {
            "name": f"rule-{i}",
            "action": action,
            "paths": [path],
            "callers": [rnd.choice(CALLERS)] if rnd.random() < 0.3 else [f"spiffe://example.org/ns/n{i}/sa/s"],
        }
        if rnd.random() < 0.5:
            rule["methods"] = [rnd.choice(METHODS)]
        if action == "deny" and rnd.random() < 0.3:
            rule["mode"] = "audit"
        rules.append(rule)
    return {"rules": rules}


BIG = _big_policy(1000, seed=7)
BIG_POLICY = compile_policy(BIG, "big")
BIG_PEERS = [*PEERS, *(SpiffeId.parse(f"spiffe://example.org/ns/n{i}/sa/s") for i in range(0, 1000, 37))]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(BIG_PEERS),
    st.sampled_from(METHODS),
    st.lists(st.sampled_from([f"s{i}" for i in range(8)]), max_size=5),
)
def test_thousand_rule_policy_agrees_with_naive(peer: SpiffeId, method: str, segs: list[str]) -> None:
    path = "/" + "/".join(segs)
    d = authorize(BIG_POLICY, RequestAttrs(peer, method, path))
    assert (d.allowed, d.enforced, d.rule) == naive(BIG, peer, method, path)


def test_thousand_rules_same_path_many_callers() -> None:
    # Every rule on one path with its own exact caller: the caller dict answers, not a scan.
    data = {
        "rules": [
            {
                "name": f"r{i}",
                "action": "allow",
                "methods": ["GET"],
                "paths": ["/api/stock/*"],
                "callers": [f"spiffe://example.org/ns/n{i}/sa/s"],
            }
            for i in range(1000)
        ]
    }
    policy = compile_policy(data, "many")
    for i in (0, 1, 500, 999):
        peer = SpiffeId.parse(f"spiffe://example.org/ns/n{i}/sa/s")
        assert authorize(policy, RequestAttrs(peer, "GET", "/api/stock/1")).rule == f"r{i}"
    assert authorize(policy, RequestAttrs(CHECKOUT, "GET", "/api/stock/1")).rule == DEFAULT_DENY


# ---------------------------------------------------------------------------------------------------------
# Audit mode details


def test_audit_deny_rule_with_allow_is_would_deny_and_forwarded() -> None:
    policy = compile_policy(
        {
            "rules": [
                {"name": "reads", "action": "allow", "methods": ["GET"], "callers": ["*"]},
                {"name": "trial", "action": "deny", "mode": "audit", "paths": ["/api/**"], "callers": [str(REPORTING)]},
            ]
        },
        "p",
    )
    d = authorize(policy, RequestAttrs(REPORTING, "GET", "/api/x"))
    assert (d.allowed, d.enforced, d.rule, d.mode, d.verdict, d.forward) == (
        False,
        False,
        "trial",
        AUDIT,
        "would-deny",
        True,
    )
    # No allow: the default deny still applies (an audit rule never grants).
    d = authorize(policy, RequestAttrs(REPORTING, "POST", "/api/x"))
    assert (d.rule, d.forward) == (DEFAULT_DENY, False)
    # Other callers: the allow decides.
    d = authorize(policy, RequestAttrs(CHECKOUT, "GET", "/api/x"))
    assert (d.rule, d.verdict, d.enforced) == ("reads", "allow", True)


def test_whole_policy_audit() -> None:
    data = yaml.safe_load((ROOT / "config" / "inventory-policy.yaml").read_text())
    policy = compile_policy({**data, "mode": "audit"}, "p")
    d = authorize(policy, RequestAttrs(REPORTING, "GET", "/api/stock/1"))
    assert (d.rule, d.verdict, d.forward, d.mode) == (DEFAULT_DENY, "would-deny", True, AUDIT)
    assert "audit" in d.reason
    d = authorize(policy, RequestAttrs(CHECKOUT, "GET", "/admin"))
    assert (d.rule, d.verdict, d.forward) == ("no-admin", "would-deny", True)
    d = authorize(policy, RequestAttrs(CHECKOUT, "GET", "/api/stock/1"))
    assert (d.verdict, d.forward, d.enforced, d.mode) == ("allow", True, False, AUDIT)


def test_decision_forward_property() -> None:
    assert Decision(Verdict.ALLOW, "r", "", ENFORCE).forward
    assert Decision(Verdict.ALLOW, "r", "", AUDIT).forward
    assert Decision(Verdict.WOULD_DENY, "r", "", AUDIT).forward
    assert not Decision(Verdict.DENY, "r", "", ENFORCE).forward


# ---------------------------------------------------------------------------------------------------------
# Connection level (TCP mode)


def test_authorize_connection() -> None:
    policy = compile_policy(
        {
            "rules": [
                {"name": "shop", "action": "allow", "callers": ["spiffe://example.org/ns/shop/**"]},
                {"name": "all-paths", "action": "allow", "paths": ["**"], "callers": [str(OTHER_TD)]},
                {"name": "gets", "action": "allow", "methods": ["GET"], "callers": ["*"]},
                {"name": "no-reporting", "action": "deny", "paths": ["/**"], "callers": [str(REPORTING)]},
                {"name": "path-deny", "action": "deny", "paths": ["/x"], "callers": ["*"]},
            ]
        },
        "tcp",
    )
    assert authorize_connection(policy, CHECKOUT).rule == "shop"
    assert authorize_connection(policy, OTHER_TD).rule == "all-paths"
    assert authorize_connection(policy, REPORTING).rule == "no-reporting"
    d = authorize_connection(policy, SpiffeId.parse("spiffe://example.org/ns/ops/sa/x"))
    assert (d.rule, d.forward) == (DEFAULT_DENY, False)
    assert "a connection" in d.reason
    assert policy.path_specific_rules == ("gets", "path-deny")


# ---------------------------------------------------------------------------------------------------------
# Compilation errors


def _problems(data: Any, lines: dict[str, int] | None = None, prefix: str = "") -> list[str]:
    with pytest.raises(ConfigError) as e:
        compile_policy(data, "p.yaml", lines, prefix=prefix)
    return [str(p) for p in e.value.problems]


def test_every_problem_is_collected() -> None:
    problems = _problems(
        {
            "mode": "dry-run",
            "rulez": [],
            "rules": [
                {"name": "a", "action": "allow", "paths": ["/api/../x"], "callers": ["*"], "method": ["GET"]},
                {"name": "a", "action": "permit", "callers": []},
                {"action": "deny", "paths": [], "methods": [], "callers": ["spiffe://Example.org/x"]},
                {
                    "name": "b",
                    "action": "allow",
                    "mode": "audit",
                    "paths": ["/api/st*", "/a/**/b", "/api//x"],
                    "methods": ["get", "G T"],
                    "callers": ["*", "spiffe://example.org/a"],
                },
                {"name": "c", "action": "deny"},
                "not a rule",
            ],
        }
    )
    expected = [
        "p.yaml: mode: must be 'enforce' or 'audit'",
        "p.yaml: rulez: unknown key",
        "p.yaml: rules[0].method: unknown key",
        "p.yaml: rules[0].paths[0]: path pattern is not normalised: requests are matched on '/x'",
        "p.yaml: rules[1].name: duplicate rule name 'a'",
        "p.yaml: rules[1].action: must be 'allow' or 'deny'",
        "p.yaml: rules[1].callers: 'callers' cannot be empty",
        "p.yaml: rules[2]: 'name' is required",
        "p.yaml: rules[2].methods: 'methods' cannot be empty",
        "p.yaml: rules[2].paths: 'paths' cannot be empty",
        "p.yaml: rules[2].callers[0]: 'spiffe://Example.org/x'",
        "p.yaml: rules[3].mode: 'audit' applies to deny rules only",
        "p.yaml: rules[3].methods[0]: methods are case-sensitive",
        "p.yaml: rules[3].methods[1]: 'G T' is not an HTTP method token",
        "p.yaml: rules[3].paths[0]: a wildcard must be a whole segment",
        "p.yaml: rules[3].paths[1]: '**' is only allowed as the whole last segment",
        "p.yaml: rules[3].paths[2]: path pattern is not normalised",
        "p.yaml: rules[3].callers: '*' must be the only entry",
        "p.yaml: rules[4]: 'callers' is required",
        "p.yaml: rules[5]: a rule is a mapping",
    ]
    for want in expected:
        assert any(p.startswith(want) for p in problems), (want, problems)
    assert len(problems) == len(expected), problems


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("api", "starts with '/'"),
        ("*", "starts with '/'"),
        ("/api?x=1", "no query"),
        ("/a#b", "no query or fragment"),
        ("/%7Eme", "requests are matched on '/~me'"),
        ("/a/./b", "'/a/b'"),
        ("/a/", None),
        ("/", None),
        ("/**", None),
        ("**", None),
        ("/a/*/b/**", None),
        ("/a%2Fb", "not a valid request path"),
        ("/a//**", "empty segment"),
        ("/é", "ASCII"),
        ("/a/***", "'**' is only allowed"),
    ],
)
def test_path_patterns(pattern: str, message: str | None) -> None:
    data = {"rules": [{"name": "r", "action": "allow", "paths": [pattern], "callers": ["*"]}]}
    if message is None:
        compile_policy(data, "p")
        return
    problems = _problems(data)
    assert len(problems) == 1 and message in problems[0], problems


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "rules: []",
        {"rules": "x"},
        {"rules": [{"name": "r", "action": "allow", "callers": "*"}]},
        {"rules": [{"name": "default-deny", "action": "deny", "callers": ["*"]}]},
        {"rules": [{"name": "bad name!", "action": "deny", "callers": ["*"]}]},
        {"rules": [{"name": "r", "action": "deny", "callers": ["*", "*"]}]},
        {"rules": [{"name": "r", "action": "deny", "callers": [1]}]},
    ],
)
def test_malformed_policies(data: Any) -> None:
    assert _problems(data)


def test_empty_policy_denies_everything() -> None:
    empties: list[dict[str, Any]] = [{}, {"rules": []}, {"rules": None, "mode": "enforce"}]
    for data in empties:
        policy = compile_policy(data, "empty")
        assert authorize(policy, RequestAttrs(CHECKOUT, "GET", "/")).rule == DEFAULT_DENY
        assert "every request is denied" in policy.describe()[-1]


def test_line_numbers_and_prefix() -> None:
    lines = {"inbound.policy.rules": 10, "inbound.policy.rules[0]": 11, "inbound.policy.rules[0].paths[0]": 14}
    data = {"rules": [{"name": "r", "action": "allow", "paths": ["/a/../b"], "callers": ["x"]}]}
    problems = _problems(data, lines, prefix="inbound.policy")
    assert problems[0].startswith("p.yaml:14: inbound.policy.rules[0].paths[0]: ")
    assert problems[1].startswith("p.yaml:11: inbound.policy.rules[0].callers[0]: ")
    problems = _problems(data, {"rules[0]": 3})
    assert problems[0].startswith("p.yaml:3: rules[0].paths[0]: ")


def test_describe_and_dict() -> None:
    policy = load_inventory()
    lines = policy.describe()
    assert lines[0].endswith("mode enforce, 3 rule(s), default deny")
    assert lines[1] == (
        "  1. checkout-reads-stock: allow GET /api/stock/* from spiffe://example.org/ns/shop/sa/checkout"
    )
    assert lines[2] == (
        "  2. checkout-reserves-stock: allow POST /api/stock/*/reserve from spiffe://example.org/ns/shop/sa/checkout"
        " with jwt aud=inventory sub=*"
    )
    assert lines[3] == "  3. no-admin: deny * /admin/** from *"
    d = policy.to_dict()
    assert d["mode"] == "enforce" and d["default"] == "deny"
    assert d["rules"][1]["jwt"] == {"audience": "inventory", "subjects": ["*"], "bind": True}
    assert d["rules"][2] == {
        "name": "no-admin",
        "action": "deny",
        "mode": "enforce",
        "methods": ["*"],
        "paths": ["/admin/**"],
        "callers": ["*"],
    }
    # The dict form compiles back to the same decisions.
    again = compile_policy({"mode": d["mode"], "rules": d["rules"]}, "x")
    assert again.rules == policy.rules


def test_explain_rejects_bad_paths() -> None:
    policy = load_inventory()
    with pytest.raises(BadRequest):
        explain(policy, CHECKOUT, "GET", "/api/stock%2F1")
    with pytest.raises(BadRequest):
        explain(policy, CHECKOUT, "GET", "/api/stock/é")


@pytest.mark.parametrize(
    "raw",
    [b"/api/%c0%ae%c0%ae/admin/x", b"/api/%C0%AF", b"/api/%ff", b"/api/%e2%82", b"/api/%ed%a0%80"],
)
def test_encoded_bytes_that_are_not_utf8_are_rejected(raw: bytes) -> None:
    # Overlong forms (%C0%AE is '.'), truncated sequences and surrogates: a lenient decoder in the app would
    # see a path the policy never saw.
    with pytest.raises(BadRequest, match="not valid UTF-8"):
        normalize_target(raw)


def test_encoded_utf8_is_kept_encoded() -> None:
    assert normalize_target(b"/api/caf%c3%a9").forward == b"/api/caf%C3%A9"


@pytest.mark.parametrize(
    "raw", [b"/admin;jsessionid=1/users", b"/admin;/users", b"/;x/admin/users", b"/admin/users;x", b"/admin;"]
)
def test_path_parameters_do_not_walk_around_a_deny(raw: bytes) -> None:
    # Tomcat and Spring route /admin;x/users as /admin/users: the policy must match what they route.
    policy = compile_policy(
        {
            "rules": [
                {"name": "all", "action": "allow", "paths": ["/**"], "callers": [str(CHECKOUT)]},
                {"name": "no-admin", "action": "deny", "paths": ["/admin/**"], "callers": ["*"]},
            ]
        },
        "t",
    )
    target = normalize_target(raw)
    assert target.forward == raw  # forwarded as sent
    assert authorize(policy, RequestAttrs(CHECKOUT, "GET", target.path)).rule == "no-admin"


def test_a_deny_on_get_also_denies_head() -> None:
    policy = compile_policy(
        {
            "rules": [
                {"name": "all", "action": "allow", "paths": ["/**"], "callers": ["*"]},
                {"name": "no-secret", "action": "deny", "methods": ["GET"], "paths": ["/secret"], "callers": ["*"]},
            ]
        },
        "t",
    )
    assert authorize(policy, RequestAttrs(CHECKOUT, "HEAD", "/secret")).rule == "no-secret"
    assert authorize(policy, RequestAttrs(CHECKOUT, "POST", "/secret")).rule == "all"


# ---------------------------------------------------------------------------------------------------------
# JWT-SVID step-up (issue 13)

STEP_UP = {
    "rules": [
        {"name": "checkout-reads-stock", "action": "allow", "methods": ["GET", "POST"], "paths": ["/api/stock/**"],
         "callers": [str(CHECKOUT)]},
        {"name": "reserve-needs-token", "action": "allow", "methods": ["POST"], "paths": ["/api/stock/*/reserve"],
         "callers": [str(CHECKOUT)], "jwt": {"audience": "inventory"}},
        {"name": "ops-any-subject", "action": "allow", "paths": ["/ops/**"], "callers": ["*"],
         "jwt": {"audience": "ops", "subjects": ["spiffe://example.org/ns/ops/**"], "bind": False}},
    ]
}  # fmt: skip


def test_a_step_up_rule_is_never_walked_around_by_a_broader_allow() -> None:
    policy = compile_policy(STEP_UP, "step-up")
    plain = authorize(policy, RequestAttrs(CHECKOUT, "POST", "/api/stock/42"))
    assert plain.allowed and plain.jwt is None
    d = authorize(policy, RequestAttrs(CHECKOUT, "POST", "/api/stock/42/reserve"))
    assert d.allowed and d.rule == "reserve-needs-token" and d.jwt is not None
    assert (d.jwt.audience, d.jwt.bound, [p.text for p in d.jwt.subjects]) == ("inventory", True, ["*"])
    assert "with a JWT-SVID" in d.reason


def test_check_jwt_outcomes() -> None:
    policy = compile_policy(STEP_UP, "step-up")
    d = authorize(policy, RequestAttrs(CHECKOUT, "POST", "/api/stock/42/reserve"))
    assert check_jwt(d, CHECKOUT, CHECKOUT) == (d, False)  # bound: the subject is the peer
    no_token, challenge = check_jwt(d, CHECKOUT, None, "missing")
    assert no_token.verdict is Verdict.DENY and challenge and "no valid JWT-SVID" in no_token.reason
    other, challenge = check_jwt(d, CHECKOUT, REPORTING)
    assert other.verdict is Verdict.DENY and not challenge and "not the mTLS peer" in other.reason
    ops = authorize(policy, RequestAttrs(REPORTING, "GET", "/ops/restart"))
    admin = SpiffeId.parse("spiffe://example.org/ns/ops/sa/admin")
    assert check_jwt(ops, REPORTING, admin) == (ops, False)  # unbound: another workload's token
    wrong, challenge = check_jwt(ops, REPORTING, REPORTING)
    assert wrong.verdict is Verdict.DENY and not challenge and "matches none" in wrong.reason
    plain = authorize(policy, RequestAttrs(CHECKOUT, "GET", "/api/stock/1"))
    assert check_jwt(plain, CHECKOUT, None) == (plain, False)  # no requirement: unchanged


def test_step_up_in_audit_mode_and_under_an_audit_deny() -> None:
    audit = compile_policy({**STEP_UP, "mode": "audit"}, "audit")
    d = authorize(audit, RequestAttrs(CHECKOUT, "POST", "/api/stock/42/reserve"))
    failed, challenge = check_jwt(d, CHECKOUT, None, "missing")
    assert failed.verdict is Verdict.WOULD_DENY and failed.forward and not challenge
    # An audit-mode deny rule matching the same request does not switch the requirement off.
    soft = compile_policy({"rules": [*STEP_UP["rules"], {"name": "no-reserve", "action": "deny", "mode": "audit",
                                                          "paths": ["/api/stock/*/reserve"], "callers": ["*"]}]}, "s")
    d = authorize(soft, RequestAttrs(CHECKOUT, "POST", "/api/stock/42/reserve"))
    assert d.verdict is Verdict.WOULD_DENY and d.jwt is not None
    failed, challenge = check_jwt(d, CHECKOUT, None, "missing")
    assert failed.verdict is Verdict.DENY and challenge


@pytest.mark.parametrize(
    ("jwt", "fragment"),
    [
        ({"subjects": ["*"]}, "audience: required"),
        ({"audience": " x"}, "audience: required"),
        ({"audience": "a", "subjects": ["spiffe://Example.org/x"]}, "subjects[0]"),
        ({"audience": "a", "bind": "yes"}, "bind: must be true"),
        ({"audience": "a", "aud": "b"}, "unknown key 'aud'"),
        ("inventory", "'jwt' is a mapping"),
    ],
)
def test_bad_step_up_requirements_are_problems(jwt: object, fragment: str) -> None:
    rule = {"name": "r", "action": "allow", "callers": ["*"], "jwt": jwt}
    with pytest.raises(ConfigError) as info:
        compile_policy({"rules": [rule]}, "p")
    assert any(fragment in str(p) for p in info.value.problems), info.value.problems


def test_a_deny_rule_cannot_require_a_token_and_step_up_is_never_connection_level() -> None:
    with pytest.raises(ConfigError) as info:
        compile_policy({"rules": [{"name": "d", "action": "deny", "callers": ["*"], "jwt": {"audience": "a"}}]}, "p")
    assert "only an allow rule" in str(info.value)
    policy = compile_policy({"rules": [{"name": "a", "action": "allow", "callers": ["*"], "jwt": {"audience": "x"}}]},
                            "p")
    assert policy.path_specific_rules == ("a",)  # a TCP listener cannot enforce it (no token on a connection)


# ---------------------------------------------------------------------------------------------------------
# gRPC methods (issue 12): `grpc:` names /package.Service/Method paths, method POST

GRPC_POLICY = {
    "rules": [
        {"name": "checkout-stock", "action": "allow", "grpc": ["inventory.v1.Inventory/GetStock"],
         "callers": [CHECKOUT_ID]},
        {"name": "checkout-inventory", "action": "allow", "grpc": ["/inventory.v1.Inventory/*"],
         "callers": ["spiffe://example.org/ns/shop/**"]},
        {"name": "no-admin", "action": "deny", "grpc": ["inventory.v1.Admin/*"], "callers": ["*"]},
    ]
}  # fmt: skip


def test_grpc_rules_compile_to_post_paths() -> None:
    p = compile_policy(GRPC_POLICY, "g.yaml")
    first = p.rules[0]
    assert first.methods == frozenset({"POST"})
    assert [x.text for x in first.paths] == ["/inventory.v1.Inventory/GetStock"]
    assert first.to_dict()["grpc"] == ["inventory.v1.Inventory/GetStock"]
    assert first.describe() == f"checkout-stock: allow grpc inventory.v1.Inventory/GetStock from {CHECKOUT_ID}"

    def decide(peer: SpiffeId, method: str, path: str) -> tuple[str, str]:
        d = authorize(p, RequestAttrs(peer, method, path))
        return d.verdict, d.rule

    assert decide(CHECKOUT, "POST", "/inventory.v1.Inventory/GetStock") == ("allow", "checkout-stock")
    assert decide(REPORTING, "POST", "/inventory.v1.Inventory/Reserve") == ("allow", "checkout-inventory")
    assert decide(CHECKOUT, "GET", "/inventory.v1.Inventory/GetStock") == ("deny", DEFAULT_DENY)  # gRPC is POST
    assert decide(CHECKOUT, "POST", "/inventory.v1.Admin/Reset") == ("deny", "no-admin")
    assert decide(CHECKOUT, "POST", "/inventory.v1.Inventory/GetStock/x") == ("deny", DEFAULT_DENY)
    assert explain(p, CHECKOUT, "POST", "/inventory.v1.Inventory/GetStock").rule == "checkout-stock"


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ({"grpc": ["inventory.v1.Inventory"]}, "rules[0].grpc[0]: 'inventory.v1.Inventory' is not a gRPC method"),
        ({"grpc": ["inventory..v1/Get"]}, "rules[0].grpc[0]"),
        ({"grpc": ["inventory.v1.Inventory/Get*"]}, "rules[0].grpc[0]"),
        ({"grpc": ["inventory.v1.Inventory/**"]}, "rules[0].grpc[0]"),
        ({"grpc": "inventory.v1.Inventory/Get"}, "rules[0].grpc: 'grpc' must be a list"),
        ({"grpc": ["a.B/C"], "paths": ["/x"]}, "rules[0].paths: a rule with 'grpc' takes no 'paths'"),
        ({"grpc": ["a.B/C"], "methods": ["POST"]}, "rules[0].methods: a rule with 'grpc' takes no 'methods'"),
    ],
)
def test_bad_grpc_entries_are_problems_with_their_line(rule: dict[str, Any], fragment: str) -> None:
    data = {"rules": [{"name": "r", "action": "allow", "callers": ["*"], **rule}]}
    problems = _problems(data, {"rules[0]": 3, "rules[0].grpc": 5, "rules[0].grpc[0]": 6, "rules[0].paths": 7,
                                "rules[0].methods": 8})  # fmt: skip
    assert any(fragment in m and m.startswith("p.yaml:") and m.split(":")[1].isdigit() for m in problems), problems
