"""A stream's sending side: libvirt's ``send`` on the connection's runner.

A remote ``virStreamSend`` blocks until the packet is on the socket
(``virNetClientStreamSendPacket`` in libvirt's src/rpc/virnetclientstream.c),
so it never runs on the loop's thread. The streams of one connection share
its runner and take turns, a few packets each.
"""

from __future__ import annotations

__all__ = ["StreamSender"]

import asyncio
from collections.abc import Callable, Iterator

import libvirt

from .._workers import Runner
from .._workqueue import WorkQueue
from ._items import Hole, StreamItem

#: A hole costs the queue a few bytes, not its length.
_HOLE_WEIGHT = 64


def _weight(item: StreamItem) -> int:
    return _HOLE_WEIGHT if isinstance(item, Hole) else len(item)


def _split(item: StreamItem, consumed: int) -> StreamItem:
    assert isinstance(item, (bytes, memoryview)), "holes are sent whole"
    return item[consumed:]


class StreamSender:
    """Sends a stream's data and holes, in order, counting what libvirt took.

    Coroutines queue items (:meth:`put`, bounded by ``limit`` bytes); a
    producer that blocks anyway (an upload reading its file) hands over an
    iterator (:meth:`feed`) that the runner pulls from, with no hand-off per
    packet. A local stream that would block is resumed by its WRITABLE event.
    """

    def __init__(
        self,
        virstream: libvirt.virStream,
        loop: asyncio.AbstractEventLoop,
        *,
        runner: Runner,
        limit: int,
        on_would_block: Callable[[], None],
    ) -> None:
        self._virstream = virstream
        self._queue: WorkQueue[StreamItem] = WorkQueue(
            loop,
            self._send_item,
            _weight,
            limit=limit,
            split=_split,
            on_would_block=on_would_block,
            runner=runner,
        )
        #: Bytes of data and of holes handed to libvirt so far.
        self.bytes_sent = 0
        self.hole_bytes_sent = 0

    def _send_item(self, item: StreamItem) -> int:
        """Send one item (runner thread); a local stream may answer -2 (would block)."""
        if isinstance(item, Hole):
            self._virstream.sendHole(item.length, 0)
            self.hole_bytes_sent += item.length
            return _HOLE_WEIGHT
        sent: int = self._virstream.send(item)
        if sent > 0:
            self.bytes_sent += sent
        return sent

    @property
    def error(self) -> BaseException | None:
        """Why sending stopped: libvirt's error, or what a fed iterator raised."""
        return self._queue.error

    @property
    def stopped(self) -> bool:
        """Whether the stream was stopped (aborted, or its sending failed)."""
        return self._queue.stopped or self._queue.error is not None

    async def put(self, item: StreamItem) -> None:
        """Queue ``item``; waits while the queue is full."""
        await self._queue.put(item)

    def feed(self, items: Iterator[StreamItem]) -> None:
        """Send every item of ``items``, pulled on the runner once the queue is empty."""
        self._queue.feed(items)

    async def join(self) -> None:
        """Wait until everything queued or fed was handed to libvirt (or sending failed)."""
        await self._queue.join()

    def resume(self) -> None:
        """The stream is writable again: go on sending (after a would-block)."""
        self._queue.resume()

    def stop(self) -> None:
        """Drop what is queued; the send under way completes."""
        self._queue.stop()

    def release(self) -> None:
        """The stream is over: forget the queue's items, iterator and callbacks."""
        self._queue.release()
