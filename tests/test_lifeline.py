"""ConnectionWatch against real daemons: how a lost connection reaches its streams."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import libvirt
import pytest
from _helpers.processes import run_script

import aiovirtstream as avs
from aiovirtstream._connection import LOST_POLL_INTERVAL
from aiovirtstream.testing import Sandbox

MiB = 1024 * 1024


@pytest.fixture
async def own_sandbox() -> AsyncIterator[Sandbox]:
    """A daemon of the test's own, which it may kill."""
    async with Sandbox("storage", tcp=True) as sandbox:
        pool = await sandbox.acreate_pool("p")
        await sandbox.acreate_volume(pool, "v", 64 * MiB)
        yield sandbox


async def _waiting_download(conn: libvirt.virConnect, sandbox: Sandbox) -> avs.AsyncStream:
    """A download stream of ``v`` from a stopped daemon: once its queue is read, reads wait."""
    vol = await avs.lookup_volume(conn, "v", pool="p")
    stream = await avs.open_volume_download(vol)
    assert await stream.read()
    os.kill(sandbox.pid, signal.SIGSTOP)
    return stream


async def _read_until_lost(stream: avs.AsyncStream) -> avs.ConnectionLostError:
    # Not pytest.raises: its ExceptionInfo, a local of a frame in the error's own
    # traceback, would keep that frame, and the stream it holds, until gc runs.
    try:
        while await stream.read():
            pass
    except avs.ConnectionLostError as error:
        return error
    raise AssertionError("the stream ended without ConnectionLostError")


async def _read_while_killed(
    stream: avs.AsyncStream, sandbox: Sandbox
) -> tuple[avs.ConnectionLostError, float]:
    """Read until the error, the daemon killed 0.2 s in; the error, seconds from kill to it."""
    killed_at = 0.0

    async def kill_soon() -> None:
        nonlocal killed_at
        await anyio.sleep(0.2)
        killed_at = time.monotonic()
        os.kill(sandbox.pid, signal.SIGKILL)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(kill_soon)
            lost = await _read_until_lost(stream)
    assert killed_at, "the read ended before the kill"
    return lost, time.monotonic() - killed_at


def _counts(stats: avs.EventImplStats) -> tuple[int, int]:
    return stats.watches, stats.timers


async def test_connect_takes_the_close_callback(own_sandbox: Sandbox) -> None:
    conn = await avs.connect(own_sandbox.uri)
    try:
        with pytest.raises(libvirt.libvirtError, match="already registered"):
            conn.registerCloseCallback(lambda *_: None, None)
        assert avs.watch_connection(conn) is avs.watch_connection(conn)
        assert avs.watch_connection(conn).lost is None
    finally:
        await avs.aclose_connection(conn)
    lost = avs.watch_connection(conn).lost
    assert lost is not None and lost.reason == "client"


async def test_a_killed_daemon_ends_a_waiting_read(own_sandbox: Sandbox) -> None:
    baseline = _counts(avs.get_event_impl().stats())
    gc.disable()
    try:
        conn = await avs.connect(own_sandbox.uri)
        vol = await avs.lookup_volume(conn, "v", pool="p")
        stream = await _waiting_download(conn, own_sandbox)
        lost, elapsed = await _read_while_killed(stream, own_sandbox)
        assert elapsed < 1.0, f"the read ended {elapsed:.3f} s after the kill"
        assert own_sandbox.uri in str(lost)
        assert lost.reason in ("eof", "error")
        assert isinstance(lost, avs.StreamBrokenError)
        assert isinstance(lost, avs.ConnectError)
        with pytest.raises(avs.ConnectionLostError):
            await stream.read()  # and every read after
        await stream.aclose()
        with pytest.raises(avs.ConnectionLostError, match="cannot open"):
            await avs.open_volume_download(vol)
        await avs.aclose_connection(conn)
        del stream, conn, vol
        await avs.get_event_impl().wait_frees()
        assert _counts(avs.get_event_impl().stats()) == baseline
    finally:
        gc.enable()


@pytest.mark.parametrize("opened_by", ["libvirt.open", "libvirt.open, close callback taken"])
async def test_a_connection_without_our_close_callback_is_polled(
    own_sandbox: Sandbox, opened_by: str
) -> None:
    if opened_by == "libvirt.open":
        avs.bind_event_loop()
        conn = await asyncio.to_thread(libvirt.open, own_sandbox.uri)
    else:  # a connection whose close callback the application took first
        conn = await asyncio.to_thread(libvirt.open, own_sandbox.uri)
        conn.registerCloseCallback(lambda *_: None, None)
    try:
        stream = await _waiting_download(conn, own_sandbox)
        lost, elapsed = await _read_while_killed(stream, own_sandbox)
        assert elapsed < 2 * LOST_POLL_INTERVAL + 0.5, f"told after {elapsed:.3f} s"
        assert lost.reason == "error"
        assert own_sandbox.uri in str(lost)
        await stream.aclose()
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        await asyncio.to_thread(conn.close)


