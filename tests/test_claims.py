"""One volume, two transfers, against a real daemon: an upload's claim refuses any other
transfer, downloads share a volume (the bookkeeping: test_volumeuse_unit.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import libvirt
import pytest
from _helpers import (
    Collect,
    MiB,
    download_bytes,
    iter_once,
)
from conftest import MakeVolume

import aiovirtstream as avs


async def held_upload(
    vol: libvirt.virStorageVol, parts: list[bytes], started: asyncio.Event, go: asyncio.Event
) -> avs.TransferResult:
    """Upload ``parts``, holding on after the first until ``go`` is set."""

    async def source() -> AsyncIterator[bytes]:
        yield parts[0]
        started.set()
        await go.wait()
        for part in parts[1:]:
            yield part

    return await avs.upload(vol, source())


class HeldSink(Collect):
    """A byte stream destination that takes its first chunk, then waits for ``go``."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.go = asyncio.Event(), asyncio.Event()

    async def send(self, item: bytes) -> None:
        await super().send(item)
        self.started.set()
        await self.go.wait()


async def test_a_volume_being_uploaded_is_refused_to_any_other_transfer(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    """libvirt lets a second upload or a download run while an upload writes the
    volume (measured: it locks nothing); upload() and download() refuse them."""
    vol = await make_volume("held.img", 2 * MiB)
    parts = [os.urandom(MiB), os.urandom(MiB)]
    other = tmp_path / "other"
    other.write_bytes(b"\x01" * MiB)
    started, go = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(held_upload(vol, parts, started, go))
    await asyncio.wait_for(started.wait(), 10)

    with pytest.raises(avs.VolumeBusyError, match="being uploaded") as refused:
        await avs.upload(vol, other)
    assert isinstance(refused.value, anyio.BusyResourceError)
    with pytest.raises(avs.VolumeBusyError, match="being uploaded"):
        await avs.download(vol, tmp_path / "copy")
    # The same volume looked up on a second connection by the same URI.
    conn2 = await avs.connect(vol.connect().getURI())
    try:
        pool_name = (await asyncio.to_thread(vol.storagePoolLookupByVolume)).name()
        vol2 = await avs.lookup_volume(conn2, "held.img", pool=pool_name)
        with pytest.raises(avs.VolumeBusyError):
            await avs.upload(vol2, other)
    finally:
        await avs.aclose_connection(conn2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"], "a refused download left a file"

    go.set()
    assert (await first).total_bytes == 2 * MiB
    assert await download_bytes(vol, tmp_path / "back") == b"".join(parts)
    await avs.upload(vol, other)  # the claim ended with the transfer
    assert (await download_bytes(vol, tmp_path / "back"))[:MiB] == other.read_bytes()


async def test_downloads_share_a_volume_and_an_upload_is_refused_meanwhile(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    vol = await make_volume("shared.img", MiB)
    content = os.urandom(MiB)
    await avs.upload(vol, iter_once(content))
    sink = HeldSink()
    held = asyncio.create_task(avs.download(vol, sink))
    await asyncio.wait_for(sink.started.wait(), 10)

    assert await download_bytes(vol, tmp_path / "copy") == content
    with pytest.raises(avs.VolumeBusyError, match="being downloaded"):
        await avs.upload(vol, iter_once(bytes(MiB)))

    sink.go.set()
    assert (await held).total_bytes == MiB
    assert bytes(sink.data) == content, "the refused upload wrote into the volume"
    await avs.upload(vol, iter_once(bytes(MiB)))


async def test_a_cancelled_or_failed_upload_gives_the_volume_back(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    vol = await make_volume("back.img", MiB)
    started, go = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(held_upload(vol, [bytes(1000), bytes(1000)], started, go))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    with pytest.raises(avs.SourceTooLargeError):
        await avs.upload(vol, iter_once(bytes(MiB + 1)))
    data = os.urandom(MiB)
    await avs.upload(vol, iter_once(data))
    assert await download_bytes(vol, tmp_path / "back") == data
