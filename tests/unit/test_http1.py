"""sidecar/http1.py: smuggling checks, head rewriting, fixed responses (parsed back with httptools)."""

from __future__ import annotations

import json
from typing import Any

import httptools
import pytest

from sidecar.errors import SidecarError
from sidecar.http1 import (
    REQUEST_DROP,
    RESPONSE_100,
    RESPONSE_400,
    RESPONSE_403,
    RESPONSE_403_CLOSE,
    RESPONSE_403_HEAD,
    RESPONSE_413,
    RESPONSE_431,
    RESPONSE_502,
    RESPONSE_503,
    RESPONSE_504,
    ROUTING_OVERRIDE_HEADERS,
    BadRequest,
    BodyFraming,
    build_request_head,
    build_response_head,
    check_method,
    check_request_headers,
    request_drop,
    xfcc_value,
)
from sidecar.identity import SpiffeId
from sidecar.policy import BadRequest as PolicyBadRequest
from tests import example

OWN = SpiffeId.parse(example.INVENTORY)
PEER = SpiffeId.parse(example.CHECKOUT)
HASH = "ab" * 32


class _Recorder:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False
        self.parser: Any = None
        self.keep_alive: bool | None = None

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def parse_request(raw: bytes) -> tuple[Any, _Recorder]:
    rec = _Recorder()
    parser = rec.parser = httptools.HttpRequestParser(rec)
    parser.feed_data(raw)
    return parser, rec


def parse_response(raw: bytes) -> tuple[Any, _Recorder]:
    rec = _Recorder()
    parser = rec.parser = httptools.HttpResponseParser(rec)
    parser.feed_data(raw)
    return parser, rec


def test_bad_request_is_one_class() -> None:
    assert BadRequest is PolicyBadRequest
    assert issubclass(BadRequest, SidecarError)
    assert BadRequest("why").reason == "why"


# ---------------------------------------------------------------------------------------------------------
# check_request_headers


H = list[tuple[bytes, bytes]]
HOST: H = [(b"Host", b"inventory")]


