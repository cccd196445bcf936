"""copy(): one volume streamed into another, between two real daemons.

The session's sandbox stands for one host and a second sandbox of this module
for the other (``hosts``, conftest.py); faults and cancellation are in
test_faults_copy.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from _helpers.volumes import MiB, allocated
from conftest import Hosts

import aiovirtstream as avs
from aiovirtstream.testing import PoolInfo, Sandbox

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
