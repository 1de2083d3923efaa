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


# ---------------------------------------------------------------------------------------------------------
# The checked response path, the head caches and the head sizes (data plane rebuild, issue 11)

import string  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sidecar.http1 import (  # noqa: E402
    _HEAD_CACHE_BYTES,
    _HEAD_CACHE_MAX,
    CHUNK_END,
    BadResponse,
    RequestHead,
    RequestHeads,
    ResponseFraming,
    ResponseHead,
    ResponseHeads,
    chunk,
    identity_line,
    interim_head,
    parse_request_head,
    parse_response_head,
    request_head,
    switching_head,
)


def response(
    names: Sequence[bytes],
    values: Sequence[bytes],
    status: int = 200,
    *,
    head_request: bool = False,
    keep_alive: bool = True,
    http10_peer: bool = False,
    http10_upstream: bool = False,
) -> ResponseHead:
    return parse_response_head(
        status, b"R", names, values, head_request=head_request, keep_alive=keep_alive, http10_peer=http10_peer,
        http10_upstream=http10_upstream,
    )  # fmt: skip


CL5 = ([b"Content-Length"], [b"5"])
TE = ([b"Transfer-Encoding"], [b"chunked"])
NO_FRAMING: tuple[list[bytes], list[bytes]] = ([b"X-A"], [b"1"])


@pytest.mark.parametrize(
    ("fields", "status", "head_request", "http10_peer", "framing", "length", "chunked_down", "keep_alive", "tail"),
    [
        (CL5, 200, False, False, ResponseFraming.CONTENT_LENGTH, 5, False, True, b"content-length: 5\r\n"),
        (TE, 200, False, False, ResponseFraming.CHUNKED, None, True, True, b"transfer-encoding: chunked\r\n"),
        (([b"Transfer-Encoding"], [b"gzip, chunked"]), 200, False, False, ResponseFraming.CHUNKED, None, True, True,
         b"transfer-encoding: gzip, chunked\r\n"),  # we re-chunk; the codings before chunked stay announced
        # Close-delimited: re-chunked for an HTTP/1.1 peer (keep-alive survives), passed through to 1.0.
        (NO_FRAMING, 200, False, False, ResponseFraming.CLOSE, None, True, True, b"transfer-encoding: chunked\r\n"),
        (NO_FRAMING, 200, False, True, ResponseFraming.CLOSE, None, False, False, b"connection: close\r\n"),
        # No body: HEAD (its Content-Length says what a GET would get), 204 (never framing), 304.
        (CL5, 200, True, False, ResponseFraming.NONE, 5, False, True, b"content-length: 5\r\n"),
        (TE, 200, True, False, ResponseFraming.NONE, None, False, True, b""),
        (NO_FRAMING, 200, True, True, ResponseFraming.NONE, None, False, True, b""),
        (([b"Content-Length"], [b"0"]), 204, False, False, ResponseFraming.NONE, 0, False, True, b""),
        (CL5, 304, False, False, ResponseFraming.NONE, 5, False, True, b""),
        (CL5, 304, True, False, ResponseFraming.NONE, 5, False, True, b"content-length: 5\r\n"),
        (TE, 304, False, False, ResponseFraming.NONE, None, False, True, b""),
    ],
)
def test_response_framing(
    fields: tuple[list[bytes], list[bytes]], status: int, head_request: bool, http10_peer: bool,
    framing: ResponseFraming, length: int | None, chunked_down: bool, keep_alive: bool, tail: bytes,
) -> None:  # fmt: skip
    names, values = fields
    rh = response(names, values, status, head_request=head_request, http10_peer=http10_peer)
    assert (rh.status, rh.framing, rh.content_length, rh.chunked_down, rh.keep_alive) == (
        status, framing, length, chunked_down, keep_alive,
    )  # fmt: skip
    kept = b"X-A: 1\r\n" if names == [b"X-A"] else b""
    assert rh.head == b"HTTP/1.1 %d R\r\n" % status + kept + tail + b"\r\n"


