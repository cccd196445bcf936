"""fd watches: libvirt's handle hooks, pausing reads, and delivering fd readiness."""

from __future__ import annotations

__all__ = [
    "FdWatches",
]

import asyncio
import contextlib
import logging
from typing import Any

from ._records import ERROR, HANGUP, READABLE, WRITABLE, FdEntry, HandleCallback, Watch
from ._state import LOGGER_NAME, EventState, _running_loop

logger = logging.getLogger(LOGGER_NAME)


class FdWatches(EventState):
    """libvirt's handle watches, one loop reader/writer per fd."""

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
                # The connection is closing: a pause left on its socket must
                # not hold a later connection that gets the same fd number.
                self._paused.pop(watch.fd, None)
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
        """Undo one :meth:`pause_reading` (nothing once libvirt stopped watching ``fd``:
        its pauses went with its last watch)."""
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
