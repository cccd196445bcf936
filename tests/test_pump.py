"""AsyncStream.read_into() and AsyncStream.pump() against a real daemon, native and fallback."""

from __future__ import annotations

import asyncio
import os

import libvirt
import pytest
from _helpers.volumes import ListSink, MiB, upload_all
from conftest import MakeVolume

import aiovirtstream as avs
import aiovirtstream._stream._reads as reads_module
from aiovirtstream._stream._native import Receiver, native_receive_available


@pytest.fixture(params=["native", "binding"])
def receive_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test through the ctypes receiver and through libvirt-python's recv."""
    if request.param == "binding":
        monkeypatch.setattr(reads_module, "receiver_for", Receiver)
    else:
        assert native_receive_available(), "libvirt.so.0 should load through ctypes here"
    return str(request.param)


async def test_read_into_round_trip(make_volume: MakeVolume, receive_path: str) -> None:
    size = 3 * MiB + 12345
    data = os.urandom(size)
    vol = await make_volume(f"read-into-{receive_path}", size)
    await upload_all(vol, data)
    out = bytearray()
    buffer = bytearray(100_000)
    view = memoryview(bytearray(70_000))[10:]  # a writable view that does not start at 0
    async with await avs.open_volume_download(vol) as stream:
        for turn in range(10**6):
            target = buffer if turn % 2 else view
            got = await stream.read_into(target)
            assert isinstance(got, int)
            if got == 0:
                break
            assert 0 < got <= memoryview(target).nbytes
            out += memoryview(target)[:got]
        assert await stream.read_into(buffer) == 0  # stays at the end
    assert bytes(out) == data
    with pytest.raises(ValueError):
        async with await avs.open_volume_download(vol) as stream:
            await stream.read_into(bytearray())


async def test_read_into_stops_at_holes(make_volume: MakeVolume, receive_path: str) -> None:
    vol = await make_volume(f"read-into-holes-{receive_path}", 8 * MiB)
    head = os.urandom(MiB)
    async with await avs.open_volume_upload(vol, sparse=True) as stream:
        await stream.send_hole(2 * MiB)
        await stream.write(head)
        await stream.send_hole(5 * MiB)
    items: list[int | avs.Hole] = []
    buffer = bytearray(MiB)
    out = bytearray()
    async with await avs.open_volume_download(vol, sparse=True) as stream:
        while (got := await stream.read_into(buffer, stop_at_hole=True)) != 0:
            items.append(got)
            if isinstance(got, avs.Hole):
                out += bytes(got.length)
            else:
                out += buffer[:got]
    assert isinstance(items[0], avs.Hole) and items[0].length == 2 * MiB
    assert isinstance(items[-1], avs.Hole) and items[-1].length == 5 * MiB
    assert bytes(out) == bytes(2 * MiB) + head + bytes(5 * MiB)


async def test_pump_delivers_everything_in_order(
    make_volume: MakeVolume, receive_path: str
) -> None:
    size = 6 * MiB + 999
    data = os.urandom(size)
    vol = await make_volume(f"pump-{receive_path}", size)
    await upload_all(vol, data)
    sink = ListSink(room=100_003)  # odd, smaller than a packet: recv splits packets
    async with await avs.open_volume_download(vol) as stream:
        await stream.pump(sink)
        assert await stream.read() == b""  # the pump ran to the end of the stream
    assert bytes(sink.data) == data
    assert all(isinstance(n, int) and 0 < n <= 100_003 for n in sink.items)


async def test_pump_passes_holes(make_volume: MakeVolume, receive_path: str) -> None:
    vol = await make_volume(f"pump-holes-{receive_path}", 16 * MiB)
    middle = os.urandom(3 * MiB)
    async with await avs.open_volume_upload(vol, sparse=True) as stream:
        await stream.send_hole(4 * MiB)
        await stream.write(middle)
        await stream.send_hole(9 * MiB)
    sink = ListSink(room=MiB)
    async with await avs.open_volume_download(vol, sparse=True) as stream:
        await stream.pump(sink, stop_at_hole=True)
    assert sink.holes == [4 * MiB, 9 * MiB]
    assert sink.items[0] == "hole" and sink.items[-1] == "hole"
    assert bytes(sink.data) == bytes(4 * MiB) + middle + bytes(9 * MiB)
    with pytest.raises(avs.SparseNotSupportedError):
        async with await avs.open_volume_download(vol) as stream:
            await stream.pump(sink, stop_at_hole=True)


