"""The thread side of a file upload: reads the source's extents and sends them."""

from __future__ import annotations

__all__ = [
    "FileReader",
    "READ_AHEAD",
]

import contextlib
import os
from collections.abc import Iterator

from .._exceptions import (
    TransferError,
)
from .._stream import MAX_CHUNK, Hole, StreamItem, ThreadSend
from ._extents import ZERO_BLOCK_SIZE, Extent, file_extents, zero_runs
from ._options import ContentHasher
from ._writebehind import ZERO_CHUNK

#: Uploads ask the kernel to read this much ahead of what they send.
READ_AHEAD = 32 * MAX_CHUNK


class FileReader:
    """Reads a source's extents in a worker thread and sends them from there.

    :meth:`run` is the producer of :meth:`AsyncStream.send_from_thread`.
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
        #: The worker has closed the fd (``close_fd``): the caller must not.
        self.fd_closed = False
        self._start = start
        self._end = end
        self._trailing_hole = trailing_hole  # sent after the source, not hashed
        self._put: ThreadSend = _never_sent
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

    def run(self, send: ThreadSend) -> None:
        """Send the source's range with ``send`` (worker thread); returns early once
        ``send`` says the stream was stopped."""
        # Sent from this thread, like libvirt's own sendAll: a second thread
        # between reading and sending only adds GIL hand-offs. The kernel's
        # read-ahead (fadvise) keeps the disk busy while a send blocks.
        self._put = send
        try:
            self._run()
        finally:
            if self._close_fd:
                self.fd_closed = True
                os.close(self._fd)

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # advice only
            os.posix_fadvise(
                self._fd, self._start, self._end - self._start, os.POSIX_FADV_SEQUENTIAL
            )
        for extent in self._extents():
            if extent.data:
                if not self._send_data(extent):
                    return
            elif not self._send_hole(extent.offset, extent.length):
                return
        if self._trailing_hole:
            self._put(Hole(self._trailing_hole))

    def _send_hole(self, pos: int, length: int) -> bool:
        if self._hasher:
            self._hasher.hole(length)
        zeroes = length
        if self._holes_from is not None:
            zeroes = min(max(self._holes_from - pos, 0), length)
        while zeroes > 0:
            step = min(zeroes, MAX_CHUNK)
            if not self._put(ZERO_CHUNK[:step]):
                return False
            zeroes -= step
            length -= step
        return length == 0 or self._put(Hole(length))

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

    def _send_data(self, extent: Extent) -> bool:
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
                        if not self._put(piece):
                            return False
                    elif not self._send_hole(part.offset, part.length):
                        return False
            else:
                if self._hasher:
                    self._hasher.data(data)
                if not self._put(data):
                    return False
            pos += len(data)
        return True


def _never_sent(item: StreamItem) -> bool:
    raise AssertionError("FileReader.run() sets the send function")
