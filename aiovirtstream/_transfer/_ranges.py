"""A download's streams: starting them, one per range, and receiving each into the write-behind."""

from __future__ import annotations

__all__ = [
    "StartedDownload",
    "check_not_past",
    "RangeStream",
    "start_download",
    "download_parts",
    "split_range",
    "streams_for",
    "check_complete",
    "WRITE_BEHIND",
    "PARALLEL_MIN_PART",
    "AUTO_PARALLEL_MIN",
    "AUTO_PARALLEL",
]

import asyncio
import concurrent.futures
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio.abc
import anyio.to_thread
import libvirt

from .._connection import connection_socket
from .._events import SocketHold
from .._exceptions import TransferError
from .._stream import (
    AsyncStream,
    abort_quietly,
    adopt_stream,
    check_stream_events,
)
from .._volume import (
    check_download_range,
    download_description,
    start_volume_download,
    volume_size,
)
from .._workers import (
    run_or_back_out,
    run_to_the_end,
    runner_for,
    submit_to_worker,
    wait_through_cancellation,
)
from ._filewriter import FileWriter
from ._options import TransferOptions
from ._together import run_together
from ._writebehind import WriteBehind, WriteWorker

#: Bytes of downloaded data waiting for the disk before the loop stops reading,
#: for the whole download: its streams share it (each keeps at least 4 MiB,
#: see WriteBehind). Two streams of 16 MiB each were no faster than two of
#: 8 MiB and touched twice the memory.
WRITE_BEHIND = 16 * 1024 * 1024


#: ``parallel`` splits a download only into ranges at least this large.
PARALLEL_MIN_PART = 64 * 1024 * 1024


#: ``parallel=None`` downloads over :data:`AUTO_PARALLEL` streams ranges at
#: least this large: on a small machine one stream is bound by the daemon,
#: which keeps one packet in flight per stream (docs/internals.md).
AUTO_PARALLEL_MIN = 256 * 1024 * 1024


AUTO_PARALLEL = 2
#: Seconds a download's write-behind may stay full before its connection's
#: socket is no longer served...
PAUSE_GRACE = 0.02
#: ...if it was not full for this long before (else the socket waits at once).
PAUSE_QUIET = 0.02


MiB = 1024 * 1024


_T = TypeVar("_T")


def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class StartedDownload:
    """A download's size (None: not known), its ranges ``(offset, length)``
    and their streams, starting on the connection's runner."""

    total: int | None
    parts: list[tuple[int, int]]
    starts: list[concurrent.futures.Future[libvirt.virStream]]

    def ranges(
        self, vol: libvirt.virStorageVol, sparse: bool, owned: contextlib.AsyncExitStack
    ) -> list[RangeStream]:
        """One :class:`RangeStream` a range; ``owned`` closes them all."""
        ranges = [RangeStream(vol, sparse, start) for start in self.starts]
        for range_stream in ranges:
            owned.push_async_callback(range_stream.aclose)
        return ranges

    def abort_blocking(self) -> None:
        """Abort every stream, once started (worker thread)."""
        _abort_when_started(self.starts)


def _abort_when_started(futures: list[concurrent.futures.Future[libvirt.virStream]]) -> None:
    """Abort each stream once its start is done, in the thread that ends it.

    Never waits: the starts may be queued behind the caller on the same runner.
    """
    for future in futures:
        future.add_done_callback(_abort_started)


def _abort_started(future: concurrent.futures.Future[libvirt.virStream]) -> None:
    if not future.cancelled() and future.exception() is None:
        abort_quietly(future.result())


async def start_download(
    vol: libvirt.virStorageVol,
    options: TransferOptions,
    *,
    before: Callable[[], _T] = _nothing,  # type: ignore[assignment]
    undo: Callable[[_T], None] | None = None,
    one_stream: bool = False,
) -> tuple[_T, StartedDownload]:
    """Run ``before`` (the destination's set-up), then start the download's streams.

    One worker-thread hop for both. If the size query fails, or the caller
    is cancelled meanwhile, ``undo(before())`` runs (in a worker) and the
    streams started are aborted; a stream that cannot start raises from
    :meth:`RangeStream.open`.
    """
    check_stream_events(vol.connect())

    def job() -> tuple[_T, StartedDownload]:
        prepared = before()
        try:
            return prepared, _start_download_blocking(vol, options, one_stream)
        except BaseException:
            if undo is not None:
                undo(prepared)
            raise

    def back_out(done: tuple[_T, StartedDownload]) -> None:
        prepared, started = done
        started.abort_blocking()
        if undo is not None:
            undo(prepared)

    return await run_or_back_out(job, back_out, runner_for(vol.connect()))


