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

import argparse
import asyncio
import contextlib
import cProfile
import gc
import importlib.metadata as metadata
import io
import math
import pstats
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import libvirt
import libvirtaio

from aiovirtstream._events import EventImpl

READABLE: int = libvirt.VIR_EVENT_HANDLE_READABLE
WRITABLE: int = libvirt.VIR_EVENT_HANDLE_WRITABLE
THROUGHPUT_TARGET = 2.0  # ours / libvirtaio, hook calls per second
P99_MARGIN = 1.10  # "lower latency": lower median, and a p99 at most 10 % above (noise)
ROUND_SECONDS = 0.15  # one timed batch of hook calls
perf = time.perf_counter

HandleCb = Callable[[int, int, int, Any], None]
TimerCb = Callable[[int, Any], None]


def _no_free(opaque: object) -> None:
    """Free function for both implementations: freeing is libvirt's cost, not theirs."""


def _handle_cb(watch: int, fd: int, events: int, opaque: object) -> None:
    """Handle callback of the throughput runs (a WRITABLE watch may fire)."""


def _timer_cb(timer: int, opaque: object) -> None:
    """Timer callback of the throughput runs (their timers never fire)."""


@dataclass
class Hooks:
    """One implementation's six hooks, and how to wait for its deferred frees."""

    name: str
    add_handle: Callable[[int, int, HandleCb, Any], int]
    update_handle: Callable[[int, int], None]
    remove_handle: Callable[[int], int]
    add_timeout: Callable[[int, TimerCb, Any], int]
    update_timeout: Callable[[int, int], None]
    remove_timeout: Callable[[int], int]
    drain: Callable[[], Awaitable[None]]


def make_ours() -> Hooks:
    """aiovirtstream's EventImpl, bound to the running loop."""
    impl = EventImpl(invoke_free=_no_free)
    impl.bind()
    return Hooks(
        "aiovirtstream",
        impl.add_handle,
        impl.update_handle,
        impl.remove_handle,
        impl.add_timeout,
        impl.update_timeout,
        impl.remove_timeout,
        impl.wait_frees,
    )


def make_libvirtaio() -> Hooks:
    """libvirtaio's virEventAsyncIOImpl on the running loop (its ids start at 0)."""
    impl = libvirtaio.virEventAsyncIOImpl(loop=asyncio.get_running_loop())
    return Hooks(
        "libvirtaio",
        impl._add_handle,
        impl._update_handle,
        impl._remove_handle,
        impl._add_timeout,
        impl._update_timeout,
        impl._remove_timeout,
        impl.drain,
    )


IMPLS: dict[str, Callable[[], Hooks]] = {"ours": make_ours, "libvirtaio": make_libvirtaio}


@contextlib.contextmanager
def libvirtaio_frees_patched() -> Iterator[None]:
    """libvirtaio frees through libvirt.virEventInvokeFreeCallback, which needs libvirt's opaque."""
    original = libvirt.virEventInvokeFreeCallback
    libvirt.virEventInvokeFreeCallback = _no_free
    try:
        yield
    finally:
        libvirt.virEventInvokeFreeCallback = original


# ---------------------------------------------------------------- throughput

Workload = Callable[[Hooks, int, int], int]


def handle_cycle(h: Hooks, fd: int, n: int) -> int:
    """n x (add READABLE, widen to READABLE|WRITABLE, narrow back, remove); returns hook calls."""
    add, update, remove = h.add_handle, h.update_handle, h.remove_handle
    for _ in range(n):
        watch = add(fd, READABLE, _handle_cb, None)
        update(watch, READABLE | WRITABLE)
        update(watch, READABLE)
        remove(watch)
    return 4 * n


def timer_cycle(h: Hooks, fd: int, n: int) -> int:
    """n x (add disabled, arm at 1 s, disable, remove); returns hook calls."""
    add, update, remove = h.add_timeout, h.update_timeout, h.remove_timeout
    for _ in range(n):
        timer = add(-1, _timer_cb, None)
        update(timer, 1000)
        update(timer, -1)
        remove(timer)
    return 4 * n


def watch_toggle(h: Hooks, fd: int, n: int) -> int:
    """n x the two updates libvirt makes around every blocking call (socket watch off, on)."""
    update = h.update_handle
    watch = h.add_handle(fd, READABLE, _handle_cb, None)
    for _ in range(n):
        update(watch, 0)
        update(watch, READABLE)
    h.remove_handle(watch)
    return 2 * n + 2