@pytest.mark.parametrize("fields", [CL5, TE, NO_FRAMING])
def test_response_gets_connection_close_when_the_request_side_ends_the_connection(
    fields: tuple[list[bytes], list[bytes]],
) -> None:
    rh = response(*fields, keep_alive=False)
    assert not rh.keep_alive
    assert rh.head.endswith(b"connection: close\r\n\r\n") and rh.head.count(b"connection") == 1
    assert not response(*fields, keep_alive=True).head.endswith(b"connection: close\r\n\r\n")


def test_response_drops_hop_by_hop_and_connection_named_fields() -> None:
    fields = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"keep-alive, X-Internal, x-other"),
        (b"X-Internal", b"1"),
        (b"X-Other", b"2"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Upgrade", b"h2c"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Forwarded-Client-Cert", b"URI=spiffe://example.org/ns/shop/sa/admin"),
        (b"Set-Cookie", b"a=1"),
        (b"X_App", b"kept "),
    ]
    rh = response([n for n, _ in fields], [v for _, v in fields])
    assert rh.head == (
        b"HTTP/1.1 200 R\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\nX_App: kept\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    assert rh.upstream_keep_alive


@pytest.mark.parametrize(
    ("names", "values"),
    [
        ([b"Content-Length", b"Content-Length"], [b"5", b"6"]),
        ([b"Content-Length", b"content-length"], [b"5", b"05"]),
        ([b"Content-Length"], [b"abc"]),
        ([b"Content-Length"], [b"-1"]),
        ([b"Content-Length"], [b"+5"]),
        ([b"Content-Length"], [b"1, 1"]),
        ([b"Content-Length"], [b""]),
        ([b"Content-Length"], [b"9" * 19]),
        ([b"Transfer-Encoding"], [b"gzip"]),
        ([b"Transfer-Encoding"], [b"chunked, gzip"]),
        ([b"Transfer-Encoding"], [b"chunked, chunked"]),
        ([b"Transfer-Encoding"], [b"chunked, gzip, chunked"]),
        ([b"Transfer-Encoding"], [b""]),
        ([b"Transfer-Encoding", b"Transfer-Encoding"], [b"chunked", b"chunked"]),
        ([b"Content-Length", b"Transfer-Encoding"], [b"5", b"chunked"]),
        ([b"Transfer-Encoding", b"Content-Length"], [b"chunked", b"5"]),
        ([b"X-A"], [b"a\x00b"]),
        ([b"X-A"], [b"a\rb"]),
        ([b"X-A"], [b"a\nContent-Length: 5"]),
        ([b"X-A"], [b"a\x7f"]),
        ([b"X-A"], [b"\x1b[31m"]),
        ([b"X-A"], [b" folded"]),
        ([b"Bad Name"], [b"1"]),
        ([b""], [b"1"]),
    ],
)
def test_response_framing_that_cannot_be_relayed_is_a_bad_response(names: list[bytes], values: list[bytes]) -> None:
    for status, head_request in ((200, False), (200, True), (204, False)):  # also where no body follows
        with pytest.raises(BadResponse) as e:
            response(names, values, status, head_request=head_request)
        assert e.value.reason == "protocol"
        assert isinstance(e.value, SidecarError)


def test_repeated_equal_content_length_is_one() -> None:
    rh = response([b"Content-Length", b"content-length"], [b"5", b"5"])
    assert (rh.framing, rh.content_length) == (ResponseFraming.CONTENT_LENGTH, 5)
    assert rh.head.count(b"ontent-length") == 1



def test_no_transfer_encoding_is_sent_to_an_http10_caller() -> None:
    # RFC 9112 §6.1: "A server MUST NOT send a response containing Transfer-Encoding unless the
    # corresponding request indicates HTTP/1.1". An HTTP/1.0 client reads chunk-size lines as content; the
    # body can only be delimited by closing the connection (as for a close-delimited one, above).
    rh = response(*TE, http10_peer=True)
    assert b"transfer-encoding" not in rh.head.lower()  # got b"HTTP/1.1 200 R\r\ntransfer-encoding: chunked\r\n\r\n"
    assert not rh.chunked_down and not rh.keep_alive
    assert rh.head.endswith(b"connection: close\r\n\r\n")


@pytest.mark.parametrize(
    ("names", "values", "http10_upstream", "upstream_keep_alive"),
    [
        (*CL5, False, True),
        ([b"Content-Length", b"Connection"], [b"5", b"close"], False, False),
        ([b"Content-Length", b"Connection"], [b"5", b"Keep-Alive, X-A"], False, True),
        (*CL5, True, False),  # HTTP/1.0 closes unless it says keep-alive (RFC 9112 §9.3)
        ([b"Content-Length", b"Connection"], [b"5", b"keep-alive"], True, True),
        ([b"Content-Length", b"Connection"], [b"5", b"close"], True, False),
        (*TE, False, True),
        (*NO_FRAMING, False, False),  # a close-delimited body ends with the connection
        ([b"Connection"], [b"keep-alive"], True, False),
    ],
)
def test_upstream_keep_alive_from_version_and_connection(
    names: list[bytes], values: list[bytes], http10_upstream: bool, upstream_keep_alive: bool
) -> None:
    rh = response(names, values, http10_upstream=http10_upstream)
    assert rh.upstream_keep_alive is upstream_keep_alive
    # The app's connection is its own business: the caller's connection follows the request side.
    assert rh.keep_alive is True


# -- chunk, interim_head, switching_head, request_head


def test_chunk_round_trips_through_the_parser() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 300).startswith(b"12c\r\n")
    _parser, rec = parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"a" * 17)
                                  + chunk(b"\r\n0\r\n") + CHUNK_END)  # fmt: skip
    assert rec.complete and rec.body == b"a" * 17 + b"\r\n0\r\n"


