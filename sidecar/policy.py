"""Per-path caller policy: request-target normalisation, compilation and evaluation (pure).

One model for the YAML config file and the pod annotations (the webhook compiles with the same code).

Semantics (DESIGN.md "Policy semantics"; Istio's DENY-before-ALLOW order):

* A rule is paths x methods x callers with `action: allow|deny`, a unique `name` and `mode: enforce|audit`.
  Any matching *enforced* deny wins; else any matching allow; else `default-deny`. When several rules
  of the deciding kind match, the first in the file names the decision.
* `mode: audit` on a deny rule: a match is reported as would-deny and not enforced (an allow that also
  matches forwards the request; without one, the default deny still applies). `mode: audit` on an allow
  rule is a compile error: an allow cannot break traffic, and a dry-run allow must not grant access.
  `mode: audit` on the whole policy: every deny (rule or default) is reported and the request forwarded.
  Audit never changes *what* is forwarded (`Target.forward`), only *whether*.
* Paths (matched on the normalised path; query strings never take part): exact (`/healthz`); `*` is one
  whole non-empty segment anywhere (`/api/stock/*` matches `/api/stock/42`, not `/api/stock/` nor
  `/api/stock/4/2`); `**` as the last segment is a subtree *including its root*: `/admin/**` matches
  `/admin`, `/admin/` and everything below (a deny rule must not miss `/admin` itself), not `/administrator`.
  `/**` (or `**`, or no `paths` key) is every path. Paths are case-sensitive; a trailing slash matters.
* Methods are exact, case-sensitive tokens (RFC 9110 §9.1), written uppercase, except that a rule naming
  `GET` also covers `HEAD`: HEAD is GET without a body (RFC 9110 §9.3.2) and most frameworks route it to
  the GET handler, so a deny on GET must not be walked around with HEAD. `*` (or no `methods` key) is every
  method.
* Callers are `CallerPattern`s (sidecar/identity.py); `*` is any authenticated peer. Required.
* gRPC methods are paths (`/package.Service/Method`, gRPC PROTOCOL-HTTP2.md "Path"), so path rules apply to
  them unchanged; `grpc: [inventory.v1.Inventory/GetStock, inventory.v1.Inventory/*]` is the readable form:
  it compiles to those paths and method POST (every gRPC call is a POST), and takes no `paths` or `methods`.
* TCP mode (`authorize_connection`) uses only the rules that apply to every path and method.

Evaluation structure (O(path segments), not O(rules)): the path patterns are compiled into a segment trie;
each node has `children` (exact segment -> node), `star` (the `*` child), and two buckets of rules whose
pattern ends there: `exact` (pattern ends at this node) and `subtree` (`**` here). Walking the request's
segments collects the buckets on the way (several nodes can be active when `*` and literals overlap;
never more than the number of distinct patterns). A bucket indexes its rules by kind (enforced deny,
audit deny, allow), then by method (dict + an any-method entry), then by caller: exact IDs in a dict,
`*` as one number, the other patterns in a list scanned in rule order and cut off at the best match so
far. Each lookup yields the lowest matching rule index; the evaluation keeps the minimum per kind.
Decisions of rules are built once at compile time; only `default-deny` formats a reason per request.

Request targets (`normalize_target`, RFC 3986 §6.2.2, RFC 9112 §3.2): origin-form only; percent-encoded
unreserved characters (ALPHA DIGIT - . _ ~) are decoded, other %XX kept with uppercase hex; `.`/`..`
resolved (§5.2.4) and `//` merged; a 400 for anything ambiguous: %2F, %5C, raw `\\`, NUL, control
characters (raw or encoded in the path), %3B (an encoded `;`: servers that decode before stripping path
parameters would route `..%3B/` as `..`), invalid %-sequences, non-ASCII bytes, `#`, `..` above the root
(refused rather than clamped: a client that sends it is broken or probing), and dot segments with path
parameters (`..;`, which some Java servers resolve as `..`). Path parameters (`;...` in a segment) are
forwarded as sent but do not take part in matching: `/admin;jsessionid=1/users` is matched as
`/admin/users`, as Tomcat and Spring route it, so a deny on `/admin/**` cannot be walked around with them.
"""

from __future__ import annotations

import bisect
import enum
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, NamedTuple

from .errors import IdentityError
from .hints import did_you_mean
from .http1 import BadRequest
from .identity import CallerPattern, PatternKind, SpiffeId
from .problems import Problems
from .values import Invalid, one_of

