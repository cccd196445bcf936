"""run_in_worker / submit_to_worker: what the shared executor keeps (pure logic)."""

from __future__ import annotations

import asyncio
import concurrent.futures.thread
import gc
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from aiovirtstream._workers import _Job, run_in_worker, submit_to_worker


class Result:
    """Stands for a virStream: it must not outlive its caller's interest."""


@pytest.fixture
def lingering_executor(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Executor threads keep their last work item until released (as a
    preempted thread does); yields the event set once an item has run."""
    ran = threading.Event()
    release = threading.Event()
    run = concurrent.futures.thread._WorkItem.run

    def run_then_linger(item: Any) -> None:
        run(item)
        ran.set()
        release.wait(10)

    monkeypatch.setattr(concurrent.futures.thread._WorkItem, "run", run_then_linger)
    gc.disable()  # only reference counts free objects: no cycle may hold them
    try:
        yield ran
    finally:
        gc.enable()
        release.set()


async def test_a_result_is_not_kept_by_the_worker(lingering_executor: threading.Event) -> None:
    ref = weakref.ref(await run_in_worker(Result))
    assert lingering_executor.wait(5)
    await asyncio.sleep(0)  # the task's wake-up holds the resolved future until it yields
    assert ref() is None


async def test_an_error_and_its_frames_are_not_kept_by_the_worker(
    lingering_executor: threading.Event,
) -> None:
    refs: list[weakref.ref[Result]] = []

    def fail() -> None:
        local = Result()
        refs.append(weakref.ref(local))
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await run_in_worker(fail)
    assert lingering_executor.wait(5)
    await asyncio.sleep(0)
    assert refs[0]() is None


def test_a_thread_caller_gets_a_plain_future(lingering_executor: threading.Event) -> None:
    future = submit_to_worker(Result)
    ref = weakref.ref(future.result(5))
    del future
    assert lingering_executor.wait(5)
    assert ref() is None


def test_a_job_cancelled_before_it_runs_never_runs() -> None:
    ran: list[int] = []
    future: concurrent.futures.Future[None] = concurrent.futures.Future()
    job = _Job(lambda: ran.append(1), future)
    assert future.cancel()
    job()  # what the executor's thread does once it reaches the job
    assert ran == [] and future.cancelled()
