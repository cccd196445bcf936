"""Sparse-aware upload() and download() against a real daemon."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import libvirt
import pytest
from _helpers import (
    Collect,
    VolumeStreamCall,
    page_cache_bytes,
    refuse_direct_open,
    require_direct_io,
    spy_stream_starts,
)
from conftest import MakeVolume

import aiovirtstream as avs
import aiovirtstream._transfer._filereader as filereader_module
import aiovirtstream._transfer._ranges as ranges_module
from aiovirtstream.testing import Sandbox

MiB = 1024 * 1024
BLOCK = os.statvfs("/tmp").f_bsize  # holes exist at the file system's block size
Layout = list[tuple[str, int]]  # ("data" | "hole", length)


def write_layout(path: Path, layout: Layout) -> bytes:
    """Create a sparse file with data and holes; returns its logical content."""
    content = bytearray()
    with open(path, "wb") as f:
        for kind, length in layout:
            if kind == "data":
                chunk = os.urandom(length)
                f.write(chunk)
                content += chunk
            else:
                f.seek(length, os.SEEK_CUR)
                content += bytes(length)
        f.truncate()
    return bytes(content)


def data_size(layout: Layout) -> int:
    return sum(length for kind, length in layout if kind == "data")


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


LAYOUTS: dict[str, Layout] = {
    "all-data": [("data", 3 * MiB)],
    "all-hole": [("hole", 8 * MiB)],
    "leading-hole": [("hole", 4 * MiB), ("data", MiB)],
    "trailing-hole": [("data", MiB), ("hole", 4 * MiB)],
    "data-at-last-byte": [("hole", 4 * MiB - BLOCK), ("data", BLOCK)],
    "many-small-extents": [("data", BLOCK), ("hole", BLOCK)] * 200 + [("data", BLOCK)],
    "not-4k-multiple": [("data", 5000), ("hole", 3 * BLOCK), ("data", 1234)],
}


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "page-cache"])
@pytest.mark.parametrize("name", LAYOUTS)
async def test_round_trip_layouts(
    make_volume: MakeVolume, tmp_path: Path, name: str, direct_io: bool
) -> None:
    layout = LAYOUTS[name]
    source = tmp_path / "source.img"
    content = write_layout(source, layout)
    size = len(content)
    vol = await make_volume(f"{name}.img", size)

    sent = await avs.upload(vol, source, checksum=True)
    assert sent.total_bytes == size
    assert sent.sha256 == hashlib.sha256(content).hexdigest()
    assert sent.data_bytes <= data_size(layout) + BLOCK
    vol_info = await asyncio.to_thread(vol.info)
    assert vol_info[2] <= allocated(source) + BLOCK, "the volume lost its holes"

    dest = tmp_path / "back.img"
    got = await avs.download(vol, dest, checksum=True, direct_io=direct_io)
    assert got.sha256 == sent.sha256
    assert dest.read_bytes() == content
    assert os.path.getsize(dest) == size
    assert allocated(dest) <= allocated(source) + BLOCK, "the download lost its holes"
    assert not list(tmp_path.glob(".*.part"))


async def test_detect_zeroes_makes_holes(make_volume: MakeVolume, tmp_path: Path) -> None:
    source = tmp_path / "zeroes.img"
    payload = os.urandom(10_000)
    source.write_bytes(bytes(16 * MiB) + payload + bytes(8 * MiB))  # fully allocated
    assert allocated(source) >= 24 * MiB
    vol = await make_volume("zeroes.img", source.stat().st_size)
    result = await avs.upload(vol, source, detect_zeroes=True)
    assert result.data_bytes < 64 * 1024
    assert result.hole_bytes > 23 * MiB
    vol_info = await asyncio.to_thread(vol.info)
    assert vol_info[2] < MiB, "a file of zeroes was stored as data"
    dest = tmp_path / "back.img"
    await avs.download(vol, dest)
    assert dest.read_bytes() == source.read_bytes()


async def test_iterable_source_and_stream_destination(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    chunks = [os.urandom(100_000), bytes(64 * 1024), os.urandom(333)]
    size = sum(map(len, chunks))
    vol = await make_volume("iter.img", size)

    async def produce() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    progress: list[avs.TransferProgress] = []
    result = await avs.upload(vol, produce(), detect_zeroes=True, progress=progress.append)
    assert result.total_bytes == size
    assert result.hole_bytes >= 56 * 1024
    assert progress and progress[-1].done_bytes == size

    sink = Collect()
    await avs.download(vol, sink)
    assert bytes(sink.data) == b"".join(chunks)


async def test_offset_and_length_resume(make_volume: MakeVolume, tmp_path: Path) -> None:
    content = os.urandom(3 * MiB)
    source = tmp_path / "src"
    source.write_bytes(content)
    vol = await make_volume("partial.img", 3 * MiB)
    first = tmp_path / "first"
    first.write_bytes(content[:MiB])
    await avs.upload(vol, first)
    # Resume: the rest from where the first part ended.
    with open(source, "rb") as f:
        f.seek(MiB)
        await avs.upload(vol, f, offset=MiB)
    dest = tmp_path / "middle"
    result = await avs.download(vol, dest, offset=MiB // 2, length=MiB)
    assert result.total_bytes == MiB
    assert dest.read_bytes() == content[MiB // 2 : MiB // 2 + MiB]
    # Download into an open file at its position, over existing data: holes are punched.
    with open(tmp_path / "whole", "wb") as f:
        await avs.download(vol, f)
        assert f.tell() == 3 * MiB
    assert (tmp_path / "whole").read_bytes() == content


async def test_bad_input_is_refused_cleanly(make_volume: MakeVolume, tmp_path: Path) -> None:
    vol = await make_volume("small.img", MiB)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MiB + 1))
    with pytest.raises(avs.SourceTooLargeError, match="resize the volume"):
        await avs.upload(vol, big)
    assert (await asyncio.to_thread(vol.info))[2] == 0, "bytes were sent before the check"

    with pytest.raises(avs.SourceNotFoundError):
        await avs.upload(vol, tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        await avs.upload(vol, tmp_path / "missing")

    existing = tmp_path / "existing"
    existing.write_bytes(b"keep me")
    with pytest.raises(avs.DestinationExistsError, match="overwrite=True"):
        await avs.download(vol, existing)
    assert existing.read_bytes() == b"keep me"
    await avs.download(vol, existing, overwrite=True)
    assert existing.stat().st_size == MiB

    with pytest.raises(avs.DestinationIsDirectoryError):
        await avs.download(vol, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "existing"]


async def test_volume_gone_is_a_clear_error(make_volume: MakeVolume, tmp_path: Path) -> None:
    """libvirt 9.0 does not lock a volume during a transfer (measured: delete, wipe and
    resize all go through during an upload); what a user meets is a volume deleted
    under them."""
    vol = await make_volume("gone.img", 4 * MiB)
    source = tmp_path / "src"
    source.write_bytes(os.urandom(MiB))
    await asyncio.to_thread(vol.delete, 0)
    with pytest.raises(avs.NotFoundError, match="gone.img"):
        await avs.upload(vol, source)
    with pytest.raises(avs.NotFoundError):
        await avs.download(vol, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


async def test_cancelled_download_leaves_nothing(
    libvirt_sandbox: Sandbox, make_volume: MakeVolume, tmp_path: Path
) -> None:
    size = 64 * MiB
    vol = await make_volume("cancel.img", size)
    source = tmp_path / "src"
    source.write_bytes(os.urandom(size))
    await avs.upload(vol, source)
    seen: list[int] = []

    async def slow_consumer() -> None:
        await avs.download(
            vol,
            tmp_path / "out",
            progress=lambda p: seen.append(p.data_bytes),
            progress_interval=0.001,
        )

    task = asyncio.create_task(slow_consumer())
    while not seen or seen[-1] == 0:
        await asyncio.sleep(0.001)
        if task.done():
            pytest.fail("the download finished before it could be cancelled")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*.part"))
    # The connection still carries the next transfer, and an upload can be cancelled too.
    up = asyncio.create_task(avs.upload(vol, source))
    await asyncio.sleep(0.01)
    up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await up
    result = await avs.download(vol, tmp_path / "again", sparse=False)
    assert result.data_bytes == size


async def test_concurrent_transfers_on_one_connection(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    contents = [os.urandom(4 * MiB + n) for n in range(4)]
    vols = [await make_volume(f"c{n}.img", len(c)) for n, c in enumerate(contents)]
    sources = []
    for n, content in enumerate(contents):
        path = tmp_path / f"s{n}"
        path.write_bytes(content)
        sources.append(path)
    await asyncio.gather(*(avs.upload(v, s) for v, s in zip(vols, sources, strict=True)))
    await asyncio.gather(*(avs.download(v, tmp_path / f"d{n}") for n, v in enumerate(vols)))
    for n, content in enumerate(contents):
        assert (tmp_path / f"d{n}").read_bytes() == content


async def test_parallel_download_over_ranges(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 200 * MiB
    source = tmp_path / "src"
    layout: Layout = [("data", 3 * MiB), ("hole", 60 * MiB), ("data", 70 * MiB)]
    layout += [("hole", size - data_size(layout) - 60 * MiB - MiB), ("data", MiB)]
    content = write_layout(source, layout)
    vol = await make_volume("parallel.img", size)
    await avs.upload(vol, source)
    dest = tmp_path / "out"
    seen: list[avs.TransferProgress] = []
    starts = spy_stream_starts(monkeypatch)
    result = await avs.download(vol, dest, parallel=3, progress=seen.append)
    assert len(starts) == 3 and sum(start.length for start in starts) == size
    assert result.total_bytes == size
    assert seen[-1].done_bytes == size
    assert dest.read_bytes() == content
    assert allocated(dest) <= allocated(source) + 4 * BLOCK
    # Offsets that are not MiB-aligned, into an open file over existing data.
    with open(tmp_path / "window", "wb") as f:
        f.write(b"\xff" * (150 * MiB))
        f.seek(0)
        await avs.download(vol, f, offset=MiB + 5, length=140 * MiB, parallel=2)
    assert (tmp_path / "window").read_bytes()[: 140 * MiB] == content[MiB + 5 : 141 * MiB + 5]


async def test_sparse_upload_keeps_the_volume_whole(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    """libvirt cuts a file volume at the end of each uploaded hole and keeps its old data
    inside the hole (measured): upload() must still leave exactly the source in place."""
    layout: Layout = [("data", MiB), ("hole", MiB), ("data", MiB)]
    source = tmp_path / "src"
    content = write_layout(source, layout)

    fresh = await make_volume("fresh.img", 8 * MiB)
    result = await avs.upload(fresh, source)
    assert result.hole_bytes == MiB
    info = await asyncio.to_thread(fresh.info)
    assert info[1] == 8 * MiB, "the sparse upload shrank the volume"
    assert info[2] <= 2 * MiB + BLOCK
    assert await download_bytes(fresh, tmp_path / "a") == content + bytes(5 * MiB)

    used = await make_volume("used.img", 8 * MiB)
    old = b"\xff" * (8 * MiB)
    await avs.upload(used, _iter_once(old))
    result = await avs.upload(used, source, offset=MiB)
    assert result.hole_bytes == 0  # into a volume holding data, holes go as zeroes
    assert (await asyncio.to_thread(used.info))[1] == 8 * MiB
    back = await download_bytes(used, tmp_path / "b")
    assert back == old[:MiB] + content + old[4 * MiB :]


class WipeSpy:
    """Records ``virStorageVol.wipe`` calls; ``mode`` "refused" fails them, "no-op"
    returns without wiping (a backend whose wipe leaves data behind)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, mode: str = "real") -> None:
        self.calls: list[int] = []
        real = libvirt.virStorageVol.wipe

        def wipe(vol: libvirt.virStorageVol, flags: int = 0) -> int:
            self.calls.append(flags)
            if mode == "refused":
                raise libvirt.libvirtError("wipe refused (test)")
            return 0 if mode == "no-op" else real(vol, flags)

        monkeypatch.setattr(libvirt.virStorageVol, "wipe", wipe)


