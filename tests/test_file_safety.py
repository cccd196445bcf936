"""Files written and read without races or surprises (issue 27): umask, modes,
symbolic links, special upload sources, ranges the daemon overruns, screenshot limits."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import libvirt
import pytest
from _helpers.processes import busy_worker_threads
from _helpers.spies import spy_stream_starts
from _helpers.volumes import download_all, upload_all
from conftest import MakeVolume

import aiovirtstream as avs
import aiovirtstream._transfer._files as files_module
import aiovirtstream._transfer._ranges as ranges_module
from aiovirtstream._transfer._filewriter import FileWriter, open_direct
from aiovirtstream._transfer._writebehind import WriteBehind, WriteWorker
from aiovirtstream.testing import GuestInfo

MiB = 1024 * 1024


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process's umask for the test (from the test's thread), restored after."""
    real_umask = os.umask
    saved = real_umask(0o022)

    def set_umask(value: int) -> None:
        real_umask(value)

    try:
        yield set_umask
    finally:
        real_umask(saved)


async def data_volume(make_volume: MakeVolume, name: str, size: int) -> libvirt.virStorageVol:
    vol = await make_volume(name, size)
    await upload_all(vol, os.urandom(size))
    return vol


# ------------------------------------------------------------------------ umask and modes


async def test_downloads_never_touch_the_umask(
    make_volume: MakeVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    umask: Callable[[int], None],
) -> None:
    """os.umask is never called (it sets the umask of every thread to learn it),
    and a thread creating files meanwhile never gets a file of mode 0666."""
    vol = await data_volume(make_volume, "umask.img", 2 * MiB)
    calls: list[tuple[Any, ...]] = []
    real_umask = os.umask

    def no_umask(*args: Any) -> int:
        calls.append(args)
        return real_umask(*args)

    monkeypatch.setattr(os, "umask", no_umask)
    modes: set[int] = set()
    stop = threading.Event()
    side = tmp_path / "side"
    side.mkdir()

    def create_files() -> None:
        count = 0
        while not stop.is_set():
            path = side / f"f{count % 64}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            modes.add(stat.S_IMODE(os.fstat(fd).st_mode))
            os.close(fd)
            path.unlink()
            count += 1

    creator = threading.Thread(target=create_files)
    creator.start()
    try:
        for number in range(20):
            await avs.download(vol, tmp_path / f"d{number}", direct_io=number % 2 == 0)
        await avs.download(vol, tmp_path / "d0", overwrite=True)
    finally:
        stop.set()
        creator.join()
    assert calls == []
    assert modes == {0o644}


async def test_temporary_file_is_private_while_written(
    make_volume: MakeVolume, tmp_path: Path, umask: Callable[[int], None]
) -> None:
    vol = await data_volume(make_volume, "private.img", 32 * MiB)
    seen: list[int] = []

    def progress(_: avs.TransferProgress) -> None:
        for temp in tmp_path.glob(".out.*.part"):
            seen.append(stat.S_IMODE(temp.stat().st_mode))

    await avs.download(vol, tmp_path / "out", progress=progress, progress_interval=0.001)
    assert seen and seen[0] == 0o600, "no progress report saw the temporary file while written"
    # Private while written; the final mode is set after the last write, just
    # before the rename, so a report may catch the file in between.
    written = seen.index(0o644) if 0o644 in seen else len(seen)
    assert set(seen[:written]) == {0o600} and set(seen[written:]) <= {0o644}, seen
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o644


async def test_final_modes(
    make_volume: MakeVolume, tmp_path: Path, umask: Callable[[int], None]
) -> None:
    """A new file: 0666 & ~umask; an overwritten one keeps its permission bits."""
    vol = await data_volume(make_volume, "modes.img", MiB)
    umask(0o027)
    await avs.download(vol, tmp_path / "new")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o640

    for mode in (0o600, 0o640, 0o604):
        existing = tmp_path / f"existing-{mode:o}"
        existing.write_bytes(b"old")
        existing.chmod(mode)
        await avs.download(vol, existing, overwrite=True)
        assert stat.S_IMODE(existing.stat().st_mode) == mode
        assert existing.stat().st_size == MiB

    setuid = tmp_path / "setuid"
    setuid.write_bytes(b"old")
    setuid.chmod(0o4755)
    await avs.download(vol, setuid, overwrite=True)
    assert stat.S_IMODE(setuid.stat().st_mode) == 0o755  # permission bits only


