"""What the host gave the run: steal time, page-cache write speed, Python speed, versions.

On a VM these move between sessions and within one, and every contender's
figures with them; the run prints them before its table.
"""

from __future__ import annotations

__all__ = ["cpu_times", "machine_summary", "page_cache_rates", "python_ns_per_step"]

import os
import sys
import time
from pathlib import Path

MiB = 1 << 20


def cpu_times() -> tuple[float, float]:
    """(all CPU time, steal time) of the machine so far, in seconds, from /proc/stat.

    Steal is time the hypervisor ran something else while this VM wanted
    to run: a busy host makes every figure of the run vary more.
    """
    try:
        with open("/proc/stat") as stat_file:
            fields = [int(x) for x in stat_file.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    steal = fields[7] if len(fields) > 7 else 0
    return sum(fields[:8]) / ticks, steal / ticks


def _steal_percent(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The share of the CPU time between two :func:`cpu_times` that the host took."""
    total = after[0] - before[0]
    return 100 * (after[1] - before[1]) / total if total > 0 else float("nan")


def page_cache_rates(work: Path, size: int = 128 * MiB) -> tuple[float, float]:
    """(MiB/s writing a new file, MiB/s rewriting it in place): the host's share.

    Every download writes new page-cache pages. On a VM that hands free
    memory back to its host (free page reporting), each new page costs the
    host a fault, and writing a new file is many times slower than rewriting
    cached pages, by a factor that varies between runs. Downloads of every
    contender pay it, and it makes their times vary together.
    """
    path = work / "page-cache-probe"
    block = os.urandom(MiB)
    rates = []
    try:
        for flags in (os.O_CREAT | os.O_TRUNC, 0):
            fd = os.open(path, os.O_WRONLY | flags, 0o600)
            try:
                start = time.perf_counter()
                for _ in range(size // MiB):
                    os.write(fd, block)
                rates.append(size / MiB / (time.perf_counter() - start))
            finally:
                os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    return rates[0], rates[1]


def python_ns_per_step(steps: int = 2_000_000) -> float:
    """Nanoseconds per step of a plain Python loop: how fast the host runs Python now.

    Our transfers run more Python than the C contenders do, so their ratios
    move with it. Steal time does not show it: at the same steal, the host
    can run Python at different speeds from one session to the next.
    """
    best = float("inf")
    for _ in range(3):
        total, start = 0, time.perf_counter()
        for step in range(steps):
            total += step
        best = min(best, time.perf_counter() - start)
    return best / steps * 1e9


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def _libvirt_version() -> str:
    import libvirt

    version = libvirt.getVersion()
    return f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"


def machine_summary(
    started: float,
    cpu_times0: tuple[float, float],
    parallel: int | None,
    page_cache: list[tuple[float, float]],
    python_speed: list[float],
) -> str:
    """The lines before the report: versions, time, steal, page-cache and Python speed.

    ``started``: the run's perf_counter at the start; ``cpu_times0``: its
    :func:`cpu_times`; the rates and speeds: before and after the rounds.
    """
    return "\n".join(
        [
            f"python {sys.version.split()[0]}, libvirt-python {_dist_version('libvirt-python')}, "
            f"libvirt {_libvirt_version()}, {os.cpu_count()} CPUs; caches warm; "
            f"aiovirtstream downloads with parallel={parallel or 'auto'}; "
            f"{time.perf_counter() - started:.0f} s in all; "
            f"{_steal_percent(cpu_times0, cpu_times()):.1f} % of the CPU time stolen by the host",
            "writing new page-cache pages: "
            + " / ".join(f"{new:.0f}" for new, _ in page_cache)
            + " MiB/s; rewriting cached ones: "
            + " / ".join(f"{old:.0f}" for _, old in page_cache)
            + " MiB/s (before / after the rounds; every download writes new pages)",
            "python speed: "
            + " / ".join(f"{ns:.0f}" for ns in python_speed)
            + " ns per loop step (before / after the rounds; the host's CPU for interpreted code)",
        ]
    )
