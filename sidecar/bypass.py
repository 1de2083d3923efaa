"""Does the app answer on the pod IP? (issue 5 item 3; an edge module: it opens TCP connections).

The sidecar only protects an app that callers cannot reach directly. On Kubernetes every container of a
pod shares one network namespace, so an app bound to 0.0.0.0 answers on the pod IP and anyone in the
cluster can go around the sidecar. We cannot see the app's bind address from here, but we can try what an
attacker would: a TCP connect to POD_IP:app_port. A connection that is accepted means the port is exposed.

A native sidecar starts BEFORE the app (its startupProbe gates the app's start), so one check at start
would always find nothing; the monitor re-checks every `interval` for the life of the process (one
connect + close every few seconds is negligible). On every change it logs one line (WARNING naming the
fix when exposed), and it keeps `spiffe_sidecar_app_port_exposed` at 1 or 0. With
`spiffe-sidecar.io/strict-bypass-check: "true"`, `hold_reason()` feeds /readyz so the pod is not Ready
while the port is exposed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from dataclasses import dataclass
from typing import Final

from prometheus_client import Gauge

from .config import HostPort

__all__ = ["BypassCheck", "BypassMonitor", "Exposure", "probe_exposure"]

log = logging.getLogger("spiffe_sidecar.bypass")

CHECK_INTERVAL: Final = 10.0
CONNECT_TIMEOUT: Final = 1.0  # a local connect answers in microseconds; a timeout means filtered


class Exposure(enum.Enum):
    EXPOSED = "exposed"  # the connect was accepted: the app answers on the pod IP
    CLOSED = "closed"  # refused (nothing listens there) or no answer within the deadline
    UNKNOWN = "unknown"  # could not try (e.g. the pod IP is not an address of this host)


@dataclass(frozen=True, slots=True)
class BypassCheck:
    """What to check: the app port on the pod IP; `strict` holds readiness while it is exposed."""

    pod_ip: str
    app_port: int
    strict: bool = False
    interval: float = CHECK_INTERVAL
    connect_timeout: float = CONNECT_TIMEOUT

    @property
    def target(self) -> HostPort:
        return HostPort(self.pod_ip, self.app_port)


async def probe_exposure(host: str, port: int, deadline: float = CONNECT_TIMEOUT) -> tuple[Exposure, str]:
    """One TCP connect attempt to host:port under `deadline` seconds; (result, detail). Sends no byte."""
    try:
        async with asyncio.timeout(deadline):
            _reader, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return Exposure.CLOSED, "no answer within the deadline"
    except ConnectionRefusedError:
        return Exposure.CLOSED, "connection refused"
    except OSError as exc:
        return Exposure.UNKNOWN, exc.strerror or str(exc)
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(deadline):
            await writer.wait_closed()
    return Exposure.EXPOSED, "connection accepted"


class BypassMonitor:
    """Re-checks the app port on the pod IP every `check.interval`; see the module docstring."""

    def __init__(self, check: BypassCheck, gauge: Gauge) -> None:
        self._check = check
        self._gauge = gauge
        self._state: Exposure | None = None

    @property
    def state(self) -> Exposure | None:
        """The last result, or None before the first check."""
        return self._state

    def hold_reason(self) -> str | None:
        """Why /readyz must say 503 (strict mode while exposed), else None."""
        if self._check.strict and self._state is Exposure.EXPOSED:
            return (
                f"app port {self._check.app_port} answers on the pod IP {self._check.pod_ip} "
                "(strict bypass check): bind the app to 127.0.0.1"
            )
        return None

    async def check_once(self) -> Exposure:
        c = self._check
        result, detail = await probe_exposure(c.pod_ip, c.app_port, c.connect_timeout)
        if result is not self._state:
            self._report(result, detail)
        self._state = result
        self._gauge.set(1 if result is Exposure.EXPOSED else 0)
        return result

    def _report(self, result: Exposure, detail: str) -> None:
        c = self._check
        if result is Exposure.EXPOSED:
            log.warning(
                "app port %d answers on the pod IP %s: callers can bypass the sidecar; bind the app to 127.0.0.1%s",
                c.app_port,
                c.pod_ip,
                " (strict: readiness held back until fixed)" if c.strict else "",
            )
        elif result is Exposure.CLOSED:
            if self._state is Exposure.EXPOSED:
                log.info("app port %d no longer answers on the pod IP %s", c.app_port, c.pod_ip)
            else:
                log.debug("app port %d is not reachable on the pod IP %s (%s)", c.app_port, c.pod_ip, detail)
        else:
            log.warning("bypass check of %s not possible: %s", c.target, detail)

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._check.interval)
