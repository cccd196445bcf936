"""aiovirtstream.testing.Sandbox's life: started, used over unix and TLS, stopped
and cleaned up whatever happens (an exception, a cancellation, its owner killed),
misuse reported; against real libvirt daemons."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import libvirt
import pytest
from _helpers.processes import alive, assert_cleaned_up, processes_mentioning
from _helpers.volumes import MiB

from aiovirtstream.testing import Sandbox, SandboxError


def _exercise(sb: Sandbox, uri: str, pool_name: str) -> None:
    """Over uri: the daemon answers, makes a pool and a sparse volume."""
    conn = libvirt.open(uri)
    try:
        assert conn.getLibVersion() >= 9_000_000
        target = sb.path / "pools" / pool_name
        pool = conn.storagePoolCreateXML(
            f"<pool type='dir'><name>{pool_name}</name>"
            f"<target><path>{target}</path></target></pool>",
            libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD,
        )
        vol = pool.createXML(
            "<volume><name>v.img</name><capacity unit='bytes'>67108864</capacity>"
            "<allocation unit='bytes'>0</allocation><target><format type='raw'/></target>"
            "</volume>",
            0,
        )
        _type, capacity, allocation = vol.info()
        assert capacity == 64 * MiB
        assert allocation < 64 * 1024
        assert (target / "v.img").stat().st_size == 64 * MiB
        pool.destroy()
    finally:
        conn.close()


def test_storage_sandbox_over_unix_and_tcp() -> None:
    with Sandbox(tcp=True) as sb:
        path, pid = sb.path, sb.pid
        assert sb.uri == f"storage+unix:///session?socket={path}/run/libvirt/libvirt-sock"
        assert sb.tcp_uri == (
            f"storage+tls://127.0.0.1:{sb.tcp_port}/session?pkipath={sb.pki_path}"
        )
        assert sb.socket_path.is_socket()
        _exercise(sb, sb.uri, "over-unix")
        _exercise(sb, sb.tcp_uri, "over-tcp")
        assert sb.log_path.parent == path
        # libvirt 11.x logs nothing at start-up (9.0 logs D-Bus errors): an XML error, which
        # the daemon logs at error level, gives the log its "libvirt version" header.
        with sb.connect() as conn, contextlib.suppress(libvirt.libvirtError):
            conn.storagePoolCreateXML("<pool", 0)
        assert "libvirt version" in sb.log_path.read_text()
        if os.geteuid() == 0:
            status = Path(f"/proc/{pid}/status").read_text()
            uid = pwd.getpwnam(sb.daemon_user).pw_uid
            assert f"Uid:\t{uid}\t" in status
            assert sb.daemon_user in ("aiovirtstream-sandbox", "nobody")
        started = time.monotonic()
    assert time.monotonic() - started < 5, "SIGTERM should stop libvirtd quickly"
    assert not sb.running
    assert_cleaned_up(path, pid, sb.daemon_user)


async def test_async_start_does_not_block_the_loop() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        async with Sandbox() as sb:
            with sb.connect() as conn:
                assert conn.getLibVersion() > 0
    finally:
        ticker.cancel()
    assert ticks >= 3


def test_two_sandboxes_at_once() -> None:
    with Sandbox(tcp=True) as a, Sandbox(tcp=True) as b:
        pids = {a: a.pid, b: b.pid}
        assert a.path != b.path
        assert a.uri != b.uri
        assert a.tcp_port != b.tcp_port
        assert a.pid != b.pid
        for sb in (a, b):
            for uri in (sb.uri, sb.tcp_uri):
                conn = libvirt.open(uri)
                assert conn.getLibVersion() > 0
                conn.close()
        a.create_pool("same-name")
        b.create_pool("same-name")  # separate daemons, separate pools
    for sb, pid in pids.items():
        assert_cleaned_up(sb.path, pid, sb.daemon_user)


def test_cleanup_after_exception() -> None:
    sb = Sandbox()
    with pytest.raises(RuntimeError, match="boom"), sb:
        path, pid = sb.path, sb.pid
        assert alive(pid)
        raise RuntimeError("boom")
    assert_cleaned_up(path, pid, sb.daemon_user)


def test_cleanup_of_a_stopped_daemon_is_quick() -> None:
    """A test may leave libvirtd stopped (SIGSTOP): stop() still ends it without waiting."""
    with Sandbox(stop_timeout=20) as sb:
        path, pid = sb.path, sb.pid
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert_cleaned_up(path, pid, sb.daemon_user)


async def test_cleanup_after_exception_async() -> None:
    sb = Sandbox()
    with pytest.raises(RuntimeError, match="boom"):
        async with sb:
            path, pid = sb.path, sb.pid
            assert alive(pid)
            raise RuntimeError("boom")
    assert_cleaned_up(path, pid, sb.daemon_user)


async def test_cancelled_body_cleans_up() -> None:
    seen: list[tuple[Path, int, str]] = []
    entered = asyncio.Event()

    async def body() -> None:
        async with Sandbox() as sb:
            seen.append((sb.path, sb.pid, sb.daemon_user))
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_cleaned_up(*seen[0])


async def test_anyio_cancel_scope_cleans_up() -> None:
    seen: list[tuple[Path, int, str]] = []
    with anyio.move_on_after(10) as scope:
        async with Sandbox() as sb:
            seen.append((sb.path, sb.pid, sb.daemon_user))
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert_cleaned_up(*seen[0])


@pytest.mark.parametrize("delay", [0, 0.005, 0.02, 0.05])
async def test_cancelled_while_starting_cleans_up(parent_dir: Path, delay: float) -> None:
    async def body() -> None:
        async with Sandbox(tcp=True, tmp_dir=parent_dir):
            await asyncio.sleep(3600)

    task = asyncio.create_task(body())
    await asyncio.sleep(delay)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(parent_dir) == []
    assert processes_mentioning(str(parent_dir)) == []


OWNER_SCRIPT = """
import sys, time
from aiovirtstream.testing import Sandbox
sb = Sandbox(tcp=True)
sb.start()
print(sb.path, sb.pid, sb.daemon_user, flush=True)
time.sleep(3600)
"""


def test_sandbox_of_a_killed_process_is_reaped() -> None:
    """SIGKILL leaves no finalizer to run: the watchdog process cleans up."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT], stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        path, pid, user = owner.stdout.readline().split()
        assert alive(int(pid))
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 10
    while Path(path.decode()).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_cleaned_up(Path(path.decode()), int(pid), user.decode())


