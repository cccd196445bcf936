"""Sparse-aware volume upload and download: the library's main job.

Upload: a read-ahead job in a worker thread walks the source's data and
holes (SEEK_DATA/SEEK_HOLE), reads data with ``pread`` and queues it straight
to the stream's sender thread, which sends it; holes go as ``send_hole``. The
loop only starts, watches and finishes the transfer.

Download: the loop receives packets (a NONBLOCK recv only copies from
libvirt's queue) and hands them to a write-behind job in a worker thread that
``pwrite``s data and skips holes, so the destination stays sparse. A download
to a path goes to a temporary file next to it, renamed into place only after
the daemon confirmed the stream finished.
"""

from __future__ import annotations

__all__ = [
    "upload",
    "download",
    "TransferResult",
    "TransferProgress",
    "ProgressCallback",
    "ProgressTarget",
    "UploadSource",
    "DownloadDestination",
]

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar, cast

import anyio.abc
import anyio.to_thread
import libvirt
from anyio.streams.memory import MemoryObjectSendStream

from ._connect import connection_socket
from ._events import get_event_impl
from ._exceptions import (
    DestinationExistsError,
    SourceTooLargeError,
    TransferError,
    VolumeChangedError,
    libvirt_error_to_exception,
)
from ._extents import ZERO_BLOCK_SIZE, Extent, file_extents, zero_runs
from ._native import Buffer
from ._stream import (
    MAX_CHUNK,
    AsyncStream,
    Hole,
    StreamItem,
    abort_quietly,
    adopt_stream,
    check_stream_events,
)
from ._volume import (
    download_description,
    open_upload_stream,
    start_volume_upload,
    upload_call,
    upload_description,
)
from ._volume import start_volume_download as start_volume_download  # tests spy on it here
from ._volumesize import (
    VolumeSize,
    check_download_range,
    check_not_negative,
    check_upload_range,
    volume_size,
)
from ._volumeuse import claim_volume
from ._workqueue import (
    run_in_worker,
    run_or_back_out,
    run_to_the_end,
    submit_to_worker,
    wait_through_cancellation,
)
from ._writebehind import ZERO_CHUNK, FileWriter, WriteBehind, WriteWorker, open_direct

UploadSource = (
    str | os.PathLike[str] | IO[bytes] | AsyncIterable[bytes] | anyio.abc.ByteReceiveStream
)
DownloadDestination = str | os.PathLike[str] | IO[bytes] | anyio.abc.ByteSendStream

#: Bytes of downloaded data waiting for the disk before the loop stops reading,
#: for the whole download: its streams share it (each keeps at least 4 MiB,
#: see WriteBehind). Two streams of 16 MiB each were no faster than two of
#: 8 MiB and touched twice the memory.
WRITE_BEHIND = 16 * 1024 * 1024
#: Uploads ask the kernel to read this much ahead of what they send.
READ_AHEAD = 32 * MAX_CHUNK
#: ``parallel`` splits a download only into ranges at least this large.
PARALLEL_MIN_PART = 64 * 1024 * 1024
#: ``parallel=None`` downloads over :data:`AUTO_PARALLEL` streams ranges at
#: least this large: on a small machine one stream is bound by the daemon,
#: which keeps one packet in flight per stream (docs/internals.md).
AUTO_PARALLEL_MIN = 256 * 1024 * 1024
AUTO_PARALLEL = 2
MiB = 1024 * 1024
logger = logging.getLogger(__name__)
_T = TypeVar("_T")
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
#: Where progress goes: a callback, or the send side of an anyio object
#: stream (``anyio.create_memory_object_stream``) to ``async for`` over.
ProgressTarget = ProgressCallback | MemoryObjectSendStream[TransferProgress]


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


class SourceNotFoundError(TransferError, FileNotFoundError):
    """The upload's source file does not exist."""


class DestinationIsDirectoryError(TransferError, IsADirectoryError):
    """The download's destination is a directory; name a file inside it."""


__all__ += ["SourceNotFoundError", "DestinationIsDirectoryError"]


@dataclass(frozen=True, slots=True)
class _Options:
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

    def hasher(self) -> _Hasher | None:
        return _Hasher() if self.checksum else None

    def reporter(
        self, counts: Callable[[], tuple[int, int]], total: int | None
    ) -> _ProgressReporter:
        return _ProgressReporter(self.progress, counts, total, self.progress_interval)

    def result(self, data: int, holes: int, hasher: _Hasher | None) -> TransferResult:
        return TransferResult(
            data, holes, time.perf_counter() - self.started, hasher.hexdigest() if hasher else None
        )


class _Hasher:
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


class _ProgressReporter:
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

    async def __aenter__(self) -> _ProgressReporter:
        if self._target is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
        # The task's cancellation is a reference cycle (its traceback holds
        # _run's frame): let it hold no stream, so no connection either.
        self._target = self._stream = None
        self._counts = _no_counts


def _no_counts() -> tuple[int, int]:
    return 0, 0


@contextlib.asynccontextmanager
async def _closing(progress: ProgressTarget | None) -> AsyncIterator[None]:
    """Close a progress stream when the transfer ends, however it ends."""
    try:
        yield
    finally:
        if isinstance(progress, MemoryObjectSendStream):
            with anyio.CancelScope(shield=True):
                await progress.aclose()


@dataclass(frozen=True, slots=True)
class _UploadPlan:
    """How an upload treats holes, given what the volume holds."""

    holes_from: int | None  # holes from this volume offset on go as holes (None: all as zeroes)
    room: int | None  # bytes from the offset to the volume's end (None: a container file)
    stream_length: int  # the length the stream is opened with (0: no limit)
    restore_size: bool  # end with a hole up to the volume's end

    @property
    def holes(self) -> bool:
        """Whether the stream is opened sparse."""
        return self.holes_from is not None

    def holes_from_source(self, offset: int, position: int) -> int | None:
        """:attr:`holes_from` as a position in a source read from ``position``."""
        return None if self.holes_from is None else position + self.holes_from - offset