__all__ = [
    "AUDIT",
    "DEFAULT_DENY",
    "ENFORCE",
    "Action",
    "BadRequest",
    "Decision",
    "JwtRequirement",
    "Mode",
    "Policy",
    "Protocol",
    "RequestAttrs",
    "Rule",
    "Target",
    "Verdict",
    "authorize",
    "authorize_connection",
    "check_jwt",
    "compile_policy",
    "explain",
    "normalize_target",
]

class Action(enum.StrEnum):
    """What a rule does when it matches."""

    ALLOW = "allow"
    DENY = "deny"


class Mode(enum.StrEnum):
    """Whether a deny is enforced or only reported (a dry run)."""

    ENFORCE = "enforce"
    AUDIT = "audit"


class Verdict(enum.StrEnum):
    """The outcome of one decision. These values, with `Mode`'s, are the words the audit log, the
    metrics and `explain` print: no other place spells a decision."""

    ALLOW = "allow"
    DENY = "deny"
    WOULD_DENY = "would-deny"  # a deny in audit mode: reported and forwarded


class Protocol(enum.StrEnum):
    """The protocol a request arrived with (a request attribute rules may come to depend on)."""

    HTTP1 = "http/1.1"
    H2 = "h2"
    GRPC = "grpc"
    TCP = "tcp"


ENFORCE: Final = Mode.ENFORCE
AUDIT: Final = Mode.AUDIT
DEFAULT_DENY: Final = "default-deny"


class RequestAttrs(NamedTuple):
    """What a request is decided on: the authenticated peer (the X.509-SVID's SPIFFE ID), the method,
    the normalised path (`Target.path`), the authority, the protocol, and the subject of a validated
    JWT-SVID when the request carried one."""

    peer: SpiffeId
    method: str
    path: str
    authority: str = ""
    protocol: Protocol = Protocol.HTTP1
    jwt_subject: SpiffeId | None = None


@dataclass(frozen=True, slots=True)
class JwtRequirement:
    """A step-up rule's second proof: a JWT-SVID for `audience` (JWT-SVID §3), whose subject matches one of
    `subjects`, and, when `bound`, is the mTLS peer itself (a token for the connection's own identity).
    `enforced` is False in a policy in audit mode (a failed check is then a would-deny)."""

    audience: str
    subjects: tuple[CallerPattern, ...]
    bound: bool
    enforced: bool = True

    def describe(self) -> str:
        subjects = ",".join(p.text for p in self.subjects)
        return f"jwt aud={self.audience} sub={subjects}{'' if self.bound else ' unbound'}"


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy verdict: the `verdict`, the deciding `rule` (a rule name or `default-deny`), the
    `reason` (for the audit log, never sent to the peer) and the `mode` the deciding rule ran in.
    `jwt`: the step-up the data plane checks before it forwards (`check_jwt`), when a rule requires one."""

    verdict: Verdict
    rule: str
    reason: str
    mode: Mode
    jwt: JwtRequirement | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    @property
    def enforced(self) -> bool:
        """False when the deciding rule or the whole policy is in audit mode."""
        return self.mode is Mode.ENFORCE

    @property
    def forward(self) -> bool:
        """Whether the request (or connection) goes to the app."""
        return self.verdict is not Verdict.DENY


# ---------------------------------------------------------------------------------------------------------
# Request-target normalisation


@dataclass(frozen=True, slots=True)
class Target:
    """A normalised origin-form request target: what policy matches on and what the app receives."""

    path: str  # what the policy matches: the normalised path with any `;params` removed from segments
    query: str  # without '?', "" when absent
    forward: bytes  # the normalised path as sent (params kept) + ('?' + query if query)


# Raw bytes refused anywhere in the path: controls, SP, DEL, non-ASCII, '\' and '#'.
_BAD_PATH: Final = re.compile(rb"[^\x21-\x7e]|[\\#]")
_BAD_QUERY: Final = re.compile(rb"[^\x21-\x7e]|#")
# In the query, %-sequences must be well-formed and not NUL; it is otherwise forwarded untouched.
_BAD_QUERY_PCT: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})|%00")
_HEX: Final = frozenset("0123456789ABCDEFabcdef")
_UNRESERVED: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _bad_byte_reason(where: str, b: int) -> str:
    if b == 0:
        return f"NUL in the request {where}"
    if b >= 0x80:
        return f"non-ASCII byte in the request {where}"
    if b == 0x20:
        return f"space in the request {where}"
    if b == 0x5C:
        return "backslash in the request path (ambiguous: some servers read it as '/')"
    if b == 0x23:
        return "fragment ('#') in the request target (RFC 9112 §3.2)"
    return f"control character in the request {where}"


def _decode_unreserved(path: str) -> str:
    parts = path.split("%")
    out = [parts[0]]
    high = False
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise BadRequest("invalid percent-encoding in the request path")
        b = int(part[:2], 16)
        if b in _UNRESERVED:
            out.append(chr(b))
        elif b in (0x2F, 0x5C):
            raise BadRequest("encoded '/' or '\\' in the request path is ambiguous")
        elif b == 0x3B:
            # Servers that decode, then strip `;params`, then normalise (Tomcat, Spring) would read
            # `/api/..%3B/admin` as `/admin`: as ambiguous as an encoded '/'.
            raise BadRequest("encoded ';' in the request path is ambiguous (path parameter delimiter)")
        elif b == 0:
            raise BadRequest("encoded NUL in the request path")
        elif b < 0x20 or b == 0x7F:
            raise BadRequest("encoded control character in the request path")
        else:
            high = high or b >= 0x80
            out.append("%" + part[:2].upper())
        out.append(part[2:])
    decoded = "".join(out)
    if high:
        # Encoded non-ASCII must be valid UTF-8: an overlong form such as %C0%AE ('.') would let a lenient
        # decoder in the app see a path the policy never saw. Python's strict decoder refuses overlongs.
        try:
            urllib.parse.unquote_to_bytes(decoded).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("percent-encoded bytes in the request path are not valid UTF-8") from None
    return decoded


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 plus `//` merging; `..` above the root is a 400."""
    out: list[str] = []
    segs = path[1:].split("/")
    last = len(segs) - 1
    trailing = False
    for i, seg in enumerate(segs):
        if seg == "" or seg == ".":
            trailing = i == last
        elif seg == "..":
            if not out:
                raise BadRequest("'..' above the root of the request path")
            out.pop()
            trailing = i == last
        else:
            if seg[0] == "." and seg.split(";", 1)[0] in (".", ".."):
                raise BadRequest("dot segment with path parameters ('..;') is ambiguous")
            out.append(seg)
            trailing = False
    if not out:
        return "/"
    return "/" + "/".join(out) + ("/" if trailing else "")


