"""Writing a download's data and holes into its file, directly or through the page cache."""

from __future__ import annotations

__all__ = [
    "DIRECT_ALIGN",
    "FileWriter",
    "Hasher",
    "ZERO_CHUNK",
    "open_direct",
    "punch_hole",
]

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
from typing import Any, Protocol

from .._exceptions import TransferError
from .._stream import MAX_CHUNK, Buffer

logger = logging.getLogger(__name__)

#: The size of each ``pwrite`` through the page cache (docs/internals.md, "Download").
WRITE_PIECE = 128 * 1024
#: Direct writes start and end on multiples of this, in the file and in memory:
#: 4096 covers the logical block size of nearly every device (512 or 4096),
#: and a page is what the kernel invalidates around a direct write.
DIRECT_ALIGN = max(4096, mmap.PAGESIZE)
#: How a file system or device says no to direct I/O (then: the page cache).
_DIRECT_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP)

#: Zeroes to write for a hole, a slice at a time (shared with uploads).
ZERO_CHUNK = bytes(MAX_CHUNK)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: Any = None


class Hasher(Protocol):
    """What a download's checksum is fed with, in order."""

    def data(self, data: Buffer | bytes) -> None: ...
    def hole(self, length: int) -> None: ...


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` of ``fd``; False if the file system can't."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def open_direct(target: int | str | os.PathLike[str]) -> int:
    """A second descriptor for direct writes on the file open as ``target`` (an fd)
    or at ``target`` (a path); -1 if its file system refuses.

    An fd is reopened through ``/proc/self/fd``: the file itself, whatever
    its name now points to. A path is opened without following a link. The
    caller closes the result. Refused with EINVAL by file systems without
    ``O_DIRECT`` (FUSE without it, tmpfs before Linux 6.6).
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    flags = os.O_WRONLY | os.O_CLOEXEC | flag
    try:
        if not isinstance(target, int):
            return os.open(target, flags | os.O_NOFOLLOW)
        direct_fd = os.open(f"/proc/self/fd/{target}", flags)
    except FileNotFoundError:
        if not isinstance(target, int):
            raise
        logger.debug("no /proc/self/fd: no direct I/O on fd %d", target)
        return -1
    except OSError as error:
        if error.errno not in _DIRECT_REFUSED:
            raise
        logger.debug("no direct I/O on %s: %s", target, error)
        return -1
    first, second = os.fstat(target), os.fstat(direct_fd)
    if (first.st_dev, first.st_ino) != (second.st_dev, second.st_ino):  # pragma: no cover
        os.close(direct_fd)
        raise OSError(errno.ESTALE, f"fd {target} reopened as another file")
    return direct_fd


class FileWriter:
    """Writes downloaded data and holes at increasing offsets (worker thread)."""

    def __init__(
        self,
        fd: int,
        start: int,
        punch: bool,
        hasher: Hasher | None,
        direct_fd: int = -1,
        *,
        stop: int | None = None,
    ) -> None:
        """``punch``: the file may hold data from ``start`` on, so holes are punched.

        ``direct_fd``: the same file opened by :func:`open_direct` (or -1):
        the block-aligned part of each write goes through it. ``stop``: the
        file offset this writer's range ends at (None: no end known); data
        or a hole past it raises :class:`TransferError` before anything of
        it is written.
        """
        self._fd = fd
        self.stop = stop
        self._direct_fd = direct_fd
        self._pos = start
        self._punch = punch
        self.hasher = hasher
        self.data_bytes = 0
        self.hole_bytes = 0

    @property
    def direct(self) -> bool:
        """True while writes bypass the page cache."""
        return self._direct_fd >= 0

    def write(self, item: Buffer | bytes, *, aligned: bool = False) -> None:
        """Write ``item`` at the current offset.

        ``aligned``: ``item``'s address lies as far from a block boundary in
        memory as the current offset does in the file, so its block-aligned
        middle can be written directly.
        """
        view = memoryview(item).cast("B")
        size = view.nbytes
        self.check_room(self._pos, size, "data")
        if aligned and self._direct_fd >= 0:
            head = min(size, -self._pos % DIRECT_ALIGN)
            middle = (size - head) // DIRECT_ALIGN * DIRECT_ALIGN
            self._write_cached(view[:head])
            self._write_direct([view[head : head + middle]] if middle else [])
            self._write_cached(view[head + middle :])
        else:
            self._write_cached(view)
        self.data_bytes += size
        if self.hasher:
            self.hasher.data(item)

    def write_blocks(self, views: list[memoryview]) -> None:
        """Write ``views`` one after the other, each a whole number of blocks
        at a block-aligned address: one ``pwritev`` when direct, not one
        write per slot (each direct write waits for the device)."""
        self.check_room(self._pos, sum(view.nbytes for view in views), "data")
        if self._pos % DIRECT_ALIGN:  # the file and the memory do not line up
            for view in views:
                self.write(view)
            return
        self._write_direct(views)
        for view in views:
            self.data_bytes += view.nbytes
            if self.hasher:
                self.hasher.data(view)

    def _write_cached(self, view: memoryview) -> None:
        while view:
            written = os.pwrite(self._fd, view[:WRITE_PIECE], self._pos)
            self._pos += written
            view = view[written:]

    def _write_direct(self, views: list[memoryview]) -> None:
        """Write block-aligned ``views`` directly; what cannot be, through the page cache."""
        views = list(views)  # what is left to write
        while views and self._direct_fd >= 0:
            try:
                written = os.pwritev(self._direct_fd, views, self._pos)
            except OSError as error:
                if error.errno not in _DIRECT_REFUSED:
                    raise
                # The device wants a larger alignment than DIRECT_ALIGN, or
                # the file system takes no direct writes after all: the
                # rest of the download goes through the page cache.
                logger.debug("direct write refused (%s): writing through the page cache", error)
                self._direct_fd = -1
                break
            self._pos += written
            while views and written >= views[0].nbytes:
                written -= views.pop(0).nbytes
            if written:
                views[0] = views[0][written:]
                if written % DIRECT_ALIGN:  # short and unaligned (disk full)
                    break
        for view in views:
            self._write_cached(view)

    def check_room(self, pos: int, length: int, what: str) -> None:
        """Raise :class:`TransferError` if ``length`` bytes at ``pos`` pass :attr:`stop`."""
        if self.stop is not None and pos + length > self.stop:
            raise TransferError(
                f"the daemon sent {what} past the end of the range asked for (up to "
                f"offset {pos + length}, where the range ends at {self.stop}): the "
                "download was aborted"
            )

    def hole(self, length: int) -> None:
        self.check_room(self._pos, length, "a hole")
        if self._punch and not punch_hole(self._fd, self._pos, length):
            self._write_zeroes(length)
        self._pos += length
        self.hole_bytes += length
        if self.hasher:
            self.hasher.hole(length)

    def _write_zeroes(self, length: int) -> None:
        pos = self._pos
        while length > 0:
            step = min(length, MAX_CHUNK)
            pos += os.pwrite(self._fd, ZERO_CHUNK[:step], pos)
            length -= step

    @property
    def end(self) -> int:
        """The file offset after the last byte (or hole) written."""
        return self._pos

    def close(self) -> None:
        """Extend the file over a trailing hole (seeking past it wrote nothing)."""
        if os.fstat(self._fd).st_size < self._pos:
            os.ftruncate(self._fd, self._pos)
