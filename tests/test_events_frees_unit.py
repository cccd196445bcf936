"""The event hooks' contract, driven directly (no libvirt daemon): ids, removal,
frees deferred to the loop and run once, callbacks never inside a hook, hooks
called from threads (aiovirtstream/_events/_frees.py)."""

from __future__ import annotations

import asyncio
import socket
import threading
import warnings
from collections import Counter
from typing import Any

from _helpers.events import READABLE, WRITABLE, Recorder, spin

from aiovirtstream._events import EventImpl


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
