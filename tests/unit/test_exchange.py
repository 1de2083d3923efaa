"""sidecar/exchange.py: the request and response state tables of one exchange (h11 `_state.py` style).

The expected tables below are transcribed from the module docstring's diagrams, independently of the
module's own `_REQ_EDGES`/`_RESP_EDGES`, so that a wrong edge in either shows up as a difference.
"""

from __future__ import annotations

import copy
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import SidecarError
from sidecar.exchange import ExchangeState, Fault, ProtocolViolation, Req, ReqEvent, Resp, RespEvent

# ---------------------------------------------------------------------------------------------------------
# The diagrams of the module docstring, written out by hand

# Request side:
#     BODY --body--> BODY --end--> DONE          (a bodiless request starts at DONE)
#     BODY/DONE --switch--> TUNNEL
#     any --abort--> ABORTED
REQ_EDGES: dict[tuple[Req, ReqEvent], Req] = {
    (Req.BODY, ReqEvent.BODY): Req.BODY,
    (Req.BODY, ReqEvent.END): Req.DONE,
    (Req.BODY, ReqEvent.SWITCH): Req.TUNNEL,
    (Req.DONE, ReqEvent.SWITCH): Req.TUNNEL,
    (Req.BODY, ReqEvent.ABORT): Req.ABORTED,
    (Req.DONE, ReqEvent.ABORT): Req.ABORTED,
    (Req.TUNNEL, ReqEvent.ABORT): Req.ABORTED,
    (Req.ABORTED, ReqEvent.ABORT): Req.ABORTED,
}

# Response side (every line of the docstring's diagram, in its order):
RESP_EDGES: dict[tuple[Resp, RespEvent], Resp] = {
    (Resp.QUEUED, RespEvent.LOCAL): Resp.DONE,
    (Resp.QUEUED, RespEvent.LEASE): Resp.LEASING,
    (Resp.LEASING, RespEvent.SEND): Resp.AWAITING,
    (Resp.LEASING, RespEvent.LOCAL): Resp.DONE,
    (Resp.AWAITING, RespEvent.INTERIM): Resp.AWAITING,
    (Resp.AWAITING, RespEvent.RETRY): Resp.LEASING,
    (Resp.AWAITING, RespEvent.HEAD): Resp.STREAMING,
    (Resp.STREAMING, RespEvent.BODY): Resp.STREAMING,
    (Resp.STREAMING, RespEvent.END): Resp.DONE,
    (Resp.AWAITING, RespEvent.HEAD_END): Resp.DONE,
    (Resp.AWAITING, RespEvent.SWITCH): Resp.TUNNEL,
    (Resp.AWAITING, RespEvent.LOCAL): Resp.DONE,
    # any --abort--> ABORTED ...
    (Resp.QUEUED, RespEvent.ABORT): Resp.ABORTED,
    (Resp.LEASING, RespEvent.ABORT): Resp.ABORTED,
    (Resp.AWAITING, RespEvent.ABORT): Resp.ABORTED,
    (Resp.STREAMING, RespEvent.ABORT): Resp.ABORTED,
    (Resp.TUNNEL, RespEvent.ABORT): Resp.ABORTED,
    (Resp.ABORTED, RespEvent.ABORT): Resp.ABORTED,
    # ... except that a finished exchange stays finished (the table's own comment: "aborting a finished
    # exchange changes nothing"; the docstring's `any --abort--> ABORTED` does not say so).
    (Resp.DONE, RespEvent.ABORT): Resp.DONE,
}

# "Errors say whose fault they are": the side whose bytes produced the refused event. Request events come
# from the caller; these response events from the upstream's bytes; the others are our own decisions.
UPSTREAM_EVENTS = frozenset(
    {RespEvent.INTERIM, RespEvent.HEAD, RespEvent.HEAD_END, RespEvent.BODY, RespEvent.END, RespEvent.SWITCH}
)


def resp_fault(ev: RespEvent) -> Fault:
    return Fault.UPSTREAM if ev in UPSTREAM_EVENTS else Fault.LOCAL


