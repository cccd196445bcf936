"""The file writer: direct writes, their fallbacks to the page cache, short writes (no daemon)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
from _helpers.spies import refuse_direct_open
from _helpers.volumes import KeepingHasher

from aiovirtstream._transfer._filewriter import DIRECT_ALIGN, FileWriter, open_direct
from aiovirtstream._transfer._slots import SLOT_SIZE


async def test_a_refused_direct_write_falls_back_to_the_page_cache(
    direct_file: tuple[Path, int, int],
) -> None:
    """A device that wants more alignment than we give (EINVAL) still gets the data."""
    path, fd, direct_fd = direct_file
    writer = FileWriter(fd, 0, False, None, direct_fd)
    misaligned = memoryview(bytearray(3 * DIRECT_ALIGN + 1))[1:]  # not on a block boundary
    misaligned[:] = os.urandom(3 * DIRECT_ALIGN)
    writer.write(misaligned, aligned=True)  # a false claim: the kernel refuses it
    assert not writer.direct
    writer.write(b"tail", aligned=True)
    assert path.read_bytes() == bytes(misaligned) + b"tail"
    assert writer.data_bytes == 3 * DIRECT_ALIGN + 4


def test_open_direct_refused_is_minus_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without O_DIRECT (EINVAL on open) means page-cache writes, not an error."""
    path = tmp_path / "f"
    path.touch()
    refuse_direct_open(monkeypatch)
    assert open_direct(path) == -1
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        open_direct(tmp_path / "missing")  # other errors are not swallowed


def test_a_short_direct_write_is_completed_in_order(
    direct_file: tuple[Path, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pwritev may write less than asked: the rest follows, hashed in order."""
    path, fd, direct_fd = direct_file
    hasher = KeepingHasher()
    writer = FileWriter(fd, 0, False, hasher, direct_fd)
    real_pwritev = os.pwritev

    def short(fd: int, views: list[memoryview], offset: int) -> int:
        if len(views) < 3:
            return real_pwritev(fd, views, offset)
        return real_pwritev(fd, [views[0], views[1][: SLOT_SIZE // 2]], offset)

    monkeypatch.setattr(os, "pwritev", short)
    slots = [memoryview(mmap.mmap(-1, SLOT_SIZE)) for _ in range(3)]
    for slot in slots:
        slot[:] = os.urandom(SLOT_SIZE)
    writer.write_blocks(slots)
    content = b"".join(bytes(slot) for slot in slots)
    assert path.read_bytes() == content == bytes(hasher.content)
    assert writer.data_bytes == writer.end == 3 * SLOT_SIZE
    assert writer.direct
