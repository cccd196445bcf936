"""The event implementation's unit tests: a recorder of callbacks and frees, and a
few passes of the loop."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import libvirt

READABLE = libvirt.VIR_EVENT_HANDLE_READABLE
WRITABLE = libvirt.VIR_EVENT_HANDLE_WRITABLE
HANGUP = libvirt.VIR_EVENT_HANDLE_HANGUP


class Recorder:
    """Collects callback invocations and frees, and the thread they ran on."""

    def __init__(self) -> None:
        self.handle_calls: list[tuple[int, int, int, Any]] = []
        self.timer_calls: list[tuple[int, Any]] = []
        self.frees: Counter[Any] = Counter()
        self.free_threads: set[int] = set()
        self.in_hook = False

    def handle(self, watch: int, fd: int, events: int, opaque: Any) -> None:
        assert not self.in_hook, "callback called from inside a hook"
        self.handle_calls.append((watch, fd, events, opaque))

    def timer(self, timer: int, opaque: Any) -> None:
        assert not self.in_hook, "callback called from inside a hook"
        self.timer_calls.append((timer, opaque))

    def free(self, opaque: Any) -> None:
        assert not self.in_hook, "free called from inside a hook"
        self.frees[opaque] += 1
        self.free_threads.add(threading.get_ident())


async def spin(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)