def at(req: Req, resp: Resp) -> ExchangeState:
    """An exchange in the given states (reached through the public tables, not by poking attributes)."""
    st_ = ExchangeState(bodiless=req is not Req.BODY)
    path_req = {
        Req.BODY: [],
        Req.DONE: [],
        Req.TUNNEL: [ReqEvent.SWITCH],
        Req.ABORTED: [ReqEvent.ABORT],
    }[req]
    path_resp = {
        Resp.QUEUED: [],
        Resp.LEASING: [RespEvent.LEASE],
        Resp.AWAITING: [RespEvent.LEASE, RespEvent.SEND],
        Resp.STREAMING: [RespEvent.LEASE, RespEvent.SEND, RespEvent.HEAD],
        Resp.DONE: [RespEvent.LOCAL],
        Resp.TUNNEL: [RespEvent.LEASE, RespEvent.SEND, RespEvent.SWITCH],
        Resp.ABORTED: [RespEvent.ABORT],
    }[resp]
    for rev in path_req:
        st_.request(rev)
    for pev in path_resp:
        st_.response(pev)
    assert (st_.req, st_.resp) == (req, resp)
    return st_


# ---------------------------------------------------------------------------------------------------------
# Plain calls


def test_initial_states() -> None:
    assert (ExchangeState(bodiless=False).req, ExchangeState(bodiless=False).resp) == (Req.BODY, Resp.QUEUED)
    assert (ExchangeState(bodiless=True).req, ExchangeState(bodiless=True).resp) == (Req.DONE, Resp.QUEUED)


def test_violation_is_a_sidecar_error_naming_the_fault() -> None:
    exc = ProtocolViolation(Fault.UPSTREAM, "x")
    assert isinstance(exc, SidecarError)
    assert (exc.fault, exc.detail, str(exc)) == (Fault.UPSTREAM, "x", "upstream: x")


@pytest.mark.parametrize(("edge", "target"), REQ_EDGES.items(), ids=[f"{s.name}-{e.name}" for s, e in REQ_EDGES])
def test_every_request_edge_lands_where_the_diagram_says(edge: tuple[Req, ReqEvent], target: Req) -> None:
    state, event = edge
    for resp in Resp:  # the request table does not depend on the response side
        ex = at(state, resp)
        assert ex.request(event) is target
        assert (ex.req, ex.resp) == (target, resp)


@pytest.mark.parametrize(
    ("edge", "target"), RESP_EDGES.items(), ids=[f"{s.name}-{e.name}" for s, e in RESP_EDGES]
)
def test_every_response_edge_lands_where_the_diagram_says(edge: tuple[Resp, RespEvent], target: Resp) -> None:
    state, event = edge
    for req in Req:  # the response table does not depend on the request side
        ex = at(req, state)
        assert ex.response(event) is target
        assert (ex.req, ex.resp) == (req, target)


REQ_MISSING = [(s, e) for s, e in itertools.product(Req, ReqEvent) if (s, e) not in REQ_EDGES]
RESP_MISSING = [(s, e) for s, e in itertools.product(Resp, RespEvent) if (s, e) not in RESP_EDGES]


def test_the_missing_edges_are_the_expected_ones() -> None:
    # A guard on the transcription: 16 - 8 request pairs and 77 - 19 response pairs have no edge.
    assert len(REQ_MISSING) == 8 and len(RESP_MISSING) == 58
    assert (Req.DONE, ReqEvent.BODY) in REQ_MISSING and (Resp.DONE, RespEvent.BODY) in RESP_MISSING


@pytest.mark.parametrize(("state", "event"), REQ_MISSING, ids=[f"{s.name}-{e.name}" for s, e in REQ_MISSING])
def test_request_events_off_the_table_are_the_callers_fault(state: Req, event: ReqEvent) -> None:
    ex = at(state, Resp.AWAITING)
    with pytest.raises(ProtocolViolation) as e:
        ex.request(event)
    assert e.value.fault is Fault.PEER
    assert event.name in e.value.detail and state.name in e.value.detail
    assert (ex.req, ex.resp) == (state, Resp.AWAITING)  # a refused event changes nothing


