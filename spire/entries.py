"""Registration entries and settings of the embedded SPIRE, parsed once from YAML (pure; no I/O but reading).

File shape (every key but `trust_domain` and `entries` optional)::

    trust_domain: example.org
    svid_ttl: 1h          # default X509-SVID lifetime; rotation at half-life
    jwt_ttl: 5m           # JWT-SVID lifetime
    ca_ttl: 24h           # signing CA lifetime; the next CA is prepared at 1/2, activated at 2/3
    jwt_key_ttl: 24h      # JWT signing key lifetime: same steps, a new kid each time
    allowed_foreign_jwt_claims: [groups]  # ValidateJWTSVID: claims kept for other trust domains' tokens
    socket_dir: /tmp/spire            # where the shared socket (api.sock) and relative entry sockets live
    federation:                       # trust domains this SPIRE also runs a CA for (simulated foreign SPIRE)
      - trust_domain: partner.org
    entries:
      - spiffe_id: spiffe://example.org/ns/shop/sa/checkout
        socket: checkout.sock         # static mode: whoever can open this socket gets this entry
        hint: checkout
        ttl: 30m
        federates_with: [partner.org]
        dns_names: [localhost]
      - spiffe_id: spiffe://example.org/ns/shop/sa/inventory
        selectors: ["unix:uid:1000"]  # attested from SO_PEERCRED on the shared socket

Every problem is collected with `file:line: field.path` (from the YAML node marks) and raised together as
`ConfigError`; nothing is half-loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

import yaml

from sidecar.errors import ConfigError, IdentityError, Problem
from sidecar.identity import SpiffeId, TrustDomain

DEFAULT_SVID_TTL: Final = 3600.0
DEFAULT_JWT_TTL: Final = 300.0
DEFAULT_CA_TTL: Final = 86400.0
DEFAULT_JWT_KEY_TTL: Final = 86400.0
SHARED_SOCKET_NAME: Final = "api.sock"
MAX_HINT_BYTES: Final = 1024  # Workload API §8: hints above 1024 bytes SHOULD NOT be supported

_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SELECTOR_RE: Final = re.compile(r"unix:(uid|gid):(\d{1,10})")


def parse_duration(value: str | int | float) -> float:
    """`90`, `1.5`, `500ms`, `30s`, `5m`, `1h30m`, `2d` -> seconds (> 0). Raises ValueError with a reason."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m or 1h, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        if not text:
            raise ValueError("empty duration")
        try:
            seconds = float(text)
        except ValueError:
            pos = 0
            seconds = 0.0
            for m in _DURATION_PART.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            if pos != len(text) or pos == 0:
                raise ValueError(
                    f"{value!r} is not a duration; use e.g. 500ms, 30s, 5m, 1h or 1h30m"
                ) from None
    if not seconds > 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class Selector:
    """A workload selector; only `unix:uid:N` and `unix:gid:N`, attested from SO_PEERCRED."""

    type: str
    key: str
    value: int

    @classmethod
    def parse(cls, text: str) -> Selector:
        m = _SELECTOR_RE.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"{text!r} is not a supported selector; use unix:uid:N or unix:gid:N")
        return cls("unix", m.group(1), int(m.group(2)))

    def matches(self, uid: int, gid: int) -> bool:
        return self.value == (uid if self.key == "uid" else gid)

    def __str__(self) -> str:
        return f"{self.type}:{self.key}:{self.value}"


@dataclass(frozen=True, slots=True)
class RegistrationEntry:
    """One registration entry: a SPIFFE ID and who gets it.

    `socket` set = static mode: every caller of that dedicated socket gets the entry (plus, if listed, the
    selectors must match too). `socket` unset = the entry is served on the shared socket to callers whose
    peer credentials match all `selectors` (at least one is required then).
    """

    spiffe_id: SpiffeId
    selectors: tuple[Selector, ...] = ()
    socket: str | None = None
    ttl: float | None = None
    jwt_ttl: float | None = None
    hint: str = ""
    federates_with: tuple[TrustDomain, ...] = ()
    dns_names: tuple[str, ...] = ()
    where: str = field(default="", compare=False)  # "entries.yaml:12: entries[2]" for messages

    def matches(self, uid: int, gid: int) -> bool:
        """True if every selector matches the caller (kernel-reported uid/gid, never caller-supplied)."""
        return all(s.matches(uid, gid) for s in self.selectors)