async def test_closing_the_connection_ends_its_streams(own_sandbox: Sandbox) -> None:
    conn = await avs.connect(own_sandbox.uri)
    stream = await _waiting_download(conn, own_sandbox)
    results: list[avs.ConnectionLostError] = []

    async def read() -> None:
        results.append(await _read_until_lost(stream))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(read)
            await anyio.sleep(0.05)
            # The daemon is stopped: the close waits for it, the read does not.
            tasks.start_soon(avs.aclose_connection, conn)
            with anyio.fail_after(1):
                while not results:
                    await anyio.sleep(0.01)
            os.kill(own_sandbox.pid, signal.SIGCONT)
    assert len(results) == 1 and results[0].reason == "client"
    assert "closed by this process" in str(results[0])
    await stream.aclose()


async def test_only_the_lost_connections_streams_fail(
    own_sandbox: Sandbox, libvirt_sandbox: Sandbox
) -> None:
    other_pool = await libvirt_sandbox.acreate_pool(f"lifeline{os.getpid()}")
    try:
        await libvirt_sandbox.acreate_volume(other_pool, "v", 64 * MiB)
        doomed = await avs.connect(own_sandbox.uri)
        healthy = await avs.connect(libvirt_sandbox.uri)
        try:
            doomed_stream = await _waiting_download(doomed, own_sandbox)
            vol = await avs.lookup_volume(healthy, "v", pool=other_pool.name)
            healthy_stream = await avs.open_volume_download(vol, length=4096)
            os.kill(own_sandbox.pid, signal.SIGKILL)
            with anyio.fail_after(10):
                await _read_until_lost(doomed_stream)
                assert await avs.watch_connection(doomed).wait_lost()
            assert avs.watch_connection(healthy).lost is None
            assert await healthy_stream.read() == bytes(4096)
            await healthy_stream.finish()
            await doomed_stream.aclose()
        finally:
            await avs.aclose_connection(doomed)
            await avs.aclose_connection(healthy)
    finally:
        await libvirt_sandbox.adelete_pool(other_pool)


async def test_a_subscriber_after_the_loss_is_told_at_once(own_sandbox: Sandbox) -> None:
    conn = await avs.connect(own_sandbox.uri)
    try:
        os.kill(own_sandbox.pid, signal.SIGKILL)
        watch = avs.watch_connection(conn)
        with anyio.fail_after(5):
            first = await watch.wait_lost()
            told: asyncio.Future[avs.ConnectionLostError] = (
                asyncio.get_running_loop().create_future()
            )
            watch.subscribe(told.set_result)
            assert await told is first
    finally:
        await avs.aclose_connection(conn)


async def test_a_connection_closed_with_plain_close_is_really_closed(
    own_sandbox: Sandbox,
) -> None:
    """libvirt holds a connection while it has a close callback: it is given back."""
    impl = avs.get_event_impl()
    # The connections of the tests before are gone (an abort against a daemon
    # that stopped answering ends in the background, within its keepalive; an
    # error kept in a reference cycle holds its frames until a collection).
    gc.collect()
    with anyio.move_on_after(20):
        await impl.wait_idle()
    assert impl.is_idle(), f"the tests before left {impl.stats()}"
    before = avs.get_event_impl().stats().watches
    conn = await avs.connect(own_sandbox.uri)
    assert avs.get_event_impl().stats().watches == before + 1
    vol = await avs.lookup_volume(conn, "v", pool="p")
    async with await avs.open_volume_download(vol, length=4096) as stream:
        assert await stream.read() == bytes(4096)
    del stream, vol
    assert await asyncio.to_thread(conn.close) == 1  # the close callback holds it
    del conn
    gc.collect()
    with anyio.fail_after(5):
        while avs.get_event_impl().stats().watches != before:
            await asyncio.sleep(0.01)


COLLECTED_INSIDE_THE_WATCH_LOCK = """
import asyncio, gc, linecache, sys
import aiovirtstream as avs
from aiovirtstream.testing import Sandbox


def collect_inside_subscribe(frame, event, arg):
    # The collector runs at an allocation, on whatever thread makes it: here,
    # inside the connection watch's lock, as a new stream subscribes.
    if event != "call" or frame.f_code.co_name != "subscribe":
        return None

    def line(frame, event, arg):
        source = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        if event == "line" and source.strip() == "lost = self.lost":
            gc.collect()
        return line

    return line


async def main(uri):
    conn = await avs.connect(uri)
    vol = await avs.lookup_volume(conn, "a", pool="p")
    gc.disable()
    stream = await avs.open_volume_download(vol)
    stream.itself = stream  # left unclosed: only the collector frees it
    del stream
    sys.settrace(collect_inside_subscribe)
    other = await avs.open_volume_download(vol)
    sys.settrace(None)
    await other.aclose()
    await avs.aclose_connection(conn)
    print("done", flush=True)


with Sandbox() as sandbox:
    sandbox.create_volume(sandbox.create_pool("p"), "a", 1 << 20)
    asyncio.run(main(sandbox.uri))
"""


def test_a_stream_collected_inside_the_watch_lock_does_not_deadlock(tmp_path: Path) -> None:
    """An unclosed stream unsubscribes from its connection's watch in its finalizer,
    which the garbage collector may run on a thread inside the watch's lock."""
    assert run_script(COLLECTED_INSIDE_THE_WATCH_LOCK, tmp_path) == "done"
