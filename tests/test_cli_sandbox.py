"""``sandbox``: started as a subprocess, its URIs read (``--json`` or text) and used by
the other verbs, then stopped by SIGTERM or Ctrl+C: its daemon, guest and folders gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from aiovirtstream.pytest_plugin import require_test_guest

MiB = 1024 * 1024


def processes_using(folder: str) -> list[int]:
    """Processes whose command line names ``folder`` (the daemon, QEMU, virtlogd)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if os.fsencode(folder) in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


class Running:
    """``aiovirtstream sandbox ARGS`` in a subprocess."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aiovirtstream", "sandbox", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def first_line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, self.process.stderr.read() if self.process.stderr else ""
        return line

    def stop(self, signum: int) -> tuple[int, str, str]:
        self.process.send_signal(signum)
        out, err = self.process.communicate(timeout=60)
        return self.process.returncode, out, err


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for sandbox in started:
        if sandbox.process.poll() is None:
            sandbox.process.kill()
            sandbox.process.wait()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiovirtstream", *args], capture_output=True, text=True, timeout=120
    )


def test_sandbox_json_used_then_sigterm(running: list[Running], tmp_path: Path) -> None:
    sandbox = Running("--json", "--tcp", "--pool", "p1", "--pool", "p2")
    running.append(sandbox)
    info = json.loads(sandbox.first_line())
    assert info["mode"] == "storage" and info["guest"] is None
    assert [p["name"] for p in info["pools"]] == ["p1", "p2"]
    assert info["uri"].startswith("storage+unix:///session?socket=")
    assert info["tcp_uri"].startswith("storage+tls://127.0.0.1:")
    conn = libvirt.open(info["uri"])
    try:
        pool = conn.storagePoolLookupByName("p2")
        pool.createXML(
            "<volume><name>v.img</name><capacity>8388608</capacity>"
            "<allocation>0</allocation><target><format type='raw'/></target></volume>",
            0,
        )
    finally:
        conn.close()
    source = tmp_path / "in.img"
    source.write_bytes(os.urandom(MiB))
    up = run_cli("upload", "-c", info["tcp_uri"], "v.img", str(source), "-q")  # over TLS
    assert up.returncode == 0, up.stderr
    down = run_cli("download", "-c", info["uri"], "--pool", "p2", "v.img", str(tmp_path / "out"))
    assert down.returncode == 0, down.stderr
    assert (tmp_path / "out").read_bytes()[:MiB] == source.read_bytes()
    assert os.path.exists(f"/proc/{info['pid']}")
    status, out, err = sandbox.stop(signal.SIGTERM)
    assert status == 0, err
    assert out == "" and "Traceback" not in err
    assert not os.path.exists(f"/proc/{info['pid']}")
    assert not os.path.exists(info["path"])
    assert processes_using(info["path"]) == []


def test_sandbox_text_and_ctrl_c(running: list[Running]) -> None:
    sandbox = Running()
    running.append(sandbox)
    first = sandbox.first_line()
    assert first.startswith("sandbox libvirtd running as ")
    lines = [first]
    while "Ctrl+C" not in lines[-1]:  # the last line says how to stop it
        lines.append(sandbox.first_line())
    [uri_line] = [line for line in lines if line.strip().startswith("uri:")]
    uri = uri_line.split()[1]
    folder = uri.split("socket=")[1].split("/run/libvirt")[0]
    assert any("export LIBVIRT_DEFAULT_URI=" in line for line in lines)
    status, out, err = sandbox.stop(signal.SIGINT)
    assert status == 0, err
    assert out == ""
    assert err.strip() == "aiovirtstream: stopping the sandbox"
    assert not os.path.exists(folder) and processes_using(folder) == []


def test_sandbox_with_the_test_guest(
    running: list[Running], pytestconfig: pytest.Config, tmp_path: Path
) -> None:
    require_test_guest(pytestconfig)
    sandbox = Running("--guest", "--json")
    running.append(sandbox)
    info = json.loads(sandbox.first_line())
    assert info["mode"] == "full" and info["guest"]
    assert info["uri"].startswith("qemu+unix:///session?socket=")
    shot = run_cli("screenshot", "-c", info["uri"], info["guest"], str(tmp_path / "screen"))
    assert shot.returncode == 0, shot.stderr
    qemu = [pid for pid in processes_using(info["path"]) if pid != info["pid"]]
    assert qemu, "the guest's QEMU names the sandbox's folder"
    status, _, err = sandbox.stop(signal.SIGTERM)
    assert status == 0, err
    deadline = time.monotonic() + 10
    while processes_using(info["path"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_using(info["path"]) == []
    assert not os.path.exists(info["path"])


def test_sandbox_bad_pool_name_starts_nothing() -> None:
    done = run_cli("sandbox", "--pool", "a/b")
    assert done.returncode == 1
    assert done.stderr.startswith("aiovirtstream: error: pool name 'a/b'")
    assert done.stdout == ""
