"""Streams to and from storage volumes (the raw AsyncStream level)."""

from __future__ import annotations

__all__ = [
    "open_volume_upload",
    "open_upload_stream",
    "upload_call",
    "open_volume_download",
    "start_volume_download",
    "download_description",
    "start_volume_upload",
    "upload_description",
    "lookup_volume",
]

from collections.abc import Awaitable, Callable

import libvirt

from .._connection import map_connection_errors
from .._stream import DEFAULT_WRITE_BUFFER, AsyncStream, open_stream, start_stream_blocking
from .._workers import run_to_the_end, runner_for
from ._claims import take_claim
from ._size import (
    check_download_range,
    check_not_negative,
    check_upload_range,
    volume_size,
)


def _volume_name(vol: libvirt.virStorageVol) -> str:
    try:
        return str(vol.name())
    except libvirt.libvirtError:  # pragma: no cover - name() is local
        return "?"


async def open_volume_upload(
    vol: libvirt.virStorageVol,
    *,
    offset: int = 0,
    length: int = 0,
    sparse: bool = False,
    write_buffer: int = DEFAULT_WRITE_BUFFER,
) -> AsyncStream:
    """Open a stream that writes into ``vol`` from ``offset`` (``length`` 0: to the end).

    With ``sparse=True`` the stream carries holes
    (``VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM``): use :meth:`AsyncStream.send_hole`.
    A negative ``offset`` or ``length``, or a range past the volume's end
    (for a volume that is not raw: an offset past its file's end), raises
    :class:`aiovirtstream.InvalidRangeError` before the stream opens.
    The stream claims ``vol`` as being uploaded into until it ends
    (:class:`aiovirtstream.VolumeBusyError` if another transfer or stream
    of this process has it).
    """
    check_not_negative(offset, length)
    call = upload_call(vol, offset, length, sparse)
    if offset or length:
        call = _checked(call, lambda: check_upload_range(volume_size(vol), offset, length))
    return await _claimed(
        vol, upload=True, open_=lambda: open_upload_stream(vol, call, sparse, write_buffer)
    )


async def _claimed(
    vol: libvirt.virStorageVol, *, upload: bool, open_: Callable[[], Awaitable[AsyncStream]]
) -> AsyncStream:
    """The stream ``open_()`` opens, holding a claim on ``vol`` until it ends."""
    release = take_claim(vol, upload=upload)
    try:
        stream = await open_()
    except BaseException:
        release()
        raise
    stream.add_close_callback(release)
    return stream


async def open_upload_stream(
    vol: libvirt.virStorageVol,
    call: Callable[[libvirt.virStream], object],
    sparse: bool,
    write_buffer: int = DEFAULT_WRITE_BUFFER,
) -> AsyncStream:
    """:func:`open_volume_upload` without its checks and its claim, for callers
    that made their own."""
    return await open_stream(
        vol.connect(),
        call,
        sparse=sparse,
        description=upload_description(vol),
        write_buffer=write_buffer,
    )


def _checked(
    call: Callable[[libvirt.virStream], object], check: Callable[[], object]
) -> Callable[[libvirt.virStream], object]:
    """``call`` after ``check``, in the same worker-thread hop."""

    def checked(virstream: libvirt.virStream) -> object:
        check()
        return call(virstream)

    return checked


def upload_description(vol: libvirt.virStorageVol) -> str:
    """How an upload stream into ``vol`` is named in errors."""
    return f"upload to volume {_volume_name(vol)!r}"


def start_volume_upload(
    vol: libvirt.virStorageVol, offset: int, length: int, sparse: bool
) -> libvirt.virStream:
    """:func:`open_volume_upload`'s round trip alone (worker thread); wrap the
    result with ``adopt_stream(..., description=upload_description(vol))``."""
    call = upload_call(vol, offset, length, sparse)
    virstream, _ = start_stream_blocking(vol.connect(), call, upload_description(vol))
    return virstream


def upload_call(
    vol: libvirt.virStorageVol, offset: int, length: int, sparse: bool
) -> Callable[[libvirt.virStream], object]:
    """The libvirt call that starts an upload stream (for :func:`open_upload_stream`)."""
    flags = libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM if sparse else 0
    return lambda st: vol.upload(st, offset, length, flags)


async def open_volume_download(
    vol: libvirt.virStorageVol,
    *,
    offset: int = 0,
    length: int = 0,
    sparse: bool = False,
) -> AsyncStream:
    """Open a stream that reads ``vol`` from ``offset`` (``length`` 0: to the end).

    With ``sparse=True`` (``VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM``) holes
    come back as :class:`Hole` from ``read(stop_at_hole=True)`` and
    :meth:`AsyncStream.iter_items`. A volume that is not raw (qcow2, ...)
    streams its file as it is on the host, not the guest's disk. A negative
    ``offset`` or ``length``, or a range past the end (of the file, for a
    volume that is not raw), raises :class:`aiovirtstream.InvalidRangeError`
    before the stream opens. The stream claims ``vol`` as being downloaded
    from until it ends (:class:`aiovirtstream.VolumeBusyError` if an upload
    into it runs in this process).
    """
    check_not_negative(offset, length)
    call = _download_call(vol, offset, length, sparse)
    if offset or length:
        call = _checked(call, lambda: check_download_range(volume_size(vol), offset, length))
    return await _claimed(
        vol,
        upload=False,
        open_=lambda: open_stream(
            vol.connect(), call, sparse=sparse, description=download_description(vol)
        ),
    )


def download_description(vol: libvirt.virStorageVol) -> str:
    """How a download stream from ``vol`` is named in errors."""
    return f"download from volume {_volume_name(vol)!r}"


def start_volume_download(
    vol: libvirt.virStorageVol, offset: int, length: int, sparse: bool
) -> libvirt.virStream:
    """:func:`open_volume_download`'s round trip alone (worker thread).

    For callers that start several ranges together in threads; wrap the
    result with ``adopt_stream(..., description=download_description(vol))``.
    """
    call = _download_call(vol, offset, length, sparse)
    virstream, _ = start_stream_blocking(vol.connect(), call, download_description(vol))
    return virstream


def _download_call(
    vol: libvirt.virStorageVol, offset: int, length: int, sparse: bool
) -> Callable[[libvirt.virStream], object]:
    flags = libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM if sparse else 0
    return lambda st: vol.download(st, offset, length, flags)


async def lookup_volume(
    conn: libvirt.virConnect, name_or_path: str, *, pool: str | None = None
) -> libvirt.virStorageVol:
    """Find a volume by ``pool`` and name, or by path (or key) without ``pool``.

    Runs off the loop thread (a lookup is a round trip to the daemon);
    raises :class:`aiovirtstream.NotFoundError` when there is no such volume.
    """

    def lookup() -> libvirt.virStorageVol:
        if pool is not None:
            return conn.storagePoolLookupByName(pool).storageVolLookupByName(name_or_path)
        if name_or_path.startswith("/"):
            return conn.storageVolLookupByPath(name_or_path)
        return conn.storageVolLookupByKey(name_or_path)

    where = f"in pool {pool!r}" if pool is not None else "by path or key"
    with map_connection_errors(conn, context=f"cannot find volume {name_or_path!r} {where}"):
        return await run_to_the_end(lookup, runner_for(conn))