def _start_download_blocking(
    vol: libvirt.virStorageVol, options: TransferOptions, one_stream: bool
) -> StartedDownload:
    """The volume's size and the ranges; their streams' starts queued (runner thread).

    The starts go to the back of the runner's queue, behind the size queries
    of other downloads submitted meanwhile: a call's reply waits at the daemon
    behind a packet of each stream already sending, so the queries are
    answered at once before any stream runs, and only the starts wait.
    """
    total = check_download_range(volume_size(vol), options.offset, options.length)
    streams = 1 if one_stream or total is None else streams_for(options, total)
    parts = split_range(options.offset, total or 0, streams)
    # One range asks for options.length (0: to the end), as libvirt does.
    lengths = [options.length] if len(parts) == 1 else [length for _, length in parts]
    runner = runner_for(vol.connect())
    starts = [
        submit_to_worker(
            functools.partial(start_volume_download, vol, offset, length, options.sparse), runner
        )
        for (offset, _), length in zip(parts, lengths, strict=True)
    ]
    return StartedDownload(total, parts, starts)


class RangeStream:
    """The stream of one range of a download, adopted on the loop once started."""

    def __init__(
        self,
        vol: libvirt.virStorageVol,
        sparse: bool,
        starting: concurrent.futures.Future[libvirt.virStream],
    ) -> None:
        self._vol = vol
        self._runner = runner_for(vol.connect())
        self._sparse = sparse
        self._virstream: libvirt.virStream | None = None
        self._starting: concurrent.futures.Future[libvirt.virStream] | None = starting
        self._stream: AsyncStream | None = None

    async def open(self) -> AsyncStream:
        """Wait until the stream is started (raising if it could not be), and wrap it."""
        if self._stream is not None:
            return self._stream
        if self._starting is not None:
            starting = asyncio.wrap_future(self._starting)
            cancelled = await wait_through_cancellation(starting)
            self._starting = None
            if cancelled is not None:
                if starting.exception() is None:
                    self._virstream = starting.result()  # aclose() aborts it
                try:
                    raise cancelled
                finally:
                    del cancelled  # its traceback holds this frame: no cycle back to it
            self._virstream = starting.result()  # a start's error is raised here
        virstream, self._virstream = self._virstream, None
        assert virstream is not None
        self._stream = await adopt_stream(
            virstream, None, sparse=self._sparse, description=download_description(self._vol)
        )
        return self._stream

    async def aclose(self) -> None:
        """Abort the stream unless it finished; one still starting is aborted once started."""
        if self._stream is not None:
            await self._stream.aclose()
            return
        starting, self._starting = self._starting, None
        virstream, self._virstream = self._virstream, None
        # Shielded as AsyncStream.abort is: a cancellation delivered again here
        # would replace the one being raised.
        with anyio.CancelScope(shield=True):
            if starting is not None:
                await run_to_the_end(
                    functools.partial(_abort_when_started, [starting]), self._runner
                )
            elif virstream is not None:
                await run_to_the_end(functools.partial(abort_quietly, virstream), self._runner)


async def download_parts(
    writers: list[FileWriter],
    worker: WriteWorker,
    ranges: list[RangeStream],
    total: int | None,
    options: TransferOptions,
    complete_file: Callable[[], None] | None,
) -> tuple[int, int]:
    def counts() -> tuple[int, int]:
        return sum(w.data_bytes for w in writers), sum(w.hole_bytes for w in writers)

    limit = WRITE_BEHIND // len(ranges)
    async with options.reporter(counts, total) as reporter:
        if len(ranges) == 1:
            await _download_range(ranges[0], writers[0], worker, options, limit)
        else:
            # Several streams over ranges of one volume: the daemon keeps one
            # packet in flight per stream, so ranges overlap on its side.
            await run_together(
                *(
                    functools.partial(_download_range, range_stream, writer, worker, options, limit)
                    for range_stream, writer in zip(ranges, writers, strict=True)
                )
            )

        def complete() -> tuple[int, int]:
            # Here, after every write: a range's trailing holes move its
            # writer's end only once the writer took them.
            last = max(writers, key=lambda w: w.end)
            last.close()
            data, holes = counts()
            check_complete(data + holes, total)
            if complete_file is not None:
                complete_file()
            return data, holes

        data, holes = await worker.run_after_writes(complete)
        await reporter.final()
    return data, holes