async def _plan_upload(
    vol: libvirt.virStorageVol, options: _Options, amount: int | None
) -> _UploadPlan:
    """:func:`_upload_plan` with the volume's size asked off the loop."""
    size = await run_to_the_end(functools.partial(volume_size, vol))
    return _upload_plan(options, amount, "the upload source", size)


def _upload_plan(options: _Options, amount: int | None, name: str, size: VolumeSize) -> _UploadPlan:
    """Check the range and the room, and choose how holes go (``amount`` None: not known)."""
    offset = options.offset
    room = check_upload_range(size, offset, options.length)
    if amount is not None and room is not None and amount > room:
        raise SourceTooLargeError(
            f"{name} has {amount} bytes to upload at offset {offset}, but the "
            f"volume holds {size.capacity} bytes: resize the volume or pass a smaller length"
        )
    # libvirt stores an uploaded hole by seeking over it and truncating the
    # volume's file at the hole's end (virFDStreamThreadDoWrite in
    # src/util/virfdstream.c): whatever the file held in the hole stays, and
    # what followed it is cut off.
    if not options.sparse:
        return _UploadPlan(None, room, amount or room or 0, False)
    if size.container:
        # Past the file's end a hole only makes the file longer, and reads
        # as zeroes: holes go as holes from there, as zeroes before it.
        start = max(offset, size.physical) if size.physical is not None else None
        if start is not None and amount is not None and offset + amount <= start:
            start = None  # every hole lies inside the file
        return _UploadPlan(start, None, amount or 0, False)
    if size.allocation == 0:
        # Nothing to keep: every hole goes as a hole, and a last one gives
        # the volume its size back.
        assert room is not None
        return _UploadPlan(offset, room, room, True)
    if size.fully_allocated:
        logger.warning(
            "the volume is fully allocated (%d bytes: a preallocated file, or a block "
            "device): holes are sent as zeroes, and it stays fully allocated",
            size.allocation,
        )
        return _UploadPlan(None, room, amount or room or 0, False)
    logger.warning(
        "the volume holds data (%d bytes allocated): holes are sent as zeroes, "
        "since libvirt would keep the old data inside them; to keep the upload "
        "sparse, upload into a new volume, or a source of the volume's size at "
        "offset 0 (the volume is then emptied first)",
        size.allocation,
    )
    return _UploadPlan(None, room, amount or room or 0, False)


def _empty_before_overwriting(
    vol: libvirt.virStorageVol, options: _Options, amount: int, size: VolumeSize
) -> VolumeSize:
    """Empty a volume the source overwrites whole, if that is cheap; returns its size now.

    Holes can be sent only into a volume that holds no data (:func:`_upload_plan`);
    into one that does they go as zeroes, which costs seconds a GiB and
    allocates them. When every byte of the volume comes from the source
    anyway, and the volume is a raw file with holes, libvirt's zero wipe
    empties it in milliseconds: for a regular file with st_blocks < st_size /
    512 it truncates the file to 0 and back to its size
    (storageBackendVolWipeLocalFile in libvirt's src/storage/storage_util.c).
    A fully allocated file it would overwrite with zeroes, and such a volume
    was preallocated on purpose: that one is left alone. The allocation is
    read again afterwards: holes go as holes only if it is 0.
    """
    capacity, allocation = size.capacity, size.allocation
    if not (options.sparse and allocation and options.offset == 0 and amount == capacity):
        return size
    if size.fully_allocated or not size.raw_file:
        return size  # no holes (libvirt would write zeroes over all of it), or not raw
    try:
        vol.wipe(libvirt.VIR_STORAGE_VOL_WIPE_ALG_ZERO)
    except libvirt.libvirtError as error:
        # The start that follows reports a real problem (the volume gone, the
        # connection lost); otherwise the holes go as zeroes, with
        # _upload_plan's warning.
        logger.debug("could not empty the volume before overwriting it: %s", error)
        return size
    size = volume_size(vol)
    logger.debug("emptied the volume before overwriting it (allocation now %d)", size.allocation)
    return size


def _check_stored(vol: libvirt.virStorageVol, end: int) -> None:
    """Check, once an upload finished, that ``vol`` still holds what it wrote
    up to ``end`` (worker thread: one round trip).

    libvirt locks nothing during a stream: a volume deleted meanwhile takes
    the upload into its deleted file, and the stream still finishes.
    """
    name = vol.name()
    try:
        physical = int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise VolumeChangedError(
                f"volume {name!r} was deleted while the upload ran: the data went into the "
                "deleted file. Recreate the volume and upload again"
            ) from error
        raise libvirt_error_to_exception(
            error, context=f"the upload into volume {name!r} finished, but it cannot be checked"
        ) from error
    if physical < end:
        raise VolumeChangedError(
            f"volume {name!r} holds {physical} bytes, less than the {end} the upload wrote: "
            "it was shrunk while the upload ran. Resize it and upload again"
        )


# ---------------------------------------------------------------------- upload


