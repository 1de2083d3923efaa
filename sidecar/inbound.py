"""The inbound listener: mTLS callers -> SPIFFE peer check -> per-request decision -> the app on loopback.

A composition of the shared data plane (`sidecar.proxy`, `sidecar.relay`, `sidecar.listener`):

    inbound = Listener(TlsGate, AlpnSwitch(HttpConnection(PolicyAuthorizer, AppDialer, Observer),   # mode http
                                           Http2Connection(PolicyAuthorizer, AppDialer | H2cPool, Observer)))
            | Listener(TlsGate, TcpRelay(PolicyAuthorizer, AppDialer, Observer))         # mode tcp

In mode http the listener offers ALPN `h2` and `http/1.1`: a caller that picks `h2` is served by
`sidecar.h2conn` with the same authorizer, dialer and observer; the app is reached over HTTP/1.1 (its
keep-alive pool) or, for `app_protocol: h2c | grpc`, over a few multiplexed h2c connections.

`PolicyAuthorizer` is the policy: it normalises request targets and decides (caller, method, path),
both cached (pure functions of their inputs; the decision cache is dropped when the policy is swapped);
`AppDialer` is a bounded keep-alive pool to the app. `InboundServer` keeps the listener's public face
(start, bound, drain, open_connections) for the composition root and the tests.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .config import AppProtocol, InboundSettings, Limits, ListenerMode, Timeouts
from .errors import JwtSvidError
from .h2conn import H2Context, H2cPool, Http2Connection, server_config
from .http1 import RESPONSE_502, RESPONSE_503, RequestHeads, request_drop
from .identity import SpiffeId
from .jwtsvid import JwtValidationCache, bearer_token
from .listener import AlpnSwitch, Listener, Peer, TlsGate
from .metrics import Metrics
from .observer import AuditSink, Observer
from .policy import (
    Decision,
    Policy,
    RequestAttrs,
    Target,
    authorize,
    authorize_connection,
    check_jwt,
    normalize_target,
)
from .proxy import DialFailure, Grant, HttpConnection, HttpContext, StepUp
from .relay import RelayContext, TcpRelay
from .tls import TlsContexts, TlsSnapshot
from .upstream import UpstreamConnection, UpstreamError, UpstreamPool
from .upstream import UpstreamSink as _Sink

if TYPE_CHECKING:  # the holder is handed in (sidecar.jwtsource, fed by the SVID source)
    from .jwtsource import JwtBundleHolder

__all__ = ["AppDialer", "AuditSink", "InboundServer", "PolicyAuthorizer", "PolicyRef"]

LISTENER: Final = "inbound"
# An app's keep-alive timeout is often short (uvicorn: 5 s); evict ours first so reuse rarely races it.
_UPSTREAM_IDLE_MAX: Final = 4.0
# Cache bounds: entries, and the longest raw target kept (longer ones are normalised every time).
_CACHE_MAX: Final = 4096
_TARGET_CACHE_LEN: Final = 512


class PolicyRef:
    """A one-slot holder: the control plane swaps `.policy` atomically on reload; each request reads it
    once, so a request is decided by exactly one policy version."""

    __slots__ = ("policy",)

    def __init__(self, policy: Policy) -> None:
        self.policy = policy


class AppDialer:
    """The app on loopback, through a bounded keep-alive pool. `refusal`: what an HTTP/1.1 request gets when
    the app does not speak HTTP/1.1 (app_protocol h2c or grpc), instead of a lease."""

    def __init__(self, pool: UpstreamPool, authority: bytes, refusal: bytes | None = None) -> None:
        self.pool = pool
        self.authority = authority
        self.refusal = refusal

    def acquire_idle(self, sink: _Sink) -> UpstreamConnection | None:
        return self.pool.acquire_idle(sink)

    async def acquire(self, sink: _Sink) -> UpstreamConnection:
        return await self.pool.acquire(sink)

    def release(self, up: UpstreamConnection, *, reusable: bool) -> None:
        self.pool.release(up, reusable=reusable)

    def unavailable(self) -> bytes | None:
        return self.refusal

    def failure(self, exc: UpstreamError) -> DialFailure:
        return DialFailure(RESPONSE_502, 502, None, "-")

    def exhausted(self) -> bytes:
        return RESPONSE_503

    def connected(self) -> None:
        pass

    def peer_of(self, up: UpstreamConnection) -> tuple[str, float]:
        return "-", math.inf


class PolicyAuthorizer:
    """The inbound policy as the data plane's authorizer (module docstring)."""

    def __init__(
        self, ref: PolicyRef, dialer: AppDialer, *, jwt_bundles: JwtBundleHolder | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self._ref = ref
        self._dialer = dialer
        self._jwt_bundles = jwt_bundles
        self._jwt_cache = JwtValidationCache()
        self._wall = wall
        self._targets: dict[bytes, Target] = {}
        self._policy: Policy | None = None
        self._grants: dict[tuple[SpiffeId | None, bytes, str, bytes | None], Grant] = {}

    def target(self, raw: bytes) -> tuple[Target, bytes | None]:
        t = self._targets.get(raw)
        if t is None:
            t = normalize_target(raw)  # raises BadRequest (absolute form included: origin form only)
            if len(raw) <= _TARGET_CACHE_LEN:
                if len(self._targets) >= _CACHE_MAX:
                    self._targets.clear()
                self._targets[raw] = t
        return t, None

    def check(self, peer: Peer, method: bytes, target: Target, authority: bytes | None) -> Grant:
        policy = self._ref.policy
        if policy is not self._policy:
            self._grants.clear()  # decided under the old policy: never reused
            self._policy = policy
        key = (peer.spiffe_id, method, target.path, authority)  # every input of the decision
        grant = self._grants.get(key)
        if grant is None:
            assert peer.spiffe_id is not None
            decision = authorize(policy, RequestAttrs(peer.spiffe_id, method.decode("ascii"), target.path,
                                                      (authority or b"").decode("ascii")))
            grant = Grant(decision, self._dialer if decision.forward else None)
            if len(self._grants) >= _CACHE_MAX:
                self._grants.clear()
            self._grants[key] = grant
        return grant

    def check_connection(self, peer: Peer) -> Grant:
        assert peer.spiffe_id is not None
        decision: Decision = authorize_connection(self._ref.policy, peer.spiffe_id)
        return Grant(decision, self._dialer if decision.forward else None)

    def step_up(self, decision: Decision, peer: Peer, authorization: bytes | None) -> StepUp:
        """Validate the request's JWT-SVID (`Authorization: Bearer`, JWT-SVID §5) for the rule's audience
        against the bundle of its subject's trust domain, cached until the token expires (a repeated
        token costs a dict lookup), then `check_jwt`. The token never reaches a log or an error."""
        req = decision.jwt
        assert req is not None and peer.spiffe_id is not None
        subject = None
        token: tuple[str, str, str] | None = None
        problem = ""
        holder = self._jwt_bundles
        if holder is None:
            problem = "this sidecar has no JWT bundles to validate tokens with"
        else:
            try:
                bundles, generation = holder.current
                claims = self._jwt_cache.validate(bearer_token(authorization), audience=req.audience,
                                                  bundles=bundles, generation=generation, now=self._wall())
            except JwtSvidError as exc:
                problem = f"{exc.reason}: {exc.detail}"
            else:
                subject = claims.subject
                token = (str(claims.subject), req.audience, claims.kid)
        final, challenge = check_jwt(decision, peer.spiffe_id, subject, problem)
        return StepUp(final, challenge, token if final.forward else None)


class InboundServer:
    """The inbound listener (HTTP or TCP mode) in front of the app at `settings.app`."""

    label = LISTENER

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
        jwt_bundles: JwtBundleHolder | None = None,
    ) -> None:
        self.settings = settings
        self.timeouts = timeouts
        self.limits = limits
        self.tls = tls
        self.policy = policy
        self.observer = observer = Observer(LISTENER, audit, metrics, clock=clock)
        tcp = settings.mode is ListenerMode.TCP
        self.pool = UpstreamPool(
            settings.app.host,
            settings.app.port,
            max_size=limits.max_connections if tcp else limits.upstream_pool_size,
            connect_timeout=timeouts.upstream_connect,
            idle_timeout=min(timeouts.idle, _UPSTREAM_IDLE_MAX),
        )
        h2c_app = settings.app_protocol is not AppProtocol.HTTP1
        # An HTTP/1.1 caller cannot reach an app that speaks only HTTP/2: a 502 rather than a lease.
        self.dialer = AppDialer(self.pool, str(settings.app).encode("ascii"), RESPONSE_502 if h2c_app else None)
        self.h2c: H2cPool | None = None
        if h2c_app and not tcp:
            self.h2c = H2cPool(settings.app.host, settings.app.port, connect_timeout=timeouts.upstream_connect,
                               idle_timeout=min(timeouts.idle, _UPSTREAM_IDLE_MAX))  # fmt: skip
        self.authorizer = PolicyAuthorizer(policy, self.dialer, jwt_bundles=jwt_bundles)
        gate = TlsGate(tls, observer)
        factory: Callable[[TlsSnapshot, str], asyncio.Protocol]
        self.listener = listener = Listener(
            settings.listen, gate=gate, factory=lambda snap, addr: factory(snap, addr), timeouts=timeouts,
            limits=limits, observer=observer, alpn=not tcp,
        )  # fmt: skip
        if tcp:
            rctx = RelayContext(
                listener, gate, self.authorizer, observer, idle=timeouts.idle, write_stall=timeouts.write_stall,
                connect=timeouts.upstream_connect, upstream_peer=False, clock=clock,
            )  # fmt: skip
            factory = lambda snap, addr: TcpRelay(rctx, snap, addr)  # noqa: E731
        else:
            drop = request_drop(settings.strip_request_headers)
            hctx = HttpContext(
                listener, gate, self.authorizer, observer, timeouts, limits, RequestHeads(drop),
                upstream_peer=False, clock=clock, forward_jwt=settings.forward_jwt,
            )  # fmt: skip
            h2ctx = H2Context(
                listener, gate, self.authorizer, observer, timeouts, limits, settings.app_protocol, drop, clock,
                h2c=self.h2c, forward_jwt=settings.forward_jwt, config=server_config(limits),
            )  # fmt: skip

            def http1(snap: TlsSnapshot, addr: str) -> asyncio.Protocol:
                return HttpConnection(hctx, snap, addr)

            def http2(snap: TlsSnapshot, addr: str) -> asyncio.Protocol:
                return Http2Connection(h2ctx, snap, addr)

            factory = lambda snap, addr: AlpnSwitch(snap, addr, http1, http2)  # noqa: E731

    async def start(self) -> int:
        """Bind and start accepting; returns the bound port (listen port 0 picks a free one)."""
        return await self.listener.start()

    @property
    def bound(self) -> tuple[str, int]:
        return self.listener.bound

    @property
    def open_connections(self) -> int:
        return self.listener.open_connections

    @property
    def max_buffered(self) -> int:
        return self.observer.max_buffered

    async def drain(self, deadline: float) -> None:
        """Stop accepting; in-flight requests finish for up to `deadline` seconds; then close the rest."""
        await self.listener.drain(deadline)
        await self.pool.close()
        if self.h2c is not None:
            await self.h2c.close()
