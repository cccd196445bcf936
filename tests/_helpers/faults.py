"""Faults and what they end: daemons killed, frozen or cut off mid-operation, the
typed error an operation must fail with, and the checks that nothing is left behind.

Each scenario of the fault tests opens and closes its connection inside a function
of its own, so that no volume, domain or stream of the test's frame keeps it open
when nothing_left_behind() compares the counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import libvirt

import aiovirtstream as avs
from _helpers.volumes import MiB
from aiovirtstream.testing import Sandbox, VolumeInfo

DENSE = 512 * MiB  # a dense download of this much takes long enough to be cut in the middle
KILL_BOUND = 3.0  # seconds from a daemon's death (or a cut) to the error; the issue wants 1
KEEPALIVE = (1, 3)  # gives up on a frozen daemon after about 1 * (3 + 1) s
KEEPALIVE_BOUND = 10.0
HARD_TIMEOUT = 10.0  # nothing here may wait longer than this for an error
MAX_LOOP_GAP = 0.2


@contextlib.contextmanager
def daemon_stopped(sandbox: Sandbox) -> Iterator[None]:
    """SIGSTOP the (shared) daemon for the block; SIGCONT is sent whatever happens."""
    os.kill(sandbox.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(sandbox.pid, signal.SIGCONT)


def fill(path: Path, size: int) -> str:
    """Write ``size`` bytes of data (a distinct MiB each) into ``path``; their SHA-256."""
    block = bytearray(os.urandom(MiB))
    digest = hashlib.sha256()
    with open(path, "r+b") as f:
        for index in range(size // MiB):
            block[:8] = index.to_bytes(8, "little")
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


async def dense_volume(
    sb: Sandbox, name: str, size: int = DENSE, pool: str = "pool"
) -> tuple[VolumeInfo, str]:
    """A volume whose every byte is data (in the page cache, so it streams fast)."""
    with contextlib.suppress(avs.AioVirtStreamError):
        await sb.acreate_pool(pool)
    info = await sb.acreate_volume(pool, name, size)
    return info, await anyio.to_thread.run_sync(fill, info.path, size)


@dataclass(frozen=True)
class Failure:
    """What an operation failed with, without the exception (its traceback holds streams)."""

    kind: type[BaseException]
    message: str
    uri: str | None
    reason: str | None
    at: float  # time.perf_counter() when it was raised


async def ends_with_error(operation: Awaitable[object]) -> Failure:
    """Await ``operation``, which must fail with one of our errors within HARD_TIMEOUT."""
    try:
        with anyio.fail_after(HARD_TIMEOUT):
            await operation
    except avs.AioVirtStreamError as error:
        return Failure(
            type(error),
            str(error),
            getattr(error, "uri", None),
            getattr(error, "reason", None),
            time.perf_counter(),
        )
    except TimeoutError:
        raise AssertionError(f"still waiting {HARD_TIMEOUT:g} s after the fault") from None
    raise AssertionError("the operation ended without an error")


def failing(operation: Awaitable[object]) -> asyncio.Future[Failure]:
    """:func:`ends_with_error` in a task of its own."""
    return asyncio.ensure_future(ends_with_error(operation))


def assert_lost(failure: Failure, uri: str, reason: str | None = None) -> None:
    """The error a lost connection must give: typed, naming the host."""
    assert issubclass(failure.kind, avs.ConnectionLostError), (
        f"{failure.kind.__name__}: {failure.message}"
    )
    assert failure.uri == uri
    assert uri in failure.message, f"the message does not name {uri}: {failure.message}"
    if reason is not None:
        assert failure.reason == reason, failure.reason
    print(f"{failure.kind.__name__}: {failure.message}")


def _counts() -> tuple[int, int, int, int]:
    s = avs.get_event_impl().stats()
    return (s.watches, s.fds, s.timers, s.pending_frees)


@contextlib.asynccontextmanager
async def nothing_left_behind() -> AsyncIterator[None]:
    """The block's connections must release every watch and timer without the cyclic GC.

    The block closes its connections (``aclose_connection``); the counts
    must then be back at their values from before, with ``gc`` disabled
    throughout: a reference cycle would keep a connection open.
    """
    gc.collect()
    impl = avs.bind_event_loop()
    await impl.wait_frees()
    before = _counts()
    gc.disable()
    try:
        yield
        await impl.wait_frees()
        await asyncio.sleep(0)
        after = _counts()
        alive = sorted(
            type(o).__name__
            for o in gc.get_objects()
            if isinstance(o, avs.AsyncStream | libvirt.virStream | libvirt.virConnect)
        )
        assert after == before, f"watches, fds, timers, frees {after} != {before}; alive: {alive}"
    finally:
        gc.enable()


class Ticker:
    """A task that sleeps 5 ms at a time and records its largest lateness (the loop's lag)."""

    def __init__(self) -> None:
        self.largest = 0.0
        self.ticks = 0

    async def run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            self.largest = max(self.largest, time.perf_counter() - before - 0.005)
            self.ticks += 1


class KillAt:
    """A progress callback that runs ``fault`` once ``threshold`` bytes were moved."""

    def __init__(self, fault: Callable[[], object], threshold: int = 32 * MiB) -> None:
        self.fault = fault
        self.threshold = threshold
        self.at: float | None = None

    def __call__(self, progress: avs.TransferProgress) -> None:
        if self.at is None and progress.done_bytes >= self.threshold:
            self.fault()
            self.at = time.perf_counter()
