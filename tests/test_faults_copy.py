"""The fault suite for copy(): one daemon of a copy killed, frozen or cut off, the
copy cancelled, the destination stalled.

The faulted daemon is a sandbox of the test's own (or of this module, frozen
only); the other is the session's. The copy must end with the faulted side's
typed error, both streams ended, nothing left open or in a reference cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import libvirt
import pytest
from _helpers.faults import (
    KEEPALIVE,
    KEEPALIVE_BOUND,
    KILL_BOUND,
    Failure,
    KillAt,
    assert_lost,
    ends_with_error,
    fill,
    nothing_left_behind,
)
from _helpers.processes import Footprint, collector_off, left_behind, rss
from _helpers.spies import AdoptedStreams
from _helpers.volumes import MiB
from conftest import Hosts

import aiovirtstream as avs
import aiovirtstream._transfer._copy as copy_module
from aiovirtstream.testing import PoolInfo, Sandbox, TcpRelay

COPY_TIMEOUT = 20.0  # what _copy_between waits for a copy to fail


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


@pytest.mark.parametrize("fault", ["kill", "freeze", "cut"])
@pytest.mark.parametrize("side", ["source", "destination"])
async def test_fault_during_copy(
    sandbox: Sandbox,
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    monkeypatch: pytest.MonkeyPatch,
    side: str,
    fault: str,
) -> None:
    """One daemon of a copy killed, frozen or cut off mid-copy: that side's typed error.

    ``sandbox`` is the faulted daemon, the session's the other one. Both
    streams end before the error is raised (the faulted side's broken, the
    other aborted), the other connection stays usable, and the destination
    is left holding part of the data, not looking like a finished copy.
    """
    size = 256 * MiB
    faulted, faulted_pool = sandbox, "pool"
    peer, peer_pool = libvirt_sandbox, libvirt_pool.name
    src_sb, src_pool, dst_sb, dst_pool = (
        (faulted, faulted_pool, peer, peer_pool)
        if side == "source"
        else (peer, peer_pool, faulted, faulted_pool)
    )
    await faulted.acreate_pool(faulted_pool)
    source = await src_sb.acreate_volume(src_pool, "big.img", size)
    digest = await anyio.to_thread.run_sync(fill, source.path, size)
    dest = await dst_sb.acreate_volume(dst_pool, "copy.img", size)
    adopted = AdoptedStreams(monkeypatch)

    async def scenario(faulted_uri: str, at: KillAt) -> tuple[Failure, dict[str, str]]:
        keepalive = KEEPALIVE if fault == "freeze" else (5, 3)
        here = await avs.connect(faulted_uri, keepalive=keepalive)
        there = await avs.connect(peer.uri)
        src_conn, dst_conn = (here, there) if side == "source" else (there, here)
        try:
            src = await avs.lookup_volume(src_conn, "big.img", pool=src_pool)
            dst = await avs.lookup_volume(dst_conn, "copy.img", pool=dst_pool)
            failure = await ends_with_error(
                avs.copy(src, dst, sparse=False, progress=at, progress_interval=0.005)
            )
            states = adopted.states()
            peer_volume = "copy.img" if side == "source" else "big.img"
            await avs.lookup_volume(there, peer_volume, pool=peer_pool)  # still usable
            return failure, states
        finally:
            await avs.aclose_connection(here)
            await avs.aclose_connection(there)

    action: Callable[[], object]
    with contextlib.ExitStack() as undo:
        if fault == "cut":
            relay = undo.enter_context(TcpRelay("127.0.0.1", sandbox.tcp_port))
            faulted_uri, action = relay.uri_for(sandbox.tcp_uri), relay.cut
        elif fault == "freeze":
            faulted_uri, action = sandbox.uri, sandbox.freeze
            undo.callback(sandbox.thaw)
        else:
            faulted_uri, action = sandbox.uri, sandbox.kill
        at = KillAt(action)
        async with nothing_left_behind():
            failure, states = await scenario(faulted_uri, at)
    assert at.at is not None, f"the copy ended before the {fault}: {failure}"
    assert_lost(failure, faulted_uri, "keepalive" if fault == "freeze" else None)
    seconds = failure.at - at.at
    print(f"copy, {fault} at the {side}: {seconds:.3f} s to the error; streams {states}")
    if fault == "freeze":
        assert 2.0 < seconds < KEEPALIVE_BOUND
    else:
        assert seconds < KILL_BOUND
    other = "destination" if side == "source" else "source"
    assert states == {side: "broken", other: "aborted"}
    copied = await anyio.to_thread.run_sync(_sha256, dest.path)
    assert copied != digest, "the destination holds the whole source after a failed copy"


@pytest.fixture
def own_sandbox() -> Iterator[Sandbox]:
    """A sandbox of this test's own: it may be killed or frozen."""
    with Sandbox("storage") as sb:
        sb.create_pool("pool")
        yield sb