THROUGHPUT_ROWS: list[tuple[str, Workload, bool]] = [
    ("handles add/update x2/remove, loop thread", handle_cycle, False),
    ("handles add/update x2/remove, worker thread", handle_cycle, True),
    ("timers add/update x2/remove, loop thread", timer_cycle, False),
    ("timers add/update x2/remove, worker thread", timer_cycle, True),
    ("socket watch off/on (blocking call), loop", watch_toggle, False),
    ("socket watch off/on (blocking call), worker", watch_toggle, True),
]


@dataclass
class Outcome:
    """Rates or samples of one implementation on one row, and what went wrong."""

    values: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


Rows = list[tuple[str, bool, dict[str, Outcome]]]  # label, flag, outcome per implementation


class LoopErrors:
    """Collects exceptions the loop reports (failing callbacks), by implementation."""

    def __init__(self) -> None:
        self.current = ""
        self.by_impl: dict[str, list[str]] = {}

    def handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        text = f"{type(error).__name__}: {error}" if error else str(context.get("message"))
        self.by_impl.setdefault(self.current, []).append(text)


async def timed_round(
    h: Hooks, workload: Workload, n: int, threaded: bool, profiles: ProfilePair | None = None
) -> float:
    """Hook calls per second of one batch, deferred frees included."""
    a, b = socket.socketpair()
    try:
        run = workload
        if profiles is not None:
            run = profiles.wrap_worker(workload) if threaded else workload
        start = perf()
        if threaded:
            calls = await asyncio.to_thread(run, h, a.fileno(), n)
        else:
            calls = run(h, a.fileno(), n)
        async with asyncio.timeout(10):
            await h.drain()
        elapsed = perf() - start
    finally:
        for _ in range(3):  # let loop-side syncs of this fd run before it closes
            await asyncio.sleep(0)
        a.close()
        b.close()
    return calls / elapsed


async def throughput(rounds: int, errors: LoopErrors) -> Rows:
    """Median-worthy rates per row and implementation, rounds interleaved."""
    results = []
    for label, workload, threaded in THROUGHPUT_ROWS:
        outcomes = {name: Outcome() for name in IMPLS}
        sizes: dict[str, int] = {}
        for name, make in IMPLS.items():  # calibrate: a round of about ROUND_SECONDS
            errors.current = name
            try:
                rate = await timed_round(make(), workload, 300, threaded)
                sizes[name] = max(300, int(rate * ROUND_SECONDS / 4))
            except Exception as error:  # noqa: BLE001 - reported in the table
                outcomes[name].errors.append(f"{type(error).__name__}: {error}")
        for _ in range(rounds):
            for name, make in IMPLS.items():
                if name not in sizes or outcomes[name].errors:
                    continue
                errors.current = name
                try:
                    rate = await timed_round(make(), workload, sizes[name], threaded)
                    outcomes[name].values.append(rate)
                except Exception as error:  # noqa: BLE001 - reported in the table
                    outcomes[name].errors.append(f"{type(error).__name__}: {error}")
        for name in IMPLS:
            outcomes[name].errors += errors.by_impl.pop(name, [])
        results.append((label, threaded, outcomes))
    return results


# ---------------------------------------------------------------- latency


async def fd_latency(h: Hooks, samples: int) -> list[float]:
    """Seconds from a peer's write (another thread) to the READABLE callback running."""
    a, b = socket.socketpair()
    a.setblocking(False)
    fired = threading.Event()
    stamp = [0.0]

    def on_readable(watch: int, fd: int, events: int, opaque: object) -> None:
        stamp[0] = perf()
        with contextlib.suppress(BlockingIOError):
            a.recv(4096)
        fired.set()

    def writer() -> list[float]:
        out = []
        for _ in range(samples):
            time.sleep(0.0002)  # the loop goes back to sleep in select()
            fired.clear()
            start = perf()
            b.send(b"x")
            out.append(stamp[0] - start if fired.wait(1.0) else math.inf)
        return out

    watch = h.add_handle(a.fileno(), READABLE, on_readable, None)
    try:
        await asyncio.sleep(0)
        return await asyncio.to_thread(writer)
    finally:
        h.remove_handle(watch)
        await h.drain()
        await asyncio.sleep(0)
        a.close()
        b.close()


