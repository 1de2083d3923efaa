"""UpstreamPool against a real loopback server: reuse, the bound and its wait queue, idle eviction,
connections closed by the app while idle, connect failures, and a TLS upstream with a verify hook."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from sidecar.tls import TlsContexts
from sidecar.upstream import UpstreamConnection, UpstreamError, UpstreamPool
from tests.helpers import Pki

pytestmark = pytest.mark.uvloop  # the sidecar runs on uvloop; test the same transports


class Sink:
    """Collects what a leased connection delivers."""

    def __init__(self) -> None:
        self.data = b""
        self.eof = False
        self.lost = False
        self.got = asyncio.Event()

    def upstream_data(self, data: bytes) -> None:
        self.data += data
        self.got.set()

    def upstream_eof(self) -> None:
        self.eof = True
        self.got.set()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.got.set()

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass


@dataclass
class Echo:
    port: int
    accepted: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    state = Echo(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.accepted += 1
        state.writers.append(writer)
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = srv.sockets[0].getsockname()[1]
    yield state
    srv.close()
    for w in state.writers:
        w.close()


async def roundtrip(conn: UpstreamConnection, sink: Sink, msg: bytes) -> None:
    sink.data = b""
    sink.got.clear()
    conn.write(msg)
    async with asyncio.timeout(5):
        while sink.data != msg:
            await sink.got.wait()
            sink.got.clear()


def pool_for(port: int, **kw: float) -> UpstreamPool:
    args: dict[str, float] = {"max_size": 2, "connect_timeout": 1.0, "idle_timeout": 5.0} | kw
    return UpstreamPool("127.0.0.1", port, max_size=int(args["max_size"]),
                        connect_timeout=args["connect_timeout"], idle_timeout=args["idle_timeout"])


async def test_keep_alive_reuse(echo: Echo) -> None:
    pool = pool_for(echo.port)
    sink = Sink()
    c1 = await pool.acquire(sink)
    assert not c1.reused
    await roundtrip(c1, sink, b"one")
    pool.release(c1, reusable=True)
    c2 = await pool.acquire(sink)
    assert c2 is c1 and c2.reused
    await roundtrip(c2, sink, b"two")
    pool.release(c2, reusable=False)
    assert pool.size == 0 and echo.accepted == 1
    await pool.close()


async def test_bound_and_wait_queue(echo: Echo) -> None:
    pool = pool_for(echo.port, max_size=1)
    a = await pool.acquire(Sink())
    waiter = asyncio.create_task(pool.acquire(Sink()))
    await asyncio.sleep(0.05)
    assert not waiter.done() and pool.waiting == 1 and pool.size == 1
    pool.release(a, reusable=True)
    async with asyncio.timeout(5):
        b = await waiter
    assert b is a
    # a waiter that gives up does not leak its place
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await pool.acquire(Sink())
    assert pool.waiting == 0
    pool.release(b, reusable=False)
    c = await pool.acquire(Sink())  # the slot is free again
    assert pool.size == 1
    pool.release(c, reusable=True)
    await pool.close()


async def test_closed_by_app_while_idle_is_not_reused(echo: Echo) -> None:
    pool = pool_for(echo.port)
    sink = Sink()
    c1 = await pool.acquire(sink)
    await roundtrip(c1, sink, b"x")
    pool.release(c1, reusable=True)
    assert pool.idle_count == 1
    for w in echo.writers:  # the app closes its keep-alive connections
        w.close()
    async with asyncio.timeout(5):
        while pool.idle_count:
            await asyncio.sleep(0.01)
    assert pool.size == 0
    c2 = await pool.acquire(sink)
    assert c2 is not c1 and not c2.reused
    await roundtrip(c2, sink, b"y")
    pool.release(c2, reusable=True)
    await pool.close()


async def test_idle_eviction(echo: Echo) -> None:
    pool = pool_for(echo.port, idle_timeout=0.1)
    c = await pool.acquire(Sink())
    pool.release(c, reusable=True)
    async with asyncio.timeout(5):
        while pool.size:
            await asyncio.sleep(0.02)
    assert not c.alive
    await pool.close()


async def test_idle_timer_rearms_and_never_closes_leased_connections(echo: Echo) -> None:
    # One lazily re-armed timer per pool: each idle connection still expires on its own, a leased one
    # never does, and the timer re-arms after a sweep that found nothing (or not everything) due.
    pool = pool_for(echo.port, max_size=3, idle_timeout=0.1)
    a, b, c = Sink(), Sink(), Sink()
    ca, cb, cc = await pool.acquire(a), await pool.acquire(b), await pool.acquire(c)
    pool.release(ca, reusable=True)
    await asyncio.sleep(0.05)
    pool.release(cb, reusable=True)  # due later than ca: the sweep for ca must re-arm for it
    async with asyncio.timeout(5):
        while pool.idle_count:
            await asyncio.sleep(0.02)
    assert not ca.alive and not cb.alive
    await asyncio.sleep(0.3)  # several idle timeouts while cc stays leased
    assert cc.alive and pool.size == 1
    await roundtrip(cc, c, b"still here")
    pool.release(cc, reusable=True)  # the timer was not re-armed while nothing was idle: this arms it
    async with asyncio.timeout(5):
        while pool.size:
            await asyncio.sleep(0.02)
    assert not cc.alive
    await pool.close()


async def test_close_cancels_the_idle_timer(echo: Echo) -> None:
    pool = pool_for(echo.port, idle_timeout=30)
    conn = await pool.acquire(Sink())
    pool.release(conn, reusable=True)
    assert pool._timer is not None
    await pool.close()
    assert pool._timer is None and pool.size == 0 and not conn.alive


async def test_connect_failure() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    pool = pool_for(port, max_size=1)
    with pytest.raises(UpstreamError) as ei:
        await pool.acquire(Sink())
    assert ei.value.kind == "connect"
    assert pool.size == 0  # the failed attempt gave its slot back
    await pool.close()


async def test_tls_upstream_with_verify_hook(pki: Pki) -> None:
    """The outbound listener's use: mTLS to a peer, its SPIFFE ID checked by the hook."""
    server_tls = TlsContexts(pki.context())
    client_tls = TlsContexts(pki.context(pki.checkout))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_tls.server)
    port = srv.sockets[0].getsockname()[1]
    seen: list[str] = []

    def verify(obj: ssl.SSLObject) -> None:
        import datetime as dt

        from sidecar.tls import verify_peer_connection

        peer = verify_peer_connection(obj, client_tls.current, dt.datetime.now(dt.UTC))
        seen.append(str(peer.spiffe_id))
        if not str(peer.spiffe_id).endswith("/inventory"):
            raise ValueError("unexpected server identity")

    pool = UpstreamPool("127.0.0.1", port, max_size=1, connect_timeout=2, idle_timeout=5,
                        ssl=lambda: client_tls.client, verify=verify)
    sink = Sink()
    c = await pool.acquire(sink)
    await roundtrip(c, sink, b"over mTLS")
    assert seen == ["spiffe://example.org/ns/shop/sa/inventory"]
    pool.release(c, reusable=False)

    def refuse(obj: ssl.SSLObject) -> None:
        raise ValueError("not the server we wanted")

    bad = UpstreamPool("127.0.0.1", port, max_size=1, connect_timeout=2, idle_timeout=5,
                       ssl=client_tls.client, verify=refuse)
    with pytest.raises(UpstreamError) as ei:
        await bad.acquire(sink)
    assert ei.value.kind == "verify"
    await pool.close()
    await bad.close()
    srv.close()
