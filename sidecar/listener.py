"""The listener of the data plane (edge): accept, connection budgets, the peer gate, drain.

One `Listener` per port, for both directions: it accepts sockets, keeps `limits.max_connections` (and,
for TLS, `max_pending_handshakes` for sockets still in the handshake: when that budget is full the OLDEST
pending handshake is dropped, so a few silent sockets cannot hold it), runs the handshake under
`timeouts.handshake` with the newest TLS snapshot (rotation never touches open connections), and hands
each connection to the protocol its `factory` makes. Drain stops accepting, lets in-flight exchanges
finish for up to a deadline, then aborts the rest.

A `Gate` decides who is on the other end before a single byte is read (DESIGN: "make that the only path
from a socket to a request"): `TlsGate` runs the SPIFFE check of the peer's chain against the bundle of
the peer ID's own trust domain in the snapshot the handshake used (X509-SVID §5.2); `AppGate` (the app on
loopback, outbound) has no peer to check. The `Peer` it returns is re-checked before each request
(`Gate.still_valid`): X509-SVID §5.2 holds for the life of a connection, not just its start.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import math
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from .config import HostPort, Limits, Timeouts
from .errors import SvidError
from .http1 import identity_line, xfcc_value
from .identity import SpiffeId
from .observer import Observer
from .tls import TlsContexts, TlsSnapshot, classify_handshake_error, verify_peer_connection

__all__ = ["AlpnSwitch", "AppGate", "Gate", "Listener", "Peer", "TlsGate", "Tracked"]


class Peer:
    """Who is on the other end of a downstream connection: the verified SPIFFE ID (None for the app on
    loopback), its text, its chain's earliest notAfter (epoch seconds), the TLS generation whose bundles
    vouched for it, and the identity line our requests carry upstream (XFCC)."""

    __slots__ = ("expires", "generation", "id_text", "identity", "spiffe_id", "tls")

    def __init__(
        self, spiffe_id: SpiffeId | None, identity: bytes, expires: float = math.inf, generation: int = 0,
        tls: str = "",
    ) -> None:  # fmt: skip
        self.spiffe_id = spiffe_id
        self.id_text = "-" if spiffe_id is None else str(spiffe_id)
        self.identity = identity
        self.expires = expires
        self.generation = generation
        self.tls = tls  # the TLS version of the connection ("" for the app on loopback)


class Gate(Protocol):
    tls_side: bool  # True: the downstream side is TLS (handshake budget, peer re-checks)

    def context(self) -> TlsSnapshot:
        """The snapshot for one new connection (raises SvidError when none may be used)."""
        ...

    def admit(self, transport: asyncio.Transport, snap: TlsSnapshot, addr: str) -> Peer | None:
        """The peer of a new connection, or None (refused: counted, logged; the caller aborts)."""
        ...

    def still_valid(self, peer: Peer, transport: asyncio.Transport | None, addr: str) -> bool:
        """Whether the peer may still be served (checked before each request)."""
        ...


class TlsGate:
    """Inbound: mTLS callers, checked against the bundle of their own trust domain."""

    tls_side = True

    def __init__(self, tls: TlsContexts, observer: Observer) -> None:
        self.tls = tls
        self.observer = observer

    def context(self) -> TlsSnapshot:
        return self.tls.current

    def admit(self, transport: asyncio.Transport, snap: TlsSnapshot, addr: str) -> Peer | None:
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            ident = verify_peer_connection(ssl_object, snap, dt.datetime.now(dt.UTC))
        except SvidError as exc:
            self.observer.refused(addr, exc.reason, exc.detail)
            return None
        xfcc = xfcc_value(snap.own_id, ident.leaf_sha256_hex, ident.spiffe_id)
        return Peer(ident.spiffe_id, identity_line(xfcc), ident.expires_at.timestamp(), snap.generation,
                    ssl_object.version() or "")  # fmt: skip

    def still_valid(self, peer: Peer, transport: asyncio.Transport | None, addr: str) -> bool:
        """Common case: one float and one int compare. When the bundles changed since the peer was
        verified, its chain is verified again against the newest ones (the verifier's cache makes that
        cheap); an expired peer, or one the new bundles no longer trust, is refused (counted under the
        verifier's reason)."""
        if time.time() >= peer.expires:
            self.observer.refused(addr, "expired", "the peer's certificate expired on an open connection")
            return False
        tls = self.tls
        if tls.generation == peer.generation:
            return True
        snap = tls.latest
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if snap is None or ssl_object is None:
            return False
        try:
            ident = verify_peer_connection(ssl_object, snap, dt.datetime.now(dt.UTC))
        except SvidError as exc:
            self.observer.refused(addr, exc.reason, f"re-checked against new bundles: {exc.detail}")
            return False
        peer.expires = ident.expires_at.timestamp()
        peer.generation = snap.generation
        return True


class AppGate:
    """Outbound: the app on loopback. No handshake and no peer to check; our requests name only the
    originating workload (`By=<own id>`): the receiving sidecar strips any XFCC and adds its own."""

    tls_side = False

    def __init__(self, tls: TlsContexts) -> None:
        self.tls = tls

    def context(self) -> TlsSnapshot:
        return self.tls.current  # refuse with the reason when we hold no valid SVID to call out with

    def admit(self, transport: asyncio.Transport, snap: TlsSnapshot, addr: str) -> Peer | None:
        return Peer(None, identity_line(f"By={snap.own_id}".encode("ascii")))

    def still_valid(self, peer: Peer, transport: asyncio.Transport | None, addr: str) -> bool:
        return True


class Tracked(Protocol):
    """What the listener needs of a connection it tracks for drain."""

    def start_drain(self) -> None: ...
    def abort(self) -> None: ...


class AlpnSwitch(asyncio.Protocol):
    """The protocol of a TLS connection until its handshake is done: then the protocol ALPN chose serves it
    (`h2`: `http2(snap, addr)`; `http/1.1` or none: `http1(snap, addr)`, RFC 7301 §3.2) and this object is
    gone. Once per connection: nothing of it sits on the path of a request."""

    __slots__ = ("addr", "http1", "http2", "snap")

    def __init__(
        self, snap: TlsSnapshot, addr: str, http1: Callable[[TlsSnapshot, str], asyncio.Protocol],
        http2: Callable[[TlsSnapshot, str], asyncio.Protocol],
    ) -> None:  # fmt: skip
        self.snap = snap
        self.addr = addr
        self.http1 = http1
        self.http2 = http2

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = transport_of(transport)
        ssl_object = t.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        proto = (self.http2 if chosen == "h2" else self.http1)(self.snap, self.addr)
        t.set_protocol(proto)
        proto.connection_made(t)


class Listener:
    """Accepts on `listen`; `factory(snapshot, addr)` makes the protocol of each connection. Connections
    call `track`/`untrack` (once verified / when lost) and `released()` exactly once when they end.
    `alpn`: handshake with the snapshot's HTTP/2 server context (ALPN `h2`, `http/1.1`; see AlpnSwitch)."""

    def __init__(
        self,
        listen: HostPort,
        *,
        gate: Gate,
        factory: Callable[[TlsSnapshot, str], asyncio.Protocol],
        timeouts: Timeouts,
        limits: Limits,
        observer: Observer,
        alpn: bool = False,
    ) -> None:
        self.listen = listen
        self.alpn = alpn
        self.gate = gate
        self.factory = factory
        self.timeouts = timeouts
        self.limits = limits
        self.observer = observer
        self.draining = False
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        # Connections still in the TLS handshake, oldest first (a dict keeps insertion order).
        self._handshaking: dict[asyncio.Task[None], None] = {}
        self._conns: set[Tracked] = set()
        self._open = 0
        self._all_closed: asyncio.Event | None = None

    async def start(self) -> int:
        """Bind and start accepting; returns the bound port (port 0 picks a free one)."""
        host, port = self.listen.host, self.listen.port
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
            raise RuntimeError("the listener is not started")
        addr = self._sock.getsockname()
        return str(addr[0]), int(addr[1])

    @property
    def open_connections(self) -> int:
        return self._open

    def track(self, conn: Tracked) -> None:
        self._conns.add(conn)

    def untrack(self, conn: Tracked) -> None:
        self._conns.discard(conn)

    def released(self) -> None:
        """A connection (accepted, verified or not) is gone: its slot is free."""
        self._open -= 1
        self.observer.closed()
        if self._open == 0 and self._all_closed is not None:
            self._all_closed.set()

    async def drain(self, deadline: float) -> None:
        """Stop accepting; idle keep-alive connections close now; in-flight exchanges finish for up to
        `deadline` seconds (each connection closes after its current response); then the rest is aborted."""
        self.draining = True
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

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        limit = self.limits.max_connections
        pending_limit = self.limits.pending_handshakes
        tls_side = self.gate.tls_side
        while True:
            try:
                client, addr = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and friends: back off briefly instead of spinning
                self.observer.accept_failed(exc)
                await asyncio.sleep(0.05)
                continue
            if self._open >= limit:
                client.close()
                self.observer.connection_limit(limit)
                continue
            if tls_side and len(self._handshaking) >= pending_limit:
                # A real client finishes in milliseconds: dropping the oldest makes a flood of new sockets,
                # not a few silent ones, what it takes to hold this budget.
                oldest = next(iter(self._handshaking))
                del self._handshaking[oldest]
                oldest.cancel()  # closes its socket and frees its slot (here or in _handshake_done)
                self.observer.handshake_limit(pending_limit)
            self._open += 1
            self.observer.opened()
            task = loop.create_task(self._handshake(client, _addr_str(addr)))
            self._handshaking[task] = None
            task.add_done_callback(functools.partial(self._handshake_done, client))

    def _handshake_done(self, client: socket.socket, task: asyncio.Task[None]) -> None:
        self._handshaking.pop(task, None)
        if task.cancelled() and client.fileno() != -1:
            # Cancelled before its first step: _handshake never ran to close the socket and free the slot.
            client.close()
            self.released()

    async def _handshake(self, client: socket.socket, addr: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            snap = self.gate.context()
        except SvidError as exc:  # none yet, or ours expired: refuse rather than serve an expired SVID
            client.close()
            self.observer.refused(addr, exc.reason, exc.detail)
            self.released()
            return
        hs = self.timeouts.handshake
        ctx: ssl.SSLContext | None = None
        if self.gate.tls_side:
            ctx = snap.server_h2 if self.alpn and snap.server_h2 is not None else snap.server
        try:
            # The loop's own handshake timeout fires first; the outer one is a backstop.
            async with asyncio.timeout(hs + 1.0):
                await loop.connect_accepted_socket(
                    functools.partial(self.factory, snap, addr), client, ssl=ctx,
                    ssl_handshake_timeout=hs if ctx is not None else None,
                )  # fmt: skip
        except asyncio.CancelledError:
            client.close()
            self.released()
            raise
        except Exception as exc:
            client.close()
            if ctx is not None:
                failure = classify_handshake_error(exc)
                self.observer.refused(addr, failure.reason, failure.detail)
            else:
                self.observer.refused(addr, "accept", type(exc).__name__)
            self.released()


def _addr_str(addr: Any) -> str:
    try:
        host, port = addr[0], addr[1]
    except (TypeError, IndexError):
        return str(addr)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def transport_of(t: asyncio.BaseTransport) -> asyncio.Transport:
    """uvloop's transports are not subclasses of asyncio.Transport; they have its methods."""
    return cast(asyncio.Transport, t)
