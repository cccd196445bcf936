"""Loop lag: a task that sleeps 1 ms at a time on the running loop and records how late it wakes.

Shared by the transfer and scale benchmarks' children.
"""

from __future__ import annotations

__all__ = ["TICK", "Ticker", "tick"]

import asyncio
import time

from benchmarks._probes import percentile

TICK = 0.001


async def tick(lags: list[float], stop: asyncio.Event, stamps: list[float] | None = None) -> None:
    """Sleep TICK at a time until ``stop`` is set; record each lag (in ``stamps``: when it came)."""
    prev = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(TICK)
        now = time.perf_counter()
        lags.append(now - prev - TICK)
        if stamps is not None:
            stamps.append(now)
        prev = now


class Ticker:
    """:func:`tick` as a task of the running loop, from construction to :meth:`stop`."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(tick(self.lags, self._stop))

    async def stop(self) -> dict[str, float]:
        self._stop.set()
        await self._task
        return {
            "lag_p50": percentile(self.lags, 50),
            "lag_p99": percentile(self.lags, 99),
            "lag_max": max(self.lags, default=float("nan")),
        }
