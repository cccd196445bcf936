"""A stream's libvirt event callback: added once, its events changed as needed, removed.

libvirt requires the callback gone before a stream is finished or aborted
(``virStreamEventRemoveCallback`` in src/libvirt-stream.c). Hooks run on
whatever thread libvirt dispatches from; events reach the owner on its loop.
"""

from __future__ import annotations

__all__ = ["EventSubscription", "READABLE", "WRITABLE", "ERROR"]

import asyncio
import weakref
from collections.abc import Callable
from typing import Any

import libvirt
import libvirtmod

from .._exceptions import EventLoopNotRegisteredError

READABLE: int = libvirt.VIR_STREAM_EVENT_READABLE
WRITABLE: int = libvirt.VIR_STREAM_EVENT_WRITABLE
ERROR: int = libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP


class EventSubscription:
    """Calls ``on_event(events)`` on ``loop`` for each event of ``virstream`` asked for.

    Holds ``on_event`` weakly: the subscription must not keep its owner
    alive (an unclosed stream must still be collectable, and warn).
    """

    def __init__(
        self,
        virstream: libvirt.virStream,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[int], None],
    ) -> None:
        self._virstream = virstream
        self._loop = loop
        self._on_event = weakref.WeakMethod(on_event)
        self._wanted = 0
        # Registered through libvirtmod with our own callback data: the remote
        # driver never calls the callback's free function, so the binding's
        # own data (which holds the stream) would leak with it. Ours is
        # cleared once the callback is removed, which breaks the cycle.
        self._data: dict[str, Any] | None = {
            "stream": virstream,
            "cb": _dispatch,
            "opaque": weakref.ref(self),
        }
        if libvirtmod.virStreamEventAddCallback(virstream._o, 0, self._data) == -1:
            self._data = None
            raise EventLoopNotRegisteredError(
                "libvirt refused to watch this stream: no event implementation serves its "
                "connection (none is registered, or it was registered after the connection "
                "was opened). Open it with aiovirtstream.connect(), or call "
                "aiovirtstream.register_event_impl() before libvirt.open()"
            )

    @property
    def active(self) -> bool:
        """True until :meth:`remove`."""
        return self._data is not None

    @property
    def wanted(self) -> int:
        """The events asked for now."""
        return self._wanted

    def want(self, events: int) -> None:
        """Ask for ``events`` only (stream events cost a loop pass each while asked for)."""
        if events != self._wanted and self._data is not None:
            libvirtmod.virStreamEventUpdateCallback(self._virstream._o, events)
            self._wanted = events

    def restate(self) -> None:
        """Ask for the same events again, which makes libvirt re-evaluate its timer."""
        if self._data is not None:
            libvirtmod.virStreamEventUpdateCallback(self._virstream._o, self._wanted)

    def remove(self) -> None:
        """Remove the callback (loop thread); idempotent."""
        if self._data is None:
            return
        libvirtmod.virStreamEventRemoveCallback(self._virstream._o)
        self._forget()

    def remove_from_thread(self) -> None:
        """Remove the callback from a worker thread, right before a finish there;
        :meth:`forget_removed` follows on the loop."""
        libvirtmod.virStreamEventRemoveCallback(self._virstream._o)

    def forget_removed(self) -> None:
        """The callback was removed by :meth:`remove_from_thread` (loop thread)."""
        self._forget()

    def _forget(self) -> None:
        if self._data is not None:
            self._data.clear()
            self._data = None
        self._wanted = 0

    def _deliver(self, events: int) -> None:
        on_event = self._on_event()
        if on_event is not None:
            on_event(events)

    def dispatch(self, events: int) -> None:
        """An event from libvirt (any thread): handled on the loop."""
        if asyncio._get_running_loop() is self._loop:
            self._deliver(events)
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, events)
        except RuntimeError:
            pass  # loop closed: nobody is waiting any more


def _dispatch(
    virstream: libvirt.virStream, events: int, ref: weakref.ref[EventSubscription]
) -> None:
    subscription = ref()
    if subscription is not None:
        subscription.dispatch(events)