@pytest.mark.parametrize(
    ("headers", "version", "body", "length", "keep_alive", "expect", "upgrade"),
    [
        (HOST, "1.1", BodyFraming.NONE, None, True, False, None),
        ([], "1.0", BodyFraming.NONE, None, False, False, None),
        ([(b"Connection", b"keep-alive")], "1.0", BodyFraming.NONE, None, True, False, None),
        ([*HOST, (b"Connection", b"close")], "1.1", BodyFraming.NONE, None, False, False, None),
        ([*HOST, (b"connection", b"foo, Close")], "1.1", BodyFraming.NONE, None, False, False, None),
        ([*HOST, (b"Content-Length", b"12")], "1.1", BodyFraming.CONTENT_LENGTH, 12, True, False, None),
        ([*HOST, (b"Content-Length", b"0 ")], "1.1", BodyFraming.CONTENT_LENGTH, 0, True, False, None),
        ([*HOST, (b"Transfer-Encoding", b"Chunked")], "1.1", BodyFraming.CHUNKED, None, True, False, None),
        (
            [*HOST, (b"Expect", b"100-Continue"), (b"Content-Length", b"5")],
            "1.1",
            BodyFraming.CONTENT_LENGTH,
            5,
            True,
            True,
            None,
        ),
        (
            [*HOST, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
            "1.1",
            BodyFraming.NONE,
            None,
            True,
            False,
            b"websocket",
        ),
        ([*HOST, (b"Upgrade", b"websocket")], "1.1", BodyFraming.NONE, None, True, False, None),
        (
            [*HOST, (b"Connection", b"upgrade"), (b"Upgrade", b"WebSocket")],
            "1.1",
            BodyFraming.NONE,
            None,
            True,
            False,
            b"WebSocket",
        ),
        # h2c would carry many requests the policy never sees; TLS upgrade is meaningless here: ignored.
        (
            [*HOST, (b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c")],
            "1.1",
            BodyFraming.NONE,
            None,
            True,
            False,
            None,
        ),
        (
            [*HOST, (b"Connection", b"Upgrade"), (b"Upgrade", b"TLS/1.2")],
            "1.1",
            BodyFraming.NONE,
            None,
            True,
            False,
            None,
        ),
        ([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], "1.0", BodyFraming.NONE, None, False, False, None),
        ([*HOST, (b"X-Bin", b"caf\xc3\xa9\tok")], "1.1", BodyFraming.NONE, None, True, False, None),
    ],
)
def test_framing(
    headers: H,
    version: str,
    body: BodyFraming,
    length: int | None,
    keep_alive: bool,
    expect: bool,
    upgrade: bytes | None,
) -> None:
    f = check_request_headers(headers, version=version)
    assert (f.body, f.content_length, f.keep_alive, f.expect_continue, f.upgrade) == (
        body,
        length,
        keep_alive,
        expect,
        upgrade,
    )
    assert f.chunked == (body is BodyFraming.CHUNKED)


SMUGGLING: list[tuple[str, H, str]] = [
    ("CL+TE", [*HOST, (b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")], "both"),
    ("TE+CL", [*HOST, (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")], "both"),
    ("two CL same", [*HOST, (b"Content-Length", b"5"), (b"Content-Length", b"5")], "more than one"),
    ("two CL differ", [*HOST, (b"Content-Length", b"5"), (b"content-length", b"6")], "more than one"),
    ("CL list", [*HOST, (b"Content-Length", b"1, 1")], "single decimal"),
    ("CL list differ", [*HOST, (b"Content-Length", b"1,2")], "single decimal"),
    ("CL sign", [*HOST, (b"Content-Length", b"+5")], "single decimal"),
    ("CL negative", [*HOST, (b"Content-Length", b"-1")], "single decimal"),
    ("CL hex", [*HOST, (b"Content-Length", b"0x10")], "single decimal"),
    ("CL empty", [*HOST, (b"Content-Length", b"")], "single decimal"),
    ("CL huge", [*HOST, (b"Content-Length", b"9" * 19)], "single decimal"),
    ("CL inner space", [*HOST, (b"Content-Length", b"1 2")], "single decimal"),
    ("TE gzip", [*HOST, (b"Transfer-Encoding", b"gzip")], "chunked"),
    ("TE gzip,chunked", [*HOST, (b"Transfer-Encoding", b"gzip, chunked")], "chunked"),
    ("TE chunked twice", [*HOST, (b"Transfer-Encoding", b"chunked, chunked")], "chunked"),
    ("TE two fields", [*HOST, (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], "more than one"),
    ("TE xchunked", [*HOST, (b"Transfer-Encoding", b"xchunked")], "chunked"),
    ("TE identity", [*HOST, (b"Transfer-Encoding", b"identity")], "chunked"),
    ("TE vertical tab", [*HOST, (b"Transfer-Encoding", b"\x0bchunked")], "control"),
    ("TE on 1.0", [(b"Transfer-Encoding", b"chunked")], "HTTP/1.0"),
    ("name with space", [*HOST, (b"Transfer-Encoding ", b"chunked")], "header name"),
    ("name with colon", [*HOST, (b"X:Y", b"1")], "header name"),
    ("empty name", [*HOST, (b"", b"1")], "header name"),
    ("name non-ascii", [*HOST, (b"X-\xc3\xa9", b"1")], "header name"),
    ("value NUL", [*HOST, (b"X-A", b"a\x00b")], "control"),
    ("value CR", [*HOST, (b"X-A", b"a\rb")], "control"),
    ("value LF", [*HOST, (b"X-A", b"a\nTransfer-Encoding: chunked")], "control"),
    ("value DEL", [*HOST, (b"X-A", b"a\x7f")], "control"),
    ("obs-fold", [*HOST, (b"X-A", b" continued")], "folding"),
    ("no Host", [(b"Accept", b"*/*")], "missing Host"),
    ("two Host", [*HOST, (b"host", b"evil")], "more than one Host"),
    ("two Upgrade", [*HOST, (b"Upgrade", b"a"), (b"Upgrade", b"b")], "more than one Upgrade"),
    ("Expect other", [*HOST, (b"Expect", b"something")], "expectation"),
    # Host must be uri-host [":" port] (issue 10 #4).
    ("Host slash", [(b"Host", b"inventory/admin")], "valid host"),
    ("Host space", [(b"Host", b"inv entory")], "valid host"),
    ("Host userinfo", [(b"Host", b"user@inventory")], "valid host"),
    ("Host query", [(b"Host", b"inventory?x")], "valid host"),
    ("Host fragment", [(b"Host", b"inventory#x")], "valid host"),
    ("Host backslash", [(b"Host", b"inventory\\x")], "valid host"),
    ("Host bad port", [(b"Host", b"inventory:80a")], "valid host"),
    ("Host two ports", [(b"Host", b"inventory:80:81")], "valid host"),
    ("Host long port", [(b"Host", b"inventory:123456")], "valid host"),
    ("Host bad pct", [(b"Host", b"inv%zzentory")], "valid host"),
    ("Host unclosed v6", [(b"Host", b"[::1")], "valid host"),
    ("Host non-ascii", [(b"Host", b"caf\xc3\xa9")], "valid host"),
    # Connection may not name a field routing, framing or identity depends on (issue 10 #3).
    ("Connection: host", [*HOST, (b"Connection", b"close, Host")], "Connection names host"),
    ("Connection: CL", [*HOST, (b"Connection", b"content-length"), (b"Content-Length", b"1")], "content-length"),
    ("Connection: TE", [*HOST, (b"Connection", b"Transfer-Encoding")], "transfer-encoding"),
    ("Connection: XFCC", [*HOST, (b"Connection", b"X-Forwarded-Client-Cert")], "x-forwarded-client-cert"),
]


@pytest.mark.parametrize(
    "host",
    [b"inventory", b"inventory:8443", b"inventory.shop.svc.cluster.local:80", b"127.0.0.1:8443", b"[::1]:8443",
     b"[v1.fe80::a+en1]", b"a-b_c~d", b"", b"inventory:", b"%41bc", b"x!$&'()*+,;=y"],
)
def test_valid_hosts_are_accepted(host: bytes) -> None:
    check_request_headers([(b"Host", host)])


def test_connection_may_still_name_ordinary_hop_by_hop_fields() -> None:
    f = check_request_headers([*HOST, (b"Connection", b"TE, keep-alive, X-Secret"), (b"TE", b"trailers")])
    assert f.keep_alive


@pytest.mark.parametrize(("case", "headers", "fragment"), SMUGGLING, ids=[c[0] for c in SMUGGLING])
def test_smuggling_rejected(case: str, headers: H, fragment: str) -> None:
    version = "1.0" if case == "TE on 1.0" else "1.1"
    with pytest.raises(BadRequest) as e:
        check_request_headers(headers, version=version)
    assert fragment in e.value.reason


# Raw requests through the real parser: every one must be stopped by httptools or by us.
RAW_SMUGGLING = [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nh",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("raw", RAW_SMUGGLING)
def test_raw_smuggling_stopped_by_parser_or_check(raw: bytes) -> None:
    try:
        parser, rec = parse_request(raw)
    except httptools.HttpParserError:
        return
    with pytest.raises(BadRequest):
        check_request_headers(rec.headers, version=parser.get_http_version())


# ---------------------------------------------------------------------------------------------------------
# Request head


def test_request_head_strips_hop_by_hop_and_spoofed_identity() -> None:
    xfcc = xfcc_value(OWN, HASH, PEER)
    headers: H = [
        (b"Host", b"inventory:8443"),
        (b"Accept", b"*/*"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"X-Secret", b"hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"X-Forwarded-Client-Cert", b"By=spiffe://evil;URI=spiffe://example.org/ns/shop/sa/admin"),
        (b"x-forwarded-client-cert", b"URI=spiffe://evil"),
        (b"X-Custom", b"kept  "),
    ]
    head = build_request_head(
        b"POST",
        b"/api/stock/42?x=1",
        headers,
        xfcc=xfcc,
        chunked=True,
        content_length=None,
        upgrade=None,
        host_fallback=b"127.0.0.1:8080",
    )
    assert head == (
        b"POST /api/stock/42?x=1 HTTP/1.1\r\n"
        b"Host: inventory:8443\r\n"
        b"Accept: */*\r\n"
        b"X-Custom: kept\r\n"
        b"x-forwarded-client-cert: By=spiffe://example.org/ns/shop/sa/inventory;Hash="
        + HASH.encode()
        + b";URI=spiffe://example.org/ns/shop/sa/checkout\r\n"
        b"transfer-encoding: chunked\r\n"
        b"\r\n"
    )
    _parser, rec = parse_request(head + b"0\r\n\r\n")
    assert rec.complete and rec.url == b"/api/stock/42?x=1"
    assert [v for n, v in rec.headers if n.lower() == b"x-forwarded-client-cert"] == [xfcc]


def test_request_head_content_length_host_fallback_upgrade() -> None:
    head = build_request_head(
        b"GET",
        b"/",
        [(b"Content-Length", b"999")],
        xfcc=b"X",
        chunked=False,
        content_length=3,
        upgrade=None,
        host_fallback=b"127.0.0.1:8080",
    )
    assert head == (
        b"GET / HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nx-forwarded-client-cert: X\r\ncontent-length: 3\r\n\r\n"
    )
    head = build_request_head(
        b"GET",
        b"/ws",
        [(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Key", b"k")],
        xfcc=b"X",
        chunked=False,
        content_length=None,
        upgrade=b"websocket",
        host_fallback=None,
    )
    assert head == (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: k\r\nx-forwarded-client-cert: X\r\n"
        b"connection: upgrade\r\nupgrade: websocket\r\n\r\n"
    )
    with pytest.raises(httptools.HttpParserUpgrade):  # httptools' way of saying "now switch protocols"
        parse_request(head)
    with pytest.raises(ValueError):
        build_request_head(
            b"GET", b"/", [], xfcc=b"X", chunked=True, content_length=1, upgrade=None, host_fallback=None
        )


def test_routing_override_headers_are_dropped_by_default() -> None:
    headers: H = [(b"Host", b"a"), (b"X-Original-URL", b"/admin"), (b"X-Rewrite-URL", b"/admin"),
                  (b"X-HTTP-Method-Override", b"DELETE"), (b"x-http-method", b"DELETE"),
                  (b"X-Method-Override", b"DELETE"), (b"X-Override-URL", b"/admin"), (b"X-Original-URI", b"/a"),
                  (b"X-Keep", b"1")]
    assert {h.encode() for h in ROUTING_OVERRIDE_HEADERS} <= REQUEST_DROP
    head = build_request_head(b"GET", b"/api", headers, xfcc=b"X", chunked=False, content_length=None,
                              upgrade=None, host_fallback=None)
    assert head == b"GET /api HTTP/1.1\r\nHost: a\r\nX-Keep: 1\r\nx-forwarded-client-cert: X\r\n\r\n"
    # A configured list replaces the default one: here only X-Keep is dropped.
    head = build_request_head(b"GET", b"/api", headers, xfcc=b"X", chunked=False, content_length=None,
                              upgrade=None, host_fallback=None, drop=request_drop(["X-Keep"]))
    assert b"X-Keep" not in head and b"X-Original-URL: /admin" in head
    assert b"x-forwarded-client-cert: X" in head and head.count(b"x-forwarded-client-cert") == 1


# ---------------------------------------------------------------------------------------------------------
# Response head


def test_response_head() -> None:
    headers: H = [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"2"),
        (b"Connection", b"keep-alive, X-Internal"),
        (b"X-Internal", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    head = build_response_head(200, b"OK", headers, keep_alive=True, chunked=False, content_length=2)
    assert head == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"content-length: 2\r\n\r\n"
    )
    head = build_response_head(200, b"OK", headers, keep_alive=False, chunked=True, content_length=None)
    assert head.endswith(b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
    _parser, rec = parse_response(head + b"2\r\n{}\r\n0\r\n\r\n")
    assert rec.complete and rec.body == b"{}" and rec.keep_alive is False
    head = build_response_head(204, b"No Content", headers, keep_alive=True, chunked=False, content_length=0)
    assert b"content-length" not in head.lower()
    head = build_response_head(
        101,
        b"Switching Protocols",
        [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", b"x")],
        keep_alive=True,
        chunked=False,
        content_length=None,
        upgrade=b"websocket",
    )
    assert head == (
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\nconnection: upgrade\r\n"
        b"upgrade: websocket\r\n\r\n"
    )


# ---------------------------------------------------------------------------------------------------------
# Fixed responses and XFCC


@pytest.mark.parametrize(
    ("raw", "status", "close", "error"),
    [
        (RESPONSE_400, 400, True, "bad request"),
        (RESPONSE_403, 403, False, "forbidden"),
        (RESPONSE_403_CLOSE, 403, True, "forbidden"),
        (RESPONSE_413, 413, True, "content too large"),
        (RESPONSE_431, 431, True, "request header fields too large"),
        (RESPONSE_502, 502, True, "bad gateway"),
        (RESPONSE_503, 503, True, "service unavailable"),
        (RESPONSE_504, 504, True, "gateway timeout"),
    ],
)
def test_fixed_responses(raw: bytes, status: int, close: bool, error: str) -> None:
    parser, rec = parse_response(raw)
    assert rec.complete
    assert parser.get_status_code() == status
    assert rec.keep_alive == (not close)
    assert ((b"connection", b"close") in rec.headers) == close
    assert json.loads(rec.body) == {"error": error}
    assert (b"content-length", str(len(rec.body)).encode()) in rec.headers


def test_403_reveals_no_policy() -> None:
    assert RESPONSE_403.endswith(b'\r\n\r\n{"error":"forbidden"}')
    assert RESPONSE_403[: -len(b'{"error":"forbidden"}')] == RESPONSE_403_HEAD
    assert RESPONSE_100 == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_xfcc_value() -> None:
    assert xfcc_value(OWN, HASH.upper(), PEER) == (
        b"By=spiffe://example.org/ns/shop/sa/inventory;Hash="
        + HASH.encode()
        + b";URI=spiffe://example.org/ns/shop/sa/checkout"
    )
    for bad in ("", "ab", "zz" * 32, HASH + "00"):
        with pytest.raises(ValueError):
            xfcc_value(OWN, bad, PEER)


def test_request_fields_with_underscores_are_dropped() -> None:
    # CGI/WSGI/Rack map `_` and `-` to one variable: X_Forwarded_Client_Cert would be a second XFCC the
    # app reads first; Transfer_Encoding / Content_Length would be framing we never honoured.
    headers: H = [
        (b"Host", b"inventory"),
        (b"X_Forwarded_Client_Cert", b"URI=spiffe://example.org/ns/shop/sa/admin"),
        (b"x-forwarded_client-cert", b"URI=spiffe://evil"),
        (b"Transfer_Encoding", b"chunked"),
        (b"Content_Length", b"5"),
        (b"Host_", b"evil"),
        (b"X_Custom", b"dropped too (nginx's default)"),
        (b"X-Custom", b"kept"),
    ]
    head = build_request_head(b"GET", b"/x", headers, xfcc=xfcc_value(OWN, HASH, PEER), chunked=False,
                              content_length=None, upgrade=None, host_fallback=None)
    names = [line.split(b":", 1)[0] for line in head.split(b"\r\n")[1:] if line]
    assert names == [b"Host", b"X-Custom", b"x-forwarded-client-cert"]
    assert not any(b"_" in n for n in names)
    # The app's response fields are the app's business: underscores are kept there.
    resp = build_response_head(200, b"OK", [(b"X_App", b"1")], keep_alive=True, chunked=False, content_length=0)
    assert b"X_App: 1\r\n" in resp


def test_connect_is_refused() -> None:
    with pytest.raises(BadRequest, match="CONNECT"):
        check_method(b"CONNECT")
    for method in (b"GET", b"POST", b"OPTIONS", b"connect"):
        check_method(method)  # httptools upper-cases known methods; anything else is not CONNECT
