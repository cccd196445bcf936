"""The event implementation's loops against a real libvirt daemon (the session
sandbox): many asyncio runs, a connection moved across loops, uvloop, and a
closed connection released at once (no garbage collector needed)."""

from __future__ import annotations

import asyncio
import concurrent.futures.thread
import gc
import logging
import os
import time
import warnings
from typing import Any

import libvirt
import pytest
import uvloop
from _helpers.volumes import round_trip

import aiovirtstream as avs
from aiovirtstream.testing import PoolInfo, Sandbox

KiB = 1024
MiB = 1024 * KiB


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
