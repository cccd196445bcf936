"""The aiovirtstream children: ``--child ours`` and ``--child probe``.

``ours`` connects once with ``aiovirtstream.connect`` and times one
``upload()`` / ``download()``; with ``--ticker`` a 1 ms ticker runs during
it for the loop lag (the ticker costs CPU and time of its own, so speed, CPU
and RSS are read from the runs without it). ``probe`` lets virsh move the
data while it runs the same ticker on a loop that moves nothing: the floor
that our loop lag is to be read against.
"""

from __future__ import annotations

__all__ = ["run_ours", "run_probe"]

import argparse
import asyncio
import time
from typing import Any

from benchmarks._lag import tick
from benchmarks._probes import (
    cpu_seconds,
    percentile,
    reset_peak_rss,
    status_bytes,
    usage,
    usage_delta,
)

from ._virsh import virsh_argv, virsh_seconds


def run_probe(args: argparse.Namespace) -> dict[str, Any]:
    """virsh moves the data while this process, idle otherwise, runs the ticker."""

    async def run() -> dict[str, Any]:
        import aiovirtstream

        conn = await aiovirtstream.connect(args.uri)
        try:
            lags: list[float] = []
            stamps: list[float] = []
            stop = asyncio.Event()
            argv = virsh_argv(args.uri, args.pool, args.op, args.vol, args.file, args.sparse)
            # Forked before the ticker starts: the fork is this loop's own work.
            virsh = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
            task = asyncio.create_task(tick(lags, stop, stamps))
            out, _ = await virsh.communicate()
            exited = time.perf_counter()
            stop.set()
            await task
        finally:
            await aiovirtstream.aclose_connection(conn)
        op_s = virsh_seconds(out.decode())
        if virsh.returncode != 0 or op_s is None:
            raise SystemExit(f"virsh failed ({virsh.returncode}): {out.decode()}")
        # Only the ticks of virsh's operation (its last op_s seconds), not
        # of its start-up and connect, which load the machine less.
        during = [lag for lag, at in zip(lags, stamps, strict=True) if at >= exited - op_s]
        return {"op_s": op_s, "op_cpu_s": None, "lags": [round(lag, 6) for lag in during]}

    return asyncio.run(run())


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Time one ``upload()`` / ``download()`` (``args`` from the parent's command line)."""

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
            # slower).
            stop_idle = asyncio.Event()
            cpu_idle0 = cpu_seconds()
            idle_task = asyncio.create_task(tick(idle, stop_idle))
            await asyncio.sleep(0.25)
            stop_idle.set()
            await idle_task
            ticker_cpu_per_s = (cpu_seconds() - cpu_idle0) / 0.25
        conn = await aiovirtstream.connect(args.uri)
        try:
            lags: list[float] = []
            stop = asyncio.Event()
            reset = reset_peak_rss()
            base = status_bytes("VmRSS")
            task = asyncio.create_task(tick(lags, stop)) if args.ticker else None
            await asyncio.sleep(0)
            profiler = None
            if args.profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            usage0, t0 = usage(), time.perf_counter()
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
            op_s, usage_op = time.perf_counter() - t0, usage_delta(usage0)
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
            stop.set()
            if task is not None:
                await task
            peak = status_bytes("VmHWM")
        finally:
            await aiovirtstream.aclose_connection(conn)
        return {
            "op_s": op_s,
            **usage_op,
            "rss_base": base,
            "rss_peak": peak,
            "hwm_reset": reset,
            "data_bytes": result.data_bytes,
            "hole_bytes": result.hole_bytes,
            "lags": [round(lag, 6) for lag in lags],
            "idle_lag_p99": percentile(idle, 99),
            "ticker_cpu_per_s": ticker_cpu_per_s,
        }

    return asyncio.run(run())
