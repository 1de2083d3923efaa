"""sidecar/h1reader.py: RequestReader / ResponseReader over httptools, fed by plain calls (sans-IO).

The central property (issue 11): any split of a valid pipelined stream gives the same messages as the
stream fed whole. Streams are generated with hypothesis and the expected events are computed from the
generated messages, not from a run of the reader.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.h1reader import RequestReader, ResponseReader
from sidecar.http1 import RESPONSE_400, RESPONSE_431

Event = tuple[Any, ...]

# ---------------------------------------------------------------------------------------------------------
# Recording sinks


class RequestRecorder:
    """A RequestSink that records what it hears; consecutive body pieces are merged (their split is not part
    of the contract). It never stops the reader unless `stop_on` names the event to stop at."""

    def __init__(self, stop_on: str | None = None) -> None:
        self.events: list[Event] = []
        self.raws: list[bytes | None] = []
        # The lists handed over, and what they held then: the reader must not change them afterwards
        # (trailer fields, the next message's fields).
        self.lists: list[tuple[list[bytes], list[bytes], tuple[bytes, ...], tuple[bytes, ...]]] = []
        self.reader: RequestReader | None = None
        self.stop_on = stop_on

    def _saw(self, kind: str) -> None:
        if kind == self.stop_on:
            assert self.reader is not None
            self.reader.stop()

    def request_head(
        self, method: bytes, target: bytes, names: list[bytes], values: list[bytes], http10: bool, raw: bytes | None
    ) -> None:
        self.events.append(("head", method, target, tuple(names), tuple(values), http10))
        self.raws.append(raw)
        self.lists.append((names, values, tuple(names), tuple(values)))
        self._saw("head")

    def request_body(self, data: bytes) -> None:
        assert data, "empty body piece reported"
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))
        self._saw("body")

    def request_end(self) -> None:
        self.events.append(("end",))
        self._saw("end")

    def request_upgrade(self, rest: bytes) -> None:
        self.events.append(("upgrade", rest))

    def fields_unchanged(self) -> bool:
        return all((tuple(n), tuple(v)) == (n0, v0) for n, v, n0, v0 in self.lists)

    def request_error(self, response: bytes, label: str, detail: str) -> None:
        self.events.append(("error", response, label))


class ResponseRecorder:
    """A ResponseSink that records what it hears (body pieces merged)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.raws: list[bytes | None] = []

    def response_interim(self, status: int, reason: bytes, names: list[bytes], values: list[bytes]) -> None:
        self.events.append(("interim", status, reason, tuple(names), tuple(values)))

    def response_head(
        self, status: int, reason: bytes, names: list[bytes], values: list[bytes], raw: bytes | None
    ) -> None:
        self.events.append(("head", status, reason, tuple(names), tuple(values)))
        self.raws.append(raw)

    def response_body(self, data: bytes) -> None:
        assert data, "empty body piece reported"
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))

    def response_end(self, reusable: bool) -> None:
        self.events.append(("end", reusable))

    def response_switch(self, rest: bytes) -> None:
        self.events.append(("switch", rest))

    def response_error(self, kind: str) -> None:
        self.events.append(("error", kind))


class CountingRequestParser(httptools.HttpRequestParser):
    """httptools' parser, counting the bytes a reader gives it (the budgets are about those)."""

    fed = 0

    def feed_data(self, data: bytes) -> None:  # type: ignore[override]  # the readers only pass bytes
        self.fed += len(data)
        super().feed_data(data)


class CountingResponseParser(httptools.HttpResponseParser):
    fed = 0

    def feed_data(self, data: bytes) -> None:  # type: ignore[override]
        self.fed += len(data)
        super().feed_data(data)


def request_reader(
    rec: RequestRecorder, head_room: int = 4096, line_room: int = 1024, field_room: int = 2048
) -> RequestReader:
    reader = RequestReader(rec, head_room=head_room, line_room=line_room, field_room=field_room)
    rec.reader = reader
    return reader


def feed_split(reader: RequestReader | ResponseReader, data: bytes, cuts: Sequence[int]) -> None:
    start = 0
    for cut in [*cuts, len(data)]:
        if cut > start:
            reader.feed(data[start:cut])
            start = cut