@dataclass(frozen=True, slots=True)
class SpireConfig:
    trust_domain: TrustDomain
    entries: tuple[RegistrationEntry, ...]
    federated_trust_domains: tuple[TrustDomain, ...] = ()
    svid_ttl: float = DEFAULT_SVID_TTL
    jwt_ttl: float = DEFAULT_JWT_TTL
    ca_ttl: float = DEFAULT_CA_TTL
    jwt_key_ttl: float = DEFAULT_JWT_KEY_TTL
    # ValidateJWTSVID returns only sub, aud and exp of a token from another trust domain, plus these (as
    # SPIRE's agent option allowed_foreign_jwt_claims): other issuers' claims are not ours to vouch for.
    allowed_foreign_jwt_claims: frozenset[str] = frozenset()
    socket_dir: str | None = None
    socket: str | None = None  # shared socket; default <socket_dir>/api.sock
    source: str = "<config>"

    @property
    def trust_domains(self) -> tuple[TrustDomain, ...]:
        """Every trust domain this SPIRE signs for: its own first, then the federated ones."""
        return (self.trust_domain, *self.federated_trust_domains)

    def shared_socket_path(self) -> Path:
        if self.socket is not None:
            return Path(self.socket)
        if self.socket_dir is None:
            raise ConfigError([Problem(self.source, "no socket: give --socket-dir DIR or --socket PATH")])
        return Path(self.socket_dir) / SHARED_SOCKET_NAME

    def socket_path_for(self, entry: RegistrationEntry) -> Path:
        """The socket a workload must use to receive `entry`."""
        if entry.socket is None:
            return self.shared_socket_path()
        p = Path(entry.socket)
        if p.is_absolute():
            return p
        base = Path(self.socket_dir) if self.socket_dir is not None else self.shared_socket_path().parent
        return base / p

    def svid_ttl_for(self, entry: RegistrationEntry) -> float:
        return entry.ttl if entry.ttl is not None else self.svid_ttl

    def jwt_ttl_for(self, entry: RegistrationEntry) -> float:
        return entry.jwt_ttl if entry.jwt_ttl is not None else self.jwt_ttl


# --- YAML walking with node marks -------------------------------------------------------------------------

_TOP_KEYS: Final = frozenset(
    {"trust_domain", "svid_ttl", "jwt_ttl", "ca_ttl", "jwt_key_ttl", "allowed_foreign_jwt_claims", "socket_dir",
     "socket", "federation", "entries"}
)
_ENTRY_KEYS: Final = frozenset(
    {"spiffe_id", "selectors", "socket", "ttl", "jwt_ttl", "hint", "federates_with", "dns_names"}
)
_DNS_RE: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
_STR_TAG: Final = "tag:yaml.org,2002:str"
_INT_TAG: Final = "tag:yaml.org,2002:int"
_FLOAT_TAG: Final = "tag:yaml.org,2002:float"
_T = TypeVar("_T")


