"""HTTP/1.1 head checks and rewriting for the proxied path (pure; the I/O edge parses with httptools).

Contracts:

* `check_request_headers` rejects what request smuggling needs (RFC 9112 §6.1-§6.3, §11.2): both
  Content-Length and Transfer-Encoding, several or list-valued Content-Length (also `1, 1`), any
  Transfer-Encoding but a single `chunked`, Transfer-Encoding on HTTP/1.0, header names that are not
  tokens, values with NUL/CR/LF or other controls, a missing or repeated Host (RFC 9112 §3.2), a Host
  that is not `uri-host [":" port]` (RFC 9110 §7.2, RFC 3986 §3.2.2: no userinfo, `/`, spaces...), and a
  `Connection` that names a field the request's routing, framing or identity depends on (`Host`,
  `Content-Length`, `Transfer-Encoding`, `X-Forwarded-Client-Cert`): removing those as RFC 9110 §7.6.1
  asks would let a caller change what the app sees, so the request is refused instead.
  httptools already rejects some of these; we check again so the edge never depends on parser leniency.
* `build_request_head` / `build_response_head` drop hop-by-hop fields (RFC 9110 §7.6.1: Connection,
  the fields it names, Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade) and the
  framing fields, then re-add our own framing. Every incoming `x-forwarded-client-cert` is removed and
  ours (`xfcc_value`, Envoy's `By=;Hash=;URI=` form) appended, so the app can trust the one it sees.
  Request fields whose name contains `_` are dropped (nginx's default, `underscores_in_headers off`):
  CGI/WSGI/Rack servers map `_` and `-` to the same variable, so `X_Forwarded_Client_Cert` would reach
  the app as a second XFCC (or `Transfer_Encoding` as framing) that we never saw as one.
  Routing-override fields (`X-Original-URL`, `X-HTTP-Method-Override`, ...: `ROUTING_OVERRIDE_HEADERS`)
  are dropped from requests by default: frameworks that honour them would route to a path or method the
  policy never authorised. The list is configurable (`request_drop`).
* `check_method` refuses CONNECT: we never tunnel it, and RFC 9112 §3.2.3 allows it only in authority-form.
* Fixed responses (`RESPONSE_4xx/5xx`) carry no policy detail: peers never learn the policy.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .errors import SidecarError
from .identity import SpiffeId

Headers = Sequence[tuple[bytes, bytes]]


class BadRequest(SidecarError):
    """A request the sidecar refuses with 400 (and closes); `reason` is for the audit log, not the peer."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class BodyFraming(enum.Enum):
    NONE = "none"
    CONTENT_LENGTH = "content_length"
    CHUNKED = "chunked"


@dataclass(frozen=True, slots=True)
class RequestFraming:
    """How the request body is delimited and what the connection does after it."""

    body: BodyFraming
    content_length: int | None  # set iff body is CONTENT_LENGTH
    expect_continue: bool
    upgrade: bytes | None  # the Upgrade value for an upgrade we relay (websocket); None otherwise
    keep_alive: bool

    @property
    def chunked(self) -> bool:
        return self.body is BodyFraming.CHUNKED


