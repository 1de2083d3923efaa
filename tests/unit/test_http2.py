"""sidecar/http2.py: the checks libnghttp2 leaves to the proxy (RFC 9113 §8), the HTTP/2 -> HTTP/1.1 head, the
HTTP/1.1 -> HTTP/2 response fields, and gRPC's answers (pure)."""

from __future__ import annotations

import urllib.parse

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.http1 import REQUEST_DROP, RESPONSE_403, BadRequest, BadResponse
from sidecar.http2 import (
    GrpcStatus,
    grpc_message,
    grpc_method,
    h1_request_head,
    h2_response_fields,
    is_grpc,
    local_answer,
    parse_request,
    trailers_only,
)

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/api/stock/1"), (b":authority", b"inv:8443")]
XFCC_LINE = b"x-forwarded-client-cert: By=spiffe://td/a;Hash=00;URI=spiffe://td/b\r\n"


def test_a_plain_request_is_parsed() -> None:
    req = parse_request([*BASE, (b"user-agent", b"t/1"), (b"accept", b"*/*"), (b"x-request-id", b"r1")], REQUEST_DROP)
    assert (req.method, req.path, req.authority, req.content_length, req.grpc) == (b"GET", b"/api/stock/1",
                                                                                    b"inv:8443", None, False)
    assert req.user_agent == b"t/1" and req.request_id == b"r1"
    assert req.fields == ((b"user-agent", b"t/1"), (b"accept", b"*/*"), (b"x-request-id", b"r1"))


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([(b":method", b"GET /x"), (b":scheme", b"https"), (b":path", b"/a"), (b":authority", b"a")], "token"),
        ([(b":method", b"CONNECT"), (b":authority", b"a:443")], "missing"),
        ([(b":method", b"CONNECT"), (b":scheme", b"https"), (b":path", b"/a"), (b":authority", b"a")], "CONNECT"),
        ([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"a"), (b":authority", b"a")], "origin form"),
        ([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"*"), (b":authority", b"a")], "origin form"),
        ([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a"), (b":authority", b"u@a")], "userinfo"),
        ([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a"), (b":authority", b"a b")], "userinfo"),
        ([*BASE, (b":protocol", b"websocket")], "pseudo-header"),
        ([*BASE, (b"x(y", b"1")], "token"),
        ([*BASE, (b"x-a", b"a\x01b")], "control"),
        ([*BASE, (b"x-a", b"a\nb")], "control"),
        ([*BASE, (b"content-length", b"5"), (b"content-length", b"6")], "content-length"),
        ([*BASE, (b"content-length", b"-1")], "content-length"),
        ([*BASE, (b"host", b"other")], "differs"),
    ],
)
def test_what_the_engine_leaves_to_us_is_refused(headers: list[tuple[bytes, bytes]], why: str) -> None:
    with pytest.raises(BadRequest) as exc:
        parse_request(headers, REQUEST_DROP)
    assert why in exc.value.reason


def test_underscores_identity_and_hop_by_hop_fields_are_not_forwarded() -> None:
    req = parse_request([*BASE, (b"x_forwarded_client_cert", b"URI=spiffe://evil"), (b"x-forwarded-client-cert", b"x"),
                         (b"x-http-method-override", b"DELETE"), (b"te", b"trailers"), (b"x-ok", b"1"),
                         (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"authorization", b"Bearer t")],
                        REQUEST_DROP)  # fmt: skip
    assert req.fields == ((b"x-ok", b"1"), (b"cookie", b"a=1; b=2"))  # RFC 9113 §8.2.3: crumbs joined
    assert req.te_trailers and req.authorization == b"Bearer t"


def test_host_stands_in_for_a_missing_authority() -> None:
    req = parse_request([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a"), (b"host", b"h:1")],
                        REQUEST_DROP)  # fmt: skip
    assert req.authority == b"h:1"


@pytest.mark.parametrize(
    ("ctype", "grpc"),
    [(b"application/grpc", True), (b"application/grpc+proto", True), (b"application/grpc;x=1", True),
     (b"application/grpcx", False), (b"application/json", False), (None, False)],
)  # fmt: skip
def test_grpc_is_recognised_by_its_content_type(ctype: bytes | None, grpc: bool) -> None:
    assert is_grpc(ctype) is grpc


def test_grpc_method_names() -> None:
    assert grpc_method("/inventory.v1.Inventory/GetStock") == "inventory.v1.Inventory/GetStock"
    assert grpc_method("/a/b/c") == "" and grpc_method("/a") == "" and grpc_method("/") == ""


def _parse_h1(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    url: list[bytes] = []
    fields: list[tuple[bytes, bytes]] = []

    class Sink:
        def on_url(self, part: bytes) -> None:
            url.append(part)

        def on_header(self, name: bytes, value: bytes) -> None:
            fields.append((name.lower(), value))

    p = httptools.HttpRequestParser(Sink())
    p.feed_data(head)
    return bytes(p.get_method()), b"".join(url), fields


def test_the_http1_head_has_our_host_and_framing() -> None:
    req = parse_request([(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/api/x"),
                         (b":authority", b"inv:8443"), (b"content-length", b"999"), (b"x-a", b"1")],
                        REQUEST_DROP)  # fmt: skip
    head = h1_request_head(req, b"/api/x?q", authority=b"127.0.0.1:8080", identity=XFCC_LINE, extra=b"x-b: 2\r\n",
                           length=3)  # fmt: skip
    method, url, fields = _parse_h1(head)
    assert (method, url) == (b"POST", b"/api/x?q")
    assert fields == [(b"host", b"inv:8443"), (b"x-a", b"1"), (b"x-forwarded-client-cert",
                      XFCC_LINE[25:-2]), (b"x-b", b"2"), (b"content-length", b"3")]  # fmt: skip
    chunked = h1_request_head(req, b"/api/x", authority=b"a", identity=b"", extra=b"", length=None)
    assert chunked.endswith(b"transfer-encoding: chunked\r\n\r\n") and b"content-length" not in chunked
    get = parse_request(BASE, REQUEST_DROP)
    assert b"content-length" not in h1_request_head(get, b"/a", authority=b"a", identity=b"", extra=b"", length=0)


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.binary(max_size=16)), max_size=6),
       st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"GET /x HTTP/1.1\r\nx:", b"G\nET", b""]),
       st.binary(max_size=20))  # fmt: skip
