"""The sandbox's daemon process: what a start that cannot succeed says, a busy
TCP port retried, and its faults (kill, freeze) for the tests to provoke."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import libvirt
import pytest
from _helpers.processes import alive, assert_cleaned_up

import aiovirtstream.testing._launch as launch_module
from aiovirtstream.testing import DaemonNotInstalledError, Sandbox, SandboxError, SandboxStartError
from aiovirtstream.testing._processes import free_port


def test_missing_libvirtd_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotInstalledError, match="libvirt-daemon") as info:
        Sandbox(env_path=str(tmp_path)).start()
    assert info.value.package == "libvirt-daemon"
    assert "libvirtd not found" in str(info.value)
    assert isinstance(info.value, SandboxError)
    with pytest.raises(DaemonNotInstalledError, match="libvirt-daemon"):
        Sandbox(libvirtd="/nonexistent/libvirtd").start()


def test_missing_qemu_names_the_package(tmp_path: Path) -> None:
    libvirtd = shutil.which("libvirtd", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert libvirtd is not None
    with pytest.raises(DaemonNotInstalledError, match="qemu-system-x86") as info:
        Sandbox("full", libvirtd=libvirtd, env_path=str(tmp_path)).start()
    assert info.value.package == "qemu-system-x86"


def test_daemon_that_exits_fails_fast_with_its_output(parent_dir: Path) -> None:
    fake = parent_dir / "libvirtd"
    fake.write_text("#!/bin/sh\necho 'fake libvirtd: cannot parse config' >&2\nexit 3\n")
    fake.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(SandboxStartError) as info:
        Sandbox(libvirtd=fake, tmp_dir=parent_dir).start()
    assert time.monotonic() - started < 5
    assert "exited with status 3" in str(info.value)
    assert "cannot parse config" in str(info.value)
    assert "cannot parse config" in info.value.log_tail
    assert [p.name for p in parent_dir.iterdir()] == ["libvirtd"]


def test_tcp_port_collision_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        monkeypatch.setattr(launch_module, "free_port", lambda: next(ports, None) or free_port())
        with Sandbox(tcp=True) as sb:
            assert sb.tcp_port != busy
            conn = libvirt.open(sb.tcp_uri)
            assert conn.getLibVersion() > 0
            conn.close()
            assert "Address already in use" in sb.log_tail(200)


# ---------------------------------------------------------------- faults: kill, freeze


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_kill_crashes_the_daemon_and_stop_cleans_up() -> None:
    sb = Sandbox()
    with sb:
        path, pid = sb.path, sb.pid
        conn = libvirt.open(sb.uri)
        try:
            sb.kill()
            assert not alive(pid)
            assert not sb.running
            assert path.exists(), "kill() leaves the folder to stop()"
            with pytest.raises(libvirt.libvirtError):
                conn.getLibVersion()
            assert conn.isAlive() == 0
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        with pytest.raises(SandboxError, match="not running"):
            sb.kill()
        with pytest.raises(SandboxError, match="not running"):
            _ = sb.pid
    assert_cleaned_up(path, pid, sb.daemon_user)


def test_frozen_daemon_answers_nothing_until_thawed() -> None:
    with Sandbox() as sb:
        conn = libvirt.open(sb.uri)
        try:
            with sb.frozen():
                assert _state(sb.pid) == "T"
                answer: list[int] = []
                asking = threading.Thread(target=lambda: answer.append(conn.getLibVersion()))
                asking.start()
                asking.join(0.5)
                assert answer == [], "a frozen daemon answered"
            asking.join(5)
            assert answer and answer[0] > 0
            assert _state(sb.pid) in ("S", "R")
            with pytest.raises(RuntimeError, match="boom"), sb.frozen():
                raise RuntimeError("boom")
            assert _state(sb.pid) in ("S", "R"), "frozen() must thaw on an exception"
            sb.freeze()
            sb.thaw()
            assert conn.getLibVersion() > 0
        finally:
            conn.close()
        sb.freeze()  # left frozen: stop() still ends it at once
        started = time.monotonic()
    assert time.monotonic() - started < 5
