"""What a benchmark measures about a process: its CPU, resource usage and RSS.

Shared by the benchmarks' child processes and their parents. It imports no
asyncio: a child that runs no loop (the transfer benchmark's blocking
contender) stays as small as it was.
"""

from __future__ import annotations

__all__ = [
    "cpu_seconds",
    "emit",
    "percentile",
    "proc_status",
    "process_cpu_seconds",
    "reset_peak_rss",
    "status_bytes",
    "usage",
    "usage_delta",
]

import json
import os
import resource
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of values; nan if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def usage() -> resource.struct_rusage:
    """This process's resource usage so far, every thread of it."""
    return resource.getrusage(resource.RUSAGE_SELF)


def cpu_seconds() -> float:
    """User + system CPU of every thread of this process so far."""
    now = usage()
    return now.ru_utime + now.ru_stime


def usage_delta(before: resource.struct_rusage) -> dict[str, Any]:
    """An operation's CPU (user, total), page faults and context switches since ``before``.

    The faults and switches show where system time goes: a fault per new
    page, a switch per thread hand-off or wait.
    """
    after = usage()
    return {
        "op_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "op_user_s": after.ru_utime - before.ru_utime,
        "op_minflt": after.ru_minflt - before.ru_minflt,
        "op_nvcsw": after.ru_nvcsw - before.ru_nvcsw,
        "op_nivcsw": after.ru_nivcsw - before.ru_nivcsw,
    }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of another process so far, from /proc; nan if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def proc_status(*keys: str) -> dict[str, int]:
    """These fields of /proc/self/status as numbers (sizes in kB); absent ones left out."""
    fields: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in keys:
                fields[key] = int(value.split()[0])
    return fields


def status_bytes(key: str) -> int:
    """A kB field of /proc/self/status (``VmRSS``, ``VmHWM``), in bytes; 0 if absent."""
    return proc_status(key).get(key, 0) * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def emit(result: dict[str, Any], prefix: str) -> None:
    """Hand a child's figures to its parent: one line of stdout, ``prefix`` then JSON."""
    print(prefix + json.dumps(result), flush=True)
