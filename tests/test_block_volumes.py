"""Volumes on block devices: a loop device's node in a dir pool's folder, moved as virsh moves it.

An unprivileged daemon cannot run ``logical`` or ``disk`` pools (LVM and
parted need root), but its ``dir`` pool lists a block device node found in
its folder as a volume. The test (as root) attaches a loop device, makes a
node of it in the test's pool folder, owned by the daemon's user, and
refreshes the pool.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pwd
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import libvirt
import pytest
from _helpers.spies import spy_stream_starts

import aiovirtstream as avs
from aiovirtstream._volume import volume_size
from aiovirtstream.testing import PoolInfo, Sandbox

MiB = 1024 * 1024
SIZE = 128 * MiB  # two download ranges of 64 MiB, the least parallel=2 splits into
NAME = "loop.dev"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unavailable(problem: str) -> NoReturn:
    message = f"BLOCK-DEVICE VOLUME TESTS NEED A LOOP DEVICE: {problem}"
    if _in_ci():
        pytest.fail(f"{message}, and CI=true: they must run there", pytrace=False)
    pytest.skip(f"{message}; they run in CI")


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A loop device over a sparse 128 MiB file, detached after the test (root only)."""
    if os.geteuid() != 0:
        _unavailable("run as root to attach one (losetup)")
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    try:
        attached = subprocess.run(
            ["losetup", "--find", "--show", str(backing)],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as error:
        backing.unlink()
        _unavailable(f"losetup failed: {getattr(error, 'stderr', '') or error}")
    device = Path(attached.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=True)
        backing.unlink()


@dataclass(frozen=True)
class BlockVolume:
    vol: libvirt.virStorageVol
    node: Path  # the node in the pool's folder: the volume's path
    pool: PoolInfo


def _refresh(sandbox: Sandbox, pool: PoolInfo) -> None:
    with sandbox.connect() as setup:
        setup.storagePoolLookupByName(pool.name).refresh(0)


@pytest.fixture
async def unix_conn(libvirt_sandbox: Sandbox) -> AsyncIterator[libvirt.virConnect]:
    conn = await avs.connect(libvirt_sandbox.uri)
    yield conn
    await avs.aclose_connection(conn)


@pytest.fixture
async def block(
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    loop_device: Path,
    unix_conn: libvirt.virConnect,
) -> AsyncIterator[BlockVolume]:
    """The loop device as volume ``loop.dev`` of the test's pool, full of random bytes."""
    node = libvirt_pool.path / NAME
    os.mknod(node, stat.S_IFBLK | 0o600, os.stat(loop_device).st_rdev)
    try:
        user = pwd.getpwnam(libvirt_sandbox.daemon_user)
        os.chown(node, user.pw_uid, user.pw_gid)
        await asyncio.to_thread(fill_randomly, node)
        await asyncio.to_thread(_refresh, libvirt_sandbox, libvirt_pool)
        vol = await avs.lookup_volume(unix_conn, NAME, pool=libvirt_pool.name)
        yield BlockVolume(vol, node, libvirt_pool)
    finally:
        node.unlink(missing_ok=True)
        await asyncio.to_thread(_refresh, libvirt_sandbox, libvirt_pool)


def fill_randomly(device: Path) -> None:
    chunk = os.urandom(MiB)
    with open(device, "r+b") as f:
        for at in range(0, SIZE, MiB):
            f.write(chunk[at // MiB :] + chunk[: at // MiB])  # no two MiB alike
        os.fsync(f.fileno())


def sparse_source(path: Path, size: int = SIZE) -> bytes:
    """A sparse file of ``size`` bytes with data in three places; its content."""
    with open(path, "wb") as f:
        f.truncate(size)
        for at, length in ((0, 64 * 1024), (3 * MiB, 2 * MiB), (size - MiB, MiB // 2)):
            f.seek(at)
            f.write(os.urandom(length))
    return path.read_bytes()


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def virsh(sandbox: Sandbox, *args: str) -> None:
    subprocess.run(["virsh", "-c", sandbox.uri, *args], check=True, capture_output=True)


async def test_a_device_node_is_a_fully_allocated_raw_volume_of_the_devices_size(
    block: BlockVolume,
) -> None:
    """libvirt's dir pool says "file" for a device node, with its size as capacity,
    allocation and physical size: downloads carry the device's bytes."""
    size = await asyncio.to_thread(volume_size, block.vol)
    assert (size.kind, size.format) == ("file", "raw")
    assert size.capacity == size.allocation == size.physical == SIZE
    assert size.fully_allocated and not size.container
    assert size.streamed == SIZE


@pytest.mark.parametrize("how", ["sparse", "dense", "iterable"])
async def test_an_upload_leaves_the_bytes_virsh_leaves(
    libvirt_sandbox: Sandbox,
    block: BlockVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    """The source's holes overwrite the device's old bytes with zeroes, as libvirt
    writes a sparse stream's holes into a block device; nothing is wiped first."""
    source = tmp_path / "source.img"
    content = sparse_source(source)
    await asyncio.to_thread(
        virsh,
        libvirt_sandbox,
        "vol-upload",
        "--sparse",
        "--pool",
        block.pool.name,
        NAME,
        str(source),
    )
    theirs = await asyncio.to_thread(digest, block.node)
    assert theirs == hashlib.sha256(content).hexdigest()
    await asyncio.to_thread(fill_randomly, block.node)
    wipes: list[int] = []
    monkeypatch.setattr(libvirt.virStorageVol, "wipe", lambda vol, flags=0: wipes.append(flags))
    caplog.set_level(logging.WARNING, logger="aiovirtstream._transfer")

    if how == "iterable":

        async def chunks() -> AsyncIterator[bytes]:
            for at in range(0, SIZE, 4 * MiB):
                yield content[at : at + 4 * MiB]

        result = await avs.upload(block.vol, chunks(), detect_zeroes=True)
    else:
        result = await avs.upload(block.vol, source, sparse=how == "sparse", checksum=True)
        assert result.sha256 == theirs

    assert await asyncio.to_thread(digest, block.node) == theirs
    assert (result.data_bytes, result.hole_bytes) == (SIZE, 0)
    assert wipes == [], "the upload wiped the device (libvirt writes zeroes over all of it)"
    if how != "dense":
        assert "fully allocated" in caplog.text and "emptied first" not in caplog.text


async def test_an_upload_into_part_of_the_device_leaves_the_rest(
    libvirt_sandbox: Sandbox, block: BlockVolume, tmp_path: Path
) -> None:
    """No hole is sent past the source to give the volume its size back: the
    device's bytes outside the range stay."""
    old = await asyncio.to_thread(block.node.read_bytes)
    source = tmp_path / "part.img"
    content = sparse_source(source, 8 * MiB)
    offset = 5 * MiB

    result = await avs.upload(block.vol, source, offset=offset)

    assert result.total_bytes == len(content)
    expected = old[:offset] + content + old[offset + len(content) :]
    now = await asyncio.to_thread(block.node.read_bytes)
    assert now == expected
    info = await asyncio.to_thread(block.vol.info)
    assert info[1] == SIZE


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("parallel", [1, 2])
async def test_a_download_gives_the_bytes_virsh_gives(
    libvirt_sandbox: Sandbox,
    block: BlockVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sparse: bool,
    parallel: int,
) -> None:
    """The whole device, zeroes included: libvirt reports no hole in a block device,
    so a sparse download is as allocated as a dense one (as with virsh --sparse)."""
    reference = tmp_path / "virsh.img"
    flags = ["--sparse"] if sparse else []
    await asyncio.to_thread(
        virsh,
        libvirt_sandbox,
        "vol-download",
        *flags,
        "--pool",
        block.pool.name,
        NAME,
        str(reference),
    )
    expected = await asyncio.to_thread(digest, reference)
    assert expected == await asyncio.to_thread(digest, block.node)
    starts = spy_stream_starts(monkeypatch)

    dest = tmp_path / "ours.img"
    result = await avs.download(block.vol, dest, sparse=sparse, parallel=parallel)

    assert await asyncio.to_thread(digest, dest) == expected
    assert (result.data_bytes, result.hole_bytes) == (SIZE, 0)
    ranges = sorted((start.offset, start.length) for start in starts)  # length 0: to the end
    assert ranges == ([(0, SIZE // 2), (SIZE // 2, SIZE // 2)] if parallel == 2 else [(0, 0)])


@pytest.mark.parametrize("case", ["larger", "at-offset", "length", "iterable-length"])
async def test_an_upload_past_the_devices_end_is_refused_before_anything_is_sent(
    block: BlockVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    before = await asyncio.to_thread(digest, block.node)
    starts = spy_stream_starts(monkeypatch, "upload")
    source = tmp_path / "source.img"

    if case == "larger":
        sparse_source(source, SIZE + MiB)
        with pytest.raises(avs.SourceTooLargeError, match=str(SIZE)):
            await avs.upload(block.vol, source)
    elif case == "at-offset":
        sparse_source(source, 2 * MiB)
        with pytest.raises(avs.SourceTooLargeError):
            await avs.upload(block.vol, source, offset=SIZE - MiB)
    elif case == "length":
        sparse_source(source, MiB)
        with pytest.raises(avs.InvalidRangeError, match=f"at most {MiB}"):
            await avs.upload(block.vol, source, offset=SIZE - MiB, length=2 * MiB)
    else:

        async def chunks() -> AsyncIterator[bytes]:
            yield b"\x01" * MiB

        with pytest.raises(avs.InvalidRangeError):
            await avs.upload(block.vol, chunks(), offset=SIZE + 1)

    assert starts == []
    assert await asyncio.to_thread(digest, block.node) == before
    with pytest.raises(avs.InvalidRangeError):
        await avs.download(block.vol, tmp_path / "past.img", offset=SIZE - MiB, length=2 * MiB)
    assert not (tmp_path / "past.img").exists()
