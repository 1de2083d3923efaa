"""SVID sources (edge): the SPIFFE Workload API and PEM files, both publishing immutable `X509Context`s
and `JwtBundles` snapshots (JWT bundles by trust domain plus a generation that grows on every change).

A source keeps the last good snapshot and serves it until its default SVID expires; bad updates are
reported through `on_event` and discarded (Workload API §4.5). `run()` is owned by the caller's TaskGroup
and runs until cancelled; it raises `SourceError` only for errors that retrying cannot fix. JWT bundles
travel apart from the X.509 state (their own stream, their own files, `jwt_*` event kinds): a failure on
one side never stops or rejects the other.

We use grpclib (asyncio-native) rather than py-spiffe's thread-based `X509Source`, so that the stream,
its deadlines and its cancellation live on the sidecar's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from ._proto import workload_pb2
from ._proto.workload_grpc import SpiffeWorkloadAPIStub
from .endpoint import TcpEndpoint, UnixEndpoint, endpoint_from_env
from .errors import IdentityError, JwtSvidError, SidecarError, SourceError, SvidError
from .hints import workload_api_unreachable
from .identity import SpiffeId, TrustDomain
from .jwtsvid import MAX_BUNDLE_BYTES, JwtBundle, bundles_from_workload_api
from .svid import X509Bundle, X509Context, X509Svid

__all__ = [
    "NO_JWT_BUNDLES",
    "JwtBundleSource",
    "JwtBundles",
    "PemFileSource",
    "SourceEvent",
    "WorkloadApiSource",
    "X509Source",
    "endpoint_from_env",
    "jwks_file_bundle",
    "workload_api_channel",
]

# Workload Endpoint §3: every request carries this header; servers answer InvalidArgument without it.
WORKLOAD_API_METADATA: Final = {"workload.spiffe.io": "true"}


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class SourceEvent:
    """Something a source did or refused, for logs and metrics. Never carries key material.

    kinds: `connected`, `update` (new snapshot published), `rejected` (bad update discarded, last good
    kept), `stream_error`, `backoff` (`delay` set), `duplicate_hint`, `expired` (the served SVID expired;
    `current()` is now None), `fatal` (run() is about to raise), `subscriber_error`.
    JWT bundles (never counted as X.509 trouble): `jwt_connected`, `jwt_update` (new generation),
    `jwt_rejected`, `jwt_stream_error`, `jwt_backoff`, `jwt_stopped` (the Workload API refused
    FetchJWTBundles with InvalidArgument or Unimplemented: not retried, last bundles kept).
    """

    kind: str
    source: str
    detail: str = ""
    delay: float | None = None


EventSink = Callable[[SourceEvent], None]
Clock = Callable[[], dt.datetime]


class JwtBundles(NamedTuple):
    """One JWT bundle snapshot: bundles by trust domain (read-only) and a generation that increases on every
    change of content. Generation 0 (`NO_JWT_BUNDLES`) is the empty set held before any bundle arrived: it
    trusts no JWT-SVID. Unpacks as `(bundles, generation)`, what `JwtValidationCache.validate` takes."""

    bundles: Mapping[TrustDomain, JwtBundle]
    generation: int


NO_JWT_BUNDLES: Final = JwtBundles(MappingProxyType({}), 0)


class X509Source(Protocol):
    def current(self) -> X509Context | None: ...

    def subscribe(self, cb: Callable[[X509Context], None]) -> Callable[[], None]: ...

    def healthy(self) -> bool: ...

    async def run(self) -> None: ...

    async def wait_ready(self, timeout: float) -> X509Context: ...  # noqa: ASYNC109 - the agreed API


class JwtBundleSource(Protocol):
    def jwt_bundles(self) -> JwtBundles: ...

    def subscribe_jwt(self, cb: Callable[[JwtBundles], None]) -> Callable[[], None]: ...


def _ignore(_: SourceEvent) -> None:
    pass


def _same_bundles(a: Mapping[TrustDomain, JwtBundle], b: Mapping[TrustDomain, JwtBundle]) -> bool:
    return a.keys() == b.keys() and all(a[td].digest == b[td].digest for td in a)


def _describe_jwt(snap: JwtBundles) -> str:
    """Trust domains, key counts and ignored keys of a snapshot, for the `jwt_update` event (no key material)."""
    parts = []
    for td, bundle in snap.bundles.items():
        text = f"{td}: {len(bundle.keys)} key(s)"
        if bundle.rejected:
            why = "; ".join(f"#{r.index} kid {str(r.kid)[:40]!r}: {r.reason}" for r in bundle.rejected[:3])
            text += f", {len(bundle.rejected)} ignored ({why})"
        parts.append(text)
    return f"generation {snap.generation}: " + ("; ".join(parts) or "no trust domains")


class _Publisher:
    """Snapshot state shared by both sources: last good context, subscribers, readiness and expiry."""

    _name = "source"

    def __init__(self, clock: Clock, on_event: EventSink | None) -> None:
        self._clock = clock
        self._on_event = on_event or _ignore
        self._ctx: X509Context | None = None
        self._subscribers: list[Callable[[X509Context], None]] = []
        self._changed = asyncio.Event()
        self._fatal: SourceError | None = None
        self._expired_seen: X509Context | None = None
        self._jwt = NO_JWT_BUNDLES
        self._jwt_subscribers: list[Callable[[JwtBundles], None]] = []

    # -- public

    def current(self) -> X509Context | None:
        """The last good snapshot, or None if there is none or its default SVID has expired."""
        ctx = self._ctx
        if ctx is None or self._clock() >= ctx.expires_at:
            return None
        return ctx

    def healthy(self) -> bool:
        """True while an unexpired snapshot is held (readiness)."""
        return self.current() is not None

    def subscribe(self, cb: Callable[[X509Context], None]) -> Callable[[], None]:
        """Call `cb` with every new snapshot (on the event loop). Returns the unsubscribe function."""
        self._subscribers.append(cb)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(cb)

        return unsubscribe

    def jwt_bundles(self) -> JwtBundles:
        """The last good JWT bundles (`NO_JWT_BUNDLES` until the first arrive). Never expire on their own:
        a JWT bundle has no validity period; a rotation or redaction comes as a new generation."""
        return self._jwt

    def subscribe_jwt(self, cb: Callable[[JwtBundles], None]) -> Callable[[], None]:
        """Call `cb` with every new JWT bundle generation (on the event loop). Returns the unsubscribe function."""
        self._jwt_subscribers.append(cb)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._jwt_subscribers.remove(cb)

        return unsubscribe

    async def wait_ready(self, timeout: float) -> X509Context:  # noqa: ASYNC109 - the agreed API
        """Wait for a usable snapshot; SourceError on timeout or if the source failed for good."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._fatal is not None:
                        raise self._fatal
                    ctx = self.current()
                    if ctx is not None:
                        return ctx
                    await self._wait_changed()
        except TimeoutError:
            raise SourceError(f"{self._name}: no valid X.509-SVID within {timeout:g}s") from None

    # -- for subclasses

    def _emit(self, kind: str, detail: str = "", delay: float | None = None) -> None:
        # A broken metrics/log hook must not stop identity delivery.
        with contextlib.suppress(Exception):
            self._on_event(SourceEvent(kind, self._name, detail, delay))

    def _signal(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    def _publish(self, ctx: X509Context) -> None:
        self._ctx = ctx
        self._emit("update", f"{ctx.default_svid.spiffe_id} expires {ctx.expires_at.isoformat()}")
        if self._clock() >= ctx.expires_at:
            self._emit("expired", f"{ctx.default_svid.spiffe_id} is already expired")
            self._expired_seen = ctx
        for cb in tuple(self._subscribers):
            try:
                cb(ctx)
            except Exception as e:
                self._emit("subscriber_error", f"{type(e).__name__}: {e}")
        self._signal()

    def _publish_jwt(self, bundles: Mapping[TrustDomain, JwtBundle]) -> bool:
        """Replace the JWT bundles with this full state (Workload API §4.4: absence is redaction); a new
        generation only when the content differs. True if published."""
        if self._jwt.generation and _same_bundles(self._jwt.bundles, bundles):
            return False
        snap = JwtBundles(MappingProxyType(dict(bundles)), self._jwt.generation + 1)
        self._jwt = snap
        self._emit("jwt_update", _describe_jwt(snap))
        for cb in tuple(self._jwt_subscribers):
            try:
                cb(snap)
            except Exception as e:
                self._emit("subscriber_error", f"{type(e).__name__}: {e}")
        return True

    def _fail(self, message: str) -> SourceError:
        self._fatal = SourceError(f"{self._name}: {message}")
        self._emit("fatal", message)
        self._signal()
        return self._fatal

    async def _watch_expiry(self) -> None:
        """Report when the served snapshot expires, so that readiness drops even without a new update."""
        while True:
            ctx = self._ctx
            if ctx is None or ctx is self._expired_seen:
                await self._wait_changed()
                continue
            remaining = (ctx.expires_at - self._clock()).total_seconds()
            if remaining > 0:
                # Bounded wait, re-reading the (injectable) clock at least every minute.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining + 0.01, 60.0)):
                        await self._wait_changed()
                continue
            self._expired_seen = ctx
            self._emit("expired", f"{ctx.default_svid.spiffe_id} expired at {ctx.expires_at.isoformat()}")
            self._signal()

    async def _run_with_watcher(self, body: Callable[[], Awaitable[None]]) -> None:
        watcher = asyncio.create_task(self._watch_expiry(), name=f"{self._name}-expiry")
        try:
            await body()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


# ---------------------------------------------------------------------------------------------------------
# Workload API


class _Rejected(Exception):
    """A Workload API message that must be discarded (reason in args[0])."""


# HTTP/2 keepalive so that a connection whose peer vanished without a FIN/RST (TCP endpoint, frozen agent
# host) is noticed. 6 minutes: Go gRPC servers (the SPIRE agent) answer pings more often than every
# 5 minutes with GOAWAY "too_many_pings".
_CHANNEL_CONFIG: Final = Configuration(_keepalive_time=360.0, _keepalive_timeout=20.0)


def workload_api_channel(endpoint: UnixEndpoint | TcpEndpoint) -> Channel:
    """A new grpclib channel to the Workload API (connects on first use; the caller closes it)."""
    if isinstance(endpoint, UnixEndpoint):
        return Channel(path=endpoint.path, config=_CHANNEL_CONFIG)
    return Channel(host=endpoint.host, port=endpoint.port, config=_CHANNEL_CONFIG)


@dataclass(frozen=True, slots=True)
class _StreamSpec:
    """One server stream WorkloadApiSource keeps open: its RPC, what to do with a message, and the prefix of
    its event kinds ("" for X.509, "jwt_" for JWT bundles)."""

    rpc: str
    request: Callable[[], Any]
    handle: Callable[[Any], None]
    prefix: str


class WorkloadApiSource(_Publisher):
    """Streams FetchX509SVID, and FetchJWTBundles beside it, from a SPIFFE Workload API endpoint (SPIRE
    agent, embedded dev SPIRE).

    Every message is the full state (Workload API §4.3-4.4); a message with a mandatory field left at its
    default is reported and discarded (§4.5). InvalidArgument is final (Workload Endpoint §6); anything
    else is retried with jittered exponential backoff, reset after each received message. The two streams
    have their own connection, backoff and deadlines, so one failing never stops the other; InvalidArgument
    on the X.509 stream ends `run()`, on the JWT stream (as Unimplemented: an agent with the JWT profile
    disabled, Workload API §1) it only stops the JWT stream, keeping the last bundles.
    `fetch_jwt_bundles=False` opens the X.509 stream only.
    """

    _name = "workload_api"

    def __init__(
        self,
        endpoint: UnixEndpoint | TcpEndpoint,
        *,
        fetch_jwt_bundles: bool = True,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
        connect_timeout: float = 5.0,
        first_message_timeout: float = 30.0,
        clock: Clock = _utcnow,
        on_event: EventSink | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(clock, on_event)
        self.endpoint = endpoint
        self._fetch_jwt_bundles = fetch_jwt_bundles
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._connect_timeout = connect_timeout
        self._first_message_timeout = first_message_timeout
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._last_msg: workload_pb2.X509SVIDResponse | None = None
        self._last_jwt_msg: workload_pb2.JWTBundlesResponse | None = None
        self._x509 = _StreamSpec("FetchX509SVID", workload_pb2.X509SVIDRequest, self._handle, "")
        self._jwt_stream = _StreamSpec("FetchJWTBundles", workload_pb2.JWTBundlesRequest, self._handle_jwt, "jwt_")

    def _channel(self) -> Channel:
        return workload_api_channel(self.endpoint)

    def backoff_delay(self, attempt: int) -> float:
        """Equal-jitter exponential backoff: in [d/2, d] with d = min(max, initial * 2**attempt)."""
        d = min(self._backoff_max, self._backoff_initial * float(2 ** min(attempt, 32)))
        jitter: float = self._rng.uniform(0, d / 2)
        return d / 2 + jitter

    async def run(self) -> None:
        await self._run_with_watcher(self._stream_all)

    async def _stream_all(self) -> None:
        jwt = None
        if self._fetch_jwt_bundles:
            jwt = asyncio.create_task(self._stream_forever(self._jwt_stream), name="workload-api-jwt-bundles")
        try:
            await self._stream_forever(self._x509)
        finally:
            if jwt is not None:
                jwt.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await jwt

    async def _stream_forever(self, spec: _StreamSpec) -> None:
        attempt = 0
        while True:
            got_message = False

            def handle(msg: Any) -> None:
                nonlocal got_message
                got_message = True
                spec.handle(msg)

            try:
                await self._stream_once(spec, handle)
                reason = "stream ended by the server"
            except GRPCError as e:
                if e.status is Status.INVALID_ARGUMENT and not spec.prefix:
                    raise self._fail(
                        f"the Workload API at {self.endpoint} refused the request as invalid "
                        f"(InvalidArgument: {e.message}); not retrying"
                    ) from None
                if e.status in (Status.INVALID_ARGUMENT, Status.UNIMPLEMENTED) and spec.prefix:
                    # Workload Endpoint §6: neither is retried. JWT-SVIDs of trust domains without bundles
                    # are refused, so this fails closed; X.509 goes on.
                    self._emit(
                        spec.prefix + "stopped",
                        f"{spec.rpc} at {self.endpoint}: {e.status.name}: {e.message}; not retrying, "
                        "keeping the last JWT bundles",
                    )
                    return
                reason = f"{e.status.name}: {e.message}"
            except TimeoutError:
                reason = "timed out connecting or waiting for the first message"
            except OSError as e:
                reason = workload_api_unreachable(self.endpoint, e)  # names the socket and what to check
            except SidecarError as e:
                reason = f"{type(e).__name__}: {e}"
            except Exception as e:  # grpclib/h2 protocol errors, StreamTerminatedError, ...
                reason = f"{type(e).__name__}: {e}"
            if got_message:
                attempt = 0
            delay = self.backoff_delay(attempt)
            attempt += 1
            self._emit(spec.prefix + "stream_error", f"{spec.rpc}: {reason}" if spec.prefix else reason)
            self._emit(spec.prefix + "backoff", f"reconnecting to {self.endpoint}", delay)
            await asyncio.sleep(delay)

    async def _stream_once(self, spec: _StreamSpec, handle: Callable[[Any], None]) -> None:
        channel = self._channel()
        try:
            method = getattr(SpiffeWorkloadAPIStub(channel), spec.rpc)
            async with method.open(metadata=WORKLOAD_API_METADATA) as stream:
                async with asyncio.timeout(self._connect_timeout):
                    await stream.send_message(spec.request(), end=True)
                self._emit(spec.prefix + "connected", str(self.endpoint))
                # §4.3: the first message MUST come as soon as possible; later ones only on change, so the
                # long-lived stream itself has no deadline.
                async with asyncio.timeout(self._first_message_timeout):
                    msg = await stream.recv_message()
                while msg is not None:
                    handle(msg)
                    msg = await stream.recv_message()
        finally:
            channel.close()

    def _handle_jwt(self, msg: workload_pb2.JWTBundlesResponse) -> None:
        if self._last_jwt_msg is not None and msg == self._last_jwt_msg:
            return  # identical full state
        if not msg.bundles:
            # §6.2.2: the bundles MUST include the server's own trust domain; §4.5: discard, keep the last.
            self._emit("jwt_rejected", "response has no bundles (Workload API §6.2.2, §4.5)")
            return
        try:
            bundles = bundles_from_workload_api(dict(msg.bundles))
        except JwtSvidError as e:
            self._emit("jwt_rejected", f"{e.detail}; keeping the last JWT bundles")
            return
        except Exception as e:  # backstop: content is a bad message, never a broken stream
            self._emit("jwt_rejected", f"{type(e).__name__}: {e}; keeping the last JWT bundles")
            return
        self._last_jwt_msg = msg
        self._publish_jwt(bundles)

    def _handle(self, msg: workload_pb2.X509SVIDResponse) -> None:
        if self._last_msg is not None and msg == self._last_msg and self._ctx is not None:
            return  # identical full state: nothing to publish
        try:
            ctx = self._to_context(msg)
        except _Rejected as e:
            self._emit("rejected", str(e.args[0]))
            return
        self._last_msg = msg
        self._publish(ctx)

    def _to_context(self, msg: workload_pb2.X509SVIDResponse) -> X509Context:
        if not msg.svids:
            raise _Rejected("response has no SVIDs (Workload API §5.2.1)")
        svids: list[X509Svid] = []
        bundles: dict[TrustDomain, X509Bundle] = {}
        hints: set[str] = set()
        for i, s in enumerate(msg.svids):
            missing = [f for f in ("spiffe_id", "x509_svid", "x509_svid_key", "bundle") if not getattr(s, f)]
            if missing:
                raise _Rejected(f"svids[{i}]: mandatory field(s) {', '.join(missing)} empty (Workload API §4.5)")
            if s.hint:
                if s.hint in hints:
                    # §5.2.1: a client seeing duplicate hints SHOULD pick the first.
                    self._emit("duplicate_hint", f"svids[{i}] repeats hint {s.hint!r}; keeping the first")
                    continue
                hints.add(s.hint)
            try:
                sid = SpiffeId.parse(s.spiffe_id)
                svid = X509Svid.from_der(s.x509_svid, s.x509_svid_key, s.hint)
                if svid.spiffe_id != sid:
                    raise _Rejected(f"svids[{i}]: spiffe_id {sid} but the certificate says {svid.spiffe_id}")
                if sid.trust_domain not in bundles:
                    bundles[sid.trust_domain] = X509Bundle.from_der(sid.trust_domain, s.bundle)
            except (SvidError, IdentityError) as e:
                raise _Rejected(f"svids[{i}]: {e}") from None
            except _Rejected:
                raise
            except Exception as e:  # backstop: no content is a broken stream (it would be re-sent forever)
                raise _Rejected(f"svids[{i}]: {type(e).__name__}: {e}") from None
            svids.append(svid)
        for key, der in msg.federated_bundles.items():
            try:
                td = TrustDomain.parse(key)
                if td in bundles:
                    continue  # our own trust domain's bundle comes from the SVID's `bundle` field
                bundles[td] = X509Bundle.from_der(td, der)
            except (SvidError, IdentityError) as e:
                raise _Rejected(f"federated_bundles[{key!r}]: {e}") from None
            except Exception as e:  # backstop, as above
                raise _Rejected(f"federated_bundles[{key!r}]: {type(e).__name__}: {e}") from None
        return X509Context(tuple(svids), bundles)


# ---------------------------------------------------------------------------------------------------------
# PEM files


_FileSig = tuple[tuple[int, int, int] | None, ...]
_T = TypeVar("_T")


class _WatchedFiles:
    """Files read and loaded as one set (all or nothing): their stat signature, the digest of the last good
    contents, and the last rejection reported (each distinct one is reported once)."""

    def __init__(self, paths: Sequence[Path], rejected_kind: str) -> None:
        self.paths = tuple(paths)
        self.rejected_kind = rejected_kind
        self.last_sig: _FileSig | None = None
        self.last_digest: bytes | None = None
        self.last_rejection: str | None = None

    def stat(self) -> _FileSig:
        out: list[tuple[int, int, int] | None] = []
        for p in self.paths:
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def read_all(self) -> list[bytes]:
        return [p.read_bytes() for p in self.paths]


def jwks_file_bundle(trust_domain: TrustDomain, data: bytes) -> JwtBundle:
    """A JWT bundle file of one trust domain: a SPIFFE bundle, of which only the `use: jwt-svid` keys count
    (JWT-SVID §6; Trust Domain and Bundle §4.2: other uses ignored), or, when no key declares a `use`, a
    plain JWK Set of JWT authorities (the Workload API's form, §6.2.2). Raises JwtSvidError (bad_bundle)."""
    doc = None
    if len(data) <= MAX_BUNDLE_BYTES:  # over the cap: the parser below refuses it unread
        with contextlib.suppress(ValueError, RecursionError):
            doc = json.loads(data)  # a peek at the form only; the parser below reports what is wrong
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if isinstance(keys, list) and any(isinstance(k, dict) and "use" in k for k in keys):
        return JwtBundle.from_spiffe_bundle(trust_domain, data)
    return JwtBundle.from_workload_api(trust_domain, data)


class PemFileSource(_Publisher):
    """X.509-SVID from PEM files, as cert-manager csi-driver-spiffe (tls.crt, tls.key, ca.crt) and
    spiffe-helper (svid.pem, svid_key.pem, svid_bundle.pem) write them; JWT bundles from one JWKS file per
    trust domain (`jwt_bundles`, see `jwks_file_bundle`).

    Polls stat (mtime_ns, size, inode; following symlinks, so kubelet's `..data` swap is seen), then a
    content hash. A set that does not load (unparsable PEM, key not matching the certificate, SVID outside
    `trust_domain`) is reported as `rejected` and the last good set is kept; a rejected set is re-read on
    every poll until it changes into a good one (writers that replace files non-atomically settle).
    No file content, whatever its bytes, stops the source: it is a rejected set (issue 10 item 9).
    The JWKS files are a set of their own, loaded all or nothing in the same way (`jwt_rejected`,
    `jwt_update`): a bad JWKS file never holds back a certificate rotation, nor the reverse.
    """

    _name = "pem_files"

    def __init__(
        self,
        cert_chain: Path,
        key: Path,
        bundle: Path,
        trust_domain: TrustDomain | None = None,
        federated: Mapping[TrustDomain, Path] | None = None,
        poll_interval: float = 1.0,
        *,
        jwt_bundles: Mapping[TrustDomain, Path] | None = None,
        read_timeout: float = 5.0,
        clock: Clock = _utcnow,
        on_event: EventSink | None = None,
    ) -> None:
        super().__init__(clock, on_event)
        self._federated = dict(federated or {})
        self._paths = (Path(cert_chain), Path(key), Path(bundle), *self._federated.values())
        self._x509_files = _WatchedFiles(self._paths, "rejected")
        self._jwt_paths = {td: Path(p) for td, p in (jwt_bundles or {}).items()}
        self._jwt_files = _WatchedFiles(tuple(self._jwt_paths.values()), "jwt_rejected")
        self._trust_domain = trust_domain
        self._poll_interval = poll_interval
        self._read_timeout = read_timeout

    async def run(self) -> None:
        await self._run_with_watcher(self._poll_forever)

    async def _poll_forever(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self._poll_interval)

    async def poll_once(self) -> bool:
        """Check the files once; publish a new snapshot if they changed into a good set. True if a new X.509
        snapshot was published (the JWKS files are checked too: see `poll_jwt_once`)."""
        published = await self._poll(self._x509_files, self._load, self._publish)
        if self._jwt_paths:
            await self.poll_jwt_once()
        return published

    async def poll_jwt_once(self) -> bool:
        """Check the JWKS files once; True if they changed into a good set (a new generation if its content
        differs from the last one's)."""
        return await self._poll(self._jwt_files, self._load_jwt, self._publish_jwt)

    async def _poll(
        self, files: _WatchedFiles, load: Callable[[list[bytes]], _T], publish: Callable[[_T], object]
    ) -> bool:
        sig = files.stat()
        if sig == files.last_sig:
            return False
        missing = [str(p) for p, s in zip(files.paths, sig, strict=True) if s is None]
        if missing:
            self._reject(files, f"missing file(s): {', '.join(missing)}")
            return False
        try:
            async with asyncio.timeout(self._read_timeout):
                contents = await asyncio.to_thread(files.read_all)
        except (OSError, TimeoutError) as e:
            self._reject(files, f"cannot read: {type(e).__name__}: {e}")
            return False
        digest = hashlib.sha256(b"\0".join(hashlib.sha256(c).digest() for c in contents)).digest()
        if digest == files.last_digest:
            # Touched but unchanged, or back to the good set after a bad one: a later bad set is news again.
            files.last_sig, files.last_rejection = sig, None
            return False
        try:
            value = load(contents)
        except (SvidError, IdentityError, SourceError) as e:
            self._reject(files, str(e))
            return False
        except Exception as e:  # backstop: a file's content must never end the source's task (the sidecar)
            self._reject(files, f"{type(e).__name__}: {e}")
            return False
        files.last_sig, files.last_digest, files.last_rejection = sig, digest, None
        publish(value)
        return True

    def _reject(self, files: _WatchedFiles, why: str) -> None:
        files.last_sig = None  # re-read next poll: a writer may still be finishing
        if why != files.last_rejection:
            files.last_rejection = why
            self._emit(files.rejected_kind, f"{why}; keeping the last good set")

    def _load_jwt(self, contents: list[bytes]) -> dict[TrustDomain, JwtBundle]:
        out: dict[TrustDomain, JwtBundle] = {}
        for (td, path), data in zip(self._jwt_paths.items(), contents, strict=True):
            try:
                out[td] = jwks_file_bundle(td, data)
            except JwtSvidError as e:
                raise SourceError(f"JWT bundle file {path}: {e.detail}") from None
        return out

    def _load(self, contents: list[bytes]) -> X509Context:
        cert_pem, key_pem, bundle_pem, *fed = contents
        try:
            svid = X509Svid.from_pem(cert_pem, key_pem)
        except SvidError as e:
            raise SourceError(f"{self._paths[0]}, {self._paths[1]}: {e}") from None
        td = svid.spiffe_id.trust_domain
        if self._trust_domain is not None and td != self._trust_domain:
            raise SourceError(f"SVID {svid.spiffe_id} is not in the configured trust domain {self._trust_domain}")
        bundles = {td: self._bundle(td, self._paths[2], bundle_pem)}
        if not bundles[td].authorities:
            raise SourceError(f"bundle file {self._paths[2]} has no certificates")
        for (ftd, path), pem in zip(self._federated.items(), fed, strict=True):
            if ftd != td:
                bundles[ftd] = self._bundle(ftd, path, pem)
        return X509Context((svid,), bundles)

    @staticmethod
    def _bundle(td: TrustDomain, path: Path, pem: bytes) -> X509Bundle:
        try:
            return X509Bundle.from_pem(td, pem)
        except SvidError as e:
            raise SourceError(f"bundle file {path}: {e}") from None
