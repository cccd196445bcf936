"""A transfer's options, its progress reports and its result."""

from __future__ import annotations

__all__ = [
    "TransferProgress",
    "TransferResult",
    "ProgressCallback",
    "ProgressTarget",
    "TransferOptions",
    "ContentHasher",
    "ProgressReporter",
    "closing_progress",
]

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio.abc
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from .._stream import (
    Buffer,
)

logger = logging.getLogger(__name__)


_HASH_ZEROES = bytes(1024 * 1024)


@dataclass(frozen=True, slots=True)
class TransferProgress:
    """How far a transfer is: bytes of data and of holes so far, of ``total``."""

    data_bytes: int
    hole_bytes: int
    total: int | None

    @property
    def done_bytes(self) -> int:
        return self.data_bytes + self.hole_bytes


ProgressCallback = Callable[[TransferProgress], object]
"""A function called on the loop with each :class:`TransferProgress`."""


ProgressTarget = ProgressCallback | MemoryObjectSendStream[TransferProgress]
"""Where a transfer's progress goes (``progress=``): a :data:`ProgressCallback`,
or the send side of an anyio memory object stream
(``anyio.create_memory_object_stream``) whose receive side you ``async for``
over; the transfer closes it when it ends."""


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What a finished transfer moved, and how fast."""

    data_bytes: int
    hole_bytes: int
    seconds: float
    sha256: str | None = None

    @property
    def total_bytes(self) -> int:
        """Logical size transferred: data plus holes."""
        return self.data_bytes + self.hole_bytes

    @property
    def data_rate(self) -> float:
        """Data bytes per second."""
        return self.data_bytes / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True, slots=True)
class TransferOptions:
    """The caller's choices for one transfer."""

    sparse: bool
    offset: int
    length: int
    progress: ProgressTarget | None
    progress_interval: float
    checksum: bool
    detect_zeroes: bool = False
    parallel: int | None = 1
    direct_io: bool = False
    fsync: bool = False
    started: float = field(default_factory=time.perf_counter)

    def hasher(self) -> ContentHasher | None:
        return ContentHasher() if self.checksum else None

    def reporter(
        self, counts: Callable[[], tuple[int, int]], total: int | None
    ) -> ProgressReporter:
        return ProgressReporter(self.progress, counts, total, self.progress_interval)

    def result(self, data: int, holes: int, hasher: ContentHasher | None) -> TransferResult:
        return TransferResult(
            data, holes, time.perf_counter() - self.started, hasher.hexdigest() if hasher else None
        )


class ContentHasher:
    """SHA-256 of the logical content: holes count as zeroes."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def data(self, data: Buffer | bytes) -> None:
        self._hash.update(data)

    def hole(self, length: int) -> None:
        while length > 0:
            step = min(length, len(_HASH_ZEROES))
            self._hash.update(_HASH_ZEROES[:step])  # a whole slice is the same object
            length -= step

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class ProgressReporter:
    """Reports progress on the loop every ``interval`` seconds and once at the end.

    To a callback: called each time. To an object stream: the periodic
    snapshots are sent only if there is room (a slow reader sees fewer, and
    never holds the transfer up) and the final one waits for room;
    :func:`upload` and :func:`download` close the stream when they return or
    raise, so ``async for`` over its receiving side ends too.
    """

    def __init__(
        self,
        target: ProgressTarget | None,
        counts: Callable[[], tuple[int, int]],
        total: int | None,
        interval: float,
    ) -> None:
        self._target = target
        self._stream = target if isinstance(target, MemoryObjectSendStream) else None
        self._counts = counts
        self._total = total
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def _snapshot(self) -> TransferProgress:
        data, holes = self._counts()
        return TransferProgress(data, holes, self._total)

    def report(self) -> None:
        target = self._target
        if target is None:
            return
        if self._stream is not None:
            try:
                self._stream.send_nowait(self._snapshot())
            except anyio.WouldBlock:
                pass  # the reader is behind: it gets a later snapshot
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._target = None  # nobody listens any more
            return
        if not callable(target):
            return
        try:
            target(self._snapshot())
        except Exception:  # a progress display must not break the transfer
            logger.exception("the progress callback failed")

    async def final(self) -> None:
        """The last report, once the transfer is complete."""
        if self._stream is not None and self._target is not None:
            try:
                await self._stream.send(self._snapshot())
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._target = None
        else:
            self.report()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.report()

    async def __aenter__(self) -> ProgressReporter:
        if self._target is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Forgotten before it is cancelled: the task's CancelledError holds
        # _run's frame, which holds this reporter (a cycle if it held the task).
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        self._target = self._stream = None
        self._counts = _no_counts


def _no_counts() -> tuple[int, int]:
    return 0, 0


@contextlib.asynccontextmanager
async def closing_progress(progress: ProgressTarget | None) -> AsyncIterator[None]:
    """Close a progress stream when the transfer ends, however it ends."""
    try:
        yield
    finally:
        if isinstance(progress, MemoryObjectSendStream):
            with anyio.CancelScope(shield=True):
                await progress.aclose()
