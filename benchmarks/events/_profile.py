"""``--profile``: where aiovirtstream's time goes in each throughput row and in the fd wake-up."""

from __future__ import annotations

__all__ = ["ProfilePair", "profile_ours"]

import cProfile
import io
import pstats

from ._hooks import Hooks, make_ours
from ._latency import fd_latency
from ._throughput import THROUGHPUT_ROWS, Workload, timed_round


class ProfilePair:
    """cProfile of the loop thread and of the worker thread of one run."""

    def __init__(self) -> None:
        self.loop = cProfile.Profile()
        self.worker = cProfile.Profile()

    def wrap_worker(self, workload: Workload) -> Workload:
        def run(h: Hooks, fd: int, n: int) -> int:
            self.worker.enable()
            try:
                return workload(h, fd, n)
            finally:
                self.worker.disable()

        return run

    def report(self, top: int) -> str:
        parts = []
        for title, prof in (("loop thread", self.loop), ("worker thread", self.worker)):
            if not prof.getstats():
                continue
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
            lines = [line for line in buf.getvalue().splitlines() if line.strip()]
            start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
            parts.append(f"  [{title}]\n" + "\n".join("    " + line for line in lines[start:]))
        return "\n".join(parts)


async def profile_ours(quick: bool) -> None:
    """Print aiovirtstream's profile of each throughput row and of the fd wake-up."""
    for label, workload, threaded in THROUGHPUT_ROWS:
        pair = ProfilePair()
        pair.loop.enable()
        try:
            await timed_round(make_ours(), workload, 5000 if quick else 20000, threaded, pair)
        finally:
            pair.loop.disable()
        print(f"\n--- profile (aiovirtstream): {label}\n{pair.report(10)}")
    pair = ProfilePair()
    pair.loop.enable()
    try:
        await fd_latency(make_ours(), 500)
    finally:
        pair.loop.disable()
    print(f"\n--- profile (aiovirtstream): peer write -> handle callback\n{pair.report(10)}")
