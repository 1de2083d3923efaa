"""HTTP/1.1 load generator for the benchmark harness: plain or mTLS (client certificate), three modes.

* `open`: a fixed request rate over `--conns` keep-alive connections. Request k is *intended* at
  t0 + k/rate; when the generator's timer notices it is due ("dispatch") it goes to an idle connection or,
  when all are busy, waits in a FIFO queue. `latency_ms` runs from dispatch, so time spent waiting for a
  busy connection counts (coordinated omission corrected: a stall shows up in every request scheduled
  during it) but the event loop's millisecond timer granularity does not; `schedule_latency_ms` runs from
  the exact intended time (includes that timer lag), `service_ms` from the actual send, and
  `generator_lag_ms` is dispatch - intended (the generator's own floor, also seen in `baseline`).
* `closed`: `--conns` connections, each sends its next request when the previous response is complete.
* `newconn`: `--conns` workers, each opens a connection (TLS handshake), sends one request with
  `Connection: close`, reads the response, closes; reports connections per second.

wrk cannot present a client certificate, and the machine has no wrk2, so the mTLS shapes use this
generator; its own floor is measured against the app alone (`baseline` shape) and reported by the harness.

usage: python benchmarks/loadgen.py --port P [--tls --cert C --key K --ca A] [--path /p1k]
       --mode open|closed|newconn [--rate R] [--conns N] [--duration S] [--warmup S]   (JSON on stdout)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any

pc = time.perf_counter


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "p99.9": None, "max": None}
    v = sorted(values)
    n = len(v)

    def q(p: float) -> float:
        return round(v[min(n - 1, int(p * n))] * 1000.0, 4)

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "p99.9": q(0.999), "max": round(v[-1] * 1000.0, 4)}


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection with at most one request in flight."""

    def __init__(self, request: bytes, on_done: Callable[[Conn, bool], None]) -> None:
        self.request = request
        self.on_done = on_done
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.need = -1  # bytes still expected for the current body; -1 while reading the head
        self.ok = True
        self.busy = False
        self.intended = 0.0
        self.dispatched = 0.0
        self.sent = 0.0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, intended: float, dispatched: float = 0.0) -> None:
        self.intended = intended
        self.sent = now = pc()
        self.dispatched = dispatched or now
        self.busy = True
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.need < 0:
            self.buf += data
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = self.buf[:i]
            rest = len(self.buf) - i - 4
            self.buf = b""
            self.ok = head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.need = length - rest
        else:
            self.need -= len(data)
        if self.need <= 0:
            self.need = -1
            self.busy = False
            self.on_done(self, self.ok)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.busy:
            self.busy = False
            self.on_done(self, False)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.ctx: ssl.SSLContext | None = None
        if args.tls:
            ctx = ssl.create_default_context(cafile=args.ca)
            ctx.check_hostname = False  # SPIFFE: the peer is identified by its URI SAN, not a DNS name
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(args.cert, args.key)
            self.ctx = ctx
        close = b"Connection: close\r\n" if args.mode == "newconn" else b""
        self.request = b"GET %s HTTP/1.1\r\nHost: app\r\nUser-Agent: spiffe-sidecar-loadgen\r\n%s\r\n" % (
            args.path.encode(), close)
        self.lat: list[float] = []  # from dispatch (intended, or the timer tick that noticed it was due)
        self.sched: list[float] = []  # from the intended send time
        self.svc: list[float] = []  # from the actual send
        self.lag: list[float] = []  # actual send - intended
        self.errors = 0
        self.completed = 0
        self.in_window = 0  # completed before the end of the measurement window (achieved rate)
        self.record_from = 0.0
        self.stop_at = 0.0

    async def connect(self, on_done: Callable[[Conn, bool], None]) -> Conn:
        _, proto = await self.loop.create_connection(
            lambda: Conn(self.request, on_done), self.args.host, self.args.port, ssl=self.ctx
        )
        return proto

    def record(self, conn: Conn, ok: bool) -> None:
        done = pc()
        if conn.intended < self.record_from:
            return
        if ok:
            self.completed += 1
            if done <= self.record_from + self.args.duration:
                self.in_window += 1
            self.lat.append(done - conn.dispatched)
            self.sched.append(done - conn.intended)
            self.svc.append(done - conn.sent)
            self.lag.append(conn.dispatched - conn.intended)
        else:
            self.errors += 1

    # -- open loop -------------------------------------------------------------------------------------

    async def open_loop(self) -> None:
        a = self.args
        idle: list[Conn] = []
        queue: collections.deque[tuple[float, float]] = collections.deque()  # (intended, dispatched)
        outstanding = [0]
        finished = self.loop.create_future()

        def on_done(conn: Conn, ok: bool) -> None:
            self.record(conn, ok)
            outstanding[0] -= 1
            if not ok:  # replace a broken connection
                conn.transport.close() if conn.transport else None  # type: ignore[func-returns-value]
                self.loop.create_task(replace())
            elif queue:
                outstanding[0] += 1
                conn.send(*queue.popleft())
            else:
                idle.append(conn)
            if sent_all[0] and outstanding[0] == 0 and not queue and not finished.done():
                finished.set_result(None)

        async def replace() -> None:
            try:
                conn = await self.connect(on_done)
            except OSError:
                self.errors += 1
                return
            if queue:
                outstanding[0] += 1
                conn.send(*queue.popleft())
            else:
                idle.append(conn)

        for _ in range(a.conns):
            idle.append(await self.connect(on_done))
        total = int((a.warmup + a.duration) * a.rate)
        t0 = pc() + 0.02
        self.record_from = t0 + a.warmup
        sent_all = [False]
        k = [0]
        period = 1.0 / a.rate

        def tick() -> None:
            now = pc()
            while k[0] < total:
                intended = t0 + k[0] * period
                if intended > now:
                    break
                k[0] += 1
                if idle:
                    outstanding[0] += 1
                    idle.pop().send(intended, max(intended, now))
                else:
                    queue.append((intended, max(intended, now)))
            if k[0] < total:
                self.loop.call_later(max(0.0, t0 + k[0] * period - pc()), tick)
            else:
                sent_all[0] = True
                if outstanding[0] == 0 and not queue and not finished.done():
                    finished.set_result(None)

        self.loop.call_later(0.02, tick)
        try:
            async with asyncio.timeout(a.warmup + a.duration + 10.0):
                await finished
        except TimeoutError:
            self.errors += outstanding[0] + len(queue)  # never answered
        self.elapsed = a.duration

    # -- closed loop -----------------------------------------------------------------------------------

    async def closed_loop(self) -> None:
        a = self.args
        conns: list[Conn] = []
        live = [0]
        finished = self.loop.create_future()

        def on_done(conn: Conn, ok: bool) -> None:
            self.record(conn, ok)
            now = pc()
            if ok and now < self.stop_at:
                conn.send(now)
                return
            if not ok and now < self.stop_at:
                conn.transport.close() if conn.transport else None  # type: ignore[func-returns-value]
                self.loop.create_task(start_one())
                return
            live[0] -= 1
            if live[0] == 0 and not finished.done():
                finished.set_result(None)

        async def start_one() -> None:
            try:
                conn = await self.connect(on_done)
            except OSError:
                self.errors += 1
                live[0] -= 1
                return
            conns.append(conn)
            conn.send(pc())

        for _ in range(a.conns):
            conns.append(await self.connect(on_done))
        t0 = pc()
        self.record_from = t0 + a.warmup
        self.stop_at = self.record_from + a.duration
        live[0] = len(conns)
        for conn in conns:
            conn.send(pc())
        try:
            async with asyncio.timeout(a.warmup + a.duration + 10.0):
                await finished
        except TimeoutError:
            self.errors += live[0]
        self.elapsed = a.duration
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()

    # -- a new connection per request ------------------------------------------------------------------

    async def newconn(self) -> None:
        a = self.args
        t0 = pc()
        self.record_from = t0 + a.warmup
        self.stop_at = self.record_from + a.duration

        async def worker() -> None:
            while pc() < self.stop_at:
                start = pc()
                fut: asyncio.Future[bool] = self.loop.create_future()

                def on_done(conn: Conn, ok: bool, fut: asyncio.Future[bool] = fut) -> None:
                    if not fut.done():
                        fut.set_result(ok)

                try:
                    async with asyncio.timeout(10.0):
                        conn = await self.connect(on_done)
                        conn.send(start)
                        ok = await fut
                except (OSError, TimeoutError, ssl.SSLError):
                    ok = False
                    conn = None  # type: ignore[assignment]
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                if start < self.record_from:
                    continue
                if ok:
                    self.completed += 1
                    self.in_window += 1
                    self.lat.append(pc() - start)
                    self.svc.append(pc() - start)
                else:
                    self.errors += 1

        await asyncio.gather(*(worker() for _ in range(a.conns)))
        self.elapsed = a.duration

    def result(self) -> dict[str, Any]:
        a = self.args
        return {
            "tool": "loadgen",
            "mode": a.mode,
            "tls": bool(a.tls),
            "path": a.path,
            "target_rps": a.rate if a.mode == "open" else None,
            "conns": a.conns,
            "duration_s": a.duration,
            "completed": self.completed,
            "errors": self.errors,
            # Responses completed inside the measurement window: an open loop that falls behind shows a
            # rate below the target (its backlog still completes and counts in `completed` and latency).
            "achieved_rps": round(self.in_window / self.elapsed, 1),
            "latency_ms": percentiles(self.lat),
            "schedule_latency_ms": percentiles(self.sched) if self.args.mode == "open" else None,
            "service_ms": percentiles(self.svc),
            "generator_lag_ms": percentiles(self.lag),
        }


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    run = Run(args)
    await {"open": run.open_loop, "closed": run.closed_loop, "newconn": run.newconn}[args.mode]()
    return run.result()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--ca")
    p.add_argument("--path", default="/p1k")
    p.add_argument("--mode", choices=["open", "closed", "newconn"], required=True)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        p.error("loopback only")
    try:
        import uvloop

        result = uvloop.run(amain(args))
    except ImportError:
        result = asyncio.run(amain(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