def test_interim_and_switching_heads_drop_hop_by_hop_fields() -> None:
    names = [b"Link", b"Connection", b"X-Hop", b"Keep-Alive", b"Upgrade", b"Sec-WebSocket-Accept"]
    values = [b"</s.css>", b"upgrade, X-Hop", b"1", b"timeout=5", b"websocket", b"abc= "]
    assert interim_head(103, b"Early Hints", names, values) == (
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\nSec-WebSocket-Accept: abc=\r\n\r\n"
    )
    assert switching_head(b"Switching Protocols", names, values, b"websocket") == (
        b"HTTP/1.1 101 Switching Protocols\r\nLink: </s.css>\r\nSec-WebSocket-Accept: abc=\r\n"
        b"connection: upgrade\r\nupgrade: websocket\r\n\r\n"
    )


def test_request_head_from_a_parsed_head() -> None:
    ident = identity_line(b"By=a;Hash=b;URI=c")
    head = parse_request_head(b"POST", b"/x", [b"Host", b"Content-Length", b"X-A"], [b"inventory", b"3", b"1 "])
    assert request_head(b"POST", b"/api/x", head, identity=ident, host_fallback=b"127.0.0.1:8080") == (
        b"POST /api/x HTTP/1.1\r\nHost: inventory\r\nX-A: 1\r\nx-forwarded-client-cert: By=a;Hash=b;URI=c\r\n"
        b"content-length: 3\r\n\r\n"
    )
    head = parse_request_head(b"GET", b"/", [b"Accept"], [b"*/*"], http10=True)
    assert request_head(b"GET", b"/", head, identity=b"", host_fallback=b"127.0.0.1:8080") == (
        b"GET / HTTP/1.1\r\nAccept: */*\r\nhost: 127.0.0.1:8080\r\n\r\n"
    )
    names, values = [b"Host", b"Transfer-Encoding", b"Expect"], [b"a", b"chunked", b"100-continue"]
    head = parse_request_head(b"PUT", b"/", names, values)
    assert head.framing.expect_continue
    assert request_head(b"PUT", b"/", head, identity=b"", host_fallback=None) == (
        b"PUT / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n"  # Expect is ours to answer
    )
    head = parse_request_head(b"GET", b"/ws", [b"Host", b"Connection", b"Upgrade"], [b"a", b"Upgrade", b"websocket"])
    assert request_head(b"GET", b"/ws", head, identity=b"", host_fallback=None) == (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    )


