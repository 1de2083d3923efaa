"""Sidecar settings: frozen dataclasses parsed once from YAML + environment + CLI (pure core).

The loader collects every problem with its location (`file:line: field.path: message`) and raises
`ConfigError`; a bad config never starts and never replaces a good one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from .endpoint import TcpEndpoint, UnixEndpoint
from .identity import TrustDomain
from .policy import Policy


class ListenerMode(enum.Enum):
    HTTP = "http"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines in seconds; every await on the request path runs under one of these."""

    handshake: float = 5.0
    request_head: float = 10.0
    idle: float = 60.0
    upstream_connect: float = 2.0
    upstream_response: float = 30.0
    drain: float = 20.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 10_000
    max_header_bytes: int = 64 * 1024
    max_request_line_bytes: int = 8 * 1024
    max_body_bytes: int | None = None  # None: unlimited (streamed, bounded memory either way)
    upstream_pool_size: int = 64


@dataclass(frozen=True, slots=True)
class WorkloadApiSettings:
    endpoint: UnixEndpoint | TcpEndpoint


@dataclass(frozen=True, slots=True)
class PemSourceSettings:
    cert_chain: Path
    key: Path
    bundle: Path
    trust_domain: TrustDomain | None = None
    federated: tuple[tuple[TrustDomain, Path], ...] = ()
    poll_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class InboundSettings:
    listen: HostPort
    app: HostPort
    mode: ListenerMode = ListenerMode.HTTP
    policy: Policy | None = None  # compiled; None only before loading
    policy_file: Path | None = None  # when set, reloaded live (downward API file or YAML)


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 15000))


@dataclass(frozen=True, slots=True)
class AuditSettings:
    path: str = "-"  # "-" is stdout
    sample_allows: float = 1.0  # fraction of allow decisions logged; denies are always logged
    deny_per_second: float = 100.0  # token bucket for deny lines; dropped lines are counted and reported
    deny_burst: int = 200


@dataclass(frozen=True, slots=True)
class Settings:
    source: WorkloadApiSettings | PemSourceSettings
    inbound: InboundSettings | None
    admin: AdminSettings = field(default_factory=AdminSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    log_level: str = "info"
