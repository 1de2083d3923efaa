"""The inbound mTLS listener over real loopback TLS, with curl, openssl s_client, aiohttp and raw TLS
sockets as outside clients and a recording aiohttp app behind it (running example: checkout may call
inventory's GET /api/stock/*; nobody may call /admin/**; reporting may call nothing)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from sidecar.config import Limits, ListenerMode, Timeouts
from tests.example import CHECKOUT, INVENTORY, REPORTING, TD
from tests.helpers import (
    INBOUND_POLICY,
    App,
    Pki,
    Sidecar,
    curl,
    free_port,
    raw_exchange,
    run,
    serve,
    session,
    start_sidecar,
    until,
)
from tests.pki import CA, bad_leaf, utcnow

pytestmark = pytest.mark.uvloop  # the sidecar runs on uvloop; test the same transports

TCP_POLICY = {"rules": [{"name": "checkout-tcp", "action": "allow", "paths": ["**"], "callers": [CHECKOUT]}]}


@pytest.fixture
async def sidecar(pki: Pki, app: App) -> AsyncIterator[Sidecar]:
    sc = await start_sidecar(pki, app.port)
    yield sc
    await sc.server.drain(1.0)


# ---------------------------------------------------------------------------------------------------------
# curl / openssl: allow, deny, refused peers


async def test_allowed_request_reaches_app_with_xfcc(pki: Pki, app: App, sidecar: Sidecar) -> None:
    code, _body, err = await curl(pki, sidecar.port, "/api/stock/42?x=1", pki.checkout)
    assert code == 200, err
    assert len(app.seen) == 1
    seen = app.seen[0]
    assert seen.path == "/api/stock/42?x=1"
    xfcc = seen.headers["X-Forwarded-Client-Cert"]
    leaf_sha = hashlib.sha256(pki.checkout.der_list()[0]).hexdigest()
    assert xfcc == f"By={INVENTORY};Hash={leaf_sha};URI={CHECKOUT}"
    line = sidecar.audit_lines[-1]
    assert line["decision"] == "allow" and line["status"] == 200 and line["peer"] == CHECKOUT
    assert line["rule"] == "checkout-reads-stock" and line["bytes_out"] > 0
    assert sidecar.metric("spiffe_sidecar_requests_total", listener="inbound", decision="allow",
                          rule="checkout-reads-stock", mode="enforce") == 1


async def test_spoofed_xfcc_is_replaced(pki: Pki, app: App, sidecar: Sidecar) -> None:
    code, _, err = await curl(pki, sidecar.port, "/api/stock/1", pki.checkout,
                              "-H", "X-Forwarded-Client-Cert: URI=spiffe://example.org/ns/shop/sa/admin")
    assert code == 200, err
    assert app.seen[0].headers["X-Forwarded-Client-Cert"].endswith(f"URI={CHECKOUT}")
    assert "admin" not in app.seen[0].headers["X-Forwarded-Client-Cert"]


async def test_denied_gets_fixed_403_and_app_sees_nothing(pki: Pki, app: App, sidecar: Sidecar) -> None:
    code, body, _ = await curl(pki, sidecar.port, "/api/stock/42", pki.reporting)
    assert code == 403
    assert json.loads(body) == {"error": "forbidden"}
    code, body, _ = await curl(pki, sidecar.port, "/admin/users", pki.checkout)
    assert code == 403 and "no-admin" not in body
    assert app.seen == []
    denies = [line for line in sidecar.audit_lines if line["decision"] == "deny"]
    assert [d["peer"] for d in denies] == [REPORTING, CHECKOUT]
    assert denies[1]["rule"] == "no-admin" and denies[1]["status"] == 403
    assert sidecar.metric("spiffe_sidecar_requests_total", listener="inbound", decision="deny",
                          rule="default-deny", mode="enforce") == 1


async def test_client_without_certificate_is_refused(
    pki: Pki, app: App, sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="spiffe_sidecar.inbound")
    code, _, _err = await curl(pki, sidecar.port, "/api/stock/42", None)
    assert code == 0
    _rc, out, _ = await run("openssl", "s_client", "-connect", f"127.0.0.1:{sidecar.port}", "-noservername",
                           "-CAfile", pki.ca_file, "-ign_eof",
                           stdin=b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"HTTP/1.1" not in out
    assert app.seen == []
    await until(lambda: sidecar.metric("spiffe_sidecar_handshake_failures_total", listener="inbound",
                                        reason="no_client_certificate") >= 2)
    assert any("no_client_certificate" in r.getMessage() and "127.0.0.1:" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("untrusted_ca", "bad_chain"),
        ("foreign_td", "untrusted_trust_domain"),
        ("expired", "expired"),
        ("leaf_is_ca", "leaf_is_ca"),
        ("multiple_uri_sans", "multiple_uri_sans"),
    ],
)
async def test_bad_client_certificates_are_refused(
    pki: Pki, app: App, sidecar: Sidecar, case: str, reason: str
) -> None:
    if case == "untrusted_ca":
        leaf = CA.root(TD).leaf(CHECKOUT)  # same trust domain name, a CA nobody trusts
    elif case == "foreign_td":
        leaf = pki.root.leaf("spiffe://other.test/ns/shop/sa/checkout")  # signed by a trusted CA, wrong TD
    else:
        leaf = bad_leaf(pki.root, case)
    code, _, _ = await curl(pki, sidecar.port, "/api/stock/1", leaf)
    assert code == 0
    assert app.seen == []
    await until(lambda: sidecar.metric("spiffe_sidecar_handshake_failures_total", listener="inbound",
                                        reason=reason) >= 1)


# ---------------------------------------------------------------------------------------------------------
# aiohttp client: keep-alive, streaming, chunked, 100-continue, WebSocket


async def test_keep_alive_many_requests_one_connection(pki: Pki, app: App, sidecar: Sidecar) -> None:
    async with session(pki) as s:
        for i in range(20):
            async with s.get(f"https://127.0.0.1:{sidecar.port}/api/stock/{i}") as r:
                assert r.status == 200
                assert (await r.json())["path"] == f"/api/stock/{i}"
        async with s.get(f"https://127.0.0.1:{sidecar.port}/admin/x") as r:
            assert r.status == 403  # a denial keeps the connection
        async with s.head(f"https://127.0.0.1:{sidecar.port}/api/stock/1") as r:
            assert r.status == 200
        async with s.get(f"https://127.0.0.1:{sidecar.port}/api/stock/last") as r:
            assert r.status == 200
    assert sidecar.metric("spiffe_sidecar_handshake_failures_total", listener="inbound", reason="tls_error") == 0
    assert len(app.seen) == 22
    # one downstream connection served everything
    assert sidecar.server.pool.size <= 2


async def test_streaming_10mb_both_ways_bounded_memory(pki: Pki, app: App, sidecar: Sidecar) -> None:
    size = 10 * 1024 * 1024
    block = os.urandom(65536)
    h = hashlib.sha256()
    for _ in range(size // len(block)):
        h.update(block)

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    async with session(pki) as s:
        # chunked upload (generator body), app reads slowly
        async with s.post(f"https://127.0.0.1:{sidecar.port}/api/slow-upload", data=gen()) as r:
            assert r.status == 200
            got = await r.json()
        assert got["len"] == size and got["sha"] == h.hexdigest()
        # Content-Length upload
        body = block * (size // len(block))
        async with s.put(f"https://127.0.0.1:{sidecar.port}/api/put", data=body) as r:
            assert r.status == 200
            assert (await r.json())["len"] == size
        # 10 MB download, read slowly
        n = 0
        async with s.get(f"https://127.0.0.1:{sidecar.port}/api/big") as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(65536):
                n += len(chunk)
                if n < 2 * 1024 * 1024:
                    await asyncio.sleep(0.001)
        assert n == size
    assert 0 < sidecar.server.max_buffered < 1024 * 1024, sidecar.server.max_buffered


async def test_chunked_both_ways(pki: Pki, app: App, sidecar: Sidecar) -> None:
    req = (b"POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    out = await raw_exchange(pki, sidecar.port, req)
    assert out.startswith(b"HTTP/1.1 200")
    assert app.seen[0].body_len == 11
    out = await raw_exchange(pki, sidecar.port,
                             b"GET /api/chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"part0;" in body and body.endswith(b"0\r\n\r\n")


async def test_expect_100_continue(pki: Pki, app: App, sidecar: Sidecar) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port, ssl=pki.client_ssl(pki.checkout))
    writer.write(b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    async with asyncio.timeout(5):
        interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    # denied: no 100, a 403, the app sees nothing more
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port, ssl=pki.client_ssl(pki.reporting))
    writer.write(b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403")
    writer.close()
    assert len(app.seen) == 1 and "Expect" not in app.seen[0].headers


async def test_websocket_upgrade_is_relayed(pki: Pki, app: App, sidecar: Sidecar) -> None:
    async with session(pki) as s, s.ws_connect(f"wss://127.0.0.1:{sidecar.port}/ws") as ws:
        for i in range(3):
            await ws.send_str(f"m{i}")
            msg = await ws.receive(timeout=5)
            assert msg.data == f"echo:m{i}"
    assert app.seen[0].method == "WS"
    assert app.seen[0].headers["X-Forwarded-Client-Cert"].endswith(CHECKOUT)
    async with session(pki, pki.reporting) as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as ei:
            await s.ws_connect(f"wss://127.0.0.1:{sidecar.port}/ws")
        assert ei.value.status == 403
    await until(lambda: any(line["status"] == 101 for line in sidecar.audit_lines))


# ---------------------------------------------------------------------------------------------------------
# Smuggling and normalisation


SMUGGLING = [
    ("cl_and_te", b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"0\r\n\r\n", 400),
    ("dup_cl", b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", 400),
    ("cl_list", b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\na", 400),
    ("bad_chunk", b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
     400),
    ("obs_fold", b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    ("te_not_chunked", b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
     400),
    ("oversized_headers", b"GET /api/x HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    ("oversized_line", b"GET /api/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("dotdot_admin", b"GET /api/../admin/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 403),
    ("pct_dotdot", b"GET /api/%2e%2e/admin/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 403),
    ("pct_slash", b"GET /api/stock%2F1 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("nul", b"GET /api/stock/%00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("raw_nul", b"GET /api/stock/\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("absolute_form", b"GET http://x/api/stock/1 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("no_host", b"GET /api/stock/1 HTTP/1.1\r\n\r\n", 400),
    ("connect_origin_form", b"CONNECT /api/x HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # RFC 9112 §3.2.3
    # issue 10 #3-#5: Connection naming Host, an invalid Host, an encoded ';' after dot segments
    ("connection_names_host", b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\nConnection: Host\r\n\r\n", 400),
    ("connection_names_xfcc", b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\nConnection: x-forwarded-client-cert"
                              b"\r\nX-Forwarded-Client-Cert: URI=spiffe://example.org/x\r\n\r\n", 400),
    ("host_with_slash", b"GET /api/stock/1 HTTP/1.1\r\nHost: inventory/admin\r\n\r\n", 400),
    ("host_with_userinfo", b"GET /api/stock/1 HTTP/1.1\r\nHost: admin@inventory\r\n\r\n", 400),
    ("host_with_space", b"GET /api/stock/1 HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("pct_semicolon_dotdot", b"GET /api/..%3B/admin/x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("pct_semicolon", b"GET /api/stock/1%3bx HTTP/1.1\r\nHost: x\r\n\r\n", 400),
]


@pytest.mark.parametrize(("case", "data", "status"), SMUGGLING, ids=[c[0] for c in SMUGGLING])
async def test_smuggling_and_ambiguous_targets(
    pki: Pki, app: App, sidecar: Sidecar, case: str, data: bytes, status: int
) -> None:
    out = await raw_exchange(pki, sidecar.port, data)
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
    assert app.seen == []


async def test_pipelined_requests_decided_in_order(pki: Pki, app: App, sidecar: Sidecar) -> None:
    req = (b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /admin/x HTTP/1.1\r\nHost: x\r\n\r\n"
           b"POST /api/p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
           b"GET /api/stock/%2F HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /api/stock/never HTTP/1.1\r\nHost: x\r\n\r\n")
    out = await raw_exchange(pki, sidecar.port, req)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", out)
    assert statuses == [b"200", b"403", b"200", b"400"]
    assert [s.path for s in app.seen] == ["/api/stock/1", "/api/p"]


# ---------------------------------------------------------------------------------------------------------
# Upstream failures, limits, TCP mode, drain


async def test_502_when_app_is_down(pki: Pki, app: App) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    sc = await start_sidecar(pki, dead_port)
    try:
        code, body, _ = await curl(pki, sc.port, "/api/stock/1", pki.checkout)
        assert code == 502 and json.loads(body) == {"error": "bad gateway"}
        assert sc.metric("spiffe_sidecar_upstream_errors_total", listener="inbound", kind="connect") == 1
        assert sc.audit_lines[-1]["status"] == 502
    finally:
        await sc.server.drain(1)


async def test_504_when_app_is_slow(pki: Pki, app: App) -> None:
    sc = await start_sidecar(pki, app.port, timeouts=Timeouts(upstream_response=0.5, upstream_connect=1))
    try:
        code, _, _ = await curl(pki, sc.port, "/api/slow?s=3", pki.checkout)
        assert code == 504
        assert sc.metric("spiffe_sidecar_upstream_errors_total", listener="inbound", kind="timeout") == 1
    finally:
        await sc.server.drain(1)


async def test_body_limit_413(pki: Pki, app: App) -> None:
    sc = await start_sidecar(pki, app.port, limits=Limits(max_body_bytes=1000))
    try:
        out = await raw_exchange(pki, sc.port, b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413")
        out = await raw_exchange(pki, sc.port, b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                                 b"\r\n\r\n7d0\r\n" + b"a" * 2000 + b"\r\n0\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413") or out == b""
    finally:
        await sc.server.drain(1)


async def test_connection_limit(pki: Pki, app: App, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="spiffe_sidecar.inbound")
    sc = await start_sidecar(pki, app.port, limits=Limits(max_connections=1))
    try:
        async with session(pki) as s:
            async with s.get(f"https://127.0.0.1:{sc.port}/api/stock/1") as r:
                assert r.status == 200
            code, _, _ = await curl(pki, sc.port, "/api/stock/2", pki.checkout)
            assert code == 0
        assert sc.metric("spiffe_sidecar_connection_limit_hits_total", listener="inbound") >= 1
        assert any("connection limit" in r.getMessage() for r in caplog.records)
    finally:
        await sc.server.drain(1)


async def test_idle_keep_alive_is_closed(pki: Pki, app: App) -> None:
    sc = await start_sidecar(pki, app.port, timeouts=Timeouts(idle=0.3, request_head=0.3))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # no request head in time: closed
        writer.close()
        assert sc.server.open_connections == 0 or await _zero(sc)
    finally:
        await sc.server.drain(1)


async def _zero(sc: Sidecar) -> bool:
    await until(lambda: sc.server.open_connections == 0)
    return True


async def test_tcp_mode_relays_bytes(pki: Pki) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    sc = await start_sidecar(pki, port, policy=TCP_POLICY, mode=ListenerMode.TCP)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
        payload = os.urandom(300_000)
        writer.write(payload)
        got = b""
        async with asyncio.timeout(10):
            while len(got) < len(payload):
                got += await reader.read(65536)
        assert got == payload
        writer.close()
        # reporting is denied at connection level
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.reporting))
        writer.write(b"hello")
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        await until(lambda: len(sc.audit_lines) >= 2)
        denied = [line for line in sc.audit_lines if line["decision"] == "deny"]
        assert denied and denied[0]["method"] == "-" and denied[0]["path"] == "-"
        allowed = [line for line in sc.audit_lines if line["decision"] == "allow"]
        assert allowed[0]["bytes_in"] == len(payload)
    finally:
        await sc.server.drain(1)
        srv.close()


async def test_drain_finishes_in_flight_and_refuses_new(pki: Pki, app: App) -> None:
    sc = await start_sidecar(pki, app.port)
    async with session(pki) as s:
        slow = asyncio.create_task(s.get(f"https://127.0.0.1:{sc.port}/api/slow?s=1"))
        await until(lambda: len(app.seen) == 1)
        drain = asyncio.create_task(sc.server.drain(10))
        await asyncio.sleep(0.1)
        code, _, _ = await curl(pki, sc.port, "/api/stock/1", pki.checkout)
        assert code == 0  # not accepting any more
        r = await slow
        assert r.status == 200
        assert r.headers.get("Connection", "").lower() == "close"
        r.release()
        async with asyncio.timeout(10):
            await drain
    assert sc.server.open_connections == 0


async def test_audit_mode_forwards_would_deny(pki: Pki, app: App) -> None:
    sc = await start_sidecar(pki, app.port, policy={**INBOUND_POLICY, "mode": "audit"})
    try:
        code, _, _ = await curl(pki, sc.port, "/api/stock/42", pki.reporting)
        assert code == 200
        assert [s.path for s in app.seen] == ["/api/stock/42"]
        line = sc.audit_lines[-1]
        assert line["decision"] == "would-deny" and line["status"] == 200 and line["peer"] == REPORTING
        assert sc.metric("spiffe_sidecar_requests_total", listener="inbound", decision="would-deny",
                         rule="default-deny", mode="audit") == 1
    finally:
        await sc.server.drain(1)


async def test_handshake_timeout_and_garbage_are_counted(pki: Pki, app: App) -> None:
    sc = await start_sidecar(pki, app.port, timeouts=Timeouts(handshake=0.3))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)  # plain TCP, says nothing
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)  # plain HTTP to a TLS port
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            assert b"HTTP/1.1" not in await reader.read()
        writer.close()
        await until(lambda: sc.metric("spiffe_sidecar_handshake_failures_total", listener="inbound",
                                       reason="handshake_timeout") == 1
                     and sc.metric("spiffe_sidecar_handshake_failures_total", listener="inbound",
                                   reason="tls_error") == 1)
        assert app.seen == []
        await until(lambda: sc.server.open_connections == 0)
    finally:
        await sc.server.drain(1)


async def test_app_closing_keep_alive_connections_is_survived(pki: Pki) -> None:
    """An app that silently closes after every response: stale pooled connections are never used
    (detected while idle, or the idempotent request is retried once on a new connection)."""
    served = 0

    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readuntil(b"\r\n\r\n")
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(one_shot, "127.0.0.1", 0)
    sc = await start_sidecar(pki, srv.sockets[0].getsockname()[1])
    try:
        async with session(pki) as s:
            for i in range(10):
                async with s.get(f"https://127.0.0.1:{sc.port}/api/stock/{i}") as r:
                    assert r.status == 200 and await r.read() == b"ok"
        assert served == 10
        assert sc.metric("spiffe_sidecar_upstream_errors_total", listener="inbound", kind="closed") == 0
    finally:
        await sc.server.drain(1)
        srv.close()


async def test_peer_that_stops_reading_the_response_is_cut_off(pki: Pki, app: App) -> None:
    """timeouts.write_stall: a caller that takes no response bytes is cut off; the upstream connection is
    aborted (never pooled mid-response), counted, and audited with 408 and the reason."""
    sc = await start_sidecar(pki, app.port, timeouts=Timeouts(write_stall=1, idle=30, upstream_response=30))
    try:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout), limit=1024
        )
        writer.write(b"GET /api/big HTTP/1.1\r\nHost: x\r\n\r\n")
        cast(asyncio.Transport, writer.transport).pause_reading()  # never read: 10 MB cannot flow
        await until(lambda: sc.server.open_connections == 0, timeout=20)
        writer.transport.abort()
        assert sc.server.pool.size == sc.server.pool.idle_count == 0
        assert sc.metric("spiffe_sidecar_peer_stalls_total", listener="inbound", kind="write") == 1
        line = sc.audit_lines[-1]
        assert line["status"] == 408 and line["path"] == "/api/big"
        assert "stopped reading the response" in line["reason"]
        # A reading client is untouched by the same deadline: 10 MB arrive whole.
        async with session(pki) as s, s.get(f"https://127.0.0.1:{sc.port}/api/big") as r:
            assert len(await r.read()) == 10 * 1024 * 1024
    finally:
        await sc.server.drain(1)


async def test_peer_that_stops_sending_the_request_body_is_cut_off(pki: Pki, app: App) -> None:
    """timeouts.request_body_stall: a body that stops arriving mid-way ends the exchange with a 408 (the
    app still waits for the body, so no response has started); the upstream connection is not pooled."""
    sc = await start_sidecar(
        pki, app.port, timeouts=Timeouts(request_body_stall=1.5, idle=30, upstream_response=30)
    )
    try:
        head = b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        out = await raw_exchange(pki, sc.port, head + b"a" * 1000, timeout=20)
        assert out.startswith(b"HTTP/1.1 408 "), out[:80]
        await until(lambda: sc.server.open_connections == 0, timeout=20)
        assert sc.server.pool.size == sc.server.pool.idle_count == 0
        assert sc.metric("spiffe_sidecar_peer_stalls_total", listener="inbound", kind="request_body") == 1
        line = sc.audit_lines[-1]
        assert line["status"] == 408 and "stopped sending the request body" in line["reason"]
        # A chunked body that keeps arriving, slower than the deadline overall, is not cut off.
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
        writer.write(b"POST /api/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(10):  # 2.5 s in all, never more than 0.25 s between chunks
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.25)
        writer.write(b"0\r\n\r\n")
        async with asyncio.timeout(20):
            status = await reader.readline()
        writer.close()
        assert status.startswith(b"HTTP/1.1 200 "), status
    finally:
        await sc.server.drain(1)


async def test_tcp_mode_peer_that_stops_reading_is_cut_off(pki: Pki) -> None:
    """TCP mode has no request deadlines at all: write_stall alone ends a relay the peer stopped reading."""

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(1000):  # 64 MB at most: far more than any buffer on the way
                writer.write(b"x" * 65536)
                await writer.drain()
        writer.close()

    srv = await asyncio.start_server(flood, "127.0.0.1", 0)
    sc = await start_sidecar(pki, srv.sockets[0].getsockname()[1], policy=TCP_POLICY, mode=ListenerMode.TCP,
                             timeouts=Timeouts(write_stall=1))
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout), limit=1024
        )
        assert await reader.read(10)  # the relay runs (and our handshake is complete on both ends)
        cast(asyncio.Transport, writer.transport).pause_reading()
        await until(lambda: sc.server.open_connections == 0, timeout=20)
        writer.transport.abort()
        assert sc.metric("spiffe_sidecar_peer_stalls_total", listener="inbound", kind="write") == 1
        await until(lambda: len(sc.audit_lines) >= 1)
        assert sc.audit_lines[-1]["status"] == 408
    finally:
        await sc.server.drain(1)
        srv.close()


async def test_closed_connections_are_freed(pki: Pki, app: App, sidecar: Sidecar) -> None:
    # Regression: a pending head/idle TimerHandle held each closed connection (and its TLS buffers) for
    # ~10 s; memory then grew with the rate of new connections. After close, nothing may keep one alive.
    import gc

    from sidecar.proxy import HttpConnection as _HttpConn

    for i in range(5):
        async with session(pki) as s, s.get(f"https://127.0.0.1:{sidecar.port}/api/stock/{i}") as r:
            assert r.status == 200
    await until(lambda: sidecar.server.open_connections == 0)
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, _HttpConn)]
    assert alive == [], f"{len(alive)} closed connections still referenced"


# ---------------------------------------------------------------------------------------------------------
# Security review fixes (r01-r11)


async def test_one_endless_header_line_gets_431_before_it_ends(pki: Pki, app: App) -> None:
    # httptools reports a header line only when it ends; the raw head budget must answer first.
    sc = await start_sidecar(pki, app.port, timeouts=Timeouts(request_head=60))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.reporting))
        writer.write(b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\nX-Big: ")
        out = b""
        async with asyncio.timeout(20):
            for _ in range(64):  # up to 4 MiB, never a line end
                writer.write(b"a" * 65536)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                # A poll between writes: no answer yet is expected here. The enclosing 20 s deadline
                # fails the test if the 431 never comes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        out += await reader.read(65536)
                if out:
                    break
            out += await reader.read(65536)
        writer.transport.abort()
        assert out.startswith(b"HTTP/1.1 431 "), out[:100]
        assert sc.metric("spiffe_sidecar_bad_requests_total", reason="headers_too_large") == 1
        assert app.seen == []
    finally:
        await sc.server.drain(1)


async def test_oversized_response_head_from_the_next_hop_is_502(pki: Pki) -> None:
    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 4 MiB of one header line
                writer.write(b"a" * 65536)
                await writer.drain()
        writer.close()

    srv = await asyncio.start_server(hostile, "127.0.0.1", 0)
    sc = await start_sidecar(pki, srv.sockets[0].getsockname()[1])
    try:
        out = await raw_exchange(pki, sc.port, b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
        assert out.startswith(b"HTTP/1.1 502 "), out[:100]
        assert sc.metric("spiffe_sidecar_upstream_errors_total", listener="inbound", kind="head_too_large") == 1
    finally:
        await sc.server.drain(1)
        srv.close()


async def test_many_pipelined_heads_in_one_read_and_bodiless_denials_keep_the_connection(
    pki: Pki, app: App, sidecar: Sidecar
) -> None:
    # 1000 denied requests (~100 KiB, more than one head's budget) in one write: the head budget is per
    # head, and a denial without a body keeps the connection, so the last request is still served.
    denied = b"GET /admin/x HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 60 + b"\r\n\r\n"
    last = b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = await raw_exchange(pki, sidecar.port, denied * 1000 + last, timeout=20)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", out)
    assert statuses == [b"403"] * 1000 + [b"200"]
    assert [s.path for s in app.seen] == ["/api/stock/1"]
    # A denied request with a body still closes the connection (its body is never read).
    out = await raw_exchange(pki, sidecar.port, b"POST /admin/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                             + last)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", out) == [b"403"]
    assert len(app.seen) == 1


async def test_underscore_identity_headers_and_trailers_never_reach_the_app(
    pki: Pki, app: App, sidecar: Sidecar
) -> None:
    forged = b"URI=spiffe://example.org/ns/shop/sa/admin"
    out = await raw_exchange(pki, sidecar.port, b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\nX_Forwarded_Client_Cert: "
                             + forged + b"\r\nX-Kept: 1\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ")
    seen = app.seen[-1]
    assert not [k for k in seen.headers if "_" in k]
    assert seen.headers.getall("X-Forwarded-Client-Cert") == [f"By={INVENTORY};Hash="
                                                              f"{hashlib.sha256(pki.checkout.der_list()[0]).hexdigest()}"
                                                              f";URI={CHECKOUT}"]
    assert seen.headers["X-Kept"] == "1"
    # Trailer fields arrive after the head but before the upstream connection is leased: never headers.
    out = await raw_exchange(pki, sidecar.port, b"POST /api/x HTTP/1.1\r\nHost: inventory\r\nTransfer-Encoding: "
                             b"chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\nHost: evil.example\r\n"
                             b"X-Injected: 1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 "), out[:100]
    seen = app.seen[-1]
    assert seen.headers.getall("Host") == ["inventory"] and "X-Injected" not in seen.headers
    assert seen.body_len == 3


async def test_unrequested_101_from_the_app_is_a_clean_502(pki: Pki) -> None:
    async def switcher(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\nConnection: upgrade\r\n\r\nraw")
        await writer.drain()

    srv = await asyncio.start_server(switcher, "127.0.0.1", 0)
    sc = await start_sidecar(pki, srv.sockets[0].getsockname()[1])
    try:
        out = await raw_exchange(pki, sc.port, b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 502 ") and b"raw" not in out, out[:200]
        assert sc.metric("spiffe_sidecar_upstream_errors_total", listener="inbound", kind="protocol") == 1
    finally:
        await sc.server.drain(1)
        srv.close()


async def test_kept_alive_connection_closes_when_the_peer_certificate_expires(pki: Pki, app: App) -> None:
    short = pki.root.intermediate().leaf(CHECKOUT, not_after=utcnow() + dt.timedelta(seconds=2))
    sc = await start_sidecar(pki, app.port, timeouts=Timeouts(idle=30))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(short))
        req = b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\n\r\n"
        writer.write(req)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        async with asyncio.timeout(10):
            while utcnow() <= short.cert.not_valid_after_utc:
                await asyncio.sleep(0.2)
        writer.write(req)
        async with asyncio.timeout(5):
            rest = await reader.read()  # the rest of the first body, then EOF: no second response
            while chunk := await reader.read():
                rest += chunk
        assert b"HTTP/1.1" not in rest
        writer.close()
        assert len(app.seen) == 1
        assert sc.metric("spiffe_sidecar_handshake_failures_total", listener="inbound", reason="expired") == 1
    finally:
        await sc.server.drain(1)


async def test_tcp_relay_closes_when_idle_or_when_the_peer_certificate_expires(pki: Pki) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    sc = await start_sidecar(pki, port, policy=TCP_POLICY, mode=ListenerMode.TCP, timeouts=Timeouts(idle=0.5))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
        writer.write(b"hello")
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # no bytes either way for timeouts.idle: closed
        writer.close()
        await until(lambda: sc.server.open_connections == 0)
    finally:
        await sc.server.drain(1)
    short = pki.root.intermediate().leaf(CHECKOUT, not_after=utcnow() + dt.timedelta(seconds=1.5))
    sc = await start_sidecar(pki, port, policy=TCP_POLICY, mode=ListenerMode.TCP, timeouts=Timeouts(idle=60))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(short))
        async with asyncio.timeout(10):
            while True:  # keep the relay busy: only the expiry can end it
                writer.write(b"x")
                # A poll: the relay staying open for 0.1 s is expected until the certificate expires; the
                # enclosing 10 s deadline fails the test if it never closes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        if await reader.read() == b"":
                            break
        writer.close()
        assert sc.metric("spiffe_sidecar_handshake_failures_total", listener="inbound", reason="expired") == 1
    finally:
        await sc.server.drain(1)
        srv.close()


async def test_silent_sockets_cannot_hold_every_connection_slot(pki: Pki, app: App) -> None:
    # max_connections 40 -> at most 10 sockets in the handshake; the oldest silent one makes room.
    sc = await start_sidecar(pki, app.port, limits=Limits(max_connections=40), timeouts=Timeouts(handshake=30))
    socks = []
    try:
        for _ in range(40):
            socks.append(await asyncio.open_connection("127.0.0.1", sc.port))
        await until(lambda: sc.metric("spiffe_sidecar_handshake_limit_hits_total", listener="inbound") >= 30)
        assert sc.server.open_connections <= 10
        code, _, err = await curl(pki, sc.port, "/api/stock/1", pki.checkout)
        assert code == 200, err
    finally:
        for _r, w in socks:
            w.transport.abort()
        await sc.server.drain(1)
        await until(lambda: sc.server.open_connections == 0)


# ---------------------------------------------------------------------------------------------------------
# Issue 10: streaming deadlines measure inactivity, not the exchange; heads held back on broken framing;
# routing overrides stripped; bytes_in counts the head; denied bodies close the connection.


@dataclass
class StreamApp:
    port: int
    runner: web.AppRunner
    received: list[int] = field(default_factory=list)


async def _stream_app() -> StreamApp:
    """An app that streams: /upload reads the body as it comes; /download sends 20 pieces 0.3 s apart;
    /echo answers each request piece with the same bytes while the body still streams; /stall sends a
    head and one piece, then goes silent; /mute never answers; /deaf never reads its body."""
    state = StreamApp(0, cast(web.AppRunner, None))

    async def upload(request: web.Request) -> web.Response:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        state.received.append(n)
        return web.json_response({"len": n})

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(20):
            await resp.write(b"d" * 1000)
            await asyncio.sleep(0.3)
        await resp.write_eof()
        return resp

    async def echo(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 10_000
        await resp.prepare(request)
        await resp.write(b"s" * 100)
        await asyncio.sleep(30)
        return resp

    async def mute(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(30)
        return web.Response()

    async def deaf(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    a = web.Application(client_max_size=64 * 1024 * 1024)
    for path, handler in (("/api/upload", upload), ("/api/download", download), ("/api/echo", echo),
                          ("/api/stall", stall), ("/api/mute", mute), ("/api/deaf", deaf)):
        a.router.add_route("*", path, handler)
    # serve(): its cleanup cancels the silent handlers instead of waiting out their 30 s sleeps.
    state.runner, state.port = await serve(a)
    return state


# Every deadline 2 s; each healthy exchange below moves bytes for 6 s.
_SHORT = Timeouts(handshake=3, request_head=2, idle=10, upstream_connect=1, upstream_response=2, drain=2,
                  write_stall=2, request_body_stall=2)


async def test_a_long_upload_at_a_steady_rate_outlives_every_deadline(pki: Pki) -> None:
    """A body that streams for 3x the response deadline, a piece every 0.3 s, reaches the app whole."""
    sa = await _stream_app()
    sc = await start_sidecar(pki, sa.port, timeouts=_SHORT)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"u" * 1000
            await asyncio.sleep(0.3)

    try:
        async with session(pki) as s, s.post(f"https://127.0.0.1:{sc.port}/api/upload", data=body()) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["len"] == 20_000
        assert sa.received == [20_000]
        assert sc.metric("spiffe_sidecar_upstream_errors_total", listener="inbound", kind="timeout") == 0
    finally:
        await sc.server.drain(1)
        await sa.runner.cleanup()


async def test_a_long_download_at_a_steady_rate_outlives_every_deadline(pki: Pki) -> None:
    sa = await _stream_app()
    sc = await start_sidecar(pki, sa.port, timeouts=_SHORT)
    try:
        async with session(pki) as s, s.get(f"https://127.0.0.1:{sc.port}/api/download") as r:
            assert r.status == 200
            assert len(await r.read()) == 20_000
    finally:
        await sc.server.drain(1)
        await sa.runner.cleanup()


async def test_a_long_exchange_streaming_both_ways_at_once_outlives_every_deadline(pki: Pki) -> None:
    """The app echoes each piece while the upload still streams: both directions move for 6 s."""
    sa = await _stream_app()
    sc = await start_sidecar(pki, sa.port, timeouts=_SHORT)
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
    try:
        writer.write(b"POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        got = b""
        async with asyncio.timeout(20):
            for i in range(20):
                writer.write(b"5\r\nm%04d\r\n" % i)
                await asyncio.sleep(0.3)
                got += await reader.read(65536)  # the echo of this piece arrives while we keep sending
            writer.write(b"0\r\n\r\n")
            while not got.endswith(b"0\r\n\r\n"):
                chunk = await reader.read(65536)
                assert chunk, got[-200:]
                got += chunk
        assert got.startswith(b"HTTP/1.1 200 ")
        assert all(b"m%04d" % i in got for i in range(20))
    finally:
        writer.close()
        await sc.server.drain(1)
        await sa.runner.cleanup()


async def test_app_silence_is_cut_off_by_the_inactivity_deadline(pki: Pki) -> None:
    """Inactivity on the app's side still ends the exchange: no first byte (504), silence mid-response
    (the caller's connection is dropped), or a body the app stops reading (504)."""
    sa = await _stream_app()
    sc = await start_sidecar(pki, sa.port, timeouts=_SHORT)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await raw_exchange(pki, sc.port, b"GET /api/mute HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
        assert out.startswith(b"HTTP/1.1 504 "), out[:100]
        assert 1.5 < loop.time() - t0 < 6
        out = await raw_exchange(pki, sc.port, b"GET /api/stall HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
        assert out.startswith(b"HTTP/1.1 200 ") and out.count(b"s") >= 100 and len(out) < 10_000
        body = b"x" * (8 * 1024 * 1024)  # far above every socket and transport buffer
        out = await raw_exchange(pki, sc.port, b"POST /api/deaf HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                                 % len(body) + body, timeout=15)
        assert out.startswith(b"HTTP/1.1 504 "), out[:100]
        assert sc.metric("spiffe_sidecar_upstream_errors_total", listener="inbound", kind="timeout") == 3
    finally:
        await sc.server.drain(1)
        await sa.runner.cleanup()


@dataclass
class RawApp:
    """A raw TCP app that records the bytes of each connection and answers nothing until told to."""

    port: int
    server: asyncio.Server
    conns: list[bytearray] = field(default_factory=list)
    closed: list[bool] = field(default_factory=list)


async def _raw_app() -> RawApp:
    state = RawApp(0, cast(asyncio.Server, None))

    warm = b"GET /api/warm HTTP/1.1\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        i = len(state.conns)
        state.conns.append(buf)
        state.closed.append(False)
        while chunk := await reader.read(65536):
            buf += chunk
            if buf.startswith(warm) and b"\r\n\r\n" in buf:
                # A warm-up request: answered, so this connection goes back to the sidecar's pool, and not
                # recorded (what follows on this connection is the case under test).
                del buf[: buf.index(b"\r\n\r\n") + 4]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        state.closed[i] = True
        writer.close()

    state.server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = state.server.sockets[0].getsockname()[1]
    return state


async def test_broken_chunked_framing_never_completes_a_request_at_the_app(pki: Pki) -> None:
    """When the head and a bad chunk line arrive together the app sees nothing; when the bad chunk comes
    later the app sees a partial request and then its connection closes, never a complete request nor a
    second one on that connection."""
    ra = await _raw_app()
    sc = await start_sidecar(pki, ra.port, timeouts=_SHORT)
    head = b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    warm = b"GET /api/warm HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        # A warm pooled connection first: the request is then written upstream within the same read.
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
        writer.write(warm)
        async with asyncio.timeout(5):
            out = await reader.readuntil(b"\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200 ")
            assert sc.server.pool.idle_count == 1
            writer.write(head + b"5\r\nhello\r\nzz\r\n")
            out = await reader.read()
        writer.close()
        assert out.startswith(b"HTTP/1.1 400 ")
        await until(lambda: all(ra.closed))
        assert all(conn == b"" for conn in ra.conns), ra.conns  # nothing of the request reached the app

        await raw_exchange(pki, sc.port, warm.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=pki.client_ssl(pki.checkout))
        writer.write(head + b"5\r\nhello\r\n")
        await until(lambda: any(b"hello" in c for c in ra.conns))
        writer.write(b"zz\r\nGET /api/next HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            out = await reader.read()
        writer.close()
        assert out.startswith(b"HTTP/1.1 400 ")
        await until(lambda: all(ra.closed))
        seen = next(c for c in ra.conns if b"hello" in c)
        assert seen.startswith(b"POST /api/x HTTP/1.1\r\n")
        assert not seen.endswith(b"0\r\n\r\n") and b"/api/next" not in seen  # never completed, never reused
    finally:
        await sc.server.drain(1)
        ra.server.close()


async def test_routing_override_headers_never_reach_the_app(pki: Pki, app: App, sidecar: Sidecar) -> None:
    code, _, err = await curl(pki, sidecar.port, "/api/stock/1", pki.checkout, "-H", "X-Original-URL: /admin/x",
                              "-H", "X-Rewrite-URL: /admin/x", "-H", "X-HTTP-Method-Override: DELETE",
                              "-H", "X-Method-Override: DELETE", "-H", "X-Kept: yes")
    assert code == 200, err
    h = app.seen[0].headers
    assert "X-Original-URL" not in h and "X-Rewrite-URL" not in h
    assert "X-HTTP-Method-Override" not in h and "X-Method-Override" not in h
    assert h["X-Kept"] == "yes"


async def test_a_configured_strip_list_replaces_the_default(pki: Pki, app: App) -> None:
    sc = await start_sidecar(pki, app.port, strip=("x-internal-token",))
    try:
        code, _, err = await curl(pki, sc.port, "/api/stock/1", pki.checkout, "-H", "X-Internal-Token: t",
                                  "-H", "X-Original-URL: /other")
        assert code == 200, err
        assert "X-Internal-Token" not in app.seen[0].headers
        assert app.seen[0].headers["X-Original-URL"] == "/other"
    finally:
        await sc.server.drain(1)


async def test_audit_bytes_in_counts_the_request_head(pki: Pki, app: App, sidecar: Sidecar) -> None:
    head = b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    out = await raw_exchange(pki, sidecar.port, head + b"hello")
    assert out.startswith(b"HTTP/1.1 200 ")
    await until(lambda: bool(sidecar.audit_lines))
    line = sidecar.audit_lines[-1]
    assert line["bytes_in"] == len(head) + 5
    assert line["bytes_out"] == len(out)


async def test_a_denied_request_with_a_body_closes_the_connection_even_when_pipelined(
    pki: Pki, app: App, sidecar: Sidecar
) -> None:
    req = (b"GET /api/stock/1 HTTP/1.1\r\nHost: x\r\n\r\n"
           b"POST /admin/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
           b"GET /api/stock/2 HTTP/1.1\r\nHost: x\r\n\r\n")
    out = await raw_exchange(pki, sidecar.port, req)  # fails if the connection stays open
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", out) == [b"200", b"403"]
    assert b"connection: close" in out.split(b"HTTP/1.1 403 ")[1].lower()
    assert [s.path for s in app.seen] == ["/api/stock/1"]


# ---------------------------------------------------------------------------------------------------------
# Issue 14: the audit line is an access log too (request id, trace, authority, user agent, protocol, TLS,
# source, upstream failure)


async def test_access_log_fields_and_ids_forwarded_to_the_app(pki: Pki, app: App, sidecar: Sidecar) -> None:
    # HTTP/1.1 on purpose (curl would pick h2 by ALPN): the HTTP/1 path's access log (test_h2conn.py: HTTP/2's)
    code, _, err = await curl(pki, sidecar.port, "/api/stock/7", pki.checkout, "-A", "stock-poller/1.0", "--http1.1")
    assert code == 200, err
    seen = app.seen[-1].headers
    rid = seen["X-Request-Id"]
    trace = seen["traceparent"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", trace)  # a trace we started, not sampled
    line = sidecar.audit_lines[-1]
    assert line["request_id"] == rid and line["trace_id"] == trace[3:35]
    assert line["authority"] == f"localhost:{sidecar.port}" and line["user_agent"] == "stock-poller/1.0"
    assert line["protocol"] == "HTTP/1.1" and line["tls"] in ("TLSv1.2", "TLSv1.3")
    assert line["source"].startswith("127.0.0.1:") and "upstream_failure" not in line
    # The caller's ids are kept, forwarded and logged as they are.
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    code, _, err = await curl(pki, sidecar.port, "/api/stock/8", pki.checkout, "-H", "X-Request-Id: caller-id-1",
                              "-H", f"traceparent: {tp}")
    assert code == 200, err
    assert app.seen[-1].headers["X-Request-Id"] == "caller-id-1" and app.seen[-1].headers["traceparent"] == tp
    line = sidecar.audit_lines[-1]
    assert line["request_id"] == "caller-id-1" and line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    # A denied request is logged with a request id too (nothing is forwarded).
    code, _, _ = await curl(pki, sidecar.port, "/admin/x", pki.checkout)
    assert code == 403 and re.fullmatch(r"[0-9a-f]{32}", sidecar.audit_lines[-1]["request_id"])


async def test_access_log_names_the_upstream_failure(pki: Pki) -> None:
    port = free_port()  # nothing listens: connect refused
    sc = await start_sidecar(pki, port)
    try:
        code, _, _ = await curl(pki, sc.port, "/api/stock/1", pki.checkout)
        assert code == 502
        await until(lambda: bool(sc.audit_lines))
        assert sc.audit_lines[-1]["upstream_failure"] == "connect_refused"
    finally:
        await sc.server.drain(1)
    sa = await _stream_app()
    sc = await start_sidecar(pki, sa.port, timeouts=_SHORT)
    try:
        out = await raw_exchange(pki, sc.port, b"GET /api/mute HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
        assert out.startswith(b"HTTP/1.1 504 ")
        assert sc.audit_lines[-1]["upstream_failure"] == "timeout"
    finally:
        await sc.server.drain(1)
        await sa.runner.cleanup()


# ---------------------------------------------------------------------------------------------------------
# Issue 13: JWT-SVID step-up on a high-risk path


STEP_UP_POLICY = {"rules": [
    *cast(list[dict[str, object]], INBOUND_POLICY["rules"]),
    {"name": "reserve-needs-token", "action": "allow", "methods": ["POST"], "paths": ["/api/stock/*/reserve"],
     "callers": [CHECKOUT], "jwt": {"audience": "inventory"}},
]}  # fmt: skip


def _jwt_key_and_bundles() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives.asymmetric import ec

    from sidecar.identity import TrustDomain
    from sidecar.jwtsource import JwtBundleHolder
    from sidecar.jwtsvid import JwtBundle
    from sidecar.sources import JwtBundles

    key = ec.generate_private_key(ec.SECP256R1())
    td = TrustDomain.parse(TD)
    holder = JwtBundleHolder()
    holder.set(JwtBundles({td: JwtBundle.from_keys(td, {"k1": key.public_key()})}, 1))
    return key, holder


def _token(key: Any, sub: str, aud: str = "inventory", exp: float | None = None, kid: str = "k1") -> str:
    import time

    import jwt

    now = time.time()
    return jwt.encode({"sub": sub, "aud": aud, "exp": exp or now + 300, "iat": now}, key, algorithm="ES256",
                      headers={"kid": kid, "typ": "JWT"})  # fmt: skip


async def test_step_up_requires_a_valid_bound_jwt_svid(pki: Pki, app: App) -> None:
    key, holder = _jwt_key_and_bundles()
    sc = await start_sidecar(pki, app.port, policy=STEP_UP_POLICY, jwt_bundles=holder)
    path = "/api/stock/42/reserve"
    try:
        # No token: 401 with the RFC 6750 challenge; the app sees nothing.
        out = await raw_exchange(pki, sc.port, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n" % path.encode())  # fmt: skip
        assert out.startswith(b"HTTP/1.1 401 ") and b'www-authenticate: Bearer error="invalid_token"' in out
        assert app.seen == []
        line = sc.audit_lines[-1]
        assert line["decision"] == "deny" and line["status"] == 401 and "no valid JWT-SVID" in line["reason"]
        # A valid token whose subject is checkout (the mTLS peer): 200; the app learns the subject and
        # audience, never the token; a spoofed subject header from the caller is dropped.
        good = _token(key, CHECKOUT)
        code, _, err = await curl(pki, sc.port, path, pki.checkout, "-X", "POST", "-H", f"Authorization: Bearer {good}",
                                  "-H", "X-Spiffe-Jwt-Subject: spiffe://example.org/ns/shop/sa/admin")
        assert code == 200, err
        seen = app.seen[-1].headers
        assert seen.getall("X-Spiffe-Jwt-Subject") == [CHECKOUT] and seen["X-Spiffe-Jwt-Audience"] == "inventory"
        assert "Authorization" not in seen
        line = sc.audit_lines[-1]
        assert (line["decision"], line["jwt_subject"], line["jwt_audience"], line["jwt_kid"]) == (
            "allow", CHECKOUT, "inventory", "k1")
        assert good not in json.dumps(sc.audit_lines)  # the token never reaches the audit log
        # A valid token for another workload (binding fails): 403. Expired, wrong audience, unknown key: 401.
        for token, status, fragment in [
            (_token(key, REPORTING), 403, "is not the mTLS peer"),
            (_token(key, CHECKOUT, exp=1_000_000_000), 401, "expired"),
            (_token(key, CHECKOUT, aud="orders"), 401, "wrong_audience"),
            (_token(key, CHECKOUT, kid="other"), 401, "unknown_kid"),
        ]:
            code, _, err = await curl(pki, sc.port, path, pki.checkout, "-X", "POST", "-H",
                                      f"Authorization: Bearer {token}")  # fmt: skip
            assert code == status, (fragment, err)
            assert fragment in sc.audit_lines[-1]["reason"], sc.audit_lines[-1]["reason"]
        assert len(app.seen) == 1
        # The rest of the policy needs no token.
        code, _, _ = await curl(pki, sc.port, "/api/stock/42", pki.checkout)
        assert code == 200
    finally:
        await sc.server.drain(1)


async def test_forward_jwt_passes_the_validated_token_and_only_it_to_the_app(pki: Pki, app: App) -> None:
    key, holder = _jwt_key_and_bundles()
    sc = await start_sidecar(pki, app.port, policy=STEP_UP_POLICY, jwt_bundles=holder, forward_jwt=True)
    path = b"/api/stock/42/reserve"
    try:
        good = _token(key, CHECKOUT)
        code, _, err = await curl(pki, sc.port, path.decode(), pki.checkout, "-X", "POST",
                                  "-H", f"Authorization: Bearer {good}")  # fmt: skip
        assert code == 200, err
        seen = app.seen[-1].headers
        assert seen.getall("Authorization") == [f"Bearer {good}"]  # as received, once
        assert seen.getall("X-Spiffe-Jwt-Subject") == [CHECKOUT] and seen["X-Spiffe-Jwt-Audience"] == "inventory"
        line = sc.audit_lines[-1]
        assert (line["decision"], line["jwt_subject"], line["jwt_kid"]) == ("allow", CHECKOUT, "k1")
        assert good not in json.dumps(sc.audit_lines)  # forwarded to the app, still never logged
        # A second Authorization field was never validated: only the validated one reaches the app.
        out = await raw_exchange(pki, sc.port, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\nAuthorization: Bearer %s\r\nauthorization: Bearer forged\r\n"
                                 b"\r\n" % (path, good.encode()))  # fmt: skip
        assert out.startswith(b"HTTP/1.1 200 "), out[:200]
        assert app.seen[-1].headers.getall("Authorization") == [f"Bearer {good}"]
        # Forwarding changes nothing about validation: a token for another workload, or none, gets nowhere.
        code, _, err = await curl(pki, sc.port, path.decode(), pki.checkout, "-X", "POST",
                                  "-H", f"Authorization: Bearer {_token(key, REPORTING)}")  # fmt: skip
        assert code == 403, err
        out = await raw_exchange(pki, sc.port, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n" % path)  # fmt: skip
        assert out.startswith(b"HTTP/1.1 401 ")
        assert len(app.seen) == 2
    finally:
        await sc.server.drain(1)
    # The default (forward_jwt false) keeps every Authorization field from the app, the validated one too.
    sc = await start_sidecar(pki, app.port, policy=STEP_UP_POLICY, jwt_bundles=holder)
    try:
        out = await raw_exchange(pki, sc.port, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\nAuthorization: Bearer %s\r\nauthorization: Bearer forged\r\n"
                                 b"\r\n" % (path, _token(key, CHECKOUT).encode()))  # fmt: skip
        assert out.startswith(b"HTTP/1.1 200 "), out[:200]
        assert "Authorization" not in app.seen[-1].headers
        assert app.seen[-1].headers.getall("X-Spiffe-Jwt-Subject") == [CHECKOUT]
    finally:
        await sc.server.drain(1)


async def test_closed_connections_leave_no_cycles_for_the_gc(pki: Pki, app: App, sidecar: Sidecar) -> None:
    """A closed connection is freed by reference counting alone: nothing of it waits for the cyclic GC
    (17 objects per connection did: a deadline's bound callback, the reader and its parser)."""
    import gc

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i in range(5):
            out = await raw_exchange(pki, sidecar.port, b"GET /api/stock/%d HTTP/1.1\r\nHost: x\r\n"
                                     b"Connection: close\r\n\r\n" % i)  # fmt: skip
            assert out.startswith(b"HTTP/1.1 200 ")
        await until(lambda: sidecar.server.open_connections == 0)
        gc.collect()
        ours = [o for o in gc.garbage if type(o).__module__.split(".")[0] in ("sidecar", "httptools")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == [], f"{len(ours)} objects of closed connections needed the cyclic GC: {ours[:5]}"