@st.composite
def cuts_st(draw: st.DrawFn, wire: bytes, starts: frozenset[int] = frozenset()) -> list[int]:
    """Cut points in (0, len(wire)): none, a few random ones, every byte, or right before each run of bytes
    that looks like the start of a head (a method, "HTTP/1.") inside a message, but not at the `starts` of
    messages (so that the read before holds the end of one message and the start of the next)."""
    n = len(wire)
    if n <= 1:
        return []
    how = draw(st.sampled_from(["random", "random", "bytes", "none", "lookalike", "lookalike"]))
    if how == "bytes":
        return list(range(1, n))
    if how == "none":
        return []
    if how == "lookalike":
        lookalikes = [i for i in range(1, n) if wire.startswith(HEAD_STARTS, i) and i not in starts]
        if lookalikes:
            return lookalikes
    return sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=12))))


# ---------------------------------------------------------------------------------------------------------
# Generated messages

# Bytes that begin a head: a read that starts with them inside a head must not be taken for a head's start.
HEAD_STARTS = (b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD", b"HTTP/1.")
_NAME_CHARS = string.ascii_letters + string.digits + "-"
# VCHAR, SP inside, and obs-text: what a field value may hold (RFC 9110 §5.5).
_VALUE_CHARS = "".join(map(chr, range(0x21, 0x7F))) + " " + "".join(map(chr, range(0x80, 0x100)))
_TARGET_CHARS = string.ascii_lowercase + string.digits + "-._~!$&'()*+,;=:@/"
# Names the generator leaves to the framing it chooses (llhttp reads them).
_FRAMING = {b"content-length", b"transfer-encoding", b"connection", b"proxy-connection", b"upgrade", b"expect"}

names_st = st.text(_NAME_CHARS, min_size=1, max_size=12).map(str.encode).filter(lambda n: n.lower() not in _FRAMING)
values_st = st.one_of(
    st.text(_VALUE_CHARS, max_size=24).map(lambda s: s.strip(" ").encode("latin-1")),
    # Values holding what a head starts with (the lookalike cuts fall right before them).
    st.sampled_from(HEAD_STARTS).map(lambda h: b"x" + h + b" / HTTP/1.1"),
)
fields_st = st.lists(st.tuples(names_st, values_st), max_size=6)


@dataclass
class Message:
    """One generated message: what the reader must report for it, and its bytes."""

    first: bytes  # the request line or status line, without CRLF
    names: list[bytes]
    values: list[bytes]
    body: bytes
    body_wire: bytes  # the body as framed on the wire (chunks, trailers)

    @property
    def block(self) -> bytes:
        return b"".join(b"%s: %s\r\n" % nv for nv in zip(self.names, self.values, strict=True))

    @property
    def head(self) -> bytes:
        return self.first + b"\r\n" + self.block + b"\r\n"

    @property
    def wire(self) -> bytes:
        return self.head + self.body_wire


@st.composite
def chunked_st(draw: st.DrawFn, body: bytes) -> bytes:
    """`body` chunked at random sizes (hex in either case, sometimes an extension), maybe with trailers."""
    out = []
    rest = body
    while rest:
        n = draw(st.integers(1, max(1, len(rest))))
        size = b"%x" % n if draw(st.booleans()) else b"%X" % n
        ext = draw(st.sampled_from([b"", b"", b";ext=1"]))
        out.append(size + ext + b"\r\n" + rest[:n] + b"\r\n")
        rest = rest[n:]
    trailers = draw(st.lists(st.tuples(names_st, values_st), max_size=2))
    out.append(b"0\r\n" + b"".join(b"%s: %s\r\n" % t for t in trailers) + b"\r\n")
    return b"".join(out)


@st.composite
def request_st(draw: st.DrawFn, last: bool) -> tuple[Message, Event]:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD"]))
    target = b"/" + draw(st.text(_TARGET_CHARS, max_size=30)).encode()
    if draw(st.booleans()):
        target += b"?" + draw(st.text(_TARGET_CHARS + "?", max_size=15)).encode()
    http10 = draw(st.booleans())
    fields = draw(fields_st)
    if draw(st.booleans()):
        # A field holding this request's own method: a read that starts right there looks like a head.
        fields.insert(draw(st.integers(0, len(fields))), (b"X-Echo", b"x" + method + b" " + target))
    names = [n for n, _ in fields]
    values = [v for _, v in fields]
    framing = draw(st.sampled_from(["none", "length", "chunked"] if not http10 else ["none", "length"]))
    body = draw(st.binary(max_size=200)) if framing != "none" else b""
    body_wire = body
    if framing == "length":
        names.append(b"Content-Length")
        values.append(b"%d" % len(body))
    elif framing == "chunked":
        names.append(draw(st.sampled_from([b"Transfer-Encoding", b"transfer-encoding"])))
        values.append(b"chunked")
        body_wire = draw(chunked_st(body))
    # Only the last request may end the connection (llhttp refuses data after it).
    if http10 and not last:
        names.append(b"Connection")
        values.append(b"keep-alive")
    elif last and draw(st.booleans()):
        names.append(b"Connection")
        values.append(b"close" if not http10 else b"keep-alive")
    msg = Message(b"%s %s HTTP/1.%d" % (method, target, 0 if http10 else 1), names, values, body, body_wire)
    return msg, ("head", method, target, tuple(names), tuple(values), http10)


@st.composite
def request_stream_st(draw: st.DrawFn) -> list[tuple[Message, Event]]:
    n = draw(st.integers(1, 4))
    return [draw(request_st(last=i == n - 1)) for i in range(n)]


def expected_request_events(stream: list[tuple[Message, Event]]) -> list[Event]:
    out: list[Event] = []
    for msg, head in stream:
        out.append(head)
        if msg.body:
            out.append(("body", msg.body))
        out.append(("end",))
    return out


def rooms_for(msgs: Sequence[Message], slack: int) -> tuple[int, int, int]:
    """head_room, line_room, field_room just large enough for `msgs` (so that the head budget's own cutting
    of reads is exercised), plus `slack`."""
    head_room = max(max(len(m.head) for m in msgs), max(len(m.body_wire) - len(m.body) for m in msgs)) + slack
    line_room = max(len(m.first) for m in msgs) + slack
    field_room = max(len(m.block) for m in msgs) + slack
    return head_room, line_room, field_room


def fresh_heads(msgs: Sequence[Message], cuts: Sequence[int]) -> list[bool]:
    """Per message: its head starts a read and arrives whole in it."""
    bounds = [0, *cuts]
    out = []
    offset = 0
    for m in msgs:
        start, end = offset, offset + len(m.head)
        nxt = min([c for c in [*cuts, 1 << 62] if c > start])
        out.append(start in bounds and end <= nxt)
        offset += len(m.wire)
    return out


# ---------------------------------------------------------------------------------------------------------
# RequestReader: the byte-split property


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=request_stream_st(), slack=st.integers(0, 64), data=st.data())
def test_request_stream_gives_the_same_events_in_any_split(
    stream: list[tuple[Message, Event]], slack: int, data: st.DataObject
) -> None:
    msgs = [m for m, _ in stream]
    wire = b"".join(m.wire for m in msgs)
    expected = expected_request_events(stream)
    head_room, line_room, field_room = rooms_for(msgs, slack)

    whole = RequestRecorder()
    reader = request_reader(whole, head_room, line_room, field_room)
    reader.feed(wire)
    assert whole.events == expected
    assert whole.raws[0] == msgs[0].block  # the first head arrived whole at the start of the read
    assert all(raw in (None, m.block) for raw, m in zip(whole.raws, msgs, strict=True))

    starts = frozenset(itertools.accumulate((len(m.wire) for m in msgs), initial=0))
    cuts = data.draw(cuts_st(wire, starts), label="cuts")
    split = RequestRecorder()
    reader = request_reader(split, head_room, line_room, field_room)
    boundaries = set()
    offset = 0
    for m in msgs:
        offset += len(m.wire)
        boundaries.add(offset)
    start = 0
    for cut in [*cuts, len(wire)]:
        reader.feed(wire[start:cut])
        start = cut
        # True exactly when the bytes fed so far end at a message boundary.
        assert reader.at_message_start is (cut in boundaries)
    assert split.events == expected
    assert whole.fields_unchanged() and split.fields_unchanged()
    for raw, m, fresh in zip(split.raws, msgs, fresh_heads(msgs, cuts), strict=True):
        if fresh:
            assert raw == m.block
        else:
            assert raw in (None, m.block)


