"""Outbound listeners: the app speaks plain HTTP/1.1 (or TCP) on 127.0.0.1, the sidecar originates mTLS
to the target with its own X.509-SVID and checks the server's SPIFFE ID before sending a byte.

Shape:

* `OutboundServer` reuses the inbound listener's machinery (accept loop, limits, drain, the httptools
  request/response relaying of `inbound._HttpConn` / `inbound._Exchange`) through small subclasses: the
  downstream side is plain TCP from the app (no handshake, no policy), the upstream side is a `Route`.
* A `Route` owns a bounded `UpstreamPool` of kept-alive mTLS connections to its target. Each new
  connection takes the newest client snapshot (rotation = reference swap), resolves the target's DNS name
  afresh (Kubernetes service names), and runs `verify_server` right after the handshake: the chain
  against the bundle of the server ID's own trust domain (X509-SVID §5.2) in the snapshot that handshake
  used, then the route's `expect` pattern. A mismatch never carries a byte of the request: the app gets a
  502 naming both IDs, the line is logged and counted.
* Metrics and audit: every outbound listener reports `listener="outbound"` (also for errors raised in the
  relay code shared with inbound.py); the route is the `route` label of the outbound_* series and the
  audit line's `rule`; the audit line's `peer` is the server SPIFFE ID verified on the connection the
  request used (on a refused server, the ID it presented, with decision `deny`).
* Rotation of our SVID or of the bundles: `retire()` bumps the pools' generation; idle connections close
  at once, leased ones finish their current exchange and close on release, new requests use new
  connections (which present the new SVID and verify against the new bundles).
* Health: a connect failure or timeout marks the route down for `timeouts.target_down_backoff` seconds
  (fixed, no jitter); meanwhile the app gets a fast 503 instead of piling up on a dead target.

TLS session resumption (client side) is not used. Measured (CPython 3.11.7, OpenSSL 3.0.19, uvloop
0.23.0, loopback): no MemoryBIO protocol of our own is needed, since both asyncio's and uvloop's SSL
protocols call `ctx.wrap_bio(...)` on the context object, so an `SSLContext` subclass whose `wrap_bio`
adds `session=` resumes with the stock transports (`session_reused` True against a ticket-issuing
server); and a MemoryBIO protocol in pure Python costs little per byte anyway (64 KiB writes: asyncio's
pure-Python SSLObject/MemoryBIO protocol 310 MB/s, uvloop's Cython one 329 MB/s, about 3 ns/byte for
both, bound by the crypto). It is still not worth it: (1) our own inbound listeners issue no tickets
(`num_tickets=0`), so a sidecar-to-sidecar call never resumes (measured: not reused); (2) on a resumed
connection the client gets no peer chain (`get_unverified_chain()` and `get_verified_chain()` empty, only
the `getpeercert()` leaf), so `verify_server` could not check the chain against the bundles of the
current snapshot: a resumed connection would be trusted on a decision cached across bundle rotations;
(3) the gain is about 2 ms per new connection (median connect + 1-byte echo 4.4 ms full vs 2.2 ms resumed
under uvloop), which the pool already pays once per slot, not per request (tests/integration/test_outbound.py).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import logging
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Final, cast

from .config import HostPort, InboundSettings, Limits, ListenerMode, OutboundTarget, Timeouts
from .errors import SidecarError, SvidError
from .identity import SpiffeId
from .inbound import _T_RESPONSE, AuditSink, InboundServer, PolicyRef, _BaseConn, _Exchange, _HttpConn, _LazyTimer
from .metrics import Metrics
from .policy import Decision, compile_policy
from .tls import TlsContexts, TlsSnapshot, verify_peer_connection
from .upstream import UpstreamConnection, UpstreamError, UpstreamPool

__all__ = ["OutboundServer", "Route", "ServerIdMismatch", "build_routes"]

log = logging.getLogger("spiffe_sidecar.outbound")

# The `listener` label of every outbound listener (fixed ports and the proxy port alike): one bounded
# value; the route is a label of the outbound_* series and the `rule` of the audit line.
LISTENER: Final = "outbound"
# Snapshots a route remembers to find the one a handshake used (see Route.verify_server); a handshake
# that outlives this many rotations is refused (fail closed) rather than checked against other bundles.
_SNAPSHOTS_KEPT: Final = 8
_POOL_IDLE_MAX: Final = 30.0  # below common server keep-alive timeouts (ours: timeouts.idle = 60 s)
_BUFFER_HIGH: Final = 64 * 1024


class ServerIdMismatch(SidecarError):
    """The target presented a valid SVID for another workload than the route expects."""

    def __init__(self, expected: str, got: SpiffeId) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"server SPIFFE ID {got} does not match expected {expected}")


def _fixed_json(status: int, reason: str, body: Mapping[str, str]) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + data


class Route:
    """One target: its pool, its expected server ID, its health. Shared by every exchange to it."""

    def __init__(
        self,
        name: str,
        to: OutboundTarget,
        *,
        tls: TlsContexts,
        metrics: Metrics,
        timeouts: Timeouts,
        pool_size: int,
        clock: Callable[[], float] = time.monotonic,
        down_backoff: float | None = None,
    ) -> None:
        self.name = name
        self.target = to.target
        self.expect = to.expect
        self.tls = tls
        self.metrics = metrics
        self.clock = clock
        self.down_backoff = timeouts.target_down_backoff if down_backoff is None else down_backoff
        self.down_until = 0.0
        self.handshakes = 0  # completed TLS handshakes (each is one new pooled connection)
        self.mismatches = 0
        # Audit decisions (`rule` is the route name): forwarded, or refused on the server's identity.
        self.decision = Decision(True, True, name, f"outbound route {name} -> {to.target}", "enforce")
        self.refused_id = Decision(False, True, name, f"server SPIFFE ID does not match {to.expect.text}", "enforce")
        self.refused_cert = Decision(False, True, name, "server certificate failed the SPIFFE check", "enforce")
        # Client snapshots handed to new connections, newest last; and the verified server ID of each
        # live connection (keyed by its SSLObject, gone with it).
        self._snapshots: collections.deque[TlsSnapshot] = collections.deque(maxlen=_SNAPSHOTS_KEPT)
        self._server_ids: weakref.WeakKeyDictionary[ssl.SSLObject, tuple[str, float]] = weakref.WeakKeyDictionary()
        self.pool = UpstreamPool(
            to.target.host,
            to.target.port,
            max_size=pool_size,
            connect_timeout=timeouts.upstream_connect,
            idle_timeout=min(timeouts.idle, _POOL_IDLE_MAX),
            ssl=self.client_context,  # the newest client context for every new connection
            server_hostname=to.target.host,  # SNI only: hostname checks are off (X509-SVID §5.1)
            verify=self.verify_server,
        )
        self._handshake_counter = metrics.outbound_handshakes.labels(route=name)
        metrics.outbound_pool_connections.labels(route=name).set_function(lambda: self.pool.size)

    def client_context(self) -> ssl.SSLContext:
        """The newest client context, for one new connection. Its snapshot is remembered so that the
        check after the handshake uses that snapshot's bundles, even if a rotation lands in between."""
        try:
            snap = self.tls.current
        except SvidError as exc:  # none yet, or ours expired: never present an expired SVID
            raise UpstreamError("no_svid", f"{exc.reason}: {exc.detail}") from None
        snaps = self._snapshots
        if not snaps or snaps[-1] is not snap:
            snaps.append(snap)
        return snap.client

    def snapshot_of(self, ssl_object: ssl.SSLObject) -> TlsSnapshot | None:
        """The snapshot whose client context made this connection (None if it is no longer remembered)."""
        ctx = ssl_object.context
        for snap in reversed(self._snapshots):
            if snap.client is ctx:
                return snap
        return None

    def verify_server(self, ssl_object: ssl.SSLObject) -> None:
        """Run right after each handshake, before any request byte: the SPIFFE check of the server,
        against the bundle of the server ID's trust domain in the snapshot the handshake used (OpenSSL
        verified the chain with that snapshot's store; a newer one may trust other roots)."""
        self.handshakes += 1
        self._handshake_counter.inc()
        snap = self.snapshot_of(ssl_object)
        if snap is None:
            raise SvidError("stale_snapshot", "the TLS context of this handshake is no longer known")
        peer = verify_peer_connection(ssl_object, snap, dt.datetime.now(dt.UTC))
        if not self.expect.matches(peer.spiffe_id):
            self.mismatches += 1
            self.metrics.outbound_server_id_mismatches.labels(route=self.name).inc()
            log.warning(
                "outbound %s: refused %s: server presented %s, expected %s",
                self.name, self.target, peer.spiffe_id, self.expect.text,
            )  # fmt: skip
            raise ServerIdMismatch(self.expect.text, peer.spiffe_id)
        self._server_ids[ssl_object] = (str(peer.spiffe_id), peer.expires_at.timestamp())

    def server_of(self, up: UpstreamConnection) -> tuple[str, float]:
        """The SPIFFE ID verified on this connection's server certificate and its chain's expiry as epoch
        seconds (("-", 0.0) if unknown: treated as expired by the TCP relay)."""
        obj = up.transport.get_extra_info("ssl_object") if up.transport is not None else None
        return ("-", 0.0) if obj is None else self._server_ids.get(obj, ("-", 0.0))

    def server_id_of(self, up: UpstreamConnection) -> str:
        """The SPIFFE ID verified on this connection's server certificate ("-" if unknown)."""
        return self.server_of(up)[0]

    def is_down(self) -> bool:
        return self.down_until > 0.0 and self.clock() < self.down_until

    def mark_down(self) -> None:
        self.down_until = self.clock() + self.down_backoff

    def mark_up(self) -> None:
        self.down_until = 0.0

    def failure_response(self, exc: UpstreamError) -> bytes:
        if exc.kind == "no_svid":
            return _fixed_json(503, "Service Unavailable", {
                "error": "no valid X.509-SVID of our own to present", "route": self.name, "detail": exc.detail,
            })  # fmt: skip
        if exc.kind == "verify":
            return _fixed_json(502, "Bad Gateway", {
                "error": "server identity rejected", "route": self.name, "target": str(self.target),
                "expected": self.expect.text, "detail": exc.detail,
            })  # fmt: skip
        return _fixed_json(502, "Bad Gateway", {
            "error": "target unreachable", "route": self.name, "target": str(self.target), "detail": exc.detail,
        })  # fmt: skip

    def down_response(self) -> bytes:
        return _fixed_json(503, "Service Unavailable", {
            "error": "target marked down after a failed connection", "route": self.name,
            "target": str(self.target),
        })  # fmt: skip


