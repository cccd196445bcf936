"""A stream's writing side: one writer at a time, its data queued for the sender.

Coroutines queue data and holes for the :class:`StreamSender`, which sends
them on the connection's runner; a write interrupted after part of its data
was queued leaves the stream unable to take more (its bytes would be out of
order).
"""

from __future__ import annotations

__all__ = ["Writes"]

import asyncio
from collections.abc import Iterator

import libvirt

from .._exceptions import SparseNotSupportedError, StreamBrokenError, StreamBusyError
from .._workers import wait_through_cancellation
from ._items import MAX_CHUNK, Hole, StreamItem
from ._life import StreamLife
from ._sender import StreamSender


class Writes:
    """What one stream was asked to send, checked and queued, one writer at a time."""

    def __init__(
        self, sender: StreamSender, life: StreamLife, *, sparse: bool, description: str
    ) -> None:
        self._sender = sender
        self._life = life
        self._sparse = sparse
        self._description = description
        self._busy = False
        self._broken: str | None = None  # why nothing more can be written

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` in packets of at most :data:`MAX_CHUNK` bytes."""
        self._begin("write")
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else None
        total = len(data) if view is None else view.nbytes
        queued_any = False
        try:
            for start in range(0, total, MAX_CHUNK):
                if view is None:
                    chunk = data if total <= MAX_CHUNK else data[start : start + MAX_CHUNK]
                else:
                    chunk = view[start : start + MAX_CHUNK].tobytes()
                await self._sender.put(chunk)  # type: ignore[arg-type]
                queued_any = True
                self._life.check_open("write")
                self.raise_send_error()
        except BaseException:
            if queued_any:
                self._broken = "a write was interrupted after queueing part of its data"
            raise
        finally:
            self._busy = False

    async def send_hole(self, length: int) -> None:
        """Queue a hole of ``length`` bytes (sparse streams only; 0 queues nothing)."""
        if length < 0:
            raise ValueError("a hole's length cannot be negative")
        if not self._sparse:
            raise SparseNotSupportedError(
                f"the {self._description} was not opened sparse: it cannot carry holes; "
                "open it with sparse=True"
            )
        self._ready("send a hole")
        if length == 0:
            return
        self._claim()
        try:
            await self._sender.put(Hole(length))
            self._life.check_open("send a hole")
            self.raise_send_error()
        finally:
            self._busy = False

    async def send_all(self, items: Iterator[StreamItem]) -> None:
        """Hand ``items`` to the sender and wait until all were sent (see
        :meth:`AsyncStream.send_all`); cancelled, stop the sending first."""
        self._begin("send")
        try:
            self._sender.feed(items)
            await self._sender.join()
        except BaseException:
            self._sender.stop()
            # The runner closes ``items`` (an open file) once the send under
            # way returned: nothing is left open when this raises.
            await wait_through_cancellation(asyncio.ensure_future(self._sender.join()))
            raise
        finally:
            self._busy = False
        self._life.check_open("send")
        error = self._sender.error
        if error is not None and not isinstance(error, libvirt.libvirtError):
            self._broken = f"sending stopped: {error}"
            raise error
        self.raise_send_error()

    async def flush(self) -> None:
        """Wait until everything queued was handed to libvirt."""
        self._life.check_open("flush")
        await self._sender.join()
        self.check()

    def check(self) -> None:
        """Raise :class:`StreamBrokenError` if nothing more can be written."""
        self.raise_send_error()
        if self._broken:
            raise StreamBrokenError(f"cannot write: {self._broken}")

    def raise_send_error(self) -> None:
        """Raise the sender's error, marking the stream broken by it."""
        error = self._sender.error
        if error is not None:
            raise self._life.mark_broken(error) from error

    def _begin(self, what: str) -> None:
        self._ready(what)
        self._claim()

    def _ready(self, what: str) -> None:
        self._life.check_open(what)
        self.check()

    def _claim(self) -> None:
        if self._busy:
            raise StreamBusyError("writing to")
        self._busy = True
