"""The HTTP/1.1 proxy of the data plane, one for both directions (edge).

`HttpConnection` is the protocol of one downstream connection (mTLS caller inbound, the app outbound):
a `RequestReader` turns its bytes into requests, each request becomes an `Exchange`, exchanges run one at
a time in order (pipelined ones wait, reading paused). An exchange is one driver: decide, lease an
upstream connection, relay both ways. Its collaborators are values handed in, never back-pointers:

* an `Authorizer` (inbound: the policy; outbound: the routes and their expected server IDs) turns the
  caller, method, normalised target and authority into a `Grant`: the decision and, when it forwards,
  the `Dialer` to use;
* a `Dialer` (inbound: the app over loopback; outbound: a route's pool of verified mTLS connections)
  leases and takes back upstream connections and says what to answer when it cannot;
* an `Observer` (audit + metrics) hears about every finished exchange, refusal, bad request, upstream
  error and stall.

Where an exchange is, is `sidecar.exchange.ExchangeState` (the state table); connection-level facts (why
reading is paused, which deadline runs) stay here. Deadlines measure inactivity, never a whole exchange:
the head deadline from the first byte of a request; idle between requests; `request_body_stall` while
the caller's body arrives; `write_stall` while the caller takes no response bytes; and `upstream_response`
for the app's side (the first response byte once the request was sent, silence mid-response while the
caller reads, a request body the app stops taking). One lazy `Deadline` per connection serves head, idle
and the app's side; the stall deadlines are made on first use.

Everything one read of the caller's bytes makes us send upstream goes out in one write after the read is
parsed (the upstream connection is corked meanwhile): fewer syscalls, and a request whose framing breaks
within the read sends the app nothing.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import re
import time
from collections.abc import Callable
from typing import Final, NamedTuple, Protocol

from .audit import access_members, json_string
from .config import Limits, Timeouts
from .errors import SourceError
from .exchange import ExchangeState, ProtocolViolation, Req, ReqEvent, Resp, RespEvent
from .h1reader import RequestReader, ResponseReader
from .http1 import (
    CHUNK_END,
    JWT_AUDIENCE,
    JWT_SUBJECT,
    RESPONSE_100,
    RESPONSE_400,
    RESPONSE_401,
    RESPONSE_401_CLOSE,
    RESPONSE_403,
    RESPONSE_403_CLOSE,
    RESPONSE_413,
    RESPONSE_502,
    RESPONSE_504,
    BadRequest,
    BadResponse,
    BodyFraming,
    RequestHead,
    RequestHeads,
    ResponseFraming,
    ResponseHeads,
    check_method,
    chunk,
    head_only,
    interim_head,
    request_head,
    switching_head,
    without_field,
)
from .listener import Gate, Listener, Peer, transport_of
from .observer import Observer
from .policy import Decision, Target
from .timers import Deadline
from .tls import TlsSnapshot
from .upstream import UpstreamConnection, UpstreamError

__all__ = ["Authorizer", "DialFailure", "Dialer", "Grant", "HttpConnection", "HttpContext"]

# Bytes buffered in Python per direction before reading from the other side pauses. Transports get the
# same high-water mark, so a connection holds O(this) however large the bodies are.
BUFFER_HIGH: Final = 64 * 1024
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Why reading from the caller is paused (a bit each; reading resumes when none is left).
_P_PENDING: Final = 1  # request body buffered while no upstream connection is leased yet
_P_UPSTREAM: Final = 2  # the upstream transport's write buffer is full
_P_PIPELINE: Final = 4  # a pipelined request waits behind the active one
_P_STOP: Final = 8  # no more requests will be read on this connection

# A request line the fast path takes (else the C parser decides): a token method, an origin-form target of
# unreserved, sub-delims, ":", "@", "/", "?" and "%" only, HTTP/1.0 or 1.1 (RFC 9112 §3, RFC 3986 §3.3).
_REQUEST_LINE_RE: Final = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*) HTTP/1\.([01])"
)

# Request ids and trace ids: unique, not secret (Mersenne Twister seeded from the OS, one draw per id).
_RANDOM: Final = random.Random(os.urandom(32))  # noqa: S311 - ids must be unique, not secret
_HEX32: Final = re.compile(rb"[0-9a-f]{32}")


# Access-log members of a request head by (Host, User-Agent, HTTP/1.0), bounded (cleared when full).
_HEAD_MEMBERS: Final[dict[tuple[bytes | None, bytes | None, bool], str]] = {}
_HEAD_MEMBERS_MAX: Final = 256


def _new_id() -> bytes:
    return b"%032x" % _RANDOM.getrandbits(128)
_FAST_METHODS: Final = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})

# Kinds of the connection's one lazy deadline.
_T_HEAD: Final = 1
_T_IDLE: Final = 2
_T_APP: Final = 3

# A caller that stalls (write_stall / request_body_stall) is cut off; its exchange is audited with 408
# whatever was sent. It gets this 408 only for a stalled request body while no response has started
# (RFC 9110 §15.5.9).
_STALLED: Final = 408
_RESPONSE_408: Final = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: 27\r\n"
    b'connection: close\r\n\r\n{"error":"request timeout"}'
)


class Grant(NamedTuple):
    """What the authorizer says of one request: the decision and the dialer that reaches the upstream
    (None when nothing is forwarded); a refusal may bring its own answer (else the fixed 403) and a kind
    counted in upstream_errors (outbound: no route for the Host)."""

    decision: Decision
    dialer: Dialer | None
    refusal: bytes | None = None
    error_kind: str | None = None
    bearer: Bearer | None = None  # outbound: a JWT-SVID to attach to the forwarded request


class Bearer(Protocol):
    """Outbound: the JWT-SVID a route attaches to requests under one path prefix (sidecar.outbound)."""

    replace: bool  # True: ours replaces an Authorization field from the app; False: the app's is kept

    def line(self) -> bytes | None:
        """The `authorization: Bearer ...` field line when a usable token is held (no await), else None."""
        ...

    async def fetch(self) -> bytes:
        """The field line, fetching a token under a deadline; SourceError with a one-line reason."""
        ...

    def info(self) -> tuple[str, str, str]:
        """Subject, audience and key id of the token of the last line (the audit line's jwt_* members)."""
        ...

    def refusal(self, reason: str) -> bytes:
        """The app's answer when no token could be had (503)."""
        ...


class Authorizer(Protocol):
    def target(self, raw: bytes) -> tuple[Target, bytes | None]:
        """The normalised request target, and the authority of an absolute-form target (None for origin
        form). Raises BadRequest (a 400)."""
        ...

    def check(self, peer: Peer, method: bytes, target: Target, authority: bytes | None) -> Grant:
        """Decide one request of `peer`."""
        ...

    def check_connection(self, peer: Peer) -> Grant:
        """Decide a TCP-mode connection on the caller alone."""
        ...

    def step_up(self, decision: Decision, peer: Peer, authorization: bytes | None) -> StepUp:
        """The final decision of a step-up rule (`decision.jwt`) for the request's Authorization value."""
        ...


class StepUp(NamedTuple):
    """A step-up check: the final decision, whether a refusal is a 401 challenge, and the validated token's
    subject, audience and key id (for the app and the audit line), or None."""

    decision: Decision
    challenge: bool
    token: tuple[str, str, str] | None


class DialFailure(NamedTuple):
    """What the caller gets when no upstream connection could be leased."""

    response: bytes
    status: int
    decision: Decision | None  # replaces the grant's decision in the audit line (outbound: server refused)
    peer: str  # the audited peer ("-", or the server ID a refused server presented)


class Dialer(Protocol):
    authority: bytes  # the Host for a request that carries none (HTTP/1.0)

    def acquire_idle(self, sink: UpstreamSinkT) -> UpstreamConnection | None: ...
    async def acquire(self, sink: UpstreamSinkT) -> UpstreamConnection: ...
    def release(self, up: UpstreamConnection, *, reusable: bool) -> None: ...

    def unavailable(self) -> bytes | None:
        """A fast answer when the upstream is known to be down (outbound backoff), else None."""
        ...

    def failure(self, exc: UpstreamError) -> DialFailure: ...

    def exhausted(self) -> bytes:
        """The answer when every pooled connection stayed busy."""
        ...

    def connected(self) -> None:
        """A lease succeeded (outbound: the route is up again)."""
        ...

    def peer_of(self, up: UpstreamConnection) -> tuple[str, float]:
        """The upstream's verified SPIFFE ID ("-" for the app) and its chain's expiry (epoch seconds)."""
        ...


class UpstreamSinkT(Protocol):
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_eof(self) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class HttpContext:
    """What every connection of one listener shares (built once)."""

    listener: Listener
    gate: Gate
    authorizer: Authorizer
    observer: Observer
    timeouts: Timeouts
    limits: Limits
    request_heads: RequestHeads  # the request-head parser of this listener (its drop set, its cache)
    upstream_peer: bool  # audit the upstream's SPIFFE ID as `peer` (outbound) instead of the caller's
    clock: Callable[[], float]
    response_heads: ResponseHeads = dataclasses.field(default_factory=ResponseHeads)
    forward_jwt: bool = False  # inbound: forward a validated step-up token to the app (else stripped)

    @property
    def head_room(self) -> int:
        return self.limits.max_request_line_bytes + self.limits.max_header_bytes


# ---------------------------------------------------------------------------------------------------------
# The downstream connection


class HttpConnection(asyncio.Protocol):
    """One downstream connection in HTTP mode (see the module docstring)."""

    def __init__(self, ctx: HttpContext, snap: TlsSnapshot, addr: str) -> None:
        self.ctx = ctx
        self.snap = snap
        self.addr = addr
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.closed = False
        self.draining = False
        self.write_paused = False
        self._paused = 0
        self.queue: collections.deque[Exchange] = collections.deque()
        self.parsing: Exchange | None = None  # the exchange whose request is being read
        self.tunnel: Exchange | None = None
        self.reader: RequestReader | None = None
        self.access = ""
        self.deadline: Deadline | None = None
        self._write_stall: Deadline | None = None
        self._body_stall: Deadline | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._feeding = False
        self._corked: list[UpstreamConnection] = []
        self.loop = asyncio.get_running_loop()

    # -- asyncio.Protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = transport_of(transport)
        peer = self.ctx.gate.admit(t, self.snap, self.addr)
        if peer is None:
            self.transport = t
            self.closed = True
            t.abort()
            return
        self.serve(t, peer)

    def serve(self, t: asyncio.Transport, peer: Peer) -> None:
        """Start serving `peer` on `t` (the gate admitted it)."""
        ctx = self.ctx
        self.transport = t
        self.peer = peer
        # The connection's access-log members, rendered once.
        self.access = access_members(tls=peer.tls, source=self.addr)
        t.set_write_buffer_limits(high=BUFFER_HIGH)
        ctx.listener.track(self)
        limits = ctx.limits
        self.reader = RequestReader(self, head_room=ctx.head_room, line_room=limits.max_request_line_bytes,
                                    field_room=limits.max_header_bytes)  # fmt: skip
        self.deadline = Deadline(self.loop, self._on_deadline)
        self.deadline.set(ctx.timeouts.request_head, _T_HEAD)  # the first head is due within request_head
        self._arm_expiry()

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.tunnel_down(data)
            return
        reader = self.reader
        if reader is None:
            return
        self._feeding = True
        ex = self.parsing
        if ex is not None and ex.upstream is not None and ex.upstream.cork():
            self._corked.append(ex.upstream)
        try:
            if ex is not None or self.queue or not reader.at_message_start or not self._whole_request(data):
                dl = self.deadline
                if not self.queue and dl is not None and dl.kind == _T_IDLE:
                    # Idle -> a request begins: its head is due within request_head of this first byte.
                    dl.set(self.ctx.timeouts.request_head, _T_HEAD)
                reader.feed(data)
        except ProtocolViolation as exc:
            self._violation(exc)
        finally:
            self._feeding = False
            corked = self._corked
            if corked:
                for up in corked:
                    up.uncork()
                corked.clear()

    def _violation(self, exc: ProtocolViolation) -> None:
        """An event the exchange's state table has no edge for: nothing more is relayed either way."""
        self.ctx.observer.bad_request("protocol_violation")
        self.ctx.observer.refusal_log(logging.ERROR, "%s: %s: closed: %s", self.ctx.observer.label, self.addr,
                                      exc)  # fmt: skip
        for ex in list(self.queue):
            ex.abort_upstream()
        self.stop_reading()
        self.abort()

    def _whole_request(self, data: bytes) -> bool:
        """The fast path: one whole request in one read, its field block one the full path (the C parser
        and `parse_request_head`) already accepted byte for byte or one in the conservative subset of
        RFC 9112 §5 of `RequestHeads.simple`, its request line in a conservative subset of RFC 9112 §3
        (a token method, an origin-form target of RFC 3986 characters, HTTP/1.x),
        its body (Content-Length only) complete, nothing after it. The request is handled exactly as if
        the reader had reported it; the parser, still at the start of a message, is not fed."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        line = data.find(b"\r\n")
        ctx = self.ctx
        m = _REQUEST_LINE_RE.fullmatch(data, 0, line)
        if m is None or line > ctx.limits.max_request_line_bytes or end + 4 > ctx.head_room:
            return False  # the full path decides (and refuses what is too large)
        if m.group(1) not in _FAST_METHODS:
            return False  # llhttp knows a fixed set of methods; only common ones skip it
        http10 = m.group(3) == b"0"
        raw = data[line + 2 : end + 2]
        head = ctx.request_heads.simple(m.group(1), m.group(2), raw, http10)
        if head is None:
            return False
        framing = head.framing
        if framing.upgrade is not None:
            return False  # the full path stops reading at an Upgrade request
        body = len(data) - end - 4
        if framing.body is BodyFraming.NONE:
            if body:
                return False
        elif framing.body is not BodyFraming.CONTENT_LENGTH or body != framing.content_length:
            return False
        self._request(m.group(1), m.group(2), head)
        if body and self.parsing is not None:
            self.request_body(data[end + 4 :])
        self.request_end()
        return True

    def eof_received(self) -> bool | None:
        # TLS close_notify from the peer: it sends no more. TLS transports cannot stay half-open, so the
        # connection closes (and with it anything in flight).
        if self.reader is not None:
            self.reader.stop()
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.queue[0] if self.queue else self.tunnel
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()
            if ex.resp is Resp.STREAMING:
                # We stopped reading the app: its silence is ours; write_stall now watches the caller.
                self.clear_deadline(_T_APP)
        # The caller must take bytes again within write_stall, or it is cut off (it would pin this
        # connection and the upstream one).
        t = self._write_stall
        if t is None:
            t = self._write_stall = Deadline(self.loop, self._on_write_stall)
        t.set(self.ctx.timeouts.write_stall)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._write_stall is not None:
            self._write_stall.clear()
        ex = self.queue[0] if self.queue else self.tunnel
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()
            if ex.resp is Resp.STREAMING:
                self.set_deadline(self.ctx.timeouts.upstream_response, _T_APP)

    def connection_lost(self, exc: Exception | None) -> None:
        for t in (self.deadline, self._write_stall, self._body_stall):
            if t is not None:
                t.close()  # drops its callback too: no cycle left for the GC to find
        h = self._expiry
        if h is not None:
            self._expiry = None
            h.cancel()
        self.closed = True
        ctx = self.ctx
        ctx.listener.untrack(self)
        ctx.listener.released()
        for ex in self.queue:
            ex.downstream_lost()
        self.queue.clear()
        if self.tunnel is not None:
            self.tunnel.downstream_lost()
            self.tunnel = None
        # Drop the transport (and with it the TLS buffers) now rather than when the cyclic GC finds this
        # protocol: long-lived connections reach the oldest generation, which is rarely collected.
        self.transport = None
        if self.reader is not None:
            self.reader.release()
            self.reader = None

    # -- reading control ---------------------------------------------------------------------------------

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

    def stop_reading(self) -> None:
        """No more requests are read on this connection."""
        if self.reader is not None:
            self.reader.stop()
        self.pause(_P_STOP)

    def cork(self, up: UpstreamConnection) -> None:
        """Writes to `up` while this read is parsed go out together after it (module docstring)."""
        if self._feeding and up.cork():
            self._corked.append(up)

    # -- deadlines ---------------------------------------------------------------------------------------

    def set_deadline(self, seconds: float, kind: int) -> None:
        if self.deadline is not None:
            self.deadline.set(seconds, kind)

    def clear_deadline(self, kind: int | None = None) -> None:
        if self.deadline is not None:
            self.deadline.clear(kind)

    def _on_deadline(self, kind: int) -> None:
        if self.closed:
            return
        if kind == _T_APP:
            if self.queue:
                self.queue[0].app_timeout()
        elif not self.queue:
            # Head or idle deadline with no request in progress: close quietly (no 408: the caller may be
            # between requests and would race it).
            self.close()

    def _on_write_stall(self, _kind: int) -> None:
        if self.transport is None:
            return
        ex = self.queue[0] if self.queue else self.tunnel
        if ex is not None and ex.resp is not Resp.QUEUED and not ex.over:
            ex.stalled("write", self.ctx.timeouts.write_stall)
        else:  # e.g. closing with a fixed response the caller never takes
            self.ctx.observer.stall("write")
            self.abort()

    def _on_body_stall(self, _kind: int) -> None:
        ex = self.parsing
        if self.closed or ex is None or ex.over:
            return
        t = self.ctx.timeouts.request_body_stall
        if self._paused:
            # We stopped reading (upstream backpressure, no upstream yet, pipelining): not the caller's
            # stall; the app's side has its own deadlines.
            assert self._body_stall is not None
            self._body_stall.set(t)
            return
        ex.stalled("request_body", t)

    def body_progress(self) -> None:
        t = self._body_stall
        if t is not None:
            t.set(self.ctx.timeouts.request_body_stall)

    # -- peer validity -------------------------------------------------------------------------------------

    def _arm_expiry(self) -> None:
        """At the peer certificate's expiry an idle connection (or a tunnel) closes before a request can
        race the check; one with a request in flight finishes it and then closes."""
        peer = self.peer
        if peer is None or peer.spiffe_id is None or self._expiry is not None or self.closed:
            return
        delay = max(0.0, peer.expires - time.time())
        self._expiry = self.loop.call_later(delay, self._on_peer_expired)

    def _on_peer_expired(self) -> None:
        self._expiry = None
        if self.closed:
            return
        self.ctx.observer.refused(self.addr, "expired", "the peer's certificate expired on an open connection")
        if self.tunnel is not None or not self.queue:
            self.abort()
            return
        self.start_drain()

    # -- called by exchanges -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None:
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        if not keep_alive or self.draining:
            self.stop_reading()
            self.close()
            return
        if self.queue:
            nxt = self.queue[0]
            if len(self.queue) <= 1:
                self.resume(_P_PIPELINE)
            nxt.start()
        elif self.reader is not None and not self.reader.stopped:
            self.resume(_P_PIPELINE)
            self.set_deadline(self.ctx.timeouts.idle, _T_IDLE)
        else:
            self.close()

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
        if not self.queue and self.tunnel is None:
            self.close()

    # -- RequestSink -------------------------------------------------------------------------------------

    def request_head(
        self, method: bytes, target: bytes, names: list[bytes], values: list[bytes], http10: bool,
        raw: bytes | None,
    ) -> None:  # fmt: skip
        try:
            head = self.ctx.request_heads.parse(method, target, names, values, http10, raw)
        except BadRequest as exc:
            ex = Exchange(self, method, self.ctx.clock())
            ex.set_error(RESPONSE_400, "headers", exc.reason)
            self._begin(ex)
            return
        self._request(method, target, head)

    def _request(self, method: bytes, target: bytes, head: RequestHead) -> None:
        """A checked request head: its exchange is queued and, when first in line, started."""
        ctx = self.ctx
        framing = head.framing
        ex = Exchange(self, method, ctx.clock(), framing.body is BodyFraming.NONE or framing.content_length == 0)
        ex.head = head
        ex.bytes_in = ex.head_size = len(method) + len(target) + 14 + head.fields_size
        try:
            ex.target, authority = ctx.authorizer.target(target)
            if authority is not None:
                ex.authority = authority
            check_method(method)
        except BadRequest as exc:
            ex.set_error(RESPONSE_400, "target" if ex.target is None else "method", exc.reason)
        else:
            limit = ctx.limits.max_body_bytes
            cl = framing.content_length
            if limit is not None and cl is not None and cl > limit:
                ex.set_error(RESPONSE_413, "body_too_large", "Content-Length above max_body_bytes")
        self._begin(ex)

    def _begin(self, ex: Exchange) -> None:
        ctx = self.ctx
        self.parsing = ex
        self.queue.append(ex)
        if ex.error is not None:
            self.stop_reading()
        elif ex.req is Req.BODY:
            # A body follows: it must keep arriving (a caller that stops mid-body pins both connections).
            t = self._body_stall
            if t is None:
                t = self._body_stall = Deadline(self.loop, self._on_body_stall)
            t.set(ctx.timeouts.request_body_stall)
        if len(self.queue) == 1:
            self.clear_deadline()
            ex.start()
        else:
            self.pause(_P_PIPELINE)

    def request_body(self, data: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            t = self._body_stall
            if t is not None:
                t.set(self.ctx.timeouts.request_body_stall)
            ex.request_body(data)

    def request_end(self) -> None:
        ex = self.parsing
        if ex is None:
            return
        self.parsing = None
        if self._body_stall is not None:
            self._body_stall.clear()
        if not ex.keep_alive:
            self.stop_reading()  # nothing after `Connection: close` (or HTTP/1.0) is read
        ex.request_complete()

    def request_upgrade(self, rest: bytes) -> None:
        self.pause(_P_STOP)
        ex = self.queue[-1] if self.queue else None
        if ex is not None and rest:
            ex.tunnel_pending = rest

    def request_error(self, response: bytes, label: str, detail: str) -> None:
        """The request stream cannot be parsed on: answer `response` (or, mid-response, abort) and close."""
        self.pause(_P_STOP)
        ex = self.parsing
        if ex is not None and ex.resp is not Resp.QUEUED:
            # The body of a request being handled turned out malformed (e.g. a bad chunk size).
            self.parsing = None
            ex.broken_request(response, label)
            return
        if ex is None:
            ex = Exchange(self, b"-", self.ctx.clock())
            self.queue.append(ex)
        ex.set_error(response, label, detail)
        self.parsing = None
        if self.queue[0] is ex:
            self.clear_deadline()
            ex.start()


# ---------------------------------------------------------------------------------------------------------
# One exchange


class Exchange(ExchangeState):
    """One request and its response: decide, lease, relay (see the module docstring). The upstream
    connection's sink and its response reader's sink while leased. It is its own `ExchangeState`."""

    __slots__ = (
        "auth_line",
        "authority",
        "bearer",
        "bytes_in",
        "bytes_out",
        "chunked_down",
        "conn",
        "decision",
        "dialer",
        "error",
        "error_detail",
        "error_label",
        "failure",
        "finished",
        "framing",
        "head",
        "head_size",
        "keep_alive",
        "method",
        "peer_text",
        "pending",
        "pending_size",
        "reader",
        "request_id",
        "resp_any",
        "resp_head",
        "retried",
        "sent_continue",
        "status",
        "t0",
        "target",
        "task",
        "token",
        "trace",
        "tunnel_pending",
        "upstream",
    )

    def __init__(self, conn: HttpConnection, method: bytes, t0: float, bodiless: bool = True) -> None:
        # An exchange for a request that failed before its framing was known reads no body (bodiless).
        self.req = Req.DONE if bodiless else Req.BODY
        self.resp = Resp.QUEUED
        self.conn = conn
        self.method = method
        self.t0 = t0
        self.head: RequestHead | None = None
        self.head_size = 0
        self.target: Target | None = None
        self.authority: bytes | None = None  # from an absolute-form target (outbound proxy port)
        self.error: bytes | None = None
        self.error_label = ""
        self.error_detail = ""
        self.decision: Decision | None = None
        self.dialer: Dialer | None = None
        self.keep_alive = True
        self.pending: list[bytes] | None = None  # request body read before an upstream is leased
        self.pending_size = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.upstream: UpstreamConnection | None = None
        self.reader: ResponseReader | None = None
        self.task: asyncio.Task[None] | None = None
        self.sent_continue = False
        self.resp_any = False
        self.resp_head = b""
        self.chunked_down = False
        self.framing = ResponseFraming.NONE  # how the app delimits its response body
        self.finished = False
        self.retried = False
        self.peer_text: str | None = None  # the audited peer when it is not the connection's
        self.request_id: bytes | None = None  # the X-Request-Id we made (None: the caller's, or none yet)
        self.trace: bytes | None = None  # the traceparent forwarded (the caller's or one we started)
        # A validated step-up JWT-SVID (inbound) or the one attached (outbound): subject, audience, kid.
        self.token: tuple[str, str, str] | None = None
        self.bearer: Bearer | None = None  # outbound: the JWT-SVID to attach
        self.auth_line: bytes | None = None  # ... as the field line sent upstream
        self.failure = ""  # why the upstream failed (access log), "" when it did not
        self.tunnel_pending = b""  # bytes after an Upgrade request's head (the tunnel's first)

    def set_error(self, response: bytes, label: str, detail: str) -> None:
        self.error = response
        self.error_label = label
        self.error_detail = detail
        self.keep_alive = False

    # -- request side --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Decide and act; called when this exchange reaches the head of the connection's queue."""
        st = self
        if st.resp is not Resp.QUEUED:
            return
        conn = self.conn
        ctx = conn.ctx
        if self.error is not None:
            ctx.observer.bad_request(self.error_label)
            self.respond_local(self.error)
            self.finish(keep_alive=False)
            return
        head = self.head
        target = self.target
        peer = conn.peer
        assert head is not None and target is not None and peer is not None
        if not ctx.gate.still_valid(peer, conn.transport, conn.addr):
            # The peer's certificate expired, or the newest bundles no longer trust it: nothing more is
            # served on this connection (a new handshake would be refused the same way).
            conn.stop_reading()
            conn.close()
            return
        framing = head.framing
        self.keep_alive = framing.keep_alive
        grant = ctx.authorizer.check(peer, self.method, target, self.authority or head.host)
        self.decision = decision = grant.decision
        if decision.jwt is not None:
            su = ctx.authorizer.step_up(decision, peer, head.authorization)
            self.decision = decision = su.decision
            self.token = su.token
            if not decision.forward:
                bodiless = framing.body is BodyFraming.NONE or framing.content_length == 0
                keep = bodiless and framing.upgrade is None
                if su.challenge:
                    self.respond_local(RESPONSE_401 if keep else RESPONSE_401_CLOSE)
                else:
                    self.respond_local(RESPONSE_403 if keep else RESPONSE_403_CLOSE)
                self.finish(keep_alive=self.keep_alive and keep)
                return
        if grant.refusal is not None:
            if grant.error_kind is not None:
                ctx.observer.upstream_error(grant.error_kind)
            self.respond_local(grant.refusal)
            self.finish(keep_alive=False)
            return
        if not decision.forward or grant.dialer is None:
            # A denied request without a body keeps the connection (its head is all there is); one with a
            # body (even one already read) closes it: no unused body can be taken for the next request.
            if (framing.body is BodyFraming.NONE or framing.content_length == 0) and framing.upgrade is None:
                self.respond_local(RESPONSE_403)
                self.finish(keep_alive=self.keep_alive)
            else:
                self.respond_local(RESPONSE_403_CLOSE)
                self.finish(keep_alive=False)
            return
        dialer = self.dialer = grant.dialer
        down = dialer.unavailable()
        if down is not None:
            ctx.observer.upstream_error("down")
            self.respond_local(down)
            self.finish(keep_alive=False)
            return
        bearer = grant.bearer
        st.response(RespEvent.LEASE)
        if bearer is not None and (bearer.replace or head.authorization is None):
            self.bearer = bearer
            line = self.auth_line = bearer.line()
            if line is None:  # no usable token held: fetched by the lease task first
                self.task = conn.loop.create_task(self.lease())
                return
            self.token = bearer.info()
        up = dialer.acquire_idle(self)
        if up is not None:  # fast path: a warm pooled connection, no task needed
            self.attach(up)
        else:
            self.task = conn.loop.create_task(self.lease())

    def request_body(self, data: bytes) -> None:
        n = len(data)
        self.bytes_in += n
        st = self
        st.request(ReqEvent.BODY)  # a body for a request that has none is a ProtocolViolation
        limit = self.conn.ctx.limits.max_body_bytes
        head = self.head
        if limit is not None and self.bytes_in - self.head_size > limit:
            self.body_too_large()
            return
        if st.over:
            return  # denied or answered: drained and dropped
        up = self.upstream
        if up is not None and up.alive and st.resp is not Resp.LEASING:
            assert head is not None
            up.write(chunk(data) if head.framing.body is BodyFraming.CHUNKED else data)
            self.conn.ctx.observer.buffered(up.write_buffer_size())
        else:
            if self.pending is None:
                self.pending = [data]
            else:
                self.pending.append(data)
            self.pending_size += n
            self.conn.ctx.observer.buffered(self.pending_size)
            if self.pending_size > BUFFER_HIGH:
                self.conn.pause(_P_PENDING)

    def request_complete(self) -> None:
        st = self
        if st.req is Req.BODY:
            st.request(ReqEvent.END)
        if st.over:
            return
        up = self.upstream
        if up is not None and up.alive and (st.resp is Resp.AWAITING or st.resp is Resp.STREAMING):
            head = self.head
            if head is not None and head.framing.body is BodyFraming.CHUNKED:
                up.write(CHUNK_END)
            if not self.resp_any:
                self.conn.set_deadline(self.conn.ctx.timeouts.upstream_response, _T_APP)

    def body_too_large(self) -> None:
        conn = self.conn
        conn.stop_reading()
        conn.ctx.observer.bad_request("body_too_large")
        if not self.response_started and not self.over:
            self.release_upstream(False)
            self.respond_local(RESPONSE_413)
            self.finish(keep_alive=False)
        else:
            self.abort_both()

    def broken_request(self, response: bytes, label: str) -> None:
        """The body of this (already started) request turned out malformed."""
        st = self
        conn = self.conn
        if st.over:
            conn.close()
        elif st.response_started:
            self.abort_both()  # no status can be sent any more
        else:
            conn.ctx.observer.bad_request(label)
            self.release_upstream(False)
            if self.task is not None and not self.task.done():
                self.task.cancel()
            self.respond_local(response)
            self.finish(keep_alive=False)

    async def lease(self) -> None:
        conn = self.conn
        ctx = conn.ctx
        dialer = self.dialer
        assert dialer is not None
        bearer = self.bearer
        if bearer is not None and self.auth_line is None:
            try:
                self.auth_line = await bearer.fetch()  # under the fetcher's deadline
            except SourceError as exc:
                ctx.observer.upstream_error("jwt_svid")
                self.failure = "jwt_svid"
                self.fail(bearer.refusal(exc.args[0] if exc.args else "no JWT-SVID"))
                return
            self.token = bearer.info()
            if self.over or conn.closed:
                return
        t = ctx.timeouts
        try:
            async with asyncio.timeout(t.upstream_connect + t.upstream_response):
                up = await dialer.acquire(self)
        except UpstreamError as exc:
            ctx.observer.upstream_error(exc.kind)
            failure = dialer.failure(exc)
            if failure.decision is not None:
                self.decision = failure.decision
            self.peer_text = failure.peer
            self.failure = exc.failure
            self.fail(failure.response)
            return
        except TimeoutError:  # every pooled connection stayed busy
            ctx.observer.upstream_error("pool_exhausted")
            self.failure = "pool_exhausted"
            self.fail(dialer.exhausted())
            return
        dialer.connected()
        if self.over or conn.closed:
            dialer.release(up, reusable=False)
            return
        self.attach(up)

    def attach(self, up: UpstreamConnection) -> None:
        """Send the rewritten head (and any body read so far) on a leased upstream connection."""
        conn = self.conn
        ctx = conn.ctx
        head = self.head
        target = self.target
        peer = conn.peer
        dialer = self.dialer
        assert head is not None and target is not None and peer is not None and dialer is not None
        self.upstream = up
        if ctx.upstream_peer:
            self.peer_text = dialer.peer_of(up)[0]
        conn.cork(up)
        reader = up.reader
        if reader is None or reader.broken:
            reader = up.reader = ResponseReader(ctx.head_room)
        reader.expect(self, head_request=self.method == b"HEAD")
        self.reader = reader
        if conn.write_paused:
            up.pause_reading()
        framing = head.framing
        if framing.expect_continue and self.req is Req.BODY:
            # RFC 9110 §10.1.1: we answer the expectation ourselves, now that the request is authorised
            # and the app reachable; the app gets no Expect (it would otherwise send its own 100).
            conn.write(RESPONSE_100)
            self.sent_continue = True
        # Every forwarded request carries an X-Request-Id and a W3C traceparent: the caller's, or ours.
        # A trace we start has our request id as its trace-id (one draw for both).
        extra = b""
        token = self.token
        fields = None
        if self.auth_line is not None:  # outbound: our JWT-SVID, in place of any the app sent
            extra = self.auth_line
            if head.authorization is not None:
                fields = without_field(head.fields, b"authorization")
        elif token is not None:
            # Inbound: the app learns the step-up happened (and for whom); the token is forwarded only when
            # configured (inbound.forward_jwt), and then only the field that was validated: a second
            # Authorization field from the caller (never validated) must not reach the app beside it.
            extra = b"%s: %s\r\n%s: %s\r\n" % (JWT_SUBJECT, token[0].encode(), JWT_AUDIENCE, token[1].encode())
            fields = without_field(head.fields, b"authorization")
            if ctx.forward_jwt and head.authorization is not None:
                extra += b"authorization: " + head.authorization + b"\r\n"
        rid = head.request_id
        if rid is None:
            rid = self.request_id = _new_id()
            extra += b"x-request-id: " + rid + b"\r\n"
        trace = head.traceparent
        if trace is None:
            trace = b"00-%s-%016x-00" % (rid if len(rid) == 32 and _HEX32.fullmatch(rid) else _new_id(),
                                         _RANDOM.getrandbits(64) | 1)  # fmt: skip
            extra += b"traceparent: " + trace + b"\r\n"
        self.trace = trace
        data = request_head(self.method, target.forward, head, identity=peer.identity,
                            host_fallback=dialer.authority, extra=extra, fields=fields)  # fmt: skip
        if self.pending is not None:
            body = b"".join(self.pending)
            self.pending = None
            self.pending_size = 0
            if framing.body is BodyFraming.CHUNKED:
                body = chunk(body) if body else b""
            data += body
        done = self.req is Req.DONE
        if done and framing.body is BodyFraming.CHUNKED:
            data += CHUNK_END
        self.response(RespEvent.SEND)
        up.write(data)
        conn.resume(_P_PENDING)
        if done:
            # The wait for the first response byte starts when the request has been sent. While the body
            # still streams, the deadlines are inactivity ones: request_body_stall for the caller, and
            # upstream_response for an app that stops taking it (upstream_pause_writing).
            conn.set_deadline(ctx.timeouts.upstream_response, _T_APP)

    def app_timeout(self) -> None:
        """The app made no progress for timeouts.upstream_response (module docstring): 504 if nothing was
        sent to the caller yet, else both connections are dropped."""
        st = self
        if st.over or st.resp is Resp.TUNNEL or st.resp is Resp.QUEUED:
            return
        self.conn.ctx.observer.upstream_error("timeout")
        self.failure = "timeout"
        self.fail(RESPONSE_504)

    def fail(self, response: bytes) -> None:
        """The upstream failed: a fixed error if no response head reached the caller yet (then close),
        else both connections are dropped."""
        if self.over:
            return
        self.release_upstream(False)
        if not self.response_started:
            self.respond_local(response)
            self.finish(keep_alive=False)
        else:
            self.abort_both()

    def respond_local(self, response: bytes) -> None:
        """A fixed answer of ours (its status is in the response's first line)."""
        if self.method == b"HEAD":
            response = head_only(response)
        self.status = int(response[9:12])
        self.bytes_out += len(response)
        if self.resp is not Resp.DONE:
            self.response(RespEvent.LOCAL)
        self.conn.write(response)

    # -- UpstreamSink ------------------------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        conn = self.conn
        if conn.tunnel is self:
            self.bytes_out += len(data)
            conn.write(data)
            return
        reader = self.reader
        st = self
        if reader is None or st.over:
            return
        self.resp_any = True
        if reader.at_message_start and st.req is Req.DONE and self._whole_response(data):
            return
        # The app's inactivity deadline moves with every byte it sends (a float store).
        conn.set_deadline(conn.ctx.timeouts.upstream_response, _T_APP)
        try:
            reader.feed(data)
        except ProtocolViolation:
            conn.ctx.observer.upstream_error("protocol")
            self.failure = "protocol"
            self.abort_both()

    def _whole_response(self, data: bytes) -> bool:
        """The fast path: a whole response in one read whose head the full path (the C parser and
        `parse_response_head`) already accepted byte for byte, with nothing after its body. Its checked
        result is reused and the parser, still at the start of a message, is not fed. Anything else
        (a new head, a chunked or partial body, more bytes) takes the full path."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        conn = self.conn
        head = self.head
        assert head is not None
        keep_alive = self.keep_alive and not conn.draining
        rh = conn.ctx.response_heads.known(data[: end + 2], self.method == b"HEAD", keep_alive, head.http10)
        if rh is None:
            return False
        body = len(data) - end - 4
        framing = rh.framing
        if framing is ResponseFraming.NONE:
            if body:
                return False
            self.response(RespEvent.HEAD_END)
            out = rh.head
        elif framing is ResponseFraming.CONTENT_LENGTH and body == rh.content_length:
            self.response(RespEvent.HEAD)
            self.response(RespEvent.END)
            out = rh.head + data[end + 4 :] if body else rh.head
        else:
            return False
        self.status = rh.status
        self.keep_alive = rh.keep_alive
        self.bytes_out += len(out)
        conn.write(out)
        self.release_upstream(rh.upstream_keep_alive)
        self.finish(keep_alive=rh.keep_alive)
        return True

    def upstream_eof(self) -> None:
        self.upstream_closed()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream_closed("reset" if isinstance(exc, ConnectionResetError) else "closed_early")

    def upstream_closed(self, failure: str = "closed_early") -> None:
        conn = self.conn
        if conn.tunnel is self:
            conn.close()
            return
        st = self
        if st.over:
            return
        if st.resp is Resp.STREAMING and self.framing is ResponseFraming.CLOSE:
            # A close-delimited response ends here (RFC 9112 §6.3 rule 8).
            self.flush_head()
            if self.chunked_down:
                conn.write(CHUNK_END)
            st.response(RespEvent.END)
            self.release_upstream(False)
            self.finish(keep_alive=self.keep_alive and self.chunked_down)
            return
        up = self.upstream
        head = self.head
        if (
            st.resp is Resp.AWAITING
            and not self.resp_any
            and up is not None
            and up.reused
            and not self.retried
            and self.method in _IDEMPOTENT
            and head is not None
            and head.framing.body is BodyFraming.NONE
            and st.req is Req.DONE
        ):
            # The app closed a reused keep-alive connection before answering (the idle-close race):
            # retry once on another connection (RFC 9112 §9.3.1).
            self.retried = True
            self.release_upstream(False)
            st.response(RespEvent.RETRY)
            self.task = conn.loop.create_task(self.lease())
            return
        conn.ctx.observer.upstream_error("closed")
        self.failure = failure
        self.fail(RESPONSE_502)

    def upstream_pause_writing(self) -> None:
        # The app stopped taking request-body bytes: it must take some within upstream_response.
        conn = self.conn
        conn.pause(_P_UPSTREAM)
        conn.set_deadline(conn.ctx.timeouts.upstream_response, _T_APP)

    def upstream_resume_writing(self) -> None:
        conn = self.conn
        conn.resume(_P_UPSTREAM)
        if self.req is Req.BODY and not self.resp_any:
            conn.clear_deadline(_T_APP)

    # -- ResponseSink --------------------------------------------------------------------------------------

    def response_interim(self, status: int, reason: bytes, names: list[bytes], values: list[bytes]) -> None:
        self.response(RespEvent.INTERIM)
        head = self.head
        if head is not None and head.http10:
            return  # no 1xx to an HTTP/1.0 caller (RFC 9110 §15.2)
        if not (status == 100 and self.sent_continue):
            self.conn.write(interim_head(status, reason, names, values))

    def response_head(
        self, status: int, reason: bytes, names: list[bytes], values: list[bytes], raw: bytes | None
    ) -> None:
        conn = self.conn
        head = self.head
        assert head is not None
        st = self
        if status == 101:
            upgrade = head.framing.upgrade
            if upgrade is None:
                # A 101 nobody asked for: the caller gets a clean 502 (and the upstream connection, now in
                # an unknown protocol, is dropped).
                conn.ctx.observer.upstream_error("protocol")
                self._drop_reader()
                self.failure = "protocol"
                self.fail(RESPONSE_502)
                return
            self.status = 101
            lnames = [n.lower() for n in names]
            if b"upgrade" in lnames:
                upgrade = values[lnames.index(b"upgrade")].strip()
            data = switching_head(reason, names, values, upgrade)
            self.bytes_out += len(data)
            st.response(RespEvent.SWITCH)
            conn.write(data)
            self._start_tunnel()
            return
        keep_alive = self.keep_alive and not conn.draining and st.req is Req.DONE
        try:
            rh = conn.ctx.response_heads.parse(
                status, reason, names, values, raw, head_request=self.method == b"HEAD", keep_alive=keep_alive,
                http10_peer=head.http10,
            )  # fmt: skip
        except BadResponse as exc:
            conn.ctx.observer.upstream_error(exc.reason)
            self._drop_reader()
            self.failure = exc.reason
            self.fail(RESPONSE_502)
            return
        self.status = status
        self.keep_alive = rh.keep_alive
        self.chunked_down = rh.chunked_down
        self.framing = rh.framing
        self.bytes_out += len(rh.head)
        if rh.framing is ResponseFraming.NONE:
            st.response(RespEvent.HEAD_END)
            conn.write(rh.head)
            # The reader reports the end (HEAD: it stops at the head; 204/304: no body follows).
        else:
            st.response(RespEvent.HEAD)
            # Held back and sent with the first body bytes: one TLS record and one send for small responses.
            self.resp_head = rh.head

    def response_body(self, data: bytes) -> None:
        self.response(RespEvent.BODY)  # only while STREAMING: anything else is a ProtocolViolation
        n = len(data)
        self.bytes_out += n
        conn = self.conn
        head = self.resp_head
        if head:
            self.resp_head = b""
        if self.chunked_down:
            conn.write(head + chunk(data))
        else:
            conn.write(head + data if head else data)
        t = conn.transport
        if t is not None:
            conn.ctx.observer.buffered(t.get_write_buffer_size())

    def response_end(self, reusable: bool) -> None:
        st = self
        if st.over and st.resp is not Resp.DONE:
            return
        if st.resp is Resp.STREAMING:
            head = self.resp_head
            if head:
                self.resp_head = b""
            if self.chunked_down:
                self.conn.write(head + CHUNK_END)
            elif head:
                self.conn.write(head)
            st.response(RespEvent.END)
        # The upstream connection is reusable only when the app saw the whole request too.
        self.release_upstream(reusable and st.req is Req.DONE)
        self.finish(keep_alive=self.keep_alive)

    def response_switch(self, rest: bytes) -> None:
        """The bytes after the 101 head in the same read: the tunnel's first (the reader is done)."""
        if self.conn.tunnel is self and rest:
            self.bytes_out += len(rest)
            self.conn.write(rest)

    def _start_tunnel(self) -> None:
        conn = self.conn
        up = self.upstream
        assert up is not None
        conn.clear_deadline()
        conn.tunnel = self
        if conn.queue and conn.queue[0] is self:
            conn.queue.popleft()
        self.reader = None
        if self.req is not Req.TUNNEL:
            self.request(ReqEvent.SWITCH)
        if self.tunnel_pending:
            data = self.tunnel_pending
            self.tunnel_pending = b""
            self.bytes_in += len(data)
            up.write(data)
        conn._arm_expiry()  # no request boundary to re-check the peer at any more
        conn.resume(_P_STOP)
        conn.resume(_P_PIPELINE)

    def response_error(self, kind: str) -> None:
        self.conn.ctx.observer.upstream_error(kind)
        self.failure = kind
        self.fail(RESPONSE_502)

    def _drop_reader(self) -> None:
        if self.reader is not None:
            self.reader.broken = True
            self.reader.sink = None

    # -- tunnel (Upgrade) ----------------------------------------------------------------------------------

    def tunnel_down(self, data: bytes) -> None:
        self.bytes_in += len(data)
        up = self.upstream
        if up is not None and up.alive:
            up.write(data)

    # -- endings -------------------------------------------------------------------------------------------

    def flush_head(self) -> None:
        if self.resp_head:
            self.conn.write(self.resp_head)
            self.resp_head = b""

    def release_upstream(self, reusable: bool) -> None:
        up = self.upstream
        if up is not None:
            self.upstream = None
            reader = self.reader
            if reader is not None:
                if reusable:
                    reader.sink = None  # the pooled connection must not keep this exchange alive
                else:
                    self._drop_reader()
            dialer = self.dialer
            assert dialer is not None
            dialer.release(up, reusable=reusable)
        self.reader = None
        self.conn.clear_deadline(_T_APP)

    def stalled(self, kind: str, seconds: float) -> None:
        """The caller made no progress for `seconds`: it stopped reading our response (kind "write") or
        sending its request body ("request_body"). The exchange ends; the upstream connection is aborted,
        never pooled (the app may be mid-message). Counted, and audited with 408 and the reason."""
        st = self
        if st.over:
            return
        conn = self.conn
        conn.ctx.observer.stall(kind)
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
        conn.stop_reading()
        if kind == "request_body" and not st.response_started:
            self.respond_local(_RESPONSE_408)
            self.finish(keep_alive=False)  # closes once the 408 is flushed
            return
        self.status = _STALLED
        self.resp_head = b""
        st.response(RespEvent.ABORT)
        self.finish(keep_alive=False)
        conn.abort()

    def abort_upstream(self) -> None:
        """Drop the upstream side without a word to the caller (its connection is being closed)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        up = self.upstream
        if up is not None:
            up.abort()
        self.release_upstream(False)

    def abort_both(self) -> None:
        """Mid-response failure: no status can be sent any more; drop both connections."""
        st = self
        if st.over:
            return
        self.resp_head = b""
        up = self.upstream
        if up is not None:
            up.abort()
        self.release_upstream(False)
        st.response(RespEvent.ABORT)
        self.finish(keep_alive=False)
        self.conn.abort()

    def downstream_lost(self) -> None:
        """The caller went away: stop the upstream side."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        up = self.upstream
        if up is not None:
            up.abort()
        self.release_upstream(False)
        if self.conn.tunnel is self:
            self.conn.tunnel = None
        st = self
        if not st.over:
            st.response(RespEvent.ABORT)
            self.finish(keep_alive=False, notify=False)

    def _access(self) -> str:
        """This exchange's access-log members: the ids per request, the head's and the connection's
        members rendered once each (`audit.access_members`)."""
        head = self.head
        conn = self.conn
        rid = self.request_id
        if head is None:
            return access_members(request_id=(rid or _new_id()).decode("ascii"), protocol="HTTP/1.1",
                                  source=conn.addr, upstream_failure=self.failure)  # fmt: skip
        trace = self.trace if self.trace is not None else head.traceparent
        if rid is not None:  # ours: hex, and the trace-id of the trace we started with it, if we did
            r = rid.decode("ascii")
            if trace is not None and trace[3:35] == rid:
                ids = f',"request_id":"{r}","trace_id":"{r}"'
                trace = None
            else:
                ids = ',"request_id":"' + r + '"'
        elif head.request_id is not None:
            ids = ',"request_id":' + json_string(head.request_id.decode("ascii", "replace"))
        else:
            ids = ',"request_id":"' + _new_id().decode("ascii") + '"'
        if trace is not None and len(trace) >= 35:
            tid = trace[3:35]
            ids += (',"trace_id":"' + tid.decode("ascii") + '"' if _HEX32.fullmatch(tid) else
                    access_members(trace_id=tid.decode("ascii", "replace")))  # fmt: skip
        members = head.access
        if members is None:
            # Heads that differ only in their ids (a fresh X-Request-Id per request) share these members.
            key = (head.host, head.user_agent, head.http10)
            members = _HEAD_MEMBERS.get(key)
            if members is None:
                if len(_HEAD_MEMBERS) >= _HEAD_MEMBERS_MAX:
                    _HEAD_MEMBERS.clear()
                members = _HEAD_MEMBERS[key] = access_members(
                    authority=head.host.decode("ascii", "replace") if head.host else "",
                    user_agent=head.user_agent.decode("ascii", "replace") if head.user_agent else "",
                    protocol="HTTP/1.0" if head.http10 else "HTTP/1.1",
                )  # fmt: skip
            head.access = members
        if self.authority is not None:  # an absolute-form target's authority (outbound proxy port)
            members = access_members(authority=self.authority.decode("ascii", "replace")) + members.replace(
                ',"authority":', ',"host":', 1)  # fmt: skip
        text = ids + members + conn.access
        token = self.token
        if token is not None:
            text += access_members(jwt_subject=token[0], jwt_audience=token[1], jwt_kid=token[2])
        if self.failure:
            text += ',"upstream_failure":"' + self.failure + '"'
        return text

    def finish(self, *, keep_alive: bool, notify: bool = True) -> None:
        """Exactly once per exchange: the audit line and latency, then the connection moves on."""
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        decision = self.decision
        if decision is not None and self.target is not None:
            ctx = conn.ctx
            peer = conn.peer
            audited = self.peer_text if self.peer_text is not None else (peer.id_text if peer else "-")
            ctx.observer.exchange(
                audited, self.method.decode("ascii", "replace"), self.target.path, decision, self.status,
                self.bytes_in, self.bytes_out, ctx.clock() - self.t0, self._access(),
            )  # fmt: skip
        if notify and conn.tunnel is not self:
            conn.exchange_done(self, keep_alive)