async def _copy_between(
    src_uri: str,
    src_pool: str,
    dst_uri: str,
    dst_pool: str,
    fault: KillAt,
    *,
    dst_keepalive: tuple[int, int] | None = (5, 3),
) -> tuple[type[BaseException], str, str | None, float]:
    """Copy ``big.img`` into ``copy.img``; (error type, message, uri, when) of its failure."""
    src_conn = await avs.connect(src_uri)
    dst_conn = await avs.connect(dst_uri, keepalive=dst_keepalive)
    try:
        src = await avs.lookup_volume(src_conn, "big.img", pool=src_pool)
        dst = await avs.lookup_volume(dst_conn, "copy.img", pool=dst_pool)
        try:
            with anyio.fail_after(COPY_TIMEOUT):
                await avs.copy(src, dst, progress=fault, progress_interval=0.005)
        except avs.AioVirtStreamError as error:
            return type(error), str(error), getattr(error, "uri", None), time.perf_counter()
        raise AssertionError("the copy ended without an error")
    finally:
        await avs.aclose_connection(src_conn)
        await avs.aclose_connection(dst_conn)


async def _big_source(sandbox: Sandbox, pool: str, size: int) -> None:
    info = await sandbox.acreate_volume(pool, "big.img", size)
    await anyio.to_thread.run_sync(fill, info.path, size)


