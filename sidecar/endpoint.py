"""Workload API endpoint addresses (pure): SPIFFE_Workload_Endpoint.md §4.

`SPIFFE_ENDPOINT_SOCKET` is an RFC 3986 URI with scheme `unix` or `tcp`:

* `unix`: only scheme and an absolute path; the authority MUST NOT be set. `unix:///run/spire/api.sock`
  and `unix:/run/spire/api.sock` are accepted. We are stricter than go-spiffe: `unix://foo` (authority
  `foo`) is rejected, because the spec forbids it and a silently dropped `foo` hides a typo.
* `tcp`: only scheme, an IP address host and a port; no path, query, fragment or userinfo.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from .errors import EndpointError

ENV_VAR: Final = "SPIFFE_ENDPOINT_SOCKET"

# RFC 3986 §3.1 scheme; matched case-insensitively (schemes are case-insensitive, canonical form lowercase).
_SCHEME_RE: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_PCT_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class UnixEndpoint:
    """A Unix domain socket endpoint; `path` is absolute and percent-decoded."""

    path: str

    def grpc_target(self) -> str:
        """grpcio-style target (`unix:///abs/path`); grpclib takes `Channel(path=self.path)`."""
        return "unix://" + self.path

    def __str__(self) -> str:
        return "unix://" + self.path


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    """A TCP endpoint: an IP address (never a DNS name, §4) and a port."""

    host: str
    port: int

    def grpc_target(self) -> str:
        """grpcio-style target `host:port` (IPv6 in brackets); grpclib takes `Channel(host, port)`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return "tcp://" + self.grpc_target()


Endpoint = UnixEndpoint | TcpEndpoint


def _fail(value: str, why: str) -> EndpointError:
    shown = value if len(value) <= 200 else value[:197] + "..."
    return EndpointError(f"invalid Workload API endpoint {shown!r}: {why} (SPIFFE Workload Endpoint §4)")


def parse_endpoint(value: str) -> UnixEndpoint | TcpEndpoint:
    """Parse a Workload API endpoint URI; raise EndpointError with a one-line message otherwise."""
    if not value:
        raise _fail(value, "is empty")
    if not value.isascii() or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise _fail(value, "contains whitespace, control or non-ASCII characters")
    m = _SCHEME_RE.match(value)
    if m is None:
        raise _fail(value, 'must be a URI with a "unix" or "tcp" scheme')
    scheme = m.group(1).lower()
    if scheme not in ("unix", "tcp"):
        raise _fail(value, f'scheme must be "unix" or "tcp", not {m.group(1)!r}')
    rest = value[m.end() :]
    if "#" in rest:
        raise _fail(value, "must not include a fragment")
    if "?" in rest:
        raise _fail(value, "must not include a query")
    if _PCT_RE.search(rest):
        raise _fail(value, "has a malformed percent-encoding")
    if rest.startswith("//"):
        auth_end = rest.find("/", 2)
        authority = rest[2:] if auth_end == -1 else rest[2:auth_end]
        path = "" if auth_end == -1 else rest[auth_end:]
    elif rest.startswith("/"):
        authority, path = None, rest
    else:
        raise _fail(value, "must not be opaque; use unix:///path or tcp://ip:port")
    if scheme == "unix":
        return _parse_unix(value, authority, path)
    return _parse_tcp(value, authority, path)


def _parse_unix(value: str, authority: str | None, path: str) -> UnixEndpoint:
    if authority:
        raise _fail(
            value,
            f"unix URI must not have an authority ({authority!r}); use three slashes: unix:///path/to/socket",
        )
    if not path or path == "/":
        raise _fail(value, "unix URI must include an absolute socket path")
    decoded = unquote(path)
    if "\x00" in decoded:
        raise _fail(value, "socket path must not contain NUL")
    return UnixEndpoint(decoded)


def _parse_tcp(value: str, authority: str | None, path: str) -> TcpEndpoint:
    if authority is None or authority == "":
        raise _fail(value, "tcp URI must include a host (an IP address) and a port")
    if path:
        raise _fail(value, "tcp URI must not include a path")
    if "@" in authority:
        raise _fail(value, "tcp URI must not include userinfo")
    if "%" in authority:
        raise _fail(value, "tcp URI host must be a plain IP address")
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise _fail(value, "unterminated IPv6 address")
        host, after = authority[1:close], authority[close + 1 :]
        if not after.startswith(":"):
            raise _fail(value, "tcp URI must include a port")
        port_text = after[1:]
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise _fail(value, f"host {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            host, port_text = authority, ""
        if not host:
            raise _fail(value, "tcp URI must include a host (an IP address)")
        if ":" in host:
            raise _fail(value, "an IPv6 host must be in brackets: tcp://[::1]:port")
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            raise _fail(value, f"host {host!r} must be an IP address, not a name") from None
    if not port_text:
        raise _fail(value, "tcp URI must include a port")
    if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        raise _fail(value, f"port {port_text!r} must be a number from 1 to 65535")
    return TcpEndpoint(str(ip), int(port_text))


def endpoint_from_env(environ: Mapping[str, str]) -> UnixEndpoint | TcpEndpoint:
    """Parse `SPIFFE_ENDPOINT_SOCKET` from `environ` (the caller passes os.environ).

    The spec defines no default socket (spec notes §3.1), so an unset variable is an EndpointError.
    """
    value = environ.get(ENV_VAR)
    if value is None:
        raise EndpointError(
            f"{ENV_VAR} is not set and no Workload API endpoint was configured (SPIFFE Workload Endpoint §4)"
        )
    return parse_endpoint(value)
