"""The scale benchmark's rows, its table (Markdown) and issue 24's targets."""

from __future__ import annotations

__all__ = ["CONTENDERS", "Row", "report"]

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MiB, GiB = 1 << 20, 1 << 30
CONTENDERS = ("ours", "tp-conn", "tp-shared")
RunMap = dict[tuple["Row", str], list[dict[str, Any]]]


@dataclass(frozen=True)
class Row:
    """One configuration: its phases (run one after the other), daemons and streams a phase."""

    ops: tuple[str, ...]
    daemons: int
    streams: int

    @property
    def label(self) -> str:
        return f"{' then '.join(self.ops)} d={self.daemons} n={self.streams}"

    @classmethod
    def sweep(cls, streams: list[int], daemons: list[int]) -> list[Row]:
        return [
            cls((op,), d, n)
            for op in ("download", "upload")
            for d in daemons
            for n in streams
            if n >= d
        ]

    @classmethod
    def mixed(cls) -> Row:
        """Issue 24's first target: 32 downloads, then 32 uploads, on one connection."""
        return cls(("download", "upload"), 1, 32)

    @classmethod
    def consoles(cls) -> Row:
        return cls(("consoles",), 0, 0)


def _figures(run: dict[str, Any], size: int, streams: int) -> dict[str, float]:
    phases = run["phases"]
    moved = size * streams * len(phases)
    seconds = sum(p["seconds"] for p in phases)
    return {
        "mibs": moved / MiB / seconds,
        "cpu_gib": sum(p["cpu"] for p in phases) / (moved / GiB),
        "rss": run["rss_above"] / MiB,
        "threads": run["threads"],
        "py_threads": run["py_threads"],
        "lag_p50": run["lag_p50"] * 1e3,
        "lag_p99": run["lag_p99"] * 1e3,
        "lag_max": run["lag_max"] * 1e3,
        "first": phases[0]["done"][0],
        "last": seconds,
        "spread": max(p["done"][-1] / p["done"][0] for p in phases),
    }


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


@dataclass
class _Target:
    what: str
    value: float
    limit: float
    passed: bool

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"| {self.what} | {self.value:.2f} | {self.limit:g} | {verdict} |"


def _check(what: str, value: float, limit: float, ok: Callable[[float, float], bool]) -> _Target:
    return _Target(what, value, limit, ok(value, limit))


def _le(value: float, limit: float) -> bool:
    return value <= limit


def _lt(value: float, limit: float) -> bool:
    return value < limit


def _ge(value: float, limit: float) -> bool:
    return value >= limit


