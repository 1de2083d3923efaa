"""Hostile input (issue 7.3) against the real inbound listener on loopback, plus hypothesis fuzzing of the
pure pieces an attacker's bytes reach (HTTP head path, policy compiler).

Only what tests/integration/test_inbound.py does not cover already is here: smuggling, oversized headers,
body caps, malformed chunks, NUL, pipelining, no/untrusted/foreign/expired/CA/two-URI client certificates
live there (the threat model points at both). Path normalisation, SPIFFE ID and annotation fuzzing live in
tests/unit/test_policy.py, test_identity.py and test_annotations.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import ssl
import string
import time
from pathlib import Path
from typing import Any, cast

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import Limits, Timeouts, load_settings
from sidecar.errors import ConfigError
from sidecar.http1 import BadRequest, check_request_headers
from sidecar.policy import Policy, compile_policy, normalize_target
from tests.example import CHECKOUT, INVENTORY, REPORTING, policy_data
from tests.helpers import (
    CHECKOUT_TEST_API,
    App,
    Pki,
    ServerHung,
    Sidecar,
    curl,
    raw_exchange,
    sidecar_with,
    until,
)
from tests.pki import bad_leaf
from tests.processes import FaultyApp, admin_get, curl_as, pem_config, running_sidecar

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]  # uvloop: the transports the sidecar ships with

WAIT = 15.0  # for a condition the sidecar reaches after one of its (short) deadlines


def handshakes_refused(sc: Sidecar) -> float:
    total = 0.0
    for metric in sc.metrics.registry.collect():
        if metric.name == "spiffe_sidecar_handshake_failures":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


# ---------------------------------------------------------------------------------------------------------
# Slow clients and many idle connections: deadlines and limits


async def test_slowloris_byte_at_a_time_head_is_cut_off(pki: Pki, app: App) -> None:
    async with sidecar_with(pki, app, timeouts=Timeouts(handshake=2, request_head=1, idle=1)) as sc:
        head = b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: a\r\n" * 200 + b"\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
        sent = 0
        closed = False
        async with asyncio.timeout(30):
            for byte in head:  # one byte every 20 ms: the whole head would take ~40 s
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                except (ConnectionError, ssl.SSLError):
                    closed = True
                    break
                sent += 1
                if reader.at_eof() or writer.is_closing():
                    closed = True
                    break
                # A poll between bytes: no answer within 20 ms is the expected case; the enclosing 30 s
                # deadline and the `closed` assertion fail the test if the sidecar never cuts it off.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.02):
                        if await reader.read(1) == b"":
                            closed = True
                            break
        writer.close()
        assert closed and sent < len(head), (sent, len(head))
        assert app.seen == []
        await until(lambda: sc.server.open_connections == 0, timeout=WAIT)


async def test_slow_reader_of_a_large_response_is_cut_off(pki: Pki, app: App) -> None:
    """A client that asks for 10 MB and never reads must not pin a connection (and an upstream connection)
    forever: some deadline has to end it."""
    t = Timeouts(handshake=2, request_head=2, idle=2, upstream_connect=1, upstream_response=2, drain=1,
                 write_stall=2)  # fmt: skip
    async with sidecar_with(pki, app, timeouts=t) as sc:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout), limit=1024
        )
        writer.write(b"GET /api/big HTTP/1.1\r\nHost: x\r\n\r\n")
        transport = cast(asyncio.Transport, writer.transport)
        await until(lambda: len(app.seen) == 1, timeout=WAIT)
        transport.pause_reading()  # never read: the kernel buffers fill, then the sidecar's
        # Not a swallowed hang: the assertions below fail it, after the client socket is aborted (so that a
        # failure does not leave the sidecar's connection to be cut at teardown).
        with contextlib.suppress(TimeoutError):
            await until(lambda: sc.server.open_connections == 0, timeout=20)  # idle + response + slack
        still_open = sc.server.open_connections
        pooled_busy = sc.server.pool.size - sc.server.pool.idle_count
        writer.transport.abort()
        assert still_open == 0, f"a non-reading client still holds {still_open} connection(s) after 20 s"
        assert pooled_busy == 0


async def test_thousands_of_idle_connections_are_bounded_and_expire(pki: Pki, app: App) -> None:
    limit = 100
    t = Timeouts(handshake=1, request_head=1, idle=1)
    async with sidecar_with(pki, app, timeouts=t, limits=Limits(max_connections=limit)) as sc:
        socks: list[asyncio.StreamWriter] = []
        peak = 0
        for _ in range(1500):  # plain TCP, never a ClientHello
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", sc.port)
                socks.append(w)
            except OSError:
                pass
            peak = max(peak, sc.server.open_connections)
        # Some with a finished handshake and no request at all.
        tls = []
        for _ in range(20):
            with contextlib.suppress(OSError, ssl.SSLError):
                tls.append(await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout)))
            peak = max(peak, sc.server.open_connections)
        assert peak <= limit
        # Silent sockets meet the (smaller) pending-handshake limit first, completed ones the connection limit.
        hits = sc.metric("spiffe_sidecar_connection_limit_hits_total", listener="inbound") + sc.metric(
            "spiffe_sidecar_handshake_limit_hits_total", listener="inbound"
        )
        assert hits >= 1
        await until(lambda: sc.server.open_connections == 0, timeout=30)  # handshake/head deadlines
        for w in socks:
            w.transport.abort()
        for _r, w in tls:
            w.transport.abort()
        code, _, err = await curl(pki, sc.port, "/api/stock/1", pki.checkout)
        assert code == 200, err
    print(f"\nFIGURES scenario=idle_flood opened={len(socks) + len(tls)} peak_open={peak} limit={limit}")


# ---------------------------------------------------------------------------------------------------------
# Malformed requests not covered by test_inbound


HOSTILE_HEADS = [
    ("raw_invalid_utf8_path", b"GET /api/stock/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("pct_invalid_utf8_path", b"GET /api/stock/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n", {200, 400}),
    ("overlong_utf8_dot", b"GET /api/%c0%ae%c0%ae/admin/x HTTP/1.1\r\nHost: x\r\n\r\n", {400, 403}),
    ("nul_in_header", b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", {400}),
    (
        "absurd_content_length",
        b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        {400},
    ),
    ("negative_content_length", b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", {400}),
    ("plus_content_length", b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", {400}),
    (
        "chunk_size_overflow",
        b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        {400},
    ),
    (
        "chunk_ext_garbage",
        b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;\x00\r\nabc\r\n0\r\n\r\n",
        {400},
    ),
    (
        "bare_lf_headers",
        b"GET /api/stock/1 HTTP/1.1\nHost: x\nX-Forwarded-Client-Cert: URI=spiffe://x/y\n\n",
        {200, 400},
    ),
    ("space_before_colon", b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n", {400}),
    ("http_0_9", b"GET /api/stock/1\r\n\r\n", {400}),
    ("http_2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400}),
    ("backslash_path", b"GET /api\\..\\admin\\x HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("pct_backslash", b"GET /api/%5c../admin/x HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("two_hosts", b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", {400}),
]


@pytest.mark.parametrize(("case", "data", "allowed"), HOSTILE_HEADS, ids=[c[0] for c in HOSTILE_HEADS])
async def test_hostile_request_heads(pki: Pki, app: App, case: str, data: bytes, allowed: set[int]) -> None:
    async with sidecar_with(pki, app) as sc:
        out = await raw_exchange(pki, sc.port, data)
        m = re.match(rb"HTTP/1\.1 (\d{3}) ", out)
        assert m is not None, (case, out[:120])
        status = int(m.group(1))
        assert status in allowed, (case, status, out[:200])
        for seen in app.seen:  # whatever reached the app is clean and carries our identity header only
            assert seen.path.isascii() and "\\" not in seen.path and "/admin" not in seen.path
            assert seen.headers.getall("X-Forwarded-Client-Cert", []) == [
                seen.headers["X-Forwarded-Client-Cert"]
            ] and seen.headers["X-Forwarded-Client-Cert"].endswith("sa/checkout")
        if status >= 400:
            assert app.seen == []
        # the listener is unharmed
        code, _, err = await curl(pki, sc.port, "/api/stock/ok", pki.checkout)
        assert code == 200, err


async def test_a_denied_request_body_never_smuggles_the_next_request(pki: Pki, app: App) -> None:
    """A denied request whose body looks like more requests: the body is never parsed as requests (the
    sidecar answers 403 and closes rather than read a body it will not use)."""
    async with sidecar_with(pki, app) as sc:
        for cl in (34, 39):  # the body is exactly one request head / ends inside the next one
            req = (
                b"POST /admin/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                % cl
                + b"GET /admin/y HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /admin/z HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /api/stock/2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            out = await raw_exchange(pki, sc.port, req)
            statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", out)
            assert statuses[0] == b"403"
            assert b"200" not in statuses
        assert app.seen == []


# ---------------------------------------------------------------------------------------------------------
# TLS: peers test_inbound does not try


MORE_BAD_LEAVES = [
    "root_path_id",
    "no_uri_san",
    "key_cert_sign",
    "crl_sign",
    "no_digital_signature",
    "not_yet_valid",
    "invalid_spiffe_id",
]


@pytest.mark.parametrize("kind", MORE_BAD_LEAVES)
async def test_more_bad_client_certificates_are_refused(pki: Pki, app: App, kind: str) -> None:
    async with sidecar_with(pki, app) as sc:
        code, _, _ = await curl(pki, sc.port, "/api/stock/1", bad_leaf(pki.root, kind))
        assert code == 0
        assert app.seen == []
        await until(lambda: handshakes_refused(sc) >= 1, timeout=WAIT)


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
async def test_old_tls_versions_are_refused(pki: Pki, app: App, version: str) -> None:
    cert, key = pki.files("oldtls", pki.checkout)
    async with sidecar_with(pki, app) as sc:
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{sc.port}", version, "-cipher", "DEFAULT:@SECLEVEL=0",
            "-cert", cert, "-key", key, "-CAfile", pki.ca_file, "-ign_eof",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(20):
            out, err = await proc.communicate(b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert proc.returncode != 0
        assert b"HTTP/1.1" not in out
        assert app.seen == []
        await until(lambda: handshakes_refused(sc) >= 1, timeout=WAIT)
        del err


async def test_garbage_instead_of_a_client_hello(pki: Pki, app: App) -> None:
    async with sidecar_with(pki, app, timeouts=Timeouts(handshake=1)) as sc:
        payloads = [
            os.urandom(517),
            b"\x16\x03\x01\xff\xff" + os.urandom(100),
            b"\x16\x03\x03\x00\x05hello",
            b"\x80\x2e\x01\x00\x02" + os.urandom(44),
        ]  # random, huge record length, short, SSLv2-style
        for p in payloads:
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
            writer.write(p)
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(10):
                    got = await reader.read()
                assert b"HTTP" not in got
            writer.close()
        await until(lambda: handshakes_refused(sc) >= len(payloads), timeout=WAIT)
        await until(lambda: sc.server.open_connections == 0, timeout=WAIT)
        assert app.seen == []


# ---------------------------------------------------------------------------------------------------------
# Hypothesis: the HTTP head path (httptools -> check_request_headers -> normalize_target), in-process


class _Head:
    """Collects a request head the way sidecar.inbound does."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


