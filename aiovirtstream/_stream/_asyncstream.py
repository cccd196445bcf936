"""AsyncStream: a NONBLOCK ``virStream`` as an anyio ``ByteStream``."""

from __future__ import annotations

__all__ = [
    "AsyncStream",
    "stream_connection",
    "DEFAULT_WRITE_BUFFER",
]

import asyncio
import functools
import logging
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Literal, TypeVar, overload

import anyio
import anyio.abc
import libvirt

from .._connection import connection_socket, watch_connection
from .._exceptions import (
    ConnectionLostError,
    StreamBrokenError,
)
from .._workers import (
    run_in_worker,
    runner_for,
    wait_through_cancellation,
)
from ._aborts import Abandoned, abort_abandoned, abort_and_release
from ._items import DEFAULT_READ_SIZE, MAX_CHUNK, Hole, ReceiveSink, StreamItem
from ._life import State, StreamLife
from ._native import Buffer
from ._pumping import Pumping
from ._reads import Reads
from ._sender import StreamSender
from ._subscription import ERROR, READABLE, WRITABLE, EventSubscription
from ._writes import Writes

logger = logging.getLogger(__name__)


_E = TypeVar("_E")


#: Seconds abort() waits for the daemon's answer before leaving it to a thread.
DEFAULT_ABORT_WAIT = 2.0


#: Bytes queued for the sender thread before ``write`` waits.
DEFAULT_WRITE_BUFFER = 8 * MAX_CHUNK


