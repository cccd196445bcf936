"""Volumes that are not raw (qcow2): download() and upload() move the file, as virsh does."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import libvirt
import pytest
from _helpers.spies import spy_stream_starts
from _helpers.volumes import Collect

import aiovirtstream as avs
from aiovirtstream.testing import PoolInfo, Sandbox

MiB = 1024 * 1024
QCOW2_XML = (
    "<volume><name>{name}</name><capacity>{capacity}</capacity>"
    "<target><format type='qcow2'/></target></volume>"
)


@pytest.fixture(autouse=True)
def _qemu_utils() -> None:
    missing = [tool for tool in ("qemu-img", "qemu-io") if shutil.which(tool) is None]
    assert not missing, (
        f"{', '.join(missing)} not found: install the Debian package qemu-utils "
        "(`make debs`); libvirt needs qemu-img to create qcow2 volumes too"
    )


@pytest.fixture
async def unix_conn(libvirt_sandbox: Sandbox) -> AsyncIterator[libvirt.virConnect]:
    """One connection over the unix socket, for the tests that move 100+ MiB."""
    conn = await avs.connect(libvirt_sandbox.uri)
    yield conn
    await avs.aclose_connection(conn)


async def make_qcow2(
    sandbox: Sandbox, pool: PoolInfo, conn: libvirt.virConnect, name: str, capacity: int
) -> libvirt.virStorageVol:
    """A fresh qcow2 volume, made by libvirt (with qemu-img), looked up on ``conn``."""

    def create() -> None:
        with sandbox.connect() as setup:
            xml = QCOW2_XML.format(name=name, capacity=capacity)
            setup.storagePoolLookupByName(pool.name).createXML(xml, 0)

    await asyncio.to_thread(create)
    return await avs.lookup_volume(conn, name, pool=pool.name)


def qcow2_image(
    path: Path, capacity: int, writes: list[tuple[int, int, int]], *options: str
) -> bytes:
    """A qcow2 image of ``capacity`` with ``(pattern, offset, length)`` written; its bytes."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), str(capacity)],
        check=True,
    )
    for pattern, offset, length in writes:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(path)],
            check=True,
            capture_output=True,
        )
    return path.read_bytes()


