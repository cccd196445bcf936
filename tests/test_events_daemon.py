"""The event implementation against a real libvirt daemon (the session sandbox).

What the unit tests cannot show: that libvirt's own machinery (keepalive,
the socket watch, stream timers) runs on our hooks, across loop changes,
under uvloop and next to blocking calls made from worker threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread
import contextlib
import gc
import hashlib
import logging
import os
import subprocess
import sys
import textwrap
import time
import warnings
from typing import Any

import libvirt
import pytest
import uvloop
from _helpers import daemon_stopped, download_all, upload_all

import aiovirtstream as avs
from aiovirtstream.testing import PoolInfo, Sandbox

KiB = 1024
MiB = 1024 * KiB

# ---------------------------------------------------------------- helpers


async def round_trip(conn: libvirt.virConnect, pool: str, name: str, data: bytes) -> None:
    """Upload ``data`` to volume ``name`` and check the download gives it back."""
    vol = await avs.lookup_volume(conn, name, pool=pool)
    await upload_all(vol, data)
    back = await download_all(vol, len(data))
    assert len(back) == len(data)
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()


def settled_stats(*, collect: bool = True) -> avs.EventImplStats:
    """The implementation's counts once every deferred free has run (own loop).

    ``collect`` first runs the cyclic garbage collector: libvirt disposes of a
    connection (socket watch, keepalive timer) only when its last reference
    goes, and stream objects in reference cycles hold one until collected
    (see test_closing_the_connection_releases_it_without_gc).
    """
    if collect:
        gc.collect()

    async def settle() -> avs.EventImplStats:
        impl = avs.bind_event_loop()
        await impl.wait_frees()
        await asyncio.sleep(0)
        return impl.stats()

    return asyncio.run(settle())


def live_counts(stats: avs.EventImplStats) -> tuple[int, int, int, int]:
    """What a leak would change: watches, fds, timers, pending frees."""
    return (stats.watches, stats.fds, stats.timers, stats.pending_frees)


# ---------------------------------------------------------------- keepalive


async def test_keepalive_idle_connection_stays_open(libvirt_sandbox: Sandbox) -> None:
    """Our timer sends libvirt's pings and our socket watch reads the pongs.

    With keepalive (1 s, 2) a client whose pings go unanswered (or whose
    answers are never read) closes the connection after about 3 s idle.
    """
    impl = avs.get_event_impl()
    before = impl.stats()
    conn = await avs.connect(libvirt_sandbox.uri, keepalive=(1, 2))
    try:
        during = impl.stats()
        assert during.timers_enabled > before.timers_enabled, "no keepalive timer is armed"
        assert during.watches > before.watches, "no socket watch for the connection"
        await asyncio.sleep(4.5)
        assert await asyncio.to_thread(conn.isAlive) == 1
        assert await asyncio.to_thread(conn.getLibVersion) > 0
        assert impl.stats().timers_enabled > before.timers_enabled
    finally:
        await avs.aclose_connection(conn)


async def test_keepalive_detects_a_stopped_daemon(libvirt_sandbox: Sandbox) -> None:
    """With the daemon stopped, our timers drive libvirt's keepalive to close the connection."""
    conn = await avs.connect(libvirt_sandbox.tcp_uri, keepalive=(1, 2))
    try:
        assert await asyncio.to_thread(conn.getLibVersion) > 0
        start = time.monotonic()
        with daemon_stopped(libvirt_sandbox):
            async with asyncio.timeout(6):
                lost = await avs.watch_connection(conn).wait_lost()
            elapsed = time.monotonic() - start
        assert lost.reason == "keepalive"
        assert libvirt_sandbox.tcp_uri in str(lost)
        assert 1.5 < elapsed < 5.5, f"closed after {elapsed:.2f} s"
        assert await asyncio.to_thread(conn.isAlive) == 0
    finally:
        with contextlib.suppress(avs.LibvirtError):
            await avs.aclose_connection(conn)
    await avs.get_event_impl().wait_frees()


# ---------------------------------------------------------------- loops


