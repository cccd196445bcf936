"""The two event implementations under test, called through their six hooks.

Neither is registered with libvirt (it accepts one a process); both are
bound to the running loop and called directly. Free functions are no-ops
for both, libvirtaio's through :func:`libvirtaio_frees_patched`. A row's
results are kept per implementation as an :class:`Outcome`.
"""

from __future__ import annotations

__all__ = [
    "IMPLS",
    "READABLE",
    "WRITABLE",
    "Hooks",
    "LoopErrors",
    "Outcome",
    "Rows",
    "handle_cb",
    "libvirtaio_frees_patched",
    "make_ours",
    "timer_cb",
]

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import libvirt
import libvirtaio

from aiovirtstream._events import EventImpl

READABLE: int = libvirt.VIR_EVENT_HANDLE_READABLE
WRITABLE: int = libvirt.VIR_EVENT_HANDLE_WRITABLE

HandleCb = Callable[[int, int, int, Any], None]
TimerCb = Callable[[int, Any], None]


def _no_free(opaque: object) -> None:
    """Free function for both implementations: freeing is libvirt's cost, not theirs."""


def handle_cb(watch: int, fd: int, events: int, opaque: object) -> None:
    """Handle callback of the throughput runs (a WRITABLE watch may fire)."""


def timer_cb(timer: int, opaque: object) -> None:
    """Timer callback of the throughput runs (their timers never fire)."""


@dataclass
class Hooks:
    """One implementation's six hooks, and how to wait for its deferred frees."""

    name: str
    add_handle: Callable[[int, int, HandleCb, Any], int]
    update_handle: Callable[[int, int], None]
    remove_handle: Callable[[int], int]
    add_timeout: Callable[[int, TimerCb, Any], int]
    update_timeout: Callable[[int, int], None]
    remove_timeout: Callable[[int], int]
    drain: Callable[[], Awaitable[None]]


def make_ours() -> Hooks:
    """aiovirtstream's EventImpl, bound to the running loop."""
    impl = EventImpl(invoke_free=_no_free)
    impl.bind()
    return Hooks(
        "aiovirtstream",
        impl.add_handle,
        impl.update_handle,
        impl.remove_handle,
        impl.add_timeout,
        impl.update_timeout,
        impl.remove_timeout,
        impl.wait_frees,
    )


def make_libvirtaio() -> Hooks:
    """libvirtaio's virEventAsyncIOImpl on the running loop (its ids start at 0)."""
    impl = libvirtaio.virEventAsyncIOImpl(loop=asyncio.get_running_loop())
    return Hooks(
        "libvirtaio",
        impl._add_handle,
        impl._update_handle,
        impl._remove_handle,
        impl._add_timeout,
        impl._update_timeout,
        impl._remove_timeout,
        impl.drain,
    )


IMPLS: dict[str, Callable[[], Hooks]] = {"ours": make_ours, "libvirtaio": make_libvirtaio}


@contextlib.contextmanager
def libvirtaio_frees_patched() -> Iterator[None]:
    """libvirtaio frees through libvirt.virEventInvokeFreeCallback, which needs libvirt's opaque."""
    original = libvirt.virEventInvokeFreeCallback
    libvirt.virEventInvokeFreeCallback = _no_free
    try:
        yield
    finally:
        libvirt.virEventInvokeFreeCallback = original


@dataclass
class Outcome:
    """Rates or samples of one implementation on one row, and what went wrong."""

    values: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def failed(self, error: Exception) -> None:
        """Note what a run raised (the table lists it)."""
        self.errors.append(f"{type(error).__name__}: {error}")


Rows = list[tuple[str, bool, dict[str, Outcome]]]  # label, flag, outcome per implementation


class LoopErrors:
    """Collects exceptions the loop reports (failing callbacks), by implementation."""

    def __init__(self) -> None:
        self.current = ""
        self.by_impl: dict[str, list[str]] = {}

    def handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        text = f"{type(error).__name__}: {error}" if error else str(context.get("message"))
        self.by_impl.setdefault(self.current, []).append(text)

    def hand_over(self, outcomes: dict[str, Outcome]) -> None:
        """Move what the loop reported for each implementation into its row's outcome."""
        for name in IMPLS:
            outcomes[name].errors += self.by_impl.pop(name, [])
