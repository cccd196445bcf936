"""Volume transfers: aiovirtstream vs ``virsh`` vs libvirt-python's blocking helpers.

Run it with ``python -m benchmarks.transfer`` (or ``python -m benchmarks
transfer``); ``--quick`` is a smoke test with small sizes and 2 rounds.

One run starts a private storage-only libvirtd (:class:`aiovirtstream.testing.Sandbox`,
unix socket), makes a dense volume (random data, ``--size-gib``) and a 2 GiB
sparse one (56 extents of 1 MiB at seeded 4 KiB-aligned offsets), and then,
round after round on the same volumes and files, times:

* **aiovirtstream**: ``aiovirtstream.upload`` / ``download`` (dense: ``sparse=False``,
  sparse: ``sparse=True``, the flags the others use) in a child process
  (``--child ours``) that connects once with ``aiovirtstream.connect``;
* **aiovirtstream with a ticker**: the same, with a 1 ms ticker task running
  during the transfer to measure loop lag (``--child ours --ticker``). The
  ticker wakes the loop 1,000 times a second, which costs CPU and time of
  its own, so the speed, CPU and RSS figures compared with the others come
  from the runs without it, and the loop lag from these;
* **virsh**: ``virsh -t -c URI vol-download|vol-upload --pool P VOL FILE``
  (``--sparse`` for the sparse volume);
* **blocking**: libvirt-python's ``recvAll`` / ``sendAll`` /
  ``sparseRecvAll`` / ``sparseSendAll`` on a plain ``libvirt.open``
  connection in a child process (``--child blocking``) that never imports
  aiovirtstream, with SEEK_DATA/SEEK_HOLE handlers written like virsh's;
* **virsh with a ticker elsewhere** (``--child probe``): virsh again, while
  a Python process like the ticker runs' (asyncio, connected with
  ``aiovirtstream.connect``, moving nothing) runs the same ticker. Its lag
  is what this machine gives any event loop while a transfer loads it, the
  floor that aiovirtstream's own loop lag is to be read against.

How every contender is timed (the same way for all): each run is a fresh
child process that starts, connects, and then times *the operation* itself:
volume lookup (pool + volume by name), opening the local file, starting the
stream, moving the data, finishing the stream. For virsh that is the figure
its ``--timing`` option prints for the command (virsh connects before the
command starts); the Python children time the same span with
``time.perf_counter`` and its CPU with ``getrusage`` (all threads). Process
start, imports and connect are excluded from the ratios but shown as
"proc s" (the child's whole wall time, measured by this process).

Peak RSS: "proc peak" is the child's ``ru_maxrss`` from ``wait4`` (every
contender). "above base" (Python children) is ``VmHWM`` at the end minus
``VmRSS`` before the operation, after resetting the high-water mark through
``/proc/self/clear_refs``.

Order: the contenders' order rotates every round; medians over ``--rounds``
rounds (after ``--warmup`` untimed rounds). Caches are warm: all files stay in
the page cache (the machine has plenty of RAM); ``sync`` runs before every
timed run so that no contender pays for another's writeback, followed by a
pause (``--settle``, 2.5 s): on a VM that reports free memory to its host, a
page freed seconds ago costs a host fault when it is used again (writing a
new file: about 450 MiB/s against 4-5 GiB/s for pages freed just before), so
without the pause the contender that starts its operation soonest after the
previous run deleted its download gets the cheap pages. Results are
checked after every run: each downloaded file is compared byte for byte with
the source (sparse-aware: both files' data ranges), and before every upload
some 4 KiB blocks of the volume file are overwritten with a marker so that
an upload that left the volume alone fails the comparison.

The exit status is 0 when every target is met, 1 when one is missed, 2 when a
transfer failed or moved wrong data.
"""

from __future__ import annotations

import argparse
import errno
import json
import operator
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parents[1]
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
TICK = 0.001  # the loop-lag ticker's sleep
#: Seconds between runs, so that each starts with freed memory back with the host.
SETTLE_S = 2.5
_RESULT_PREFIX = "BENCH-RESULT "

# Runs a contender and reports its rusage. The contender is forked from this
# small process, not from the benchmark's: Linux carries the RSS high-water
# mark of the process that forks (vfork: of its whole address space) into the
# child's ru_maxrss, which would report the parent's peak for every child.
_LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as out:
    json.dump({"status": os.waitstatus_to_exitcode(status), "wall": wall,
               "cpu": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss * 1024}, out)
"""
_VIRSH_TIME = re.compile(r"\(Time: ([0-9.]+) ms\)")


def _virsh_seconds(output: str) -> float | None:
    """The command's time that ``virsh -t`` printed, in seconds (None: none printed)."""
    times = _VIRSH_TIME.findall(output)
    return float(times[-1]) / 1000 if times else None


# ============================================================== child helpers


