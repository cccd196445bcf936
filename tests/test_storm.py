"""A cancellation storm: 300 transfers on one connection, each cancelled after a
seeded random delay, half by ``anyio.fail_after``, half by ``task.cancel()``."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import libvirt
import pytest
from _helpers.processes import Footprint, left_behind

import aiovirtstream as avs
import aiovirtstream._transfer._ranges as ranges_module
from aiovirtstream.testing import PoolInfo, Sandbox

MiB = 1024 * 1024
TRANSFERS = 300
AT_ONCE = 8
SEED = 300


def sparse_source(path: Path, size: int, rng: random.Random) -> bytes:
    """A file of ``size`` bytes: a few runs of data between holes."""
    content = bytearray(size)
    with open(path, "wb") as f:
        for _ in range(rng.randint(1, 4)):
            length = rng.randrange(4096, MiB, 4096)
            offset = rng.randrange(0, size - length, 4096)
            data = rng.randbytes(length)
            content[offset : offset + length] = data
            f.seek(offset)
            f.write(data)
        f.truncate(size)
    return bytes(content)


async def chunks(path: Path) -> AsyncIterator[bytes]:
    data = path.read_bytes()
    for start in range(0, len(data), MiB):
        yield data[start : start + MiB]


class Lane:
    """One volume, its source file and its destination: a lane runs one transfer at a time."""

    def __init__(self, vol: libvirt.virStorageVol, size: int, source: Path, dest: Path) -> None:
        self.vol, self.size, self.source, self.dest = vol, size, source, dest

    async def transfer(self, kind: str) -> None:
        if kind == "upload-path":
            await avs.upload(self.vol, self.source)
        elif kind == "upload-iterable":
            await avs.upload(self.vol, chunks(self.source))
        elif kind == "download":
            await avs.download(self.vol, self.dest)
        else:
            await avs.download(self.vol, self.dest, parallel=2)

    async def tidy(self) -> None:
        """Give the volume its size back and remove a destination (outside the storm)."""
        if (await asyncio.to_thread(self.vol.info))[1] < self.size:
            await asyncio.to_thread(self.vol.resize, self.size, 0)  # cut at a hole
        self.dest.unlink(missing_ok=True)


async def cancelled_by_fail_after(lane: Lane, kind: str, delay: float) -> str:
    try:
        with anyio.fail_after(delay):
            await lane.transfer(kind)
    except TimeoutError:
        return "timed out"
    except asyncio.CancelledError:
        raise AssertionError(f"{kind}: a bare CancelledError escaped anyio.fail_after") from None
    return "done"


async def cancelled_by_task_cancel(lane: Lane, kind: str, delay: float) -> str:
    task = asyncio.create_task(lane.transfer(kind))
    await asyncio.sleep(delay)
    if not task.cancel():
        await task
        return "done"
    try:
        await task
    except asyncio.CancelledError:
        assert task.cancelled()
        return "cancelled"
    raise AssertionError(f"{kind}: the cancellation of its task was swallowed")


async def test_cancellation_storm(
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ranges_module, "PARALLEL_MIN_PART", 2 * MiB)
    rng = random.Random(SEED)
    folder = tmp_path / "out"
    folder.mkdir()
    before = Footprint.take(folder)
    conn = await avs.connect(libvirt_sandbox.uri)
    lanes: list[Lane] = []
    for n in range(AT_ONCE):
        size = rng.choice([4, 8, 12, 16]) * MiB
        source = tmp_path / f"source{n}"
        sparse_source(source, size, rng)
        await libvirt_sandbox.acreate_volume(libvirt_pool, f"storm{n}.img", size)
        lanes.append(
            Lane(
                await avs.lookup_volume(conn, f"storm{n}.img", pool=libvirt_pool.name),
                size,
                source,
                folder / f"dest{n}",
            )
        )
    plan = [
        (
            rng.choice(["upload-path", "upload-iterable", "download", "download-2-streams"]),
            rng.uniform(0, 0.03),
            n % 2 == 0,
        )
        for n in range(TRANSFERS)
    ]
    outcomes: Counter[str] = Counter()

    async def run_lane(lane: Lane, share: list[tuple[str, float, bool]]) -> None:
        for kind, delay, by_anyio in share:
            if by_anyio:
                outcome = await cancelled_by_fail_after(lane, kind, delay)
            else:
                outcome = await cancelled_by_task_cancel(lane, kind, delay)
            outcomes[f"{kind} {outcome}"] += 1
            await lane.tidy()

    started = time.perf_counter()
    try:
        async with anyio.create_task_group() as group:
            for n in range(AT_ONCE):
                group.start_soon(run_lane, lanes[n], plan[n::AT_ONCE])
        seconds = time.perf_counter() - started
        print(f"\n{TRANSFERS} transfers in {seconds:.1f} s: {dict(sorted(outcomes.items()))}")
        assert sum(outcomes.values()) == TRANSFERS
        cut_short = sum(n for what, n in outcomes.items() if not what.endswith("done"))
        assert cut_short >= TRANSFERS // 2, outcomes  # the delays land inside transfers
        assert os.listdir(folder) == []

        # The connection carries a whole transfer afterwards, both ways.
        await lanes[0].tidy()
        sent = await avs.upload(lanes[0].vol, lanes[0].source, checksum=True)
        got = await avs.download(lanes[0].vol, lanes[0].dest, checksum=True)
        assert got.sha256 == sent.sha256
        assert lanes[0].dest.read_bytes() == lanes[0].source.read_bytes()
        lanes[0].dest.unlink()
    finally:
        lanes.clear()  # the volumes hold the connection
        await avs.aclose_connection(conn)
    # anyio.fail_after leaves a cycle on Python 3.12+ (see test_cancellation's DEADLINE).
    assert not (more := await left_behind(before, folder, collect=True)), f"left: {more}"
