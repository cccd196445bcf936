"""The write-behind's direct I/O: alignment bookkeeping and fallbacks (no daemon)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _helpers.spies import refuse_direct_open
from _helpers.volumes import require_direct_io

from aiovirtstream._transfer._filewriter import DIRECT_ALIGN, FileWriter, open_direct
from aiovirtstream._transfer._slots import SLOT_SIZE
from aiovirtstream._transfer._writebehind import WriteBehind, WriteWorker


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """A new file, its descriptor and its direct descriptor."""
    require_direct_io(tmp_path)
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    direct_fd = open_direct(path)
    assert direct_fd >= 0, f"no O_DIRECT on {tmp_path}"
    try:
        yield path, fd, direct_fd
    finally:
        os.close(fd)
        os.close(direct_fd)


@pytest.fixture
def direct_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Every pwrite and pwritev as (fd, length, offset)."""
    calls: list[tuple[int, int, int]] = []
    real, real_v = os.pwrite, os.pwritev

    def spy(fd: int, data: memoryview, offset: int) -> int:
        calls.append((fd, memoryview(data).nbytes, offset))
        return real(fd, data, offset)

    def spy_v(fd: int, views: list[memoryview], offset: int) -> int:
        calls.append((fd, sum(memoryview(v).nbytes for v in views), offset))
        return real_v(fd, views, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    monkeypatch.setattr(os, "pwritev", spy_v)
    return calls


class Collect:
    """A hasher that keeps what it is given, in order."""

    def __init__(self) -> None:
        self.content = bytearray()

    def data(self, data: object) -> None:
        self.content += memoryview(data)  # type: ignore[arg-type]

    def hole(self, length: int) -> None:
        self.content += bytes(length)


def feeder(sink: WriteBehind, expected: bytearray) -> Callable[[bytes], None]:
    """Puts data into ``sink`` the way the pump does (100,000 bytes at most a call)."""

    def feed(data: bytes) -> None:
        view = memoryview(data)
        while view:
            target = sink.buffer()
            assert target is not None
            buffer, offset, room = target
            take = min(room, len(view), 100_000)
            memoryview(buffer)[offset : offset + take] = view[:take]
            sink.received(take)
            view = view[take:]
        expected.extend(data)

    return feed


async def test_slots_line_up_with_blocks_after_odd_holes(
    files: tuple[Path, int, int], direct_writes: list[tuple[int, int, int]]
) -> None:
    """Data after a hole of any length still goes out directly, block-aligned."""
    path, fd, direct_fd = files
    writer = FileWriter(fd, 0, False, None, direct_fd)
    worker = WriteWorker(str(path))
    sink = WriteBehind(
        writer, limit=16 * SLOT_SIZE, pause=lambda: None, resume=lambda: None, worker=worker
    )
    expected = bytearray()
    feed = feeder(sink, expected)

    def hole(length: int) -> None:
        sink.hole(length)
        expected.extend(bytes(length))

    feed(os.urandom(5000))
    hole(12_345)  # the next data starts 57 bytes past a block boundary
    feed(os.urandom(700_000))
    hole(3)
    feed(os.urandom(SLOT_SIZE + 1))
    sink.flush()
    await worker.run_after_writes(writer.close)
    worker.close()

    assert path.read_bytes() == bytes(expected)
    assert writer.direct, "a direct write was refused: the alignment is wrong"
    direct = [(length, offset) for f, length, offset in direct_writes if f == direct_fd]
    assert all(
        length % DIRECT_ALIGN == 0 and offset % DIRECT_ALIGN == 0 for length, offset in direct
    )
    # Of the 962,145 data bytes, only heads and tails (under a block each per
    # slot) may go through the page cache.
    assert sum(length for length, _ in direct) >= 962_145 - 8 * 2 * DIRECT_ALIGN


async def test_a_refused_direct_write_falls_back_to_the_page_cache(
    files: tuple[Path, int, int],
) -> None:
    """A device that wants more alignment than we give (EINVAL) still gets the data."""
    path, fd, direct_fd = files
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


async def test_full_slots_go_out_in_one_direct_write_a_batch(
    files: tuple[Path, int, int], direct_writes: list[tuple[int, int, int]]
) -> None:
    """A dense run of full slots is one pwritev per batch, not a write per slot."""
    path, fd, direct_fd = files
    hasher = Collect()
    writer = FileWriter(fd, 0, False, hasher, direct_fd)
    worker = WriteWorker(str(path))
    sink = WriteBehind(
        writer, limit=32 * SLOT_SIZE, pause=lambda: None, resume=lambda: None, worker=worker
    )
    expected = bytearray()
    feeder(sink, expected)(os.urandom(16 * SLOT_SIZE + 10))
    sink.flush()
    await worker.run_after_writes(writer.close)
    worker.close()
    assert path.read_bytes() == bytes(expected) == bytes(hasher.content)
    direct = [length for f, length, _ in direct_writes if f == direct_fd]
    assert direct == [8 * SLOT_SIZE, 8 * SLOT_SIZE]  # two batches of 8 full slots
    assert writer.data_bytes == 16 * SLOT_SIZE + 10


def test_a_short_direct_write_is_completed_in_order(
    files: tuple[Path, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pwritev may write less than asked: the rest follows, hashed in order."""
    path, fd, direct_fd = files
    hasher = Collect()
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
