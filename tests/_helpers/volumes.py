"""Volumes, files and their data: sparse layouts, random volumes, whole reads and
writes, in-memory sinks, the page cache and direct I/O."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio.abc
import libvirt

import aiovirtstream as avs

if TYPE_CHECKING:
    from conftest import MakeVolume

MiB = 1024 * 1024
BLOCK = os.statvfs("/tmp").f_bsize  # holes exist at the file system's block size
Layout = list[tuple[str, int]]  # ("data" | "hole", length)


def write_layout(path: Path, layout: Layout) -> bytes:
    """Create a sparse file with data and holes; returns its logical content."""
    content = bytearray()
    with open(path, "wb") as f:
        for kind, length in layout:
            if kind == "data":
                chunk = os.urandom(length)
                f.write(chunk)
                content += chunk
            else:
                f.seek(length, os.SEEK_CUR)
                content += bytes(length)
        f.truncate()
    return bytes(content)


def data_size(layout: Layout) -> int:
    """The bytes of data (not holes) in ``layout``."""
    return sum(length for kind, length in layout if kind == "data")


def allocated(path: Path) -> int:
    """The bytes the file system allocated for ``path``."""
    return os.stat(path).st_blocks * 512


async def iter_once(data: bytes) -> AsyncIterator[bytes]:
    """``data`` as an async iterable (an upload's source), in one chunk."""
    yield data


async def download_bytes(vol: libvirt.virStorageVol, path: Path) -> bytes:
    """All of ``vol``, downloaded into ``path`` (overwritten) and read back."""
    await avs.download(vol, path, overwrite=True)
    return await asyncio.to_thread(path.read_bytes)


async def random_volume(
    make_volume: MakeVolume, tmp_path: Path, name: str, size: int
) -> tuple[libvirt.virStorageVol, Path]:
    """A volume holding ``size`` random bytes, and the file they came from."""
    source = tmp_path / f"{name}.src"
    source.write_bytes(os.urandom(size))
    vol = await make_volume(name, size)
    await avs.upload(vol, source)
    return vol, source


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


async def round_trip(conn: libvirt.virConnect, pool: str, name: str, data: bytes) -> None:
    """Upload ``data`` to volume ``name`` and check the download gives it back."""
    vol = await avs.lookup_volume(conn, name, pool=pool)
    await upload_all(vol, data)
    back = await download_all(vol, len(data))
    assert len(back) == len(data)
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()


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


class ListSink:
    """A ReceiveSink that keeps everything in memory, ``room`` bytes per buffer."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.data = bytearray()
        self.holes: list[int] = []
        self.items: list[int | str] = []  # sizes received, "hole" markers
        self._buffer = bytearray(room + 7)
        self.full = False  # when True, buffer() reports no room

    def buffer(self) -> tuple[bytearray, int, int] | None:
        if self.full:
            return None
        return self._buffer, 7, self.room  # an offset, to check it is honoured

    def received(self, nbytes: int) -> None:
        self.data += self._buffer[7 : 7 + nbytes]
        self.items.append(nbytes)

    def hole(self, length: int) -> None:
        self.holes.append(length)
        self.items.append("hole")
        self.data += bytes(length)


class Collect(anyio.abc.ByteSendStream):
    """An anyio byte stream (a download's destination) that keeps what it is sent,
    or only counts it with ``keep=False``; ``delay`` seconds a send, as a slow
    network client takes."""

    def __init__(self, *, delay: float = 0, keep: bool = True) -> None:
        self.data = bytearray()
        self.count = 0
        self._delay = delay
        self._keep = keep

    async def send(self, item: bytes) -> None:
        self.count += len(item)
        if self._keep:
            self.data += item
        if self._delay:
            await anyio.sleep(self._delay)

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class KeepingHasher:
    """A hasher that keeps what it is given, in order."""

    def __init__(self) -> None:
        self.content = bytearray()

    def data(self, data: object) -> None:
        self.content += memoryview(data)  # type: ignore[arg-type]

    def hole(self, length: int) -> None:
        self.content += bytes(length)
