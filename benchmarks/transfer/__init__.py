"""Volume transfers: aiovirtstream against ``virsh`` and libvirt-python's blocking helpers.

``python -m benchmarks transfer`` (or ``python -m benchmarks.transfer``);
``--quick`` is a smoke test with small sizes. The contenders, how each is
timed and the targets are in docs/benchmarks.md ("The transfer benchmark").
Exit status: 0 every target met, 1 one missed, 2 a transfer failed or moved
wrong data.
"""

from __future__ import annotations

__all__ = ["compare_files", "main"]

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ._bench import REPO, RESULT_PREFIX, SETTLE_S, Bench, TransferFailed
from ._contenders import Group
from ._files import compare_files, sparse_layout, write_dense, write_sparse
from ._machine import cpu_times, machine_summary, page_cache_rates, python_ns_per_step
from ._report import report

if TYPE_CHECKING:
    from aiovirtstream.testing import Sandbox

MiB = 1 << 20
GiB = 1 << 30


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


def _run_child(args: argparse.Namespace) -> int:
    """Be one contender's child process (``--child``): time its operation, print the figures."""
    from benchmarks._probes import emit

    if args.child == "blocking":
        from ._blocking import run_blocking

        emit(run_blocking(args), RESULT_PREFIX)
    else:
        from ._child import run_ours, run_probe

        emit((run_ours if args.child == "ours" else run_probe)(args), RESULT_PREFIX)
    return 0


def _prepare(
    sb: Sandbox,
    work: Path,
    dense_size: int,
    sparse_size: int,
    extents: int,
    extent_size: int,
    fsync: bool,
) -> tuple[str, list[Group]]:
    """The pool, its two volumes and their source files, uploaded and checked.

    Returns the pool's name and the groups to run (``fsync``: with the
    durable download contenders).
    """
    pool = sb.create_pool("bench")
    dense_vol = sb.create_volume(pool, "dense", dense_size)
    sparse_vol = sb.create_volume(pool, "sparse", sparse_size)
    print(
        f"preparing: {dense_size / MiB:.0f} MiB dense, {sparse_size / MiB:.0f} MiB "
        f"sparse with {extents} x {extent_size // MiB} MiB of data, in {work}",
        flush=True,
    )
    dense_src, sparse_src = work / "dense.src", work / "sparse.src"
    write_dense(dense_src, dense_size)
    offsets = sparse_layout(sparse_size, extents, extent_size, seed=20240601)
    write_sparse(sparse_src, sparse_size, offsets, extent_size, seed=20240601)
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
                with_fsync=fsync,
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
                with_fsync=fsync,
            )
        )
    return pool.name, groups


def main(argv: list[str] | None = None, *, direct: bool = False) -> int:
    """Run the benchmark (``direct``: in this process); 0 if every target is met."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = _parse(argv)
    if args.child:
        return _run_child(args)
    if not direct:
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
    cpu_times0 = cpu_times()
    work = Path(tempfile.mkdtemp(prefix="aiovirtstream-bench-"))
    try:
        with Sandbox() as sb:
            pool, groups = _prepare(
                sb, work, dense_size, sparse_size, extents, extent_size, args.fsync
            )
            if args.only:
                groups = [g for g in groups if g.workload == args.only]
            if args.profile_dir:
                Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
            page_cache = [page_cache_rates(work)]
            python_speed = [python_ns_per_step()]
            settle = args.settle if args.settle is not None else (0.0 if quick else SETTLE_S)
            bench = Bench(sb.uri, pool, sb.pid, work, args.verbose, args.parallel, settle=settle)
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
            page_cache.append(page_cache_rates(work))
            python_speed.append(python_ns_per_step())
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
    print(machine_summary(started, cpu_times0, args.parallel, page_cache, python_speed))
    print(text)
    return 0 if all(t.passed for t in targets) else 1
