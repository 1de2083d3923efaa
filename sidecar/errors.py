"""The one exception hierarchy of spiffe-sidecar (and of the embedded SPIRE).

Every error a user can see derives from `SidecarError`; its `str()` is one readable line saying what is
wrong, where, and how to fix it. Boundaries (CLI, config loader, sources, listeners) translate foreign
exceptions into these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class SidecarError(Exception):
    """Base of every error raised on purpose by this project."""


class IdentityError(SidecarError, ValueError):
    """A SPIFFE ID, trust domain or caller pattern that does not parse."""

    def __init__(self, reason: str, value: str) -> None:
        self.reason = reason
        self.value = value
        shown = value if len(value) <= 120 else value[:117] + "..."
        super().__init__(f"{shown!r}: {reason}")


class SvidError(SidecarError):
    """An X.509-SVID (own or peer) that must not be used; `reason` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class JwtSvidError(SidecarError):
    """A JWT-SVID (or JWT bundle) that must not be trusted; `reason` is a short stable code (metrics labels,
    audit lines), `detail` says why. Never carries the token itself."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class SourceError(SidecarError):
    """An SVID source (Workload API, PEM files) that cannot deliver."""


class EndpointError(SourceError, ValueError):
    """A Workload API endpoint address that violates the SPIFFE Workload Endpoint spec."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem in a file: where (file, line, field path) and what."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ConfigError(SidecarError):
    """A config, policy or entries file with one or more problems; all are listed, none is fatal alone."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))
