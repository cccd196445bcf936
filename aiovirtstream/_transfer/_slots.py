"""Receive slots for downloads: page-aligned memory, kept for the next download.

A fresh slot costs page faults (on a VM that returns freed memory to its host,
faults on the host too), so finished downloads give theirs to one pool per
process (docs/internals.md, "Download").
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
