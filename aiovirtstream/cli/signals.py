"""Signal handlers on the running loop, nested: an inner handler takes a signal over
for a block and gives it back (SIGTERM cancels the command; ``sandbox`` stops on it)."""

from __future__ import annotations

__all__ = ["handle_signals", "cancel_on_termination"]

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from .errors import Terminated

_stacks: dict[int, list[Callable[[], object]]] = {}

#: Signals that end the command as a termination (143).
TERMINATING = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def handle_signals(signums: tuple[int, ...], handler: Callable[[], object]) -> Iterator[None]:
    """Call ``handler`` on the loop for each of ``signums`` during the block.

    On exit the handler that was there before comes back (none: the default).
    """
    loop = asyncio.get_running_loop()
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only: main() called from another one
        return
    for signum in signums:
        _stacks.setdefault(signum, []).append(handler)
        loop.add_signal_handler(signum, handler)
    try:
        yield
    finally:
        for signum in signums:
            stack = _stacks[signum]
            stack.remove(handler)
            if stack:
                loop.add_signal_handler(signum, stack[-1])
            else:
                loop.remove_signal_handler(signum)


@contextlib.contextmanager
def cancel_on_termination() -> Iterator[None]:
    """SIGTERM or SIGHUP cancels the current task; the block then raises :class:`Terminated`.

    The cancellation runs every ``finally`` and ``async with`` exit on its way
    (streams aborted, files removed, the terminal restored).
    """
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def terminate() -> None:
        received.append(1)
        task.cancel()

    try:
        with handle_signals(TERMINATING, terminate):
            yield
    except asyncio.CancelledError:
        if received and task.uncancel() == 0:
            raise Terminated from None
        raise