async def put_old_data(vol: libvirt.virStorageVol, data: bytes) -> tuple[int, int]:
    """Write ``data`` at the volume's start (not all of it); returns (capacity, allocation)."""
    await avs.upload(vol, _iter_once(data))
    info = await asyncio.to_thread(vol.info)
    return info[1], info[2]


ZEROES_WARNING = "holes are sent as zeroes"


async def test_a_source_that_overwrites_a_whole_volume_with_data_still_goes_sparse(
    make_volume: MakeVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Holes into a volume that holds data would keep that data (see above): when the
    source overwrites every byte, upload() empties the volume first (libvirt's zero
    wipe truncates a file with holes), so the holes go as holes and stay unallocated."""
    layout: Layout = [("data", MiB), ("hole", 3 * MiB), ("data", MiB), ("hole", 3 * MiB)]
    source = tmp_path / "src"
    content = write_layout(source, layout)
    vol = await make_volume("whole.img", len(content))
    capacity, allocation = await put_old_data(vol, b"\xee" * (6 * MiB))
    assert capacity == len(content) and 6 * MiB <= allocation < capacity
    wipes = WipeSpy(monkeypatch)

    caplog.set_level(logging.WARNING, logger="aiovirtstream._transfer")
    result = await avs.upload(vol, source)

    assert wipes.calls == [libvirt.VIR_STORAGE_VOL_WIPE_ALG_ZERO]
    assert (result.data_bytes, result.hole_bytes) == (2 * MiB, 6 * MiB)
    assert ZEROES_WARNING not in caplog.text
    info = await asyncio.to_thread(vol.info)
    assert info[1] == capacity
    assert info[2] <= 2 * MiB + 2 * BLOCK, "the holes were written as data"
    assert await download_bytes(vol, tmp_path / "back") == content


@pytest.mark.parametrize("case", ["offset", "shorter-source", "length", "fully-allocated"])
async def test_a_volume_with_data_is_not_emptied_unless_the_source_overwrites_it_all(
    make_volume: MakeVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    """Emptying would lose the old data the upload leaves in place (outside its range),
    and a fully allocated file libvirt wipes by writing zeroes: no wipe then, the holes
    go as zeroes (with the warning), and the old data outside the range stays."""
    size = 8 * MiB
    layout: Layout = [("data", MiB), ("hole", 2 * MiB), ("data", MiB)]
    source = tmp_path / "src"
    whole = case in ("length", "fully-allocated")  # a source of the volume's size
    content = write_layout(source, layout * 2 if whole else layout)
    vol = await make_volume("kept.img", size)
    old = os.urandom(size if case == "fully-allocated" else 6 * MiB)
    _, allocation = await put_old_data(vol, old)
    assert allocation >= len(old)
    old = old.ljust(size, b"\0")
    wipes = WipeSpy(monkeypatch)
    caplog.set_level(logging.WARNING, logger="aiovirtstream._transfer")

    if case == "offset":
        await avs.upload(vol, source, offset=MiB)
        expected = old[:MiB] + content + old[MiB + len(content) :]
    elif case == "length":
        await avs.upload(vol, source, length=4 * MiB)
        expected = content[: 4 * MiB] + old[4 * MiB :]
    else:  # shorter-source, fully-allocated
        await avs.upload(vol, source)
        expected = content + old[len(content) :]

    assert wipes.calls == []
    assert ZEROES_WARNING in caplog.text
    assert await download_bytes(vol, tmp_path / "back") == expected


@pytest.mark.parametrize("mode", ["refused", "no-op"])
async def test_a_wipe_that_fails_or_leaves_data_falls_back_to_sending_zeroes(
    make_volume: MakeVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    layout: Layout = [("data", MiB), ("hole", 3 * MiB)]
    source = tmp_path / "src"
    content = write_layout(source, layout)
    vol = await make_volume("nowipe.img", len(content))
    await put_old_data(vol, b"\xee" * (2 * MiB))
    wipes = WipeSpy(monkeypatch, mode)
    caplog.set_level(logging.DEBUG, logger="aiovirtstream._transfer")

    result = await avs.upload(vol, source)

    assert len(wipes.calls) == 1
    assert ("wipe refused (test)" in caplog.text) == (mode == "refused")
    assert ZEROES_WARNING in caplog.text
    assert result.hole_bytes == 0
    assert await download_bytes(vol, tmp_path / "back") == content


async def _iter_once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def download_bytes(vol: libvirt.virStorageVol, path: Path) -> bytes:
    await avs.download(vol, path, overwrite=True)
    return await asyncio.to_thread(path.read_bytes)


async def test_iterable_longer_than_the_room_is_refused(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    vol = await make_volume("room.img", MiB)
    with pytest.raises(avs.InvalidRangeError):  # a length past the end: refused up front
        await avs.upload(vol, _iter_once(bytes(MiB + 1)), length=2 * MiB)
    with pytest.raises(avs.SourceTooLargeError):
        await avs.upload(vol, _iter_once(b"x" * (MiB + 1)))


async def random_volume(
    make_volume: MakeVolume, tmp_path: Path, name: str, size: int
) -> tuple[libvirt.virStorageVol, Path]:
    """A volume holding ``size`` random bytes, and the file they came from."""
    source = tmp_path / f"{name}.src"
    source.write_bytes(os.urandom(size))
    vol = await make_volume(name, size)
    await avs.upload(vol, source)
    return vol, source


def around_writes(
    monkeypatch: pytest.MonkeyPatch,
    before: Callable[[], object] | None = None,
    after: Callable[[], object] | None = None,
) -> None:
    """Run ``before`` / ``after`` around every write of a download (worker thread)."""
    import aiovirtstream._transfer._writebehind as writebehind

    for name in ("write", "write_blocks"):  # a slot at a time; full slots in a row
        real = getattr(writebehind.FileWriter, name)

        def wrapped(*args: Any, _real: Any = real, **kwargs: Any) -> None:
            if before is not None:
                before()
            _real(*args, **kwargs)
            if after is not None:
                after()

        monkeypatch.setattr(writebehind.FileWriter, name, wrapped)


@pytest.mark.parametrize("parallel", [1, 2])
async def test_download_holds_the_daemon_back_while_the_disk_is_behind(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parallel: int
) -> None:
    """While the write-behind is full, the socket is not served: memory stays
    bounded, by one budget for the whole download however many streams it has."""
    import threading

    import aiovirtstream._transfer._writebehind as writebehind

    size = 2 * ranges_module.PARALLEL_MIN_PART  # parallel=2 splits it in two
    vol, source = await random_volume(make_volume, tmp_path, "slow-disk.img", size)
    disk_free = threading.Event()
    sinks: list[writebehind.WriteBehind] = []
    real_init = writebehind.WriteBehind.__init__

    def spy_init(self: writebehind.WriteBehind, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        sinks.append(self)

    around_writes(monkeypatch, before=lambda: disk_free.wait(30))
    monkeypatch.setattr(writebehind.WriteBehind, "__init__", spy_init)
    paused = []
    impl = avs.get_event_impl()
    real_pause = impl.pause_reading

    def spy_pause(fd: int) -> None:
        paused.append(fd)
        real_pause(fd)

    monkeypatch.setattr(impl, "pause_reading", spy_pause)
    task = asyncio.create_task(avs.download(vol, tmp_path / "out", sparse=False, parallel=parallel))
    try:
        while not paused:
            await asyncio.sleep(0.01)
            assert not task.done()
        await asyncio.sleep(0.5)
        assert len(sinks) == parallel
        received = sum(sink.received_bytes for sink in sinks)
        assert received <= ranges_module.WRITE_BEHIND + MiB, received
        await asyncio.sleep(0.3)
        assert sum(sink.received_bytes for sink in sinks) == received, (
            "received more while the disk was behind"
        )
    finally:
        disk_free.set()
    result = await asyncio.wait_for(task, 60)
    assert result.data_bytes == size
    assert (tmp_path / "out").read_bytes() == source.read_bytes()
    assert impl._paused == {}, "the socket was left paused"


async def test_failed_write_removes_the_temporary_file(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 16 * MiB
    vol, _ = await random_volume(make_volume, tmp_path, "full-disk.img", size)
    written = [0]

    def fill_up() -> None:
        written[0] += 1
        if written[0] > 3:
            raise OSError(28, "No space left on device")

    around_writes(monkeypatch, before=fill_up)
    with pytest.raises(avs.TransferError, match="No space left"):
        await avs.download(vol, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*.part"))
    assert avs.get_event_impl()._paused == {}
    monkeypatch.undo()
    result = await avs.download(vol, tmp_path / "out")  # the connection carries on
    assert result.data_bytes == size


async def test_destination_that_appears_during_the_download_is_kept(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename, run in the writer thread after the last write, refuses to clobber."""
    vol, _ = await random_volume(make_volume, tmp_path, "appearing.img", 4 * MiB)
    dest = tmp_path / "out"

    def appear() -> None:
        if not dest.exists():
            dest.write_bytes(b"someone else's")

    around_writes(monkeypatch, after=appear)
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(avs.DestinationExistsError, match="appeared during the download"):
        await avs.download(vol, dest)
    assert dest.read_bytes() == b"someone else's"
    assert not list(tmp_path.glob(".*.part"))
    assert len(os.listdir("/proc/self/fd")) <= fds_before  # the temporary file's fd closed


async def test_cancelled_while_the_download_is_put_in_place(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation during the last step (in the writer thread) waits for it.

    The destination is then complete (that step renames only a complete
    download), the temporary file is gone, and the cancellation is raised.
    """
    import threading

    import aiovirtstream._transfer._writebehind as writebehind

    vol, source = await random_volume(make_volume, tmp_path, "last-step.img", 4 * MiB)
    dest = tmp_path / "out"
    entered, release = threading.Event(), threading.Event()
    real_close = writebehind.FileWriter.close

    def held_close(self: writebehind.FileWriter) -> None:
        entered.set()
        release.wait(10)
        real_close(self)

    monkeypatch.setattr(writebehind.FileWriter, "close", held_close)
    task = asyncio.create_task(avs.download(vol, dest))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # waits for the writer thread's last step
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert dest.read_bytes() == source.read_bytes()
    assert not list(tmp_path.glob(".*.part"))


async def test_write_behind_slots_are_freed_with_the_download(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reference cycle keeps a download's write-behinds alive (their slots go
    back to the process's pool, which is bounded)."""
    import gc
    import weakref

    import aiovirtstream._transfer._writebehind as writebehind

    vol, _ = await random_volume(make_volume, tmp_path, "slots.img", 4 * MiB)
    sinks: list[weakref.ref[writebehind.WriteBehind]] = []
    real_init = writebehind.WriteBehind.__init__

    def spy_init(self: writebehind.WriteBehind, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        sinks.append(weakref.ref(self))

    monkeypatch.setattr(writebehind.WriteBehind, "__init__", spy_init)
    gc.collect()
    gc.disable()
    try:
        await avs.download(vol, tmp_path / "out", parallel=1)
        await asyncio.sleep(0)
        assert sinks and all(ref() is None for ref in sinks)
    finally:
        gc.enable()


async def test_the_next_download_receives_into_the_slots_of_the_last(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slots go back to the process's pool; reused, they hold the last download's
    bytes, none of which may reach the next one's file (odd extents, holes)."""
    from aiovirtstream._transfer import _slots
    from aiovirtstream._transfer._slots import SlotAccount

    pool = _slots.SlotPool()
    monkeypatch.setattr("aiovirtstream._transfer._writebehind.slot_pool", pool)
    first, _ = await random_volume(make_volume, tmp_path, "first.img", 4 * MiB)
    layout: Layout = [("data", 5000), ("hole", 3 * BLOCK), ("data", MiB + 1234), ("hole", MiB)]
    source = tmp_path / "second.src"
    content = write_layout(source, layout)
    second = await make_volume("second.img", len(content))
    await avs.upload(second, source)
    await avs.download(first, tmp_path / "first.out", parallel=1)
    kept = {id(slot) for slot in pool._free}
    assert kept, "the download gave no slot back"
    taken: list[int] = []
    real_take = pool.take

    def spy_take(account: SlotAccount) -> memoryview | None:
        slot = real_take(account)
        if slot is not None:
            taken.append(id(slot))
        return slot

    monkeypatch.setattr(pool, "take", spy_take)
    result = await avs.download(second, tmp_path / "second.out", parallel=1)
    assert taken and taken[0] in kept
    assert (tmp_path / "second.out").read_bytes() == content
    assert result.data_bytes <= data_size(layout) + 2 * BLOCK


@pytest.mark.parametrize("direct_io", [True, False])
async def test_direct_io_keeps_the_download_out_of_the_page_cache(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_io: bool
) -> None:
    """By default a download's data goes to the disk, not into the page cache."""
    require_direct_io(tmp_path)
    monkeypatch.setattr(ranges_module, "PARALLEL_MIN_PART", 4 * MiB)  # 2 streams of 16 MiB
    vol, source = await random_volume(make_volume, tmp_path, "direct.img", 16 * MiB + 5000)
    dest = tmp_path / "out"
    for parallel in (1, 2):
        await avs.download(vol, dest, direct_io=direct_io, parallel=parallel, overwrite=True)
        cached = page_cache_bytes(dest)
        assert dest.read_bytes() == source.read_bytes()
        if direct_io:
            assert cached <= 4 * BLOCK, f"{cached} bytes went through the page cache"
        else:
            assert cached >= 16 * MiB


async def test_download_without_direct_io_on_the_file_system(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where O_DIRECT is refused the download goes through the page cache, whole."""
    vol, source = await random_volume(make_volume, tmp_path, "nodirect.img", 4 * MiB)
    refuse_direct_open(monkeypatch)
    dest = tmp_path / "out"
    result = await avs.download(vol, dest)
    monkeypatch.undo()
    assert result.data_bytes == 4 * MiB
    assert page_cache_bytes(dest) >= 4 * MiB
    assert dest.read_bytes() == source.read_bytes()


class SyncSpy:
    """Records the download's fdatasync and fsync calls: which file, and when."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, dest: Path) -> None:
        self.dest = dest
        self.calls: list[tuple[str, str, bool, int]] = []  # call, path, dest there, size
        for name in ("fdatasync", "fsync"):
            monkeypatch.setattr(os, name, functools.partial(self._record, name, getattr(os, name)))

    def _record(self, name: str, real: Callable[[int], None], fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        self.calls.append((name, path, self.dest.exists(), os.fstat(fd).st_size))
        real(fd)


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "page-cache"])
@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
async def test_fsync_flushes_the_file_before_the_rename_and_the_folder_after(
    make_volume: MakeVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fsync: bool,
    direct_io: bool,
) -> None:
    monkeypatch.setattr(ranges_module, "PARALLEL_MIN_PART", 4 * MiB)  # 2 streams of 8 MiB
    layout: Layout = [("data", 3 * MiB), ("hole", 5 * MiB), ("data", 5000), ("hole", 8 * MiB)]
    source = tmp_path / "source.img"
    content = write_layout(source, layout)
    vol = await make_volume("fsync.img", len(content))
    await avs.upload(vol, source)
    dest = tmp_path / "out"
    spy = SyncSpy(monkeypatch, dest)
    result = await avs.download(vol, dest, fsync=fsync, direct_io=direct_io, parallel=2)
    monkeypatch.undo()
    assert result.total_bytes == len(content)
    assert dest.read_bytes() == content
    if not fsync:
        assert spy.calls == [], "a download without fsync=True paid for one"
        return
    (flush, flushed, dest_there, size), (sync, folder, dest_after, _) = spy.calls
    assert flush == "fdatasync" and Path(flushed).name.startswith(".out.")
    assert not dest_there, "the file was flushed after the rename"
    assert size == len(content), "the file was flushed before its trailing hole was made"
    assert (sync, Path(folder), dest_after) == ("fsync", tmp_path, True)


async def test_fsync_into_an_open_file(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol, source = await random_volume(make_volume, tmp_path, "fsync-file.img", 3 * MiB)
    dest = tmp_path / "out"
    with open(dest, "wb") as f:
        f.write(b"header")
        spy = SyncSpy(monkeypatch, dest)
        await avs.download(vol, f, fsync=True)
        monkeypatch.undo()
        assert f.tell() == 6 + 3 * MiB
    assert spy.calls == [("fdatasync", str(dest), True, 6 + 3 * MiB)]
    assert dest.read_bytes() == b"header" + source.read_bytes()


async def test_fsync_needs_a_file_to_flush(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into a pipe or an anyio stream, fsync=True is refused before any stream starts."""
    vol = await make_volume("fsync-pipe.img", MiB)
    starts = spy_stream_starts(monkeypatch)
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "wb") as pipe:
        with pytest.raises(ValueError, match="fsync=True needs a path or a regular file"):
            await avs.download(vol, pipe, fsync=True)
    with pytest.raises(ValueError, match="not an anyio stream"):
        await avs.download(vol, Collect(), fsync=True)
    assert starts == []


async def test_failed_fsync_leaves_no_destination(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol, source = await random_volume(make_volume, tmp_path, "fsync-eio.img", 2 * MiB)

    def broken_disk(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken_disk)
    with pytest.raises(avs.TransferError, match="cannot flush .* to disk") as caught:
        await avs.download(vol, tmp_path / "out", fsync=True)
    monkeypatch.undo()
    assert isinstance(caught.value.__cause__, OSError)
    assert not (tmp_path / "out").exists(), "a file that may not be on the disk looks complete"
    assert not list(tmp_path.glob(".*.part"))
    await avs.download(vol, tmp_path / "out", fsync=True)  # the connection carries on
    assert (tmp_path / "out").read_bytes() == source.read_bytes()


async def test_failed_folder_flush_says_the_file_is_complete(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol, source = await random_volume(make_volume, tmp_path, "fsync-dir.img", MiB)

    def broken_folder(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_folder)
    with pytest.raises(avs.TransferError, match="is complete, but its folder cannot be flushed"):
        await avs.download(vol, tmp_path / "out", fsync=True)
    monkeypatch.undo()
    assert (tmp_path / "out").read_bytes() == source.read_bytes()
    assert not list(tmp_path.glob(".*.part"))


async def test_upload_closes_its_source_off_the_loop(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source file an upload opened is closed once, in the reading worker."""
    import threading

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


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
async def test_upload_finishes_its_stream_in_the_sending_thread(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparse: bool
) -> None:
    """The reader finishes the stream right after its last send, in its own
    thread (no hop back to the loop and out again); the volume is complete."""
    import threading

    source = tmp_path / "source.img"
    content = write_layout(source, [("data", MiB + 5), ("hole", 2 * MiB)])
    vol = await make_volume("finishing.img", 4 * MiB)  # room left: a last hole restores it
    calls: list[tuple[str, int]] = []
    for name in ("send", "sendHole", "finish"):
        real = getattr(libvirt.virStream, name)

        def spy(self: libvirt.virStream, *args: Any, _real: Any = real, _name: str = name) -> Any:
            calls.append((_name, threading.get_ident()))
            return _real(self, *args)

        monkeypatch.setattr(libvirt.virStream, name, spy)
    result = await avs.upload(vol, source, sparse=sparse)
    monkeypatch.undo()
    assert result.total_bytes == len(content)
    assert [c for c, _ in calls].count("finish") == 1 and calls[-1][0] == "finish"
    threads = {thread for _, thread in calls}
    assert len(threads) == 1, "sent and finished in more than one thread"
    assert threading.get_ident() not in threads, "sent or finished on the loop's thread"
    if sparse:
        assert calls[-2][0] == "sendHole", "the hole up to the volume's end was not sent"
    got = tmp_path / "back.img"
    await avs.download(vol, got)
    assert got.read_bytes() == content + bytes(4 * MiB - len(content))


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


def was_aborted(virstream: libvirt.virStream) -> bool:
    """True if ``virstream`` (with data still to come) was aborted already:
    libvirt then refuses another abort ("stream is closed")."""
    try:
        virstream.abort()
    except libvirt.libvirtError:
        return True
    return False


async def test_upload_whose_finish_fails_is_reported_and_aborted(
    make_volume: MakeVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A finish that the daemon refuses, made in the reader's thread, breaks
    the upload; the stream is aborted and nothing is left registered."""
    import gc
    import logging
    import warnings

    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(MiB))
    vol = await make_volume("finish-fails.img", MiB)
    streams: list[libvirt.virStream] = []

    def refuse(self: libvirt.virStream) -> None:
        streams.append(self)
        raise libvirt.libvirtError("the daemon refused to finish")

    monkeypatch.setattr(libvirt.virStream, "finish", refuse)
    caplog.set_level(logging.DEBUG, logger="aiovirtstream.libvirt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(avs.StreamBrokenError, match="refused to finish"):
            await avs.upload(vol, source)
        gc.collect()
    monkeypatch.undo()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    # The reader removed the stream's event callback; the loop knows it.
    assert "no stream callback registered" not in caplog.text
    assert len(streams) == 1 and was_aborted(streams[0])
    result = await avs.upload(vol, source)  # the connection carries on
    assert result.data_bytes == MiB


async def test_a_range_that_cannot_start_fails_the_download_and_aborts_the_others(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 2 * ranges_module.PARALLEL_MIN_PART
    vol = await make_volume("ranges.img", size)
    gone = await make_volume("gone-range.img", MiB)
    await asyncio.to_thread(gone.delete, 0)

    def second_on_gone(
        real: VolumeStreamCall,
        vol: libvirt.virStorageVol,
        stream: libvirt.virStream,
        offset: int,
        length: int,
        flags: int,
    ) -> int:
        # The second range asks the daemon for a volume deleted meanwhile: a real refusal.
        return real(gone if offset else vol, stream, offset, length, flags)

    starts = spy_stream_starts(monkeypatch, around=second_on_gone)
    with pytest.raises(avs.NotFoundError, match="gone-range.img") as failure:
        await avs.download(vol, tmp_path / "out", sparse=False, parallel=2)
    assert isinstance(failure.value.__cause__, libvirt.libvirtError)
    assert os.listdir(tmp_path) == []
    assert len(starts) == 1 and await asyncio.to_thread(was_aborted, starts[0].stream)
    monkeypatch.undo()
    result = await avs.download(vol, tmp_path / "out", sparse=False, parallel=2)
    assert result.data_bytes == size  # the connection carries on


async def test_cancelled_while_a_range_starts_aborts_every_stream(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 2 * ranges_module.PARALLEL_MIN_PART
    vol = await make_volume("slow-range.img", size)
    second_asked = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_second(
        real: VolumeStreamCall,
        vol: libvirt.virStorageVol,
        stream: libvirt.virStream,
        offset: int,
        length: int,
        flags: int,
    ) -> int:
        if offset:
            loop.call_soon_threadsafe(second_asked.set)
            time.sleep(0.3)  # the download is cancelled meanwhile
        return real(vol, stream, offset, length, flags)

    starts = spy_stream_starts(monkeypatch, around=slow_second)
    task = asyncio.create_task(avs.download(vol, tmp_path / "out", sparse=False, parallel=2))
    await second_asked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The second stream started after the cancellation; both were aborted.
    assert len(starts) == 2
    assert [await asyncio.to_thread(was_aborted, s.stream) for s in starts] == [True, True]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("direction", ["upload", "download"])
async def test_cancelled_while_the_stream_starts_backs_out(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direction: str
) -> None:
    """The start (one worker-thread job) runs to its end; then its stream is
    aborted, the source closed, the temporary file removed."""
    vol = await make_volume(f"slow-start-{direction}.img", 4 * MiB)
    source = tmp_path / "src"
    source.write_bytes(os.urandom(MiB))
    asked = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(
        real: VolumeStreamCall,
        vol: libvirt.virStorageVol,
        stream: libvirt.virStream,
        offset: int,
        length: int,
        flags: int,
    ) -> int:
        loop.call_soon_threadsafe(asked.set)
        time.sleep(0.3)  # cancelled meanwhile
        return real(vol, stream, offset, length, flags)

    starts = spy_stream_starts(monkeypatch, direction, around=slow)
    fds_before = len(os.listdir("/proc/self/fd"))
    if direction == "upload":
        task = asyncio.create_task(avs.upload(vol, source))
    else:
        task = asyncio.create_task(avs.download(vol, tmp_path / "out"))
    await asyncio.wait_for(asked.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(starts) == 1 and await asyncio.to_thread(was_aborted, starts[0].stream)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert len(os.listdir("/proc/self/fd")) <= fds_before


async def test_parallel_by_default_only_for_large_downloads(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = ranges_module.AUTO_PARALLEL_MIN
    vol = await make_volume("auto-parallel.img", size)  # allocation 0: all hole
    starts = spy_stream_starts(monkeypatch)

    def opened() -> list[int]:
        return [start.length for start in starts]

    # 256 MiB: two streams, dense or sparse.
    result = await avs.download(vol, tmp_path / "dense", sparse=False)
    assert len(opened()) == 2 and sum(opened()) == size and result.data_bytes == size
    starts.clear()
    result = await avs.download(vol, tmp_path / "sparse", sparse=True)
    assert len(opened()) == 2 and result.hole_bytes == size
    assert os.stat(tmp_path / "sparse").st_size == size
    # Smaller, a checksum, or parallel=1: one stream.
    for kwargs in ({"length": size - 1}, {"checksum": True}, {"parallel": 1}):
        starts.clear()
        await avs.download(vol, tmp_path / "one", sparse=False, overwrite=True, **kwargs)
        assert len(opened()) == 1, kwargs
    with pytest.raises(ValueError, match="parallel"):
        await avs.download(vol, tmp_path / "bad", parallel=0)


async def test_progress_as_an_async_stream_of_events(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    size = 64 * MiB
    vol, source = await random_volume(make_volume, tmp_path, "progress.img", size)
    # A reader that keeps up: snapshots in order, the last one complete, then the end.
    send, receive = anyio.create_memory_object_stream[avs.TransferProgress](100)
    seen: list[avs.TransferProgress] = []

    async def watch() -> None:
        async with receive:
            async for event in receive:
                seen.append(event)

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        result = await avs.download(vol, tmp_path / "out", progress=send, progress_interval=0.001)
    assert result.data_bytes == size
    assert seen and seen[-1].done_bytes == size and seen[-1].total == size
    done = [event.done_bytes for event in seen]
    assert done == sorted(done)
    # A reader that never reads (buffer of 1): the transfer is not held up,
    # the final snapshot waits for room, and the stream is closed at the end.
    send, receive = anyio.create_memory_object_stream[avs.TransferProgress](1)
    late: list[avs.TransferProgress] = []

    async def read_once_the_final_snapshot_waits() -> None:
        # Snapshots that find no room are dropped; only the final one waits
        # for room: a waiting sender means the data has all been sent.
        while receive.statistics().tasks_waiting_send == 0:
            await anyio.sleep(0.005)
        async with receive:
            async for event in receive:
                late.append(event)

    async with anyio.create_task_group() as group:
        group.start_soon(read_once_the_final_snapshot_waits)
        await avs.upload(vol, source, progress=send, progress_interval=0.001)
    assert late[-1].done_bytes == size and len(late) <= 2
    # A reader that went away does not break the transfer.
    send, receive = anyio.create_memory_object_stream[avs.TransferProgress](0)
    receive.close()
    result = await avs.download(
        vol, tmp_path / "out", overwrite=True, progress=send, progress_interval=0.001
    )
    assert result.data_bytes == size
    # A failed transfer closes the stream too: the reader's loop ends.
    send, receive = anyio.create_memory_object_stream[avs.TransferProgress](10)
    with pytest.raises(avs.DestinationExistsError):
        await avs.download(vol, tmp_path / "out", progress=send)
    async with receive:
        assert [event async for event in receive] == []


# ------------------------------------------------ one volume, two transfers


async def held_upload(
    vol: libvirt.virStorageVol, parts: list[bytes], started: asyncio.Event, go: asyncio.Event
) -> avs.TransferResult:
    """Upload ``parts``, holding on after the first until ``go`` is set."""

    async def source() -> AsyncIterator[bytes]:
        yield parts[0]
        started.set()
        await go.wait()
        for part in parts[1:]:
            yield part

    return await avs.upload(vol, source())


class HeldSink(Collect):
    """A byte stream destination that takes its first chunk, then waits for ``go``."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.go = asyncio.Event(), asyncio.Event()

    async def send(self, item: bytes) -> None:
        await super().send(item)
        self.started.set()
        await self.go.wait()


async def test_a_volume_being_uploaded_is_refused_to_any_other_transfer(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    """libvirt lets a second upload or a download run while an upload writes the
    volume (measured: it locks nothing); upload() and download() refuse them."""
    vol = await make_volume("held.img", 2 * MiB)
    parts = [os.urandom(MiB), os.urandom(MiB)]
    other = tmp_path / "other"
    other.write_bytes(b"\x01" * MiB)
    started, go = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(held_upload(vol, parts, started, go))
    await asyncio.wait_for(started.wait(), 10)

    with pytest.raises(avs.VolumeBusyError, match="being uploaded") as refused:
        await avs.upload(vol, other)
    assert isinstance(refused.value, anyio.BusyResourceError)
    with pytest.raises(avs.VolumeBusyError, match="being uploaded"):
        await avs.download(vol, tmp_path / "copy")
    # The same volume looked up on a second connection by the same URI.
    conn2 = await avs.connect(vol.connect().getURI())
    try:
        pool_name = (await asyncio.to_thread(vol.storagePoolLookupByVolume)).name()
        vol2 = await avs.lookup_volume(conn2, "held.img", pool=pool_name)
        with pytest.raises(avs.VolumeBusyError):
            await avs.upload(vol2, other)
    finally:
        await avs.aclose_connection(conn2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"], "a refused download left a file"

    go.set()
    assert (await first).total_bytes == 2 * MiB
    assert await download_bytes(vol, tmp_path / "back") == b"".join(parts)
    await avs.upload(vol, other)  # the claim ended with the transfer
    assert (await download_bytes(vol, tmp_path / "back"))[:MiB] == other.read_bytes()


async def test_downloads_share_a_volume_and_an_upload_is_refused_meanwhile(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    vol = await make_volume("shared.img", MiB)
    content = os.urandom(MiB)
    await avs.upload(vol, _iter_once(content))
    sink = HeldSink()
    held = asyncio.create_task(avs.download(vol, sink))
    await asyncio.wait_for(sink.started.wait(), 10)

    assert await download_bytes(vol, tmp_path / "copy") == content
    with pytest.raises(avs.VolumeBusyError, match="being downloaded"):
        await avs.upload(vol, _iter_once(bytes(MiB)))

    sink.go.set()
    assert (await held).total_bytes == MiB
    assert bytes(sink.data) == content, "the refused upload wrote into the volume"
    await avs.upload(vol, _iter_once(bytes(MiB)))


async def test_a_cancelled_or_failed_upload_gives_the_volume_back(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    vol = await make_volume("back.img", MiB)
    started, go = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(held_upload(vol, [bytes(1000), bytes(1000)], started, go))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    with pytest.raises(avs.SourceTooLargeError):
        await avs.upload(vol, _iter_once(bytes(MiB + 1)))
    data = os.urandom(MiB)
    await avs.upload(vol, _iter_once(data))
    assert await download_bytes(vol, tmp_path / "back") == data


async def test_a_transfer_on_a_closed_connection_is_a_clear_error(
    libvirt_sandbox: Sandbox, make_volume: MakeVolume, tmp_path: Path
) -> None:
    await make_volume("closed.img", MiB)
    conn = await avs.connect(libvirt_sandbox.uri)
    pool = (await asyncio.to_thread(conn.listAllStoragePools))[0].name()
    vol = await avs.lookup_volume(conn, "closed.img", pool=pool)
    await avs.aclose_connection(conn)
    for transfer in (avs.upload(vol, _iter_once(b"x")), avs.download(vol, tmp_path / "d")):
        with pytest.raises(avs.AioVirtStreamError) as raised:
            await transfer
        assert isinstance(raised.value.__cause__, libvirt.libvirtError)
    assert list(tmp_path.iterdir()) == []
