"""HTTP/2 request checks and the HTTP/2 <-> HTTP/1.1 and gRPC translations of the data plane (pure).

The HTTP/2 engine (libnghttp2, behind `sidecar.h2conn`) already enforces RFC 9113's framing rules and much of
§8: pseudo-header presence, order and repeats, lowercase names without CTL/SP, values without NUL/CR/LF or edge
whitespace, connection-specific fields and `TE` other than `trailers` (§8.2.2), `:protocol` without
SETTINGS_ENABLE_CONNECT_PROTOCOL, content-length against the DATA received (§8.1.1). `parse_request` adds what
a proxy that authorises on the request and may write HTTP/1.1 must check itself (RFC 9113 §8.2.1 "SHOULD
validate per RFC 9110", §10.3 "simple concatenation is not secure"):

* `:method` is an RFC 9110 token and not CONNECT (the sidecar is no tunnel, §8.5);
* `:path` is in origin form (the policy's normaliser decides the rest: a 400 there too);
* `:authority` (or `host` without it) is `uri-host [":" port]` without userinfo (§8.3.1);
* field names are RFC 9110 tokens; names with `_` are dropped, as on the HTTP/1 path (CGI/WSGI map `_` and
  `-` to one variable: `x_forwarded_client_cert` would become a second identity header);
* values carry no control character but HTAB (RFC 9110 §5.5);
* `content-length` is digits and all copies agree; the data plane counts DATA itself and compares.

`BadRequest` (a 400, or RST_STREAM when no answer can be sent) carries the reason for the audit line.

Translations: `h1_request_head` (an HTTP/2 request as an HTTP/1.1 head: Host from `:authority`, our own
framing, never a connection-specific field), `h2_response_fields` (an HTTP/1.1 response head as HTTP/2 fields,
hop-by-hop fields dropped), and the gRPC answers (`trailers_only`, PROTOCOL-HTTP2.md "Trailers-Only").
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .http1 import HOP_BY_HOP, BadRequest, BadResponse, parse_response_head, valid_host

__all__ = [
    "GRPC_CONTENT_TYPE",
    "GrpcStatus",
    "H2Request",
    "LocalAnswer",
    "grpc_message",
    "grpc_method",
    "h1_request_head",
    "h2_response_fields",
    "is_grpc",
    "local_answer",
    "parse_request",
    "trailers_only",
]

Fields = Sequence[tuple[bytes, bytes]]

# RFC 9110 §5.6.2 tchar.
_TOKEN_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: VCHAR, obs-text, SP, HTAB; every other control refused (libnghttp2 refuses NUL/CR/LF only).
_BAD_VALUE_RE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS_RE: Final = re.compile(rb"[0-9]{1,18}")
GRPC_CONTENT_TYPE: Final = b"application/grpc"
_REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":path", b":authority"})


class GrpcStatus(enum.IntEnum):
    """gRPC status codes (grpc `include/grpc/status.h`)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class H2Request:
    """A checked HTTP/2 request head. `fields` are the regular fields to forward (the drop set and names with
    `_` removed, cookie crumbs joined into one `cookie`); `te_trailers` whether it carried `te: trailers`
    (kept towards an h2c app: gRPC servers use it to detect proxies that lose trailers)."""

    method: bytes
    path: bytes
    authority: bytes  # b"" when the request named none
    content_length: int | None
    grpc: bool
    te_trailers: bool
    fields: tuple[tuple[bytes, bytes], ...]
    authorization: bytes | None = None
    request_id: bytes | None = None
    traceparent: bytes | None = None
    user_agent: bytes | None = None


def is_grpc(content_type: bytes | None) -> bool:
    """`application/grpc`, `application/grpc+proto`, `application/grpc;...` (PROTOCOL-HTTP2.md Content-Type)."""
    if content_type is None or not content_type.startswith(GRPC_CONTENT_TYPE):
        return False
    rest = content_type[len(GRPC_CONTENT_TYPE) :]
    return not rest or rest[:1] in (b"+", b";")


