"""Opening and closing libvirt connections without blocking the loop."""

from __future__ import annotations

__all__ = ["connect", "aclose_connection", "connection_socket"]

import socket
import weakref
from typing import Any

import anyio
import libvirt

from .._events import bind_event_loop
from .._exceptions import ConnectError, map_libvirt_errors
from .._workers import run_to_the_end
from ._watch import release_collected, watch_connection

# The socket fd of each connection opened by connect(), for backpressure
# (EventImpl.pause_reading): libvirt does not tell, but its watch is the one
# fd that appears in the event implementation while the connection opens.
_sockets: weakref.WeakKeyDictionary[libvirt.virConnect, int] = weakref.WeakKeyDictionary()

# libvirt's auth list: [credential types, callback, opaque] (see libvirt.openAuth).
Auth = list[Any]

#: What :func:`connect` asks for as a unix socket's send buffer (the kernel
#: doubles it, capped by ``net.core.wmem_max``).
DEFAULT_SEND_BUFFER = 1024 * 1024


async def connect(
    uri: str | None = None,
    *,
    readonly: bool = False,
    auth: Auth | None = None,
    keepalive: tuple[int, int] | None = (5, 3),
    send_buffer: int | None = DEFAULT_SEND_BUFFER,
) -> libvirt.virConnect:
    """Open a libvirt connection whose streams work with asyncio.

    Registers aiovirtstream's event implementation (libvirt reads a
    connection's stream events only if one was registered *before* the
    connection was opened), binds it to the running loop and opens the
    connection in a worker thread, since opening can block for long (DNS,
    TCP, authentication).

    ``keepalive`` is ``(interval seconds, count)`` for
    ``virConnectSetKeepAlive``, served by the same loop; ``None`` leaves it
    off. A daemon that stops answering is given up after about interval x
    (count + 1) seconds: its streams then fail with
    :class:`ConnectionLostError`, as they do at once when it dies.
    ``connect`` takes libvirt's close callback of the connection (libvirt
    keeps one): use :func:`watch_connection` to be told of a loss. The
    connection is a plain ``libvirt.virConnect``; close it with
    :func:`aclose_connection` (``close`` can block).

    ``send_buffer`` widens the send buffer of a connection over a unix
    socket (local daemons, ``qemu+ssh``) to this many bytes (``SO_SNDBUF``;
    the kernel doubles it and caps it at ``net.core.wmem_max``): libvirt
    sends a stream's data in packets of 256 KiB, larger than the default
    buffer (208 KiB), so every packet waited for the daemon to read. TCP
    sockets are left to the kernel's autotuning. ``None`` leaves it as
    libvirt made it.
    """
    if send_buffer is not None and send_buffer < 1:
        raise ValueError("send_buffer must be a positive number of bytes (or None)")
    impl = bind_event_loop()
    # anyio loads its asyncio backend on first use: an import of its own,
    # once per process, better paid now than inside the first transfer.
    anyio.get_current_task()
    watched_before = impl.watched_fds()

    def open_blocking() -> libvirt.virConnect:
        if auth is not None:
            flags = libvirt.VIR_CONNECT_RO if readonly else 0
            conn = libvirt.openAuth(uri, auth, flags)
        elif readonly:
            conn = libvirt.openReadOnly(uri)
        else:
            conn = libvirt.open(uri)
        if keepalive is not None:
            try:
                conn.setKeepAlive(*keepalive)
            except libvirt.libvirtError as error:
                # In-process drivers (test:///, qemu:///embed) have no keepalive.
                if error.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
        watch_connection(conn).register_close_callback(conn)
        return conn

    try:
        # On the transfers' worker threads: the first transfer finds one ready.
        conn = await run_to_the_end(open_blocking)
    except libvirt.libvirtError as error:
        message = error.get_error_message() or str(error)
        raise ConnectError(
            f"cannot connect to {uri or 'the default URI'}: {message}",
            code=error.get_error_code(),
            domain=error.get_error_domain(),
            libvirt_message=message,
        ) from error
    new = impl.watched_fds() - watched_before
    if len(new) == 1:  # else another connection opened meanwhile: no guess
        fd = _sockets[conn] = next(iter(new))
        if send_buffer is not None:
            widen_send_buffer(fd, send_buffer)
    return conn


def widen_send_buffer(fd: int, size: int) -> bool:
    """Raise a unix socket's ``SO_SNDBUF`` to ``size`` (never lower it); True if set.

    With the default (208 KiB on a stock kernel) each 256 KiB packet waits
    for the daemon to drain the one before; with 1 MiB asked (the kernel
    doubles it) it does not, and libvirt's sending loop wakes half as often
    (docs/internals.md). On TCP, setting it would turn autotuning off.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False  # gone, or not a socket: nothing to tune
    try:
        if sock.family != socket.AF_UNIX:
            return False
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= size:
            return False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError:
        return False  # advice only
    finally:
        sock.detach()  # libvirt's fd: borrowed, never closed here
    return True


def connection_socket(conn: libvirt.virConnect) -> int | None:
    """The socket fd of a connection opened by :func:`connect`, if known."""
    return _sockets.get(conn)


async def aclose_connection(conn: libvirt.virConnect) -> None:
    """Close ``conn`` in a worker thread (closing a remote connection waits for the daemon).

    Streams of ``conn`` still open fail with :class:`ConnectionLostError`.
    Closing a connection that was lost works, and is needed to free it.
    """
    _sockets.pop(conn, None)  # its fd number may soon name another socket
    release_collected()
    watch = watch_connection(conn)

    def close() -> int:
        watch.mark_lost(libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT)
        watch.unregister_close_callback(conn)  # a round trip: after the streams were told
        result: int = conn.close()
        return result

    with map_libvirt_errors(context="closing the connection"):
        await run_to_the_end(close)
