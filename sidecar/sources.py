"""SVID sources (edge): the SPIFFE Workload API and PEM files, both publishing immutable `X509Context`s.

A source keeps the last good snapshot and serves it until its default SVID expires; bad updates are
reported through `on_event` and discarded (Workload API §4.5). `run()` is owned by the caller's TaskGroup
and runs until cancelled; it raises `SourceError` only for errors that retrying cannot fix.

We use grpclib (asyncio-native) rather than py-spiffe's thread-based `X509Source`, so that the stream,
its deadlines and its cancellation live on the sidecar's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from ._proto import workload_pb2
from ._proto.workload_grpc import SpiffeWorkloadAPIStub
from .endpoint import TcpEndpoint, UnixEndpoint, endpoint_from_env
from .errors import IdentityError, SidecarError, SourceError, SvidError
from .hints import workload_api_unreachable
from .identity import SpiffeId, TrustDomain
from .svid import X509Bundle, X509Context, X509Svid

__all__ = [
    "PemFileSource",
    "SourceEvent",
    "WorkloadApiSource",
    "X509Source",
    "endpoint_from_env",
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
    """

    kind: str
    source: str
    detail: str = ""
    delay: float | None = None


EventSink = Callable[[SourceEvent], None]
Clock = Callable[[], dt.datetime]


class X509Source(Protocol):
    def current(self) -> X509Context | None: ...

    def subscribe(self, cb: Callable[[X509Context], None]) -> Callable[[], None]: ...

    def healthy(self) -> bool: ...

    async def run(self) -> None: ...

    async def wait_ready(self, timeout: float) -> X509Context: ...  # noqa: ASYNC109 - the agreed API


def _ignore(_: SourceEvent) -> None:
    pass


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


