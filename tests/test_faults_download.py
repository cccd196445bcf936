"""The fault suite for download(): a daemon killed, frozen or cut off mid-download,
one daemon of two lost, the destination disk full (real daemons).

Each test that crashes (SIGKILL), hangs (SIGSTOP) or cuts off a daemon runs
its own sandbox, never the session's. Every pending operation must end with
a typed error naming the host, within a bound, leaving no file, watch, timer
or reference cycle behind. Reads that wait are bounded by ``fail_after``:
a regression fails here instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from _helpers.faults import (
    HARD_TIMEOUT,
    KEEPALIVE,
    KEEPALIVE_BOUND,
    KILL_BOUND,
    MAX_LOOP_GAP,
    Failure,
    KillAt,
    Ticker,
    assert_lost,
    dense_volume,
    ends_with_error,
    failing,
    fill,
    nothing_left_behind,
)
from _helpers.volumes import MiB

import aiovirtstream as avs
from aiovirtstream.testing import Sandbox, TcpRelay

# ---------------------------------------------------------------- daemon killed


@pytest.mark.parametrize("parallel", [1, 2])
async def test_kill_during_download(sandbox: Sandbox, tmp_path: Path, parallel: int) -> None:
    await dense_volume(sandbox, "dense.img")
    kill = KillAt(sandbox.kill)

    async def scenario() -> Failure:
        conn = await avs.connect(sandbox.uri)
        try:
            vol = await avs.lookup_volume(conn, "dense.img", pool="pool")
            return await ends_with_error(
                avs.download(
                    vol,
                    tmp_path / "copy.img",
                    parallel=parallel,
                    progress=kill,
                    progress_interval=0.005,
                )
            )
        finally:
            await avs.aclose_connection(conn)

    async with nothing_left_behind():
        failure = await scenario()
    assert kill.at is not None, f"the download ended before the kill: {failure}"
    assert_lost(failure, sandbox.uri, "eof")
    print(f"download, {parallel} stream(s): kill to error {failure.at - kill.at:.3f} s")
    assert failure.at - kill.at < KILL_BOUND
    assert list(tmp_path.iterdir()) == [], "a destination or temporary file was left"


# ---------------------------------------------------------------- daemon frozen


async def test_freeze_with_keepalive(sandbox: Sandbox, tmp_path: Path) -> None:
    """A download and a pending read fail when keepalive gives up; the loop never stalls."""
    await dense_volume(sandbox, "a.img")
    await dense_volume(sandbox, "b.img", 64 * MiB)
    freeze = KillAt(sandbox.freeze)

    async def scenario() -> tuple[Failure, Failure]:
        conn = await avs.connect(sandbox.uri, keepalive=KEEPALIVE)
        try:
            vol_a = await avs.lookup_volume(conn, "a.img", pool="pool")
            vol_b = await avs.lookup_volume(conn, "b.img", pool="pool")
            async with await avs.open_volume_download(vol_b) as stream:
                assert await stream.read(MiB)

                async def read_on() -> None:
                    while await stream.read(MiB):
                        pass

                downloading = failing(
                    avs.download(
                        vol_a, tmp_path / "a.img", progress=freeze, progress_interval=0.005
                    )
                )
                reading = failing(read_on())
                return await downloading, await reading
        finally:
            await avs.aclose_connection(conn)

    ticker = Ticker()
    ticking = asyncio.ensure_future(ticker.run())
    try:
        async with nothing_left_behind():
            failures = await scenario()
    finally:
        sandbox.thaw()
        ticking.cancel()
    assert freeze.at is not None, f"the download ended before the freeze: {failures[0]}"
    for what, failure in zip(["download", "pending read"], failures, strict=True):
        assert_lost(failure, sandbox.uri, "keepalive")
        print(f"{what}: freeze to error {failure.at - freeze.at:.3f} s")
        assert 2.0 < failure.at - freeze.at < KEEPALIVE_BOUND
    print(f"largest loop gap {ticker.largest * 1000:.1f} ms over {ticker.ticks} ticks")
    assert ticker.ticks > 100
    assert ticker.largest < MAX_LOOP_GAP
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- network cut


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
async def test_tcp_cut_during_download(sandbox: Sandbox, tmp_path: Path) -> None:
    """A loopback connection cut mid-transfer: its download and its slow reader both fail."""
    await dense_volume(sandbox, "dense.img")
    await dense_volume(sandbox, "small.img", 64 * MiB)
    dest = tmp_path / "dest"
    dest.mkdir()

    async def scenario(uri: str, cut: KillAt) -> tuple[Failure, Failure]:
        conn = await avs.connect(uri)
        try:
            vol = await avs.lookup_volume(conn, "dense.img", pool="pool")
            small = await avs.lookup_volume(conn, "small.img", pool="pool")
            async with await avs.open_volume_download(small) as stream:
                assert await stream.read(MiB)

                async def read_slowly() -> None:
                    while await stream.read(MiB):
                        await asyncio.sleep(0.01)

                reading = failing(read_slowly())
                download = await ends_with_error(
                    avs.download(
                        vol, dest / "copy.img", parallel=2, progress=cut, progress_interval=0.005
                    )
                )
                return download, await reading
        finally:
            await avs.aclose_connection(conn)

    with TcpRelay("127.0.0.1", sandbox.tcp_port) as relay:
        uri = relay.uri_for(sandbox.tcp_uri)
        cut = KillAt(relay.cut)
        async with nothing_left_behind():
            failures = await scenario(uri, cut)
    assert cut.at is not None, f"the download ended before the cut: {failures[0]}"
    for what, failure in zip(["download", "slow read"], failures, strict=True):
        assert_lost(failure, uri)
        print(f"{what} over TCP: cut to error {failure.at - cut.at:.3f} s")
        assert failure.at - cut.at < KILL_BOUND
    assert list(dest.iterdir()) == []
    with sandbox.connect(tcp=True) as direct:
        assert direct.getLibVersion() > 0, "the daemon itself is unharmed"


# ---------------------------------------------------------------- several connections


async def test_only_the_lost_connections_streams_fail(sandbox: Sandbox, tmp_path: Path) -> None:
    """Two daemons, three connections: one daemon dies mid-transfer, the other's end well."""
    await dense_volume(sandbox, "lost.img")
    with Sandbox("storage") as other:
        _, digest = await dense_volume(other, "kept.img", 256 * MiB)

        async def scenario() -> tuple[Failure, avs.TransferResult, str]:
            lost = await avs.connect(sandbox.uri)
            kept = await avs.connect(other.uri)
            kept_too = await avs.connect(other.uri)
            try:
                lost_vol = await avs.lookup_volume(lost, "lost.img", pool="pool")
                kept_vol = await avs.lookup_volume(kept, "kept.img", pool="pool")
                kept_vol_too = await avs.lookup_volume(kept_too, "kept.img", pool="pool")
                kept_running = KillAt(lambda: None, 8 * MiB)
                kill = KillAt(sandbox.kill, 8 * MiB)

                async def read_slowly() -> str:
                    sha = hashlib.sha256()
                    async with await avs.open_volume_download(kept_vol_too) as stream:
                        while chunk := await stream.read(MiB):
                            sha.update(chunk)
                            await asyncio.sleep(0.001)
                    return sha.hexdigest()

                reading = asyncio.ensure_future(read_slowly())
                keeping = asyncio.ensure_future(
                    avs.download(
                        kept_vol,
                        tmp_path / "kept.img",
                        checksum=True,
                        progress=kept_running,
                        progress_interval=0.005,
                    )
                )
                with anyio.fail_after(HARD_TIMEOUT):
                    while kept_running.at is None:
                        await asyncio.sleep(0.001)
                failure = await ends_with_error(
                    avs.download(
                        lost_vol, tmp_path / "lost.img", progress=kill, progress_interval=0.005
                    )
                )
                assert not keeping.done(), "the other download ended before the kill"
                with anyio.fail_after(60):
                    return failure, await keeping, await reading
            finally:
                for conn in (lost, kept, kept_too):
                    await avs.aclose_connection(conn)

        async with nothing_left_behind():
            failure, result, read_digest = await scenario()
    assert_lost(failure, sandbox.uri, "eof")
    assert result.sha256 == digest, "the other daemon's download was harmed"
    assert read_digest == digest, "the other daemon's stream was harmed"
    assert (tmp_path / "kept.img").stat().st_size == 256 * MiB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.img"]


