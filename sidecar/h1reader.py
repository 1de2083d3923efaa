"""HTTP/1.1 message readers: the C parser (httptools, llhttp) fed with bytes, messages handed to a sink.

Sans-IO: a reader takes bytes and calls its sink; it never touches a socket, so the byte-split property
(any split of a valid pipelined stream gives the same messages) is tested by plain calls. What the
readers add to the parser:

* Head budgets on raw bytes. httptools buffers a header line whole and reports it only when it ends, so a
  per-field limit would come too late for one endless line: the raw bytes fed while a head is open are
  counted and what exceeds the room is never fed (431 on requests; `head_too_large` on responses). Bytes
  of a head that starts in the middle of a read are not counted: the bound is the room plus one read.
* Inside a chunked body, bytes that yield no body byte are chunk-size lines or trailer fields (which the
  parser buffers the same way): at most the head room of them in a row.
* Trailer fields are never reported (a chunked body ends with a bare last-chunk downstream; a second Host
  or an XFCC in trailers must not reach anyone as a header).
* Fields come as two lists, names and values, in order: the shape `http1.parse_request_head` checks in
  one pass.
* A request reader stops at the first message it must not read past (`stop()`: an error, `Connection:
  close`, an upgrade); the bytes after an Upgrade request's head are handed over as the tunnel's start.
* A response reader is told before each response whether the request was HEAD (httptools cannot know
  that such a response has no body, RFC 9110 §9.3.2).
"""

from __future__ import annotations

from typing import Final, Protocol

import httptools

from .http1 import RESPONSE_400, RESPONSE_431

__all__ = ["RequestReader", "RequestSink", "ResponseReader", "ResponseSink"]


class _Stop(Exception):
    """Raised from a parser callback to stop parsing the rest of the buffer."""


class RequestSink(Protocol):
    def request_head(
        self, method: bytes, target: bytes, names: list[bytes], values: list[bytes], http10: bool,
        raw: bytes | None,
    ) -> None:
        """`raw`: the field block as received (first field to the CRLF before the empty line) when the
        head arrived whole at the start of one read, else None."""
        ...
    def request_body(self, data: bytes) -> None: ...
    def request_end(self) -> None: ...
    def request_upgrade(self, rest: bytes) -> None: ...
    def request_error(self, response: bytes, label: str, detail: str) -> None: ...