def parse_request(headers: Fields, drop: frozenset[bytes]) -> H2Request:
    """Check one request header block as decoded by the engine (module docstring); raise `BadRequest`.
    `drop`: lower-case names never forwarded (hop-by-hop, framing, identity, routing overrides)."""
    method = path = authority = host = None
    content_length: int | None = None
    content_type: bytes | None = None
    te = False
    authorization = request_id = traceparent = user_agent = None
    cookies: list[bytes] = []
    fields: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name not in _REQUEST_PSEUDO:
                raise BadRequest(f"pseudo-header {name.decode('ascii', 'replace')} in a request (RFC 9113 §8.3)")
            continue
        if _TOKEN_RE.fullmatch(name) is None:
            raise BadRequest("field name is not a token (RFC 9110 §5.1)")
        if _BAD_VALUE_RE.search(value) is not None:
            raise BadRequest("control character in a field value (RFC 9110 §5.5)")
        if name == b"content-length":
            v = value.strip(b" \t")
            if _DIGITS_RE.fullmatch(v) is None or (content_length is not None and int(v) != content_length):
                raise BadRequest("invalid or conflicting content-length (RFC 9113 §8.1.1)")
            content_length = int(v)
            continue
        if name == b"host":
            if host is not None:
                raise BadRequest("two host fields")
            host = value
            continue
        if name == b"te":
            te = value.strip(b" \t").lower() == b"trailers"
            continue
        if name == b"content-type":
            content_type = value
        elif name == b"authorization":
            authorization = value  # forwarded by the data plane unless a step-up rule consumed it
            continue
        elif name == b"x-request-id":
            request_id = value
        elif name == b"traceparent":
            traceparent = value
        elif name == b"user-agent":
            user_agent = value
        elif name == b"cookie":
            cookies.append(value)  # RFC 9113 §8.2.3: crumbs joined before HTTP/1.1
            continue
        if name in drop or b"_" in name:
            continue
        fields.append((name, value))
    if method is None or path is None:
        raise BadRequest("missing :method or :path (RFC 9113 §8.3.1)")
    if _TOKEN_RE.fullmatch(method) is None:
        raise BadRequest("request method is not a token (RFC 9110 §9.1)")
    if method == b"CONNECT":
        raise BadRequest("CONNECT is not relayed (RFC 9113 §8.5: the sidecar is no tunnel)")
    if path[:1] != b"/":
        raise BadRequest(":path is not in origin form (RFC 9113 §8.3.1)")
    if authority is None:
        authority = host  # RFC 9113 §8.3.1: Host stands in when :authority is absent
    elif host is not None and host != authority:
        raise BadRequest("host differs from :authority (RFC 9113 §8.3.1)")
    if authority is not None and (not authority or not valid_host(authority)):
        raise BadRequest(":authority is not host[:port] (RFC 9113 §8.3.1: no userinfo)")
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    return H2Request(
        method, path, authority or b"", content_length, is_grpc(content_type), te, tuple(fields), authorization,
        request_id, traceparent, user_agent,
    )  # fmt: skip


def grpc_method(path: str) -> str:
    """`package.Service/Method` of a gRPC request's normalised path (PROTOCOL-HTTP2.md Path), else ""."""
    service, sep, method = path[1:].partition("/")
    return f"{service}/{method}" if sep and service and method and "/" not in method else ""


# ---------------------------------------------------------------------------------------------------------
# HTTP/2 -> HTTP/1.1 (the app speaks HTTP/1.1)

_BODILESS: Final = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})


def h1_request_head(req: H2Request, target: bytes, *, authority: bytes, identity: bytes, extra: bytes,
                    length: int | None) -> bytes:  # fmt: skip
    """The HTTP/1.1 head for `req`: `target` the normalised one (`Target.forward`), Host from `:authority` (or
    `authority`, the app's, when the request named none), the forwarded fields, `identity` (the whole XFCC
    line) and `extra` lines of ours, then OUR framing: `content-length: length`, or chunked when `length` is
    None (the body's size is not known yet). Every part was checked (`parse_request`, `normalize_target`):
    no CR, LF or NUL can reach the head, so no second request can be spliced in (RFC 9113 §10.3)."""
    parts = [req.method, b" ", target, b" HTTP/1.1\r\nhost: ", req.authority or authority, b"\r\n"]
    for name, value in req.fields:
        parts += (name, b": ", value, b"\r\n")
    parts.append(identity)
    if extra:
        parts.append(extra)
    if length is None:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif length or req.method not in _BODILESS:
        parts.append(b"content-length: %d\r\n" % length)
    parts.append(b"\r\n")
    return b"".join(parts)


# Response fields never sent as HTTP/2 (RFC 9113 §8.2.2), besides our own framing's.
_RESPONSE_DROP: Final = HOP_BY_HOP | {b"content-length"}


