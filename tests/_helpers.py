"""Small helpers shared by the tests (imported as a module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

import aiovirtstream as avs
from aiovirtstream.testing import Sandbox

MiB = 1024 * 1024


async def upload_all(vol: libvirt.virStorageVol, data: bytes) -> None:
    """Write ``data`` to the start of ``vol`` through an AsyncStream, 1 MiB at a time."""
    async with await avs.open_volume_upload(vol) as stream:
        for start in range(0, len(data), MiB):
            await stream.write(data[start : start + MiB])


async def download_all(vol: libvirt.virStorageVol, length: int) -> bytes:
    """Read ``length`` bytes of ``vol`` (0: all of it) through an AsyncStream."""
    out = bytearray()
    async with await avs.open_volume_download(vol, length=length) as stream:
        async for chunk in stream:
            out += chunk
    return bytes(out)


@contextlib.contextmanager
def daemon_stopped(sandbox: Sandbox) -> Iterator[None]:
    """SIGSTOP the (shared) daemon for the block; SIGCONT is sent whatever happens."""
    os.kill(sandbox.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(sandbox.pid, signal.SIGCONT)


def require_direct_io(folder: Path) -> None:
    """tmpfs accepts O_DIRECT (Linux 6.6+) but still caches: direct I/O tests need a disk."""
    kind = subprocess.run(
        ["stat", "-f", "-c", "%T", str(folder)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert kind != "tmpfs", (
        f"{folder} is on tmpfs, where O_DIRECT cannot be told from the page cache: "
        "run pytest with --basetemp=<a folder on a disk file system>"
    )


def page_cache_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache (util-linux's fincore)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def refuse_direct_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``os.open`` fail with EINVAL for O_DIRECT, as a file system without it does."""
    real_open = os.open

    def no_direct(name: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