# -- RequestHeads / ResponseHeads: results cached per raw head


def _block(names: Sequence[bytes], values: Sequence[bytes]) -> bytes:
    return b"".join(b"%s: %s\r\n" % nv for nv in zip(names, values, strict=True))


def _request_view(h: RequestHead) -> tuple[object, ...]:
    return (h.framing, h.host, h.fields, h.fields_size, h.http10)


def _response_view(h: ResponseHead) -> tuple[object, ...]:
    return (h.status, h.framing, h.content_length, h.head, h.chunked_down, h.keep_alive, h.upstream_keep_alive)


def test_request_heads_cache_hit_is_the_first_result() -> None:
    heads = RequestHeads(REQUEST_DROP)
    names, values = [b"Host", b"Accept"], [b"inventory", b"*/*"]
    raw = _block(names, values)
    assert heads.known(raw, False) is None  # not before the full path has seen these bytes
    first = heads.parse(b"GET", b"/a", names, values, False, raw)
    assert heads.known(raw, False) is first
    assert heads.parse(b"POST", b"/b", names, values, False, raw) is first  # method and target play no part
    assert heads.known(raw, True) is None  # HTTP/1.0 is another key
    assert heads.parse(b"GET", b"/", names, values, True, raw) is not first
    # Without raw (the head did not arrive whole) nothing is cached.
    other = [b"Host", b"X-B"], [b"inventory", b"1"]
    a = heads.parse(b"GET", b"/", *other, False, None)
    assert heads.parse(b"GET", b"/", *other, False, None) is not a
    assert heads.known(_block(*other), False) is None
    # A raw head longer than the cache takes is parsed, not remembered.
    big = [b"Host", b"X-Big"], [b"inventory", b"b" * _HEAD_CACHE_BYTES]
    heads.parse(b"GET", b"/", *big, False, _block(*big))
    assert heads.known(_block(*big), False) is None


def test_request_heads_errors_are_never_cached() -> None:
    heads = RequestHeads(REQUEST_DROP)
    names, values = [b"Accept"], [b"*/*"]  # no Host on HTTP/1.1
    raw = _block(names, values)
    for _ in range(3):
        with pytest.raises(BadRequest, match="missing Host"):
            heads.parse(b"GET", b"/", names, values, False, raw)
        assert heads.known(raw, False) is None
    assert heads.parse(b"GET", b"/", names, values, True, raw).host is None  # fine on HTTP/1.0


def test_request_heads_stay_bounded() -> None:
    heads = RequestHeads(REQUEST_DROP)
    results = []
    for i in range(_HEAD_CACHE_MAX * 2 + 7):
        names, values = [b"Host", b"X-N"], [b"inventory", b"%d" % i]
        head = heads.parse(b"GET", b"/", names, values, False, _block(names, values))
        assert head.fields == b"Host: inventory\r\nX-N: %d\r\n" % i
        results.append(head)
        assert len(heads._cache) <= _HEAD_CACHE_MAX
    names, values = [b"Host", b"X-N"], [b"inventory", b"%d" % i]
    assert heads.known(_block(names, values), False) is results[-1]


