"""SPIFFE IDs, trust domains and caller patterns (pure; no I/O).

Parsing follows the SPIFFE-ID spec (spiffe/spiffe standards/SPIFFE-ID.md) exactly, with go-spiffe's strict
reading where the spec is ambiguous:

* §2.1: the trust domain is lowercase `[a-z0-9._-]`, non-empty, no port, userinfo or percent-encoding.
* §2.2: the path is empty or `/seg(/seg)*`, each segment `[A-Za-z0-9._-]+` and not `.` or `..`; no trailing
  slash, no percent-encoding.
* §2.4 calls the scheme and trust domain case-insensitive while §2.1 requires lowercase. We reject
  `SPIFFE://` and uppercase trust domains (as go-spiffe and SPIRE do) instead of normalising them, as
  py-spiffe >= 0.3 does: an allowlist must never match an ID the peer's own stack would refuse.
* §2.3: IDs must be supported up to 2048 bytes, trust domains up to 255; we reject anything longer
  (allowed by the spec) so that attacker-sized IDs never reach the policy.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

from .errors import IdentityError

SCHEME: Final = "spiffe://"
MAX_ID_BYTES: Final = 2048
MAX_TRUST_DOMAIN_BYTES: Final = 255

_TD_RE: Final = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9._-]+")


def _check_trust_domain(name: str, value: str) -> None:
    if not name:
        raise IdentityError("trust domain is missing", value)
    if _TD_RE.fullmatch(name) is None:
        raise IdentityError(
            "trust domain characters are limited to lowercase letters, numbers, dots, dashes, "
            "and underscores (SPIFFE-ID §2.1)",
            value,
        )
    if len(name) > MAX_TRUST_DOMAIN_BYTES:
        raise IdentityError(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes", value)


def _check_path(path: str, value: str) -> tuple[str, ...]:
    """Validate a non-empty path (leading slash included); return its segments."""
    segments = tuple(path[1:].split("/"))
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if not seg:
            if i == last:
                raise IdentityError("path cannot have a trailing slash (SPIFFE-ID §2.2)", value)
            raise IdentityError("path cannot contain empty segments (SPIFFE-ID §2.2)", value)
        if seg in (".", ".."):
            raise IdentityError("path cannot contain dot segments (SPIFFE-ID §2.2)", value)
        if _SEGMENT_RE.fullmatch(seg) is None:
            raise IdentityError(
                "path segment characters are limited to letters, numbers, dots, dashes, and "
                "underscores (SPIFFE-ID §2.2)",
                value,
            )
    return segments


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A trust domain name, e.g. `example.org` (no scheme)."""

    name: str

    @classmethod
    def parse(cls, value: str) -> TrustDomain:
        """Parse a bare name (`example.org`) or the trust domain of a SPIFFE ID (`spiffe://example.org/x`)."""
        if value.startswith(SCHEME):
            return SpiffeId.parse(value).trust_domain
        if not value.isascii():
            raise IdentityError("trust domain must be ASCII (SPIFFE-ID §2.1)", value)
        _check_trust_domain(value, value)
        return cls(value)

    def id_string(self) -> str:
        """The trust domain's own SPIFFE ID, `spiffe://<name>` (the Workload API's bundle map key)."""
        return SCHEME + self.name

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed SPIFFE ID. Compare and hash on the canonical string."""

    trust_domain: TrustDomain
    path: str  # "" for the root ID, else "/seg(/seg)*"
    segments: tuple[str, ...] = field(compare=False, repr=False, default=())
    _text: str = field(init=False, compare=False, repr=False)  # canonical form, built once

    def __post_init__(self) -> None:
        object.__setattr__(self, "_text", SCHEME + self.trust_domain.name + self.path)

    # Hot path: the policy looks peers up in dicts keyed by SpiffeId on every request. The canonical
    # string is scheme + trust domain + path (a trust domain has no '/', a path starts with one), so
    # comparing it is comparing (trust_domain, path) as the generated methods did, and a str caches its
    # own hash: no tuples built per call.
    def __eq__(self, other: object) -> bool:
        if other.__class__ is SpiffeId:
            return self._text == other._text
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._text)

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse `value` strictly per SPIFFE-ID §2; raise `IdentityError` with the reason otherwise."""
        if not value:
            raise IdentityError("cannot be empty", value)
        if not value.isascii():
            raise IdentityError("must be ASCII; percent-encoding and non-ASCII are not allowed", value)
        if len(value) > MAX_ID_BYTES:
            raise IdentityError(f"is longer than {MAX_ID_BYTES} bytes (SPIFFE-ID §2.3)", value)
        if not value.startswith(SCHEME):
            raise IdentityError("scheme is missing or invalid: must start with 'spiffe://'", value)
        rest = value[len(SCHEME) :]
        slash = rest.find("/")
        if slash == -1:
            td_name, path = rest, ""
        else:
            td_name, path = rest[:slash], rest[slash:]
        _check_trust_domain(td_name, value)
        segments = _check_path(path, value) if path else ()
        return cls(TrustDomain(td_name), path, segments)

    @classmethod
    def from_parts(cls, trust_domain: TrustDomain, path: str) -> SpiffeId:
        """Build and validate an ID from a trust domain and a path (`""` or `/a/b`)."""
        if path and not path.startswith("/"):
            raise IdentityError("path must have a leading slash", path)
        return cls.parse(SCHEME + trust_domain.name + path)

    @property
    def is_root(self) -> bool:
        """True for a trust domain's own ID (no path); never valid in a leaf X.509-SVID (X509-SVID §3.1)."""
        return not self.path

    def __str__(self) -> str:
        return self._text


