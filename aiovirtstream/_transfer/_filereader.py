"""The thread side of a file upload: reads the source's extents and sends them."""

from __future__ import annotations

__all__ = [
    "FileReader",
    "READ_AHEAD",
]

import contextlib
import os
import stat
import threading
from collections.abc import Iterator

from .._exceptions import (
    TransferError,
)
from .._stream import MAX_CHUNK, Hole, StreamItem
from ._extents import ZERO_BLOCK_SIZE, Extent, file_extents, zero_runs
from ._filewriter import ZERO_CHUNK
from ._options import ContentHasher

#: Uploads ask the kernel to read this much ahead of what they send.
READ_AHEAD = 32 * MAX_CHUNK


class FileReader:
    """Reads a source's range, its data and its holes, as a stream's items.

    :meth:`items` is what :meth:`AsyncStream.send_all` sends. With
    ``close_fd`` the file is the reader's: closed when the items end or are
    dropped, or by :meth:`close_unless_started` if they never started.
    """

    def __init__(
        self,
        fd: int,
        start: int,
        end: int,
        *,
        walk_extents: bool,
        holes_from: int | None,
        detect_zeroes: bool,
        hasher: ContentHasher | None,
        close_fd: bool = False,
        trailing_hole: int = 0,
    ) -> None:
        self._fd = fd
        self._close_fd = close_fd  # close it in the worker once read (no syscall on the loop)
        self._started = False
        self._lock = threading.Lock()
        self._start = start
        self._end = end
        self._trailing_hole = trailing_hole  # sent after the source, not hashed
        self._walk_extents = walk_extents  # find the source's holes (SEEK_DATA/SEEK_HOLE)
        # Holes from this source position on go as holes; before it (all of
        # them, if None) as zeroes, without reading them.
        self._holes_from = holes_from
        self._detect_zeroes = detect_zeroes and holes_from is not None and holes_from < end
        self._hasher = hasher
        self._cache_probe: bytearray | None = bytearray(1)  # None: RWF_NOWAIT not supported

    def _extents(self) -> Iterator[Extent]:
        if self._walk_extents:
            return file_extents(self._fd, self._start, self._end)
        return iter([Extent(self._start, self._end - self._start, True)])

    def items(self) -> Iterator[StreamItem]:
        """The source's range as packets and holes, read as they are pulled.

        Pulled by the connection's runner (:meth:`AsyncStream.send_all`), like
        libvirt's own sendAll reads and sends in one thread; the kernel's
        read-ahead (fadvise) keeps the disk busy while a send blocks. The
        file is closed (``close_fd``) once the items end or are dropped.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("the items of a FileReader are read once")
            self._started = True
        try:
            yield from self._items()
        finally:
            if self._close_fd:
                os.close(self._fd)

    def close_unless_started(self) -> None:
        """Close the file (``close_fd``) if :meth:`items` never started; it closes it otherwise."""
        with self._lock:
            if self._started or not self._close_fd:
                return
            self._started = True  # nothing may read it any more
        os.close(self._fd)

    def _items(self) -> Iterator[StreamItem]:
        with contextlib.suppress(OSError):  # advice only
            os.posix_fadvise(
                self._fd, self._start, self._end - self._start, os.POSIX_FADV_SEQUENTIAL
            )
        for extent in self._extents():
            if extent.data:
                yield from self._data(extent)
            else:
                yield from self._hole(extent.offset, extent.length)
        self._check_not_shrunk()
        if self._trailing_hole:
            yield Hole(self._trailing_hole)

    def _check_not_shrunk(self) -> None:
        """Refuse a regular file that ends before the range read: once it shrank
        below a hole, SEEK_DATA finds no more data and its lost end would go as
        a hole (the items end before the stream finishes: it is aborted)."""
        info = os.fstat(self._fd)
        if stat.S_ISREG(info.st_mode) and info.st_size < self._end:
            raise TransferError(
                f"the upload source shrank while it was read (to {info.st_size} bytes, "
                f"{self._end} expected): the upload was aborted; upload it again once "
                "nothing else writes it"
            )

    def _hole(self, pos: int, length: int) -> Iterator[StreamItem]:
        if self._hasher:
            self._hasher.hole(length)
        zeroes = length
        if self._holes_from is not None:
            zeroes = min(max(self._holes_from - pos, 0), length)
        while zeroes > 0:
            step = min(zeroes, MAX_CHUNK)
            yield ZERO_CHUNK[:step]
            zeroes -= step
            length -= step
        if length:
            yield Hole(length)

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

    def _data(self, extent: Extent) -> Iterator[StreamItem]:
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
                        yield piece
                    else:
                        yield from self._hole(part.offset, part.length)
            else:
                if self._hasher:
                    self._hasher.data(data)
                yield data
            pos += len(data)
