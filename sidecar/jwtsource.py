"""JWT-SVID edges for the data plane: the JWT bundles it validates tokens against (`JwtBundleHolder`) and the
JWT-SVIDs it attaches to the app's outbound calls (`JwtSvidFetcher`).

The request path reads both without an await or a lock: `holder.current` is one attribute read, and
`fetcher.cached(audience)` one dictionary lookup and a clock read. Everything else (bundle updates, fetches,
renewals) runs on the event loop thread, which is the only thread that touches these objects.

A JWT-SVID is a bearer secret (JWT-SVID §7.1): no token ever appears in an event, a log line, a repr or an
exception raised here; `JwtSvidInfo` (subject, audience, kid, times) is what may be shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from ._proto import workload_pb2
from ._proto.workload_grpc import SpiffeWorkloadAPIStub
from .endpoint import TcpEndpoint, UnixEndpoint
from .errors import IdentityError, SourceError
from .hints import workload_api_unreachable
from .identity import SpiffeId
from .sources import (
    NO_JWT_BUNDLES,
    WORKLOAD_API_METADATA,
    EventSink,
    JwtBundles,
    JwtBundleSource,
    SourceEvent,
    workload_api_channel,
)

__all__ = ["NO_JWT_BUNDLES", "JwtBundleHolder", "JwtBundles", "JwtSvidFetcher", "JwtSvidInfo"]

WallClock = Callable[[], float]  # unix seconds, the unit of `exp`

# A token closer than this to its `exp` is never handed out: it could expire in flight or in the target's
# queue (SPIRE and go-spiffe validate with 60 s of leeway, but a stricter validator may use none).
DEFAULT_MIN_REMAINING: Final = 5.0
# Renewal at half of the token's lifetime, pulled earlier by up to this fraction of the lifetime, so that
# sidecars started together do not all renew in the same second.
RENEW_AT: Final = 0.5
RENEW_JITTER: Final = 0.05
MIN_RENEW_DELAY: Final = 1.0  # a token with a tiny lifetime must not turn renewal into a busy loop


class JwtBundleHolder:
    """The JWT bundles the data plane validates against, per request:

        bundles, generation = holder.current
        claims = cache.validate(token, audience=..., bundles=bundles, generation=generation, now=time.time())

    `current` is a `JwtBundles` replaced whole on the loop thread, never mutated; generation 0 holds no
    bundles and so trusts no token (Workload API §6.3: no bundle for the subject's trust domain = untrusted).
    One holder follows one source (`follow`); a snapshot not newer than the held one is ignored.
    """

    __slots__ = ("_changed", "_clock", "current", "updated_at")

    def __init__(self, initial: JwtBundles = NO_JWT_BUNDLES, *, clock: WallClock = time.time) -> None:
        self.current = initial
        self.updated_at: float | None = None  # unix time of the last new generation (a bundle-age gauge)
        self._clock = clock
        self._changed = asyncio.Event()

    def set(self, snapshot: JwtBundles) -> None:
        """Take a newer snapshot (the source's subscriber; loop thread only)."""
        if snapshot.generation <= self.current.generation:
            return
        self.current = snapshot
        self.updated_at = self._clock()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def follow(self, source: JwtBundleSource) -> Callable[[], None]:
        """Take the source's bundles now and every new generation after; returns the unsubscribe function."""
        self.set(source.jwt_bundles())
        return source.subscribe_jwt(self.set)

    async def wait_for(self, generation: int, timeout: float) -> JwtBundles:  # noqa: ASYNC109 - a readiness wait
        """The snapshot once `current.generation >= generation`; SourceError after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while self.current.generation < generation:
                    await self._changed.wait()
        except TimeoutError:
            raise SourceError(
                f"JWT bundles: generation {self.current.generation} after {timeout:g}s, waiting for {generation}"
            ) from None
        return self.current


@dataclass(frozen=True, slots=True)
class JwtSvidInfo:
    """What may be shown about a held JWT-SVID (logs, /config): never the token."""

    audience: str
    spiffe_id: SpiffeId
    kid: str | None
    issued_at: float
    expires_at: float
    refresh_at: float


class _Held:
    """A token and what is known about it; its repr leaves the token out."""

    __slots__ = ("info", "token", "usable_until")

    def __init__(self, token: str, info: JwtSvidInfo, usable_until: float) -> None:
        self.token = token
        self.info = info
        self.usable_until = usable_until

    def __repr__(self) -> str:
        return f"<JWT-SVID {self.info.spiffe_id} aud={self.info.audience!r} exp={self.info.expires_at:.0f}>"


class _Slot:
    """Per audience: the held token, the one fetch in flight, the renewal timer, and use since renewal."""

    __slots__ = ("failures", "fetch", "held", "timer", "used")

    def __init__(self) -> None:
        self.held: _Held | None = None
        self.fetch: asyncio.Task[_Held] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.failures = 0
        self.used = False


class _Refused(Exception):
    """A fetch that failed: a one-line reason (never the token), and whether trying again may help."""

    def __init__(self, reason: str, *, retry: bool = True) -> None:
        super().__init__(" ".join(reason.split()))  # one line, whatever a server's message holds
        self.retry = retry


class JwtSvidFetcher:
    """JWT-SVIDs from the Workload API's FetchJWTSVID (Workload API §6.2.1), one per audience, for the
    sidecar to attach to the app's outbound calls.

    * `cached(audience)`: the held token, or None when there is none or it is within `min_remaining`
      seconds of `exp`. Never blocks; the hot path.
    * `await get(audience)`: the held token, else a fetch under a deadline (`timeout`); concurrent callers
      of one audience share one fetch, and a caller that gives up does not cancel it for the others.
      Failures raise SourceError with a one-line reason.
    * Renewal: a held token is fetched again in the background at half its lifetime (a little earlier,
      jittered); a failed renewal keeps the held token while it is usable and retries with backoff.
      An audience nobody asked for since the last renewal is not renewed again (the next `get` fetches).
    * Tokens are checked for what the sidecar relies on (subject, audience, `exp`), not verified: they come
      from the local agent over its socket, and the relying party verifies them (JWT-SVID §4).

    Owned by the composition root: `run()` in its TaskGroup (or `async with`), which closes the fetcher
    (timers, fetches in flight) when it ends. Loop thread only.
    """

    _name = "jwt_svid"

    def __init__(
        self,
        endpoint: UnixEndpoint | TcpEndpoint,
        *,
        spiffe_id: SpiffeId | None = None,
        timeout: float = 5.0,
        min_remaining: float = DEFAULT_MIN_REMAINING,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        max_audiences: int = 256,
        clock: WallClock = time.time,
        on_event: EventSink | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._spiffe_id = spiffe_id  # None: the default identity (the first JWTSVID returned, §8)
        self._timeout = timeout
        self._min_remaining = min_remaining
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._max_audiences = max_audiences
        self._clock = clock
        self._on_event = on_event
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._slots: dict[str, _Slot] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<JwtSvidFetcher {self.endpoint} audiences={len(self._slots)}>"

    # -- the data plane

    def cached(self, audience: str) -> str | None:
        """The held token for `audience` if it is at least `min_remaining` seconds from expiry, else None."""
        slot = self._slots.get(audience)
        if slot is None:
            return None
        held = slot.held
        if held is None or self._clock() >= held.usable_until:
            return None
        slot.used = True
        return held.token

    async def get(self, audience: str, *, timeout: float | None = None) -> str:  # noqa: ASYNC109 - per-call deadline
        """A usable token for `audience`: the held one, or one fetched within `timeout` (default: the
        fetcher's). SourceError when none can be had; ValueError for an empty audience (JWT-SVID §3.2)."""
        token = self.cached(audience)
        if token is not None:
            return token
        if not audience:
            raise ValueError("a JWT-SVID needs an audience (JWT-SVID §3.2)")
        task = self._start_fetch(audience)
        limit = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                held = await asyncio.shield(task)
        except TimeoutError:
            raise SourceError(
                f"JWT-SVID for audience {audience!r}: no answer from the Workload API at {self.endpoint} "
                f"within {limit:g}s"
            ) from None
        except _Refused as e:
            raise SourceError(f"JWT-SVID for audience {audience!r}: {e}") from None
        except asyncio.CancelledError:
            if task.cancelled() and not _being_cancelled():
                raise SourceError(f"JWT-SVID for audience {audience!r}: the fetcher was closed") from None
            raise
        if self._clock() >= held.usable_until:
            raise SourceError(f"JWT-SVID for audience {audience!r}: {self._too_close(held.info.expires_at)}")
        slot = self._slots.get(audience)
        if slot is not None:
            slot.used = True
        return held.token

    def info(self, audience: str) -> JwtSvidInfo | None:
        """What may be shown of the token held for `audience` (None when none is held)."""
        slot = self._slots.get(audience)
        return None if slot is None or slot.held is None else slot.held.info

    def describe(self) -> list[JwtSvidInfo]:
        """The held tokens' information (no tokens), for /config and logs."""
        return [s.held.info for s in self._slots.values() if s.held is not None]

    # -- lifecycle

    async def run(self) -> None:
        """Keep the fetcher open until cancelled (a task of the composition root), then close it."""
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Cancel renewals and fetches in flight, forget every token; `get` raises SourceError after this."""
        self._closed = True
        tasks = []
        for slot in self._slots.values():
            if slot.timer is not None:
                slot.timer.cancel()
            if slot.fetch is not None:
                slot.fetch.cancel()
                tasks.append(slot.fetch)
        self._slots.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> JwtSvidFetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals

    def _emit(self, kind: str, detail: str) -> None:
        if self._on_event is not None:
            with contextlib.suppress(Exception):  # a broken log/metrics hook must not stop token delivery
                self._on_event(SourceEvent(kind, self._name, detail))

    def _start_fetch(self, audience: str) -> asyncio.Task[_Held]:
        if self._closed:
            raise SourceError(f"JWT-SVID for audience {audience!r}: the fetcher was closed")
        slot = self._slots.get(audience)
        if slot is None:
            if len(self._slots) >= self._max_audiences:
                raise SourceError(
                    f"JWT-SVID for audience {audience!r}: already {self._max_audiences} audiences; audiences "
                    "come from the configuration, so this is a bug"
                )
            slot = self._slots[audience] = _Slot()
        if slot.fetch is None or slot.fetch.done():  # done: its done-callback may not have run yet
            task = asyncio.create_task(self._fetch(audience, slot), name=f"jwt-svid-fetch {audience[:60]}")
            slot.fetch = task
            task.add_done_callback(lambda t: self._fetch_done(slot, t))
        return slot.fetch

    def _fetch_done(self, slot: _Slot, task: asyncio.Task[_Held]) -> None:
        if slot.fetch is task:
            slot.fetch = None
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have given up on it

    async def _fetch(self, audience: str, slot: _Slot) -> _Held:
        try:
            resp = await self._call(audience)
            held = self._accept(audience, resp)
        except _Refused as e:
            slot.failures += 1
            self._emit("jwt_svid_error", f"audience {audience!r}: {e}")
            self._retry_later(audience, slot, e)
            raise
        slot.held, slot.failures = held, 0
        info = held.info
        self._emit(
            "jwt_svid_fetched",
            f"audience {audience!r}: {info.spiffe_id} kid={info.kid} expires {info.expires_at:.0f}, "
            f"renewal at {info.refresh_at:.0f}",
        )
        self._schedule(audience, slot, info.refresh_at - self._clock())
        return held

    async def _call(self, audience: str) -> workload_pb2.JWTSVIDResponse:
        request = workload_pb2.JWTSVIDRequest(
            audience=[audience], spiffe_id="" if self._spiffe_id is None else str(self._spiffe_id)
        )
        # A channel per fetch: fetches are rare (one per audience per half-life), and a fresh connection
        # never inherits a half-dead one from an agent restart.
        channel = workload_api_channel(self.endpoint)
        try:
            async with asyncio.timeout(self._timeout):
                stub = SpiffeWorkloadAPIStub(channel)
                reply: workload_pb2.JWTSVIDResponse = await stub.FetchJWTSVID(
                    request, metadata=WORKLOAD_API_METADATA, timeout=self._timeout
                )
                return reply
        except GRPCError as e:
            # Workload Endpoint §6: InvalidArgument is not retried; PermissionDenied and Unavailable are.
            raise _Refused(f"{e.status.name}: {e.message}", retry=e.status is not Status.INVALID_ARGUMENT) from None
        except TimeoutError:
            raise _Refused(f"no answer from the Workload API at {self.endpoint} within {self._timeout:g}s") from None
        except OSError as e:
            raise _Refused(workload_api_unreachable(self.endpoint, e)) from None
        except Exception as e:  # grpclib/h2 protocol errors, a stream closed early, ...
            raise _Refused(f"{type(e).__name__}: {e}") from None
        finally:
            channel.close()

    def _accept(self, audience: str, resp: workload_pb2.JWTSVIDResponse) -> _Held:
        if not resp.svids:
            raise _Refused("the Workload API returned no JWT-SVID (Workload API §6.2.1: at least one)")
        svid = resp.svids[0]  # the requested ID when one is configured, else the default identity (§8)
        if self._spiffe_id is not None:
            want = str(self._spiffe_id)
            found = next((s for s in resp.svids if s.spiffe_id == want), None)
            if found is None:
                raise _Refused(f"the Workload API returned no JWT-SVID for {want}")
            svid = found
        if not svid.svid or not svid.spiffe_id:
            raise _Refused("a JWTSVID with a mandatory field empty (Workload API §4.5)")
        try:
            sid = SpiffeId.parse(svid.spiffe_id)
        except IdentityError as e:
            raise _Refused(f"spiffe_id is not a SPIFFE ID: {e.reason}") from None
        claims, kid = _unverified(svid.svid)
        if claims.get("sub") != svid.spiffe_id:
            raise _Refused(f"the token's sub is not {sid} (JWT-SVID §3.1)")
        aud = claims.get("aud")
        auds = (aud,) if isinstance(aud, str) else tuple(aud) if isinstance(aud, list) else ()
        if audience not in auds:
            raise _Refused(f"the token's aud does not hold {audience!r} (JWT-SVID §3.2)")
        exp = _numeric(claims.get("exp"))
        if exp is None:
            raise _Refused("the token has no exp (JWT-SVID §3.3)")
        now = self._clock()
        if exp - now < self._min_remaining:
            raise _Refused(self._too_close(exp))
        iat = _numeric(claims.get("iat"))
        issued = iat if iat is not None and iat <= now else now  # an agent clock ahead of ours: count from now
        lifetime = exp - issued
        refresh = issued + lifetime * (RENEW_AT - self._rng.uniform(0, RENEW_JITTER))
        usable_until = exp - self._min_remaining
        info = JwtSvidInfo(audience, sid, kid, issued, exp, min(refresh, usable_until))
        return _Held(svid.svid, info, usable_until)

    def _too_close(self, exp: float) -> str:
        return (
            f"the JWT-SVID expires in {exp - self._clock():.1f}s, within the {self._min_remaining:g}s margin "
            "before expiry in which no token is handed out (is the agent's jwt ttl that short?)"
        )

    def _schedule(self, audience: str, slot: _Slot, delay: float) -> None:
        if self._closed:
            return
        if slot.timer is not None:
            slot.timer.cancel()
        delay = max(MIN_RENEW_DELAY, delay)
        slot.timer = asyncio.get_running_loop().call_later(delay, self._renew, audience, slot)

    def _renew(self, audience: str, slot: _Slot) -> None:
        slot.timer = None
        if self._closed or self._slots.get(audience) is not slot or (slot.fetch is not None and not slot.fetch.done()):
            return
        if not slot.used:
            self._emit("jwt_svid_idle", f"audience {audience!r} was not used since the last renewal; not renewed")
            return
        slot.used = False
        self._start_fetch(audience)

    def _retry_later(self, audience: str, slot: _Slot, e: _Refused) -> None:
        # Only a renewal is retried in the background: without a usable token, the next `get` fetches.
        held = slot.held
        if not e.retry or held is None:
            return
        delay = min(self._retry_max, self._retry_initial * float(2 ** min(slot.failures - 1, 32)))
        delay = delay / 2 + self._rng.uniform(0, delay / 2)
        if self._clock() + delay < held.usable_until:
            slot.used = True  # the renewal was wanted: the retry is one too
            self._schedule(audience, slot, delay)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _numeric(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _unverified(token: str) -> tuple[Mapping[str, Any], str | None]:
    """Claims and `kid` of a token from our own agent, unverified (see JwtSvidFetcher); _Refused if it is
    not a compact JWS with a JSON object payload. The token never enters the message."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError):
        raise _Refused("the Workload API returned a JWT-SVID that is not a compact JWS (JWT-SVID §1)") from None
    if not isinstance(claims, dict):
        raise _Refused("the JWT-SVID's claims are not a JSON object")
    kid = header.get("kid")
    return claims, kid if isinstance(kid, str) else None
