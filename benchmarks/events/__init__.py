"""Micro-benchmark: aiovirtstream's EventImpl against libvirt-python's libvirtaio.

libvirt accepts one registered event implementation per process, so both are
timed by calling their hook methods directly, in the same run, on the same
loop; neither is registered with libvirt. Free functions are no-ops for both
(libvirtaio's ``libvirt.virEventInvokeFreeCallback`` is patched for the run).

Targets (from the issue), printed as PASS/FAIL:

* hook throughput: ours >= 2x libvirtaio, for add/update/remove of handles and
  timers called from the loop's thread and from a worker thread (libvirt calls
  the hooks from whichever thread makes a blocking call);
* wake-up latency: ours lower, median and p99, for a peer's write reaching the
  handle callback and for a 0 ms / 1 ms timer from add to firing.

``python -m benchmarks events [--quick] [--profile] [--uvloop]``
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import asyncio
import importlib.metadata as metadata
import sys

import libvirt

from ._debug_mode import debug_mode_probe
from ._hooks import LoopErrors, libvirtaio_frees_patched
from ._latency import latency
from ._profile import profile_ours
from ._report import THROUGHPUT_TARGET, report_latency, report_throughput
from ._throughput import throughput


async def run(args: argparse.Namespace) -> int:
    """The whole benchmark, on one loop."""
    loop = asyncio.get_running_loop()
    errors = LoopErrors()
    loop.set_exception_handler(errors.handler)
    rounds = 3 if args.quick else 7
    v = libvirt.getVersion()
    print(
        f"Python {sys.version.split()[0]}, {type(loop).__module__}.{type(loop).__name__}, "
        f"libvirt {v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}, "
        f"libvirt-python {metadata.version('libvirt-python')}, {rounds} rounds"
    )
    with libvirtaio_frees_patched():
        tp_ok, tp_notes = report_throughput(await throughput(rounds, errors))
        lat_ok, lat_notes = report_latency(await latency(rounds, args.quick, errors))
        if args.profile:
            await profile_ours(args.quick)
    notes = tp_notes + lat_notes
    print("\nHooks called from a worker thread, asyncio debug mode (checks foreign-thread use):")
    with libvirtaio_frees_patched():
        verdicts = await asyncio.to_thread(asyncio.run, debug_mode_probe(), debug=True)
    for name, verdict in verdicts.items():
        print(f"  {name:14} {verdict}")
    if notes:
        print("\nErrors and misses:")
        for note in notes:
            print(f"  - {note}")
    print(
        f"\nTargets: hook throughput >= {THROUGHPUT_TARGET:g}x: {'PASS' if tp_ok else 'FAIL'}; "
        f"lower wake-up latency: {'PASS' if lat_ok else 'FAIL'}"
    )
    if not (tp_ok and lat_ok) and not args.profile:
        print("(python -m benchmarks events --profile shows where aiovirtstream's time goes)")
    return 0 if tp_ok and lat_ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m benchmarks events``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks events", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and samples")
    parser.add_argument("--profile", action="store_true", help="cProfile aiovirtstream's runs")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    # Options meant for other benchmarks (python -m benchmarks --rounds 3) are not errors here.
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown:
        print(f"benchmarks.events: ignoring unknown options {unknown}", file=sys.stderr)
    if args.uvloop:
        import uvloop

        return uvloop.run(run(args))
    return asyncio.run(run(args))
