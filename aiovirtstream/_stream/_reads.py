"""A stream's receiving side: NONBLOCK recvs on the loop's thread, -2 and -3 handled.

A NONBLOCK ``recv`` only copies from libvirt's queue and answers -2 when it
is empty (``virNetClientStreamRecvPacket`` in src/rpc/virnetclientstream.c),
so reading never blocks the loop; -3 means a hole is next (sparse streams).
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

    def take_pending(self) -> bytes | None:
        pending, self._pending = self._pending, None
        return pending

    async def read(self, max_bytes: int, stop_at_hole: bool) -> StreamItem:
        pending = self._pending
        if pending is not None:
            self._pending = pending[max_bytes:] or None
            return pending[:max_bytes]
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
