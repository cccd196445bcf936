"""libvirt's event hooks, implemented on the running asyncio loop.

One process-wide implementation, registered with libvirt once and bound to
whichever loop runs; how hook calls from other threads reach it is in docs/events.md.
"""

from __future__ import annotations

__all__ = [
    "EventImpl",
]

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt

from .._exceptions import EventLoopError
from ._records import (
    ERROR,
    HANGUP,
    READABLE,
    WRITABLE,
    EventImplStats,
    FdEntry,
    FiringAfterDispatch,
    HandleCallback,
    TimeoutCallback,
    Timer,
    Watch,
)

logger = logging.getLogger(__name__)

# The C function itself: called several times per packet.
_running_loop: Callable[[], asyncio.AbstractEventLoop | None] = asyncio._get_running_loop


class EventImpl:
    """The process-wide libvirt event implementation (see the module docstring).

    Use :func:`register_event_impl` and :func:`bind_event_loop` rather than
    making one: libvirt accepts a single implementation per process.
    """

    def __init__(
        self, invoke_free: Callable[[Any], None] = libvirt.virEventInvokeFreeCallback
    ) -> None:
        self._invoke_free = invoke_free
        # Re-entrant: the garbage collector can free a libvirt object (whose
        # free calls a hook) at any allocation made while the lock is held.
        self._lock = threading.RLock()
        self._watch_ids = itertools.count(1)
        self._timer_ids = itertools.count(1)
        self._free_ids = itertools.count(1)
        self._watches: dict[int, Watch] = {}
        self._fds: dict[int, FdEntry] = {}
        # Which entry holds the loop's reader/writer for an fd (loop thread only).
        self._on_loop: dict[int, FdEntry] = {}
        self._dirty_fds: set[int] = set()
        self._paused: dict[int, int] = {}  # fd -> pause_reading() nesting
        self._dirty_timers: dict[int, Timer] = {}
        self._flush_scheduled = False
        self._timers: dict[int, Timer] = {}
        self._frees: dict[int, Any] = {}
        self._idle_waiters: list[asyncio.Future[None]] = []
        # 0 ms timers armed while an fd callback runs (loop thread only).
        self._dispatching_fd = False
        self._after_dispatch: list[tuple[FiringAfterDispatch, Timer, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.registered_with_libvirt = False

    # ------------------------------------------------------------------ binding

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

    # ------------------------------------------------------------------ handles

    def add_handle(self, fd: int, events: int, callback: HandleCallback, opaque: Any) -> int:
        """libvirt hook: watch ``fd`` for ``events``; returns the new watch id (>= 1)."""
        with self._lock:
            watch = Watch(next(self._watch_ids), fd, events, callback, opaque)
            self._watches[watch.id] = watch
            entry = self._fds.get(fd)
            if entry is None:
                entry = self._fds[fd] = FdEntry(fd)
            entry.watches[watch.id] = watch
            entry.recompute(fd in self._paused)
            self._fd_changed_locked(entry)
            return watch.id

    def update_handle(self, watch_id: int, events: int) -> None:
        """libvirt hook: change the events of a watch (unknown ids are ignored)."""
        with self._lock:
            watch = self._watches.get(watch_id)
            if watch is None:
                logger.debug("update_handle: unknown watch %d", watch_id)
                return
            if watch.events == events:
                return  # libvirt re-states the same events on every socket wake-up
            watch.events = events
            fd = watch.fd
            entry = self._fds[fd]
            if (
                not events & ~entry.registered
                and len(entry.watches) == 1
                and fd not in self._paused
                and self._on_loop.get(fd) is entry
                and _running_loop() is None
            ):
                # Every blocking call a worker thread makes narrows its
                # connection's watch to nothing and restores it afterwards
                # (virNetClientIO), twice per packet sent. Within what the loop
                # has registered, from a thread without a loop, the general
                # path below comes to this and nothing more: the narrowing is
                # applied lazily (_on_fd_ready), no wake-up. This path spares
                # three Python calls per update, on a path a dense upload takes
                # twice per packet.
                entry.wanted = events
                self._dirty_fds.add(fd)
                return
            entry.recompute(fd in self._paused)
            self._fd_changed_locked(entry)

    def remove_handle(self, watch_id: int) -> int:
        """libvirt hook: stop a watch; its free function runs later, on the loop."""
        with self._lock:
            watch = self._watches.pop(watch_id, None)
            if watch is None:
                logger.debug("remove_handle: unknown watch %d", watch_id)
                return -1
            watch.removed = True
            entry = self._fds[watch.fd]
            del entry.watches[watch_id]
            if entry.watches:
                entry.recompute(watch.fd in self._paused)
            else:
                del self._fds[watch.fd]
                entry.wanted = 0
            self._fd_changed_locked(entry)
            self._defer_free_locked(watch.opaque)
            return 0

    def _fd_changed_locked(self, entry: FdEntry) -> None:
        fd = entry.fd
        self._dirty_fds.add(fd)
        owner = self._on_loop.get(fd)
        registered = entry.registered if owner is entry else 0
        # From another thread, removals wake the loop (the fd number may be
        # reused at once), and so do additions that widen what the loop
        # watches; narrowing waits for the next unwanted event (_on_fd_ready).
        stale = owner is not None and owner is not self._fds.get(fd)
        self._request_flush_locked(urgent=stale or bool(entry.wanted & ~registered))

    def _sync_fd_locked(self, fd: int) -> None:
        """Make the loop's reader/writer for ``fd`` match its watches (loop thread)."""
        loop = self._loop
        assert loop is not None
        entry = self._fds.get(fd)
        owner = self._on_loop.get(fd)
        if owner is not None and owner is not entry:
            self._drop_from_loop(loop, fd)
            owner.registered = 0
            owner = None
        if entry is None:
            return
        registered = entry.registered if owner is entry else 0
        wanted = entry.wanted
        try:
            if wanted & READABLE and not registered & READABLE:
                loop.add_reader(fd, self._on_fd_ready, entry, READABLE)
            elif registered & READABLE and not wanted & READABLE:
                loop.remove_reader(fd)
            if wanted & WRITABLE and not registered & WRITABLE:
                loop.add_writer(fd, self._on_fd_ready, entry, WRITABLE)
            elif registered & WRITABLE and not wanted & WRITABLE:
                loop.remove_writer(fd)
        except OSError as error:
            # Closed before this flush ran: libvirt removes the watch next.
            logger.debug("watch on fd %d: %s", fd, error)
            self._drop_from_loop(loop, fd)
            entry.registered = 0
            return
        entry.registered = wanted
        if wanted:
            self._on_loop[fd] = entry
        else:
            self._on_loop.pop(fd, None)

    def _drop_from_loop(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        # The fd may be closed (or already reused) by now: the selector then
        # refuses to modify it. Removal is all we need, so errors are fine.
        for remove in (loop.remove_reader, loop.remove_writer):
            try:
                remove(fd)
            except (OSError, ValueError):
                pass
        self._on_loop.pop(fd, None)

    def _on_fd_ready(self, entry: FdEntry, kind: int) -> None:
        fd = entry.fd
        # The common case reads without the lock: under the GIL these reads
        # see either the state before a hook or the state after it, and a
        # watch removed meanwhile is skipped below.
        if self._on_loop.get(fd) is not entry or not entry.wanted & kind:
            with self._lock:
                if self._on_loop.get(fd) is not entry or entry.wanted & kind:
                    return
                # Lazy narrowing: nobody wants this event any more.
                loop = self._loop
                assert loop is not None
                remove = loop.remove_reader if kind == READABLE else loop.remove_writer
                with contextlib.suppress(OSError, ValueError):
                    remove(fd)
                entry.registered &= ~kind
                if not entry.registered:
                    self._on_loop.pop(fd, None)
                return
        targets = list(entry.watches.values())
        revents = kind | entry.error_events()
        # A stream's events come from a 0 ms timer that libvirt enables when
        # this callback queued a packet: it fires right after the callback,
        # not one loop iteration later (one iteration less per packet).
        self._dispatching_fd = True
        try:
            for watch in targets:
                events = revents & (watch.events | ERROR | HANGUP)
                if events and not watch.removed:
                    watch.callback(watch.id, fd, events, watch.opaque)
        finally:
            self._dispatching_fd = False
            if self._after_dispatch:
                self._fire_after_dispatch()

    def _fire_after_dispatch(self) -> None:
        firings, self._after_dispatch = self._after_dispatch, []
        for firing, timer, generation in firings:
            if not firing.cancelled:
                self._fire_timer(timer, generation)

    # ------------------------------------------------------------------ timers

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

    # ------------------------------------------------------------------ frees

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

    # ------------------------------------------------------------------ backpressure

    def pause_reading(self, fd: int) -> None:
        """Stop telling libvirt that ``fd`` is readable, until :meth:`resume_reading`.

        libvirt's client reads a connection's socket whenever it is readable
        and queues what it reads without limit; a download whose consumer
        falls behind would grow that queue. Not serving the socket instead
        lets TCP / the unix socket push back on the daemon. Nests.
        """
        with self._lock:
            self._paused[fd] = self._paused.get(fd, 0) + 1
            if self._paused[fd] == 1:
                self._repaint_locked(fd)

    def resume_reading(self, fd: int) -> None:
        """Undo one :meth:`pause_reading`."""
        with self._lock:
            count = self._paused.get(fd, 0) - 1
            if count > 0:
                self._paused[fd] = count
                return
            self._paused.pop(fd, None)
            self._repaint_locked(fd)

    def _repaint_locked(self, fd: int) -> None:
        entry = self._fds.get(fd)
        if entry is not None:
            entry.recompute(fd in self._paused)
            self._fd_changed_locked(entry)

    def watched_fds(self) -> frozenset[int]:
        """The fds libvirt watches now (a connection's socket appears when it opens)."""
        with self._lock:
            return frozenset(self._fds)

    # ------------------------------------------------------------------ introspection

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

    def register(self) -> None:
        """Register the hooks with libvirt (once per process).

        Also routes libvirt's error reports to :mod:`logging` (logger
        ``aiovirtstream.libvirt``) instead of stderr: every error reaches the
        caller as an exception anyway, and libvirt's printing would spew on
        expected events such as a guest shutting down under a console.
        """
        if self.registered_with_libvirt:
            return
        libvirt.registerErrorHandler(_log_libvirt_error, None)
        already = EventLoopError(
            "another libvirt event implementation (libvirtaio, or "
            "virEventRegisterDefaultImpl) is already registered in this process; "
            "aiovirtstream needs its own: do not register another one"
        )
        try:
            libvirt.virEventRegisterImpl(
                self.add_handle,
                self.update_handle,
                self.remove_handle,
                self.add_timeout,
                self.update_timeout,
                self.remove_timeout,
            )
        except (libvirt.libvirtError, RuntimeError) as error:
            raise already from error
        # libvirt ignores a second registration with only a logged warning when
        # the first came from C (virEventRegisterDefaultImpl): check that a
        # timer added through libvirt now reaches our hooks.
        before = next(self._timer_ids)
        probe = libvirt.virEventAddTimeout(-1, _ignore_timer, None)
        with self._lock:
            timer = self._timers.get(probe) if probe > before else None
        libvirt.virEventRemoveTimeout(probe)
        if timer is None:
            raise already
        # The probe's free is libvirt-python's own, for a timer added here, outside
        # any hook: run it now, so that a fresh registration leaves nothing pending.
        self._free_now(timer.opaque)
        self.registered_with_libvirt = True


def _ignore_timer(_timer: int, _opaque: object) -> None:
    """The registration probe's timer never fires (-1)."""


_libvirt_logger = logging.getLogger("aiovirtstream.libvirt")


def _log_libvirt_error(_context: object, error: Any) -> None:
    # error is libvirt's error tuple: (code, domain, message, level, ...)
    _libvirt_logger.debug("libvirt: %s", error[2] if len(error) > 2 else error)
