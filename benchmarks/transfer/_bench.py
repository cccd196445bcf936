"""One run of one contender: its child process, timed, measured and checked.

Every run is a fresh child started through a small launcher that reports
its rusage; ``sync`` and a pause (``settle``) come first, and what the run
moved is compared with the source afterwards.
"""

from __future__ import annotations

__all__ = ["RESULT_PREFIX", "SETTLE_S", "Bench", "TransferFailed"]

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._probes import process_cpu_seconds

from ._contenders import FSYNC, OVER_DATA, PAGE_CACHE, PAGE_CACHE_FSYNC, Group, Run
from ._files import allocated, compare_files, poison
from ._virsh import virsh_argv, virsh_seconds

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
#: Seconds between runs, so that each starts with freed memory back with the host.
SETTLE_S = 2.5
RESULT_PREFIX = "BENCH-RESULT "

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


class TransferFailed(Exception):
    """A child failed, or a transfer moved the wrong data."""


class Bench:
    """The daemon, its pool and the work directory; runs the contenders and keeps their runs."""

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
        """The command line of ``contender``'s child (virsh, or this package's ``--child``)."""
        if contender == "virsh":
            return virsh_argv(self.uri, self.pool, group.op, group.vol, target, group.sparse)
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
        """Run ``contender`` on ``group`` once and check what it moved; ``record``: keep it."""
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
                poison(group.vol_path, group.size, 0, self._poison_seed)
        else:
            target = group.source
            self._poison_seed += 1
            poison(group.vol_path, group.size, group.first_data, self._poison_seed)
        os.sync()  # nobody pays for the previous run's writeback
        # Every run starts with the memory the previous one freed given back
        # to the host (see page_cache_rates): pages freed just before are
        # written much faster than older ones, so without a pause the
        # contender that starts fastest (virsh) would get the cheap pages and
        # the slowest to start (ours) the dear ones.
        time.sleep(self.settle)
        out_path, err_path = self.work / "child.out", self.work / "child.err"
        usage_path = self.work / "child.usage"
        argv = [sys.executable, "-S", "-c", _LAUNCHER, str(usage_path)]
        argv += self.argv(group, contender, target, profile)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            daemon0 = process_cpu_seconds(self.daemon_pid)
            launcher = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO
            )
            daemon_cpu = process_cpu_seconds(self.daemon_pid) - daemon0
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
            op_s = virsh_seconds(stdout)
            if op_s is None:
                raise TransferFailed(f"{what}: no '(Time: ...)' in virsh's output:\n{stdout}")
            run.op_s = op_s
        else:
            lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
            if not lines:
                raise TransferFailed(f"{what}: no result line:\n{stderr}{stdout}")
            data = json.loads(lines[-1][len(RESULT_PREFIX) :])
            run.op_s, run.op_cpu_s = data.pop("op_s"), data.pop("op_cpu_s")
            if "rss_peak" in data:
                run.rss_above = data["rss_peak"] - data["rss_base"]
            run.lags = data.pop("lags", [])
            run.extra = data
            if "data_bytes" in data and data["data_bytes"] + data["hole_bytes"] != group.size:
                raise TransferFailed(f"{what}: TransferResult says {data}, size {group.size}")
        self._check(group, contender, target, what)
        if record:
            self.runs.setdefault((group.name, contender), []).append(run)
        if self.verbose:
            print(
                f"  {group.name:16} {group.label(contender):15} op {run.op_s:7.3f} s  "
                f"proc {run.wall_s:6.3f} s  {'(warm-up)' if not record else ''}",
                flush=True,
            )
        return run

    def _check(self, group: Group, contender: str, target: Path, what: str) -> None:
        """Raise TransferFailed unless the run moved the source's bytes (and kept holes holes)."""
        if group.op == "download":
            problem = compare_files(group.source, target)
            if group.sparse and problem is None:
                size = allocated(target)
                self.allocations[(group.name, contender)] = size
                if size > 2 * group.data_size + 4 * MiB:
                    problem = f"{target} is not sparse: {size} bytes allocated"
            target.unlink(missing_ok=True)
        else:
            problem = compare_files(group.source, group.vol_path)
        if problem is not None:
            raise TransferFailed(f"{what} moved wrong data: {problem}")
