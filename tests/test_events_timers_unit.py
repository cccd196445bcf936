"""Timers of the event implementation, driven directly (no libvirt daemon):
firing, re-arming, and their order next to fd callbacks
(aiovirtstream/_events/_timers.py)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from _helpers.events import READABLE, Recorder, spin

from aiovirtstream._events import EventImpl


async def test_zero_timer_fires_once_per_iteration(impl: EventImpl, rec: Recorder) -> None:
    impl.bind()
    timer = impl.add_timeout(0, rec.timer, None)
    await spin(50)
    # One firing per loop pass: never more than the passes, never spinning.
    assert 45 <= len(rec.timer_calls) <= 51
    impl.update_timeout(timer, -1)
    before = len(rec.timer_calls)
    await spin(10)
    assert len(rec.timer_calls) == before
    impl.remove_timeout(timer)
    await impl.wait_frees()


async def test_timer_update_rearms_with_new_period(impl: EventImpl, rec: Recorder) -> None:
    impl.bind()
    loop = asyncio.get_running_loop()
    timer = impl.add_timeout(10_000, rec.timer, None)
    await asyncio.sleep(0.05)
    assert rec.timer_calls == []
    start = loop.time()
    impl.update_timeout(timer, 20)
    await asyncio.sleep(0.11)
    fired = len(rec.timer_calls)
    assert 2 <= fired <= 6, fired  # about every 20 ms
    assert loop.time() - start < 1
    impl.update_timeout(timer, -1)
    await asyncio.sleep(0.06)
    assert len(rec.timer_calls) == fired
    impl.remove_timeout(timer)
    await impl.wait_frees()


async def test_timer_enabled_by_an_fd_callback_fires_after_it_in_the_same_iteration(
    impl: EventImpl, rec: Recorder
) -> None:
    """libvirt's stream timer, enabled when the socket callback queued a packet."""
    impl.bind()
    loop = asyncio.get_running_loop()
    order: list[str] = []
    timer = impl.add_timeout(-1, lambda t, o: order.append("timer"), None)
    a, b = socket.socketpair()
    with a, b:

        def on_readable(watch: int, fd: int, events: int, opaque: Any) -> None:
            b.recv(100)
            loop.call_soon(order.append, "next iteration")
            impl.update_timeout(timer, 0)  # as libvirt does when it queued a packet
            order.append("fd")

        watch = impl.add_handle(b.fileno(), READABLE, on_readable, None)
        await spin()
        a.send(b"x")
        while "next iteration" not in order:
            await asyncio.sleep(0)
        assert order[:3] == ["fd", "timer", "next iteration"]
        # Still a 0 ms timer: once per iteration from then on, not re-entrantly.
        impl.update_timeout(timer, -1)
        fired = order.count("timer")
        await spin()
        assert order.count("timer") == fired

        # Disabled again inside the same callback: it does not fire.
        def enable_then_disable(watch: int, fd: int, events: int, opaque: Any) -> None:
            b.recv(100)
            impl.update_timeout(timer, 0)
            impl.update_timeout(timer, -1)
            order.append("fd2")

        impl.remove_handle(watch)
        await spin()
        impl.add_handle(b.fileno(), READABLE, enable_then_disable, None)
        await spin()
        a.send(b"y")
        while "fd2" not in order:
            await asyncio.sleep(0)
        await spin()
        assert order.count("timer") == fired


async def test_timer_is_rearmed_after_its_callback_unless_the_callback_changed_it(
    impl: EventImpl, rec: Recorder
) -> None:
    impl.bind()
    fired: list[int] = []

    def disable_on_third(timer: int, opaque: Any) -> None:
        fired.append(timer)
        if len(fired) == 3:
            impl.update_timeout(timer, -1)

    timer = impl.add_timeout(0, disable_on_third, None)
    await spin(10)
    assert fired == [timer] * 3
    impl.update_timeout(timer, 0)

    def boom(timer: int, opaque: Any) -> None:
        fired.append(-timer)
        raise RuntimeError("callback failed")

    other = impl.add_timeout(0, boom, None)
    impl.update_timeout(timer, -1)
    handler_calls: list[object] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: handler_calls.append(ctx))
    await spin(3)
    assert fired.count(-other) >= 2, "a callback that raised stopped its timer"
    impl.remove_timeout(other)
    impl.remove_timeout(timer)
    await impl.wait_frees()
