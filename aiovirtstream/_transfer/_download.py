"""``download()``: a volume into a path, an open file or an anyio byte stream."""

from __future__ import annotations

__all__ = [
    "download",
    "DownloadDestination",
]

import contextlib
import functools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, cast

import anyio.abc
import anyio.to_thread
import libvirt

from .._stream import (
    MAX_CHUNK,
    Hole,
)
from .._volume import (
    check_not_negative,
    claim_volume,
)
from ._files import (
    check_fsync,
    close_all,
    discard,
    final_mode,
    flush_to_disk,
    has_fileno,
    inspect_destination,
    make_destination_files,
    put_in_place,
    sync_folder_of,
)
from ._filewriter import ZERO_CHUNK, FileWriter
from ._options import (
    ContentHasher,
    ProgressTarget,
    TransferOptions,
    TransferResult,
    closing_progress,
)
from ._ranges import StartedDownload, check_complete, check_not_past, download_parts, start_download
from ._relay import Relay
from ._together import run_together
from ._writebehind import WriteWorker

#: A download into a byte stream holds at most this many batches of
#: :data:`STREAM_QUEUE_BATCH` pieces of 256 KiB (8 MiB) for the stream.
STREAM_QUEUE_ITEMS = 8
STREAM_QUEUE_BATCH = 4

DownloadDestination = str | os.PathLike[str] | IO[bytes] | anyio.abc.ByteSendStream


async def download(
    vol: libvirt.virStorageVol,
    dest: DownloadDestination,
    *,
    sparse: bool = True,
    offset: int = 0,
    length: int = 0,
    overwrite: bool = False,
    progress: ProgressTarget | None = None,
    progress_interval: float = 0.1,
    checksum: bool = False,
    parallel: int | None = None,
    direct_io: bool = True,
    fsync: bool = False,
) -> TransferResult:
    """Download ``vol`` from ``offset`` (``length`` 0: to its end) into ``dest``.

    ``dest`` is a path (written to a temporary file next to it, mode 0600,
    and renamed into place only when the stream finished, with the mode of
    the file it replaces or ``0666 & ~umask``; an existing file, or a
    symbolic link, is replaced only with ``overwrite=True``: a link is
    replaced itself, never written through), an open binary file (written from its
    current position; holes are punched where it had data), or an anyio byte
    stream (holes are sent as zeroes). With ``sparse`` the volume's holes
    stay holes in the destination. ``parallel=N`` splits a download into a
    path or a file into N ranges (of at least 64 MiB) over N streams; the
    default, ``None``, uses two streams for ranges of 256 MiB or more and one
    otherwise. With ``checksum``, which needs the content in order, one
    stream is used. ``direct_io`` (paths only) writes the temporary file
    with ``O_DIRECT`` where its file system allows: the data goes to the
    disk without being copied into the page cache, which costs less CPU and
    does not evict the host's cache with the image; ``False`` writes through
    the page cache, as ``virsh vol-download`` does. ``fsync`` (a path or a
    regular file) flushes the data to the disk before returning, and for a
    path makes the rename durable too, so that a crash cannot leave a
    complete-looking destination with missing data; it costs about a
    millisecond with direct I/O, a full writeback without it. ``progress``
    works as in :func:`upload`. On any failure or cancellation the streams
    are aborted, the temporary file removed and the error raised. While
    another transfer of this process uploads into the volume,
    :class:`VolumeBusyError` is raised before any file is created. A volume
    that is not raw (qcow2, ...) gives its file as it is on the host, as
    ``virsh vol-download`` does, not the guest's disk. A negative ``offset``
    or ``length``, or a range past the end (of the file, for a volume that
    is not raw), raises :class:`InvalidRangeError` before any file is
    created.
    """
    async with closing_progress(progress):
        check_not_negative(offset, length)
        if parallel is not None and parallel < 1:
            raise ValueError("parallel must be >= 1 (or None: chosen by size)")
        options = TransferOptions(
            sparse,
            offset,
            length,
            progress,
            progress_interval,
            checksum,
            parallel=parallel,
            direct_io=direct_io,
            fsync=fsync,
        )
        transfer = _download_for(vol, dest, overwrite, options)
        with claim_volume(vol, upload=False):
            return await transfer()


def _download_for(
    vol: libvirt.virStorageVol, dest: DownloadDestination, overwrite: bool, options: TransferOptions
) -> Callable[[], Awaitable[TransferResult]]:
    """The download to run for this kind of destination (a ``TypeError`` for others)."""
    if isinstance(dest, (str, os.PathLike)):
        return functools.partial(_download_path, vol, Path(dest), overwrite, options)
    if has_fileno(dest):
        return functools.partial(_download_file, vol, cast(IO[bytes], dest), options)
    if isinstance(dest, anyio.abc.ByteSendStream):
        check_fsync(options, f"an anyio stream ({type(dest).__name__})")
        return functools.partial(_download_stream, vol, dest, options)
    raise TypeError(
        f"cannot download into {type(dest).__name__}: pass a path, a binary file "
        "or an anyio byte stream"
    )


