"""The control side's HTTP/1.1 (edge): a small, strict server for the admin, /metrics and probe ports, and
the probe port's client to the app.

Why not aiohttp: these listeners answer a handful of fixed GET/HEAD paths, and importing aiohttp's server
and client costs a running sidecar about 11 MB of its idle RSS (issue 11: at most 45 MB). The data plane's
own pieces do the work instead: `h1reader.RequestReader` (httptools with raw-byte head budgets) reads the
requests, `http1.parse_request_head` checks them with the data plane's rules (one Host, one
Content-Length, never Content-Length with Transfer-Encoding, ...), `h1reader.ResponseReader` reads the
app's answers to forwarded probes, and one `timers.Deadline` per connection bounds every wait.

Server contract:

* One `asyncio.Protocol` per connection; requests are answered in order (pipelining: at most
  `_MAX_PIPELINED` are queued from what was read; the last one queued is answered with `Connection:
  close`). Reading pauses while a request is being answered, so a client cannot queue more.
* A request that announces a body is answered, then the connection closes: no control endpoint takes a
  body, and a body never read can never be taken for the next request's head (RFC 9112 §9.3).
  `Connection: close`, an HTTP/1.0 request without keep-alive, an Upgrade or CONNECT request and a half
  close from the client end the connection after the answer too.
* Every wait has a deadline: the first head of a connection (and the rest of any head once its first
  byte came) within `head_timeout`, keep-alive idleness `idle_timeout`, a handler `request_timeout`
  (503), a client that does not read the answer `write_timeout` (the connection is aborted).
* At most `max_connections`: a new connection above that closes an idle keep-alive one (RFC 9112 §9.5
  lets a server close those at any time) or, when none is idle, is closed itself.
* A malformed request gets a fixed 400 (431 for a head over `head_bytes`) and the connection closes; it
  is logged as one line at DEBUG (anyone who can connect can send those), never with a traceback and
  never echoing the request. A handler that fails is our bug: one ERROR line (the exception type), 500.
* Answers carry Content-Type (when given), Content-Length (not on 1xx/204/304, RFC 9110 §8.6), Date
  (RFC 9110 §6.6.1) and the handler's extra fields; HEAD gets the GET head without the body (RFC 9110
  §9.3.2). No Server field: nothing here needs to tell a caller what answers.

Client contract (`fetch`): one request on a fresh connection (`Connection: close`), plain TCP or TLS
without verification (the kubelet does not verify a probe target either), no request body, redirects never
followed, interim 1xx answers skipped, at most `max_body` body bytes kept, the whole exchange under one
deadline. Any failure is a `FetchError` whose text is one line without response bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, TypeAlias, cast

from .addr import HostPort
from .errors import SidecarError
from .h1reader import RequestReader, ResponseReader
from .http1 import BadRequest, BadResponse, BodyFraming, ResponseFraming, parse_request_head, parse_response_head
from .timers import Deadline

__all__ = [
    "DEFAULT_LIMITS",
    "ControlServer",
    "FetchError",
    "Fetched",
    "Handler",
    "Limits",
    "Request",
    "Response",
    "fetch",
    "insecure_client_context",
    "route_table",
]

TEXT: Final = "text/plain; charset=utf-8"
JSON: Final = "application/json; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Request:
    """A request head as the handler sees it: method and target as received (ASCII; the target is not
    normalised), fields in order (names as sent, values without trailing blanks, Latin-1 decoded, so bytes
    round-trip). A request body is never read (`has_body` says one was announced)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    http10: bool
    has_body: bool

    @property
    def path(self) -> str:
        """The target without its query (origin-form); other forms come back whole and match nothing."""
        return self.target.partition("?")[0]


@dataclass(frozen=True, slots=True)
class Response:
    """What a handler answers. `content_type` None sends no Content-Type; `headers` are extra fields, in
    order (names and values from our own code, never from a request)."""

    status: int
    body: bytes = b""
    content_type: str | None = TEXT
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode("utf-8"))


# A handler answers at once (the admin endpoints) or with a coroutine (a probe forwarded to the app).
Handler: TypeAlias = Callable[[Request], "Response | Coroutine[Any, Any, Response]"]

