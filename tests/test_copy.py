"""copy(): one volume streamed into another, between two real daemons.

The session's sandbox stands for one host and a second sandbox of this
module for the other; the fault tests crash or freeze sandboxes of their own.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import libvirt
import pytest
from _helpers import AdoptedStreams, Footprint, collector_off, left_behind, rss

import aiovirtstream as avs
import aiovirtstream._transfer._copy as copy_module
from aiovirtstream.testing import PoolInfo, Sandbox

MiB = 1 << 20
KEEPALIVE = (1, 3)  # gives up on a frozen daemon after about 1 * (3 + 1) s
HARD_TIMEOUT = 20.0


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def other_sandbox() -> Iterator[Sandbox]:
    """The second host: a storage sandbox of this module."""
    with Sandbox("storage") as sb:
        yield sb


@pytest.fixture
def other_pool(other_sandbox: Sandbox, libvirt_pool: PoolInfo) -> Iterator[PoolInfo]:
    pool = other_sandbox.create_pool(libvirt_pool.name)
    try:
        yield pool
    finally:
        other_sandbox.delete_pool(pool)


@dataclass
class Hosts:
    """Both sides: a sandbox, a pool in it and a stream connection to it."""

    src_sandbox: Sandbox
    src_pool: PoolInfo
    src_conn: libvirt.virConnect
    dst_sandbox: Sandbox
    dst_pool: PoolInfo
    dst_conn: libvirt.virConnect

    async def source(self, name: str, capacity: int, writes: dict[int, bytes]) -> Path:
        """A raw source volume with ``writes`` (offset: bytes) as its data; its path."""
        info = await self.src_sandbox.acreate_volume(self.src_pool, name, capacity)
        await anyio.to_thread.run_sync(_write, info.path, writes)
        return info.path

    async def dest(self, name: str, capacity: int, writes: dict[int, bytes] | None = None) -> Path:
        info = await self.dst_sandbox.acreate_volume(self.dst_pool, name, capacity)
        if writes:
            await anyio.to_thread.run_sync(_write, info.path, writes)
        return info.path

    async def volumes(
        self, src: str, dst: str
    ) -> tuple[libvirt.virStorageVol, libvirt.virStorageVol]:
        return (
            await avs.lookup_volume(self.src_conn, src, pool=self.src_pool.name),
            await avs.lookup_volume(self.dst_conn, dst, pool=self.dst_pool.name),
        )


@pytest.fixture
async def hosts(
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    other_sandbox: Sandbox,
    other_pool: PoolInfo,
) -> AsyncIterator[Hosts]:
    src_conn = await avs.connect(libvirt_sandbox.uri)
    dst_conn = await avs.connect(other_sandbox.uri)
    try:
        yield Hosts(libvirt_sandbox, libvirt_pool, src_conn, other_sandbox, other_pool, dst_conn)
    finally:
        await avs.aclose_connection(src_conn)
        await avs.aclose_connection(dst_conn)


def _write(path: Path, writes: dict[int, bytes]) -> None:
    with open(path, "r+b") as f:
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)


def _fill(path: Path, size: int) -> None:
    """``size`` bytes of data, a distinct MiB each."""
    block = bytearray(os.urandom(MiB))
    with open(path, "r+b") as f:
        for index in range(size // MiB):
            block[:8] = index.to_bytes(8, "little")
            f.write(block)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


# ---------------------------------------------------------------- data


async def test_dense_copy_is_byte_identical(hosts: Hosts) -> None:
    data = os.urandom(8 * MiB + 4096)
    src_path = await hosts.source("a.img", len(data), {0: data})
    dst_path = await hosts.dest("b.img", len(data))
    src, dst = await hosts.volumes("a.img", "b.img")
    result = await avs.copy(src, dst, checksum=True)
    assert dst_path.read_bytes() == src_path.read_bytes() == data
    assert result.data_bytes == len(data)
    assert result.hole_bytes == 0
    assert result.sha256 == hashlib.sha256(data).hexdigest()


async def test_sparse_copy_keeps_the_holes(hosts: Hosts) -> None:
    size = 64 * MiB
    writes = {MiB: os.urandom(MiB), 20 * MiB + 4096: os.urandom(12288), 50 * MiB: os.urandom(MiB)}
    src_path = await hosts.source("sparse.img", size, writes)
    dst_path = await hosts.dest("copy.img", size)
    src, dst = await hosts.volumes("sparse.img", "copy.img")
    result = await avs.copy(src, dst, checksum=True)
    assert dst_path.stat().st_size == size  # the last hole gave the volume its size back
    assert dst_path.read_bytes() == src_path.read_bytes()
    assert allocated(dst_path) <= allocated(src_path) + 64 * 1024
    assert result.total_bytes == size
    assert result.data_bytes == sum(len(d) for d in writes.values())
    assert result.sha256 == hashlib.sha256(src_path.read_bytes()).hexdigest()


async def test_not_sparse_moves_every_byte(hosts: Hosts) -> None:
    size = 8 * MiB
    src_path = await hosts.source("s.img", size, {3 * MiB: os.urandom(MiB)})
    dst_path = await hosts.dest("d.img", size)
    src, dst = await hosts.volumes("s.img", "d.img")
    result = await avs.copy(src, dst, sparse=False)
    assert result.data_bytes == size
    assert dst_path.read_bytes() == src_path.read_bytes()
    assert allocated(dst_path) >= size


async def test_holes_over_data_come_out_as_zeroes(hosts: Hosts) -> None:
    """A range copied into a volume holding data: its holes clear the old data."""
    size = 16 * MiB
    src_path = await hosts.source("s.img", size, {4 * MiB: os.urandom(MiB)})
    old = {0: b"\x5a" * (16 * MiB)}
    dst_path = await hosts.dest("d.img", size, old)
    src, dst = await hosts.volumes("s.img", "d.img")
    await avs.copy(src, dst, offset=2 * MiB, length=8 * MiB)
    after, source = dst_path.read_bytes(), src_path.read_bytes()
    assert after[2 * MiB : 10 * MiB] == source[2 * MiB : 10 * MiB]
    assert after[: 2 * MiB] == after[10 * MiB :][: 2 * MiB] == b"\x5a" * (2 * MiB)
    assert len(after) == size


async def test_a_whole_copy_empties_a_volume_with_data_first(hosts: Hosts) -> None:
    """Overwritten whole, a destination holding data is wiped and stays sparse."""
    size = 32 * MiB
    src_path = await hosts.source("s.img", size, {MiB: os.urandom(MiB)})
    dst_path = await hosts.dest("d.img", size, {0: b"\x77" * (8 * MiB), 30 * MiB: b"\x77" * MiB})
    src, dst = await hosts.volumes("s.img", "d.img")
    await avs.copy(src, dst)
    assert dst_path.read_bytes() == src_path.read_bytes()
    assert allocated(dst_path) <= 2 * MiB


async def test_offset_and_length(hosts: Hosts) -> None:
    data = os.urandom(8 * MiB)
    await hosts.source("s.img", len(data), {0: data})
    dst_path = await hosts.dest("d.img", len(data))
    src, dst = await hosts.volumes("s.img", "d.img")
    result = await avs.copy(src, dst, offset=MiB + 512, length=3 * MiB)
    assert result.total_bytes == 3 * MiB
    after = dst_path.read_bytes()
    assert after[MiB + 512 : 4 * MiB + 512] == data[MiB + 512 : 4 * MiB + 512]
    assert after[: MiB + 512] == bytes(MiB + 512)
    assert after[4 * MiB + 512 :] == bytes(len(data) - 4 * MiB - 512)
    # length 0: from the offset up to the source's end
    result = await avs.copy(src, dst, offset=6 * MiB)
    assert result.total_bytes == 2 * MiB
    assert dst_path.read_bytes()[6 * MiB :] == data[6 * MiB :]


async def test_progress_counts_up_to_the_total(hosts: Hosts) -> None:
    size = 16 * MiB
    await hosts.source("s.img", size, {0: os.urandom(size)})
    await hosts.dest("d.img", size)
    src, dst = await hosts.volumes("s.img", "d.img")
    seen: list[avs.TransferProgress] = []
    await avs.copy(src, dst, progress=seen.append, progress_interval=0.001)
    assert seen[-1].total == size
    assert seen[-1].done_bytes == size
    assert [p.done_bytes for p in seen] == sorted(p.done_bytes for p in seen)


async def test_on_one_connection(hosts: Hosts) -> None:
    """Both volumes on one daemon and one connection."""
    data = os.urandom(4 * MiB)
    await hosts.source("s.img", len(data), {0: data})
    info = await hosts.src_sandbox.acreate_volume(hosts.src_pool, "d.img", len(data))
    src = await avs.lookup_volume(hosts.src_conn, "s.img", pool=hosts.src_pool.name)
    dst = await avs.lookup_volume(hosts.src_conn, "d.img", pool=hosts.src_pool.name)
    await avs.copy(src, dst)
    assert info.path.read_bytes() == data


def _qcow2(path: Path, capacity: int) -> bytes:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(capacity)], check=True
    )
    for pattern, offset in ((0x11, 0), (0x22, 40 * MiB)):
        command = f"write -P {pattern} {offset} {MiB}"
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", command, str(path)], check=True, capture_output=True
        )
    return path.read_bytes()


async def test_a_qcow2_volume_is_copied_as_its_file(hosts: Hosts, tmp_path: Path) -> None:
    missing = [tool for tool in ("qemu-img", "qemu-io") if shutil.which(tool) is None]
    assert not missing, f"{', '.join(missing)} not found: install qemu-utils (`make debs`)"
    capacity = 64 * MiB
    image = await anyio.to_thread.run_sync(_qcow2, tmp_path / "guest.qcow2", capacity)
    xml = (
        "<volume><name>{name}</name><capacity>{capacity}</capacity>"
        "<target><format type='qcow2'/></target></volume>"
    )

    def create(sandbox: Sandbox, pool: PoolInfo, name: str) -> Path:
        with sandbox.connect() as setup:
            vol = setup.storagePoolLookupByName(pool.name).createXML(
                xml.format(name=name, capacity=capacity), 0
            )
            return Path(vol.path())

    src_path = await anyio.to_thread.run_sync(create, hosts.src_sandbox, hosts.src_pool, "s.qcow2")
    dst_path = await anyio.to_thread.run_sync(create, hosts.dst_sandbox, hosts.dst_pool, "d.qcow2")
    src, dst = await hosts.volumes("s.qcow2", "d.qcow2")
    await avs.upload(src, tmp_path / "guest.qcow2")
    assert src_path.read_bytes() == image
    result = await avs.copy(src, dst)
    assert result.total_bytes == len(image)
    assert dst_path.read_bytes() == image
    check = await anyio.run_process(["qemu-img", "check", "-q", str(dst_path)], check=False)
    assert check.returncode == 0, check.stderr


# ---------------------------------------------------------------- refused before anything moves


async def test_bad_ranges_are_refused(hosts: Hosts) -> None:
    await hosts.source("s.img", 4 * MiB, {0: os.urandom(MiB)})
    dst_path = await hosts.dest("d.img", 4 * MiB)
    src, dst = await hosts.volumes("s.img", "d.img")
    with pytest.raises(avs.InvalidRangeError, match="negative"):
        await avs.copy(src, dst, offset=-1)
    with pytest.raises(avs.InvalidRangeError, match="negative"):
        await avs.copy(src, dst, length=-5)
    with pytest.raises(avs.InvalidRangeError, match="past the end"):
        await avs.copy(src, dst, offset=3 * MiB, length=2 * MiB)
    with pytest.raises(avs.InvalidRangeError, match="past the end"):
        await avs.copy(src, dst, offset=5 * MiB)
    assert allocated(dst_path) == 0


async def test_a_destination_too_small(hosts: Hosts) -> None:
    await hosts.source("s.img", 8 * MiB, {0: os.urandom(8 * MiB)})
    dst_path = await hosts.dest("d.img", 6 * MiB)
    src, dst = await hosts.volumes("s.img", "d.img")
    with pytest.raises(avs.SourceTooLargeError, match="resize the destination"):
        await avs.copy(src, dst)
    with pytest.raises(avs.SourceTooLargeError):
        await avs.copy(src, dst, offset=4 * MiB, length=3 * MiB)
    assert allocated(dst_path) == 0
    result = await avs.copy(src, dst, length=6 * MiB)  # what fits does
    assert result.total_bytes == 6 * MiB


async def test_busy_volumes_are_refused(hosts: Hosts) -> None:
    await hosts.source("s.img", 4 * MiB, {0: os.urandom(4 * MiB)})
    await hosts.dest("d.img", 4 * MiB)
    src, dst = await hosts.volumes("s.img", "d.img")
    with pytest.raises(avs.VolumeBusyError):
        await avs.copy(src, src)  # into itself
    uploading = asyncio.Event()

    async def slow_source() -> AsyncIterator[bytes]:
        yield b"y" * 4096
        uploading.set()
        await asyncio.sleep(30)

    async with anyio.create_task_group() as group:
        group.start_soon(avs.upload, dst, slow_source())
        await uploading.wait()
        with pytest.raises(avs.VolumeBusyError):
            await avs.copy(src, dst)
        with pytest.raises(avs.VolumeBusyError):
            await avs.copy(dst, src)  # out of a volume being uploaded into
        group.cancel_scope.cancel()


async def test_a_volume_is_not_copied_into_itself_through_two_uris(hosts: Hosts) -> None:
    """Two URIs of one daemon look like two hosts; the file is still the same one."""
    data = os.urandom(4 * MiB)
    path = await hosts.source("self.img", len(data), {0: data, 6 * MiB: b"x"})
    other = await avs.connect(hosts.src_sandbox.uri + "&no_tty=1")
    try:
        src = await avs.lookup_volume(hosts.src_conn, "self.img", pool=hosts.src_pool.name)
        dst = await avs.lookup_volume(other, "self.img", pool=hosts.src_pool.name)
        with pytest.raises(avs.TransferError, match="cannot be copied into itself"):
            await avs.copy(src, dst)
    finally:
        await avs.aclose_connection(other)
    assert path.read_bytes()[: len(data)] == data


async def test_the_same_path_on_two_hosts_is_copied(hosts: Hosts) -> None:
    """Volumes at one path on two daemons (the keys agree) are two volumes."""
    data = os.urandom(2 * MiB)
    await hosts.source("same.img", len(data), {0: data})
    dst_path = await hosts.dest("same.img", len(data))
    src, dst = await hosts.volumes("same.img", "same.img")
    src_key = src.key()
    dst.key = lambda: src_key  # as if the sandboxes kept their volumes in one folder
    await avs.copy(src, dst)
    assert dst_path.read_bytes() == data


# ---------------------------------------------------------------- faults


@pytest.fixture
def own_sandbox() -> Iterator[Sandbox]:
    """A sandbox of this test's own: it may be killed or frozen."""
    with Sandbox("storage") as sb:
        sb.create_pool("pool")
        yield sb


