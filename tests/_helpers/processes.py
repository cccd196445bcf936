"""What a process holds and uses (memory, CPU, fds, busy threads, leftovers of a
transfer), scripts run in a process of their own, and what a sandbox leaves behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiovirtstream as avs


def rss(pid: int | None = None) -> int:
    """A process's resident memory, in bytes (this process's by default)."""
    with open(f"/proc/{pid or 'self'}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_read_bytes(pid: int) -> int:
    """Bytes process ``pid`` has read so far (``rchar``: files and sockets), from /proc."""
    with open(f"/proc/{pid}/io") as io:
        for line in io:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError(f"no rchar in /proc/{pid}/io")


def fd_count() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def busy_worker_threads() -> list[str]:
    """The worker threads (aiovirtstream's, anyio's, asyncio's) not idle in their pool.

    An idle pool thread waits for work in its queue's ``get``: at the top of
    ``concurrent.futures``' ``_worker`` (a C ``SimpleQueue``), or inside a
    ``queue.Queue.get`` (anyio's worker threads).
    """
    frames = sys._current_frames()
    busy = []
    for thread in threading.enumerate():
        if not thread.name.startswith(("aiovirtstream-io", "AnyIO worker", "asyncio_")):
            continue
        frame = frames.get(thread.ident or -1)
        if frame is None or frame.f_code.co_name == "_worker":
            continue
        while frame is not None and not (
            frame.f_code.co_name == "get" and frame.f_code.co_filename.endswith("queue.py")
        ):
            frame = frame.f_back
        if frame is None:
            busy.append(thread.name)
    frames.clear()  # it holds this frame: no cycle
    return busy


@dataclass(frozen=True)
class Footprint:
    """What a process holds that a finished transfer must give back."""

    fds: int
    watches: int
    timers: int
    timers_enabled: int
    busy_threads: tuple[str, ...]
    part_files: tuple[str, ...]

    @classmethod
    def take(cls, folder: Path | None = None) -> Footprint:
        stats = avs.get_event_impl().stats()
        parts = sorted(p.name for p in folder.glob(".*.part")) if folder is not None else []
        return cls(
            fd_count(),
            stats.watches,
            stats.timers,
            stats.timers_enabled,
            tuple(busy_worker_threads()),
            tuple(parts),
        )

    def beyond(self, baseline: Footprint) -> dict[str, object]:
        """What this footprint holds beyond ``baseline`` (empty: nothing)."""
        more: dict[str, object] = {}
        for name in ("fds", "watches", "timers", "timers_enabled"):
            if getattr(self, name) > getattr(baseline, name):
                more[name] = (getattr(baseline, name), getattr(self, name))
        if self.busy_threads:
            more["busy_threads"] = self.busy_threads
        if self.part_files:
            more["part_files"] = self.part_files
        return more


async def left_behind(
    baseline: Footprint, folder: Path | None = None, *, collect: bool = False
) -> dict[str, object]:
    """What is held beyond ``baseline`` once 3 s have passed (empty: nothing).

    Aborts finish in worker threads and libvirt frees a stream's timer a
    little later: what is left behind is what is still there after the wait.
    ``collect``: if something is, run the garbage collector and wait again
    (``anyio.fail_after`` keeps the error it replaces in a reference cycle on
    Python 3.12+, and with it what the cancelled frames held).
    """
    deadline = time.monotonic() + 3
    while True:
        more = Footprint.take(folder).beyond(baseline)
        if not more or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.002)
    if more and collect:
        print(f"\nheld until the garbage collector ran: {more}")
        gc.collect()
        return await left_behind(baseline, folder)
    return more


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """The cyclic garbage collector off for the block, after one collection:
    what a reference cycle made in the block holds stays held, for the
    block's checks (:func:`left_behind`) to see."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def run_script(source: str, folder: Path, timeout: float = 60) -> str:
    """Run ``source`` in a fresh Python process (in ``folder``); what it printed.

    For what would hang the test process itself: a deadlock fails the test
    as a timeout instead.
    """
    done = subprocess.run(
        [sys.executable, "-W", "ignore::ResourceWarning", "-c", source],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def processes_mentioning(text: str) -> list[int]:
    """Live processes (but this one) whose command line or environment contains text."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{entry}/{name}").read_bytes()
            except OSError:
                continue
            if text.encode() in data and alive(int(entry)):
                found.append(int(entry))
                break
    return found


def assert_cleaned_up(path: Path, pid: int, user: str) -> None:
    assert not alive(pid), f"libvirtd {pid} still runs"
    pgrep = subprocess.run(["pgrep", "-u", user, "-f", str(path)], capture_output=True, text=True)
    assert pgrep.returncode == 1, f"processes of {user} still mention {path}: {pgrep.stdout}"
    assert processes_mentioning(str(path)) == []
    assert not path.exists()
