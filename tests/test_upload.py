"""upload() against a real daemon: holes and the volume's old data (the plan, the wipe),
the room, the sending thread, a finish the daemon refuses."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import libvirt
import pytest
from _helpers.spies import was_aborted
from _helpers.volumes import BLOCK, Layout, MiB, allocated, download_bytes, iter_once, write_layout
from conftest import MakeVolume

import aiovirtstream as avs


async def test_detect_zeroes_makes_holes(make_volume: MakeVolume, tmp_path: Path) -> None:
    source = tmp_path / "zeroes.img"
    payload = os.urandom(10_000)
    source.write_bytes(bytes(16 * MiB) + payload + bytes(8 * MiB))  # fully allocated
    assert allocated(source) >= 24 * MiB
    vol = await make_volume("zeroes.img", source.stat().st_size)
    result = await avs.upload(vol, source, detect_zeroes=True)
    assert result.data_bytes < 64 * 1024
    assert result.hole_bytes > 23 * MiB
    vol_info = await asyncio.to_thread(vol.info)
    assert vol_info[2] < MiB, "a file of zeroes was stored as data"
    dest = tmp_path / "back.img"
    await avs.download(vol, dest)
    assert dest.read_bytes() == source.read_bytes()


async def test_sparse_upload_keeps_the_volume_whole(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    """libvirt cuts a file volume at the end of each uploaded hole and keeps its old data
    inside the hole (measured): upload() must still leave exactly the source in place."""
    layout: Layout = [("data", MiB), ("hole", MiB), ("data", MiB)]
    source = tmp_path / "src"
    content = write_layout(source, layout)

    fresh = await make_volume("fresh.img", 8 * MiB)
    result = await avs.upload(fresh, source)
    assert result.hole_bytes == MiB
    info = await asyncio.to_thread(fresh.info)
    assert info[1] == 8 * MiB, "the sparse upload shrank the volume"
    assert info[2] <= 2 * MiB + BLOCK
    assert await download_bytes(fresh, tmp_path / "a") == content + bytes(5 * MiB)

    used = await make_volume("used.img", 8 * MiB)
    old = b"\xff" * (8 * MiB)
    await avs.upload(used, iter_once(old))
    result = await avs.upload(used, source, offset=MiB)
    assert result.hole_bytes == 0  # into a volume holding data, holes go as zeroes
    assert (await asyncio.to_thread(used.info))[1] == 8 * MiB
    back = await download_bytes(used, tmp_path / "b")
    assert back == old[:MiB] + content + old[4 * MiB :]


class WipeSpy:
    """Records ``virStorageVol.wipe`` calls; ``mode`` "refused" fails them, "no-op"
    returns without wiping (a backend whose wipe leaves data behind)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, mode: str = "real") -> None:
        self.calls: list[int] = []
        real = libvirt.virStorageVol.wipe

        def wipe(vol: libvirt.virStorageVol, flags: int = 0) -> int:
            self.calls.append(flags)
            if mode == "refused":
                raise libvirt.libvirtError("wipe refused (test)")
            return 0 if mode == "no-op" else real(vol, flags)

        monkeypatch.setattr(libvirt.virStorageVol, "wipe", wipe)


async def put_old_data(vol: libvirt.virStorageVol, data: bytes) -> tuple[int, int]:
    """Write ``data`` at the volume's start (not all of it); returns (capacity, allocation)."""
    await avs.upload(vol, iter_once(data))
    info = await asyncio.to_thread(vol.info)
    return info[1], info[2]


ZEROES_WARNING = "holes are sent as zeroes"