class AsyncStream(anyio.abc.ByteStream):
    """An asyncio-native libvirt stream (anyio ``ByteStream``).

    Make one with :func:`open_stream` or the helpers built on it
    (:func:`aiovirtstream.open_volume_upload`, ``open_console``, ...), which
    create the ``virStream`` with ``VIR_STREAM_NONBLOCK`` and start it off
    the loop thread. ``sparse`` says whether the call that started the stream
    had its ``*_SPARSE_STREAM`` flag (holes exist only then).
    """

    def __init__(
        self,
        virstream: libvirt.virStream,
        *,
        sparse: bool = False,
        write_buffer: int = DEFAULT_WRITE_BUFFER,
        description: str = "stream",
    ) -> None:
        self.virstream = virstream
        self.sparse = sparse
        self.description = description
        #: Seconds :meth:`abort` waits for the daemon before leaving the rest
        #: to a worker thread (a stopped daemon answers only when it resumes).
        self.abort_wait = DEFAULT_ABORT_WAIT
        #: What the call that started the stream returned (see :func:`open_stream`).
        self.start_result: object = None
        self._loop = asyncio.get_running_loop()
        # libvirt never fires a stream's event when its connection is lost.
        self._connection = watch_connection(stream_connection(virstream))
        self._life = StreamLife(description, self._connection)
        self._abort_sent = False
        self._read_waiter: asyncio.Future[int] | None = None
        self._write_waiter: asyncio.Future[int] | None = None
        # Every blocking call of this stream runs on its connection's runner.
        self._runner = runner_for(stream_connection(virstream))
        self._sender = StreamSender(
            virstream,
            self._loop,
            runner=self._runner,
            limit=write_buffer,
            on_would_block=self._want_writable,
        )
        self._writes = Writes(self._sender, self._life, sparse=sparse, description=description)
        self._events = EventSubscription(virstream, self._loop, self._on_event)
        lost: weakref.WeakMethod[Callable[[ConnectionLostError], object]]
        lost = weakref.WeakMethod(self.connection_lost)  # the watch must not keep self alive
        self._unsubscribe_lost = self._connection.subscribe(lambda error: _call_alive(lost, error))
        socket = connection_socket(stream_connection(virstream))
        self._reads = Reads(
            virstream, self._life, self._wait_readable, sparse=sparse, socket=socket
        )
        self._pumping = Pumping(self._reads, self._events, self._life, socket, self._resubscribe)

    @property
    def bytes_sent(self) -> int:
        """Bytes of data handed to libvirt so far."""
        return self._sender.bytes_sent

    @property
    def hole_bytes_sent(self) -> int:
        """Bytes of holes handed to libvirt so far."""
        return self._sender.hole_bytes_sent

    # ------------------------------------------------------------------ events

    def _on_event(self, events: int) -> None:
        if events & (READABLE | ERROR):
            self._pumping.step()
        if events & (READABLE | ERROR) and self._read_waiter is not None:
            if not self._read_waiter.done():
                self._read_waiter.set_result(events)
        if events & (WRITABLE | ERROR) and self._write_waiter is not None:
            if not self._write_waiter.done():
                self._write_waiter.set_result(events)
        if events & (READABLE | ERROR) and self._reads.between_reads(self._read_waiter):
            if self._reads.ahead.fill():
                self._events.restate()
        self._resubscribe()

    def _resubscribe(self) -> None:
        # Stream events come from a 0 ms timer that fires on every loop pass
        # while WRITABLE is wanted (virNetClientStreamEventTimerUpdate in libvirt's
        # src/rpc/virnetclientstream.c): subscribe only to what a
        # coroutine is waiting for right now.
        wanted = 0
        if self._read_waiter is not None and not self._read_waiter.done():
            wanted |= READABLE
        if self._pumping.wants_events:
            wanted |= READABLE
        if self._write_waiter is not None and not self._write_waiter.done():
            wanted |= WRITABLE
        if self._reads.between_reads(self._read_waiter):
            wanted |= READABLE
        self._events.want(wanted)

    async def _wait_readable(self) -> None:
        waiter = self._read_waiter = self._loop.create_future()
        self._resubscribe()
        try:
            await waiter
        finally:
            self._read_waiter = None
            self._resubscribe()

    def _want_writable(self) -> None:
        if not self._events.active:
            return
        waiter = self._write_waiter = self._loop.create_future()
        waiter.add_done_callback(self._on_writable)
        self._resubscribe()

    def _on_writable(self, waiter: asyncio.Future[int]) -> None:
        self._write_waiter = None
        self._resubscribe()
        self._sender.resume()

    # ------------------------------------------------------------------ state

    def connection_lost(self, error: ConnectionLostError) -> None:
        """Fail every pending and later operation: the connection is gone (loop thread).

        Called by the connection's watch; a finished or aborted stream is left alone.
        """
        if self._life.state is State.OPEN:
            lost = self._life.lost_error(error)
            self._life.state = State.BROKEN
            self._life.broken_reason = lost
            for waiter in (self._read_waiter, self._write_waiter):
                if waiter is not None and not waiter.done():
                    waiter.set_result(ERROR)
            self._pumping.fail(self._life.lost_error(error, "read"))
        self._reads.ahead.drop()
        self._life.ended()  # nothing passes on a lost connection any more

    @property
    def closed(self) -> bool:
        """True once the stream was finished, aborted or broke."""
        return self._life.state is not State.OPEN

    def add_close_callback(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once, when the stream has ended (at once if it has).

        It ends when :meth:`finish`'s call to the daemon returned, when
        :meth:`abort` returned or was interrupted (see :attr:`abort_wait`), when
        its connection was lost, or when it is collected unclosed (a stream
        broken by an error ends when aborted). It runs on the loop's thread,
        except from the garbage collector; what it raises is logged.
        """
        self._life.on_end(callback)

    # ------------------------------------------------------------------ reading

    @overload
    async def read(self, max_bytes: int = ..., *, stop_at_hole: Literal[False] = ...) -> bytes: ...

    @overload
    async def read(self, max_bytes: int = ..., *, stop_at_hole: Literal[True]) -> StreamItem: ...

    async def read(
        self, max_bytes: int = DEFAULT_READ_SIZE, *, stop_at_hole: bool = False
    ) -> StreamItem:
        """Read up to ``max_bytes``; ``b""`` at end of stream.

        With ``stop_at_hole=True`` (sparse streams) a hole comes back as a
        :class:`Hole` instead of zero bytes. Without it, holes of a sparse
        stream come back as zeroes.
        """
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        try:
            with self._reads.reading(stop_at_hole):
                return await self._reads.read(max_bytes, stop_at_hole)
        finally:
            self._resubscribe()  # between reads, what arrives is read ahead

    async def recv_hole(self) -> int:
        """Length of the hole at the current position of a sparse stream; 0 if data is next.

        Waits until the next item arrived; data found is kept for the next
        :meth:`read`, so nothing is lost.
        """
        item = await self.read(DEFAULT_READ_SIZE, stop_at_hole=True)
        if isinstance(item, Hole):
            return item.length
        if item:
            self._reads.keep(item)
        return 0

    async def read_into(self, buffer: Buffer, *, stop_at_hole: bool = False) -> int | Hole:
        """Receive into ``buffer`` (a ``bytearray`` or writable ``memoryview``).

        Returns the number of bytes received (0 at end of stream), or a
        :class:`Hole` with ``stop_at_hole=True``. Unlike :meth:`read` it
        allocates nothing: libvirt copies straight into ``buffer``.
        """
        size = memoryview(buffer).nbytes
        if size == 0:
            raise ValueError("the buffer is empty")
        try:
            with self._reads.reading(stop_at_hole):
                return await self._reads.read_into(buffer, size, stop_at_hole)
        finally:
            self._resubscribe()

    async def pump(self, sink: ReceiveSink, *, stop_at_hole: bool = False) -> None:
        """Receive everything up to the end of the stream into ``sink``.

        The fast way to consume a stream (downloads use it): each packet is
        received from inside the stream's event, on the loop's thread,
        straight into the sink's buffer, without waking a coroutine per
        packet. Returns at end of stream; raises what :meth:`read` would, or
        what the sink raised. While the sink has no room the stream is not
        read (libvirt keeps queueing what the daemon sends: pause the
        connection too, with ``get_event_impl().pause_reading(socket)``).
        Cancelled, it stops at once; what was received stays received.
        """
        await self._pumping.run(sink, stop_at_hole)

    def resume_pump(self) -> None:
        """Tell :meth:`pump` that its sink has room again (loop thread)."""
        self._pumping.resume()

    async def receive(self, max_bytes: int = DEFAULT_READ_SIZE) -> bytes:
        """anyio ``ByteReceiveStream.receive``: like :meth:`read`, raising ``EndOfStream``.

        anyio's ``__aiter__`` is built on it: ``async for chunk in stream``
        yields data until end of stream.
        """
        data = await self.read(max_bytes)
        if not data:
            raise anyio.EndOfStream
        return data

    async def iter_data(self, chunk_size: int = DEFAULT_READ_SIZE) -> AsyncIterator[bytes]:
        """Yield data until end of stream (holes of a sparse stream as zeroes)."""
        while data := await self.read(chunk_size):
            yield data

    async def iter_items(self, chunk_size: int = DEFAULT_READ_SIZE) -> AsyncIterator[StreamItem]:
        """Yield data chunks and :class:`Hole` markers in order until end of stream."""
        while True:
            item = await self.read(chunk_size, stop_at_hole=True)
            if item == b"":
                return
            yield item

    # ------------------------------------------------------------------ writing

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for sending; waits while the send queue is full.

        Returns once the data is queued, not sent: :meth:`finish` (or
        leaving ``async with``) waits for the queue and reports a failed send.
        """
        await self._writes.write(data)

    async def send(self, item: bytes) -> None:
        """anyio ``ByteSendStream.send``: the same as :meth:`write`."""
        await self.write(item)

    async def send_hole(self, length: int) -> None:
        """Queue a hole of ``length`` bytes (sparse streams only)."""
        await self._writes.send_hole(length)

    async def flush(self) -> None:
        """Wait until every queued write was handed to libvirt."""
        await self._writes.flush()

    async def send_eof(self) -> None:
        """anyio ``ByteSendStream.send_eof``: flush, then finish the stream."""
        await self.finish()

    # ------------------------------------------------------------------ ending

    def _remove_callback(self) -> None:
        # libvirt requires the callback gone before finish/abort.
        if not self._events.active:
            return
        self._unsubscribe_lost()
        self._events.remove()
        self._reads.ahead.drop()
        for waiter in (self._read_waiter, self._write_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(ERROR)
        self._pumping.fail(self._life.closed_error("read"))

    async def send_all(self, items: Iterator[StreamItem]) -> None:
        """Send every item of ``items``, pulled on the connection's runner.

        For producers that block anyway (an upload reading its file): the
        runner does their work, a few packets at a time in turn with the
        connection's other streams, with no hand-off per packet. Returns once
        all was handed to libvirt; :meth:`finish` follows. What ``items``
        raises is raised here as it is; a failed send raises
        :class:`StreamBrokenError`. A cancellation stops the sending (the
        caller's ``async with`` then aborts the stream).
        """
        await self._writes.send_all(items)

    async def finish(self) -> None:
        """Send everything queued, then tell the daemon the stream is complete.

        Raises :class:`StreamBrokenError` if the daemon reports the transfer
        failed. A finished stream cannot be used again.
        """
        if self._life.state is State.FINISHED:
            return
        self._life.check_open("finish")
        self._life.closing = True
        with anyio.CancelScope(shield=True):
            await self._sender.join()
            try:
                self._writes.check()
            except StreamBrokenError:
                await self._abort()
                raise
            self._remove_callback()
            done = run_in_worker(self.virstream.finish, self._runner)
            cancelled = await wait_through_cancellation(done)
            try:
                done.result()
            except libvirt.libvirtError as error:
                broken = self._life.mark_broken(error)
                if cancelled is not None:
                    try:
                        raise cancelled from broken
                    finally:
                        del cancelled  # its traceback holds this frame: no cycle back to it
                raise broken from error
            else:
                self._life.state = State.FINISHED
            finally:
                self._sender.release()
                self._life.ended()
            if cancelled is not None:
                try:
                    raise cancelled
                finally:
                    del cancelled  # its traceback holds this frame: no cycle back to it

    async def abort(self) -> None:
        """Abandon the transfer: drop queued data and tell the daemon. Idempotent."""
        if self._life.state in (State.FINISHED, State.ABORTED):
            return
        with anyio.CancelScope(shield=True):
            await self._abort()

    async def _abort(self) -> None:
        if self._abort_sent:
            return  # a broken stream aborted once already
        self._abort_sent = True
        self._life.closing = True
        was_broken = self._life.state is State.BROKEN
        self._life.state = State.ABORTED if not was_broken else State.BROKEN
        self._sender.stop()
        self._remove_callback()
        # abort waits for the daemon's answer (and a send in flight for the
        # daemon to read it): against a stopped daemon that lasts until the
        # keepalive gives up. Wait a little, then let it end in the background
        # so that a cancellation or a timeout is not held up.
        # On the connection's runner: after the send under way, if one is.
        done = run_in_worker(
            functools.partial(abort_and_release, self.virstream, self._sender, self.description),
            self._runner,
        )
        # asyncio.wait, not wait_for: it neither cancels the abort nor, on
        # Python 3.11, swallows a cancellation that lands as the abort ends.
        try:
            finished, _ = await asyncio.wait({done}, timeout=self.abort_wait)
        finally:
            self._life.ended()
        if finished:
            done.result()
        else:
            logger.warning(
                "%s: the daemon did not acknowledge the abort within %.1f s; "
                "it completes in the background",
                self.description,
                self.abort_wait,
            )

    async def aclose(self) -> None:
        """anyio ``AsyncResource.aclose``: abort unless already finished."""
        await self.abort()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """Finish on a clean exit; abort on an exception or a cancellation."""
        if exc_type is None and self._life.state is State.OPEN:
            try:
                await self.finish()
            except BaseException:
                # A cancellation interrupted the queue's drain, or the daemon
                # refused the finish: either way the stream is abandoned.
                await self.abort()
                raise
        else:
            await self.abort()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        events = getattr(self, "_events", None)
        if events is not None and events.active:
            _warn(f"unclosed {self.description} {self!r}", ResourceWarning, stacklevel=2)
            self._unsubscribe_lost()
            if self._abort_sent:
                events.remove()
            else:
                parts = (self.virstream, events, self._sender, self._runner, self._reads.ahead)
                abort_abandoned(self._loop, Abandoned(*parts, self.description))
        life = getattr(self, "_life", None)
        if life is not None:
            life.ended()

    def __repr__(self) -> str:
        return f"<AsyncStream {self.description} {self._life.state.value}>"


def _call_alive(method: weakref.WeakMethod[Callable[[_E], object]], argument: _E) -> None:
    bound = method()
    if bound is not None:
        bound(argument)


def stream_connection(virstream: libvirt.virStream) -> libvirt.virConnect:
    """The connection a ``virStream`` was made on (libvirt-python keeps it)."""
    conn: libvirt.virConnect = virstream._conn
    return conn
