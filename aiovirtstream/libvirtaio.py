"""A drop-in for libvirt-python's ``libvirtaio``, on aiovirtstream's event implementation.

Switch with one import: ``import aiovirtstream.libvirtaio as libvirtaio``.
What differs from libvirtaio is in docs/events.md ("Migrating from libvirtaio").
"""

from __future__ import annotations

__all__ = [
    "getCurrentImpl",
    "virEventAsyncIOImpl",
    "virEventRegisterAsyncIOImpl",
]

import asyncio
import threading

import libvirt

from ._events import EventImpl, get_event_impl, register_event_impl

# libvirt accepts one registration per process (libvirt-python raises
# RuntimeError on a second one). A replacement of this function (a test
# double such as libvirt-python's own tests/eventmock.py) expects a call per
# registration instead, so it is looked up at call time and compared to this.
_LIBVIRT_REGISTER = libvirt.virEventRegisterImpl


class virEventAsyncIOImpl:  # noqa: N801 (libvirtaio's name)
    """libvirt's event implementation on asyncio, as libvirtaio's class of that name.

    Every instance is a view of aiovirtstream's one process-wide
    implementation (``event_impl``); :meth:`register` registers it with libvirt
    (once per process) and binds it to ``loop`` or the running loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._requested_loop = loop
        self.event_impl: EventImpl = get_event_impl()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the implementation is bound to (None before one is)."""
        return self.event_impl.loop

    def __repr__(self) -> str:
        stats = self.event_impl.stats()
        return (
            f"<{type(self).__name__} watches={stats.watches} timers={stats.timers} "
            f"pending_frees={stats.pending_frees}>"
        )

    def register(self) -> virEventAsyncIOImpl:
        """Register with libvirt (once per process) and bind the loop; returns self.

        The loop is the one given to the constructor, else the running loop.
        With neither, the implementation binds to the first loop that it sees
        running (a hook called on its thread, or any aiovirtstream call).
        """
        impl = self.event_impl
        loop = self._requested_loop
        running = asyncio._get_running_loop()
        if loop is not None and running is not None and loop is not running:
            impl.bind_ahead(loop)  # raises EventLoopError, before registering
        with _lock:
            if not impl.registered_with_libvirt:
                register_event_impl()
            else:
                register = libvirt.virEventRegisterImpl
                if register is not _LIBVIRT_REGISTER:
                    register(
                        impl.add_handle,
                        impl.update_handle,
                        impl.remove_handle,
                        impl.add_timeout,
                        impl.update_timeout,
                        impl.remove_timeout,
                    )
        if loop is not None:
            impl.bind_ahead(loop)
        elif running is not None:
            impl.bind(running)
        return self

    def is_idle(self) -> bool:
        """True when libvirt has no handle watch or timer left and every free has run."""
        return self.event_impl.is_idle()

    async def drain(self) -> None:
        """Wait until :meth:`is_idle` (call it on the bound loop)."""
        await self.event_impl.wait_idle()


_lock = threading.Lock()
_current: virEventAsyncIOImpl | None = None


def getCurrentImpl() -> virEventAsyncIOImpl | None:  # noqa: N802 (libvirtaio's name)
    """The implementation registered last, or None if none is registered.

    An implementation registered by aiovirtstream itself (``connect()``,
    ``register_event_impl()``) counts.
    """
    global _current
    if _current is None and get_event_impl().registered_with_libvirt:
        with _lock:
            if _current is None:
                _current = virEventAsyncIOImpl()
    return _current


def virEventRegisterAsyncIOImpl(  # noqa: N802 (libvirtaio's name)
    loop: asyncio.AbstractEventLoop | None = None,
) -> virEventAsyncIOImpl:
    """Have libvirt's events dispatched on ``loop`` (default: the running loop).

    Registers aiovirtstream's implementation with libvirt once per process;
    later calls return an implementation bound to the new loop. Returns it
    (libvirtaio's return value, which may be discarded).
    """
    global _current
    current = virEventAsyncIOImpl(loop).register()
    _current = current
    return current