async def test_a_source_that_overwrites_a_whole_volume_with_data_still_goes_sparse(
    make_volume: MakeVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Holes into a volume that holds data would keep that data (see above): when the
    source overwrites every byte, upload() empties the volume first (libvirt's zero
    wipe truncates a file with holes), so the holes go as holes and stay unallocated."""
    layout: Layout = [("data", MiB), ("hole", 3 * MiB), ("data", MiB), ("hole", 3 * MiB)]
    source = tmp_path / "src"
    content = write_layout(source, layout)
    vol = await make_volume("whole.img", len(content))
    capacity, allocation = await put_old_data(vol, b"\xee" * (6 * MiB))
    assert capacity == len(content) and 6 * MiB <= allocation < capacity
    wipes = WipeSpy(monkeypatch)

    caplog.set_level(logging.WARNING, logger="aiovirtstream._transfer")
    result = await avs.upload(vol, source)

    assert wipes.calls == [libvirt.VIR_STORAGE_VOL_WIPE_ALG_ZERO]
    assert (result.data_bytes, result.hole_bytes) == (2 * MiB, 6 * MiB)
    assert ZEROES_WARNING not in caplog.text
    info = await asyncio.to_thread(vol.info)
    assert info[1] == capacity
    assert info[2] <= 2 * MiB + 2 * BLOCK, "the holes were written as data"
    assert await download_bytes(vol, tmp_path / "back") == content


@pytest.mark.parametrize("case", ["offset", "shorter-source", "length", "fully-allocated"])
async def test_a_volume_with_data_is_not_emptied_unless_the_source_overwrites_it_all(
    make_volume: MakeVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    """Emptying would lose the old data the upload leaves in place (outside its range),
    and a fully allocated file libvirt wipes by writing zeroes: no wipe then, the holes
    go as zeroes (with the warning), and the old data outside the range stays."""
    size = 8 * MiB
    layout: Layout = [("data", MiB), ("hole", 2 * MiB), ("data", MiB)]
    source = tmp_path / "src"
    whole = case in ("length", "fully-allocated")  # a source of the volume's size
    content = write_layout(source, layout * 2 if whole else layout)
    vol = await make_volume("kept.img", size)
    old = os.urandom(size if case == "fully-allocated" else 6 * MiB)
    _, allocation = await put_old_data(vol, old)
    assert allocation >= len(old)
    old = old.ljust(size, b"\0")
    wipes = WipeSpy(monkeypatch)
    caplog.set_level(logging.WARNING, logger="aiovirtstream._transfer")

    if case == "offset":
        await avs.upload(vol, source, offset=MiB)
        expected = old[:MiB] + content + old[MiB + len(content) :]
    elif case == "length":
        await avs.upload(vol, source, length=4 * MiB)
        expected = content[: 4 * MiB] + old[4 * MiB :]
    else:  # shorter-source, fully-allocated
        await avs.upload(vol, source)
        expected = content + old[len(content) :]

    assert wipes.calls == []
    assert ZEROES_WARNING in caplog.text
    assert await download_bytes(vol, tmp_path / "back") == expected


@pytest.mark.parametrize("mode", ["refused", "no-op"])
async def test_a_wipe_that_fails_or_leaves_data_falls_back_to_sending_zeroes(
    make_volume: MakeVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    layout: Layout = [("data", MiB), ("hole", 3 * MiB)]
    source = tmp_path / "src"
    content = write_layout(source, layout)
    vol = await make_volume("nowipe.img", len(content))
    await put_old_data(vol, b"\xee" * (2 * MiB))
    wipes = WipeSpy(monkeypatch, mode)
    caplog.set_level(logging.DEBUG, logger="aiovirtstream._transfer")

    result = await avs.upload(vol, source)

    assert len(wipes.calls) == 1
    assert ("wipe refused (test)" in caplog.text) == (mode == "refused")
    assert ZEROES_WARNING in caplog.text
    assert result.hole_bytes == 0
    assert await download_bytes(vol, tmp_path / "back") == content


async def test_iterable_longer_than_the_room_is_refused(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    vol = await make_volume("room.img", MiB)
    with pytest.raises(avs.InvalidRangeError):  # a length past the end: refused up front
        await avs.upload(vol, iter_once(bytes(MiB + 1)), length=2 * MiB)
    with pytest.raises(avs.SourceTooLargeError):
        await avs.upload(vol, iter_once(b"x" * (MiB + 1)))


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
async def test_upload_finishes_its_stream_in_the_sending_thread(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparse: bool
) -> None:
    """The reader finishes the stream right after its last send, in its own
    thread (no hop back to the loop and out again); the volume is complete."""

    source = tmp_path / "source.img"
    content = write_layout(source, [("data", MiB + 5), ("hole", 2 * MiB)])
    vol = await make_volume("finishing.img", 4 * MiB)  # room left: a last hole restores it
    calls: list[tuple[str, int]] = []
    for name in ("send", "sendHole", "finish"):
        real = getattr(libvirt.virStream, name)

        def spy(self: libvirt.virStream, *args: Any, _real: Any = real, _name: str = name) -> Any:
            calls.append((_name, threading.get_ident()))
            return _real(self, *args)

        monkeypatch.setattr(libvirt.virStream, name, spy)
    result = await avs.upload(vol, source, sparse=sparse)
    monkeypatch.undo()
    assert result.total_bytes == len(content)
    assert [c for c, _ in calls].count("finish") == 1 and calls[-1][0] == "finish"
    threads = {thread for _, thread in calls}
    assert len(threads) == 1, "sent and finished in more than one thread"
    assert threading.get_ident() not in threads, "sent or finished on the loop's thread"
    if sparse:
        assert calls[-2][0] == "sendHole", "the hole up to the volume's end was not sent"
    got = tmp_path / "back.img"
    await avs.download(vol, got)
    assert got.read_bytes() == content + bytes(4 * MiB - len(content))


async def test_upload_whose_finish_fails_is_reported_and_aborted(
    make_volume: MakeVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A finish that the daemon refuses, made in the reader's thread, breaks
    the upload; the stream is aborted and nothing is left registered."""
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(MiB))
    vol = await make_volume("finish-fails.img", MiB)
    streams: list[libvirt.virStream] = []

    def refuse(self: libvirt.virStream) -> None:
        streams.append(self)
        raise libvirt.libvirtError("the daemon refused to finish")

    monkeypatch.setattr(libvirt.virStream, "finish", refuse)
    caplog.set_level(logging.DEBUG, logger="aiovirtstream.libvirt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(avs.StreamBrokenError, match="refused to finish"):
            await avs.upload(vol, source)
        gc.collect()
    monkeypatch.undo()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    # The reader removed the stream's event callback; the loop knows it.
    assert "no stream callback registered" not in caplog.text
    assert len(streams) == 1 and was_aborted(streams[0])
    result = await avs.upload(vol, source)  # the connection carries on
    assert result.data_bytes == MiB
