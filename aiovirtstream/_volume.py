"""Streams to and from storage volumes (the raw AsyncStream level)."""

from __future__ import annotations

__all__ = ["open_volume_upload", "open_volume_download", "lookup_volume"]

import anyio.to_thread
import libvirt

from ._exceptions import map_libvirt_errors
from ._stream import DEFAULT_WRITE_BUFFER, AsyncStream, open_stream


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
    """
    flags = libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM if sparse else 0
    return await open_stream(
        vol.connect(),
        lambda st: vol.upload(st, offset, length, flags),
        sparse=sparse,
        description=f"upload to volume {_volume_name(vol)!r}",
        write_buffer=write_buffer,
    )


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
    :meth:`AsyncStream.iter_items`.
    """
    flags = libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM if sparse else 0
    return await open_stream(
        vol.connect(),
        lambda st: vol.download(st, offset, length, flags),
        sparse=sparse,
        description=f"download from volume {_volume_name(vol)!r}",
    )


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
    with map_libvirt_errors(context=f"cannot find volume {name_or_path!r} {where}"):
        return await anyio.to_thread.run_sync(lookup)