def test_a_translated_head_is_always_one_request(fields: list[tuple[bytes, bytes]], method: bytes, path: bytes) -> None:
    """Whatever the caller sends, a head we build parses as exactly one HTTP/1.1 request with the method, target
    and fields we checked: no CR/LF/NUL or bad name gets through to split it (RFC 9113 §10.3, notes §1.7)."""
    headers = [(b":method", method), (b":scheme", b"https"), (b":path", b"/" + path), (b":authority", b"a"),
               *((n.lower(), v) for n, v in fields)]  # fmt: skip
    try:
        req = parse_request(headers, REQUEST_DROP)
    except BadRequest:
        return
    target = b"/" + urllib.parse.quote_from_bytes(path).encode()
    head = h1_request_head(req, target, authority=b"a", identity=XFCC_LINE, extra=b"", length=0)
    assert head.count(b"\r\n\r\n") == 1 and head.endswith(b"\r\n\r\n")
    got_method, url, parsed = _parse_h1(head)
    assert got_method == req.method and url == target
    assert parsed[1 : 1 + len(req.fields)] == [(n, v.strip(b" \t")) for n, v in req.fields]


def test_response_fields_drop_hop_by_hop_and_named_fields() -> None:
    names = [b"Content-Type", b"Connection", b"X-Secret", b"Keep-Alive", b"Content-Length", b"X-Ok"]
    values = [b"text/plain", b"x-secret", b"1", b"timeout=5", b"3", b"v "]
    out = h2_response_fields(200, names, values, head_request=False)
    assert out == [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-ok", b"v")]
    for bad in ([b"x y"], [b"x\x01"]):
        with pytest.raises(BadResponse):
            h2_response_fields(200, bad, [b"1"], head_request=False)
    with pytest.raises(BadResponse):
        h2_response_fields(101, [], [], head_request=False)


def test_grpc_message_is_percent_encoded() -> None:
    assert grpc_message("permission denied") == b"permission denied"
    assert grpc_message("50% ✗") == b"50%25 %E2%9C%97"


def test_denials_are_answered_as_the_caller_expects() -> None:
    denied = local_answer(403, grpc=True)
    assert dict(denied.fields) == {b":status": b"200", b"content-type": b"application/grpc", b"grpc-status": b"7",
                                   b"grpc-message": b"permission denied"}  # fmt: skip
    assert denied.body == b"" and denied.grpc_status == GrpcStatus.PERMISSION_DENIED
    assert local_answer(401, grpc=True).grpc_status == GrpcStatus.UNAUTHENTICATED
    assert local_answer(502, grpc=True).grpc_status == GrpcStatus.UNAVAILABLE
    assert local_answer(504, grpc=True).grpc_status == GrpcStatus.DEADLINE_EXCEEDED
    plain = local_answer(403, grpc=False)
    assert plain.body == RESPONSE_403.split(b"\r\n\r\n", 1)[1] == b'{"error":"forbidden"}'
    assert dict(local_answer(401, grpc=False).fields)[b"www-authenticate"] == b'Bearer error="invalid_token"'
    assert trailers_only(GrpcStatus.UNAVAILABLE, "x").status == 200