class FaultAt:
    """A progress callback that runs ``fault`` once ``threshold`` bytes were copied."""

    def __init__(self, fault: object, threshold: int = 32 * MiB) -> None:
        self.fault = fault
        self.threshold = threshold
        self.at: float | None = None

    def __call__(self, progress: avs.TransferProgress) -> None:
        if self.at is None and progress.done_bytes >= self.threshold:
            self.fault()  # type: ignore[operator]
            self.at = time.perf_counter()


async def _copy_between(
    src_uri: str,
    src_pool: str,
    dst_uri: str,
    dst_pool: str,
    fault: FaultAt,
    *,
    dst_keepalive: tuple[int, int] | None = (5, 3),
) -> tuple[type[BaseException], str, str | None, float]:
    """Copy ``big.img`` into ``copy.img``; (error type, message, uri, when) of its failure."""
    src_conn = await avs.connect(src_uri)
    dst_conn = await avs.connect(dst_uri, keepalive=dst_keepalive)
    try:
        src = await avs.lookup_volume(src_conn, "big.img", pool=src_pool)
        dst = await avs.lookup_volume(dst_conn, "copy.img", pool=dst_pool)
        try:
            with anyio.fail_after(HARD_TIMEOUT):
                await avs.copy(src, dst, progress=fault, progress_interval=0.005)
        except avs.AioVirtStreamError as error:
            return type(error), str(error), getattr(error, "uri", None), time.perf_counter()
        raise AssertionError("the copy ended without an error")
    finally:
        await avs.aclose_connection(src_conn)
        await avs.aclose_connection(dst_conn)


