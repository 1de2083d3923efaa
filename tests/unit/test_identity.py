"""SPIFFE ID, trust domain and caller-pattern parsing: every vector of spec notes §1.3, plus properties."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spiffe import SpiffeId as PySpiffeId

from sidecar.errors import IdentityError
from sidecar.identity import CallerPattern, PatternKind, SpiffeId, TrustDomain
from tests import example

VALID = [
    "spiffe://trustdomain",  # 1: path is optional
    "spiffe://trustdomain/path",  # 2
    "spiffe://trustdomain/.path",  # 3: dots inside a segment
    "spiffe://trustdomain/..path",  # 4
    "spiffe://trustdomain/...",  # 5: not a dot segment
    "spiffe://trustdomain_/path",  # 6
    "spiffe://trustdomain-/path",
    "spiffe://trustdomain./path",
    "spiffe://trustdomain/pathA",  # 7: uppercase allowed in the path
    "spiffe://trustdomain/pathZ",
    "spiffe://staging.example.com/payments/mysql",  # 8
    "spiffe://k8s-west.example.com/ns/staging/sa/default",  # 9
    "spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453",  # 10
    "spiffe://192.168.1.1/workload",  # 11: IPv4 host
]

# (input, fragment of the reason) for spec notes §1.3 rows 12-46.
INVALID = [
    ("", "cannot be empty"),  # 12
    ("s", "scheme"),  # 13
    ("spiffe:/", "scheme"),  # 14
    ("Spiffe://", "scheme"),  # 15
    ("SPIFFE://trustdomain", "scheme"),  # 16
    ("spiffe:/trustdomain/path", "scheme"),  # 17
    ("http://example.org/path", "scheme"),  # 18
    ("spiffe://", "trust domain is missing"),  # 19
    ("spiffe:///", "trust domain is missing"),  # 20
    ("spiffe:///path", "trust domain is missing"),  # 21
    ("spiffe://trustdomain/", "trailing slash"),  # 22
    ("spiffe://trustdomain/path/", "trailing slash"),  # 23
    ("spiffe://trustdomain//", "empty segments"),  # 24
    ("spiffe://trustdomain//path", "empty segments"),  # 25
    ("spiffe://trustdomain/.", "dot segments"),  # 26
    ("spiffe://trustdomain/./path", "dot segments"),  # 27
    ("spiffe://trustdomain/path/./other", "dot segments"),  # 28
    ("spiffe://trustdomain/path/..", "dot segments"),  # 29
    ("spiffe://trustdomain/..", "dot segments"),  # 30
    ("spiffe://trustdomain/../path", "dot segments"),  # 31
    ("spiffe://trustdomain/path/../other", "dot segments"),  # 32
    ("spiffe://%F0%9F%A4%AF/path", "trust domain characters"),  # 33
    ("spiffe://trustdomain/%F0%9F%A4%AF", "path segment characters"),  # 34
    ("spiffe://%62%61%64/path", "trust domain characters"),  # 35
    ("spiffe://trustdomain/%62%61%64", "path segment characters"),  # 36
    ("spiffe://trust$domain", "trust domain characters"),  # 37
    ("spiffe://trustdomain/path$", "path segment characters"),  # 38
    ("spiffe://trustdomainA/path", "trust domain characters"),  # 39
    ("spiffe://Example.org/path", "trust domain characters"),
    ("spiffe://example.org:8080/path", "trust domain characters"),  # 40: port
    ("spiffe://user@example.org/path", "trust domain characters"),  # 41: userinfo
    ("spiffe://user:pass@example.org/path", "trust domain characters"),
    ("spiffe://example.org/path?query=1", "path segment characters"),  # 42
    ("spiffe://example.org/path#frag", "path segment characters"),  # 43
    ("spiffe://example.org?x", "trust domain characters"),  # 44
    ("spiffe://example.org#x", "trust domain characters"),
    ("spiffe://[::1]/path", "trust domain characters"),  # 45: IPv6 excluded
    ("spiffe://example.org/path~1", "path segment characters"),  # 46
    ("spiffe://example.org/pa th", "path segment characters"),
    ("spiffe://exämple.org/path", "ASCII"),
]

TD_CHARS = set(string.ascii_lowercase + string.digits + ".-_")
PATH_CHARS = set(string.ascii_letters + string.digits + ".-_")


@pytest.mark.parametrize("value", VALID)
def test_valid_ids_parse_and_round_trip(value: str) -> None:
    sid = SpiffeId.parse(value)
    assert str(sid) == value
    assert SpiffeId.parse(str(sid)) == sid


@pytest.mark.parametrize(("value", "reason"), INVALID)
def test_invalid_ids_raise_with_reason(value: str, reason: str) -> None:
    with pytest.raises(IdentityError) as exc:
        SpiffeId.parse(value)
    assert reason in exc.value.reason


def test_byte_loop_matches_spec_charsets() -> None:
    # go-spiffe's id_test.go loop: every byte appended to the trust domain and to the path (spec notes §1.3).
    for b in range(256):
        c = chr(b)
        td_ok = c in TD_CHARS
        path_ok = c in PATH_CHARS
        # "/" is no exception: it makes an empty segment or a trailing slash in both positions.
        for value, ok in ((f"spiffe://trustdomain{c}/path", td_ok), (f"spiffe://trustdomain/path{c}", path_ok)):
            try:
                SpiffeId.parse(value)
                parsed = True
            except IdentityError:
                parsed = False
            assert parsed is ok, (b, value)


def test_length_limits() -> None:
    # SPIFFE-ID §2.3: up to 2048 bytes must be supported; we reject longer (allowed by the spec).
    base = "spiffe://example.org/"
    ok = base + "a" * (2048 - len(base))
    assert str(SpiffeId.parse(ok)) == ok
    with pytest.raises(IdentityError, match="2048"):
        SpiffeId.parse(ok + "a")
    td = "a" * 255
    assert TrustDomain.parse(td).name == td
    with pytest.raises(IdentityError, match="255"):
        TrustDomain.parse(td + "a")


def test_root_id_and_segments() -> None:
    root = SpiffeId.parse("spiffe://example.org")
    assert root.is_root and root.path == "" and root.segments == ()
    sid = SpiffeId.parse("spiffe://example.org/ns/shop/sa/checkout")
    assert sid.segments == ("ns", "shop", "sa", "checkout")
    assert sid.trust_domain == TrustDomain("example.org")
    assert SpiffeId.from_parts(TrustDomain("example.org"), "/ns/shop/sa/checkout") == sid


def test_trust_domain_parse_forms() -> None:
    assert TrustDomain.parse("example.org").id_string() == "spiffe://example.org"
    assert TrustDomain.parse("spiffe://example.org/path").name == "example.org"
    for bad in ("", "Example.org", "example.org:80", "spiffe://example.org/", "ex ample"):
        with pytest.raises(IdentityError):
            TrustDomain.parse(bad)


@pytest.mark.parametrize(
    "value",
    ["SPIFFE://example.org/workload", "spiffe://EXAMPLE.org/workload", "Spiffe://Example.Org/workload"],
)
def test_stricter_than_py_spiffe_on_case(value: str) -> None:
    # py-spiffe >= 0.3 lowercases the scheme and trust domain (its PR #414); go-spiffe and SPIRE reject.
    # We follow go-spiffe: an allowlist must never match an ID the peer's own stack would refuse.
    assert str(PySpiffeId(value)) == value.lower().replace("/workload", "") + "/workload"
    with pytest.raises(IdentityError):
        SpiffeId.parse(value)


@given(st.text(max_size=80))
def test_any_string_parses_or_raises_with_reason(value: str) -> None:
    try:
        sid = SpiffeId.parse(value)
    except IdentityError as exc:
        assert exc.reason
    else:
        assert SpiffeId.parse(str(sid)) == sid


segment = st.text(alphabet=sorted(PATH_CHARS), min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
trust_domain = st.text(alphabet=sorted(TD_CHARS), min_size=1, max_size=30)


@given(trust_domain, st.lists(segment, max_size=6))
def test_generated_ids_round_trip(td: str, segs: list[str]) -> None:
    value = "spiffe://" + td + "".join("/" + s for s in segs)
    sid = SpiffeId.parse(value)
    assert str(sid) == value
    assert SpiffeId.parse(str(sid)) == sid
    assert sid.segments == tuple(segs)


# --- caller patterns ---------------------------------------------------------------------------------

CHECKOUT = SpiffeId.parse(example.CHECKOUT)
REPORTING = SpiffeId.parse(example.REPORTING)
OTHER_NS = SpiffeId.parse("spiffe://example.org/ns/billing/sa/checkout")
FOREIGN = SpiffeId.parse("spiffe://other.org/ns/shop/sa/checkout")


@pytest.mark.parametrize(
    ("pattern", "kind", "matches", "misses"),
    [
        ("*", PatternKind.ANY, [CHECKOUT, FOREIGN], []),
        (str(CHECKOUT), PatternKind.EXACT, [CHECKOUT], [REPORTING, FOREIGN]),
        ("spiffe://example.org/ns/shop/sa/*", PatternKind.SEGMENTS, [CHECKOUT, REPORTING], [OTHER_NS, FOREIGN]),
        ("spiffe://example.org/ns/*/sa/checkout", PatternKind.SEGMENTS, [CHECKOUT, OTHER_NS], [REPORTING, FOREIGN]),
        ("spiffe://example.org/ns/shop/**", PatternKind.SUBTREE, [CHECKOUT, REPORTING], [OTHER_NS, FOREIGN]),
        ("spiffe://example.org/**", PatternKind.TRUST_DOMAIN, [CHECKOUT, OTHER_NS], [FOREIGN]),
    ],
)
def test_caller_patterns(pattern: str, kind: PatternKind, matches: list[SpiffeId], misses: list[SpiffeId]) -> None:
    p = CallerPattern.parse(pattern)
    assert p.kind is kind
    for sid in matches:
        assert p.matches(sid), sid
    for sid in misses:
        assert not p.matches(sid), sid


def test_one_segment_wildcard_does_not_span_segments() -> None:
    p = CallerPattern.parse("spiffe://example.org/ns/shop/sa/*")
    assert not p.matches(SpiffeId.parse("spiffe://example.org/ns/shop/sa"))
    assert not p.matches(SpiffeId.parse("spiffe://example.org/ns/shop/sa/checkout/extra"))
    subtree = CallerPattern.parse("spiffe://example.org/ns/shop/**")
    assert not subtree.matches(SpiffeId.parse("spiffe://example.org/ns/shop"))
    assert subtree.matches(SpiffeId.parse("spiffe://example.org/ns/shop/sa/checkout/extra"))


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("", "cannot be empty"),
        ("checkout", "scheme"),
        ("spiffe://example.org", "root ID never identifies a workload"),
        ("spiffe://*.example.org/x", "trust domain"),
        ("spiffe://example.org/ns/sh*p", "whole segment"),
        ("spiffe://example.org/**/sa", "last segment"),
        ("spiffe://example.org/ns//*", "empty segments"),
        ("spiffe://example.org/ns/../*", "dot segments"),
        ("spiffe://Example.org/*", "trust domain characters"),
        ("**", "'*' or starts with 'spiffe://'"),
    ],
)
def test_malformed_patterns_are_errors_not_silent(pattern: str, reason: str) -> None:
    with pytest.raises(IdentityError) as exc:
        CallerPattern.parse(pattern)
    assert reason in exc.value.reason


@given(st.text(max_size=60))
def test_any_pattern_parses_or_raises_with_reason(value: str) -> None:
    try:
        CallerPattern.parse(value)
    except IdentityError as exc:
        assert exc.reason


@given(trust_domain, st.lists(segment, min_size=1, max_size=5))
def test_exact_pattern_matches_only_itself(td: str, segs: list[str]) -> None:
    sid = SpiffeId.parse("spiffe://" + td + "".join("/" + s for s in segs))
    p = CallerPattern.parse(str(sid))
    assert p.matches(sid)
    assert not p.matches(SpiffeId.parse(str(sid) + "/x"))


@given(trust_domain, st.lists(segment, max_size=4), trust_domain, st.lists(segment, max_size=4), st.booleans())
def test_equality_and_hash_are_those_of_trust_domain_and_path(
    td1: str, s1: list[str], td2: str, s2: list[str], copy: bool
) -> None:
    # The cached-string __eq__/__hash__ must agree with comparing (trust_domain, path) field by field.
    if copy:
        td2, s2 = td1, list(s1)
    a = SpiffeId.parse(f"spiffe://{td1}" + "".join("/" + s for s in s1))
    b = SpiffeId(TrustDomain(td2), "".join("/" + s for s in s2))  # built directly, not parsed
    same = (a.trust_domain, a.path) == (b.trust_domain, b.path)
    assert (a == b) is same and (a != b) is not same
    if same:
        assert hash(a) == hash(b) and {a: 1}[b] == 1
    assert str(b) == f"spiffe://{td2}" + "".join("/" + s for s in s2)


def test_equality_with_other_types_and_replace() -> None:
    import dataclasses

    a = SpiffeId.parse("spiffe://example.org/ns/shop/sa/checkout")
    assert a != "spiffe://example.org/ns/shop/sa/checkout" and a != a.trust_domain
    moved = dataclasses.replace(a, path="/ns/shop/sa/web")  # the canonical string follows the fields
    assert str(moved) == "spiffe://example.org/ns/shop/sa/web" and moved != a
    assert moved == SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
