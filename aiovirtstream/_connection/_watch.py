"""Knowing when a libvirt connection is lost, and telling what depends on it.

A stream of a connection that dies is not told by its own event callback:
libvirt drops the connection's socket watch and fails calls in flight, but a
stream waiting for data is left waiting. :class:`ConnectionWatch` learns of
the loss from libvirt's close callback (taken by :func:`aiovirtstream.connect`)
or, for other connections, by asking ``virConnectIsAlive`` while something
is subscribed, and calls its subscribers on their loops.
"""

from __future__ import annotations

__all__ = [
    "ConnectionWatch",
    "watch_connection",
    "map_connection_errors",
    "release_collected",
    "LOST_POLL_INTERVAL",
]

import asyncio
import contextlib
import functools
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import libvirtmod

from .._events import get_event_impl
from .._exceptions import ConnectionLostError, libvirt_error_to_exception
from .._workers import submit_to_worker

#: Seconds between ``virConnectIsAlive`` checks of a connection that has no
#: close callback of ours, while something is subscribed to it.
LOST_POLL_INTERVAL = 0.5

LostCallback = Callable[[ConnectionLostError], object]

_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: (
        "error",
        "a network or protocol error broke it",
    ),
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: (
        "eof",
        "the daemon closed it (it died or restarted, or the network was cut)",
    ),
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: (
        "keepalive",
        "the daemon stopped answering keepalive probes (frozen, or the network is down)",
    ),
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: ("client", "it was closed by this process"),
}


class _CloseDispatch:
    """What libvirt-python's close callback dispatcher calls back.

    The binding calls ``_dispatchCloseCallback`` on the data's ``"conn"``
    entry. Registering this object there, and not the connection, keeps the
    C side from holding the connection's Python object (and the watch)
    alive.
    """

    def __init__(self, watch: ConnectionWatch) -> None:
        self._watch = weakref.ref(watch)

    def _dispatchCloseCallback(self, reason: int, _data: object) -> int:  # noqa: N802
        watch = self._watch()
        if watch is not None:
            watch.close_callback_called(reason)
        return 0


