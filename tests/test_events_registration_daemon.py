"""Registration of the event hooks, against a real libvirt daemon (the session
sandbox): a connection libvirt opened before them fails fast, in a process of
its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from aiovirtstream.testing import PoolInfo, Sandbox

KiB = 1024
MiB = 1024 * KiB


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
