"""Volume-to-volume copies, typically between two hosts, with no file in between.

A download stream from the source and an upload stream into the destination
run at once: one task reads data and holes from the source, a bounded queue
hands them to a second task that writes them into the destination. While the
queue is full the source connection's socket is not served, so the source
daemon waits for the destination (docs/transfers.md, "Copying between hosts").
"""

from __future__ import annotations

__all__ = ["copy", "COPY_BUFFER"]

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import anyio
import anyio.to_thread
import libvirt

from .._connection import connection_socket
from .._events import get_event_impl
from .._exceptions import SourceTooLargeError, TransferError
from .._stream import (
    DEFAULT_WRITE_BUFFER,
    MAX_CHUNK,
    AsyncStream,
    Hole,
    StreamItem,
    abort_quietly,
    adopt_stream,
    check_stream_events,
)
from .._volume import (
    VolumeSize,
    check_download_range,
    check_not_negative,
    claim_volume,
    download_description,
    start_volume_download,
    start_volume_upload,
    upload_description,
    volume_size,
)
from .._workers import run_or_back_out, run_to_the_end

# upload()'s planning of holes and its checks, shared so that a copy treats
# the destination exactly as an upload into it would.
from ._options import (
    ContentHasher,
    ProgressTarget,
    TransferOptions,
    TransferResult,
    closing_progress,
)
from ._plan import (
    UploadPlan,
    check_stored,
    empty_before_overwriting,
    make_upload_plan,
    size_restoring_hole,
)
from ._ranges import first_error

MiB = 1024 * 1024
#: Bytes a copy holds between the two daemons: the queue between its two
#: tasks plus the destination stream's send queue.
COPY_BUFFER = 16 * MiB
#: The largest item read from the source at a time.
READ_SIZE = 1 * MiB
_QUEUE_ITEMS = (COPY_BUFFER - DEFAULT_WRITE_BUFFER) // READ_SIZE
_ZEROES = bytes(MAX_CHUNK)


async def copy(
    src_vol: libvirt.virStorageVol,
    dst_vol: libvirt.virStorageVol,
    *,
    sparse: bool = True,
    offset: int = 0,
    length: int = 0,
    progress: ProgressTarget | None = None,
    progress_interval: float = 0.1,
    checksum: bool = False,
) -> TransferResult:
    """Stream ``src_vol`` into ``dst_vol``, typically on two connections (two hosts).

    The bytes from ``offset`` (``length`` 0: up to the source's end) are
    written at the same offset of the destination; nothing is written to a
    local disk. At most :data:`COPY_BUFFER` bytes are held between the two
    daemons: while the destination is behind, the source's socket is not
    served, so the source daemon waits. With ``sparse`` the source's holes are
    read as holes and sent as holes, on the same terms as :func:`upload`:
    only into a volume that holds no data yet (a raw file volume that the
    copy overwrites whole is emptied first with libvirt's zero wipe; into
    other volumes that hold data, holes go as zeroes), and a last hole gives
    an empty raw destination its size back. ``sparse=False`` moves every
    byte. A volume that is not raw (qcow2, ...) is copied as its file, as
    :func:`download` and :func:`upload` do: copy it into a fresh volume of
    its format. ``checksum`` gives the SHA-256 of the bytes copied (holes as
    zeroes); ``progress`` works as in :func:`upload` and counts what was
    handed to the destination.

    Raises, before anything is sent: :class:`InvalidRangeError` for a
    negative ``offset`` or ``length`` or a range past the source's end;
    :class:`SourceTooLargeError` when the range does not fit in the
    destination; :class:`VolumeBusyError` while another transfer of this
    process uploads into the source or moves the destination (a volume
    copied into itself included). During the copy, an error on either side
    (:class:`ConnectionLostError` naming that side's URI, a broken stream)
    and a cancellation abort both streams before they are raised. Once the
    destination stream finished, the destination is checked as after
    :func:`upload` (:class:`VolumeChangedError`).
    """
    async with closing_progress(progress):
        check_not_negative(offset, length)
        options = TransferOptions(sparse, offset, length, progress, progress_interval, checksum)
        with claim_volume(src_vol, upload=False), claim_volume(dst_vol, upload=True):
            return await _copy(src_vol, dst_vol, options)


@dataclass(slots=True)
class _Started:
    """Both streams started (worker thread), not yet adopted on the loop."""

    total: int | None  # bytes the source range holds (None: not known)
    plan: UploadPlan
    source: libvirt.virStream | None
    dest: libvirt.virStream | None

    def back_out(self) -> None:
        """Abort the streams not adopted yet (worker thread)."""
        for virstream in (self.source, self.dest):
            if virstream is not None:
                abort_quietly(virstream)
        self.source = self.dest = None

    async def aclose(self) -> None:
        if self.source is not None or self.dest is not None:
            with anyio.CancelScope(shield=True):
                await run_to_the_end(self.back_out)


def _check_fits(source: VolumeSize, dest: VolumeSize, offset: int, total: int | None) -> None:
    """Refuse a source range that does not fit in the destination (a container file grows)."""
    if total is None or dest.container or offset + total <= dest.capacity:
        return
    room = max(dest.capacity - offset, 0)
    raise SourceTooLargeError(
        f"{source.describe()} has {total} bytes to copy from offset {offset}, but "
        f"{dest.describe()} has room for {room} bytes from there: resize the destination "
        "or pass a smaller length"
    )


