"""The TCP relay of the data plane, one for both directions (edge).

TCP mode: one decision per connection (`Authorizer.check_connection`, on the caller alone inbound, the
route outbound), then bytes both ways through a connection leased from the `Dialer` (never pooled back).
Every deadline holds in both directions: `timeouts.idle` without a byte either way, `timeouts.write_stall`
for a side that takes no bytes while the other has some for it (the caller: the audit line says 408; the
upstream: counted as upstream_errors{kind="stalled"}), and the expiry of every
certificate the relay stands on (the caller's inbound, the server's outbound: X509-SVID §5.2 holds for the
life of a connection). One audit line per connection, with method and path "-".
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Final

from .audit import access_members
from .listener import Gate, Listener, Peer, transport_of
from .observer import Observer
from .policy import Decision
from .proxy import BUFFER_HIGH, Authorizer, Dialer
from .timers import Deadline
from .tls import TlsSnapshot
from .upstream import UpstreamConnection, UpstreamError

__all__ = ["RelayContext", "TcpRelay"]

_STALLED: Final = 408


@dataclasses.dataclass(frozen=True, slots=True)
class RelayContext:
    listener: Listener
    gate: Gate
    authorizer: Authorizer
    observer: Observer
    idle: float
    write_stall: float
    connect: float  # the deadline for leasing the upstream connection
    upstream_peer: bool  # audit the upstream's SPIFFE ID as `peer` (outbound)
    clock: Callable[[], float]


class TcpRelay(asyncio.Protocol):
    def __init__(self, ctx: RelayContext, snap: TlsSnapshot, addr: str) -> None:
        self.ctx = ctx
        self.snap = snap
        self.addr = addr
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.closed = False
        self.up: UpstreamConnection | None = None
        self.dialer: Dialer | None = None
        self.pending: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        self.decision: Decision | None = None
        self.peer_text = "-"
        self.started = ctx.clock()
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.failure = ""  # why the upstream failed (access log)
        self.loop = asyncio.get_running_loop()
        self.idle = Deadline(self.loop, self._on_idle)
        self._write_stall: Deadline | None = None
        self._up_stall: Deadline | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._expires = math.inf

    # -- asyncio.Protocol (downstream) -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = transport_of(transport)
        ctx = self.ctx
        peer = ctx.gate.admit(t, self.snap, self.addr)
        if peer is None:
            self.closed = True
            t.abort()
            return
        self.peer = peer
        self.peer_text = peer.id_text
        t.set_write_buffer_limits(high=BUFFER_HIGH)
        ctx.listener.track(self)
        grant = ctx.authorizer.check_connection(peer)
        self.decision = grant.decision
        if not grant.decision.forward or grant.dialer is None:
            self.close()
            return
        self.dialer = grant.dialer
        self.idle.set(ctx.idle)
        self._arm_expiry(peer.expires)
        t.pause_reading()
        self.task = self.loop.create_task(self._lease(grant.dialer))

    async def _lease(self, dialer: Dialer) -> None:
        ctx = self.ctx
        if dialer.unavailable() is not None:
            ctx.observer.upstream_error("down")
            self.close()
            return
        try:
            async with asyncio.timeout(ctx.connect):
                up = await dialer.acquire(self)
        except (UpstreamError, TimeoutError) as exc:
            err = exc if isinstance(exc, UpstreamError) else UpstreamError("timeout", "no connection in time")
            ctx.observer.upstream_error(err.kind)
            self.failure = err.failure
            failure = dialer.failure(err)
            if failure.decision is not None:
                self.decision = failure.decision
            if ctx.upstream_peer:
                self.peer_text = failure.peer
            self.close()
            return
        dialer.connected()
        if self.closed:
            dialer.release(up, reusable=False)
            return
        self.up = up
        server, expires = dialer.peer_of(up)
        if ctx.upstream_peer:
            self.peer_text = server
        self._arm_expiry(expires)
        if self.pending:
            up.write(b"".join(self.pending))
            self.pending.clear()
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.idle.set(self.ctx.idle)
        up = self.up
        if up is not None and up.alive:
            up.write(data)
        else:  # only before the upstream connects (reading is paused then); bounded by one read
            self.pending.append(data)

    def eof_received(self) -> bool | None:
        # A TLS transport cannot stay half-open under asyncio: the caller's EOF ends the relay.
        return False

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()
        t = self._write_stall  # a caller that takes no bytes must not pin the relay
        if t is None:
            t = self._write_stall = Deadline(self.loop, self._on_write_stall)
        t.set(self.ctx.write_stall)

    def resume_writing(self) -> None:
        if self._write_stall is not None:
            self._write_stall.clear()
        if self.up is not None:
            self.up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.idle.close()  # the deadlines drop their callbacks: no cycle left for the GC to find
        for t in (self._write_stall, self._up_stall):
            if t is not None:
                t.close()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.task is not None and not self.task.done():
            self.task.cancel()
        up, self.up = self.up, None
        if up is not None and self.dialer is not None:
            self.dialer.release(up, reusable=False)
        ctx = self.ctx
        ctx.listener.untrack(self)
        ctx.listener.released()
        if self.decision is not None:
            peer = self.peer
            access = access_members(protocol="tcp", tls=peer.tls if peer is not None else "", source=self.addr,
                                    upstream_failure=self.failure)  # fmt: skip
            ctx.observer.exchange(self.peer_text, "-", "-", self.decision, self.status, self.bytes_in,
                                  self.bytes_out, ctx.clock() - self.started, access)  # fmt: skip
        self.transport = None

    # -- deadlines -----------------------------------------------------------------------------------------

    def _arm_expiry(self, expires: float) -> None:
        if expires >= self._expires:
            return
        self._expires = expires
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = self.loop.call_later(max(0.0, expires - time.time()), self._on_expired)

    def _on_expired(self) -> None:
        self._expiry = None
        if self.closed:
            return
        self.ctx.observer.refused(self.addr, "expired", "a certificate of this relay expired on an open connection")
        self._abort_both()

    def _on_idle(self, _kind: int) -> None:
        self.close()  # connection_lost releases the upstream side

    def _on_write_stall(self, _kind: int) -> None:
        self.ctx.observer.stall("write")
        self.status = _STALLED
        self._abort_both()

    def _abort_both(self) -> None:
        up = self.up
        if up is not None:
            up.abort()
        self.abort()

    # -- UpstreamSink --------------------------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.idle.set(self.ctx.idle)
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def upstream_eof(self) -> None:
        self.close()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.close()

    def upstream_pause_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()
        t = self._up_stall  # the upstream must take bytes again within write_stall, as the caller must
        if t is None:
            t = self._up_stall = Deadline(self.loop, self._on_upstream_stall)
        t.set(self.ctx.write_stall)

    def upstream_resume_writing(self) -> None:
        if self._up_stall is not None:
            self._up_stall.clear()
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _on_upstream_stall(self, _kind: int) -> None:
        self.ctx.observer.upstream_error("stalled")
        self.failure = "stalled"
        self._abort_both()

    # -- Tracked -------------------------------------------------------------------------------------------

    def start_drain(self) -> None:
        pass  # a relay has no request boundary: it runs until the drain deadline aborts it

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()
