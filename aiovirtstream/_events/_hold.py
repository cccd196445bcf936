"""One holder's pause of a connection's socket: taken at most once, given back once."""

from __future__ import annotations

__all__ = ["SocketHold"]

from ._registry import get_event_impl


class SocketHold:
    """Keeps libvirt from reading ``socket`` for one holder (``pause_reading``),
    so the daemon waits; idempotent both ways. A socket not known (None) is never held."""

    __slots__ = ("_socket", "held")

    def __init__(self, socket: int | None) -> None:
        self._socket = socket
        #: True while this holder keeps the socket unserved.
        self.held = False

    @property
    def possible(self) -> bool:
        """False when the socket is not known (a connection not from ``connect()``)."""
        return self._socket is not None

    def hold(self) -> None:
        if self._socket is not None and not self.held:
            self.held = True
            get_event_impl().pause_reading(self._socket)

    def release(self) -> None:
        if self.held:
            self.held = False
            assert self._socket is not None
            get_event_impl().resume_reading(self._socket)