def _start(
    src_vol: libvirt.virStorageVol, dst_vol: libvirt.virStorageVol, options: TransferOptions
) -> _Started:
    """Size both volumes, check the range, plan the holes, start both streams (worker thread)."""
    offset = options.offset
    source_size = volume_size(src_vol)
    total = check_download_range(source_size, offset, options.length)
    dest_size = volume_size(dst_vol)
    _check_fits(source_size, dest_size, offset, total)
    source = start_volume_download(src_vol, offset, options.length, options.sparse)
    try:
        if total is not None:
            dest_size = empty_before_overwriting(dst_vol, options, total, dest_size)
        # The range's size is the upload's amount; its length check is _check_fits'.
        plan = make_upload_plan(
            dataclasses.replace(options, length=0), total, source_size.describe(), dest_size
        )
        dest = start_volume_upload(dst_vol, offset, plan.stream_length, plan.holes)
    except BaseException:
        abort_quietly(source)
        raise
    return _Started(total, plan, source, dest)


async def _copy(
    src_vol: libvirt.virStorageVol, dst_vol: libvirt.virStorageVol, options: TransferOptions
) -> TransferResult:
    check_stream_events(src_vol.connect())
    check_stream_events(dst_vol.connect())
    started = await run_or_back_out(
        functools.partial(_start, src_vol, dst_vol, options), _Started.back_out
    )
    hasher = options.hasher()
    async with contextlib.AsyncExitStack() as owned:
        owned.push_async_callback(started.aclose)
        virstream, started.source = started.source, None
        assert virstream is not None
        source = await adopt_stream(
            virstream, None, sparse=options.sparse, description=download_description(src_vol)
        )
        virstream, started.dest = started.dest, None
        assert virstream is not None
        owned.push_async_exit(source)  # finished on success, else aborted
        dest = await adopt_stream(
            virstream,
            None,
            sparse=started.plan.holes,
            description=upload_description(dst_vol),
        )

        def counts() -> tuple[int, int]:
            return dest.bytes_sent, dest.hole_bytes_sent

        async with options.reporter(counts, started.total) as reporter:
            async with dest:  # finished first; an error there aborts the source too
                position = await _move(source, dest, started, options, hasher)
            await run_to_the_end(
                functools.partial(check_stored, dst_vol, options.offset + position)
            )
            await reporter.final()
        data_bytes = dest.bytes_sent
    return options.result(data_bytes, position - data_bytes, hasher)


class _SourcePause:
    """Stops serving the source connection's socket while the queue is full."""

    def __init__(self, source: AsyncStream) -> None:
        self._impl = get_event_impl()
        self._socket = connection_socket(source.virstream.connect())
        self._paused = False

    def pause(self) -> None:
        # libvirt's client queues what it reads from the socket without limit.
        if self._socket is not None and not self._paused:
            self._impl.pause_reading(self._socket)
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            assert self._socket is not None
            self._impl.resume_reading(self._socket)


async def _move(
    source: AsyncStream,
    dest: AsyncStream,
    started: _Started,
    options: TransferOptions,
    hasher: ContentHasher | None,
) -> int:
    """Move the range's items from ``source`` to ``dest``; returns the bytes moved."""
    send, receive = anyio.create_memory_object_stream[StreamItem](_QUEUE_ITEMS)
    total, plan = started.total, started.plan
    written = 0

    async def read_side() -> None:
        pause = _SourcePause(source)
        received = 0
        try:
            async with send:
                while item := await _read(source, options.sparse):
                    size = item.length if isinstance(item, Hole) else len(item)
                    _check_room(received + size, total, plan, options.offset)
                    received += size
                    if hasher is not None:
                        await _hash(hasher, item)
                    try:
                        send.send_nowait(item)
                    except anyio.WouldBlock:
                        pause.pause()
                        await send.send(item)
                        pause.resume()
        finally:
            pause.resume()
        if total is not None and received != total:
            raise TransferError(
                f"the source sent {received} bytes where {total} were expected: "
                "the copy is incomplete"
            )

    async def write_side() -> None:
        nonlocal written
        async with receive:
            async for item in receive:
                if isinstance(item, Hole):
                    await _write_hole(dest, plan, options.offset + written, item.length)
                    written += item.length
                else:
                    await dest.write(item)
                    written += len(item)
        if last_hole := size_restoring_hole(plan, written):
            await dest.send_hole(last_hole)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(read_side)
            group.start_soon(write_side)
    except BaseExceptionGroup as errors:
        # Both tasks are the copy's own: one error, as for one stream.
        raise first_error(errors)  # noqa: B904
    return written


async def _read(source: AsyncStream, sparse: bool) -> StreamItem:
    if sparse:
        return await source.read(READ_SIZE, stop_at_hole=True)
    return await source.read(READ_SIZE)


def _check_room(end: int, total: int | None, plan: UploadPlan, offset: int) -> None:
    """Raise at once when the source sends past its range or past the destination's room."""
    if total is not None and end > total:
        raise TransferError(
            f"the source sent more than the {total} bytes asked for (at least {end}): "
            "the copy was aborted"
        )
    if plan.room is not None and end > plan.room:
        raise SourceTooLargeError(
            f"the source has more than {plan.room} bytes, the room in the destination "
            f"from offset {offset}: the copy was aborted"
        )


async def _hash(hasher: ContentHasher, item: StreamItem) -> None:
    if isinstance(item, Hole):
        await anyio.to_thread.run_sync(hasher.hole, item.length)
    else:
        await anyio.to_thread.run_sync(hasher.data, item)


async def _write_hole(dest: AsyncStream, plan: UploadPlan, position: int, length: int) -> None:
    """A source hole at volume ``position``: zeroes where the plan keeps no holes, else a hole."""
    zeroes = length
    if plan.holes_from is not None:
        zeroes = min(max(plan.holes_from - position, 0), length)
    while zeroes > 0:
        step = min(zeroes, MAX_CHUNK)
        await dest.write(_ZEROES[:step])
        zeroes -= step
        length -= step
    if length:
        await dest.send_hole(length)