def normalize_target(raw: bytes) -> Target:
    """Normalise a raw request target or raise `BadRequest` (see the module docstring). Idempotent."""
    if not raw or raw[0] != 0x2F:
        raise BadRequest("request target is not in origin form (must start with '/')")
    q = raw.find(b"?")
    path_b = raw if q < 0 else raw[:q]
    query_b = b"" if q < 0 else raw[q + 1 :]
    bad = _BAD_PATH.search(path_b)
    if bad is not None:
        raise BadRequest(_bad_byte_reason("path", path_b[bad.start()]))
    if query_b:
        bad = _BAD_QUERY.search(query_b)
        if bad is not None:
            raise BadRequest(_bad_byte_reason("query", query_b[bad.start()]))
        if b"%" in query_b and _BAD_QUERY_PCT.search(query_b) is not None:
            raise BadRequest("invalid percent-encoding or NUL in the request query")
    path = path_b.decode("ascii")
    query = query_b.decode("ascii")
    if "%" not in path and "//" not in path and "/." not in path:
        # Fast path: already clean (no encoding, no dot segment, no empty segment).
        forward = raw if q < 0 or query else path_b
        return Target(_strip_params(path) if ";" in path else path, query, forward)
    if "%" in path:
        path = _decode_unreserved(path)
    path = _remove_dot_segments(path)
    forward = (path + "?" + query if query else path).encode("ascii")
    return Target(_strip_params(path) if ";" in path else path, query, forward)


def _strip_params(path: str) -> str:
    """The path without `;params` in its segments, empty segments merged: what Java servers route on."""
    segs = [seg.partition(";")[0] for seg in path[1:].split("/")]
    kept = [seg for seg in segs if seg]
    return "/" + "/".join(kept) + ("/" if kept and not segs[-1] else "")


# ---------------------------------------------------------------------------------------------------------
# Compiled policy


_NONE: Final = 1 << 62  # "no matching rule": larger than any rule index


class _Callers:
    """Rules of one kind, one bucket and one method, indexed by caller."""

    __slots__ = ("any", "exact", "patterns")

    def __init__(self) -> None:
        self.any = _NONE
        self.exact: dict[SpiffeId, int] = {}
        self.patterns: list[tuple[int, CallerPattern]] = []

    def add(self, index: int, pattern: CallerPattern) -> None:
        if pattern.kind is PatternKind.ANY:
            self.any = min(self.any, index)
        elif pattern.kind is PatternKind.EXACT:
            assert pattern.exact is not None
            self.exact[pattern.exact] = min(self.exact.get(pattern.exact, _NONE), index)
        else:
            bisect.insort(self.patterns, (index, pattern), key=lambda p: p[0])

    def best(self, peer: SpiffeId, limit: int) -> int:
        best = self.any if self.any < limit else limit
        e = self.exact.get(peer, _NONE)
        if e < best:
            best = e
        for index, pattern in self.patterns:
            if index >= best:
                break
            if pattern.matches(peer):
                return index
        return best


