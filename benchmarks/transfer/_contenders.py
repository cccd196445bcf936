"""Who moves the bytes (the contenders), what they move (a group) and what one run yields.

A group is one workload and direction; every contender of a group moves
the same bytes. Besides the five contenders of every group, downloads also
run ours through the page cache (and with ``--fsync`` durable), and the
sparse upload runs ours into a volume that holds data.
"""

from __future__ import annotations

__all__ = [
    "CONTENDERS",
    "FSYNC",
    "OVER_DATA",
    "PAGE_CACHE",
    "PAGE_CACHE_FSYNC",
    "Group",
    "Run",
]

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTENDERS = ("ours", "virsh", "blocking", "ticker", "probe")
#: Downloads also run ours through the page cache (download(direct_io=False)),
#: the way the other contenders write.
PAGE_CACHE = "cached"
#: With --fsync, downloads also run ours with download(fsync=True), through
#: both write paths: what making the file durable costs, in the same rounds.
FSYNC, PAGE_CACHE_FSYNC = "fsync", "cached-fsync"
#: The sparse upload also runs ours into a volume that holds data (a few
#: blocks written into the new volume first): upload() empties it with a wipe
#: before sending holes, where virsh and sparseSendAll would keep the old data.
OVER_DATA = "over-data"


@dataclass(frozen=True)
class Group:
    """One workload and direction: the three contenders move the same bytes."""

    workload: str  # "dense" / "sparse"
    op: str  # "download" / "upload"
    sparse: bool
    vol: str
    vol_path: Path
    source: Path
    size: int
    data_size: int
    first_data: int = 0  # where the source's first data is
    with_fsync: bool = False  # downloads: the FSYNC contenders too

    @property
    def name(self) -> str:
        return f"{self.workload} {self.op}"

    @property
    def contenders(self) -> tuple[str, ...]:
        if self.op != "download":
            return CONTENDERS + ((OVER_DATA,) if self.sparse else ())
        return CONTENDERS + (PAGE_CACHE,) + ((FSYNC, PAGE_CACHE_FSYNC) if self.with_fsync else ())

    def label(self, contender: str) -> str:
        if contender == "ours":
            return "aiovirtstream"
        if contender == PAGE_CACHE:
            return "aiovirtstream pc"
        if contender == FSYNC:
            return "aiov fsync"
        if contender == PAGE_CACHE_FSYNC:
            return "aiov pc fsync"
        if contender == "ticker":
            return "aiovirtstream+t"
        if contender == OVER_DATA:
            return "aiov over data"
        if contender == "probe":
            return "virsh, t apart"
        if contender == "virsh":
            return "virsh --sparse" if self.sparse else "virsh"
        helper = {"download": "RecvAll", "upload": "SendAll"}[self.op]
        return f"sparse{helper}" if self.sparse else helper[0].lower() + helper[1:]


@dataclass
class Run:
    """One contender's run: the operation's figures and the whole child process's."""

    op_s: float
    wall_s: float
    cpu_s: float  # the whole child process (ru_utime + ru_stime)
    maxrss: int  # the whole child process, bytes
    daemon_cpu_s: float
    op_cpu_s: float | None = None
    rss_above: int | None = None
    lags: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
