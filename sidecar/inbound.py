"""The inbound mTLS listener: TLS handshake -> SPIFFE peer check -> per-request decision -> the app.

Shape (asyncio Protocols on uvloop, httptools for parsing; DESIGN "The request path is the hot path"):

* Accept plain TCP and wrap each socket with the newest server context (`connect_accepted_socket`), so
  rotation never touches open connections. The handshake runs under `timeouts.handshake`.
* `connection_made` of the connection protocol runs `tls.verify_peer_connection` (the peer ID's own
  trust-domain bundle) before any byte is read: the only path from a socket to a request. The peer
  identity and its XFCC value are computed once per connection.
* HTTP mode: one `httptools.HttpRequestParser` per connection. Requests are decided one by one, in order
  (pipelined ones wait in a queue, reading paused). Each allowed (or audit-mode would-deny) request is an
  `_Exchange`: it leases a keep-alive connection from `upstream.UpstreamPool`, writes the rewritten head
  (normalised target, our XFCC, re-framed body), streams the body both ways with backpressure
  (pause_reading/resume_reading on both transports, bounded buffers) and parses the app's response with
  `httptools.HttpResponseParser`.
* TCP mode: one connection-level decision (`authorize_connection`), then a byte relay.

Deadlines: handshake, request head, idle keep-alive, upstream connect, upstream response head, drain,
and progress deadlines on a peer that stops reading the response or sending its body (write_stall,
request_body_stall: it would otherwise pin its connection and the upstream one).
Nothing is logged per request; the audit call is the decision line.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import functools
import logging
import math
import socket
import time
from collections.abc import Callable
from typing import Any, Final, Protocol, cast

import httptools

from .config import InboundSettings, Limits, ListenerMode, Timeouts
from .errors import SvidError
from .http1 import (
    RESPONSE_100,
    RESPONSE_400,
    RESPONSE_403,
    RESPONSE_403_CLOSE,
    RESPONSE_413,
    RESPONSE_431,
    RESPONSE_502,
    RESPONSE_503,
    RESPONSE_504,
    BadRequest,
    BodyFraming,
    RequestFraming,
    build_request_head,
    build_response_head,
    check_method,
    check_request_headers,
    head_only,
    request_drop,
    xfcc_value,
)
from .metrics import Metrics
from .policy import Decision, Policy, Target, authorize, authorize_connection, normalize_target
from .svid import PeerIdentity
from .tls import TlsContexts, TlsSnapshot, classify_handshake_error, verify_peer_connection
from .upstream import UpstreamConnection, UpstreamError, UpstreamPool

__all__ = ["AuditSink", "InboundServer", "PolicyRef"]

log = logging.getLogger("spiffe_sidecar.inbound")

LISTENER: Final = "inbound"
# Bytes buffered in Python per direction before reading from the other side pauses. Transports get the
# same high-water mark, so a connection holds O(this) however large the bodies are.
_BUFFER_HIGH: Final = 64 * 1024
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# An app's keep-alive timeout is often short (uvicorn: 5 s); evict ours first so reuse rarely races it.
_UPSTREAM_IDLE_MAX: Final = 4.0

# Reasons reading from the peer is paused (a bit each; reading resumes when none is left).
_P_PENDING: Final = 1  # request body buffered while no upstream connection is leased yet
_P_UPSTREAM: Final = 2  # the upstream transport's write buffer is full
_P_PIPELINE: Final = 4  # a pipelined request waits behind the active one
_P_STOP: Final = 8  # no more requests will be read on this connection

_T_HEAD: Final = 1
_T_IDLE: Final = 2
_T_RESPONSE: Final = 3

_CHUNK_END: Final = b"0\r\n\r\n"
# A peer that stalls (timeouts.write_stall / request_body_stall) is cut off; its exchange is audited with
# 408 whatever was sent, the reason says which side stalled. The peer gets this 408 only for a stalled
# request body while no response has started (RFC 9110 §15.5.9).
_STALLED: Final = 408
_RESPONSE_408: Final = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: 27\r\n"
    b'connection: close\r\n\r\n{"error":"request timeout"}'
)
_CRLF: Final = b"\r\n"


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
    ) -> None: ...


class PolicyRef:
    """A one-slot holder: the control plane swaps `.policy` atomically on reload; each request reads it
    once, so a request is decided by exactly one policy version."""

    __slots__ = ("policy",)

    def __init__(self, policy: Policy) -> None:
        self.policy = policy


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing the rest of the buffer."""


class _RateLimitedLog:
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


