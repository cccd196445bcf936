"""``upload()``: a file, a pipe or an async iterable into a volume."""

from __future__ import annotations

__all__ = [
    "upload",
    "UploadSource",
]

import errno
import functools
import os
import stat
import urllib.parse
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from typing import IO, cast

import anyio.abc
import anyio.to_thread
import libvirt

from .._connection import map_connection_errors
from .._exceptions import (
    SourceNotFoundError,
    SourceTooLargeError,
    TransferError,
)
from .._stream import (
    MAX_CHUNK,
    abort_quietly,
    adopt_stream,
    check_stream_events,
)
from .._volume import (
    VolumeSize,
    check_not_negative,
    claim_volume,
    open_upload_stream,
    start_volume_upload,
    upload_call,
    upload_description,
)
from .._workers import (
    run_or_back_out,
    runner_for,
)
from ._extents import zero_runs
from ._filereader import FileReader
from ._files import has_fileno
from ._options import ProgressTarget, TransferOptions, TransferResult, closing_progress
from ._plan import (
    UploadPlan,
    check_upload_stored,
    plan_upload,
    prepare_upload,
    size_restoring_hole,
)

UploadSource = (
    str | os.PathLike[str] | IO[bytes] | AsyncIterable[bytes] | anyio.abc.ByteReceiveStream
)

#: Hosts of a connection URI that name this machine (no host: a local daemon).
_THIS_HOST = frozenset({None, "localhost", "127.0.0.1", "::1"})


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
    is how many bytes of the source are sent (0: all of it): a source with
    fewer raises :class:`TransferError` (a file before anything is sent),
    as does an async iterable that yields more (nothing past ``length`` is
    sent); a file, a pipe or a device is read up to ``length``. The
    volume's own file raises :class:`TransferError` before anything is
    sent. A file that does not fit in the volume raises
    :class:`SourceTooLargeError` before anything is sent (a pipe or an
    iterable, whose size is unknown, when it overflows; the upload is then
    aborted). Holes are sent as holes only into
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
    async with closing_progress(progress):
        check_not_negative(offset, length)
        options = TransferOptions(
            sparse, offset, length, progress, progress_interval, checksum, detect_zeroes
        )
        transfer = _upload_for(vol, source, options)
        with claim_volume(vol, upload=True):
            return await transfer()


def _upload_for(
    vol: libvirt.virStorageVol, source: UploadSource, options: TransferOptions
) -> Callable[[], Awaitable[TransferResult]]:
    """The upload to run for this kind of source (a ``TypeError`` for others)."""
    if isinstance(source, (str, os.PathLike)):
        return functools.partial(_upload_file, vol, source, options)
    if has_fileno(source):
        return functools.partial(_upload_file, vol, cast(IO[bytes], source), options)
    if isinstance(source, AsyncIterable):
        return functools.partial(_upload_iterable, vol, source, options, exact=True)
    raise TypeError(
        f"cannot upload from {type(source).__name__}: pass a path, a binary file, "
        "or an async iterable of bytes"
    )


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
    plan: UploadPlan | None  # None: not seekable, read in order
    virstream: libvirt.virStream | None

    def back_out(self) -> None:
        """Abort the stream and close what we opened (worker thread)."""
        if self.virstream is not None:
            abort_quietly(self.virstream)
        if self.owned:
            os.close(self.fd)


def _open_and_start_upload(
    source: str | os.PathLike[str] | IO[bytes], vol: libvirt.virStorageVol, options: TransferOptions
) -> _UploadStart:
    """Open the source, size it and the volume, check the room and start the
    stream, in one worker-thread hop (a pipe or socket: no stream yet)."""
    fd, position, owned, name = _open_source(source)
    try:
        size, seekable = _source_size(fd, name)
        if not seekable:
            return _UploadStart(fd, position, owned, 0, None, None)
        available = max(size - position, 0)
        amount = min(options.length, available) if options.length else available
        plan = prepare_upload(
            vol,
            options,
            amount,
            repr(name),
            check_volume=functools.partial(_check_not_the_volume, fd, vol, name=name),
            check_source=functools.partial(_check_long_enough, name, position, available, options),
        )
        virstream = start_volume_upload(vol, options.offset, plan.stream_length, plan.holes)
    except BaseException:
        if owned:
            os.close(fd)
        raise
    return _UploadStart(fd, position, owned, amount, plan, virstream)


