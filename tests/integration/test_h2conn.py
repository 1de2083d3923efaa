"""HTTP/2 and gRPC on the inbound mTLS listener (sidecar/h2conn.py) over real loopback TLS: grpcio as the
outside client and as the app (h2c), curl --http2 in front of the HTTP/1.1 recording app, and hostile frame
sequences written with hpack + hyperframe. Running example: checkout may call inventory's GET /api/stock/*
and every inventory.v1.Inventory method; nobody may call /admin/** or inventory.v1.Admin."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator

import grpc  # type: ignore[import-untyped]
import hyperframe.frame as hf
import pytest

from sidecar.config import AppProtocol, Timeouts
from tests.example import CHECKOUT, INVENTORY, REPORTING, TD
from tests.h2tools import (
    ADMIN,
    CALL_TIMEOUT,
    REQUEST,
    SERVICE,
    GrpcApp,
    RawH2,
    grpc_channel,
    in_thread,
    of_stream,
    rpc_error,
    start_grpc_app,
    start_h2_sidecar,
)
from tests.helpers import App, Pki, Sidecar, curl, free_port, until
from tests.pki import CA

pytestmark = pytest.mark.uvloop


@pytest.fixture
async def grpc_app() -> AsyncIterator[GrpcApp]:
    app = await asyncio.to_thread(start_grpc_app)
    yield app
    await asyncio.to_thread(app.stop)


@pytest.fixture
async def grpc_sidecar(pki: Pki, grpc_app: GrpcApp) -> AsyncIterator[Sidecar]:
    sc = await start_h2_sidecar(pki, grpc_app.port, app_protocol=AppProtocol.GRPC)
    yield sc
    await sc.server.drain(1.0)


@pytest.fixture
async def h1_sidecar(pki: Pki, app: App) -> AsyncIterator[Sidecar]:
    sc = await start_h2_sidecar(pki, app.port, app_protocol=AppProtocol.HTTP1)
    yield sc
    await sc.server.drain(1.0)


def _code(f: hf.Frame) -> int:
    """The error code of a RST_STREAM or GOAWAY frame."""
    assert isinstance(f, hf.RstStreamFrame | hf.GoAwayFrame)
    return int(f.error_code)


def _xfcc(pki: Pki) -> str:
    leaf_sha = hashlib.sha256(pki.checkout.der_list()[0]).hexdigest()
    return f"By={INVENTORY};Hash={leaf_sha};URI={CHECKOUT}"


# ---------------------------------------------------------------------------------------------------------
# gRPC through the sidecar to a grpcio app (app_protocol grpc)


async def test_all_four_grpc_call_shapes_work_through_the_sidecar(
    pki: Pki, grpc_app: GrpcApp, grpc_sidecar: Sidecar
) -> None:
    ch = grpc_channel(pki, grpc_sidecar.port, pki.checkout)
    try:
        unary = ch.unary_unary(f"/{SERVICE}/GetStock")
        server_stream = ch.unary_stream(f"/{SERVICE}/WatchStock")
        client_stream = ch.stream_unary(f"/{SERVICE}/ReserveMany")
        bidi = ch.stream_stream(f"/{SERVICE}/Chat")
        assert await in_thread(lambda: unary(b"42", timeout=CALL_TIMEOUT)) == b"stock:42"
        assert await in_thread(lambda: list(server_stream(b"5", timeout=CALL_TIMEOUT))) == [
            b"tick%d" % i for i in range(5)]  # fmt: skip
        # 300 KiB in 10 messages: more than a stream window both ways (flow control and acknowledgements).
        big = [bytes([i]) * 30_000 for i in range(10)]
        assert await in_thread(lambda: client_stream(iter(big), timeout=CALL_TIMEOUT)) == b"reserved:10:300000"

        def chat() -> list[bytes]:
            return list(bidi(iter([b"a", b"b" * 100_000, b"c"]), timeout=CALL_TIMEOUT))

        assert await in_thread(chat) == [b"echo:a", b"echo:" + b"b" * 100_000, b"echo:c"]
    finally:
        ch.close()
    assert [c[0] for c in grpc_app.calls] == ["GetStock", "WatchStock", "ReserveMany", "Chat"]
    for _name, md in grpc_app.calls:
        assert md["x-forwarded-client-cert"] == _xfcc(pki)  # on every stream
    lines = grpc_sidecar.audit_lines
    assert len(lines) == 4
    for line, method in zip(lines, ["GetStock", "WatchStock", "ReserveMany", "Chat"], strict=True):
        assert line["protocol"] == "grpc" and line["decision"] == "allow" and line["rule"] == "checkout-inventory-grpc"
        assert line["grpc_method"] == f"{SERVICE}/{method}" and line["grpc_status"] == "0"
        assert line["peer"] == CHECKOUT and line["method"] == "POST" and line["status"] == 200
    assert grpc_sidecar.metric("spiffe_sidecar_http2_streams_total", listener="inbound", protocol="grpc",
                               decision="allow") == 4  # fmt: skip


async def test_denied_grpc_method_gets_permission_denied_and_the_app_sees_nothing(
    pki: Pki, grpc_app: GrpcApp, grpc_sidecar: Sidecar
) -> None:
    ch = grpc_channel(pki, grpc_sidecar.port, pki.checkout)
    try:
        reset = ch.unary_unary(f"/{ADMIN}/Reset")
        err = await in_thread(lambda: rpc_error(lambda: reset(b"", timeout=CALL_TIMEOUT)))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED and err.details() == "permission denied"
        # A client stream that has not ended when the answer comes: Trailers-Only, then RST_STREAM(NO_ERROR).
        chat = ch.stream_stream(f"/{ADMIN}/Reset")

        def denied_stream() -> grpc.RpcError:
            return rpc_error(lambda: list(chat(iter([b"x"] * 3), timeout=CALL_TIMEOUT)))

        assert (await in_thread(denied_stream)).code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        ch.close()
    # reporting may call nothing, not even GetStock
    ch = grpc_channel(pki, grpc_sidecar.port, pki.reporting)
    try:
        get = ch.unary_unary(f"/{SERVICE}/GetStock")
        err = await in_thread(lambda: rpc_error(lambda: get(b"1", timeout=CALL_TIMEOUT)))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        ch.close()
    assert grpc_app.calls == []
    lines = grpc_sidecar.audit_lines
    assert [(ln["peer"], ln["rule"], ln["decision"]) for ln in lines] == [
        (CHECKOUT, "no-admin-grpc", "deny"), (CHECKOUT, "no-admin-grpc", "deny"), (REPORTING, "default-deny", "deny")]
    assert lines[0]["grpc_method"] == f"{ADMIN}/Reset" and lines[0]["grpc_status"] == "7"
    assert lines[0]["protocol"] == "grpc" and lines[0]["reason"] == "denied by rule 'no-admin-grpc'"


async def test_grpc_without_or_with_a_wrong_client_certificate_is_refused_at_the_handshake(
    pki: Pki, grpc_app: GrpcApp, grpc_sidecar: Sidecar
) -> None:
    for leaf in (None, CA.root(TD).leaf(CHECKOUT)):  # no certificate; a valid-looking one from an unknown CA
        ch = grpc_channel(pki, grpc_sidecar.port, leaf)
        try:
            get = ch.unary_unary(f"/{SERVICE}/GetStock")
            err = await in_thread(lambda get=get: rpc_error(lambda: get(b"1", timeout=CALL_TIMEOUT)))  # type: ignore[misc]
            assert err.code() is grpc.StatusCode.UNAVAILABLE
        finally:
            ch.close()
    assert grpc_app.calls == []
    assert grpc_sidecar.audit_lines == []
    await until(lambda: grpc_sidecar.metric("spiffe_sidecar_handshake_failures_total", listener="inbound",
                                             reason="no_client_certificate") >= 1)  # fmt: skip
    await until(lambda: grpc_sidecar.metric("spiffe_sidecar_handshake_failures_total", listener="inbound",
                                             reason="bad_chain") >= 1)  # fmt: skip


async def test_grpc_app_down_is_unavailable(pki: Pki) -> None:
    sc = await start_h2_sidecar(pki, free_port(), app_protocol=AppProtocol.GRPC)
    try:
        ch = grpc_channel(pki, sc.port, pki.checkout)
        try:
            get = ch.unary_unary(f"/{SERVICE}/GetStock")
            err = await in_thread(lambda: rpc_error(lambda: get(b"1", timeout=CALL_TIMEOUT, wait_for_ready=False)))
            assert err.code() is grpc.StatusCode.UNAVAILABLE
        finally:
            ch.close()
        line = sc.audit_lines[-1]
        assert line["decision"] == "allow" and line["upstream_failure"] == "connect_refused"
        assert line["grpc_status"] == "14"
    finally:
        await sc.server.drain(1.0)


async def test_grpc_to_an_http1_app_is_refused_with_a_reason(pki: Pki, app: App, h1_sidecar: Sidecar) -> None:
    ch = grpc_channel(pki, h1_sidecar.port, pki.checkout)
    try:
        get = ch.unary_unary(f"/{SERVICE}/GetStock")
        err = await in_thread(lambda: rpc_error(lambda: get(b"1", timeout=CALL_TIMEOUT)))
        assert err.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        ch.close()
    assert app.seen == []
    line = h1_sidecar.audit_lines[-1]
    assert line["decision"] == "allow" and line["upstream_failure"] == "grpc_to_http1_app"


async def test_failed_jwt_step_up_on_grpc_is_unauthenticated(pki: Pki, grpc_app: GrpcApp) -> None:
    policy = {"rules": [{"name": "reserve-with-jwt", "action": "allow", "grpc": [f"{SERVICE}/ReserveMany"],
                         "callers": [CHECKOUT], "jwt": {"audience": "inventory"}}]}  # fmt: skip
    sc = await start_h2_sidecar(pki, grpc_app.port, app_protocol=AppProtocol.GRPC, policy=policy)
    try:
        ch = grpc_channel(pki, sc.port, pki.checkout)
        try:
            reserve = ch.stream_unary(f"/{SERVICE}/ReserveMany")
            err = await in_thread(lambda: rpc_error(lambda: reserve(iter([b"1"]), timeout=CALL_TIMEOUT)))
            assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        finally:
            ch.close()
        assert grpc_app.calls == []
        line = sc.audit_lines[-1]
        assert line["decision"] == "deny" and line["rule"] == "reserve-with-jwt" and line["grpc_status"] == "16"
    finally:
        await sc.server.drain(1.0)


async def test_a_caller_that_gives_up_cancels_the_apps_stream(pki: Pki, grpc_app: GrpcApp) -> None:
    sc = await start_h2_sidecar(pki, grpc_app.port, app_protocol=AppProtocol.GRPC,
                                timeouts=Timeouts(handshake=3, request_head=3, idle=5, upstream_connect=1,
                                                  upstream_response=0.5, drain=5))  # fmt: skip
    try:
        ch = grpc_channel(pki, sc.port, pki.checkout)
        try:
            # A client stream the app waits on (ReserveMany answers at the end of the request) that does not
            # end in time: at the client's deadline (2 s) the call ends on both legs, and the audit line says
            # who gave up.
            reserve = ch.stream_unary(f"/{SERVICE}/ReserveMany")

            def forever() -> Iterator[bytes]:
                yield b"x"
                import time

                time.sleep(3)

            err = await in_thread(lambda: rpc_error(lambda: reserve(forever(), timeout=2)))
            assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            ch.close()
        await until(lambda: len(sc.audit_lines) == 1)
        # The caller's deadline reached the app too (grpc-timeout is forwarded): whichever side gave up first
        # reset its stream; the other stream was reset by us.
        assert sc.audit_lines[0]["upstream_failure"] in ("caller_reset", "reset")
        assert [c[0] for c in grpc_app.calls] == ["ReserveMany"]
    finally:
        await sc.server.drain(1.0)


# ---------------------------------------------------------------------------------------------------------
# curl --http2 in front of the HTTP/1.1 app (app_protocol http1)


async def test_curl_http2_to_an_http1_app(pki: Pki, app: App, h1_sidecar: Sidecar) -> None:
    spoof = "URI=spiffe://example.org/ns/shop/sa/admin"
    spoofs = ["-H", f"X-Forwarded-Client-Cert: {spoof}", "-H", f"x_forwarded_client_cert: {spoof}"]
    code, body, err = await curl(pki, h1_sidecar.port, "/api/stock/42?x=1", pki.checkout, "--http2", "-v", *spoofs)
    assert code == 200 and "using HTTP/2" in err, err
    seen = app.seen[0]
    assert seen.path == "/api/stock/42?x=1" and seen.headers.getall("X-Forwarded-Client-Cert") == [_xfcc(pki)]
    assert "x_forwarded_client_cert" not in {k.lower() for k in seen.headers}
    assert seen.headers["Host"] == f"localhost:{h1_sidecar.port}"
    code, body, _ = await curl(pki, h1_sidecar.port, "/api/stock/42", pki.checkout, "--http2", "-X", "POST",
                               "--data-binary", "x" * 100_000)  # fmt: skip
    assert code == 200 and json.loads(body)["len"] == 100_000
    code, body, _ = await curl(pki, h1_sidecar.port, "/admin/users", pki.checkout, "--http2")
    assert code == 403 and json.loads(body) == {"error": "forbidden"}
    code, body, _ = await curl(pki, h1_sidecar.port, "/api/stock/1", pki.reporting, "--http2")
    assert code == 403
    assert len(app.seen) == 2
    lines = h1_sidecar.audit_lines
    assert [(ln["protocol"], ln["status"], ln["decision"]) for ln in lines] == [
        ("h2", 200, "allow"), ("h2", 200, "allow"), ("h2", 403, "deny"), ("h2", 403, "deny")]
    assert lines[2]["rule"] == "no-admin"
    # A client that offers only HTTP/1.1 is still served by the HTTP/1 path on the same port.
    code, _, err = await curl(pki, h1_sidecar.port, "/api/stock/7", pki.checkout, "--http1.1")
    assert code == 200 and h1_sidecar.audit_lines[-1]["protocol"] == "HTTP/1.1"


async def test_non_grpc_request_to_a_grpc_app_is_415(pki: Pki, grpc_app: GrpcApp, grpc_sidecar: Sidecar) -> None:
    code, _body, _ = await curl(pki, grpc_sidecar.port, "/api/stock/1", pki.checkout, "--http2")
    assert code == 415
    assert grpc_app.calls == []


# ---------------------------------------------------------------------------------------------------------
# Hostile frame sequences (RFC 9113 §8; notes §1-§3): what the caller gets, and the app sees nothing


@pytest.mark.parametrize(
    ("case", "fields", "answer"),
    [
        ("uppercase_name", [*REQUEST, ("X-Foo", "1")], "rst"),
        ("crlf_in_value", [*REQUEST, ("x-foo", "a\r\nhost: evil")], "rst"),
        ("connection_header", [*REQUEST, ("connection", "close")], "rst"),
        ("content_length_on_bodiless_headers", [(":method", "POST"), (":scheme", "https"),
                                                (":path", "/api/stock/1"), (":authority", "localhost"),
                                                ("content-length", "5")], "rst"),
        ("path_not_origin_form", [(":method", "GET"), (":scheme", "https"), (":path", "http://evil/api/stock/1"),
                                  (":authority", "localhost")], "rst"),
        ("dot_dot_above_root", [(":method", "GET"), (":scheme", "https"), (":path", "/../admin"),
                          (":authority", "localhost")], "400"),
        ("token_violation_in_name", [*REQUEST, ("x{y", "1")], "rst"),
        ("authority_with_userinfo", [(":method", "GET"), (":scheme", "https"), (":path", "/api/stock/1"),
                                     (":authority", "user@localhost")], "rst"),
        ("control_char_in_value", [*REQUEST, ("x-foo", "a\x01b")], "rst"),
    ],
)  # fmt: skip
async def test_malformed_requests_are_refused_and_never_reach_the_app(
    pki: Pki, app: App, h1_sidecar: Sidecar, case: str, fields: list[tuple[str, str]], answer: str
) -> None:
    raw = await RawH2.open(pki, h1_sidecar.port, pki.checkout)
    try:
        raw.send(raw.headers(1, fields))
        frames = await raw.frames(lambda fs: bool(of_stream(fs, 1, hf.RstStreamFrame)
                                                  or of_stream(fs, 1, hf.HeadersFrame)))  # fmt: skip
        if answer == "rst":
            rst = of_stream(frames, 1, hf.RstStreamFrame)
            assert rst and _code(rst[0]) == 0x1, [type(f).__name__ for f in frames]  # PROTOCOL_ERROR
        else:
            head = of_stream(frames, 1, hf.HeadersFrame)
            assert head and raw.decode(head[0])[":status"] == "400"
        # The connection survives one bad stream (a stream error, not a connection error: RFC 9113 §8.1.1).
        raw.send(raw.headers(3, REQUEST))
        frames = await raw.frames(lambda fs: bool(of_stream(fs, 3, hf.HeadersFrame)))
        assert raw.decode(of_stream(frames, 3, hf.HeadersFrame)[0])[":status"] == "200"
    finally:
        raw.close()
    assert [s.path for s in app.seen] == ["/api/stock/1"]  # only the good stream


async def test_connect_is_refused(pki: Pki, app: App, h1_sidecar: Sidecar) -> None:
    raw = await RawH2.open(pki, h1_sidecar.port, pki.checkout)
    try:
        raw.send(raw.headers(1, [(":method", "CONNECT"), (":authority", "localhost:443")], end_stream=False))
        frames = await raw.frames(lambda fs: bool(of_stream(fs, 1, hf.RstStreamFrame)))
        head = of_stream(frames, 1, hf.HeadersFrame)
        assert head and raw.decode(head[0])[":status"] == "400"
        assert _code(of_stream(frames, 1, hf.RstStreamFrame)[0]) == 0  # the rest is not needed (§8.1)
    finally:
        raw.close()
    assert app.seen == []
    assert h1_sidecar.metric("spiffe_sidecar_bad_requests_total", reason="h2_headers") == 1


async def test_content_length_mismatch_with_data_is_refused(pki: Pki, app: App, h1_sidecar: Sidecar) -> None:
    raw = await RawH2.open(pki, h1_sidecar.port, pki.checkout)
    post = [(":method", "POST"), (":scheme", "https"), (":path", "/api/stock/1"), (":authority", "localhost"),
            ("content-length", "10")]  # fmt: skip
    try:
        raw.send(raw.headers(1, post, end_stream=False) + raw.data(1, b"abc", end_stream=True))
        frames = await raw.frames(lambda fs: bool(of_stream(fs, 1, hf.RstStreamFrame)))
        assert _code(of_stream(frames, 1, hf.RstStreamFrame)[0]) == 0x1
        assert not of_stream(frames, 1, hf.HeadersFrame)
    finally:
        raw.close()
    await asyncio.sleep(0.2)
    assert app.seen == []


async def test_rapid_reset_burst_gets_goaway_and_nothing_reaches_the_app(
    pki: Pki, app: App, h1_sidecar: Sidecar
) -> None:
    raw = await RawH2.open(pki, h1_sidecar.port, pki.checkout)
    try:
        # CVE-2023-44487: HEADERS then RST_STREAM, 300 times, in one write (one TLS record, one read).
        burst = b"".join(raw.headers(2 * i + 1, REQUEST) + raw.rst(2 * i + 1) for i in range(300))
        assert len(burst) < 16_000
        raw.send(burst)
        frames = await raw.frames()
        assert raw.closed
        goaway = [f for f in frames if isinstance(f, hf.GoAwayFrame)]
        assert goaway and _code(goaway[0]) != 0
        assert not [f for f in frames if isinstance(f, hf.HeadersFrame)]  # no stream was answered
    finally:
        raw.close()
    assert app.seen == []
    assert h1_sidecar.audit_lines == []
    await until(lambda: h1_sidecar.metric("spiffe_sidecar_http2_events_total", listener="inbound",
                                          event="rapid_reset") == 1)  # fmt: skip
    assert h1_sidecar.metric("spiffe_sidecar_http2_events_total", listener="inbound", event="early_reset") >= 100


async def test_continuation_flood_closes_the_connection(pki: Pki, app: App, h1_sidecar: Sidecar) -> None:
    raw = await RawH2.open(pki, h1_sidecar.port, pki.checkout)
    try:
        # CVE-2024-27316 class: a field block that never ends, in empty CONTINUATION frames.
        raw.send(raw.headers(1, REQUEST, end_headers=False) + b"".join(raw.continuation(1) for _ in range(50)))
        frames = await raw.frames()
        assert raw.closed
        assert not [f for f in frames if isinstance(f, hf.HeadersFrame)]
    finally:
        raw.close()
    assert app.seen == []
    await until(lambda: h1_sidecar.metric("spiffe_sidecar_http2_events_total", listener="inbound",
                                          event="flood") == 1)  # fmt: skip


async def test_too_many_concurrent_streams_are_refused(pki: Pki, app: App, h1_sidecar: Sidecar) -> None:
    raw = await RawH2.open(pki, h1_sidecar.port, pki.checkout)
    post = [(":method", "POST"), (":scheme", "https"), (":path", "/api/stock/1"), (":authority", "localhost")]
    try:
        # 105 open streams (bodies never end): past SETTINGS_MAX_CONCURRENT_STREAMS 100 they are refused.
        raw.send(b"".join(raw.headers(2 * i + 1, post, end_stream=False) for i in range(105)))
        frames = await raw.frames(lambda fs: len([f for f in fs if isinstance(f, hf.RstStreamFrame)]) >= 5)
        refused = [f for f in frames if isinstance(f, hf.RstStreamFrame)]
        assert {_code(f) for f in refused} == {0x7} and min(f.stream_id for f in refused) > 200  # REFUSED_STREAM
    finally:
        raw.close()


async def test_idle_connection_without_streams_is_closed(pki: Pki, app: App) -> None:
    sc = await start_h2_sidecar(pki, app.port, app_protocol=AppProtocol.HTTP1,
                                timeouts=Timeouts(handshake=3, request_head=0.5, idle=0.5, upstream_connect=1,
                                                  upstream_response=5, drain=5))  # fmt: skip
    try:
        raw = await RawH2.open(pki, sc.port, pki.checkout)
        try:
            # PINGs are answered but never keep a connection without streams open.
            ping = hf.PingFrame(0)
            ping.opaque_data = b"12345678"
            for _ in range(3):
                raw.send(bytes(ping.serialize()))
                await asyncio.sleep(0.2)
            frames = await raw.frames(timeout=3)
            assert raw.closed
            assert [f for f in frames if isinstance(f, hf.GoAwayFrame)]
        finally:
            raw.close()
    finally:
        await sc.server.drain(1.0)
