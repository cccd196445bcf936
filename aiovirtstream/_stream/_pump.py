"""Receiving a stream into a sink from inside its READABLE events, on the loop's thread.

No coroutine wakes per packet: each event receives a few packets straight
into the sink's buffers (:meth:`AsyncStream.pump`).
"""

from __future__ import annotations

__all__ = ["Pump", "PUMP_BURST"]

import asyncio
from collections.abc import Callable

import libvirt

from .._events import get_event_impl
from .._exceptions import StreamBrokenError, StreamBusyError, detach_traceback
from ._items import ReceiveSink
from ._native import Receiver
from ._subscription import EventSubscription

#: recv calls one stream event may make before it lets the loop run (a
#: longer burst raises the loop's lag).
PUMP_BURST = 4
#: recv calls all the pumps of a loop may make in one pass of the loop: with
#: many streams ready at once, the others wait for the next pass.
LOOP_SLICE = 16


class _Slice:
    """The recv calls made in the current pass of one loop, and the sockets held
    until the next: libvirt would go on reading them into its unbounded queues
    for the streams that wait."""

    __slots__ = ("loop", "used", "resetting", "held")

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.used = 0
        self.resetting = False
        self.held: set[int] = set()

    def take(self, loop: asyncio.AbstractEventLoop) -> int:
        """How many recv calls this pump may make now (0: wait for the next pass)."""
        if self.loop is not loop:  # another loop: the last one's pass will not end
            self._reset()
            self.loop = loop
        if not self.resetting:
            # Handles scheduled now run in the next pass, before the streams
            # whose events are re-armed after this one.
            loop.call_soon(self._reset)
            self.resetting = True
        left = LOOP_SLICE - self.used
        return min(PUMP_BURST, left) if left > 0 else 0

    def hold(self, socket: int) -> None:
        """Do not read ``socket`` until the next pass (its stream waits for it)."""
        if socket not in self.held:
            self.held.add(socket)
            get_event_impl().pause_reading(socket)

    def _reset(self) -> None:
        self.used = 0
        self.resetting = False
        held, self.held = self.held, set()
        for socket in held:
            get_event_impl().resume_reading(socket)


_slice = _Slice()


class Pump:
    """One :meth:`AsyncStream.pump`: its sink, and how far it got.

    ``done`` is resolved at end of stream, or fails with what broke it:
    libvirt's error as ``broken(error)`` maps it, or what the sink raised.
    """

    def __init__(
        self,
        sink: ReceiveSink,
        receiver: Receiver,
        stop_at_hole: bool,
        done: asyncio.Future[None],
        *,
        events: EventSubscription,
        broken: Callable[[BaseException], StreamBrokenError],
        socket: int | None = None,
    ) -> None:
        self.sink = sink
        self.receiver = receiver
        self.stop_at_hole = stop_at_hole
        self.done = done
        self._events = events
        self._broken = broken
        self._socket = socket  # the connection's (None: not known)
        #: The sink has no room: receiving waits for ``AsyncStream.resume_pump``.
        self.paused = False
        #: End of stream reached.
        self.ended = False

    def feed(self, data: bytes) -> None:
        """Put data received before the pump started (kept by ``recv_hole``) first."""
        while data:
            target = self.sink.buffer()
            if target is None:
                raise StreamBusyError("pumping (the sink has no room for data kept by recv_hole)")
            buffer, offset, room = target
            take = min(room, len(data))
            memoryview(buffer).cast("B")[offset : offset + take] = data[:take]
            self.sink.received(take)
            data = data[take:]

    def step(self) -> None:
        """Receive what libvirt has queued, up to :data:`PUMP_BURST` calls (loop thread)."""
        if self.paused or self.done.done():
            return
        calls = _slice.take(self.done.get_loop())
        if not calls:
            if self._socket is not None:
                _slice.hold(self._socket)
            return  # libvirt's 0 ms timer brings this stream's event again next pass
        sink, receiver, stop_at_hole = self.sink, self.receiver, self.stop_at_hole
        after_data = False  # the last call of this step received data
        try:
            for _ in range(calls):
                _slice.used += 1
                target = sink.buffer()
                if target is None:
                    self.paused = True
                    return
                buffer, offset, room = target
                result = receiver.recv_into(buffer, offset, room, stop_at_hole)
                if result > 0:
                    sink.received(result)
                    if result < room:
                        # libvirt's recv copies from every queued packet until
                        # it has room bytes: a short one emptied the queue (or
                        # stopped at a hole, whose packet re-arms the event).
                        return
                    after_data = True
                elif result == -2:
                    # libvirt leaves the stream's 0 ms timer enabled when a
                    # recv finds the queue empty (that path skips its timer
                    # update, virNetClientStreamRecvPacket in
                    # src/rpc/virnetclientstream.c). Re-stating our events
                    # re-evaluates it; not needed right after a recv that got
                    # data, which updated the timer.
                    if not after_data:
                        self._events.restate()
                    return
                elif result == 0:
                    self.ended = True
                    self.done.set_result(None)
                    return
                elif result == -3:
                    length = receiver.recv_hole()
                    if length:
                        sink.hole(length)
                    after_data = False
                else:
                    raise self._broken(RuntimeError(f"virStreamRecv returned {result}"))
            # Burst used up: libvirt's 0 ms timer fires again next iteration.
        except libvirt.libvirtError as error:
            broken = self._broken(error)
            broken.__cause__ = detach_traceback(error)
            self.done.set_exception(broken)
        except Exception as error:  # the sink's: pump() raises it
            self.done.set_exception(detach_traceback(error))