# RFC 9110 §5.6.2 tchar.
_TOKEN_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: field values are VCHAR / obs-text / SP / HTAB; every other control is refused.
_BAD_VALUE_RE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS_RE: Final = re.compile(rb"[0-9]{1,18}")  # 18 digits: no attacker-sized ints
# RFC 9110 §7.2 Host = uri-host [ ":" port ]; RFC 3986 §3.2.2 host = IP-literal / IPv4address / reg-name
# (reg-name = unreserved / pct-encoded / sub-delims, possibly empty), port = *DIGIT. No userinfo.
_HOST_RE: Final = re.compile(
    rb"(?:\[(?:[0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\]"
    rb"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]{0,5})?"
)
_OWS: Final = b" \t"

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
XFCC: Final = b"x-forwarded-client-cert"
# Fields a `Connection` token may not name (see the module docstring): 400 rather than removed.
_CONNECTION_PROTECTED: Final = frozenset({b"host", b"content-length", b"transfer-encoding", XFCC})
# Request fields common frameworks read to override the routed path or method (IIS/ASP.NET and Symfony
# `X-Original-URL`/`X-Rewrite-URL`, Laravel/Express/Rails/Spring `X-HTTP-Method-Override` and its
# spellings): a request authorised for `GET /api/x` must not be routed to `DELETE /admin` by them.
ROUTING_OVERRIDE_HEADERS: Final = (
    "x-original-url",
    "x-rewrite-url",
    "x-override-url",
    "x-original-uri",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
)
# Protocols whose upgraded stream is covered by the decision on the upgrade request itself (RFC 6455).
UPGRADE_PROTOCOLS: Final = frozenset({b"websocket"})
# Dropped from both directions before we re-add our own framing (and, for requests, our XFCC).
_DROP: Final = HOP_BY_HOP | {b"content-length", XFCC}
# What a request loses by default: the above plus the routing-override fields.
REQUEST_DROP: Final = _DROP | {h.encode("ascii") for h in ROUTING_OVERRIDE_HEADERS}


def request_drop(extra: Sequence[str]) -> frozenset[bytes]:
    """The set of request field names dropped before forwarding: hop-by-hop and framing fields, XFCC, and
    `extra` (the configured routing-override list, lower-cased). Built once per listener."""
    return _DROP | {h.lower().encode("ascii") for h in extra}


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip(_OWS).lower() for t in value.split(b",") if t.strip(_OWS)]


def check_method(method: bytes) -> None:
    """Raise `BadRequest` for methods the sidecar never relays: CONNECT (RFC 9110 §9.3.6) asks the
    proxy for a tunnel we do not offer; relaying `CONNECT /path` as an ordinary request would let the
    app see a method its router may treat as a tunnel request."""
    if method == b"CONNECT":
        raise BadRequest("CONNECT is not relayed (RFC 9112 §3.2.3)")


def check_request_headers(headers: Headers, *, version: str = "1.1") -> RequestFraming:
    """Validate a parsed request head strictly; return its framing or raise `BadRequest`.

    `version` is httptools' `get_http_version()` ("1.1" or "1.0").
    """
    http10 = version == "1.0"
    content_length: bytes | None = None
    transfer_encoding: bytes | None = None
    hosts = 0
    expect_continue = False
    upgrade: bytes | None = None
    connection: list[bytes] = []
    for name, value in headers:
        if _TOKEN_RE.fullmatch(name) is None:
            raise BadRequest(f"invalid header name {name[:40]!r}")
        if _BAD_VALUE_RE.search(value) is not None:
            raise BadRequest(f"control character in the value of header {name.decode()!r}")
        if value[:1] in (b" ", b"\t"):
            # A leading blank survives only from an obs-fold continuation (RFC 9112 §5.2): refuse it.
            raise BadRequest(f"obsolete line folding in header {name.decode()!r}")
        lname = name.lower()
        if lname == b"content-length":
            if content_length is not None:
                raise BadRequest("more than one Content-Length")
            content_length = value.strip(_OWS)
            if _DIGITS_RE.fullmatch(content_length) is None:
                raise BadRequest("Content-Length is not a single decimal number")
        elif lname == b"transfer-encoding":
            if transfer_encoding is not None:
                raise BadRequest("more than one Transfer-Encoding")
            transfer_encoding = value.strip(_OWS)
            if transfer_encoding.lower() != b"chunked":
                raise BadRequest("Transfer-Encoding other than a single 'chunked'")
        elif lname == b"host":
            hosts += 1
            if hosts > 1:
                raise BadRequest("more than one Host (RFC 9112 §3.2)")
            if _HOST_RE.fullmatch(value.strip(_OWS)) is None:
                raise BadRequest("Host is not a valid host[:port] (RFC 9110 §7.2, RFC 3986 §3.2.2)")
        elif lname == b"connection":
            connection.extend(_tokens(value))
        elif lname == b"expect":
            if value.strip(_OWS).lower() != b"100-continue":
                raise BadRequest("unsupported expectation")
            expect_continue = True
        elif lname == b"upgrade":
            if upgrade is not None:
                raise BadRequest("more than one Upgrade")
            upgrade = value.strip(_OWS)
    if connection:
        named = _CONNECTION_PROTECTED.intersection(connection)
        if named:
            raise BadRequest(f"Connection names {b', '.join(sorted(named)).decode()}, which is never removed")
    if transfer_encoding is not None:
        if content_length is not None:
            raise BadRequest("both Content-Length and Transfer-Encoding (RFC 9112 §6.1)")
        if http10:
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request (RFC 9112 §6.1)")
    if hosts == 0 and not http10:
        raise BadRequest("missing Host (RFC 9112 §3.2)")
    if upgrade is not None and (b"upgrade" not in connection or http10 or upgrade.lower() not in UPGRADE_PROTOCOLS):
        # Not a request to switch (RFC 9110 §7.8: Upgrade must be named in Connection), or a protocol we
        # do not relay: after `h2c` one connection carries many requests the policy would never see.
        # The Upgrade field is hop-by-hop, so the app never sees it either.
        upgrade = None
    if content_length is not None:
        body, length = BodyFraming.CONTENT_LENGTH, int(content_length)
    elif transfer_encoding is not None:
        body, length = BodyFraming.CHUNKED, None
    else:
        body, length = BodyFraming.NONE, None
    keep_alive = b"keep-alive" in connection if http10 else b"close" not in connection
    return RequestFraming(body, length, expect_continue, upgrade, keep_alive)


