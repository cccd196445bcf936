"""Extent maps (SEEK_DATA/SEEK_HOLE, zero detection): pure logic, no daemon."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from aiovirtstream import Extent, file_extents
from aiovirtstream._transfer._extents import zero_runs

BLOCK = os.statvfs("/tmp").f_bsize


def check_cover(extents: list[Extent], start: int, end: int) -> None:
    """Extents tile [start, end) in order and alternate data/hole."""
    assert extents[0].offset == start and extents[-1].end == end
    for before, after in zip(extents, extents[1:], strict=False):
        assert before.end == after.offset
        assert before.data != after.data
    assert all(e.length > 0 for e in extents)


def sparse_file(path: Path, layout: list[tuple[bool, int]]) -> None:
    with open(path, "wb") as f:
        for is_data, length in layout:
            if is_data:
                f.write(b"\x01" * length)
            else:
                f.seek(length, os.SEEK_CUR)
        f.truncate()


@pytest.mark.parametrize(
    "layout",
    [
        [(True, 3 * BLOCK)],
        [(False, 5 * BLOCK)],
        [(False, 2 * BLOCK), (True, BLOCK)],
        [(True, BLOCK), (False, 7 * BLOCK)],
        [(True, BLOCK), (False, BLOCK)] * 20 + [(True, BLOCK)],
    ],
)
def test_file_extents_match_the_layout(tmp_path: Path, layout: list[tuple[bool, int]]) -> None:
    path = tmp_path / "f"
    sparse_file(path, layout)
    size = sum(length for _, length in layout)
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = list(file_extents(fd, 0, size))
    finally:
        os.close(fd)
    check_cover(extents, 0, size)
    expected: list[Extent] = []
    offset = 0
    for is_data, length in layout:
        if expected and expected[-1].data == is_data:
            last = expected.pop()
            expected.append(Extent(last.offset, last.length + length, is_data))
        else:
            expected.append(Extent(offset, length, is_data))
        offset += length
    assert extents == expected


def test_file_extents_of_a_window(tmp_path: Path) -> None:
    path = tmp_path / "f"
    sparse_file(path, [(True, BLOCK), (False, 4 * BLOCK), (True, BLOCK)])
    fd = os.open(path, os.O_RDONLY)
    try:
        window = list(file_extents(fd, BLOCK // 2, 3 * BLOCK))
        past_end = list(file_extents(fd, 0, 10 * BLOCK))  # beyond the file: a trailing hole
    finally:
        os.close(fd)
    assert window == [Extent(BLOCK // 2, BLOCK // 2, True), Extent(BLOCK, 2 * BLOCK, False)]
    assert past_end[-1] == Extent(6 * BLOCK, 4 * BLOCK, False)


def test_zero_runs_examples() -> None:
    z = bytes(4096)
    assert list(zero_runs(b"a" * 10 + z * 3 + b"b" * 5, 4086)) == [
        Extent(4086, 10, True),
        Extent(4096, 3 * 4096, False),
        Extent(16384, 5, True),
    ]
    assert list(zero_runs(z * 2, 0)) == [Extent(0, 8192, False)]
    assert list(zero_runs(z, 1)) == [Extent(1, 4096, True)]  # no aligned block inside
    assert list(zero_runs(b"x" * 9000, 0)) == [Extent(0, 9000, True)]
    assert list(zero_runs(b"", 0)) == []


def test_zero_runs_random_buffers() -> None:
    """Holes are aligned whole zero blocks; every aligned zero block becomes a hole."""
    rng = random.Random(1234)
    for _ in range(300):
        parts = [
            bytes(rng.choice([1, 4096, 5000, 8192]))
            if rng.random() < 0.5
            else rng.randbytes(rng.choice([1, 100, 4096]))
            for _ in range(rng.randint(1, 12))
        ]
        buffer = b"".join(parts)
        offset = rng.choice([0, 4096, 17, 4095])
        extents = list(zero_runs(buffer, offset))
        if not buffer:
            continue
        check_cover(extents, offset, offset + len(buffer))
        for extent in extents:
            piece = buffer[extent.offset - offset : extent.end - offset]
            if not extent.data:
                assert piece == bytes(len(piece))
                assert extent.offset % 4096 == 0 and extent.length % 4096 == 0
        for block_start in range(-offset % 4096, len(buffer) - 4095, 4096):
            if buffer[block_start : block_start + 4096] == bytes(4096):
                covered = any(
                    not e.data and e.offset <= offset + block_start < e.end for e in extents
                )
                assert covered, (offset, block_start)
