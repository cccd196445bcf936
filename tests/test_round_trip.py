"""upload() and download() both ways against a real daemon: every sparse layout, every
kind of source and destination, and the errors and cancellations both meet."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import libvirt
import pytest
from _helpers.processes import rss
from _helpers.spies import VolumeStreamCall, spy_stream_starts, was_aborted
from _helpers.volumes import (
    BLOCK,
    Collect,
    Layout,
    MiB,
    allocated,
    data_size,
    iter_once,
    write_layout,
)
from conftest import MakeVolume

import aiovirtstream as avs
from aiovirtstream.testing import Sandbox

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


async def test_a_slow_stream_destination_holds_the_daemon_back(make_volume: MakeVolume) -> None:
    """A byte stream slower than the daemon (a network client) holds at most the
    download's queue: libvirt's client is not left to queue the volume in memory."""
    vol = await make_volume("slow-reader.img", 1024 * MiB)  # zeroes, sent as data
    sink = Collect(delay=0.005, keep=False)
    await avs.download(vol, Collect(keep=False), sparse=False, length=MiB)  # warm up
    base = peak = rss()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss())
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as group:
        group.start_soon(sample)
        with anyio.move_on_after(2):
            await avs.download(vol, sink, sparse=False)
        group.cancel_scope.cancel()
    assert 0 < sink.count < 1024 * MiB, "the sink was meant to be slower than the daemon"
    growth = peak - base
    print(f"RSS growth {growth / MiB:.1f} MiB after {sink.count / MiB:.0f} MiB sent")
    assert growth < 64 * MiB
    # The cancelled download left its connection in working order.
    again = Collect()
    assert (await avs.download(vol, again, sparse=False, length=MiB)).data_bytes == MiB
    assert bytes(again.data) == bytes(MiB)


async def test_a_slow_stream_destination_gets_every_byte_and_hole(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    layout: Layout = [("data", 5 * MiB + 7), ("hole", 8 * MiB), ("data", 3 * MiB)]
    source = tmp_path / "layout.img"
    content = write_layout(source, layout)
    vol = await make_volume("slow-layout.img", len(content))
    await avs.upload(vol, source)
    for sparse in (True, False):
        sink = Collect(delay=0.001)
        result = await avs.download(vol, sink, sparse=sparse, checksum=True)
        assert bytes(sink.data) == content
        assert result.sha256 == hashlib.sha256(content).hexdigest()
        assert result.total_bytes == len(content)
        if sparse:
            assert result.hole_bytes >= 8 * MiB - BLOCK


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


async def test_a_transfer_on_a_closed_connection_is_a_clear_error(
    libvirt_sandbox: Sandbox, make_volume: MakeVolume, tmp_path: Path
) -> None:
    await make_volume("closed.img", MiB)
    conn = await avs.connect(libvirt_sandbox.uri)
    pool = (await asyncio.to_thread(conn.listAllStoragePools))[0].name()
    vol = await avs.lookup_volume(conn, "closed.img", pool=pool)
    await avs.aclose_connection(conn)
    for transfer in (avs.upload(vol, iter_once(b"x")), avs.download(vol, tmp_path / "d")):
        with pytest.raises(avs.AioVirtStreamError) as raised:
            await transfer
        assert isinstance(raised.value.__cause__, libvirt.libvirtError)
    assert list(tmp_path.iterdir()) == []


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
