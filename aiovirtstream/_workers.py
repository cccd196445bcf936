"""Where blocking work runs: one thread per connection, and a small shared pool.

Every blocking call to libvirt runs on its connection's :class:`SerialRunner`:
libvirt does one connection's I/O in one thread at a time anyway, so more
threads per connection buy nothing, and a daemon that hangs holds up only
its own connection. File I/O and calls that belong to no connection run on
a shared pool of :data:`SHARED_WORKERS` threads. Threads therefore grow with
connections, not with streams.
"""

from __future__ import annotations

__all__ = [
    "SerialRunner",
    "Runner",
    "runner_for",
    "shared_pool",
    "SHARED_WORKERS",
    "run_in_worker",
    "submit_to_worker",
    "run_to_the_end",
    "run_or_back_out",
    "wait_through_cancellation",
]

import asyncio
import concurrent.futures
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import anyio
import libvirt

T = TypeVar("T")

#: Threads of the shared pool (file I/O, and work of no one connection).
SHARED_WORKERS = 8
#: Seconds a connection's idle thread waits for work before it ends.
RUNNER_IDLE_SECONDS = 5.0


class Runner(Protocol):
    """Runs callables in a thread of its own: a :class:`SerialRunner` or the shared pool."""

    def submit(self, func: Callable[[], object], /) -> object: ...


class SerialRunner:
    """Runs callables one at a time, in order, in one thread started on demand.

    The thread ends after :data:`RUNNER_IDLE_SECONDS` without work, so an idle
    connection holds none. Work that must not hold up the others for long
    (a transfer's sending) submits itself again after a share.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: deque[Callable[[], object]] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    def submit(self, func: Callable[[], object], /) -> None:
        with self._ready:
            self._jobs.append(func)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            else:
                self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                if not self._jobs:
                    self._ready.wait(RUNNER_IDLE_SECONDS)
                    if not self._jobs:
                        self._thread = None
                        return
                job = self._jobs.popleft()
            job()  # a _Job: it never raises
            del job


_runners: weakref.WeakKeyDictionary[libvirt.virConnect, SerialRunner] = weakref.WeakKeyDictionary()
_runners_lock = threading.Lock()


def runner_for(conn: libvirt.virConnect) -> SerialRunner:
    """The runner of ``conn``'s blocking calls (one thread per connection)."""
    with _runners_lock:
        runner = _runners.get(conn)
        if runner is None:
            runner = _runners[conn] = SerialRunner("aiovirtstream-conn")
        return runner


shared_pool = concurrent.futures.ThreadPoolExecutor(
    max_workers=SHARED_WORKERS, thread_name_prefix="aiovirtstream-io"
)


class _Job(Generic[T]):
    """``func`` and the future it resolves; ``func`` is forgotten as soon as it
    returned, before the future is resolved."""

    __slots__ = ("_func", "_future")

    def __init__(self, func: Callable[[], T], future: concurrent.futures.Future[T]) -> None:
        self._func: Callable[[], T] | None = func
        self._future: concurrent.futures.Future[T] | None = future

    def __call__(self) -> None:
        func, self._func = self._func, None
        future, self._future = self._future, None
        assert func is not None and future is not None, "called twice"
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = func()
        except BaseException as error:  # noqa: BLE001 - handed to the future
            del func
            future.set_exception(error)
            # The error's traceback holds this frame: no cycle back to it.
            del future
        else:
            del func
            future.set_result(result)


def run_in_worker(func: Callable[[], T], runner: Runner | None = None) -> asyncio.Future[T]:
    """Run ``func`` on ``runner`` (default: the shared pool); await the result.

    The pool's thread keeps its work item until some time after the item
    ran. A ``virstream.finish`` bound method held there kept the stream, and
    so the connection, open after ``aclose_connection`` on a loaded machine;
    so does a stream returned by ``func``, if the item's future holds it.
    The item holds neither: ``func`` is dropped once it returned, and the
    result goes to a future of our own.
    """
    return asyncio.wrap_future(submit_to_worker(func, runner))


def submit_to_worker(
    func: Callable[[], T], runner: Runner | None = None
) -> concurrent.futures.Future[T]:
    """:func:`run_in_worker` for a caller that is a thread: a plain future."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    (runner or shared_pool).submit(_Job(func, future))
    return future


async def wait_through_cancellation(
    future: asyncio.Future[T],
) -> asyncio.CancelledError | None:
    """Wait until ``future`` is done, even if the task is cancelled meanwhile.

    For calls that cannot be interrupted once started (a finish, a stream's
    start): returning early would leave them running unseen. Returns the
    cancellation that arrived meanwhile, if any: the caller must raise *that
    instance* after dealing with the result. A fresh ``CancelledError``
    would not carry the cancel scope's message, and anyio would then let it
    escape a ``fail_after`` or ``move_on_after`` that meant to catch it.
    """
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            if cancelled is None:
                await asyncio.shield(future)
            else:
                # anyio delivers a cancelled scope's cancellation again at every
                # await: shielded from it, the wait does not spin until the end.
                with anyio.CancelScope(shield=True):
                    await asyncio.shield(future)
        except asyncio.CancelledError as cancellation:
            if cancelled is None:
                cancelled = cancellation
        except BaseException:  # noqa: BLE001 - the future's own; the caller reads it
            break
    try:
        return cancelled
    finally:
        del cancelled  # its traceback holds this frame: no cycle back to it


async def run_to_the_end(func: Callable[[], T], runner: Runner | None = None) -> T:
    """:func:`run_in_worker`, and a cancellation waits for ``func`` to return first.

    anyio's shielded ``to_thread.run_sync`` does not hold back asyncio's own
    ``task.cancel()``: a cancelled ``Sandbox`` start cleaned up while its
    thread went on spawning libvirtd, and that daemon outlived the sandbox.
    """
    return await run_or_back_out(func, None, runner)


async def run_or_back_out(
    func: Callable[[], T], back_out: Callable[[T], None] | None, runner: Runner | None = None
) -> T:
    """:func:`run_to_the_end` for a start that made something (a started stream,
    a temporary file): cancelled meanwhile, ``back_out(its result)`` runs on
    the same runner before the cancellation is raised."""
    future = run_in_worker(func, runner)
    if (cancelled := await wait_through_cancellation(future)) is not None:
        # Its traceback holds wait_through_cancellation's frame, whose f_back (Python 3.12+)
        # is this one: deleted on every way out (a back-out cancelled again included), else
        # a cycle holds it and what this frame holds.
        try:
            # Retrieved either way: the cancellation is what is raised.
            if not future.cancelled() and future.exception() is None and back_out is not None:
                result = future.result()
                await run_to_the_end(lambda: back_out(result), runner)
            raise cancelled
        finally:
            del cancelled
    try:
        return future.result()
    finally:
        del future  # an error's traceback holds this frame: no cycle back to it
