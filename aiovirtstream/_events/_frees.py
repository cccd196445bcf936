"""Deferred frees: libvirt's free callbacks, run on the loop after the hook returned."""

from __future__ import annotations

__all__ = [
    "DeferredFrees",
]

import asyncio
from typing import Any

from ._state import EventState


class DeferredFrees(EventState):
    """Free callbacks of removed watches and timers, and waiting for them (idleness)."""

    def _defer_free_locked(self, opaque: Any) -> None:
        # Never inside the hook (libvirt: likely a deadlock): at the next flush.
        self._frees[next(self._free_ids)] = opaque
        self._request_flush_locked(urgent=True)

    def is_idle(self) -> bool:
        """True when no watch, no timer (enabled or not) and no deferred free is left."""
        with self._lock:
            return not (self._watches or self._timers or self._frees)

    async def wait_idle(self) -> None:
        """Wait until :meth:`is_idle` (libvirt removes and frees everything it added).

        Every removal queues a free and so a flush, which wakes this to look again.
        """
        self.bind()
        while True:
            with self._lock:
                if not (self._watches or self._timers or self._frees):
                    return
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._idle_waiters.append(waiter)
            await waiter

    def _free_now(self, opaque: Any) -> None:
        """Run the deferred free of ``opaque`` at once (only where no hook is running)."""
        with self._lock:
            key = next((k for k, v in self._frees.items() if v is opaque), None)
            if key is None:
                return
            del self._frees[key]
        self._invoke_free(opaque)

    async def wait_frees(self) -> None:
        """Wait until every deferred free function has run."""
        self.bind()
        with self._lock:
            if not self._frees:
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
        await waiter
