"""Write-behind for downloads: received data goes to disk in a worker thread.

The pump fills 256 KiB slots on the loop's thread; one writer per file
``pwrite``s them on the shared pool (with ``O_DIRECT`` when asked) and gives
them back. Why these sizes and threads: docs/internals.md, "Download".
"""

from __future__ import annotations

__all__ = [
    "WriteBehind",
    "WriteWorker",
]

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from .._exceptions import TransferError
from .._stream import Hole
from .._workers import shared_pool, wait_through_cancellation
from .._workqueue import WorkQueue
from ._filewriter import DIRECT_ALIGN, FileWriter
from ._slots import SLOT_SIZE, slot_pool

T = TypeVar("T")

#: Slots handed to the worker at once.
BATCH = 8
#: Batches a file's writer writes before other files' writers get a turn
#: on the shared pool.
WRITER_TURN = 2

_Item = tuple[memoryview, int, int] | Hole  # a slot, where its data begins and ends
_Batch = tuple["WriteBehind", list[_Item]]
_Job = Callable[[], None]  # WriteWorker.run_after_writes


def _write_batch(batch: _Batch | _Job) -> None:
    if callable(batch):
        batch()
        return
    sink, items = batch
    sink._write_batch(items)


def _batch_weight(batch: _Batch | _Job) -> int:
    return 1 if callable(batch) else len(batch[1])


class _RunInto(Generic[T]):
    """Runs ``func`` (in the worker) and resolves ``done`` with its result or error.

    Both are dropped once called: an error's traceback holds the frames that
    called it, and the queue's holds this job.
    """

    __slots__ = ("_func", "_done")

    def __init__(self, func: Callable[[], T], done: concurrent.futures.Future[T]) -> None:
        self._func: Callable[[], T] | None = func
        self._done: concurrent.futures.Future[T] | None = done

    def __call__(self) -> None:
        func, self._func = self._func, None
        done, self._done = self._done, None
        assert func is not None and done is not None, "called twice"
        try:
            done.set_result(func())
        except BaseException as error:  # noqa: BLE001 - handed to the loop
            done.set_exception(error)
            del done  # the error's traceback holds this frame: no cycle back to it


