"""Latency/throughput harness: our sidecar against nginx and HAProxy doing the same work, on loopback.

Shapes (the app is nginx serving /p1k and /p64k; every proxy runs one worker process/thread):

* `baseline`           load -> app
* `inbound-<impl>`     mTLS load (client certificate) -> inbound proxy -> app (keep-alive pool)
* `chain-<impl>`       load -> outbound proxy -> mTLS (keep-alive pool) -> inbound proxy -> app
* `chain-jwt-sidecar`  the chain with a step-up on every request: checkout's sidecar attaches a JWT-SVID
                       (FetchJWTSVID, held and renewed), inventory's validates it (cached by token hash)
                       against a rule `jwt: {audience: inventory}`; ours only (the others have no JWT-SVIDs)

impl is `sidecar` (this project), `nginx` or `haproxy`. SVIDs are ECDSA P-256 X.509-SVIDs issued by the
embedded SPIRE (`spiffe-spire run`); our sidecar fetches them over the Workload API, nginx and HAProxy read
the same SVIDs as PEM files. All proxies: TLS 1.3 only, client certificate required and verified against the
trust domain's bundle, keep-alive pools to the next hop, an identity header added towards the app. Only our
sidecar also checks the peer's SPIFFE ID against a policy and writes an audit line per request (nginx and
HAProxy cannot read a URI SAN without scripting): its extra work is part of what is measured.

Loads per shape: open loop (fixed rate, 16 connections, latency from the intended send time) at 500, 1000,
2000 and 5000 req/s; closed loop with 1 and 32 connections; a new connection per request (TLS handshake
cost); 1 KiB responses, plus 64 KiB at 1000 req/s and closed loop 32. Load tools: `wrk` for closed loops
into plain listeners; benchmarks/loadgen.py for everything else (wrk cannot present a client certificate,
wrk2 is not packaged; loadgen's own floor is the `baseline` row). A rotation run (SVID TTL a few seconds)
sends 1000 req/s through our chain and reports errors and latency across rotations.

Per run: achieved rate, p50/p90/p99/p99.9 and the latency added over `baseline` at the same load, CPU seconds
per 1000 requests per proxy process (utime+stime from /proc/<pid>/stat), peak RSS per proxy (VmRSS sampled
every 100 ms), errors. Results: benchmarks/results/<date>-<machine>.{json,md} and PNG plots.

usage: .venv/bin/python benchmarks/harness.py [--quick] [--impl sidecar,nginx,haproxy] [--no-rotation]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
BIN = Path(PY).parent
TOOLS = {"nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk", "h2load": "nghttp2-client"}
TD = "example.org"
INVENTORY = f"spiffe://{TD}/ns/shop/sa/inventory"
CHECKOUT = f"spiffe://{TD}/ns/shop/sa/checkout"
LOADGEN = f"spiffe://{TD}/ns/shop/sa/loadgen"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- tools -----------------------------------------------------------------------------------------------


def ensure_tools() -> None:
    missing = [pkg for name, pkg in TOOLS.items()
               if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    if not missing:
        return
    cmd = ["apt-get", "install", "-y", *missing]
    if os.geteuid() != 0:
        sys.exit(f"missing tools; run: sudo apt-get update && sudo {' '.join(cmd)}")
    log(f"installing missing load tools / reference proxies: apt-get update && {' '.join(cmd)}")
    subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening after {timeout}s")


# -- processes and /proc ---------------------------------------------------------------------------------


def proc_tree(pid: int) -> list[int]:
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as fh:
                for child in fh.read().split():
                    pids.extend(proc_tree(int(child)))
    return sorted(set(pids))


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
    return total / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/statm") as fh:
            total += int(fh.read().split()[1]) * PAGE
    return total


@dataclass
class Proxy:
    """A running proxy process (our sidecar, or an nginx/haproxy master with its workers)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int | None = None

    @property
    def pids(self) -> list[int]:
        return proc_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Sampler:
    """Peak RSS of a set of proxies, sampled every 100 ms in a thread while a load runs."""

    def __init__(self, proxies: list[Proxy]) -> None:
        self.pids = {p.name: p.pids for p in proxies}
        self.peak = dict.fromkeys(self.pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for name, pids in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_bytes(pids))

    def __enter__(self) -> Sampler:
        for name, pids in self.pids.items():
            self.peak[name] = rss_bytes(pids)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the world: SPIRE, SVIDs, the app ---------------------------------------------------------------------