async def _big_source(sandbox: Sandbox, pool: str, size: int) -> None:
    info = await sandbox.acreate_volume(pool, "big.img", size)
    await anyio.to_thread.run_sync(_fill, info.path, size)


async def test_source_killed(
    own_sandbox: Sandbox,
    other_sandbox: Sandbox,
    other_pool: PoolInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await _big_source(own_sandbox, "pool", 256 * MiB)
    await other_sandbox.acreate_volume(other_pool, "copy.img", 256 * MiB)
    adopted = AdoptedStreams(monkeypatch)
    kill = FaultAt(own_sandbox.kill)
    with collector_off():
        baseline = Footprint.take()
        kind, message, uri, at = await _copy_between(
            own_sandbox.uri, "pool", other_sandbox.uri, other_pool.name, kill
        )
        assert kill.at is not None, f"the copy ended before the kill: {message}"
        assert issubclass(kind, avs.ConnectionLostError), f"{kind.__name__}: {message}"
        assert uri == own_sandbox.uri and own_sandbox.uri in message
        assert at - kill.at < 3.0
        assert adopted.states() == {"source": "broken", "destination": "aborted"}
        assert await left_behind(baseline) == {}


async def test_destination_killed(
    own_sandbox: Sandbox,
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await _big_source(libvirt_sandbox, libvirt_pool.name, 256 * MiB)
    await own_sandbox.acreate_volume("pool", "copy.img", 256 * MiB)
    adopted = AdoptedStreams(monkeypatch)
    kill = FaultAt(own_sandbox.kill)
    with collector_off():
        baseline = Footprint.take()
        kind, message, uri, at = await _copy_between(
            libvirt_sandbox.uri, libvirt_pool.name, own_sandbox.uri, "pool", kill
        )
        assert kill.at is not None, f"the copy ended before the kill: {message}"
        assert issubclass(kind, avs.ConnectionLostError), f"{kind.__name__}: {message}"
        assert uri == own_sandbox.uri and own_sandbox.uri in message
        assert at - kill.at < 3.0
        assert adopted.states() == {"source": "aborted", "destination": "broken"}
        assert await left_behind(baseline) == {}


async def test_destination_frozen(
    own_sandbox: Sandbox, libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """The destination's keepalive gives up: its error, the source aborted."""
    await _big_source(libvirt_sandbox, libvirt_pool.name, 256 * MiB)
    await own_sandbox.acreate_volume("pool", "copy.img", 256 * MiB)
    freeze = FaultAt(own_sandbox.freeze)
    try:
        kind, message, uri, at = await _copy_between(
            libvirt_sandbox.uri,
            libvirt_pool.name,
            own_sandbox.uri,
            "pool",
            freeze,
            dst_keepalive=KEEPALIVE,
        )
    finally:
        own_sandbox.thaw()
    assert freeze.at is not None, f"the copy ended before the freeze: {message}"
    assert issubclass(kind, avs.ConnectionLostError), f"{kind.__name__}: {message}"
    assert uri == own_sandbox.uri
    assert 2.0 < at - freeze.at < 10.0


class CancelAtStart:
    """A progress callback: at the first bytes copied, ``stall()``, then
    ``cancel(when)`` with ``when`` 50 ms later on the loop's clock."""

    def __init__(self, stall: Callable[[], object]) -> None:
        self.stall = stall
        self.cancel: Callable[[float], object] | None = None

    def __call__(self, progress: avs.TransferProgress) -> None:
        if progress.done_bytes and self.cancel is not None:
            cancel, self.cancel = self.cancel, None
            self.stall()
            cancel(asyncio.get_running_loop().time() + 0.05)


async def _cancelled_copy(
    how: str, src: libvirt.virStorageVol, dst: libvirt.virStorageVol, stall: Callable[[], object]
) -> None:
    """copy() cancelled ``how`` 50 ms after its first bytes (``stall()`` first): the
    cancellation must be seen as itself, before the copy ended."""
    at_start = CancelAtStart(stall)
    copying = avs.copy(src, dst, progress=at_start, progress_interval=0.001)
    if how == "task.cancel":
        task = asyncio.ensure_future(copying)

        def cancel(when: float) -> None:
            asyncio.get_running_loop().call_at(when, task.cancel)

        at_start.cancel = cancel
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        return
    deadline = anyio.fail_after if how == "fail_after" else anyio.move_on_after
    try:
        with deadline(30) as scope:
            at_start.cancel = functools.partial(setattr, scope, "deadline")
            await copying
        assert scope.cancelled_caught, "the copy ended before the cancellation"
    except TimeoutError as error:
        assert how == "fail_after"
        if sys.version_info >= (3, 12) and error.__context__ is not None:
            # fail_after's own generator frames (and, through their f_back, the
            # contextlib frame that holds the CancelledError) make a cycle with
            # the CancelledError it turned into TimeoutError: not the copy's.
            error.__context__.__traceback__ = None
    else:
        assert how == "move_on_after", "fail_after raised no TimeoutError"


@pytest.mark.parametrize("how", ["fail_after", "move_on_after", "task.cancel"])
async def test_cancelled(
    hosts: Hosts, other_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The cancellation as itself; both streams aborted; nothing left open or in a
    reference cycle (the garbage collector off), also with a send stuck in a frozen
    destination."""
    size = 256 * MiB
    await _big_source(hosts.src_sandbox, hosts.src_pool.name, size)
    await hosts.dest("copy.img", size)
    src, dst = await hosts.volumes("big.img", "copy.img")
    await avs.copy(src, dst, length=MiB)  # warm: worker threads exist before the baseline
    adopted = AdoptedStreams(monkeypatch)
    with collector_off():
        baseline = Footprint.take()
        for stall in (lambda: None, other_sandbox.freeze):
            try:
                await _cancelled_copy(how, src, dst, stall)
            finally:
                other_sandbox.thaw()
            assert adopted.states() == {"source": "aborted", "destination": "aborted"}
        assert await adopted.held() == 0, "a stream is held in a reference cycle"
        assert await left_behind(baseline) == {}


async def test_memory_stays_bounded_while_the_destination_stalls(
    own_sandbox: Sandbox, libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """A fast source, a destination frozen for a while: RSS grows by less than the budget."""
    size = 512 * MiB
    await _big_source(libvirt_sandbox, libvirt_pool.name, size)
    await own_sandbox.acreate_volume("pool", "copy.img", size)
    src_conn = await avs.connect(libvirt_sandbox.uri)
    dst_conn = await avs.connect(own_sandbox.uri)
    peak = 0
    stalled = anyio.Event()

    def progress(p: avs.TransferProgress) -> None:
        if p.done_bytes >= 64 * MiB and not stalled.is_set():
            own_sandbox.freeze()
            stalled.set()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss())
            await anyio.sleep(0.005)

    async def thaw_later() -> None:
        await stalled.wait()
        await anyio.sleep(2.0)
        own_sandbox.thaw()

    try:
        src = await avs.lookup_volume(src_conn, "big.img", pool=libvirt_pool.name)
        dst = await avs.lookup_volume(dst_conn, "copy.img", pool="pool")
        await avs.copy(src, dst, length=MiB)  # warm up: buffers and threads exist
        base = rss()
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                group.start_soon(sample)
                group.start_soon(thaw_later)
                result = await avs.copy(src, dst, progress=progress, progress_interval=0.005)
                group.cancel_scope.cancel()
    finally:
        own_sandbox.thaw()
        await avs.aclose_connection(src_conn)
        await avs.aclose_connection(dst_conn)
    assert stalled.is_set()
    assert result.total_bytes == size
    growth = peak - base
    print(f"RSS growth {growth / MiB:.1f} MiB (budget {copy_module.COPY_BUFFER / MiB:.0f} MiB)")
    assert growth < copy_module.COPY_BUFFER
