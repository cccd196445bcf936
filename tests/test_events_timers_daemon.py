"""Timers against a real libvirt daemon (the session sandbox): libvirt's keepalive
runs on our timers and socket watch, and detects a stopped daemon."""

from __future__ import annotations

import asyncio
import contextlib
import time

from _helpers.faults import daemon_stopped

import aiovirtstream as avs
from aiovirtstream.testing import Sandbox


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