class WriteWorker:
    """The worker thread that writes one file for the write-behinds of a download.

    Batches are written in the order the write-behinds hand them over; the
    first failed write fails every write-behind that shares the worker (they
    write the same file).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: WorkQueue[_Batch | _Job] = WorkQueue(
            asyncio.get_running_loop(),
            _write_batch,
            _batch_weight,
            limit=1 << 62,  # each write-behind bounds its own slots
            on_error=self._failed,
            runner=shared_pool,
            quantum=WRITER_TURN,
        )
        self._sinks: list[WriteBehind] = []

    def attach(self, sink: WriteBehind) -> None:
        self._sinks.append(sink)

    def put(self, sink: WriteBehind, items: list[_Item]) -> None:
        """Queue a batch (loop thread); after a failure it is dropped (the error is raised)."""
        self._queue.put_nowait((sink, items))

    async def join(self) -> None:
        """Wait until everything queued so far is written (or the worker failed)."""
        await self._queue.join()

    def raise_error(self) -> None:
        """Raise :class:`TransferError` if a write failed."""
        error = self._queue.error
        if error is not None:
            raise TransferError(f"cannot write {self._name!r}: {error}") from error

    async def run_after_writes(self, func: Callable[[], T]) -> T:
        """Run ``func`` in the worker once everything queued so far is written.

        For the last steps of a download (truncate, close, rename), which
        would otherwise cost a thread hop each. Raises what ``func`` raised,
        or :class:`TransferError` if a write failed first (``func`` then does
        not run). Cancelled, it waits for ``func`` to return, then raises.
        """
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put_nowait(_RunInto(func, done))
        cancelled = await wait_through_cancellation(asyncio.ensure_future(self._queue.join()))
        if cancelled is not None:
            try:
                raise cancelled
            finally:
                del cancelled  # its traceback holds this frame: no cycle back to it
        self.raise_error()
        if not done.done():
            raise TransferError(f"the writes of {self._name!r} were abandoned")
        try:
            return done.result()
        finally:
            del done  # func's error holds this frame: no cycle back to it

    def close(self) -> None:
        """Forget the write-behinds once the download is over; their free slots
        go back to the pool (unless a write is still under way: then with them)."""
        if not self._queue.busy:
            for sink in self._sinks:
                sink.give_back_slots()
        self._sinks.clear()
        self._queue.release()

    def _failed(self, error: BaseException) -> None:
        for sink in self._sinks:
            sink._failed(error)


class WriteBehind:
    """The receive sink of a download: slots filled on the loop, written by a worker.

    ``pause`` and ``resume`` are called on the loop when the sink runs out
    of slots and when the worker gave some back; ``resume`` must restart
    the pump (:meth:`AsyncStream.resume_pump`). The streams of one download
    share a ``worker``, which also tells when everything is written
    (:meth:`WriteWorker.run_after_writes`).
    """

    def __init__(
        self,
        writer: FileWriter,
        *,
        limit: int,
        pause: Callable[[], None],
        resume: Callable[[], None],
        worker: WriteWorker,
    ) -> None:
        self.writer = writer
        self._loop = asyncio.get_running_loop()
        self._pause = pause
        self._resume = resume
        self._max_slots = max(limit // SLOT_SIZE, 2 * BATCH)
        self._account = slot_pool.open_account()  # slots drawn from the process's budget
        weakref.finalize(self, slot_pool.close_collected, self._account)
        self._lock = threading.Lock()
        self._free: list[memoryview] = []
        self._waiting = False  # out of slots: the worker wakes the loop when it frees some
        self._slot: memoryview | None = None
        self._begin = 0  # where the current slot's data begins
        self._fill = 0
        self._end = writer.end  # the file offset of the next byte received
        self._direct = writer.direct
        self._batch: list[_Item] = []
        self._abandoned = False
        self._worker = worker
        worker.attach(self)
        #: Bytes received into slots (the writer's counts say what is on disk).
        self.received_bytes = 0

    # -- the ReceiveSink side (loop thread)

    def buffer(self) -> tuple[memoryview, int, int] | None:
        self._worker.raise_error()
        slot = self._slot
        if slot is not None:
            return slot, self._fill, SLOT_SIZE - self._fill
        slot = self._take_slot()
        if slot is None:
            return None
        # For direct writes the data sits as far into the (page-aligned)
        # slot as its file offset lies past a block boundary.
        begin = self._end % DIRECT_ALIGN if self._direct else 0
        self._slot, self._begin, self._fill = slot, begin, begin
        return slot, begin, SLOT_SIZE - begin

    def received(self, nbytes: int) -> None:
        self.writer.check_room(self._end, nbytes, "data")  # at once, not at the size check
        self._fill += nbytes
        self._end += nbytes
        self.received_bytes += nbytes
        if self._fill >= SLOT_SIZE:
            self._push_slot()

    def hole(self, length: int) -> None:
        self.writer.check_room(self._end, length, "a hole")
        self._push_slot()
        self._end += length
        self._batch.append(Hole(length))
        if len(self._batch) >= BATCH:
            self._flush()

    def _take_slot(self) -> memoryview | None:
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._account.held < min(self._max_slots, slot_pool.share()):
                slot = slot_pool.take(self._account)
                if slot is not None:
                    return slot
        # Out of slots (its share, or the process's budget): the worker has to
        # give some back first.
        self._flush()
        with self._lock:
            if self._free:
                return self._free.pop()
            self._waiting = True
        self._pause()
        return None

    def _push_slot(self) -> None:
        slot, self._slot = self._slot, None
        if slot is None:
            return
        if self._fill > self._begin:
            self._batch.append((slot, self._begin, self._fill))
        else:
            with self._lock:
                self._free.append(slot)
        if len(self._batch) >= BATCH:
            self._flush()

    def flush(self) -> None:
        """Hand everything received so far to the worker (the stream has ended)."""
        self._push_slot()
        self._flush()

    def _flush(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._worker.put(self, batch)

    # -- the worker

    def _write_batch(self, batch: list[_Item]) -> None:
        writer = self.writer
        done: list[memoryview] = []
        blocks: list[memoryview] = []  # full slots in a row, for one direct write

        def write_blocks() -> None:
            writer.write_blocks(blocks)
            done.extend(blocks)
            blocks.clear()

        try:
            for item in batch:
                if self._abandoned:
                    break
                if isinstance(item, Hole):
                    write_blocks()
                    writer.hole(item.length)
                    continue
                slot, begin, end = item
                if self._direct and begin == 0 and end == SLOT_SIZE:
                    blocks.append(slot)
                    continue
                write_blocks()
                writer.write(slot[begin:end], aligned=self._direct)
                done.append(slot)
            if not self._abandoned:
                write_blocks()
        finally:
            with self._lock:
                self._free.extend(done)
                # More than its share now that other downloads started: the
                # excess goes back to the pool.
                excess = min(len(self._free), self._account.held - slot_pool.share())
                extra = [self._free.pop() for _ in range(excess)] if excess > 0 else []
                wake = self._waiting and bool(self._free)
                if wake:
                    self._waiting = False
            if extra:
                slot_pool.give_back(extra, self._account)
            if wake:
                self._call_in_loop(self._resume)

    def _call_in_loop(self, callback: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:
            pass  # the loop closed: nobody waits any more

    def _failed(self, error: BaseException) -> None:
        # Wake a pump waiting for slots: its next buffer() raises the error.
        with self._lock:
            waiting, self._waiting = self._waiting, False
        if waiting:
            self._resume()

    # -- the end

    def give_back_slots(self) -> None:
        """Return the free slots to the process's pool, for the next download."""
        with self._lock:
            free, self._free = self._free, []
        slot_pool.give_back(free, self._account)
        slot_pool.close_account(self._account)

    async def abandon(self) -> None:
        """Drop what is not written yet and wait for the write under way."""
        self._slot = None
        self._batch = []
        self._abandoned = True  # the worker skips this write-behind's batches
        await self._worker.join()
