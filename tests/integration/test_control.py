"""sidecar.control over real loopback sockets, on uvloop: the control server's limits (head size, head and
idle deadlines, a client that does not read, the connection cap), keep-alive, pipelining, HEAD, bodies and
malformed requests (a fixed answer, one DEBUG line, no traceback), and the probe client `fetch` against
small servers that answer well, slowly, short or over TLS with a certificate nobody verifies.

Every await is bounded: `io()` wraps each exchange in `asyncio.timeout`, and the module has a test timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sidecar.addr import HostPort
from sidecar.control import (
    ControlServer,
    FetchError,
    Handler,
    Limits,
    Request,
    Response,
    fetch,
    insecure_client_context,
    route_table,
)
from tests.pki import CA

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

LOG = logging.getLogger("spiffe_sidecar.test_control")
WAIT = 10.0  # the bound of one exchange on a shared 2-core machine
T = TypeVar("T")


async def io(aw: Awaitable[T], seconds: float = WAIT) -> T:
    async with asyncio.timeout(seconds):
        return await aw


def _routes() -> dict[str, Callable[[], Response]]:
    return {
        "/healthz": lambda: Response.text(200, "ok\n"),
        "/big": lambda: Response(200, b"x" * (16 << 20)),
    }


@contextlib.asynccontextmanager
async def serving(handler: Handler | None = None, **limits: Any) -> AsyncIterator[tuple[ControlServer, int]]:
    server = ControlServer(
        HostPort("127.0.0.1", 0), "test", handler or route_table(_routes()), log=LOG, limits=Limits(**limits)
    )
    port = await io(server.start())
    try:
        yield server, port
    finally:
        await io(server.stop())


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await io(asyncio.open_connection("127.0.0.1", port))


async def response(reader: asyncio.StreamReader, *, head_request: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One response: (status, fields lower-cased, body by Content-Length)."""
    head = await io(reader.readuntil(b"\r\n\r\n"))
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    length = 0 if head_request else int(fields.get("content-length", "0"))
    body = await io(reader.readexactly(length)) if length else b""
    return status, fields, body


async def until_closed(reader: asyncio.StreamReader, seconds: float = WAIT) -> bytes:
    """Everything up to the server's close (EOF or reset); TimeoutError if it stays open `seconds`."""
    data = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                data += chunk
    return data