async def upload(
    vol: libvirt.virStorageVol,
    source: UploadSource,
    *,
    sparse: bool = True,
    detect_zeroes: bool = False,
    offset: int = 0,
    length: int = 0,
    progress: ProgressTarget | None = None,
    progress_interval: float = 0.1,
    checksum: bool = False,
) -> TransferResult:
    """Upload ``source`` into ``vol`` at ``offset``; returns what was sent.

    ``source`` is a path (a FIFO or a character device is read as poll says
    it is readable, so a cancellation ends a wait for its writer; a unix
    socket raises :class:`TransferError`) or an open binary file (read from
    its start, or a file object's current position, with its holes found by
    SEEK_DATA/SEEK_HOLE and sent as holes when ``sparse``), or an async
    iterable of bytes / an anyio byte stream. ``detect_zeroes`` also sends
    aligned runs of zeroes (4 KiB blocks) inside data as holes. ``length``
    limits how many bytes of the source are sent (0: all of it). A file that
    does not fit in the volume raises :class:`SourceTooLargeError` before
    anything is sent (a pipe or an iterable, whose size is unknown, when it
    overflows; the upload is then aborted). Holes are sent as holes only into
    a volume that holds no data yet (libvirt would keep a volume's old data
    inside them): a raw file volume that the source overwrites whole (a
    source of the volume's size at offset 0) is emptied first with libvirt's
    zero wipe; into other volumes that hold data, holes go as zeroes. ``progress``
    (a callback, or the send side of an anyio memory object stream, closed
    when the transfer ends) gets a :class:`TransferProgress` on the loop
    every ``progress_interval`` seconds and once at the end. On any failure
    or cancellation the stream is aborted and the error raised. While
    another transfer of this process moves the volume (either way),
    :class:`VolumeBusyError` is raised before anything is sent. A volume
    that is not raw (qcow2, ...) takes the source as its file: upload an
    image of its format; holes inside the file's current length go as
    zeroes, holes past it as holes. A negative ``offset`` or ``length``, or
    a range past the volume's end, raises :class:`InvalidRangeError` before
    anything is sent. Once the stream finished, the volume is checked: one
    deleted or shrunk meanwhile raises :class:`VolumeChangedError`.
    """
    async with _closing(progress):
        check_not_negative(offset, length)
        options = _Options(
            sparse, offset, length, progress, progress_interval, checksum, detect_zeroes
        )
        transfer = _upload_for(vol, source, options)
        with claim_volume(vol, upload=True):
            return await transfer()


def _upload_for(
    vol: libvirt.virStorageVol, source: UploadSource, options: _Options
) -> Callable[[], Awaitable[TransferResult]]:
    """The upload to run for this kind of source (a ``TypeError`` for others)."""
    if isinstance(source, (str, os.PathLike)):
        return functools.partial(_upload_file, vol, source, options)
    if _has_fileno(source):
        return functools.partial(_upload_file, vol, cast(IO[bytes], source), options)
    if isinstance(source, AsyncIterable):
        return functools.partial(_upload_iterable, vol, source, options)
    raise TypeError(
        f"cannot upload from {type(source).__name__}: pass a path, a binary file, "
        "or an async iterable of bytes"
    )


def _has_fileno(obj: object) -> bool:
    fileno = getattr(obj, "fileno", None)
    if fileno is None:
        return False
    try:
        fileno()
    except (OSError, ValueError):
        return False
    return True


def _open_source(source: str | os.PathLike[str] | IO[bytes]) -> tuple[int, int, bool, str]:
    """(fd, start position, whether we opened it, name) of an upload source.

    A path is opened with ``O_NONBLOCK``, so that a FIFO without a writer
    does not block the open: a regular file or a block device is then made
    blocking again, anything else is read only once poll says it is
    readable (:func:`_iter_special`), so a cancellation ends the wait.
    """
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError as error:
            raise SourceNotFoundError(f"upload source {name!r} does not exist") from error
        except IsADirectoryError as error:
            raise TransferError(f"upload source {name!r} is a directory") from error
        except OSError as error:
            if error.errno == errno.ENXIO and stat.S_ISSOCK(os.stat(name).st_mode):
                raise TransferError(
                    f"upload source {name!r} is a unix socket, which cannot be opened as a "
                    "file: connect to it and pass the connection as an async byte stream"
                ) from error
            raise
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            os.set_blocking(fd, True)
        return fd, 0, True, name
    fd = source.fileno()
    try:
        position = source.tell()
    except (OSError, ValueError):
        position = 0
    return fd, position, False, getattr(source, "name", f"fd {fd}")


def _source_size(fd: int, name: str) -> tuple[int, bool]:
    """(size, seekable) of an upload source; block devices are sized with lseek."""
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise TransferError(f"upload source {name!r} is a directory")
    if stat.S_ISREG(info.st_mode):
        return info.st_size, True
    if stat.S_ISBLK(info.st_mode):
        return os.lseek(fd, 0, os.SEEK_END), True
    return -1, False  # a pipe or socket: read until EOF


@dataclass(slots=True)
class _UploadStart:
    """An upload source opened and, if it is a file, the stream started."""

    fd: int
    position: int
    owned: bool  # we opened fd
    amount: int  # bytes to send (a file's)
    plan: _UploadPlan | None  # None: not seekable, read in order
    virstream: libvirt.virStream | None

    def back_out(self) -> None:
        """Abort the stream and close what we opened (worker thread)."""
        if self.virstream is not None:
            abort_quietly(self.virstream)
        if self.owned:
            os.close(self.fd)


def _open_and_start_upload(
    source: str | os.PathLike[str] | IO[bytes], vol: libvirt.virStorageVol, options: _Options
) -> _UploadStart:
    """Open the source, size it and the volume, check the room and start the
    stream, in one worker-thread hop (a pipe or socket: no stream yet)."""
    fd, position, owned, name = _open_source(source)
    try:
        size, seekable = _source_size(fd, name)
        if not seekable:
            return _UploadStart(fd, position, owned, 0, None, None)
        volume = volume_size(vol)
        available = max(size - position, 0)
        amount = min(options.length, available) if options.length else available
        volume = _empty_before_overwriting(vol, options, amount, volume)
        plan = _upload_plan(options, amount, repr(name), volume)
        virstream = start_volume_upload(vol, options.offset, plan.stream_length, plan.holes)
    except BaseException:
        if owned:
            os.close(fd)
        raise
    return _UploadStart(fd, position, owned, amount, plan, virstream)