class RequestReader:
    """Requests of one connection, in order. `head_room`: raw bytes a head may take (request line +
    fields); `line_room`: bytes the request target may take (a longer one is a 400); `field_room`: bytes
    the fields may take, counted as `name: value CRLF` (more is a 431)."""

    __slots__ = (
        "_begun",
        "_body_progress",
        "_body_quiet",
        "_field_room",
        "_fields_len",
        "_fresh",
        "_head_room",
        "_in_head",
        "_line_room",
        "_messages",
        "_names",
        "_parser",
        "_piece",
        "_room",
        "_target",
        "_target_len",
        "_values",
        "sink",
        "stopped",
    )

    def __init__(self, sink: RequestSink, *, head_room: int, line_room: int, field_room: int) -> None:
        self.sink = sink
        self._field_room: Final = field_room
        self._fields_len = 0
        self._piece = b""
        self._begun = False  # a byte of the current message has been fed (the parser began it)
        self._fresh = False  # the current head starts at the first byte of _piece
        self._parser = httptools.HttpRequestParser(self)
        self._head_room: Final = head_room
        self._line_room: Final = line_room
        self._room = head_room
        self._in_head = True
        self._messages = 0
        self._target: list[bytes] = []
        self._target_len = 0
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self._body_progress = False
        self._body_quiet = 0
        self.stopped = False  # no more requests are read (set by stop() or by an error)

    def stop(self) -> None:
        """Read nothing past the current message (the caller closes after it, or switches protocols)."""
        self.stopped = True

    def release(self) -> None:
        """The connection is gone: drop the sink and the parser (which refers back to this reader), so that
        nothing of the connection waits for the cyclic GC."""
        self.stopped = True
        self.sink = _GONE
        self._parser = _GONE_PARSER
        self._piece = b""

    @property
    def at_message_start(self) -> bool:
        """No byte of the next request has been fed yet, and requests are still read."""
        return not self._begun and self._in_head and not self.stopped

    def feed(self, data: bytes) -> None:
        while data and not self.stopped:
            if self._in_head:
                room = self._room
                if len(data) > room:
                    if room <= 0:
                        # The head did not end within its room: refuse it before httptools copies more.
                        self._error(RESPONSE_431, "headers_too_large", "request head too large")
                        return
                    piece, data = data[:room], data[room:]
                else:
                    piece, data = data, b""
                messages = self._messages
                self._piece = piece
                self._fresh = not self._begun
                self._feed(piece, data)
                if self._in_head and self._messages == messages:
                    self._room = room - len(piece)
                continue
            self._body_progress = False
            self._feed(data, b"")
            if self._body_progress or self._in_head:
                self._body_quiet = 0
            else:
                self._body_quiet += len(data)
                if self._body_quiet > self._head_room and not self.stopped:
                    self._error(RESPONSE_431, "headers_too_large", "chunked trailer section too large")
            return

    def _feed(self, data: bytes, tail: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The request asked to switch protocols; whatever follows its head belongs to the tunnel
            # (used only if the app answers 101 to an authorised request).
            self.stopped = True
            self.sink.request_upgrade(data[int(exc.args[0]) :] + tail)
        except httptools.HttpParserCallbackError as exc:
            # No local names the _Stop: its traceback holds this frame, and a local would make a cycle that
            # keeps the connection for the cyclic GC.
            if not isinstance(exc.__context__, _Stop):
                raise (exc.__context__ or exc) from None  # the sink's own error, not the parser's
        except httptools.HttpParserError as exc:
            self._error(RESPONSE_400, "malformed", str(exc))

    def _error(self, response: bytes, label: str, detail: str) -> None:
        self.stopped = True
        self.sink.request_error(response, label, detail)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.stopped:
            raise _Stop
        self._begun = True
        self._target = []
        self._target_len = 0
        self._fields_len = 0
        self._names = []
        self._values = []

    def on_url(self, url: bytes) -> None:
        self._target_len += len(url)
        if self._target_len > self._line_room:
            self._error(RESPONSE_400, "request_line_too_large", "request line too long")
            raise _Stop
        self._target.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # trailer fields (RFC 9112 §7.1.2) are dropped, never reported
            self._fields_len += len(name) + len(value) + 4
            if self._fields_len > self._field_room:
                self._error(RESPONSE_431, "headers_too_large", "request header fields too large")
                raise _Stop
            self._names.append(name)
            self._values.append(value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        t = self._target
        method = p.get_method()
        raw: bytes | None = None
        if self._fresh:
            # The whole head is in this read, from its first byte: the field block, as it arrived.
            piece = self._piece
            end = piece.find(b"\r\n\r\n")
            line = piece.find(b"\r\n")
            if end >= 0 and piece.startswith(method):
                raw = piece[line + 2 : end + 2]
        self.sink.request_head(
            method, t[0] if len(t) == 1 else b"".join(t), self._names, self._values, p.get_http_version() == "1.0",
            raw,
        )  # fmt: skip
        if self.stopped:
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self._body_progress = True
        self.sink.request_body(body)

    def on_message_complete(self) -> None:
        self._in_head = True  # whatever follows is the next request's head
        self._begun = False
        self._fresh = False  # it starts inside the current read, not at its first byte
        self._room = self._head_room
        self._messages += 1
        self.sink.request_end()
        if self.stopped:
            raise _Stop


class _GoneSink:
    """The sink of a released reader: ignores everything (nothing is fed to a released reader)."""

    def request_head(
        self, method: bytes, target: bytes, names: list[bytes], values: list[bytes], http10: bool,
        raw: bytes | None,
    ) -> None:  # fmt: skip
        pass

    def request_body(self, data: bytes) -> None:
        pass

    def request_end(self) -> None:
        pass

    def request_upgrade(self, rest: bytes) -> None:
        pass

    def request_error(self, response: bytes, label: str, detail: str) -> None:
        pass


_GONE: Final = _GoneSink()
_GONE_PARSER: Final = httptools.HttpRequestParser(_GONE)


class ResponseSink(Protocol):
    def response_interim(self, status: int, reason: bytes, names: list[bytes], values: list[bytes]) -> None: ...
    def response_head(
        self, status: int, reason: bytes, names: list[bytes], values: list[bytes], raw: bytes | None
    ) -> None:
        """`raw`: the head as received (status line and fields) when it arrived whole at the start of one
        read, else None."""
        ...
    def response_body(self, data: bytes) -> None: ...
    def response_end(self, reusable: bool) -> None: ...
    def response_switch(self, rest: bytes) -> None: ...
    def response_error(self, kind: str) -> None: ...


class ResponseReader:
    """Responses on one upstream connection, one per request written to it. Before each, `expect(sink,
    head_request)`; a reader whose response ended early (HEAD, an error) is replaced, not reused."""

    __slots__ = (
        "_begun",
        "_body_progress",
        "_body_quiet",
        "_fresh",
        "_head_only",
        "_in_head",
        "_interim",
        "_messages",
        "_names",
        "_parser",
        "_piece",
        "_reason",
        "_room",
        "_values",
        "broken",
        "head_room",
        "poisoned",
        "sink",
    )

    def __init__(self, head_room: int) -> None:
        self.head_room = head_room
        self._parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self._head_only = False
        self._room = head_room
        self._in_head = True
        self._interim = False
        self._reason = b""
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self._body_progress = False
        self._body_quiet = 0
        self._piece = b""
        self._begun = False  # a byte of the current response has been fed
        self._fresh = False
        self._messages = 0  # heads completed (interim ones included): their room starts afresh
        self.broken = False  # the parser's state is unusable for another response
        # The connection itself is: the upstream sent bytes no request asked for (after a response, or
        # a body to a HEAD request). It must never carry another request.
        self.poisoned = False

    @property
    def at_message_start(self) -> bool:
        """No byte of the next response has been fed yet (the parser waits for a status line)."""
        return not self._begun and self._in_head and not self.broken

    def expect(self, sink: ResponseSink, *, head_request: bool) -> None:
        self.sink = sink
        self._head_only = head_request

    def feed(self, data: bytes) -> None:
        while data and self.sink is not None:
            if self._in_head:
                room = self._room
                if len(data) > room:
                    if room <= 0:
                        self._fail("head_too_large")
                        return
                    piece, data = data[:room], data[room:]
                else:
                    piece, data = data, b""
                self._piece = piece
                self._fresh = not self._begun
                messages = self._messages
                self._feed(piece, data)
                if self._in_head and not self.broken and self._messages == messages:
                    self._room = room - len(piece)
                continue
            self._body_progress = False
            self._feed(data, b"")
            if self._body_progress or self._in_head:
                self._body_quiet = 0
            else:
                self._body_quiet += len(data)
                if self._body_quiet > self.head_room:
                    self._fail("head_too_large")  # the trailer section of a chunked response
            return

    def _feed(self, data: bytes, tail: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.broken = True
            sink = self.sink
            self.sink = None
            if sink is not None:
                sink.response_switch(data[int(exc.args[0]) :] + tail)
        except httptools.HttpParserCallbackError as exc:
            # No local names the _Stop: its traceback holds this frame, and a local would make a cycle that
            # keeps the connection for the cyclic GC.
            if not isinstance(exc.__context__, _Stop):
                raise (exc.__context__ or exc) from None  # the sink's own error, not the parser's
        except httptools.HttpParserError:
            self._fail("protocol")

    def _fail(self, kind: str) -> None:
        self.broken = True
        sink = self.sink
        self.sink = None
        if sink is not None:
            sink.response_error(kind)
        else:
            self.poisoned = True  # garbage after a complete response: no request asked for it

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.sink is None:
            # A response nobody asked for (bytes after the previous one): the connection is desynced.
            self.poisoned = self.broken = True
            raise _Stop
        self._begun = True
        self._names = []
        self._values = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # trailer fields of a chunked response are dropped
            self._names.append(name)
            self._values.append(value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        sink = self.sink
        if sink is None:
            raise _Stop
        status = self._parser.get_status_code()
        if status < 200 and status != 101:
            self._interim = True
            sink.response_interim(status, self._reason, self._names, self._values)
            return
        self._interim = False
        raw: bytes | None = None
        if self._fresh:
            piece = self._piece
            end = piece.find(b"\r\n\r\n")
            if end >= 0 and piece.startswith(b"HTTP/1."):
                raw = piece[: end + 2]
        if status == 101:
            # httptools completes the message, then reports the switch (HttpParserUpgrade) with the offset
            # of the tunnel's first byte: the sink hears of it through response_switch, not response_end.
            self._interim = True
            sink.response_head(status, self._reason, self._names, self._values, raw)
            if self.sink is None:
                raise _Stop
            return
        sink.response_head(status, self._reason, self._names, self._values, raw)
        if self.sink is None:
            self.broken = True
            raise _Stop
        if self._head_only and status not in (204, 304):
            # httptools would wait for Content-Length bytes that never come: the response is complete
            # at its head, and this parser is done (a fresh one reads the next response).
            self.broken = True
            self.sink = None
            # Reusable only if nothing followed the head in this read (a body to HEAD poisons the stream).
            clean = raw is not None and len(self._piece) == len(raw) + 2
            if not clean:
                self.poisoned = True
            sink.response_end(self._parser.should_keep_alive() and clean)
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self._body_progress = True
        sink = self.sink
        if sink is not None:
            sink.response_body(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._begun = False
        self._fresh = False
        self._messages += 1
        self._room = self.head_room
        if self._interim:
            self._interim = False  # the final response head follows
            return
        sink = self.sink
        self.sink = None
        if sink is not None:
            sink.response_end(self._parser.should_keep_alive())
