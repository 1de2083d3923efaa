"""sidecar/timers.py: the lazy Deadline, on a real event loop (uvloop, the sidecar's).

Delays are tens of milliseconds. Lower bounds are exact (a Deadline never fires before its time: it checks
`loop.time()` itself); upper bounds are generous, since CI machines are noisy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from sidecar.timers import Deadline

pytestmark = pytest.mark.uvloop  # the loop the sidecar ships with

LATE = 5.0  # how long to wait for a timer that must fire, at most


class CountingLoop:
    """The running loop, counting the TimerHandles a Deadline asks it for (and keeping them). Only what a
    Deadline uses (time, call_at) is there."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.handles: list[asyncio.TimerHandle] = []

    def time(self) -> float:
        return self.loop.time()

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> asyncio.TimerHandle:
        h = self.loop.call_at(when, callback, *args)
        self.handles.append(h)
        return h


class Fired:
    """The callback: when (loop time) and with which kind each call came."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: list[tuple[float, int]] = []
        self.event = asyncio.Event()

    def __call__(self, kind: int) -> None:
        self.calls.append((self.loop.time(), kind))
        self.event.set()

    async def wait(self) -> None:
        await asyncio.wait_for(self.event.wait(), LATE)


def make() -> tuple[Deadline, Fired, CountingLoop]:
    loop = asyncio.get_running_loop()
    counting = CountingLoop(loop)
    fired = Fired(loop)
    return Deadline(counting, fired), fired, counting  # type: ignore[arg-type]  # a loop stand-in


async def test_fires_once_after_set() -> None:
    d, fired, counting = make()
    assert not d.armed
    start = counting.time()
    d.set(0.03, kind=2)
    assert d.armed and d.kind == 2
    await fired.wait()
    assert len(fired.calls) == 1
    at, kind = fired.calls[0]
    assert kind == 2
    assert at >= start + 0.03
    assert not d.armed
    await asyncio.sleep(0.1)
    assert len(fired.calls) == 1  # once
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")


async def test_moving_later_rearms_lazily_with_one_handle() -> None:
    d, fired, counting = make()
    start = counting.time()
    d.set(0.03)
    d.set(0.06)
    d.set(0.12)  # progress on a stream: each move is a float store, no new TimerHandle
    assert len(counting.handles) == 1
    first = counting.handles[0]
    assert first.when() <= start + 0.03 + 0.01  # still armed for the first time
    await fired.wait()
    at, _ = fired.calls[0]
    assert at >= start + 0.12  # not at the earlier time
    assert len(fired.calls) == 1
    # The first handle fired, saw the later time and re-armed for it (a loop's millisecond rounding may
    # wake it a hair early once more: then it re-arms again, never calling back early).
    assert len(counting.handles) >= 2
    # uvloop hands out a plain Handle (no `when`) for a re-arm whose delay rounds to zero: it runs on the next
    # iteration, which re-checks the time; every timed re-arm is for the later deadline.
    assert all(h.when() >= start + 0.1 for h in counting.handles[1:] if hasattr(h, "when"))


async def test_moving_earlier_replaces_the_handle() -> None:
    d, fired, counting = make()
    start = counting.time()
    d.set(1.0)
    d.set(0.03)
    assert len(counting.handles) == 2 and counting.handles[0].cancelled()
    await fired.wait()
    at, _ = fired.calls[0]
    assert start + 0.03 <= at < start + 1.0


async def test_clear_prevents_the_fire() -> None:
    d, fired, counting = make()
    d.set(0.03)
    d.clear()
    assert not d.armed
    await asyncio.sleep(0.15)
    assert fired.calls == []
    # Armed again after a clear: fires at the new time.
    start = counting.time()
    d.set(0.03)
    await fired.wait()
    assert fired.calls[0][0] >= start + 0.03


async def test_clear_of_a_kind_clears_only_that_kind() -> None:
    d, fired, _ = make()
    d.set(0.03, kind=1)
    d.clear(2)
    assert d.armed
    await fired.wait()
    assert [k for _, k in fired.calls] == [1]
    # The latest set decides the kind: clearing the old kind leaves the new one armed.
    fired.event.clear()
    d.set(0.03, kind=1)
    d.set(0.05, kind=3)
    d.clear(1)
    assert d.armed
    await fired.wait()
    assert [k for _, k in fired.calls] == [1, 3]
    fired.event.clear()
    d.set(0.03, kind=4)
    d.clear(4)
    await asyncio.sleep(0.15)
    assert [k for _, k in fired.calls] == [1, 3]


async def test_cancel_drops_the_handle() -> None:
    d, fired, counting = make()
    d.set(0.03)
    handle = counting.handles[0]
    d.cancel()
    assert not d.armed
    assert handle.cancelled()  # the loop no longer holds the owner through this handle
    await asyncio.sleep(0.15)
    assert fired.calls == []
    d.cancel()  # twice is harmless
    start = counting.time()
    d.set(0.03)  # usable again
    await fired.wait()
    assert fired.calls[0][0] >= start + 0.03
