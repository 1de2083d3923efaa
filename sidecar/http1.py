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
# What a validated step-up token said (sent to the app by us; never taken from outside, like XFCC).
JWT_SUBJECT: Final = b"x-spiffe-jwt-subject"
JWT_AUDIENCE: Final = b"x-spiffe-jwt-audience"
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
_DROP: Final = HOP_BY_HOP | {b"content-length", XFCC, JWT_SUBJECT, JWT_AUDIENCE}
# What a request loses by default: the above plus the routing-override fields.
REQUEST_DROP: Final = _DROP | {h.encode("ascii") for h in ROUTING_OVERRIDE_HEADERS}
# What a response loses before we re-add our own framing.
_RESPONSE_DROP: Final = _DROP


def request_drop(extra: Sequence[str]) -> frozenset[bytes]:
    """The set of request field names dropped before forwarding: hop-by-hop and framing fields, XFCC, and
    `extra` (the configured routing-override list, lower-cased). Built once per listener."""
    return _DROP | {h.lower().encode("ascii") for h in extra}


def valid_host(value: bytes) -> bool:
    """`uri-host [":" port]` without userinfo (RFC 9110 §7.2, RFC 3986 §3.2.2): a Host or `:authority`."""
    return _HOST_RE.fullmatch(value) is not None


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip(_OWS).lower() for t in value.split(b",") if t.strip(_OWS)]


def check_method(method: bytes) -> None:
    """Raise `BadRequest` for methods the sidecar never relays: CONNECT (RFC 9110 §9.3.6) asks the
    proxy for a tunnel we do not offer; relaying `CONNECT /path` as an ordinary request would let the
    app see a method its router may treat as a tunnel request."""
    if method == b"CONNECT":
        raise BadRequest("CONNECT is not relayed (RFC 9112 §3.2.3)")


class RequestHead:
    """A validated request head, without its request line: the framing, the Host value and the end-to-end
    fields to forward (`fields`: `name: value\\r\\n` lines, the `drop` set and the fields named in
    Connection left out). Immutable: `RequestHeads` shares one between identical heads."""

    __slots__ = (
        "access", "authorization", "fields", "fields_size", "framing", "host", "http10", "request_id", "traceparent",
        "user_agent",
    )  # fmt: skip

    def __init__(
        self, framing: RequestFraming, host: bytes | None, fields: bytes, fields_size: int, http10: bool,
        request_id: bytes | None = None, traceparent: bytes | None = None, user_agent: bytes | None = None,
        authorization: bytes | None = None,
    ) -> None:  # fmt: skip
        self.framing = framing
        self.host = host
        self.fields = fields
        self.fields_size = fields_size  # the fields as received, with their CRLFs (OWS not counted)
        self.http10 = http10
        # For the access log (and, when absent, made by us and forwarded): X-Request-Id, W3C traceparent.
        self.request_id = request_id
        self.traceparent = traceparent
        self.user_agent = user_agent
        self.authorization = authorization  # for a step-up rule's JWT-SVID (never logged)
        self.access: str | None = None  # a memo of the data plane: this head's access-log members

    def size(self, method: bytes, target: bytes) -> int:
        """Bytes of the whole head: `method SP target SP HTTP/1.x CRLF`, the fields, the final CRLF."""
        return len(method) + len(target) + 14 + self.fields_size


