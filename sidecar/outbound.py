"""Outbound listeners: the app speaks plain HTTP/1.1 (or TCP) on 127.0.0.1, the sidecar originates mTLS
to the target with its own X.509-SVID and checks the server's SPIFFE ID before sending a byte.

Shape:

* `OutboundServer` is a composition of the shared data plane (`sidecar.proxy`, `sidecar.relay`,
  `sidecar.listener`), as inbound is:

      outbound = Listener(AppGate, HttpConnection(RouteAuthorizer, Route, Observer))   # mode http
               | Listener(AppGate, TcpRelay(RouteAuthorizer, Route, Observer))         # mode tcp

  The downstream side is plain TCP from the app (no handshake); the authorizer picks the route (the
  single one of a fixed port, or by the request's authority or Host on the proxy port); the route is the
  dialer, and its expected server ID is checked on every new connection before a byte is sent.
* A `Route` owns a bounded `UpstreamPool` of kept-alive mTLS connections to its target. Each new
  connection takes the newest client snapshot (rotation = reference swap), resolves the target's DNS name
  afresh (Kubernetes service names), and runs `verify_server` right after the handshake: the chain
  against the bundle of the server ID's own trust domain (X509-SVID §5.2) in the snapshot that handshake
  used, then the route's `expect` pattern. A mismatch never carries a byte of the request: the app gets a
  502 naming both IDs, the line is logged and counted.
* Metrics and audit: every outbound listener reports `listener="outbound"`; the route is the `route`
  label of the outbound_* series and the audit line's `rule`; the audit line's `peer` is the server SPIFFE
  ID verified on the connection the request used (on a refused server, the ID it presented, with
  decision `deny`).
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

import collections
import datetime as dt
import json
import logging
import ssl
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from .config import (
    AuthorizationMode,
    HostPort,
    InboundSettings,
    Limits,
    ListenerMode,
    OutboundJwt,
    OutboundTarget,
    Timeouts,
)
from .errors import SidecarError, SourceError, SvidError
from .http1 import RequestHeads, request_drop
from .identity import SpiffeId
from .jwtsource import JwtSvidFetcher
from .listener import AppGate, Listener, Peer
from .metrics import Metrics
from .observer import AuditSink, Observer, RateLimitedLog
from .policy import Decision, Mode, Target, Verdict, normalize_target
from .proxy import DialFailure, Grant, HttpConnection, HttpContext, StepUp
from .relay import RelayContext, TcpRelay
from .tls import TlsContexts, TlsSnapshot, verify_peer_connection
from .upstream import UpstreamConnection, UpstreamError, UpstreamPool
from .upstream import UpstreamSink as _Sink

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


class Bearer:
    """One `jwt` entry of a route: the JWT-SVID for `audience` attached to requests under `prefix`.

    The field line is built once per token (the fetcher renews at half-life): a request with a held token
    costs a dictionary lookup and an identity check. The token is never logged or shown (JWT-SVID §7.1)."""

    __slots__ = ("_info", "_line", "_svids", "_token", "audience", "grant", "prefix", "replace", "route")

    def __init__(self, jwt: OutboundJwt, svids: JwtSvidFetcher, route: str) -> None:
        self.audience = jwt.audience
        self.prefix = jwt.path_prefix.rstrip("/")  # "" for the root: every path
        self.replace = jwt.authorization is AuthorizationMode.REPLACE
        self.route = route
        self._svids = svids
        self._token: str | None = None
        self._line = b""
        self._info = ("-", jwt.audience, "-")
        self.grant: Grant | None = None  # set by the route (its decision, itself as dialer, this bearer)

    def covers(self, path: str) -> bool:
        """`path` is the prefix or below it, on whole segments (/api/stock covers /api/stock/42, not
        /api/stockpile)."""
        p = self.prefix
        return not p or path == p or (path.startswith(p) and path[len(p)] == "/")

    def line(self) -> bytes | None:
        token = self._svids.cached(self.audience)
        if token is None:
            return None
        if token is not self._token:
            info = self._svids.info(self.audience)
            self._line = b"authorization: Bearer " + token.encode("ascii") + b"\r\n"
            self._token = token
            if info is not None:
                self._info = (str(info.spiffe_id), info.audience, info.kid or "-")
        return self._line

    async def fetch(self) -> bytes:
        await self._svids.get(self.audience)  # the fetcher's deadline; SourceError on failure
        line = self.line()
        if line is None:
            raise SourceError(f"JWT-SVID for audience {self.audience!r}: expired on arrival")
        return line

    def info(self) -> tuple[str, str, str]:
        return self._info

    def refusal(self, reason: str) -> bytes:
        return _fixed_json(503, "Service Unavailable", {"error": "no JWT-SVID to attach", "route": self.route,
                                                        "detail": reason})  # fmt: skip

    def __repr__(self) -> str:
        return f"<Bearer {self.route} {self.prefix or '/'} aud={self.audience}>"


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
        jwt_svids: JwtSvidFetcher | None = None,
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
        self.authority = str(to.target).encode("ascii")  # Host for a request without one (HTTP/1.0)
        self._log = RateLimitedLog(clock)
        self.mismatches = 0
        # Audit decisions (`rule` is the route name): forwarded, or refused on the server's identity.
        self.decision = Decision(Verdict.ALLOW, name, f"outbound route {name} -> {to.target}", Mode.ENFORCE)
        mismatch = f"server SPIFFE ID does not match {to.expect.text}"
        self.refused_id = Decision(Verdict.DENY, name, mismatch, Mode.ENFORCE)
        self.refused_cert = Decision(Verdict.DENY, name, "server certificate failed the SPIFFE check", Mode.ENFORCE)
        if to.jwt and jwt_svids is None:
            raise ValueError(f"outbound route {name}: attaching JWT-SVIDs needs a JwtSvidFetcher")
        # Longest prefix first: the first that covers a path is its most specific entry.
        self.bearers: tuple[Bearer, ...] = tuple(
            sorted((Bearer(j, jwt_svids, name) for j in to.jwt if jwt_svids is not None), key=lambda b: -len(b.prefix))
        )
        self.grant = Grant(self.decision, self)
        for b in self.bearers:
            b.grant = Grant(self.decision, self, bearer=b)
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

    def grant_for(self, path: str) -> Grant:
        """The grant of a request to this route: with the JWT-SVID of the most specific `jwt` entry."""
        for b in self.bearers:
            if b.covers(path):
                assert b.grant is not None
                return b.grant
        return self.grant

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

    # -- the data plane's Dialer ---------------------------------------------------------------------------

    def acquire_idle(self, sink: _Sink) -> UpstreamConnection | None:
        return self.pool.acquire_idle(sink)

    async def acquire(self, sink: _Sink) -> UpstreamConnection:
        return await self.pool.acquire(sink)

    def release(self, up: UpstreamConnection, *, reusable: bool) -> None:
        self.pool.release(up, reusable=reusable)

    def unavailable(self) -> bytes | None:
        return self.down_response() if self.is_down() else None

    def failure(self, exc: UpstreamError) -> DialFailure:
        """The answer for a failed lease; a connect failure marks the route down for the backoff."""
        decision: Decision | None = None
        peer = "-"
        if exc.kind == "connect":
            self.mark_down()
            self._log(logging.WARNING, "outbound %s: %s", self.name, exc)
        elif exc.kind == "verify":
            # The pool raises UpstreamError from the verify hook's exception (kept as __context__).
            cause = exc.__context__
            if isinstance(cause, ServerIdMismatch):
                peer = str(cause.got)
                decision = self.refused_id
            else:
                decision = self.refused_cert
        status = 503 if exc.kind == "no_svid" else 502
        return DialFailure(self.failure_response(exc), status, decision, peer)

    def exhausted(self) -> bytes:
        return _fixed_json(503, "Service Unavailable", {"error": "outbound pool exhausted"})

    def connected(self) -> None:
        self.mark_up()

    def peer_of(self, up: UpstreamConnection) -> tuple[str, float]:
        return self.server_of(up)


def build_routes(
    targets: Sequence[tuple[str, OutboundTarget]],
    *,
    tls: TlsContexts,
    metrics: Metrics,
    timeouts: Timeouts,
    pool_size: int,
    jwt_svids: JwtSvidFetcher | None = None,
) -> dict[str, Route]:
    return {
        key: Route(key, to, tls=tls, metrics=metrics, timeouts=timeouts, pool_size=pool_size, jwt_svids=jwt_svids)
        for key, to in targets
    }


_NO_ROUTE: Final = Decision(Verdict.DENY, "no-route", "no outbound route for this Host", Mode.ENFORCE)


class RouteAuthorizer:
    """Outbound authorization: the route for the request (its decision and its pool), and the target
    normalised as inbound does. With `single`, every request goes to that route; otherwise the authority
    of an absolute-form target (what an app honouring HTTP_PROXY sends) or the Host picks it."""

    def __init__(self, routes: Mapping[str, Route], single: Route | None) -> None:
        self.routes = dict(routes)
        self.single = single

    def route_for(self, host: bytes | None) -> Route | None:
        if self.single is not None:
            return self.single
        if host is None:
            return None
        return self.routes.get(_host_only(host))

    def target(self, raw: bytes) -> tuple[Target, bytes | None]:
        authority, origin = _split_absolute(raw)
        return normalize_target(origin), authority

    def check(self, peer: Peer, method: bytes, target: Target, authority: bytes | None) -> Grant:
        route = self.single if self.single is not None else self.route_for(authority)
        if route is None:
            shown = (authority or b"").decode("ascii", "replace")
            body = _fixed_json(502, "Bad Gateway", {"error": "no outbound route for this host", "host": shown})
            return Grant(_NO_ROUTE, None, body, "no_route")
        return route.grant if not route.bearers else route.grant_for(target.path)

    def check_connection(self, peer: Peer) -> Grant:
        assert self.single is not None
        return self.single.grant

    def step_up(self, decision: Decision, peer: Peer, authorization: bytes | None) -> StepUp:
        raise AssertionError("a route's decision never asks for a step-up")


class OutboundServer:
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
        self.name = name
        self.settings = InboundSettings(listen=listen, app=first.target, mode=mode, strip_request_headers=())
        self.timeouts = timeouts
        self.tls = tls
        self.routes = dict(routes)
        self.by_host = by_host
        self.observer = observer = Observer(LISTENER, audit, metrics, clock=clock)
        self.authorizer = RouteAuthorizer(self.routes, None if by_host else first)
        gate = AppGate(tls)
        factory: Callable[[TlsSnapshot, str], HttpConnection | TcpRelay]
        self.listener = listener = Listener(
            listen, gate=gate, factory=lambda snap, addr: factory(snap, addr), timeouts=timeouts, limits=limits,
            observer=observer,
        )  # fmt: skip
        if mode is ListenerMode.TCP:
            rctx = RelayContext(
                listener, gate, self.authorizer, observer, idle=timeouts.idle, write_stall=timeouts.write_stall,
                connect=timeouts.upstream_connect * 2, upstream_peer=True, clock=clock,
            )  # fmt: skip
            factory = lambda snap, addr: TcpRelay(rctx, snap, addr)  # noqa: E731
        else:
            # The app's own requests keep every end-to-end field: the receiving sidecar strips what its
            # policy says (routing overrides included).
            hctx = HttpContext(
                listener, gate, self.authorizer, observer, timeouts, limits, RequestHeads(request_drop(())),
                upstream_peer=True, clock=clock,
            )  # fmt: skip
            factory = lambda snap, addr: HttpConnection(hctx, snap, addr)  # noqa: E731

    def route_for(self, host: bytes | None) -> Route | None:
        return self.authorizer.route_for(host)

    def retire(self) -> int:
        """Our SVID or the bundles changed: drain pooled connections gracefully (see module docstring)."""
        return sum(r.pool.retire() for r in self.routes.values())

    async def start(self) -> int:
        return await self.listener.start()

    @property
    def bound(self) -> tuple[str, int]:
        return self.listener.bound

    @property
    def open_connections(self) -> int:
        return self.listener.open_connections

    async def drain(self, deadline: float) -> None:
        await self.listener.drain(deadline)
        for r in self.routes.values():
            await r.pool.close()


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
