"""A stream's sending side: libvirt's ``send`` from a worker thread, queued or direct.

A remote ``virStreamSend`` blocks until the packet is on the socket
(``virNetClientStreamSendPacket`` in libvirt's src/rpc/virnetclientstream.c),
so it never runs on the loop's thread.
"""

from __future__ import annotations

__all__ = ["StreamSender", "ThreadSend"]

import asyncio
from collections.abc import Callable

import libvirt

from .._workers import WorkQueue
from ._items import Hole, StreamItem

#: A hole costs the queue a few bytes, not its length.
_HOLE_WEIGHT = 64

#: What a producer in a worker thread calls to send one item: False once the
#: stream was stopped (the producer then returns).
ThreadSend = Callable[[StreamItem], bool]


def _weight(item: StreamItem) -> int:
    return _HOLE_WEIGHT if isinstance(item, Hole) else len(item)


def _split(item: StreamItem, consumed: int) -> StreamItem:
    assert isinstance(item, (bytes, memoryview)), "holes are sent whole"
    return item[consumed:]


class StreamSender:
    """Sends a stream's data and holes, counting what libvirt took.

    Coroutines queue items (:meth:`put`); a shared worker drains the bounded
    queue in order. A producer that runs in a worker thread already (an
    upload reading its file) sends directly with :meth:`send_from_thread`,
    which saves a hand-off per packet.
    """

    def __init__(
        self,
        virstream: libvirt.virStream,
        loop: asyncio.AbstractEventLoop,
        *,
        limit: int,
        on_would_block: Callable[[], None],
    ) -> None:
        self._virstream = virstream
        self._queue: WorkQueue[StreamItem] = WorkQueue(
            loop, self._send_item, _weight, limit=limit, split=_split, on_would_block=on_would_block
        )
        self._direct = True
        #: Bytes of data and of holes handed to libvirt so far.
        self.bytes_sent = 0
        self.hole_bytes_sent = 0

    def _send_item(self, item: StreamItem) -> int:
        """Send one item (worker thread); a local stream may answer -2 (would block)."""
        if isinstance(item, Hole):
            self._virstream.sendHole(item.length, 0)
            self.hole_bytes_sent += item.length
            return _HOLE_WEIGHT
        sent: int = self._virstream.send(item)
        if sent > 0:
            self.bytes_sent += sent
        return sent

    # ------------------------------------------------------------ loop side

    @property
    def error(self) -> BaseException | None:
        """The error of a failed send, if one failed."""
        return self._queue.error

    async def put(self, item: StreamItem) -> None:
        """Queue ``item``; waits while the queue is full."""
        await self._queue.put(item)

    async def join(self) -> None:
        """Wait until everything queued was handed to libvirt (or a send failed)."""
        await self._queue.join()

    def resume(self) -> None:
        """The stream is writable again: go on draining (after a would-block)."""
        self._queue.resume()

    def stop(self) -> None:
        """Drop what is queued, and make producers' sends return False."""
        self._queue.stop()

    def release(self) -> None:
        """The stream is over: forget the queue's items and waiters."""
        self._queue.release()

    def wait_idle_blocking(self) -> None:
        """Wait until no send is in flight (worker thread)."""
        self._queue.wait_idle_blocking()

    # ---------------------------------------------------------- thread side

    def send_from_thread(self, item: StreamItem) -> bool:
        """Send ``item`` from the calling worker thread; False once stopped.

        Sent directly while the stream takes whole items; a local stream that
        would block gets the rest through the queue, in order.
        """
        if self._queue.stopped:
            return False
        if self._direct:
            sent = self._send_item(item)
            if isinstance(item, Hole) or sent == len(item):
                return True
            self._direct = False  # a local stream that would block: queue the rest
            item = item[max(sent, 0) :]
        return self._queue.put_blocking(item)

    @property
    def stopped(self) -> bool:
        """Whether the stream was stopped (aborted, or its sending failed)."""
        return self._queue.stopped or self._queue.error is not None

    @property
    def sent_directly(self) -> bool:
        """Whether everything so far went out directly (nothing waits in the queue)."""
        return self._direct
