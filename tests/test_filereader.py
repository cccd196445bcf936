"""An upload's file reader against a real daemon: the source closed off the loop, read-ahead."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from _helpers.volumes import MiB, page_cache_bytes, random_volume, require_direct_io
from conftest import MakeVolume

import aiovirtstream as avs
import aiovirtstream._transfer._filereader as filereader_module


async def test_upload_closes_its_source_off_the_loop(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source file an upload opened is closed once, in the reading worker."""

    vol, source = await random_volume(make_volume, tmp_path, "closing.img", 4 * MiB)
    real_close = os.close
    closes: list[str] = []

    def spy_close(fd: int) -> None:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(source):
                closes.append(threading.current_thread().name)
        real_close(fd)

    monkeypatch.setattr(os, "close", spy_close)
    fds_before = len(os.listdir("/proc/self/fd"))
    await avs.upload(vol, source)
    assert len(closes) == 1 and closes[0] != threading.main_thread().name
    # Cancelled early: still closed exactly once (by the worker if it had started).
    closes.clear()
    task = asyncio.create_task(avs.upload(vol, source))
    await asyncio.sleep(0.005)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert len(closes) == 1
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def spy_read_ahead_advice(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record the (offset, length) of every ``POSIX_FADV_WILLNEED`` given from now on."""
    advised: list[tuple[int, int]] = []
    real_fadvise = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append((offset, length))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    return advised


async def test_upload_asks_for_read_ahead_only_where_the_source_is_not_cached(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source out of the page cache gets POSIX_FADV_WILLNEED ahead of its reads;
    one in the cache does not (the advice walks every cached page); both arrive whole."""
    require_direct_io(tmp_path)  # tmpfs cannot drop a file's pages
    size = 20 * MiB
    vol, source = await random_volume(make_volume, tmp_path, "advice.img", size)
    os.sync()
    fd = os.open(source, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert page_cache_bytes(source) == 0, "could not drop the source from the page cache"
    advised = spy_read_ahead_advice(monkeypatch)

    await avs.upload(vol, source, sparse=False)
    assert advised[:1] == [(0, 2 * filereader_module.READ_AHEAD)], advised
    assert page_cache_bytes(source) == size
    advised.clear()
    await avs.upload(vol, source, sparse=False)
    assert advised == []
    got = tmp_path / "back.img"
    await avs.download(vol, got)
    assert got.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("detect_zeroes", [False, True], ids=["plain", "detect-zeroes"])
async def test_upload_advises_every_window_where_the_cache_cannot_be_asked(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, detect_zeroes: bool
) -> None:
    """Without RWF_NOWAIT (a file system that refuses it) every read-ahead window
    is advised, also when zero detection reads in pieces of whole zero blocks,
    and the refused probe is not tried again."""
    size = 20 * MiB
    source = tmp_path / "no-nowait.src"
    source.write_bytes(os.urandom(size))
    vol = await make_volume("no-nowait.img", size)  # empty: zero detection may send holes
    probes = 0

    def refuse_nowait(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        nonlocal probes
        probes += 1
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "preadv", refuse_nowait)
    advised = spy_read_ahead_advice(monkeypatch)
    await avs.upload(vol, source, sparse=detect_zeroes, detect_zeroes=detect_zeroes)
    step = filereader_module.READ_AHEAD
    windows = [(pos, min(2 * step, size - pos)) for pos in range(0, size, step)]
    if detect_zeroes:  # pieces of 258,048 bytes: each window starts at the first piece past it
        assert len(advised) == len(windows) and advised[0] == windows[0]
        pairs = zip(advised, windows, strict=True)
        assert all(0 <= got - want < step // 32 for (got, _), (want, _) in pairs)
    else:
        assert advised == windows
    assert probes == 1
    got = tmp_path / "back.img"
    await avs.download(vol, got)
    assert got.read_bytes() == source.read_bytes()
