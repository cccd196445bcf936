"""What a stream receives between its reader's reads, up to its share of a budget.

libvirt's client queues whatever the daemon sends, without limit, while
nobody reads. Once a program reads a stream, its READABLE events between
reads move the data into this queue instead; when it holds its share of
the process's :data:`READ_AHEAD_BUDGET` the connection's socket is not
served until the reader has taken half of it, so the daemon waits for the
reader.
"""

from __future__ import annotations

__all__ = [
    "ReadAhead",
    "ReadAheadBudget",
    "READ_AHEAD_LIMIT",
    "READ_AHEAD_MIN",
    "READ_AHEAD_BUDGET",
    "read_ahead_budget",
]

import weakref
from collections import deque

import libvirt

from .._events import SocketHold
from ._items import DEFAULT_READ_SIZE, Hole, StreamItem

#: Bytes of data a stream holds for its reader before the daemon is held back...
READ_AHEAD_LIMIT = 4 * 1024 * 1024
#: ...at least (a packet), however many streams share...
READ_AHEAD_MIN = 256 * 1024
#: ...the bytes the read-aheads of a process hold together.
READ_AHEAD_BUDGET = 16 * 1024 * 1024


class ReadAheadBudget:
    """The bytes the read-aheads of a process hold together.

    Each active read-ahead may fill up to an equal share, within what the
    others leave of the total, and always up to ``least``. A stream collected
    without its read-ahead dropped leaves the budget with it.
    """

    def __init__(
        self,
        total: int = READ_AHEAD_BUDGET,
        most: int = READ_AHEAD_LIMIT,
        least: int = READ_AHEAD_MIN,
    ) -> None:
        self._total, self._most, self._least = total, most, least
        self._users: weakref.WeakSet[ReadAhead] = weakref.WeakSet()

    def join(self, ahead: ReadAhead) -> None:
        self._users.add(ahead)

    def leave(self, ahead: ReadAhead) -> None:
        self._users.discard(ahead)

    def share(self) -> int:
        """Bytes each active read-ahead may hold, while the others leave room."""
        return max(self._least, min(self._most, self._total // max(len(self._users), 1)))

    def room(self, ahead: ReadAhead) -> int:
        """Bytes ``ahead`` may receive now (none: it holds its part already)."""
        held = sum(user.held for user in list(self._users))
        room = min(self.share() - ahead.held, self._total - held)
        return max(room, self._least - ahead.held, 0)


read_ahead_budget = ReadAheadBudget()


class ReadAhead:
    """Data and holes received for a reader that was not reading (loop thread)."""

    def __init__(
        self,
        virstream: libvirt.virStream,
        *,
        sparse: bool,
        socket: int | None,
        budget: ReadAheadBudget = read_ahead_budget,
    ) -> None:
        self._virstream = virstream
        self._sparse = sparse
        self._items: deque[StreamItem] = deque()
        self._bytes = 0
        self._hold = SocketHold(socket)  # the connection's socket
        self._budget = budget
        self._active = False
        # Its part of the budget reached: the socket is held until the reader
        # took half of what it held then. (Its part may shrink meanwhile, as
        # other streams start reading: its next event holds the socket then.)
        self._full_at = 0
        #: The end of the stream comes after the queued items.
        self.ended = False
        #: What libvirt raised after the queued items.
        self.error: libvirt.libvirtError | None = None

    @property
    def active(self) -> bool:
        """A reader has started: the stream's events between reads fill the queue."""
        return self._active

    def start(self) -> None:
        """A reader has started (idempotent): from now on the queue draws on the budget."""
        if not self._active:
            self._active = True
            self._budget.join(self)

    @property
    def wants_data(self) -> bool:
        """True while the queue takes more (the stream's READABLE event is wanted)."""
        return self._active and not self._full_at and not self.ended and self.error is None

    @property
    def held(self) -> int:
        """Bytes of data queued."""
        return self._bytes

    def __bool__(self) -> bool:
        return bool(self._items)

    def fill(self) -> bool:
        """Move what libvirt has queued into this queue (from the READABLE event).

        True if the stream's events must be stated again: libvirt leaves its
        0 ms timer enabled when a recv finds its queue empty, unless a recv
        that got data updated it (``virNetClientStreamRecvPacket`` in
        src/rpc/virnetclientstream.c).
        """
        st = self._virstream
        got_data = False
        limit = self._bytes + self._budget.room(self)
        while self._bytes < limit:
            try:
                if self._sparse:
                    result = st.recvFlags(DEFAULT_READ_SIZE, libvirt.VIR_STREAM_RECV_STOP_AT_HOLE)
                else:
                    result = st.recv(DEFAULT_READ_SIZE)
                if result == -3:
                    length = int(st.recvHole(0))
                    if length:
                        self._items.append(Hole(length))
                    got_data = True
                    continue
            except libvirt.libvirtError as error:
                self.error = error
                return False
            if isinstance(result, int):  # -2: libvirt's queue is empty
                return not got_data
            if not result:
                self.ended = True
                return False
            self._items.append(result)
            self._bytes += len(result)
            got_data = True
        self._full_at = self._bytes or 1
        self._hold.hold()
        return False

    def take(self, max_bytes: int, stop_at_hole: bool) -> StreamItem:
        """The next item, cut to ``max_bytes`` (call only while the queue is not empty).

        A hole is a :class:`Hole` with ``stop_at_hole``, else zeroes.
        """
        item = self._items[0]
        if isinstance(item, Hole):
            if stop_at_hole:
                self._items.popleft()
                return item
            step = min(max_bytes, item.length)
            if step == item.length:
                self._items.popleft()
            else:
                self._items[0] = Hole(item.length - step)
            return bytes(step)
        # Data as libvirt's recv gives it: across queued packets, up to
        # max_bytes (the daemon sends 262,120 and 24 bytes in turn).
        parts: list[bytes] = []
        size = 0
        while self._items and size < max_bytes and isinstance(self._items[0], bytes):
            part = self._items.popleft()
            assert isinstance(part, bytes)
            if size + len(part) > max_bytes:
                cut = max_bytes - size
                self._items.appendleft(part[cut:])
                part = part[:cut]
            parts.append(part)
            size += len(part)
        self._bytes -= size
        if self._full_at and self._bytes <= self._full_at // 2:
            self._full_at = 0
            self._hold.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def drop(self) -> None:
        """Forget what is queued and serve the socket again: the stream is over."""
        self._items.clear()
        self._bytes = 0
        self._full_at = 0
        if self._active:
            self._active = False
            self._budget.leave(self)
        self._hold.release()