@dataclass
class World:
    d: Path
    quick: bool
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    app_port: int = 0

    def spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        out = open(self.d / f"{name}.log", "ab")  # noqa: SIM115 (owned by the process for its lifetime)
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=self.d)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def start_spire(w: World, name: str, ttl: str) -> Path:
    sock_dir = w.d / name
    sock_dir.mkdir()
    entries = w.d / f"{name}-entries.yaml"
    entries.write_text(
        f"trust_domain: {TD}\nsvid_ttl: {ttl}\nca_ttl: 24h\nentries:\n"
        f"  - spiffe_id: {INVENTORY}\n    socket: inventory.sock\n    dns_names: [localhost]\n"
        f"  - spiffe_id: {CHECKOUT}\n    socket: checkout.sock\n"
        f"  - spiffe_id: {LOADGEN}\n    socket: loadgen.sock\n    ttl: 1h\n"
    )
    proc = w.spawn([str(BIN / "spiffe-spire"), "run", "--entries", str(entries), "--socket-dir", str(sock_dir),
                    "--log-level", "WARNING"], name)
    deadline = time.monotonic() + 30
    while not (sock_dir / "loadgen.sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"spiffe-spire did not start; see {w.d / name}.log")
        time.sleep(0.05)
    return sock_dir


def fetch_pems(sock_dir: Path, out: Path) -> None:
    """Write <who>.pem (chain), <who>.key, <who>.combined.pem (HAProxy) and bundle.pem from the Workload API."""
    from cryptography.hazmat.primitives import serialization
    from spiffe import WorkloadApiClient

    for who in ("inventory", "checkout", "loadgen"):
        client = WorkloadApiClient(f"unix://{sock_dir / (who + '.sock')}")
        try:
            ctx = client.fetch_x509_context()
        finally:
            client.close()
        svid = ctx.default_svid
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
        key = svid.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        (out / f"{who}.pem").write_bytes(chain)
        (out / f"{who}.key").write_bytes(key)
        (out / f"{who}.key").chmod(0o600)
        (out / f"{who}.combined.pem").write_bytes(chain + key)
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert bundle is not None
        (out / "bundle.pem").write_bytes(
            b"".join(a.public_bytes(serialization.Encoding.PEM) for a in bundle.x509_authorities))


NGINX_COMMON = """worker_processes 1;
daemon off;
{user}
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;
events {{ worker_connections 16384; }}
worker_rlimit_nofile 40000;
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 65s;
  client_body_temp_path {d}/tmp-{name}-body;
  proxy_temp_path {d}/tmp-{name}-proxy;
  fastcgi_temp_path {d}/tmp-{name}-fcgi;
  uwsgi_temp_path {d}/tmp-{name}-uwsgi;
  scgi_temp_path {d}/tmp-{name}-scgi;
  {body}
}}
"""


def start_nginx(w: World, name: str, body: str, port: int) -> Proxy:
    user = "user root;" if os.geteuid() == 0 else ""
    conf = w.d / f"{name}.nginx.conf"
    conf.write_text(NGINX_COMMON.format(d=w.d, name=name, body=body, user=user))
    proc = w.spawn([tool("nginx"), "-p", str(w.d), "-e", str(w.d / f"{name}.error.log"), "-c", str(conf)], name)
    wait_port(port, proc)
    return Proxy(name, proc, port)


def start_app(w: World) -> Proxy:
    www = w.d / "www"
    www.mkdir()
    (www / "p1k").write_bytes(b"x" * 1024)
    (www / "p64k").write_bytes(b"y" * 65536)
    port = free_port()
    w.app_port = port
    body = f"server {{ listen 127.0.0.1:{port} backlog=4096; root {www}; location / {{ }} }}"
    return start_nginx(w, "app", body, port)


# -- proxies under test ------------------------------------------------------------------------------------

TLS13 = "TLSv1.3"


def nginx_inbound(w: World) -> Proxy:
    port = free_port()
    d = w.d
    body = f"""
  upstream app {{ server 127.0.0.1:{w.app_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} ssl backlog=4096;
    ssl_protocols {TLS13};
    ssl_certificate {d}/inventory.pem;
    ssl_certificate_key {d}/inventory.key;
    ssl_client_certificate {d}/bundle.pem;
    ssl_verify_client on;
    ssl_verify_depth 3;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-Client-Cert "By={INVENTORY};Hash=$ssl_client_fingerprint;Subject=$ssl_client_s_dn";
    }}
  }}"""
    return start_nginx(w, "inbound-nginx", body, port)


def nginx_outbound(w: World, inbound_port: int) -> Proxy:
    port = free_port()
    d = w.d
    body = f"""
  upstream peer {{ server 127.0.0.1:{inbound_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass https://peer;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_protocols {TLS13};
      proxy_ssl_certificate {d}/checkout.pem;
      proxy_ssl_certificate_key {d}/checkout.key;
      proxy_ssl_trusted_certificate {d}/bundle.pem;
      proxy_ssl_verify on;
      proxy_ssl_verify_depth 3;
      proxy_ssl_name localhost;
      proxy_ssl_session_reuse on;
    }}
  }}"""
    return start_nginx(w, "outbound-nginx", body, port)


HAPROXY_COMMON = """global
  nbthread 1
  maxconn 8000
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  option http-keep-alive
  http-reuse always
  maxconn 8000
{body}
"""


def start_haproxy(w: World, name: str, body: str, port: int) -> Proxy:
    conf = w.d / f"{name}.haproxy.cfg"
    conf.write_text(HAPROXY_COMMON.format(body=body))
    proc = w.spawn([tool("haproxy"), "-db", "-f", str(conf)], name)
    wait_port(port, proc)
    return Proxy(name, proc, port)


def haproxy_inbound(w: World) -> Proxy:
    port = free_port()
    d = w.d
    body = f"""frontend in
  bind 127.0.0.1:{port} ssl crt {d}/inventory.combined.pem ca-file {d}/bundle.pem verify required
  http-request set-header X-Forwarded-Client-Cert "By={INVENTORY};Hash=%[ssl_c_sha1,hex];Subject=%[ssl_c_s_dn]"
  default_backend app
backend app
  server app 127.0.0.1:{w.app_port} pool-max-conn 64
"""
    return start_haproxy(w, "inbound-haproxy", body, port)


def haproxy_outbound(w: World, inbound_port: int) -> Proxy:
    port = free_port()
    d = w.d
    body = f"""frontend out
  bind 127.0.0.1:{port}
  default_backend peer
backend peer
  server inb 127.0.0.1:{inbound_port} ssl crt {d}/checkout.combined.pem ca-file {d}/bundle.pem \
verify required verifyhost localhost sni str(localhost) pool-max-conn 64
"""
    return start_haproxy(w, "outbound-haproxy", body, port)


def sidecar_config(w: World, name: str, sock_dir: Path, who: str, extra: str) -> tuple[Path, int]:
    admin = free_port()
    conf = w.d / f"{name}.yaml"
    conf.write_text(
        f'svid_source:\n  workload_api:\n    socket: "unix://{sock_dir / (who + ".sock")}"\n'
        f'admin:\n  listen: "127.0.0.1:{admin}"\n'
        f'audit:\n  path: "{w.d / (name + ".audit.log")}"\n'
        f"log_level: warning\n{extra}"
    )
    return conf, admin


def start_sidecar(w: World, name: str, conf: Path, port: int, admin: int) -> Proxy:
    proc = w.spawn([str(BIN / "spiffe-sidecar"), "run", "-c", str(conf)], name)
    wait_port(port, proc)
    # Ready = an SVID is held and listeners are bound.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
            if r.status == 200:
                break
        time.sleep(0.1)
    return Proxy(name, proc, port, admin)


POLICY = f"""    rules:
      - name: clients-read
        action: allow
        methods: [GET]
        paths: ["/p1k", "/p64k", "/api/stock/*"]
        callers: ["{CHECKOUT}", "{LOADGEN}"]
      - name: no-admin
        action: deny
        paths: ["/admin/**"]
        callers: ["*"]
"""


JWT_POLICY = f"""    rules:
      - name: clients-read-with-token
        action: allow
        methods: [GET]
        paths: ["/p1k", "/p64k", "/api/stock/*"]
        callers: ["{CHECKOUT}"]
        jwt: {{audience: inventory}}
"""


def sidecar_inbound(w: World, sock_dir: Path, tag: str = "", policy: str = POLICY) -> Proxy:
    port = free_port()
    extra = (f'inbound:\n  listen: "127.0.0.1:{port}"\n  app: "127.0.0.1:{w.app_port}"\n  mode: http\n'
             f"  policy:\n{policy}")
    conf, admin = sidecar_config(w, f"inbound-sidecar{tag}", sock_dir, "inventory", extra)
    return start_sidecar(w, f"inbound-sidecar{tag}", conf, port, admin)


def sidecar_outbound(w: World, sock_dir: Path, inbound_port: int, tag: str = "", jwt: bool = False) -> Proxy:
    port = free_port()
    # The checkout pod's own inbound listener is required by the config; it idles during the run.
    extra = (f'inbound:\n  listen: "127.0.0.1:{free_port()}"\n  app: "127.0.0.1:{w.app_port}"\n'
             f'  policy:\n    rules: []\n'
             f'outbound:\n  - name: inventory\n    listen: "127.0.0.1:{port}"\n'
             f'    target: "127.0.0.1:{inbound_port}"\n    expect: "{INVENTORY}"\n    mode: http\n'
             + ("    jwt: {audience: inventory}\n" if jwt else ""))
    conf, admin = sidecar_config(w, f"outbound-sidecar{tag}", sock_dir, "checkout", extra)
    return start_sidecar(w, f"outbound-sidecar{tag}", conf, port, admin)


# -- loads -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    name: str
    kind: str  # open | closed | newconn
    conns: int
    rate: float = 0.0
    path: str = "/p1k"


def loads(quick: bool) -> list[Load]:
    if quick:
        return [Load("open-1000", "open", 16, 1000), Load("open-2000", "open", 16, 2000),
                Load("closed-32", "closed", 32), Load("newconn", "newconn", 8)]
    return [
        Load("open-500", "open", 16, 500),
        Load("open-1000", "open", 16, 1000),
        Load("open-2000", "open", 16, 2000),
        Load("open-5000", "open", 16, 5000),
        Load("closed-1", "closed", 1),
        Load("closed-32", "closed", 32),
        Load("newconn", "newconn", 8),
        Load("open-1000-64k", "open", 16, 1000, "/p64k"),
        Load("closed-32-64k", "closed", 32, 0, "/p64k"),
    ]


def run_wrk(port: int, load: Load, secs: float) -> dict[str, Any]:
    """wrk closed loop (plain HTTP only); percentiles from its --latency distribution."""
    args = [tool("wrk"), "-t1", f"-c{load.conns}", f"-d{max(1, round(secs))}s", "--latency", "-H", "Host: app",
            f"http://127.0.0.1:{port}{load.path}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=secs + 30).stdout
    res: dict[str, Any] = {"tool": "wrk", "mode": "closed", "conns": load.conns, "path": load.path,
                           "duration_s": secs, "errors": 0, "latency_ms": {}}
    unit = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def ms(text: str) -> float:
        for u in ("us", "ms", "s"):
            if text.endswith(u):
                return round(float(text[: -len(u)]) * unit[u], 4)
        return float(text)

    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "90%", "99%"):
            res["latency_ms"]["p" + parts[0][:-1]] = ms(parts[1])
        elif line.startswith("Requests/sec:"):
            res["achieved_rps"] = float(parts[1])
        elif "requests in" in line:
            res["completed"] = int(parts[0])
        elif line.strip().startswith("Non-2xx") or line.strip().startswith("Socket errors"):
            res["errors"] += sum(int(x.strip(",")) for x in parts if x.strip(",").isdigit())
    res["latency_ms"].setdefault("p99.9", None)
    return res


def run_loadgen(port: int, load: Load, secs: float, warmup: float, tls_dir: Path | None) -> dict[str, Any]:
    args = [PY, str(HERE / "loadgen.py"), "--port", str(port), "--mode", load.kind, "--conns", str(load.conns),
            "--duration", str(secs), "--warmup", str(warmup), "--path", load.path, "--rate", str(load.rate or 1)]
    if tls_dir is not None:
        args += ["--tls", "--cert", str(tls_dir / "loadgen.pem"), "--key", str(tls_dir / "loadgen.key"),
                 "--ca", str(tls_dir / "bundle.pem")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=warmup + secs + 60)
    if out.returncode != 0:
        return {"tool": "loadgen", "failed": out.stderr[-2000:], "errors": -1}
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def measure(proxies: list[Proxy], port: int, load: Load, tls_dir: Path | None, secs: float, warmup: float,
            use_wrk: bool) -> dict[str, Any]:
    pids = {p.name: p.pids for p in proxies}
    cpu0 = {name: cpu_seconds(ps) for name, ps in pids.items()}
    with Sampler(proxies) as sampler:
        if use_wrk and load.kind == "closed" and tls_dir is None:
            res = run_wrk(port, load, secs)
        else:
            res = run_loadgen(port, load, secs, warmup, tls_dir)
    cpu1 = {name: cpu_seconds(ps) for name, ps in pids.items()}
    completed = max(1, int(res.get("completed") or 0))
    # wrk has no warm-up: its CPU window is its whole run; loadgen's includes the warm-up requests too.
    wall_requests = completed * ((secs + (0 if res.get("tool") == "wrk" else warmup)) / secs)
    res["proxies"] = {
        name: {
            "cpu_s_per_1000_req": round((cpu1[name] - cpu0[name]) / wall_requests * 1000, 4),
            "cpu_cores": round((cpu1[name] - cpu0[name]) / (secs + warmup), 3),
            "peak_rss_mb": round(sampler.peak[name] / 2**20, 1),
        }
        for name in pids
    }
    return res


PROFILE_DIR: Path | None = None


def profile(proxies: list[Proxy], shape: str, load: str, secs: float) -> list[subprocess.Popen[bytes]]:
    """py-spy flame graphs (SVG) and collapsed stacks of each sidecar process while the load runs."""
    assert PROFILE_DIR is not None
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    procs = []
    for p in proxies:
        for fmt, ext in (("flamegraph", "svg"), ("raw", "txt")):
            out = PROFILE_DIR / f"{shape}-{load}-{p.name.split('-')[0]}.{ext}"
            procs.append(subprocess.Popen([spy, "record", "-p", str(p.proc.pid), "-d", str(int(secs)), "-r", "250",
                                           "-f", fmt, "-o", str(out), "--nonblocking"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.3)
    return procs


# -- the matrix --------------------------------------------------------------------------------------------


def run_shape(w: World, shape: str, proxies: list[Proxy], port: int, tls_dir: Path | None, quick: bool,
              results: dict[str, Any]) -> None:
    secs, warmup = (3.0, 0.5) if quick else (8.0, 1.0)
    time.sleep(0.5)
    idle = {p.name: round(rss_bytes(p.pids) / 2**20, 1) for p in proxies}
    cpu0 = {p.name: cpu_seconds(p.pids) for p in proxies}
    time.sleep(2.0)  # idle CPU: timers, pollers, the SVID source's thread
    idle_cpu = {p.name: round((cpu_seconds(p.pids) - cpu0[p.name]) / 2.0, 4) for p in proxies}
    entry: dict[str, Any] = {"idle_rss_mb": idle, "idle_cpu_cores": idle_cpu, "loads": {}}
    for load in loads(quick):
        if load.kind == "newconn" and shape.startswith("chain"):
            continue  # the chain's outbound side pools its mTLS connections: no handshake per request
        spy = None
        if PROFILE_DIR is not None and shape.endswith("-sidecar") and load.name in ("open-2000", "closed-32"):
            spy = profile(proxies, shape, load.name, secs + warmup)
        res = measure(proxies, port, load, tls_dir, secs, warmup, use_wrk=True)
        for proc in spy or []:
            proc.wait(30)
        entry["loads"][load.name] = res
        lat = res.get("latency_ms", {})
        log(f"{shape:18s} {load.name:14s} {res.get('achieved_rps', 0):>9} req/s  p50 {lat.get('p50')} "
            f"p99 {lat.get('p99')} ms  errors {res.get('errors')}  "
            + "  ".join(f"{n}: {v['cpu_s_per_1000_req']} cpu-s/1k {v['peak_rss_mb']} MB"
                        for n, v in res["proxies"].items()))
    if shape == "baseline":  # the Python generator's own closed-loop ceiling (plain HTTP), next to wrk's
        for n in (1, 32):
            res = measure(proxies, port, Load(f"closed-{n}", "closed", n), None, secs, warmup, use_wrk=False)
            entry["loads"][f"closed-{n}-loadgen"] = res
            log(f"{shape:18s} closed-{n}-loadgen {res.get('achieved_rps', 0):>9} req/s  "
                f"p50 {res['latency_ms'].get('p50')} ms")
    entry["after_rss_mb"] = {p.name: round(rss_bytes(p.pids) / 2**20, 1) for p in proxies}
    results["shapes"][shape] = entry


def rotation_run(w: World, quick: bool, results: dict[str, Any]) -> None:
    """Our chain under 1000 req/s while the embedded SPIRE rotates both sidecars' SVIDs every ~2 s."""
    sock_dir = start_spire(w, "spire-rot", "4s")
    fetch_pems(sock_dir, w.d / "rot")
    inbound = sidecar_inbound(w, sock_dir, "-rot")
    outbound = sidecar_outbound(w, sock_dir, inbound.port, "-rot")
    secs = 8.0 if quick else 20.0
    expiries: set[str] = set()
    stop = threading.Event()

    def watch() -> None:  # distinct SVID expiry times seen on the inbound sidecar's /metrics
        while not stop.wait(0.25):
            with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{inbound.admin_port}/metrics", timeout=1
            ) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("spiffe_sidecar_svid_expiry_timestamp_seconds"):
                        expiries.add(line.split()[-1])

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        res = measure([outbound, inbound], outbound.port, Load("open-1000", "open", 16, 1000), None, secs, 1.0,
                      use_wrk=False)
    finally:
        stop.set()
        t.join()
        outbound.stop()
        inbound.stop()
    res["svid_ttl_s"] = 4
    res["distinct_svids_seen"] = len(expiries)
    results["rotation"] = res
    log(f"rotation: {res.get('achieved_rps')} req/s, errors {res.get('errors')}, SVIDs seen {len(expiries)}, "
        f"p50 {res.get('latency_ms', {}).get('p50')} p99 {res.get('latency_ms', {}).get('p99')} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description="spiffe-sidecar latency/throughput benchmark (loopback only)")
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer loads, 3 s each")
    ap.add_argument("--impl", default="sidecar,nginx,haproxy", help="comma-separated proxies to compare")
    ap.add_argument("--shapes", default="inbound,chain,chain-jwt",
                    help="inbound,chain,chain-jwt (baseline always runs; chain-jwt: our sidecar only)")
    ap.add_argument("--no-rotation", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    ap.add_argument("--profile", metavar="DIR", help="py-spy flame graphs of our sidecars into DIR")
    a = ap.parse_args()
    if a.profile:
        global PROFILE_DIR
        PROFILE_DIR = Path(a.profile)
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    ensure_tools()
    impls = [x for x in a.impl.split(",") if x]
    shapes = [x for x in a.shapes.split(",") if x]
    d = Path(tempfile.mkdtemp(prefix="spiffe-bench-"))
    w = World(d, a.quick)
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "python": platform.python_version(),
        "quick": a.quick,
        "tools": {t: tool(t) for t in TOOLS},
        "shapes": {},
    }
    try:
        sock_dir = start_spire(w, "spire", "1h")
        fetch_pems(sock_dir, d)
        start_app(w)
        log(f"app (nginx) on 127.0.0.1:{w.app_port}; SVIDs from the embedded SPIRE in {d}")
        run_shape(w, "baseline", [], w.app_port, None, a.quick, results)
        # loadgen over mTLS against the app would need a TLS app; its TLS client cost shows in inbound rows.
        makers = {"sidecar": lambda: sidecar_inbound(w, sock_dir), "nginx": lambda: nginx_inbound(w),
                  "haproxy": lambda: haproxy_inbound(w)}
        outs = {"sidecar": lambda p: sidecar_outbound(w, sock_dir, p), "nginx": lambda p: nginx_outbound(w, p),
                "haproxy": lambda p: haproxy_outbound(w, p)}
        for impl in impls:
            if "inbound" in shapes:
                inb = makers[impl]()
                try:
                    run_shape(w, f"inbound-{impl}", [inb], inb.port, d, a.quick, results)
                finally:
                    inb.stop()
            if "chain" in shapes:
                inb = makers[impl]()
                out = outs[impl](inb.port)
                try:
                    run_shape(w, f"chain-{impl}", [out, inb], out.port, None, a.quick, results)
                finally:
                    out.stop()
                    inb.stop()
            if "chain-jwt" in shapes and impl == "sidecar":
                inb = sidecar_inbound(w, sock_dir, "-jwt", JWT_POLICY)
                out = sidecar_outbound(w, sock_dir, inb.port, "-jwt", jwt=True)
                try:
                    run_shape(w, "chain-jwt-sidecar", [out, inb], out.port, None, a.quick, results)
                finally:
                    out.stop()
                    inb.stop()
        if not a.no_rotation and "sidecar" in impls:
            (d / "rot").mkdir()
            rotation_run(w, a.quick, results)
    finally:
        w.close()
        results["loadavg_after"] = os.getloadavg()
        results["wall_s"] = round(time.monotonic() - started, 1)
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    import report

    paths = report.write(results, Path(a.out))
    log("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