def converted_image(tmp_path: Path) -> Path:
    """A qcow2 image converted from a sparse raw file holding data in two places."""
    raw = tmp_path / "guest.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(2 * MiB))
        f.seek(40 * MiB)
        f.write(os.urandom(MiB // 2))
    image = tmp_path / "converted.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    return image


def virsh(sandbox: Sandbox, *args: str) -> None:
    subprocess.run(["virsh", "-c", sandbox.uri, *args], check=True, capture_output=True)


async def virsh_download(sandbox: Sandbox, pool: PoolInfo, name: str, dest: Path) -> bytes:
    """The bytes ``virsh vol-download`` gives for the volume: the reference."""
    await asyncio.to_thread(virsh, sandbox, "vol-download", "--pool", pool.name, name, str(dest))
    return dest.read_bytes()


def small_clusters(path: Path) -> bytes:
    """A qcow2 image of 4 KiB clusters with 8 MiB of data: a file with data all
    over its first 8 MiB, where :func:`metadata_preallocated` has holes."""
    return qcow2_image(path, 64 * MiB, [(0x11, 0, 8 * MiB)], "-o", "cluster_size=4096")


def metadata_preallocated(path: Path) -> bytes:
    """A qcow2 image whose file has the full virtual size, with holes where no data is."""
    return qcow2_image(path, 64 * MiB, [(0x22, MiB, MiB)], "-o", "preallocation=metadata")


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 100_000):
        yield data[start : start + 100_000]


async def allocation(vol: libvirt.virStorageVol) -> int:
    return int((await asyncio.to_thread(vol.info))[2])


async def test_a_qcow2_download_gives_the_file_virsh_gives(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, conn: libvirt.virConnect, tmp_path: Path
) -> None:
    """A fresh 256 MiB qcow2 volume is a 196,616-byte file: that is what a download gives."""
    vol = await make_qcow2(libvirt_sandbox, libvirt_pool, conn, "fresh.qcow2", 256 * MiB)
    expected = await virsh_download(libvirt_sandbox, libvirt_pool, "fresh.qcow2", tmp_path / "v")
    assert 0 < len(expected) < MiB, "libvirt changed what it streams of a qcow2 volume"

    result = await avs.download(vol, tmp_path / "ours")
    assert (tmp_path / "ours").read_bytes() == expected
    assert result.total_bytes == len(expected)

    sink = Collect()
    await avs.download(vol, sink, sparse=False)
    assert bytes(sink.data) == expected

    with open(tmp_path / "window", "wb") as f:
        await avs.download(vol, f, offset=4096, length=len(expected) - 4096 - 100)
    assert (tmp_path / "window").read_bytes() == expected[4096:-100]


async def test_a_large_qcow2_file_downloads_over_two_streams(
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    unix_conn: libvirt.virConnect,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ranges split the file, not the guest's disk: none asks past the file's end."""
    image = tmp_path / "big.qcow2"
    qcow2_image(image, 512 * MiB, [(0x5A, 0, 150 * MiB), (0xA5, 300 * MiB, MiB)])
    vol = await make_qcow2(libvirt_sandbox, libvirt_pool, unix_conn, "big.qcow2", 512 * MiB)
    await asyncio.to_thread(
        virsh, libvirt_sandbox, "vol-upload", "--pool", libvirt_pool.name, "big.qcow2", str(image)
    )
    expected = await virsh_download(libvirt_sandbox, libvirt_pool, "big.qcow2", tmp_path / "v")
    assert expected == image.read_bytes()

    starts = spy_stream_starts(monkeypatch)
    result = await avs.download(vol, tmp_path / "ours", parallel=2)
    assert len(starts) == 2 and sum(start.length for start in starts) == len(expected)
    assert result.total_bytes == len(expected)
    assert (tmp_path / "ours").read_bytes() == expected


@pytest.mark.parametrize("kind", ["written", "converted"])
async def test_a_qcow2_image_uploads_as_it_is_and_as_sparse_as_virsh_leaves_it(
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    conn: libvirt.virConnect,
    tmp_path: Path,
    kind: str,
) -> None:
    if kind == "written":
        image = tmp_path / "image.qcow2"
        qcow2_image(image, 256 * MiB, [(0x5A, MiB, MiB)])
    else:
        image = converted_image(tmp_path)
    source = image.read_bytes()
    ours = await make_qcow2(libvirt_sandbox, libvirt_pool, conn, "ours.qcow2", 256 * MiB)
    theirs = await make_qcow2(libvirt_sandbox, libvirt_pool, conn, "theirs.qcow2", 256 * MiB)
    await asyncio.to_thread(
        virsh,
        libvirt_sandbox,
        *("vol-upload", "--sparse", "--pool", libvirt_pool.name, "theirs.qcow2", str(image)),
    )

    result = await avs.upload(ours, image)
    assert result.hole_bytes > 0, "no hole was sent as a hole"
    stored = await virsh_download(libvirt_sandbox, libvirt_pool, "ours.qcow2", tmp_path / "v")
    assert stored == source
    assert await allocation(ours) <= await allocation(theirs)

    await avs.download(ours, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == source


async def test_a_qcow2_image_from_an_iterable_with_zero_detection(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, conn: libvirt.virConnect, tmp_path: Path
) -> None:
    """Runs of zeroes past the volume file's end go as holes, those inside it as zeroes."""
    image = tmp_path / "image.qcow2"
    source = qcow2_image(image, 256 * MiB, [(0x5A, MiB, MiB), (0x33, 100 * MiB, 64 * 1024)])
    theirs = await make_qcow2(libvirt_sandbox, libvirt_pool, conn, "theirs.qcow2", 256 * MiB)
    await asyncio.to_thread(
        virsh,
        libvirt_sandbox,
        *("vol-upload", "--sparse", "--pool", libvirt_pool.name, "theirs.qcow2", str(image)),
    )
    ours = await make_qcow2(libvirt_sandbox, libvirt_pool, conn, "ours.qcow2", 256 * MiB)

    result = await avs.upload(ours, chunks(source), detect_zeroes=True)
    assert result.hole_bytes > 0
    stored = await virsh_download(libvirt_sandbox, libvirt_pool, "ours.qcow2", tmp_path / "v")
    assert stored == source
    assert await allocation(ours) <= await allocation(theirs)

    # Into a volume whose file has data where the image has runs of zeroes.
    await avs.upload(ours, chunks(small_clusters(tmp_path / "first.qcow2")))
    again = metadata_preallocated(tmp_path / "again.qcow2")
    await avs.upload(ours, chunks(again), detect_zeroes=True)
    stored = await virsh_download(libvirt_sandbox, libvirt_pool, "ours.qcow2", tmp_path / "v2")
    assert stored == again


async def test_holes_inside_the_volume_file_are_written_as_zeroes(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, conn: libvirt.virConnect, tmp_path: Path
) -> None:
    """libvirt keeps a file's old bytes in an uploaded hole: where the volume's
    file has data, the image's holes must go as zeroes."""
    first = small_clusters(tmp_path / "first.qcow2")
    second = metadata_preallocated(tmp_path / "second.qcow2")
    assert len(second) > len(first)
    vol = await make_qcow2(libvirt_sandbox, libvirt_pool, conn, "reused.qcow2", 64 * MiB)
    await avs.upload(vol, tmp_path / "first.qcow2")
    result = await avs.upload(vol, tmp_path / "second.qcow2")
    assert result.hole_bytes > 0, "the holes past the old file's end went as zeroes"
    stored = await virsh_download(libvirt_sandbox, libvirt_pool, "reused.qcow2", tmp_path / "v")
    assert stored == second, "the first image's data stayed inside the second's holes"
