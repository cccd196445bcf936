"""Receive slots for downloads: page-aligned memory, kept for the next download.

A download receives into slots of :data:`SLOT_SIZE` bytes (see
:mod:`aiovirtstream._writebehind`). A new slot is dear on the development
machine (a VM that gives freed memory back to its host, so the first touch
of a page costs a fault on the host): 250-280 µs to fault one in on its
first write and 75 µs to unmap it, against 5 µs to fill one again. A
download uses 24-34 slots (two streams, 1 GiB dense or 2 GiB sparse), so
fresh slots cost it 7-10 ms, on the loop's thread, inside libvirt's recv:
6-8 % of a 2 GiB sparse download. So a finished download gives its slots
back to one pool per process, for the next download, which keeps up to
:data:`KEEP_SLOTS` and drops all of them once no download has used it for
:data:`IDLE_SECONDS`.

Making the slots ahead, in a worker thread while the streams open, was
tried and left out: the loop's lag p99 during a sparse download went from
0.8-1.3 to 2.1-2.4 ms (two sets of 15 rounds in one process, the pool
emptied before each), for no gain in time that the noise let through. The
worker holds the GIL between slots and, with ``MAP_POPULATE``, within the
``mmap`` call too (a thread mapping 64 slots stalled the loop for up to
6.5 ms); with the pages touched by ``ctypes.memset``, which releases it,
the lag stayed.
"""

from __future__ import annotations

__all__ = ["SLOT_SIZE", "KEEP_SLOTS", "IDLE_SECONDS", "SlotPool", "new_slot", "slot_pool"]

import asyncio
import mmap
import threading
from collections.abc import Iterable

#: The size of each receive slot, and so of each write.
SLOT_SIZE = 256 * 1024
#: The most slots the pool keeps between downloads (16 MiB).
KEEP_SLOTS = 64
#: The pool lets its slots go after this long without a download.
IDLE_SECONDS = 30.0


def new_slot() -> memoryview:
    """A fresh page-aligned slot (its pages are faulted in on first write)."""
    return memoryview(mmap.mmap(-1, SLOT_SIZE))


class SlotPool:
    """Free slots shared by the downloads of a process (any thread)."""

    def __init__(self, keep: int = KEEP_SLOTS, idle: float = IDLE_SECONDS) -> None:
        self._keep = keep
        self._idle = idle
        self._lock = threading.Lock()
        self._free: list[memoryview] = []
        self._uses = 0  # counts takes and returns: the idle timer compares it
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._free)

    def take(self) -> memoryview:
        """A free slot (the one given back last: its pages are the likeliest to be
        resident), or a new one."""
        with self._lock:
            self._uses += 1
            if self._free:
                return self._free.pop()
        return new_slot()

    def give_back(self, slots: Iterable[memoryview]) -> None:
        """Keep ``slots`` for the next download, up to the pool's bound (loop thread:
        the idle timer runs on the loop)."""
        with self._lock:
            self._uses += 1
            uses = self._uses
            for slot in slots:
                if len(self._free) >= self._keep:
                    break  # the rest are unmapped once unreferenced
                self._free.append(slot)
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self._idle, self._drop_if_unused, uses)

    def _drop_if_unused(self, uses: int) -> None:
        with self._lock:
            if self._uses == uses:
                self._free.clear()
                self._timer = None


#: The process's pool.
slot_pool = SlotPool()