# aiohttp's bodies for these, which the admin and /metrics listeners have always answered.
NOT_FOUND: Final = Response.text(404, "404: Not Found")
METHOD_NOT_ALLOWED: Final = Response(405, b"405: Method Not Allowed", headers=(("Allow", "GET,HEAD"),))
_BAD_REQUEST: Final = Response.text(400, "400: Bad Request")
_TOO_LARGE: Final = Response.text(431, "431: Request Header Fields Too Large")
_FAILED: Final = Response.text(500, "500: Internal Server Error")
_TIMED_OUT: Final = Response.text(503, "503: Service Unavailable")
_READ_ONLY: Final = frozenset({"GET", "HEAD"})


def route_table(routes: Mapping[str, Callable[[], Response]]) -> Handler:
    """A handler for read-only endpoints: exact path match (the query is ignored), GET or HEAD; 404 for
    any other path (whatever the method), 405 with `Allow: GET,HEAD` for another method on a known one."""
    table = dict(routes)

    def handle(request: Request) -> Response:
        endpoint = table.get(request.path)
        if endpoint is None:
            return NOT_FOUND
        if request.method not in _READ_ONLY:
            return METHOD_NOT_ALLOWED
        return endpoint()

    return handle


@dataclass(frozen=True, slots=True)
class Limits:
    """Budgets of one control listener (see the module docstring)."""

    max_connections: int = 64
    head_bytes: int = 8 * 1024  # request line + fields; aiohttp's 8190 per line, for the whole head here
    line_bytes: int = 4 * 1024  # the request target alone
    head_timeout: float = 10.0
    idle_timeout: float = 75.0  # aiohttp's keep-alive: Prometheus reuses its connection between scrapes
    request_timeout: float = 30.0
    write_timeout: float = 10.0
    stop_timeout: float = 5.0


DEFAULT_LIMITS: Final = Limits()
_MAX_PIPELINED: Final = 16
# Deadline kinds of a connection.
_HEAD: Final = 1
_IDLE: Final = 2
_WRITE: Final = 3
_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class _Date:
    """IMF-fixdate (RFC 9110 §5.6.7) of now, formatted once per second; locale-independent."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            g = time.gmtime(second)
            self._second = second
            self._text = (
                f"{_DAYS[g.tm_wday]}, {g.tm_mday:02d} {_MONTHS[g.tm_mon - 1]} {g.tm_year} "
                f"{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} GMT"
            )
        return self._text


_http_date: Final = _Date().now


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _encode(response: Response, *, head_only: bool, close: bool, http10_keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {_reason(response.status)}\r\n"]
    if response.content_type is not None:
        lines.append(f"Content-Type: {response.content_type}\r\n")
    lines += [f"{name}: {value}\r\n" for name, value in response.headers]
    if response.status >= 200 and response.status not in (204, 304):
        lines.append(f"Content-Length: {len(response.body)}\r\n")
    lines.append(f"Date: {_http_date()}\r\n")
    if close:
        lines.append("Connection: close\r\n")
    elif http10_keep_alive:
        lines.append("Connection: keep-alive\r\n")  # RFC 9112 §9.3: an HTTP/1.0 client asked to keep it
    lines.append("\r\n")
    head = "".join(lines).encode("latin-1")
    if head_only or response.status < 200 or response.status in (204, 304):
        return head
    return head + response.body


class ControlServer:
    """A control listener: `start()` binds (port 0 picks a free one) and logs `<name> listening on
    host:port`; `stop()` closes the listener and every connection (in-flight handlers are cancelled)."""

    def __init__(
        self, listen: HostPort, name: str, handler: Handler, *, log: logging.Logger, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self._listen = listen
        self.name = name
        self.handler = handler
        self.log = log
        self.limits = limits
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._port: int | None = None

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def idle_connections(self) -> int:
        """Kept-alive connections waiting for their next request (the ones a new connection may replace)."""
        return sum(1 for c in self._conns if c.idle)

    async def start(self) -> int:
        """Bind and serve; an OSError (address in use, ...) propagates with nothing left open."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Conn(self), self._listen.host, self._listen.port, reuse_address=True)
        self._server = server
        self._port = int(server.sockets[0].getsockname()[1]) if server.sockets else self._listen.port
        self.log.info("%s listening on %s", self.name, HostPort(self._listen.host, self._port))
        return self._port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = [c.task for c in self._conns if c.task is not None]
        for conn in list(self._conns):
            conn.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limits.stop_timeout):
                await asyncio.gather(*tasks, return_exceptions=True)
                await server.wait_closed()

    def admit(self, conn: _Conn) -> bool:
        """Count a new connection; False when it must be closed (the limit, no idle one to give way)."""
        if len(self._conns) >= self.limits.max_connections:
            idle = next((c for c in self._conns if c.idle), None)
            if idle is None:
                self.log.debug("%s: connection limit (%d) reached", self.name, self.limits.max_connections)
                return False
            idle.close()
        self._conns.add(conn)
        return True

    def forget(self, conn: _Conn) -> None:
        self._conns.discard(conn)


