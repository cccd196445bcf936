"""Volume-to-volume copies, typically between two hosts, with no file in between.

A download stream from the source and an upload stream into the destination
run at once: one task receives data and holes from the source into a bounded
queue, a second writes them into the destination. While the
queue is full the source connection's socket is not served, so the source
daemon waits for the destination (docs/transfers.md, "Copying between hosts").
"""

from __future__ import annotations

__all__ = ["copy", "COPY_BUFFER"]

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from xml.etree import ElementTree

import anyio
import anyio.to_thread
import libvirt

from .._connection import map_connection_errors
from .._exceptions import SourceTooLargeError, TransferError
from .._stream import (
    DEFAULT_WRITE_BUFFER,
    MAX_CHUNK,
    AsyncStream,
    Hole,
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
from ._relay import Relay
from ._together import run_together

MiB = 1024 * 1024
#: Bytes a copy holds between the two daemons, at most: its own queue, the
#: destination stream's send queue, and what libvirt received from the
#: source before its socket was paused.
COPY_BUFFER = 16 * MiB
_IN_FLIGHT = 4 * MiB
#: Chunks of data handed to the destination at once: its sender thread is
#: woken once for them all.
_BATCH = 4
_QUEUE_ITEMS = (COPY_BUFFER - DEFAULT_WRITE_BUFFER - _IN_FLIGHT) // (_BATCH * MAX_CHUNK)
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
    local disk. At most 16 MiB are held between the two daemons: while the
    destination is behind, the source's socket is not served, so the source
    daemon waits. With ``sparse`` the source's holes are read as holes and
    sent as holes, on the same terms as :func:`upload`: only into a volume
    that holds no data yet (a raw file volume that the copy overwrites whole
    is emptied first with libvirt's zero wipe; into other volumes that hold
    data, holes go as zeroes), and a last hole gives an empty raw destination
    its size back. ``sparse=False`` moves every byte. A volume that is not raw
    (qcow2, ...) is copied as its file, as :func:`download` and :func:`upload`
    do: copy it into a fresh volume of its format. ``checksum`` gives the
    SHA-256 of the bytes copied (holes as zeroes); ``progress`` works as in
    :func:`upload` and counts what was handed to the destination.

    Raises, before anything is sent: :class:`InvalidRangeError` for a negative
    ``offset`` or ``length`` or a range past the source's end;
    :class:`SourceTooLargeError` when the range does not fit in the
    destination; :class:`VolumeBusyError` while another transfer of this
    process uploads into the source or moves the destination (a volume copied
    into itself included); :class:`TransferError` for a volume copied into
    itself through two connections to its daemon. During the copy, an error on
    either side (:class:`ConnectionLostError` naming that side's URI, a broken
    stream) and a cancellation abort both streams before they are raised. Once
    the destination stream finished, the destination is checked as after
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


def _ctime(vol: libvirt.virStorageVol) -> str | None:
    """The volume's file's ctime as libvirt gives it (nanoseconds), if it has one."""
    return ElementTree.fromstring(vol.XMLDesc(0)).findtext("target/timestamps/ctime")


def _check_not_itself(src_vol: libvirt.virStorageVol, dst_vol: libvirt.virStorageVol) -> None:
    """Refuse a copy of a volume into itself through two connections to one daemon.

    :func:`claim_volume` tells volumes apart by URI and key, and a volume
    seen through two URIs (a unix socket and TCP) looks like two; copied into
    itself whole, it would be emptied by the zero wipe before it is read.
    Two hosts may well keep their volumes at the same path, so a key seen
    on both sides is compared by its file's ctime too, to the nanosecond.
    """
    if src_vol.key() != dst_vol.key():  # kept by the Python objects: no round trip
        return
    with map_connection_errors(src_vol.connect(), context="cannot read the source volume"):
        src_ctime = _ctime(src_vol)
    with map_connection_errors(dst_vol.connect(), context="cannot read the destination"):
        dst_ctime = _ctime(dst_vol)
    if src_ctime is not None and src_ctime == dst_ctime:
        raise TransferError(
            f"volume {src_vol.name()!r} ({src_vol.key()}) is the same file on both "
            "connections: a volume cannot be copied into itself"
        )


def _start(
    src_vol: libvirt.virStorageVol, dst_vol: libvirt.virStorageVol, options: TransferOptions
) -> _Started:
    """Size both volumes, check the range, plan the holes, start both streams (worker thread)."""
    _check_not_itself(src_vol, dst_vol)
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


async def _move(
    source: AsyncStream,
    dest: AsyncStream,
    started: _Started,
    options: TransferOptions,
    hasher: ContentHasher | None,
) -> int:
    """Move the range's items from ``source`` to ``dest``; returns the bytes moved."""
    total, plan = started.total, started.plan
    relay = Relay(
        source,
        functools.partial(_check_room, total=total, plan=plan, offset=options.offset),
        max_items=_QUEUE_ITEMS,
        batch=_BATCH,
    )
    written = 0

    async def read_side() -> None:
        try:
            await source.pump(relay, stop_at_hole=options.sparse)
        finally:
            relay.release()
        relay.end()
        if total is not None and relay.count != total:
            raise TransferError(
                f"the source sent {relay.count} bytes where {total} were expected: "
                "the copy is incomplete"
            )

    async def write_side() -> None:
        nonlocal written
        while (item := await relay.get()) is not None:
            if hasher is not None:
                await anyio.to_thread.run_sync(_hash, hasher, item)
            if isinstance(item, Hole):
                await _write_hole(dest, plan, options.offset + written, item.length)
                written += item.length
            else:
                for chunk in item:
                    await dest.write(chunk)
                    written += len(chunk)
        if last_hole := size_restoring_hole(plan, written):
            await dest.send_hole(last_hole)

    await run_together(read_side, write_side)
    return written


def _check_room(end: int, *, total: int | None, plan: UploadPlan, offset: int) -> None:
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


def _hash(hasher: ContentHasher, item: list[bytes] | Hole) -> None:
    if isinstance(item, Hole):
        hasher.hole(item.length)
    else:
        for chunk in item:
            hasher.data(chunk)


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
