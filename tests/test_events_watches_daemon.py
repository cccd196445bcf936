"""fd watches against a real libvirt daemon (the session sandbox): blocking calls
from worker threads next to streams, and a paused socket holding the daemon back,
not the next connection on its fd number."""

from __future__ import annotations

import asyncio
import hashlib
import os

import libvirt
import pytest
from _helpers.volumes import download_all, upload_all

import aiovirtstream as avs
from aiovirtstream.testing import PoolInfo, Sandbox

KiB = 1024
MiB = 1024 * KiB


async def test_blocking_calls_from_threads_during_transfers(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """Worker threads' blocking calls update the socket watch while streams run."""
    size = 32 * MiB
    await libvirt_sandbox.acreate_volume(libvirt_pool, "busy", size)
    data = os.urandom(size)
    conn = await avs.connect(libvirt_sandbox.uri)
    try:
        pool = await asyncio.to_thread(conn.storagePoolLookupByName, libvirt_pool.name)
        vol = await avs.lookup_volume(conn, "busy", pool=libvirt_pool.name)
        transferring = True
        calls = calls_during_transfer = 0

        async def caller(kind: int) -> None:
            nonlocal calls, calls_during_transfer
            while transferring or calls < 100:
                if kind:
                    assert "busy" in await asyncio.to_thread(pool.listVolumes)
                else:
                    assert await asyncio.to_thread(conn.getLibVersion) > 0
                calls += 1
                calls_during_transfer += transferring
                await asyncio.sleep(0.002)

        async def transfer() -> bytes:
            nonlocal transferring
            try:
                await upload_all(vol, data)
                return await download_all(vol, size)
            finally:
                transferring = False

        async with asyncio.timeout(120):
            moved = asyncio.ensure_future(transfer())
            await asyncio.gather(moved, *(caller(k % 2) for k in range(4)))
        back = moved.result()
        assert calls >= 100
        assert calls_during_transfer >= 20, "the calls did not overlap the transfer"
        assert len(back) == size
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    finally:
        await avs.aclose_connection(conn)


async def test_paused_connection_socket_holds_the_daemon_back(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """Backpressure: while its socket is not served, a download receives nothing more."""
    import stat

    size = 64 * MiB
    await libvirt_sandbox.acreate_volume(libvirt_pool, "paused", size)
    conn = await avs.connect(libvirt_sandbox.uri)
    impl = avs.get_event_impl()
    try:
        sock = avs.connection_socket(conn)
        assert sock is not None and stat.S_ISSOCK(os.fstat(sock).st_mode)
        vol = await avs.lookup_volume(conn, "paused", pool=libvirt_pool.name)
        data = os.urandom(size)
        await upload_all(vol, data)
        received = bytearray()
        async with await avs.open_volume_download(vol) as stream:
            received += await stream.read()
            impl.pause_reading(sock)
            try:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(1):
                        while True:  # what libvirt had queued, then nothing
                            received += await stream.read()
                assert len(received) < 16 * MiB, "the daemon kept sending while paused"
            finally:
                impl.resume_reading(sock)
            async for chunk in stream:
                received += chunk
        assert bytes(received) == data
    finally:
        await avs.aclose_connection(conn)


async def _connect_on_fd(uri: str, fd: int) -> libvirt.virConnect:
    """A connection whose socket has the number ``fd`` (free now): a socket takes
    the lowest free number, so every free one below is taken first, by
    placeholders and by connections kept open until ours comes."""
    placeholders = []
    for low in range(3, fd):
        try:
            os.fstat(low)
        except OSError:
            placeholders.append(os.open(os.devnull, os.O_RDONLY))
    extra: list[libvirt.virConnect] = []
    try:
        for _ in range(16):
            conn = await avs.connect(uri)
            if avs.connection_socket(conn) == fd:
                return conn
            extra.append(conn)
        raise AssertionError(f"no new connection got fd {fd} back")
    finally:
        for placeholder in placeholders:
            os.close(placeholder)
        for conn in extra:
            await avs.aclose_connection(conn)


async def test_a_pause_left_on_a_closed_connection_does_not_hold_the_next(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """The fd number of a closed connection comes back for the next one: a pause
    left on the old socket goes with the old connection's watch."""
    await libvirt_sandbox.acreate_volume(libvirt_pool, "reused-fd", MiB)
    impl = avs.get_event_impl()
    old = await avs.connect(libvirt_sandbox.uri)
    sock = avs.connection_socket(old)
    assert sock is not None
    impl.pause_reading(sock)  # never resumed
    await avs.aclose_connection(old)
    await impl.wait_frees()
    new = await _connect_on_fd(libvirt_sandbox.uri, sock)
    try:
        vol = await avs.lookup_volume(new, "reused-fd", pool=libvirt_pool.name)
        data = os.urandom(MiB)
        await upload_all(vol, data)
        async with asyncio.timeout(10):
            assert await download_all(vol, MiB) == data
        impl.resume_reading(sock)  # the stale resume of the old pause changes nothing
        async with asyncio.timeout(10):
            assert await download_all(vol, MiB) == data
    finally:
        await avs.aclose_connection(new)
