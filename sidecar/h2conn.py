"""HTTP/2 and gRPC on the inbound mTLS listener (edge): the only module that imports the HTTP/2 engine.

The engine is `ngh2` (libnghttp2, sans-IO; pinned): one server `Connection` per TLS connection that ALPN
made `h2` (`listener.AlpnSwitch`), and, for apps that speak h2c, a small pool of client `Connection`s to the
app (prior knowledge, RFC 9113 §3.3). Each stream is decided by the same `Authorizer` as an HTTP/1 request
(`check` on the caller, method, normalised `:path` and `:authority`; `step_up` for JWT rules), observed by
the same `Observer` (one audit line per stream, protocol `h2` or `grpc`, the gRPC method), and carries the
same `x-forwarded-client-cert` to the app (built once per connection by the gate).

What libnghttp2 does not do, this module does (RFC 9113 §8 via `sidecar.http2.parse_request`, then the
policy's path normaliser); what it does (framing, HPACK, flow-control accounting, pseudo-header rules,
content-length against DATA) it is configured for:

* Rapid Reset (CVE-2023-44487): the whole event batch of one read is handled before any upstream work starts,
  and a stream reset in the same batch is dropped unseen; at most `2 x MAX_STREAMS` new streams per read
  (the rest REFUSED_STREAM, as nginx); the engine's RST_STREAM token bucket closes the connection with GOAWAY.
* CONTINUATION floods (CVE-2024-27316 class) and HPACK bombs: the engine's `max_continuations`, header list
  size and field count; a connection that exceeds them is closed (and counted).
* Bounded concurrency (SETTINGS_MAX_CONCURRENT_STREAMS 100) and bounded buffering: inbound DATA is
  acknowledged (the window reopened) only once it was written to the app; the app's response is read only
  as far as the caller takes it (its window, our transport's write buffer).
* Deadlines: the first request within `request_head`, no stream for `idle` closes the connection (frames
  alone never keep it open); per stream `upstream_connect` + `upstream_response` for the lease, the app's
  first response byte within `upstream_response`, then `idle` of inactivity both ways; `write_stall` for
  a caller that takes no bytes.

Answers (RFC 9113 §8.1: a complete response before the whole request, then RST_STREAM(NO_ERROR)): a denied
gRPC request gets a Trailers-Only `grpc-status: 7` (16 for a failed JWT step-up), app failures 14/4; other
requests the HTTP/1 path's fixed 403/401/502/504. The app gets nothing of a request that is not allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Final

import ngh2
from ngh2 import (
    ConnectionClosed,
    DataReceived,
    GoAwayReceived,
    RequestReceived,
    ResponseReceived,
    Role,
    Setting,
    StreamClosed,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

from .audit import access_members
from .config import AppProtocol, Limits, Timeouts
from .h1reader import ResponseReader
from .http1 import CHUNK_END, HOP_BY_HOP, BadRequest, BadResponse, chunk
from .http2 import H2Request, LocalAnswer, grpc_method, h1_request_head, h2_response_fields, local_answer
from .http2 import parse_request as parse_h2_request
from .listener import Gate, Listener, Peer, transport_of
from .observer import Observer
from .policy import Decision, Target
from .proxy import Authorizer, Dialer
from .timers import Deadline
from .tls import TlsSnapshot
from .upstream import UpstreamConnection, UpstreamError

__all__ = ["H2Context", "H2cPool", "Http2Connection", "server_config"]

log = logging.getLogger("spiffe_sidecar.h2")

MAX_STREAMS: Final = 100  # SETTINGS_MAX_CONCURRENT_STREAMS (RFC 9113 §6.5.2; nginx 128, HAProxy 100)
NEW_STREAMS_PER_READ: Final = 2 * MAX_STREAMS  # nginx's cap since CVE-2023-44487
MAX_FIELDS: Final = 128  # fields per header block (nginx max_headers 1000; gRPC metadata is small)
RESET_BURST: Final = (200, 33)  # RST_STREAM token bucket: burst, per second (libnghttp2's default 1000/33)
STREAM_WINDOW: Final = 65_535  # INITIAL_WINDOW_SIZE: per-stream bytes buffered before an acknowledgement
CONN_WINDOW: Final = 1 << 20  # the connection window (RFC 9113 §6.9.2; Envoy's edge advice: 1 MiB)
BUFFER_HIGH: Final = 64 * 1024  # bytes queued towards one side before we stop taking from the other
UPSTREAM_CONNECTIONS: Final = 4  # h2c connections per app: streams are multiplexed over these
_NO_ERROR: Final = 0x0
_PROTOCOL_ERROR: Final = 0x1
_INTERNAL_ERROR: Final = 0x2
_REFUSED_STREAM: Final = 0x7
_CANCEL: Final = 0x8

# Kinds of the connection deadline and of a stream's.
_T_IDLE: Final = 1  # connection: no stream (first request due, or idle between streams)
_T_WRITE: Final = 2  # connection: the caller takes no bytes
_S_LEASE: Final = 3  # stream: no upstream yet (handled by the lease task's own timeout)
_S_APP: Final = 4  # stream: the app's first response byte is due
_S_IDLE: Final = 5  # stream: no progress either way

_CACHE_MAX: Final = 512  # entries per cache of H2Context (cleared when full)
_CACHE_HEAD: Final = 4096  # header blocks and response heads larger than this are never remembered
_RANDOM: Final = random.Random(os.urandom(32))  # noqa: S311 - request ids must be unique, not secret
_XFCC: Final = b"x-forwarded-client-cert"


def _new_id() -> bytes:
    return b"%032x" % _RANDOM.getrandbits(128)


def server_config(limits: Limits) -> ngh2.Configuration:
    """The engine's limits for one caller connection (module docstring)."""
    return ngh2.Configuration(
        auto_window_update=False,  # acknowledged once written upstream (flow control coupled to the app)
        stream_reset_rate_limit=RESET_BURST,
        max_continuations=8,  # libnghttp2's default since CVE-2024-28182
        max_inbound_header_list_size=limits.max_header_bytes,
        max_inbound_header_count=MAX_FIELDS,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class H2Context:
    """What every HTTP/2 connection of one listener shares (built once)."""

    listener: Listener
    gate: Gate
    authorizer: Authorizer
    observer: Observer
    timeouts: Timeouts
    limits: Limits
    app_protocol: AppProtocol
    drop: frozenset[bytes]  # request fields never forwarded (http1.request_drop)
    clock: Callable[[], float]
    h2c: H2cPool | None = None  # the app's h2c connections (app_protocol h2c or grpc)
    forward_jwt: bool = False
    config: ngh2.Configuration = dataclasses.field(default_factory=lambda: server_config(Limits()))
    # Pure functions of their keys, remembered (bounded): checked request heads by header block, HTTP/2 fields
    # of the app's HTTP/1.1 response heads by raw head, audit members by (authority, user agent, gRPC method).
    requests: dict[tuple[tuple[bytes, bytes], ...], H2Request] = dataclasses.field(default_factory=dict)
    responses: dict[tuple[bytes, bool], list[tuple[bytes, bytes]]] = dataclasses.field(default_factory=dict)
    members: dict[tuple[bytes, bytes | None, str], str] = dataclasses.field(default_factory=dict)

    @property
    def settings(self) -> dict[int, int]:
        return {
            Setting.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            Setting.MAX_HEADER_LIST_SIZE: self.limits.max_header_bytes,
        }


class Leg(enum.Enum):
    """Where a stream's request goes."""

    NONE = 0  # answered by us (or not decided yet)
    H1 = 1  # the app over HTTP/1.1 (the pooled keep-alive connections of the HTTP/1 path)
    H2C = 2  # the app over h2c


# ---------------------------------------------------------------------------------------------------------
# The caller's connection


class Http2Connection(asyncio.Protocol):
    """One caller connection that negotiated `h2` (see the module docstring)."""

    def __init__(self, ctx: H2Context, snap: TlsSnapshot, addr: str) -> None:
        self.ctx = ctx
        self.snap = snap
        self.addr = addr
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.h2: ngh2.Connection | None = None
        self.streams: dict[int, Stream] = {}
        self.identity = b""  # the XFCC value for the app
        self.access = ""
        self.closed = False
        self.draining = False
        self.write_paused = False
        self.deadline: Deadline | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._flushing = False
        self._again = False
        self._resets = 0  # streams the caller reset (premature resets are what Rapid Reset is made of)
        # Streams answered in full while the caller still sends: RST_STREAM(NO_ERROR) once the answer is out
        # (RFC 9113 §8.1). Not before: the engine sends RST_STREAM ahead of queued DATA, which it would drop.
        self._reset_when_sent: list[Stream] = []

    # -- asyncio.Protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = transport_of(transport)
        self.transport = t
        peer = self.ctx.gate.admit(t, self.snap, self.addr)
        if peer is None:
            self.closed = True
            t.abort()
            return
        self.serve(t, peer)

    def serve(self, t: asyncio.Transport, peer: Peer) -> None:
        """Start serving `peer` on `t` (the gate admitted it): our SETTINGS, the connection window."""
        ctx = self.ctx
        self.transport = t
        self.peer = peer
        # The gate built the HTTP/1 identity line once for this connection; HTTP/2 takes its value.
        self.identity = peer.identity[len(_XFCC) + 2 : -2]
        self.access = access_members(tls=peer.tls, source=self.addr)
        t.set_write_buffer_limits(high=BUFFER_HIGH)
        ctx.listener.track(self)
        h2 = self.h2 = ngh2.Connection(Role.SERVER, ctx.config)
        h2.initiate_connection(ctx.settings)
        h2.set_local_window_size(CONN_WINDOW)
        self.deadline = Deadline(self.loop, self._on_deadline)
        self.deadline.set(ctx.timeouts.request_head, _T_IDLE)  # the preface and a first request are due
        self._arm_expiry()
        self.flush()

    def data_received(self, data: bytes) -> None:
        h2 = self.h2
        if h2 is None or self.closed:
            return
        try:
            h2.receive_data(data)
        except ngh2.DenialOfServiceError as exc:
            self._fatal("flood", str(exc))
            return
        except ngh2.NGH2Error as exc:
            self._fatal("protocol", str(exc))
            return
        self.flush()

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        dl = self.deadline
        if dl is not None:
            dl.set(self.ctx.timeouts.write_stall, _T_WRITE)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._idle_or_clear()
        for st in list(self.streams.values()):
            st.downstream_drained()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.deadline is not None:
            self.deadline.close()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.peer is not None:
            self.ctx.listener.untrack(self)
        self.ctx.listener.released()
        streams = list(self.streams.values())
        self.streams.clear()
        for st in streams:
            st.downstream_lost()
        self.h2 = None
        self.transport = None

    # -- the engine ----------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what the engine has to send, then handle the events that produced (streams closed by our
        own RST_STREAM or END_STREAM); repeat until both are empty. Re-entrant calls fold into the loop."""
        if self._flushing:
            self._again = True
            return
        h2 = self.h2
        t = self.transport
        if h2 is None or t is None or self.closed:
            return
        self._flushing = True
        try:
            while True:
                self._again = False
                try:
                    out = h2.data_to_send()
                except ngh2.NGH2Error:  # the engine ended the connection (its GOAWAY went out before)
                    self.close()
                    return
                if out:
                    t.write(out)
                if self._reset_when_sent:
                    self._reset_answered(h2)
                batch = h2.events()
                if batch:
                    self._handle(batch)
                elif not self._again:
                    break
                if self.closed:
                    return
        except ngh2.NGH2Error as exc:
            self._fatal("rapid_reset" if self._resets >= RESET_BURST[0] else "protocol", str(exc))
            return
        finally:
            self._flushing = False
        if self.draining and not self.streams:
            self.close()

    def reset_when_sent(self, st: Stream) -> None:
        """RST_STREAM(NO_ERROR) for `st` once its complete answer has been written (see __init__)."""
        self._reset_when_sent.append(st)
        self.flush()

    def _reset_answered(self, h2: ngh2.Connection) -> None:
        waiting: list[Stream] = []
        for st in self._reset_when_sent:
            if self.streams.get(st.sid) is not st:
                continue  # closed meanwhile
            try:
                queued = h2.queued_body_size(st.sid)
            except ngh2.NGH2Error:
                continue
            if queued:
                waiting.append(st)  # held by flow control: its DATA goes first
            else:
                h2.reset_stream(st.sid, _NO_ERROR)
                self._again = True
        self._reset_when_sent = waiting

    def _handle(self, batch: list[ngh2.Event]) -> None:
        """One batch of events. New streams are only started after the whole batch (Rapid Reset: a stream
        opened and reset in the same read never reaches the app, never costs a decision or a lease)."""
        h2 = self.h2
        assert h2 is not None
        new: list[Stream] = []
        streams = self.streams
        for e in batch:
            t = type(e)
            if t is DataReceived:
                assert isinstance(e, DataReceived)
                st = streams.get(e.stream_id)
                if st is not None:
                    st.request_data(e.data, e.end_stream)
                elif e.data:
                    h2.acknowledge_received_data(len(e.data), e.stream_id)  # keep the connection window open
            elif t is RequestReceived:
                assert isinstance(e, RequestReceived)
                if len(new) >= NEW_STREAMS_PER_READ or self.draining:
                    with contextlib.suppress(ngh2.NGH2Error):  # the engine may be closing the connection already
                        h2.reset_stream(e.stream_id, _REFUSED_STREAM)
                    self.ctx.observer.h2_event("refused_stream")
                    continue
                st = Stream(self, e.stream_id, e.headers, e.end_stream)
                streams[e.stream_id] = st
                new.append(st)
            elif t is TrailersReceived:
                assert isinstance(e, TrailersReceived)
                st = streams.get(e.stream_id)
                if st is not None:
                    st.request_trailers(e.headers)
            elif t is StreamReset:
                assert isinstance(e, StreamReset)
                self._resets += 1
                st = streams.get(e.stream_id)
                if st is not None:
                    st.caller_reset(e.error_code, started=st.started)
            elif t is StreamClosed:
                assert isinstance(e, StreamClosed)
                st = streams.pop(e.stream_id, None)
                if st is not None:
                    st.stream_closed(e.error_code)
                    if not streams:
                        self._idle_or_clear()
            elif t is WindowUpdated:
                assert isinstance(e, WindowUpdated)
                if e.stream_id == 0:
                    for st in list(streams.values()):
                        st.downstream_drained()
                else:
                    st = streams.get(e.stream_id)
                    if st is not None:
                        st.downstream_drained()
            elif t is ConnectionClosed:
                assert isinstance(e, ConnectionClosed)
                for st in new:  # never started: the connection is gone
                    if st.dropped:
                        self.ctx.observer.h2_event("early_reset")
                self._terminated(e.error_code)
                return
            elif t is GoAwayReceived:
                self.draining = True  # the caller opens no more streams; finish the open ones
        if new:
            if self.deadline is not None and self.deadline.kind == _T_IDLE:
                self.deadline.clear(_T_IDLE)
            for st in new:
                if not st.dropped and not st.resp_ended:
                    st.start()
                else:
                    self.ctx.observer.h2_event("early_reset")

    def _terminated(self, code: int) -> None:
        """The engine closed the connection (its GOAWAY is written): count why, close."""
        if code == _NO_ERROR:
            reason = "goaway"
        elif self._resets >= RESET_BURST[0]:
            reason = "rapid_reset"
        else:
            reason = "protocol"
        if code != _NO_ERROR:
            self.ctx.observer.h2_event(reason)
            self.ctx.observer.refusal_log(logging.WARNING, "%s: %s: HTTP/2 connection closed by the engine: %s "
                                          "(GOAWAY error %d)", self.ctx.observer.label, self.addr, reason, code)
        self.close()

    def _fatal(self, reason: str, detail: str) -> None:
        """The engine refused the caller's bytes (a flood past its limits, a framing error): whatever it still
        has to send (GOAWAY) goes out, then the connection closes."""
        obs = self.ctx.observer
        obs.h2_event(reason)
        obs.refusal_log(logging.WARNING, "%s: %s: HTTP/2 connection closed: %s: %s", obs.label, self.addr, reason,
                        detail)  # fmt: skip
        h2 = self.h2
        if h2 is not None and self.transport is not None:
            try:
                out = h2.data_to_send()
            except ngh2.NGH2Error:
                out = b""
            if out:
                self.transport.write(out)
        self.close()

    # -- deadlines, expiry, drain ------------------------------------------------------------------------

    def _idle_or_clear(self) -> None:
        dl = self.deadline
        if dl is None or self.closed:
            return
        if self.write_paused:
            return
        if not self.streams:
            dl.set(self.ctx.timeouts.idle, _T_IDLE)
        else:
            dl.clear()

    def _on_deadline(self, kind: int) -> None:
        if self.closed:
            return
        if kind == _T_WRITE:
            self.ctx.observer.stall("write")
            for st in list(self.streams.values()):
                st.cut_off("write", self.ctx.timeouts.write_stall)
            self.abort()
        elif not self.streams:
            self.start_drain()
            self.close()

    def _arm_expiry(self) -> None:
        peer = self.peer
        if peer is None or peer.spiffe_id is None or self.closed:
            return
        self._expiry = self.loop.call_later(max(0.0, peer.expires - time.time()), self._on_peer_expired)

    def _on_peer_expired(self) -> None:
        self._expiry = None
        if self.closed:
            return
        self.ctx.observer.refused(self.addr, "expired", "the peer's certificate expired on an open connection")
        self.start_drain()
        if not self.streams:
            self.close()

    def start_drain(self) -> None:
        """GOAWAY(NO_ERROR): no new streams (RFC 9113 §6.8); open ones finish, then the connection closes."""
        if self.draining or self.closed:
            if not self.streams:
                self.close()
            return
        self.draining = True
        h2 = self.h2
        if h2 is not None:
            try:
                h2.send_goaway(_NO_ERROR)
            except ngh2.NGH2Error:
                self.close()
                return
        self.flush()
        if not self.streams:
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()


# ---------------------------------------------------------------------------------------------------------
# One stream


class Stream:
    """One request and its response on a caller's HTTP/2 connection: decide, lease, relay. The upstream
    connection's sink (`UpstreamSink`, `ResponseSink`) on the HTTP/1.1 leg; the h2c pool's stream sink."""

    __slots__ = (
        "body",
        "bytes_in",
        "bytes_out",
        "chunked",
        "conn",
        "deadline",
        "decision",
        "dialer",
        "dropped",
        "ended",
        "failure",
        "finished",
        "grpc_status",
        "headers",
        "leg",
        "pending",
        "reader",
        "req",
        "request_id",
        "resp_ended",
        "resp_fields",
        "resp_started",
        "sid",
        "started",
        "status",
        "t0",
        "target",
        "task",
        "token",
        "trace",
        "unacked",
        "up_paused",
        "up_sid",
        "up_unacked",
        "upstream",
        "upstream_h2c",
    )

    def __init__(self, conn: Http2Connection, sid: int, headers: tuple[tuple[bytes, bytes], ...], ended: bool) -> None:
        self.conn = conn
        self.sid = sid
        self.headers = headers
        self.ended = ended  # the caller ended its side (END_STREAM)
        self.t0 = conn.ctx.clock()
        self.req: H2Request | None = None
        self.target: Target | None = None
        self.decision: Decision | None = None
        self.token: tuple[str, str, str] | None = None
        self.dialer: Dialer | None = None
        self.leg = Leg.NONE
        self.pending: list[bytes] = []  # request body read before the upstream is attached
        self.unacked = 0  # caller DATA bytes not acknowledged yet (its window stays closed by that much)
        self.up_unacked = 0  # app DATA bytes (h2c) not acknowledged yet
        self.bytes_in = sum(len(n) + len(v) for n, v in headers)  # the header block (decoded) and the body
        self.body = 0  # request body bytes (DATA payloads), compared with content-length at the end
        self.chunked = False  # the HTTP/1.1 leg sends the body chunked (its length was not known)
        self.bytes_out = 0
        self.status = 0
        self.grpc_status: int | None = None
        self.failure = ""
        self.request_id: bytes | None = None
        self.trace: bytes | None = None
        self.started = False  # decided (start() ran)
        self.dropped = False  # reset by the caller before it was started
        self.finished = False
        self.resp_started = False
        self.resp_ended = False
        self.resp_fields: list[tuple[bytes, bytes]] | None = None  # held until the first body byte or the end
        self.upstream: UpstreamConnection | None = None
        self.upstream_h2c: H2cConnection | None = None
        self.up_sid = 0
        self.up_paused = False
        self.reader: ResponseReader | None = None
        self.task: asyncio.Task[None] | None = None
        self.deadline: Deadline | None = None

    # -- decide --------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Check, decide and act (after the whole batch that opened the stream was read)."""
        self.started = True
        conn = self.conn
        ctx = conn.ctx
        peer = conn.peer
        assert peer is not None
        try:
            req = ctx.requests.get(self.headers) if self.bytes_in < _CACHE_HEAD else None
            if req is None:
                req = parse_h2_request(self.headers, ctx.drop)  # raises BadRequest (never remembered)
                if self.bytes_in < _CACHE_HEAD:
                    if len(ctx.requests) >= _CACHE_MAX:
                        ctx.requests.clear()
                    ctx.requests[self.headers] = req
            self.req = req
            self.target, _ = ctx.authorizer.target(req.path)
        except BadRequest as exc:
            ctx.observer.bad_request("h2_headers" if self.req is None else "target")
            self.failure = ""
            self._bad(exc.reason)
            return
        self.headers = ()
        limit = ctx.limits.max_body_bytes
        if limit is not None and req.content_length is not None and req.content_length > limit:
            ctx.observer.bad_request("body_too_large")
            self.answer(local_answer(413, req.grpc))
            return
        if not ctx.gate.still_valid(peer, conn.transport, conn.addr):
            conn.start_drain()
            self._reset(_REFUSED_STREAM)
            return
        grant = ctx.authorizer.check(peer, req.method, self.target, req.authority or None)
        decision = self.decision = grant.decision
        if decision.jwt is not None:
            su = ctx.authorizer.step_up(decision, peer, req.authorization)
            decision = self.decision = su.decision
            self.token = su.token
            if not decision.forward:
                self.answer(local_answer(401 if su.challenge else 403, req.grpc))
                return
        if not decision.forward or grant.dialer is None or grant.refusal is not None:
            self.answer(local_answer(403, req.grpc))
            return
        app = ctx.app_protocol
        if app is AppProtocol.HTTP1:
            if req.grpc:
                # gRPC needs trailers end to end: an HTTP/1.1 app cannot answer it (PROTOCOL-HTTP2.md).
                self.failure = "grpc_to_http1_app"
                ctx.observer.upstream_error("protocol")
                self.answer(local_answer(415, True))
                return
            self._start_h1(grant.dialer)
        else:
            if app is AppProtocol.GRPC and not req.grpc:
                self.failure = "not_grpc"
                self.answer(local_answer(415, False))
                return
            self._start_h2c()

    def _bad(self, reason: str) -> None:
        """A malformed request (RFC 9113 §8.1.1, §8.2.1: 400, then RST_STREAM if the caller is not done)."""
        grpc = any(n == b"content-type" and v.startswith(b"application/grpc") for n, v in self.headers)
        self.headers = ()
        self.answer(local_answer(400, grpc))
        self.conn.ctx.observer.refusal_log(logging.INFO, "%s: %s: stream %d: 400: %s", self.conn.ctx.observer.label,
                                           self.conn.addr, self.sid, reason)  # fmt: skip

    def _extra(self) -> list[tuple[bytes, bytes]]:
        """x-request-id and traceparent as the HTTP/1 path sends them (the caller's, or ours), and the step-up
        token's subject and audience for the app."""
        req = self.req
        assert req is not None
        extra: list[tuple[bytes, bytes]] = []
        token = self.token
        if token is not None:
            extra += ((b"x-spiffe-jwt-subject", token[0].encode()), (b"x-spiffe-jwt-audience", token[1].encode()))
            if self.conn.ctx.forward_jwt and req.authorization is not None:
                extra.append((b"authorization", req.authorization))
        elif req.authorization is not None:
            extra.append((b"authorization", req.authorization))
        rid = req.request_id
        if rid is None:
            rid = self.request_id = _new_id()
            extra.append((b"x-request-id", rid))
        trace = req.traceparent
        if trace is None:
            trace = b"00-%s-%016x-00" % (rid if len(rid) == 32 else _new_id(), _RANDOM.getrandbits(64) | 1)
            extra.append((b"traceparent", trace))
        self.trace = trace
        return extra

    # -- answers and endings -------------------------------------------------------------------------------

    def answer(self, a: LocalAnswer) -> None:
        """Our own complete response; then RST_STREAM(NO_ERROR) if the caller has not ended its side (RFC
        9113 §8.1): nothing more of this request is read, and the app never sees it."""
        conn = self.conn
        h2 = conn.h2
        self._release_upstream(False)
        self.status = a.status
        self.grpc_status = a.grpc_status
        self.resp_started = self.resp_ended = True
        if h2 is None or conn.closed:
            self.finish()
            return
        try:
            h2.send_response(self.sid, a.fields, end_stream=not a.body)
            if a.body:
                h2.send_data(self.sid, a.body, end_stream=True)
                self.bytes_out += len(a.body)
        except ngh2.NGH2Error:
            pass  # the stream is gone already (the caller reset it): nothing to answer
        self._ack_all()
        self.finish()
        if not self.ended:
            conn.reset_when_sent(self)
        else:
            conn.flush()

    def _reset(self, code: int) -> None:
        conn = self.conn
        h2 = conn.h2
        self._release_upstream(False)
        if h2 is not None and not conn.closed:
            with contextlib.suppress(ngh2.NGH2Error):
                h2.reset_stream(self.sid, code)
        self.resp_ended = True
        self.finish()
        conn.flush()

    def fail(self, status: int) -> None:
        """The app failed: our answer if no response head was sent yet, else the stream is reset."""
        if self.resp_ended:
            return
        req = self.req
        if not self.resp_started:
            self.answer(local_answer(status, req is not None and req.grpc))
        else:
            self._reset(_INTERNAL_ERROR)

    def finish(self) -> None:
        """Exactly once per started stream: the audit line (a stream dropped before it was decided has none)."""
        if self.finished:
            return
        self.finished = True
        dl = self.deadline
        if dl is not None:
            dl.close()
            self.deadline = None
        decision = self.decision
        target = self.target
        req = self.req
        if decision is None or target is None or req is None:
            return
        conn = self.conn
        ctx = conn.ctx
        peer = conn.peer
        grpc = req.grpc
        # The access-log members (audit.access_members), the per-head part rendered once per distinct head.
        key = (req.authority, req.user_agent, target.path if grpc else "")
        members = ctx.members.get(key)
        if members is None:
            members = access_members(authority=req.authority.decode("ascii", "replace"),
                                     user_agent=(req.user_agent or b"").decode("ascii", "replace"),
                                     protocol="grpc" if grpc else "h2")  # fmt: skip
            if grpc:
                members += access_members(grpc_method=grpc_method(target.path))
            if len(ctx.members) >= _CACHE_MAX:
                ctx.members.clear()
            ctx.members[key] = members
        rid = self.request_id  # ours: 32 hex digits, nothing to escape
        ids = ',"request_id":"' + rid.decode("ascii") + '"' if rid is not None else access_members(
            request_id=(req.request_id or _new_id()).decode("ascii", "replace"))  # fmt: skip
        trace = self.trace or req.traceparent
        if trace is not None and len(trace) >= 35:
            ids += access_members(trace_id=trace[3:35].decode("ascii", "replace"))
        text = ids + members + conn.access
        if self.token is not None:
            text += access_members(jwt_subject=self.token[0], jwt_audience=self.token[1], jwt_kid=self.token[2])
        if self.failure:
            text += ',"upstream_failure":"' + self.failure + '"'
        if grpc and self.grpc_status is not None:
            text += f',"grpc_status":"{self.grpc_status}"'
        ctx.observer.h2_stream("grpc" if grpc else "h2", decision.verdict)
        ctx.observer.exchange(
            peer.id_text if peer is not None else "-", req.method.decode("ascii", "replace"), target.path, decision,
            self.status, self.bytes_in, self.bytes_out, ctx.clock() - self.t0, text,
        )  # fmt: skip

    def _release_upstream(self, reusable: bool) -> None:
        task = self.task
        if task is not None and not task.done():
            task.cancel()
        self.task = None
        up = self.upstream
        if up is not None:
            self.upstream = None
            reader = self.reader
            if reader is not None:
                if reusable:
                    reader.sink = None
                else:
                    reader.broken = True
                    reader.sink = None
            self.reader = None
            dialer = self.dialer
            assert dialer is not None
            dialer.release(up, reusable=reusable)
        h2c = self.upstream_h2c
        if h2c is not None:
            self.upstream_h2c = None
            if self.up_unacked:
                n, self.up_unacked = self.up_unacked, 0
                h2c.acknowledge(n, self.up_sid)
            if not reusable:
                h2c.cancel(self.up_sid)
            h2c.forget(self.up_sid)

    def _ack_all(self) -> None:
        """Reopen the caller's window for what it sent and nobody will ever take (answered or dropped)."""
        n = self.unacked
        self.pending = []
        if n:
            self.unacked = 0
            h2 = self.conn.h2
            if h2 is not None and not self.conn.closed:
                h2.acknowledge_received_data(n, self.sid)

    # -- events from the caller ----------------------------------------------------------------------------

    def request_data(self, data: bytes, end: bool) -> None:
        n = len(data)
        self.bytes_in += n
        self.body += n
        self.unacked += n
        if end:
            self.ended = True
        if self.resp_ended and self.upstream is None and self.upstream_h2c is None:
            self._ack_all()  # answered already: drained and dropped
            return
        req = self.req
        if end and req is not None and req.content_length is not None and req.content_length != self.body:
            # RFC 9113 §8.1.1: malformed. The engine checks it too; counted here as well, because an HTTP/1.1
            # app was told this length (H2.CL): its connection is never reused.
            self.conn.ctx.observer.bad_request("content_length")
            self.failure = "content_length"
            self._reset(_PROTOCOL_ERROR)
            return
        limit = self.conn.ctx.limits.max_body_bytes
        if limit is not None and self.body > limit:
            self.conn.ctx.observer.bad_request("body_too_large")
            if self.resp_started:
                self._reset(_CANCEL)
            else:
                self.answer(local_answer(413, req is not None and req.grpc))
            return
        self._progress()
        if self.leg is Leg.H1:
            up = self.upstream
            if up is not None and up.alive:
                if data:
                    up.write(chunk(data) if self.chunked else data)
                if end:
                    self._end_h1_request()
                self._ack_h1()
                return
        elif self.leg is Leg.H2C:
            h2c = self.upstream_h2c
            if h2c is not None:
                h2c.send_data(self.up_sid, data, end)
                self.ack_down()
                if end:
                    self._request_done()
                return
        if data:
            self.pending.append(data)
        if end and self.started:
            self._request_done()

    def request_trailers(self, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        """Trailers end the request. An h2c app gets them (minus what we never forward); an HTTP/1.1 app does
        not (as on the HTTP/1 path, request trailers are dropped)."""
        self.ended = True
        if self.resp_ended and self.leg is Leg.NONE:
            return
        if self.leg is Leg.H2C and self.upstream_h2c is not None:
            drop = self.conn.ctx.drop
            kept = [(n, v) for n, v in headers if n not in drop and b"_" not in n]
            self.upstream_h2c.send_trailers(self.up_sid, kept)
            self._request_done()
        elif self.leg is Leg.H1 and self.upstream is not None:
            self._end_h1_request()
        elif self.started:
            self._request_done()

    def _request_done(self) -> None:
        """The whole request reached the app: its first response byte is now due within upstream_response."""
        if not self.resp_started and self.leg is not Leg.NONE:
            self._set_deadline(self.conn.ctx.timeouts.upstream_response, _S_APP)

    def caller_reset(self, code: int, *, started: bool) -> None:
        """RST_STREAM from the caller: a stream not started yet is dropped unseen (Rapid Reset); one in
        flight stops both legs."""
        self.ended = True
        if not started:
            self.dropped = True
            self._ack_all()
            return
        if not self.resp_ended:
            self.failure = self.failure or "caller_reset"
            self._release_upstream(False)
            self.resp_ended = True
            self.finish()

    def stream_closed(self, code: int) -> None:
        """The engine closed the stream (both sides ended, or a reset either way): the audit line now."""
        if not self.resp_ended:
            if code != _NO_ERROR and not self.failure:
                # The engine reset it: a malformed continuation (content-length mismatch, bad trailers).
                self.failure = "stream_error"
            self._release_upstream(False)
            self.resp_ended = True
        elif self.upstream is not None or self.upstream_h2c is not None:
            self._release_upstream(False)
        self._ack_all()
        self.finish()

    def downstream_lost(self) -> None:
        if not self.resp_ended:
            self.failure = self.failure or "caller_gone"
        self._release_upstream(False)
        self.resp_ended = True
        self.finish()

    def downstream_drained(self) -> None:
        """The caller's window opened or our transport drained: take more of the app's response."""
        conn = self.conn
        h2 = conn.h2
        if h2 is None or conn.write_paused or (self.resp_ended and not self.up_unacked):
            return
        try:
            queued = h2.queued_body_size(self.sid)
        except ngh2.NGH2Error:
            return
        if queued >= BUFFER_HIGH:
            return
        if self.up_paused and self.upstream is not None:
            self.up_paused = False
            self.upstream.resume_reading()
        if self.up_unacked and self.upstream_h2c is not None:
            n, self.up_unacked = self.up_unacked, 0
            self.upstream_h2c.acknowledge(n, self.up_sid)

    def cut_off(self, kind: str, seconds: float) -> None:
        if self.resp_ended:
            return
        self.failure = f"stalled_{kind}"
        self.status = self.status or 408
        self._release_upstream(False)
        self.resp_ended = True
        self.finish()

    # -- deadlines ------------------------------------------------------------------------------------------

    def _set_deadline(self, seconds: float, kind: int) -> None:
        dl = self.deadline
        if dl is None:
            if self.finished:
                return
            dl = self.deadline = Deadline(self.conn.loop, self._on_deadline)
        dl.set(seconds, kind)

    def _progress(self) -> None:
        """Bytes moved on an exchange in flight: its inactivity deadline moves (a float store)."""
        dl = self.deadline
        if dl is not None and dl.kind == _S_IDLE:
            dl.set(self.conn.ctx.timeouts.idle, _S_IDLE)

    def _on_deadline(self, kind: int) -> None:
        if self.resp_ended:
            return
        obs = self.conn.ctx.observer
        if kind == _S_APP and not self.resp_started:
            obs.upstream_error("timeout")
            self.failure = "timeout"
            self.fail(504)
        else:
            obs.upstream_error("timeout")
            self.failure = "idle" if kind == _S_IDLE else "timeout"
            self._reset(_CANCEL)
        self.conn.flush()

    # -- the HTTP/1.1 leg --------------------------------------------------------------------------------

    def _start_h1(self, dialer: Dialer) -> None:
        self.dialer = dialer
        self.leg = Leg.H1
        down = dialer.unavailable()
        if down is not None:
            self.conn.ctx.observer.upstream_error("down")
            self.failure = "down"
            self.fail(int(down[9:12]))
            return
        up = dialer.acquire_idle(self)
        if up is not None:
            self._attach_h1(up)
        else:
            self.task = self.conn.loop.create_task(self._lease_h1())

    async def _lease_h1(self) -> None:
        conn = self.conn
        ctx = conn.ctx
        dialer = self.dialer
        assert dialer is not None
        t = ctx.timeouts
        try:
            async with asyncio.timeout(t.upstream_connect + t.upstream_response):
                up = await dialer.acquire(self)
        except UpstreamError as exc:
            ctx.observer.upstream_error(exc.kind)
            self.failure = exc.failure
            self.task = None
            self.fail(502)
            return
        except TimeoutError:
            ctx.observer.upstream_error("pool_exhausted")
            self.failure = "pool_exhausted"
            self.task = None
            self.fail(503)
            return
        self.task = None
        dialer.connected()
        if self.resp_ended or conn.closed:
            dialer.release(up, reusable=False)
            return
        self._attach_h1(up)
        conn.flush()

    def _attach_h1(self, up: UpstreamConnection) -> None:
        """Send the translated head (and the body read so far) on a leased HTTP/1.1 connection."""
        conn = self.conn
        ctx = conn.ctx
        req = self.req
        target = self.target
        dialer = self.dialer
        assert req is not None and target is not None and dialer is not None
        self.upstream = up
        reader = up.reader
        if reader is None or reader.broken:
            reader = up.reader = ResponseReader(ctx.limits.max_request_line_bytes + ctx.limits.max_header_bytes)
        reader.expect(self, head_request=req.method == b"HEAD")
        self.reader = reader
        body = b"".join(self.pending)
        self.pending = []
        # The body's length: known when the caller ended its side within the reads so far (the common unary
        # case, one read), else its content-length (checked against the DATA by the engine and at the end),
        # else chunked. Never a length we did not compute or check (H2.CL desync, notes §1.6).
        length: int | None = len(body) if self.ended else req.content_length
        self.chunked = length is None
        extra = b"".join(n + b": " + v + b"\r\n" for n, v in self._extra())
        identity = b"x-forwarded-client-cert: " + conn.identity + b"\r\n"
        head = h1_request_head(req, target.forward, authority=dialer.authority, identity=identity, extra=extra,
                               length=length)  # fmt: skip
        if body and self.chunked:
            body = chunk(body)
        if self.ended and self.chunked:
            body += CHUNK_END
        if conn.write_paused:
            up.pause_reading()
            self.up_paused = True
        up.write(head + body)
        self._ack_h1()
        if self.ended:
            self._set_deadline(ctx.timeouts.upstream_response, _S_APP)
        else:
            self._set_deadline(ctx.timeouts.idle, _S_IDLE)

    def _end_h1_request(self) -> None:
        up = self.upstream
        if up is not None and self.chunked:
            up.write(CHUNK_END)
        self._request_done()

    def _ack_h1(self) -> None:
        up = self.upstream
        if self.unacked and up is not None and up.write_buffer_size() < BUFFER_HIGH:
            n, self.unacked = self.unacked, 0
            h2 = self.conn.h2
            if h2 is not None and not self.conn.closed:
                h2.acknowledge_received_data(n, self.sid)

    # UpstreamSink

    def upstream_data(self, data: bytes) -> None:
        reader = self.reader
        if reader is None or self.resp_ended:
            return
        if self.resp_started:
            self._progress()
        reader.feed(data)
        self.conn.flush()

    def upstream_eof(self) -> None:
        self.upstream_lost(None)

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.resp_ended:
            return
        self.conn.ctx.observer.upstream_error("closed")
        self.failure = "reset" if isinstance(exc, ConnectionResetError) else "closed_early"
        self.fail(502)

    def upstream_pause_writing(self) -> None:
        pass  # the caller's DATA stays unacknowledged meanwhile (_ack_h1 checks the buffer)

    def upstream_resume_writing(self) -> None:
        self._ack_h1()
        self.conn.flush()

    # ResponseSink

    def response_interim(self, status: int, reason: bytes, names: list[bytes], values: list[bytes]) -> None:
        pass  # 1xx are hop by hop here (we answered no Expect: 100-continue; HTTP/2 callers do not wait)

    def response_head(self, status: int, reason: bytes, names: list[bytes], values: list[bytes],
                      raw: bytes | None) -> None:  # fmt: skip
        req = self.req
        assert req is not None
        try:
            head = req.method == b"HEAD"
            cache = self.conn.ctx.responses
            fields = cache.get((raw, head)) if raw is not None and len(raw) < _CACHE_HEAD else None
            if fields is None:
                fields = h2_response_fields(status, names, values, head_request=head)
                if raw is not None and len(raw) < _CACHE_HEAD:
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[(raw, head)] = fields
        except BadResponse as exc:
            self.conn.ctx.observer.upstream_error(exc.reason)
            self.failure = exc.reason
            self.fail(502)
            return
        self.status = status
        self.resp_started = True
        self.resp_fields = fields
        self._set_deadline(self.conn.ctx.timeouts.idle, _S_IDLE)

    def response_body(self, data: bytes) -> None:
        h2 = self.conn.h2
        if h2 is None or self.resp_ended:
            return
        fields = self.resp_fields
        if fields is not None:
            self.resp_fields = None
            h2.send_response(self.sid, fields)
        h2.send_data(self.sid, data)
        self.bytes_out += len(data)
        if (self.conn.write_paused or h2.queued_body_size(self.sid) >= BUFFER_HIGH) and self.upstream is not None:
            self.up_paused = True
            self.upstream.pause_reading()

    def response_end(self, reusable: bool) -> None:
        h2 = self.conn.h2
        if self.resp_ended:
            return
        self.resp_ended = True
        if h2 is not None:
            fields = self.resp_fields
            self.resp_fields = None
            try:
                if fields is not None:
                    h2.send_response(self.sid, fields, end_stream=True)
                else:
                    h2.end_stream(self.sid)
            except ngh2.NGH2Error:
                pass
            if not self.ended:
                self.conn.reset_when_sent(self)  # RFC 9113 §8.1: the rest of the request is not needed
        # The connection goes back to the pool only when the app saw the whole request too.
        self._release_upstream(reusable and self.ended)
        dl = self.deadline
        if dl is not None:
            dl.clear()

    def response_switch(self, rest: bytes) -> None:
        pass

    def response_error(self, kind: str) -> None:
        self.conn.ctx.observer.upstream_error(kind)
        self.failure = kind
        self.fail(502)

    # -- the h2c leg -----------------------------------------------------------------------------------------

    def _start_h2c(self) -> None:
        self.leg = Leg.H2C
        pool = self.conn.ctx.h2c
        assert pool is not None
        up = pool.pick()
        if up is not None:
            self._attach_h2c(up)
        else:
            self.task = self.conn.loop.create_task(self._lease_h2c(pool))

    async def _lease_h2c(self, pool: H2cPool) -> None:
        conn = self.conn
        obs = conn.ctx.observer
        try:
            up = await pool.connect()
        except UpstreamError as exc:
            obs.upstream_error(exc.kind)
            self.failure = exc.failure
            self.task = None
            self.fail(502)
            conn.flush()
            return
        self.task = None
        if self.resp_ended or conn.closed:
            return
        self._attach_h2c(up)
        conn.flush()

    def _attach_h2c(self, up: H2cConnection) -> None:
        conn = self.conn
        req = self.req
        target = self.target
        pool = conn.ctx.h2c
        assert req is not None and target is not None and pool is not None
        headers = [(b":method", req.method), (b":scheme", b"http"), (b":path", target.forward),
                   (b":authority", req.authority or pool.authority), *req.fields]  # fmt: skip
        if req.te_trailers:
            headers.append((b"te", b"trailers"))  # gRPC servers check it (PROTOCOL-HTTP2.md)
        headers.append((_XFCC, conn.identity))
        headers += self._extra()
        body = b"".join(self.pending)
        self.pending = []
        self.upstream_h2c = up
        try:
            self.up_sid = up.open(self, headers, end_stream=self.ended and not body)
            if body:
                up.send_data(self.up_sid, body, self.ended)
        except ngh2.NGH2Error:
            self.upstream_h2c = None
            self.failure = "closed_early"
            conn.ctx.observer.upstream_error("closed")
            self.fail(502)
            return
        up.flush()
        self.ack_down()
        if self.ended:
            self._set_deadline(conn.ctx.timeouts.upstream_response, _S_APP)
        else:
            self._set_deadline(conn.ctx.timeouts.idle, _S_IDLE)

    def ack_down(self) -> None:
        """Acknowledge the caller's DATA once the app's connection took it (flow control coupled to the app)."""
        up = self.upstream_h2c
        if not self.unacked or up is None or not up.can_take(self.up_sid):
            return
        n, self.unacked = self.unacked, 0
        h2 = self.conn.h2
        if h2 is not None and not self.conn.closed:
            h2.acknowledge_received_data(n, self.sid)
            self.conn.flush()

    def up_response(self, headers: tuple[tuple[bytes, bytes], ...], end: bool) -> None:
        h2 = self.conn.h2
        if h2 is None or self.resp_ended:
            return
        fields = [(n, v) for n, v in headers if n not in HOP_BY_HOP]
        status = next((v for n, v in headers if n == b":status"), b"0")
        self.status = int(status) if status.isdigit() else 0
        if end:
            self._grpc_status(headers)
        self.resp_started = True
        try:
            h2.send_response(self.sid, fields, end_stream=end)
        except ngh2.NGH2Error:
            return
        if end:
            self._up_done()
        else:
            self._set_deadline(self.conn.ctx.timeouts.idle, _S_IDLE)
        self.conn.flush()

    def up_data(self, data: bytes, end: bool) -> None:
        h2 = self.conn.h2
        up = self.upstream_h2c
        if h2 is None or self.resp_ended or up is None:
            if up is not None and data:
                up.acknowledge(len(data), self.up_sid)
            return
        self._progress()
        self.bytes_out += len(data)
        self.up_unacked += len(data)
        try:
            h2.send_data(self.sid, data, end_stream=end)
        except ngh2.NGH2Error:
            return
        if end:
            self._up_done()
        self.conn.flush()
        self.downstream_drained()

    def up_trailers(self, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        h2 = self.conn.h2
        if h2 is None or self.resp_ended:
            return
        self._grpc_status(headers)
        try:
            h2.send_trailers(self.sid, [(n, v) for n, v in headers if n not in HOP_BY_HOP])
        except ngh2.NGH2Error:
            return
        self._up_done()
        self.conn.flush()

    def _grpc_status(self, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        for n, v in headers:
            if n == b"grpc-status" and v.isdigit():
                self.grpc_status = int(v)

    def _up_done(self) -> None:
        """The app's response is complete (END_STREAM queued towards the caller)."""
        self.resp_ended = True
        up = self.upstream_h2c
        if not self.ended:
            self.conn.reset_when_sent(self)  # RFC 9113 §8.1: the rest of the request is not needed
            if up is not None:
                up.cancel(self.up_sid)  # nor by the app, which answered in full
        if up is not None:
            if self.up_unacked:  # keep the app connection's window open for what this stream got
                n, self.up_unacked = self.up_unacked, 0
                up.acknowledge(n, self.up_sid)
            up.forget(self.up_sid)
            self.upstream_h2c = None
        dl = self.deadline
        if dl is not None:
            dl.clear()

    def up_reset(self, code: int) -> None:
        """The app reset its stream (REFUSED_STREAM and the like): 502/UNAVAILABLE before a response head,
        else the caller's stream is reset too."""
        up = self.upstream_h2c
        if up is not None and self.up_unacked:  # the app connection's window: what this stream got is consumed
            n, self.up_unacked = self.up_unacked, 0
            up.acknowledge(n, self.up_sid)
        if self.resp_ended:
            return
        self.upstream_h2c = None
        self.conn.ctx.observer.upstream_error("reset")
        self.failure = "reset"
        self.fail(502)
        self.conn.flush()

    def up_lost(self, failure: str) -> None:
        if self.resp_ended:
            return
        self.upstream_h2c = None
        self.conn.ctx.observer.upstream_error("closed")
        self.failure = failure
        self.fail(502)
        self.conn.flush()


# ---------------------------------------------------------------------------------------------------------
# The app over h2c


class H2cConnection(asyncio.Protocol):
    """One h2c connection to the app (prior knowledge); streams of many callers are multiplexed over it."""

    def __init__(self, pool: H2cPool) -> None:
        self.pool = pool
        self.h2: ngh2.Connection | None = None
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.alive = False
        self.going_away = False
        self.write_paused = False
        self._flushing = False
        self._again = False
        self._idle: asyncio.TimerHandle | None = None

    @property
    def load(self) -> int:
        return len(self.streams)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = self.transport = transport_of(transport)
        t.set_write_buffer_limits(high=BUFFER_HIGH)
        self.alive = True
        h2 = self.h2 = ngh2.Connection(Role.CLIENT, ngh2.Configuration(auto_window_update=False))
        h2.initiate_connection({Setting.ENABLE_PUSH: 0, Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
        h2.set_local_window_size(CONN_WINDOW)
        self.flush()

    def data_received(self, data: bytes) -> None:
        h2 = self.h2
        if h2 is None:
            return
        try:
            h2.receive_data(data)
        except ngh2.NGH2Error as exc:
            self._broken(f"the app's HTTP/2 was refused: {exc}")
            return
        self.flush()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._broken("closed_early")

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for st in list(self.streams.values()):
            st.ack_down()

    def _broken(self, why: str) -> None:
        was = self.alive
        self.alive = False
        self.pool.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        streams = list(self.streams.values())
        self.streams.clear()
        for st in streams:
            st.up_lost("closed_early" if was else "connect_error")
        if self.transport is not None:
            self.transport.abort()
        self.h2 = None

    # -- used by streams ---------------------------------------------------------------------------------

    def open(self, stream: Stream, headers: list[tuple[bytes, bytes]], *, end_stream: bool) -> int:
        h2 = self.h2
        if h2 is None:
            raise ngh2.ConnectionStateError("the app's connection is gone")
        sid = h2.send_request(headers, end_stream=end_stream)
        self.streams[sid] = stream
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        return sid

    def send_data(self, sid: int, data: bytes, end: bool) -> None:
        h2 = self.h2
        if h2 is None or sid not in self.streams:
            return
        try:
            if data:
                h2.send_data(sid, data, end_stream=end)
            elif end:
                h2.end_stream(sid)
        except ngh2.NGH2Error:
            return
        self.flush()

    def send_trailers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        h2 = self.h2
        if h2 is None or sid not in self.streams:
            return
        try:
            if headers:
                h2.send_trailers(sid, headers)
            else:
                h2.end_stream(sid)
        except ngh2.NGH2Error:
            return
        self.flush()

    def can_take(self, sid: int) -> bool:
        """Whether this connection took the caller's bytes for `sid` (sent, or queued below the mark)."""
        h2 = self.h2
        if h2 is None or self.write_paused:
            return False
        try:
            return h2.queued_body_size(sid) < BUFFER_HIGH
        except ngh2.NGH2Error:
            return True  # the stream is gone: nothing is held for it

    def acknowledge(self, n: int, sid: int) -> None:
        h2 = self.h2
        if h2 is not None:
            h2.acknowledge_received_data(n, sid)
            self.flush()

    def cancel(self, sid: int) -> None:
        h2 = self.h2
        if h2 is not None and sid in self.streams:
            with contextlib.suppress(ngh2.NGH2Error):
                h2.reset_stream(sid, _CANCEL)
            self.flush()

    def forget(self, sid: int) -> None:
        self.streams.pop(sid, None)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self.streams and self.alive and self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(self.pool.idle_timeout, self._idle_close)

    def _idle_close(self) -> None:
        self._idle = None
        if not self.streams:
            self.pool.discard(self)
            self.alive = False
            if self.transport is not None:
                self.transport.close()

    # -- the engine ----------------------------------------------------------------------------------------

    def flush(self) -> None:
        if self._flushing:
            self._again = True
            return
        h2 = self.h2
        t = self.transport
        if h2 is None or t is None:
            return
        self._flushing = True
        try:
            while True:
                self._again = False
                out = h2.data_to_send()
                if out:
                    t.write(out)
                batch = h2.events()
                if batch:
                    self._handle(batch)
                elif not self._again:
                    break
                if self.h2 is None:
                    return
        except ngh2.NGH2Error as exc:
            self._flushing = False
            self._broken(str(exc))
            return
        finally:
            self._flushing = False

    def _handle(self, batch: list[ngh2.Event]) -> None:
        streams = self.streams
        for e in batch:
            t = type(e)
            if t is DataReceived:
                assert isinstance(e, DataReceived)
                st = streams.get(e.stream_id)
                if st is not None:
                    st.up_data(e.data, e.end_stream)
                elif e.data and self.h2 is not None:
                    self.h2.acknowledge_received_data(len(e.data), e.stream_id)
            elif t is ResponseReceived:
                assert isinstance(e, ResponseReceived)
                st = streams.get(e.stream_id)
                if st is not None:
                    st.up_response(e.headers, e.end_stream)
            elif t is TrailersReceived:
                assert isinstance(e, TrailersReceived)
                st = streams.get(e.stream_id)
                if st is not None:
                    st.up_trailers(e.headers)
            elif t is StreamReset:
                assert isinstance(e, StreamReset)
                st = streams.pop(e.stream_id, None)
                if st is not None:
                    st.up_reset(e.error_code)
            elif t is StreamClosed:
                assert isinstance(e, StreamClosed)
                st = streams.pop(e.stream_id, None)
                if st is not None and e.error_code != _NO_ERROR:
                    st.up_reset(e.error_code)
                self._maybe_idle()
            elif t is WindowUpdated:
                assert isinstance(e, WindowUpdated)
                if e.stream_id == 0:
                    for st in list(streams.values()):
                        st.ack_down()
                else:
                    st = streams.get(e.stream_id)
                    if st is not None:
                        st.ack_down()
            elif t is GoAwayReceived:
                assert isinstance(e, GoAwayReceived)
                # Streams above last_stream_id were not processed by the app (RFC 9113 §6.8): they fail
                # (UNAVAILABLE for gRPC, retryable); the others finish. No new stream goes here.
                self.going_away = True
                self.pool.discard(self)
                for sid in [s for s in streams if s > e.last_stream_id]:
                    streams.pop(sid).up_lost("goaway")
            elif t is ConnectionClosed:
                self._broken("closed_early")
                return


class H2cPool:
    """At most `max_connections` h2c connections to the app; a stream goes to the least loaded one, a new one
    is opened when every open one carries `streams_per_connection` or more (libnghttp2 queues streams past
    the app's SETTINGS_MAX_CONCURRENT_STREAMS itself)."""

    def __init__(
        self, host: str, port: int, *, connect_timeout: float, idle_timeout: float,
        max_connections: int = UPSTREAM_CONNECTIONS, streams_per_connection: int = MAX_STREAMS,
    ) -> None:  # fmt: skip
        self.host = host
        self.port = port
        self.authority = f"{host}:{port}".encode("ascii")
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.streams_per_connection = streams_per_connection
        self.conns: list[H2cConnection] = []
        self._connecting: asyncio.Future[H2cConnection] | None = None
        self._closed = False

    def pick(self) -> H2cConnection | None:
        """An open connection with room, without waiting; None: call `connect`."""
        best: H2cConnection | None = None
        for c in self.conns:
            if c.alive and not c.going_away and (best is None or c.load < best.load):
                best = c
        if best is not None and (best.load < self.streams_per_connection or len(self.conns) >= self.max_connections):
            return best
        return None

    async def connect(self) -> H2cConnection:
        """A connection for one more stream: a new one (shared by the streams that wait for it), under
        `connect_timeout`. Raises UpstreamError("connect", ...)."""
        if self._closed:
            raise UpstreamError("closed", "pool is closed")
        fut = self._connecting
        if fut is None:
            fut = self._connecting = asyncio.ensure_future(self._open())
            fut.add_done_callback(self._opened)
        conn = await asyncio.shield(fut)
        return conn

    def _opened(self, fut: asyncio.Future[H2cConnection]) -> None:
        self._connecting = None
        if not fut.cancelled() and fut.exception() is None:
            self.conns.append(fut.result())

    async def _open(self) -> H2cConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _t, conn = await loop.create_connection(lambda: H2cConnection(self), self.host, self.port)
        except TimeoutError:
            raise UpstreamError("connect", f"{self.host}:{self.port}: no connection within "
                                f"{self.connect_timeout:g}s", "connect_timeout") from None
        except OSError as exc:
            failure = "connect_refused" if isinstance(exc, ConnectionRefusedError) else "connect_error"
            raise UpstreamError("connect", f"{self.host}:{self.port}: {exc.strerror or exc}", failure) from None
        return conn

    def discard(self, conn: H2cConnection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)

    async def close(self) -> None:
        self._closed = True
        for c in list(self.conns):
            if not c.streams and c.transport is not None:
                c.alive = False
                c.transport.close()
        self.conns.clear()
