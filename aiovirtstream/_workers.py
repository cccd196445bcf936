"""A bounded queue drained in order by a worker thread.

It carries a stream's outgoing data to libvirt's blocking ``send`` (upload)
and downloaded data to the disk (write-behind). Producers are coroutines on
the loop (:meth:`WorkQueue.put`) or worker threads (:meth:`WorkQueue.put_blocking`,
used by read-ahead). The loop is woken only when a coroutine waits; a busy
transfer costs no wake-up per item. The drain job runs on a shared executor
and ends when the queue is empty, so no thread is started per transfer.
"""

from __future__ import annotations

__all__ = [
    "WorkQueue",
    "WOULD_BLOCK",
    "run_in_worker",
    "submit_to_worker",
    "run_to_the_end",
    "run_or_back_out",
    "wait_through_cancellation",
]

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from ._exceptions import detach_traceback

T = TypeVar("T")

#: What ``process`` returns when the sink is full (a local stream's -2):
#: draining pauses until :meth:`WorkQueue.resume`.
WOULD_BLOCK = -2

_executor = concurrent.futures.ThreadPoolExecutor(
    max_workers=256, thread_name_prefix="aiovirtstream-io"
)


class _Job(Generic[T]):
    """``func`` and the future it resolves; ``func`` is forgotten as soon as it
    returned, before the future is resolved."""

    __slots__ = ("_func", "_future")

    def __init__(self, func: Callable[[], T], future: concurrent.futures.Future[T]) -> None:
        self._func: Callable[[], T] | None = func
        self._future: concurrent.futures.Future[T] | None = future

    def __call__(self) -> None:
        func, self._func = self._func, None
        future, self._future = self._future, None
        assert func is not None and future is not None, "called twice"
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = func()
        except BaseException as error:  # noqa: BLE001 - handed to the future
            del func
            future.set_exception(error)
            # The error's traceback holds this frame: no cycle back to it.
            del future
        else:
            del func
            future.set_result(result)