# The framing of the common request: no body, keep-alive (HTTP/1.1) or not (HTTP/1.0 default).
_PLAIN_11: Final = RequestFraming(BodyFraming.NONE, None, False, None, True)
_PLAIN_10: Final = RequestFraming(BodyFraming.NONE, None, False, None, False)
# Names whose presence needs the careful path of `parse_request_head`.
_FRAMING_NAMES: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"expect", b"upgrade"}
)
_NAMES_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+(?:\n[!#$%&'*+\-.^_`|~0-9a-z]+)*")
# Over `b"\n".join(values)`: a control other than HTAB (the separator, LF, is counted separately), or a
# value starting with a blank (only an obs-fold continuation keeps one: RFC 9112 §5.2).
_BAD_VALUES_RE: Final = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|(?:^|\n)[ \t]")
_FIELD: Final = b"%s: %s\r\n"


def _field_error(names: Sequence[bytes], values: Sequence[bytes]) -> BadRequest:
    """The first bad field, named (the slow path of a head that failed the joined checks)."""
    for name, value in zip(names, values, strict=True):
        if _TOKEN_RE.fullmatch(name) is None:
            return BadRequest(f"invalid header name {name[:40]!r}")
        if b"\n" in value or _BAD_VALUE_RE.search(value) is not None:
            return BadRequest(f"control character in the value of header {name.decode()!r}")
        if value[:1] in (b" ", b"\t"):
            return BadRequest(f"obsolete line folding in header {name.decode()!r}")
    return BadRequest("invalid header field")  # pragma: no cover - the joined checks and this loop agree


def parse_request_head(
    method: bytes,
    target: bytes,
    names: Sequence[bytes],
    values: Sequence[bytes],
    *,
    http10: bool = False,
    drop: frozenset[bytes] = REQUEST_DROP,
) -> RequestHead:
    """Validate a request head (the rules in the module docstring) and prepare what is forwarded, in one
    pass; raise `BadRequest`. `names`/`values` are the fields as the parser gave them, in order; the
    method and target are not looked at here (`check_method`, `policy.normalize_target`).

    The common head (no body, no Connection/Expect/Upgrade, nothing to drop) costs a few C-level calls:
    the names and values are checked joined, not one by one."""
    n = len(names)
    lnames = [name.lower() for name in names]
    joined = b"\n".join(lnames)
    if n:
        vjoined = b"\n".join(values)
        if (
            _NAMES_RE.fullmatch(joined) is None
            or vjoined.count(b"\n") != n - 1
            or _BAD_VALUES_RE.search(vjoined) is not None
        ):
            raise _field_error(names, values)
    hosts = lnames.count(b"host")
    host: bytes | None = None
    if hosts:
        if hosts > 1:
            raise BadRequest("more than one Host (RFC 9112 §3.2)")
        host = values[lnames.index(b"host")].rstrip()
        if _HOST_RE.fullmatch(host) is None:
            raise BadRequest("Host is not a valid host[:port] (RFC 9110 §7.2, RFC 3986 §3.2.2)")
    elif not http10:
        raise BadRequest("missing Host (RFC 9112 §3.2)")
    connection: list[bytes] = []
    if _FRAMING_NAMES.isdisjoint(lnames):
        framing = _PLAIN_10 if http10 else _PLAIN_11
    else:
        framing, connection = _request_framing(lnames, values, http10)
    # `name: value CRLF` per field; `joined` holds the names and n - 1 separators.
    size = len(joined) + sum(map(len, values)) + 3 * n + (1 if n else 0)
    if not connection and drop.isdisjoint(lnames) and b"_" not in joined:
        fields = b"".join(map(_FIELD.__mod__, zip(names, map(bytes.rstrip, values), strict=True)))
    else:
        if connection:
            drop = drop.union(connection)
        # `_`: the same CGI variable as its `-` spelling (module docstring), so never forwarded.
        fields = b"".join(
            [_FIELD % (names[i], values[i].rstrip()) for i, ln in enumerate(lnames)
             if ln not in drop and b"_" not in ln]
        )  # fmt: skip
    return RequestHead(
        framing, host, fields, size, http10, _field(lnames, values, b"x-request-id"),
        _field(lnames, values, b"traceparent"), _field(lnames, values, b"user-agent"),
        _field(lnames, values, b"authorization"),
    )  # fmt: skip


def _field(lnames: list[bytes], values: Sequence[bytes], name: bytes) -> bytes | None:
    """The value of the first field `name` (lower case), or None."""
    return values[lnames.index(name)].rstrip() if name in lnames else None


# Heads cached per raw bytes: their number, and the longest raw head cached.
_HEAD_CACHE_MAX: Final = 512
_HEAD_CACHE_BYTES: Final = 4096


class RequestHeads:
    """`parse_request_head` for one listener (its `drop` set), remembering the result per raw field block.

    The result is a pure function of the field bytes (and `drop`, fixed here), so a client that sends the
    same fields again (keep-alive traffic almost always does) costs one dict lookup: `raw` is the block as
    it arrived, from the first field to the CRLF before the empty line, when the reader saw it whole."""

    __slots__ = ("_cache", "drop")

    def __init__(self, drop: frozenset[bytes]) -> None:
        self.drop = drop
        self._cache: dict[tuple[bytes, bool], RequestHead] = {}

    def parse(
        self, method: bytes, target: bytes, names: Sequence[bytes], values: Sequence[bytes], http10: bool,
        raw: bytes | None,
    ) -> RequestHead:  # fmt: skip
        if raw is None or len(raw) > _HEAD_CACHE_BYTES:
            return parse_request_head(method, target, names, values, http10=http10, drop=self.drop)
        key = (raw, http10)
        head = self._cache.get(key)
        if head is None:
            head = parse_request_head(method, target, names, values, http10=http10, drop=self.drop)
            if len(self._cache) >= _HEAD_CACHE_MAX:
                self._cache.clear()
            self._cache[key] = head
        return head

    def known(self, raw: bytes, http10: bool) -> RequestHead | None:
        """The result for a field block the full path already accepted, else None (the fast path)."""
        return self._cache.get((raw, http10))

    def simple(self, method: bytes, target: bytes, raw: bytes, http10: bool) -> RequestHead | None:
        """The fast path's head: the cached one, else, for a field block in `_SIMPLE_BLOCK_RE` (a subset of
        RFC 9112 §5 that llhttp accepts and splits the same way: token names, no space before the colon,
        values of visible ASCII, SP and HTAB, CRLF line ends, no obs-fold), `parse_request_head` on its
        fields without the C parser and its per-field callbacks (what traffic with a fresh X-Request-Id or
        traceparent per request costs). None when the block is outside the subset or the head is refused:
        the full path then decides, and answers."""
        key = (raw, http10)
        head = self._cache.get(key)
        if head is not None:
            return head
        if len(raw) > _HEAD_CACHE_BYTES or _SIMPLE_BLOCK_RE.fullmatch(raw) is None:
            return None
        pairs = _SIMPLE_FIELD_RE.findall(raw)
        try:
            head = parse_request_head(method, target, [p[0] for p in pairs], [p[1] for p in pairs], http10=http10,
                                      drop=self.drop)  # fmt: skip
        except BadRequest:
            return None
        if len(self._cache) >= _HEAD_CACHE_MAX:
            self._cache.clear()
        self._cache[key] = head
        return head


# One field line of the fast path's subset of RFC 9112 §5.1 (see RequestHeads.simple): the value as llhttp
# reports it, leading whitespace dropped and trailing whitespace kept.
_SIMPLE_FIELD: Final = rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[\x21-\x7e][\x20-\x7e\t]*)?)\r\n"
_SIMPLE_FIELD_RE: Final = re.compile(_SIMPLE_FIELD)
_SIMPLE_BLOCK_RE: Final = re.compile(b"(?:" + _SIMPLE_FIELD + b")*")


