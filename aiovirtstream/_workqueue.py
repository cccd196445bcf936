"""A bounded queue drained in order, a share at a time, on a runner.

It carries a stream's outgoing data to libvirt's blocking ``send`` (on the
connection's runner) and downloaded data to the disk (write-behind, on the
shared pool). Producers are coroutines on the loop (:meth:`WorkQueue.put`).
The loop is woken only when a coroutine waits: a busy transfer costs no
wake-up per item. A drain job handles at most ``quantum`` items and then
queues itself again, so the queues that share a runner take turns.
"""

from __future__ import annotations

__all__ = ["WorkQueue", "WOULD_BLOCK"]

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ._exceptions import detach_traceback
from ._workers import Runner

T = TypeVar("T")

#: What ``process`` returns when the sink is full (a local stream's -2):
#: draining pauses until :meth:`WorkQueue.resume`.
WOULD_BLOCK = -2
#: Items a drain job handles before the other queues of its runner get a turn.
DEFAULT_QUANTUM = 8


def _close(source: Iterator[object] | None) -> None:
    """Close a dropped iterator (a generator's ``finally`` runs now, in this thread)."""
    close = getattr(source, "close", None)
    if close is not None:
        close()


def _released(_item: object) -> int:
    raise RuntimeError("this queue was released")


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class WorkQueue(Generic[T]):
    """Items of a weight, processed one by one, in order, in a worker thread.

    ``process(item)`` returns how much of the item it consumed: its weight
    (or ``None``) for all of it, less to be called again with
    ``split(item, consumed)``, or :data:`WOULD_BLOCK`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        process: Callable[[T], int | None],
        weight: Callable[[T], int],
        *,
        limit: int,
        split: Callable[[T, int], T] | None = None,
        on_would_block: Callable[[], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        runner: Runner,
        quantum: int = DEFAULT_QUANTUM,
    ) -> None:
        self._loop = loop
        self._runner = runner
        self._quantum = quantum
        self._process = process
        self._weight = weight
        self._split = split
        self._on_would_block = on_would_block
        self._on_error = on_error
        self._limit = limit
        self._lock = threading.Lock()
        self._queue: deque[T] = deque()
        self._queued = 0
        self._running = False
        self._paused = False
        self._stopped = False
        self._source: Iterator[T] | None = None
        self.error: BaseException | None = None
        self._room_waiter: asyncio.Future[None] | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` or :meth:`release` was called."""
        return self._stopped

    def has_room(self) -> bool:
        return self._queued < self._limit

    @property
    def busy(self) -> bool:
        """True while items are queued or being processed."""
        return self._running or bool(self._queue)

    # -- producers

    async def put(self, item: T) -> None:
        """Queue ``item`` from the loop, waiting while the queue is full."""
        while True:
            with self._lock:
                if self.error is not None or self._stopped:
                    return  # the caller checks .error / its own state
                if self._queued < self._limit:
                    self._append_locked(item)
                    return
                waiter = self._room_waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._room_waiter = None

    def put_nowait(self, item: T) -> bool:
        """Queue ``item`` from the loop whatever the limit (the caller bounds its items).

        False if the queue failed or stopped.
        """
        with self._lock:
            if self.error is not None or self._stopped:
                return False
            self._append_locked(item)
            return True

    def feed(self, source: Iterator[T]) -> None:
        """Pull items from ``source`` once the queue is empty, on the runner.

        For producers that block anyway (reading a file): their work is done
        by the runner, a share at a time, with no hand-off per item. An error
        ``source`` raises ends the queue like a failed item.
        """
        with self._lock:
            if self.error is not None or self._stopped:
                return
            self._source = source
            if not self._running and not self._paused:
                self._running = True
                self._runner.submit(self._drain)

    def _append_locked(self, item: T) -> None:
        self._queue.append(item)
        self._queued += self._weight(item)
        if not self._running and not self._paused:
            self._running = True
            self._runner.submit(self._drain)

    async def join(self) -> None:
        """Wait until the queue is empty and nothing is being processed."""
        with self._lock:
            if not self._running and not self._queue:
                return
            waiter = self._loop.create_future()
            self._idle_waiters.append(waiter)
        await asyncio.shield(waiter)

    def release(self) -> None:
        """Forget the callables (they usually belong to the queue's owner: a cycle)."""
        with self._lock:
            self._stopped = True
            source = self._take_idle_source_locked()
            self._process = _released
            self._split = None
            self._on_would_block = None
            self._on_error = None
        _close(source)

    def stop(self) -> None:
        """Drop everything queued; the item being processed completes."""
        with self._lock:
            self._stopped = True
            source = self._take_idle_source_locked()
            self._queue.clear()
            self._queued = 0
            if not self._running:
                self._wake_idle_locked()
        _close(source)

    def _take_idle_source_locked(self) -> Iterator[T] | None:
        """The fed iterator, if no drain runs now (else the drain closes it)."""
        if self._running:
            return None
        source, self._source = self._source, None
        return source

    def resume(self) -> None:
        """Continue after :data:`WOULD_BLOCK` (the sink is ready again)."""
        with self._lock:
            self._paused = False
            if self._running or self._stopped or (not self._queue and self._source is None):
                return
            self._running = True
        self._runner.submit(self._drain)

    # -- the worker

    def _drain(self) -> None:
        dropped: Iterator[T] | None = None
        for _ in range(self._quantum):
            item: T | None = None
            with self._lock:
                source = None if self._queue else self._source
                if self._stopped:
                    # Nothing more is accepted: close what was fed first, then
                    # say the queue is idle (join() then means it is closed).
                    dropped, self._source = self._source, None
                    break
                if not self._queue and source is None:
                    self._running = False
                    self._wake_idle_locked()
                    return
                if source is None:
                    item = self._queue[0]
            try:
                if source is not None:
                    pulled = next(source, None)
                    with self._lock:
                        if pulled is None:
                            self._source = None
                            continue
                        item = pulled
                        self._queue.append(item)
                        self._queued += self._weight(item)
                assert item is not None
                consumed = self._process(item)
            except BaseException as error:  # noqa: BLE001 - handed to the loop
                with self._lock:
                    self.error = detach_traceback(error)
                    dropped, self._source = self._source, None
                    self._queue.clear()
                    self._queued = 0
                    self._wake_room_locked()
                    if self._on_error is not None:
                        self._call_in_loop(self._on_error, error)
                break
            with self._lock:
                if consumed == WOULD_BLOCK:
                    self._running = False
                    self._paused = True
                    if self._on_would_block is not None:
                        self._call_in_loop(self._on_would_block)
                    return
                if self._queue and self._queue[0] is item:
                    weight = self._weight(item)
                    if consumed is not None and 0 <= consumed < weight and self._split:
                        self._queue[0] = self._split(item, consumed)
                        self._queued -= consumed
                    else:
                        self._queue.popleft()
                        self._queued -= weight
                if self._queued <= self._limit // 2 or not self._queue:
                    self._wake_room_locked()
        else:
            self._runner.submit(self._drain)  # still _running: the others' turn first
            return
        try:
            _close(dropped)
        finally:
            with self._lock:
                self._running = False
                self._wake_idle_locked()

    def _wake_room_locked(self) -> None:
        if self._room_waiter is not None:
            self._call_in_loop(_resolve, self._room_waiter)

    def _wake_idle_locked(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            self._call_in_loop(_resolve, waiter)

    def _call_in_loop(self, callback: Callable[..., object], *args: object) -> None:
        if asyncio._get_running_loop() is self._loop:
            callback(*args)
            return
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more
