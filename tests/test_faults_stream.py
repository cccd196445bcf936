"""The fault suite for AsyncStream: a daemon killed under each way of reading a
download and of writing or finishing an upload, and under a reader that fell behind.

Each test kills a sandbox of its own; every call must end with ConnectionLostError
naming the host, within a bound, leaving no watch, timer or reference cycle behind.
"""

from __future__ import annotations

import asyncio
import time

import libvirt
import pytest
from _helpers.faults import (
    DENSE,
    KILL_BOUND,
    Failure,
    assert_lost,
    dense_volume,
    ends_with_error,
    nothing_left_behind,
)
from _helpers.volumes import MiB

import aiovirtstream as avs
from aiovirtstream.testing import Sandbox


async def test_kill_during_stream_read(sandbox: Sandbox) -> None:
    await dense_volume(sandbox, "dense.img")
    received = 0
    killed_at = 0.0

    async def scenario() -> Failure:
        conn = await avs.connect(sandbox.uri)
        try:
            vol = await avs.lookup_volume(conn, "dense.img", pool="pool")

            async def read_all() -> None:
                nonlocal received, killed_at
                async with await avs.open_volume_download(vol) as stream:
                    while chunk := await stream.read(MiB):
                        received += len(chunk)
                        if not killed_at and received >= 16 * MiB:
                            sandbox.kill()
                            killed_at = time.perf_counter()

            return await ends_with_error(read_all())
        finally:
            await avs.aclose_connection(conn)

    async with nothing_left_behind():
        failure = await scenario()
    assert killed_at, f"the read ended before the kill: {failure}"
    assert received < DENSE
    assert_lost(failure, sandbox.uri, "eof")
    print(f"AsyncStream.read: kill to error {failure.at - killed_at:.3f} s")
    assert failure.at - killed_at < KILL_BOUND


async def test_kill_while_a_slow_reader_holds_the_socket(sandbox: Sandbox) -> None:
    """A reader that fell behind holds its connection's socket (its read-ahead is
    full): a kill meanwhile still ends its reads with ConnectionLostError soon."""
    await dense_volume(sandbox, "dense.img")
    killed_at = 0.0

    async def scenario() -> Failure:
        conn = await avs.connect(sandbox.uri)
        try:
            vol = await avs.lookup_volume(conn, "dense.img", pool="pool")

            async def read_slowly() -> None:
                nonlocal killed_at
                async with await avs.open_volume_download(vol) as stream:
                    assert await stream.read()
                    await asyncio.sleep(0.5)  # the read-ahead fills, then holds the socket
                    sandbox.kill()
                    killed_at = time.perf_counter()
                    while await stream.read():
                        await asyncio.sleep(0.005)

            return await ends_with_error(read_slowly())
        finally:
            await avs.aclose_connection(conn)

    async with nothing_left_behind():
        failure = await scenario()
    assert killed_at, f"the read ended before the kill: {failure}"
    assert_lost(failure, sandbox.uri, "eof")
    print(f"AsyncStream.read behind its read-ahead: kill to error {failure.at - killed_at:.3f} s")
    assert failure.at - killed_at < KILL_BOUND + 1


class _Counting:
    """A ReceiveSink that keeps nothing but counts the bytes."""

    def __init__(self) -> None:
        self.scratch = bytearray(MiB)
        self.total = 0

    def buffer(self) -> tuple[bytearray, int, int]:
        return self.scratch, 0, len(self.scratch)

    def received(self, nbytes: int) -> None:
        self.total += nbytes

    def hole(self, length: int) -> None:
        pass


async def _drain_with(method: str, stream: avs.AsyncStream) -> None:
    """Read ``stream`` to its end with one of AsyncStream's ways of reading."""
    if method == "read":
        while await stream.read(MiB):
            pass
    elif method == "read_into":
        buffer = bytearray(MiB)
        while await stream.read_into(buffer):
            pass
    elif method == "pump":
        await stream.pump(_Counting())
    elif method == "iter_items":
        async for _item in stream.iter_items(MiB):
            pass
    else:
        async for _chunk in stream:
            pass


@pytest.mark.parametrize(
    "method", ["read", "read_into", "pump", "iter_items", "async for", "write", "finish"]
)
async def test_kill_under_each_stream_call(sandbox: Sandbox, method: str) -> None:
    """Each way of reading a download, writing an upload or finishing it fails typed."""
    await dense_volume(sandbox, "v.img", 128 * MiB)
    killed_at = 0.0

    def kill() -> None:
        nonlocal killed_at
        sandbox.kill()
        killed_at = time.perf_counter()

    async def use(conn: libvirt.virConnect) -> None:
        vol = await avs.lookup_volume(conn, "v.img", pool="pool")
        if method in ("write", "finish"):
            stream = await avs.open_volume_upload(vol)
            async with stream:
                await stream.write(bytes(MiB))
                await stream.flush()
                kill()
                if method == "write":
                    for _ in range(127):
                        await stream.write(bytes(MiB))
                    await stream.flush()
                else:
                    await stream.finish()
        else:
            async with await avs.open_volume_download(vol, sparse=True) as stream:
                assert await stream.read(MiB)
                kill()
                await _drain_with(method, stream)

    async def scenario() -> Failure:
        conn = await avs.connect(sandbox.uri)
        try:
            return await ends_with_error(use(conn))
        finally:
            await avs.aclose_connection(conn)

    async with nothing_left_behind():
        failure = await scenario()
    assert killed_at, f"it failed before the kill: {failure}"
    assert_lost(failure, sandbox.uri)
    print(f"{method}: kill to error {failure.at - killed_at:.3f} s")
    assert failure.at - killed_at < KILL_BOUND
