"""Bad input refused where it enters; nothing reported done that is not; no cycle left."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio.abc
import libvirt
import pytest
from conftest import MakeVolume

import aiovirtstream as avs
from aiovirtstream.testing import PoolInfo, Sandbox

MiB = 1024 * 1024
Entry = Callable[[libvirt.virStorageVol, Path, int, int], Awaitable[object]]


async def _upload(vol: libvirt.virStorageVol, folder: Path, offset: int, length: int) -> object:
    source = folder / "five"
    source.write_bytes(b"12345")
    return await avs.upload(vol, source, offset=offset, length=length)


async def _download(vol: libvirt.virStorageVol, folder: Path, offset: int, length: int) -> object:
    return await avs.download(vol, folder / "out", offset=offset, length=length)


async def _open_upload(
    vol: libvirt.virStorageVol, folder: Path, offset: int, length: int
) -> object:
    async with await avs.open_volume_upload(vol, offset=offset, length=length) as stream:
        await stream.write(b"12345")
    return None


async def _open_download(
    vol: libvirt.virStorageVol, folder: Path, offset: int, length: int
) -> object:
    async with await avs.open_volume_download(vol, offset=offset, length=length) as stream:
        return b"".join([chunk async for chunk in stream])


ENTRIES: dict[str, Entry] = {
    "upload": _upload,
    "download": _download,
    "open_volume_upload": _open_upload,
    "open_volume_download": _open_download,
}
QCOW2_XML = (
    "<volume><name>{name}</name><capacity>{capacity}</capacity>"
    "<target><format type='qcow2'/></target></volume>"
)


async def allocation(vol: libvirt.virStorageVol) -> int:
    return int((await asyncio.to_thread(vol.info))[2])


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(("offset", "length"), [(-1, 0), (0, -1)])
async def test_negative_offsets_and_lengths_are_refused_before_any_round_trip(
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    tmp_path: Path,
    entry: str,
    offset: int,
    length: int,
) -> None:
    """On a closed connection any round trip would fail: the range is refused first."""
    await libvirt_sandbox.acreate_volume(libvirt_pool, "neg.img", MiB)
    conn = await avs.connect(libvirt_sandbox.uri)
    vol = await avs.lookup_volume(conn, "neg.img", pool=libvirt_pool.name)
    await avs.aclose_connection(conn)
    with pytest.raises(avs.InvalidRangeError, match="is negative: pass"):
        await ENTRIES[entry](vol, tmp_path, offset, length)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ENTRIES)
async def test_ranges_past_the_end_of_a_raw_volume_are_refused(
    make_volume: MakeVolume, tmp_path: Path, entry: str
) -> None:
    vol = await make_volume("end.img", MiB)
    run = ENTRIES[entry]
    with pytest.raises(avs.InvalidRangeError, match=f"pass an offset of at most {MiB}"):
        await run(vol, tmp_path, MiB + 1, 0)
    with pytest.raises(avs.InvalidRangeError, match="pass a length of at most 10,"):
        await run(vol, tmp_path, MiB - 10, 11)
    assert await allocation(vol) == 0, "bytes were written before the check"
    assert not (tmp_path / "out").exists()
    # Up to the end is fine.
    await run(vol, tmp_path, MiB - 5, 5)


async def test_ranges_up_to_the_end_move_what_they_say(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    vol = await make_volume("edge.img", MiB)
    await avs.upload(vol, _once(b"abcde"), offset=MiB - 5)
    assert await _open_download(vol, tmp_path, MiB - 5, 5) == b"abcde"
    assert await _open_download(vol, tmp_path, MiB, 0) == b""
    result = await avs.download(vol, tmp_path / "tail", offset=MiB - 10, length=10)
    assert result.total_bytes == 10
    assert (tmp_path / "tail").read_bytes() == bytes(5) + b"abcde"


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_ranges_of_a_qcow2_volume_end_at_its_file(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, conn: libvirt.virConnect, tmp_path: Path
) -> None:
    """A qcow2 volume's streams carry its file: its capacity is no end for them."""
    assert shutil.which("qemu-img"), "install qemu-utils: libvirt creates qcow2 volumes with it"

    def create() -> int:
        with libvirt_sandbox.connect() as setup:
            pool = setup.storagePoolLookupByName(libvirt_pool.name)
            vol = pool.createXML(QCOW2_XML.format(name="q.qcow2", capacity=64 * MiB), 0)
            return int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])

    physical = await asyncio.to_thread(create)
    vol = await avs.lookup_volume(conn, "q.qcow2", pool=libvirt_pool.name)
    file = (libvirt_pool.path / "q.qcow2").read_bytes()
    assert len(file) == physical < MiB
    for entry in ("download", "open_volume_download"):
        with pytest.raises(avs.InvalidRangeError, match=f"qcow2 file of {physical} bytes"):
            await ENTRIES[entry](vol, tmp_path, MiB, 0)
        with pytest.raises(avs.InvalidRangeError, match="pass a length of at most 16,"):
            await ENTRIES[entry](vol, tmp_path, physical - 16, 17)
    for entry in ("upload", "open_volume_upload"):
        with pytest.raises(avs.InvalidRangeError, match=f"at most {physical}"):
            await ENTRIES[entry](vol, tmp_path, physical + 1, 0)
    assert await _open_download(vol, tmp_path, physical - 16, 16) == file[-16:]
    await avs.download(vol, tmp_path / "tail", offset=physical - 16)
    assert (tmp_path / "tail").read_bytes() == file[-16:]


