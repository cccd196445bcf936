"""What a stream's reader has not taken yet: bounded, exact, and never left holding the socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from _helpers.processes import process_read_bytes, rss
from _helpers.volumes import Layout, ListSink, MiB, write_layout
from conftest import MakeVolume

import aiovirtstream as avs
from aiovirtstream._stream._readahead import READ_AHEAD_BUDGET, READ_AHEAD_LIMIT
from aiovirtstream.testing import PoolInfo, Sandbox


async def test_a_slow_reader_holds_the_daemon_back(make_volume: MakeVolume) -> None:
    """A reader slower than the daemon holds libvirt back at the read-ahead's bound,
    instead of libvirt's client queueing the volume in memory."""
    vol = await make_volume("slow-read.img", 1024 * MiB)  # zeroes, sent as data
    async with await avs.open_volume_download(vol, length=MiB) as warm:  # buffers exist
        async for _ in warm:
            pass
    base = peak = rss()
    received = 0
    async with await avs.open_volume_download(vol) as stream:
        with anyio.move_on_after(2):
            while chunk := await stream.read():
                assert chunk == bytes(len(chunk))
                received += len(chunk)
                peak = max(peak, rss())
                await asyncio.sleep(0.005)
        peak = max(peak, rss())
        await stream.abort()
    assert 0 < received < 1024 * MiB, "the reader was meant to be slower than the daemon"
    growth = peak - base
    print(f"RSS growth {growth / MiB:.1f} MiB after {received / MiB:.0f} MiB read")
    assert growth < 4 * READ_AHEAD_LIMIT + 16 * MiB


async def test_the_read_aheads_of_many_connections_share_one_budget(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """Readers on 12 connections that stop reading hold the daemon back once the
    process holds the budget, not a read-ahead's limit each (12 x 4 MiB)."""
    await libvirt_sandbox.acreate_volume(libvirt_pool, "shared-budget.img", 1024 * MiB)
    conns = [await avs.connect(libvirt_sandbox.uri) for _ in range(12)]
    try:
        vols = [
            await avs.lookup_volume(conn, "shared-budget.img", pool=libvirt_pool.name)
            for conn in conns
        ]
        for vol in vols[:2]:  # buffers exist
            async with await avs.open_volume_download(vol, length=8 * MiB) as warm:
                async for _ in warm:
                    pass
        daemon_read = process_read_bytes(libvirt_sandbox.pid)
        async with contextlib.AsyncExitStack() as streams:
            opened = []
            for vol in vols:
                stream = await streams.enter_async_context(await avs.open_volume_download(vol))
                assert await stream.read()  # a reader started: the read-ahead fills
                opened.append(stream)
            await asyncio.sleep(1.5)  # meanwhile nobody reads
            sent = process_read_bytes(libvirt_sandbox.pid) - daemon_read
            for stream in opened:  # the held sockets are served again as readers read
                for _ in range(40):
                    chunk = await stream.read()
                    assert chunk and chunk == bytes(len(chunk))
        print(f"the daemon read {sent / MiB:.1f} MiB of the volume")
        # Beyond the budget: a read's packet each, and what libvirt received
        # before the sockets were held.
        assert sent < READ_AHEAD_BUDGET + 12 * MiB < 12 * READ_AHEAD_LIMIT
    finally:
        for conn in conns:
            await avs.aclose_connection(conn)


async def test_reads_between_pauses_get_every_byte_and_hole(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    """Data and holes that wait in the read-ahead come out as libvirt would give them:
    in order, up to each read's size, holes as Hole or as zeroes."""
    layout: Layout = [("data", 3 * MiB + 5), ("hole", 6 * MiB), ("data", 7 * MiB), ("hole", MiB)]
    source = tmp_path / "layout.img"
    content = write_layout(source, layout)
    vol = await make_volume("ahead-layout.img", len(content))
    await avs.upload(vol, source)
    for stop_at_hole in (True, False):
        out = bytearray()
        holes = []
        sizes = [100_003, 4096, 1 << 20, 262_144]
        async with await avs.open_volume_download(vol, sparse=True) as stream:
            for turn in range(10_000):
                if turn % 3 == 0:
                    await asyncio.sleep(0.02)  # the read-ahead fills meanwhile
                item = await stream.read(sizes[turn % 4], stop_at_hole=stop_at_hole)
                if item == b"":
                    break
                if isinstance(item, avs.Hole):
                    holes.append(item.length)
                    out += bytes(item.length)
                else:
                    assert 0 < len(item) <= sizes[turn % 4]
                    out += item
        assert bytes(out) == content
        assert sum(holes) >= (7 * MiB if stop_at_hole else 0) - 64 * 1024


async def test_read_into_and_a_pump_take_over_what_waited(make_volume: MakeVolume) -> None:
    data = os.urandom(12 * MiB)
    vol = await make_volume("ahead-handover.img", len(data))
    await avs.upload(vol, _chunks(data))
    buffer = bytearray(300_000)
    got = bytearray()
    async with await avs.open_volume_download(vol) as stream:
        for _ in range(2):
            count = await stream.read_into(buffer)
            assert isinstance(count, int) and count > 0
            got += buffer[:count]
            await asyncio.sleep(0.2)  # the read-ahead fills meanwhile
        sink = ListSink(room=65_537)
        await stream.pump(sink)  # takes what waited first
    assert bytes(got + sink.data) == data


async def test_a_held_connection_is_given_back_when_the_stream_ends(
    make_volume: MakeVolume,
) -> None:
    """A reader that stopped reading holds its connection's socket; aborting (or
    finishing) the stream serves it again: the connection carries the next transfer."""
    vol = await make_volume("ahead-abandoned.img", 256 * MiB)
    other = await make_volume("ahead-next.img", MiB)
    stream = await avs.open_volume_download(vol)
    assert await stream.read()
    await asyncio.sleep(0.5)  # the read-ahead fills, then holds the socket
    await stream.abort()
    data = os.urandom(MiB)
    with anyio.fail_after(20):
        async with await avs.open_volume_upload(other) as up:
            await up.write(data)
        async with await avs.open_volume_download(other) as down:
            got = b"".join([chunk async for chunk in down])
    assert got == data


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), MiB):
        yield data[start : start + MiB]