class _LazyTimer:
    """A deadline that moves with a float store: the handle fires at the old time, sees the new deadline
    and re-arms, so per-chunk progress costs no TimerHandle."""

    __slots__ = ("at", "callback", "handle", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self.loop = loop
        self.callback = callback
        self.at: float | None = None
        self.handle: asyncio.TimerHandle | None = None

    def set(self, seconds: float) -> None:
        at = self.loop.time() + seconds
        self.at = at
        h = self.handle
        if h is None or h.when() > at:
            if h is not None:
                h.cancel()
            self.handle = self.loop.call_at(at, self._fire)

    def clear(self) -> None:
        self.at = None  # the handle fires later, sees no deadline and stops

    def cancel(self) -> None:
        self.at = None
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _fire(self) -> None:
        self.handle = None
        at = self.at
        if at is None:
            return
        if self.loop.time() < at:
            self.handle = self.loop.call_at(at, self._fire)
            return
        self.at = None
        self.callback()


class InboundServer:
    """The inbound listener (HTTP or TCP mode) in front of the app at `settings.app`."""

    # The metric/audit `listener` label is a property of the listener: sidecar.outbound reuses this
    # machinery and reports under its own label.
    label: str = LISTENER

    def __init__(
        self,
        settings: InboundSettings,
        *,
        timeouts: Timeouts,
        limits: Limits,
        tls: TlsContexts,
        policy: PolicyRef,
        audit: AuditSink,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.timeouts = timeouts
        self.limits = limits
        self.tls = tls
        self.policy = policy
        self.audit = audit
        self.metrics = metrics
        self.clock = clock
        self.pool = UpstreamPool(
            settings.app.host,
            settings.app.port,
            max_size=limits.upstream_pool_size,
            connect_timeout=timeouts.upstream_connect,
            idle_timeout=min(timeouts.idle, _UPSTREAM_IDLE_MAX),
        )
        self.app_host: Final = str(settings.app).encode("ascii")
        # Request fields never forwarded (hop-by-hop, framing, XFCC, the configured routing overrides).
        self.request_drop: Final = request_drop(settings.strip_request_headers)
        # Raw bytes one request or response head may take (request line + fields), counted before
        # httptools buffers them; see _HttpConn.data_received.
        self.head_limit: Final = limits.max_request_line_bytes + limits.max_header_bytes
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        # Connections still in the TLS handshake, oldest first (a dict keeps insertion order).
        self._handshaking: dict[asyncio.Task[None], None] = {}
        self._conns: set[_BaseConn] = set()
        self._open = 0
        self._draining = False
        self._all_closed: asyncio.Event | None = None
        self._refusal_log = _RateLimitedLog(clock)
        self._limit_log = _RateLimitedLog(clock, per_second=0.2, burst=1.0)
        # Hot-path caches: metric children by label values.
        self._request_counters: dict[tuple[str, str, str], Any] = {}
        self.latency = metrics.request_latency.labels(listener=self.label)
        self._open_gauge = metrics.open_connections.labels(listener=self.label)
        # Largest number of body bytes held in Python buffers plus transport write buffers by one
        # exchange, for tests of bounded memory (not RSS).
        self.max_buffered = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start accepting; returns the bound port (listen port 0 picks a free one)."""
        host, port = self.settings.listen.host, self.settings.listen.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=1024)
        sock.setblocking(False)
        self._sock = sock
        self._all_closed = asyncio.Event()
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        return self.bound[1]

    @property
    def bound(self) -> tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("the inbound listener is not started")
        addr = self._sock.getsockname()
        return str(addr[0]), int(addr[1])

    @property
    def open_connections(self) -> int:
        return self._open

    async def drain(self, deadline: float) -> None:
        """Stop accepting; close idle keep-alive connections now; let in-flight requests finish for up
        to `deadline` seconds (each connection closes after its current response); then close the rest."""
        self._draining = True
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.wait({self._accept_task})
        if self._sock is not None:
            self._sock.close()
        for task in list(self._handshaking):
            task.cancel()
        for conn in list(self._conns):
            conn.start_drain()
        if self._open > 0 and self._all_closed is not None:
            self._all_closed.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline)):
                    await self._all_closed.wait()
            except TimeoutError:
                for conn in list(self._conns):
                    conn.abort()
        await self.pool.close()

    # -- accepting ---------------------------------------------------------------------------------------

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        limit = self.limits.max_connections
        # Unauthenticated sockets get their own, smaller budget: silent ones (no ClientHello) would
        # otherwise hold every max_connections slot for `timeouts.handshake`, renewable forever. When it
        # is full the OLDEST pending handshake is dropped, not the new socket: a real client finishes in
        # milliseconds, so holding the budget then takes a flood of new sockets, not a few silent ones.
        pending_limit = self.limits.pending_handshakes
        while True:
            try:
                client, addr = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and friends: back off briefly instead of spinning
                self._limit_log(logging.ERROR, "inbound: accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            if self._open >= limit:
                client.close()
                self.metrics.connection_limit_hits.labels(listener=self.label).inc()
                self._limit_log(
                    logging.WARNING,
                    "inbound: connection limit %d reached; refusing new connections",
                    limit,
                )
                continue
            if len(self._handshaking) >= pending_limit:
                oldest = next(iter(self._handshaking))
                del self._handshaking[oldest]
                oldest.cancel()  # closes its socket and frees its slot (here or in _handshake_done)
                self.metrics.handshake_limit_hits.labels(listener=self.label).inc()
                self._limit_log(
                    logging.WARNING,
                    "inbound: %d connections still in the TLS handshake (max_pending_handshakes); "
                    "dropping the oldest",
                    pending_limit,
                )
            self._conn_opened()
            task = loop.create_task(self._handshake(client, _addr_str(addr)))
            self._handshaking[task] = None
            task.add_done_callback(functools.partial(self._handshake_done, client))

    def _handshake_done(self, client: socket.socket, task: asyncio.Task[None]) -> None:
        self._handshaking.pop(task, None)
        if task.cancelled() and client.fileno() != -1:
            # Cancelled before its first step: _handshake never ran to close the socket and free the slot.
            client.close()
            self._conn_closed()

    async def _handshake(self, client: socket.socket, addr: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            snap = self.tls.current
        except SvidError as exc:  # none yet, or ours expired: refuse rather than serve an expired SVID
            client.close()
            self._refuse(addr, exc.reason, exc.detail)
            self._conn_closed()
            return
        factory: Callable[[], _BaseConn]
        if self.settings.mode is ListenerMode.TCP:
            factory = lambda: _TcpConn(self, snap, addr)  # noqa: E731
        else:
            factory = lambda: _HttpConn(self, snap, addr)  # noqa: E731
        hs = self.timeouts.handshake
        try:
            # The loop's own handshake timeout fires first; the outer one is a backstop.
            async with asyncio.timeout(hs + 1.0):
                await loop.connect_accepted_socket(factory, client, ssl=snap.server, ssl_handshake_timeout=hs)
        except asyncio.CancelledError:
            client.close()
            self._conn_closed()
            raise
        except Exception as exc:
            client.close()
            failure = classify_handshake_error(exc)
            self._refuse(addr, failure.reason, failure.detail)
            self._conn_closed()

    def _refuse(self, addr: str, reason: str, detail: str) -> None:
        self.metrics.handshake_failures.labels(listener=self.label, reason=reason).inc()
        self._refusal_log(logging.WARNING, "%s: refused %s: %s: %s", self.label, addr, reason, detail)

    def _conn_opened(self) -> None:
        self._open += 1
        self._open_gauge.inc()

    def _conn_closed(self) -> None:
        self._open -= 1
        self._open_gauge.dec()
        if self._open == 0 and self._all_closed is not None:
            self._all_closed.set()

    # -- shared per-request helpers ----------------------------------------------------------------------

    def count_request(self, decision: Decision) -> None:
        verdict = "allow" if decision.allowed else ("deny" if decision.enforced else "would-deny")
        key = (verdict, decision.rule, decision.mode)
        child = self._request_counters.get(key)
        if child is None:
            if len(self._request_counters) > 4096:  # bounded by rule names; guard anyway
                self._request_counters.clear()
            child = self.metrics.requests.labels(
                listener=self.label, decision=verdict, rule=decision.rule, mode=decision.mode
            )
            self._request_counters[key] = child
        child.inc()

    def note_buffered(self, n: int) -> None:
        if n > self.max_buffered:
            self.max_buffered = n


def _addr_str(addr: Any) -> str:
    try:
        host, port = addr[0], addr[1]
    except (TypeError, IndexError):
        return str(addr)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------------------
# Connections


class _BaseConn(asyncio.Protocol):
    """A verified downstream mTLS connection (the TLS handshake is done when this is created)."""

    def __init__(self, server: InboundServer, snap: TlsSnapshot, addr: str) -> None:
        self.server = server
        self.snap = snap
        self.addr = addr
        self.transport: asyncio.Transport | None = None
        self.peer: PeerIdentity | None = None
        self.peer_id_str = "-"
        self.closed = False
        self.draining = False
        self._paused = 0
        self._write_paused = False
        # The verified peer's validity, re-checked before each request (peer_valid): its chain's earliest
        # notAfter as epoch seconds, and the TlsContexts generation whose bundles vouched for it.
        self.peer_expires = math.inf
        self.peer_generation = snap.generation
        self._expiry_handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        server = self.server
        try:
            self.peer = verify_peer_connection(
                transport.get_extra_info("ssl_object"), self.snap, dt.datetime.now(dt.UTC)
            )
        except SvidError as exc:
            server._refuse(self.addr, exc.reason, exc.detail)
            self.closed = True
            transport.abort()
            return
        self.peer_id_str = str(self.peer.spiffe_id)
        self.peer_expires = self.peer.expires_at.timestamp()
        transport.set_write_buffer_limits(high=_BUFFER_HIGH)
        server._conns.add(self)
        self.verified()

    def verified(self) -> None:
        raise NotImplementedError

    def peer_valid(self) -> bool:
        """Whether the peer verified at the handshake may still be served (X509-SVID §5.2 checks hold
        for the life of the connection, not just its start): its chain has not expired, and, when the
        bundles changed since it was verified, it still verifies against the newest ones (the verifier's
        cache makes that cheap). On False the caller closes the connection; counted in
        handshake_failures under the verifier's reason. Common case: one float and one int compare."""
        if time.time() >= self.peer_expires:
            self.server._refuse(self.addr, "expired", "the peer's certificate expired on an open connection")
            return False
        tls = self.server.tls
        if tls.generation == self.peer_generation:
            return True
        snap = tls.latest
        if self.peer is None or snap is None:  # outbound: the app on loopback has no TLS peer
            self.peer_generation = tls.generation
            return True
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        if ssl_object is None:
            return False
        try:
            peer = verify_peer_connection(ssl_object, snap, dt.datetime.now(dt.UTC))
        except SvidError as exc:
            self.server._refuse(self.addr, exc.reason, f"re-checked against new bundles: {exc.detail}")
            return False
        self.peer = peer
        self.peer_expires = peer.expires_at.timestamp()
        self.peer_generation = snap.generation
        return True

    def arm_expiry(self) -> None:
        """At the peer certificate's expiry: relays with no request boundary to re-check at (TCP mode,
        WebSocket tunnels) end; an idle HTTP connection closes before a request can race the check."""
        if self.peer is None or self._expiry_handle is not None or self.closed:
            return
        delay = max(0.0, self.peer_expires - time.time())
        self._expiry_handle = asyncio.get_running_loop().call_later(delay, self._on_peer_expired)

    def _on_peer_expired(self) -> None:
        self._expiry_handle = None
        if self.closed:
            return
        self.server._refuse(self.addr, "expired", "the peer's certificate expired on an open connection")
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        h = self._expiry_handle
        if h is not None:
            self._expiry_handle = None
            h.cancel()
        self.closed = True
        self.server._conns.discard(self)
        self.server._conn_closed()
        self.lost()
        # Drop the transport (and with it the TLS buffers) now rather than when the cyclic GC finds this
        # protocol: connections live long enough to reach the oldest generation, which is rarely collected.
        self.transport = None

    def lost(self) -> None:
        pass

    def pause(self, reason: int) -> None:
        if self._paused == 0 and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused |= reason

    def resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if self._paused == 0 and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def start_drain(self) -> None:
        self.draining = True


class _TcpUpstream(asyncio.Protocol):
    def __init__(self, conn: _TcpConn) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport.set_write_buffer_limits(high=_BUFFER_HIGH)

    def data_received(self, data: bytes) -> None:
        c = self.conn
        c.bytes_out += len(data)
        c.idle.set(c.server.timeouts.idle)
        if c.transport is not None and not c.closed:
            c.transport.write(data)

    def eof_received(self) -> bool | None:
        self.conn.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close()

    def pause_writing(self) -> None:
        self.conn.pause(_P_UPSTREAM)

    def resume_writing(self) -> None:
        self.conn.resume(_P_UPSTREAM)


class _TcpConn(_BaseConn):
    """TCP mode: one decision per connection, then bytes both ways."""

    def verified(self) -> None:
        assert self.peer is not None and self.transport is not None
        server = self.server
        self.started = server.clock()
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream: _TcpUpstream | None = None
        self.pending: list[bytes] = []
        self.status = 0  # audited; _STALLED when cut off for not reading
        self._write_stall: _LazyTimer | None = None
        # No bytes either way for timeouts.idle closes the relay, as an idle keep-alive HTTP connection.
        self.idle = _LazyTimer(asyncio.get_running_loop(), self._on_idle)
        self.decision = decision = authorize_connection(server.policy.policy, self.peer.spiffe_id)
        server.count_request(decision)
        if not decision.forward:
            self._audit()
            self.close()
            return
        self.idle.set(server.timeouts.idle)
        self.arm_expiry()
        self.pause(_P_PENDING)
        self.task = asyncio.get_running_loop().create_task(self._connect())

    def _on_idle(self) -> None:
        self.close()  # lost() closes the upstream side

    async def _connect(self) -> None:
        server = self.server
        app = server.settings.app
        try:
            async with asyncio.timeout(server.timeouts.upstream_connect):
                transport, proto = await asyncio.get_running_loop().create_connection(
                    lambda: _TcpUpstream(self), app.host, app.port
                )
        except (OSError, TimeoutError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "connect"
            server.metrics.upstream_errors.labels(listener=server.label, kind=kind).inc()
            self.close()
            return
        if self.closed:
            transport.close()
            return
        self.upstream = proto
        self.resume(_P_PENDING)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.idle.set(self.server.timeouts.idle)
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.write(data)
        else:  # only before the upstream connects (reading is paused then); bounded by one read
            self.pending.append(data)

    def eof_received(self) -> bool | None:
        # A TLS transport cannot stay half-open under asyncio: the peer's EOF ends the relay.
        return False

    def pause_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()
        t = self._write_stall  # as in HTTP mode: a peer that takes no bytes must not pin the relay
        if t is None:
            t = self._write_stall = _LazyTimer(asyncio.get_running_loop(), self._on_write_stall)
        t.set(self.server.timeouts.write_stall)

    def resume_writing(self) -> None:
        if self._write_stall is not None:
            self._write_stall.clear()
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.resume_reading()

    def _on_write_stall(self) -> None:
        self.server.metrics.peer_stalls.labels(listener=self.server.label, kind="write").inc()
        self.status = _STALLED
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.abort()
        self.abort()

    def resume(self, reason: int) -> None:
        if reason == _P_PENDING and self.pending and self.upstream is not None:
            assert self.upstream.transport is not None
            self.upstream.transport.write(b"".join(self.pending))
            self.pending.clear()
        super().resume(reason)

    def lost(self) -> None:
        if self.peer is None:
            return
        if self._write_stall is not None:
            self._write_stall.cancel()
        self.idle.cancel()
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.close()
        elif getattr(self, "task", None) is not None:
            self.task.cancel()
        if self.decision.forward:
            self._audit()

    def _audit(self) -> None:
        self.server.audit.decision(
            listener=self.server.label,
            peer=self.peer_id_str,
            method="-",
            path="-",
            decision=self.decision,
            status=self.status,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration=self.server.clock() - self.started,
        )


class _HttpConn(_BaseConn):
    """HTTP mode: requests parsed by httptools, decided in order, forwarded through the pool."""

    # Subclass hooks (sidecar.outbound reuses this request/response relaying): the exchange type, and the
    # identity header value sent upstream.
    exchange_class: type[_Exchange]
    # Stall deadlines, made on first use (most connections never need them).
    _write_stall: _LazyTimer | None = None
    _body_stall: _LazyTimer | None = None
    _timer: asyncio.TimerHandle | None = None  # head/idle deadline, set in verified()

    def make_xfcc(self) -> bytes:
        assert self.peer is not None
        return xfcc_value(self.snap.own_id, self.peer.leaf_sha256_hex, self.peer.spiffe_id)

    def verified(self) -> None:
        self.xfcc = self.make_xfcc()
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[_Exchange] = collections.deque()
        self.parsing: _Exchange | None = None
        self.no_more = False  # stop reading requests (error, close requested, upgrade)
        self.tunnel: _Exchange | None = None
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._head_error: tuple[bytes, str] | None = None
        # httptools buffers a header line whole and reports it only when it ends, so on_header's limit
        # comes too late for one huge line: raw bytes fed while a head is open (from the end of the
        # previous message to on_headers_complete) are counted here, and what exceeds the room is never
        # fed. Bytes of a head that begins in the middle of a read are not counted: the bound is
        # max_request_line_bytes + max_header_bytes plus one read.
        self._head_limit = self.server.head_limit
        # Upstream connections corked while one read is parsed (see data_received).
        self._feeding = False
        self._corked: list[UpstreamConnection] = []
        self._in_head = True
        self._head_room = self._head_limit
        self._messages = 0  # completed requests: a head that restarted during a feed is not charged
        # Inside a chunked body, bytes that yield no body byte are chunk-size lines or trailer fields
        # (which httptools also buffers whole): at most _head_limit of them in a row.
        self._body_progress = False
        self._body_quiet = 0
        # One lazily re-armed timer per connection serves the head, idle and upstream-response deadlines
        # (only one applies at a time): moving a deadline is a float store, not a new TimerHandle.
        self.loop = asyncio.get_running_loop()
        self._timer = None
        self._deadline: float | None = None
        self._deadline_kind = _T_HEAD
        # The first request head is due within `request_head` of the handshake.
        self._set_timer(self.server.timeouts.request_head)
        self.arm_expiry()

    def _on_peer_expired(self) -> None:
        if self.closed or self.tunnel is not None or not self.queue:
            super()._on_peer_expired()  # idle (or a tunnel): close now
            return
        # A request is in flight (its body may still be arriving): it finishes, then the connection
        # closes, as when draining (the response says `connection: close` if its head is not sent yet).
        self._expiry_handle = None
        self.server._refuse(self.addr, "expired", "the peer's certificate expired on an open connection")
        self.start_drain()

    # -- deadlines -------------------------------------------------------------------------------------

    def _set_timer(self, seconds: float, kind: int = _T_HEAD) -> None:
        deadline = self.loop.time() + seconds
        self._deadline = deadline
        self._deadline_kind = kind
        t = self._timer
        if t is None or t.when() > deadline:
            if t is not None:
                t.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self, kind: int | None = None) -> None:
        if kind is None or kind == self._deadline_kind:
            self._deadline = None  # the handle fires later, sees no deadline and stops

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.closed:
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        self._deadline = None
        if self._deadline_kind == _T_RESPONSE:
            if self.queue:
                self.queue[0].on_timeout()
        elif not self.queue:
            # Head or idle deadline passed with no request in progress: close quietly (no 408: the peer
            # may be between requests and would race it).
            self.close()

    # -- httptools request callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.no_more:
            raise _StopParsing
        self._url = []
        self._headers = []
        self._head_bytes = 0
        self._head_error = None
        if not self.queue:  # idle -> the head deadline runs from the first byte of this request
            self._set_timer(self.server.timeouts.request_head)

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.server.limits.max_request_line_bytes:
            self._head_error = (RESPONSE_400, "request_line_too_large")
            raise _StopParsing
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A chunked body's trailer section (RFC 9112 §7.1.2): dropped, never forwarded (we end the
            # body with a bare last-chunk) and never added to the request's headers, which may not have
            # been sent yet (a second Host or an XFCC would reach the app).
            return
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.server.limits.max_header_bytes:
            self._head_error = (RESPONSE_431, "headers_too_large")
            raise _StopParsing
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        server = self.server
        parser = self.parser
        ex = self.exchange_class(self, parser.get_method(), self._headers, server.clock())
        # The head as parsed: request line and fields with their CRLFs (optional whitespace around values
        # is not counted). _head_bytes holds the target plus name + value + 4 per field.
        ex.bytes_in = ex.head_in = self._head_bytes + len(ex.method) + 14
        try:
            ex.framing = check_request_headers(self._headers, version=parser.get_http_version())
            ex.target = normalize_target(b"".join(self._url))
            check_method(ex.method)
        except BadRequest as exc:
            label = "headers" if ex.framing is None else ("target" if ex.target is None else "method")
            ex.set_error(RESPONSE_400, label, exc.reason)
        else:
            limit = server.limits.max_body_bytes
            cl = ex.framing.content_length
            if limit is not None and cl is not None and cl > limit:
                ex.set_error(RESPONSE_413, "body_too_large", "Content-Length above max_body_bytes")
        self.parsing = ex
        self.queue.append(ex)
        if ex.error is not None:
            self.no_more = True
        elif ex.framing is not None and (ex.framing.chunked or ex.framing.content_length):
            # A body follows: it must keep arriving (a peer that stops mid-body pins both connections).
            t = self._body_stall
            if t is None:
                t = self._body_stall = _LazyTimer(self.loop, self._on_body_stall)
            t.set(server.timeouts.request_body_stall)
        if len(self.queue) == 1:
            self._cancel_timer()
            ex.start()
        else:
            self.pause(_P_PIPELINE)
        if ex.error is not None:
            raise _StopParsing

    def on_body(self, body: bytes) -> None:
        self._body_progress = True
        ex = self.parsing
        if ex is not None:
            t = self._body_stall
            if t is not None:
                t.set(self.server.timeouts.request_body_stall)
            ex.request_body(body)

    def on_message_complete(self) -> None:
        self._in_head = True  # whatever follows is the next request's head
        self._head_room = self._head_limit
        self._messages += 1
        ex = self.parsing
        if ex is None:
            return
        self.parsing = None
        if self._body_stall is not None:
            self._body_stall.clear()
        if not ex.keep_alive:
            self.no_more = True  # nothing after `Connection: close` (or HTTP/1.0) is read
        ex.request_complete()
        if self.no_more:
            raise _StopParsing

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.tunnel_down(data)
            return
        # Everything this read makes us send upstream goes out in one write after it is parsed: fewer
        # syscalls, and a request whose framing breaks within the read sends the app nothing at all.
        self._feeding = True
        ex = self.parsing
        if ex is not None and ex.upstream is not None and ex.upstream.cork():
            self._corked.append(ex.upstream)
        try:
            self._data_received(data)
        finally:
            self._feeding = False
            corked = self._corked
            if corked:
                for up in corked:
                    up.uncork()
                corked.clear()

    def _data_received(self, data: bytes) -> None:
        while data and not self.no_more:
            if self._in_head:
                room = self._head_room
                if len(data) > room:
                    if room <= 0:
                        # The head did not end within its room: refuse it before httptools copies more.
                        self.no_more = True
                        self.pause(_P_STOP)
                        self._enqueue_error(RESPONSE_431, "headers_too_large", "request head too large")
                        return
                    piece, data = data[:room], data[room:]
                else:
                    piece, data = data, b""
                messages = self._messages
                self._feed(piece, data)
                if self._in_head and self._messages == messages:
                    self._head_room = room - len(piece)
                continue
            # Inside a body.
            self._body_progress = False
            self._feed(data, b"")
            if self._body_progress or self._in_head:
                self._body_quiet = 0
            else:
                self._body_quiet += len(data)
                if self._body_quiet > self._head_limit and not self.no_more:
                    self._stream_error(RESPONSE_431, "headers_too_large", "chunked trailer section too large")
            return

    def _feed(self, data: bytes, tail: bytes) -> None:
        """Feed httptools; `tail` is what follows `data` in this read (the tunnel's, after an upgrade)."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The request asked for a protocol switch; whatever follows its head belongs to the tunnel
            # (only used once the app answers 101 to an authorised request).
            self.no_more = True
            self.pause(_P_STOP)
            rest = data[int(exc.args[0]) :] + tail
            ex = self.queue[-1] if self.queue else None
            if ex is not None and rest:
                ex.tunnel_pending.append(rest)
        except httptools.HttpParserCallbackError:
            self.no_more = True
            self.pause(_P_STOP)
            if self._head_error is not None:
                self._enqueue_error(*self._head_error, "request head too large")
        except httptools.HttpParserError as exc:
            self._stream_error(RESPONSE_400, "malformed", str(exc))

    def _stream_error(self, response: bytes, label: str, detail: str) -> None:
        """The request stream cannot be parsed on: answer `response` (or, mid-response, abort) and close."""
        self.no_more = True
        self.pause(_P_STOP)
        ex = self.parsing
        if ex is not None and ex.started:
            # The body of a request being handled turned out malformed (e.g. a bad chunk size).
            self.parsing = None
            if ex.finished:
                self.close()
            elif ex.response_started:
                ex.abort_both()  # no status can be sent any more
            else:
                self.server.metrics.bad_requests.labels(reason=label).inc()
                ex.release_upstream(False)
                ex.respond_fixed(response, response[9:12])
                ex.finish(keep_alive=False)
        else:
            self._enqueue_error(response, label, detail)

    def _enqueue_error(self, response: bytes, label: str, detail: str) -> None:
        ex = self.parsing if self.parsing is not None and not self.parsing.started else None
        if ex is None:
            ex = self.exchange_class(self, b"-", [], self.server.clock())
            self.queue.append(ex)
        ex.set_error(response, label, detail)
        self.parsing = None
        if self.queue[0] is ex:
            self._cancel_timer()
            ex.start()

    def eof_received(self) -> bool | None:
        # TLS close_notify from the peer: it sends no more. TLS transports cannot stay half-open, so the
        # connection closes (and with it anything in flight).
        self.no_more = True
        return False

    def pause_writing(self) -> None:
        self._write_paused = True
        ex = self.queue[0] if self.queue else self.tunnel
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()
            if ex.resp_any:
                # We stopped reading the app: its silence is ours; write_stall now watches the peer.
                self._cancel_timer(_T_RESPONSE)
        # The peer must take bytes again within write_stall, or it is cut off (it would pin this
        # connection and the upstream one forever: nothing else runs while a response streams).
        t = self._write_stall
        if t is None:
            t = self._write_stall = _LazyTimer(self.loop, self._on_write_stall)
        t.set(self.server.timeouts.write_stall)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._write_stall is not None:
            self._write_stall.clear()
        ex = self.queue[0] if self.queue else self.tunnel
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()
            if ex.resp_any and not ex.finished and ex is not self.tunnel:
                self._set_timer(self.server.timeouts.upstream_response, _T_RESPONSE)

    def _on_write_stall(self) -> None:
        if self.transport is None:
            return
        ex = self.queue[0] if self.queue else self.tunnel
        if ex is not None and ex.started and not ex.finished:
            ex.stalled("write", self.server.timeouts.write_stall)
        else:  # e.g. closing with a fixed response the peer never takes
            self.server.metrics.peer_stalls.labels(listener=self.server.label, kind="write").inc()
            self.abort()

    def _on_body_stall(self) -> None:
        ex = self.parsing
        if self.closed or ex is None or ex.finished:
            return
        t = self.server.timeouts.request_body_stall
        if self._paused:
            # We stopped reading (upstream backpressure, no upstream yet, pipelining): not the peer's stall;
            # the app's side has its own deadlines (upstream_connect, upstream_response).
            assert self._body_stall is not None
            self._body_stall.set(t)
            return
        ex.stalled("request_body", t)

    def connection_lost(self, exc: Exception | None) -> None:
        for t in (self._write_stall, self._body_stall):
            if t is not None:
                t.cancel()
        # The pending head/idle handle holds the bound `_on_timer`: left alone it would keep this closed
        # connection and its transport (TLS buffers, ~256 KiB) alive until the deadline. Here rather than
        # in lost(), which subclasses replace.
        h = self._timer
        if h is not None:
            self._timer = None
            h.cancel()
        super().connection_lost(exc)

    def lost(self) -> None:
        if self.peer is None:
            return
        self._release_exchanges()

    def _release_exchanges(self) -> None:
        """Tell every queued exchange and any tunnel that the downstream is gone."""
        self._cancel_timer()
        for ex in self.queue:
            ex.downstream_lost()
        self.queue.clear()
        if self.tunnel is not None:
            self.tunnel.downstream_lost()
            self.tunnel = None

    def start_drain(self) -> None:
        self.draining = True
        if not self.queue and self.tunnel is None:
            self.close()

    # -- called by exchanges -----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def exchange_done(self, ex: _Exchange, keep_alive: bool) -> None:
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        if not keep_alive or self.draining:
            self.no_more = True
            self.close()
            return
        if self.queue:
            nxt = self.queue[0]
            if len(self.queue) <= 1:
                self.resume(_P_PIPELINE)
            nxt.start()
        elif not self.no_more:
            self.resume(_P_PIPELINE)
            self._set_timer(self.server.timeouts.idle, _T_IDLE)
        else:
            self.close()


# ---------------------------------------------------------------------------------------------------------
# One request/response exchange


class _Exchange:
    """One request: decision, forwarding, response relay. Also the upstream connection's sink and the
    response parser's callback object."""

    __slots__ = (
        "body_done",
        "bytes_in",
        "bytes_out",
        "conn",
        "decision",
        "down_chunked",
        "error",
        "error_detail",
        "error_label",
        "finished",
        "framing",
        "head_in",
        "headers",
        "keep_alive",
        "method",
        "pending",
        "pending_size",
        "resp_any",
        "resp_framed",
        "resp_head",
        "resp_head_room",
        "resp_headers",
        "resp_heads",
        "resp_in_head",
        "resp_interim",
        "resp_parser",
        "resp_progress",
        "resp_quiet",
        "resp_reason",
        "resp_status",
        "response_started",
        "retried",
        "sent_continue",
        "started",
        "status",
        "t0",
        "target",
        "task",
        "tunnel_pending",
        "upstream",
    )

    def __init__(self, conn: _HttpConn, method: bytes, headers: list[tuple[bytes, bytes]], t0: float) -> None:
        self.conn = conn
        self.method = method
        self.headers = headers
        self.t0 = t0
        self.framing: RequestFraming | None = None
        self.target: Target | None = None
        self.error: bytes | None = None
        self.error_label = ""
        self.error_detail = ""
        self.decision: Decision | None = None
        self.keep_alive = True
        self.started = False
        self.finished = False
        self.body_done = False
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.bytes_in = 0
        self.head_in = 0  # bytes_in = head_in + request body bytes
        self.bytes_out = 0
        self.status = 0
        self.upstream: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.sent_continue = False
        self.resp_parser: httptools.HttpResponseParser | None = None
        self.resp_any = False
        self.resp_status = 0
        self.resp_reason = b""
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.resp_in_head = True  # until on_headers_complete of each response (1xx included)
        self.resp_head_room = conn.server.head_limit
        self.resp_heads = 0
        self.resp_progress = False
        self.resp_quiet = 0
        self.resp_interim = False
        self.resp_framed = True
        self.resp_head = b""
        self.response_started = False
        self.down_chunked = False
        self.retried = False
        self.tunnel_pending: list[bytes] = []

    def set_error(self, response: bytes, label: str, detail: str) -> None:
        self.error = response
        self.error_label = label
        self.error_detail = detail
        self.keep_alive = False

    # -- request side --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Decide and act; called when this exchange reaches the head of the connection's queue."""
        if self.started:
            return
        self.started = True
        conn = self.conn
        server = conn.server
        if self.error is not None:
            server.metrics.bad_requests.labels(reason=self.error_label).inc()
            self.respond_fixed(self.error, self.error[9:12])
            self.finish(keep_alive=False)
            return
        framing = self.framing
        target = self.target
        assert framing is not None and target is not None and conn.peer is not None
        if not conn.peer_valid():
            # The peer's certificate expired, or the newest bundles no longer trust it: nothing more is
            # served on this connection (a new handshake would be refused the same way).
            conn.no_more = True
            conn.pause(_P_STOP)
            conn.close()
            return
        self.keep_alive = framing.keep_alive
        method = self.method.decode("ascii")
        self.decision = decision = authorize(server.policy.policy, conn.peer.spiffe_id, method, target.path)
        server.count_request(decision)
        if not decision.forward:
            # A denied request without a body keeps the connection (its head is all there is); one with a
            # body closes it rather than read a body we will never use. start() runs from
            # on_headers_complete, before on_message_complete marks even an empty body done, hence the
            # framing test.
            # A body (even one already read, e.g. pipelined) means the connection closes: the README's rule,
            # and no parsed-but-unused body can be mistaken for the next request.
            bodiless = framing.body is BodyFraming.NONE or framing.content_length == 0
            if bodiless and framing.upgrade is None:
                self.respond_fixed(RESPONSE_403, b"403")
                self.finish(keep_alive=self.keep_alive)
            else:
                self.respond_fixed(RESPONSE_403_CLOSE, b"403")
                self.finish(keep_alive=False)
            return
        up = server.pool.acquire_idle(self)
        if up is not None:  # fast path: a warm pooled connection, no task needed
            self.attach(up)
        else:
            self.task = asyncio.get_running_loop().create_task(self.forward())

    def request_body(self, body: bytes) -> None:
        n = len(body)
        self.bytes_in += n
        limit = self.conn.server.limits.max_body_bytes
        if limit is not None and self.bytes_in - self.head_in > limit:
            self.body_too_large()
            return
        if self.finished or (self.decision is not None and not self.decision.forward):
            return  # denied: drained and dropped
        up = self.upstream
        if up is not None and up.alive:
            assert self.framing is not None
            if self.framing.chunked:
                up.write(b"%x\r\n" % n + body + _CRLF)
            else:
                up.write(body)
            self.conn.server.note_buffered(up.write_buffer_size())
        else:
            self.pending.append(body)
            self.pending_size += n
            self.conn.server.note_buffered(self.pending_size)
            if self.pending_size > _BUFFER_HIGH:
                self.conn.pause(_P_PENDING)

    def request_complete(self) -> None:
        self.body_done = True
        if self.finished:
            return
        up = self.upstream
        if up is not None and up.alive:
            if self.framing is not None and self.framing.chunked:
                up.write(_CHUNK_END)
            if not self.response_started:
                self.conn._set_timer(self.conn.server.timeouts.upstream_response, _T_RESPONSE)

    def body_too_large(self) -> None:
        self.conn.no_more = True
        self.conn.pause(_P_STOP)
        self.conn.server.metrics.bad_requests.labels(reason="body_too_large").inc()
        if not self.response_started and not self.finished:
            self.respond_fixed(RESPONSE_413, b"413")
            self.release_upstream(False)
            self.finish(keep_alive=False)
        else:
            self.abort_both()

    async def forward(self) -> None:
        conn = self.conn
        server = conn.server
        framing = self.framing
        target = self.target
        assert framing is not None and target is not None
        try:
            async with asyncio.timeout(server.timeouts.upstream_connect + server.timeouts.upstream_response):
                up = await server.pool.acquire(self)
        except UpstreamError as exc:
            server.metrics.upstream_errors.labels(listener=server.label, kind=exc.kind).inc()
            self.fail(RESPONSE_502, b"502")
            return
        except TimeoutError:  # every pooled connection stayed busy
            server.metrics.upstream_errors.labels(listener=server.label, kind="pool_exhausted").inc()
            self.fail(RESPONSE_503, b"503")
            return
        if self.finished or conn.closed:
            server.pool.release(up, reusable=False)
            return
        self.attach(up)

    def attach(self, up: UpstreamConnection) -> None:
        """Send the rewritten head (and any body read so far) on a leased upstream connection."""
        conn = self.conn
        server = conn.server
        framing = self.framing
        target = self.target
        assert framing is not None and target is not None
        self.upstream = up
        if conn._feeding and up.cork():
            conn._corked.append(up)
        self.resp_parser = httptools.HttpResponseParser(self)
        self.resp_in_head = True
        self.resp_head_room = server.head_limit
        if conn._write_paused:
            up.pause_reading()
        headers = self.headers
        if framing.expect_continue:
            # RFC 9110 §10.1.1: we answer the expectation ourselves, now that the request is authorised
            # and the app reachable; the app gets no Expect (it would otherwise send its own 100).
            headers = [h for h in headers if h[0].lower() != b"expect"]
            if not self.body_done:
                conn.write(RESPONSE_100)
                self.sent_continue = True
        head = build_request_head(
            self.method,
            target.forward,
            headers,
            xfcc=conn.xfcc,
            chunked=framing.chunked,
            content_length=framing.content_length,
            upgrade=framing.upgrade,
            host_fallback=server.app_host,
            drop=server.request_drop,
        )
        if self.pending:
            body = b"".join(self.pending)
            self.pending.clear()
            self.pending_size = 0
            if framing.chunked:
                body = b"%x\r\n" % len(body) + body + _CRLF if body else b""
            head += body
        if self.body_done and framing.chunked:
            head += _CHUNK_END
        up.write(head)
        conn.resume(_P_PENDING)
        if self.body_done:
            # The wait for the first response byte starts when the request has been sent. While the body
            # still streams, the deadlines are inactivity ones: request_body_stall for the peer, and
            # upstream_response for an app that stops reading it (upstream_pause_writing).
            conn._set_timer(server.timeouts.upstream_response, _T_RESPONSE)

    def on_timeout(self) -> None:
        """The app made no progress for timeouts.upstream_response: no first response byte after the
        request was sent, no response byte for that long mid-response (while the peer reads), or it
        took no request-body byte for that long. 504 if nothing was sent to the peer yet, else both
        connections are dropped."""
        if self.finished or self.conn.tunnel is self:
            return
        self.conn.server.metrics.upstream_errors.labels(listener=self.conn.server.label, kind="timeout").inc()
        self.fail(RESPONSE_504, b"504")

    def fail(self, response: bytes, status: bytes) -> None:
        """The upstream failed before a response head reached the peer: a fixed error, then close."""
        if self.finished:
            return
        self.release_upstream(False)
        if not self.response_started:
            self.respond_fixed(response, status)
            self.finish(keep_alive=False)
        else:
            self.abort_both()

    def respond_fixed(self, response: bytes, status: bytes) -> None:
        if self.method == b"HEAD":
            response = head_only(response)
        self.status = int(status)
        self.response_started = True
        self.bytes_out += len(response)
        self.conn.write(response)

    # -- upstream sink -----------------------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        conn = self.conn
        if conn.tunnel is self:
            self.bytes_out += len(data)
            conn.write(data)
            return
        parser = self.resp_parser
        if parser is None or self.finished:
            return
        # Response-side inactivity: the app must keep sending (a float store; see _set_timer).
        conn._set_timer(conn.server.timeouts.upstream_response, _T_RESPONSE)
        self.resp_any = True
        # As on the request side (_HttpConn.data_received): httptools buffers a header line whole, so the
        # response head's raw bytes are counted and what exceeds its room is never fed. The next hop may
        # be a remote, possibly compromised workload (outbound); an oversized head is a 502.
        while data:
            if self.resp_in_head:
                room = self.resp_head_room
                if len(data) > room:
                    if room <= 0:
                        self.response_too_large("response head too large")
                        return
                    piece, data = data[:room], data[room:]
                else:
                    piece, data = data, b""
                heads = self.resp_heads
                self.resp_feed(parser, piece, data)
                if self.finished or self.resp_parser is not parser or conn.tunnel is self:
                    return
                if self.resp_in_head and self.resp_heads == heads:
                    self.resp_head_room = room - len(piece)
                continue
            # Inside the body: bytes that yield no body byte are chunk-size lines or trailers.
            self.resp_progress = False
            self.resp_feed(parser, data, b"")
            if self.resp_progress or self.resp_in_head:
                self.resp_quiet = 0
            else:
                self.resp_quiet += len(data)
                if self.resp_quiet > conn.server.head_limit:
                    self.response_too_large("response trailer section too large")
            return

    def resp_feed(self, parser: httptools.HttpResponseParser, data: bytes, tail: bytes) -> None:
        conn = self.conn
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            rest = data[int(exc.args[0]) :] + tail
            if conn.tunnel is self and rest:
                self.bytes_out += len(rest)
                conn.write(rest)
        except httptools.HttpParserCallbackError:
            pass  # a callback finished the exchange (e.g. HEAD) and stopped the parser
        except httptools.HttpParserError:
            conn.server.metrics.upstream_errors.labels(listener=conn.server.label, kind="protocol").inc()
            self.fail(RESPONSE_502, b"502")

    def response_too_large(self, detail: str) -> None:
        """The next hop's head (or trailers) passed `InboundServer.head_limit`: 502 if nothing was sent
        to the peer yet, else both connections are dropped. Counted as upstream_errors{kind="head_too_large"}."""
        del detail  # the kind says it; nothing per request is logged
        server = self.conn.server
        server.metrics.upstream_errors.labels(listener=server.label, kind="head_too_large").inc()
        self.fail(RESPONSE_502, b"502")

    def upstream_eof(self) -> None:
        self.upstream_closed()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream_closed()

    def upstream_closed(self) -> None:
        conn = self.conn
        if conn.tunnel is self:
            conn.close()
            return
        if self.finished:
            return
        up = self.upstream
        if self.response_started and self.resp_status >= 200 and not self.resp_framed:
            # A close-delimited response ends here (RFC 9112 §6.3 rule 8).
            self.flush_head()
            if self.down_chunked:
                conn.write(_CHUNK_END)
            self.release_upstream(False)
            self.finish(keep_alive=self.keep_alive and self.down_chunked)
            return
        if (
            not self.resp_any
            and up is not None
            and up.reused
            and not self.retried
            and self.method in _IDEMPOTENT
            and self.framing is not None
            and self.framing.content_length in (None, 0)
            and not self.framing.chunked
            and self.body_done
        ):
            # The app closed a reused keep-alive connection before answering (the idle-close race):
            # retry once on another connection (RFC 9112 §9.3.1).
            self.retried = True
            self.release_upstream(False)
            self.resp_parser = None
            self.task = asyncio.get_running_loop().create_task(self.forward())
            return
        conn.server.metrics.upstream_errors.labels(listener=conn.server.label, kind="closed").inc()
        self.fail(RESPONSE_502, b"502")

    def upstream_pause_writing(self) -> None:
        # The app stopped taking request-body bytes: it must take some within upstream_response.
        conn = self.conn
        conn.pause(_P_UPSTREAM)
        conn._set_timer(conn.server.timeouts.upstream_response, _T_RESPONSE)

    def upstream_resume_writing(self) -> None:
        conn = self.conn
        conn.resume(_P_UPSTREAM)
        if not self.body_done and not self.resp_any:
            conn._cancel_timer(_T_RESPONSE)

    # -- httptools response callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.resp_headers = []
        self.resp_reason = b""

    def on_status(self, reason: bytes) -> None:
        self.resp_reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.resp_in_head:  # trailer fields of a chunked response are dropped
            self.resp_headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.resp_parser
        assert parser is not None and self.framing is not None
        status = parser.get_status_code()
        conn = self.conn
        self.resp_in_head = False
        if status < 200 and status != 101:
            self.resp_interim = True
            if not (status == 100 and self.sent_continue):
                conn.write(build_response_head(status, self.resp_reason, self.resp_headers,
                                               keep_alive=True, chunked=False, content_length=None))
            return
        self.resp_interim = False
        if status == 101 and self.framing.upgrade is None:
            # A 101 nobody asked for: checked before the response counts as started, so the peer gets a
            # clean 502 (and the upstream connection, now in an unknown protocol, is dropped).
            conn.server.metrics.upstream_errors.labels(listener=conn.server.label, kind="protocol").inc()
            self.fail(RESPONSE_502, b"502")
            raise _StopParsing
        self.resp_status = self.status = status
        self.response_started = True
        if status == 101:
            upgrade = next((v for n, v in self.resp_headers if n.lower() == b"upgrade"), self.framing.upgrade)
            head = build_response_head(101, self.resp_reason, self.resp_headers, keep_alive=True,
                                       chunked=False, content_length=None, upgrade=upgrade)
            self.bytes_out += len(head)
            conn.write(head)
            self.start_tunnel()
            return
        content_length: int | None = None
        chunked = False
        for name, value in self.resp_headers:
            lname = name.lower()
            if lname == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    content_length = None
            elif lname == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
        no_body = self.method == b"HEAD" or status in (204, 304)
        if chunked:
            content_length = None
        self.resp_framed = no_body or chunked or content_length is not None
        http10 = conn.parser.get_http_version() == "1.0"
        if self.resp_framed:
            self.down_chunked = chunked and not no_body
        else:
            # Close-delimited response: re-frame as chunked for HTTP/1.1 peers, keep-alive survives.
            self.down_chunked = not http10
        keep_alive = self.keep_alive and (self.resp_framed or self.down_chunked) and not conn.draining
        if not self.body_done:
            keep_alive = False  # the app answered before the whole request arrived
        self.keep_alive = keep_alive
        head = build_response_head(
            status,
            self.resp_reason,
            self.resp_headers,
            keep_alive=keep_alive,
            chunked=self.down_chunked,
            content_length=content_length if (not no_body or self.method == b"HEAD") else None,
        )
        self.bytes_out += len(head)
        # Held back and sent with the first body bytes: one TLS record and one send for small responses.
        self.resp_head = head
        if self.method == b"HEAD" and status not in (204, 304):
            self.flush_head()
            # httptools cannot be told the request was HEAD: it would wait for Content-Length bytes that
            # never come. The response is complete at its head.
            self.response_complete(reusable=parser.should_keep_alive())
            raise _StopParsing

    def on_body(self, body: bytes) -> None:
        self.resp_progress = True
        n = len(body)
        self.bytes_out += n
        conn = self.conn
        head = self.resp_head
        if head:
            self.resp_head = b""
        if self.down_chunked:
            conn.write(head + b"%x\r\n" % n + body + _CRLF)
        else:
            conn.write(head + body if head else body)
        if conn.transport is not None:
            conn.server.note_buffered(conn.transport.get_write_buffer_size())

    def on_message_complete(self) -> None:
        if self.resp_interim:
            self.resp_interim = False
            self.resp_in_head = True  # the next response head follows
            self.resp_head_room = self.conn.server.head_limit
            self.resp_heads += 1
            return
        if self.resp_status == 101 or self.finished:
            return
        head = self.resp_head
        if head:
            self.resp_head = b""
        if self.down_chunked:
            self.conn.write(head + _CHUNK_END)
        elif head:
            self.conn.write(head)
        assert self.resp_parser is not None
        self.response_complete(reusable=self.resp_parser.should_keep_alive())

    def response_complete(self, *, reusable: bool) -> None:
        # The upstream connection is reusable only when the app saw the whole request too.
        self.release_upstream(reusable and self.body_done)
        self.finish(keep_alive=self.keep_alive)

    # -- tunnel (Upgrade) --------------------------------------------------------------------------------

    def start_tunnel(self) -> None:
        conn = self.conn
        up = self.upstream
        assert up is not None
        conn._cancel_timer(_T_RESPONSE)
        conn.tunnel = self
        if conn.queue and conn.queue[0] is self:
            conn.queue.popleft()
        self.resp_parser = None
        if self.tunnel_pending:
            data = b"".join(self.tunnel_pending)
            self.tunnel_pending.clear()
            self.bytes_in += len(data)
            up.write(data)
        conn._cancel_timer()
        conn.arm_expiry()  # no request boundary to re-check the peer at any more
        conn.resume(_P_STOP)
        conn.resume(_P_PIPELINE)

    def tunnel_down(self, data: bytes) -> None:
        self.bytes_in += len(data)
        up = self.upstream
        if up is not None and up.alive:
            up.write(data)

    # -- endings -----------------------------------------------------------------------------------------

    def flush_head(self) -> None:
        if self.resp_head:
            self.conn.write(self.resp_head)
            self.resp_head = b""

    def release_upstream(self, reusable: bool) -> None:
        up = self.upstream
        if up is not None:
            self.upstream = None
            self.conn.server.pool.release(up, reusable=reusable)
        self.conn._cancel_timer(_T_RESPONSE)

    def stalled(self, kind: str, seconds: float) -> None:
        """The peer made no progress for `seconds`: it stopped reading our response (kind "write") or
        sending its request body ("request_body"). End the exchange; the upstream connection is aborted,
        never pooled (the app may be mid-message). Counted, and audited with status 408 and the reason."""
        if self.finished:
            return
        conn = self.conn
        server = conn.server
        server.metrics.peer_stalls.labels(listener=server.label, kind=kind).inc()
        if self.decision is not None:
            what = "stopped reading the response" if kind == "write" else "stopped sending the request body"
            self.decision = dataclasses.replace(
                self.decision, reason=f"{self.decision.reason}; cut off: the peer {what} for {seconds:g}s"
            )
        if self.task is not None and not self.task.done():
            self.task.cancel()
        up = self.upstream
        if up is not None:
            up.abort()
        self.release_upstream(False)
        conn.no_more = True
        conn.pause(_P_STOP)
        if kind == "request_body" and not self.response_started:
            self.respond_fixed(_RESPONSE_408, b"408")
            self.finish(keep_alive=False)  # closes once the 408 is flushed
            return
        self.status = _STALLED
        self.resp_head = b""
        self.finish(keep_alive=False)
        conn.abort()

    def abort_both(self) -> None:
        """Mid-response failure: no status can be sent any more; drop both connections."""
        if self.finished:
            return
        self.resp_head = b""
        up = self.upstream
        if up is not None:
            up.abort()
        self.release_upstream(False)
        self.finish(keep_alive=False)
        self.conn.abort()

    def downstream_lost(self) -> None:
        """The peer went away: stop the upstream side."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        up = self.upstream
        if up is not None:
            up.abort()
        self.release_upstream(False)
        if self.conn.tunnel is self:
            self.conn.tunnel = None
        self.finish(keep_alive=False, notify=False)

    def finish(self, *, keep_alive: bool, notify: bool = True) -> None:
        """Exactly once per exchange: the audit line and latency, then the connection moves on."""
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        server = conn.server
        if self.decision is not None:
            duration = server.clock() - self.t0
            server.latency.observe(duration)
            assert self.target is not None
            server.audit.decision(
                listener=server.label,
                peer=conn.peer_id_str,  # str(SpiffeId) computed once per connection
                method=self.method.decode("ascii", "replace"),
                path=self.target.path,
                decision=self.decision,
                status=self.status,
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                duration=duration,
            )
        if notify and conn.tunnel is not self:
            conn.exchange_done(self, keep_alive)


_HttpConn.exchange_class = _Exchange