# ------------------------------------------------------------- nothing reported done


def _delete_volume(sandbox: Sandbox, pool: str, name: str) -> None:
    """Delete a volume from a connection of its own, as another program would."""
    with sandbox.connect() as other:
        other.storagePoolLookupByName(pool).storageVolLookupByName(name).delete(0)


async def test_an_upload_into_a_volume_deleted_meanwhile_raises(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, conn: libvirt.virConnect, tmp_path: Path
) -> None:
    """The iterable holds the upload until the volume is gone, then ends it."""
    await libvirt_sandbox.acreate_volume(libvirt_pool, "del.img", 64 * MiB)
    vol = await avs.lookup_volume(conn, "del.img", pool=libvirt_pool.name)

    async def source() -> AsyncIterator[bytes]:
        yield os.urandom(MiB)
        await asyncio.to_thread(_delete_volume, libvirt_sandbox, libvirt_pool.name, "del.img")
        yield os.urandom(MiB)

    with pytest.raises(avs.VolumeChangedError, match="'del.img' was deleted while the upload"):
        await avs.upload(vol, source())


async def test_a_file_upload_into_a_volume_deleted_meanwhile_raises(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    """A 256 MiB upload takes far longer than the 10 ms to the first progress
    report, which deletes the volume."""
    size = 256 * MiB
    source = tmp_path / "dense"
    with open(source, "wb") as f:
        block = b"\x5a" * (4 * MiB)
        for _ in range(size // len(block)):
            f.write(block)
    await libvirt_sandbox.acreate_volume(libvirt_pool, "del.img", size)
    conn = await avs.connect(libvirt_sandbox.uri)
    try:
        vol = await avs.lookup_volume(conn, "del.img", pool=libvirt_pool.name)
        deleted_at: list[int] = []

        def delete_once(progress: avs.TransferProgress) -> None:
            if not deleted_at:  # blocks the loop a few ms: fine in a test
                _delete_volume(libvirt_sandbox, libvirt_pool.name, "del.img")
                deleted_at.append(progress.done_bytes)

        with pytest.raises(avs.VolumeChangedError, match="deleted"):
            await avs.upload(vol, source, progress=delete_once, progress_interval=0.01)
        assert deleted_at[0] < size, "the upload ended before the volume was deleted"
    finally:
        await avs.aclose_connection(conn)


async def test_an_upload_into_a_volume_shrunk_below_its_data_raises(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, conn: libvirt.virConnect
) -> None:
    await libvirt_sandbox.acreate_volume(libvirt_pool, "shrunk.img", 4 * MiB)
    vol = await avs.lookup_volume(conn, "shrunk.img", pool=libvirt_pool.name)
    file = libvirt_pool.path / "shrunk.img"

    def shrink_once_written() -> None:
        deadline = time.monotonic() + 10
        while os.stat(file).st_blocks * 512 < 2 * MiB:  # the daemon writes behind the stream
            assert time.monotonic() < deadline, "the daemon never wrote the data"
            time.sleep(0.005)
        with libvirt_sandbox.connect() as other:
            volume = other.storagePoolLookupByName(libvirt_pool.name).storageVolLookupByName(
                "shrunk.img"
            )
            volume.resize(MiB, libvirt.VIR_STORAGE_VOL_RESIZE_SHRINK)

    async def source() -> AsyncIterator[bytes]:
        yield os.urandom(2 * MiB)
        await asyncio.to_thread(shrink_once_written)

    with pytest.raises(avs.VolumeChangedError, match=f"holds {MiB} bytes, less than the"):
        await avs.upload(vol, source(), sparse=False)


class _TruncateOnFirstSend(anyio.abc.ByteSendStream):
    """A destination that cuts the volume's file down to 1 MiB when the first bytes arrive."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.received = 0

    async def send(self, item: bytes) -> None:
        if not self.received:
            await asyncio.to_thread(os.truncate, self.file, MiB)
        self.received += len(item)

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_a_download_that_gets_fewer_bytes_than_announced_raises(
    make_volume: MakeVolume, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    size = 64 * MiB
    vol = await make_volume("cut.img", size)
    source = tmp_path / "dense"
    source.write_bytes(b"\x5a" * size)
    await avs.upload(vol, source)
    sink = _TruncateOnFirstSend(libvirt_pool.path / "cut.img")
    with pytest.raises(avs.TransferError, match=f"where {size} were expected"):
        await avs.download(vol, sink, sparse=False)
    assert MiB <= sink.received < size


# ------------------------------------------------------------- no cycle after a failure


async def _counts_come_back(baseline: avs.EventImplStats) -> avs.EventImplStats:
    """The event implementation's stats, once its watches and timers are back
    to ``baseline`` (or after 2 s)."""
    impl = avs.get_event_impl()
    deadline = time.monotonic() + 2
    while True:
        stats = impl.stats()
        done = (stats.watches, stats.timers) == (baseline.watches, baseline.timers)
        if done or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    "failure", ["missing-folder", "folder-vanishes", "volume-deleted", "none-with-progress"]
)
async def test_a_transfer_that_failed_or_reported_progress_leaves_no_cycle(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path, failure: str
) -> None:
    """With the cyclic collector off, closing the connection after a failed
    transfer (or one with progress reports) frees its watch and timer:
    nothing but a reference cycle could keep them."""
    size = 64 * MiB
    await libvirt_sandbox.acreate_volume(libvirt_pool, "v.img", size)
    source = tmp_path / "dense"
    source.write_bytes(b"\x5a" * size)
    gc.collect()
    gc.disable()
    try:
        baseline = avs.get_event_impl().stats()
        conn = await avs.connect(libvirt_sandbox.uri)
        vol = await avs.lookup_volume(conn, "v.img", pool=libvirt_pool.name)
        if failure == "missing-folder":
            with pytest.raises(avs.TransferError, match="does not exist"):
                await avs.download(vol, tmp_path / "missing" / "out")
        elif failure == "folder-vanishes":
            await avs.upload(vol, source)
            folder = tmp_path / "folder"
            folder.mkdir()

            def remove_folder(progress: avs.TransferProgress) -> None:
                shutil.rmtree(folder, ignore_errors=True)

            with pytest.raises(avs.TransferError, match="cannot put the finished download"):
                await avs.download(
                    vol, folder / "out", progress=remove_folder, progress_interval=0.001
                )
        elif failure == "none-with-progress":  # the reporter's cancelled task is a cycle
            await avs.upload(vol, source, progress=lambda _: None, progress_interval=0.001)
            await avs.download(vol, tmp_path / "out", progress=lambda _: None)
        else:

            async def deleting() -> AsyncIterator[bytes]:
                yield b"x" * MiB
                await asyncio.to_thread(_delete_volume, libvirt_sandbox, libvirt_pool.name, "v.img")

            with pytest.raises(avs.VolumeChangedError):
                await avs.upload(vol, deleting())
        del vol
        await avs.aclose_connection(conn)
        del conn
        stats = await _counts_come_back(baseline)
        assert (stats.watches, stats.timers) == (baseline.watches, baseline.timers), (
            f"a reference cycle keeps the closed connection's watch or timer: {stats}"
        )
    finally:
        gc.enable()
