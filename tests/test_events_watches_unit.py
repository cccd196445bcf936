"""fd watches of the event implementation, driven directly (no libvirt daemon):
one registration an fd, hangups, fd numbers reused, paused reads, narrowing from
worker threads (aiovirtstream/_events/_watches.py)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from _helpers.events import HANGUP, READABLE, WRITABLE, Recorder, spin

from aiovirtstream._events import EventImpl


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