async def _download_path(
    vol: libvirt.virStorageVol, dest: Path, overwrite: bool, options: TransferOptions
) -> TransferResult:
    # Each thread hop costs a wake-up of an idle CPU: the
    # temporary file and the streams' start are one hop, and closing and
    # renaming run in the writer thread right after the last write.
    (fd, direct_fd, temp), started = await start_download(
        vol,
        options,
        before=lambda: make_destination_files(dest, overwrite, options.direct_io),
        undo=lambda files: discard(files[:2], files[2]),
    )
    closed = False

    def complete_file() -> None:
        nonlocal closed
        if options.fsync:
            flush_to_disk(fd, str(dest))
        os.fchmod(fd, final_mode(dest, overwrite))
        close_all((fd, direct_fd))
        closed = True
        put_in_place(temp, dest, overwrite)
        if options.fsync:
            sync_folder_of(dest)

    try:
        return await _download_fd(
            vol,
            fd,
            0,
            0,
            options,
            str(dest),
            started=started,
            complete_file=complete_file,
            direct_fd=direct_fd,
        )
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(discard, () if closed else (fd, direct_fd), temp)
        raise


async def _download_file(
    vol: libvirt.virStorageVol, dest: IO[bytes], options: TransferOptions
) -> TransferResult:
    fd = dest.fileno()
    position, size = await anyio.to_thread.run_sync(inspect_destination, dest)
    if position < 0:
        # Not seekable (a pipe): write in order, holes as zeroes.
        check_fsync(options, "a pipe or another file that cannot seek")
        return await _download_stream(vol, _FileSink(dest), options)
    name = getattr(dest, "name", f"fd {fd}")
    flush = functools.partial(flush_to_disk, fd, str(name)) if options.fsync else None
    result = await _download_fd(vol, fd, position, size, options, name, complete_file=flush)
    await anyio.to_thread.run_sync(dest.seek, position + result.total_bytes)
    return result


async def _download_fd(
    vol: libvirt.virStorageVol,
    fd: int,
    start: int,
    size: int,
    options: TransferOptions,
    name: str,
    *,
    started: StartedDownload | None = None,
    complete_file: Callable[[], None] | None = None,
    direct_fd: int = -1,
) -> TransferResult:
    """Download into ``fd`` (``size`` bytes long now) from ``start``.

    Holes are punched where the file held data. ``started``: the streams,
    if the caller started them (:func:`start_download`). ``complete_file``
    runs in the writer thread after the last write, once the download is
    known to be complete. ``direct_fd``: the file opened by :func:`open_direct`.
    """
    if started is None:
        _, started = await start_download(vol, options)
    async with contextlib.AsyncExitStack() as owned:
        ranges = started.ranges(vol, options.sparse, owned)
        hasher = options.hasher()
        writers = []
        for part_offset, part_length in started.parts:
            part_start = start + part_offset - options.offset
            stop = None if started.total is None else part_start + part_length
            writers.append(
                FileWriter(fd, part_start, size > part_start, hasher, direct_fd, stop=stop)
            )
        worker = WriteWorker(name)  # one writer thread per file (see WriteWorker)
        try:
            data, holes = await download_parts(
                writers, worker, ranges, started.total, options, complete_file
            )
        finally:
            worker.close()
    return options.result(data, holes, hasher)


class _FileSink(anyio.abc.ByteSendStream):
    """A non-seekable binary file as an anyio byte stream (writes in a worker thread)."""

    def __init__(self, file_obj: IO[bytes]) -> None:
        self._file = file_obj

    async def send(self, item: bytes) -> None:
        await anyio.to_thread.run_sync(self._file.write, item)

    async def send_eof(self) -> None:
        await anyio.to_thread.run_sync(self._file.flush)

    async def aclose(self) -> None:
        await self.send_eof()


async def _download_stream(
    vol: libvirt.virStorageVol, dest: anyio.abc.ByteSendStream, options: TransferOptions
) -> TransferResult:
    _, started = await start_download(vol, options, one_stream=True)
    total = started.total
    hasher = options.hasher()
    data_bytes = hole_bytes = 0
    async with contextlib.AsyncExitStack() as owned:
        (range_stream,) = started.ranges(vol, options.sparse, owned)
        stream = await range_stream.open()
        # A byte stream slower than the daemon (a network client) holds the
        # stream's pump, and the connection's socket, rather than letting
        # libvirt queue the rest of the volume in memory.
        relay = Relay(
            stream,
            lambda end: check_not_past(end, 0, total),
            max_items=STREAM_QUEUE_ITEMS,
            batch=STREAM_QUEUE_BATCH,
        )

        async def receive() -> None:
            try:
                await stream.pump(relay, stop_at_hole=options.sparse)
            finally:
                relay.release()
            relay.end()

        async def send() -> None:
            nonlocal data_bytes, hole_bytes
            while (item := await relay.get()) is not None:
                if isinstance(item, Hole):
                    remaining = item.length
                    while remaining > 0:
                        step = min(remaining, MAX_CHUNK)
                        await dest.send(ZERO_CHUNK[:step])
                        remaining -= step
                    hole_bytes += item.length
                    if hasher:
                        await anyio.to_thread.run_sync(hasher.hole, item.length)
                    continue
                for chunk in item:
                    await dest.send(chunk)
                    data_bytes += len(chunk)
                if hasher:
                    await anyio.to_thread.run_sync(_hash_data, hasher, item)

        async with options.reporter(lambda: (data_bytes, hole_bytes), total) as reporter:
            async with stream:
                await run_together(receive, send)
            await reporter.final()
    check_complete(data_bytes + hole_bytes, total)
    return options.result(data_bytes, hole_bytes, hasher)


def _hash_data(hasher: ContentHasher, chunks: list[bytes]) -> None:
    for chunk in chunks:
        hasher.data(chunk)
