"""The fault suite for upload(): the daemon killed mid-upload (a sandbox of the
test's own) ends it with ConnectionLostError within a bound, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import anyio
from _helpers.faults import (
    KILL_BOUND,
    Failure,
    KillAt,
    assert_lost,
    ends_with_error,
    fill,
    nothing_left_behind,
)
from _helpers.volumes import MiB

import aiovirtstream as avs
from aiovirtstream.testing import Sandbox


async def test_kill_during_upload(sandbox: Sandbox, tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    source.touch()
    await anyio.to_thread.run_sync(fill, source, 256 * MiB)
    await sandbox.acreate_pool("pool")
    await sandbox.acreate_volume("pool", "up.img", 256 * MiB)
    kill = KillAt(sandbox.kill, 16 * MiB)

    async def scenario() -> Failure:
        conn = await avs.connect(sandbox.uri)
        try:
            vol = await avs.lookup_volume(conn, "up.img", pool="pool")
            return await ends_with_error(
                avs.upload(vol, source, progress=kill, progress_interval=0.005)
            )
        finally:
            await avs.aclose_connection(conn)

    async with nothing_left_behind():
        failure = await scenario()
    assert kill.at is not None, f"the upload ended before the kill: {failure}"
    assert_lost(failure, sandbox.uri)
    print(f"upload: kill to error {failure.at - kill.at:.3f} s")
    assert failure.at - kill.at < KILL_BOUND
