"""A download over several streams (parallel ranges) against a real daemon: the split, the
default, a range that cannot start, a cancellation while one starts."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest
from _helpers.processes import Footprint, collector_off, left_behind
from _helpers.spies import VolumeStreamCall, spy_stream_starts, was_aborted
from _helpers.volumes import BLOCK, Layout, MiB, allocated, data_size, write_layout
from conftest import MakeVolume

import aiovirtstream as avs
import aiovirtstream._transfer._ranges as ranges_module
from aiovirtstream.testing import Sandbox


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


@pytest.mark.parametrize("parallel", [1, 2])
async def test_a_range_that_cannot_start_fails_the_download_and_aborts_the_others(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parallel: int
) -> None:
    size = 2 * ranges_module.PARALLEL_MIN_PART
    vol = await make_volume("ranges.img", size)
    gone = await make_volume("gone-range.img", MiB)
    await asyncio.to_thread(gone.delete, 0)

    def last_on_gone(
        real: VolumeStreamCall,
        vol: libvirt.virStorageVol,
        stream: libvirt.virStream,
        offset: int,
        length: int,
        flags: int,
    ) -> int:
        # After the size query, the last range asks the daemon for a volume deleted
        # meanwhile: a real refusal. (A single range asks for length 0: to the end.)
        last = offset + (length or size) >= size
        return real(gone if last else vol, stream, offset, length, flags)

    starts = spy_stream_starts(monkeypatch, around=last_on_gone)
    with pytest.raises(avs.NotFoundError, match="gone-range.img") as failure:
        await avs.download(vol, tmp_path / "out", sparse=False, parallel=parallel)
    assert isinstance(failure.value.__cause__, libvirt.libvirtError)
    assert os.listdir(tmp_path) == []
    assert len(starts) == parallel - 1
    assert all([await asyncio.to_thread(was_aborted, start.stream) for start in starts])
    monkeypatch.undo()
    result = await avs.download(vol, tmp_path / "out", sparse=False, parallel=parallel)
    assert result.data_bytes == size  # the connection carries on


@pytest.mark.parametrize("how", ["cancelled", "a range fails"])
async def test_a_download_over_two_streams_leaves_no_reference_cycle(
    make_volume: MakeVolume,
    libvirt_sandbox: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """Cancelled, or failed by one range, with the garbage collector off: closing its
    connection frees everything at once (no cycle through the task group's errors)."""
    vol = await make_volume("cycle.img", 2 * ranges_module.PARALLEL_MIN_PART)
    pool = await asyncio.to_thread(lambda: vol.storagePoolLookupByVolume().name())
    both_started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def second_fails(
        real: VolumeStreamCall,
        vol: libvirt.virStorageVol,
        stream: libvirt.virStream,
        offset: int,
        length: int,
        flags: int,
    ) -> int:
        result = real(vol, stream, offset, length, flags)
        if offset:
            loop.call_soon_threadsafe(both_started.set)
            if how == "a range fails":
                stream.abort()  # its first read breaks
        return result

    starts = spy_stream_starts(monkeypatch, around=second_fails)
    (tmp_path / "out").mkdir()
    before = Footprint.take(tmp_path / "out")
    with collector_off():
        own = await avs.connect(libvirt_sandbox.uri)
        try:
            own_vol = await avs.lookup_volume(own, "cycle.img", pool=pool)
            task = asyncio.create_task(
                avs.download(own_vol, tmp_path / "out" / "f", sparse=False, parallel=2)
            )
            await both_started.wait()
            if how == "cancelled":
                await asyncio.sleep(0.01)
                task.cancel()
            with pytest.raises(BaseException) as caught:
                await task
            assert isinstance(
                caught.value,
                asyncio.CancelledError if how == "cancelled" else avs.StreamBrokenError,
            ), repr(caught.value)
            del caught, task, own_vol
        finally:
            await avs.aclose_connection(own)
        starts.clear()  # they hold the streams
        assert not (more := await left_behind(before, tmp_path / "out")), f"held: {more}"


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


async def test_downloads_started_together_ask_every_size_before_any_stream_starts(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call's reply waits at the daemon behind a packet of every stream already
    sending: the size queries of downloads started together go first."""
    count = 6
    vols = [await make_volume(f"together{n}.img", 4 * MiB) for n in range(count)]
    calls: list[str] = []
    first_asked, go = threading.Event(), threading.Event()
    real_xml = libvirt.virStorageVol.XMLDesc

    def xml_desc(vol: libvirt.virStorageVol, flags: int = 0) -> str:
        calls.append("size")
        if len(calls) == 1:
            first_asked.set()
            go.wait(10)  # meanwhile, every download submits its start
        return str(real_xml(vol, flags))

    def record_start(real: VolumeStreamCall, *call: Any) -> int:
        calls.append("start")
        return real(*call)

    monkeypatch.setattr(libvirt.virStorageVol, "XMLDesc", xml_desc)
    spy_stream_starts(monkeypatch, around=record_start)
    downloads = [
        asyncio.create_task(avs.download(vol, tmp_path / f"out{n}", sparse=False))
        for n, vol in enumerate(vols)
    ]
    await asyncio.to_thread(first_asked.wait, 10)
    await asyncio.sleep(0.2)
    go.set()
    results = await asyncio.gather(*downloads)
    assert [result.data_bytes for result in results] == [4 * MiB] * count
    assert calls == ["size"] * count + ["start"] * count
