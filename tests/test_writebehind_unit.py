"""The write-behind: slots aligned for direct writes, a direct write a batch (no daemon)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from _helpers.volumes import KeepingHasher

from aiovirtstream._transfer._filewriter import DIRECT_ALIGN, FileWriter
from aiovirtstream._transfer._slots import SLOT_SIZE
from aiovirtstream._transfer._writebehind import WriteBehind, WriteWorker


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
    direct_file: tuple[Path, int, int], direct_writes: list[tuple[int, int, int]]
) -> None:
    """Data after a hole of any length still goes out directly, block-aligned."""
    path, fd, direct_fd = direct_file
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


async def test_full_slots_go_out_in_one_direct_write_a_batch(
    direct_file: tuple[Path, int, int], direct_writes: list[tuple[int, int, int]]
) -> None:
    """A dense run of full slots is one pwritev per batch, not a write per slot."""
    path, fd, direct_fd = direct_file
    hasher = KeepingHasher()
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
