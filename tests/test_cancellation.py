"""Cancellation is exact: every kind of timeout or cancellation around a transfer
is seen as itself, and leaves nothing behind (real daemon, unix and TCP).

Each test sweeps one way of cancelling over every transfer and over delays
that land in every phase (the start, the data, the finish, after the end).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import libvirt
import pytest
from _helpers.processes import Footprint, fd_count, left_behind
from _helpers.volumes import Collect

import aiovirtstream as avs
import aiovirtstream._transfer._ranges as ranges_module
from aiovirtstream.testing import PoolInfo, Sandbox

MiB = 1024 * 1024
SIZE = 4 * MiB
#: Data and holes (offset, length); the rest of the volume is a hole.
DATA = [(0, 256 * 1024), (MiB, 512 * 1024), (3 * MiB - 4096, 4096 + 128 * 1024)]
DELAYS = [0, 0.0001, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05]
DELAYS += [round(random.Random(23).uniform(0, 0.03), 5) for _ in range(3)]
ROUNDS = 2


def layout_content() -> bytes:
    content = bytearray(SIZE)
    rng = random.Random(4)
    for offset, length in DATA:
        content[offset : offset + length] = rng.randbytes(length)
    return bytes(content)


def write_sparse(path: Path, content: bytes) -> None:
    """Write ``content`` with holes where :data:`DATA` has none."""
    with open(path, "wb") as f:
        for offset, length in DATA:
            f.seek(offset)
            f.write(content[offset : offset + length])
        f.truncate(len(content))


@dataclass
class Bench:
    """A connection of the test's own and what its transfers use."""

    conn: libvirt.virConnect
    up: libvirt.virStorageVol  # uploaded into
    down: libvirt.virStorageVol  # holds ``content``
    content: bytes
    source: Path
    folder: Path  # downloads go here; nothing else may stay in it


async def chunks(content: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(content), MiB):
        yield content[start : start + MiB]


async def restore_capacity(vol: libvirt.virStorageVol) -> None:
    """A sparse upload cut short after a hole leaves the volume cut there (libvirt)."""
    if (await asyncio.to_thread(vol.info))[1] < SIZE:
        await asyncio.to_thread(vol.resize, SIZE, 0)


async def upload_path(b: Bench) -> None:
    await restore_capacity(b.up)
    await avs.upload(b.up, b.source)


async def upload_iterable(b: Bench) -> None:
    await restore_capacity(b.up)
    await avs.upload(b.up, chunks(b.content))


async def download_path(b: Bench, parallel: int) -> None:
    dest = b.folder / "dest"
    try:
        await avs.download(b.down, dest, parallel=parallel)
    finally:
        if dest.exists():  # cancelled while it was put in place: complete anyway
            assert dest.read_bytes() == b.content, "an incomplete destination was left"
            dest.unlink()


async def download_file(b: Bench) -> None:
    path = b.folder / "file"
    try:
        with open(path, "wb") as f:
            result = await avs.download(b.down, f)
        assert result.total_bytes == SIZE
        assert path.read_bytes() == b.content
    finally:
        path.unlink()


async def download_anyio_stream(b: Bench) -> None:
    sink = Collect()
    await avs.download(b.down, sink)
    assert sink.data == b.content


async def stream_read_finish(b: Bench) -> None:
    """open_volume_download, read to the end, finish; aclose on the way out."""
    stream = await avs.open_volume_download(b.down)
    try:
        got = bytearray()
        while data := await stream.read():
            got += data
        await stream.finish()
    finally:
        await stream.aclose()
    assert got == b.content


async def stream_write_block(b: Bench) -> None:
    """open_volume_upload and writes in an ``async with`` block (finished at its end)."""
    async with await avs.open_volume_upload(b.up) as stream:
        for start in range(0, SIZE, MiB):
            await stream.write(b.content[start : start + MiB])


async def stream_read_block(b: Bench) -> None:
    got = bytearray()
    async with await avs.open_volume_download(b.down, sparse=True) as stream:
        async for item in stream.iter_items():
            got += bytes(item.length) if isinstance(item, avs.Hole) else item
    assert got == b.content


