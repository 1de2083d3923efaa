"""The audit log: one JSON line per authorization decision, with its rule and reason (edge).

Allows are sampled (`sample_allows`); denies and would-denies are always logged but pass a token
bucket (`deny_per_second`, `deny_burst`) so that a flood of denied requests cannot turn into a flood of
disk writes. Dropped lines are counted in `spiffe_sidecar_audit_lines_dropped` and reported on the next
deny line that gets through (`"dropped": N`) or by `flush_dropped()` (the app calls it periodically).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import re
import sys
import time
import weakref
from collections.abc import Callable
from typing import IO, Final, Protocol

from .config import AuditSettings
from .metrics import Metrics

__all__ = ["ACCESS_FIELDS", "AuditLog", "DecisionLike", "access_members", "open_writer"]


class DecisionLike(Protocol):
    """What the audit log reads from a policy Decision (sidecar.policy.Decision has these fields).
    `verdict` and `mode` are the words printed (policy.Verdict and policy.Mode values)."""

    @property
    def verdict(self) -> str: ...
    @property
    def rule(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def mode(self) -> str: ...


ACCESS_FIELDS: Final = (
    "request_id", "trace_id", "authority", "user_agent", "protocol", "tls", "source", "jwt_subject", "jwt_audience",
    "jwt_kid", "upstream_failure", "grpc_method", "grpc_status",
)  # fmt: skip
_ENCODE: Final = json.JSONEncoder(separators=(",", ":")).encode


def access_members(**fields: str) -> str:
    """The access-log members of an audit line (what Envoy's and Linkerd's access logs say beside the
    decision), as JSON text `,"key":"value"...` in the order of ACCESS_FIELDS, empty values left out:

    `request_id` X-Request-Id (the caller's, or the one we made and forwarded); `trace_id` the trace-id of
    the W3C traceparent forwarded; `authority` Host (or an absolute-form target's authority); `user_agent`;
    `protocol` (`HTTP/1.1`, `HTTP/1.0`, `tcp`); `tls` the caller's TLS version ("" for the app on
    loopback); `source` the caller's address; `jwt_subject`, `jwt_audience`, `jwt_kid` of a step-up rule's
    validated JWT-SVID (never the token); `upstream_failure` why a 502/504 happened
    (`connect_refused`, `connect_timeout`, `timeout`, `reset`, `closed_early`, `protocol`, ...); for HTTP/2
    streams `protocol` is `h2` or `grpc`, and a gRPC call names its `grpc_method` (`package.Service/Method`)
    and the `grpc_status` it ended with (ours, or the app's trailers).
    The data plane renders the parts that do not change (per connection, per request head) once and
    joins them per request."""
    if not fields.keys() <= _ACCESS_SET:
        raise TypeError(f"unknown access fields: {sorted(set(fields) - _ACCESS_SET)}")
    out = ""
    for name in ACCESS_FIELDS:
        value = fields.get(name)
        if value:
            out += f',"{name}":' + json_string(value)
    return out


_ACCESS_SET: Final = frozenset(ACCESS_FIELDS)
# Text that is its own JSON string body (no quote, backslash, control or non-ASCII character): most ids,
# hosts and user agents; the rest goes through the JSON encoder.
_PLAIN_JSON: Final = re.compile(r"[ !#-\[\]-~]*")


def json_string(value: str) -> str:
    """`value` as a JSON string literal (the audit line's escaping), cheaply for plain ASCII text."""
    return '"' + value + '"' if _PLAIN_JSON.fullmatch(value) is not None else _ENCODE(value)


class AuditLog:
    """Writes decision lines through an injected `write(line)` (line includes the trailing newline).

    `clock()` returns Unix time in seconds (timestamps and the token bucket); `rng()` returns a float in
    [0, 1) for sampling. Not thread-safe: it lives on the event loop.
    """

    __slots__ = (
        "_burst",
        "_clock",
        "_dropped",
        "_dumps",
        "_last_refill",
        "_metrics",
        "_ms",
        "_ms_text",
        "_prefixes",
        "_rate",
        "_rng",
        "_sample",
        "_sec",
        "_sec_text",
        "_tokens",
        "_write",
    )

    def __init__(
        self,
        settings: AuditSettings,
        *,
        write: Callable[[str], None],
        clock: Callable[[], float] = time.time,
        metrics: Metrics,
        rng: Callable[[], float],
    ) -> None:
        self._write = write
        self._clock = clock
        self._metrics = metrics
        self._rng = rng
        self._sample = settings.sample_allows
        self._rate = settings.deny_per_second
        self._burst = float(settings.deny_burst)
        self._tokens = self._burst
        self._last_refill = clock()
        self._dropped = 0
        self._sec = -1
        self._sec_text = ""
        self._ms = -1
        self._ms_text = ""
        self._dumps = json.JSONEncoder(separators=(",", ":")).encode
        # (listener, peer, method, id(decision)) -> (decision, text before the path, text after it).
        # The decision is kept in the entry so its id cannot be reused while the entry lives.
        self._prefixes: dict[tuple[str, object, str, int], tuple[DecisionLike, str, str]] = {}

    @property
    def dropped_pending(self) -> int:
        """Deny lines dropped since the last line that reported them."""
        return self._dropped

    def decision(
        self,
        *,
        listener: str,
        peer: object,
        method: str,
        path: str,
        decision: DecisionLike,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        access: str = "",
    ) -> None:
        """Log one decision. `peer` is a SpiffeId (or None when no identity was established)."""
        now = self._clock()
        verdict = decision.verdict
        if verdict == "allow":
            # Sampling: sample_allows == 1.0 never consults the rng (rng() < 1.0 always holds anyway).
            if self._sample < 1.0 and self._rng() >= self._sample:
                return
        else:
            if not self._take_token(now):
                self._dropped += 1
                self._metrics.audit_dropped.inc()
                return
        # Hot path (one line per request): the constant parts of a line are JSON-encoded once per
        # (listener, peer, method, decision) and the line is concatenated; the bytes are exactly what
        # json.dumps of the dict {time, listener, peer, method, path, rule, decision, mode, reason,
        # status, bytes_in, bytes_out, duration_ms[, dropped], the access members} gives with compact
        # separators (`access`: the members as `access_members` renders them).
        key = (listener, peer, method, id(decision))
        entry = self._prefixes.get(key)
        if entry is None or entry[0] is not decision:
            entry = self._prefix(key, listener, peer, method, decision, verdict)
        ms = int(now * 1000.0)
        ts = self._ms_text if ms == self._ms else self._timestamp_ms(ms)
        if path.isascii() and path.isprintable() and '"' not in path and "\\" not in path:
            qpath = '"' + path + '"'  # nothing JSON would escape
        else:
            qpath = self._dumps(path)
        ms_text = repr(round(duration * 1000.0, 3))  # float repr: what json emits for a finite float
        tail = f'{status},"bytes_in":{bytes_in},"bytes_out":{bytes_out},"duration_ms":{ms_text}'
        if self._dropped and verdict != "allow":
            tail += f',"dropped":{self._dropped}'
            self._dropped = 0
        self._write('{"time":"' + ts + entry[1] + qpath + entry[2] + tail + access + "}\n")

    def _prefix(
        self, key: tuple[str, object, str, int], listener: str, peer: object, method: str,
        decision: DecisionLike, verdict: str,
    ) -> tuple[DecisionLike, str, str]:
        dumps = self._dumps
        before = (
            f'","listener":{dumps(listener)},"peer":{dumps("-" if peer is None else str(peer))},'
            f'"method":{dumps(method)},"path":'
        )
        after = (
            f',"rule":{dumps(decision.rule)},"decision":{dumps(verdict)},"mode":{dumps(decision.mode)},'
            f'"reason":{dumps(decision.reason)},"status":'
        )
        if len(self._prefixes) >= 1024:  # default-deny decisions are built per request: stay bounded
            self._prefixes.clear()
        entry = (decision, before, after)
        self._prefixes[key] = entry
        return entry

    def flush_dropped(self) -> int:
        """Write a summary line for deny lines dropped since the last report; returns how many."""
        n = self._dropped
        if n:
            self._dropped = 0
            self._write(self._dumps({"time": self._timestamp(self._clock()), "event": "dropped", "dropped": n}) + "\n")
        return n

    def _take_token(self, now: float) -> bool:
        elapsed = now - self._last_refill
        if elapsed > 0:  # a clock that steps backwards never adds tokens
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._last_refill = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _timestamp(self, now: float) -> str:
        ms = int(now * 1000.0)
        return self._ms_text if ms == self._ms else self._timestamp_ms(ms)

    def _timestamp_ms(self, ms: int) -> str:
        # RFC 3339, UTC, milliseconds. Formatted once per millisecond (the seconds part once per second).
        sec, frac = divmod(ms, 1000)
        if sec != self._sec:
            self._sec = sec
            self._sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        self._ms = ms
        self._ms_text = text = f"{self._sec_text}.{frac:03d}Z"
        return text


# A tick's lines are written together; more than this many characters are written at once (bounded memory
# when one loop iteration finishes a great many exchanges).
_FLUSH_CHARS: Final = 64 * 1024


def open_writer(path: str) -> tuple[Callable[[str], None], Callable[[], None]]:
    """(write, close) for an audit destination: "-" is stdout, anything else a file opened for append.

    Lines are buffered for at most one event-loop iteration: the lines of every exchange that ended in
    this iteration go out in one write() + flush() (one syscall, not one per request), scheduled with
    loop.call_soon; more than 64 KiB is written at once, and without a running loop each line is written
    immediately. close() writes what is pending first (the app calls it after draining, SIGTERM
    included), and an interpreter exit flushes what a missing close() left.
    """
    if path == "-":
        out: IO[str] = sys.stdout
        writer = _TickWriter(out, None)
    else:
        fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by the returned close())
        writer = _TickWriter(fh, fh.close)
    return writer.write, writer.close


class _TickWriter:
    """See open_writer."""

    __slots__ = ("__weakref__", "_buf", "_chars", "_close", "_out", "_scheduled")

    def __init__(self, out: IO[str], close: Callable[[], None] | None) -> None:
        self._out = out
        self._close = close
        self._buf: list[str] = []
        self._chars = 0
        self._scheduled = False
        _LIVE.add(self)

    def write(self, line: str) -> None:
        self._buf.append(line)
        self._chars += len(line)
        if self._chars >= _FLUSH_CHARS:
            self.flush()
        elif not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a tool, a test): write through
                self.flush()
                return
            self._scheduled = True
            loop.call_soon(self._on_tick)

    def _on_tick(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        if self._buf:
            data = "".join(self._buf)
            self._buf.clear()  # dropped even if the write fails: an error must not grow the buffer
            self._chars = 0
            self._out.write(data)
        self._out.flush()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            _LIVE.discard(self)
            if self._close is not None:
                self._close()
            self._close = None


_LIVE: weakref.WeakSet[_TickWriter] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for writer in list(_LIVE):
        if writer._buf:
            with contextlib.suppress(ValueError, OSError):  # already closed, or the disk is gone
                writer.flush()
