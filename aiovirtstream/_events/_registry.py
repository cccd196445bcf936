"""The process-wide event implementation: registering it with libvirt and binding it to a loop."""

from __future__ import annotations

__all__ = [
    "get_event_impl",
    "register_event_impl",
    "bind_event_loop",
]

import asyncio
import threading

from ._impl import EventImpl

_impl = EventImpl()


_register_lock = threading.Lock()


def get_event_impl() -> EventImpl:
    """The process-wide implementation (registered or not)."""
    return _impl


def register_event_impl() -> EventImpl:
    """Register aiovirtstream's event implementation with libvirt, once per process.

    Call it before opening any connection with plain ``libvirt.open`` that
    streams will use; :func:`aiovirtstream.connect` does it for you.
    """
    with _register_lock:
        _impl.register()
    return _impl


def bind_event_loop(loop: asyncio.AbstractEventLoop | None = None) -> EventImpl:
    """Register (if needed) and bind the implementation to the running loop.

    Cheap when already bound; safe to call at the start of every coroutine
    that uses libvirt.
    """
    if not _impl.registered_with_libvirt:
        register_event_impl()
    _impl.bind(loop)
    return _impl
