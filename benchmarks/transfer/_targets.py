"""The transfer benchmark's targets: speed, memory, CPU and loop lag, each PASS or FAIL.

A speed ratio is the other contender's median time over ours (> 1: ours is
faster). Each target also carries the same ratio within every round, to
show how far its verdict is from the host's noise.
"""

from __future__ import annotations

__all__ = ["Target", "per_round", "target_lines", "targets"]

import operator
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks._probes import percentile

from ._bench import Bench
from ._contenders import Group, Run

MiB = 1 << 20
GiB = 1 << 30


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


def per_round(
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


def targets(
    bench: Bench,
    groups: list[Group],
    medians: dict[tuple[str, str], float],
    op_cpu: dict[tuple[str, str], float],
    lag_p99: dict[str, float],
    all_lags: list[float],
) -> list[Target]:
    """Every target of the groups run, from the medians of the table and the loop lags."""
    found: list[Target] = []

    def speed(group: str, other: str, label: str, threshold: float, strict: bool) -> None:
        value = medians[(group, other)] / medians[(group, "ours")]
        sign = ">" if strict else ">="
        rounds = per_round(bench, group, other, "ours", operator.attrgetter("op_s"))
        found.append(
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
        found.append(
            Target(group.name, "peak RSS above baseline < 48 MiB", peak / MiB, 48, True, True)
        )
        ours_cpu = op_cpu[(group.name, "ours")] / (group.size / GiB)
        theirs_cpu = op_cpu[(group.name, "blocking")] / (group.size / GiB)
        found.append(
            Target(
                group.name,
                f"CPU s/GiB vs {by_name[group.name].label('blocking')} <= 1.1x "
                f"({ours_cpu:.2f} vs {theirs_cpu:.2f})",
                ours_cpu / theirs_cpu,
                1.1,
                False,
                True,
                per_round=per_round(
                    bench, group.name, "ours", "blocking", operator.attrgetter("op_cpu_s")
                ),
            )
        )
    for group in groups:
        found.append(
            Target(group.name, "loop lag p99 < 2 ms", lag_p99[group.name] * 1000, 2.0, True, True)
        )
    found.append(
        Target("all", "loop lag p99 < 2 ms", percentile(all_lags, 99) * 1000, 2.0, True, True)
    )
    return found


def target_lines(found: list[Target]) -> list[str]:
    """The targets' part of the report: a heading, then a line each with its verdict."""
    lines = [
        "",
        "targets (speed ratio = their median time / ours: > 1 means aiovirtstream is faster; "
        "'rounds': the same ratio within each round, and in how many rounds it meets the "
        "target; the verdict is the medians'):",
    ]
    for target in found:
        lines.append(
            f"  {target.group:16} {target.text:52} {target.value:7.2f}  "
            f"{'PASS' if target.passed else 'FAIL'}  {target.rounds_text()}".rstrip()
        )
    return lines