def report(
    runs: RunMap, rows: list[Row], args: argparse.Namespace, consoles: dict[str, Any] | str | None
) -> tuple[str, bool]:
    """The table and the targets as Markdown; True if every target is met."""
    med: dict[tuple[Row, str], dict[str, float]] = {}
    for (row, contender), results in runs.items():
        if row != Row.consoles():
            med[row, contender] = _medians([_figures(r, args.size, row.streams) for r in results])
    lines = [
        f"Medians of {args.rounds} round(s); {args.size // MiB} MiB a stream; "
        "x1: MiB/s over the same contender's one stream; x pool: ours over tp-conn / tp-shared; "
        "first / last: the first stream's end and the last phase's end; last/first: the "
        "largest of the phases' ratios.",
        "",
        "| phases | daemons | streams | contender | MiB/s | x1 | x pool | CPU s/GiB | RSS+ MiB "
        "| threads (py) | lag p50/p99/max ms | first / last s | last/first |",
        "| --- | ---: | ---: | --- |" + " ---: |" * 9,
    ]
    for row in rows:
        for contender in CONTENDERS:
            m = med.get((row, contender))
            if m is None:
                continue
            one = med.get((Row(row.ops, 1, 1), contender))
            x1 = f"{m['mibs'] / one['mibs']:.2f}" if one and len(row.ops) == 1 else "-"
            vs = "-"
            if contender == "ours":
                vs = "/".join(f"{m['mibs'] / med[row, c]['mibs']:.2f}" for c in CONTENDERS[1:])
            lines.append(
                f"| {' then '.join(row.ops)} | {row.daemons} | {row.streams} | {contender} "
                f"| {m['mibs']:.0f} | {x1} | {vs} | {m['cpu_gib']:.2f} | {m['rss']:.1f} "
                f"| {m['threads']:.0f} ({m['py_threads']:.0f}) "
                f"| {m['lag_p50']:.2f}/{m['lag_p99']:.2f}/{m['lag_max']:.1f} "
                f"| {m['first']:.2f} / {m['last']:.2f} | {m['spread']:.2f} |"
            )
    pool = args.pool_threads
    targets: list[_Target] = []
    mixed = med.get((Row.mixed(), "ours"))
    if mixed:
        name = "32 downloads then 32 uploads, 1 connection:"
        targets += [
            _check(f"{name} peak threads", mixed["threads"], 16, _le),
            _check(f"{name} RSS above base, MiB", mixed["rss"], 48, _le),
            _check(f"{name} loop lag p99, ms", mixed["lag_p99"], 5, _lt),
        ]
    for op in ("download", "upload"):
        row = Row((op,), 4, 64)
        ours = med.get((row, "ours"))
        if not ours:
            continue
        name = f"64 {op}s over 4 daemons:"
        targets += [
            _check(
                f"{name} peak threads (main + 4 connections + pool of {pool})",
                ours["threads"],
                1 + 4 + pool,
                _le,
            ),
            _check(f"{name} RSS above base, MiB", ours["rss"], 64, _le),
            _check(f"{name} loop lag p99, ms", ours["lag_p99"], 5, _lt),
        ]
        for other in CONTENDERS[1:]:
            theirs = med[row, other]
            targets.append(
                _check(f"{name} MiB/s, ours / {other}", ours["mibs"] / theirs["mibs"], 1, _ge)
            )
            targets.append(
                _check(
                    f"{name} CPU s/GiB, ours / {other}", ours["cpu_gib"] / theirs["cpu_gib"], 1, _lt
                )
            )
    for row in rows:
        ours = med.get((row, "ours"))
        if ours and len(row.ops) == 1 and row.streams in (16, 64):
            what = f"{row.ops[0]}s, {row.streams} over {row.daemons} daemon(s): last / first"
            targets.append(_check(what, ours["spread"], 1.5, _le))
    console_lines: list[str] = []
    if isinstance(consoles, str):
        console_lines = ["", f"Console case not run: {consoles}"]
        targets.append(_Target("consoles: not run", float("nan"), 0, False))
    elif consoles is not None:
        console_lines, console_targets = _consoles(
            runs[Row.consoles(), "ours"], pool, args.console_pause
        )
        targets += console_targets
    lines += console_lines
    lines += ["", "| target (issue 24) | measured | limit | |", "| --- | ---: | ---: | --- |"]
    lines += [target.line() for target in targets]
    return "\n".join(lines), all(target.passed for target in targets)


def _consoles(
    results: list[dict[str, Any]], pool: int, pause: float
) -> tuple[list[str], list[_Target]]:
    def med(*keys: str) -> float:
        values = []
        for result in results:
            value: Any = result
            for key in keys:
                value = value[key]
            values.append(value)
        return float(statistics.median(values))

    ports = results[0]["ports"]
    spread = med("loaded", "count_max") / max(med("loaded", "count_min"), 1)
    lines = [
        "",
        f"Consoles: {ports} consoles and channels open at once on one connection, each "
        f"sending a line and awaiting its echo every {pause * 1e3:g} ms; 16 transfers "
        "(8 downloads, 8 uploads, repeated) on another connection, same loop.",
        "",
        "| window | seconds | transfers | round trip p50/p99/max ms | worst port p99 ms "
        "| round trips a port min/median/max |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for window in ("idle", "loaded"):
        lines.append(
            f"| {window} | {med(window, 'seconds'):.1f} | {med(window, 'transfers'):.0f} "
            f"| {med(window, 'rtt_p50') * 1e3:.1f}/{med(window, 'rtt_p99') * 1e3:.1f}/"
            f"{med(window, 'rtt_max') * 1e3:.0f} | {med(window, 'worst_port_p99') * 1e3:.1f} "
            f"| {med(window, 'count_min'):.0f}/{med(window, 'count_median'):.0f}/"
            f"{med(window, 'count_max'):.0f} |"
        )
    lines.append(
        f"\nWhole child: peak threads {med('threads'):.0f} ({med('py_threads'):.0f} Python), "
        f"RSS above base {med('rss_above') / MiB:.1f} MiB, loop lag while loaded "
        f"p50/p99/max {med('lag_p50') * 1e3:.2f}/{med('lag_p99') * 1e3:.2f}/"
        f"{med('lag_max') * 1e3:.1f} ms."
    )
    name = f"{ports} consoles + 16 transfers:"
    targets = [
        _check(f"{name} round trip p99, ms", med("loaded", "rtt_p99") * 1e3, 20, _lt),
        _check(f"{name} round trips, most / fewest port", spread, 1.5, _le),
        _check(
            f"{name} peak threads (1 + 2 connections + pool of {pool})",
            med("threads"),
            3 + pool,
            _le,
        ),
        _check(f"{name} RSS above base, MiB", med("rss_above") / MiB, 64, _le),
    ]
    return lines, targets