async def test_source_killed(
    own_sandbox: Sandbox,
    other_sandbox: Sandbox,
    other_pool: PoolInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await _big_source(own_sandbox, "pool", 256 * MiB)
    await other_sandbox.acreate_volume(other_pool, "copy.img", 256 * MiB)
    adopted = AdoptedStreams(monkeypatch)
    kill = KillAt(own_sandbox.kill)
    with collector_off():
        baseline = Footprint.take()
        kind, message, uri, at = await _copy_between(
            own_sandbox.uri, "pool", other_sandbox.uri, other_pool.name, kill
        )
        assert kill.at is not None, f"the copy ended before the kill: {message}"
        assert issubclass(kind, avs.ConnectionLostError), f"{kind.__name__}: {message}"
        assert uri == own_sandbox.uri and own_sandbox.uri in message
        assert at - kill.at < 3.0
        assert adopted.states() == {"source": "broken", "destination": "aborted"}
        assert await left_behind(baseline) == {}


async def test_destination_killed(
    own_sandbox: Sandbox,
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await _big_source(libvirt_sandbox, libvirt_pool.name, 256 * MiB)
    await own_sandbox.acreate_volume("pool", "copy.img", 256 * MiB)
    adopted = AdoptedStreams(monkeypatch)
    kill = KillAt(own_sandbox.kill)
    with collector_off():
        baseline = Footprint.take()
        kind, message, uri, at = await _copy_between(
            libvirt_sandbox.uri, libvirt_pool.name, own_sandbox.uri, "pool", kill
        )
        assert kill.at is not None, f"the copy ended before the kill: {message}"
        assert issubclass(kind, avs.ConnectionLostError), f"{kind.__name__}: {message}"
        assert uri == own_sandbox.uri and own_sandbox.uri in message
        assert at - kill.at < 3.0
        assert adopted.states() == {"source": "aborted", "destination": "broken"}
        assert await left_behind(baseline) == {}


async def test_destination_frozen(
    own_sandbox: Sandbox, libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """The destination's keepalive gives up: its error, the source aborted."""
    await _big_source(libvirt_sandbox, libvirt_pool.name, 256 * MiB)
    await own_sandbox.acreate_volume("pool", "copy.img", 256 * MiB)
    freeze = KillAt(own_sandbox.freeze)
    try:
        kind, message, uri, at = await _copy_between(
            libvirt_sandbox.uri,
            libvirt_pool.name,
            own_sandbox.uri,
            "pool",
            freeze,
            dst_keepalive=KEEPALIVE,
        )
    finally:
        own_sandbox.thaw()
    assert freeze.at is not None, f"the copy ended before the freeze: {message}"
    assert issubclass(kind, avs.ConnectionLostError), f"{kind.__name__}: {message}"
    assert uri == own_sandbox.uri
    assert 2.0 < at - freeze.at < 10.0


class CancelAtStart:
    """A progress callback: at the first bytes copied, ``stall()``, then
    ``cancel(when)`` with ``when`` 50 ms later on the loop's clock."""

    def __init__(self, stall: Callable[[], object]) -> None:
        self.stall = stall
        self.cancel: Callable[[float], object] | None = None

    def __call__(self, progress: avs.TransferProgress) -> None:
        if progress.done_bytes and self.cancel is not None:
            cancel, self.cancel = self.cancel, None
            self.stall()
            cancel(asyncio.get_running_loop().time() + 0.05)


async def _cancelled_copy(
    how: str, src: libvirt.virStorageVol, dst: libvirt.virStorageVol, stall: Callable[[], object]
) -> None:
    """copy() cancelled ``how`` 50 ms after its first bytes (``stall()`` first): the
    cancellation must be seen as itself, before the copy ended."""
    at_start = CancelAtStart(stall)
    copying = avs.copy(src, dst, progress=at_start, progress_interval=0.001)
    if how == "task.cancel":
        task = asyncio.ensure_future(copying)

        def cancel(when: float) -> None:
            asyncio.get_running_loop().call_at(when, task.cancel)

        at_start.cancel = cancel
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        return
    deadline = anyio.fail_after if how == "fail_after" else anyio.move_on_after
    try:
        with deadline(30) as scope:
            at_start.cancel = functools.partial(setattr, scope, "deadline")
            await copying
        assert scope.cancelled_caught, "the copy ended before the cancellation"
    except TimeoutError as error:
        assert how == "fail_after"
        if sys.version_info >= (3, 12) and error.__context__ is not None:
            # fail_after's own generator frames (and, through their f_back, the
            # contextlib frame that holds the CancelledError) make a cycle with
            # the CancelledError it turned into TimeoutError: not the copy's.
            error.__context__.__traceback__ = None
    else:
        assert how == "move_on_after", "fail_after raised no TimeoutError"


@pytest.mark.parametrize("how", ["fail_after", "move_on_after", "task.cancel"])
async def test_cancelled(
    hosts: Hosts, other_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The cancellation as itself; both streams aborted; nothing left open or in a
    reference cycle (the garbage collector off), also with a send stuck in a frozen
    destination."""
    size = 256 * MiB
    await _big_source(hosts.src_sandbox, hosts.src_pool.name, size)
    await hosts.dest("copy.img", size)
    src, dst = await hosts.volumes("big.img", "copy.img")
    await avs.copy(src, dst, length=MiB)  # warm: worker threads exist before the baseline
    adopted = AdoptedStreams(monkeypatch)
    with collector_off():
        baseline = Footprint.take()
        for stall in (lambda: None, other_sandbox.freeze):
            try:
                await _cancelled_copy(how, src, dst, stall)
            finally:
                other_sandbox.thaw()
            assert adopted.states() == {"source": "aborted", "destination": "aborted"}
        assert await adopted.held() == 0, "a stream is held in a reference cycle"
        assert await left_behind(baseline) == {}


async def test_memory_stays_bounded_while_the_destination_stalls(
    own_sandbox: Sandbox, libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """A fast source, a destination frozen for a while: RSS grows by less than the budget."""
    size = 512 * MiB
    await _big_source(libvirt_sandbox, libvirt_pool.name, size)
    await own_sandbox.acreate_volume("pool", "copy.img", size)
    src_conn = await avs.connect(libvirt_sandbox.uri)
    dst_conn = await avs.connect(own_sandbox.uri)
    peak = 0
    stalled = anyio.Event()

    def progress(p: avs.TransferProgress) -> None:
        if p.done_bytes >= 64 * MiB and not stalled.is_set():
            own_sandbox.freeze()
            stalled.set()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss())
            await anyio.sleep(0.005)

    async def thaw_later() -> None:
        await stalled.wait()
        await anyio.sleep(2.0)
        own_sandbox.thaw()

    try:
        src = await avs.lookup_volume(src_conn, "big.img", pool=libvirt_pool.name)
        dst = await avs.lookup_volume(dst_conn, "copy.img", pool="pool")
        await avs.copy(src, dst, length=MiB)  # warm up: buffers and threads exist
        base = rss()
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                group.start_soon(sample)
                group.start_soon(thaw_later)
                result = await avs.copy(src, dst, progress=progress, progress_interval=0.005)
                group.cancel_scope.cancel()
    finally:
        own_sandbox.thaw()
        await avs.aclose_connection(src_conn)
        await avs.aclose_connection(dst_conn)
    assert stalled.is_set()
    assert result.total_bytes == size
    growth = peak - base
    print(f"RSS growth {growth / MiB:.1f} MiB (budget {copy_module.COPY_BUFFER / MiB:.0f} MiB)")
    assert growth < copy_module.COPY_BUFFER
