"""The transfer benchmark's report: the table of medians, loop lag, CPU and the targets.

Everything but the targets is informational: what ours costs, where its
CPU goes (user or system time, faults, switches, libvirtd's share), and
what the page cache, ``fsync`` and a volume holding data change.
"""

from __future__ import annotations

__all__ = ["report"]

import operator
import statistics
from collections.abc import Callable

from benchmarks._probes import percentile

from ._bench import Bench
from ._contenders import FSYNC, OVER_DATA, PAGE_CACHE, PAGE_CACHE_FSYNC, Group, Run
from ._targets import Target, per_round, target_lines, targets

MiB = 1 << 20
GiB = 1 << 30
Medians = dict[tuple[str, str], float]  # (group name, contender): a median


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
    rounds = per_round(bench, group.name, contender, "blocking", figure)
    spread = f" (rounds {min(rounds):.2f}-{max(rounds):.2f})" if rounds else ""
    return (
        f"  {group.name:<16} {group.label(contender)} {figures[contender]:.2f} / "
        f"{group.label('blocking')} {figures['blocking']:.2f} = "
        f"{figures[contender] / figures['blocking']:.2f}x{spread}"
    )


def _lag_text(lags: list[float], note: str) -> str:
    """'p50 0.136 ms  p99 1.944 ms  max 28.743 ms  (6737 ticks; note)'."""
    return (
        f"p50 {percentile(lags, 50) * 1000:6.3f} ms  p99 {percentile(lags, 99) * 1000:6.3f} ms  "
        f"max {max(lags or [0]) * 1000:7.3f} ms  ({len(lags)} ticks; {note})"
    )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(value: float | None, spec: str) -> str:
    if value is None or value != value:
        return "-"
    return format(value, spec)


def _table(bench: Bench, groups: list[Group], rounds: int) -> tuple[list[str], Medians, Medians]:
    """The table (a line a contender of each group); the medians of time and of op CPU."""
    lines = []
    header = (
        f"{'workload':16} {'contender':15} {'median s':>9} {'min-max s':>13} {'MiB/s':>7} "
        f"{'op CPU s':>8} {'proc s':>7} {'proc CPU':>8} {'dmn CPU':>7} "
        f"{'proc peak':>9} {'above base med/max':>18}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    medians: Medians = {}
    op_cpu: Medians = {}
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
    return lines, medians, op_cpu


def _loop_lag(bench: Bench, groups: list[Group]) -> tuple[list[str], list[float], dict[str, float]]:
    """Our loop lag against the probe's, a group a line; every lag, and each group's p99."""
    lines = [
        "",
        "aiovirtstream loop lag (the 'aiovirtstream+t' runs: a 1 ms ticker during the "
        "transfer; lag = gap - 1 ms), and below it the same ticker in a process that "
        "moves nothing while virsh does the transfer ('virsh, t apart': what this machine "
        "gives any loop under that load):",
    ]
    all_lags: list[float] = []
    lag_p99: dict[str, float] = {}
    for group in groups:
        runs = bench.runs.get((group.name, "ticker"), [])
        lags = [lag for r in runs for lag in r.lags]
        all_lags += lags
        lag_p99[group.name] = percentile(lags, 99)
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
    return lines, all_lags, lag_p99


def _allocations(bench: Bench, groups: list[Group]) -> list[str]:
    """What each sparse download took on disk."""
    if not bench.allocations:
        return []
    return [
        "",
        "sparse downloads, allocated on disk: "
        + ", ".join(
            f"{dict((g.name, g) for g in groups)[name].label(c)} {size / MiB:.0f} MiB"
            for (name, c), size in sorted(bench.allocations.items())
        ),
    ]


def _cpu(bench: Bench, groups: list[Group], medians: Medians) -> list[str]:
    """Where the CPU goes: user / system, faults and switches, libvirtd's share, the page cache.

    The Python an event loop adds is user time; the page cache that every
    download fills is system time, and follows the host.
    """
    lines = []
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
    return lines


def _ours_against_ours(bench: Bench, groups: list[Group], medians: Medians) -> list[str]:
    """download(fsync=True) against without, and upload() into data against into a new volume."""
    lines = []
    fsync_lines = []
    for group in groups:
        for durable, plain in ((FSYNC, "ours"), (PAGE_CACHE_FSYNC, PAGE_CACHE)):
            rounds = per_round(bench, group.name, durable, plain, operator.attrgetter("op_s"))
            if rounds:
                extra = medians[(group.name, durable)] - medians[(group.name, plain)]
                fsync_lines.append(
                    f"  {group.name:16} {group.label(durable):15} {_median(list(rounds)):.3f}x "
                    f"the time of {group.label(plain)} per round "
                    f"({min(rounds):.2f}-{max(rounds):.2f}), medians {extra * 1000:+.1f} ms"
                )
    if fsync_lines:
        lines.append("download(fsync=True) against the same download without (informational):")
        lines.extend(fsync_lines)
    for group in groups:
        rounds = per_round(bench, group.name, OVER_DATA, "ours", operator.attrgetter("op_s"))
        if rounds:
            extra = medians[(group.name, OVER_DATA)] - medians[(group.name, "ours")]
            lines.append(
                "upload() into a volume that holds data (emptied by a wipe first) against "
                "into a new volume (informational):"
            )
            lines.append(
                f"  {group.name:16} {group.label(OVER_DATA):15} {_median(list(rounds)):.3f}x "
                f"the time per round ({min(rounds):.2f}-{max(rounds):.2f}), "
                f"medians {extra * 1000:+.1f} ms"
            )
    return lines


def report(bench: Bench, groups: list[Group], rounds: int) -> tuple[str, list[Target]]:
    """The whole report as text, and the targets (each knows whether it passed)."""
    lines, medians, op_cpu = _table(bench, groups, rounds)
    lag_lines, all_lags, lag_p99 = _loop_lag(bench, groups)
    lines += lag_lines
    lines += _allocations(bench, groups)
    lines += _cpu(bench, groups, medians)
    lines += _ours_against_ours(bench, groups, medians)
    found = targets(bench, groups, medians, op_cpu, lag_p99, all_lags)
    lines += target_lines(found)
    return "\n".join(lines), found