def _closer(coro: Coroutine[Any, Any, Response]) -> Callable[[asyncio.Task[None]], None]:
    def close(_task: asyncio.Task[None]) -> None:
        coro.close()

    return close


class _Conn(asyncio.Protocol):
    """One control connection (see the module docstring); the `RequestSink` of its reader."""

    __slots__ = (
        "_closing",
        "_deadline",
        "_pending",
        "_read_paused",
        "_reader",
        "_server",
        "_transport",
        "_write_paused",
        "task",
    )

    def __init__(self, server: ControlServer) -> None:
        self._server = server
        limits = server.limits
        self._reader = RequestReader(
            self, head_room=limits.head_bytes, line_room=limits.line_bytes, field_room=limits.head_bytes
        )
        self._deadline = Deadline(asyncio.get_running_loop(), self._expired)
        self._transport: asyncio.Transport | None = None
        # Requests read and not yet answered, in order; an int is a refusal (400/431) to answer last.
        self._pending: deque[Request | int] = deque()
        self.task: asyncio.Task[None] | None = None
        self._closing = False  # answer what is queued, then close
        self._read_paused = False
        self._write_paused = False

    @property
    def idle(self) -> bool:
        """Between requests of a kept-alive connection: nothing read, nothing to answer."""
        return self.task is None and not self._pending and self._deadline.kind == _IDLE and self._deadline.armed

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self._transport = cast(asyncio.Transport, transport)
        if not self._server.admit(self):
            self._transport.close()
            return
        self._deadline.set(self._server.limits.head_timeout, _HEAD)

    def data_received(self, data: bytes) -> None:
        if self._deadline.kind == _IDLE and self._deadline.armed:
            # The next request's first byte: its head must be complete within head_timeout (not extended
            # by more bytes: a head sent a byte at a time still ends at the deadline).
            self._deadline.set(self._server.limits.head_timeout, _HEAD)
        self._reader.feed(data)
        self._dispatch()

    def eof_received(self) -> bool:
        if self.task is not None or self._pending:
            self._closing = True  # answer what was asked, then close (keep the write side open)
            self._reader.stop()
            return True
        return False

    def pause_writing(self) -> None:
        self._write_paused = True
        self._deadline.set(self._server.limits.write_timeout, _WRITE)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._deadline.clear(_WRITE)
        self._dispatch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.forget(self)
        self._deadline.close()
        self._reader.release()
        self._pending.clear()
        self._transport = None
        if self.task is not None:
            self.task.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self._transport is not None:
            self._transport.abort()

    # RequestSink

    def request_head(
        self, method: bytes, target: bytes, names: list[bytes], values: list[bytes], http10: bool,
        raw: bytes | None,
    ) -> None:  # fmt: skip
        del raw
        try:
            if target == b"*" and method != b"OPTIONS":
                raise BadRequest("asterisk-form target with a method other than OPTIONS (RFC 9112 §3.2.4)")
            head = parse_request_head(method, target, names, values, http10=http10)
        except BadRequest as exc:
            self._refuse(400, exc.reason)
            return
        framing = head.framing
        has_body = framing.body is BodyFraming.CHUNKED or bool(framing.content_length)
        self._pending.append(
            Request(
                method.decode("ascii"),
                target.decode("latin-1"),
                tuple(
                    (n.decode("latin-1"), v.rstrip(b" \t").decode("latin-1"))
                    for n, v in zip(names, values, strict=True)
                ),
                http10,
                has_body,
            )
        )
        if has_body or not framing.keep_alive or len(self._pending) >= _MAX_PIPELINED:
            self._closing = True
            self._reader.stop()

    def request_body(self, data: bytes) -> None:
        pass  # never called: the reader stops at a head that announces a body

    def request_end(self) -> None:
        pass  # the request was queued at its head

    def request_upgrade(self, rest: bytes) -> None:
        del rest
        self._closing = True  # Upgrade or CONNECT: never switched; what follows the head is not HTTP/1.1

    def request_error(self, response: bytes, label: str, detail: str) -> None:
        del response
        self._refuse(431 if label == "headers_too_large" else 400, detail)

    # answering

    def _refuse(self, status: int, detail: str) -> None:
        self._server.log.debug("%s: bad request from %s: %s", self._server.name, self._peer(), detail)
        self._pending.append(status)
        self._closing = True
        self._reader.stop()

    def _peer(self) -> str:
        t = self._transport
        peer = t.get_extra_info("peername") if t is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "?"

    def _dispatch(self) -> None:
        """Answer queued requests, in order, while nothing is in flight and the client reads."""
        while self.task is None and not self._write_paused and self._pending and self._transport is not None:
            item = self._pending.popleft()
            if isinstance(item, int):
                self._pending.clear()
                self._answer(None, _TOO_LARGE if item == 431 else _BAD_REQUEST)
                return
            self._deadline.clear()
            try:
                result = self._server.handler(item)
            except Exception as exc:  # our bug, not the client's: one line, a fixed 500
                self._server.log.error("%s: handler failed: %s", self._server.name, type(exc).__name__)
                result = _FAILED
            if isinstance(result, Response):
                self._answer(item, result)
            else:
                self.task = task = asyncio.get_running_loop().create_task(self._await(item, result))
                # A task cancelled before its first step never awaits the handler's coroutine: close it
                # then (a no-op once it ran), or it is reported as never awaited.
                task.add_done_callback(_closer(result))
        t = self._transport
        if t is None or t.is_closing():
            return
        busy = self.task is not None or bool(self._pending)
        if busy != self._read_paused:
            self._read_paused = busy
            if busy:
                t.pause_reading()
            else:
                t.resume_reading()
        if not busy and not self._write_paused:
            # Waiting for the next request: idle until its first byte, unless part of its head is here.
            limits = self._server.limits
            if self._reader.at_message_start:
                if self._deadline.kind != _IDLE or not self._deadline.armed:
                    self._deadline.set(limits.idle_timeout, _IDLE)
            elif self._deadline.kind != _HEAD or not self._deadline.armed:
                self._deadline.set(limits.head_timeout, _HEAD)

    async def _await(self, request: Request, pending: Coroutine[Any, Any, Response]) -> None:
        try:
            async with asyncio.timeout(self._server.limits.request_timeout):
                response = await pending
        except TimeoutError:
            self._server.log.info(
                "%s: %s %s not answered within %.0fs", self._server.name, request.method, request.path[:100],
                self._server.limits.request_timeout,
            )  # fmt: skip
            response = _TIMED_OUT
        except Exception as exc:  # our bug, not the client's: one line, a fixed 500
            self._server.log.error("%s: handler failed: %s", self._server.name, type(exc).__name__)
            response = _FAILED
        self.task = None
        self._answer(request, response)
        self._dispatch()

    def _answer(self, request: Request | None, response: Response) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return
        close = request is None or (self._closing and not self._pending)
        t.write(
            _encode(
                response,
                head_only=request is not None and request.method == "HEAD",
                close=close,
                http10_keep_alive=request is not None and request.http10,
            )
        )
        if close:
            self._pending.clear()
            t.close()  # after the answer is flushed; a client that does not read it is aborted
            if t.get_write_buffer_size():
                self._deadline.set(self._server.limits.write_timeout, _WRITE)
            else:
                self._deadline.cancel()

    def _expired(self, kind: int) -> None:
        t = self._transport
        if t is None:
            return
        if kind == _HEAD:
            self._server.log.debug(
                "%s: no complete request head from %s within %.0fs", self._server.name, self._peer(),
                self._server.limits.head_timeout,
            )  # fmt: skip
            t.abort()
        elif kind == _WRITE:
            self._server.log.debug("%s: %s did not read its answer", self._server.name, self._peer())
            t.abort()
        else:
            t.close()  # keep-alive idleness: nothing was asked