# ---------------------------------------------------------------------------------------------------------
# RequestReader: raw, budgets, trailers, upgrade, errors, stop


def test_raw_is_the_field_block_only_for_a_head_whole_at_the_start_of_a_read() -> None:
    a = b"GET /a HTTP/1.1\r\nHost: a\r\nX-A:  spaced \r\n\r\n"
    b = b"GET /b HTTP/1.0\r\n\r\n"
    rec = RequestRecorder()
    reader = request_reader(rec)
    reader.feed(a + b)
    assert rec.raws == [b"Host: a\r\nX-A:  spaced \r\n", None]  # as received, OWS included
    reader = request_reader(rec := RequestRecorder())
    reader.feed(a[:10])
    reader.feed(a[10:])
    reader.feed(b)
    assert rec.raws == [None, b""]  # split head: None; a head with no fields: the empty block
    assert [e[0] for e in rec.events] == ["head", "end", "head", "end"]


def test_raw_of_a_head_split_before_bytes_equal_to_its_method_is_not_its_tail() -> None:
    # Regression (fixed in a94534e): a pipelined request whose head is cut between reads right before
    # bytes equal to its method had the rest of its head taken for a whole head, and that tail reported as
    # `raw`; RequestHeads cached the *whole* head's result under it, so a later request (any connection of
    # the listener) with that shorter field block was forwarded with this one's fields.
    first = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    second = b"GET /b HTTP/1.1\r\nHost: inventory\r\nX-Injected: evil"
    rest = b"GET\r\nAccept: */*\r\n\r\n"
    rec = RequestRecorder()
    reader = request_reader(rec)
    reader.feed(first + second)
    reader.feed(rest)
    assert rec.events[2][3] == (b"Host", b"X-Injected", b"Accept")
    assert rec.raws[1] is None  # was b"Accept: */*\r\n"