async def _upload_file(
    vol: libvirt.virStorageVol,
    source: str | os.PathLike[str] | IO[bytes],
    options: _Options,
) -> TransferResult:
    check_stream_events(vol.connect())
    start = await run_or_back_out(
        lambda: _open_and_start_upload(source, vol, options), _UploadStart.back_out
    )
    fd, position, owned = start.fd, start.position, start.owned
    amount, plan = start.amount, start.plan
    reader: _FileReader | None = None
    try:
        if plan is None:
            if owned:
                return await _upload_iterable(vol, _iter_special(fd), options)
            return await _upload_iterable(vol, _iter_file(cast(IO[bytes], source)), options)
        virstream, start.virstream = start.virstream, None
        assert virstream is not None
        stream = await adopt_stream(
            virstream, None, sparse=plan.holes, description=upload_description(vol)
        )
        hasher = options.hasher()
        reader = _FileReader(
            fd,
            position,
            position + amount,
            stream,
            walk_extents=options.sparse,
            holes_from=plan.holes_from_source(options.offset, position),
            detect_zeroes=options.detect_zeroes,
            hasher=hasher,
            close_fd=owned,
            trailing_hole=_size_restoring_hole(plan, amount),
        )
        counts = lambda: (stream.bytes_sent, stream.hole_bytes_sent)  # noqa: E731
        async with options.reporter(counts, amount) as reporter:
            async with stream:
                await _run_reader(reader, stream)
            await _check_upload_stored(vol, options.offset + amount)
            await reporter.final()
        return options.result(stream.bytes_sent, amount - stream.bytes_sent, hasher)
    finally:
        if owned and not (reader is not None and reader.fd_closed):
            os.close(fd)  # only when the reader never ran: an error before sending


def _size_restoring_hole(plan: _UploadPlan, sent: int) -> int:
    """A last hole up to the volume's end: libvirt cut the volume at the last hole."""
    if not plan.restore_size or plan.room is None:
        return 0
    return max(plan.room - sent, 0)


async def _check_upload_stored(vol: libvirt.virStorageVol, end: int) -> None:
    """:func:`_check_stored` off the loop."""
    await run_to_the_end(functools.partial(_check_stored, vol, end))


async def _run_reader(reader: _FileReader, stream: AsyncStream) -> None:
    """Run the reading and sending job; on cancellation stop it before letting go."""
    future = run_in_worker(reader.run)
    try:
        await asyncio.shield(future)
    except libvirt.libvirtError as error:
        stream._settle_sender_finish()
        raise stream._mark_broken(error) from error
    except BaseException:
        reader.stop()
        stream._sender.stop()
        while not future.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(future)
        stream._settle_sender_finish()  # finished meanwhile: too late to abort
        raise
    stream._settle_sender_finish()
    stream._raise_send_error()


class _FileReader:
    """Reads a source's extents in a worker thread and queues them to the sender."""

    def __init__(
        self,
        fd: int,
        start: int,
        end: int,
        stream: AsyncStream,
        *,
        walk_extents: bool,
        holes_from: int | None,
        detect_zeroes: bool,
        hasher: _Hasher | None,
        close_fd: bool = False,
        trailing_hole: int = 0,
    ) -> None:
        self._fd = fd
        self._close_fd = close_fd  # close it in the worker once read (no syscall on the loop)
        #: The worker has closed the fd (``close_fd``): the caller must not.
        self.fd_closed = False
        self._start = start
        self._end = end
        self._queue = stream._sender
        self._send = stream._send_item
        self._finish_stream = stream._finish_from_sender
        self._trailing_hole = trailing_hole  # sent after the source, not hashed
        self._direct = True
        self._walk_extents = walk_extents  # find the source's holes (SEEK_DATA/SEEK_HOLE)
        # Holes from this source position on go as holes; before it (all of
        # them, if None) as zeroes, without reading them.
        self._holes_from = holes_from
        self._detect_zeroes = detect_zeroes and holes_from is not None and holes_from < end
        self._hasher = hasher
        self._stopped = threading.Event()
        self._cache_probe: bytearray | None = bytearray(1)  # None: RWF_NOWAIT not supported

    def stop(self) -> None:
        self._stopped.set()

    def _extents(self) -> Iterator[Extent]:
        if self._walk_extents:
            return file_extents(self._fd, self._start, self._end)
        return iter([Extent(self._start, self._end - self._start, True)])

    def run(self) -> None:
        try:
            self._run()
        finally:
            if self._close_fd:
                self.fd_closed = True
                os.close(self._fd)

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # advice only
            os.posix_fadvise(
                self._fd, self._start, self._end - self._start, os.POSIX_FADV_SEQUENTIAL
            )
        for extent in self._extents():
            if extent.data:
                if not self._send_data(extent):
                    return
            elif not self._send_hole(extent.offset, extent.length):
                return
        if self._trailing_hole and not self._put(Hole(self._trailing_hole)):
            return
        if self._direct and not self._stopped.is_set():
            # Nothing went through the queue: finish here, one RPC in this
            # thread instead of two thread hops for AsyncStream.finish().
            self._finish_stream()

    def _put(self, item: StreamItem) -> bool:
        if self._stopped.is_set():
            return False
        if self._direct:
            # Sent from this thread, like libvirt's own sendAll: a second
            # thread between reading and sending only added GIL hand-offs
            # and was slower. The kernel's read-ahead (fadvise)
            # keeps the disk busy while the send blocks.
            sent = self._send(item)
            weight = len(item) if isinstance(item, bytes) else None
            if weight is None or sent == weight:
                return True
            self._direct = False  # a local stream that would block: queue the rest
            item = item[max(sent, 0) :]  # type: ignore[index]
        return self._queue.put_blocking(item)

    def _send_hole(self, pos: int, length: int) -> bool:
        if self._hasher:
            self._hasher.hole(length)
        zeroes = length
        if self._holes_from is not None:
            zeroes = min(max(self._holes_from - pos, 0), length)
        while zeroes > 0:
            step = min(zeroes, MAX_CHUNK)
            if not self._put(ZERO_CHUNK[:step]):
                return False
            zeroes -= step
            length -= step
        return length == 0 or self._put(Hole(length))

    def _read_ahead(self, pos: int, length: int) -> None:
        """Ask the kernel to read ``[pos, pos + length)`` ahead, unless it is cached.

        ``POSIX_FADV_WILLNEED`` walks the range's pages even when all of them
        are in the page cache, time in which nothing is sent.
        A one-byte ``RWF_NOWAIT`` read of the range's last page tells cheaply
        whether the range has been read already (it fails with EAGAIN when
        that page is not cached).
        """
        probe = self._cache_probe
        if probe is not None:
            try:
                if os.preadv(self._fd, [probe], pos + length - 1, os.RWF_NOWAIT) == 1:
                    return
            except BlockingIOError:
                pass  # not cached: advise
            except OSError:
                self._cache_probe = None  # no RWF_NOWAIT for this file: always advise
        with contextlib.suppress(OSError):  # advice only
            os.posix_fadvise(self._fd, pos, length, os.POSIX_FADV_WILLNEED)

    def _send_data(self, extent: Extent) -> bool:
        pos, end = extent.offset, extent.end
        # Reads stay aligned to MAX_CHUNK-sized pieces of the extent; with
        # detect_zeroes they are aligned to zero blocks as well.
        chunk = MAX_CHUNK - MAX_CHUNK % ZERO_BLOCK_SIZE if self._detect_zeroes else MAX_CHUNK
        advise_at = pos
        while pos < end:
            if pos >= advise_at:
                self._read_ahead(pos, min(2 * READ_AHEAD, end - pos))
                advise_at = pos + READ_AHEAD
            data = os.pread(self._fd, min(chunk, end - pos), pos)
            if not data:
                raise TransferError(
                    f"the upload source shrank while it was read (no data at offset {pos})"
                )
            if self._detect_zeroes:
                for part in zero_runs(data, pos):
                    piece = data[part.offset - pos : part.end - pos]
                    if part.data:
                        if self._hasher:
                            self._hasher.data(piece)
                        if not self._put(piece):
                            return False
                    elif not self._send_hole(part.offset, part.length):
                        return False
            else:
                if self._hasher:
                    self._hasher.data(data)
                if not self._put(data):
                    return False
            pos += len(data)
        return True


