"""The event implementation bound to a loop, driven directly (no libvirt daemon):
a change of loop, a second running loop refused, uvloop
(aiovirtstream/_events/_binding.py)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter

import pytest
from _helpers.events import READABLE, Recorder, spin

from aiovirtstream._events import EventImpl
from aiovirtstream._exceptions import EventLoopError


def test_survives_a_change_of_loop(rec: Recorder) -> None:
    """Watches and timers move to the next loop; frees left on a closed loop still run once."""
    impl = EventImpl(invoke_free=rec.free)
    a, b = socket.socketpair()
    ids: dict[str, int] = {}

    async def first() -> None:
        impl.bind()
        ids["watch"] = impl.add_handle(a.fileno(), READABLE, rec.handle, "watch")
        ids["timer"] = impl.add_timeout(0, rec.timer, "timer")
        ids["gone"] = impl.add_timeout(-1, rec.timer, "gone")
        await spin()
        assert rec.timer_calls

    async def second() -> None:
        rec.timer_calls.clear()
        impl.bind()
        await impl.wait_frees()
        b.send(b"x")
        await spin(5)
        assert rec.timer_calls, "timer did not move to the new loop"
        assert any(call[0] == ids["watch"] for call in rec.handle_calls)
        impl.remove_handle(ids["watch"])
        impl.remove_timeout(ids["timer"])
        await impl.wait_frees()

    with a, b:
        asyncio.run(first())
        assert impl.stats().timers == 2
        # Removed while no loop runs (the bound one is closed): the free waits for the next.
        impl.remove_timeout(ids["gone"])
        assert impl.stats().pending_frees == 1
        assert not rec.frees
        asyncio.run(second())
    assert rec.frees == Counter({"watch": 1, "timer": 1, "gone": 1})


def test_second_running_loop_is_refused(rec: Recorder) -> None:
    impl = EventImpl(invoke_free=rec.free)
    bound = threading.Event()
    release = threading.Event()

    def other_thread() -> None:
        async def hold() -> None:
            impl.bind()
            bound.set()
            while not release.is_set():
                await asyncio.sleep(0.01)

        asyncio.run(hold())

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert bound.wait(5)

        async def try_bind() -> None:
            with pytest.raises(EventLoopError, match="still running in another thread"):
                impl.bind()

        asyncio.run(try_bind())
    finally:
        release.set()
        thread.join()


def test_works_on_uvloop(rec: Recorder) -> None:
    uvloop = pytest.importorskip("uvloop")  # a test extra: always installed by `make test`
    impl = EventImpl(invoke_free=rec.free)

    async def main() -> None:
        impl.bind()
        a, b = socket.socketpair()
        with a, b:
            watch = impl.add_handle(a.fileno(), READABLE, rec.handle, "w")
            timer = impl.add_timeout(0, rec.timer, "t")
            b.send(b"x")
            await asyncio.sleep(0.02)
            assert rec.handle_calls and rec.timer_calls
            await asyncio.to_thread(impl.update_timeout, timer, 5)
            await asyncio.sleep(0.05)
            impl.remove_handle(watch)
            impl.remove_timeout(timer)
            await impl.wait_frees()

    uvloop.run(main())
    assert rec.frees == Counter({"w": 1, "t": 1})