def test_raw_of_a_pipelined_head_cut_by_the_budget_is_not_its_tail() -> None:
    # Regression (a94534e): the head budget's own cut of one read made a piece start inside a head.
    room = 100
    first = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    start = b"GET /b HTTP/1.1\r\nHost: inventory\r\nX-Pad: "
    second = start + b"x" * (room - len(first) - len(start)) + b"GET\r\nAccept: */*\r\n\r\n"
    rec = RequestRecorder()
    reader = request_reader(rec, head_room=room)
    reader.feed(first + second)  # one read; the budget cuts it at `room`, right before the second GET
    assert [e[0] for e in rec.events] == ["head", "end", "head", "end"]
    assert rec.raws[1] is None  # was b"Accept: */*\r\n"


def test_at_message_start_is_false_inside_a_pipelined_head() -> None:
    # Regression (a94534e): proxy.HttpConnection.data_received trusts at_message_start to take its
    # whole-request fast path without the parser; here the parser holds half of `POST /admin`'s head.
    reader = request_reader(RequestRecorder())
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /admin HTTP/1.1\r\nX-A: ")
    assert not reader.at_message_start


def test_at_message_start() -> None:
    reader = request_reader(RequestRecorder())
    assert reader.at_message_start
    reader.feed(b"GET / HTTP/1.1\r\n")
    assert not reader.at_message_start
    reader.feed(b"Host: a\r\n\r\n")
    assert reader.at_message_start
    reader.feed(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab")
    assert not reader.at_message_start  # inside a body
    reader.feed(b"c")
    assert reader.at_message_start
    reader.stop()
    assert not reader.at_message_start


@pytest.mark.parametrize("step", [1, 7, 100, 10**6])
def test_head_over_its_room_is_431_without_feeding_it_all(step: int) -> None:
    room = 1000
    rec = RequestRecorder()
    reader = request_reader(rec, head_room=room, line_room=500, field_room=10**6)
    parser = reader._parser = CountingRequestParser(reader)  # a fresh parser, as the reader's own
    endless = b"GET / HTTP/1.1\r\nX-Endless: " + b"a" * 10**6  # one header line that never ends
    offered = 0
    while not reader.stopped and offered < len(endless):
        reader.feed(endless[offered : offered + step])
        offered += step
        if offered <= room:
            assert rec.events == []  # nothing refused within the room
    assert rec.events == [("error", RESPONSE_431, "headers_too_large")]
    assert parser.fed <= room  # httptools never saw more than the room
    assert offered <= room + step  # refused on the read that went past it
    reader.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert len(rec.events) == 1  # stopped for good


def test_head_exactly_at_its_room_is_accepted() -> None:
    head = b"GET / HTTP/1.1\r\nX-A: " + b"a" * 50 + b"\r\n\r\n"
    for step in (1, 3, len(head)):
        rec = RequestRecorder()
        reader = request_reader(rec, head_room=len(head), line_room=100, field_room=100)
        feed_split(reader, head, range(step, len(head), step))
        assert [e[0] for e in rec.events] == ["head", "end"]
        rec = RequestRecorder()
        reader = request_reader(rec, head_room=len(head) - 1, line_room=100, field_room=100)
        feed_split(reader, head, range(step, len(head), step))
        assert rec.events == [("error", RESPONSE_431, "headers_too_large")]


@pytest.mark.parametrize("pieces", [1, 3])
def test_request_line_over_its_room_is_400(pieces: int) -> None:
    rec = RequestRecorder()
    reader = request_reader(rec, head_room=10_000, line_room=500, field_room=1000)
    data = b"GET /" + b"a" * 500 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    feed_split(reader, data, [len(data) * i // pieces for i in range(1, pieces)])
    assert rec.events == [("error", RESPONSE_400, "request_line_too_large")]
    assert reader.stopped
    rec = RequestRecorder()
    reader = request_reader(rec, head_room=10_000, line_room=500, field_room=1000)
    reader.feed(b"GET /" + b"a" * 499 + b" HTTP/1.1\r\n\r\n")
    assert [e[0] for e in rec.events] == ["head", "end"]


def test_fields_over_their_room_are_431() -> None:
    # `name: value CRLF` per field: 2 fields of 1 + 1 + 4 bytes fit in 12, a third does not.
    ok = b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n"
    rec = RequestRecorder()
    request_reader(rec, head_room=10_000, line_room=100, field_room=12).feed(ok)
    assert [e[0] for e in rec.events] == ["head", "end"]
    rec = RequestRecorder()
    reader = request_reader(rec, head_room=10_000, line_room=100, field_room=12)
    reader.feed(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    assert rec.events == [("error", RESPONSE_431, "headers_too_large")]
    assert reader.stopped


def test_chunked_trailer_section_over_the_room_is_431() -> None:
    room = 200
    rec = RequestRecorder()
    reader = request_reader(rec, head_room=room, line_room=100, field_room=150)
    reader.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n")
    trailer = b"X-Trailer: " + b"t" * 10 + b"\r\n"
    sent = 0
    while not reader.stopped and sent < 100 * len(trailer):
        reader.feed(trailer)
        sent += len(trailer)
    assert rec.events[-1] == ("error", RESPONSE_431, "headers_too_large")
    assert [e[0] for e in rec.events] == ["head", "body", "error"]
    assert sent <= room + 2 * len(trailer)


def test_long_chunked_bodies_in_small_reads_are_not_a_trailer_section() -> None:
    room = 64
    rec = RequestRecorder()
    reader = request_reader(rec, head_room=room, line_room=60, field_room=60)
    body = b"".join(b"1\r\n%c\r\n" % (97 + i % 26) for i in range(500))
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\nX-T: 1\r\n\r\n"
    feed_split(reader, data, range(3, len(data), 3))
    assert rec.events[1:] == [("body", bytes(97 + i % 26 for i in range(500))), ("end",)]


def test_trailer_fields_are_never_reported() -> None:
    rec = RequestRecorder()
    reader = request_reader(rec)
    reader.feed(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nHost: evil\r\nX-Forwarded-Client-Cert: URI=spiffe://evil\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: b\r\n\r\n"
    )
    assert rec.events == [
        ("head", b"POST", b"/", (b"Host", b"Transfer-Encoding"), (b"a", b"chunked"), False),
        ("body", b"hi"),
        ("end",),
        ("head", b"GET", b"/next", (b"Host",), (b"b",), False),
        ("end",),
    ]
    assert rec.fields_unchanged()


@pytest.mark.parametrize("split", [None, "at_head_end", "inside_head"])
def test_upgrade_hands_over_the_bytes_after_the_head(split: str | None) -> None:
    head = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    data = head + b"\x81\x05hello" + b"GET / HTTP/1.1\r\n\r\n"
    rec = RequestRecorder()
    reader = request_reader(rec)
    if split is None:
        reader.feed(data)
        rest = data[len(head) :]
    elif split == "at_head_end":
        reader.feed(head)
        reader.feed(data[len(head) :])  # the reader has stopped: the tunnel takes these bytes
        rest = b""
    else:
        reader.feed(head[:20])
        reader.feed(data[20:])
        rest = data[len(head) :]
    assert rec.events == [
        ("head", b"GET", b"/ws", (b"Host", b"Connection", b"Upgrade"), (b"a", b"Upgrade", b"websocket"), False),
        ("end",),
        ("upgrade", rest),
    ]
    assert reader.stopped


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost a\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ],
)
def test_malformed_stream_is_400(data: bytes) -> None:
    rec = RequestRecorder()
    reader = request_reader(rec)
    reader.feed(data)
    assert rec.events[-1] == ("error", RESPONSE_400, "malformed")
    assert all(e[0] != "error" for e in rec.events[:-1])
    assert reader.stopped and not reader.at_message_start
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rec.events[-1][0] == "error"


def test_stop_at_the_end_of_a_request_reads_nothing_after_it() -> None:
    two = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    rec = RequestRecorder(stop_on="end")
    reader = request_reader(rec)
    reader.feed(two)
    reader.feed(two)
    assert [e[:3] for e in rec.events] == [("head", b"GET", b"/1"), ("end",)]
    # Stopped at the head: not even that request's body is reported.
    rec = RequestRecorder(stop_on="head")
    reader = request_reader(rec)
    reader.feed(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi" + two)
    assert [e[0] for e in rec.events] == ["head"]


# ---------------------------------------------------------------------------------------------------------
# ResponseReader: the byte-split property


@st.composite
def response_st(draw: st.DrawFn, last: bool) -> tuple[list[Message], list[Event]]:
    """One response (1xx interim heads, then the final one) and the events it must give."""
    msgs: list[Message] = []
    events: list[Event] = []
    reason_st = st.text(string.ascii_letters + " ", max_size=12).map(lambda s: s.strip().encode())
    for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
        status = draw(st.sampled_from([100, 102, 103]))
        reason = draw(reason_st)
        fields = draw(fields_st)
        names, values = [n for n, _ in fields], [v for _, v in fields]
        msgs.append(Message(b"HTTP/1.1 %d %s" % (status, reason), names, values, b"", b""))
        events.append(("interim", status, reason, tuple(names), tuple(values)))
    http10 = draw(st.booleans())
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]))
    reason = draw(reason_st)
    fields = draw(fields_st)
    if draw(st.booleans()):
        # A field holding a status line: a read that starts right there looks like a head.
        fields.insert(draw(st.integers(0, len(fields))), (b"Via", b"xHTTP/1.1 200 OK"))
    names, values = [n for n, _ in fields], [v for _, v in fields]
    body = b""
    body_wire = b""
    if status == 304 and draw(st.booleans()):
        names.append(b"Content-Length")  # the length of the representation, not of a body (none follows)
        values.append(b"%d" % draw(st.integers(1, 99)))
    elif status not in (204, 304):
        body = draw(st.binary(max_size=200))
        if http10 or draw(st.booleans()):
            names.append(b"Content-Length")
            values.append(b"%d" % len(body))
            body_wire = body
        else:
            names.append(b"Transfer-Encoding")
            values.append(b"chunked")
            body_wire = draw(chunked_st(body))
    reusable = True
    if http10:
        names.append(b"Connection")
        values.append(b"keep-alive")
    elif last and draw(st.booleans()):
        names.append(b"Connection")
        values.append(b"close")
        reusable = False
    msgs.append(Message(b"HTTP/1.%d %d %s" % (0 if http10 else 1, status, reason), names, values, body, body_wire))
    events.append(("head", status, reason, tuple(names), tuple(values)))
    if body:
        events.append(("body", body))
    events.append(("end", reusable))
    return msgs, events