def get(target: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


# ---------------------------------------------------------------------------------------------------------
# Binding


async def test_binds_a_free_port_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    async with serving() as (server, port):
        assert port > 0 and server.port == port
        assert f"test listening on 127.0.0.1:{port}" in caplog.messages


async def test_a_taken_port_raises_and_leaves_nothing_listening() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ControlServer(HostPort("127.0.0.1", port), "test", route_table({}), log=LOG)
        with pytest.raises(OSError):
            await io(server.start())
        assert server.port is None
        await io(server.stop())  # nothing to stop: no error either


# ---------------------------------------------------------------------------------------------------------
# Requests and answers


async def test_keep_alive_serves_two_requests_on_one_connection() -> None:
    async with serving() as (server, port):
        reader, writer = await connect(port)
        try:
            for _ in range(2):
                writer.write(get("/healthz"))
                status, fields, body = await response(reader)
                assert (status, body) == (200, b"ok\n")
                assert fields["content-type"] == "text/plain; charset=utf-8" and "connection" not in fields
                assert fields["date"].endswith(" GMT") and "server" not in fields
            assert server.connections == 1
        finally:
            writer.close()


async def test_pipelined_requests_are_answered_in_order_and_connection_close_is_honoured() -> None:
    async with serving() as (_, port):
        reader, writer = await connect(port)
        try:
            writer.write(get("/nope") + get("/healthz") + get("/healthz", extra="Connection: close\r\n") + get("/x"))
            assert (await response(reader))[0] == 404
            assert (await response(reader))[0] == 200
            status, fields, _ = await response(reader)
            assert status == 200 and fields["connection"] == "close"
            assert await until_closed(reader) == b""  # the request after `close` is never answered
        finally:
            writer.close()


async def test_head_gets_the_get_head_without_a_body() -> None:
    async with serving() as (_, port):
        reader, writer = await connect(port)
        try:
            writer.write(get("/healthz", method="HEAD"))
            status, fields, _ = await response(reader, head_request=True)
            assert status == 200 and fields["content-length"] == "3"
            # Had a body been sent, it would be read here as the start of the next response.
            writer.write(get("/healthz"))
            assert (await response(reader))[::2] == (200, b"ok\n")
        finally:
            writer.close()


async def test_other_methods_405_unknown_paths_404() -> None:
    async with serving() as (_, port):
        reader, writer = await connect(port)
        try:
            writer.write(get("/healthz", method="DELETE"))
            status, fields, body = await response(reader)
            assert (status, fields["allow"], body) == (405, "GET,HEAD", b"405: Method Not Allowed")
            writer.write(get("/healthz/", method="POST", extra="Content-Length: 0\r\n"))
            assert (await response(reader))[::2] == (404, b"404: Not Found")
            writer.write(get("/healthz?verbose=1"))  # the query takes no part in matching
            assert (await response(reader))[0] == 200
        finally:
            writer.close()


async def test_a_request_with_a_body_is_answered_then_closed_and_the_body_never_read() -> None:
    async with serving() as (_, port):
        reader, writer = await connect(port)
        try:
            smuggled = get("/big")  # as a body: must never be taken for a request
            writer.write(get("/healthz", extra=f"Content-Length: {len(smuggled)}\r\n") + smuggled)
            status, fields, body = await response(reader)
            assert (status, body, fields["connection"]) == (200, b"ok\n", "close")
            assert await until_closed(reader) == b""
        finally:
            writer.close()


async def test_an_http10_client_is_answered_and_closed_unless_it_asks_to_keep_alive() -> None:
    async with serving() as (_, port):
        reader, writer = await connect(port)
        try:
            writer.write(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, fields, _ = await response(reader)
            assert status == 200 and fields["connection"] == "keep-alive"
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            status, fields, _ = await response(reader)
            assert status == 200 and fields["connection"] == "close"
            assert await until_closed(reader) == b""
        finally:
            writer.close()


async def test_a_half_closed_client_still_gets_its_answer() -> None:
    async with serving() as (_, port):
        reader, writer = await connect(port)
        try:
            writer.write(get("/healthz"))
            writer.write_eof()
            data = await until_closed(reader)
            assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nok\n")
        finally:
            writer.close()


# ---------------------------------------------------------------------------------------------------------
# Limits


async def test_an_oversized_head_gets_431_and_the_connection_closes() -> None:
    async with serving(head_bytes=1024) as (_, port):
        reader, writer = await connect(port)
        try:
            writer.write(get("/healthz", extra="X-Big: " + "a" * 2000 + "\r\n"))
            data = await until_closed(reader)
            assert data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
            assert b"connection: close" in data.lower() and data.endswith(b"431: Request Header Fields Too Large")
        finally:
            writer.close()
        # A line that never ends is cut at the budget, not buffered until the client stops.
        reader, writer = await connect(port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nX-Endless: " + b"a" * 4096)
            assert (await until_closed(reader)).startswith(b"HTTP/1.1 431 ")
        finally:
            writer.close()


async def test_a_slow_head_is_closed_at_the_head_deadline_however_it_trickles() -> None:
    async with serving(head_timeout=0.5) as (server, port):
        reader, writer = await connect(port)
        try:
            started = time.monotonic()

            async def trickle() -> None:
                with contextlib.suppress(ConnectionError):
                    for byte in get("/healthz")[:-2]:  # never the final CRLF
                        writer.write(bytes([byte]))
                        await asyncio.sleep(0.05)

            sender = asyncio.create_task(trickle())
            try:
                assert await until_closed(reader, 5) == b""  # no answer: just closed
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await io(sender)
            assert 0.4 < time.monotonic() - started < 3
        finally:
            writer.close()
        # A connection that never sends a byte is closed by the same deadline.
        reader, writer = await connect(port)
        try:
            assert await until_closed(reader, 5) == b""
        finally:
            writer.close()
        await io(_until(lambda: server.connections == 0))


async def test_an_idle_keep_alive_connection_is_closed_at_the_idle_deadline() -> None:
    async with serving(idle_timeout=0.5, head_timeout=5) as (_, port):
        reader, writer = await connect(port)
        try:
            writer.write(get("/healthz"))
            assert (await response(reader))[0] == 200
            started = time.monotonic()
            assert await until_closed(reader, 5) == b""
            assert 0.4 < time.monotonic() - started < 3
        finally:
            writer.close()


async def test_a_client_that_does_not_read_its_answer_is_dropped_at_the_write_deadline() -> None:
    async with serving(write_timeout=0.5) as (server, port):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await io(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)))
        _reader, writer = await io(asyncio.open_connection(sock=sock))
        try:
            writer.write(get("/big"))  # 16 MiB that this side never reads
            await io(_until(lambda: server.connections == 1))
            await io(_until(lambda: server.connections == 0), 5)
        finally:
            writer.close()


async def test_the_connection_cap_gives_way_to_new_clients_by_closing_idle_ones() -> None:
    async with serving(max_connections=2, head_timeout=5) as (server, port):
        idle_reader, idle_writer = await connect(port)
        _busy_reader, busy_writer = await connect(port)
        try:
            idle_writer.write(get("/healthz"))
            assert (await response(idle_reader))[0] == 200  # now idle between requests
            busy_writer.write(b"GET /healthz HTTP/1.1\r\n")  # in the middle of a head
            await io(_until(lambda: server.connections == 2))
            third_reader, third_writer = await connect(port)
            try:
                third_writer.write(get("/healthz"))
                assert (await response(third_reader))[0] == 200  # served: the idle one gave way
                assert await until_closed(idle_reader) == b""
                # Once none is idle, the fourth is closed at once and the two kept.
                third_writer.write(b"GET /healthz HTTP/1.1\r\n")  # third: mid-head too
                await io(_until(lambda: server.idle_connections == 0 and server.connections == 2))
                fourth_reader, fourth_writer = await connect(port)
                try:
                    fourth_writer.write(get("/healthz"))
                    assert await until_closed(fourth_reader) == b""
                    assert server.connections == 2
                finally:
                    fourth_writer.close()
            finally:
                third_writer.close()
        finally:
            idle_writer.close()
            busy_writer.close()


# ---------------------------------------------------------------------------------------------------------
# Malformed requests and failing handlers


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nget /lower HTTP/1.1\r\nHost: a\r\n\r\n",  # the second one
    ],
)
async def test_a_malformed_request_gets_a_fixed_400_and_one_debug_line(
    request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving() as (_, port):
        reader, writer = await connect(port)
        try:
            writer.write(request_bytes)
            data = await until_closed(reader)
        finally:
            writer.close()
    if request_bytes.count(b"HTTP/1.1") == 2:
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")  # the good request before it is answered first
        data = data[data.index(b"ok\n") + 3 :]
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n") and data.endswith(b"\r\n\r\n400: Bad Request")
    assert b"connection: close" in data.lower()
    ours = [r for r in caplog.records if r.name == LOG.name and "bad request" in r.getMessage()]
    assert len(ours) == 1 and ours[0].levelno == logging.DEBUG and ours[0].exc_info is None
    assert "\n" not in ours[0].getMessage()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert all(r.exc_info is None for r in caplog.records)


async def test_a_slow_handler_gets_503_and_a_failing_one_500_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    async def slow() -> Response:
        await asyncio.sleep(30)
        return Response.text(200, "late\n")

    def handler(request: Request) -> Response | Any:
        if request.path == "/slow":
            return slow()
        raise RuntimeError("secret detail")

    async with serving(handler, request_timeout=0.3) as (_, port):
        reader, writer = await connect(port)
        try:
            writer.write(get("/slow"))
            assert (await response(reader))[0] == 503
            writer.write(get("/boom"))
            assert (await response(reader))[::2] == (500, b"500: Internal Server Error")
        finally:
            writer.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["test: handler failed: RuntimeError"]
    assert errors[0].exc_info is None and "secret detail" not in caplog.text


async def test_stop_closes_connections_and_cancels_handlers_in_flight() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever() -> Response:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response.text(200, "never\n")

    server = ControlServer(HostPort("127.0.0.1", 0), "test", lambda _r: forever(), log=LOG)
    port = await io(server.start())
    reader, writer = await connect(port)
    try:
        writer.write(get("/wait"))
        await io(started.wait())
        await io(server.stop())
        assert cancelled.is_set()
        await io(_until(lambda: server.connections == 0))
        assert await until_closed(reader) == b""
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------------------
# The client


@contextlib.asynccontextmanager
async def app_answering(
    answer: bytes | None, *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A server that records each request head and answers `answer` (None: never answers), then closes."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.append(await io(reader.readuntil(b"\r\n\r\n")))
            if answer is None:
                await asyncio.sleep(30)
            writer.write(answer or b"")
            await io(writer.drain())
        finally:
            writer.close()

    server = await io(asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls))
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await io(server.wait_closed(), 2)


async def _fetch(port: int, method: str = "GET", **kw: Any) -> Any:
    kw.setdefault("tls", None)
    kw.setdefault("within", 5.0)
    kw.setdefault("max_body", 1024)
    return await io(fetch(method, "127.0.0.1", port, "/health?x=%41", [("User-Agent", "kube-probe/1.29")], **kw))


async def test_fetch_sends_a_fixed_request_and_reads_the_answer() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Type: a/b\r\nContent-Length: 2\r\n\r\nhi"
    async with app_answering(answer) as (port, seen):
        got = await _fetch(port)
    assert (got.status, got.content_type, got.body) == (201, "a/b", b"hi")
    assert seen == [
        f"GET /health?x=%41 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: kube-probe/1.29\r\n"
        "Connection: close\r\n\r\n".encode()
    ]


@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n1\r\n!\r\n0\r\n\r\n", 200, b"hi!"),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\nclose-delimited", 503, b"close-delimited"),
        (b"HTTP/1.1 302 Found\r\nLocation: /admin\r\nContent-Length: 0\r\n\r\n", 302, b""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"a" * 5000, 200, b"a" * 1024),  # capped
        (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n", 101, b""),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
    ],
)
async def test_fetch_framings(answer: bytes, status: int, body: bytes) -> None:
    async with app_answering(answer) as (port, _):
        got = await _fetch(port)
    assert (got.status, got.body) == (status, body)