def xfcc_value(own_id: SpiffeId, peer_leaf_sha256_hex: str, peer_id: SpiffeId) -> bytes:
    """Envoy's XFCC element `By=<own id>;Hash=<sha256 hex of the peer leaf DER>;URI=<peer id>`.

    SPIFFE IDs cannot contain `,;="` (SPIFFE-ID §2), so no quoting is needed.
    """
    digest = peer_leaf_sha256_hex.lower()
    if len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise ValueError("peer_leaf_sha256_hex must be 64 hex digits")
    return f"By={own_id};Hash={digest};URI={peer_id}".encode("ascii")


_CRLF: Final = b"\r\n"
_SEP: Final = b": "
_REQ_TAIL: Final = b" HTTP/1.1\r\n"
_XFCC_PREFIX: Final = b"x-forwarded-client-cert: "
_TE_CHUNKED: Final = b"transfer-encoding: chunked\r\n"
_CL_PREFIX: Final = b"content-length: "
_CONN_UPGRADE: Final = b"connection: upgrade\r\nupgrade: "
_CONN_CLOSE: Final = b"connection: close\r\n"
_HOST_PREFIX: Final = b"host: "


def _drop_set(headers: Headers, base: frozenset[bytes]) -> frozenset[bytes]:
    """`base` plus every field named in Connection (RFC 9110 §7.6.1)."""
    named: list[bytes] = []
    for name, value in headers:
        if name.lower() == b"connection":
            named.extend(_tokens(value))
    return base.union(named) if named else base


def _append_fields(
    parts: list[bytes], headers: Headers, *, request: bool = False, drop: frozenset[bytes] = _DROP
) -> bool:
    """Append the end-to-end fields of `headers`; return whether a Host field was among them.

    For requests, a name containing `_` is dropped: it is the same CGI variable as its `-` spelling
    (`X_Forwarded_Client_Cert` = `X-Forwarded-Client-Cert`), so it could shadow a field we own or drop.
    """
    drop = _drop_set(headers, drop)
    host = False
    for name, value in headers:
        lname = name.lower()
        if lname in drop or (request and b"_" in lname):
            continue
        if lname == b"host":
            host = True
        parts += (name, _SEP, value.strip(_OWS), _CRLF)
    return host