def h2_response_fields(status: int, names: list[bytes], values: list[bytes], *, head_request: bool,
                       ) -> list[tuple[bytes, bytes]]:  # fmt: skip
    """The app's HTTP/1.1 response head as HTTP/2 fields: checked as the HTTP/1 path checks it (`BadResponse`
    for names that are not tokens, controls in values, conflicting framing), names lower-cased, hop-by-hop
    fields and those named in Connection dropped (RFC 9113 §8.2.2), no content-length (DATA frames and
    END_STREAM delimit the body)."""
    if status == 101 or status < 200 or status > 999:
        raise BadResponse("protocol")
    parse_response_head(status, b"", names, values, head_request=head_request, keep_alive=True,
                        http10_peer=False)  # fmt: skip
    out = [(b":status", b"%d" % status)]
    lnames = [n.lower() for n in names]
    drop = _RESPONSE_DROP
    if b"connection" in lnames:
        named = {t.strip(b" \t").lower() for n, v in zip(lnames, values, strict=True) if n == b"connection"
                 for t in v.split(b",")}  # fmt: skip
        drop = drop | named
    for name, value in zip(lnames, values, strict=True):
        if name not in drop:
            out.append((name, value.strip(b" \t")))
    return out


# ---------------------------------------------------------------------------------------------------------
# Our own answers


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """A fixed answer of ours on one stream: the response fields, and a body (b"" for none). `status` is the
    HTTP status (200 for a gRPC trailers-only answer), `grpc_status` the gRPC one (None: not gRPC)."""

    fields: tuple[tuple[bytes, bytes], ...]
    body: bytes
    status: int
    grpc_status: int | None = None


def grpc_message(text: str) -> bytes:
    """PROTOCOL-HTTP2.md `grpc-message`: UTF-8, then bytes outside 0x20-0x7E and `%` percent-encoded."""
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in text.encode())


def trailers_only(code: GrpcStatus, message: str) -> LocalAnswer:
    """A gRPC Trailers-Only response: `:status 200`, content-type and the status in one HEADERS frame with
    END_STREAM (PROTOCOL-HTTP2.md). The message is fixed per code: peers never learn the policy."""
    fields = ((b":status", b"200"), (b"content-type", GRPC_CONTENT_TYPE), (b"grpc-status", b"%d" % code),
              (b"grpc-message", grpc_message(message)))  # fmt: skip
    return LocalAnswer(fields, b"", 200, int(code))


def _http(status: int, error: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> LocalAnswer:
    body = b'{"error":"%s"}' % error.encode()
    fields = ((b":status", b"%d" % status), (b"content-type", b"application/json"),
              (b"content-length", b"%d" % len(body)), *extra)  # fmt: skip
    return LocalAnswer(fields, body, status)


# The same bodies as the HTTP/1 path's fixed responses (sidecar.http1 RESPONSE_*).
_ANSWERS: Final = {
    400: _http(400, "bad request"),
    401: _http(401, "unauthorized", ((b"www-authenticate", b'Bearer error="invalid_token"'),)),
    403: _http(403, "forbidden"),
    413: _http(413, "content too large"),
    415: _http(415, "unsupported media type"),
    502: _http(502, "bad gateway"),
    503: _http(503, "service unavailable"),
    504: _http(504, "gateway timeout"),
}
# What a gRPC caller gets instead (PROTOCOL-HTTP2.md status codes; "PERMISSION_DENIED must not be used if the
# caller can not be identified": a failed JWT step-up is UNAUTHENTICATED).
_GRPC: Final = {
    400: trailers_only(GrpcStatus.INTERNAL, "bad request"),
    401: trailers_only(GrpcStatus.UNAUTHENTICATED, "unauthenticated"),
    403: trailers_only(GrpcStatus.PERMISSION_DENIED, "permission denied"),
    413: trailers_only(GrpcStatus.RESOURCE_EXHAUSTED, "request too large"),
    415: trailers_only(GrpcStatus.UNIMPLEMENTED, "the service does not speak gRPC"),
    502: trailers_only(GrpcStatus.UNAVAILABLE, "upstream unavailable"),
    503: trailers_only(GrpcStatus.UNAVAILABLE, "upstream unavailable"),
    504: trailers_only(GrpcStatus.DEADLINE_EXCEEDED, "upstream timeout"),
}


def local_answer(status: int, grpc: bool) -> LocalAnswer:
    """Our answer with HTTP status `status` (400, 401, 403, 413, 415, 502, 503, 504), as gRPC expects it for a
    gRPC request (a Trailers-Only response) or as the HTTP/1 path's fixed responses otherwise."""
    return (_GRPC if grpc else _ANSWERS)[status]