async def test_pump_pauses_without_room_and_resumes(make_volume: MakeVolume) -> None:
    size = 8 * MiB
    data = os.urandom(size)
    vol = await make_volume("pump-pause", size)
    await upload_all(vol, data)
    sink = ListSink(room=256 * 1024)
    async with await avs.open_volume_download(vol) as stream:
        task = asyncio.create_task(stream.pump(sink))
        while len(sink.data) < MiB:
            await asyncio.sleep(0.001)
        sink.full = True
        await asyncio.sleep(0.2)
        held = len(sink.data)
        await asyncio.sleep(0.2)
        assert len(sink.data) == held, "the pump kept receiving while the sink had no room"
        assert not task.done()
        sink.full = False
        stream.resume_pump()
        await asyncio.wait_for(task, 10)
    assert bytes(sink.data) == data


async def test_pump_ends_with_the_sinks_error_and_a_cancelled_pump_loses_nothing(
    make_volume: MakeVolume,
) -> None:
    size = 8 * MiB
    data = os.urandom(size)
    vol = await make_volume("pump-errors", size)
    await upload_all(vol, data)

    class Failing(ListSink):
        def received(self, nbytes: int) -> None:
            super().received(nbytes)
            if len(self.data) > MiB:
                raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        async with await avs.open_volume_download(vol) as stream:
            await stream.pump(Failing(room=64 * 1024))
    assert stream.closed  # the error left async with: the stream was aborted

    # Cancelled: what was received stays with the sink, the rest can be read.
    sink = ListSink(room=64 * 1024)
    async with await avs.open_volume_download(vol) as stream:
        task = asyncio.create_task(stream.pump(sink))
        while len(sink.data) < MiB:
            await asyncio.sleep(0.001)
        sink.full = True  # hold it still, then cancel
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        rest = bytearray()
        async for chunk in stream:
            rest += chunk
    assert bytes(sink.data + rest) == data


async def test_pump_reports_an_aborted_stream(make_volume: MakeVolume) -> None:
    vol = await make_volume("pump-abort", 64 * MiB)
    sink = ListSink(room=64 * 1024)
    stream = await avs.open_volume_download(vol)
    sink.full = True
    task = asyncio.create_task(stream.pump(sink))
    await asyncio.sleep(0.05)
    await stream.abort()
    with pytest.raises(avs.StreamClosedError, match="aborted"):
        await asyncio.wait_for(task, 5)
    with pytest.raises(avs.StreamBusyError):
        other = await avs.open_volume_download(vol)
        try:
            busy = asyncio.create_task(other.pump(ListSink(room=1)))
            await asyncio.sleep(0)
            await other.read()
        finally:
            busy.cancel()
            await other.aclose()


async def test_libvirt_errors_from_native_recv_are_typed(make_volume: MakeVolume) -> None:
    """-1 from virStreamRecvFlags through ctypes becomes libvirt's own error, then ours."""
    from aiovirtstream._stream._native import receiver_for

    vol = await make_volume("native-error", MiB)
    stream = await avs.open_volume_download(vol)
    receiver = receiver_for(stream.virstream)
    assert receiver.native
    await stream.abort()
    with pytest.raises(libvirt.libvirtError) as caught:
        receiver.recv_into(bytearray(10), 0, 10, False)
    assert caught.value.get_error_code() != 0
    with pytest.raises(ValueError, match="outside the buffer"):
        receiver.recv_into(bytearray(10), 5, 10, False)


def test_receiver_falls_back_to_the_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A libvirt-python that keeps its pointer differently gets the binding's recv."""
    import aiovirtstream._stream._native as native

    conn = libvirt.open("test:///default")
    try:
        stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        assert native.receiver_for(stream).native
        monkeypatch.setattr(native, "_CAPSULE_NAME", b"somethingElse")
        fallback = native.receiver_for(stream)
        assert not fallback.native and type(fallback) is native.Receiver
        assert not native.receiver_for(stream, native=False).native
    finally:
        conn.close()


async def test_read_into_and_pump_on_a_local_fd_stream(receive_path: str) -> None:
    """test:/// streams are local fds: events come from fd watches, -2 from EAGAIN."""
    conn = await avs.connect("test:///default")
    try:
        dom = conn.lookupByName("test")
        images = []
        for use_pump in (False, True):
            stream = await avs.open_stream(
                conn, lambda st: dom.screenshot(st, 0), description="screenshot"
            )
            async with stream:
                if use_pump:
                    sink = ListSink(room=1000)
                    await stream.pump(sink)
                    images.append(bytes(sink.data))
                else:
                    out, buffer = bytearray(), bytearray(777)
                    while got := await stream.read_into(buffer):
                        assert isinstance(got, int)
                        out += buffer[:got]
                    images.append(bytes(out))
        assert images[0] == images[1]
        assert images[0].startswith(b"\x89PNG\r\n\x1a\n") and len(images[0]) > 100
    finally:
        await avs.aclose_connection(conn)