def streams_for(options: TransferOptions, total: int) -> int:
    """How many streams a download into a file uses."""
    if options.checksum:
        return 1  # the hash needs the content in order
    if options.parallel is not None:
        return options.parallel
    return AUTO_PARALLEL if total >= AUTO_PARALLEL_MIN else 1


def split_range(offset: int, total: int, parallel: int) -> list[tuple[int, int]]:
    """``parallel`` ranges of about equal size, cut at MiB boundaries; one if small."""
    if parallel <= 1 or total < parallel * PARALLEL_MIN_PART:
        return [(offset, total)]
    step = -(-total // parallel // MiB) * MiB
    return [(offset + at, min(step, total - at)) for at in range(0, total, step)]


async def _download_range(
    range_stream: RangeStream,
    writer: FileWriter,
    worker: WriteWorker,
    options: TransferOptions,
    limit: int,
) -> None:
    """One stream's worth of a download, written behind by the file's worker thread.

    ``limit``: this stream's share of :data:`WRITE_BEHIND`.

    The stream's pump receives on the loop, from inside the stream's events,
    into the write-behind's slots (no coroutine wakes per packet); a worker
    thread writes full slots. Receiving in a worker thread instead was no
    faster, and let libvirt's unbounded client queue grow when the worker
    fell behind the loop's socket reads. While the
    write-behind has no free slot (after :data:`PAUSE_GRACE`), the
    connection's socket is not served (connections from
    :func:`aiovirtstream.connect`), so the daemon waits.
    """
    stream = await range_stream.open()
    backpressure = _SocketBackpressure(stream)
    sink = WriteBehind(
        writer,
        limit=limit,
        pause=backpressure.pause,
        resume=backpressure.resume,
        worker=worker,
    )
    try:
        async with stream:
            await stream.pump(sink, stop_at_hole=options.sparse)
            sink.flush()
        # The stream finishes while the last writes go on; the download
        # waits for them once every range is done (run_after_writes).
    except BaseException:
        with anyio.CancelScope(shield=True):
            await sink.abandon()
        raise
    finally:
        backpressure.release()


class _SocketBackpressure:
    """Stops serving a connection's socket while a download's write-behind stays full."""

    def __init__(self, stream: AsyncStream) -> None:
        self._hold = SocketHold(connection_socket(stream.virstream.connect()))
        self._stream = stream
        self._loop = asyncio.get_running_loop()
        self._pausing: asyncio.TimerHandle | None = None
        self._last_full = -PAUSE_QUIET  # when the write-behind was last full

    def pause(self) -> None:
        # The disk is behind: stop libvirt reading the socket, or its
        # unbounded client queue takes up the difference. A write-behind that
        # was not full lately gets a short grace first: the socket carries the
        # connection's other streams, which a write merely slower than the
        # next packet would hold up too. Once per quiet spell, so libvirt's
        # queue grows by at most the grace's worth of data for a slow disk.
        if not self._hold.possible or self._hold.held or self._pausing is not None:
            return
        if self._loop.time() - self._last_full < PAUSE_QUIET:
            self._pause_now()
        else:
            self._pausing = self._loop.call_later(PAUSE_GRACE, self._pause_now)

    def _pause_now(self) -> None:
        self._pausing = None
        self._hold.hold()

    def resume(self) -> None:
        self.release()
        self._stream.resume_pump()

    def release(self) -> None:
        if self._pausing is not None or self._hold.held:
            self._last_full = self._loop.time()
        if self._pausing is not None:
            self._pausing.cancel()
            self._pausing = None
        self._hold.release()


def check_not_past(received: int, more: int, expected: int | None) -> None:
    """Raise at once when the daemon sends more than the range it was asked for."""
    if expected is not None and received + more > expected:
        raise TransferError(
            f"the daemon sent more than the {expected} bytes asked for (at least "
            f"{received + more}): the download was aborted"
        )


def check_complete(received: int, expected: int | None) -> None:
    if expected is not None and received != expected:
        raise TransferError(
            f"the volume sent {received} bytes where {expected} were expected: "
            "the download is incomplete"
        )