Transfer = Callable[[Bench], Awaitable[None]]
TRANSFERS: dict[str, Transfer] = {
    "upload-path": upload_path,
    "upload-iterable": upload_iterable,
    "download-path": lambda b: download_path(b, 1),
    "download-path-2-streams": lambda b: download_path(b, 2),
    "download-open-file": download_file,
    "download-anyio-stream": download_anyio_stream,
    "stream-read-finish": stream_read_finish,
    "stream-write-block": stream_write_block,
    "stream-read-block": stream_read_block,
}


class Boom(Exception):
    """The other task's error in a task group."""


async def by_fail_after(transfer: Awaitable[None], delay: float) -> str:
    try:
        with anyio.fail_after(delay):
            await transfer
    except TimeoutError:
        return "timeout"
    except asyncio.CancelledError:
        raise AssertionError("a bare CancelledError escaped anyio.fail_after") from None
    return "done"


async def by_move_on_after(transfer: Awaitable[None], delay: float) -> str:
    done = False
    try:
        with anyio.move_on_after(delay) as scope:
            await transfer
            done = True
    except asyncio.CancelledError:
        raise AssertionError("a bare CancelledError escaped anyio.move_on_after") from None
    assert done or scope.cancelled_caught, "the transfer neither ended nor was cancelled"
    assert not scope.cancelled_caught or scope.cancel_called
    return "done" if done else "timeout"


async def by_asyncio_timeout(transfer: Awaitable[None], delay: float) -> str:
    try:
        async with asyncio.timeout(delay):
            await transfer
    except TimeoutError:
        return "timeout"
    return "done"


async def by_wait_for(transfer: Awaitable[None], delay: float) -> str:
    try:
        await asyncio.wait_for(transfer, delay)
    except TimeoutError:
        return "timeout"
    return "done"


async def by_task_cancel(transfer: Awaitable[None], delay: float, go_on: bool) -> str:
    """Cancel a task running the transfer; with ``go_on`` it uncancels and goes on."""

    async def run() -> str:
        try:
            await transfer
        except asyncio.CancelledError:
            if not go_on:
                raise
            task = asyncio.current_task()
            assert task is not None
            assert task.cancelling() == 1, f"cancelling() is {task.cancelling()}, not 1"
            task.uncancel()
            await asyncio.sleep(0.001)  # not cancelled again
            return "went on"
        return "done"

    task = asyncio.create_task(run())
    await asyncio.sleep(delay)
    cancelled = task.cancel()
    try:
        outcome = await task
    except asyncio.CancelledError:
        assert cancelled and not go_on
        assert task.cancelled()
        return "timeout"
    assert outcome == "done" or (cancelled and go_on), f"cancel() swallowed: {outcome}"
    return "done" if outcome == "done" else "timeout"


async def by_task_group_error(transfer: Awaitable[None], delay: float) -> str:
    async def run() -> None:
        await transfer

    async def fail() -> None:
        await asyncio.sleep(delay)
        raise Boom

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(run)
            group.start_soon(fail)
    except BaseExceptionGroup as errors:
        booms, rest = errors.split(Boom)
        assert booms is not None and rest is None, f"the group raised {errors!r}"
        assert len(booms.exceptions) == 1
        return "error"
    raise AssertionError("the task group raised nothing")


Cancel = Callable[[Awaitable[None], float, int], Awaitable[str]]
HOW: dict[str, Cancel] = {
    "fail_after": lambda t, d, _: by_fail_after(t, d),
    "move_on_after": lambda t, d, _: by_move_on_after(t, d),
    "asyncio.timeout": lambda t, d, _: by_asyncio_timeout(t, d),
    "wait_for": lambda t, d, _: by_wait_for(t, d),
    "task.cancel": lambda t, d, n: by_task_cancel(t, d, go_on=n % 2 == 1),
    "task-group-error": lambda t, d, _: by_task_group_error(t, d),
}


async def make_bench(
    sandbox: Sandbox, pool: PoolInfo, uri: str, folder: Path
) -> tuple[Bench, libvirt.virConnect]:
    content = layout_content()
    source = folder.parent / "source.img"
    write_sparse(source, content)
    await sandbox.acreate_volume(pool, "up.img", SIZE)
    await sandbox.acreate_volume(pool, "down.img", SIZE)
    conn = await avs.connect(uri)
    up = await avs.lookup_volume(conn, "up.img", pool=pool.name)
    down = await avs.lookup_volume(conn, "down.img", pool=pool.name)
    await avs.upload(down, source)
    return Bench(conn, up, down, content, source, folder), conn


