"""What the data plane reports, in one object handed to it (edge): audit lines and metrics.

One `Observer` per listener (its `label` is the metrics' and audit line's `listener`). The data plane
calls `exchange()` once per finished exchange (or TCP connection) and the counting methods for refusals,
bad requests, upstream errors and stalls; it holds no reference to a server, a registry or a log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from .metrics import Metrics
from .policy import Decision

__all__ = ["AuditSink", "Observer", "RateLimitedLog"]

log = logging.getLogger("spiffe_sidecar.dataplane")


class AuditSink(Protocol):
    def decision(
        self,
        *,
        listener: str,
        peer: object,
        method: str,
        path: str,
        decision: Decision,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        access: str = "",
    ) -> None: ...


class RateLimitedLog:
    """At most `burst` lines, refilled at `per_second`; suppressed lines are counted in the next one."""

    def __init__(self, clock: Callable[[], float], per_second: float = 10.0, burst: float = 20.0) -> None:
        self._clock = clock
        self._rate = per_second
        self._burst = burst
        self._tokens = burst
        self._last = clock()
        self.suppressed = 0

    def __call__(self, level: int, msg: str, *args: object) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            self.suppressed += 1
            return
        self._tokens -= 1.0
        if self.suppressed:
            msg += " (%d similar lines suppressed)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        log.log(level, msg, *args)


class Observer:
    """Audit + metrics for one listener."""

    def __init__(
        self, label: str, audit: AuditSink, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.label = label
        self.metrics = metrics
        self._audit = audit.decision
        self._recorder = metrics.recorder(label)
        self._latency = self._recorder.latency
        self._open = metrics.open_connections.labels(listener=label)
        self._children: dict[tuple[str, str], Any] = {}
        self.refusal_log = RateLimitedLog(clock)
        self.limit_log = RateLimitedLog(clock, per_second=0.2, burst=1.0)
        # Largest number of body bytes held in Python buffers plus transport write buffers by one exchange,
        # for tests of bounded memory (not RSS).
        self.max_buffered = 0

    # -- per exchange -------------------------------------------------------------------------------------

    def exchange(
        self,
        peer: str,
        method: str,
        path: str,
        decision: Decision,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        access: str = "",
    ) -> None:
        """One finished exchange (or TCP connection, with method and path "-"); `access`: its access-log
        members (`audit.access_members`)."""
        self._latency.observe(duration)
        self._recorder.record(peer, decision.verdict, decision.rule, decision.mode, method, status)
        self._audit(
            listener=self.label, peer=peer, method=method, path=path, decision=decision, status=status,
            bytes_in=bytes_in, bytes_out=bytes_out, duration=duration, access=access,
        )  # fmt: skip

    def buffered(self, n: int) -> None:
        if n > self.max_buffered:
            self.max_buffered = n

    # -- counts -------------------------------------------------------------------------------------------

    def _child(self, family: str, value: str) -> Any:
        key = (family, value)
        child = self._children.get(key)
        if child is None:
            m = self.metrics
            if family == "bad":
                child = m.bad_requests.labels(reason=value)
            elif family == "upstream":
                child = m.upstream_errors.labels(listener=self.label, kind=value)
            elif family == "stall":
                child = m.peer_stalls.labels(listener=self.label, kind=value)
            elif family == "h2":
                child = m.http2_events.labels(listener=self.label, event=value)
            else:
                child = m.handshake_failures.labels(listener=self.label, reason=value)
            self._children[key] = child
        return child

    def h2_stream(self, protocol: str, verdict: str) -> None:
        """One decided HTTP/2 stream (`protocol` h2 or grpc), beside `exchange` (which every stream gets too)."""
        key = ("stream", protocol + " " + verdict)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.metrics.http2_streams.labels(listener=self.label, protocol=protocol,
                                                                            decision=verdict)  # fmt: skip
        child.inc()

    def h2_event(self, event: str) -> None:
        """An HTTP/2 defence fired (see Metrics.http2_events)."""
        self._child("h2", event).inc()

    def bad_request(self, label: str) -> None:
        self._child("bad", label).inc()

    def upstream_error(self, kind: str) -> None:
        self._child("upstream", kind).inc()

    def stall(self, kind: str) -> None:
        self._child("stall", kind).inc()

    def refused(self, addr: str, reason: str, detail: str) -> None:
        """A connection refused before (or, on expiry, after) any request: counted by reason, logged
        (rate-limited, with the remote address)."""
        self._child("refused", reason).inc()
        self.refusal_log(logging.WARNING, "%s: refused %s: %s: %s", self.label, addr, reason, detail)

    def connection_limit(self, limit: int) -> None:
        self.metrics.connection_limit_hits.labels(listener=self.label).inc()
        self.limit_log(logging.WARNING, "%s: connection limit %d reached; refusing new connections",
                       self.label, limit)  # fmt: skip

    def handshake_limit(self, limit: int) -> None:
        self.metrics.handshake_limit_hits.labels(listener=self.label).inc()
        self.limit_log(
            logging.WARNING,
            "%s: %d connections still in the TLS handshake (max_pending_handshakes); dropping the oldest",
            self.label, limit,
        )  # fmt: skip

    def accept_failed(self, exc: OSError) -> None:
        self.limit_log(logging.ERROR, "%s: accept failed: %s", self.label, exc)

    def opened(self) -> None:
        self._open.inc()

    def closed(self) -> None:
        self._open.dec()
