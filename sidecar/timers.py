"""One lazy deadline object for the data plane (edge).

A `Deadline` moves with a float store: `set()` on a deadline later than the armed handle only records the
new time; the handle fires at the old time, sees the later deadline and re-arms once. Progress on a stream
(a body chunk, a response byte) therefore costs no TimerHandle, and one object serves every deadline of
a connection that applies one at a time (head, idle, the app's inactivity) by switching its `kind`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Deadline"]


def _nothing(_kind: int) -> None:
    pass


class Deadline:
    """`callback(kind)` runs once the latest `set(seconds, kind)` passes without a `clear()`.

    `cancel()` drops the armed handle too; call it when the owner closes, or the handle keeps the owner
    (and, through it, a transport and its buffers) alive until it fires."""

    __slots__ = ("_at", "_callback", "_handle", "_loop", "kind")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[int], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._at: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.kind = 0

    @property
    def armed(self) -> bool:
        return self._at is not None

    def set(self, seconds: float, kind: int = 0) -> None:
        at = self._loop.time() + seconds
        self._at = at
        self.kind = kind
        h = self._handle
        if h is None or h.when() > at:
            if h is not None:
                h.cancel()
            self._handle = self._loop.call_at(at, self._fire)

    def clear(self, kind: int | None = None) -> None:
        """Disarm (only if armed for `kind`, when given); the handle fires later and stops."""
        if kind is None or kind == self.kind:
            self._at = None

    def close(self) -> None:
        """For good (the owner is closing): `cancel`, and the callback goes too, so that the owner and this
        object do not keep each other alive until the cyclic GC runs."""
        self.cancel()
        self._callback = _nothing

    def cancel(self) -> None:
        self._at = None
        h = self._handle
        if h is not None:
            self._handle = None
            h.cancel()

    def _fire(self) -> None:
        self._handle = None
        at = self._at
        if at is None:
            return
        if self._loop.time() < at:
            self._handle = self._loop.call_at(at, self._fire)
            return
        self._at = None
        self._callback(self.kind)
