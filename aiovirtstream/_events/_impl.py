"""libvirt's event hooks, implemented on the running asyncio loop.

One process-wide implementation, registered with libvirt once and bound to
whichever loop runs; how hook calls from other threads reach it is in docs/events.md.
"""

from __future__ import annotations

__all__ = [
    "EventImpl",
]

from ._binding import LoopBinding
from ._frees import DeferredFrees
from ._records import EventImplStats
from ._registration import Registration
from ._timers import Timers
from ._watches import FdWatches


class EventImpl(LoopBinding, FdWatches, Timers, DeferredFrees, Registration):
    """The process-wide libvirt event implementation (see the module docstring).

    Use :func:`register_event_impl` and :func:`bind_event_loop` rather than
    making one: libvirt accepts a single implementation per process.
    """

    def stats(self) -> EventImplStats:
        """Counts of live watches, timers and pending frees."""
        with self._lock:
            return EventImplStats(
                watches=len(self._watches),
                fds=len(self._fds),
                fds_registered_on_loop=len(self._on_loop),
                timers=len(self._timers),
                timers_enabled=sum(1 for t in self._timers.values() if t.interval >= 0),
                pending_frees=len(self._frees),
                loop_bound=self._loop is not None and not self._loop.is_closed(),
            )
