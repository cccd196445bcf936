"""A stream's receiving side: NONBLOCK recvs on the loop's thread, -2 and -3 handled.

A NONBLOCK ``recv`` only copies from libvirt's queue and answers -2 when it
is empty (``virNetClientStreamRecvPacket`` in src/rpc/virnetclientstream.c),
so reading never blocks the loop; -3 means a hole is next (sparse streams).
Between reads, what arrives waits in a bounded :class:`ReadAhead`.
"""

from __future__ import annotations

__all__ = ["Reads"]

import contextlib
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import libvirt

from .._exceptions import SparseNotSupportedError, StreamBusyError
from ._items import Hole, StreamItem
from ._life import StreamLife
from ._native import Buffer, Receiver, receiver_for
from ._pump import Pump
from ._readahead import ReadAhead

_R = TypeVar("_R")


class Reads:
    """What one stream has received: data kept back, the end, one reader at a time."""

    def __init__(
        self,
        virstream: libvirt.virStream,
        life: StreamLife,
        wait_readable: Callable[[], Awaitable[None]],
        *,
        sparse: bool,
        socket: int | None,
    ) -> None:
        self._virstream = virstream
        self._life = life
        # Weakly: the stream holds this object (no reference cycle through it).
        self._wait_readable = weakref.WeakMethod(wait_readable)
        self._sparse = sparse
        self._receiver: Receiver | None = None
        self._pending: bytes | None = None  # data pushed back by recv_hole()
        self._busy = False
        #: End of stream reached.
        self.eof = False
        #: What arrived between the reader's reads.
        self.ahead = ReadAhead(virstream, sparse=sparse, socket=socket)

    @property
    def receiver(self) -> Receiver:
        """libvirt's recv straight into a buffer (made on first use)."""
        if self._receiver is None:
            self._receiver = receiver_for(self._virstream)
        return self._receiver

    def begin(self, stop_at_hole: bool) -> Callable[[], None]:
        """Check that a read may start; returns what ends it."""
        if stop_at_hole and not self._sparse:
            raise SparseNotSupportedError(
                f"the {self._life.description} was not opened sparse: it has no holes to "
                "stop at; open it with sparse=True"
            )
        self._life.check_open("read")
        if self._busy:
            raise StreamBusyError("reading from")
        self._busy = True
        return self._end

    def _end(self) -> None:
        self._busy = False

    @contextlib.contextmanager
    def reading(self, stop_at_hole: bool) -> Iterator[None]:
        """One read at a time: :meth:`begin` to its end."""
        end = self.begin(stop_at_hole)
        try:
            yield
        finally:
            end()

    def keep(self, data: bytes) -> None:
        """Give ``data`` back: the next read starts with it."""
        self._pending = data

    def between_reads(self, read_waiter: object | None) -> bool:
        """True while a reader is between reads (no read, no pump, no ``read_waiter``):
        what arrives then goes to :attr:`ahead`."""
        return read_waiter is None and not self._busy and self.ahead.wants_data

    def hand_over(self, pump: Pump) -> None:
        """Give a pump that takes over what earlier reads left: kept data, then
        what arrived between reads; raises what libvirt raised after it."""
        if self._pending is not None:
            pump.feed(self._pending)
            self._pending = None
        ahead = self.ahead
        while ahead:
            item = ahead.take(1 << 62, stop_at_hole=True)
            if isinstance(item, Hole):
                pump.sink.hole(item.length)
            else:
                pump.feed(item)
        ahead.drop()
        self._after_ahead()

    def _after_ahead(self) -> None:
        """The read-ahead queue is empty: the end or libvirt's error it stopped at."""
        ahead = self.ahead
        if ahead.ended:
            self.eof = True
        if ahead.error is not None:
            error, ahead.error = ahead.error, None
            raise self._life.mark_broken(error) from error

    async def read(self, max_bytes: int, stop_at_hole: bool) -> StreamItem:
        pending = self._pending
        if pending is not None:
            self._pending = pending[max_bytes:] or None
            return pending[:max_bytes]
        ahead = self.ahead
        ahead.start()
        if ahead:
            return ahead.take(max_bytes, stop_at_hole)
        self._after_ahead()
        if self.eof:
            return b""
        st = self._virstream
        flags = libvirt.VIR_STREAM_RECV_STOP_AT_HOLE if stop_at_hole else 0
        result = await self._receive(
            lambda: st.recvFlags(max_bytes, flags) if flags else st.recv(max_bytes)
        )
        if result == b"":
            self.eof = True
        return result

    async def read_into(self, buffer: Buffer, size: int, stop_at_hole: bool) -> int | Hole:
        pending = self._pending
        if pending is not None:
            take = min(size, len(pending))
            memoryview(buffer).cast("B")[:take] = pending[:take]
            self._pending = pending[take:] or None
            return take
        ahead = self.ahead
        ahead.start()
        if ahead:
            item = ahead.take(size, stop_at_hole)
            if isinstance(item, Hole):
                return item
            memoryview(buffer).cast("B")[: len(item)] = item
            return len(item)
        self._after_ahead()
        if self.eof:
            return 0
        receiver = self.receiver
        result = await self._receive(lambda: receiver.recv_into(buffer, 0, size, stop_at_hole))
        if result == 0:
            self.eof = True
        return result

    async def _receive(self, attempt: Callable[[], _R]) -> _R | Hole:
        """Call ``attempt`` (a recv) until it gives data, a hole or the end.

        -2 waits for READABLE, -3 is turned into a :class:`Hole` (zero-length
        ones are skipped); libvirt's errors break the stream.
        """
        while True:
            try:
                result = attempt()
                if result == -3:
                    length = self.receiver.recv_hole()
                    if length:
                        return Hole(length)
                    continue
            except libvirt.libvirtError as error:
                raise self._life.mark_broken(error) from error
            if result == -2:
                wait_readable = self._wait_readable()
                if wait_readable is None:
                    raise self._life.closed_error("read")  # the stream is gone
                await wait_readable()
                del wait_readable
                self._life.check_open("read")
                continue
            if isinstance(result, int) and result < 0:
                raise self._life.mark_broken(RuntimeError(f"virStreamRecv returned {result}"))
            return result
