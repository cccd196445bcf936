"""One volume, two transfers, against a real daemon: an upload's claim refuses any other
transfer, downloads share a volume, and a stream of ``open_volume_*`` claims its volume
until it ends (the bookkeeping: test_volumeuse_unit.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import libvirt
import pytest
from _helpers.processes import run_script
from _helpers.volumes import Collect, MiB, download_bytes, iter_once
from conftest import MakeVolume

import aiovirtstream as avs
from aiovirtstream._volume._claims import claim_volume
from aiovirtstream.testing import Sandbox


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


# ---------------------------------------------------------------- open_volume_* streams


def free_to_upload(vol: libvirt.virStorageVol) -> bool:
    """True if nothing of this process holds ``vol`` (an upload's claim could be taken)."""
    try:
        with claim_volume(vol, upload=True):
            return True
    except avs.VolumeBusyError:
        return False


@pytest.fixture
def upload_calls(monkeypatch: pytest.MonkeyPatch) -> list[libvirt.virStorageVol]:
    """The volumes ``virStorageVol.upload`` was called on from now on."""
    calls: list[libvirt.virStorageVol] = []
    real = libvirt.virStorageVol.upload

    def upload(self: libvirt.virStorageVol, *args: object, **kwargs: object) -> object:
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(libvirt.virStorageVol, "upload", upload)
    return calls


async def test_an_upload_stream_is_refused_before_it_starts_while_a_download_runs(
    make_volume: MakeVolume, upload_calls: list[libvirt.virStorageVol]
) -> None:
    vol = await make_volume("read.img", MiB)
    content = os.urandom(MiB)
    await avs.upload(vol, iter_once(content))
    upload_calls.clear()
    sink = HeldSink()
    held = asyncio.create_task(avs.download(vol, sink))
    await asyncio.wait_for(sink.started.wait(), 10)

    with pytest.raises(avs.VolumeBusyError, match="being downloaded"):
        await avs.open_volume_upload(vol)
    assert upload_calls == [], "the refused stream was started"

    sink.go.set()
    assert (await held).total_bytes == MiB
    assert bytes(sink.data) == content
    async with await avs.open_volume_upload(vol) as up:
        await up.write(bytes(10))
    assert len(upload_calls) == 1


async def test_one_upload_stream_at_a_time_and_downloads_share(
    make_volume: MakeVolume, tmp_path: Path, upload_calls: list[libvirt.virStorageVol]
) -> None:
    vol = await make_volume("one.img", MiB)
    first = await avs.open_volume_upload(vol)
    try:
        with pytest.raises(avs.VolumeBusyError, match="being uploaded"):
            await avs.open_volume_upload(vol)
        with pytest.raises(avs.VolumeBusyError, match="being uploaded"):
            await avs.open_volume_download(vol)
        with pytest.raises(avs.VolumeBusyError, match="being uploaded"):
            await avs.download(vol, tmp_path / "copy")
        assert len(upload_calls) == 1
        await first.write(b"\x07" * MiB)
        await first.finish()
    finally:
        await first.aclose()

    async with await avs.open_volume_download(vol) as down1:
        async with await avs.open_volume_download(vol) as down2:
            assert await download_bytes(vol, tmp_path / "copy") == b"\x07" * MiB
            with pytest.raises(avs.VolumeBusyError, match="being downloaded"):
                await avs.open_volume_upload(vol)
            with pytest.raises(avs.VolumeBusyError, match="being downloaded"):
                await avs.upload(vol, iter_once(bytes(MiB)))
            assert await down1.read() == await down2.read()
        assert not free_to_upload(vol), "the second download gave back the first's claim"
    assert free_to_upload(vol)


async def _finish(stream: avs.AsyncStream) -> None:
    await stream.finish()


async def _aclose(stream: avs.AsyncStream) -> None:
    await stream.aclose()


async def _abort(stream: avs.AsyncStream) -> None:
    await stream.abort()


async def _leave_async_with(stream: avs.AsyncStream) -> None:
    async with stream:
        pass


async def _leave_async_with_by_error(stream: avs.AsyncStream) -> None:
    with pytest.raises(KeyError):
        async with stream:
            raise KeyError


async def _finish_then_aclose(stream: avs.AsyncStream) -> None:
    await stream.finish()
    await stream.aclose()


@pytest.mark.parametrize(
    "end",
    [_finish, _aclose, _abort, _leave_async_with, _leave_async_with_by_error, _finish_then_aclose],
)
@pytest.mark.parametrize("upload", [True, False], ids=["upload", "download"])
async def test_a_stream_gives_its_volume_back_when_it_ends(
    make_volume: MakeVolume, upload: bool, end: Callable[[avs.AsyncStream], Awaitable[None]]
) -> None:
    vol = await make_volume("end.img", MiB)
    stream = await (avs.open_volume_upload(vol) if upload else avs.open_volume_download(vol))
    assert not free_to_upload(vol)
    if upload:
        await end(stream)
        assert stream.closed
    else:
        with claim_volume(vol, upload=False):  # a release twice would give this one back too
            await end(stream)
            assert stream.closed
            await end(stream)
            del stream
            gc.collect()
            assert not free_to_upload(vol)
    assert free_to_upload(vol)


async def test_a_stream_collected_unclosed_gives_its_volume_back(
    make_volume: MakeVolume,
) -> None:
    vol = await make_volume("lost.img", MiB)
    stream = await avs.open_volume_download(vol)
    assert not free_to_upload(vol)
    with pytest.warns(ResourceWarning, match="unclosed"):
        del stream
        gc.collect()
    assert free_to_upload(vol)


async def test_a_failed_or_cancelled_open_gives_the_volume_back(
    make_volume: MakeVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = await make_volume("open.img", MiB)
    with pytest.raises(avs.InvalidRangeError):
        await avs.open_volume_upload(vol, offset=2 * MiB)
    assert free_to_upload(vol)

    starting, go = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()
    real = libvirt.virStorageVol.download

    def download(self: libvirt.virStorageVol, *args: object) -> object:
        loop.call_soon_threadsafe(starting.set)
        go.wait(10)
        return real(self, *args)

    monkeypatch.setattr(libvirt.virStorageVol, "download", download)
    task = asyncio.create_task(avs.open_volume_download(vol))
    try:
        await asyncio.wait_for(starting.wait(), 10)
        assert not free_to_upload(vol), "the volume was not claimed while the stream started"
        task.cancel()
    finally:
        go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert free_to_upload(vol)


@pytest.fixture
async def own_sandbox() -> AsyncIterator[Sandbox]:
    """A daemon of the test's own, which it may kill."""
    async with Sandbox("storage") as sandbox:
        pool = await sandbox.acreate_pool("p")
        await sandbox.acreate_volume(pool, "v", MiB)
        yield sandbox


@pytest.mark.parametrize("upload", [True, False], ids=["upload", "download"])
async def test_a_stream_whose_connection_is_lost_gives_its_volume_back(
    own_sandbox: Sandbox, upload: bool
) -> None:
    conn = await avs.connect(own_sandbox.uri)
    try:
        vol = await avs.lookup_volume(conn, "v", pool="p")
        stream = await (avs.open_volume_upload(vol) if upload else avs.open_volume_download(vol))
        assert not free_to_upload(vol)
        with contextlib.ExitStack() as other:
            if not upload:  # a release twice would give this one back too
                other.enter_context(claim_volume(vol, upload=False))
            own_sandbox.kill()
            with anyio.fail_after(10):
                while not stream.closed:
                    await asyncio.sleep(0.01)
            assert free_to_upload(vol) is upload
            await stream.aclose()
            del stream
            gc.collect()
            assert free_to_upload(vol) is upload
        assert free_to_upload(vol)
    finally:
        await avs.aclose_connection(conn)


COLLECTED_INSIDE_THE_LOCK = """
import asyncio, gc, sys
import aiovirtstream as avs
from aiovirtstream.testing import Sandbox


def collect_in_take_claim(frame, event, arg):
    # The collector runs at an allocation, on whatever thread makes it: here,
    # inside the claims' lock, as a new claim is recorded.
    if event == "c_call" and frame.f_code.co_name == "take_claim":
        gc.collect()


async def main(uri):
    conn = await avs.connect(uri)
    a = await avs.lookup_volume(conn, "a", pool="p")
    b = await avs.lookup_volume(conn, "b", pool="p")
    gc.disable()
    stream = await avs.open_volume_download(a)
    stream.itself = stream  # left unclosed: only the collector frees it
    del stream
    sys.setprofile(collect_in_take_claim)
    other = await avs.open_volume_download(b)
    sys.setprofile(None)
    await other.aclose()
    again = await avs.open_volume_upload(a)  # the collected stream's claim is gone
    await again.aclose()
    await avs.aclose_connection(conn)
    print("done", flush=True)


with Sandbox() as sandbox:
    pool = sandbox.create_pool("p")
    sandbox.create_volume(pool, "a", 1 << 20)
    sandbox.create_volume(pool, "b", 1 << 20)
    asyncio.run(main(sandbox.uri))
"""


def test_a_stream_collected_inside_the_claims_lock_does_not_deadlock(tmp_path: Path) -> None:
    """An unclosed stream's claim is released by the garbage collector, which may run
    on a thread that holds the claims' lock."""
    assert run_script(COLLECTED_INSIDE_THE_LOCK, tmp_path) == "done"
