"""Wake-up latency: a peer's write to the handle callback, and a timer from add to firing.

Samples of the two implementations are taken in interleaved rounds. The
worker-armed timer row is informational: libvirtaio misses that wake-up,
so it runs a tenth of the samples there (each miss costs the cap).
"""

from __future__ import annotations

__all__ = ["fd_latency", "latency"]

import asyncio
import contextlib
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from time import perf_counter as perf

from ._hooks import IMPLS, READABLE, Hooks, LoopErrors, Outcome

LatencyRun = Callable[[Hooks, int], Awaitable[list[float]]]


async def fd_latency(h: Hooks, samples: int) -> list[float]:
    """Seconds from a peer's write (another thread) to the READABLE callback running."""
    a, b = socket.socketpair()
    a.setblocking(False)
    fired = threading.Event()
    stamp = [0.0]

    def on_readable(watch: int, fd: int, events: int, opaque: object) -> None:
        stamp[0] = perf()
        with contextlib.suppress(BlockingIOError):
            a.recv(4096)
        fired.set()

    def writer() -> list[float]:
        out = []
        for _ in range(samples):
            time.sleep(0.0002)  # the loop goes back to sleep in select()
            fired.clear()
            start = perf()
            b.send(b"x")
            out.append(stamp[0] - start if fired.wait(1.0) else math.inf)
        return out

    watch = h.add_handle(a.fileno(), READABLE, on_readable, None)
    try:
        await asyncio.sleep(0)
        return await asyncio.to_thread(writer)
    finally:
        h.remove_handle(watch)
        await h.drain()
        await asyncio.sleep(0)
        a.close()
        b.close()


async def timer_latency(h: Hooks, interval_ms: int, samples: int) -> list[float]:
    """Seconds from add_timeout(interval_ms) on the loop thread to the callback running."""
    loop = asyncio.get_running_loop()
    out = []
    for _ in range(samples):
        fired: asyncio.Future[float] = loop.create_future()

        def on_timer(timer: int, opaque: object, fired: asyncio.Future[float] = fired) -> None:
            now = perf()
            h.remove_timeout(timer)
            fired.set_result(now)

        start = perf()
        h.add_timeout(interval_ms, on_timer, None)
        out.append(await fired - start)
    await h.drain()
    return out


async def timer_from_thread_latency(h: Hooks, samples: int, cap: float) -> list[float]:
    """Seconds from update_timeout(0) in a worker thread to the callback; inf if over ``cap``."""
    fired = threading.Event()
    stamp = [0.0]

    def on_timer(timer: int, opaque: object) -> None:
        stamp[0] = perf()
        h.update_timeout(timer, -1)
        fired.set()

    def worker() -> list[float]:
        out = []
        for _ in range(samples):
            time.sleep(0.0002)
            fired.clear()
            start = perf()
            h.update_timeout(timer, 0)
            out.append(stamp[0] - start if fired.wait(cap) else math.inf)
        return out

    timer = h.add_timeout(-1, on_timer, None)
    try:
        return await asyncio.to_thread(worker)
    finally:
        await asyncio.sleep(0.01)
        h.remove_timeout(timer)
        await h.drain()


def latency_rows(quick: bool) -> list[tuple[str, LatencyRun, int, bool]]:
    """(label, run, samples per implementation, counts for the target)."""
    scale = 4 if quick else 1
    return [
        ("peer write -> handle callback", fd_latency, 3000 // scale, True),
        (
            "0 ms timer add -> fired (loop thread)",
            lambda h, n: timer_latency(h, 0, n),
            5000 // scale,
            True,
        ),
        (
            "1 ms timer add -> fired (loop thread)",
            lambda h, n: timer_latency(h, 1, n),
            1000 // scale,
            True,
        ),
        (
            "0 ms timer armed from worker -> fired",
            lambda h, n: timer_from_thread_latency(h, n, 0.02),
            200 // scale,
            False,
        ),
    ]


async def latency(
    rounds: int, quick: bool, errors: LoopErrors
) -> list[tuple[str, bool, dict[str, Outcome]]]:
    """Latency samples per row and implementation, rounds interleaved."""
    results = []
    for label, run, samples, counted in latency_rows(quick):
        outcomes = {name: Outcome() for name in IMPLS}
        per_round = max(1, samples // rounds)
        for _ in range(rounds):
            for name, make in IMPLS.items():
                if outcomes[name].errors:
                    continue
                errors.current = name
                n = per_round
                if not counted and name == "libvirtaio":
                    n = max(1, per_round // 10)  # each miss costs the cap
                try:
                    outcomes[name].values += await run(make(), n)
                except Exception as error:  # noqa: BLE001 - reported in the table
                    outcomes[name].failed(error)
        errors.hand_over(outcomes)
        results.append((label, counted, outcomes))
    return results
