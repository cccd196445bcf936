"""What a child process measures about itself: RSS, threads, CPU and loop lag."""

from __future__ import annotations

__all__ = ["Footprint", "Ticker", "cpu_seconds", "percentile", "emit", "RESULT_PREFIX"]

import asyncio
import json
import resource
import threading
import time
from typing import Any

RESULT_PREFIX = "SCALE-RESULT "
TICK = 0.001


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of values; nan if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def cpu_seconds() -> float:
    """User + system CPU of every thread of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _status() -> dict[str, int]:
    fields: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                fields[key] = int(value.split()[0])
    return fields


class Footprint:
    """Peak RSS above the RSS at construction, and peak thread counts.

    A sampler thread reads ``/proc/self/status`` every ``interval`` seconds;
    the peak RSS is also taken from ``VmHWM``, reset at construction through
    ``/proc/self/clear_refs``, so a peak between two samples still counts.
    The sampler's own thread is left out of the counts.
    """

    def __init__(self, interval: float = 0.002) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
        except OSError:
            pass
        self.base_rss = _status()["VmRSS"] * 1024
        self.peak_rss = self.base_rss
        self.peak_threads = 0
        self.peak_py_threads = 0
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="footprint", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        fields = _status()
        self.peak_rss = max(self.peak_rss, fields["VmRSS"] * 1024, fields["VmHWM"] * 1024)
        self.peak_threads = max(self.peak_threads, fields["Threads"] - 1)
        self.peak_py_threads = max(self.peak_py_threads, threading.active_count() - 1)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {
            "rss_above": self.peak_rss - self.base_rss,
            "threads": self.peak_threads,
            "py_threads": self.peak_py_threads,
        }


class Ticker:
    """A task that sleeps 1 ms at a time on the running loop and records how late it wakes."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        prev = time.perf_counter()
        while not self._stop.is_set():
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            self.lags.append(now - prev - TICK)
            prev = now

    async def stop(self) -> dict[str, float]:
        self._stop.set()
        await self._task
        return {
            "lag_p50": percentile(self.lags, 50),
            "lag_p99": percentile(self.lags, 99),
            "lag_max": max(self.lags, default=float("nan")),
        }
