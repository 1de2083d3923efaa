"""Process memory of a long-running sidecar: glibc allocator settings applied once at start, and giving freed
heap back to the OS once the number of open connections has fallen (issue 10 item 2, threat model T37).

Why. Every TLS connection on uvloop holds a 256 KiB read buffer for its whole life (uvloop `sslproto.pyx`:
`SSLProtocol.__cinit__` mallocs `SSL_READ_MAX_SIZE`), and with an `asyncio.Protocol` every TLS read asks
CPython's `SSLObject.read` for up to 256 KiB (a bytes object of that size, then shrunk to what was read).
glibc serves requests of 128 KiB or more with mmap until the first such chunk is freed whole (the first
closed TLS connection); then it raises its mmap threshold to that size (the dynamic threshold, mallopt(3))
and every later 256 KiB buffer comes from the heap. A round of N connections leaves N x 256 KiB of heap
free with the pages earlier rounds touched still resident, and the heap top cannot shrink past live small
allocations. Measured on 2,000 idle mTLS connections a round (benchmarks/memory_bench.py): RSS 62 -> 147
-> 178 -> 203 -> 226 -> 246 MB over five rounds, while the heap's bytes in use stayed at 15 MB and the
heap itself at 600 MB: freed memory kept (fragmentation), not a leak.

What this module does (glibc only; a no-op elsewhere):

* `Reclaimer` calls `malloc_trim(0)`, which hands the free pages inside the heap back to the OS (3-19 ms
  for a 75-600 MB heap on the shared 2-core bench machine), once the open-connection count has fallen to
  at most `fraction` of its peak since the last trim, by at least `min_drop`, and has stopped falling; at
  most once per `min_interval` (5 s: the loop spends under 0.4% of its time trimming, whatever the
  traffic). `Reclaimer.run` samples the count once a second: the data plane needs no hook.
* `configure()` fixes glibc's thresholds where the first freed 256 KiB buffer puts them anyway, so the
  process does not depend on that accident and they cannot climb further: `M_MMAP_THRESHOLD` 512 KiB
  (256 KiB TLS buffers from the heap, larger transient buffers mapped and unmapped; the dynamic threshold
  climbs up to 32 MiB as larger buffers are freed) and `M_TRIM_THRESHOLD` 1 MiB (the heap top is not
  shrunk and regrown around every 256 KiB read; dynamically it follows at twice the mmap threshold, up to
  64 MiB of free heap top kept). Until the threshold is raised, every TLS read costs an mmap + mremap +
  munmap and a page fault: about 20 us per request in a bare uvloop TLS server (measured); the sidecar
  happens to free a large chunk while starting, so it is on the heap path from its first request. A low
  fixed threshold (128 KiB: every 256 KiB buffer mapped) would make that cost permanent with
  `asyncio.Protocol`, and would not stop fragmentation either: glibc serves a request from a large enough
  free heap chunk before it considers mmap.

`SPIFFE_SIDECAR_MALLOC` selects what is applied, for A/B measurements: unset or `on` (both), `trim`
(trimming only), `thresholds` (thresholds only), `off` (neither: glibc's defaults, the behaviour before
this module).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["ENV", "AllocatorSettings", "Reclaimer", "configure", "malloc_trim", "reclaimer", "rss_bytes"]

log = logging.getLogger("spiffe_sidecar.memory")

ENV: Final = "SPIFFE_SIDECAR_MALLOC"
_M_TRIM_THRESHOLD: Final = -1  # glibc malloc.h
_M_MMAP_THRESHOLD: Final = -3
# Above the 256 KiB (+ headers) TLS buffers, as glibc's dynamic threshold is after the first one is freed.
MMAP_THRESHOLD: Final = 512 * 1024
# Twice the mmap threshold, as glibc sets it dynamically: a 256 KiB hole at the heap top is kept for reuse.
TRIM_THRESHOLD: Final = 1024 * 1024
_PAGE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True, slots=True)
class AllocatorSettings:
    """What `configure` applied: `thresholds` (fixed mmap and trim thresholds), `trim` (a Reclaimer that trims)."""

    thresholds: bool
    trim: bool
    detail: str


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library's malloc
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no malloc_trim and another allocator)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
_applied: AllocatorSettings | None = None


def configure(environ: Mapping[str, str]) -> AllocatorSettings:
    """Apply the allocator settings once per process (later calls return the first result). Call it at
    process start, before connections are served: the threshold only steers allocations made after it."""
    global _applied
    if _applied is not None:
        return _applied
    mode = environ.get(ENV, "on").strip().lower() or "on"
    if mode not in ("on", "thresholds", "trim", "off"):
        log.warning("%s=%r is not one of on, thresholds, trim, off; using on", ENV, mode)
        mode = "on"
    if _LIBC is None:
        _applied = AllocatorSettings(False, False, "not glibc: allocator left alone")
        return _applied
    # Both or neither: either one alone turns the dynamic thresholds off, and a fixed 512 KiB mmap threshold
    # with the default 128 KiB trim threshold shrinks and regrows the heap top around every TLS read (a brk
    # pair per read; half the throughput of a bare TLS server, measured). Both values are valid, so both hold.
    thresholds = mode in ("on", "thresholds") and (
        _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    )
    trim = mode in ("on", "trim")
    parts = [
        f"mmap threshold {MMAP_THRESHOLD // 1024} KiB, trim threshold {TRIM_THRESHOLD // 1024} KiB"
        if thresholds
        else "glibc's dynamic thresholds",
        "heap trimmed after connections fall" if trim else "no trimming",
    ]
    _applied = AllocatorSettings(thresholds, trim, ", ".join(parts))
    log.debug("allocator: %s", _applied.detail)
    return _applied


def malloc_trim() -> bool:
    """Give free heap pages back to the OS (glibc `malloc_trim(0)`); False where unsupported."""
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class Reclaimer:
    """Decides when to trim the heap from samples of the open-connection count (all listeners together).

    A trim happens when the count has fallen to at most `fraction` of its peak since the last trim, by at
    least `min_drop` connections, and is no longer falling (so one trim follows a whole burst, not its
    first half); and at least `min_interval` seconds after the previous trim. The trim blocks the loop for
    milliseconds (3-19 ms measured for a 75-600 MB heap), so it is rare by construction.
    """

    def __init__(
        self,
        trim: Callable[[], object] | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        fraction: float = 0.75,
        min_drop: int = 256,
        min_interval: float = 5.0,
    ) -> None:
        self._trim = trim
        self._clock = clock
        self.fraction = fraction
        self.min_drop = min_drop
        self.min_interval = min_interval
        self.peak = 0
        self._previous = 0
        self._last_trim = -math.inf
        self.trims = 0

    @property
    def enabled(self) -> bool:
        return self._trim is not None

    def note(self, open_connections: int) -> bool:
        """One sample of the open-connection count; True when it trimmed."""
        previous, self._previous = self._previous, open_connections
        if open_connections > self.peak:
            self.peak = open_connections
            return False
        if self._trim is None or open_connections < previous:  # still falling: wait for the bottom
            return False
        if self.peak - open_connections < self.min_drop or open_connections > self.peak * self.fraction:
            return False
        now = self._clock()
        if now - self._last_trim < self.min_interval:
            return False
        self._last_trim = now
        self.peak = open_connections
        self.trims += 1
        self._trim()
        return True

    async def run(self, open_connections: Callable[[], int], interval: float = 1.0) -> None:
        """Sample `open_connections()` every `interval` seconds until cancelled (returns at once when off)."""
        if self._trim is None:
            return
        while True:
            await asyncio.sleep(interval)
            self.note(open_connections())


def _logged_trim() -> None:
    before = rss_bytes()
    started = time.perf_counter()
    malloc_trim()
    log.debug(
        "gave %.1f MB of freed heap back to the OS in %.1f ms",
        (before - rss_bytes()) / 2**20,
        (time.perf_counter() - started) * 1e3,
    )


def reclaimer(settings: AllocatorSettings) -> Reclaimer:
    """The process's Reclaimer for `settings` (one that never trims when trimming is off)."""
    return Reclaimer(_logged_trim if settings.trim and _LIBC is not None else None)
