"""What a scale child measures about itself besides CPU and loop lag: its RSS and threads."""

from __future__ import annotations

__all__ = ["Footprint", "RESULT_PREFIX"]

import threading
from typing import Any

from benchmarks._probes import proc_status, reset_peak_rss

RESULT_PREFIX = "SCALE-RESULT "


def _status() -> dict[str, int]:
    return proc_status("VmRSS", "VmHWM", "Threads")


class Footprint:
    """Peak RSS above the RSS at construction, and peak thread counts.

    A sampler thread reads ``/proc/self/status`` every ``interval`` seconds;
    the peak RSS is also taken from ``VmHWM``, reset at construction through
    ``/proc/self/clear_refs``, so a peak between two samples still counts.
    The sampler's own thread is left out of the counts.
    """

    def __init__(self, interval: float = 0.002) -> None:
        reset_peak_rss()
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
