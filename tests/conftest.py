"""Test configuration and the fixtures that more than one test module uses.

The sandbox fixtures (``libvirt_sandbox``, ``libvirt_pool``, ...) come from
aiovirtstream's pytest11 entry point; the helpers shared by the tests are in
the ``_helpers`` package.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import libvirt
import pytest
from _helpers.events import Recorder
from _helpers.volumes import require_direct_io

import aiovirtstream as avs
from aiovirtstream._events import EventImpl
from aiovirtstream._transfer._filewriter import open_direct
from aiovirtstream.testing import PoolInfo, Sandbox

pytest_plugins = ["pytester"]

MakeVolume = Callable[[str, int], Awaitable[libvirt.virStorageVol]]


@pytest.fixture(params=["unix", "tcp"])
async def conn(
    request: pytest.FixtureRequest, libvirt_sandbox: Sandbox
) -> AsyncIterator[libvirt.virConnect]:
    """A connection to the sandbox daemon, over its unix socket and over loopback TCP."""
    uri = libvirt_sandbox.tcp_uri if request.param == "tcp" else libvirt_sandbox.uri
    connection = await avs.connect(uri)
    yield connection
    await avs.aclose_connection(connection)


@pytest.fixture
def make_volume(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, conn: libvirt.virConnect
) -> MakeVolume:
    """Create a sparse raw volume in the test's pool and look it up on ``conn``."""

    async def make(name: str, capacity: int) -> libvirt.virStorageVol:
        await libvirt_sandbox.acreate_volume(libvirt_pool, name, capacity)
        return await avs.lookup_volume(conn, name, pool=libvirt_pool.name)

    return make


# ---------------------------------------------------------------- sandboxes of a test's own


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A storage sandbox of this test's own (with TCP): it may be killed or frozen."""
    with Sandbox("storage", tcp=True) as sb:
        yield sb


@pytest.fixture
def parent_dir() -> Iterator[Path]:
    """A folder for sandboxes that the daemon user can enter, so a test can see all it made."""
    parent = Path(tempfile.mkdtemp(prefix="sbtest-", dir="/tmp"))
    parent.chmod(0o755)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


# ---------------------------------------------------------------- copy(): two hosts


@pytest.fixture(scope="module")
def other_sandbox() -> Iterator[Sandbox]:
    """The second host: a storage sandbox of this module."""
    with Sandbox("storage") as sb:
        yield sb


@pytest.fixture
def other_pool(other_sandbox: Sandbox, libvirt_pool: PoolInfo) -> Iterator[PoolInfo]:
    pool = other_sandbox.create_pool(libvirt_pool.name)
    try:
        yield pool
    finally:
        other_sandbox.delete_pool(pool)


@dataclass
class Hosts:
    """Both sides: a sandbox, a pool in it and a stream connection to it."""

    src_sandbox: Sandbox
    src_pool: PoolInfo
    src_conn: libvirt.virConnect
    dst_sandbox: Sandbox
    dst_pool: PoolInfo
    dst_conn: libvirt.virConnect

    async def source(self, name: str, capacity: int, writes: dict[int, bytes]) -> Path:
        """A raw source volume with ``writes`` (offset: bytes) as its data; its path."""
        info = await self.src_sandbox.acreate_volume(self.src_pool, name, capacity)
        await anyio.to_thread.run_sync(_write, info.path, writes)
        return info.path

    async def dest(self, name: str, capacity: int, writes: dict[int, bytes] | None = None) -> Path:
        info = await self.dst_sandbox.acreate_volume(self.dst_pool, name, capacity)
        if writes:
            await anyio.to_thread.run_sync(_write, info.path, writes)
        return info.path

    async def volumes(
        self, src: str, dst: str
    ) -> tuple[libvirt.virStorageVol, libvirt.virStorageVol]:
        return (
            await avs.lookup_volume(self.src_conn, src, pool=self.src_pool.name),
            await avs.lookup_volume(self.dst_conn, dst, pool=self.dst_pool.name),
        )


@pytest.fixture
async def hosts(
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    other_sandbox: Sandbox,
    other_pool: PoolInfo,
) -> AsyncIterator[Hosts]:
    src_conn = await avs.connect(libvirt_sandbox.uri)
    dst_conn = await avs.connect(other_sandbox.uri)
    try:
        yield Hosts(libvirt_sandbox, libvirt_pool, src_conn, other_sandbox, other_pool, dst_conn)
    finally:
        await avs.aclose_connection(src_conn)
        await avs.aclose_connection(dst_conn)


def _write(path: Path, writes: dict[int, bytes]) -> None:
    with open(path, "r+b") as f:
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)


# ---------------------------------------------------------------- the event implementation, unit


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def impl(rec: Recorder) -> EventImpl:
    """An EventImpl of the test's own (not registered with libvirt), with ``rec`` in
    place of libvirt's free-callback invoker."""
    return EventImpl(invoke_free=rec.free)


@pytest.fixture
def direct_file(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """A new file, its descriptor and its direct descriptor."""
    require_direct_io(tmp_path)
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    direct_fd = open_direct(path)
    assert direct_fd >= 0, f"no O_DIRECT on {tmp_path}"
    try:
        yield path, fd, direct_fd
    finally:
        os.close(fd)
        os.close(direct_fd)
