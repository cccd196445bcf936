"""What the event implementation keeps per watch, fd and timer, and its statistics."""

from __future__ import annotations

__all__ = [
    "READABLE",
    "WRITABLE",
    "ERROR",
    "HANGUP",
    "HandleCallback",
    "TimeoutCallback",
    "Watch",
    "FdEntry",
    "Timer",
    "FiringAfterDispatch",
    "EventImplStats",
]

import asyncio
import select
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import libvirt

READABLE: int = libvirt.VIR_EVENT_HANDLE_READABLE


WRITABLE: int = libvirt.VIR_EVENT_HANDLE_WRITABLE


ERROR: int = libvirt.VIR_EVENT_HANDLE_ERROR


HANGUP: int = libvirt.VIR_EVENT_HANDLE_HANGUP


_IO = READABLE | WRITABLE


_POLL_ERRORS = select.POLLERR | select.POLLNVAL


HandleCallback = Callable[[int, int, int, Any], None]


TimeoutCallback = Callable[[int, Any], None]


@dataclass(eq=False, slots=True)
class Watch:
    """One libvirt handle watch (several may share an fd)."""

    id: int
    fd: int
    events: int
    callback: HandleCallback
    opaque: Any
    removed: bool = False


@dataclass(eq=False, slots=True)
class FdEntry:
    """The watches of one fd, from the first added until the last removed.

    A new entry is made when the fd number comes back after all its watches
    were removed: the number may now name another file, whose loop
    registration must start afresh.
    """

    fd: int
    watches: dict[int, Watch] = field(default_factory=dict)
    wanted: int = 0  # READABLE/WRITABLE that some watch asks for
    registered: int = 0  # READABLE/WRITABLE registered on the loop for this entry
    poller: Any = None  # a select.poll for ERROR/HANGUP, made on first use

    def error_events(self) -> int:
        """ERROR/HANGUP pending on the fd (asyncio reports them only as readiness)."""
        if self.poller is None:
            self.poller = select.poll()
            self.poller.register(self.fd, 0)
        ready = self.poller.poll(0)
        if not ready:
            return 0
        revents = ready[0][1]
        return (ERROR if revents & _POLL_ERRORS else 0) | (
            HANGUP if revents & select.POLLHUP else 0
        )

    def recompute(self, paused: bool = False) -> None:
        wanted = 0
        for watch in self.watches.values():
            wanted |= watch.events
        self.wanted = wanted & (WRITABLE if paused else _IO)


@dataclass(eq=False, slots=True)
class Timer:
    id: int
    interval: int  # ms; -1 disabled
    callback: TimeoutCallback
    opaque: Any
    generation: int = 0  # bumped by every change; stale firings are ignored
    handle: asyncio.Handle | FiringAfterDispatch | None = None
    armed_for: float = 0.0  # loop time the armed handle fires at
    deadline: float | None = None  # a later due time set from another thread
    removed: bool = False


class FiringAfterDispatch:
    """A 0 ms timer armed by an fd callback: it fires when that dispatch returns."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(frozen=True, slots=True)
class EventImplStats:
    """A snapshot of the implementation's bookkeeping, for tests and debugging."""

    watches: int
    fds: int
    fds_registered_on_loop: int
    timers: int
    timers_enabled: int
    pending_frees: int
    loop_bound: bool
