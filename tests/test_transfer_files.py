"""A download's destination file against a real daemon: the temporary file, the rename,
direct I/O, fsync (modes and races: test_file_safety.py)."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _helpers.spies import around_writes, refuse_direct_open, spy_socket_pauses, spy_stream_starts
from _helpers.volumes import (
    BLOCK,
    Collect,
    Layout,
    MiB,
    page_cache_bytes,
    random_volume,
    require_direct_io,
    write_layout,
)
from conftest import MakeVolume

import aiovirtstream as avs
import aiovirtstream._transfer._ranges as ranges_module


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

    around_writes(monkeypatch, tmp_path, before=fill_up)
    pauses = spy_socket_pauses(monkeypatch)
    with pytest.raises(avs.TransferError, match="No space left"):
        await avs.download(vol, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*.part"))
    assert pauses.unbalanced() == {}, "the socket was left paused"
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

    around_writes(monkeypatch, tmp_path, after=appear)
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
    The rename (``os.link`` of the temporary file, without ``overwrite``)
    is held until the cancellation is in.
    """
    vol, source = await random_volume(make_volume, tmp_path, "last-step.img", 4 * MiB)
    dest = tmp_path / "out"
    entered, release = threading.Event(), threading.Event()
    real_link = os.link

    def held_link(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kwargs: Any) -> None:
        if Path(dst) == dest:
            entered.set()
            release.wait(10)
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", held_link)
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


@pytest.mark.parametrize("direct_io", [True, False])
async def test_direct_io_keeps_the_download_out_of_the_page_cache(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_io: bool
) -> None:
    """By default a download's data goes to the disk, not into the page cache."""
    require_direct_io(tmp_path)
    monkeypatch.setattr(ranges_module, "PARALLEL_MIN_PART", 4 * MiB)  # 2 streams over 16 MiB
    vol, source = await random_volume(make_volume, tmp_path, "direct.img", 16 * MiB + 5000)
    dest = tmp_path / "out"
    starts = spy_stream_starts(monkeypatch)
    for parallel in (1, 2):
        starts.clear()
        await avs.download(vol, dest, direct_io=direct_io, parallel=parallel, overwrite=True)
        assert len(starts) == parallel
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
    starts = spy_stream_starts(monkeypatch)
    result = await avs.download(vol, dest, fsync=fsync, direct_io=direct_io, parallel=2)
    monkeypatch.undo()
    assert len(starts) == 2
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