def build_request_head(
    method: bytes,
    target: bytes,
    headers: Headers,
    *,
    xfcc: bytes,
    chunked: bool,
    content_length: int | None,
    upgrade: bytes | None,
    host_fallback: bytes | None,
    drop: frozenset[bytes] = REQUEST_DROP,
) -> bytes:
    """The HTTP/1.1 head sent to the app: `target` is the normalised one (`Target.forward`); fields in
    `drop` (default `REQUEST_DROP`; see `request_drop`) and those named in Connection are left out."""
    if chunked and content_length is not None:
        raise ValueError("a request body is either chunked or has a Content-Length, not both")
    parts: list[bytes] = [method, b" ", target, _REQ_TAIL]
    if not _append_fields(parts, headers, request=True, drop=drop) and host_fallback is not None:
        parts += (_HOST_PREFIX, host_fallback, _CRLF)  # HTTP/1.0 without Host; 1.1 requires one
    parts += (_XFCC_PREFIX, xfcc, _CRLF)
    if content_length is not None:
        parts += (_CL_PREFIX, b"%d" % content_length, _CRLF)
    elif chunked:
        parts.append(_TE_CHUNKED)
    if upgrade is not None:
        parts += (_CONN_UPGRADE, upgrade, _CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


def build_response_head(
    status: int,
    reason: bytes,
    headers: Headers,
    *,
    keep_alive: bool,
    chunked: bool,
    content_length: int | None,
    upgrade: bytes | None = None,
) -> bytes:
    """The head sent back to the peer for the app's response.

    1xx and 204 never carry framing (RFC 9110 §8.6, RFC 9112 §6.1); a 101 carries `upgrade`.
    """
    if chunked and content_length is not None:
        raise ValueError("a response body is either chunked or has a Content-Length, not both")
    parts: list[bytes] = [b"HTTP/1.1 %d " % status, reason, _CRLF]
    _append_fields(parts, headers)
    if status == 101:
        if upgrade is not None:
            parts += (_CONN_UPGRADE, upgrade, _CRLF)
    elif status >= 200:
        if status != 204:
            if content_length is not None:
                parts += (_CL_PREFIX, b"%d" % content_length, _CRLF)
            elif chunked:
                parts.append(_TE_CHUNKED)
        if not keep_alive:
            parts.append(_CONN_CLOSE)
    parts.append(_CRLF)
    return b"".join(parts)


def _fixed(status: int, reason: str, error: str, *, close: bool) -> bytes:
    body = b'{"error":"%s"}' % error.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n" + ("connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode("ascii") + body


def head_only(response: bytes) -> bytes:
    """A fixed response without its body, for HEAD requests (RFC 9110 §9.3.2)."""
    return response[: response.index(b"\r\n\r\n") + 4]


RESPONSE_100: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# The edge closes after these (the request stream can no longer be trusted or was not read).
RESPONSE_400: Final = _fixed(400, "Bad Request", "bad request", close=True)
RESPONSE_413: Final = _fixed(413, "Content Too Large", "content too large", close=True)
RESPONSE_431: Final = _fixed(431, "Request Header Fields Too Large", "request header fields too large", close=True)
# A denial keeps the connection (the body, if any, is drained); no policy detail is given.
RESPONSE_403: Final = _fixed(403, "Forbidden", "forbidden", close=False)
RESPONSE_403_CLOSE: Final = _fixed(403, "Forbidden", "forbidden", close=True)
RESPONSE_403_HEAD: Final = head_only(RESPONSE_403)
# Upstream failures: closing is the safe default (the request body may be half sent).
RESPONSE_502: Final = _fixed(502, "Bad Gateway", "bad gateway", close=True)
RESPONSE_503: Final = _fixed(503, "Service Unavailable", "service unavailable", close=True)
RESPONSE_504: Final = _fixed(504, "Gateway Timeout", "gateway timeout", close=True)
