"""The hooks called from a worker thread on a loop in asyncio debug mode: what breaks.

Debug mode raises on a loop method called from a foreign thread where
non-debug mode silently skips waking the loop.
"""

from __future__ import annotations

__all__ = ["debug_mode_probe"]

import asyncio
import gc
import socket

from ._hooks import IMPLS, Hooks, LoopErrors, timer_cb
from ._throughput import handle_cycle, timer_cycle


async def debug_mode_probe() -> dict[str, str]:
    """Each implementation's verdict: "ok", or the first error it raised or the loop reported."""
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
            h.remove_timeout(h.add_timeout(0, timer_cb, None))

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
