"""Listen and connect addresses (pure): `HostPort`, its parser, and the loopback test.

Shared by the config file, the pod annotations, the webhook's command line and every listener; a host
may be a DNS name (resolved per connection) or an IP literal, IPv6 written in brackets (RFC 3986 §3.2.2).
`sidecar.config` re-exports these names.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

__all__ = ["HostPort", "is_loopback", "parse_host_port", "parse_port"]


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(value: Any, *, allow_zero_port: bool) -> HostPort:
    """`host:port` or `[v6]:port` -> HostPort. Raises ValueError."""
    if not isinstance(value, str):
        raise ValueError(f'expected "host:port", got {value!r}')
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f'expected "[v6-address]:port", got {value!r}')
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f'expected "host:port", got {value!r}')
        if ":" in host:
            raise ValueError(f'write IPv6 addresses in brackets: "[{host}]:{port_text}"')
    return HostPort(host, parse_port(port_text, allow_zero=allow_zero_port))


def parse_port(text: str, *, allow_zero: bool) -> int:
    """A decimal port number, 1-65535 (0-65535 with `allow_zero`: bind any free port). Raises ValueError."""
    low = 0 if allow_zero else 1
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"port must be a number {low}-65535, got {text!r}")
    if len(text.lstrip("0")) > 5:  # leading zeros are fine; a thousand digits are not worth an int()
        raise ValueError(f"port must be {low}-65535, got {text}")
    port = int(text)
    if not low <= port <= 65535:
        raise ValueError(f"port must be {low}-65535, got {port}")
    return port


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only: `localhost` or a loopback IP literal (127/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