def _request_framing(
    lnames: Sequence[bytes], values: Sequence[bytes], http10: bool
) -> tuple[RequestFraming, list[bytes]]:
    """The careful path: Content-Length, Transfer-Encoding, Connection, Expect, Upgrade (RFC 9112 §6)."""
    content_length: bytes | None = None
    transfer_encoding: bytes | None = None
    expect_continue = False
    upgrade: bytes | None = None
    connection: list[bytes] = []
    for lname, value in zip(lnames, values, strict=True):
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
    # Dropped on the way: the fields Connection names, and Expect (RFC 9110 §10.1.1: we answer the
    # expectation ourselves once the request is authorised; the app would send its own 100).
    return RequestFraming(body, length, expect_continue, upgrade, keep_alive), (
        [*connection, b"expect"] if expect_continue else connection
    )


def check_request_headers(headers: Headers, *, version: str = "1.1") -> RequestFraming:
    """Validate a parsed request head strictly; return its framing or raise `BadRequest`.

    `version` is httptools' `get_http_version()` ("1.1" or "1.0"). (`parse_request_head` with pairs.)
    """
    names = [n for n, _ in headers]
    values = [v for _, v in headers]
    return parse_request_head(b"GET", b"/", names, values, http10=version == "1.0").framing


def xfcc_value(own_id: SpiffeId, peer_leaf_sha256_hex: str, peer_id: SpiffeId) -> bytes:
    """Envoy's XFCC element `By=<own id>;Hash=<sha256 hex of the peer leaf DER>;URI=<peer id>`.

    SPIFFE IDs cannot contain `,;="` (SPIFFE-ID §2), so no quoting is needed.
    """
    digest = peer_leaf_sha256_hex.lower()
    if len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise ValueError("peer_leaf_sha256_hex must be 64 hex digits")
    return f"By={own_id};Hash={digest};URI={peer_id}".encode("ascii")


