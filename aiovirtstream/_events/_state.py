"""The state every part of the event implementation shares, under one lock.

Each concept is a mixin on this (``_binding``, ``_watches``, ``_timers``,
``_frees``, ``_registration``), all one object: ``EventImpl`` in ``_impl``.
"""

from __future__ import annotations

__all__ = [
    "EventState",
    "LOGGER_NAME",
    "_running_loop",
]

import asyncio
import itertools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import libvirt

from ._records import FdEntry, FiringAfterDispatch, Timer, Watch

if TYPE_CHECKING:
    from ._records import HandleCallback, TimeoutCallback

# The implementation's modules log under the name it had before it was split.
LOGGER_NAME = "aiovirtstream._events._impl"

# The C function itself: called several times per packet.
_running_loop: Callable[[], asyncio.AbstractEventLoop | None] = asyncio._get_running_loop


class EventState:
    """The lock and the state of the event implementation (see the module docstring)."""

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

    if TYPE_CHECKING:
        # What one part calls on another; each is defined by one mixin of EventImpl.

        # _binding
        def bind(self, loop: asyncio.AbstractEventLoop | None = None) -> None: ...
        def _maybe_rebind_locked(self) -> bool: ...
        def _request_flush_locked(self, *, urgent: bool) -> None: ...

        # _watches
        def add_handle(
            self, fd: int, events: int, callback: HandleCallback, opaque: Any
        ) -> int: ...
        def update_handle(self, watch_id: int, events: int) -> None: ...
        def remove_handle(self, watch_id: int) -> int: ...
        def _sync_fd_locked(self, fd: int) -> None: ...
        def _drop_from_loop(self, loop: asyncio.AbstractEventLoop, fd: int) -> None: ...

        # _timers
        def add_timeout(self, interval: int, callback: TimeoutCallback, opaque: Any) -> int: ...
        def update_timeout(self, timer_id: int, interval: int) -> None: ...
        def remove_timeout(self, timer_id: int) -> int: ...
        def _arm_timer_locked(self, timer: Timer) -> None: ...
        def _fire_after_dispatch(self) -> None: ...

        # _frees
        def _defer_free_locked(self, opaque: Any) -> None: ...
        def _free_now(self, opaque: Any) -> None: ...