_tchar = st.sampled_from(list(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"))
_names = st.one_of(
    st.sampled_from(
        [
            b"Host",
            b"Content-Length",
            b"Transfer-Encoding",
            b"Connection",
            b"Upgrade",
            b"Expect",
            b"X-Forwarded-Client-Cert",
            b"TE",
            b"Trailer",
            b"Keep-Alive",
        ]
    ),
    st.text(_tchar, min_size=1, max_size=12).map(str.encode),
    st.binary(min_size=1, max_size=12),
)
_values = st.one_of(
    st.sampled_from(
        [
            b"chunked",
            b"gzip, chunked",
            b"5",
            b"-1",
            b"1, 1",
            b"close",
            b"keep-alive, Upgrade",
            b"websocket",
            b"100-continue",
            b" chunked",
            b"0x10",
            b"99999999999999999999",
        ]
    ),
    st.binary(max_size=24),
)
_targets = st.one_of(
    st.sampled_from(
        [
            b"/",
            b"/api/stock/1",
            b"/admin/x",
            b"*",
            b"http://x/",
            b"/a/../../b",
            b"/%2e%2e/x",
            b"/a%2fb",
            b"/a?b=%00",
            b"//x",
            b"/./admin",
        ]
    ),
    st.binary(min_size=1, max_size=40),
    st.lists(
        st.sampled_from([b"/", b".", b"..", b"%2e", b"%2F", b"%5C", b"a", b"%", b"%zz", b"?", b"#", b"\\"]), max_size=10
    ).map(lambda p: b"/" + b"".join(p)),
)
_methods = st.one_of(
    st.sampled_from([b"GET", b"POST", b"HEAD", b"CONNECT", b"OPTIONS", b"PRI"]), st.binary(min_size=1, max_size=8)
)
_versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b""])


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    line = draw(_methods) + b" " + draw(_targets) + b" " + draw(_versions)
    headers = draw(st.lists(st.tuples(_names, _values), max_size=6))
    sep = draw(st.sampled_from([b"\r\n", b"\n", b"\r\n"]))
    return line + sep + b"".join(n + b": " + v + sep for n, v in headers) + sep


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(request_heads(), st.binary(max_size=200)))
def test_fuzz_request_head_path_accepts_or_rejects_with_a_reason(raw: bytes) -> None:
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass  # head complete, the rest belongs to a tunnel (only after an authorised 101)
    except httptools.HttpParserError as exc:
        assert type(exc).__name__  # rejected by the parser: a 400 with the parser's reason
        return
    if not head.complete:
        return  # incomplete head: the request_head deadline ends it
    try:
        framing = check_request_headers(head.headers, version=parser.get_http_version())
        target = normalize_target(head.url)
    except BadRequest as exc:
        assert exc.reason  # rejected with a reason
        return
    # Accepted: what is matched and forwarded is clean.
    assert framing.content_length is None or framing.content_length >= 0
    assert not (framing.chunked and framing.content_length is not None)
    assert target.path.startswith("/") and target.path.isascii()
    assert "/../" not in target.path + "/" and "/./" not in target.path + "/" and "//" not in target.path
    assert "\\" not in target.path and "\x00" not in target.path
    assert normalize_target(target.forward) == target  # idempotent: the app parses what we matched


