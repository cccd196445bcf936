"""What a stream carries: data and holes, and the sink a pump fills."""

from __future__ import annotations

__all__ = [
    "Hole",
    "StreamItem",
    "ReceiveSink",
    "MAX_CHUNK",
    "DEFAULT_READ_SIZE",
]

from dataclasses import dataclass
from typing import Protocol

from ._native import Buffer

#: libvirt's legacy payload maximum: larger sends are split by libvirt anyway.
MAX_CHUNK = 262_120


#: One daemon packet's worth: libvirt-python zeroes a buffer of the full size
#: asked for on every recv, and a recv returns at most one packet (262,120
#: bytes), so asking for more only costs.
DEFAULT_READ_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Hole:
    """A run of ``length`` bytes of nothing in a sparse stream."""

    length: int


StreamItem = bytes | Hole
"""What a stream carries: data, or a :class:`Hole` (sparse streams only)."""


class ReceiveSink(Protocol):
    """Where :meth:`AsyncStream.pump` puts what it receives.

    Every method is called on the loop's thread, from inside the stream's
    event; none may block or await.
    """

    def buffer(self) -> tuple[Buffer, int, int] | None:
        """``(buffer, offset, room)`` to receive the next bytes into.

        ``None`` when there is no room: the pump stops reading the stream
        until :meth:`AsyncStream.resume_pump` is called. Raising ends the
        pump with that exception.
        """
        ...

    def received(self, nbytes: int) -> None:
        """``nbytes`` were written into the buffer last given, at its offset."""
        ...

    def hole(self, length: int) -> None:
        """A hole of ``length`` bytes comes next (``stop_at_hole`` pumps only)."""
        ...
