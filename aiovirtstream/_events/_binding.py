"""Binding the event implementation to a loop, and the flush that applies changes there.

Hooks record changes under the lock; the flush applies them on the bound
loop's thread, woken from other threads only for urgent changes.
"""

from __future__ import annotations

__all__ = [
    "LoopBinding",
]

import asyncio
import logging

from .._exceptions import EventLoopError
from ._state import LOGGER_NAME, EventState, _running_loop

logger = logging.getLogger(LOGGER_NAME)


class LoopBinding(EventState):
    """Which loop serves libvirt, and how pending changes reach it."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the implementation is bound to, if any."""
        return self._loop

    def bind(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Serve libvirt from ``loop`` (default: the running loop).

        Must be called on the thread running ``loop``. Moving from a loop that
        has stopped or closed carries every live watch and timer over; moving
        from a loop that still runs (in another thread) raises
        :class:`EventLoopError`.
        """
        running = _running_loop()
        if loop is None:
            if running is None:
                raise EventLoopError("bind_event_loop() must be called from a running asyncio loop")
            loop = running
        elif loop is not running:
            raise EventLoopError("bind_event_loop(loop) must be called on the thread running loop")
        if self._loop is loop:
            return
        with self._lock:
            self._bind_locked(loop)

    def bind_ahead(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve libvirt from ``loop``, from any thread, whether it runs yet or not.

        For libvirtaio's ``virEventRegisterAsyncIOImpl(loop)``, which may come
        before the loop runs. Raises :class:`EventLoopError` if ``loop`` is
        closed, if another loop runs in this thread (it would take the
        implementation over at its next hook), or if the bound loop still runs.
        """
        running = _running_loop()
        if running is loop:
            self.bind(loop)
            return
        if loop.is_closed():
            raise EventLoopError("cannot bind libvirt's event implementation to a closed loop")
        if running is not None:
            raise EventLoopError(
                "another asyncio loop runs in this thread: bind libvirt's event "
                "implementation to the running loop"
            )
        with self._lock:
            # Only state changes here; the flush queued on loop applies them there.
            self._bind_locked(loop)

    def _bind_locked(self, loop: asyncio.AbstractEventLoop) -> None:
        old = self._loop
        if old is loop:
            return
        if old is not None and old.is_running():
            raise EventLoopError(
                "libvirt's event implementation is bound to an asyncio loop that is still "
                "running in another thread; libvirt has one event implementation per "
                "process, so use one loop for libvirt at a time"
            )
        if old is not None and not old.is_closed():
            for fd in list(self._on_loop):
                self._drop_from_loop(old, fd)
            for timer in self._timers.values():
                if timer.handle is not None:
                    timer.handle.cancel()
        self._on_loop.clear()
        for entry in self._fds.values():
            entry.registered = 0
        for timer in self._timers.values():
            timer.handle = None
            timer.generation += 1
        self._loop = loop
        # Everything is applied afresh on the new loop at its next iteration,
        # pending frees included (the old loop may have dropped their calls).
        self._flush_scheduled = False
        self._dirty_fds.update(self._fds)
        self._dirty_timers.update(self._timers)
        self._request_flush_locked(urgent=True)
        if old is not None:
            logger.debug("libvirt event implementation moved to a new loop")

    def _maybe_rebind_locked(self) -> bool:
        """Follow a new running loop when the bound one is gone; True if on the loop thread."""
        running = _running_loop()
        if running is None:
            return False
        if running is self._loop:
            return True
        old = self._loop
        if old is None or old.is_closed() or not old.is_running():
            self._bind_locked(running)
            return True
        return False

    def _request_flush_locked(self, *, urgent: bool) -> None:
        """Have :meth:`_flush` apply pending changes at the loop's next iteration.

        On the loop's thread that costs one ``call_soon`` per burst of changes
        (libvirt makes several per packet). From another thread the loop is
        woken only for an ``urgent`` change, once until the flush runs.
        """
        if self._flush_scheduled:
            return
        if self._loop is None and _running_loop() is None:
            return  # applied when a loop is bound
        on_loop_thread = self._maybe_rebind_locked()  # binds the running loop if unbound
        loop = self._loop
        if loop is None:
            return
        if on_loop_thread:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
        elif urgent:
            self._flush_scheduled = True
            try:
                loop.call_soon_threadsafe(self._flush)
            except RuntimeError:
                self._flush_scheduled = False  # closed: the next bind applies everything

    def _flush(self) -> None:
        """Apply what changed since the last flush (loop thread)."""
        with self._lock:
            if _running_loop() is not self._loop:
                return  # queued on a loop we have since left
            self._flush_scheduled = False
            fds, self._dirty_fds = self._dirty_fds, set()
            for fd in fds:
                self._sync_fd_locked(fd)
            timers, self._dirty_timers = self._dirty_timers, {}
            for timer in timers.values():
                self._arm_timer_locked(timer)
            frees = list(self._frees.values())
            self._frees.clear()
            waiters, self._idle_waiters = self._idle_waiters, []
        for opaque in frees:
            self._invoke_free(opaque)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
