"""Hook throughput: add/update/remove of handles and timers, from the loop's thread and a worker's.

libvirt calls the hooks from whichever thread makes a blocking call, so
every workload runs from both. Rounds of the two implementations are
interleaved; each round is sized to last about ROUND_SECONDS.
"""

from __future__ import annotations

__all__ = [
    "THROUGHPUT_ROWS",
    "Workload",
    "handle_cycle",
    "throughput",
    "timed_round",
    "timer_cycle",
]

import asyncio
import socket
from collections.abc import Callable
from time import perf_counter as perf
from typing import Protocol

from ._hooks import IMPLS, READABLE, WRITABLE, Hooks, LoopErrors, Outcome, Rows, handle_cb, timer_cb

ROUND_SECONDS = 0.15  # one timed batch of hook calls

Workload = Callable[[Hooks, int, int], int]


class WorkerProfile(Protocol):
    """Profiles a workload run in a worker thread (``--profile``)."""

    def wrap_worker(self, workload: Workload) -> Workload: ...


def handle_cycle(h: Hooks, fd: int, n: int) -> int:
    """n x (add READABLE, widen to READABLE|WRITABLE, narrow back, remove); returns hook calls."""
    add, update, remove = h.add_handle, h.update_handle, h.remove_handle
    for _ in range(n):
        watch = add(fd, READABLE, handle_cb, None)
        update(watch, READABLE | WRITABLE)
        update(watch, READABLE)
        remove(watch)
    return 4 * n


def timer_cycle(h: Hooks, fd: int, n: int) -> int:
    """n x (add disabled, arm at 1 s, disable, remove); returns hook calls."""
    add, update, remove = h.add_timeout, h.update_timeout, h.remove_timeout
    for _ in range(n):
        timer = add(-1, timer_cb, None)
        update(timer, 1000)
        update(timer, -1)
        remove(timer)
    return 4 * n


def watch_toggle(h: Hooks, fd: int, n: int) -> int:
    """n x the two updates libvirt makes around every blocking call (socket watch off, on)."""
    update = h.update_handle
    watch = h.add_handle(fd, READABLE, handle_cb, None)
    for _ in range(n):
        update(watch, 0)
        update(watch, READABLE)
    h.remove_handle(watch)
    return 2 * n + 2


THROUGHPUT_ROWS: list[tuple[str, Workload, bool]] = [
    ("handles add/update x2/remove, loop thread", handle_cycle, False),
    ("handles add/update x2/remove, worker thread", handle_cycle, True),
    ("timers add/update x2/remove, loop thread", timer_cycle, False),
    ("timers add/update x2/remove, worker thread", timer_cycle, True),
    ("socket watch off/on (blocking call), loop", watch_toggle, False),
    ("socket watch off/on (blocking call), worker", watch_toggle, True),
]


async def timed_round(
    h: Hooks, workload: Workload, n: int, threaded: bool, profiles: WorkerProfile | None = None
) -> float:
    """Hook calls per second of one batch, deferred frees included."""
    a, b = socket.socketpair()
    try:
        run = workload
        if profiles is not None:
            run = profiles.wrap_worker(workload) if threaded else workload
        start = perf()
        if threaded:
            calls = await asyncio.to_thread(run, h, a.fileno(), n)
        else:
            calls = run(h, a.fileno(), n)
        async with asyncio.timeout(10):
            await h.drain()
        elapsed = perf() - start
    finally:
        for _ in range(3):  # let loop-side syncs of this fd run before it closes
            await asyncio.sleep(0)
        a.close()
        b.close()
    return calls / elapsed


async def throughput(rounds: int, errors: LoopErrors) -> Rows:
    """Median-worthy rates per row and implementation, rounds interleaved."""
    results = []
    for label, workload, threaded in THROUGHPUT_ROWS:
        outcomes = {name: Outcome() for name in IMPLS}
        sizes: dict[str, int] = {}
        for name, make in IMPLS.items():  # calibrate: a round of about ROUND_SECONDS
            errors.current = name
            try:
                rate = await timed_round(make(), workload, 300, threaded)
                sizes[name] = max(300, int(rate * ROUND_SECONDS / 4))
            except Exception as error:  # noqa: BLE001 - reported in the table
                outcomes[name].failed(error)
        for _ in range(rounds):
            for name, make in IMPLS.items():
                if name not in sizes or outcomes[name].errors:
                    continue
                errors.current = name
                try:
                    rate = await timed_round(make(), workload, sizes[name], threaded)
                    outcomes[name].values.append(rate)
                except Exception as error:  # noqa: BLE001 - reported in the table
                    outcomes[name].failed(error)
        errors.hand_over(outcomes)
        results.append((label, threaded, outcomes))
    return results
