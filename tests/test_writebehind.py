"""A download's write-behind against a real daemon: the socket held back while the disk is
behind, slots given back and reused (its unit tests: test_writebehind_unit.py)."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from pathlib import Path

import pytest
from _helpers.spies import around_writes, spy_socket_pauses
from _helpers.volumes import BLOCK, Layout, MiB, data_size, random_volume, write_layout
from conftest import MakeVolume

import aiovirtstream as avs
import aiovirtstream._transfer._ranges as ranges_module
from aiovirtstream._transfer._slots import SlotAccount, SlotPool
from aiovirtstream._transfer._writebehind import WriteBehind


def spy_write_behinds(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[WriteBehind]]:
    """Weak references to every WriteBehind made from now on (one a stream)."""
    sinks: list[weakref.ref[WriteBehind]] = []
    real_init = WriteBehind.__init__

    def spy_init(self: WriteBehind, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        sinks.append(weakref.ref(self))

    monkeypatch.setattr(WriteBehind, "__init__", spy_init)
    return sinks


@pytest.mark.parametrize("parallel", [1, 2])
async def test_download_holds_the_daemon_back_while_the_disk_is_behind(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parallel: int
) -> None:
    """While the write-behind is full, the socket is not served: memory stays
    bounded, by one budget for the whole download however many streams it has."""
    size = 2 * ranges_module.PARALLEL_MIN_PART  # parallel=2 splits it in two
    vol, source = await random_volume(make_volume, tmp_path, "slow-disk.img", size)
    disk_free = threading.Event()
    around_writes(monkeypatch, tmp_path, before=lambda: disk_free.wait(30))
    refs = spy_write_behinds(monkeypatch)
    pauses = spy_socket_pauses(monkeypatch)

    def received_bytes() -> int:
        sinks = [ref() for ref in refs]
        assert len(sinks) == parallel and None not in sinks
        return sum(sink.received_bytes for sink in sinks if sink is not None)

    task = asyncio.create_task(avs.download(vol, tmp_path / "out", sparse=False, parallel=parallel))
    try:
        while not pauses.paused:
            await asyncio.sleep(0.01)
            assert not task.done()
        await asyncio.sleep(0.5)
        received = received_bytes()
        assert received <= ranges_module.WRITE_BEHIND + MiB, received
        await asyncio.sleep(0.3)
        assert received_bytes() == received, "received more while the disk was behind"
    finally:
        disk_free.set()
    result = await asyncio.wait_for(task, 60)
    assert result.data_bytes == size
    assert (tmp_path / "out").read_bytes() == source.read_bytes()
    assert pauses.unbalanced() == {}, "the socket was left paused"


async def test_write_behind_slots_are_freed_with_the_download(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reference cycle keeps a download's write-behinds alive (their slots go
    back to the process's pool, which is bounded)."""
    vol, _ = await random_volume(make_volume, tmp_path, "slots.img", 4 * MiB)
    sinks = spy_write_behinds(monkeypatch)
    gc.collect()
    gc.disable()
    try:
        await avs.download(vol, tmp_path / "out", parallel=1)
        await asyncio.sleep(0)
        assert sinks and all(ref() is None for ref in sinks)
    finally:
        gc.enable()


async def test_the_next_download_receives_into_the_slots_of_the_last(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slots go back to the process's pool; reused, they hold the last download's
    bytes, none of which may reach the next one's file (odd extents, holes)."""
    pool = SlotPool()
    monkeypatch.setattr("aiovirtstream._transfer._writebehind.slot_pool", pool)
    first, _ = await random_volume(make_volume, tmp_path, "first.img", 4 * MiB)
    layout: Layout = [("data", 5000), ("hole", 3 * BLOCK), ("data", MiB + 1234), ("hole", MiB)]
    source = tmp_path / "second.src"
    content = write_layout(source, layout)
    second = await make_volume("second.img", len(content))
    await avs.upload(second, source)
    await avs.download(first, tmp_path / "first.out", parallel=1)
    kept = {id(slot) for slot in pool._free}
    assert kept, "the download gave no slot back"
    taken: list[int] = []
    real_take = pool.take

    def spy_take(account: SlotAccount) -> memoryview | None:
        slot = real_take(account)
        if slot is not None:
            taken.append(id(slot))
        return slot

    monkeypatch.setattr(pool, "take", spy_take)
    result = await avs.download(second, tmp_path / "second.out", parallel=1)
    assert taken and taken[0] in kept
    assert (tmp_path / "second.out").read_bytes() == content
    assert result.data_bytes <= data_size(layout) + 2 * BLOCK