@st.composite
def response_stream_st(draw: st.DrawFn) -> list[tuple[list[Message], list[Event]]]:
    n = draw(st.integers(1, 4))
    return [draw(response_st(last=i == n - 1)) for i in range(n)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=response_stream_st(), slack=st.integers(0, 64), data=st.data())
def test_response_stream_gives_the_same_events_in_any_split(
    stream: list[tuple[list[Message], list[Event]]], slack: int, data: st.DataObject
) -> None:
    all_msgs = [m for msgs, _ in stream for m in msgs]
    head_room = rooms_for(all_msgs, slack)[0]

    whole = ResponseRecorder()
    reader = ResponseReader(head_room)
    for msgs, _ in stream:
        assert reader.at_message_start
        reader.expect(whole, head_request=False)
        reader.feed(b"".join(m.wire for m in msgs))
    assert whole.events == [e for _, events in stream for e in events]
    split = ResponseRecorder()
    reader = ResponseReader(head_room)
    for msgs, events in stream:
        assert reader.at_message_start and not reader.broken
        reader.expect(split, head_request=False)
        wire = b"".join(m.wire for m in msgs)
        # Interim heads count as messages: after one, no byte of the next head has been fed.
        ends = set(itertools.accumulate(len(m.wire) for m in msgs))
        cuts = data.draw(cuts_st(wire, frozenset(ends)), label="cuts")
        before = len(split.events)
        start = 0
        for cut in [*cuts, len(wire)]:
            reader.feed(wire[start:cut])
            start = cut
            assert reader.at_message_start is (cut in ends)
            assert not reader.poisoned
        assert split.events[before:] == events
        final = msgs[-1]
        raw = split.raws[-1]
        start = len(wire) - len(final.wire)
        if start in (0, *cuts) and start + len(final.head) <= min([c for c in [*cuts, len(wire)] if c > start]):
            assert raw == final.head[:-2]  # status line and fields, without the empty line
        else:
            assert raw in (None, final.head[:-2])
    assert split.events == whole.events