# ---------------------------------------------------------------------------------------------------------
# The client (probe forwarding)


class FetchError(SidecarError):
    """A forwarded request that got no usable answer; one line, no response bytes."""


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int
    content_type: str | None  # the app's Content-Type value, if it sent one
    body: bytes  # at most `max_body` bytes of it


_MAX_INTERIM: Final = 8  # 1xx heads skipped before a final one (100 Continue, 103 Early Hints)
_READ_SIZE: Final = 64 * 1024


def insecure_client_context() -> ssl.SSLContext:
    """TLS for a probe target: no certificate or name check (the kubelet checks neither; the target is the
    pod's own app on loopback). Build once and reuse: a context costs a few hundred microseconds."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _Collect:
    """The ResponseSink of one fetch."""

    __slots__ = (
        "body", "content_type", "done", "error", "framing", "head_request", "interim", "kept", "max_body", "status",
    )  # fmt: skip

    def __init__(self, head_request: bool, max_body: int) -> None:
        self.head_request = head_request
        self.max_body = max_body
        self.status = 0
        self.content_type: str | None = None
        self.framing: ResponseFraming | None = None
        self.body: list[bytes] = []
        self.kept = 0
        self.interim = 0
        self.done = False
        self.error: str | None = None

    def response_interim(self, status: int, reason: bytes, names: list[bytes], values: list[bytes]) -> None:
        self.interim += 1
        if self.interim > _MAX_INTERIM:
            self.fail("too many interim responses")

    def response_head(
        self, status: int, reason: bytes, names: list[bytes], values: list[bytes], raw: bytes | None
    ) -> None:
        self.status = status
        if status == 101:
            self.done = True  # a switch nobody asked for: the caller maps any status < 200 to 502
            return
        try:
            head = parse_response_head(
                status, reason, names, values, head_request=self.head_request, keep_alive=False, http10_peer=False
            )
        except BadResponse:
            self.fail("malformed response head")
            return
        self.framing = head.framing
        for name, value in zip(names, values, strict=True):
            if name.lower() == b"content-type":
                self.content_type = value.strip(b" \t").decode("latin-1")
                break
        if head.framing is ResponseFraming.NONE:
            self.done = True

    def response_body(self, data: bytes) -> None:
        room = self.max_body - self.kept
        if room > 0:
            piece = data[:room]
            self.body.append(piece)
            self.kept += len(piece)
        if self.kept >= self.max_body:
            self.done = True  # enough: the rest is never read

    def response_end(self, reusable: bool) -> None:
        self.done = True

    def response_switch(self, rest: bytes) -> None:
        self.done = True

    def response_error(self, kind: str) -> None:
        self.fail("response head too large" if kind == "head_too_large" else "malformed response")

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self.done = True


async def fetch(
    method: str,
    host: str,
    port: int,
    target: str,
    headers: Sequence[tuple[str, str]],
    *,
    tls: ssl.SSLContext | None,
    within: float,
    max_body: int,
    head_bytes: int = 16 * 1024,
) -> Fetched:
    """One `method target` to host:port on a fresh connection, all of it `within` seconds; raise `FetchError`.

    `headers` are sent after `Host: host:port` and before `Connection: close`, as given (the caller filters
    them); `target` is sent verbatim. Response: interim 1xx heads are skipped, a 101 comes back as such,
    the body (decoded from chunked framing, otherwise as received) is kept up to `max_body` bytes; a body
    that ends before its framing said it would is an error."""
    lines = [f"{method} {target} HTTP/1.1\r\n", f"Host: {HostPort(host, port)}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    lines.append("Connection: close\r\n\r\n")
    request = "".join(lines).encode("latin-1")
    sink = _Collect(method == "HEAD", max_body)
    reader = ResponseReader(head_bytes)
    reader.expect(sink, head_request=method == "HEAD")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(within):
            stream, writer = await asyncio.open_connection(host, port, ssl=tls, limit=_READ_SIZE)
            writer.write(request)
            await writer.drain()
            while not sink.done:
                data = await stream.read(_READ_SIZE)
                if not data:
                    if sink.framing is ResponseFraming.CLOSE:
                        break  # RFC 9112 §6.3 rule 8: the close ends this body
                    raise FetchError(
                        "connection closed before the response ended" if sink.status else "connection closed"
                    )
                reader.feed(data)
    except TimeoutError:
        raise FetchError(f"no response within {within:g}s") from None
    except (OSError, ssl.SSLError) as exc:
        raise FetchError(f"{type(exc).__name__}: {exc.strerror or exc}") from None
    finally:
        if writer is not None:
            writer.transport.abort()  # nothing more to say or hear; no wait for a TLS close_notify
    if sink.error is not None:
        raise FetchError(sink.error)
    return Fetched(sink.status, sink.content_type, b"".join(sink.body))
