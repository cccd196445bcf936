"""Runners and the work queue: one thread per connection, turns, fed iterators (no daemon)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Iterator

import anyio
import libvirt
import pytest

import aiovirtstream._workers as workers
from aiovirtstream._workers import SerialRunner, run_in_worker, runner_for
from aiovirtstream._workqueue import WorkQueue


async def test_a_runner_runs_its_jobs_in_order_in_one_thread_that_ends_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers, "RUNNER_IDLE_SECONDS", 0.05)
    runner = SerialRunner("test-runner")
    seen: list[tuple[int, int]] = []

    def job(n: int) -> int:
        seen.append((n, threading.get_ident()))
        return n

    results = await asyncio.gather(
        *(run_in_worker(functools.partial(job, n), runner) for n in range(20))
    )
    assert results == list(range(20))
    assert [n for n, _ in seen] == list(range(20))
    assert len({thread for _, thread in seen}) == 1
    assert threading.get_ident() not in {thread for _, thread in seen}

    def names() -> list[str]:
        return [thread.name for thread in threading.enumerate()]

    for _ in range(100):
        if "test-runner" not in names():
            break
        await asyncio.sleep(0.02)
    assert "test-runner" not in names(), "the idle runner's thread did not end"
    assert await run_in_worker(lambda: 42, runner) == 42  # a new thread on demand


def test_one_runner_a_connection() -> None:
    first, second = libvirt.open("test:///default"), libvirt.open("test:///default")
    try:
        assert runner_for(first) is runner_for(first)
        assert runner_for(first) is not runner_for(second)
    finally:
        first.close()
        second.close()


async def test_queues_on_one_runner_take_turns() -> None:
    runner = SerialRunner("test-turns")
    loop = asyncio.get_running_loop()
    order: list[str] = []
    queues: dict[str, WorkQueue[str]] = {
        name: WorkQueue(
            loop,
            order.append,
            lambda _: 1,
            limit=100,
            runner=runner,
            quantum=3,
        )
        for name in "ab"
    }
    gate = threading.Event()
    runner.submit(lambda: gate.wait(5))  # both queues fill before either drains
    for name, queue in queues.items():
        for _ in range(9):
            queue.put_nowait(name)
    gate.set()
    await asyncio.gather(*(queue.join() for queue in queues.values()))
    assert "".join(order) == "aaabbbaaabbbaaabbb"


async def test_a_fed_iterator_is_pulled_on_the_runner_and_closed_when_stopped() -> None:
    runner = SerialRunner("test-feed")
    loop = asyncio.get_running_loop()
    sent: list[int] = []
    threads: set[int] = set()
    closed = threading.Event()

    def numbers(stop: int) -> Iterator[int]:
        try:
            for n in range(stop):
                threads.add(threading.get_ident())
                yield n
        finally:
            closed.set()

    queue: WorkQueue[int] = WorkQueue(loop, sent.append, lambda _: 1, limit=4, runner=runner)
    queue.feed(numbers(50))
    await queue.join()
    assert sent == list(range(50)) and closed.is_set()
    assert threading.get_ident() not in threads

    closed.clear()
    gate = threading.Event()
    stopped: WorkQueue[int] = WorkQueue(loop, sent.append, lambda _: 1, limit=4, runner=runner)
    runner.submit(lambda: gate.wait(5))
    started = numbers(50)
    next(started)  # a started generator: only close() runs its finally
    stopped.feed(started)
    stopped.stop()
    gate.set()
    await stopped.join()
    assert await asyncio.to_thread(closed.wait, 5), "the dropped iterator was not closed"


async def test_what_a_fed_iterator_raises_ends_the_queue() -> None:
    loop = asyncio.get_running_loop()

    def failing() -> Iterator[int]:
        yield 1
        raise OSError("the source shrank")

    queue: WorkQueue[int] = WorkQueue(
        loop, lambda _: None, lambda _: 1, limit=4, runner=SerialRunner("test-error")
    )
    queue.feed(failing())
    await queue.join()
    assert isinstance(queue.error, OSError) and "shrank" in str(queue.error)


async def test_a_cancelled_wait_for_a_call_does_not_spin() -> None:
    """anyio delivers a cancelled scope's cancellation at every await: waiting on for
    an uninterruptible call must not turn that into a busy loop."""
    started = time.perf_counter()
    cpu = time.process_time()
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.05):
            await workers.run_to_the_end(functools.partial(time.sleep, 1.0))
    assert time.perf_counter() - started >= 1.0  # the call was waited for
    assert time.process_time() - cpu < 0.3, "the wait spun on the CPU"