def test_twenty_asyncio_runs_leave_nothing_behind(
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each run: connect, transfer, close; in debug mode, so misuse of a loop raises."""
    libvirt_sandbox.create_volume(libvirt_pool, "runs", MiB)
    baseline = settled_stats()
    caplog.set_level(logging.WARNING, logger="asyncio")

    async def one_run(n: int) -> None:
        uri = libvirt_sandbox.tcp_uri if n % 2 else libvirt_sandbox.uri
        conn = await avs.connect(uri)
        try:
            await round_trip(conn, libvirt_pool.name, "runs", os.urandom(300 * KiB + n))
        finally:
            await avs.aclose_connection(conn)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(20):
            asyncio.run(one_run(n), debug=True)
        after = settled_stats()

    assert live_counts(after) == live_counts(baseline), (baseline, after)
    assert after.fds_registered_on_loop <= baseline.fds_registered_on_loop
    bad = [
        w
        for w in caught
        if issubclass(w.category, RuntimeWarning | ResourceWarning)
        or "never awaited" in str(w.message)
    ]
    assert not bad, [str(w.message) for w in bad]
    # Slow callbacks ("Executing ... took") are a debug-mode remark, not an error.
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not problems, problems
    err = capsys.readouterr().err
    assert "Task was destroyed" not in err
    assert "never awaited" not in err


def test_connection_survives_two_changes_of_loop(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """Open in one asyncio.run, stream in a second, close in a third."""
    libvirt_sandbox.create_volume(libvirt_pool, "moved", 2 * MiB)
    baseline = settled_stats()
    data = os.urandom(MiB + 12345)

    async def open_conn() -> libvirt.virConnect:
        return await avs.connect(libvirt_sandbox.uri, keepalive=(1, 3))

    conn = asyncio.run(open_conn())
    try:
        time.sleep(0.2)  # no loop runs: libvirt's timers wait for the next bind

        async def use() -> None:
            await round_trip(conn, libvirt_pool.name, "moved", data)
            await asyncio.sleep(1.5)  # keepalive pings, answered on this loop
            assert await asyncio.to_thread(conn.isAlive) == 1

        asyncio.run(use())
    finally:

        async def close() -> None:
            assert await asyncio.to_thread(conn.getLibVersion) > 0
            await avs.aclose_connection(conn)

        asyncio.run(close())
    assert live_counts(settled_stats()) == live_counts(baseline)


def test_transfer_under_uvloop(libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo) -> None:
    """One connection and round trip with uvloop serving libvirt's hooks."""
    libvirt_sandbox.create_volume(libvirt_pool, "uv", 4 * MiB)
    data = os.urandom(3 * MiB + 7)

    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        conn = await avs.connect(libvirt_sandbox.tcp_uri)
        try:
            await round_trip(conn, libvirt_pool.name, "uv", data)
            assert avs.get_event_impl().loop is asyncio.get_running_loop()
        finally:
            await avs.aclose_connection(conn)
        await avs.get_event_impl().wait_frees()

    uvloop.run(main())


def test_closing_the_connection_releases_it_without_gc(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """After aclose_connection the socket watch and keepalive timer are gone at once.

    virConnectClose only drops a reference: libvirt closes the socket when
    the last one goes. A stream object kept alive by a reference cycle keeps
    its virStream, hence the connection, open until the cyclic GC runs.
    """
    libvirt_sandbox.create_volume(libvirt_pool, "nogc", MiB)
    assert_connection_released(libvirt_sandbox, libvirt_pool, "nogc")


def test_a_lingering_worker_thread_does_not_keep_the_connection_open(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An executor thread holds its work item for a while after resolving its future.

    On a loaded CI machine the thread that ran ``virstream.finish`` was
    preempted in that window, and its reference kept the stream, hence the
    connection, open after aclose_connection. Widened here to 50 ms.
    """
    run = concurrent.futures.thread._WorkItem.run

    def run_then_linger(item: Any) -> None:
        run(item)
        time.sleep(0.05)

    monkeypatch.setattr(concurrent.futures.thread._WorkItem, "run", run_then_linger)
    libvirt_sandbox.create_volume(libvirt_pool, "linger", MiB)
    assert_connection_released(libvirt_sandbox, libvirt_pool, "linger")


def assert_connection_released(sandbox: Sandbox, pool: PoolInfo, volume: str) -> None:
    """A round trip, aclose_connection, and nothing of it is left (with the GC off)."""
    baseline = settled_stats()

    async def main() -> None:
        conn = await avs.connect(sandbox.uri)
        await round_trip(conn, pool.name, volume, os.urandom(300 * KiB))
        await avs.aclose_connection(conn)

    gc.disable()
    try:
        asyncio.run(main())
        after = settled_stats(collect=False)
        alive = sorted(
            type(o).__name__
            for o in gc.get_objects()
            if isinstance(o, avs.AsyncStream | libvirt.virStream | libvirt.virConnect)
        )
    finally:
        gc.enable()
    assert live_counts(after) == live_counts(baseline), f"still alive: {alive}"


# ---------------------------------------------------------------- threads


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


# ---------------------------------------------------------------- misuse

_OPENED_BEFORE_REGISTRATION = """
import asyncio, sys, time
import libvirt
import aiovirtstream as avs

uri, pool, volume, other_connection_first = sys.argv[1:5]
conn = libvirt.open(uri)  # before aiovirtstream registered its hooks
vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(volume)

async def main() -> None:
    if other_connection_first == "1":  # registers the hooks, on an unrelated connection
        await avs.aclose_connection(await avs.connect(uri))
    start = time.monotonic()
    try:
        stream = await avs.open_volume_download(vol)
    except avs.EventLoopNotRegisteredError as error:
        print(f"RAISED after {time.monotonic() - start:.2f} s: {error}")
        return
    print(f"OPENED after {time.monotonic() - start:.2f} s")
    try:
        async with asyncio.timeout(2):
            print(f"READ {len(await stream.read())} bytes")
    except TimeoutError:
        print(f"HUNG reading for 2 s; {avs.get_event_impl().stats()}")
    except avs.EventLoopNotRegisteredError as error:
        print(f"RAISED on read after {time.monotonic() - start:.2f} s: {error}")
    finally:
        await stream.abort()

asyncio.run(main())
conn.close()
"""


@pytest.mark.parametrize(
    "other_connection_first",
    [
        pytest.param(False, id="first-stream-registers"),
    ],
)
def test_connection_opened_before_registration_fails_fast(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, other_connection_first: bool
) -> None:
    """A clear error, not a hang, for a connection libvirt gave no async I/O (own process)."""
    libvirt_sandbox.create_volume(libvirt_pool, "early", MiB)
    script = textwrap.dedent(_OPENED_BEFORE_REGISTRATION)
    argv = [libvirt_sandbox.uri, libvirt_pool.name, "early", str(int(other_connection_first))]
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("RAISED after"), result.stdout
    assert "aiovirtstream.connect()" in result.stdout
    assert elapsed < 10, f"the subprocess took {elapsed:.1f} s"


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


async def test_connect_widens_the_send_buffer_of_unix_sockets_only(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """A unix socket gets connect()'s send buffer; TCP keeps the kernel's autotuning."""
    import socket

    from aiovirtstream._connection._connect import DEFAULT_SEND_BUFFER, widen_send_buffer

    def send_buffer(conn: libvirt.virConnect) -> tuple[int, int]:
        fd = avs.connection_socket(conn)
        assert fd is not None
        with socket.socket(fileno=os.dup(fd)) as sock:
            return sock.family, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    with open("/proc/sys/net/core/wmem_max") as limit:
        wmem_max = int(limit.read())
    with pytest.raises(ValueError, match="send_buffer"):
        await avs.connect(libvirt_sandbox.uri, send_buffer=0)
    widened = await avs.connect(libvirt_sandbox.uri)
    untouched = await avs.connect(libvirt_sandbox.uri, send_buffer=None)
    tcp = await avs.connect(libvirt_sandbox.tcp_uri)
    try:
        family, default = send_buffer(untouched)
        assert family == socket.AF_UNIX
        # The kernel doubles what is asked, capped at wmem_max; never lowered.
        assert send_buffer(widened) == (
            socket.AF_UNIX,
            max(2 * min(DEFAULT_SEND_BUFFER, wmem_max), default),
        )
        family, tcp_size = send_buffer(tcp)
        assert family == socket.AF_INET
        # Autotuned sizes are multiples of a segment's truesize, never this one.
        assert tcp_size != 2 * min(DEFAULT_SEND_BUFFER, wmem_max), "TCP's send buffer was set"
        tcp_fd = avs.connection_socket(tcp)
        assert tcp_fd is not None and not widen_send_buffer(tcp_fd, 4 * tcp_size)
        assert send_buffer(tcp) == (socket.AF_INET, tcp_size)
        read_end, write_end = os.pipe()
        try:
            open_fds = len(os.listdir("/proc/self/fd"))
            assert not widen_send_buffer(read_end, DEFAULT_SEND_BUFFER), "a pipe is no socket"
            assert len(os.listdir("/proc/self/fd")) == open_fds, "the fd's copy leaked"
        finally:
            os.close(read_end)
            os.close(write_end)
        # The widened connection still carries a stream both ways.
        data = os.urandom(3 * MiB + 5)
        await libvirt_sandbox.acreate_volume(libvirt_pool, "widened", len(data))
        await round_trip(widened, libvirt_pool.name, "widened", data)
    finally:
        for conn in (widened, untouched, tcp):
            await avs.aclose_connection(conn)
