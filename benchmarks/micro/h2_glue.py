"""Per-stream Python cost of the inbound HTTP/2 path with the sockets and TLS taken out.

Like inbound_glue.py, but for a caller that negotiated `h2`: an in-process ngh2 client writes request frames
into `sidecar.h2conn.Http2Connection.data_received`, the HTTP/1.1 app's response is fed into the leased
upstream connection, and the frames we write go back to the client (so windows and acknowledgements run as on
the wire). Shapes: `h2 -> http1 app` (unary GET, 2-byte response: parse, decide, translate, relay, audit) and
`grpc denied` (a gRPC request answered Trailers-Only with grpc-status 7 and RST_STREAM: no upstream).
CPU time of this thread, min of repeats. Both the HTTP/2 engine's work (libnghttp2, both sides) and ours count;
the client's share is reported separately.

usage: python benchmarks/micro/h2_glue.py
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import ngh2  # noqa: E402 - after sys.path

from benchmarks.micro.inbound_glue import RESPONSE, _Transport  # noqa: E402

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/api/stock/42"), (b":authority", b"inventory"),
       (b"user-agent", b"bench"), (b"accept", b"*/*")]  # fmt: skip
GRPC = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/inventory.v1.Admin/Reset"),
        (b":authority", b"inventory"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        (b"user-agent", b"grpc-python/1.85")]  # fmt: skip


class _Wire(_Transport):
    """The caller's side of the wire: what the sidecar writes is handed to the client engine."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.out.append(data)


def build() -> tuple[Any, Any, _Wire, ngh2.Connection]:
    from sidecar.audit import AuditLog, open_writer
    from sidecar.config import AuditSettings, HostPort, InboundSettings, Limits, Timeouts
    from sidecar.http1 import identity_line, xfcc_value
    from sidecar.identity import SpiffeId, TrustDomain
    from sidecar.inbound import InboundServer, PolicyRef
    from sidecar.listener import Peer
    from sidecar.metrics import Metrics
    from sidecar.policy import compile_policy
    from sidecar.svid import X509Bundle, X509Context, X509Svid
    from sidecar.tls import TlsContexts
    from sidecar.upstream import UpstreamConnection
    from tests.pki import CA

    root = CA.root("example.org")
    srv = root.leaf("spiffe://example.org/ns/shop/sa/inventory")
    td = TrustDomain.parse("example.org")
    ctx = X509Context((X509Svid.from_pem(srv.chain_pem(), srv.key_pem()),),
                      {td: X509Bundle.from_pem(td, root.bundle_pem())})  # fmt: skip
    metrics = Metrics()
    write, _close = open_writer(os.devnull)
    audit = AuditLog(AuditSettings(), write=write, metrics=metrics, rng=lambda: 0.0)
    policy = compile_policy({"rules": [
        {"name": "checkout-reads-stock", "action": "allow", "methods": ["GET"], "paths": ["/api/stock/*"],
         "callers": ["spiffe://example.org/ns/shop/sa/checkout"]},
        {"name": "no-admin-grpc", "action": "deny", "grpc": ["inventory.v1.Admin/*"], "callers": ["*"]},
    ]}, "bench")  # fmt: skip
    server = InboundServer(
        InboundSettings(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", 8080)),
        timeouts=Timeouts(), limits=Limits(), tls=TlsContexts(ctx), policy=PolicyRef(policy),
        audit=audit, metrics=metrics,
    )  # fmt: skip
    snap = server.tls.current
    conn = server.listener.factory(snap, "127.0.0.1:5555").http2(snap, "127.0.0.1:5555")
    wire = _Wire()
    peer_id = SpiffeId.parse("spiffe://example.org/ns/shop/sa/checkout")
    xfcc = xfcc_value(snap.own_id, "ab" * 32, peer_id)
    conn.serve(wire, Peer(peer_id, identity_line(xfcc), 4102444800.0, snap.generation, "TLSv1.3"))
    up = UpstreamConnection(server.pool)
    up.connection_made(_Transport())  # type: ignore[arg-type]
    server.pool._total += 1
    server.pool.release(up, reusable=True)
    client = ngh2.Connection(ngh2.Role.CLIENT, ngh2.Configuration())
    client.initiate_connection()
    conn.data_received(client.data_to_send())
    _deliver(wire, client)
    conn.data_received(client.data_to_send())
    return server, conn, wire, client


def _deliver(wire: _Wire, client: ngh2.Connection) -> int:
    """The sidecar's frames into the client engine; returns the number of responses completed."""
    done = 0
    if wire.out:
        data = b"".join(wire.out)
        wire.out.clear()
        client.receive_data(data)
        for e in client.events():
            if isinstance(e, ngh2.StreamClosed):
                done += 1
    return done


def run(shape: str, n: int) -> tuple[float, float]:
    """(sidecar seconds per stream, client engine seconds per stream) over n streams on one connection."""
    server, conn, wire, client = build()
    up = server.pool._idle[-1] if shape == "h1" else None
    headers = GET if shape == "h1" else GRPC
    ours = theirs = 0.0
    done = 0
    for i in range(n + 200):  # 200 warm-up streams (caches, metric children, audit prefixes)
        t0 = time.thread_time()
        client.send_request(headers, end_stream=shape == "h1")
        if shape != "h1":
            sid = client.next_stream_id - 2
            client.send_data(sid, b"\x00\x00\x00\x00\x00", end_stream=True)
        req = client.data_to_send()
        t1 = time.thread_time()
        conn.data_received(req)
        if up is not None:
            up.data_received(RESPONSE)
        t2 = time.thread_time()
        done += _deliver(wire, client)
        ack = client.data_to_send()
        t3 = time.thread_time()
        if ack:
            conn.data_received(ack)
        t4 = time.thread_time()
        if i >= 200:
            ours += (t2 - t1) + (t4 - t3)
            theirs += (t1 - t0) + (t3 - t2)
    assert done >= n, f"only {done} of {n + 200} streams completed"
    return ours / n, theirs / n


async def _main(n: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    return {shape: [run(shape, n) for _ in range(repeats)] for shape in ("h1", "grpc-denied")}


if __name__ == "__main__":
    import uvloop

    results = uvloop.run(_main(5000, 5))
    for shape, rs in results.items():
        ours = sorted(r[0] for r in rs)
        client_side = min(r[1] for r in rs)
        name = "h2 -> http1 app, unary GET" if shape == "h1" else "gRPC denied (Trailers-Only)"
        print(f"{name}: min {ours[0] * 1e6:.2f} us/stream, median {ours[len(ours) // 2] * 1e6:.2f} us CPU in the "
              f"sidecar (client engine: {client_side * 1e6:.2f} us)")
