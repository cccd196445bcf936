"""virsh as a contender: its command line, and the time its ``-t`` prints for the command."""

from __future__ import annotations

__all__ = ["virsh_argv", "virsh_seconds"]

import re
from pathlib import Path

_VIRSH_TIME = re.compile(r"\(Time: ([0-9.]+) ms\)")


def virsh_argv(
    uri: str, pool: str, op: str, vol: str, target: Path | str, sparse: bool
) -> list[str]:
    command = "vol-download" if op == "download" else "vol-upload"
    argv = ["virsh", "-t", "-q", "-c", uri, command, "--pool", pool, vol, str(target)]
    return argv + (["--sparse"] if sparse else [])


def virsh_seconds(output: str) -> float | None:
    """The command's time that ``virsh -t`` printed, in seconds (None: none printed)."""
    times = _VIRSH_TIME.findall(output)
    return float(times[-1]) / 1000 if times else None