class _Kind:
    """Rules of one kind in one bucket, indexed by method."""

    __slots__ = ("any_method", "by_method")

    def __init__(self) -> None:
        self.by_method: dict[str, _Callers] = {}
        self.any_method: _Callers | None = None

    def add(self, index: int, methods: frozenset[str] | None, callers: tuple[CallerPattern, ...]) -> None:
        targets: list[_Callers] = []
        if methods is None:
            if self.any_method is None:
                self.any_method = _Callers()
            targets.append(self.any_method)
        else:
            # GET covers HEAD (module docstring): index the rule under both.
            for m in methods | {"HEAD"} if "GET" in methods else methods:
                targets.append(self.by_method.setdefault(m, _Callers()))
        for c in targets:
            for pattern in callers:
                c.add(index, pattern)

    def best(self, method: str | None, peer: SpiffeId, limit: int) -> int:
        if method is not None:
            c = self.by_method.get(method)
            if c is not None:
                limit = c.best(peer, limit)
        if self.any_method is not None:
            limit = self.any_method.best(peer, limit)
        return limit


class _Bucket:
    """Rules whose path pattern ends at one trie node (exactly, or with `**`)."""

    __slots__ = ("allow", "hard", "soft", "stepup")

    def __init__(self) -> None:
        self.hard: _Kind | None = None  # enforced deny rules
        self.soft: _Kind | None = None  # audit-mode deny rules
        self.allow: _Kind | None = None
        self.stepup: _Kind | None = None  # allow rules that require a JWT-SVID

    def add(self, rule: Rule) -> None:
        if rule.action == "allow" and rule.jwt is not None:
            kind = self.stepup = self.stepup or _Kind()
        elif rule.action == "allow":
            kind = self.allow = self.allow or _Kind()
        elif rule.mode == AUDIT:
            kind = self.soft = self.soft or _Kind()
        else:
            kind = self.hard = self.hard or _Kind()
        kind.add(rule.index, rule.methods, rule.callers)


class _Best:
    """The lowest matching rule index per kind, gathered over the buckets a request reaches."""

    __slots__ = ("allow", "hard", "soft", "stepup")

    def __init__(self) -> None:
        self.hard = self.allow = self.soft = self.stepup = _NONE

    def take(self, b: _Bucket, method: str | None, peer: SpiffeId) -> None:
        if b.hard is not None:
            self.hard = b.hard.best(method, peer, self.hard)
        if b.allow is not None:
            self.allow = b.allow.best(method, peer, self.allow)
        if b.soft is not None:
            self.soft = b.soft.best(method, peer, self.soft)
        if b.stepup is not None:
            self.stepup = b.stepup.best(method, peer, self.stepup)

    def decision(self, policy: Policy) -> Decision | None:
        """Enforced deny; else a step-up allow (its JWT requirement holds even when a plain allow rule
        matches too: a rule that asks for a second proof is never walked around by a broader one); else
        allow; an allow is turned into would-deny by a matching audit deny (keeping any requirement).
        None: no rule."""
        if self.hard != _NONE:
            return policy._decisions[self.hard]
        if self.stepup != _NONE:
            d = policy._decisions[self.stepup]
            if self.soft != _NONE:
                return replace(policy._decisions[self.soft], jwt=d.jwt)
            return d
        if self.allow != _NONE:
            return policy._decisions[self.soft if self.soft != _NONE else self.allow]
        return None


class _Node:
    __slots__ = ("children", "exact", "star", "subtree")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.exact: _Bucket | None = None
        self.subtree: _Bucket | None = None