# ---------------------------------------------------------------------------------------------------------
# Hypothesis: the policy compiler on arbitrary (YAML-shaped) data


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "allow",
            "deny",
            "audit",
            "enforce",
            "GET",
            "*",
            "**",
            "/api/**",
            "/a/*/b",
            "spiffe://example.org/ns/*",
            "spiffe://example.org/**",
            "spiffe://x",
            "/admin/**",
            "",
            "spiffe://EXAMPLE.org/x",
        ]
    ),
)
_yaml = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(
                st.sampled_from(["rules", "mode", "name", "action", "paths", "methods", "callers"]), st.text(max_size=8)
            ),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=25,
)
_rule = st.fixed_dictionaries(
    {},
    optional={
        "name": _scalars,
        "action": _scalars,
        "paths": st.one_of(_yaml, st.lists(_scalars, max_size=3)),
        "methods": st.one_of(_yaml, st.lists(_scalars, max_size=3)),
        "callers": st.one_of(_yaml, st.lists(_scalars, max_size=3)),
        "mode": _scalars,
        "extra": _scalars,
    },
)
_policy_data = st.one_of(
    _yaml, st.fixed_dictionaries({"rules": st.lists(_rule, max_size=4)}, optional={"mode": _scalars})
)


@settings(max_examples=400, deadline=None)
@given(_policy_data)
def test_fuzz_policy_compiler_compiles_or_lists_problems(data: Any) -> None:
    try:
        policy = compile_policy(data, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems
        assert all(p.where and p.message for p in exc.problems)
        return
    assert isinstance(policy, Policy)
    assert policy.describe()


# ---------------------------------------------------------------------------------------------------------
# Secrets hygiene (issue 7.5) for the running process


def test_admin_binds_loopback_by_default(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text("rules: []\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text('inbound: {listen: "127.0.0.1:0", app: "127.0.0.1:1", policy_file: policy.yaml}\n')
    settings_ = load_settings(cfg, {"SPIFFE_ENDPOINT_SOCKET": "unix:///tmp/x.sock"})
    assert settings_.admin.listen.host == "127.0.0.1"


async def test_no_key_material_in_logs_metrics_config_or_errors_and_no_core_dumps(tmp_path: Path) -> None:
    app = FaultyApp()
    await app.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    # Give the child every chance to dump core: it must lower this itself.
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    try:
        config = pem_config(tmp_path, app.port)
        keys = {n: (tmp_path / n).read_text() for n in ("tls.key", "checkout.key", "reporting.key")}
        async with running_sidecar(config) as sc:
            limits = Path(f"/proc/{sc.proc.pid}/limits").read_text()
            # Error paths: refused peers, a denied request, a bad policy, a rotated key that does not
            # match its certificate (rejected), a 502.
            assert (await curl_as(sc, "reporting", "/admin/x"))[0] == 403
            (sc.dir / "policy.yaml").write_text("rules: [oops")
            other = sc.dir / "checkout.key"
            (sc.dir / "tls.key").write_bytes(other.read_bytes())  # wrong key for tls.crt
            await app.stop()
            assert (await curl_as(sc, "checkout", "/api/stock/1"))[0] in (502, 200)
            # Both bad updates were judged (and logged) before the logs are searched for key material.
            await until(lambda: any("policy reload rejected" in line for line in sc.lines)
                        and any(re.search(r"svid source \S+: rejected", line) for line in sc.lines), timeout=WAIT)
            bodies = [await admin_get(sc, p) for p in ("/metrics", "/config", "/readyz", "/healthz")]
            sc.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await sc.proc.wait()
        everything = "\n".join(sc.lines) + "\n".join(b for _, b in bodies)
        audit = (sc.dir / "audit.log").read_text()
        for key_pem in keys.values():
            body = "".join(key_pem.splitlines()[1:-1])
            for text in (everything, audit):
                assert "PRIVATE KEY" not in text
                assert body[:32] not in text and body[-32:] not in text
        assert any("rejected" in line for line in sc.lines)  # the bad key set was noticed (and not printed)
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4] == "0", f"the sidecar leaves core dumps on (a core holds the SVID key): {core}"
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
        await app.stop()


# --- review of the rebuilt data plane ---------------------------------------------------------------------
# Each test states what the old data plane (cec59bc) did; each failed on the rebuilt one until its fix
# (the fast path's method set, head room and Upgrade check; the head deadline re-armed at a request's first
# byte; the readers' exact freshness and poisoned connections).


class _ByteApp:
    """The app at byte level: what it received is kept raw and as parsed by httptools, the way a typical
    server parses it, and every request is answered `answer` as soon as its head is complete, without
    reading the body first (Go, aiohttp and Node handlers may answer a GET without reading its body; the
    server then takes the body per its own framing)."""

    def __init__(self, answer: bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok") -> None:
        self.answer = answer
        self.raw = b""
        self.requests: list[tuple[bytes, bytes, dict[bytes, bytes]]] = []  # method, target, fields (lower)
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> _ByteApp:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def app(self) -> App:
        return App(port=self.port)

    def seen(self, target: bytes) -> list[dict[bytes, bytes]]:
        return [fields for _m, t, fields in self.requests if t == target]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        app = self
        head: dict[str, Any] = {}

        class Callbacks:
            def on_message_begin(self) -> None:
                head.update(url=b"", fields={})

            def on_url(self, url: bytes) -> None:
                head["url"] += url

            def on_header(self, name: bytes, value: bytes) -> None:
                head["fields"][name.lower()] = value

            def on_headers_complete(self) -> None:
                app.requests.append((parser.get_method(), head["url"], head["fields"]))
                writer.write(app.answer)

        parser = httptools.HttpRequestParser(Callbacks())
        with contextlib.suppress(httptools.HttpParserError, ConnectionError):
            while data := await reader.read(65536):
                self.raw += data
                parser.feed_data(data)
        writer.close()


async def _response(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(5):
        return await reader.readuntil(b"\r\n\r\nok")


async def _until_closed(reader: asyncio.StreamReader, seconds: float = 3.0) -> bytes:
    """What the sidecar sends until it closes. Every caller expects a close (after a 400, a 431, an
    Upgrade the app declined): a connection still open after `seconds` fails the test (`ServerHung`), so a
    hang never passes as a close (issue 10 #13)."""
    out = b""
    try:
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                out += chunk
    except TimeoutError:
        raise ServerHung(f"the sidecar did not close within {seconds}s; received {out[:300]!r}") from None
    except (ConnectionError, ssl.SSLError):
        pass  # a reset or an unclean TLS close is a close
    return out


async def test_review_a_head_split_across_reads_never_takes_another_heads_framing(pki: Pki) -> None:
    """The caller's request B starts in one read (after a complete request A) and ends in the next, which
    begins with B's method name inside a field value. Until a94534e the reader took the field block of B as
    "the bytes after the first CRLF of that read" and looked it up in the RequestHeads cache: it found A's
    (bodiless) head, so B's body, a complete request with a forged XFCC, reached the app as a request of
    its own. The old data plane (cec59bc) forwarded B with `content-length` and that body, as now."""
    smuggled = (
        b"DELETE /admin/users HTTP/1.1\r\nHost: y\r\n"
        b"x-forwarded-client-cert: By=" + INVENTORY.encode() + b";URI=spiffe://example.org/ns/shop/sa/admin\r\n\r\n"
    )
    a = b"GET /api/a HTTP/1.1\r\nHost: y\r\n\r\n"  # caches the field block "Host: y\r\n" (no body)
    async with _ByteApp() as byte_app, sidecar_with(pki, byte_app.app) as sc:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
        writer.write(a)
        await _response(reader)
        writer.write(a + b"POST /api/b HTTP/1.1\r\nContent-Length: %d\r\nX-A: " % len(smuggled))
        await _response(reader)  # A answered: the next read is B's rest, on its own
        writer.write(b"POST\r\nHost: y\r\n\r\n" + smuggled)
        await _response(reader)
        await asyncio.sleep(0.3)
        writer.close()
    assert [(m, t) for m, t, _ in byte_app.requests] == [(b"GET", b"/api/a")] * 2 + [(b"POST", b"/api/b")]
    assert byte_app.seen(b"/api/b")[0][b"content-length"] == b"%d" % len(smuggled)
    assert [line["path"] for line in sc.audit_lines] == ["/api/a", "/api/a", "/api/b"]


async def test_review_a_split_head_never_changes_another_callers_request(pki: Pki) -> None:
    """Same split as above, but the field block after the split is not cached yet: until a94534e it was
    cached with the fields and framing of the whole head, and every later request with that field block,
    from any caller, was forwarded with the attacker's fields (here `x-injected` and `content-length: 5`)."""
    reporting_api: dict[str, object] = {"name": "reporting-api", "action": "allow", "methods": ["GET"],
                                        "paths": ["/api/**"], "callers": [REPORTING]}  # fmt: skip
    policy = policy_data(CHECKOUT_TEST_API, reporting_api)
    victim = b"GET /api/stock/1 HTTP/1.1\r\nHost: y\r\nUser-Agent: victim/1.0\r\n\r\n"
    async with _ByteApp() as byte_app, sidecar_with(pki, byte_app.app, policy=policy) as sc:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
        writer.write(b"GET /api/a HTTP/1.1\r\nHost: y\r\n\r\n"
                     b"GET /api/p HTTP/1.1\r\nX-Injected: attacker\r\nContent-Length: 5\r\nX-A: ")
        await _response(reader)
        writer.write(b"GET\r\nHost: y\r\nUser-Agent: victim/1.0\r\n\r\n12345")
        await _response(reader)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.reporting))
        writer.write(victim)
        await _response(reader)
        writer.close()
    fields = byte_app.seen(b"/api/stock/1")[0]
    assert b"x-injected" not in fields and b"content-length" not in fields, fields
    assert fields[b"x-forwarded-client-cert"].endswith(REPORTING.encode())


ANY_METHOD_BUT_DELETE = {"rules": [
    {"name": "no-delete", "action": "deny", "methods": ["DELETE"], "paths": ["/api/**"], "callers": [CHECKOUT]},
    {"name": "checkout-api", "action": "allow", "paths": ["/api/**"], "callers": [CHECKOUT]},
]}  # fmt: skip


@pytest.mark.parametrize("method", [b"delete", b"connect", b"FOO"])
async def test_review_the_fast_path_refuses_methods_the_parser_refuses(pki: Pki, method: bytes) -> None:
    """A whole request in one read whose field block is cached takes `_whole_request`; its method is only
    checked against RFC 9110's token syntax, where llhttp (the full path, and the old data plane) accepts
    only the methods it knows, in upper case: 400, nothing forwarded."""
    async with _ByteApp() as byte_app, sidecar_with(pki, byte_app.app, policy=ANY_METHOD_BUT_DELETE) as sc:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: y\r\n\r\n")  # caches the field block
        await _response(reader)
        writer.write(method + b" /api/x HTTP/1.1\r\nHost: y\r\n\r\n")
        out = await _until_closed(reader)
        writer.close()
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert method + b" /api/x" not in byte_app.raw
    assert [line["method"] for line in sc.audit_lines] == ["GET"]


async def test_review_the_fast_path_keeps_the_head_size_limit(pki: Pki) -> None:
    """The head room (max_request_line_bytes + max_header_bytes of raw bytes) holds for the whole head;
    the full path refuses a head over it with 431. The fast path checks the request line alone, so a field
    block the full path accepted with a short request line passes with a long one."""
    limits = Limits(max_request_line_bytes=64, max_header_bytes=100)  # head room 164 raw bytes
    fields = b"Host: y\r\nX-Pad:" + b" " * 100 + b"a\r\n"  # 118 raw bytes, 19 counted as fields
    async with _ByteApp() as byte_app, sidecar_with(pki, byte_app.app, limits=limits) as sc:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
        writer.write(b"GET /api/stock/1 HTTP/1.1\r\n" + fields + b"\r\n")  # 147 bytes: accepted, cached
        await _response(reader)
        line = b"GET /api/stock/" + b"1" * 40 + b" HTTP/1.1"  # 64 bytes: 186 in all
        writer.write(line + b"\r\n" + fields + b"\r\n")
        out = await _until_closed(reader)
        writer.close()
    assert out.startswith(b"HTTP/1.1 431 "), out
    assert len(byte_app.requests) == 1


async def test_review_an_upgrade_request_on_the_fast_path_stops_reading_like_the_full_path(pki: Pki) -> None:
    """After an Upgrade request the full path (and the old data plane) reads nothing more from the caller
    until the app answers: what follows belongs to the tunnel; when the app declines (no 101) the
    connection closes after its answer. On the fast path (the same head, cached, whole in one read) the
    reader keeps going, so bytes sent for the tunnel are parsed and forwarded as requests."""
    upgrade = b"GET /api/ws HTTP/1.1\r\nHost: y\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    async with _ByteApp() as byte_app, sidecar_with(pki, byte_app.app) as sc:  # the app never switches
        for _ in range(2):  # the first caches the head (full path), the second takes the fast path
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
            writer.write(upgrade)
            await _response(reader)
            writer.write(b"GET /api/after HTTP/1.1\r\nHost: y\r\n\r\n")
            rest = await _until_closed(reader)
            writer.close()
            assert rest == b""
    assert byte_app.seen(b"/api/after") == []


async def test_review_the_head_deadline_runs_from_the_first_byte_of_every_request(pki: Pki) -> None:
    """README/threat model: deadlines on the request head. The old data plane armed `request_head` at the
    first byte of each request; the new one arms it only for the first request of a connection, so a
    second head can dribble for `idle` (60 s by default) instead of `request_head` (10 s)."""
    t = Timeouts(handshake=3, request_head=1, idle=8, upstream_connect=1, upstream_response=5, drain=5)
    async with _ByteApp() as byte_app, sidecar_with(pki, byte_app.app, timeouts=t) as sc:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
        writer.write(b"GET /api/stock/1 HTTP/1.1\r\nHost: y\r\n\r\n")
        await _response(reader)
        writer.write(b"GET /api/stock/2 HTTP/1.1\r\nHo")  # and nothing more
        started = time.monotonic()
        # Not a swallowed hang: a read still waiting after 6 s makes `waited` fail the assertion below.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(6):
                await reader.read()
        waited = time.monotonic() - started
        writer.close()
    assert waited < 3, f"a half-sent head held the connection for {waited:.1f}s (request_head is 1s)"
