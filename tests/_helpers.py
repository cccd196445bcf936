"""Small helpers shared by the tests (imported as a module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.abc
import libvirt
import pytest

import aiovirtstream as avs
import aiovirtstream._transfer._copy as copy_module
from aiovirtstream.testing import Sandbox

if TYPE_CHECKING:
    from conftest import MakeVolume

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
    """The bytes of data (not holes) in ``layout``."""
    return sum(length for kind, length in layout if kind == "data")


def allocated(path: Path) -> int:
    """The bytes the file system allocated for ``path``."""
    return os.stat(path).st_blocks * 512


async def iter_once(data: bytes) -> AsyncIterator[bytes]:
    """``data`` as an async iterable (an upload's source), in one chunk."""
    yield data


async def download_bytes(vol: libvirt.virStorageVol, path: Path) -> bytes:
    """All of ``vol``, downloaded into ``path`` (overwritten) and read back."""
    await avs.download(vol, path, overwrite=True)
    return await asyncio.to_thread(path.read_bytes)


async def random_volume(
    make_volume: MakeVolume, tmp_path: Path, name: str, size: int
) -> tuple[libvirt.virStorageVol, Path]:
    """A volume holding ``size`` random bytes, and the file they came from."""
    source = tmp_path / f"{name}.src"
    source.write_bytes(os.urandom(size))
    vol = await make_volume(name, size)
    await avs.upload(vol, source)
    return vol, source


def was_aborted(virstream: libvirt.virStream) -> bool:
    """True if ``virstream`` (with data still to come) was aborted already:
    libvirt then refuses another abort ("stream is closed")."""
    try:
        virstream.abort()
    except libvirt.libvirtError:
        return True
    return False


async def upload_all(vol: libvirt.virStorageVol, data: bytes) -> None:
    """Write ``data`` to the start of ``vol`` through an AsyncStream, 1 MiB at a time."""
    async with await avs.open_volume_upload(vol) as stream:
        for start in range(0, len(data), MiB):
            await stream.write(data[start : start + MiB])


async def download_all(vol: libvirt.virStorageVol, length: int) -> bytes:
    """Read ``length`` bytes of ``vol`` (0: all of it) through an AsyncStream."""
    out = bytearray()
    async with await avs.open_volume_download(vol, length=length) as stream:
        async for chunk in stream:
            out += chunk
    return bytes(out)


def rss(pid: int | None = None) -> int:
    """A process's resident memory, in bytes (this process's by default)."""
    with open(f"/proc/{pid or 'self'}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_read_bytes(pid: int) -> int:
    """Bytes process ``pid`` has read so far (``rchar``: files and sockets), from /proc."""
    with open(f"/proc/{pid}/io") as io:
        for line in io:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError(f"no rchar in /proc/{pid}/io")


@dataclass
class Aborts:
    """The ``virStream`` objects aborted since :func:`spy_aborts`, in order."""

    streams: list[libvirt.virStream] = field(default_factory=list)
    happened: threading.Event = field(default_factory=threading.Event)


def spy_aborts(monkeypatch: pytest.MonkeyPatch) -> Aborts:
    """Record every ``virStream.abort`` call (libvirt-python's public method)."""
    aborts = Aborts()
    original = libvirt.virStream.abort

    def abort(self: libvirt.virStream) -> int:
        aborts.streams.append(self)
        aborts.happened.set()
        return int(original(self))

    monkeypatch.setattr(libvirt.virStream, "abort", abort)
    return aborts


@contextlib.contextmanager
def daemon_stopped(sandbox: Sandbox) -> Iterator[None]:
    """SIGSTOP the (shared) daemon for the block; SIGCONT is sent whatever happens."""
    os.kill(sandbox.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(sandbox.pid, signal.SIGCONT)


def require_direct_io(folder: Path) -> None:
    """tmpfs accepts O_DIRECT (Linux 6.6+) but still caches: direct I/O tests need a disk."""
    kind = subprocess.run(
        ["stat", "-f", "-c", "%T", str(folder)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert kind != "tmpfs", (
        f"{folder} is on tmpfs, where O_DIRECT cannot be told from the page cache: "
        "run pytest with --basetemp=<a folder on a disk file system>"
    )


def page_cache_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache (util-linux's fincore)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def refuse_direct_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``os.open`` fail with EINVAL for O_DIRECT, as a file system without it does."""
    real_open = os.open

    def no_direct(name: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)


def fd_count() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def busy_worker_threads() -> list[str]:
    """The worker threads (aiovirtstream's, anyio's, asyncio's) not idle in their pool.

    An idle pool thread waits for work in its queue's ``get``: at the top of
    ``concurrent.futures``' ``_worker`` (a C ``SimpleQueue``), or inside a
    ``queue.Queue.get`` (anyio's worker threads).
    """
    frames = sys._current_frames()
    busy = []
    for thread in threading.enumerate():
        if not thread.name.startswith(("aiovirtstream-io", "AnyIO worker", "asyncio_")):
            continue
        frame = frames.get(thread.ident or -1)
        if frame is None or frame.f_code.co_name == "_worker":
            continue
        while frame is not None and not (
            frame.f_code.co_name == "get" and frame.f_code.co_filename.endswith("queue.py")
        ):
            frame = frame.f_back
        if frame is None:
            busy.append(thread.name)
    frames.clear()  # it holds this frame: no cycle
    return busy


@dataclass(frozen=True)
class Footprint:
    """What a process holds that a finished transfer must give back."""

    fds: int
    watches: int
    timers: int
    timers_enabled: int
    busy_threads: tuple[str, ...]
    part_files: tuple[str, ...]

    @classmethod
    def take(cls, folder: Path | None = None) -> Footprint:
        stats = avs.get_event_impl().stats()
        parts = sorted(p.name for p in folder.glob(".*.part")) if folder is not None else []
        return cls(
            fd_count(),
            stats.watches,
            stats.timers,
            stats.timers_enabled,
            tuple(busy_worker_threads()),
            tuple(parts),
        )

    def beyond(self, baseline: Footprint) -> dict[str, object]:
        """What this footprint holds beyond ``baseline`` (empty: nothing)."""
        more: dict[str, object] = {}
        for name in ("fds", "watches", "timers", "timers_enabled"):
            if getattr(self, name) > getattr(baseline, name):
                more[name] = (getattr(baseline, name), getattr(self, name))
        if self.busy_threads:
            more["busy_threads"] = self.busy_threads
        if self.part_files:
            more["part_files"] = self.part_files
        return more


async def left_behind(
    baseline: Footprint, folder: Path | None = None, *, collect: bool = False
) -> dict[str, object]:
    """What is held beyond ``baseline`` once 3 s have passed (empty: nothing).

    Aborts finish in worker threads and libvirt frees a stream's timer a
    little later: what is left behind is what is still there after the wait.
    ``collect``: if something is, run the garbage collector and wait again
    (``anyio.fail_after`` keeps the error it replaces in a reference cycle on
    Python 3.12+, and with it what the cancelled frames held).
    """
    deadline = time.monotonic() + 3
    while True:
        more = Footprint.take(folder).beyond(baseline)
        if not more or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.002)
    if more and collect:
        print(f"\nheld until the garbage collector ran: {more}")
        gc.collect()
        return await left_behind(baseline, folder)
    return more


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """The cyclic garbage collector off for the block, after one collection:
    what a reference cycle made in the block holds stays held, for the
    block's checks (:func:`left_behind`) to see."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class AdoptedStreams:
    """How the streams copy() adopts ended (``adopt_stream`` monkeypatched to note them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._streams: list[avs.AsyncStream] = []
        self._forgotten: list[weakref.ref[avs.AsyncStream]] = []
        real = copy_module.adopt_stream  # type: ignore[attr-defined]

        async def adopt(*args: object, **kwargs: object) -> avs.AsyncStream:
            stream = await real(*args, **kwargs)  # type: ignore[arg-type]
            self._streams.append(stream)
            return stream

        monkeypatch.setattr(copy_module, "adopt_stream", adopt)

    def states(self) -> dict[str, str]:
        """``{"source": state, "destination": state}``; forgets the streams (:meth:`held`)."""
        states = [repr(s).rsplit(" ", 1)[1].rstrip(">") for s in self._streams]
        self._forgotten += [weakref.ref(s) for s in self._streams]
        self._streams.clear()
        return dict(zip(["source", "destination"], states, strict=True))

    async def held(self) -> int:
        """How many streams forgotten by :meth:`states` are still alive 3 s on (0: none)."""
        deadline = time.monotonic() + 3
        while True:
            alive = sum(ref() is not None for ref in self._forgotten)
            if not alive or time.monotonic() > deadline:
                return alive
            await asyncio.sleep(0.002)


class ListSink:
    """A ReceiveSink that keeps everything in memory, ``room`` bytes per buffer."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.data = bytearray()
        self.holes: list[int] = []
        self.items: list[int | str] = []  # sizes received, "hole" markers
        self._buffer = bytearray(room + 7)
        self.full = False  # when True, buffer() reports no room

    def buffer(self) -> tuple[bytearray, int, int] | None:
        if self.full:
            return None
        return self._buffer, 7, self.room  # an offset, to check it is honoured

    def received(self, nbytes: int) -> None:
        self.data += self._buffer[7 : 7 + nbytes]
        self.items.append(nbytes)

    def hole(self, length: int) -> None:
        self.holes.append(length)
        self.items.append("hole")
        self.data += bytes(length)


async def test_read_into_round_trip(make_volume: MakeVolume, receive_path: str) -> None:
    size = 3 * MiB + 12345
    data = os.urandom(size)
    vol = await make_volume(f"read-into-{receive_path}", size)
    await upload_all(vol, data)
    out = bytearray()
    buffer = bytearray(100_000)
    view = memoryview(bytearray(70_000))[10:]  # a writable view that does not start at 0
    async with await avs.open_volume_download(vol) as stream:
        for turn in range(10**6):
            target = buffer if turn % 2 else view
            got = await stream.read_into(target)
            assert isinstance(got, int)
            if got == 0:
                break
            assert 0 < got <= memoryview(target).nbytes
            out += memoryview(target)[:got]
        assert await stream.read_into(buffer) == 0  # stays at the end
    assert bytes(out) == data
    with pytest.raises(ValueError):
        async with await avs.open_volume_download(vol) as stream:
            await stream.read_into(bytearray())


async def test_read_into_stops_at_holes(make_volume: MakeVolume, receive_path: str) -> None:
    vol = await make_volume(f"read-into-holes-{receive_path}", 8 * MiB)
    head = os.urandom(MiB)
    async with await avs.open_volume_upload(vol, sparse=True) as stream:
        await stream.send_hole(2 * MiB)
        await stream.write(head)
        await stream.send_hole(5 * MiB)
    items: list[int | avs.Hole] = []
    buffer = bytearray(MiB)
    out = bytearray()
    async with await avs.open_volume_download(vol, sparse=True) as stream:
        while (got := await stream.read_into(buffer, stop_at_hole=True)) != 0:
            items.append(got)
            if isinstance(got, avs.Hole):
                out += bytes(got.length)
            else:
                out += buffer[:got]
    assert isinstance(items[0], avs.Hole) and items[0].length == 2 * MiB
    assert isinstance(items[-1], avs.Hole) and items[-1].length == 5 * MiB
    assert bytes(out) == bytes(2 * MiB) + head + bytes(5 * MiB)


class Collect(anyio.abc.ByteSendStream):
    """An anyio byte stream (a download's destination) that keeps what it is sent,
    or only counts it with ``keep=False``; ``delay`` seconds a send, as a slow
    network client takes."""

    def __init__(self, *, delay: float = 0, keep: bool = True) -> None:
        self.data = bytearray()
        self.count = 0
        self._delay = delay
        self._keep = keep

    async def send(self, item: bytes) -> None:
        self.count += len(item)
        if self._keep:
            self.data += item
        if self._delay:
            await anyio.sleep(self._delay)

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


@dataclass(frozen=True)
class StreamStart:
    """One start of a volume's stream, seen at libvirt-python's public API."""

    vol: libvirt.virStorageVol
    stream: libvirt.virStream
    offset: int
    length: int
    flags: int


VolumeStreamCall = Callable[[libvirt.virStorageVol, libvirt.virStream, int, int, int], int]
AroundStreamCall = Callable[
    [VolumeStreamCall, libvirt.virStorageVol, libvirt.virStream, int, int, int], int
]


def spy_stream_starts(
    monkeypatch: pytest.MonkeyPatch,
    method: str = "download",
    around: AroundStreamCall | None = None,
) -> list[StreamStart]:
    """Record the streams started by ``virStorageVol.download`` (or ``upload``).

    The calls run in worker threads (``list.append`` is atomic); a start that
    raised is not recorded. ``around(real, vol, stream, offset, length, flags)``
    replaces the call: to delay it, or to start it on another volume.
    """
    starts: list[StreamStart] = []
    real: VolumeStreamCall = getattr(libvirt.virStorageVol, method)

    def spy(
        vol: libvirt.virStorageVol,
        stream: libvirt.virStream,
        offset: int,
        length: int,
        flags: int = 0,
    ) -> int:
        if around is not None:
            result = around(real, vol, stream, offset, length, flags)
        else:
            result = real(vol, stream, offset, length, flags)
        starts.append(StreamStart(vol, stream, offset, length, flags))
        return result

    monkeypatch.setattr(libvirt.virStorageVol, method, spy)
    return starts


def around_writes(
    monkeypatch: pytest.MonkeyPatch,
    folder: Path,
    before: Callable[[], object] | None = None,
    after: Callable[[], object] | None = None,
) -> None:
    """Run ``before`` / ``after`` around every ``os.pwrite`` and ``os.pwritev`` into a
    file in ``folder``: a download's writes (in its writer thread), through the page
    cache or direct. ``before`` may raise, as a full disk does."""
    inside = str(folder) + os.sep

    for name in ("pwrite", "pwritev"):
        real = getattr(os, name)

        def wrapped(fd: int, data: Any, offset: int, *args: int, _real: Any = real) -> int:
            try:
                ours = os.readlink(f"/proc/self/fd/{fd}").startswith(inside)
            except OSError:
                ours = False
            if ours and before is not None:
                before()
            written: int = _real(fd, data, offset, *args)
            if ours and after is not None:
                after()
            return written

        monkeypatch.setattr(os, name, wrapped)


@dataclass
class SocketPauses:
    """The fds a download paused and resumed reading (the event implementation's
    public ``pause_reading`` / ``resume_reading``)."""

    paused: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)

    def unbalanced(self) -> dict[int, int]:
        """Pauses less resumes, by fd where they differ (empty: every socket paused
        was resumed, once a pause)."""
        left = Counter(self.paused)
        left.subtract(self.resumed)
        return {fd: count for fd, count in left.items() if count}


def spy_socket_pauses(monkeypatch: pytest.MonkeyPatch) -> SocketPauses:
    """Record every ``pause_reading`` and ``resume_reading`` from now on."""
    pauses = SocketPauses()
    impl = avs.get_event_impl()
    real_pause, real_resume = impl.pause_reading, impl.resume_reading

    def pause(fd: int) -> None:
        pauses.paused.append(fd)
        real_pause(fd)

    def resume(fd: int) -> None:
        pauses.resumed.append(fd)
        real_resume(fd)

    monkeypatch.setattr(impl, "pause_reading", pause)
    monkeypatch.setattr(impl, "resume_reading", resume)
    return pauses


def run_script(source: str, folder: Path, timeout: float = 60) -> str:
    """Run ``source`` in a fresh Python process (in ``folder``); what it printed.

    For what would hang the test process itself: a deadlock fails the test
    as a timeout instead.
    """
    done = subprocess.run(
        [sys.executable, "-W", "ignore::ResourceWarning", "-c", source],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