async def _iter_file(file_obj: IO[bytes]) -> AsyncIterable[bytes]:
    """Read a non-seekable file (pipe, socket) in a worker thread."""
    while data := await anyio.to_thread.run_sync(file_obj.read, 4 * MAX_CHUNK):
        yield data


async def _iter_special(fd: int) -> AsyncIterable[bytes]:
    """Read a FIFO or a character device we opened with ``O_NONBLOCK``.

    Each read waits for poll to say the file is readable, on the loop, so
    that a cancellation ends the wait (a FIFO that no writer opened yet is
    not readable: its reads would return EOF). A device that cannot be
    polled (``/dev/zero``) is always readable; one that says EAGAIN anyway
    is retried after a short sleep.
    """
    pollable = True
    while True:
        if pollable:
            try:
                await anyio.wait_readable(fd)
            except PermissionError:  # epoll refuses files without poll support
                pollable = False
        try:
            data = await anyio.to_thread.run_sync(os.read, fd, 4 * MAX_CHUNK)
        except BlockingIOError:
            if not pollable:
                await anyio.sleep(0.01)
            continue
        if not data:
            return
        yield data


async def _upload_iterable(
    vol: libvirt.virStorageVol, source: AsyncIterable[bytes], options: _Options
) -> TransferResult:
    offset, length = options.offset, options.length
    plan = await _plan_upload(vol, options, length or None)
    holes_from = plan.holes_from
    detect = options.detect_zeroes and holes_from is not None
    call = upload_call(vol, offset, plan.stream_length, plan.holes)
    stream = await open_upload_stream(vol, call, plan.holes)
    hasher = options.hasher()
    position = 0
    counts = lambda: (stream.bytes_sent, stream.hole_bytes_sent)  # noqa: E731
    async with options.reporter(counts, length or None) as reporter:
        async with stream:
            async for chunk in source:
                if not chunk:
                    continue
                data = bytes(chunk)
                if length and position + len(data) > length:
                    data = data[: length - position]  # the caller asked for a prefix
                if plan.room is not None and position + len(data) > plan.room:
                    raise SourceTooLargeError(
                        f"the upload source has more than {plan.room} bytes, the room in the "
                        f"volume from offset {offset}: the upload was aborted"
                    )
                if hasher:
                    await anyio.to_thread.run_sync(hasher.data, data)
                if detect:
                    for part in zero_runs(data, offset + position):
                        if part.data:
                            start = part.offset - offset - position
                            await stream.write(data[start : start + part.length])
                        else:
                            assert holes_from is not None
                            # Inside a container file's current length: zeroes.
                            zeroes = min(max(holes_from - part.offset, 0), part.length)
                            if zeroes:
                                await stream.write(bytes(zeroes))
                            if part.length > zeroes:
                                await stream.send_hole(part.length - zeroes)
                else:
                    await stream.write(data)
                position += len(data)
                if length and position >= length:
                    break
            if last_hole := _size_restoring_hole(plan, position):
                await stream.send_hole(last_hole)
        await _check_upload_stored(vol, offset + position)
        await reporter.final()
    return options.result(stream.bytes_sent, position - stream.bytes_sent, hasher)