def _check_not_the_volume(
    fd: int, vol: libvirt.virStorageVol, volume: VolumeSize, *, name: str
) -> None:
    """Refuse a source that is the volume's own file (or device) on this host.

    The upload would overwrite what it is reading, and a source that covers
    the volume whole would be wiped before it is read. A volume whose path
    does not exist here (not a file), or of a connection to another host (a
    file of the same name here is another file), is not compared.
    """
    with map_connection_errors(vol.connect(), context="cannot tell the volume's host"):
        if urllib.parse.urlsplit(vol.connect().getURI()).hostname not in _THIS_HOST:
            return
    path = volume.path
    if path is None:
        return
    try:
        target = os.stat(path)
    except (OSError, ValueError):
        return
    info = os.fstat(fd)
    same_file = (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino)
    same_device = (
        stat.S_ISBLK(info.st_mode)
        and stat.S_ISBLK(target.st_mode)
        and info.st_rdev == target.st_rdev
    )
    if same_file or same_device:
        raise TransferError(
            f"upload source {name!r} is the volume's own file ({path}): uploading volume "
            f"{volume.name!r} into itself would overwrite (or first wipe) what it reads. "
            "Copy the file elsewhere and upload the copy, or upload into another volume"
        )


def _check_long_enough(name: str, position: int, available: int, options: TransferOptions) -> None:
    """Refuse a file with fewer bytes than the ``length`` asked for."""
    if options.length and available < options.length:
        start = f" from position {position}" if position else ""
        raise TransferError(
            f"upload source {name!r} has {available} bytes{start}, fewer than the "
            f"length {options.length} asked for: nothing was sent. Pass a length of at "
            f"most {available}, or 0 to upload all of it"
        )


async def _upload_file(
    vol: libvirt.virStorageVol,
    source: str | os.PathLike[str] | IO[bytes],
    options: TransferOptions,
) -> TransferResult:
    check_stream_events(vol.connect())
    start = await run_or_back_out(
        lambda: _open_and_start_upload(source, vol, options),
        _UploadStart.back_out,
        runner_for(vol.connect()),
    )
    fd, position, owned = start.fd, start.position, start.owned
    amount, plan = start.amount, start.plan
    reader: FileReader | None = None
    try:
        if plan is None:
            if owned:
                return await _upload_iterable(vol, _iter_special(fd), options, exact=False)
            source_file = cast(IO[bytes], source)
            return await _upload_iterable(vol, _iter_file(source_file), options, exact=False)
        virstream, start.virstream = start.virstream, None
        assert virstream is not None
        stream = await adopt_stream(
            virstream, None, sparse=plan.holes, description=upload_description(vol)
        )
        hasher = options.hasher()
        reader = FileReader(
            fd,
            position,
            position + amount,
            walk_extents=options.sparse,
            holes_from=plan.holes_from_source(options.offset, position),
            detect_zeroes=options.detect_zeroes,
            hasher=hasher,
            close_fd=owned,
            trailing_hole=size_restoring_hole(plan, amount),
        )
        counts = lambda: (stream.bytes_sent, stream.hole_bytes_sent)  # noqa: E731
        async with options.reporter(counts, amount) as reporter:
            async with stream:
                await stream.send_all(reader.items())
            await check_upload_stored(vol, options.offset + amount)
            await reporter.final()
        return options.result(stream.bytes_sent, amount - stream.bytes_sent, hasher)
    finally:
        if reader is not None:
            reader.close_unless_started()
        elif owned:
            os.close(fd)  # an error before the reader was made


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
    vol: libvirt.virStorageVol,
    source: AsyncIterable[bytes],
    options: TransferOptions,
    *,
    exact: bool,
) -> TransferResult:
    """Upload what ``source`` yields; with a ``length`` it must yield that many bytes.

    ``exact``: the caller's iterable, which may yield no more than ``length``
    (read on to its end to see that it does not, but a byte stream, which
    its peer may keep open, only up to ``length``); otherwise a pipe or a
    device read up to ``length``. Zero runs found with ``detect_zeroes`` go
    as holes, so a volume that a ``length`` overwrites whole is emptied
    first, as for a file.
    """
    offset, length = options.offset, options.length
    plan = await plan_upload(vol, options, length or None, empty=options.detect_zeroes)
    read_to_end = exact and not isinstance(source, anyio.abc.ByteReceiveStream)
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
                    if exact:
                        raise TransferError(
                            f"the upload source yielded more than the {length} bytes of its "
                            "length: nothing past them was sent, and the upload was aborted. "
                            "Pass the source's whole length, or 0 to upload all of it"
                        )
                    data = data[: length - position]  # the first length bytes of a pipe
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
                if length and position >= length and not read_to_end:
                    break
            if length and position < length:
                raise TransferError(
                    f"the upload source ended after {position} bytes, before the length "
                    f"{length} it was given: the upload was aborted, and the volume may "
                    "hold part of it. Upload the whole source again, or pass the length "
                    "it has"
                )
            if last_hole := size_restoring_hole(plan, position):
                await stream.send_hole(last_hole)
        await check_upload_stored(vol, offset + position)
        await reporter.final()
    return options.result(stream.bytes_sent, position - stream.bytes_sent, hasher)