class WorkloadApiSource(_Publisher):
    """Streams FetchX509SVID from a SPIFFE Workload API endpoint (SPIRE agent, embedded dev SPIRE).

    Every message is the full state (Workload API §4.3-4.4); a message with a mandatory field left at its
    default is reported and discarded (§4.5). InvalidArgument is final (Workload Endpoint §6); anything
    else is retried with jittered exponential backoff, reset after each received message.
    """

    _name = "workload_api"

    def __init__(
        self,
        endpoint: UnixEndpoint | TcpEndpoint,
        *,
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
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._connect_timeout = connect_timeout
        self._first_message_timeout = first_message_timeout
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._last_msg: workload_pb2.X509SVIDResponse | None = None
        self._got_message = False

    def _channel(self) -> Channel:
        ep = self.endpoint
        if isinstance(ep, UnixEndpoint):
            return Channel(path=ep.path, config=_CHANNEL_CONFIG)
        return Channel(host=ep.host, port=ep.port, config=_CHANNEL_CONFIG)

    def backoff_delay(self, attempt: int) -> float:
        """Equal-jitter exponential backoff: in [d/2, d] with d = min(max, initial * 2**attempt)."""
        d = min(self._backoff_max, self._backoff_initial * float(2 ** min(attempt, 32)))
        jitter: float = self._rng.uniform(0, d / 2)
        return d / 2 + jitter

    async def run(self) -> None:
        await self._run_with_watcher(self._stream_forever)

    async def _stream_forever(self) -> None:
        attempt = 0
        while True:
            self._got_message = False
            try:
                await self._stream_once()
                reason = "stream ended by the server"
            except GRPCError as e:
                if e.status is Status.INVALID_ARGUMENT:
                    raise self._fail(
                        f"the Workload API at {self.endpoint} refused the request as invalid "
                        f"(InvalidArgument: {e.message}); not retrying"
                    ) from None
                reason = f"{e.status.name}: {e.message}"
            except TimeoutError:
                reason = "timed out connecting or waiting for the first message"
            except OSError as e:
                reason = workload_api_unreachable(self.endpoint, e)  # names the socket and what to check
            except SidecarError as e:
                reason = f"{type(e).__name__}: {e}"
            except Exception as e:  # grpclib/h2 protocol errors, StreamTerminatedError, ...
                reason = f"{type(e).__name__}: {e}"
            if self._got_message:
                attempt = 0
            delay = self.backoff_delay(attempt)
            attempt += 1
            self._emit("stream_error", reason)
            self._emit("backoff", f"reconnecting to {self.endpoint}", delay)
            await asyncio.sleep(delay)

    async def _stream_once(self) -> None:
        channel = self._channel()
        try:
            stub = SpiffeWorkloadAPIStub(channel)
            async with stub.FetchX509SVID.open(metadata=WORKLOAD_API_METADATA) as stream:
                async with asyncio.timeout(self._connect_timeout):
                    await stream.send_message(workload_pb2.X509SVIDRequest(), end=True)
                self._emit("connected", str(self.endpoint))
                # §4.3: the first message MUST come as soon as possible; later ones only on change, so the
                # long-lived stream itself has no deadline.
                async with asyncio.timeout(self._first_message_timeout):
                    msg = await stream.recv_message()
                while msg is not None:
                    self._got_message = True
                    self._handle(msg)
                    msg = await stream.recv_message()
        finally:
            channel.close()

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


class PemFileSource(_Publisher):
    """X.509-SVID from PEM files, as cert-manager csi-driver-spiffe (tls.crt, tls.key, ca.crt) and
    spiffe-helper (svid.pem, svid_key.pem, svid_bundle.pem) write them.

    Polls stat (mtime_ns, size, inode; following symlinks, so kubelet's `..data` swap is seen), then a
    content hash. A set that does not load (unparsable PEM, key not matching the certificate, SVID outside
    `trust_domain`) is reported as `rejected` and the last good set is kept; a rejected set is re-read on
    every poll until it changes into a good one (writers that replace files non-atomically settle).
    No file content, whatever its bytes, stops the source: it is a rejected set (issue 10 item 9).
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
        read_timeout: float = 5.0,
        clock: Clock = _utcnow,
        on_event: EventSink | None = None,
    ) -> None:
        super().__init__(clock, on_event)
        self._federated = dict(federated or {})
        self._paths = (Path(cert_chain), Path(key), Path(bundle), *self._federated.values())
        self._trust_domain = trust_domain
        self._poll_interval = poll_interval
        self._read_timeout = read_timeout
        self._last_sig: _FileSig | None = None
        self._last_digest: bytes | None = None
        self._last_rejection: str | None = None

    async def run(self) -> None:
        await self._run_with_watcher(self._poll_forever)

    async def _poll_forever(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self._poll_interval)

    def _stat(self) -> _FileSig:
        out: list[tuple[int, int, int] | None] = []
        for p in self._paths:
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def _read_all(self) -> list[bytes]:
        return [p.read_bytes() for p in self._paths]

    async def poll_once(self) -> bool:
        """Check the files once; publish a new snapshot if they changed into a good set. True if published."""
        sig = self._stat()
        if sig == self._last_sig:
            return False
        missing = [str(p) for p, s in zip(self._paths, sig, strict=True) if s is None]
        if missing:
            self._reject(f"missing file(s): {', '.join(missing)}")
            return False
        try:
            async with asyncio.timeout(self._read_timeout):
                contents = await asyncio.to_thread(self._read_all)
        except (OSError, TimeoutError) as e:
            self._reject(f"cannot read: {type(e).__name__}: {e}")
            return False
        digest = hashlib.sha256(b"\0".join(hashlib.sha256(c).digest() for c in contents)).digest()
        if digest == self._last_digest:
            # Touched but unchanged, or back to the good set after a bad one: a later bad set is news again.
            self._last_sig, self._last_rejection = sig, None
            return False
        try:
            ctx = self._load(contents)
        except (SvidError, IdentityError, SourceError) as e:
            self._reject(str(e))
            return False
        except Exception as e:  # backstop: a file's content must never end the source's task (the sidecar)
            self._reject(f"{type(e).__name__}: {e}")
            return False
        self._last_sig, self._last_digest, self._last_rejection = sig, digest, None
        self._publish(ctx)
        return True

    def _reject(self, why: str) -> None:
        self._last_sig = None  # re-read next poll: a writer may still be finishing
        if why != self._last_rejection:
            self._last_rejection = why
            self._emit("rejected", f"{why}; keeping the last good set")

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
