# ruff: noqa: ASYNC230, ASYNC240, SIM115  (a rough script: setup file I/O before serving; superseded by harness.py)
"""Rough data-plane benchmark: app (raw Protocol, fixed 200) <- sidecar InboundServer <- TLS client.
usage: bench.py  (spawns app and sidecar subprocesses, runs client loads in this process)
env: SIDECAR_ROOT=tree to import sidecar/ from (A/B runs); TARGET=relay for the raw relay;
     LOADS=keepalive_32conn,... (default: all three, then openssl s_time); SECS=seconds per load;
     AUDIT_FILE=1 writes the audit through sidecar.audit.open_writer to a file (as `spiffe-sidecar run`
     does) instead of a plain devnull write; NOAUDIT=1 drops audit lines."""

import asyncio
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.pki
sys.path.insert(0, os.environ.get("SIDECAR_ROOT", sys.path[0]))  # a tree whose sidecar/ wins (build/compiled)
import uvloop

RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def run_app(port_file):
    class P(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t
            self.buf = b""

        def data_received(self, d):
            self.buf += d
            while b"\r\n\r\n" in self.buf:
                head, _, self.buf = self.buf.partition(b"\r\n\r\n")
                self.t.write(RESP)
                if b"close" in head.lower():
                    self.t.close()

    async def main():
        srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0)
        Path(port_file).write_text(str(srv.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()

    uvloop.run(main())


def run_sidecar(d, app_port, port_file):
    from sidecar.audit import AuditLog
    from sidecar.config import AuditSettings, HostPort, InboundSettings, Limits, Timeouts
    from sidecar.identity import TrustDomain
    from sidecar.inbound import InboundServer, PolicyRef
    from sidecar.metrics import Metrics
    from sidecar.policy import compile_policy
    from sidecar.svid import X509Bundle, X509Context, X509Svid
    from sidecar.tls import TlsContexts

    async def main():
        svid = X509Svid.from_pem(Path(f"{d}/srv.pem").read_bytes(), Path(f"{d}/srv.key").read_bytes())
        td = TrustDomain.parse("example.org")
        ctx = X509Context((svid,), {td: X509Bundle.from_pem(td, Path(f"{d}/ca.pem").read_bytes())})
        m = Metrics()
        if os.environ.get("AUDIT_FILE"):
            from sidecar.audit import open_writer

            write, _close = open_writer(f"{d}/audit.log")
        else:
            write = open(os.devnull, "w").write
        audit = AuditLog(AuditSettings(), write=write, metrics=m, rng=lambda: 0.0)
        if os.environ.get("NOAUDIT"):

            class _A:
                def decision(self, **kw):
                    pass

            audit = _A()
        pol = compile_policy(
            {
                "rules": [
                    {
                        "name": "all",
                        "action": "allow",
                        "paths": ["/**"],
                        "callers": ["spiffe://example.org/ns/shop/sa/checkout"],
                    }
                ]
            },
            "bench",
        )
        s = InboundServer(
            InboundSettings(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", app_port)),
            timeouts=Timeouts(),
            limits=Limits(),
            tls=TlsContexts(ctx),
            policy=PolicyRef(pol),
            audit=audit,
            metrics=m,
        )
        port = await s.start()
        Path(port_file).write_text(str(port))
        if os.environ.get("PROFILE"):
            import cProfile
            import pstats

            pr = cProfile.Profile()
            pr.enable()
            await asyncio.sleep(6)
            pr.disable()
            pstats.Stats(pr, stream=open("/tmp/dp/bench/prof.txt", "w")).sort_stats("tottime").print_stats(35)
        await asyncio.Event().wait()

    uvloop.run(main())


def run_relay(d, app_port, port_file):
    """Floor: raw TLS relay (no HTTP), one upstream connection per downstream connection."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.load_cert_chain(f"{d}/srv.pem", f"{d}/srv.key")
    sctx.load_verify_locations(f"{d}/ca.pem")

    class Up(asyncio.Protocol):
        def __init__(self, down):
            self.down = down

        def connection_made(self, t):
            self.t = t

        def data_received(self, data):
            self.down.t.write(data)

        def connection_lost(self, exc):
            self.down.t.close()

    class Down(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t
            self.up = None
            self.pend = []
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self):
            _, self.up = await asyncio.get_running_loop().create_connection(lambda: Up(self), "127.0.0.1", app_port)
            for p in self.pend:
                self.up.t.write(p)

        def data_received(self, data):
            if self.up:
                self.up.t.write(data)
            else:
                self.pend.append(data)

        def connection_lost(self, exc):
            if self.up:
                self.up.t.close()

    async def main():
        srv = await asyncio.get_running_loop().create_server(Down, "127.0.0.1", 0, ssl=sctx)
        Path(port_file).write_text(str(srv.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()

    uvloop.run(main())


def client_ctx(d):
    c = ssl.create_default_context(cafile=f"{d}/ca.pem")
    c.check_hostname = False
    c.load_cert_chain(f"{d}/cli.pem", f"{d}/cli.key")
    return c


REQ = b"GET /api/stock/1 HTTP/1.1\r\nHost: inventory\r\n\r\n"


class KA(asyncio.Protocol):
    def __init__(self, stop, counter):
        self.stop = stop
        self.c = counter
        self.buf = b""

    def connection_made(self, t):
        self.t = t
        t.write(REQ)

    def data_received(self, d):
        self.buf += d
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            # responses are fixed-size: head + "ok"
            if len(self.buf) < i + 4 + 2:
                return
            self.buf = self.buf[i + 6 :]
            self.c[0] += 1
            if time.monotonic() < self.stop:
                self.t.write(REQ)
            else:
                self.t.close()
                return


async def keepalive(port, ctx, conns, secs):
    loop = asyncio.get_running_loop()
    c = [0]
    stop = time.monotonic() + secs
    for _ in range(conns):
        await loop.create_connection(lambda: KA(stop, c), "127.0.0.1", port, ssl=ctx)
    await asyncio.sleep(secs + 0.2)
    return c[0] / secs


async def newconn(port, ctx, workers, secs):
    c = [0]
    stop = time.monotonic() + secs

    async def w():
        while time.monotonic() < stop:
            r, wr = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            wr.write(REQ.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            await r.read()
            wr.close()
            c[0] += 1

    await asyncio.gather(*(w() for _ in range(workers)))
    return c[0] / secs


def main():
    if sys.argv[1:2] == ["app"]:
        return run_app(sys.argv[2])
    if sys.argv[1:2] == ["sidecar"]:
        return run_sidecar(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    if sys.argv[1:2] == ["relay"]:
        return run_relay(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    from tests.pki import CA

    d = tempfile.mkdtemp()
    root = CA.root("example.org")
    srv = root.leaf("spiffe://example.org/ns/shop/sa/inventory")
    cli = root.leaf("spiffe://example.org/ns/shop/sa/checkout")
    for n, b in [
        ("srv.pem", srv.chain_pem()),
        ("srv.key", srv.key_pem()),
        ("cli.pem", cli.chain_pem()),
        ("cli.key", cli.key_pem()),
        ("ca.pem", root.bundle_pem()),
    ]:
        Path(f"{d}/{n}").write_bytes(b)
    py = sys.executable
    app = subprocess.Popen([py, __file__, "app", f"{d}/app.port"])
    while not os.path.exists(f"{d}/app.port") or not Path(f"{d}/app.port").read_text():
        time.sleep(0.05)
    app_port = int(Path(f"{d}/app.port").read_text())
    sc = subprocess.Popen([py, __file__, os.environ.get("TARGET", "sidecar"), d, str(app_port), f"{d}/sc.port"])
    while not os.path.exists(f"{d}/sc.port") or not Path(f"{d}/sc.port").read_text():
        time.sleep(0.05)
    port = int(Path(f"{d}/sc.port").read_text())
    ctx = client_ctx(d)
    try:
        res = {}

        def cpu():
            f = Path(f"/proc/{sc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

        wanted = [x for x in os.environ.get("LOADS", "").split(",") if x]
        secs_env = float(os.environ.get("SECS", "0"))
        loads = [
            ("keepalive_32conn", 32, 5),
            ("keepalive_1conn", 1, 3),
            ("new_tls_conn_per_req_8workers", 8, 5),
        ]
        for name, conns, default_secs in loads:
            if wanted and name not in wanted:
                continue
            secs = secs_env or default_secs
            run = newconn if name.startswith("new") else keepalive
            c0 = cpu()
            rate = uvloop.run(run(port, ctx, conns, secs))
            c1 = cpu()
            res[name] = {
                "req_s": round(rate),
                "sidecar_cpu_frac": round((c1 - c0) / secs, 2),
                "sidecar_cpu_us_per_req": round((c1 - c0) / (rate * secs) * 1e6),
            }
        print(json.dumps(res, indent=1))
        if wanted:
            return
        r = subprocess.run(
            [
                "openssl",
                "s_time",
                "-connect",
                f"127.0.0.1:{port}",
                "-new",
                "-time",
                "5",
                "-cert",
                f"{d}/cli.pem",
                "-key",
                f"{d}/cli.key",
                "-CAfile",
                f"{d}/ca.pem",
            ],
            capture_output=True,
            text=True,
        )
        print([line for line in r.stdout.splitlines() if "connections" in line])
    finally:
        app.terminate()
        sc.terminate()


main()
