"""Per-request Python cost of the inbound HTTP path with the sockets and TLS taken out.

Drives the inbound listener's connection protocol (sidecar.proxy.HttpConnection) directly: request bytes
into `data_received`, the app's response into the leased upstream connection's `data_received`, with
recording stand-in transports. What it
measures is the glue (the request/response readers, header checks, normalisation, authorize, head rewrite, metrics,
audit line, pool lease/release, timers); what it leaves out is the kernel and OpenSSL. Deterministic
enough for before/after comparisons on a noisy shared machine (take the min of repeats).

usage: python benchmarks/micro/inbound_glue.py [ROOT]   (ROOT: a tree containing sidecar/, default: repo)
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

ROOT = sys.argv[1] if __name__ == "__main__" and len(sys.argv) > 1 else os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # tests.pki
if ROOT != REPO:
    sys.path.insert(0, ROOT)  # a tree whose sidecar/ wins (e.g. the mypyc build: build/compiled)

REQUEST = b"GET /api/stock/42 HTTP/1.1\r\nHost: inventory\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class _Transport:
    """Records nothing, answers what the protocols ask. Not a mock of ssl or sockets: no I/O happens."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def build(audit_path: str = os.devnull) -> tuple[Any, Any, _Transport]:
    """An InboundServer with one admitted downstream connection and one pooled upstream connection."""
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
                      {td: X509Bundle.from_pem(td, root.bundle_pem())})
    metrics = Metrics()
    write, _close = open_writer(audit_path)
    audit = AuditLog(AuditSettings(), write=write, metrics=metrics, rng=lambda: 0.0)
    policy = compile_policy({"rules": [
        {"name": "checkout-reads-stock", "action": "allow", "methods": ["GET"], "paths": ["/api/stock/*"],
         "callers": ["spiffe://example.org/ns/shop/sa/checkout"]},
        {"name": "no-admin", "action": "deny", "paths": ["/admin/**"], "callers": ["*"]},
    ]}, "bench")
    server = InboundServer(
        InboundSettings(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", 8080)),
        timeouts=Timeouts(), limits=Limits(), tls=TlsContexts(ctx), policy=PolicyRef(policy),
        audit=audit, metrics=metrics,
    )
    snap = server.tls.current
    switch = server.listener.factory(snap, "127.0.0.1:5555")
    conn = switch.http1(snap, "127.0.0.1:5555")  # what ALPN http/1.1 (or none) picks after the handshake
    down = _Transport()
    peer_id = SpiffeId.parse("spiffe://example.org/ns/shop/sa/checkout")
    xfcc = xfcc_value(snap.own_id, "ab" * 32, peer_id)
    conn.serve(down, Peer(peer_id, identity_line(xfcc), 4102444800.0, snap.generation))
    up = UpstreamConnection(server.pool)
    up.connection_made(_Transport())  # type: ignore[arg-type]
    server.pool._total += 1
    server.pool.release(up, reusable=True)
    return server, conn, down


def feed(server: Any, conn: Any, down: _Transport, n: int) -> float:
    """Seconds per request over n keep-alive requests on one connection (call inside a running loop)."""
    up = server.pool._idle[-1]
    feed_req = conn.data_received
    feed_resp = up.data_received
    before = down.written
    t0 = time.thread_time()  # CPU time of this thread: robust to other load on the machine
    for _ in range(n):
        feed_req(REQUEST)
        feed_resp(RESPONSE)
    elapsed = time.thread_time() - t0
    assert down.written - before >= n * 60, "responses did not reach the downstream transport"
    return elapsed / n


def run(n: int) -> float:
    server, conn, down = build()
    feed(server, conn, down, 200)  # warm caches (metric children, audit prefixes)
    return feed(server, conn, down, n)


async def _main(n: int, repeats: int) -> list[float]:
    return [run(n) for _ in range(repeats)]


if __name__ == "__main__":
    import uvloop

    results = uvloop.run(_main(20000, 7))
    import sidecar.proxy

    print(f"inbound glue: min {min(results) * 1e6:.2f} us/request, median "
          f"{sorted(results)[len(results) // 2] * 1e6:.2f} us CPU (sidecar.proxy from {sidecar.proxy.__file__})")