async def test_unreadable_umask_keeps_the_file_private(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = await data_volume(make_volume, "noproc.img", MiB)
    real_open = open

    def no_status(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) == "/proc/self/status":
            raise PermissionError(errno.EACCES, "no /proc")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_status)
    assert files_module.current_umask() == 0o077
    await avs.download(vol, tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o600


def test_current_umask_reads_proc(umask: Callable[[int], None]) -> None:
    for value in (0o022, 0o077, 0o002):
        umask(value)
        assert files_module.current_umask() == value


# ------------------------------------------------------------------------ symbolic links


async def test_symlink_destinations(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link is an existing entry, refused before any stream starts; with
    overwrite=True the link itself is replaced, its target never written."""
    vol = await data_volume(make_volume, "links.img", MiB)
    starts = spy_stream_starts(monkeypatch)
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    target.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    folder_link = tmp_path / "folder-link"
    folder_link.symlink_to(tmp_path)

    for dest in (link, dangling, folder_link):
        with pytest.raises(avs.DestinationExistsError, match="symbolic link"):
            await avs.download(vol, dest)
        assert dest.is_symlink()
    assert starts == []  # refused before anything was asked of the daemon
    assert not (tmp_path / "nowhere").exists()

    for dest in (link, dangling, folder_link):
        await avs.download(vol, dest, overwrite=True)
        assert not dest.is_symlink() and dest.stat().st_size == MiB
    assert target.read_bytes() == b"secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dangling",
        "folder-link",
        "link",
        "target",
    ]


def test_open_direct_reopens_the_file_not_its_name(tmp_path: Path) -> None:
    """The direct descriptor is the same file even if its name now is a link elsewhere."""
    path = tmp_path / "temp"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        path.unlink()
        decoy = tmp_path / "decoy"
        decoy.write_bytes(b"")
        path.symlink_to(decoy)
        direct_fd = open_direct(fd)
        if direct_fd < 0:
            pytest.skip(f"no O_DIRECT on {tmp_path}")
        try:
            first, second = os.fstat(fd), os.fstat(direct_fd)
            assert (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
        finally:
            os.close(direct_fd)
        with pytest.raises(OSError) as caught:
            open_direct(path)  # by name: the link is not followed
        assert caught.value.errno == errno.ELOOP
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ special sources


async def test_fifo_without_writer_is_cancelled_promptly(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    vol = await make_volume("fifo.img", MiB)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def release_a_hung_reader() -> None:
        # Only if the upload hangs in a blocking open: then the test fails, not hangs.
        time.sleep(5)
        with open(fifo, "wb"):
            pass

    rescue = threading.Thread(target=release_a_hung_reader, daemon=True)
    rescue.start()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        with anyio.fail_after(1):
            await avs.upload(vol, fifo)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"the upload took {elapsed:.1f} s to end"
    # The started stream's abort ends in a worker a moment later; a reader
    # blocked on the FIFO would stay busy until the rescue at 5 s.
    deadline = time.monotonic() + 2
    while busy_worker_threads() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert busy_worker_threads() == []
    # The FIFO has no reader left: opening it for writing without blocking fails.
    with pytest.raises(OSError) as caught:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert caught.value.errno == errno.ENXIO


async def test_fifo_with_a_writer_is_uploaded(make_volume: MakeVolume, tmp_path: Path) -> None:
    vol = await make_volume("fifo-data.img", MiB)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = os.urandom(300_000)

    def write_later() -> None:
        time.sleep(0.3)  # the upload waits for the writer, on the loop
        deadline = time.monotonic() + 5
        while True:  # never blocks the test: a reader that went away fails it
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as error:
                if error.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        os.set_blocking(fd, True)
        with open(fd, "wb") as writer:
            writer.write(data[:1000])
            writer.flush()
            time.sleep(0.2)
            writer.write(data[1000:])

    writer = threading.Thread(target=write_later)
    writer.start()
    try:
        with anyio.fail_after(10):
            result = await avs.upload(vol, fifo)
    finally:
        writer.join()
    assert result.total_bytes == len(data)
    assert await download_all(vol, len(data)) == data


async def test_character_device_source(make_volume: MakeVolume) -> None:
    """/dev/zero cannot be polled (epoll refuses it): read in a worker, never blocking."""
    vol = await make_volume("zero.img", MiB)
    await upload_all(vol, b"\xff" * MiB)
    result = await avs.upload(vol, "/dev/zero", length=MiB)
    assert result.total_bytes == MiB
    assert await download_all(vol, MiB) == bytes(MiB)


async def test_unix_socket_source_is_refused(make_volume: MakeVolume, tmp_path: Path) -> None:
    vol = await make_volume("sock.img", MiB)
    path = tmp_path / "sock"
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(path))
        listener.listen()
        with anyio.fail_after(5), pytest.raises(avs.TransferError, match="unix socket"):
            await avs.upload(vol, path)
    finally:
        listener.close()


# ------------------------------------------------------------------------ ranges


def test_file_writer_refuses_data_past_its_range(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "range", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        writer = FileWriter(fd, 100, False, None, stop=200)
        writer.write(b"a" * 60)
        with pytest.raises(avs.TransferError, match="past the end of the range"):
            writer.write(b"b" * 41)
        with pytest.raises(avs.TransferError, match="a hole past the end"):
            writer.hole(41)
        with pytest.raises(avs.TransferError):
            writer.write_blocks([memoryview(b"c" * 4096)])
        writer.hole(40)  # up to the end exactly
        writer.close()
        assert os.fstat(fd).st_size == 200  # nothing written past the end
        with pytest.raises(avs.TransferError):
            writer.write(b"d")
    finally:
        os.close(fd)


async def test_write_behind_refuses_data_past_its_range_at_once(tmp_path: Path) -> None:
    """The sink raises on the loop as the data arrives (the pump then aborts the
    stream), before it reaches the worker: the file never grows past the range."""
    fd = os.open(tmp_path / "range", os.O_RDWR | os.O_CREAT, 0o600)
    worker = WriteWorker("range")
    try:
        sink = WriteBehind(
            FileWriter(fd, 0, False, None, stop=1000),
            limit=MiB,
            pause=lambda: None,
            resume=lambda: None,
            worker=worker,
        )
        target = sink.buffer()
        assert target is not None
        slot, start, room = target
        slot[start : start + 900] = b"x" * 900
        sink.received(900)
        slot[start + 900 : start + 1001] = b"y" * 101
        with pytest.raises(avs.TransferError, match="past the end"):
            sink.received(101)  # one byte too many
        with pytest.raises(avs.TransferError, match="a hole past the end"):
            sink.hole(101)
        sink.flush()
        await worker.join()
        await sink.abandon()
        assert os.fstat(fd).st_size == 900
    finally:
        worker.close()
        os.close(fd)


def test_stream_download_refuses_more_than_asked() -> None:
    ranges_module.check_not_past(900, 100, 1000)
    ranges_module.check_not_past(900, 100, None)
    with pytest.raises(avs.TransferError, match="more than the 1000 bytes"):
        ranges_module.check_not_past(900, 101, 1000)


# ------------------------------------------------------------------------ screenshots


async def test_screenshot_limit_with_the_test_driver(tmp_path: Path) -> None:
    conn = await avs.connect("test:///default")
    try:
        dom = await avs.lookup_domain(conn, "test")
        _, image = await avs.screenshot(dom)
        assert 100 < len(image) < avs.SCREENSHOT_MAX_BYTES
        with pytest.raises(avs.ScreenshotTooLargeError, match="max_bytes=100"):
            await avs.screenshot(dom, max_bytes=100)
        assert (await avs.screenshot(dom, max_bytes=len(image)))[1] == image
        dest = tmp_path / "shot.png"
        with pytest.raises(avs.ScreenshotTooLargeError):
            await avs.screenshot_to_file(dom, dest, max_bytes=100)
        assert list(tmp_path.iterdir()) == []  # no temporary file left
        assert await avs.screenshot_to_file(dom, dest, max_bytes=len(image)) == "image/png"
        assert dest.read_bytes() == image
    finally:
        await avs.aclose_connection(conn)


async def test_screenshot_limit_with_the_guest(libvirt_guest: GuestInfo) -> None:
    conn = await avs.connect(libvirt_guest.uri)
    try:
        dom = await avs.lookup_domain(conn, libvirt_guest.name)
        with anyio.fail_after(30):
            with pytest.raises(avs.ScreenshotTooLargeError) as caught:
                await avs.screenshot(dom, max_bytes=16)
            assert isinstance(caught.value, avs.StreamError)
            # The stream was aborted, not left open: the next screenshot works.
            mime, image = await avs.screenshot(dom)
        assert mime == "image/png" and len(image) > 16
    finally:
        await avs.aclose_connection(conn)
