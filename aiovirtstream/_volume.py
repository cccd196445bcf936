"""Streams to and from storage volumes (the raw AsyncStream level)."""

from __future__ import annotations

__all__ = ["open_volume_upload", "open_volume_download"]

import libvirt

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