@dataclass(frozen=True, slots=True)
class PathPattern:
    """`segments` are literal segments or `*`; `subtree` when the pattern ends in `**`."""

    text: str
    segments: tuple[str, ...]
    subtree: bool

    def matches(self, path: str) -> bool:
        """Reference (non-trie) matcher on a normalised path; used by `check` and tests."""
        segs = path[1:].split("/")
        n = len(self.segments)
        if self.subtree:
            if len(segs) < n:
                return False
        elif len(segs) != n:
            return False
        return all(w == h or (w == "*" and h != "") for w, h in zip(self.segments, segs, strict=False))


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    index: int
    action: Action
    mode: Mode
    methods: frozenset[str] | None  # None: every method
    paths: tuple[PathPattern, ...]
    callers: tuple[CallerPattern, ...]
    decision: Decision = field(repr=False, compare=False)
    jwt: JwtRequirement | None = None  # an allow rule that also requires a JWT-SVID (step-up)
    grpc: tuple[str, ...] = ()  # the `grpc:` entries the paths were compiled from (shown as written)

    @property
    def connection_level(self) -> bool:
        """Applies to every path and method: the only kind `authorize_connection` consults (a step-up
        rule never is: a TCP connection carries no token)."""
        return self.jwt is None and self.methods is None and any(p.subtree and not p.segments for p in self.paths)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "action": self.action,
            "mode": self.mode,
            "methods": ["*"] if self.methods is None else sorted(self.methods),
            "paths": [p.text for p in self.paths],
            "callers": [c.text for c in self.callers],
        }
        if self.jwt is not None:
            out["jwt"] = {"audience": self.jwt.audience, "subjects": [p.text for p in self.jwt.subjects],
                          "bind": self.jwt.bound}  # fmt: skip
        if self.grpc:
            out["grpc"] = list(self.grpc)
        return out

    def describe(self) -> str:
        methods = "*" if self.methods is None else ",".join(sorted(self.methods))
        paths = " ".join(p.text for p in self.paths)
        if self.grpc:
            methods, paths = "grpc", " ".join(self.grpc)
        callers = " ".join(c.text for c in self.callers)
        audit = " (audit)" if self.mode == AUDIT else ""
        jwt = "" if self.jwt is None else f" with {self.jwt.describe()}"
        return f"{self.name}: {self.action}{audit} {methods} {paths} from {callers}{jwt}"