# ---------------------------------------------------------------- destination disk full


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted for the test (root only: skipped loudly otherwise, never in CI)."""
    if os.geteuid() != 0:
        message = "DISK-FULL TEST NEEDS ROOT to mount a small tmpfs"
        if _in_ci():
            pytest.fail(f"{message}, and CI=true: it must run there", pytrace=False)
        pytest.skip(f"{message}; it runs in CI")
    folder = tmp_path / "small"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


async def fill_a_small_disk(
    sandbox: Sandbox, small_disk: Path, tmp_path: Path
) -> tuple[Failure, str | None, str]:
    """Download 32 MiB into the 8 MiB disk, then 4 MiB to tmp_path over the same connection.

    Returns the first download's failure, the second's SHA-256 and the
    expected one.
    """
    pool = await sandbox.acreate_pool(f"diskfull-{small_disk.parent.name}")
    try:
        big = await sandbox.acreate_volume(pool, "big.img", 32 * MiB)
        await anyio.to_thread.run_sync(fill, big.path, 32 * MiB)
        small = await sandbox.acreate_volume(pool, "small.img", 4 * MiB)
        small_digest = await anyio.to_thread.run_sync(fill, small.path, 4 * MiB)
        conn = await avs.connect(sandbox.uri)
        try:
            vol = await avs.lookup_volume(conn, "big.img", pool=pool.name)
            failure = await ends_with_error(avs.download(vol, small_disk / "big.img"))
            again = await avs.lookup_volume(conn, "small.img", pool=pool.name)
            result = await avs.download(again, tmp_path / "small.img", checksum=True)
            return failure, result.sha256, small_digest
        finally:
            await avs.aclose_connection(conn)
    finally:
        await sandbox.adelete_pool(pool)


async def test_destination_disk_full(
    libvirt_sandbox: Sandbox, small_disk: Path, tmp_path: Path
) -> None:
    """32 MiB into 8 MiB: a typed error naming the file, nothing left, the connection usable."""
    failure, digest, expected = await fill_a_small_disk(libvirt_sandbox, small_disk, tmp_path)
    dest = small_disk / "big.img"
    print(f"{failure.kind.__name__}: {failure.message}")
    assert issubclass(failure.kind, avs.TransferError), f"{failure.kind}: {failure.message}"
    assert str(dest) in failure.message, f"the message does not name the file: {failure.message}"
    assert "no space left" in failure.message.lower(), failure.message
    assert list(small_disk.iterdir()) == [], "a partial file was left on the full disk"
    assert digest == expected, "the connection is not usable after the error"


async def test_destination_disk_full_leaves_no_cycle(
    libvirt_sandbox: Sandbox, small_disk: Path, tmp_path: Path
) -> None:
    async with nothing_left_behind():
        await fill_a_small_disk(libvirt_sandbox, small_disk, tmp_path)
