"""What the command prints on stdout: one plain line or one JSON object per transfer,
or the SHA-256 alone (in ``sha256sum``'s format) with ``-q``."""

from __future__ import annotations

__all__ = [
    "Outcome",
    "print_outcomes",
    "say",
    "err",
    "open_board",
    "with_bar",
]

import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiovirtstream as avs

from .units import format_rate, format_size

if TYPE_CHECKING:
    from .progress import Board

_PAST = {"upload": "uploaded", "download": "downloaded", "copy": "copied"}


@dataclass
class Outcome:
    """One transfer of the command line: what it moved, or why it failed."""

    verb: str  # "upload", "download" or "copy"
    volume: str
    file: str  # for a copy: the destination volume
    pool: str | None = None
    to_pool: str | None = None  # a copy's destination pool
    result: avs.TransferResult | None = None
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        """The transfer's JSON object (``--json``)."""
        out: dict[str, object] = {"verb": self.verb, "volume": self.volume, "pool": self.pool}
        if self.verb == "copy":
            out["to_volume"], out["to_pool"] = self.file, self.to_pool
        else:
            out["file"] = self.file
        if self.result is not None:
            out["data_bytes"] = self.result.data_bytes
            out["hole_bytes"] = self.result.hole_bytes
            out["seconds"] = round(self.result.seconds, 6)
            if self.result.sha256 is not None:
                out["sha256"] = self.result.sha256
        else:
            out["error"] = self.error
        return out

    def line(self) -> str:
        """The transfer's summary line."""
        assert self.result is not None
        result = self.result
        if self.verb == "upload":
            arrow = f"{self.file} -> {self.volume}"
        else:
            arrow = f"{self.volume} -> {self.file}"
        digest = f", sha256 {result.sha256}" if result.sha256 else ""
        return (
            f"{_PAST[self.verb]} {arrow}: {format_size(result.data_bytes)} of data and "
            f"{format_size(result.hole_bytes)} of holes in {result.seconds:.2f} s "
            f"({format_rate(result.data_rate)}){digest}"
        )


def say(line: str) -> None:
    """A line of the command's output (stdout), flushed at once."""
    print(line, flush=True)


def err(line: str) -> None:
    """A line for the user on stderr."""
    print(line, file=sys.stderr, flush=True)


def print_outcomes(outcomes: list[Outcome], *, as_json: bool, quiet: bool, seconds: float) -> None:
    """Each transfer's result on stdout (failures are said on stderr by the caller).

    ``--json``: one object per transfer, failed ones with ``error``. ``-q``:
    only the SHA-256 of each transfer that has one, as ``sha256sum`` prints it.
    Else a line per transfer, and a total when there were several.
    """
    done = [o for o in outcomes if o.result is not None]
    if as_json:
        for outcome in outcomes:
            say(json.dumps(outcome.as_json()))
        return
    if quiet:
        for outcome in done:
            assert outcome.result is not None
            if outcome.result.sha256:
                say(f"{outcome.result.sha256}  {outcome.file}")
        return
    for outcome in done:
        say(outcome.line())
    if len(outcomes) > 1 and done:
        data = sum(o.result.data_bytes for o in done if o.result is not None)
        holes = sum(o.result.hole_bytes for o in done if o.result is not None)
        rate = data / seconds if seconds > 0 else float("inf")
        say(
            f"total: {len(done)} of {len(outcomes)} transfers, {format_size(data)} of data "
            f"and {format_size(holes)} of holes in {seconds:.2f} s ({format_rate(rate)})"
        )


def open_board(labels: list[str], *, quiet: bool) -> Board | None:
    """Progress bars on stderr for transfers named ``labels``, or None: with ``-q``,
    when stderr is not a terminal, or without rich (then nothing else is lost)."""
    if quiet or sys.stderr is None or not sys.stderr.isatty():
        return None
    try:
        import rich.console

        from .progress import Board
    except ImportError:
        return None
    return Board(labels, rich.console.Console(stderr=True))


async def with_bar(
    label: str,
    quiet: bool,
    transfer: Callable[[avs.ProgressTarget | None], Awaitable[avs.TransferResult]],
) -> avs.TransferResult:
    """Run one transfer (given its progress target) under a bar, erased if it fails."""
    board = open_board([label], quiet=quiet)
    try:
        result = await transfer(board.reporter(0) if board is not None else None)
    except BaseException:
        if board is not None:
            board.close(clear=True)
        raise
    if board is not None:
        board.close(clear=False)
    return result