@dataclass(frozen=True, slots=True)
class Policy:
    """A compiled policy. Immutable after `compile_policy`; swap whole policies to reload."""

    source: str
    mode: Mode
    rules: tuple[Rule, ...]
    _root: _Node = field(repr=False, compare=False)
    _decisions: tuple[Decision, ...] = field(repr=False, compare=False)

    @property
    def path_specific_rules(self) -> tuple[str, ...]:
        """Names of rules a TCP listener cannot enforce (they name paths or methods)."""
        return tuple(r.name for r in self.rules if not r.connection_level)

    def describe(self) -> list[str]:
        """Readable lines for `spiffe-sidecar check`."""
        lines = [f"policy {self.source}: mode {self.mode}, {len(self.rules)} rule(s), default deny"]
        lines += [f"  {r.index + 1}. {r.describe()}" for r in self.rules]
        if not self.rules:
            lines.append("  (no rules: every request is denied)")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the admin `/config` endpoint."""
        return {
            "source": self.source,
            "mode": self.mode,
            "default": "deny",
            "rules": [r.to_dict() for r in self.rules],
        }


def _default_deny(policy: Policy, peer: SpiffeId, what: str) -> Decision:
    reason = f"caller {peer} matches no allow rule for {what}"
    if policy.mode is Mode.ENFORCE:
        return Decision(Verdict.DENY, DEFAULT_DENY, reason, Mode.ENFORCE)
    return Decision(Verdict.WOULD_DENY, DEFAULT_DENY, reason + " (audit mode: forwarded)", Mode.AUDIT)


def authorize(policy: Policy, attrs: RequestAttrs) -> Decision:
    """Decide one request. `attrs.path` MUST come from `normalize_target` (`Target.path`)."""
    peer, method, path = attrs.peer, attrs.method, attrs.path
    best = _Best()
    nodes: list[_Node] = [policy._root]
    for seg in path[1:].split("/"):
        nxt: list[_Node] = []
        for node in nodes:
            b = node.subtree
            if b is not None:
                best.take(b, method, peer)
            child = node.children.get(seg)
            if child is not None:
                nxt.append(child)
            if node.star is not None and seg:
                nxt.append(node.star)
        nodes = nxt
        if not nodes:
            break
    for node in nodes:
        for b in (node.subtree, node.exact):
            if b is not None:
                best.take(b, method, peer)
    return best.decision(policy) or _default_deny(policy, peer, f"{method} {path}")


def authorize_connection(policy: Policy, peer: SpiffeId) -> Decision:
    """Decide a TCP-mode connection on the caller alone, from the rules for every path and method."""
    best = _Best()
    b = policy._root.subtree
    if b is not None:
        best.take(b, None, peer)
    return best.decision(policy) or _default_deny(policy, peer, "a connection")


def check_jwt(decision: Decision, peer: SpiffeId, subject: SpiffeId | None, problem: str = "") -> tuple[Decision, bool]:
    """The final word on a step-up decision once the request's token was validated for the requirement's
    audience: `subject` is the validated JWT-SVID's subject, or None when there was no valid token
    (`problem` says why: missing, expired, wrong audience...). Returns the decision and whether a refusal
    is a 401 challenge (no valid token: RFC 6750 §3.1 invalid_token) rather than a 403 (a valid token whose
    subject this rule does not accept). A decision without a requirement comes back unchanged; so does
    one whose token satisfies it. In audit mode a failure is a would-deny (forwarded), as any deny is."""
    req = decision.jwt
    if req is None:
        return decision, False
    if subject is None:
        failed, challenge = f"no valid JWT-SVID for audience {req.audience!r}: {problem or 'missing'}", True
    elif req.bound and subject != peer:
        failed, challenge = f"the JWT-SVID's subject {subject} is not the mTLS peer (bound)", False
    elif not any(p.matches(subject) for p in req.subjects):
        failed, challenge = f"the JWT-SVID's subject {subject} matches none of its subjects", False
    else:
        return decision, False
    reason = f"rule '{decision.rule}' requires a JWT-SVID; {failed}"
    if not req.enforced:
        return Decision(Verdict.WOULD_DENY, decision.rule, reason + " (audit mode: forwarded)", Mode.AUDIT), False
    return Decision(Verdict.DENY, decision.rule, reason, Mode.ENFORCE), challenge


def explain(policy: Policy, peer: SpiffeId, method: str, path: str) -> Decision:
    """`authorize` on a raw path (normalised first; raises `BadRequest` where the edge would send 400)."""
    try:
        raw = path.encode("ascii")
    except UnicodeEncodeError:
        raise BadRequest("non-ASCII byte in the request path") from None
    return authorize(policy, RequestAttrs(peer, method, normalize_target(raw).path))


# ---------------------------------------------------------------------------------------------------------
# Compilation


_RULE_KEYS: Final = frozenset({"name", "action", "mode", "methods", "paths", "callers", "jwt", "grpc"})
# protobuf full names (package.Service) and method names: identifiers joined by dots (protobuf language spec).
_GRPC_SERVICE_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_GRPC_METHOD_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\*")
_JWT_KEYS: Final = frozenset({"audience", "subjects", "bind"})
_POLICY_KEYS: Final = frozenset({"mode", "rules"})
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_METHOD_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _parse_path_pattern(text: str) -> PathPattern | str:
    """A pattern, or the reason it is not one."""
    if text == "**":
        text = "/**"
    if not text.startswith("/"):
        return "a path pattern starts with '/' (or is '**' for every path)"
    if "?" in text or "#" in text:
        return "a path pattern has no query or fragment (query strings do not take part in matching)"
    segs = text[1:].split("/")
    subtree = segs[-1] == "**"
    if subtree:
        segs = segs[:-1]
        if "" in segs:
            return "empty segment in a path pattern"
    for seg in segs:
        if "**" in seg:
            return "'**' is only allowed as the whole last segment"
        if "*" in seg and seg != "*":
            return "a wildcard must be a whole segment ('*' or a final '**'), not part of one"
    literal = "/" + "/".join(segs)
    try:
        norm = normalize_target(literal.encode("ascii")).path if literal.isascii() else None
    except BadRequest as e:
        return f"not a valid request path: {e.reason}"
    if norm is None:
        return "path patterns must be ASCII (percent-encode other characters)"
    if norm != literal:
        shown = norm if not subtree else (norm.rstrip("/") + "/**")
        return f"path pattern is not normalised: requests are matched on {shown!r}"
    return PathPattern(text, tuple(segs), subtree)


def _parse_grpc(text: str) -> PathPattern | str:
    """`package.Service/Method` or `package.Service/*` (a leading '/' is accepted) as the path pattern of its
    calls, or the reason it is not one."""
    service, sep, method = text.removeprefix("/").partition("/")
    if not sep or _GRPC_SERVICE_RE.fullmatch(service) is None or _GRPC_METHOD_RE.fullmatch(method) is None:
        return (f"{text!r} is not a gRPC method: write package.Service/Method or package.Service/* "
                "(e.g. inventory.v1.Inventory/GetStock)")  # fmt: skip
    return PathPattern(f"/{service}/{method}", (service, method), False)


def _string_list(value: Any, key: str, where: str, problems: Problems, *, allow_star: bool = True) -> list[str] | None:
    if not isinstance(value, list):
        problems.add(where, f"'{key}' must be a list of strings")
        return None
    if not value:
        problems.add(where, f"'{key}' cannot be empty (omit it or write ['*'])")
        return None
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            problems.add(f"{where}[{i}]", "must be a string")
            continue
        if item in out:
            problems.add(f"{where}[{i}]", f"duplicate entry {item!r}")
            continue
        out.append(item)
    if allow_star and "*" in out and len(value) > 1:
        problems.add(where, "'*' must be the only entry")
        return None
    return out


def _rule_decision(name: str, action: str, mode: Mode, policy_mode: Mode) -> Decision:
    audit = mode == AUDIT or policy_mode == AUDIT
    if action == Action.ALLOW:
        return Decision(Verdict.ALLOW, name, f"allowed by rule '{name}'", Mode.AUDIT if audit else Mode.ENFORCE)
    if audit:
        return Decision(Verdict.WOULD_DENY, name, f"would be denied by rule '{name}' (audit mode: forwarded)", AUDIT)
    return Decision(Verdict.DENY, name, f"denied by rule '{name}'", ENFORCE)


def compile_policy(data: Any, source: str, lines: Mapping[str, int] | None = None, *, prefix: str = "") -> Policy:
    """Compile a parsed YAML mapping; collect every problem and raise `ConfigError` if there are any.

    `lines` maps field paths (`rules[1].paths[0]`, with `prefix` prepended when given, e.g.
    `inbound.policy.rules[1]`) to line numbers; the nearest enclosing field's line is used.
    """
    problems = Problems(source, lines, prefix=prefix)
    if not isinstance(data, Mapping):
        problems.add("", "a policy is a mapping with 'rules' (and optionally 'mode')")
        raise problems.error()
    for key in data:
        if key not in _POLICY_KEYS:
            hint = did_you_mean(key, _POLICY_KEYS)
            problems.add(str(key), f"unknown key {key!r}{hint} (expected one of: mode, rules)")
    policy_mode = one_of(data.get("mode", ENFORCE), Mode)
    if isinstance(policy_mode, Invalid):
        problems.add("mode", "must be 'enforce' or 'audit'" + did_you_mean(policy_mode.got, (ENFORCE, AUDIT)))
        policy_mode = ENFORCE
    raw_rules = data.get("rules", [])
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, list):
        problems.add("rules", "must be a list of rules")
        raw_rules = []
    rules: list[Rule] = []
    names: set[str] = set()
    for i, raw in enumerate(raw_rules):
        rule = _compile_rule(raw, f"rules[{i}]", len(rules), policy_mode, names, problems)
        if rule is not None:
            rules.append(rule)
    if problems:
        raise problems.error()
    root = _Node()
    for rule in rules:
        for pattern in rule.paths:
            node = root
            for seg in pattern.segments:
                if seg == "*":
                    if node.star is None:
                        node.star = _Node()
                    node = node.star
                else:
                    node = node.children.setdefault(seg, _Node())
            if pattern.subtree:
                node.subtree = node.subtree or _Bucket()
                node.subtree.add(rule)
            else:
                node.exact = node.exact or _Bucket()
                node.exact.add(rule)
    return Policy(source, policy_mode, tuple(rules), root, tuple(r.decision for r in rules))


def _compile_rule(
    raw: Any, where: str, index: int, policy_mode: Mode, names: set[str], problems: Problems
) -> Rule | None:
    before = len(problems)
    if not isinstance(raw, Mapping):
        problems.add(where, "a rule is a mapping with name, action, callers (and paths, methods, mode)")
        return None
    for key in raw:
        if key not in _RULE_KEYS:
            problems.add(
                f"{where}.{key}",
                f"unknown key {key!r}{did_you_mean(key, _RULE_KEYS)} "
                f"(expected one of: {', '.join(sorted(_RULE_KEYS))})",
            )
    name = raw.get("name")
    if name is None:
        problems.add(where, "'name' is required")
    elif not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        problems.add(f"{where}.name", "must be 1-63 letters, digits, '.', '_' or '-', starting alphanumeric")
    elif name == DEFAULT_DENY:
        problems.add(f"{where}.name", f"'{DEFAULT_DENY}' is reserved")
    elif name in names:
        problems.add(f"{where}.name", f"duplicate rule name {name!r}")
    else:
        names.add(name)
    action = raw.get("action")
    if action is None:
        problems.add(where, "'action' is required (allow or deny)")
    elif action not in ("allow", "deny"):
        problems.add(f"{where}.action", "must be 'allow' or 'deny'" + did_you_mean(action, ("allow", "deny")))
    mode = one_of(raw.get("mode", ENFORCE), Mode)
    if isinstance(mode, Invalid):
        problems.add(f"{where}.mode", "must be 'enforce' or 'audit'" + did_you_mean(mode.got, (ENFORCE, AUDIT)))
    elif mode == AUDIT and action == "allow":
        problems.add(
            f"{where}.mode",
            "'audit' applies to deny rules only (a dry-run allow must not grant access); "
            "to dry-run the whole policy set 'mode: audit' at the top",
        )

    methods: frozenset[str] | None = None
    if "methods" in raw:
        items = _string_list(raw["methods"], "methods", f"{where}.methods", problems)
        if items is not None and items != ["*"]:
            for j, m in enumerate(items):
                if _METHOD_RE.fullmatch(m) is None:
                    problems.add(f"{where}.methods[{j}]", f"{m!r} is not an HTTP method token")
                elif m != m.upper():
                    problems.add(
                        f"{where}.methods[{j}]",
                        f"methods are case-sensitive (RFC 9110 §9.1): write {m.upper()!r}",
                    )
            methods = frozenset(items)

    paths: list[PathPattern] = [PathPattern("/**", (), True)]
    grpc: list[str] = []
    if "grpc" in raw:
        for key in ("paths", "methods"):
            if key in raw:
                problems.add(f"{where}.{key}", f"a rule with 'grpc' takes no '{key}' (gRPC calls are POSTs to "
                             "/package.Service/Method): write a second rule for other paths")  # fmt: skip
        methods = frozenset({"POST"})
        paths = []
        items = _string_list(raw["grpc"], "grpc", f"{where}.grpc", problems, allow_star=False)
        for j, text in enumerate(items or ()):
            parsed = _parse_grpc(text)
            if isinstance(parsed, str):
                problems.add(f"{where}.grpc[{j}]", parsed)
            else:
                paths.append(parsed)
                grpc.append(parsed.text[1:])
    elif "paths" in raw:
        paths = []
        items = _string_list(raw["paths"], "paths", f"{where}.paths", problems, allow_star=False)
        for j, text in enumerate(items or ()):
            parsed = _parse_path_pattern(text)
            if isinstance(parsed, str):
                problems.add(f"{where}.paths[{j}]", parsed)
            else:
                paths.append(parsed)

    callers: list[CallerPattern] = []
    if "callers" not in raw:
        problems.add(where, "'callers' is required (a list of SPIFFE ID patterns, or ['*'])")
    else:
        items = _string_list(raw["callers"], "callers", f"{where}.callers", problems)
        for j, text in enumerate(items or ()):
            try:
                callers.append(CallerPattern.parse(text))
            except IdentityError as e:
                problems.add(f"{where}.callers[{j}]", f"{text!r}: {e.reason}")

    jwt: JwtRequirement | None = None
    if "jwt" in raw:
        if action == "deny":
            problems.add(f"{where}.jwt", "only an allow rule can require a JWT-SVID (step-up)")
        else:
            jwt = _jwt_requirement(raw["jwt"], f"{where}.jwt", problems)

    if len(problems) != before:
        return None
    assert isinstance(name, str) and isinstance(action, str) and isinstance(mode, Mode)
    decision = _rule_decision(name, action, mode, policy_mode)
    if jwt is not None:
        jwt = replace(jwt, enforced=policy_mode is Mode.ENFORCE)
        decision = replace(decision, reason=f"{decision.reason} with a JWT-SVID", jwt=jwt)
    return Rule(
        name,
        index,
        Action(action),
        mode,
        methods,
        tuple(paths),
        tuple(callers),
        decision,
        jwt,
        tuple(grpc),
    )


def _jwt_requirement(raw: Any, where: str, problems: Problems) -> JwtRequirement | None:
    """`jwt: {audience: <aud>, subjects: [<pattern>...], bind: true|false}` (subjects default ['*'], any
    workload of a trust domain we hold JWT bundles for; bind defaults to true)."""
    if not isinstance(raw, Mapping):
        problems.add(where, "'jwt' is a mapping: {audience: <audience>, subjects: [...], bind: true|false}")
        return None
    before = len(problems)
    for key in raw:
        if key not in _JWT_KEYS:
            problems.add(f"{where}.{key}", f"unknown key {key!r}{did_you_mean(key, _JWT_KEYS)} "
                         f"(expected one of: {', '.join(sorted(_JWT_KEYS))})")  # fmt: skip
    audience = raw.get("audience")
    if not isinstance(audience, str) or not audience.strip() or audience != audience.strip():
        problems.add(f"{where}.audience", "required: the audience the token must carry (JWT-SVID §3, 'aud')")
    subjects: list[CallerPattern] = []
    items = _string_list(raw.get("subjects", ["*"]), "subjects", f"{where}.subjects", problems)
    for j, text in enumerate(items or ()):
        try:
            subjects.append(CallerPattern.parse(text))
        except IdentityError as e:
            problems.add(f"{where}.subjects[{j}]", f"{text!r}: {e.reason}")
    bound = raw.get("bind", True)
    if not isinstance(bound, bool):
        problems.add(f"{where}.bind", "must be true (the token's subject is the mTLS peer) or false")
    if len(problems) != before:
        return None
    assert isinstance(audience, str) and isinstance(bound, bool)
    return JwtRequirement(audience, tuple(subjects), bound)