async def timer_latency(h: Hooks, interval_ms: int, samples: int) -> list[float]:
    """Seconds from add_timeout(interval_ms) on the loop thread to the callback running."""
    loop = asyncio.get_running_loop()
    out = []
    for _ in range(samples):
        fired: asyncio.Future[float] = loop.create_future()

        def on_timer(timer: int, opaque: object, fired: asyncio.Future[float] = fired) -> None:
            now = perf()
            h.remove_timeout(timer)
            fired.set_result(now)

        start = perf()
        h.add_timeout(interval_ms, on_timer, None)
        out.append(await fired - start)
    await h.drain()
    return out


async def timer_from_thread_latency(h: Hooks, samples: int, cap: float) -> list[float]:
    """Seconds from update_timeout(0) in a worker thread to the callback; inf if over ``cap``."""
    fired = threading.Event()
    stamp = [0.0]

    def on_timer(timer: int, opaque: object) -> None:
        stamp[0] = perf()
        h.update_timeout(timer, -1)
        fired.set()

    def worker() -> list[float]:
        out = []
        for _ in range(samples):
            time.sleep(0.0002)
            fired.clear()
            start = perf()
            h.update_timeout(timer, 0)
            out.append(stamp[0] - start if fired.wait(cap) else math.inf)
        return out

    timer = h.add_timeout(-1, on_timer, None)
    try:
        return await asyncio.to_thread(worker)
    finally:
        await asyncio.sleep(0.01)
        h.remove_timeout(timer)
        await h.drain()


LatencyRun = Callable[[Hooks, int], Awaitable[list[float]]]


def _timer_run(interval_ms: int) -> LatencyRun:
    return lambda h, n: timer_latency(h, interval_ms, n)