async def test_fetch_head_reads_no_body() -> None:
    async with app_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n") as (port, seen):
        got = await _fetch(port, "HEAD")
    assert (got.status, got.body) == (200, b"") and seen[0].startswith(b"HEAD /health?x=%41 HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhi", "connection closed before the response ended"),
        (b"", "connection closed"),
        (b"garbage\r\n\r\n", "malformed response"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhi", "malformed response head"),  # RFC 9112 §6.3
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20000 + b"\r\n\r\n", "response head too large"),
    ],
)
async def test_fetch_refuses_short_and_malformed_answers(answer: bytes, error: str) -> None:
    async with app_answering(answer) as (port, _):
        with pytest.raises(FetchError) as info:
            await _fetch(port)
    assert str(info.value) == error


async def test_fetch_gives_up_at_its_deadline_and_on_a_refused_connection() -> None:
    async with app_answering(None) as (port, _):
        started = time.monotonic()
        with pytest.raises(FetchError, match=r"no response within 0.3s"):
            await _fetch(port, within=0.3)
        assert time.monotonic() - started < 3
    with socket.socket() as s:  # bound, never listening: refused
        s.bind(("127.0.0.1", 0))
        with pytest.raises(FetchError, match="ConnectionRefusedError"):
            await _fetch(s.getsockname()[1])


async def test_fetch_over_tls_does_not_verify_the_target(tmp_path: Path) -> None:
    leaf = CA.root("probe.test").leaf("spiffe://probe.test/app", dns=["app.internal"])
    (tmp_path / "app.crt").write_bytes(leaf.chain_pem())
    (tmp_path / "app.key").write_bytes(leaf.key_pem())
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "app.crt", tmp_path / "app.key")
    async with app_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", tls=ctx) as (port, _):
        got = await _fetch(port, tls=insecure_client_context())
    assert (got.status, got.body) == (200, b"ok")


# ---------------------------------------------------------------------------------------------------------
# What `spiffe-sidecar run` imports


def test_the_run_path_imports_no_aiohttp() -> None:
    """The command line (every subcommand's options are described on every run) and the composition root
    import neither aiohttp nor the injector: their weight is a running sidecar's idle RSS (issue 11)."""
    code = (
        "import sys\n"
        "from sidecar import cli\n"
        "cli._parser()\n"
        "import sidecar.app\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'yarl', 'jsonpatch', 'spire')\n"
        "             or m in ('sidecar.inject', 'sidecar.demo', 'sidecar.suggest', 'sidecar.callers')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


async def _until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.01)