def run_in_worker(func: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``func`` on the shared I/O executor (threads are reused across transfers).

    The executor's thread keeps its work item until some time after the
    item ran. A ``virstream.finish`` bound method held there kept the
    stream, and so the connection, open after ``aclose_connection`` on a
    loaded machine; so does a stream returned by ``func``, if the item's
    future holds it. The item holds neither: ``func`` is dropped once it
    returned, and the result goes to a future of our own.
    """
    return asyncio.wrap_future(submit_to_worker(func))


def submit_to_worker(func: Callable[[], T]) -> concurrent.futures.Future[T]:
    """:func:`run_in_worker` for a caller that is a thread: a plain future."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    _executor.submit(_Job(func, future))
    return future


async def wait_through_cancellation(
    future: asyncio.Future[T],
) -> asyncio.CancelledError | None:
    """Wait until ``future`` is done, even if the task is cancelled meanwhile.

    For calls that cannot be interrupted once started (a finish, a stream's
    start): returning early would leave them running unseen. Returns the
    cancellation that arrived meanwhile, if any: the caller must raise *that
    instance* after dealing with the result. A fresh ``CancelledError``
    would not carry the cancel scope's message, and anyio would then let it
    escape a ``fail_after`` or ``move_on_after`` that meant to catch it.
    """
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError as cancellation:
            if cancelled is None:
                cancelled = cancellation
        except BaseException:  # noqa: BLE001 - the future's own; the caller reads it
            break
    try:
        return cancelled
    finally:
        del cancelled  # its traceback holds this frame: no cycle back to it


async def run_to_the_end(func: Callable[[], T]) -> T:
    """:func:`run_in_worker`, and a cancellation waits for ``func`` to return first.

    anyio's shielded ``to_thread.run_sync`` does not hold back asyncio's own
    ``task.cancel()``: a cancelled ``Sandbox`` start cleaned up while its
    thread went on spawning libvirtd, and that daemon outlived the sandbox.
    """
    return await run_or_back_out(func, None)


async def run_or_back_out(func: Callable[[], T], back_out: Callable[[T], None] | None) -> T:
    """:func:`run_to_the_end` for a start that made something (a started stream,
    a temporary file): cancelled meanwhile, ``back_out(its result)`` runs in a
    worker before the cancellation is raised."""
    future = run_in_worker(func)
    if (cancelled := await wait_through_cancellation(future)) is not None:
        # Its traceback holds wait_through_cancellation's frame, whose f_back (Python 3.12+)
        # is this one: deleted on every way out (a back-out cancelled again included), else
        # a cycle holds it and what this frame holds.
        try:
            # Retrieved either way: the cancellation is what is raised.
            if not future.cancelled() and future.exception() is None and back_out is not None:
                result = future.result()
                await run_to_the_end(lambda: back_out(result))
            raise cancelled
        finally:
            del cancelled
    try:
        return future.result()
    finally:
        del future  # an error's traceback holds this frame: no cycle back to it


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
    ) -> None:
        self._loop = loop
        self._process = process
        self._weight = weight
        self._split = split
        self._on_would_block = on_would_block
        self._on_error = on_error
        self._limit = limit
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._queue: deque[T] = deque()
        self._queued = 0
        self._running = False
        self._paused = False
        self._stopped = False
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

    def put_blocking(self, item: T) -> bool:
        """Queue ``item`` from a worker thread; False if the queue failed or stopped."""
        with self._lock:
            while self._queued >= self._limit and self.error is None and not self._stopped:
                self._room.wait()
            if self.error is not None or self._stopped:
                return False
            self._append_locked(item)
            return True

    def _append_locked(self, item: T) -> None:
        self._queue.append(item)
        self._queued += self._weight(item)
        if not self._running and not self._paused:
            self._running = True
            _executor.submit(self._drain)

    async def join(self) -> None:
        """Wait until the queue is empty and nothing is being processed."""
        with self._lock:
            if not self._running and not self._queue:
                return
            waiter = self._loop.create_future()
            self._idle_waiters.append(waiter)
        await asyncio.shield(waiter)

    def wait_idle_blocking(self) -> None:
        """From a worker thread: wait until no item is being processed."""
        with self._lock:
            while self._running:
                self._room.wait()

    def release(self) -> None:
        """Forget the callables (they usually belong to the queue's owner: a cycle)."""
        with self._lock:
            self._stopped = True
            self._process = _released
            self._split = None
            self._on_would_block = None
            self._on_error = None

    def stop(self) -> None:
        """Drop everything queued; the item being processed completes."""
        with self._lock:
            self._stopped = True
            self._queue.clear()
            self._queued = 0
            self._room.notify_all()
            if not self._running:
                self._wake_idle_locked()

    def resume(self) -> None:
        """Continue after :data:`WOULD_BLOCK` (the sink is ready again)."""
        with self._lock:
            self._paused = False
            if self._running or not self._queue or self._stopped:
                return
            self._running = True
        _executor.submit(self._drain)

    # -- the worker

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue or self._stopped:
                    self._running = False
                    self._room.notify_all()  # wakes wait_idle_blocking() too
                    self._wake_idle_locked()
                    return
                item = self._queue[0]
            try:
                consumed = self._process(item)
            except BaseException as error:  # noqa: BLE001 - handed to the loop
                with self._lock:
                    self.error = detach_traceback(error)
                    self._queue.clear()
                    self._queued = 0
                    self._running = False
                    self._room.notify_all()
                    self._wake_room_locked()
                    self._wake_idle_locked()
                    if self._on_error is not None:
                        self._call_in_loop(self._on_error, error)
                return
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
                if self._queued < self._limit:
                    self._room.notify()
                    if self._queued <= self._limit // 2 or not self._queue:
                        self._wake_room_locked()

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