def test_misuse_is_reported() -> None:
    sb = Sandbox()
    with pytest.raises(SandboxError, match="not started"):
        _ = sb.uri
    with sb:
        with pytest.raises(SandboxError, match="tcp=True"):
            _ = sb.tcp_uri
        with pytest.raises(SandboxError, match="only once"):
            sb.start()
        assert sb.running  # the failed second start left it alone
    with pytest.raises(ValueError):
        Sandbox("xen")  # type: ignore[arg-type]


DOMAIN_XML = """<domain type='qemu'><name>idle</name><memory unit='MiB'>32</memory>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices/></domain>"""


def test_full_mode_answers_and_kills_its_qemu() -> None:
    with Sandbox("full", tcp=True) as sb:
        path, pid = sb.path, sb.pid
        assert sb.uri.startswith("qemu+unix:///session?socket=")
        assert sb.tcp_uri.startswith("qemu+tls://127.0.0.1:")
        for uri in (sb.uri, sb.tcp_uri):
            conn = libvirt.open(uri)
            assert conn.getType() == "QEMU"
            assert conn.getLibVersion() > 0
            conn.close()
        with sb.connect() as conn:
            dom = conn.createXML(DOMAIN_XML, 0)
            assert dom.isActive()
        qemu_pid = int((path / "run/libvirt/qemu/run/idle.pid").read_text())
        assert alive(qemu_pid)
    assert not alive(qemu_pid)
    assert_cleaned_up(path, pid, sb.daemon_user)