# ---------------------------------------------------------------------- download


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
    async with _closing(progress):
        check_not_negative(offset, length)
        if parallel is not None and parallel < 1:
            raise ValueError("parallel must be >= 1 (or None: chosen by size)")
        options = _Options(
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
    vol: libvirt.virStorageVol, dest: DownloadDestination, overwrite: bool, options: _Options
) -> Callable[[], Awaitable[TransferResult]]:
    """The download to run for this kind of destination (a ``TypeError`` for others)."""
    if isinstance(dest, (str, os.PathLike)):
        return functools.partial(_download_path, vol, Path(dest), overwrite, options)
    if _has_fileno(dest):
        return functools.partial(_download_file, vol, cast(IO[bytes], dest), options)
    if isinstance(dest, anyio.abc.ByteSendStream):
        _check_fsync(options, f"an anyio stream ({type(dest).__name__})")
        return functools.partial(_download_stream, vol, dest, options)
    raise TypeError(
        f"cannot download into {type(dest).__name__}: pass a path, a binary file "
        "or an anyio byte stream"
    )


def _check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse a folder, or anything in ``dest``'s place without ``overwrite``.

    A symbolic link is never followed: it exists (dangling or not), and with
    ``overwrite`` the rename replaces the link itself, not its target.
    """
    try:
        mode: int | None = os.lstat(dest).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise DestinationIsDirectoryError(
            f"download destination {str(dest)!r} is a directory: name a file inside it"
        )
    if mode is not None and not overwrite:
        link = " (a symbolic link: replaced itself, never written through)"
        raise DestinationExistsError(
            f"download destination {str(dest)!r} exists"
            f"{link if stat.S_ISLNK(mode) else ''}: pass overwrite=True to replace it"
        )
    if not dest.parent.is_dir():
        raise TransferError(f"the folder of download destination {str(dest)!r} does not exist")


def _check_fsync(options: _Options, what: str) -> None:
    if options.fsync:
        raise ValueError(
            f"fsync=True needs a path or a regular file to flush, not {what}: "
            "drop fsync, or download into a file"
        )


def _flush_to_disk(fd: int, name: str) -> None:
    """fdatasync ``fd`` (worker thread): the data and the size it needs to be read."""
    try:
        os.fdatasync(fd)
    except OSError as error:
        raise TransferError(f"cannot flush {name!r} to disk: {error}") from error


def _sync_folder_of(dest: Path) -> None:
    """fsync ``dest``'s folder, so that its rename survives a crash (worker thread)."""
    try:
        fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise TransferError(
            f"{str(dest)!r} is complete, but its folder cannot be flushed to disk, so "
            f"its rename may not survive a crash: {error}"
        ) from error


def _make_temporary(dest: Path, overwrite: bool) -> tuple[int, Path]:
    """Check ``dest`` and create the temporary file beside it (worker thread).

    mkstemp creates it with ``O_EXCL|O_NOFOLLOW`` and mode 0600: private
    while it is written; :func:`_final_mode` is set just before the rename.
    """
    _check_destination(dest, overwrite)
    fd, temp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    return fd, Path(temp_name)


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status``: never set to learn it
    (``os.umask`` changes it for every thread). 0o077 if it cannot be read."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o077  # unknown: the final file stays private rather than too open


def _final_mode(dest: Path, overwrite: bool) -> int:
    """The mode of a finished download: that of the regular file it replaces
    (permission bits only), else what ``open()`` would give a new file."""
    if overwrite:
        with contextlib.suppress(OSError):
            info = os.lstat(dest)
            if stat.S_ISREG(info.st_mode):
                return info.st_mode & 0o777
    return 0o666 & ~current_umask()


def _put_in_place(temp: Path, dest: Path, overwrite: bool) -> None:
    """Rename the finished temporary file to ``dest`` (worker thread)."""
    try:
        if overwrite:
            os.replace(temp, dest)
            return
        # link() fails if the destination appeared meanwhile: never clobber it.
        os.link(temp, dest)
    except FileExistsError as error:
        raise DestinationExistsError(
            f"download destination {str(dest)!r} appeared during the download: "
            "pass overwrite=True to replace it"
        ) from error
    except OSError as error:  # the folder removed or renamed meanwhile, ...
        raise TransferError(
            f"cannot put the finished download in place as {str(dest)!r}: {error}"
        ) from error
    temp.unlink()


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _discard(fds: tuple[int, ...], temp: Path) -> None:
    _close_all(fds)
    temp.unlink(missing_ok=True)


def _make_destination_files(dest: Path, overwrite: bool, direct_io: bool) -> tuple[int, int, Path]:
    """The temporary file and its direct descriptor (or -1), worker thread."""
    fd, temp = _make_temporary(dest, overwrite)
    direct_fd = -1
    try:
        if direct_io:
            direct_fd = open_direct(fd)  # the file itself, not whatever temp names now
    except BaseException:
        _discard((fd, -1), temp)
        raise
    return fd, direct_fd, temp


async def _download_path(
    vol: libvirt.virStorageVol, dest: Path, overwrite: bool, options: _Options
) -> TransferResult:
    # Each thread hop costs a wake-up of an idle CPU: the
    # temporary file and the streams' start are one hop, and closing and
    # renaming run in the writer thread right after the last write.
    (fd, direct_fd, temp), started = await _start_download(
        vol,
        options,
        before=lambda: _make_destination_files(dest, overwrite, options.direct_io),
        undo=lambda files: _discard(files[:2], files[2]),
    )
    closed = False

    def put_in_place() -> None:
        nonlocal closed
        if options.fsync:
            _flush_to_disk(fd, str(dest))
        os.fchmod(fd, _final_mode(dest, overwrite))
        _close_all((fd, direct_fd))
        closed = True
        _put_in_place(temp, dest, overwrite)
        if options.fsync:
            _sync_folder_of(dest)

    try:
        return await _download_fd(
            vol,
            fd,
            0,
            0,
            options,
            str(dest),
            started=started,
            complete_file=put_in_place,
            direct_fd=direct_fd,
        )
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_discard, () if closed else (fd, direct_fd), temp)
        raise


