"""upload()'s bad path against a real daemon: a source shorter or longer than its length,
a file that shrinks, a volume uploaded into itself, a range refused before the wipe."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import libvirt
import pytest
from _helpers.spies import spy_stream_starts
from _helpers.volumes import BLOCK, Layout, MiB, download_bytes, iter_once, write_layout
from conftest import MakeVolume

import aiovirtstream as avs


@dataclass
class StreamEnds:
    """How the upload streams ended, and the data bytes they were sent
    (``virStream.send``, ``finish`` and ``abort`` at libvirt-python's API)."""

    finished: int = 0
    aborted: int = 0
    sent: int = 0
    wipes: list[int] = field(default_factory=list)


def spy_stream_ends(monkeypatch: pytest.MonkeyPatch) -> StreamEnds:
    ends = StreamEnds()
    lock = threading.Lock()
    real_send = libvirt.virStream.send
    real_finish = libvirt.virStream.finish
    real_abort = libvirt.virStream.abort
    real_wipe = libvirt.virStorageVol.wipe

    def send(self: libvirt.virStream, data: bytes) -> Any:
        with lock:
            ends.sent += len(data)
        return real_send(self, data)

    def finish(self: libvirt.virStream) -> Any:
        with lock:
            ends.finished += 1
        return real_finish(self)

    def abort(self: libvirt.virStream) -> Any:
        with lock:
            ends.aborted += 1
        return real_abort(self)

    def wipe(vol: libvirt.virStorageVol, flags: int = 0) -> Any:
        ends.wipes.append(flags)
        return real_wipe(vol, flags)

    monkeypatch.setattr(libvirt.virStream, "send", send)
    monkeypatch.setattr(libvirt.virStream, "finish", finish)
    monkeypatch.setattr(libvirt.virStream, "abort", abort)
    monkeypatch.setattr(libvirt.virStorageVol, "wipe", wipe)
    return ends


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def volume_with_data(
    make_volume: MakeVolume, name: str, size: int, used: int
) -> tuple[libvirt.virStorageVol, bytes]:
    """A raw volume of ``size`` bytes whose first ``used`` bytes are random data;
    returns it and its content."""
    vol = await make_volume(name, size)
    old = os.urandom(used)
    await avs.upload(vol, iter_once(old))
    return vol, old.ljust(size, b"\0")


# ------------------------------------------------------------- sources and lengths


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
async def test_an_iterable_that_ends_before_its_length_is_aborted(
    make_volume: MakeVolume, monkeypatch: pytest.MonkeyPatch, sparse: bool
) -> None:
    vol = await make_volume("short.img", 4 * MiB)
    ends = spy_stream_ends(monkeypatch)
    with pytest.raises(avs.TransferError, match=f"{MiB} bytes.* length {2 * MiB}"):
        await avs.upload(
            vol, chunks(os.urandom(MiB // 2), os.urandom(MiB // 2)), length=2 * MiB, sparse=sparse
        )
    assert (ends.finished, ends.aborted) == (0, 1)


@pytest.mark.parametrize("split", ["one-chunk", "next-chunk"])
async def test_an_iterable_that_yields_more_than_its_length_is_refused(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: str
) -> None:
    """Nothing past the length is sent (libvirt 11 drops the connection then,
    libvirt 9 fails the stream): the upload is aborted, the connection carries on."""
    vol = await make_volume("long.img", 4 * MiB)
    data = os.urandom(MiB + 1)
    parts = (data,) if split == "one-chunk" else (data[:MiB], data[MiB:])
    ends = spy_stream_ends(monkeypatch)
    with pytest.raises(avs.TransferError, match=f"more than the {MiB} bytes"):
        await avs.upload(vol, chunks(*parts), length=MiB)
    assert ends.sent <= MiB
    assert (ends.finished, ends.aborted) == (0, 1)
    monkeypatch.undo()
    result = await avs.upload(vol, chunks(data[:MiB]), length=MiB)
    assert result.data_bytes == MiB
    assert (await download_bytes(vol, tmp_path / "back"))[:MiB] == data[:MiB]


class HeldOpen(anyio.abc.ByteReceiveStream):
    """A peer that sends its chunks, then keeps the connection open (awaiting a reply)."""

    def __init__(self, *parts: bytes) -> None:
        self.parts = list(parts)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.parts:
            await anyio.sleep_forever()
        return self.parts.pop(0)

    async def aclose(self) -> None:
        pass


async def test_a_byte_stream_is_read_up_to_its_length_and_no_further(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte stream whose peer waits for an answer ends at the length: an
    async generator is read on to its end to see that nothing more comes."""
    vol = await make_volume("held.img", 4 * MiB)
    data = os.urandom(MiB)
    with anyio.fail_after(10):
        result = await avs.upload(vol, HeldOpen(data[:1000], data[1000:]), length=MiB)
    assert result.data_bytes == MiB
    assert (await download_bytes(vol, tmp_path / "back"))[:MiB] == data
    ends = spy_stream_ends(monkeypatch)
    with anyio.fail_after(10), pytest.raises(avs.TransferError, match="more than the"):
        await avs.upload(vol, HeldOpen(data + b"x"), length=MiB)
    assert (ends.finished, ends.aborted, ends.sent) == (0, 1, 0)


async def test_a_pipe_that_ends_before_its_length_is_aborted(
    make_volume: MakeVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = await make_volume("pipe.img", 4 * MiB)
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as reader:
        with open(write_end, "wb") as writer:
            writer.write(os.urandom(1000))
        ends = spy_stream_ends(monkeypatch)
        with pytest.raises(avs.TransferError, match=f"1000 bytes.* length {MiB}"):
            await avs.upload(vol, reader, length=MiB)
    assert (ends.finished, ends.aborted) == (0, 1)


async def test_a_file_shorter_than_the_length_is_refused_before_any_stream(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol, old = await volume_with_data(make_volume, "file-short.img", 4 * MiB, 3 * MiB)
    source = tmp_path / "src"
    source.write_bytes(os.urandom(MiB))
    starts = spy_stream_starts(monkeypatch, "upload")
    ends = spy_stream_ends(monkeypatch)
    with pytest.raises(avs.TransferError, match=f"{MiB} bytes.* length {2 * MiB}"):
        await avs.upload(vol, source, length=2 * MiB)
    with open(source, "rb") as f:  # from an open file's position
        f.seek(MiB // 2)
        with pytest.raises(avs.TransferError, match=f"{MiB // 2} bytes.* length {MiB}"):
            await avs.upload(vol, f, length=MiB)
    assert starts == [] and ends.wipes == []
    monkeypatch.undo()
    assert await download_bytes(vol, tmp_path / "back") == old


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
async def test_a_file_that_shrinks_while_it_is_read_is_aborted(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparse: bool
) -> None:
    """Cut short behind its data, the file's missing end would otherwise read as a
    trailing hole (SEEK_DATA says ENXIO), and the upload would finish."""
    layout: Layout = [("data", MiB), ("hole", 2 * MiB), ("data", MiB)]
    source = tmp_path / "src"
    write_layout(source, layout)
    vol = await make_volume("shrinks.img", 4 * MiB)
    real_pread = os.pread

    def pread_then_shrink(fd: int, length: int, offset: int) -> bytes:
        data = real_pread(fd, length, offset)
        if offset == 0:
            os.truncate(source, MiB)
        return data

    ends = spy_stream_ends(monkeypatch)
    monkeypatch.setattr(os, "pread", pread_then_shrink)
    with pytest.raises(avs.TransferError, match="shrank"):
        await avs.upload(vol, source, sparse=sparse)
    assert (ends.finished, ends.aborted) == (0, 1)


# ------------------------------------------------------------- the volume itself


@pytest.mark.parametrize("kind", ["path", "open-file"])
async def test_a_volume_is_not_uploaded_into_itself(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Its own file overwrites it whole: the zero wipe would empty the source first."""
    vol, old = await volume_with_data(make_volume, "itself.img", 4 * MiB, 2 * MiB)
    path = await asyncio.to_thread(vol.path)
    starts = spy_stream_starts(monkeypatch, "upload")
    ends = spy_stream_ends(monkeypatch)
    with pytest.raises(avs.TransferError, match="is the volume's own file"):
        if kind == "path":
            await avs.upload(vol, path)
        else:
            with open(path, "rb") as f:
                await avs.upload(vol, f, offset=MiB, sparse=False)
    assert starts == [] and ends.wipes == []
    monkeypatch.undo()
    assert await download_bytes(vol, tmp_path / "back") == old


async def test_a_file_of_the_same_name_is_another_file_on_another_host(
    make_volume: MakeVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a connection to another host, the volume's path names a file there, not here."""
    vol, _ = await volume_with_data(make_volume, "elsewhere.img", 4 * MiB, 2 * MiB)
    path = await asyncio.to_thread(vol.path)
    uri = await asyncio.to_thread(vol.connect().getURI)
    monkeypatch.setattr(libvirt.virConnect, "getURI", lambda _conn: "qemu+ssh://elsewhere/system")
    result = await avs.upload(vol, path, sparse=False)
    assert result.total_bytes == 4 * MiB
    monkeypatch.setattr(libvirt.virConnect, "getURI", lambda _conn: uri)
    with pytest.raises(avs.TransferError, match="is the volume's own file"):
        await avs.upload(vol, path, sparse=False)


# ------------------------------------------------------------- ranges and the wipe


async def test_a_refused_range_leaves_the_volume_untouched(
    make_volume: MakeVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The range is checked before the volume is emptied for a source that overwrites it."""
    vol, old = await volume_with_data(make_volume, "range.img", 4 * MiB, 2 * MiB)
    source = tmp_path / "src"
    write_layout(source, [("data", MiB), ("hole", 3 * MiB)])
    ends = spy_stream_ends(monkeypatch)
    with pytest.raises(avs.InvalidRangeError, match=f"at most {4 * MiB}"):
        await avs.upload(vol, source, length=8 * MiB)
    with pytest.raises(avs.InvalidRangeError):
        await avs.upload(vol, chunks(bytes(4 * MiB)), length=8 * MiB, detect_zeroes=True)
    assert ends.wipes == []
    monkeypatch.undo()
    assert await download_bytes(vol, tmp_path / "back") == old


async def test_an_iterable_of_the_volumes_size_empties_it_and_sends_holes(
    make_volume: MakeVolume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As a file of the volume's size does: with ``detect_zeroes`` and a ``length``
    that covers the volume from 0, the zero runs go as holes, not as zeroes."""
    vol, _ = await volume_with_data(make_volume, "iter-whole.img", 8 * MiB, 6 * MiB)
    content = os.urandom(MiB) + bytes(6 * MiB) + os.urandom(MiB)
    ends = spy_stream_ends(monkeypatch)
    caplog.set_level(logging.WARNING, logger="aiovirtstream._transfer")
    result = await avs.upload(vol, chunks(content), length=len(content), detect_zeroes=True)
    assert ends.wipes == [libvirt.VIR_STORAGE_VOL_WIPE_ALG_ZERO]
    assert result.hole_bytes == 6 * MiB
    assert "holes are sent as zeroes" not in caplog.text
    monkeypatch.undo()
    info = await asyncio.to_thread(vol.info)
    assert info[1] == 8 * MiB
    assert info[2] <= 2 * MiB + 2 * BLOCK, "the zero runs were written as data"
    assert await download_bytes(vol, tmp_path / "back") == content
