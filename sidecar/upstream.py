"""A bounded pool of keep-alive connections to one upstream (the app on 127.0.0.1, or later a remote peer
over mTLS for the outbound listener).

Protocol based (no streams): a leased `UpstreamConnection` forwards transport events to its current
`UpstreamSink` (the inbound exchange), so the hot path is plain method calls. While a connection sits idle
in the pool any event on it (bytes, EOF, close) means the app is done with it: it is discarded, never
reused. The caller decides about retries using `UpstreamConnection.reused` (retry once, only for an
idempotent request on a reused connection that failed before any response byte; RFC 9110 §9.2.2).

For TLS upstreams pass `ssl=` (a client SSLContext) and `verify=` (called with the SSL object right after
the handshake; raise to refuse the server, e.g. a SPIFFE ID check).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl as _ssl
from collections.abc import Callable
from typing import Protocol, cast

from .errors import SidecarError
from .h1reader import ResponseReader

__all__ = ["UpstreamConnection", "UpstreamError", "UpstreamPool", "UpstreamSink"]

_WRITE_HIGH = 64 * 1024


class UpstreamError(SidecarError):
    """The next hop failed: `kind` is a metric label ("connect", "timeout", "closed", "verify"); `failure`
    the access log's finer word for it (`connect_refused`, `connect_timeout`, `server_identity`, ...)."""

    def __init__(self, kind: str, detail: str, failure: str = "") -> None:
        self.kind = kind
        self.detail = detail
        self.failure = failure or kind
        super().__init__(f"upstream {kind}: {detail}")