class ConnectionWatch:
    """Tells subscribers, on their loops, when a connection is lost.

    Get one with :func:`watch_connection`. ``lost`` is ``None`` while the
    connection is up, then the :class:`ConnectionLostError` that describes
    the loss.
    """

    def __init__(self, conn: libvirt.virConnect, uri: str) -> None:
        self.uri = uri
        self.lost: ConnectionLostError | None = None
        self._conn = weakref.ref(conn)
        self._lock = threading.Lock()
        self._subscribers: dict[int, tuple[LostCallback, asyncio.AbstractEventLoop]] = {}
        self._next_key = 0
        self._close_callback_data: dict[str, Any] | None = None
        self._polling = False

    # -- libvirt's close callback

    def register_close_callback(self, conn: libvirt.virConnect) -> bool:
        """Take ``conn``'s close callback (libvirt keeps one); False if one is set.

        A round trip to the daemon: call it from a worker thread. libvirt
        keeps the connection open while it has a close callback: give it
        back with :meth:`unregister_close_callback` before closing it; a
        connection closed with a plain ``conn.close()`` gets it given back
        once the Python object is collected.
        """
        data = {"cb": None, "conn": _CloseDispatch(self), "opaque": None}
        if libvirtmod.virConnectRegisterCloseCallback(conn._o, data) == -1:
            return False
        self._close_callback_data = data
        weakref.finalize(conn, _release_later, functools.partial(self._release, conn._o))
        release_collected()
        return True

    def unregister_close_callback(self, conn: libvirt.virConnect) -> None:
        """Give the close callback back, if held (a round trip: worker thread)."""
        with self._lock:
            if self._close_callback_data is None:
                return
            self._close_callback_data = None
        libvirtmod.virConnectUnregisterCloseCallback(conn._o)

    def _release(self, connection_pointer: object) -> None:
        """Unregister for a connection whose Python object is gone (worker thread).

        libvirt's reference held for the callback may be the connection's
        last: unregistering would then close the connection from inside the
        callback's own lock, and deadlock. A stream made first holds one
        more reference, and freeing it closes the connection outside.
        """
        with self._lock:  # the callback, if it fires now, waits: the pointer stays valid
            if self._close_callback_data is None:
                return
            self._close_callback_data = None
            holder = libvirtmod.virStreamNew(connection_pointer, 0)
        try:
            libvirtmod.virConnectUnregisterCloseCallback(connection_pointer)
        finally:
            if holder is not None:
                libvirtmod.virStreamFree(holder)

    def close_callback_called(self, reason: int) -> None:
        # libvirt forgets a close callback once it called it
        # (virConnectCloseCallbackDataCall in src/datatypes.c).
        with self._lock:
            self._close_callback_data = None
        self.mark_lost(reason)

    def mark_lost(self, reason: int) -> None:
        """Record the loss and tell every subscriber (any thread)."""
        kind, why = _REASONS.get(reason, ("error", f"libvirt reported close reason {reason}"))
        error = ConnectionLostError(
            f"the connection to {self.uri} was lost: {why}", uri=self.uri, reason=kind
        )
        with self._lock:
            if self.lost is not None:
                return
            self.lost = error
            subscribers = list(self._subscribers.values())
            self._subscribers.clear()
        for callback, loop in subscribers:
            try:
                # Never from inside libvirt's callback: the subscriber calls libvirt.
                loop.call_soon_threadsafe(callback, error)
            except RuntimeError:
                pass  # that loop is closed: nobody there waits any more

    # -- subscribers

    def subscribe(self, callback: LostCallback) -> Callable[[], None]:
        """Call ``callback(error)`` on the running loop when the connection is lost.

        Returns the function that unsubscribes. If the connection is already
        lost, ``callback`` is scheduled at once.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            lost = self.lost
            if lost is None:
                key = self._next_key
                self._next_key += 1
                self._subscribers[key] = (callback, loop)
        if lost is not None:
            loop.call_soon(callback, lost)
            return _nothing
        if self._close_callback_data is None:
            self._start_polling(loop)
        return lambda: self._unsubscribe(key)

    def _unsubscribe(self, key: int) -> None:
        # Without the lock: an unclosed stream's finalizer calls this wherever
        # the garbage collector runs, maybe inside this lock on the same thread.
        # One dict.pop is atomic; the lock's holders copy or clear the dict.
        self._subscribers.pop(key, None)

    @staticmethod
    def _alive(conn: libvirt.virConnect) -> bool:
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def lost_now(self) -> ConnectionLostError | None:
        """``lost``, or what describes the loss if libvirt knows of one not reported yet.

        A call that failed because the connection broke may return before
        the close callback ran: libvirt marks the client closed first
        (virNetClientMarkClose in src/rpc/virnetclient.c), and
        ``virConnectIsAlive`` reads that mark, locally.
        """
        if self.lost is not None:
            return self.lost
        conn = self._conn()
        if conn is None or self._alive(conn):
            return None
        return ConnectionLostError(
            f"the connection to {self.uri} broke", uri=self.uri, reason="error"
        )

    async def wait_lost(self) -> ConnectionLostError:
        """Wait until the connection is lost; return what describes it."""
        waiter: asyncio.Future[ConnectionLostError] = asyncio.get_running_loop().create_future()

        def resolve(error: ConnectionLostError) -> None:
            if not waiter.done():
                waiter.set_result(error)

        unsubscribe = self.subscribe(resolve)
        try:
            return await waiter
        finally:
            unsubscribe()

    # -- polling, for connections without our close callback

    def _start_polling(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if self._polling:
                return
            self._polling = True
        loop.call_soon(self._schedule_poll, loop)

    def _schedule_poll(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if not self._subscribers or self.lost is not None:
                self._polling = False
                return
        loop.call_later(LOST_POLL_INTERVAL, self._poll, loop)

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        conn = self._conn()
        if conn is None:
            self._polling = False
            return

        # A local check, but it takes libvirt's client lock: off the loop.
        future = submit_to_worker(lambda: self._alive(conn))
        future.add_done_callback(lambda done: self._polled(loop, done.result()))

    def _polled(self, loop: asyncio.AbstractEventLoop, alive: bool) -> None:
        if not alive:
            self.mark_lost(libvirt.VIR_CONNECT_CLOSE_REASON_ERROR)
        try:
            loop.call_soon_threadsafe(self._schedule_poll, loop)
        except RuntimeError:
            self._polling = False  # the loop closed


def _nothing() -> None:
    pass


_releases: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()


def _release_later(release: Callable[[], None]) -> None:
    # A weakref callback runs wherever the garbage collector does, inside
    # any lock (the executor's included): it takes none. SimpleQueue.put is
    # reentrant, and so is asyncio's call_soon_threadsafe.
    _releases.put(release)
    loop = get_event_impl().loop
    if loop is not None:
        try:
            loop.call_soon_threadsafe(release_collected)
        except RuntimeError:
            pass  # closed: the next connect() or aclose_connection() does it


def release_collected() -> None:
    """Give back the close callbacks of connections collected unclosed (any thread)."""
    while True:
        try:
            release = _releases.get_nowait()
        except queue.Empty:
            return
        submit_to_worker(release)


_watches: weakref.WeakKeyDictionary[libvirt.virConnect, ConnectionWatch] = (
    weakref.WeakKeyDictionary()
)
_watches_lock = threading.Lock()


def watch_connection(conn: libvirt.virConnect) -> ConnectionWatch:
    """The :class:`ConnectionWatch` of ``conn`` (made on first use; local calls only).

    For a connection opened by :func:`aiovirtstream.connect` it is told by
    libvirt's close callback, which ``connect`` takes (libvirt keeps one per
    connection, so ``conn.registerCloseCallback`` fails: subscribe here
    instead). For other connections it asks ``virConnectIsAlive`` every
    :data:`LOST_POLL_INTERVAL` seconds while something is subscribed.
    """
    with _watches_lock:
        watch = _watches.get(conn)
        if watch is None:
            watch = _watches[conn] = ConnectionWatch(conn, _uri_of(conn))
        return watch


@contextlib.contextmanager
def map_connection_errors(conn: libvirt.virConnect, *, context: str) -> Iterator[None]:
    """:func:`~aiovirtstream.map_libvirt_errors` for a call on ``conn``.

    A failure of a connection that is lost raises
    :class:`ConnectionLostError`, which names the host and what was lost.
    """
    try:
        yield
    except libvirt.libvirtError as error:
        lost = watch_connection(conn).lost_now()
        if lost is not None:
            raise ConnectionLostError(
                f"{context}: {lost}", uri=lost.uri, reason=lost.reason
            ) from error
        raise libvirt_error_to_exception(error, context=context) from error


def _uri_of(conn: libvirt.virConnect) -> str:
    try:
        return str(conn.getURI())
    except libvirt.libvirtError:
        return "the daemon"
