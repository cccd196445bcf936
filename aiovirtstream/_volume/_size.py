"""How many bytes a volume's streams carry, and the checks of offsets and lengths against it.

libvirt streams a volume's file or device as it is on the host
(``virStorageBackendVolDownloadLocal`` and ``...UploadLocal`` in
src/storage/storage_util.c open ``target.path`` and copy its bytes). For a
raw volume that is the guest's disk, ``capacity`` bytes long. For a file in
another format (qcow2, vmdk, ...) it is the container file, whose size is
the volume's ``physical`` size, not its capacity (the guest's virtual size).
"""

from __future__ import annotations

__all__ = [
    "VolumeSize",
    "volume_size",
    "check_not_negative",
    "check_download_range",
    "check_upload_range",
]

import dataclasses
from dataclasses import dataclass
from xml.etree import ElementTree

import libvirt

from .._connection import map_connection_errors
from .._exceptions import InvalidRangeError


@dataclass(frozen=True, slots=True)
class VolumeSize:
    """What libvirt says of a volume's size (see the module docstring)."""

    name: str
    capacity: int
    allocation: int
    physical: int | None  # the file's (or device's) size; None: libvirt did not say
    kind: str | None  # the volume's type: "file", "block", "network", ...
    format: str | None  # the target format: "raw", "qcow2", ...
    path: str | None = None  # the volume's path on its host

    @property
    def container(self) -> bool:
        """A file in a format other than raw: its streams carry the file itself."""
        return self.kind == "file" and self.format not in (None, "raw")

    @property
    def raw_file(self) -> bool:
        return self.kind == "file" and self.format == "raw"

    @property
    def fully_allocated(self) -> bool:
        """No hole to keep: a preallocated file, or a block device (a ``dir``
        pool lists a device node in its folder as a raw file whose allocation
        is its size: virStorageBackendRefreshLocal sets every volume's type to
        file)."""
        return self.allocation // 512 >= self.capacity // 512

    @property
    def streamed(self) -> int | None:
        """Bytes a download from offset 0 carries (None: not known)."""
        return self.physical if self.container else self.capacity

    def describe(self) -> str:
        if self.container:
            return f"volume {self.name!r} (a {self.format} file of {self.physical} bytes)"
        return f"volume {self.name!r} ({self.capacity} bytes)"


def _bytes(description: ElementTree.Element, tag: str) -> int | None:
    # virStorageVolDefFormat (src/conf/storage_conf.c) writes every size with unit='bytes'.
    element = description.find(tag)
    return None if element is None or element.text is None else int(element.text)


def volume_size(vol: libvirt.virStorageVol) -> VolumeSize:
    """Ask the daemon for ``vol``'s sizes: one round trip, so in a worker thread.

    The volume's XML has them all, its format too (``<physical>`` since
    libvirt 3.0; before, the file's size is asked with
    ``VIR_STORAGE_VOL_GET_PHYSICAL``, which also came with 3.0).
    """
    with map_connection_errors(vol.connect(), context="cannot read the volume's size"):
        name = str(vol.name())
        text = vol.XMLDesc(0)
    description = ElementTree.fromstring(text)
    fmt = description.find("target/format")
    size = VolumeSize(
        name=name,
        capacity=_bytes(description, "capacity") or 0,
        allocation=_bytes(description, "allocation") or 0,
        physical=_bytes(description, "physical"),
        kind=description.get("type"),
        format=fmt.get("type") if fmt is not None else None,
        path=description.findtext("target/path"),
    )
    if size.container and size.physical is None:  # pragma: no cover - libvirt < 3.0
        try:
            physical = int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])
        except (libvirt.libvirtError, AttributeError):
            return size
        size = dataclasses.replace(size, physical=physical)
    return size


def check_not_negative(offset: int, length: int) -> None:
    """Refuse a negative ``offset`` or ``length`` (before anything is asked or sent)."""
    if offset < 0:
        raise InvalidRangeError(
            f"offset {offset} is negative: pass the byte position in the volume to start at "
            "(0 for its start)"
        )
    if length < 0:
        raise InvalidRangeError(
            f"length {length} is negative: pass the number of bytes to move, "
            "or 0 for everything up to the end"
        )


def check_download_range(size: VolumeSize, offset: int, length: int) -> int | None:
    """The bytes a download of ``[offset, offset + length)`` carries (``length``
    0: to the end); None if the volume's size is not known. Raises
    :class:`InvalidRangeError` for a range past the end."""
    end = size.streamed
    if end is None:
        return length or None
    if offset > end:
        raise InvalidRangeError(
            f"offset {offset} is past the end of {size.describe()}: pass an offset of at most {end}"
        )
    if length and offset + length > end:
        raise InvalidRangeError(
            f"offset {offset} + length {length} reaches past the end of {size.describe()}: "
            f"pass a length of at most {end - offset}, or 0 to read up to the end"
        )
    return length or end - offset


def check_upload_range(size: VolumeSize, offset: int, length: int) -> int | None:
    """The room from ``offset`` to the volume's end; None for a container file,
    which grows as it is written. Raises :class:`InvalidRangeError` for a range
    past the end (for a container: an offset past the file's end)."""
    if size.container:
        if size.physical is not None and offset > size.physical:
            raise InvalidRangeError(
                f"offset {offset} is past the end of {size.describe()}: an upload into it "
                f"writes the file itself, so start at an offset of at most {size.physical}"
            )
        return None
    if offset > size.capacity:
        raise InvalidRangeError(
            f"offset {offset} is past the end of {size.describe()}: pass an offset of at "
            f"most {size.capacity}, or resize the volume first"
        )
    if length and offset + length > size.capacity:
        raise InvalidRangeError(
            f"offset {offset} + length {length} reaches past the end of {size.describe()}: "
            f"pass a length of at most {size.capacity - offset}, or resize the volume first"
        )
    return size.capacity - offset
