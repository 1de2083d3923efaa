"""sidecar/memory.py: when the Reclaimer trims (a count of open connections over time), and the glibc calls.

The rounds of idle mTLS connections against a real sidecar process are tests/integration/test_memory.py.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from sidecar import memory
from sidecar.memory import Reclaimer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reclaimer(**kw: float) -> tuple[Reclaimer, list[float], Clock]:
    clock = Clock()
    trims: list[float] = []
    return Reclaimer(lambda: trims.append(clock.now), clock=clock, **kw), trims, clock


def feed(r: Reclaimer, clock: Clock, counts: list[int], step: float = 1.0) -> list[bool]:
    out = []
    for n in counts:
        out.append(r.note(n))
        clock.now += step
    return out


def test_one_trim_after_a_burst_has_closed_not_while_it_closes() -> None:
    r, trims, clock = reclaimer()
    got = feed(r, clock, [0, 500, 2000, 2000, 1500, 700, 100, 0, 0, 0, 0])
    assert got.index(True) == 8  # the first sample after the count stopped falling
    assert len(trims) == 1
    assert r.peak == 0  # the next burst is measured from here


def test_a_count_that_stops_falling_part_way_is_trimmed_there() -> None:
    r, trims, clock = reclaimer()
    feed(r, clock, [1500, 1500, 1000, 1000])  # 1000 held for good, 500 gone: a third of the peak
    assert len(trims) == 1


@pytest.mark.parametrize(
    "counts",
    [
        [0, 200, 0, 0, 0],  # fewer than min_drop connections came and went
        [1000, 1000, 800, 800, 800],  # still above 3/4 of the peak
        [100, 300, 500, 700, 700],  # rising
        [2000, 1500, 1000, 500],  # still falling
    ],
)
def test_no_trim(counts: list[int]) -> None:
    r, trims, clock = reclaimer()
    feed(r, clock, counts)
    assert trims == []


def test_at_most_one_trim_per_min_interval() -> None:
    r, trims, clock = reclaimer(min_interval=10.0)
    feed(r, clock, [1000, 0, 0, 1000, 0, 0, 1000, 0, 0])  # a burst every 3 s
    assert trims == [2.0]
    clock.now = 12.5
    feed(r, clock, [0])  # the drop is still pending: trimmed once the interval has passed
    assert trims == [2.0, 12.5]


def test_off_never_trims_and_its_task_ends() -> None:
    r = Reclaimer(None)
    assert not r.enabled
    assert not any(r.note(n) for n in (5000, 0, 0, 0))
    asyncio.run(asyncio.wait_for(r.run(lambda: 0, interval=0.01), 1.0))  # returns at once


def test_run_samples_the_count_until_cancelled() -> None:
    counts = iter([1000, 1000, 0, 0, 0, 0, 0, 0])
    trims: list[int] = []
    r = Reclaimer(lambda: trims.append(1))

    async def main() -> None:
        task = asyncio.create_task(r.run(lambda: next(counts, 0), interval=0.01))
        async with asyncio.timeout(5):
            while not trims:
                await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert trims == [1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_glibc_calls_work_in_this_process() -> None:
    assert memory.rss_bytes() > 1 << 20
    assert memory.malloc_trim() is True
    settings = memory.configure({memory.ENV: "off"})  # once per process: later calls return the first result
    assert memory.configure({memory.ENV: "on"}) is settings