class UpstreamSink(Protocol):
    """Receiver of a leased connection's events (the exchange currently using it)."""

    def upstream_data(self, data: bytes) -> None: ...
    def upstream_eof(self) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One connection to the upstream; owned by its pool, leased to one sink at a time."""

    __slots__ = ("_cork", "_idle_deadline", "_pool", "_sink", "alive", "generation", "reader", "reused", "transport")

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self.generation = pool.generation
        self._sink: UpstreamSink | None = None
        self._idle_deadline = 0.0  # loop.time() after which an idle connection is closed
        self.transport: asyncio.Transport | None = None
        self.alive = False
        self.reused = False
        # While corked (one read of the downstream being processed), writes are collected and sent as one
        # by `uncork()`; a connection closed before that sends none of them (e.g. a request whose chunked
        # framing broke in the same read never reaches the app).
        self._cork: list[bytes] | None = None
        # The HTTP response reader of this connection, kept across exchanges (made by the first one).
        self.reader: ResponseReader | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.alive = True
        transport.set_write_buffer_limits(high=_WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink.upstream_data(data)
        else:  # bytes on an idle connection: protocol error from the app; never reuse
            self._pool._discard_idle(self)

    def eof_received(self) -> bool | None:
        sink = self._sink
        if sink is not None:
            sink.upstream_eof()
        else:  # the app closed a keep-alive connection while it was idle
            self._pool._discard_idle(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        sink = self._sink
        if sink is not None:
            self._sink = None
            sink.upstream_lost(exc)
        else:
            self._pool._discard_idle(self)

    def pause_writing(self) -> None:
        if self._sink is not None:
            self._sink.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self._sink is not None:
            self._sink.upstream_resume_writing()

    # used by the sink
    def write(self, data: bytes) -> None:
        cork = self._cork
        if cork is not None:
            cork.append(data)
            return
        assert self.transport is not None
        self.transport.write(data)

    def cork(self) -> bool:
        """Start collecting writes; False if already corked."""
        if self._cork is not None:
            return False
        self._cork = []
        return True

    def uncork(self) -> None:
        """Send what was collected since `cork()` in one write (nothing if the connection closed)."""
        cork = self._cork
        self._cork = None
        if cork and self.alive and self.transport is not None:
            self.transport.write(cork[0] if len(cork) == 1 else b"".join(cork))

    def pause_reading(self) -> None:
        if self.alive and self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.alive and self.transport is not None:
            self.transport.resume_reading()

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def detach(self) -> None:
        """Stop delivering events to the sink (the connection is about to be released or closed)."""
        self._sink = None

    def abort(self) -> None:
        self._sink = None
        self._cork = None
        self.alive = False
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self._sink = None
        self._cork = None
        self.alive = False
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """At most `max_size` connections (idle + leased + connecting) to `host:port`; callers beyond the
    bound wait in FIFO order. Idle connections are closed after `idle_timeout` seconds.

    Idle expiry is one lazily re-armed timer per pool, not a TimerHandle armed on every release and
    cancelled on the next lease (two heap operations per request on a busy keep-alive connection): a
    release only stamps the connection's deadline; the timer, when it fires, closes what is due and
    re-arms itself for the earliest remaining deadline."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_size: int,
        connect_timeout: float,
        idle_timeout: float,
        ssl: _ssl.SSLContext | Callable[[], _ssl.SSLContext] | None = None,
        server_hostname: str | None = None,
        verify: Callable[[_ssl.SSLObject], None] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self.host = host
        self.port = port
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._ssl = ssl
        self._server_hostname = server_hostname
        self._verify = verify
        self._idle: list[UpstreamConnection] = []  # LIFO: the most recently used is the warmest
        self._total = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        # Bumped by `retire()`: connections of an older generation finish their current exchange and are
        # then closed instead of going back to the pool.
        self.generation = 0

    @property
    def size(self) -> int:
        return self._total

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def acquire_idle(self, sink: UpstreamSink) -> UpstreamConnection | None:
        """A warm idle connection leased to `sink` at once, or None (then use `acquire`)."""
        while self._idle:
            conn = self._idle.pop()
            if conn.alive and (conn.reader is None or not conn.reader.poisoned):
                conn.reused = True
                conn._sink = sink
                return conn
            conn.close()  # dead, or its stream desynced (bytes no request asked for): never reused
            self._total -= 1
        return None

    async def acquire(self, sink: UpstreamSink) -> UpstreamConnection:
        """A connection leased to `sink`. Waiting for a free slot has no deadline of its own: callers
        run this under theirs. Raises UpstreamError("connect", ...) when a new connection fails."""
        while True:
            if self._closed:
                raise UpstreamError("closed", "pool is closed")
            conn = self.acquire_idle(sink)
            if conn is not None:
                return conn
            if self._total < self.max_size:
                self._total += 1
                try:
                    conn = await self._connect()
                except BaseException:
                    self._total -= 1
                    self._wake_one()
                    raise
                conn.reused = False
                conn._sink = sink
                return conn
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._wake_one()  # we were woken but give up: pass the wake-up on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                raise
            # loop: take the idle connection or the free slot we were woken for

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        """Give a leased connection back; `reusable` only when the exchange ended cleanly on both sides
        (whole request sent, whole response read, keep-alive on both)."""
        conn._sink = None
        if reusable and conn._cork is not None:
            conn.uncork()  # a clean exchange's last bytes; an unusable connection is closed without them
        if reusable and conn.alive and not self._closed and conn.generation == self.generation:
            loop = asyncio.get_running_loop()
            conn._idle_deadline = deadline = loop.time() + self.idle_timeout
            self._idle.append(conn)
            if self._timer is None:
                self._timer = loop.call_at(deadline, self._sweep)
        else:
            conn.close()
            self._total -= 1
        self._wake_one()

    def retire(self) -> int:
        """Drain gracefully (e.g. our SVID or the bundle rotated): idle connections close now, leased ones
        finish their current exchange and close on release; new leases get new connections. Returns how
        many idle connections were closed."""
        self.generation += 1
        closed = 0
        for conn in list(self._idle):
            self._discard_idle(conn)
            closed += 1
        return closed

    async def close(self) -> None:
        """Close idle connections and refuse new leases; leased ones are closed by their users."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for conn in self._idle:
            conn.close()
            self._total -= 1
        self._idle.clear()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    # internals
    def _wake_one(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _sweep(self) -> None:
        """The idle timer: close connections idle for `idle_timeout`, re-arm for the next deadline."""
        self._timer = None
        if self._closed or not self._idle:
            return  # the next release arms it again
        loop = asyncio.get_running_loop()
        # A timer may run up to the clock's resolution early (asyncio) or on a millisecond tick (uvloop):
        # a connection due within the next millisecond is closed now rather than re-armed for it.
        now = loop.time() + 0.001
        for conn in [c for c in self._idle if c._idle_deadline <= now]:
            self._discard_idle(conn)
        if self._idle and self._timer is None and not self._closed:
            self._timer = loop.call_at(min(c._idle_deadline for c in self._idle), self._sweep)

    def _discard_idle(self, conn: UpstreamConnection) -> None:
        """An idle connection died or expired: drop it from the pool (idempotent)."""
        conn.alive = False
        try:
            self._idle.remove(conn)
        except ValueError:
            return  # not idle (being leased/released right now) or already discarded
        if conn.transport is not None:
            conn.transport.close()
        self._total -= 1
        self._wake_one()

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        ctx = self._ssl() if callable(self._ssl) else self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=ctx,
                    server_hostname=self._server_hostname if ctx is not None else None,
                    ssl_handshake_timeout=self.connect_timeout if ctx is not None else None,
                )
        except TimeoutError:
            raise UpstreamError("connect", f"{self.host}:{self.port}: no connection within "
                                f"{self.connect_timeout:g}s", "connect_timeout") from None
        except OSError as exc:
            failure = "connect_refused" if isinstance(exc, ConnectionRefusedError) else "connect_error"
            raise UpstreamError("connect", f"{self.host}:{self.port}: {exc.strerror or exc}", failure) from None
        if ctx is not None and self._verify is not None:
            obj = transport.get_extra_info("ssl_object")
            try:
                self._verify(obj)
            except Exception as exc:
                transport.abort()
                raise UpstreamError("verify", str(exc), "server_identity") from None
        return conn