class PatternKind(enum.Enum):
    ANY = "any"  # `*`: any authenticated peer from a trusted trust domain
    EXACT = "exact"  # spiffe://td/ns/shop/sa/checkout
    SEGMENTS = "segments"  # spiffe://td/ns/*/sa/checkout, spiffe://td/ns/shop/sa/*
    SUBTREE = "subtree"  # spiffe://td/ns/shop/** (one or more further segments)
    TRUST_DOMAIN = "trust_domain"  # spiffe://td/**: every workload of the trust domain


@dataclass(frozen=True, slots=True)
class CallerPattern:
    """An allowlist entry for peer SPIFFE IDs.

    Forms: `*`; an exact ID; `*` as any whole path segment (`spiffe://td/ns/*/sa/web`); `**` as the last
    segment for a subtree of one or more segments (`spiffe://td/ns/shop/**`); `spiffe://td/**` for the
    whole trust domain. Wildcards never stand for part of a segment and never match across trust domains.
    """

    text: str
    kind: PatternKind
    trust_domain: TrustDomain | None = None
    exact: SpiffeId | None = None
    # For SEGMENTS/SUBTREE: the literal segments with None for `*`; SUBTREE matches IDs with more segments.
    segments: tuple[str | None, ...] = ()

    @classmethod
    def parse(cls, value: str) -> CallerPattern:
        """Parse a caller pattern; a malformed pattern raises `IdentityError`, never 'matches nothing'."""
        text = value.strip()
        if text == "*":
            return cls(text, PatternKind.ANY)
        if "*" not in text:
            sid = SpiffeId.parse(text)
            if sid.is_root:
                raise IdentityError(
                    "a trust domain's root ID never identifies a workload (X509-SVID §3.1); write "
                    f"'{text}/**' to allow every workload of the trust domain",
                    value,
                )
            return cls(text, PatternKind.EXACT, sid.trust_domain, sid)
        if not text.startswith(SCHEME):
            raise IdentityError("a caller pattern is '*' or starts with 'spiffe://'", value)
        rest = text[len(SCHEME) :]
        slash = rest.find("/")
        td_name = rest if slash == -1 else rest[:slash]
        if "*" in td_name:
            raise IdentityError("wildcards are not allowed in the trust domain; list each one", value)
        _check_trust_domain(td_name, value)
        td = TrustDomain(td_name)
        if slash == -1:  # pragma: no cover - `*` must then be in the trust domain, handled above
            raise IdentityError("pattern has no path", value)
        raw_segments = rest[slash + 1 :].split("/")
        parts: list[str | None] = []
        subtree = False
        for i, seg in enumerate(raw_segments):
            if seg == "**":
                if i != len(raw_segments) - 1:
                    raise IdentityError("'**' is only allowed as the last segment", value)
                subtree = True
            elif seg == "*":
                parts.append(None)
            elif not seg:
                raise IdentityError("path cannot contain empty segments (SPIFFE-ID §2.2)", value)
            elif "*" in seg:
                raise IdentityError(
                    "a wildcard must be a whole segment ('*' or a final '**'), not part of one", value
                )
            else:
                _check_path("/" + seg, value)
                parts.append(seg)
        if subtree and not parts:
            return cls(text, PatternKind.TRUST_DOMAIN, td)
        return cls(text, PatternKind.SUBTREE if subtree else PatternKind.SEGMENTS, td, None, tuple(parts))

    def matches(self, peer: SpiffeId) -> bool:
        kind = self.kind
        if kind is PatternKind.ANY:
            return True
        if kind is PatternKind.EXACT:
            return peer == self.exact
        if peer.trust_domain != self.trust_domain:
            return False
        if kind is PatternKind.TRUST_DOMAIN:
            return not peer.is_root
        want = self.segments
        have = peer.segments
        if kind is PatternKind.SEGMENTS:
            if len(have) != len(want):
                return False
        elif len(have) <= len(want):  # SUBTREE: `**` needs at least one more segment
            return False
        return all(w is None or w == h for w, h in zip(want, have, strict=False))

    def __str__(self) -> str:
        return self.text
