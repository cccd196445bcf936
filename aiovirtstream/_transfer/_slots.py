"""Receive slots for downloads: page-aligned memory, one budget for the process.

A fresh slot costs page faults (on a VM that returns freed memory to its host,
faults on the host too), so finished downloads give theirs to one pool per
process. The pool also bounds the slots the process maps, whatever the number
of downloads: each gets a share (docs/internals.md, "Download").
"""

from __future__ import annotations

__all__ = [
    "SLOT_SIZE",
    "KEEP_SLOTS",
    "IDLE_SECONDS",
    "BUDGET_SLOTS",
    "MIN_SHARE",
    "SlotAccount",
    "SlotPool",
    "new_slot",
    "slot_pool",
]

import asyncio
import mmap
import threading
from collections import deque
from collections.abc import Iterable

#: The size of each receive slot, and so of each write.
SLOT_SIZE = 256 * 1024
#: The most slots the pool keeps between downloads (16 MiB).
KEEP_SLOTS = 64
#: The pool lets its slots go after this long without a download.
IDLE_SECONDS = 30.0
#: The most slots the process maps for downloads, in use and kept (16 MiB).
BUDGET_SLOTS = 64
#: Slots every download may have, whatever the budget: one being filled,
#: one being written.
MIN_SHARE = 2


def new_slot() -> memoryview:
    """A fresh page-aligned slot (its pages are faulted in on first write)."""
    return memoryview(mmap.mmap(-1, SLOT_SIZE))


class SlotAccount:
    """The slots one write-behind holds (taken and not given back)."""

    __slots__ = ("held", "open")

    def __init__(self) -> None:
        self.held = 0
        self.open = True


class SlotPool:
    """Free slots shared by the downloads of a process (any thread)."""

    def __init__(
        self, keep: int = KEEP_SLOTS, idle: float = IDLE_SECONDS, budget: int = BUDGET_SLOTS
    ) -> None:
        self._keep = keep
        self._idle = idle
        self._budget = budget
        self._mapped = 0  # slots made and not yet let go: in use, or kept in _free
        self._users = 0  # write-behinds that draw from the pool now
        self._lock = threading.Lock()
        self._free: list[memoryview] = []
        self._uses = 0  # counts takes and returns: the idle timer compares it
        self._timer: asyncio.TimerHandle | None = None
        # Accounts of write-behinds collected by the garbage collector, closed
        # under the lock by the next call: a collection can run inside this
        # pool's lock, on the thread that holds it.
        self._collected: deque[SlotAccount] = deque()

    def __len__(self) -> int:
        return len(self._free)

    @property
    def mapped(self) -> int:
        """Slots the process holds: in use by downloads, or kept here."""
        return self._mapped

    def open_account(self) -> SlotAccount:
        """A write-behind starts drawing slots (its share shrinks the others')."""
        with self._lock:
            self._close_collected_locked()
            self._users += 1
        return SlotAccount()

    def close_account(self, account: SlotAccount) -> None:
        """The write-behind is done: slots it did not give back leave the budget
        (they are unmapped once unreferenced). Idempotent."""
        with self._lock:
            self._close_collected_locked()
            self._close_locked(account)

    def close_collected(self, account: SlotAccount) -> None:
        """:meth:`close_account` for a finalizer: never waits for the lock."""
        self._collected.append(account)

    def _close_collected_locked(self) -> None:
        while self._collected:
            self._close_locked(self._collected.popleft())

    def _close_locked(self, account: SlotAccount) -> None:
        if account.open:
            account.open = False
            self._users -= 1
        self._mapped -= account.held
        account.held = 0

    def share(self) -> int:
        """How many slots each write-behind may hold now."""
        return max(MIN_SHARE, self._budget // max(self._users, 1))

    def take(self, account: SlotAccount) -> memoryview | None:
        """A free slot (the one given back last: its pages are the likeliest to be
        resident), or a new one while the budget allows (below
        :data:`MIN_SHARE` held, one is made anyway); None: over the budget."""
        with self._lock:
            self._close_collected_locked()
            if self._free:
                slot = self._free.pop()
            elif self._mapped < self._budget or account.held < MIN_SHARE:
                self._mapped += 1
                slot = None
            else:
                return None
            self._uses += 1
            account.held += 1
        return slot if slot is not None else new_slot()

    def give_back(self, slots: Iterable[memoryview], account: SlotAccount | None = None) -> None:
        """Keep ``slots`` for the next download, up to the pool's bound (from the
        loop's thread, the idle timer starts; from a worker, at the next give-back)."""
        with self._lock:
            self._close_collected_locked()
            self._uses += 1
            uses = self._uses
            for slot in slots:
                if account is not None:
                    account.held -= 1
                if len(self._free) < self._keep:
                    self._free.append(slot)
                else:
                    self._mapped -= 1  # unmapped once unreferenced
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
                self._mapped -= len(self._free)
                self._free.clear()
                self._timer = None


#: The process's pool.
slot_pool = SlotPool()
