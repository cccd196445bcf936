"""A bounded queue between a stream's pump and a consumer, with socket backpressure.

For the transfers that hand what they receive to something that may be
slower than the daemon: a copy's destination, a download's byte stream.
"""

from __future__ import annotations

__all__ = ["Relay"]

import asyncio
from collections import deque
from collections.abc import Callable

from .._connection import connection_socket
from .._events import SocketHold
from .._stream import MAX_CHUNK, AsyncStream, Hole


class Relay:
    """A stream's pump sink, and the bounded queue from it to a consumer.

    Data is cut into pieces of :data:`MAX_CHUNK` bytes (shorter only before
    a hole and at the end): the daemon sends each 256 KiB it reads as two
    packets, of MAX_CHUNK and 24 bytes, which forwarded as they come would
    give the consumer twice as many pieces, half of them tiny. Pieces are
    queued ``batch`` at a time, at most ``max_items`` batches and holes.
    While the queue is full the pump stops and the source connection's
    socket is not served, since libvirt's client queues what it reads from
    a socket without limit.
    """

    def __init__(
        self,
        source: AsyncStream,
        check: Callable[[int], None],
        *,
        max_items: int,
        batch: int = 1,
    ) -> None:
        if max_items < 1 or batch < 1:
            raise ValueError("a relay holds at least one item of at least one piece")
        self._source = source
        self._check = check  # raises for a byte count past what may come
        self._max_items = max_items
        self._batch_size = batch
        self._buffer = bytearray(MAX_CHUNK)
        self._view = memoryview(self._buffer)
        self._filled = 0
        self._batch: list[bytes] = []
        self._queue: deque[list[bytes] | Hole] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._hold = SocketHold(connection_socket(source.virstream.connect()))
        self._full = False  # buffer() said so: the pump waits for resume_pump()
        self.count = 0  # bytes of data and holes received

    # -- the pump's side (loop thread, from inside the source's events)

    def buffer(self) -> tuple[bytearray, int, int] | None:
        if len(self._queue) >= self._max_items:
            self._full = True
            self._hold.hold()
            return None
        return self._buffer, self._filled, MAX_CHUNK - self._filled

    def received(self, nbytes: int) -> None:
        self._check(self.count + nbytes)
        self.count += nbytes
        self._filled += nbytes
        if self._filled == MAX_CHUNK:
            self._batch.append(bytes(self._buffer))
            self._filled = 0
            if len(self._batch) == self._batch_size:
                self._push(self._batch)
                self._batch = []

    def hole(self, length: int) -> None:
        self._check(self.count + length)
        self.count += length
        self.flush()
        self._push(Hole(length))

    def flush(self) -> None:
        """Queue the data received so far."""
        if self._filled:
            self._batch.append(bytes(self._view[: self._filled]))
            self._filled = 0
        if self._batch:
            self._push(self._batch)
            self._batch = []

    def end(self) -> None:
        """The source is complete: the writer ends once it took everything."""
        self.flush()
        self._ended = True
        self._wake()

    def _push(self, item: list[bytes] | Hole) -> None:
        self._queue.append(item)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the writer's side

    async def get(self) -> list[bytes] | Hole | None:
        """The next item; None at the end."""
        while not self._queue:
            if self._ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._queue.popleft()
        if self._full and len(self._queue) < self._max_items:
            self._full = False
            self.release()
            self._source.resume_pump()
        return item

    def release(self) -> None:
        """Serve the source's socket again."""
        self._hold.release()
