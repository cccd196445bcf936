"""Soak: 2,000 open/transfer/close cycles on one connection keep RSS and the fd count flat."""

from __future__ import annotations

import os
import time
from pathlib import Path

import libvirt
import pytest
from _helpers.processes import Footprint, fd_count, left_behind

import aiovirtstream as avs
from aiovirtstream.testing import PoolInfo, Sandbox

CYCLES = 2000
WARM_UP = 200
BLOCK = 64 * 1024
RSS_MARGIN = 8 * 1024 * 1024


def rss() -> int:
    """This process's resident set, in bytes (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def cycle(vol: libvirt.virStorageVol, n: int, data: bytes) -> None:
    """Open a stream, move a block, close: uploads and downloads in turn, some of
    them left before the end (an abort), some sparse."""
    offset = (n % 16) * BLOCK
    if n % 2 == 0:
        async with await avs.open_volume_upload(vol, offset=offset, length=BLOCK) as up:
            await up.write(data)
    elif n % 6 == 1:
        async with await avs.open_volume_download(vol, offset=offset, length=BLOCK) as down:
            assert await down.read(1024)  # left early: aborted
    else:
        got = bytearray()
        async with await avs.open_volume_download(
            vol, offset=offset, length=BLOCK, sparse=True
        ) as down:
            async for item in down.iter_items():
                got += bytes(item.length) if isinstance(item, avs.Hole) else item
        assert len(got) == BLOCK


async def test_soak(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, capsys: pytest.CaptureFixture[str]
) -> None:
    before = Footprint.take()
    conn = await avs.connect(libvirt_sandbox.uri)
    await libvirt_sandbox.acreate_volume(libvirt_pool, "soak.img", 16 * BLOCK)
    vol = await avs.lookup_volume(conn, "soak.img", pool=libvirt_pool.name)
    data = os.urandom(BLOCK)
    try:
        started = time.perf_counter()
        for n in range(WARM_UP):
            await cycle(vol, n, data)
        rss_warm, fds_warm, warm = rss(), fd_count(), Footprint.take()
        for n in range(WARM_UP, CYCLES):
            await cycle(vol, n, data)
        seconds = time.perf_counter() - started
        rss_end, fds_end = rss(), fd_count()
        # An abort ends in a worker thread a moment later: let it settle.
        assert not (more := await left_behind(warm)), f"held by the cycles: {more}"
    finally:
        del vol  # it holds the connection
        await avs.aclose_connection(conn)
    with capsys.disabled():
        print(
            f"\nsoak: {CYCLES} cycles in {seconds:.1f} s ({seconds / CYCLES * 1000:.2f} ms each); "
            f"RSS {rss_warm / 2**20:.1f} MiB after {WARM_UP}, {rss_end / 2**20:.1f} MiB at the "
            f"end ({(rss_end - rss_warm) / 2**20:+.2f} MiB); fds {fds_warm} -> {fds_end}"
        )
    assert fds_end == fds_warm
    assert rss_end - rss_warm < RSS_MARGIN
    assert not (more := await left_behind(before)), f"left after closing the connection: {more}"
