"""The pump of one stream while it runs: started, stepped from the stream's events, resumed."""

from __future__ import annotations

__all__ = ["Pumping"]

import asyncio
import weakref
from collections.abc import Callable

from ._items import ReceiveSink
from ._life import StreamLife
from ._pump import Pump
from ._reads import Reads
from ._subscription import EventSubscription


class Pumping:
    """Runs :meth:`AsyncStream.pump` for one stream: one pump at a time (loop thread)."""

    def __init__(
        self,
        reads: Reads,
        events: EventSubscription,
        life: StreamLife,
        socket: int | None,
        resubscribe: Callable[[], None],
    ) -> None:
        self._reads = reads
        self._events = events
        self._life = life
        self._socket = socket
        # Weakly: the stream holds this object (no reference cycle through it).
        self._resubscribe = weakref.WeakMethod(resubscribe)
        self._pump: Pump | None = None

    @property
    def wants_events(self) -> bool:
        """True while a pump runs with room in its sink."""
        pump = self._pump
        return pump is not None and not pump.paused and not pump.done.done()

    async def run(self, sink: ReceiveSink, stop_at_hole: bool) -> None:
        """Receive into ``sink`` up to the end of the stream (see :meth:`AsyncStream.pump`)."""
        finish_reading = self._reads.begin(stop_at_hole)
        pump = self._pump = Pump(
            sink,
            self._reads.receiver,
            stop_at_hole,
            asyncio.get_running_loop().create_future(),
            events=self._events,
            broken=self._life.mark_broken,
            socket=self._socket,
        )
        try:
            self._reads.hand_over(pump)
            if self._reads.eof and not pump.done.done():
                pump.done.set_result(None)
            self.step()  # what is queued already; events bring the rest
            self._restate()
            await pump.done
        finally:
            self._pump = None
            finish_reading()
            if not pump.done.done():
                pump.done.cancel()
            self._restate()
            del pump  # the future holds the error, whose traceback holds this frame

    def resume(self) -> None:
        """The sink has room again."""
        pump = self._pump
        if pump is None or not pump.paused:
            return
        pump.paused = False
        self.step()
        self._restate()

    def step(self) -> None:
        """Receive what libvirt has queued (the stream's READABLE event)."""
        pump = self._pump
        if pump is None or pump.paused or pump.done.done():
            return
        if not self._events.active:  # finished or aborted meanwhile
            pump.done.set_exception(self._life.closed_error("read"))
            return
        pump.step()
        if pump.ended:
            self._reads.eof = True
        self._restate()

    def fail(self, error: BaseException) -> None:
        """End the running pump with ``error`` (the stream ended under it)."""
        pump = self._pump
        if pump is not None and not pump.done.done():
            pump.done.set_exception(error)

    def _restate(self) -> None:
        resubscribe = self._resubscribe()
        if resubscribe is not None:
            resubscribe()