@pytest.mark.parametrize(
    ("state", "event"), RESP_MISSING, ids=[f"{s.name}-{e.name}" for s, e in RESP_MISSING]
)
def test_response_events_off_the_table_blame_the_side_that_produced_them(state: Resp, event: RespEvent) -> None:
    ex = at(Req.BODY, state)
    with pytest.raises(ProtocolViolation) as e:
        ex.response(event)
    assert e.value.fault is resp_fault(event)
    assert event.name in e.value.detail and state.name in e.value.detail
    assert (ex.req, ex.resp) == (Req.BODY, state)


def test_upstream_bytes_after_the_end_are_the_upstreams_fault() -> None:
    # The case the data plane meets: a second head (or more body) from the app after the response ended.
    ex = at(Req.DONE, Resp.DONE)
    for ev in (RespEvent.HEAD, RespEvent.BODY, RespEvent.END, RespEvent.INTERIM):
        with pytest.raises(ProtocolViolation) as e:
            ex.response(ev)
        assert e.value.fault is Fault.UPSTREAM
    # ... while our own out-of-order step is a bug of ours.
    with pytest.raises(ProtocolViolation) as e:
        at(Req.DONE, Resp.QUEUED).response(RespEvent.SEND)
    assert e.value.fault is Fault.LOCAL


@pytest.mark.parametrize("resp", list(Resp))
def test_over_and_response_started_agree_with_the_states(resp: Resp) -> None:
    ex = at(Req.DONE, resp)
    # Over: audited once the response side is DONE or ABORTED.
    assert ex.over is (resp in (Resp.DONE, Resp.ABORTED))
    # Started: the app's head or a fixed answer may have reached the caller, i.e. we are past waiting.
    assert ex.response_started is (resp not in (Resp.QUEUED, Resp.LEASING, Resp.AWAITING))


def test_a_whole_exchange_and_a_retry() -> None:
    ex = ExchangeState(bodiless=False)
    ex.response(RespEvent.LEASE)
    ex.request(ReqEvent.BODY)
    ex.response(RespEvent.SEND)
    assert not ex.response_started
    ex.response(RespEvent.RETRY)  # the app closed a reused connection before answering
    assert ex.resp is Resp.LEASING
    ex.response(RespEvent.SEND)
    ex.response(RespEvent.INTERIM)
    ex.request(ReqEvent.BODY)
    ex.request(ReqEvent.END)
    ex.response(RespEvent.HEAD)
    assert ex.response_started and not ex.over
    ex.response(RespEvent.BODY)
    ex.response(RespEvent.END)
    assert ex.over and (ex.req, ex.resp) == (Req.DONE, Resp.DONE)
    ex.response(RespEvent.ABORT)  # a late abort does not turn a finished exchange into an aborted one
    assert ex.resp is Resp.DONE


# ---------------------------------------------------------------------------------------------------------
# Property: any sequence of events follows the diagrams or stops at the first one they lack


class NaiveExchange:
    """The docstring's diagrams as plain `if`s (no table), to compare the module's table against."""

    def __init__(self, bodiless: bool) -> None:
        self.req = "DONE" if bodiless else "BODY"
        self.resp = "QUEUED"

    def request(self, ev: str) -> bool:
        if ev == "ABORT":
            self.req = "ABORTED"
        elif ev == "BODY" and self.req == "BODY":
            pass
        elif ev == "END" and self.req == "BODY":
            self.req = "DONE"
        elif ev == "SWITCH" and self.req in ("BODY", "DONE"):
            self.req = "TUNNEL"
        else:
            return False
        return True

    def response(self, ev: str) -> bool:
        s = self.resp
        if ev == "ABORT":
            if s != "DONE":
                self.resp = "ABORTED"
        elif ev == "LOCAL" and s in ("QUEUED", "LEASING", "AWAITING"):
            self.resp = "DONE"
        elif ev == "LEASE" and s == "QUEUED":
            self.resp = "LEASING"
        elif ev == "SEND" and s == "LEASING":
            self.resp = "AWAITING"
        elif ev == "INTERIM" and s == "AWAITING":
            pass
        elif ev == "RETRY" and s == "AWAITING":
            self.resp = "LEASING"
        elif ev == "HEAD" and s == "AWAITING":
            self.resp = "STREAMING"
        elif ev == "HEAD_END" and s == "AWAITING":
            self.resp = "DONE"
        elif ev == "SWITCH" and s == "AWAITING":
            self.resp = "TUNNEL"
        elif ev in ("BODY", "END") and s == "STREAMING":
            self.resp = "DONE" if ev == "END" else "STREAMING"
        else:
            return False
        return True