def _status_bytes(field_name: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes (0 if absent)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _usage() -> resource.struct_rusage:
    return resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process


def _cpu_seconds() -> float:
    usage = _usage()
    return usage.ru_utime + usage.ru_stime


def _usage_delta(before: resource.struct_rusage) -> dict[str, Any]:
    """The operation's CPU (user, total) and its faults and context switches."""
    after = _usage()
    return {
        "op_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "op_user_s": after.ru_utime - before.ru_utime,
        # Page faults and context switches show where the system time goes:
        # a fault per new page, a switch per thread hand-off or wait.
        "op_minflt": after.ru_minflt - before.ru_minflt,
        "op_nvcsw": after.ru_nvcsw - before.ru_nvcsw,
        "op_nivcsw": after.ru_nivcsw - before.ru_nivcsw,
    }


def _emit(result: dict[str, Any]) -> None:
    print(_RESULT_PREFIX + json.dumps(result), flush=True)


def _in_data(fd: int) -> tuple[bool, int]:
    """virsh's virFileInData: (in data?, length of this section) at fd's position."""
    cur = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        data = os.lseek(fd, cur, os.SEEK_DATA)
    except OSError as error:
        if error.errno != errno.ENXIO:
            raise
        end = os.lseek(fd, 0, os.SEEK_END)  # in the trailing hole (or at the end)
        result = (False, end - cur)
    else:
        if data > cur:
            result = (False, data - cur)
        else:
            result = (True, os.lseek(fd, cur, os.SEEK_HOLE) - cur)
    os.lseek(fd, cur, os.SEEK_SET)
    return result


def _write_all(fd: int, data: bytes) -> int:
    """virsh's safewrite."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


def _blocking_child(args: argparse.Namespace) -> dict[str, Any]:
    """libvirt-python's blocking helpers, written the way virsh uses libvirt's."""
    import libvirt

    conn = libvirt.open(args.uri)
    try:
        reset = _reset_peak_rss()
        base = _status_bytes("VmRSS")
        usage0, t0 = _usage(), time.perf_counter()
        vol = conn.storagePoolLookupByName(args.pool).storageVolLookupByName(args.vol)
        stream = conn.newStream(0)
        if args.op == "download":
            flags = libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM if args.sparse else 0
            fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                vol.download(stream, 0, 0, flags)

                def sink(_st: Any, data: bytes, fd: int) -> int:
                    return _write_all(fd, data)

                if args.sparse:

                    def skip(_st: Any, length: int, fd: int) -> int:
                        # virsh's virshStreamSkip: seek, then truncate to make the hole.
                        os.ftruncate(fd, os.lseek(fd, length, os.SEEK_CUR))
                        return 0

                    stream.sparseRecvAll(sink, skip, fd)
                else:
                    stream.recvAll(sink, fd)
                stream.finish()
            finally:
                os.close(fd)
        else:
            flags = libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM if args.sparse else 0
            fd = os.open(args.file, os.O_RDONLY)
            try:
                vol.upload(stream, 0, 0, flags)

                def source(_st: Any, nbytes: int, fd: int) -> bytes:
                    return os.read(fd, nbytes)

                if args.sparse:

                    def hole(_st: Any, fd: int) -> tuple[bool, int]:
                        return _in_data(fd)

                    def skip_source(_st: Any, length: int, fd: int) -> int:
                        return os.lseek(fd, length, os.SEEK_CUR)

                    stream.sparseSendAll(source, hole, skip_source, fd)
                else:
                    stream.sendAll(source, fd)
                stream.finish()
            finally:
                os.close(fd)
        op_s, usage = time.perf_counter() - t0, _usage_delta(usage0)
        peak = _status_bytes("VmHWM")
    finally:
        conn.close()
    return {
        "op_s": op_s,
        **usage,
        "rss_base": base,
        "rss_peak": peak,
        "hwm_reset": reset,
    }


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of values; nan if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def _ticker(lags: list[float], stop: Any, stamps: list[float] | None = None) -> None:
    """Sleep TICK at a time until ``stop`` (an asyncio.Event) is set; record each lag
    (and in ``stamps`` when each tick came)."""
    import asyncio

    prev = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(TICK)
        now = time.perf_counter()
        lags.append(now - prev - TICK)
        if stamps is not None:
            stamps.append(now)
        prev = now


def _virsh_argv(
    uri: str, pool: str, op: str, vol: str, target: Path | str, sparse: bool
) -> list[str]:
    command = "vol-download" if op == "download" else "vol-upload"
    argv = ["virsh", "-t", "-q", "-c", uri, command, "--pool", pool, vol, str(target)]
    return argv + (["--sparse"] if sparse else [])


def _probe_child(args: argparse.Namespace) -> dict[str, Any]:
    """virsh moves the data while this process, idle otherwise, runs the ticker."""
    import asyncio

    async def run() -> dict[str, Any]:
        import aiovirtstream

        conn = await aiovirtstream.connect(args.uri)
        try:
            lags: list[float] = []
            stamps: list[float] = []
            stop = asyncio.Event()
            argv = _virsh_argv(args.uri, args.pool, args.op, args.vol, args.file, args.sparse)
            # Forked before the ticker starts: the fork is this loop's own work.
            virsh = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
            task = asyncio.create_task(_ticker(lags, stop, stamps))
            out, _ = await virsh.communicate()
            exited = time.perf_counter()
            stop.set()
            await task
        finally:
            await aiovirtstream.aclose_connection(conn)
        op_s = _virsh_seconds(out.decode())
        if virsh.returncode != 0 or op_s is None:
            raise SystemExit(f"virsh failed ({virsh.returncode}): {out.decode()}")
        # Only the ticks of virsh's operation (its last op_s seconds), not
        # of its start-up and connect, which load the machine less.
        during = [lag for lag, at in zip(lags, stamps, strict=True) if at >= exited - op_s]
        return {"op_s": op_s, "op_cpu_s": None, "lags": [round(lag, 6) for lag in during]}

    return asyncio.run(run())


def _ours_child(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    async def run() -> dict[str, Any]:
        import aiovirtstream

        # The package loads its names on first use: now, before anything is timed.
        assert callable(aiovirtstream.upload)
        idle: list[float] = []
        ticker_cpu_per_s = None
        if args.ticker:
            # The ticker alone, on an idle loop: its own lag and CPU cost.
            # Before connecting, like the others, which start the operation
            # right after connecting (an idle daemon answers its first call
            # up to 0.5 ms slower, measured).
            stop_idle = asyncio.Event()
            cpu_idle0 = _cpu_seconds()
            idle_task = asyncio.create_task(_ticker(idle, stop_idle))
            await asyncio.sleep(0.25)
            stop_idle.set()
            await idle_task
            ticker_cpu_per_s = (_cpu_seconds() - cpu_idle0) / 0.25
        conn = await aiovirtstream.connect(args.uri)
        try:
            lags: list[float] = []
            stop = asyncio.Event()
            reset = _reset_peak_rss()
            base = _status_bytes("VmRSS")
            task = asyncio.create_task(_ticker(lags, stop)) if args.ticker else None
            await asyncio.sleep(0)
            profiler = None
            if args.profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            usage0, t0 = _usage(), time.perf_counter()
            vol = await aiovirtstream.lookup_volume(conn, args.vol, pool=args.pool)
            if args.op == "download":
                result = await aiovirtstream.download(
                    vol,
                    args.file,
                    sparse=args.sparse,
                    overwrite=True,
                    parallel=args.parallel,
                    direct_io=not args.page_cache,
                    fsync=args.fsync,
                )
            else:
                result = await aiovirtstream.upload(vol, args.file, sparse=args.sparse)
            op_s, usage = time.perf_counter() - t0, _usage_delta(usage0)
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
            stop.set()
            if task is not None:
                await task
            peak = _status_bytes("VmHWM")
        finally:
            await aiovirtstream.aclose_connection(conn)
        return {
            "op_s": op_s,
            **usage,
            "rss_base": base,
            "rss_peak": peak,
            "hwm_reset": reset,
            "data_bytes": result.data_bytes,
            "hole_bytes": result.hole_bytes,
            "lags": [round(lag, 6) for lag in lags],
            "idle_lag_p99": _percentile(idle, 99),
            "ticker_cpu_per_s": ticker_cpu_per_s,
        }

    return asyncio.run(run())


def _child_main(args: argparse.Namespace) -> int:
    run = {"ours": _ours_child, "blocking": _blocking_child, "probe": _probe_child}[args.child]
    _emit(run(args))
    return 0


# ============================================================== files and checks


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) ranges of data in fd (SEEK_DATA/SEEK_HOLE)."""
    ranges = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        ranges.append((start, end))
        pos = end
    return ranges


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def compare_files(expected: Path, actual: Path) -> str | None:
    """None if both files hold the same bytes (holes read as zeroes), else what differs."""
    if not actual.exists():
        return f"{actual} does not exist"
    size_e, size_a = expected.stat().st_size, actual.stat().st_size
    if size_e != size_a:
        return f"{actual} has {size_a} bytes, expected {size_e}"
    fe, fa = os.open(expected, os.O_RDONLY), os.open(actual, os.O_RDONLY)
    try:
        ranges = _merge(_data_ranges(fe, size_e) + _data_ranges(fa, size_a))
        for start, end in ranges:
            for pos in range(start, end, 16 * MiB):
                n = min(16 * MiB, end - pos)
                if os.pread(fe, n, pos) != os.pread(fa, n, pos):
                    return f"{actual} differs from {expected} in [{pos}, {pos + n})"
    finally:
        os.close(fe)
        os.close(fa)
    return None


def _write_dense(path: Path, size: int) -> None:
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            n = min(16 * MiB, remaining)
            out.write(os.urandom(n))
            remaining -= n


def _sparse_layout(size: int, extents: int, extent_size: int, seed: int) -> list[int]:
    """Seeded 4 KiB-aligned offsets, one extent per equal slice of the file."""
    rng = random.Random(seed)
    slot = size // extents
    room = slot - extent_size - 64 * 1024  # keep a hole of at least 64 KiB after each
    assert room > 0, "extents do not fit"
    return [i * slot + rng.randrange(0, room // 4096) * 4096 for i in range(extents)]


def _write_sparse(path: Path, size: int, offsets: list[int], extent_size: int, seed: int) -> None:
    rng = random.Random(seed + 1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset in offsets:
            os.pwrite(fd, rng.randbytes(extent_size), offset)
    finally:
        os.close(fd)


_MARK = b"\xa5" * 4096


def _poison(vol_path: Path, size: int, start: int, seed: int) -> None:
    """Overwrite a few 4 KiB blocks of the volume from ``start``: an upload that skips them shows.

    ``start`` is where the source's first data is. A sparse upload (virsh's,
    libvirt-python's and ours alike) leaves the volume's old bytes in a hole
    at the *start* of the source: libvirtd makes a hole by seeking and
    truncating there, which clears what follows the hole but not the hole
    itself. Later holes come out as zeroes.
    """
    rng = random.Random(seed)
    first, blocks = start // 4096, size // 4096
    where = {first, blocks - 1, *(rng.randrange(first, blocks) for _ in range(14))}
    fd = os.open(vol_path, os.O_WRONLY)
    try:
        for block in where:
            os.pwrite(fd, _MARK, block * 4096)
    finally:
        os.close(fd)


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _daemon_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def _cpu_times() -> tuple[float, float]:
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


# ============================================================== the parent


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
    op_s: float
    wall_s: float
    cpu_s: float  # the whole child process (ru_utime + ru_stime)
    maxrss: int  # the whole child process, bytes
    daemon_cpu_s: float
    op_cpu_s: float | None = None
    rss_above: int | None = None
    lags: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class TransferFailed(Exception):
    pass


class Bench:
    def __init__(
        self,
        uri: str,
        pool: str,
        daemon_pid: int,
        work: Path,
        verbose: bool,
        parallel: int | None = None,
        settle: float = 0.0,
    ) -> None:
        self.uri = uri
        self.settle = settle
        self.parallel = parallel
        self.pool = pool
        self.daemon_pid = daemon_pid
        self.work = work
        self.verbose = verbose
        self.runs: dict[tuple[str, str], list[Run]] = {}
        self.allocations: dict[tuple[str, str], int] = {}
        self._poison_seed = 1000

    def _recreate(self, group: Group) -> None:
        virsh = ["virsh", "-q", "-c", self.uri]
        subprocess.run([*virsh, "vol-delete", "--pool", self.pool, group.vol], check=True)
        create = ["vol-create-as", self.pool, group.vol, str(group.size), "--format", "raw"]
        subprocess.run([*virsh, *create, "--allocation", "0"], check=True)

    def argv(self, group: Group, contender: str, target: Path, profile: str | None) -> list[str]:
        if contender == "virsh":
            return _virsh_argv(self.uri, self.pool, group.op, group.vol, target, group.sparse)
        ours = ("ticker", PAGE_CACHE, FSYNC, PAGE_CACHE_FSYNC, OVER_DATA)
        child = "ours" if contender in ours else contender
        argv = [sys.executable, "-m", "benchmarks.transfer", "--child", child]
        argv += ["--op", group.op, "--uri", self.uri, "--pool", self.pool, "--vol", group.vol]
        argv += ["--file", str(target)] + (["--sparse"] if group.sparse else [])
        if contender == "ticker":
            argv.append("--ticker")
        if contender in (PAGE_CACHE, PAGE_CACHE_FSYNC):
            argv.append("--page-cache")
        if contender in (FSYNC, PAGE_CACHE_FSYNC):
            argv.append("--fsync")
        if child == "ours" and self.parallel is not None:
            argv += ["--parallel", str(self.parallel)]
        return argv + (["--profile", profile] if profile else [])

    def run_one(
        self, group: Group, contender: str, record: bool, profile: str | None = None
    ) -> Run:
        if group.op == "download":
            target = self.work / f"download-{group.workload}-{contender}.img"
            target.unlink(missing_ok=True)
        elif group.sparse:
            # A sparse upload is only correct into a volume that holds no data:
            # libvirtd keeps a volume's old bytes inside an uploaded hole. Every
            # contender gets a new empty volume (untimed).
            target = group.source
            self._recreate(group)
            if contender == OVER_DATA:
                self._poison_seed += 1
                _poison(group.vol_path, group.size, 0, self._poison_seed)
        else:
            target = group.source
            self._poison_seed += 1
            _poison(group.vol_path, group.size, group.first_data, self._poison_seed)
        os.sync()  # nobody pays for the previous run's writeback
        # Every run starts with the memory the previous one freed given back
        # to the host (see _page_cache_rates): measured, pages freed less than
        # 0.5-2 s earlier are written 8-10x faster than older ones, so
        # without a pause the contender that starts fastest (virsh) gets
        # the cheap pages and the slowest to start (ours) the dear ones.
        time.sleep(self.settle)
        out_path, err_path = self.work / "child.out", self.work / "child.err"
        usage_path = self.work / "child.usage"
        argv = [sys.executable, "-S", "-c", _LAUNCHER, str(usage_path)]
        argv += self.argv(group, contender, target, profile)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            daemon0 = _daemon_cpu(self.daemon_pid)
            launcher = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO
            )
            daemon_cpu = _daemon_cpu(self.daemon_pid) - daemon0
        stdout, stderr = out_path.read_text(), err_path.read_text()
        what = f"{group.name} by {group.label(contender)}"
        if launcher.returncode != 0:
            raise TransferFailed(f"{what}: the launcher failed:\n{stderr}{stdout}")
        usage = json.loads(usage_path.read_text())
        if usage["status"] != 0:
            raise TransferFailed(f"{what} exited {usage['status']}:\n{stderr}{stdout}")
        run = Run(
            op_s=float("nan"),
            wall_s=usage["wall"],
            cpu_s=usage["cpu"],
            maxrss=usage["maxrss"],
            daemon_cpu_s=daemon_cpu,
        )
        if contender == "virsh":
            op_s = _virsh_seconds(stdout)
            if op_s is None:
                raise TransferFailed(f"{what}: no '(Time: ...)' in virsh's output:\n{stdout}")
            run.op_s = op_s
        else:
            lines = [ln for ln in stdout.splitlines() if ln.startswith(_RESULT_PREFIX)]
            if not lines:
                raise TransferFailed(f"{what}: no result line:\n{stderr}{stdout}")
            data = json.loads(lines[-1][len(_RESULT_PREFIX) :])
            run.op_s, run.op_cpu_s = data.pop("op_s"), data.pop("op_cpu_s")
            if "rss_peak" in data:
                run.rss_above = data["rss_peak"] - data["rss_base"]
            run.lags = data.pop("lags", [])
            run.extra = data
            if "data_bytes" in data and data["data_bytes"] + data["hole_bytes"] != group.size:
                raise TransferFailed(f"{what}: TransferResult says {data}, size {group.size}")
        # Check what arrived.
        if group.op == "download":
            problem = compare_files(group.source, target)
            if group.sparse and problem is None:
                allocated = _allocated(target)
                self.allocations[(group.name, contender)] = allocated
                if allocated > 2 * group.data_size + 4 * MiB:
                    problem = f"{target} is not sparse: {allocated} bytes allocated"
            target.unlink(missing_ok=True)
        else:
            problem = compare_files(group.source, group.vol_path)
        if problem is not None:
            raise TransferFailed(f"{what} moved wrong data: {problem}")
        if record:
            self.runs.setdefault((group.name, contender), []).append(run)
        if self.verbose:
            print(
                f"  {group.name:16} {group.label(contender):15} op {run.op_s:7.3f} s  "
                f"proc {run.wall_s:6.3f} s  {'(warm-up)' if not record else ''}",
                flush=True,
            )
        return run


# ============================================================== report


@dataclass(frozen=True)
class Target:
    group: str
    text: str
    value: float
    threshold: float
    strict: bool  # ">" instead of ">=" (or "<" for upper bounds)
    upper: bool = False  # the value must stay below the threshold
    #: The same ratio within each round (the two runs seconds apart):
    #: how far the verdict is from the host's noise.
    per_round: tuple[float, ...] = ()

    def _meets(self, value: float) -> bool:
        if value != value:  # nan
            return False
        if self.upper:
            return value < self.threshold if self.strict else value <= self.threshold
        return value > self.threshold if self.strict else value >= self.threshold

    @property
    def passed(self) -> bool:
        return self._meets(self.value)

    def rounds_text(self) -> str:
        """'rounds 0.91-1.20, 3/5 meet it', or '' for a target without rounds."""
        if not self.per_round:
            return ""
        met = sum(self._meets(v) for v in self.per_round)
        return (
            f"rounds {min(self.per_round):.2f}-{max(self.per_round):.2f}, "
            f"{met}/{len(self.per_round)} meet it"
        )


def _per_round(
    bench: Bench,
    group: str,
    numerator: str,
    denominator: str,
    figure: Callable[[Run], float | None],
) -> tuple[float, ...]:
    """``numerator``'s ``figure`` over ``denominator``'s, round by round."""
    tops = bench.runs.get((group, numerator), [])
    bottoms = bench.runs.get((group, denominator), [])
    ratios = []
    for top, bottom in zip(tops, bottoms, strict=False):
        a, b = figure(top), figure(bottom)
        if a is not None and b:
            ratios.append(a / b)
    return tuple(ratios)


def _whole_cpu(run: Run) -> float | None:
    """The client's operation CPU plus libvirtd's during the child's life.

    A download's costs move between the two processes: with ours the
    daemon spends less and the client more than with the blocking helper,
    so the client's CPU alone overstates what the machine pays.
    """
    if run.op_cpu_s is None or run.daemon_cpu_s != run.daemon_cpu_s:
        return None
    return run.op_cpu_s + run.daemon_cpu_s


def _cpu_ratio_line(
    bench: Bench, group: Group, contender: str, figure: Callable[[Run], float | None]
) -> str:
    """'  dense download   aiovirtstream 3.44 / recvAll 3.13 = 1.10x (rounds ...)', or ''.

    ``figure``'s medians per GiB, ``contender``'s against the blocking helper's.
    """
    per_gib = group.size / GiB
    figures = {}
    for name in (contender, "blocking"):
        runs = bench.runs.get((group.name, name), [])
        values = [v for v in map(figure, runs) if v is not None]
        if not values:
            return ""
        figures[name] = _median(values) / per_gib
    rounds = _per_round(bench, group.name, contender, "blocking", figure)
    spread = f" (rounds {min(rounds):.2f}-{max(rounds):.2f})" if rounds else ""
    return (
        f"  {group.name:<16} {group.label(contender)} {figures[contender]:.2f} / "
        f"{group.label('blocking')} {figures['blocking']:.2f} = "
        f"{figures[contender] / figures['blocking']:.2f}x{spread}"
    )


def _lag_text(lags: list[float], note: str) -> str:
    """'p50 0.136 ms  p99 1.944 ms  max 28.743 ms  (6737 ticks; note)'."""
    return (
        f"p50 {_percentile(lags, 50) * 1000:6.3f} ms  p99 {_percentile(lags, 99) * 1000:6.3f} ms  "
        f"max {max(lags or [0]) * 1000:7.3f} ms  ({len(lags)} ticks; {note})"
    )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(value: float | None, spec: str) -> str:
    if value is None or value != value:
        return "-"
    return format(value, spec)


def report(bench: Bench, groups: list[Group], rounds: int) -> tuple[str, list[Target]]:
    lines = []
    header = (
        f"{'workload':16} {'contender':15} {'median s':>9} {'min-max s':>13} {'MiB/s':>7} "
        f"{'op CPU s':>8} {'proc s':>7} {'proc CPU':>8} {'dmn CPU':>7} "
        f"{'proc peak':>9} {'above base med/max':>18}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    medians: dict[tuple[str, str], float] = {}
    op_cpu: dict[tuple[str, str], float] = {}
    for group in groups:
        for contender in group.contenders:
            runs = bench.runs.get((group.name, contender), [])
            op = _median([r.op_s for r in runs])
            medians[(group.name, contender)] = op
            cpu_values = [r.op_cpu_s for r in runs if r.op_cpu_s is not None]
            op_cpu[(group.name, contender)] = _median(cpu_values)
            above = [r.rss_above for r in runs if r.rss_above is not None]
            lo, hi = (min(r.op_s for r in runs), max(r.op_s for r in runs)) if runs else (0, 0)
            above_text = (
                f"{_median([a / MiB for a in above]):5.1f} /{max(above) / MiB:6.1f} MiB"
                if above
                else "-"
            )
            lines.append(
                f"{group.name:16} {group.label(contender):15} {op:9.3f} "
                f"{f'{lo:.3f}-{hi:.3f}':>13} {group.size / MiB / op:7.0f} "
                f"{_fmt(op_cpu[(group.name, contender)], '8.2f'):>8} "
                f"{_median([r.wall_s for r in runs]):7.3f} "
                f"{_median([r.cpu_s for r in runs]):8.2f} "
                f"{_median([r.daemon_cpu_s for r in runs]):7.2f} "
                f"{_median([r.maxrss / MiB for r in runs]):6.0f} MiB "
                f"{above_text:>15}"
            )
        lines.append("")
    lines.append(
        f"median of {rounds} rounds; 'median s' / 'min-max s' / 'MiB/s': the operation (lookup, "
        "open, stream, finish), MiB/s of the logical size; 'op CPU s': CPU of the operation "
        "(Python children); 'proc s' / 'proc CPU': the whole child process incl. start-up and "
        "connect; 'dmn CPU': libvirtd's CPU during the run; 'proc peak': the child's ru_maxrss; "
        "'above base': peak RSS during the operation over the RSS before it, median / largest "
        "of the rounds (Python children; their 'proc peak' is taken after the reset too)."
    )

    # Loop lag of ours.
    lines.append("")
    lines.append(
        "aiovirtstream loop lag (the 'aiovirtstream+t' runs: a 1 ms ticker during the "
        "transfer; lag = gap - 1 ms), and below it the same ticker in a process that "
        "moves nothing while virsh does the transfer ('virsh, t apart': what this machine "
        "gives any loop under that load):"
    )
    all_lags: list[float] = []
    lag_p99: dict[str, float] = {}
    for group in groups:
        runs = bench.runs.get((group.name, "ticker"), [])
        lags = [lag for r in runs for lag in r.lags]
        all_lags += lags
        lag_p99[group.name] = _percentile(lags, 99)
        idle = _median([r.extra.get("idle_lag_p99", float("nan")) for r in runs])
        lines.append(f"  {group.name:16} {_lag_text(lags, f'idle loop p99 {idle * 1000:.3f} ms')}")
        probe = [lag for r in bench.runs.get((group.name, "probe"), []) for lag in r.lags]
        if probe:
            lines.append(f"  {'':16} {_lag_text(probe, group.label('probe'))}")
    ticker_cpu = _median(
        [
            r.extra.get("ticker_cpu_per_s", float("nan"))
            for rs in bench.runs.values()
            for r in rs
            if r.extra.get("ticker_cpu_per_s") is not None
        ]
    )
    lines.append(
        f"  (the ticker alone costs about {ticker_cpu:.3f} CPU s per second on an idle loop)"
    )
    if bench.allocations:
        lines.append("")
        lines.append(
            "sparse downloads, allocated on disk: "
            + ", ".join(
                f"{dict((g.name, g) for g in groups)[name].label(c)} {size / MiB:.0f} MiB"
                for (name, c), size in sorted(bench.allocations.items())
            )
        )

    # User and system time: the Python an event loop adds is user time; the
    # page cache that every download fills is system time, and follows the host.
    split = []
    for group in groups:
        if group.workload != "dense":
            continue
        for contender in ("ours", PAGE_CACHE, "blocking"):
            runs = bench.runs.get((group.name, contender), [])
            users = [r.extra["op_user_s"] for r in runs if "op_user_s" in r.extra]
            if users:
                user = _median(users)
                system = _median([(r.op_cpu_s or 0) - r.extra["op_user_s"] for r in runs])
                split.append(f"{group.name} {group.label(contender)} {user:.2f} / {system:.2f}")
    if split:
        lines.append("")
        lines.append("op CPU s, user / system (medians): " + "; ".join(split))
    counts = []
    for group in groups:
        for contender in ("ours", PAGE_CACHE, "blocking"):
            runs = [
                r for r in bench.runs.get((group.name, contender), []) if "op_minflt" in r.extra
            ]
            if runs:
                faults, voluntary, involuntary = (
                    _median([r.extra[key] for r in runs])
                    for key in ("op_minflt", "op_nvcsw", "op_nivcsw")
                )
                counts.append(
                    f"  {group.name:<16} {group.label(contender):<15} {faults:>9.0f} "
                    f"{voluntary:>9.0f} {involuntary:>9.0f}"
                )
    if counts:
        lines.append("op page faults, voluntary / involuntary context switches (medians):")
        lines.extend(counts)
    totals = [_cpu_ratio_line(bench, group, "ours", _whole_cpu) for group in groups]
    if any(totals):
        lines.append(
            "CPU of the whole transfer, the child's operation + libvirtd's (medians, "
            "s/GiB; informational, not a target):"
        )
        lines.extend(line for line in totals if line)
    cached_lines = []
    for group in groups:
        line = _cpu_ratio_line(bench, group, PAGE_CACHE, operator.attrgetter("op_cpu_s"))
        if line:
            speed_ratio = medians[(group.name, "blocking")] / medians[(group.name, PAGE_CACHE)]
            cached_lines.append(f"{line}; speed {speed_ratio:.2f}x")
    if cached_lines:
        lines.append(
            "aiovirtstream pc (download(direct_io=False): the page cache, as the others "
            "write), op CPU s/GiB against the blocking helper (informational):"
        )
        lines.extend(cached_lines)
    fsync_lines = []
    for group in groups:
        for durable, plain in ((FSYNC, "ours"), (PAGE_CACHE_FSYNC, PAGE_CACHE)):
            per_round = _per_round(bench, group.name, durable, plain, operator.attrgetter("op_s"))
            if per_round:
                extra = medians[(group.name, durable)] - medians[(group.name, plain)]
                fsync_lines.append(
                    f"  {group.name:16} {group.label(durable):15} {_median(list(per_round)):.3f}x "
                    f"the time of {group.label(plain)} per round "
                    f"({min(per_round):.2f}-{max(per_round):.2f}), medians {extra * 1000:+.1f} ms"
                )
    if fsync_lines:
        lines.append("download(fsync=True) against the same download without (informational):")
        lines.extend(fsync_lines)
    for group in groups:
        per_round = _per_round(bench, group.name, OVER_DATA, "ours", operator.attrgetter("op_s"))
        if per_round:
            extra = medians[(group.name, OVER_DATA)] - medians[(group.name, "ours")]
            lines.append(
                "upload() into a volume that holds data (emptied by a wipe first) against "
                "into a new volume (informational):"
            )
            lines.append(
                f"  {group.name:16} {group.label(OVER_DATA):15} {_median(list(per_round)):.3f}x "
                f"the time per round ({min(per_round):.2f}-{max(per_round):.2f}), "
                f"medians {extra * 1000:+.1f} ms"
            )

    # Targets.
    targets: list[Target] = []

    def speed(group: str, other: str, label: str, threshold: float, strict: bool) -> None:
        value = medians[(group, other)] / medians[(group, "ours")]
        sign = ">" if strict else ">="
        rounds = _per_round(bench, group, other, "ours", operator.attrgetter("op_s"))
        targets.append(
            Target(
                group,
                f"speed vs {label} {sign} {threshold:g}x",
                value,
                threshold,
                strict,
                per_round=rounds,
            )
        )

    by_name = {g.name: g for g in groups}
    for group in groups:
        virsh_label, helper_label = group.label("virsh"), group.label("blocking")
        if group.workload == "dense" and group.op == "download":
            speed(group.name, "virsh", virsh_label, 1.1, False)
            speed(group.name, "blocking", helper_label, 1.0, False)
        elif group.workload == "dense":
            speed(group.name, "blocking", helper_label, 1.0, False)
        else:
            speed(group.name, "blocking", helper_label, 1.0, False)
            speed(group.name, "virsh", virsh_label, 1.0, True)
    for group in groups:
        if group.workload != "dense":
            continue
        runs = bench.runs.get((group.name, "ours"), [])
        peak = max((r.rss_above or 0 for r in runs), default=float("nan"))
        targets.append(
            Target(group.name, "peak RSS above baseline < 48 MiB", peak / MiB, 48, True, True)
        )
        ours_cpu = op_cpu[(group.name, "ours")] / (group.size / GiB)
        theirs_cpu = op_cpu[(group.name, "blocking")] / (group.size / GiB)
        targets.append(
            Target(
                group.name,
                f"CPU s/GiB vs {by_name[group.name].label('blocking')} <= 1.1x "
                f"({ours_cpu:.2f} vs {theirs_cpu:.2f})",
                ours_cpu / theirs_cpu,
                1.1,
                False,
                True,
                per_round=_per_round(
                    bench, group.name, "ours", "blocking", operator.attrgetter("op_cpu_s")
                ),
            )
        )
    for group in groups:
        targets.append(
            Target(group.name, "loop lag p99 < 2 ms", lag_p99[group.name] * 1000, 2.0, True, True)
        )
    targets.append(
        Target("all", "loop lag p99 < 2 ms", _percentile(all_lags, 99) * 1000, 2.0, True, True)
    )

    lines.append("")
    lines.append(
        "targets (speed ratio = their median time / ours: > 1 means aiovirtstream is faster; "
        "'rounds': the same ratio within each round, and in how many rounds it meets the "
        "target; the verdict is the medians'):"
    )
    for target in targets:
        lines.append(
            f"  {target.group:16} {target.text:52} {target.value:7.2f}  "
            f"{'PASS' if target.passed else 'FAIL'}  {target.rounds_text()}".rstrip()
        )
    return "\n".join(lines), targets


# ============================================================== main


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.transfer",
        description="Volume upload/download: aiovirtstream vs virsh vs libvirt-python's "
        "blocking helpers, against a private storage-only libvirtd.",
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1)")
    parser.add_argument("--size-gib", type=float, default=None, help="dense volume (default 1)")
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        metavar="S",
        help=f"pause before every run (default {SETTLE_S}, 0 with --quick): "
        "the memory the previous run freed goes back to the host first",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 rounds: a smoke test")
    parser.add_argument("--only", choices=["dense", "sparse"], help="run one workload")
    parser.add_argument("--json", metavar="PATH", help="also write every run's figures here")
    parser.add_argument("--profile-dir", metavar="DIR", help="cProfile aiovirtstream's runs here")
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        metavar="N",
        help="aiovirtstream's downloads use N streams (download(parallel=N)); "
        "default: the library's choice by size",
    )
    parser.add_argument(
        "--fsync",
        action="store_true",
        help="downloads also run aiovirtstream with download(fsync=True), direct "
        "and through the page cache ('aiov fsync', 'aiov pc fsync')",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run")
    # The child processes (internal).
    parser.add_argument("--child", choices=["ours", "blocking", "probe"], help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=["upload", "download"], help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--pool", help=argparse.SUPPRESS)
    parser.add_argument("--vol", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--sparse", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    parser.add_argument("--ticker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--page-cache", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = _parse(argv)
    if args.child:
        return _child_main(args)
    if __name__ != "__main__":
        # Run from ``python -m benchmarks``, other benchmarks may have registered
        # a libvirt event implementation in this process already: the sandbox's
        # plain set-up connections are opened in a process of our own.
        return subprocess.call([sys.executable, "-m", "benchmarks.transfer", *argv], cwd=REPO)
    if unknown:
        print(f"benchmarks.transfer: ignoring unknown options {unknown}", file=sys.stderr)
    quick = args.quick
    rounds = args.rounds if args.rounds is not None else (2 if quick else 5)
    warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    dense_size = int(
        (args.size_gib if args.size_gib is not None else (1 / 16 if quick else 1)) * GiB
    )
    dense_size -= dense_size % 4096
    sparse_size, extents = (256 * MiB, 8) if quick else (2 * GiB, 56)
    extent_size = 1 * MiB
    if shutil.which("virsh") is None:
        print("benchmarks.transfer: virsh not found (Debian: libvirt-clients)", file=sys.stderr)
        return 2

    from aiovirtstream.testing import Sandbox

    started = time.perf_counter()
    cpu_times0 = _cpu_times()
    work = Path(tempfile.mkdtemp(prefix="aiovirtstream-bench-"))
    try:
        with Sandbox() as sb:
            pool = sb.create_pool("bench")
            dense_vol = sb.create_volume(pool, "dense", dense_size)
            sparse_vol = sb.create_volume(pool, "sparse", sparse_size)
            print(
                f"preparing: {dense_size / MiB:.0f} MiB dense, {sparse_size / MiB:.0f} MiB "
                f"sparse with {extents} x {extent_size // MiB} MiB of data, in {work}",
                flush=True,
            )
            dense_src, sparse_src = work / "dense.src", work / "sparse.src"
            _write_dense(dense_src, dense_size)
            offsets = _sparse_layout(sparse_size, extents, extent_size, seed=20240601)
            _write_sparse(sparse_src, sparse_size, offsets, extent_size, seed=20240601)
            for vol, src, sparse in ((dense_vol, dense_src, False), (sparse_vol, sparse_src, True)):
                cmd = ["virsh", "-q", "-c", sb.uri, "vol-upload", "--pool", pool.name, vol.name]
                subprocess.run(cmd + [str(src)] + (["--sparse"] if sparse else []), check=True)
                problem = compare_files(src, vol.path)
                if problem:
                    raise TransferFailed(f"set-up upload: {problem}")
            os.sync()
            groups = []
            for op in ("download", "upload"):
                groups.append(
                    Group(
                        "dense",
                        op,
                        False,
                        "dense",
                        dense_vol.path,
                        dense_src,
                        dense_size,
                        dense_size,
                        with_fsync=args.fsync,
                    )
                )
            for op in ("download", "upload"):
                groups.append(
                    Group(
                        "sparse",
                        op,
                        True,
                        "sparse",
                        sparse_vol.path,
                        sparse_src,
                        sparse_size,
                        extents * extent_size,
                        min(offsets),
                        with_fsync=args.fsync,
                    )
                )
            if args.only:
                groups = [g for g in groups if g.workload == args.only]
            if args.profile_dir:
                Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
            page_cache = [_page_cache_rates(work)]
            python_speed = [_python_ns_per_step()]
            settle = args.settle if args.settle is not None else (0.0 if quick else SETTLE_S)
            bench = Bench(
                sb.uri, pool.name, sb.pid, work, args.verbose, args.parallel, settle=settle
            )
            for round_no in range(-warmup, rounds):
                record = round_no >= 0
                if not args.verbose:
                    print(
                        f"round {round_no + 1}/{rounds}" if record else "warm-up round",
                        flush=True,
                    )
                for group in groups:
                    shift = round_no % len(group.contenders)
                    order = group.contenders[shift:] + group.contenders[:shift]
                    for contender in order:
                        profile = None
                        if args.profile_dir and contender == "ours" and record:
                            name = f"{group.workload}-{group.op}-r{round_no}.prof"
                            profile = str(Path(args.profile_dir).resolve() / name)
                        bench.run_one(group, contender, record, profile)
            page_cache.append(_page_cache_rates(work))
            python_speed.append(_python_ns_per_step())
            text, targets = report(bench, groups, rounds)
            if args.json:
                Path(args.json).write_text(
                    json.dumps(
                        {
                            f"{g}|{c}": [vars(r) for r in runs]
                            for (g, c), runs in bench.runs.items()
                        },
                        indent=1,
                    )
                )
    except TransferFailed as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"python {sys.version.split()[0]}, libvirt-python {_dist_version('libvirt-python')}, "
        f"libvirt {_libvirt_version()}, {os.cpu_count()} CPUs; caches warm; "
        f"aiovirtstream downloads with parallel={args.parallel or 'auto'}; "
        f"{time.perf_counter() - started:.0f} s in all; "
        f"{_steal_percent(cpu_times0, _cpu_times()):.1f} % of the CPU time stolen by the host"
    )
    print(
        "writing new page-cache pages: "
        + " / ".join(f"{new:.0f}" for new, _ in page_cache)
        + " MiB/s; rewriting cached ones: "
        + " / ".join(f"{old:.0f}" for _, old in page_cache)
        + " MiB/s (before / after the rounds; every download writes new pages)"
    )
    print(
        "python speed: "
        + " / ".join(f"{ns:.0f}" for ns in python_speed)
        + " ns per loop step (before / after the rounds; the host's CPU for interpreted code)"
    )
    print(text)
    return 0 if all(t.passed for t in targets) else 1


def _page_cache_rates(work: Path, size: int = 128 * MiB) -> tuple[float, float]:
    """(MiB/s writing a new file, MiB/s rewriting it in place): the host's share.

    Every download writes new page-cache pages. On a VM that hands free
    memory back to its host (free page reporting), each new page costs the
    host a fault: measured here 375 MiB/s for a new file against 6.5 GiB/s
    for rewriting cached pages, varying between runs. Downloads of every
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


def _python_ns_per_step(steps: int = 2_000_000) -> float:
    """Nanoseconds per step of a plain Python loop: how fast the host runs Python now.

    Our transfers run more Python than the C contenders do, so their ratios
    move with it. Steal time does not show it: on VMs of one kind, at about
    3 % steal both times, the loop-lag ticker cost 0.049 CPU s per second on an
    idle loop in one session and 0.093 in another.
    """
    best = float("inf")
    for _ in range(3):
        total, start = 0, time.perf_counter()
        for step in range(steps):
            total += step
        best = min(best, time.perf_counter() - start)
    return best / steps * 1e9


def _steal_percent(before: tuple[float, float], after: tuple[float, float]) -> float:
    total = after[0] - before[0]
    return 100 * (after[1] - before[1]) / total if total > 0 else float("nan")


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


if __name__ == "__main__":
    sys.exit(main())
