"""Test configuration. The sandbox fixtures come from aiovirtstream's pytest11 entry point."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import libvirt
import pytest

import aiovirtstream as avs
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