def apply(model: NaiveExchange, side: str, ev: ReqEvent | RespEvent) -> bool:
    return model.request(ev.name) if side == "req" else model.response(ev.name)


ALL_STEPS: list[tuple[str, ReqEvent | RespEvent]] = [("req", e) for e in ReqEvent] + [("resp", e) for e in RespEvent]


def steps(model: NaiveExchange, legal: bool) -> list[tuple[str, ReqEvent | RespEvent]]:
    """The events the diagrams allow next (or refuse next), asked of copies of the model."""
    return [(side, ev) for side, ev in ALL_STEPS if apply(copy.copy(model), side, ev) is legal]


def refuses(ex: ExchangeState, side: str, ev: ReqEvent | RespEvent) -> None:
    """`ev` raises, blames the right side and changes nothing."""
    before = (ex.req, ex.resp)
    with pytest.raises(ProtocolViolation) as e:
        if side == "req":
            ex.request(ReqEvent(ev))
        else:
            ex.response(RespEvent(ev))
    assert e.value.fault is (Fault.PEER if side == "req" else resp_fault(RespEvent(ev)))
    assert (ex.req, ex.resp) == before


@settings(max_examples=300, deadline=None)
@given(bodiless=st.booleans(), data=st.data())
def test_event_sequences_follow_the_diagrams(bodiless: bool, data: st.DataObject) -> None:
    ex = ExchangeState(bodiless)
    model = NaiveExchange(bodiless)
    # Any sequence is a legal prefix, then possibly a first illegal event (nothing after it is fed):
    # generate exactly that, so that deep states, and every refused event in them, are reached.
    n = data.draw(st.integers(0, 12), label="legal steps")
    for i in range(n + 1):
        # In every state reached, each event the diagrams refuse is refused (tried on a copy).
        for side, ev in steps(model, legal=False):
            probe = ExchangeState(bodiless)
            probe.req, probe.resp = ex.req, ex.resp
            refuses(probe, side, ev)
        if i < n:
            # Either side, evenly; ABORT (always allowed), LOCAL and SWITCH end a side at once: drawn less
            # often, so that runs get deep.
            side = data.draw(st.sampled_from(["req", "resp"]), label="side")
            legal = [s for s in steps(model, legal=True) if s[0] == side]
            weighted = [s for s in legal for _ in range(1 if s[1].name in ("ABORT", "LOCAL", "SWITCH") else 6)]
            side, ev = data.draw(st.sampled_from(weighted), label="legal")
        elif data.draw(st.integers(0, 4), label="end legally") == 0:
            return
        else:
            side, ev = data.draw(st.sampled_from(steps(model, legal=False)), label="illegal")
        if not apply(model, side, ev):
            refuses(ex, side, ev)
            return  # the first illegal event ends the run
        got = ex.request(ReqEvent(ev)) if side == "req" else ex.response(RespEvent(ev))
        assert (ex.req.name, ex.resp.name) == (model.req, model.resp)
        assert got is (ex.req if side == "req" else ex.resp)
        assert ex.over is (model.resp in ("DONE", "ABORTED"))
        assert ex.response_started is (model.resp not in ("QUEUED", "LEASING", "AWAITING"))
