"""Bookkeeping of the event implementation, driven directly (no libvirt daemon).

Each test makes its own EventImpl (not registered with libvirt) with a
recorder in place of libvirt's free-callback invoker.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import warnings
from collections import Counter
from typing import Any

import libvirt
import pytest

from aiovirtstream._events import EventImpl
from aiovirtstream._exceptions import EventLoopError

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


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def impl(rec: Recorder) -> EventImpl:
    return EventImpl(invoke_free=rec.free)


async def spin(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_ids_start_at_one(impl: EventImpl, rec: Recorder) -> None:
    impl.bind()
    a, b = socket.socketpair()
    with a, b:
        assert impl.add_handle(a.fileno(), READABLE, rec.handle, "w1") == 1
        assert impl.add_handle(b.fileno(), READABLE, rec.handle, "w2") == 2
        assert impl.add_timeout(-1, rec.timer, "t1") == 1
        assert impl.add_timeout(-1, rec.timer, "t2") == 2
        for watch in (1, 2):
            assert impl.remove_handle(watch) == 0
        for timer in (1, 2):
            assert impl.remove_timeout(timer) == 0
        await impl.wait_frees()
    assert rec.frees == Counter({"w1": 1, "w2": 1, "t1": 1, "t2": 1})


async def test_unknown_ids(impl: EventImpl) -> None:
    impl.bind()
    impl.update_handle(42, READABLE)  # ignored, no exception
    impl.update_timeout(42, 10)
    assert impl.remove_handle(42) == -1
    assert impl.remove_timeout(42) == -1
    assert impl.stats().watches == 0


async def test_free_is_deferred_and_runs_exactly_once(impl: EventImpl, rec: Recorder) -> None:
    impl.bind()
    a, b = socket.socketpair()
    with a, b:
        watch = impl.add_handle(a.fileno(), READABLE, rec.handle, "opaque-h")
        timer = impl.add_timeout(0, rec.timer, "opaque-t")
        rec.in_hook = True
        impl.remove_handle(watch)
        impl.remove_timeout(timer)
        assert impl.remove_handle(watch) == -1  # second removal: no second free
        rec.in_hook = False
        assert not rec.frees, "ff must never run inside remove"
        assert impl.stats().pending_frees == 2
        await impl.wait_frees()
        await spin()
    assert rec.frees == Counter({"opaque-h": 1, "opaque-t": 1})
    assert rec.free_threads == {threading.get_ident()}
    assert rec.timer_calls == [], "a removed timer fired"


async def test_callbacks_never_run_inside_hooks(impl: EventImpl, rec: Recorder) -> None:
    impl.bind()
    a, b = socket.socketpair()
    with a, b:
        b.send(b"x")  # readable right away
        rec.in_hook = True
        watch = impl.add_handle(a.fileno(), READABLE, rec.handle, None)
        timer = impl.add_timeout(0, rec.timer, None)
        impl.update_timeout(timer, 0)
        rec.in_hook = False
        await spin()
        assert rec.timer_calls and rec.handle_calls
        impl.remove_handle(watch)
        impl.remove_timeout(timer)
        await impl.wait_frees()


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


async def test_reentrant_callbacks(impl: EventImpl, rec: Recorder) -> None:
    """Callbacks that add, update and remove watches and timers (as libvirt does)."""
    impl.bind()
    seen: list[str] = []

    def one_shot(timer: int, opaque: Any) -> None:
        seen.append("fired")
        impl.remove_timeout(timer)

        def second(timer: int, opaque: Any) -> None:
            seen.append("second")
            impl.remove_timeout(timer)

        impl.add_timeout(0, second, "2nd")

    impl.add_timeout(0, one_shot, "1st")
    await spin(5)
    assert seen == ["fired", "second"]
    await impl.wait_frees()
    assert rec.frees == Counter({"1st": 1, "2nd": 1})

    a, b = socket.socketpair()
    with a, b:
        calls: list[int] = []

        def on_ready(watch: int, fd: int, events: int, opaque: Any) -> None:
            calls.append(events)
            impl.update_handle(watch, 0)  # stop wanting events from inside the callback

        watch = impl.add_handle(a.fileno(), READABLE, on_ready, None)
        b.send(b"x")
        await spin(10)
        assert calls == [READABLE]
        impl.remove_handle(watch)
        await impl.wait_frees()
    assert impl.stats().watches == 0 and impl.stats().fds_registered_on_loop == 0


async def test_watches_share_one_fd_registration(impl: EventImpl, rec: Recorder) -> None:
    impl.bind()
    a, b = socket.socketpair()
    with a, b:
        w1 = impl.add_handle(a.fileno(), READABLE, rec.handle, "r")
        w2 = impl.add_handle(a.fileno(), WRITABLE, rec.handle, "w")
        await spin(1)  # changes made on the loop thread apply at its next iteration
        stats = impl.stats()
        assert (stats.watches, stats.fds, stats.fds_registered_on_loop) == (2, 1, 1)
        b.send(b"x")
        await spin()
        by_watch = {call[0]: call[2] for call in rec.handle_calls}
        assert by_watch[w1] & READABLE and not by_watch[w1] & WRITABLE
        assert by_watch[w2] & WRITABLE and not by_watch[w2] & READABLE
        impl.remove_handle(w1)
        impl.remove_handle(w2)
        await impl.wait_frees()
    assert impl.stats().fds_registered_on_loop == 0


async def test_hangup_is_delivered(impl: EventImpl, rec: Recorder) -> None:
    impl.bind()
    a, b = socket.socketpair()
    with a:
        watch = impl.add_handle(a.fileno(), READABLE, rec.handle, None)
        b.close()
        await spin()
        assert rec.handle_calls and rec.handle_calls[0][2] & HANGUP
        impl.remove_handle(watch)
        await impl.wait_frees()


async def test_fd_number_reused_after_removal(impl: EventImpl, rec: Recorder) -> None:
    """Removing the last watch, closing the fd and watching a new file with the same number."""
    impl.bind()
    for _ in range(3):
        a, b = socket.socketpair()
        fd = a.fileno()
        watch = impl.add_handle(fd, READABLE, rec.handle, None)
        await spin()
        # From another thread, as libvirt's worker threads do.
        await asyncio.to_thread(impl.remove_handle, watch)
        a.close()
        b.close()
        c, d = socket.socketpair()
        assert c.fileno() == fd or d.fileno() == fd
        sock = c if c.fileno() == fd else d
        peer = d if sock is c else c
        rec.handle_calls.clear()
        watch = await asyncio.to_thread(impl.add_handle, fd, READABLE, rec.handle, None)
        peer.send(b"x")
        await asyncio.sleep(0.05)
        assert rec.handle_calls, "the reused fd number is not watched"
        impl.remove_handle(watch)
        c.close()
        d.close()
    await impl.wait_frees()


def test_calls_from_eight_threads_in_debug_mode(rec: Recorder) -> None:
    """Hooks hammered from 8 threads while the loop runs in debug mode."""
    impl = EventImpl(invoke_free=rec.free)
    errors: list[BaseException] = []
    per_thread = 200

    def worker(n: int, sock: socket.socket) -> None:
        try:
            for i in range(per_thread):
                watch = impl.add_handle(sock.fileno(), READABLE, rec.handle, ("w", n, i))
                impl.update_handle(watch, READABLE | WRITABLE)
                impl.update_handle(watch, 0)
                timer = impl.add_timeout(0, rec.timer, ("t", n, i))
                impl.update_timeout(timer, 5)
                impl.update_timeout(timer, -1)
                assert impl.remove_timeout(timer) == 0
                assert impl.remove_handle(watch) == 0
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop_errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
        impl.bind()
        pairs = [socket.socketpair() for _ in range(8)]
        try:
            threads = [threading.Thread(target=worker, args=(n, pairs[n][0])) for n in range(8)]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                await asyncio.sleep(0.01)
            await impl.wait_frees()
        finally:
            for a, b in pairs:
                a.close()
                b.close()
        assert not loop_errors, loop_errors

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        asyncio.run(main(), debug=True)
    assert not errors, errors[:3]
    assert len(rec.frees) == 8 * per_thread * 2
    assert set(rec.frees.values()) == {1}
    stats = impl.stats()
    assert (stats.watches, stats.timers, stats.pending_frees) == (0, 0, 0)


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


async def test_pause_reading_stops_and_resumes_readable_events(
    impl: EventImpl, rec: Recorder
) -> None:
    impl.bind()
    a, b = socket.socketpair()
    with a, b:
        watch = impl.add_handle(a.fileno(), READABLE, rec.handle, None)
        impl.pause_reading(a.fileno())
        impl.pause_reading(a.fileno())  # nests
        b.send(b"x")
        await spin(5)
        assert rec.handle_calls == []
        impl.resume_reading(a.fileno())
        await spin(5)
        assert rec.handle_calls == [], "resumed after one of two pauses"
        impl.resume_reading(a.fileno())
        await spin(5)
        assert rec.handle_calls and rec.handle_calls[0][2] & READABLE
        impl.remove_handle(watch)
        await impl.wait_frees()


async def test_a_worker_threads_narrowing_is_lazy_and_its_restoring_wakes_only_when_needed(
    impl: EventImpl, rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What libvirt does around every blocking call from a worker thread.

    It narrows the connection's watch to nothing and restores it afterwards.
    Within what the loop has registered neither wakes the loop; an event
    that comes while narrowed is not delivered (the reader is dropped), and
    the restoring that follows wakes the loop to register it again.
    """
    loop = asyncio.get_running_loop()
    wakes = 0
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal wakes
        wakes += 1
        return call_soon_threadsafe(*args, **kwargs)

    impl.bind()
    a, b = socket.socketpair()
    with a, b:
        watch = impl.add_handle(a.fileno(), READABLE, rec.handle, None)
        await spin(3)
        assert impl.stats().fds_registered_on_loop == 1
        monkeypatch.setattr(loop, "call_soon_threadsafe", counting)

        def cycles() -> int:
            before = wakes
            for _ in range(100):
                impl.update_handle(watch, 0)
                impl.update_handle(watch, READABLE)
            impl.update_handle(watch, 0)
            return wakes - before  # to_thread's own hand-back wakes the loop too

        assert await asyncio.to_thread(cycles) == 0, "a narrowing or restoring woke the loop"
        b.send(b"x")
        await spin(5)
        assert rec.handle_calls == [], "an event was delivered to a narrowed watch"
        assert impl.stats().fds_registered_on_loop == 0, "the unwanted reader stayed"

        def restore() -> int:
            before = wakes
            impl.update_handle(watch, READABLE)
            return wakes - before

        assert await asyncio.to_thread(restore) == 1, "the restoring did not wake the loop"
        await spin(5)
        assert rec.handle_calls and rec.handle_calls[0][2] & READABLE
        impl.remove_handle(watch)
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