# ---------------------------------------------------------------------------------------------------------
# ResponseReader: HEAD, 101, budgets, errors, the kept-alive connection


def response_reader(rec: ResponseRecorder, head_room: int = 4096, *, head_request: bool = False) -> ResponseReader:
    reader = ResponseReader(head_room)
    reader.expect(rec, head_request=head_request)
    return reader


def test_head_request_ends_the_response_at_its_head() -> None:
    rec = ResponseRecorder()
    reader = response_reader(rec, head_request=True)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")  # no body follows a response to HEAD
    assert rec.events == [("head", 200, b"OK", (b"Content-Length",), (b"5",)), ("end", True)]
    assert reader.broken and not reader.at_message_start  # the parser waits for 5 bytes: not reusable
    assert not reader.poisoned  # the connection is (a fresh reader reads its next response)
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\n")
    assert len(rec.events) == 2


def test_a_body_to_a_head_request_poisons_the_connection() -> None:
    rec = ResponseRecorder()
    reader = response_reader(rec, head_request=True)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert rec.events == [("head", 200, b"OK", (b"Content-Length",), (b"5",)), ("end", False)]
    assert reader.poisoned and reader.broken


@pytest.mark.parametrize("extra", [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 200", b"\x00junk"])
def test_bytes_no_request_asked_for_poison_the_connection(extra: bytes) -> None:
    rec = ResponseRecorder()
    reader = response_reader(rec)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + extra)
    assert rec.events == [("head", 200, b"OK", (b"Content-Length",), (b"2",)), ("body", b"ok"), ("end", True)]
    assert reader.poisoned


@pytest.mark.parametrize("status", [204, 304])
def test_head_request_answered_without_a_body_keeps_the_reader(status: int) -> None:
    rec = ResponseRecorder()
    reader = response_reader(rec, head_request=True)
    reader.feed(b"HTTP/1.1 %d X\r\n\r\n" % status)
    assert rec.events == [("head", status, b"X", (), ()), ("end", True)]
    assert not reader.broken and reader.at_message_start
    reader.expect(rec, head_request=False)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert rec.events[2:] == [("head", 200, b"OK", (b"Content-Length",), (b"2",)), ("body", b"ok"), ("end", True)]


@pytest.mark.parametrize("split", [False, True])
def test_101_hands_the_rest_to_the_switch_and_does_not_end(split: bool) -> None:
    head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    rec = ResponseRecorder()
    reader = response_reader(rec)
    if split:
        reader.feed(head[:30])
        reader.feed(head[30:] + b"\x81\x02hi")
    else:
        reader.feed(head + b"\x81\x02hi")
    assert rec.events == [
        ("head", 101, b"Switching Protocols", (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")),
        ("switch", b"\x81\x02hi"),
    ]
    assert reader.broken and reader.sink is None
    reader.feed(b"more")
    assert len(rec.events) == 2


def test_interim_heads_come_before_the_final_one() -> None:
    rec = ResponseRecorder()
    reader = response_reader(rec)
    reader.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n")
    assert rec.events == [
        ("interim", 100, b"Continue", (), ()),
        ("interim", 103, b"Early Hints", (b"Link",), (b"</s.css>",)),
    ]
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert rec.events[2:] == [("head", 200, b"OK", (b"Content-Length",), (b"0",)), ("end", True)]
    assert rec.raws == [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"]


@pytest.mark.parametrize("step", [1, 50, 10**6])
def test_response_head_over_its_room_is_head_too_large(step: int) -> None:
    room = 500
    rec = ResponseRecorder()
    reader = response_reader(rec, room)
    parser = reader._parser = CountingResponseParser(reader)
    endless = b"HTTP/1.1 200 OK\r\nX-Endless: " + b"a" * 10**6
    offered = 0
    while reader.sink is not None and offered < len(endless):
        reader.feed(endless[offered : offered + step])
        offered += step
    assert rec.events == [("error", "head_too_large")]
    assert parser.fed <= room and offered <= room + step
    assert reader.broken


def test_chunked_response_trailers_over_the_room_are_head_too_large() -> None:
    rec = ResponseRecorder()
    reader = response_reader(rec, 200)
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n")
    for _ in range(100):
        reader.feed(b"X-Trailer: tttttttttt\r\n")
    assert rec.events == [("head", 200, b"OK", (b"Transfer-Encoding",), (b"chunked",)), ("body", b"hi"),
                          ("error", "head_too_large")]  # fmt: skip


@pytest.mark.parametrize(
    "data",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
    ],
)
def test_garbage_is_a_protocol_error(data: bytes) -> None:
    rec = ResponseRecorder()
    reader = response_reader(rec)
    reader.feed(data)
    assert rec.events[-1] == ("error", "protocol")
    assert reader.broken and reader.sink is None


@pytest.mark.parametrize("step", [None, 1, 97, 700])
def test_many_responses_on_one_reader_never_trip_the_head_budget(step: int | None) -> None:
    # Regression: the head room shrank across the responses of a kept-alive upstream connection until
    # an ordinary response was refused as head_too_large.
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Pad: " + b"p" * 400 + b"\r\nContent-Length: 512\r\n\r\n"
    response = head + b"b" * 512  # about 1 KiB
    room = len(head) + 8
    rec = ResponseRecorder()
    reader = ResponseReader(room)
    for i in range(200):
        assert reader.at_message_start, i
        reader.expect(rec, head_request=False)
        if step is None:
            reader.feed(response)
        else:
            feed_split(reader, response, range(step, len(response), step))
        assert rec.events[-1] == ("end", True), (i, rec.events[-3:])
    assert reader.at_message_start and not reader.broken
    assert sum(1 for e in rec.events if e[0] == "head") == 200


def test_response_at_message_start_is_false_inside_a_head_after_an_interim() -> None:
    # Regression (a94534e): the response fast path trusts at_message_start the same way.
    reader = response_reader(ResponseRecorder())
    reader.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-A: ")
    assert not reader.at_message_start


def test_response_raw_of_a_head_cut_before_http_bytes_is_not_its_tail() -> None:
    # Regression (a94534e): ResponseHeads cached the result for the whole head under this shorter raw, so
    # a later plain `204 No Content` would have been relayed as this 200 with its Content-Length.
    room = 100
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Note: "
    final = start + b"x" * (room - len(interim) - len(start)) + b"HTTP/1.1 204 No Content\r\n\r\nok"
    rec = ResponseRecorder()
    reader = response_reader(rec, room)
    reader.feed(interim + final)
    assert rec.events[-1] == ("end", True)
    assert rec.raws[0] is None  # was b"HTTP/1.1 204 No Content\r\n"
