"""Propose the smallest allowlist that covers what an audit log saw (pure core behind `suggest-policy`).

Run a new service with `policy-mode: audit`, then feed its audit log here: every request that was allowed
or would have been denied is covered by the suggested policy; nothing from a caller that never appeared
is allowed (default deny), and enforced denials stay uncovered (they were refused on purpose).

How paths are generalised, per caller, over a trie of the observed path segments:
* a segment that looks like a value (digits, a UUID, long hex, or a long token with digits) becomes `*`,
  and its siblings of that kind merge under it: `/api/stock/42`, `/api/stock/43` -> `/api/stock/*`;
* `many` (4) or more distinct siblings become `*` whatever they look like (the traffic shows a variable);
* a node whose subtree has `many` or more distinct leaves at different depths becomes `<prefix>/**`;
* patterns covered by another pattern of the same caller and methods are dropped.
Then rules are grouped: one rule per (methods, paths) with every caller that has exactly that shape, so
callers with the same traffic share a rule. `GET` covers `HEAD` (the policy's own rule), so HEAD is
dropped beside GET. A TCP-mode line (method `-`) asks for the whole caller: `* /**`.

The output is the compact annotation syntax of sidecar/annotations.py, with a comment per rule giving
its request count and the audit lines it covers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from .auditlog import AuditRecord
from .errors import IdentityError
from .http1 import BadRequest
from .identity import SpiffeId
from .policy import normalize_target

__all__ = ["SuggestedRule", "Suggestion", "render_annotation", "suggest"]

COVERED: Final = frozenset({"allow", "would-deny"})
_VALUE_RE: Final = re.compile(
    r"\d+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{12,}"
)
_METHOD_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Z]+")  # upper-case tokens: what a rule can name
_NAME_BAD: Final = re.compile(r"[^A-Za-z0-9._-]+")


def _looks_like_value(seg: str) -> bool:
    if not seg:
        return False  # an empty segment (trailing slash) is structure, and `*` never matches it
    if "*" in seg:
        return True  # cannot be written as a literal pattern segment
    if _VALUE_RE.fullmatch(seg):
        return True
    return len(seg) >= 16 and any(c.isdigit() for c in seg)


def _literal_ok(seg: str) -> bool:
    """A segment the policy compiler accepts as a literal: already normalised, ASCII, no wildcard."""
    if "*" in seg or not seg.isascii():
        return False
    try:
        return normalize_target(("/" + seg).encode("ascii")).path == "/" + seg
    except BadRequest:
        return False


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    end: bool = False  # a path ends here

    def merge(self, other: _Node) -> None:
        self.end = self.end or other.end
        for seg, child in other.children.items():
            mine = self.children.get(seg)
            if mine is None:
                self.children[seg] = child
            else:
                mine.merge(child)

    def leaves(self, depth: int = 0) -> list[int]:
        """Depths of the path ends below (and at) this node."""
        out = [depth] if self.end else []
        for child in self.children.values():
            out += child.leaves(depth + 1)
        return out


def _trie(paths: Iterable[str]) -> _Node:
    root = _Node()
    for path in paths:
        node = root
        for seg in path[1:].split("/"):
            node = node.children.setdefault(seg, _Node())
        node.end = True
    return root


def _patterns(node: _Node, prefix: list[str], many: int) -> list[str]:
    """Generalised path patterns for the subtree at `node` (reached by `prefix` segments)."""
    out: list[str] = []
    if node.end:
        out.append("/" + "/".join(prefix))
    if not node.children:
        return out
    if prefix and "" not in prefix and len(node.children) >= many:
        depths = node.leaves()
        if len(set(depths)) > 1 and len(depths) >= many:
            return ["/" + "/".join([*prefix, "**"])]  # a subtree: covers the node itself too
    variable = [s for s in node.children if _looks_like_value(s) or not _literal_ok(s)]
    literal = [s for s in node.children if s not in variable]
    if len(node.children) >= many and "" not in node.children:
        variable, literal = list(node.children), []
    elif len(node.children) >= many:
        variable, literal = [s for s in node.children if s], [""]  # `*` never matches an empty segment
    if variable:
        star = _Node()
        for seg in variable:
            star.merge(node.children[seg])
        out += _patterns(star, [*prefix, "*"], many)
    for seg in literal:
        out += _patterns(node.children[seg], [*prefix, seg], many)
    return out


def _covers(general: str, specific: str) -> bool:
    """Whether pattern `general` matches every path `specific` matches."""
    if general == specific:
        return True
    g, s = general[1:].split("/"), specific[1:].split("/")
    if g[-1] == "**":
        head = g[:-1]
        if s[-1] == "**":
            s = s[:-1]
        if len(s) < len(head):
            return False
        return all(a == b or (a == "*" and b != "") for a, b in zip(head, s[: len(head)], strict=True))
    if s[-1] == "**" or len(g) != len(s):
        return False
    return all(a == b or (a == "*" and b != "") for a, b in zip(g, s, strict=True))


def _minimal(patterns: Iterable[str]) -> list[str]:
    unique = sorted(set(patterns))
    return [p for p in unique if not any(q != p and _covers(q, p) for q in unique)]


@dataclass(frozen=True, slots=True)
class SuggestedRule:
    name: str
    methods: tuple[str, ...]  # ("*",) for every method
    paths: tuple[str, ...]
    callers: tuple[str, ...]
    requests: int
    lines: tuple[int, ...]  # audit lines this rule covers

    def compact(self) -> str:
        methods = ",".join(self.methods)
        return f"allow {methods} {' '.join(self.paths)} from {' '.join(self.callers)} as {self.name}"


@dataclass(frozen=True, slots=True)
class Suggestion:
    rules: tuple[SuggestedRule, ...]
    covered: int  # requests covered (allow + would-deny)
    denied: int  # enforced denials, deliberately not covered
    ignored: int  # lines of other listeners, or without a caller identity
    callers: int


def _methods(observed: set[str]) -> tuple[str, ...]:
    if "-" in observed or any(_METHOD_RE.fullmatch(m) is None for m in observed):
        return ("*",)  # a TCP connection, or a method a rule cannot name (lower case): every method
    if "GET" in observed:
        observed = observed - {"HEAD"}  # a rule naming GET covers HEAD
    return tuple(sorted(observed))


def _name(callers: Sequence[str], methods: tuple[str, ...], paths: Sequence[str], taken: set[str]) -> str:
    who = callers[0].rsplit("/", 1)[-1] if len(callers) == 1 else "shared"
    verb = "any" if methods == ("*",) else methods[0].lower()
    where = next((s for p in paths for s in p[1:].split("/") if s not in ("", "*", "**")), "root")
    base = _NAME_BAD.sub("-", f"{who}-{verb}-{where}").strip("-._")[:56] or "rule"
    if not base[0].isalnum():
        base = "r" + base
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def suggest(records: Iterable[AuditRecord], *, listener: str = "inbound", many: int = 4) -> Suggestion:
    """The smallest allowlist covering every allow / would-deny record of `listener` (module docstring)."""
    # caller -> method -> path -> lines
    seen: dict[str, dict[str, dict[str, list[int]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    covered = denied = ignored = 0
    for r in records:
        if r.listener != listener or r.peer == "-":
            ignored += 1
            continue
        if r.decision not in COVERED:
            denied += 1
            continue
        try:
            SpiffeId.parse(r.peer)
        except IdentityError:
            ignored += 1
            continue
        covered += 1
        path = "/**" if r.method == "-" or r.path == "-" else r.path
        seen[r.peer][r.method][path].append(r.line)

    # Per caller: generalise paths per method, then group methods that ended with the same patterns.
    shapes: dict[tuple[tuple[str, ...], tuple[str, ...]], list[tuple[str, list[int]]]] = defaultdict(list)
    for caller, by_method in seen.items():
        if "-" in by_method:  # a TCP-mode connection: the whole caller
            every = sorted(n for by_path in by_method.values() for ls in by_path.values() for n in ls)
            shapes[(("*",), ("/**",))].append((caller, every))
            continue
        by_patterns: dict[tuple[str, ...], set[str]] = defaultdict(set)
        for m, by_path in by_method.items():
            by_patterns[tuple(_minimal(_patterns(_trie(by_path), [], many)))].add(m)
        for pats, verbs in by_patterns.items():
            shapes[(_methods(verbs), pats)].append(
                (caller, sorted(n for m in verbs for ls in by_method[m].values() for n in ls))
            )

    taken: set[str] = set()
    rules: list[SuggestedRule] = []
    for (methods, paths), members in sorted(shapes.items(), key=lambda kv: (-sum(len(m[1]) for m in kv[1]), kv[0])):
        callers = tuple(sorted(c for c, _ in members))
        covers = tuple(sorted(n for _, ls in members for n in ls))
        name = _name(callers, methods, paths, taken)
        rules.append(SuggestedRule(name, methods, paths, callers, len(covers), covers))
    return Suggestion(tuple(rules), covered, denied, ignored, len(seen))


def _ranges(lines: Sequence[int], limit: int = 8) -> str:
    spans: list[str] = []
    start = prev = None
    for n in lines:
        if start is None:
            start = prev = n
        elif prev is not None and n == prev + 1:
            prev = n
        else:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = n
    if start is not None:
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
    shown = ", ".join(spans[:limit])
    return shown + (f", ... ({len(spans) - limit} more spans)" if len(spans) > limit else "")


def render_annotation(s: Suggestion, source: str, key: str = "spiffe-sidecar.io/inbound-policy") -> str:
    """The annotation, ready to paste under `metadata.annotations` (compact form, comments per rule)."""
    out = [f"{key}: |"]
    out.append(
        f"  # suggested by spiffe-sidecar suggest-policy from {source}: {s.covered} requests "
        f"(allowed or would-deny) from {s.callers} caller{'s' if s.callers != 1 else ''}"
    )
    if s.denied:
        out.append(f"  # not covered: {s.denied} enforced denials (refused on purpose; review before allowing)")
    if not s.rules:
        out.append("  # nothing to allow: every request stays denied")
        out.append("  rules: []")  # comments alone are no policy; the YAML form says "no rules"
    for rule in s.rules:
        out.append(f"  # {rule.requests} request{'s' if rule.requests != 1 else ''}, lines {_ranges(rule.lines)}")
        out.append(f"  {rule.compact()}")
    return "\n".join(out) + "\n"
