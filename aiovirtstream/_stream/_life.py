"""Where a stream is in its life (open, finished, aborted, broken), and the errors that say so."""

from __future__ import annotations

__all__ = ["State", "StreamLife"]

import enum
import logging
from collections.abc import Callable

import libvirt

from .._connection import ConnectionWatch
from .._exceptions import (
    AioVirtStreamError,
    ConnectionLostError,
    StreamBrokenError,
    StreamClosedError,
    libvirt_error_to_exception,
)

logger = logging.getLogger(__name__)


class State(enum.Enum):
    OPEN = "open"
    FINISHED = "finished"
    ABORTED = "aborted"
    BROKEN = "broken"


class StreamLife:
    """A stream's state, and the error each operation raises once it is not open."""

    def __init__(self, description: str, connection: ConnectionWatch) -> None:
        self.description = description
        self.state = State.OPEN
        #: finish() or abort() under way.
        self.closing = False
        #: Why the stream broke (kept; never raised itself).
        self.broken_reason: BaseException | None = None
        self._connection = connection
        #: Run once when the stream ends (:meth:`ended`); None after.
        self._on_end: list[Callable[[], object]] | None = []

    def on_end(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once the stream has ended (at once if it has)."""
        if self._on_end is None:
            self._call([callback])
        else:
            self._on_end.append(callback)

    def ended(self) -> None:
        """The stream has ended: run the :meth:`on_end` callbacks (only the first time)."""
        callbacks, self._on_end = self._on_end, None
        if callbacks:
            self._call(callbacks)

    def _call(self, callbacks: list[Callable[[], object]]) -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("%s: close callback %r failed", self.description, callback)

    def check_open(self, action: str) -> None:
        """Raise what ``action`` meets on a stream that is not open (or is closing)."""
        if self.state is State.OPEN and not self.closing:
            return
        raise self.closed_error(action)

    def closed_error(self, action: str) -> StreamClosedError | StreamBrokenError:
        if self.state is State.OPEN:
            return StreamClosedError(f"cannot {action}: the {self.description} is being closed")
        if isinstance(self.broken_reason, ConnectionLostError):
            return self.lost_error(self._connection.lost_now() or self.broken_reason, action)
        if self.state is State.BROKEN:
            broken = StreamBrokenError(
                f"cannot {action}: the {self.description} broke earlier: {self.broken_reason}"
            )
            broken.__cause__ = self.broken_reason
            return broken
        return StreamClosedError(f"cannot {action}: the {self.description} was {self.state.value}")

    def mark_broken(self, error: libvirt.libvirtError | BaseException) -> StreamBrokenError:
        """The stream broke because of ``error``: the error to raise for it."""
        lost = self._connection.lost_now() if isinstance(error, libvirt.libvirtError) else None
        if lost is not None:
            mapped: AioVirtStreamError = self.lost_error(lost)
        elif isinstance(error, libvirt.libvirtError):
            mapped = libvirt_error_to_exception(error, stream=True, context=self.description)
        else:
            mapped = StreamBrokenError(f"{self.description}: {error}")
        if self.state is State.OPEN:
            self.state = State.BROKEN
            self.broken_reason = mapped
        # The caller raises what this returns: never the kept reason itself,
        # whose traceback would then hold the stream (a reference cycle).
        if lost is not None:
            return self.lost_error(lost)
        broken = StreamBrokenError(str(mapped))
        broken.__cause__ = error
        return broken

    def lost_error(
        self, lost: ConnectionLostError, action: str | None = None
    ) -> ConnectionLostError:
        what = f"cannot {action}: the {self.description}" if action else self.description
        return ConnectionLostError(f"{what}: {lost}", uri=lost.uri, reason=lost.reason)