class _Walker:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def where(self, node: yaml.Node, path: str) -> str:
        return f"{self.source}:{node.start_mark.line + 1}: {path}"

    def add(self, node: yaml.Node, path: str, message: str) -> None:
        self.problems.append(Problem(self.where(node, path), message))

    def mapping(self, node: yaml.Node, path: str, allowed: frozenset[str]) -> dict[str, yaml.Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.add(node, path or "(top level)", "expected a mapping")
            return None
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                self.add(k, path, "keys must be plain strings")
                continue
            key = str(k.value)
            sub = f"{path}.{key}" if path else key
            if key in out:
                self.add(k, sub, "duplicate key")
            elif key not in allowed:
                self.add(k, sub, f"unknown key; expected one of: {', '.join(sorted(allowed))}")
            else:
                out[key] = v
        return out

    def string(self, node: yaml.Node, path: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _STR_TAG:
            self.add(node, path, "expected a string")
            return None
        return str(node.value)

    def duration(self, node: yaml.Node, path: str) -> float | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag not in (_STR_TAG, _INT_TAG, _FLOAT_TAG):
            self.add(node, path, "expected a duration like 30s, 5m or 1h")
            return None
        try:
            return parse_duration(str(node.value))
        except ValueError as e:
            self.add(node, path, str(e))
            return None

    def sequence(self, node: yaml.Node, path: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.add(node, path, "expected a list")
            return []
        return list(node.value)

    def strings(self, node: yaml.Node, path: str) -> Iterator[tuple[yaml.Node, str, str]]:
        for i, item in enumerate(self.sequence(node, path)):
            sub = f"{path}[{i}]"
            s = self.string(item, sub)
            if s is not None:
                yield item, sub, s

    def parsed(self, node: yaml.Node, path: str, text: str, parse: Callable[[str], _T]) -> _T | None:
        try:
            return parse(text)
        except (IdentityError, ValueError) as e:
            reason = e.reason if isinstance(e, IdentityError) else str(e)
            self.add(node, path, reason)
            return None


def parse_config(
    text: str,
    source: str = "entries.yaml",
    *,
    trust_domain: str | None = None,
    svid_ttl: float | None = None,
    jwt_ttl: float | None = None,
    ca_ttl: float | None = None,
    jwt_key_ttl: float | None = None,
    socket_dir: str | None = None,
    socket: str | None = None,
) -> SpireConfig:
    """Parse an entries file; keyword arguments (from the CLI) override the file's settings.

    Raises `ConfigError` listing every problem with `source:line: field.path`.
    """
    w = _Walker(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError([Problem(f"{source}{line}", f"invalid YAML: {e.problem or e}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem(source, f"invalid YAML: {e}")]) from None
    if root is None:
        raise ConfigError([Problem(source, "file is empty; expected trust_domain and entries")])
    top = w.mapping(root, "", _TOP_KEYS)
    if top is None:
        raise ConfigError(w.problems)

    # Trust domain: CLI wins over the file.
    td: TrustDomain | None = None
    if trust_domain is not None:
        try:
            td = TrustDomain.parse(trust_domain)
        except IdentityError as e:
            w.problems.append(Problem("--trust-domain", e.reason))
    elif "trust_domain" in top:
        s = w.string(top["trust_domain"], "trust_domain")
        if s is not None:
            td = w.parsed(top["trust_domain"], "trust_domain", s, TrustDomain.parse)
    else:
        w.add(root, "trust_domain", "missing (or pass --trust-domain)")

    def setting(key: str, override: float | None, default: float) -> float:
        if override is not None:
            return override
        if key in top:
            v = w.duration(top[key], key)
            return default if v is None else v
        return default

    svid = setting("svid_ttl", svid_ttl, DEFAULT_SVID_TTL)
    jwt = setting("jwt_ttl", jwt_ttl, DEFAULT_JWT_TTL)
    ca = setting("ca_ttl", ca_ttl, DEFAULT_CA_TTL)
    jwt_key = setting("jwt_key_ttl", jwt_key_ttl, DEFAULT_JWT_KEY_TTL)
    if svid >= ca:
        node = top.get("svid_ttl", top.get("ca_ttl", root))
        w.add(node, "svid_ttl", f"SVID ttl ({svid:g}s) must be shorter than the CA ttl ({ca:g}s)")
    if jwt >= jwt_key:
        node = top.get("jwt_ttl", top.get("jwt_key_ttl", root))
        w.add(node, "jwt_ttl", f"JWT-SVID ttl ({jwt:g}s) must be shorter than the JWT key ttl ({jwt_key:g}s)")
    foreign_claims: set[str] = set()
    if "allowed_foreign_jwt_claims" in top:
        for item, sub, claim in w.strings(top["allowed_foreign_jwt_claims"], "allowed_foreign_jwt_claims"):
            if not claim:
                w.add(item, sub, "empty claim name")
            foreign_claims.add(claim)

    sdir = socket_dir
    if sdir is None and "socket_dir" in top:
        sdir = w.string(top["socket_dir"], "socket_dir")
    ssock = socket
    if ssock is None and "socket" in top:
        ssock = w.string(top["socket"], "socket")

    federated: list[TrustDomain] = []
    if "federation" in top:
        for i, item in enumerate(w.sequence(top["federation"], "federation")):
            path = f"federation[{i}]"
            m = w.mapping(item, path, frozenset({"trust_domain"}))
            if m is None:
                continue
            if "trust_domain" not in m:
                w.add(item, f"{path}.trust_domain", "missing")
                continue
            s = w.string(m["trust_domain"], f"{path}.trust_domain")
            if s is None:
                continue
            ftd = w.parsed(m["trust_domain"], f"{path}.trust_domain", s, TrustDomain.parse)
            if ftd is None:
                continue
            if ftd == td or ftd in federated:
                w.add(m["trust_domain"], f"{path}.trust_domain", f"trust domain {ftd} is listed twice")
            else:
                federated.append(ftd)

    entries: list[RegistrationEntry] = []
    if "entries" not in top:
        w.add(root, "entries", "missing; list at least one registration entry")
    else:
        items = w.sequence(top["entries"], "entries")
        if not items and isinstance(top["entries"], yaml.SequenceNode):
            w.add(top["entries"], "entries", "empty; list at least one registration entry")
        for i, item in enumerate(items):
            entry = _parse_entry(w, item, f"entries[{i}]", td, tuple(federated))
            if entry is not None:
                entries.append(entry)
    _check_hints(w, entries)

    if w.problems or td is None:
        raise ConfigError(sorted(w.problems, key=_line_of))
    return SpireConfig(
        trust_domain=td,
        entries=tuple(entries),
        federated_trust_domains=tuple(federated),
        svid_ttl=svid,
        jwt_ttl=jwt,
        ca_ttl=ca,
        jwt_key_ttl=jwt_key,
        allowed_foreign_jwt_claims=frozenset(foreign_claims),
        socket_dir=sdir,
        socket=ssock,
        source=source,
    )


def _line_of(p: Problem) -> int:
    """Sort key: problems in file order (CLI-flag problems, without a line, first)."""
    m = re.match(r"[^:]*:(\d+):", p.where)
    return int(m.group(1)) if m else 0


def _parse_entry(
    w: _Walker, node: yaml.Node, path: str, td: TrustDomain | None, federated: tuple[TrustDomain, ...]
) -> RegistrationEntry | None:
    m = w.mapping(node, path, _ENTRY_KEYS)
    if m is None:
        return None
    before = len(w.problems)
    sid: SpiffeId | None = None
    if "spiffe_id" not in m:
        w.add(node, f"{path}.spiffe_id", "missing")
    else:
        s = w.string(m["spiffe_id"], f"{path}.spiffe_id")
        if s is not None:
            sid = w.parsed(m["spiffe_id"], f"{path}.spiffe_id", s, SpiffeId.parse)
        if sid is not None:
            if sid.is_root:
                w.add(m["spiffe_id"], f"{path}.spiffe_id", "a workload ID needs a path (X509-SVID §3.1)")
            elif td is not None and sid.trust_domain != td and sid.trust_domain not in federated:
                w.add(
                    m["spiffe_id"],
                    f"{path}.spiffe_id",
                    f"trust domain {sid.trust_domain} is neither {td} nor listed under federation",
                )

    selectors: list[Selector] = []
    if "selectors" in m:
        for item, sub, s in w.strings(m["selectors"], f"{path}.selectors"):
            sel = w.parsed(item, sub, s, Selector.parse)
            if sel is not None:
                selectors.append(sel)
    socket: str | None = None
    if "socket" in m:
        socket = w.string(m["socket"], f"{path}.socket")
        if socket is not None and (not socket or socket.endswith("/") or "\x00" in socket):
            w.add(m["socket"], f"{path}.socket", "expected a socket file name or absolute path")
    if "socket" not in m and "selectors" not in m:
        w.add(node, path, "needs selectors (e.g. [unix:uid:1000]) or its own socket (socket: name.sock)")
    elif "socket" not in m and not selectors and len(w.problems) == before:
        w.add(m["selectors"], f"{path}.selectors", "empty; an entry on the shared socket needs a selector")

    ttl = w.duration(m["ttl"], f"{path}.ttl") if "ttl" in m else None
    jwt_ttl = w.duration(m["jwt_ttl"], f"{path}.jwt_ttl") if "jwt_ttl" in m else None
    hint = ""
    if "hint" in m:
        hint = w.string(m["hint"], f"{path}.hint") or ""
        if len(hint.encode()) > MAX_HINT_BYTES:
            w.add(m["hint"], f"{path}.hint", f"longer than {MAX_HINT_BYTES} bytes (Workload API §8)")
    fed: list[TrustDomain] = []
    if "federates_with" in m:
        for item, sub, s in w.strings(m["federates_with"], f"{path}.federates_with"):
            ftd = w.parsed(item, sub, s, TrustDomain.parse)
            if ftd is None:
                continue
            if sid is not None and ftd == sid.trust_domain:
                w.add(item, sub, "an entry does not federate with its own trust domain")
            elif ftd not in federated and ftd != td:
                w.add(item, sub, f"trust domain {ftd} is not listed under federation")
            elif ftd not in fed:
                fed.append(ftd)
    dns: list[str] = []
    if "dns_names" in m:
        for item, sub, s in w.strings(m["dns_names"], f"{path}.dns_names"):
            if _DNS_RE.fullmatch(s) is None:
                w.add(item, sub, f"{s!r} is not a DNS name")
            else:
                dns.append(s)

    if len(w.problems) != before or sid is None:
        return None
    return RegistrationEntry(
        spiffe_id=sid,
        selectors=tuple(selectors),
        socket=socket,
        ttl=ttl,
        jwt_ttl=jwt_ttl,
        hint=hint,
        federates_with=tuple(fed),
        dns_names=tuple(dns),
        where=w.where(node, path),
    )


def _check_hints(w: _Walker, entries: list[RegistrationEntry]) -> None:
    """Workload API §5.2.1: non-empty hints MUST be unique within a response. Responses are built per socket
    (static entries) or from the shared socket's entries, so require uniqueness within each group."""
    seen: dict[tuple[str | None, str], RegistrationEntry] = {}
    for e in entries:
        if not e.hint:
            continue
        key = (e.socket, e.hint)
        first = seen.get(key)
        if first is not None:
            w.problems.append(
                Problem(
                    f"{e.where}.hint",
                    f"hint {e.hint!r} is already used by {first.where.split(': ', 1)[-1]} on the same socket",
                )
            )
        else:
            seen[key] = e


def load_config(
    path: str | Path,
    *,
    trust_domain: str | None = None,
    svid_ttl: float | None = None,
    jwt_ttl: float | None = None,
    ca_ttl: float | None = None,
    jwt_key_ttl: float | None = None,
    socket_dir: str | None = None,
    socket: str | None = None,
) -> SpireConfig:
    """Read and parse an entries file (see `parse_config` for the overrides)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem(str(p), f"cannot read: {e}")]) from None
    return parse_config(
        text,
        str(p),
        trust_domain=trust_domain,
        svid_ttl=svid_ttl,
        jwt_ttl=jwt_ttl,
        ca_ttl=ca_ttl,
        jwt_key_ttl=jwt_key_ttl,
        socket_dir=socket_dir,
        socket=socket,
    )