@pytest.mark.parametrize("how", HOW)
async def test_cancellation_is_exact(
    how: str,
    conn: libvirt.virConnect,
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every transfer, cancelled ``how`` after each delay: the cancellation is
    seen as what it is, and nothing stays behind."""
    monkeypatch.setattr(ranges_module, "PARALLEL_MIN_PART", MiB)  # 2 streams of 2 MiB
    folder = tmp_path / "out"
    folder.mkdir()
    before = Footprint.take(folder)
    bench, own = await make_bench(libvirt_sandbox, libvirt_pool, conn.getURI(), folder)
    cancel = HOW[how]
    outcomes: dict[str, set[str]] = {name: set() for name in TRANSFERS}
    try:
        for transfer in TRANSFERS.values():  # warm-up: threads, slots, the volume's pages
            await transfer(bench)
        await left_behind(Footprint.take(folder))  # settled
        idle = Footprint.take(folder)
        threads = threading.active_count()
        for n in range(ROUNDS):
            for name, transfer in TRANSFERS.items():
                for delay in DELAYS:
                    what = f"{name} cancelled by {how} after {delay * 1000:g} ms"
                    try:
                        outcome = await cancel(transfer(bench), delay, n)
                    except BaseException as error:
                        raise AssertionError(f"{what}: {error!r}") from error
                    outcomes[name].add(outcome)
                    task = asyncio.current_task()
                    assert task is not None and task.cancelling() == 0, what
                    assert not (more := await left_behind(idle, folder)), f"{what}: {more}"
                    assert sorted(os.listdir(folder)) == [], what
        await asyncio.sleep(0.05)
        # The shared executor keeps the threads a burst made (it never shrinks):
        # a few more are fine; a thread per cancelled transfer would be hundreds
        # (and a worker still blocked is caught by left_behind above).
        attempts = ROUNDS * len(TRANSFERS) * len(DELAYS)
        assert threading.active_count() <= threads + 8 < attempts, "worker threads piled up"
    finally:
        del bench  # its volumes hold the connection
        await avs.aclose_connection(own)
    # anyio.fail_after leaves a cycle on Python 3.12+ (see DEADLINE below).
    more = await left_behind(before, folder, collect=True)
    assert not more, f"left after closing the connection: {more}"
    print(f"\n{how}: {outcomes}")
    # The sweep reached both ends: transfers cut short, and transfers done.
    assert all("timeout" in seen or "error" in seen for seen in outcomes.values()), outcomes
    if how != "task-group-error":
        assert any("done" in seen for seen in outcomes.values()), outcomes


# Python 3.12 and 3.13 (not 3.11): anyio.fail_after itself leaves the CancelledError it
# turns into TimeoutError in a reference cycle (its cancel scope, its generator's frames and
# the cancelled frames) until the garbage collector runs; move_on_after does not.
DEADLINE = "fail_after" if sys.version_info < (3, 12) else "move_on_after"


async def test_cancelled_transfers_leave_no_reference_cycle(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    """A cancellation raised again after an uninterruptible call holds nothing in a
    cycle: with the garbage collector off, closing the connection frees it at once."""
    folder = tmp_path / "out"
    folder.mkdir()
    before = Footprint.take(folder)
    gc.collect()
    gc.disable()
    try:
        bench, own = await make_bench(libvirt_sandbox, libvirt_pool, libvirt_sandbox.uri, folder)
        try:
            for transfer in TRANSFERS.values():
                for n, delay in enumerate([0, 0.0005, 0.001, 0.002, 0.005, 0.01]):
                    how = HOW[DEADLINE if n % 2 else "task.cancel"]
                    await how(transfer(bench), delay, 0)
        finally:
            del bench  # its volumes hold the connection
            await avs.aclose_connection(own)
        assert not (more := await left_behind(before, folder)), f"held by a cycle: {more}"
    finally:
        gc.enable()


async def test_fd_count_helper_counts() -> None:
    """The leak checks above would see a leaked descriptor."""
    before = fd_count()
    r, w = os.pipe()
    try:
        assert fd_count() == before + 2
    finally:
        os.close(r)
        os.close(w)
