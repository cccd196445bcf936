"""Creating and starting a NONBLOCK ``virStream`` off the loop, and wrapping it."""

from __future__ import annotations

__all__ = [
    "open_stream",
    "adopt_stream",
    "start_stream_blocking",
    "check_stream_events",
    "check_connection",
]

from collections.abc import Callable

import anyio
import anyio.abc
import libvirt

from .._connection import map_connection_errors, watch_connection
from .._events import bind_event_loop, get_event_impl
from .._exceptions import (
    ConnectionLostError,
    EventLoopNotRegisteredError,
)
from .._workers import (
    run_or_back_out,
    run_to_the_end,
    runner_for,
)
from ._aborts import abort_quietly
from ._asyncstream import DEFAULT_WRITE_BUFFER, AsyncStream, stream_connection


async def open_stream(
    conn: libvirt.virConnect,
    start: Callable[[libvirt.virStream], object],
    *,
    sparse: bool = False,
    description: str = "stream",
    write_buffer: int = DEFAULT_WRITE_BUFFER,
) -> AsyncStream:
    """Create a NONBLOCK stream on ``conn``, start it with ``start`` off the loop, wrap it.

    ``start`` is the libvirt call that opens the stream, e.g.
    ``lambda st: vol.upload(st, 0, 0, flags)``; it runs in a worker thread
    since it is a blocking round trip to the daemon. What it returns (e.g.
    the MIME type of ``virDomainScreenshot``) is kept as
    :attr:`AsyncStream.start_result`.
    """
    check_stream_events(conn)
    check_connection(conn, description)
    # The start call cannot be interrupted: a cancellation waits for it, and
    # a stream it opened is aborted before the cancellation goes on.
    virstream, result = await run_or_back_out(
        lambda: start_stream_blocking(conn, start, description),
        lambda started: abort_quietly(started[0]),
        runner_for(conn),
    )
    return await adopt_stream(
        virstream, result, sparse=sparse, description=description, write_buffer=write_buffer
    )


def check_stream_events(conn: libvirt.virConnect) -> None:
    """Bind the event implementation to the running loop; raise
    :class:`EventLoopNotRegisteredError` if ``conn`` can have no stream events."""
    registered_before = get_event_impl().registered_with_libvirt
    bind_event_loop()
    if not registered_before and not _in_process(conn):
        # Registered just now, so this connection was opened before: libvirt
        # gave it no async I/O, and its stream events would never come.
        raise EventLoopNotRegisteredError(
            "this connection was opened before aiovirtstream's event implementation was "
            "registered, so libvirt will never report its stream events. Open it with "
            "aiovirtstream.connect(), or call aiovirtstream.register_event_impl() before "
            "libvirt.open()"
        )


def check_connection(conn: libvirt.virConnect, description: str) -> None:
    """Raise :class:`ConnectionLostError` if ``conn`` is known to be lost."""
    lost = watch_connection(conn).lost
    if lost is not None:
        raise ConnectionLostError(
            f"cannot open the {description}: {lost}", uri=lost.uri, reason=lost.reason
        )


def start_stream_blocking(
    conn: libvirt.virConnect, start: Callable[[libvirt.virStream], object], description: str
) -> tuple[libvirt.virStream, object]:
    """Create a NONBLOCK stream and start it (worker thread: a round trip).

    Returns the stream and what ``start`` returned, for :func:`adopt_stream`
    on the loop. Call :func:`check_stream_events` on the loop first.
    """
    with map_connection_errors(conn, context=f"cannot create the {description}"):
        virstream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
    with map_connection_errors(conn, context=f"cannot open the {description}"):
        return virstream, start(virstream)


async def adopt_stream(
    virstream: libvirt.virStream,
    start_result: object,
    *,
    sparse: bool = False,
    description: str = "stream",
    write_buffer: int = DEFAULT_WRITE_BUFFER,
) -> AsyncStream:
    """Wrap a stream started by :func:`start_stream_blocking` (loop thread).

    If it cannot be watched, it is aborted and the error raised.
    """
    try:
        stream = AsyncStream(
            virstream, sparse=sparse, description=description, write_buffer=write_buffer
        )
    except EventLoopNotRegisteredError:
        with anyio.CancelScope(shield=True):
            await run_to_the_end(
                lambda: abort_quietly(virstream), runner_for(stream_connection(virstream))
            )
        raise
    stream.start_result = start_result
    return stream


def _in_process(conn: libvirt.virConnect) -> bool:
    """True for drivers that run in this process (their streams are local fds)."""
    try:
        uri = conn.getURI()  # formatted locally, no round trip
    except libvirt.libvirtError:
        return False
    return uri.startswith("test:") or uri.endswith("/embed") or "/embed?" in uri
