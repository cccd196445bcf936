"""Where a file holds data and where it holds holes.

Pure functions over file descriptors and buffers, used by the sparse
transfers; kept apart so they can be tested without a daemon.
"""

from __future__ import annotations

__all__ = ["Extent", "file_extents", "zero_runs", "ZERO_BLOCK_SIZE"]

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

#: The smallest run of zeroes that ``detect_zeroes`` turns into a hole.
ZERO_BLOCK_SIZE = 4096
_ZERO_BLOCK = bytes(ZERO_BLOCK_SIZE)


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes from ``offset`` that are data (``data=True``) or a hole."""

    offset: int
    length: int
    data: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


def file_extents(fd: int, start: int, end: int) -> Iterator[Extent]:
    """Data and hole extents of ``fd`` in ``[start, end)``, in order, from SEEK_DATA/SEEK_HOLE.

    A file system without SEEK_DATA support (EINVAL) is reported as all data,
    as is anything past the file's size (a block device, say) that lseek does
    not know about.
    """
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:
                # No data after pos: the rest is a hole (a trailing hole).
                yield Extent(pos, end - pos, False)
                return
            if error.errno == errno.EINVAL:
                yield Extent(pos, end - pos, True)
                return
            raise
        data = min(data, end)
        if data > pos:
            yield Extent(pos, data - pos, False)
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield Extent(data, hole - data, True)
        pos = hole


def zero_runs(buffer: bytes, offset: int, block: int = ZERO_BLOCK_SIZE) -> Iterator[Extent]:
    """Split ``buffer`` (file data found at ``offset``) into data and all-zero extents.

    Only whole ``block``-sized blocks aligned to the absolute file offset
    become holes, so a hole never splits a file system block.
    """
    size = len(buffer)
    if size == 0:
        return
    zero_block = _ZERO_BLOCK if block == ZERO_BLOCK_SIZE else bytes(block)
    if buffer.find(zero_block) < 0:
        # No run of zeroes as long as a block anywhere: all data (the common case).
        yield Extent(offset, size, True)
        return
    view = memoryview(buffer)
    head = min((-offset) % block, size)
    run_start, run_data = 0, True  # the unaligned head is data
    pos = head
    while pos + block <= size:
        is_data = view[pos : pos + block] != zero_block
        if is_data != run_data:
            if pos > run_start:
                yield Extent(offset + run_start, pos - run_start, run_data)
            run_start, run_data = pos, is_data
        pos += block
    if pos < size and not run_data:  # the unaligned tail is data
        yield Extent(offset + run_start, pos - run_start, False)
        run_start, run_data = pos, True
    yield Extent(offset + run_start, size - run_start, run_data)
