"""Timers: libvirt's timeout hooks, arming them on the loop and firing them."""

from __future__ import annotations

__all__ = [
    "Timers",
]

import logging
import time
from typing import Any

from ._records import FiringAfterDispatch, TimeoutCallback, Timer
from ._state import LOGGER_NAME, EventState, _running_loop

logger = logging.getLogger(LOGGER_NAME)


class Timers(EventState):
    """libvirt's timers, as ``call_soon``/``call_later`` handles on the loop."""

    def add_timeout(self, interval: int, callback: TimeoutCallback, opaque: Any) -> int:
        """libvirt hook: a timer firing every ``interval`` ms (-1: disabled); returns its id."""
        with self._lock:
            timer = Timer(next(self._timer_ids), interval, callback, opaque)
            self._timers[timer.id] = timer
            self._timer_changed_locked(timer)
            return timer.id

    def update_timeout(self, timer_id: int, interval: int) -> None:
        """libvirt hook: re-arm a timer with a new period (-1 disables it)."""
        with self._lock:
            timer = self._timers.get(timer_id)
            if timer is None:
                logger.debug("update_timeout: unknown timer %d", timer_id)
                return
            if interval == 0 and timer.interval == 0 and timer.handle is not None:
                return  # already firing every loop iteration
            if interval > 0 and timer.interval > 0 and timer.handle is not None:
                # Pushed back (libvirt re-arms the keepalive timer on every
                # packet, from any thread): nothing to apply now; the armed
                # firing moves itself to the new deadline when it comes.
                due = time.monotonic() + interval / 1000
                if due >= timer.armed_for:
                    timer.interval = interval
                    timer.deadline = due
                    return
            timer.interval = interval
            self._timer_changed_locked(timer)

    def remove_timeout(self, timer_id: int) -> int:
        """libvirt hook: delete a timer; its free function runs later, on the loop."""
        with self._lock:
            timer = self._timers.pop(timer_id, None)
            if timer is None:
                logger.debug("remove_timeout: unknown timer %d", timer_id)
                return -1
            timer.removed = True
            self._timer_changed_locked(timer)  # the flush cancels its pending firing
            self._defer_free_locked(timer.opaque)
            return 0

    def _timer_changed_locked(self, timer: Timer) -> None:
        timer.generation += 1
        timer.deadline = None
        if timer.interval <= 0 and not timer.removed and self._maybe_rebind_locked():
            # Stream events come from 0 ms timers, enabled when a packet is
            # queued and disabled when it was read: on the loop's thread
            # both are applied at once (a call_soon, a cancel), not at the
            # next flush, which would cost every packet a loop iteration.
            self._arm_timer_locked(timer)
            self._dirty_timers.pop(timer.id, None)
            return
        self._dirty_timers[timer.id] = timer
        # A timer disabled from another thread is not worth a wake-up: its
        # pending firing sees the new generation and does nothing.
        self._request_flush_locked(urgent=timer.interval >= 0 and not timer.removed)

    def _arm_timer_locked(self, timer: Timer) -> None:
        loop = self._loop
        assert loop is not None
        if timer.handle is not None:
            timer.handle.cancel()
            timer.handle = None
        if timer.removed:
            return
        if timer.interval == 0:
            if self._dispatching_fd and _running_loop() is loop:
                firing = FiringAfterDispatch()
                self._after_dispatch.append((firing, timer, timer.generation))
                timer.handle = firing
            else:
                timer.handle = loop.call_soon(self._fire_timer, timer, timer.generation)
            timer.armed_for = loop.time()
        elif timer.interval > 0:
            timer.handle = loop.call_later(
                timer.interval / 1000, self._fire_timer, timer, timer.generation
            )
            timer.armed_for = loop.time() + timer.interval / 1000

    def _fire_timer(self, timer: Timer, generation: int) -> None:
        with self._lock:
            if timer.removed or timer.generation != generation:
                return
            loop = self._loop
            if loop is None or _running_loop() is not loop:
                return
            if timer.deadline is not None:
                # Pushed back while armed (see update_timeout): not due yet.
                late = timer.deadline - loop.time()
                timer.deadline = None
                if late > 0.0005:
                    timer.handle = loop.call_later(late, self._fire_timer, timer, generation)
                    timer.armed_for = loop.time() + late
                    return
            timer.handle = None  # this firing is used up
        try:
            timer.callback(timer.id, timer.opaque)
        finally:
            # Re-armed after the callback, unless it changed the timer (which
            # arms or disarms it): a stream's callback usually disables its
            # 0 ms timer, and arming first would cost a call_soon and a cancel.
            with self._lock:
                if (
                    timer.handle is None
                    and timer.generation == generation
                    and not timer.removed
                    and timer.interval >= 0
                    and self._loop is loop
                ):
                    self._arm_timer_locked(timer)

    def _fire_after_dispatch(self) -> None:
        firings, self._after_dispatch = self._after_dispatch, []
        for firing, timer, generation in firings:
            if not firing.cancelled:
                self._fire_timer(timer, generation)