_CRLF: Final = b"\r\n"
_REQ_TAIL: Final = b" HTTP/1.1\r\n"
_XFCC_PREFIX: Final = b"x-forwarded-client-cert: "
_TE_CHUNKED: Final = b"transfer-encoding: chunked\r\n"
_CL_PREFIX: Final = b"content-length: "
_CONN_UPGRADE: Final = b"connection: upgrade\r\nupgrade: "
_CONN_CLOSE: Final = b"connection: close\r\n"
_HOST_PREFIX: Final = b"host: "
CHUNK_END: Final = b"0\r\n\r\n"


def without_field(fields: bytes, name: bytes) -> bytes:
    """`fields` (`name: value CRLF` lines) without the lines of field `name` (lower case)."""
    return b"".join(
        line + b"\r\n" for line in fields.split(b"\r\n")[:-1] if line.partition(b":")[0].lower() != name
    )


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1); `data` must not be empty (that is `CHUNK_END`)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def request_head(
    method: bytes,
    target: bytes,
    head: RequestHead,
    *,
    identity: bytes,
    host_fallback: bytes | None,
    extra: bytes = b"",
    fields: bytes | None = None,
) -> bytes:
    """The HTTP/1.1 head sent upstream: the normalised `target`, the forwarded fields, `identity` (a whole
    `x-forwarded-client-cert: ...\\r\\n` line, or b""), `extra` lines of ours, and our own framing."""
    f = head.framing
    parts = [method, b" ", target, _REQ_TAIL, head.fields if fields is None else fields]
    if head.host is None and host_fallback is not None:
        parts += (_HOST_PREFIX, host_fallback, _CRLF)  # HTTP/1.0 without Host; 1.1 requires one
    parts.append(identity)
    if extra:
        parts.append(extra)
    if f.content_length is not None:
        parts += (_CL_PREFIX, b"%d" % f.content_length, _CRLF)
    elif f.body is BodyFraming.CHUNKED:
        parts.append(_TE_CHUNKED)
    if f.upgrade is not None:
        parts += (_CONN_UPGRADE, f.upgrade, _CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


def identity_line(xfcc: bytes) -> bytes:
    """The `x-forwarded-client-cert` line for `request_head` (built once per connection)."""
    return _XFCC_PREFIX + xfcc + _CRLF


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
    `drop` (default `REQUEST_DROP`; see `request_drop`) and those named in Connection are left out.
    (The framing is given, not checked: `parse_request_head` + `request_head` is the checked form.)"""
    if chunked and content_length is not None:
        raise ValueError("a request body is either chunked or has a Content-Length, not both")
    names = [n for n, _ in headers]
    lnames = [n.lower() for n in names]
    values = [v for _, v in headers]
    connection = [t for ln, v in zip(lnames, values, strict=True) if ln == b"connection" for t in _tokens(v)]
    drop = drop.union(connection) if connection else drop
    fields = b"".join(
        [_FIELD % (names[i], values[i].strip(_OWS)) for i, ln in enumerate(lnames) if ln not in drop and b"_" not in ln]
    )
    body = BodyFraming.CHUNKED if chunked else (BodyFraming.NONE if content_length is None else
                                                 BodyFraming.CONTENT_LENGTH)
    head = RequestHead(RequestFraming(body, content_length, False, upgrade, True),
                       b"x" if b"host" in lnames else None, fields, 0, False)
    return request_head(method, target, head, identity=identity_line(xfcc), host_fallback=host_fallback)


# ---------------------------------------------------------------------------------------------------------
# Responses


class ResponseFraming(enum.Enum):
    NONE = "none"  # no body: HEAD, 1xx, 204, 304 (RFC 9112 §6.3 rules 1-2)
    CONTENT_LENGTH = "content_length"
    CHUNKED = "chunked"
    CLOSE = "close"  # delimited by the connection closing (RFC 9112 §6.3 rule 8)


class BadResponse(SidecarError):
    """A response head from the next hop we refuse to relay (502); `reason` is for the metrics label."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ResponseHead:
    """A response head checked and rewritten for the downstream peer.

    `head`: what the peer gets (our framing, hop-by-hop fields dropped); `framing` is how the *app's* body
    is delimited; `chunked_down` whether we send the peer a chunked body (the app's chunked body is
    re-chunked chunk by chunk; a close-delimited one is re-framed as chunked for HTTP/1.1 peers);
    `keep_alive` whether the downstream connection may carry another request after this response;
    `upstream_keep_alive` whether the app's connection may (its version and Connection, RFC 9112 §9.3)."""

    __slots__ = ("chunked_down", "content_length", "framing", "head", "keep_alive", "status", "upstream_keep_alive")

    def __init__(
        self, status: int, framing: ResponseFraming, content_length: int | None, head: bytes, chunked_down: bool,
        keep_alive: bool, upstream_keep_alive: bool = True,
    ) -> None:  # fmt: skip
        self.status = status
        self.framing = framing
        self.content_length = content_length
        self.head = head
        self.chunked_down = chunked_down
        self.keep_alive = keep_alive
        self.upstream_keep_alive = upstream_keep_alive


_RESPONSE_FRAMING_NAMES: Final = frozenset({b"content-length", b"transfer-encoding", b"connection"})


def parse_response_head(
    status: int,
    reason: bytes,
    names: Sequence[bytes],
    values: Sequence[bytes],
    *,
    head_request: bool,
    keep_alive: bool,
    http10_peer: bool,
    http10_upstream: bool = False,
) -> ResponseHead:
    """Check the app's (or, outbound, the remote workload's) final response head and build the one sent
    downstream; raise `BadResponse` for framing that cannot be relayed safely (RFC 9112 §6.3 rule 5: an
    invalid or conflicting Content-Length is an unrecoverable error for a proxy: 502).

    `keep_alive` is what the request side allows (the client's Connection, our draining, whether the whole
    request was read); the result is False too when the body can only end with the connection."""
    n = len(names)
    lnames = [name.lower() for name in names]
    joined = b"\n".join(lnames)
    if n:
        vjoined = b"\n".join(values)
        if (
            _NAMES_RE.fullmatch(joined) is None
            or vjoined.count(b"\n") != n - 1
            or _BAD_VALUES_RE.search(vjoined) is not None
        ):
            raise BadResponse("protocol")
    no_body = head_request or status in (204, 304)
    connection: list[bytes] = []
    content_length: int | None = None
    chunked = False
    other_codings = b""
    if not _RESPONSE_FRAMING_NAMES.isdisjoint(lnames):
        cl_text: bytes | None = None
        for lname, value in zip(lnames, values, strict=True):
            if lname == b"content-length":
                v = value.strip(_OWS)
                if _DIGITS_RE.fullmatch(v) is None or (cl_text is not None and v != cl_text):
                    raise BadResponse("protocol")
                cl_text = v
            elif lname == b"transfer-encoding":
                codings = _tokens(value)
                if chunked or not codings or codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
                    raise BadResponse("protocol")  # RFC 9112 §6.3 rule 4 would be close-delimited: refuse
                chunked = True
                # Codings applied before chunked (gzip...) stay announced: we only re-chunk the body.
                other_codings = b", ".join(codings[:-1])
            elif lname == b"connection":
                connection.extend(_tokens(value))
        if chunked and cl_text is not None:
            raise BadResponse("protocol")  # RFC 9112 §6.1: a smuggling signal, never relayed
        if cl_text is not None:
            content_length = int(cl_text)
    if no_body:
        framing = ResponseFraming.NONE
    elif chunked:
        framing = ResponseFraming.CHUNKED
    elif content_length is not None:
        framing = ResponseFraming.CONTENT_LENGTH
    else:
        framing = ResponseFraming.CLOSE
    # A close-delimited body is re-framed as chunked for HTTP/1.1 peers, so keep-alive survives.
    # An HTTP/1.0 caller gets no Transfer-Encoding (RFC 9112 §6.1): a chunked body reaches it de-chunked and
    # delimited by the connection closing (codings before chunked could not be announced to it: 502).
    if http10_peer and other_codings:
        raise BadResponse("protocol")
    chunked_down = framing is not ResponseFraming.NONE and framing is not ResponseFraming.CONTENT_LENGTH and (
        not http10_peer
    )
    keep_alive = keep_alive and (
        framing is ResponseFraming.NONE or framing is ResponseFraming.CONTENT_LENGTH or chunked_down
    )
    parts = [b"HTTP/1.1 %d " % status, reason, _CRLF]
    if not connection and _RESPONSE_DROP.isdisjoint(lnames):
        parts.append(b"".join(map(_FIELD.__mod__, zip(names, map(bytes.rstrip, values), strict=True))))
    else:
        drop = _RESPONSE_DROP.union(connection) if connection else _RESPONSE_DROP
        parts += [_FIELD % (names[i], values[i].rstrip()) for i, ln in enumerate(lnames) if ln not in drop]
    if status != 204:
        if content_length is not None and (not no_body or head_request):
            parts += (_CL_PREFIX, b"%d" % content_length, _CRLF)
        elif chunked_down and not no_body:
            if other_codings:
                parts += (b"transfer-encoding: ", other_codings, b", chunked\r\n")
            else:
                parts.append(_TE_CHUNKED)
    if not keep_alive:
        parts.append(_CONN_CLOSE)
    parts.append(_CRLF)
    upstream_keep_alive = b"keep-alive" in connection if http10_upstream else b"close" not in connection
    return ResponseHead(
        status, framing, content_length, b"".join(parts), chunked_down and not no_body, keep_alive,
        upstream_keep_alive and framing is not ResponseFraming.CLOSE,
    )  # fmt: skip


class ResponseHeads:
    """`parse_response_head` remembering its result per raw head (status line and fields, as received)
    and per request-side flags: the result is a pure function of them (see `RequestHeads`)."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, bool, bool, bool], ResponseHead] = {}

    def parse(
        self, status: int, reason: bytes, names: Sequence[bytes], values: Sequence[bytes], raw: bytes | None, *,
        head_request: bool, keep_alive: bool, http10_peer: bool,
    ) -> ResponseHead:  # fmt: skip
        if raw is None or len(raw) > _HEAD_CACHE_BYTES:
            return parse_response_head(status, reason, names, values, head_request=head_request,
                                       keep_alive=keep_alive, http10_peer=http10_peer)  # fmt: skip
        key = (raw, head_request, keep_alive, http10_peer)
        head = self._cache.get(key)
        if head is None:
            head = parse_response_head(status, reason, names, values, head_request=head_request,
                                       keep_alive=keep_alive, http10_peer=http10_peer,
                                       http10_upstream=raw.startswith(b"HTTP/1.0"))  # fmt: skip
            if len(self._cache) >= _HEAD_CACHE_MAX:
                self._cache.clear()
            self._cache[key] = head
        return head

    def known(self, raw: bytes, head_request: bool, keep_alive: bool, http10_peer: bool) -> ResponseHead | None:
        """The result for a head the full path (the C parser and `parse_response_head`) already accepted,
        else None: the data plane's fast path for a response that arrives whole."""
        return self._cache.get((raw, head_request, keep_alive, http10_peer))


def interim_head(status: int, reason: bytes, names: Sequence[bytes], values: Sequence[bytes]) -> bytes:
    """A 1xx head relayed as is, hop-by-hop fields dropped (RFC 9110 §15.2)."""
    lnames = [name.lower() for name in names]
    connection = [t for ln, v in zip(lnames, values, strict=True) if ln == b"connection" for t in _tokens(v)]
    drop = _RESPONSE_DROP.union(connection)
    fields = [_FIELD % (names[i], values[i].rstrip()) for i, ln in enumerate(lnames) if ln not in drop]
    return b"".join([b"HTTP/1.1 %d " % status, reason, _CRLF, *fields, _CRLF])


def switching_head(reason: bytes, names: Sequence[bytes], values: Sequence[bytes], upgrade: bytes) -> bytes:
    """A 101 head for an upgrade we relay: hop-by-hop fields dropped, `connection: upgrade` re-added."""
    lnames = [name.lower() for name in names]
    connection = [t for ln, v in zip(lnames, values, strict=True) if ln == b"connection" for t in _tokens(v)]
    drop = _RESPONSE_DROP.union(connection)
    fields = [_FIELD % (names[i], values[i].rstrip()) for i, ln in enumerate(lnames) if ln not in drop]
    return b"".join([b"HTTP/1.1 101 ", reason, _CRLF, *fields, _CONN_UPGRADE, upgrade, _CRLF, _CRLF])


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
    """The head sent back to the peer for the app's response, framing given (1xx and 204 never carry
    framing, RFC 9110 §8.6, RFC 9112 §6.1; a 101 carries `upgrade`). `parse_response_head` is the
    checked form the data plane uses."""
    if chunked and content_length is not None:
        raise ValueError("a response body is either chunked or has a Content-Length, not both")
    names = [n for n, _ in headers]
    values = [v for _, v in headers]
    if status == 101:
        if upgrade is not None:
            return switching_head(reason, names, values, upgrade)
        return interim_head(101, reason, names, values)
    if status < 200:
        return interim_head(status, reason, names, values)
    lnames = [n.lower() for n in names]
    connection = [t for ln, v in zip(lnames, values, strict=True) if ln == b"connection" for t in _tokens(v)]
    drop = _RESPONSE_DROP.union(connection)
    parts = [b"HTTP/1.1 %d " % status, reason, _CRLF]
    parts += [_FIELD % (names[i], values[i].strip(_OWS)) for i, ln in enumerate(lnames) if ln not in drop]
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
# A step-up rule without a valid JWT-SVID (RFC 6750 §3: the challenge; invalid_token covers a missing one too).
_CHALLENGE: Final = b'\r\nwww-authenticate: Bearer error="invalid_token"\r\n'
RESPONSE_401: Final = _fixed(401, "Unauthorized", "unauthorized", close=False).replace(b"\r\n", _CHALLENGE, 1)
RESPONSE_401_CLOSE: Final = _fixed(401, "Unauthorized", "unauthorized", close=True).replace(b"\r\n", _CHALLENGE, 1)
RESPONSE_403_CLOSE: Final = _fixed(403, "Forbidden", "forbidden", close=True)
RESPONSE_403_HEAD: Final = head_only(RESPONSE_403)
# Upstream failures: closing is the safe default (the request body may be half sent).
RESPONSE_502: Final = _fixed(502, "Bad Gateway", "bad gateway", close=True)
RESPONSE_503: Final = _fixed(503, "Service Unavailable", "service unavailable", close=True)
RESPONSE_504: Final = _fixed(504, "Gateway Timeout", "gateway timeout", close=True)