def build_routes(
    targets: Sequence[tuple[str, OutboundTarget]],
    *,
    tls: TlsContexts,
    metrics: Metrics,
    timeouts: Timeouts,
    pool_size: int,
) -> dict[str, Route]:
    return {
        key: Route(key, to, tls=tls, metrics=metrics, timeouts=timeouts, pool_size=pool_size) for key, to in targets
    }


_NO_ROUTE = Decision(False, True, "no-route", "no outbound route for this Host", "enforce")


class OutboundServer(InboundServer):
    """A plain listener on loopback for the app. With `by_host=False` every request goes to the single
    route; with `by_host=True` (the HTTP proxy port) the request's authority or Host picks the route."""

    label = LISTENER

    def __init__(
        self,
        name: str,
        listen: HostPort,
        routes: Mapping[str, Route],
        *,
        by_host: bool,
        mode: ListenerMode = ListenerMode.HTTP,
        timeouts: Timeouts,
        limits: Limits,
        tls: TlsContexts,
        audit: AuditSink,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not routes:
            raise ValueError("an outbound listener needs at least one route")
        if mode is ListenerMode.TCP and (by_host or len(routes) != 1):
            raise ValueError("a tcp outbound listener has exactly one fixed route")
        first = next(iter(routes.values()))
        super().__init__(
            # The app's own requests keep every end-to-end field: the receiving sidecar strips what its
            # policy says (routing overrides included).
            InboundSettings(listen=listen, app=first.target, mode=mode, strip_request_headers=()),
            timeouts=timeouts,
            limits=limits,
            tls=tls,
            policy=PolicyRef(compile_policy({"rules": []}, "<outbound>")),
            audit=audit,
            metrics=metrics,
            clock=clock,
        )
        self.name = name
        self.routes = dict(routes)
        self.by_host = by_host
        self.single = None if by_host else first

    def route_for(self, host: bytes | None) -> Route | None:
        if self.single is not None:
            return self.single
        if host is None:
            return None
        name = _host_only(host)
        return self.routes.get(name)

    def retire(self) -> int:
        """Our SVID or the bundles changed: drain pooled connections gracefully (see module docstring)."""
        return sum(r.pool.retire() for r in self.routes.values())

    def count_request(self, decision: Decision) -> None:
        pass  # `requests` counts authorization decisions of the inbound policy; outbound has none

    async def drain(self, deadline: float) -> None:
        await super().drain(deadline)
        for r in self.routes.values():
            await r.pool.close()

    async def _handshake(self, client: socket.socket, addr: str) -> None:
        # Plain TCP from the app on loopback: there is no handshake on this side.
        loop = asyncio.get_running_loop()
        try:
            self.tls.current  # noqa: B018 - the connection objects need it; refuse here with the reason
        except SvidError as exc:
            client.close()
            self._refuse(addr, exc.reason, exc.detail)
            self._conn_closed()
            return
        factory: Callable[[], _BaseConn]
        if self.settings.mode is ListenerMode.TCP:
            factory = lambda: _OutTcpConn(self, addr)  # noqa: E731
        else:
            factory = lambda: _OutHttpConn(self, addr)  # noqa: E731
        try:
            async with asyncio.timeout(self.timeouts.handshake):
                await loop.connect_accepted_socket(factory, client)
        except asyncio.CancelledError:
            client.close()
            self._conn_closed()
            raise
        except Exception as exc:
            client.close()
            self._refuse(addr, "accept", type(exc).__name__)
            self._conn_closed()


def _host_only(host: bytes) -> str:
    h = host.strip().lower()
    if h.startswith(b"["):
        end = h.find(b"]")
        return h[: end + 1].decode("ascii", "replace") if end > 0 else h.decode("ascii", "replace")
    colon = h.rfind(b":")
    if colon >= 0:
        h = h[:colon]
    return h.decode("ascii", "replace")


def _split_absolute(raw: bytes) -> tuple[bytes | None, bytes]:
    """`http://host:port/path?q` (absolute form, what an app honouring HTTP_PROXY sends) -> (authority,
    origin-form target). Origin-form targets come back unchanged with no authority (RFC 9112 §3.2)."""
    if raw[:7].lower() != b"http://":
        return None, raw
    rest = raw[7:]
    cut = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    authority, target = rest[:cut], rest[cut:]
    if not target.startswith(b"/"):
        target = b"/" + target
    return authority, target


class _OutHttpConn(_HttpConn):
    """A plain HTTP connection from the app; requests are relayed by `_OutExchange`s."""

    def __init__(self, server: OutboundServer, addr: str) -> None:
        super().__init__(server, server.tls.current, addr)
        self.out = server
        self.authority: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.peer_id_str = "-"
        transport.set_write_buffer_limits(high=_BUFFER_HIGH)
        self.server._conns.add(self)
        self.verified()

    def make_xfcc(self) -> bytes:
        # Only the receiving sidecar knows who called it (from the handshake); it strips whatever XFCC
        # arrives and adds its own. Ours just names the originating workload.
        return f"By={self.snap.own_id}".encode("ascii")

    def lost(self) -> None:
        # The base class skips this for unverified peers; an app connection has no TLS peer at all.
        self._release_exchanges()

    def on_headers_complete(self) -> None:
        authority, target = _split_absolute(b"".join(self._url))
        self._url = [target]
        self.authority = authority
        super().on_headers_complete()


class _OutExchange(_Exchange):
    """One request from the app: pick the route, lease a verified mTLS connection, relay."""

    __slots__ = ("route", "server_id")

    def __init__(self, conn: _HttpConn, method: bytes, headers: list[tuple[bytes, bytes]], t0: float) -> None:
        super().__init__(conn, method, headers, t0)
        self.route: Route | None = None
        # The audit line's `peer`: the server SPIFFE ID verified on the connection this request used (or,
        # on a mismatch, the one presented); "-" when no server was reached.
        self.server_id = "-"

    def start(self) -> None:
        if self.started:
            return
        if self.error is not None or self.framing is None:
            super().start()  # the fixed 4xx path of the inbound side
            return
        self.started = True
        conn = cast(_OutHttpConn, self.conn)
        server = conn.out
        self.keep_alive = self.framing.keep_alive
        host = conn.authority
        if host is None:
            host = next((v for n, v in self.headers if n.lower() == b"host"), None)
        route = server.route_for(host)
        if route is None:
            self.decision = _NO_ROUTE
            server.metrics.upstream_errors.labels(listener=server.label, kind="no_route").inc()
            self.respond_fixed(
                _fixed_json(502, "Bad Gateway", {"error": "no outbound route for this host",
                                                 "host": (host or b"").decode("ascii", "replace")}),
                b"502",
            )  # fmt: skip
            self.finish(keep_alive=False)
            return
        self.route = route
        self.decision = route.decision
        if route.is_down():
            server.metrics.upstream_errors.labels(listener=server.label, kind="down").inc()
            self.respond_fixed(route.down_response(), b"503")
            self.finish(keep_alive=False)
            return
        up = route.pool.acquire_idle(self)
        if up is not None:
            self.attach(up)
        else:
            self.task = asyncio.get_running_loop().create_task(self.forward())

    async def forward(self) -> None:
        route = self.route
        assert route is not None
        server = self.conn.server
        t = server.timeouts
        try:
            async with asyncio.timeout(t.upstream_connect + t.upstream_response):
                up = await route.pool.acquire(self)
        except UpstreamError as exc:
            server.metrics.upstream_errors.labels(listener=server.label, kind=exc.kind).inc()
            if exc.kind == "connect":
                route.mark_down()
                server._refusal_log(logging.WARNING, "outbound %s: %s", route.name, exc)
            elif exc.kind == "verify":
                # The pool raises UpstreamError from the verify hook's exception (kept as __context__).
                cause = exc.__context__
                if isinstance(cause, ServerIdMismatch):
                    self.server_id = str(cause.got)
                    self.decision = route.refused_id
                else:
                    self.decision = route.refused_cert
            self.fail(route.failure_response(exc), b"502")
            return
        except TimeoutError:  # every pooled connection stayed busy
            server.metrics.upstream_errors.labels(listener=server.label, kind="pool_exhausted").inc()
            self.fail(_fixed_json(503, "Service Unavailable", {"error": "outbound pool exhausted"}), b"503")
            return
        route.mark_up()
        if self.finished or self.conn.closed:
            route.pool.release(up, reusable=False)
            return
        self.attach(up)

    def attach(self, up: UpstreamConnection) -> None:
        assert self.route is not None
        self.server_id = self.route.server_id_of(up)
        super().attach(up)

    def finish(self, *, keep_alive: bool, notify: bool = True) -> None:
        # The base class audits `conn.peer_id_str`: here the server of this very exchange (an app
        # connection's requests may go to different routes and pooled connections).
        self.conn.peer_id_str = self.server_id
        super().finish(keep_alive=keep_alive, notify=notify)

    def release_upstream(self, reusable: bool) -> None:
        up = self.upstream
        if up is not None:
            self.upstream = None
            assert self.route is not None
            self.route.pool.release(up, reusable=reusable)
        self.conn._cancel_timer(_T_RESPONSE)


_OutHttpConn.exchange_class = _OutExchange


class _OutTcpConn(_BaseConn):
    """TCP mode: one verified mTLS connection per app connection, then bytes both ways, under the same
    deadlines as the inbound TCP relay: `timeouts.idle` without a byte either way, `timeouts.write_stall`
    for an app that stops reading, and the server certificate's expiry (X509-SVID §5.2 holds for the life
    of the connection). One audit line per connection."""

    def __init__(self, server: OutboundServer, addr: str) -> None:
        super().__init__(server, server.tls.current, addr)
        self.out = server
        self.up: UpstreamConnection | None = None
        self.pending: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        self.started = server.clock()
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0  # audited; 408 when cut off for not reading
        self.server_id = "-"
        route = server.single
        assert route is not None
        self.route = route
        self.decision = route.decision
        self.idle: _LazyTimer | None = None
        self._write_stall: _LazyTimer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.peer_id_str = "-"
        transport.set_write_buffer_limits(high=_BUFFER_HIGH)
        self.server._conns.add(self)
        route = self.route
        self.idle = _LazyTimer(asyncio.get_running_loop(), self._on_idle)
        self.idle.set(self.out.timeouts.idle)
        if route.is_down():
            self.out.metrics.upstream_errors.labels(listener=self.out.label, kind="down").inc()
            self.close()
            return
        transport.pause_reading()
        self.task = asyncio.get_running_loop().create_task(self._connect(route))

    async def _connect(self, route: Route) -> None:
        try:
            async with asyncio.timeout(self.out.timeouts.upstream_connect * 2):
                up = await route.pool.acquire(self)
        except (UpstreamError, TimeoutError) as exc:
            kind = exc.kind if isinstance(exc, UpstreamError) else "timeout"
            self.out.metrics.upstream_errors.labels(listener=self.out.label, kind=kind).inc()
            if kind == "connect":
                route.mark_down()
            elif kind == "verify":
                cause = exc.__context__
                if isinstance(cause, ServerIdMismatch):
                    self.server_id = str(cause.got)
                    self.decision = route.refused_id
                else:
                    self.decision = route.refused_cert
            self.close()
            return
        route.mark_up()
        if self.closed:
            route.pool.release(up, reusable=False)
            return
        self.up = up
        self.server_id, self.peer_expires = route.server_of(up)
        self.arm_server_expiry()
        if self.pending:
            up.write(b"".join(self.pending))
            self.pending.clear()
        if self.transport is not None:
            self.transport.resume_reading()

    def arm_server_expiry(self) -> None:
        delay = max(0.0, self.peer_expires - time.time())
        self._expiry_handle = asyncio.get_running_loop().call_later(delay, self._on_server_expired)

    def _on_server_expired(self) -> None:
        self._expiry_handle = None
        if self.closed:
            return
        self.out._refuse(self.addr, "expired", f"server {self.server_id}: certificate expired on an open relay")
        up = self.up
        if up is not None:
            up.abort()
        self.abort()

    def _on_idle(self) -> None:
        self.close()  # lost() closes the upstream side

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.idle is not None:
            self.idle.set(self.out.timeouts.idle)
        up = self.up
        if up is not None and up.alive:
            up.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()
        t = self._write_stall  # the app must take bytes again within write_stall (as inbound)
        if t is None:
            t = self._write_stall = _LazyTimer(asyncio.get_running_loop(), self._on_write_stall)
        t.set(self.out.timeouts.write_stall)

    def resume_writing(self) -> None:
        if self._write_stall is not None:
            self._write_stall.clear()
        if self.up is not None:
            self.up.resume_reading()

    def _on_write_stall(self) -> None:
        self.out.metrics.peer_stalls.labels(listener=self.out.label, kind="write").inc()
        self.status = 408
        up = self.up
        if up is not None:
            up.abort()
        self.abort()

    def lost(self) -> None:
        for t in (self.idle, self._write_stall):
            if t is not None:
                t.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        up, self.up = self.up, None
        if up is not None:
            self.route.pool.release(up, reusable=False)
        self.out.audit.decision(
            listener=self.out.label,
            peer=self.server_id,
            method="-",
            path="-",
            decision=self.decision,
            status=self.status,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration=self.out.clock() - self.started,
        )

    # UpstreamSink
    def upstream_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.idle is not None:
            self.idle.set(self.out.timeouts.idle)
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def upstream_eof(self) -> None:
        self.close()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.close()

    def upstream_pause_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def upstream_resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
