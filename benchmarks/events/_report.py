"""The events benchmark's two tables, each row with its target's verdict.

Throughput: ours >= THROUGHPUT_TARGET x libvirtaio's hook calls a second.
Latency: ours a lower median, and a p99 at most P99_MARGIN over theirs.
"""

from __future__ import annotations

__all__ = ["P99_MARGIN", "THROUGHPUT_TARGET", "report_latency", "report_throughput"]

import math

from ._hooks import Rows

THROUGHPUT_TARGET = 2.0  # ours / libvirtaio, hook calls per second
P99_MARGIN = 1.10  # "lower latency": lower median, and a p99 at most 10 % above (noise)


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
