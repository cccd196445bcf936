"""The files the transfers move, and the checks of what they moved.

The dense source is random data; the sparse one holds extents at seeded
4 KiB-aligned offsets. :func:`poison` marks a volume before an upload so
that an upload that left it alone fails :func:`compare_files`.
"""

from __future__ import annotations

__all__ = [
    "allocated",
    "compare_files",
    "poison",
    "sparse_layout",
    "write_dense",
    "write_sparse",
]

import errno
import os
import random
from pathlib import Path

MiB = 1 << 20
_MARK = b"\xa5" * 4096


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) ranges of data in fd (SEEK_DATA/SEEK_HOLE)."""
    ranges = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        ranges.append((start, end))
        pos = end
    return ranges


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def compare_files(expected: Path, actual: Path) -> str | None:
    """None if both files hold the same bytes (holes read as zeroes), else what differs."""
    if not actual.exists():
        return f"{actual} does not exist"
    size_e, size_a = expected.stat().st_size, actual.stat().st_size
    if size_e != size_a:
        return f"{actual} has {size_a} bytes, expected {size_e}"
    fe, fa = os.open(expected, os.O_RDONLY), os.open(actual, os.O_RDONLY)
    try:
        ranges = _merge(_data_ranges(fe, size_e) + _data_ranges(fa, size_a))
        for start, end in ranges:
            for pos in range(start, end, 16 * MiB):
                n = min(16 * MiB, end - pos)
                if os.pread(fe, n, pos) != os.pread(fa, n, pos):
                    return f"{actual} differs from {expected} in [{pos}, {pos + n})"
    finally:
        os.close(fe)
        os.close(fa)
    return None


def write_dense(path: Path, size: int) -> None:
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            n = min(16 * MiB, remaining)
            out.write(os.urandom(n))
            remaining -= n


def sparse_layout(size: int, extents: int, extent_size: int, seed: int) -> list[int]:
    """Seeded 4 KiB-aligned offsets, one extent per equal slice of the file."""
    rng = random.Random(seed)
    slot = size // extents
    room = slot - extent_size - 64 * 1024  # keep a hole of at least 64 KiB after each
    assert room > 0, "extents do not fit"
    return [i * slot + rng.randrange(0, room // 4096) * 4096 for i in range(extents)]


def write_sparse(path: Path, size: int, offsets: list[int], extent_size: int, seed: int) -> None:
    rng = random.Random(seed + 1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset in offsets:
            os.pwrite(fd, rng.randbytes(extent_size), offset)
    finally:
        os.close(fd)


def poison(vol_path: Path, size: int, start: int, seed: int) -> None:
    """Overwrite a few 4 KiB blocks of the volume from ``start``: an upload that skips them shows.

    ``start`` is where the source's first data is. A sparse upload (virsh's,
    libvirt-python's and ours alike) leaves the volume's old bytes in a hole
    at the *start* of the source: libvirtd makes a hole by seeking and
    truncating there, which clears what follows the hole but not the hole
    itself. Later holes come out as zeroes.
    """
    rng = random.Random(seed)
    first, blocks = start // 4096, size // 4096
    where = {first, blocks - 1, *(rng.randrange(first, blocks) for _ in range(14))}
    fd = os.open(vol_path, os.O_WRONLY)
    try:
        for block in where:
            os.pwrite(fd, _MARK, block * 4096)
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    """Bytes the file takes on disk."""
    return path.stat().st_blocks * 512
