"""Jobs of one transfer run side by side: the first error is the transfer's error."""

from __future__ import annotations

__all__ = ["run_together", "first_error"]

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

Job = Callable[[], Coroutine[Any, Any, None]]


async def run_together(*jobs: Job) -> None:
    """Run ``jobs`` at once; the first to fail cancels the others and its error is raised.

    The jobs are the transfer's own: one error comes out, as for one stream,
    and neither the task group nor its exception group stays referenced
    from the error's traceback (a reference cycle that held the streams,
    and their connections, until the garbage collector ran). A job that is
    cancelled ends without an error (:func:`_ended_by_cancellation`).
    """
    group = anyio.create_task_group()
    try:
        async with group:
            for job in jobs:
                group.start_soon(_ended_by_cancellation, job, group.cancel_scope)
        return
    except BaseExceptionGroup as errors:
        error = first_error(errors)
    finally:
        del group
    try:
        raise error
    finally:
        del error


async def _ended_by_cancellation(job: Job, scope: anyio.CancelScope) -> None:
    """Run ``job`` in a task of ``scope``'s group; cancelled, it ends without an error.

    anyio's task group raises a cancelled child's ``CancelledError`` again
    in its done callback, whose frame then holds it: a reference cycle
    through the error's traceback, which holds the job's frames, and so the
    streams and their connections. A job that ends here leaves its task no
    error; ``scope`` is cancelled, as anyio does after a cancelled child.
    """
    try:
        await job()
    except asyncio.CancelledError:
        scope.cancel()
    finally:
        del scope  # a job's error holds this frame: not the task behind the scope


def first_error(errors: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that failed the jobs: the first that is not the cancellation
    of the jobs that had to stop because of it."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [errors]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = error.exceptions
        else:
            leaves.append(error)
    for error in leaves:
        if not isinstance(error, asyncio.CancelledError):
            return error
    return leaves[0]
