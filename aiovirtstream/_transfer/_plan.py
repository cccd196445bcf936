"""How an upload treats holes given what the volume holds, and the check once it finished."""

from __future__ import annotations

__all__ = [
    "UploadPlan",
    "make_upload_plan",
    "check_room",
    "plan_upload",
    "prepare_upload",
    "empty_before_overwriting",
    "check_stored",
    "check_upload_stored",
    "size_restoring_hole",
]

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import libvirt

from .._exceptions import (
    SourceTooLargeError,
    VolumeChangedError,
    libvirt_error_to_exception,
)
from .._volume import (
    VolumeSize,
    check_upload_range,
    volume_size,
)
from .._workers import (
    run_to_the_end,
    runner_for,
)
from ._options import TransferOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UploadPlan:
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


async def plan_upload(
    vol: libvirt.virStorageVol, options: TransferOptions, amount: int | None, *, empty: bool
) -> UploadPlan:
    """:func:`prepare_upload` off the loop, for a source of ``amount`` bytes (None: not known)."""
    prepare = functools.partial(
        prepare_upload, vol, options, amount, "the upload source", empty=empty
    )
    return await run_to_the_end(prepare, runner_for(vol.connect()))


def prepare_upload(
    vol: libvirt.virStorageVol,
    options: TransferOptions,
    amount: int | None,
    name: str,
    *,
    empty: bool = True,
    check_volume: Callable[[VolumeSize], object] | None = None,
    check_source: Callable[[], object] | None = None,
) -> UploadPlan:
    """Size the volume, ``check_volume(size)``, check the range and the room, then
    ``check_source()``,
    then (``empty``) empty a volume the source overwrites whole
    (:func:`empty_before_overwriting`), and plan; in a worker thread. A range
    or a source refused leaves the volume as it was."""
    size = volume_size(vol)
    if check_volume is not None:
        check_volume(size)
    check_room(options, amount, name, size)
    if check_source is not None:
        check_source()
    if empty and amount is not None:
        size = empty_before_overwriting(vol, options, amount, size)
    return make_upload_plan(options, amount, name, size)


def check_room(
    options: TransferOptions, amount: int | None, name: str, size: VolumeSize
) -> int | None:
    """The room from the offset to the volume's end (None: a container file, which
    grows); raises :class:`InvalidRangeError` for a range past the end, and
    :class:`SourceTooLargeError` for ``amount`` bytes that do not fit."""
    offset = options.offset
    room = check_upload_range(size, offset, options.length)
    if amount is not None and room is not None and amount > room:
        raise SourceTooLargeError(
            f"{name} has {amount} bytes to upload at offset {offset}, but the "
            f"volume holds {size.capacity} bytes: resize the volume or pass a smaller length"
        )
    return room


def make_upload_plan(
    options: TransferOptions, amount: int | None, name: str, size: VolumeSize
) -> UploadPlan:
    """Check the range and the room, and choose how holes go (``amount`` None: not known)."""
    offset = options.offset
    room = check_room(options, amount, name, size)
    # libvirt stores an uploaded hole by seeking over it and truncating the
    # volume's file at the hole's end (virFDStreamThreadDoWrite in
    # src/util/virfdstream.c): whatever the file held in the hole stays, and
    # what followed it is cut off.
    if not options.sparse:
        return UploadPlan(None, room, amount or room or 0, False)
    if size.container:
        # Past the file's end a hole only makes the file longer, and reads
        # as zeroes: holes go as holes from there, as zeroes before it.
        start = max(offset, size.physical) if size.physical is not None else None
        if start is not None and amount is not None and offset + amount <= start:
            start = None  # every hole lies inside the file
        return UploadPlan(start, None, amount or 0, False)
    if size.allocation == 0:
        # Nothing to keep: every hole goes as a hole, and a last one gives
        # the volume its size back.
        assert room is not None
        return UploadPlan(offset, room, room, True)
    if size.fully_allocated:
        logger.warning(
            "the volume is fully allocated (%d bytes: a preallocated file, or a block "
            "device): holes are sent as zeroes, and it stays fully allocated",
            size.allocation,
        )
        return UploadPlan(None, room, amount or room or 0, False)
    logger.warning(
        "the volume holds data (%d bytes allocated): holes are sent as zeroes, "
        "since libvirt would keep the old data inside them; to keep the upload "
        "sparse, upload into a new volume, or a source of the volume's size at "
        "offset 0 (the volume is then emptied first)",
        size.allocation,
    )
    return UploadPlan(None, room, amount or room or 0, False)


def empty_before_overwriting(
    vol: libvirt.virStorageVol, options: TransferOptions, amount: int, size: VolumeSize
) -> VolumeSize:
    """Empty a volume the source overwrites whole, if that is cheap; returns its size now.

    Holes can be sent only into a volume that holds no data (:func:`make_upload_plan`);
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
        # make_upload_plan's warning.
        logger.debug("could not empty the volume before overwriting it: %s", error)
        return size
    size = volume_size(vol)
    logger.debug("emptied the volume before overwriting it (allocation now %d)", size.allocation)
    return size


def check_stored(vol: libvirt.virStorageVol, end: int) -> None:
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


def size_restoring_hole(plan: UploadPlan, sent: int) -> int:
    """A last hole up to the volume's end: libvirt cut the volume at the last hole."""
    if not plan.restore_size or plan.room is None:
        return 0
    return max(plan.room - sent, 0)


async def check_upload_stored(vol: libvirt.virStorageVol, end: int) -> None:
    """:func:`check_stored` off the loop."""
    await run_to_the_end(functools.partial(check_stored, vol, end), runner_for(vol.connect()))
