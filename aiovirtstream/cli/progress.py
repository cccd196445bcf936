"""Progress bars on stderr, from rich (the ``cli`` extra): one per transfer and a total.

Imported only through :func:`aiovirtstream.cli.output.open_board`, which
gives no bars when rich is missing. A bar appears at its transfer's first
progress report, which the library sends once the streams are open: a
transfer that fails to start draws nothing.
"""

from __future__ import annotations

__all__ = ["Board"]

from collections.abc import Callable

import rich.console
import rich.progress
import rich.text

import aiovirtstream as avs

from .units import format_rate, format_size


class Board:
    """The bars of one command: one per transfer, plus a total for several."""

    def __init__(self, labels: list[str], console: rich.console.Console) -> None:
        self._labels = labels
        self._console = console
        self._progress: rich.progress.Progress | None = None
        self._tasks: dict[int, rich.progress.TaskID] = {}
        self._done: dict[int, int] = {}
        self._totals: dict[int, int] = {}
        self._total_task: rich.progress.TaskID | None = None

    def reporter(self, index: int) -> Callable[[avs.TransferProgress], None]:
        """The progress callback of transfer ``index``."""
        return lambda progress: self._report(index, progress)

    def _start(self) -> rich.progress.Progress:
        progress = rich.progress.Progress(
            rich.progress.TextColumn("[bold]{task.description}"),
            rich.progress.BarColumn(),
            _BytesColumn(),
            _RateColumn(),
            rich.progress.TimeRemainingColumn(),
            rich.progress.TextColumn("{task.fields[holes]}"),
            console=self._console,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._progress = progress
        return progress

    def _report(self, index: int, report: avs.TransferProgress) -> None:
        progress = self._progress or self._start()
        holes = f"holes {format_size(report.hole_bytes)}"
        self._done[index] = report.done_bytes
        if report.total is not None:
            self._totals[index] = report.total
        if index not in self._tasks:
            self._tasks[index] = progress.add_task(
                self._labels[index], completed=report.done_bytes, total=report.total, holes=holes
            )
            if len(self._labels) > 1 and self._total_task is None:
                self._total_task = progress.add_task("total", total=None, holes="")
            if len(self._tasks) == 1:
                progress.start()  # after the first task: no empty frame
        else:
            progress.update(
                self._tasks[index], completed=report.done_bytes, total=report.total, holes=holes
            )
        if self._total_task is not None:
            progress.update(
                self._total_task,
                completed=sum(self._done.values()),
                total=sum(self._totals.values()) or None,
            )

    def failed(self, index: int) -> None:
        """Erase transfer ``index``'s bar (and the total: it no longer adds up)."""
        if self._progress is None:
            return
        task = self._tasks.pop(index, None)
        if task is not None:
            self._progress.remove_task(task)
        if self._total_task is not None:
            self._progress.remove_task(self._total_task)
            self._total_task = None

    def close(self, *, clear: bool) -> None:
        """Stop drawing; ``clear`` erases the bars (after a Ctrl+C), else they stay."""
        if self._progress is None:
            return
        self._progress.live.transient = clear or not self._tasks
        self._progress.stop()
        self._progress = None


class _BytesColumn(rich.progress.ProgressColumn):
    """Done and total bytes in binary units (``12.0 MiB / 64.0 MiB``)."""

    def render(self, task: rich.progress.Task) -> rich.text.Text:
        done = format_size(task.completed)
        total = format_size(task.total) if task.total is not None else "?"
        return rich.text.Text(f"{done} / {total}", style="progress.download")


class _RateColumn(rich.progress.ProgressColumn):
    """The transfer rate in binary units (``812.4 MiB/s``), never rich's decimal GB/s."""

    def render(self, task: rich.progress.Task) -> rich.text.Text:
        speed = task.finished_speed or task.speed
        text = format_rate(speed) if speed is not None else "?"
        return rich.text.Text(text, style="progress.data.speed")
