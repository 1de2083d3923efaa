"""The state of one proxied HTTP exchange, as an explicit table of states, events and transitions (pure).

h11's `_state.py` is the model: each side of an exchange has a state, each event moves it along one edge
of a table, and an event with no edge is a bug or a protocol violation, never a silent no-op. The data
plane (`sidecar.proxy`) keeps no flags of its own for what these states say.

Request side (what the caller sends; an exchange is created at its request head):

    BODY --body--> BODY --end--> DONE          (a bodiless request starts at DONE)
    BODY/DONE --switch--> TUNNEL               (the app accepted an Upgrade: bytes, not messages)
    any --abort--> ABORTED

Response side (what the caller gets):

    QUEUED --local--> DONE                     (a fixed answer of ours: 400, 403, 413, 431...)
    QUEUED --lease--> LEASING                  (allowed: waiting for an upstream connection)
    LEASING --send--> AWAITING                 (request head written upstream)
    LEASING --local--> DONE                    (no upstream: 502 / 503)
    AWAITING --interim--> AWAITING             (1xx relayed, or our own 100 Continue swallowed)
    AWAITING --retry--> LEASING                (the app closed a reused connection before answering)
    AWAITING --head--> STREAMING --body--> STREAMING --end--> DONE
    AWAITING --head_end--> DONE                (a response without a body: HEAD, 204, 304)
    AWAITING --switch--> TUNNEL                (101 to an authorised Upgrade)
    AWAITING --local--> DONE                   (the app failed before its head: 502 / 504)
    any --abort--> ABORTED                     (mid-response failure, caller gone, stalled peer; a DONE
                                               exchange stays DONE: aborting a finished one changes nothing)

The exchange is over (audited once) when the response side is DONE or ABORTED; a response that ends
while the request body still streams closes the connection (the unread rest cannot be skipped safely).
Errors say whose fault they are (`Fault`): ours, the caller's, or the upstream's.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final, TypeVar

from .errors import SidecarError

__all__ = ["ExchangeState", "Fault", "ProtocolViolation", "Req", "ReqEvent", "Resp", "RespEvent"]


class Fault(enum.Enum):
    LOCAL = "local"  # a bug of ours: an event the table has no edge for
    PEER = "peer"  # the downstream caller
    UPSTREAM = "upstream"  # the app (inbound) or the remote workload (outbound)


class ProtocolViolation(SidecarError):
    """An event the state table does not allow; `fault` says who caused it."""

    def __init__(self, fault: Fault, detail: str) -> None:
        self.fault = fault
        self.detail = detail
        super().__init__(f"{fault.value}: {detail}")


class Req(enum.IntEnum):
    BODY = 0
    DONE = 1
    TUNNEL = 2
    ABORTED = 3


class ReqEvent(enum.IntEnum):
    BODY = 0
    END = 1
    SWITCH = 2
    ABORT = 3


class Resp(enum.IntEnum):
    QUEUED = 0
    LEASING = 1
    AWAITING = 2
    STREAMING = 3
    DONE = 4
    TUNNEL = 5
    ABORTED = 6


class RespEvent(enum.IntEnum):
    LOCAL = 0
    LEASE = 1
    SEND = 2
    INTERIM = 3
    RETRY = 4
    HEAD = 5
    HEAD_END = 6
    BODY = 7
    END = 8
    SWITCH = 9
    ABORT = 10


_S = TypeVar("_S", Req, Resp)


def _table(
    states: type[_S], width: int, edges: Mapping[tuple[_S, ReqEvent | RespEvent], _S]
) -> tuple[tuple[_S | None, ...], ...]:
    """Rows indexed by state, columns by event: the next state, or None where there is no edge."""
    rows: list[list[_S | None]] = [[None] * width for _ in states]
    for (state, event), target in edges.items():
        rows[state][event] = target
    return tuple(tuple(r) for r in rows)


_REQ_EDGES: Final[dict[tuple[Req, ReqEvent | RespEvent], Req]] = {
    (Req.BODY, ReqEvent.BODY): Req.BODY,
    (Req.BODY, ReqEvent.END): Req.DONE,
    (Req.BODY, ReqEvent.SWITCH): Req.TUNNEL,
    (Req.DONE, ReqEvent.SWITCH): Req.TUNNEL,
    **{(s, ReqEvent.ABORT): Req.ABORTED for s in Req},
}
_RESP_EDGES: Final[dict[tuple[Resp, ReqEvent | RespEvent], Resp]] = {
    (Resp.QUEUED, RespEvent.LOCAL): Resp.DONE,
    (Resp.QUEUED, RespEvent.LEASE): Resp.LEASING,
    (Resp.LEASING, RespEvent.SEND): Resp.AWAITING,
    (Resp.LEASING, RespEvent.LOCAL): Resp.DONE,
    (Resp.AWAITING, RespEvent.INTERIM): Resp.AWAITING,
    (Resp.AWAITING, RespEvent.RETRY): Resp.LEASING,
    (Resp.AWAITING, RespEvent.HEAD): Resp.STREAMING,
    (Resp.AWAITING, RespEvent.HEAD_END): Resp.DONE,
    (Resp.AWAITING, RespEvent.SWITCH): Resp.TUNNEL,
    (Resp.AWAITING, RespEvent.LOCAL): Resp.DONE,
    (Resp.STREAMING, RespEvent.BODY): Resp.STREAMING,
    (Resp.STREAMING, RespEvent.END): Resp.DONE,
    **{(s, RespEvent.ABORT): Resp.ABORTED for s in Resp if s is not Resp.DONE},
    (Resp.DONE, RespEvent.ABORT): Resp.DONE,  # aborting a finished exchange changes nothing
}
REQ_TABLE: Final = _table(Req, len(ReqEvent), _REQ_EDGES)
RESP_TABLE: Final = _table(Resp, len(RespEvent), _RESP_EDGES)
# Who is at fault for an event the table refuses: the side whose bytes produced it.
_REQ_FAULT: Final = Fault.PEER
_RESP_FAULT: Final = {RespEvent.INTERIM: Fault.UPSTREAM, RespEvent.HEAD: Fault.UPSTREAM,
                      RespEvent.HEAD_END: Fault.UPSTREAM, RespEvent.BODY: Fault.UPSTREAM,
                      RespEvent.END: Fault.UPSTREAM, RespEvent.SWITCH: Fault.UPSTREAM}  # fmt: skip


class ExchangeState:
    """Both sides of one exchange. `request(ev)` / `response(ev)` move along the tables or raise
    `ProtocolViolation`; reading `.req` / `.resp` is how the data plane asks what has happened."""

    __slots__ = ("req", "resp")

    def __init__(self, bodiless: bool) -> None:
        self.req = Req.DONE if bodiless else Req.BODY
        self.resp = Resp.QUEUED

    def request(self, ev: ReqEvent) -> Req:
        nxt = REQ_TABLE[self.req][ev]
        if nxt is None:
            raise ProtocolViolation(_REQ_FAULT, f"request event {ev.name} in state {self.req.name}")
        self.req = nxt
        return nxt

    def response(self, ev: RespEvent) -> Resp:
        nxt = RESP_TABLE[self.resp][ev]
        if nxt is None:
            raise ProtocolViolation(
                _RESP_FAULT.get(ev, Fault.LOCAL), f"response event {ev.name} in state {self.resp.name}"
            )
        self.resp = nxt
        return nxt

    @property
    def over(self) -> bool:
        """The response side has ended (DONE or ABORTED): audited, nothing more is relayed."""
        return self.resp is Resp.DONE or self.resp is Resp.ABORTED

    @property
    def response_started(self) -> bool:
        """Bytes of a response (the app's head or a fixed answer) may have reached the caller."""
        return self.resp >= Resp.STREAMING