def test_response_heads_cache_hit_is_the_first_result() -> None:
    heads = ResponseHeads()
    names, values = [b"Content-Length"], [b"2"]
    raw = b"HTTP/1.1 200 OK\r\n" + _block(names, values)
    flags = {"head_request": False, "keep_alive": True, "http10_peer": False}
    assert heads.known(raw, False, True, False) is None
    first = heads.parse(200, b"OK", names, values, raw, **flags)
    assert heads.known(raw, False, True, False) is first
    assert heads.parse(200, b"OK", names, values, raw, **flags) is first
    for other in ((True, True, False), (False, False, False), (False, True, True)):
        assert heads.known(raw, *other) is None  # each request-side flag is part of the key
    assert heads.parse(200, b"OK", names, values, None, **flags) is not first
    with pytest.raises(BadResponse):
        heads.parse(200, b"OK", [b"Content-Length"], [b"x"], b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n", **flags)
    with pytest.raises(BadResponse):
        heads.parse(200, b"OK", [b"Content-Length"], [b"x"], b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n", **flags)
    assert heads.known(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n", False, True, False) is None
    # The version comes from the raw status line: an HTTP/1.0 app closes unless it says keep-alive.
    raw10 = b"HTTP/1.0 200 OK\r\n" + _block(names, values)
    assert heads.parse(200, b"OK", names, values, raw10, **flags).upstream_keep_alive is False
    assert first.upstream_keep_alive is True


def test_response_heads_stay_bounded() -> None:
    heads = ResponseHeads()
    for i in range(_HEAD_CACHE_MAX * 2 + 7):
        names, values = [b"Content-Length", b"X-N"], [b"0", b"%d" % i]
        raw = b"HTTP/1.1 200 OK\r\n" + _block(names, values)
        rh = heads.parse(200, b"OK", names, values, raw, head_request=False, keep_alive=True, http10_peer=False)
        assert b"X-N: %d\r\n" % i in rh.head
        assert len(heads._cache) <= _HEAD_CACHE_MAX
    assert heads.known(raw, False, True, False) is rh


_NAME_CHARS = string.ascii_letters + string.digits + "-"
_VCHAR = "".join(map(chr, range(0x21, 0x7F)))
# Names and values that take the careful paths (framing, Connection, drops, Host, bad bytes).
_NAMES = [b"Host", b"host", b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection", b"Expect",
          b"Upgrade", b"TE", b"Keep-Alive", b"X-Forwarded-Client-Cert", b"X_Under", b"X-Original-URL", b"Bad Name",
          b""]  # fmt: skip
_VALUES = [b"", b"5", b"05", b"1, 1", b"chunked", b"gzip, chunked", b"close", b"keep-alive", b"Upgrade",
           b"upgrade, x-a", b"websocket", b"100-continue", b"inventory", b"inventory:8443", b"a/b", b"x\x00y",
           b" lead", b"trail ", b"caf\xc3\xa9"]  # fmt: skip
name_st = st.one_of(st.sampled_from(_NAMES), st.text(_NAME_CHARS, min_size=1, max_size=8).map(str.encode))
value_st = st.one_of(st.sampled_from(_VALUES), st.text(_VCHAR + " ", max_size=12).map(str.encode))
fields_st = st.lists(st.tuples(name_st, value_st), max_size=6)


@settings(max_examples=300, deadline=None)
@given(fields=fields_st)
def test_request_heads_agree_with_parse_request_head(fields: list[tuple[bytes, bytes]]) -> None:
    names, values = [n for n, _ in fields], [v for _, v in fields]
    raw = _block(names, values)
    heads = RequestHeads(REQUEST_DROP)
    for http10 in (False, True, False):  # each twice from the same cache: the second one is a hit
        try:
            direct = parse_request_head(b"GET", b"/", names, values, http10=http10)
        except BadRequest as exc:
            for _ in range(2):
                with pytest.raises(BadRequest) as e:
                    heads.parse(b"GET", b"/", names, values, http10, raw)
                assert e.value.reason == exc.reason
            assert heads.known(raw, http10) is None
            continue
        cached = heads.parse(b"GET", b"/", names, values, http10, raw)
        assert _request_view(cached) == _request_view(direct)
        assert heads.parse(b"GET", b"/", names, values, http10, raw) is cached
        assert heads.known(raw, http10) is cached


@settings(max_examples=300, deadline=None)
@given(
    fields=fields_st,
    status=st.sampled_from([200, 204, 304, 404]),
    http10=st.booleans(),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_response_heads_agree_with_parse_response_head(
    fields: list[tuple[bytes, bytes]], status: int, http10: bool, flags: tuple[bool, bool, bool]
) -> None:
    names, values = [n for n, _ in fields], [v for _, v in fields]
    raw = b"HTTP/1.%d %d X\r\n" % (0 if http10 else 1, status) + _block(names, values)
    head_request, keep_alive, http10_peer = flags
    heads = ResponseHeads()
    kw = {"head_request": head_request, "keep_alive": keep_alive, "http10_peer": http10_peer}
    try:
        direct = parse_response_head(status, b"X", names, values, http10_upstream=http10, **kw)
    except BadResponse:
        for _ in range(2):
            with pytest.raises(BadResponse):
                heads.parse(status, b"X", names, values, raw, **kw)
        assert heads.known(raw, *flags) is None
        return
    cached = heads.parse(status, b"X", names, values, raw, **kw)
    assert _response_view(cached) == _response_view(direct)
    assert heads.parse(status, b"X", names, values, raw, **kw) is cached
    assert heads.known(raw, *flags) is cached


_PLAIN_NAME = st.text(_NAME_CHARS, min_size=1, max_size=10).map(str.encode).filter(
    lambda n: n.lower() not in (b"host", b"content-length", b"transfer-encoding", b"connection", b"expect", b"upgrade")
)
# Values as the parser gives them: no surrounding whitespace (inner spaces and obs-text are fine).
_PLAIN_VALUE = st.text(_VCHAR + " " + "".join(map(chr, range(0x80, 0x100))), max_size=20).map(
    lambda s: s.strip(" ").encode("latin-1")
)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.lists(st.tuples(_PLAIN_NAME, _PLAIN_VALUE), max_size=8),
    host=st.booleans(),
    http10=st.booleans(),
    method=st.sampled_from([b"GET", b"OPTIONS", b"DELETE"]),
    target=st.text(string.ascii_lowercase + "/?=&", max_size=30).map(lambda t: b"/" + t.encode()),
)
def test_head_size_is_the_bytes_on_the_wire(
    fields: list[tuple[bytes, bytes]], host: bool, http10: bool, method: bytes, target: bytes
) -> None:
    if host or not http10:
        fields = [(b"Host", b"inventory"), *fields]
    names, values = [n for n, _ in fields], [v for _, v in fields]
    head = parse_request_head(method, target, names, values, http10=http10, drop=frozenset())
    block = _block(names, values)
    wire = b"%s %s HTTP/1.%d\r\n%s\r\n" % (method, target, 0 if http10 else 1, block)
    assert head.fields_size == len(block)
    assert head.size(method, target) == len(wire)
    # Nothing dropped and nothing stripped: the forwarded fields are the block itself.
    assert head.fields == block


# ---------------------------------------------------------------------------------------------------------
# RequestHeads.simple: the fast path's own split of a field block must be the full path's (issue 11)

from sidecar.h1reader import RequestReader  # noqa: E402


class _HeadSink:
    """What the full path (llhttp through RequestReader) reports for one request head."""

    def __init__(self) -> None:
        self.head: tuple[list[bytes], list[bytes]] | None = None
        self.error = False

    def request_head(self, method: bytes, target: bytes, names: list[bytes], values: list[bytes], http10: bool,
                     raw: bytes | None) -> None:  # fmt: skip
        self.head = (list(names), list(values))

    def request_body(self, data: bytes) -> None:
        pass

    def request_end(self) -> None:
        pass

    def request_upgrade(self, rest: bytes) -> None:
        pass

    def request_error(self, response: bytes, label: str, detail: str) -> None:
        self.error = True


def _full_path(block: bytes) -> RequestHead | BadRequest | None:
    sink = _HeadSink()
    RequestReader(sink, head_room=8192, line_room=1024, field_room=8192).feed(b"GET /x HTTP/1.1\r\n" + block + b"\r\n")
    if sink.error or sink.head is None:
        return None
    try:
        return parse_request_head(b"GET", b"/x", *sink.head, drop=REQUEST_DROP)
    except BadRequest as exc:
        return exc


_ODD_NAME_BYTES = st.sampled_from([*b"abcXYZ-_~!09", ord(" "), ord(":"), ord("\t"), 0x7F, 0xC3])
_ODD_VALUE_BYTES = st.sampled_from([*b"abc XYZ/;=,\t\"09", ord(":"), 0x00, 0x0B, 0x7F, 0xC3, ord("\r"), ord("\n")])


@st.composite
def _field_block(draw: st.DrawFn) -> bytes:
    """Field blocks, mostly well-formed (Host, framing fields, ids), some with odd bytes anywhere."""
    lines = [b"Host: inventory"]
    known = st.sampled_from([
        b"content-length: 0", b"Content-Length: 5", b"content-length: 0, 0", b"transfer-encoding: chunked",
        b"connection: close", b"Connection: host", b"x-request-id: abc", b"traceparent: 00-a-b-00", b"x_y: 1",
        b"user-agent:  curl/8  ", b"x-forwarded-client-cert: By=x", b"Host: other", b"authorization: Bearer t",
        b"upgrade: websocket", b"expect: 100-continue", b" folded", b"x:", b"x:\t",
    ])  # fmt: skip
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            lines.append(draw(known))
        else:
            name = bytes(draw(st.lists(_ODD_NAME_BYTES, min_size=0, max_size=8)))
            value = bytes(draw(st.lists(_ODD_VALUE_BYTES, min_size=0, max_size=12)))
            lines.append(name + draw(st.sampled_from([b":", b": ", b" :", b":  "])) + value)
    if draw(st.booleans()):
        lines = draw(st.permutations(lines))
    return b"".join(line + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"])) for line in lines)


_HEAD_ATTRS = ("framing", "host", "fields", "fields_size", "http10", "request_id", "traceparent", "user_agent",
               "authorization")  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(block=_field_block())
def test_simple_split_is_the_full_paths(block: bytes) -> None:
    """Whatever `RequestHeads.simple` accepts, llhttp accepts too and `parse_request_head` makes the same head
    of; whatever the full path refuses, `simple` refuses (and leaves to the full path, which answers)."""
    fast = RequestHeads(REQUEST_DROP).simple(b"GET", b"/x", block, False)
    full = _full_path(block)
    if fast is None:
        return  # the full path decides: nothing to compare
    assert isinstance(full, RequestHead), (block, full)
    assert [getattr(fast, a) for a in _HEAD_ATTRS] == [getattr(full, a) for a in _HEAD_ATTRS]


def test_simple_takes_the_common_heads_and_leaves_the_rest() -> None:
    heads = RequestHeads(REQUEST_DROP)
    plain = b"Host: inventory\r\nUser-Agent: bench\r\nx-request-id: 0af7\r\ntraceparent: 00-0af7-b7-01\r\n"
    head = heads.simple(b"GET", b"/x", plain, False)
    assert head is not None and head.request_id == b"0af7" and head.host == b"inventory"
    assert heads.simple(b"GET", b"/x", plain, False) is head  # cached
    for outside in (b"Host: inventory\r\nx: \xc3\xa9\r\n",  # obs-text: valid, but left to llhttp
                    b"Host: inventory\r\nx : 1\r\n",  # space before the colon
                    b"Host: inventory\r\n folded\r\n",  # obs-fold
                    b"Host: inventory\nx: 1\r\n",  # bare LF
                    b"Host: a\r\nHost: b\r\n"):  # refused by parse_request_head: the full path answers 400
        assert heads.simple(b"GET", b"/x", outside, False) is None, outside