def latency_rows(quick: bool) -> list[tuple[str, LatencyRun, int, bool]]:
    """(label, run, samples per implementation, counts for the target)."""
    scale = 4 if quick else 1
    return [
        ("peer write -> handle callback", fd_latency, 3000 // scale, True),
        (
            "0 ms timer add -> fired (loop thread)",
            lambda h, n: timer_latency(h, 0, n),
            5000 // scale,
            True,
        ),
        (
            "1 ms timer add -> fired (loop thread)",
            lambda h, n: timer_latency(h, 1, n),
            1000 // scale,
            True,
        ),
        (
            "0 ms timer armed from worker -> fired",
            lambda h, n: timer_from_thread_latency(h, n, 0.02),
            200 // scale,
            False,
        ),
    ]


async def latency(
    rounds: int, quick: bool, errors: LoopErrors
) -> list[tuple[str, bool, dict[str, Outcome]]]:
    """Latency samples per row and implementation, rounds interleaved."""
    results = []
    for label, run, samples, counted in latency_rows(quick):
        outcomes = {name: Outcome() for name in IMPLS}
        per_round = max(1, samples // rounds)
        for _ in range(rounds):
            for name, make in IMPLS.items():
                if outcomes[name].errors:
                    continue
                errors.current = name
                n = per_round
                if not counted and name == "libvirtaio":
                    n = max(1, per_round // 10)  # each miss costs the cap
                try:
                    outcomes[name].values += await run(make(), n)
                except Exception as error:  # noqa: BLE001 - reported in the table
                    outcomes[name].errors.append(f"{type(error).__name__}: {error}")
        for name in IMPLS:
            outcomes[name].errors += errors.by_impl.pop(name, [])
        results.append((label, counted, outcomes))
    return results


async def debug_mode_probe() -> dict[str, str]:
    """Hooks called from a worker thread on a loop in asyncio debug mode: what breaks.

    Debug mode raises on a loop method called from a foreign thread where
    non-debug mode silently skips waking the loop.
    """
    loop = asyncio.get_running_loop()
    errors = LoopErrors()
    loop.set_exception_handler(errors.handler)
    verdicts = {}
    for name, make in IMPLS.items():
        errors.current = name
        h = make()
        a, b = socket.socketpair()

        def work(h: Hooks = h, fd: int = a.fileno()) -> None:
            handle_cycle(h, fd, 100)
            timer_cycle(h, fd, 100)
            h.remove_timeout(h.add_timeout(0, _timer_cb, None))

        problems = []
        try:
            await asyncio.to_thread(work)
            async with asyncio.timeout(1):
                await h.drain()
        except Exception as error:  # noqa: BLE001 - that is the finding
            problems.append(f"{type(error).__name__}: {error}")
        await asyncio.sleep(0.01)
        a.close()
        b.close()
        del h
        gc.collect()  # a task made but never scheduled complains when collected
        problems += errors.by_impl.pop(name, [])
        verdicts[name] = problems[0] if problems else "ok"
    return verdicts


# ---------------------------------------------------------------- profile


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
    """Where aiovirtstream's time goes in each throughput row and in the fd wake-up."""
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


# ---------------------------------------------------------------- report


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def fmt_rate(value: float) -> str:
    return f"{value / 1e6:6.2f} M/s" if value >= 1e6 else f"{value / 1e3:6.0f} k/s"


def fmt_us(value: float) -> str:
    return "   never" if math.isinf(value) else f"{value * 1e6:8.1f}"


def report_throughput(rows: Rows) -> tuple[bool, list[str]]:
    """Print the throughput table; return (all targets met, error notes)."""
    ok = True
    notes: list[str] = []
    print(
        f"\nHook throughput (hook calls/s, median of rounds; target ours >= {THROUGHPUT_TARGET:g}x)"
    )
    print(f"{'workload':46} {'aiovirtstream':>13} {'libvirtaio':>13} {'ratio':>7}  result")
    for label, _threaded, outcomes in rows:
        ours, theirs = outcomes["ours"], outcomes["libvirtaio"]
        for name, outcome in outcomes.items():
            for error in sorted(set(outcome.errors))[:3]:
                notes.append(f"{name} / {label}: {error}")
        if not ours.values:
            ok = False
            print(f"{label:46} {'ERROR':>13} {'':>13} {'':>7}  FAIL")
            continue
        mine = median(ours.values)
        if not theirs.values:
            print(
                f"{label:46} {fmt_rate(mine):>13} {'ERROR':>13} {'-':>7}  PASS (libvirtaio failed)"
            )
            continue
        other = median(theirs.values)
        ratio = mine / other
        passed = ratio >= THROUGHPUT_TARGET and not ours.errors
        ok &= passed
        flag = " (libvirtaio errors)" if theirs.errors else ""
        print(
            f"{label:46} {fmt_rate(mine):>13} {fmt_rate(other):>13} {ratio:6.2f}x  "
            f"{'PASS' if passed else 'FAIL'}{flag}"
        )
    return ok, notes


def report_latency(rows: Rows) -> tuple[bool, list[str]]:
    """Print the latency table; return (all counted targets met, error notes)."""
    ok = True
    notes: list[str] = []
    margin = round((P99_MARGIN - 1) * 100)
    target = f"target: ours lower median, p99 at most {margin} % above"
    print(f"\nWake-up latency (microseconds; {target})")
    print(
        f"{'event':40} {'ours med':>9} {'p99':>8} {'libvirtaio med':>15} {'p99':>8} "
        f"{'med ratio':>9}  result"
    )
    for label, counted, outcomes in rows:
        ours, theirs = outcomes["ours"], outcomes["libvirtaio"]
        for name, outcome in outcomes.items():
            for error in sorted(set(outcome.errors))[:3]:
                notes.append(f"{name} / {label}: {error}")
            missed = sum(math.isinf(v) for v in outcome.values)
            if missed:
                notes.append(f"{name} / {label}: {missed} of {len(outcome.values)} never fired")
        if not ours.values or not theirs.values:
            ok &= not counted or bool(ours.values)
            print(f"{label:40} {'ERROR' if not ours.values else '':>9} ... libvirtaio ERROR")
            continue
        m1, p1 = median(ours.values), percentile(ours.values, 0.99)
        m2, p2 = median(theirs.values), percentile(theirs.values, 0.99)
        passed = m1 < m2 and p1 <= p2 * P99_MARGIN and not ours.errors
        ratio = "-" if math.isinf(m2) else f"{m1 / m2:.2f}x"
        result = ("PASS" if passed else "FAIL") if counted else "(info)"
        if counted:
            ok &= passed
        print(
            f"{label:40} {fmt_us(m1):>9} {fmt_us(p1):>8} {fmt_us(m2):>15} {fmt_us(p2):>8} "
            f"{ratio:>9}  {result}"
        )
    return ok, notes


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


if __name__ == "__main__":
    sys.exit(main())
