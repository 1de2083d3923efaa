"""The validators both settings front-ends share (pure): the config file (sidecar/config.py) and the pod
annotations (sidecar/annotations.py) read the same kinds of values (ports, addresses, listener and policy
modes, Workload API endpoints, server SPIFFE IDs, header names) with one rule each.

A validator returns the value or an `Invalid` saying why not; the caller adds the location. The config file
prints `Invalid.message`; the annotations print `expected <what>, got <the value as written>`
(`Invalid.short`): the same rule in the annotations' words.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from .addr import HostPort, parse_host_port, parse_port
from .endpoint import TcpEndpoint, UnixEndpoint, parse_endpoint
from .errors import EndpointError, IdentityError
from .identity import CallerPattern

__all__ = [
    "Invalid",
    "endpoint",
    "env_port",
    "header_name_list",
    "host_port",
    "jwt_audience",
    "one_of",
    "path_prefix",
    "port_number",
    "server_pattern",
]

_E = TypeVar("_E", bound=enum.Enum)
_FIELD_NAME_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.1 field-name = token


@dataclass(frozen=True, slots=True)
class Invalid:
    """A refused value: `expected` names what is accepted (`http or tcp`), `got` is the value as the
    validator saw it, `reason` a more precise sentence where there is one."""

    expected: str
    got: object
    reason: str = ""

    @property
    def message(self) -> str:
        """The config file's words: the precise reason, else `expected <what>, got <value>`."""
        return self.reason or self.short()

    def short(self, written: str | None = None) -> str:
        """The annotations' words, `expected <what>, got <value>`; `written` is the value as the user wrote
        it, where the front-end trimmed it before checking."""
        shown = self.got if written is None else written
        return f"expected {self.expected}, got {shown!r}"


def port_number(text: str, *, allow_zero: bool) -> int | Invalid:
    """A port number, 1-65535 (0-65535 with `allow_zero`: bind any free port)."""
    try:
        return parse_port(text, allow_zero=allow_zero)
    except ValueError as exc:
        return Invalid(f"a port number {0 if allow_zero else 1}-65535", text, str(exc))


def env_port(environ: Mapping[str, str], name: str, *, allow_zero: bool) -> int | Invalid | None:
    """The port in the environment variable `name`; None when it is unset or blank."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    return port_number(raw, allow_zero=allow_zero)


def host_port(value: object, *, allow_zero: bool) -> HostPort | Invalid:
    """`host:port` or `[v6]:port` (a port of 0 only with `allow_zero`)."""
    try:
        return parse_host_port(value, allow_zero_port=allow_zero)
    except ValueError as exc:
        return Invalid('"host:port"', value, str(exc))


def one_of(value: object, kind: type[_E]) -> _E | Invalid:
    """A member of an enumeration of words (`ListenerMode`: http or tcp; `policy.Mode`: enforce or audit)."""
    try:
        return kind(value)
    except ValueError:
        return Invalid(" or ".join(str(member.value) for member in kind), value)


def endpoint(text: str) -> UnixEndpoint | TcpEndpoint | Invalid:
    """A SPIFFE Workload API endpoint address (`unix:///path` or `tcp://ip:port`)."""
    try:
        return parse_endpoint(text)
    except EndpointError as exc:
        return Invalid("a Workload API endpoint address", text, str(exc))


def server_pattern(text: str) -> CallerPattern | Invalid:
    """The SPIFFE ID (or pattern) an outbound target must present (`expect`)."""
    try:
        return CallerPattern.parse(text)
    except IdentityError as exc:
        return Invalid("a SPIFFE ID or pattern", text, str(exc))


def header_name_list(values: object) -> tuple[tuple[str, ...], list[str]]:
    """(lower-cased names, problems) for a list of HTTP field names."""
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        return (), ["expected a list of header names"]
    out: list[str] = []
    problems: list[str] = []
    for v in values:
        if _FIELD_NAME_RE.fullmatch(v) is None:
            problems.append(f"{v!r} is not a header name (RFC 9110 §5.1)")
        elif v.lower() not in out:
            out.append(v.lower())
    return tuple(out), problems


_AUDIENCE_RE: Final = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces: one `aud` value


def jwt_audience(text: object) -> str | Invalid:
    """The audience of a JWT-SVID the sidecar asks for (JWT-SVID §3.2: at least one, never empty); printable
    ASCII without spaces, as audiences are written in SPIRE entries and annotations."""
    if isinstance(text, str) and _AUDIENCE_RE.fullmatch(text):
        return text
    return Invalid("an audience (printable ASCII, no spaces, at most 256 characters)", text)


def path_prefix(text: object) -> str | Invalid:
    """A request path prefix: starts with '/', no query, no spaces or control characters. Matched on whole
    segments: `/api/stock` covers /api/stock and /api/stock/42, not /api/stockpile."""
    if not isinstance(text, str) or not text.startswith("/"):
        return Invalid("a path prefix starting with '/'", text)
    if "?" in text or "#" in text or any(ch <= " " or ch == "\x7f" for ch in text):
        why = f"path prefix {text!r}: no query, spaces or control characters"
        return Invalid("a path prefix starting with '/'", text, why)
    segments = text.split("/")[1:]
    if "%" in text or "//" in text or any(seg in (".", "..") for seg in segments):
        # Requests are matched after normalisation (no %-escapes of unreserved characters, no dot segments,
        # no empty segments): a prefix written otherwise could never match.
        why = f"path prefix {text!r}: write it normalised (no %-escapes, '.' or '..' segments, or '//')"
        return Invalid("a path prefix starting with '/'", text, why)
    return text
