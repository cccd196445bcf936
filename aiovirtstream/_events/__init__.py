"""libvirt's event loop on asyncio: the implementation libvirt calls for its I/O and timers."""

from __future__ import annotations

from ._hold import SocketHold
from ._impl import EventImpl
from ._records import EventImplStats
from ._registry import bind_event_loop, get_event_impl, register_event_impl

__all__ = [
    "EventImpl",
    "EventImplStats",
    "SocketHold",
    "bind_event_loop",
    "get_event_impl",
    "register_event_impl",
]