def _inspect_destination(dest: IO[bytes]) -> tuple[int, int]:
    """Flush an open destination; its (position, size), position -1 if it is
    not a seekable regular file (worker thread: this is file I/O)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        dest.flush()
    try:
        position = dest.tell()
    except (OSError, ValueError):
        return -1, 0
    info = os.fstat(dest.fileno())
    return (position, info.st_size) if stat.S_ISREG(info.st_mode) else (-1, 0)


async def _download_file(
    vol: libvirt.virStorageVol, dest: IO[bytes], options: _Options
) -> TransferResult:
    fd = dest.fileno()
    position, size = await anyio.to_thread.run_sync(_inspect_destination, dest)
    if position < 0:
        # Not seekable (a pipe): write in order, holes as zeroes.
        _check_fsync(options, "a pipe or another file that cannot seek")
        return await _download_stream(vol, _FileSink(dest), options)
    name = getattr(dest, "name", f"fd {fd}")
    flush = functools.partial(_flush_to_disk, fd, str(name)) if options.fsync else None
    result = await _download_fd(vol, fd, position, size, options, name, complete_file=flush)
    await anyio.to_thread.run_sync(dest.seek, position + result.total_bytes)
    return result


async def _download_fd(
    vol: libvirt.virStorageVol,
    fd: int,
    start: int,
    size: int,
    options: _Options,
    name: str,
    *,
    started: _Started | None = None,
    complete_file: Callable[[], None] | None = None,
    direct_fd: int = -1,
) -> TransferResult:
    """Download into ``fd`` (``size`` bytes long now) from ``start``.

    Holes are punched where the file held data. ``started``: the streams,
    if the caller started them (:func:`_start_download`). ``complete_file``
    runs in the writer thread after the last write, once the download is
    known to be complete. ``direct_fd``: the file opened by :func:`open_direct`.
    """
    if started is None:
        _, started = await _start_download(vol, options)
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
            data, holes = await _download_parts(
                writers, worker, ranges, started.total, options, complete_file
            )
        finally:
            worker.close()
    return options.result(data, holes, hasher)


def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class _Started:
    """A download's size (None: not known) and ranges ``(offset, length)``:
    the first range's stream started, the others' starting in worker threads."""

    total: int | None
    parts: list[tuple[int, int]]
    first: libvirt.virStream
    others: list[concurrent.futures.Future[libvirt.virStream]]

    def ranges(
        self, vol: libvirt.virStorageVol, sparse: bool, owned: contextlib.AsyncExitStack
    ) -> list[_RangeStream]:
        """One :class:`_RangeStream` a range; ``owned`` closes them all."""
        ranges = [_RangeStream(vol, sparse, self.first, None)]
        ranges += [_RangeStream(vol, sparse, None, future) for future in self.others]
        for range_stream in ranges:
            owned.push_async_callback(range_stream.aclose)
        return ranges

    def abort_blocking(self) -> None:
        """Abort every stream, once started (worker thread)."""
        abort_quietly(self.first)
        _abort_when_started(self.others)


def _abort_when_started(futures: list[concurrent.futures.Future[libvirt.virStream]]) -> None:
    for future in futures:
        with contextlib.suppress(BaseException):
            abort_quietly(future.result())


async def _start_download(
    vol: libvirt.virStorageVol,
    options: _Options,
    *,
    before: Callable[[], _T] = _nothing,  # type: ignore[assignment]
    undo: Callable[[_T], None] | None = None,
    one_stream: bool = False,
) -> tuple[_T, _Started]:
    """Run ``before`` (the destination's set-up), then start the download's streams.

    One worker-thread hop for both. If the start fails, or the caller is
    cancelled meanwhile, ``undo(before())`` runs (in a worker) and the
    streams started are aborted.
    """
    check_stream_events(vol.connect())

    def job() -> tuple[_T, _Started]:
        prepared = before()
        try:
            return prepared, _start_download_blocking(vol, options, one_stream)
        except BaseException:
            if undo is not None:
                undo(prepared)
            raise

    def back_out(done: tuple[_T, _Started]) -> None:
        prepared, started = done
        started.abort_blocking()
        if undo is not None:
            undo(prepared)

    return await run_or_back_out(job, back_out)


def _start_download_blocking(
    vol: libvirt.virStorageVol, options: _Options, one_stream: bool
) -> _Started:
    """The volume's size, the ranges, and their streams starting (worker thread).

    The first range's stream starts in this thread, the others at the same
    time in threads of their own; each range is received as soon as its
    stream is there (waiting for the others first made downloads slower).
    """
    total = check_download_range(volume_size(vol), options.offset, options.length)
    streams = 1 if one_stream or total is None else _streams_for(options, total)
    parts = _split_range(options.offset, total or 0, streams)
    # One range asks for options.length (0: to the end), as libvirt does.
    lengths = [options.length] if len(parts) == 1 else [length for _, length in parts]
    starts = [
        functools.partial(start_volume_download, vol, offset, length, options.sparse)
        for (offset, _), length in zip(parts, lengths, strict=True)
    ]
    others = [submit_to_worker(start) for start in starts[1:]]
    try:
        first = starts[0]()
    except BaseException:
        _abort_when_started(others)
        raise
    return _Started(total, parts, first, others)


class _RangeStream:
    """The stream of one range of a download, adopted on the loop once started."""

    def __init__(
        self,
        vol: libvirt.virStorageVol,
        sparse: bool,
        virstream: libvirt.virStream | None,
        starting: concurrent.futures.Future[libvirt.virStream] | None,
    ) -> None:
        self._vol = vol
        self._sparse = sparse
        self._virstream = virstream
        self._starting = starting
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
        if starting is not None:
            await run_to_the_end(functools.partial(_abort_when_started, [starting]))
        elif virstream is not None:
            await run_to_the_end(functools.partial(abort_quietly, virstream))


async def _download_parts(
    writers: list[FileWriter],
    worker: WriteWorker,
    ranges: list[_RangeStream],
    total: int | None,
    options: _Options,
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
            try:
                async with anyio.create_task_group() as group:
                    for range_stream, writer in zip(ranges, writers, strict=True):
                        group.start_soon(
                            _download_range, range_stream, writer, worker, options, limit
                        )
            except BaseExceptionGroup as errors:
                # The ranges are ours, not the caller's: one error, as for one
                # stream (re-raised as it is: its __cause__ stays the libvirtError).
                raise _first_error(errors)  # noqa: B904
        last = max(writers, key=lambda w: w.end)

        def complete() -> tuple[int, int]:
            last.close()
            data, holes = counts()
            _check_complete(data + holes, total)
            if complete_file is not None:
                complete_file()
            return data, holes

        data, holes = await worker.run_after_writes(complete)
        await reporter.final()
    return data, holes


def _first_error(errors: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that failed a download's ranges: the first that is not the
    cancellation of the ranges that had to stop because of it."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [errors]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = error.exceptions
        else:
            leaves.append(error)
    for error in leaves:
        if not isinstance(error, asyncio.CancelledError):
            return error
    return leaves[0]


def _streams_for(options: _Options, total: int) -> int:
    """How many streams a download into a file uses."""
    if options.checksum:
        return 1  # the hash needs the content in order
    if options.parallel is not None:
        return options.parallel
    return AUTO_PARALLEL if total >= AUTO_PARALLEL_MIN else 1


def _split_range(offset: int, total: int, parallel: int) -> list[tuple[int, int]]:
    """``parallel`` ranges of about equal size, cut at MiB boundaries; one if small."""
    if parallel <= 1 or total < parallel * PARALLEL_MIN_PART:
        return [(offset, total)]
    step = -(-total // parallel // MiB) * MiB
    return [(offset + at, min(step, total - at)) for at in range(0, total, step)]


async def _download_range(
    range_stream: _RangeStream,
    writer: FileWriter,
    worker: WriteWorker,
    options: _Options,
    limit: int,
) -> None:
    """One stream's worth of a download, written behind by the file's worker thread.

    ``limit``: this stream's share of :data:`WRITE_BEHIND`.

    The stream's pump receives on the loop, from inside the stream's events,
    into the write-behind's slots (no coroutine wakes per packet); a worker
    thread writes full slots. Receiving in a worker thread instead was no
    faster, and let libvirt's unbounded client queue grow when the worker
    fell behind the loop's socket reads. While the
    write-behind has no free slot, the connection's socket is not served
    (connections from :func:`aiovirtstream.connect`), so the daemon waits.
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
    """Stops serving a connection's socket while a download's write-behind is full."""

    def __init__(self, stream: AsyncStream) -> None:
        self._impl = get_event_impl()
        self._socket = connection_socket(stream.virstream.connect())
        self._stream = stream
        self._paused = False

    def pause(self) -> None:
        # The disk is behind: stop libvirt reading the socket, or its
        # unbounded client queue takes up the difference.
        if self._socket is not None and not self._paused:
            self._impl.pause_reading(self._socket)
            self._paused = True

    def resume(self) -> None:
        self.release()
        self._stream.resume_pump()

    def release(self) -> None:
        if self._paused:
            self._paused = False
            assert self._socket is not None
            self._impl.resume_reading(self._socket)


def _check_not_past(received: int, more: int, expected: int | None) -> None:
    """Raise at once when the daemon sends more than the range it was asked for."""
    if expected is not None and received + more > expected:
        raise TransferError(
            f"the daemon sent more than the {expected} bytes asked for (at least "
            f"{received + more}): the download was aborted"
        )


def _check_complete(received: int, expected: int | None) -> None:
    if expected is not None and received != expected:
        raise TransferError(
            f"the volume sent {received} bytes where {expected} were expected: "
            "the download is incomplete"
        )


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
    vol: libvirt.virStorageVol, dest: anyio.abc.ByteSendStream, options: _Options
) -> TransferResult:
    _, started = await _start_download(vol, options, one_stream=True)
    total = started.total
    hasher = options.hasher()
    data_bytes = hole_bytes = 0
    async with contextlib.AsyncExitStack() as owned:
        (range_stream,) = started.ranges(vol, options.sparse, owned)
        stream = await range_stream.open()
        async with options.reporter(lambda: (data_bytes, hole_bytes), total) as reporter:
            async with stream:
                items = stream.iter_items() if options.sparse else stream.iter_data()
                async for item in items:
                    size = item.length if isinstance(item, Hole) else len(item)
                    _check_not_past(data_bytes + hole_bytes, size, total)
                    if isinstance(item, Hole):
                        remaining = item.length
                        while remaining > 0:
                            step = min(remaining, MAX_CHUNK)
                            await dest.send(ZERO_CHUNK[:step])
                            remaining -= step
                        hole_bytes += item.length
                        if hasher:
                            await anyio.to_thread.run_sync(hasher.hole, item.length)
                    else:
                        await dest.send(item)
                        data_bytes += len(item)
                        if hasher:
                            await anyio.to_thread.run_sync(hasher.data, item)
            await reporter.final()
    _check_complete(data_bytes + hole_bytes, total)
    return options.result(data_bytes, hole_bytes, hasher)
