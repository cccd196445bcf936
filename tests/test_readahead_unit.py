"""ReadAhead's queue with a scripted stream: how reads cut, merge and end it, and
how the read-aheads of a process share one budget."""

from __future__ import annotations

import gc
from collections import deque

import libvirt
import pytest

from aiovirtstream import Hole
from aiovirtstream._stream._readahead import (
    READ_AHEAD_BUDGET,
    READ_AHEAD_LIMIT,
    READ_AHEAD_MIN,
    ReadAhead,
    ReadAheadBudget,
    read_ahead_budget,
)

PACKET = 262_120


class ScriptedStream:
    """Answers recv/recvFlags/recvHole from a script: bytes, -2, -3 (then a hole), 0 for the end."""

    def __init__(self, *script: bytes | int | Exception) -> None:
        self.script: deque[bytes | int | Exception] = deque(script)
        self.holes: deque[int] = deque()
        self.calls = 0

    def _next(self) -> bytes | int:
        self.calls += 1
        if not self.script:
            return -2
        item = self.script.popleft()
        if isinstance(item, Exception):
            raise item
        return b"" if item == 0 else item

    def recv(self, nbytes: int) -> bytes | int:
        return self._next()

    def recvFlags(self, nbytes: int, flags: int) -> bytes | int:  # noqa: N802 (libvirt's name)
        assert flags == libvirt.VIR_STREAM_RECV_STOP_AT_HOLE
        return self._next()

    def recvHole(self, flags: int) -> int:  # noqa: N802
        return self.holes.popleft()


def _ahead(
    stream: ScriptedStream, sparse: bool = False, budget: ReadAheadBudget | None = None
) -> ReadAhead:
    """A read-ahead whose reader has started (the process's budget unless ``budget``)."""
    ahead = ReadAhead(stream, sparse=sparse, socket=None, budget=budget or read_ahead_budget)
    ahead.start()
    return ahead


def test_a_read_takes_across_packets_as_libvirt_would() -> None:
    first, tail, second = b"a" * PACKET, b"b" * 24, b"c" * PACKET
    ahead = _ahead(ScriptedStream(first, tail, second))
    assert ahead.fill() is False  # data came: libvirt updated its timer itself
    assert ahead.take(262_144, stop_at_hole=False) == first + tail
    assert ahead.take(100, stop_at_hole=False) == b"c" * 100
    assert ahead.take(1 << 20, stop_at_hole=False) == b"c" * (PACKET - 100)
    assert not ahead


def test_holes_come_as_holes_or_as_zeroes() -> None:
    stream = ScriptedStream(b"x" * 10, -3, b"y" * 5)
    stream.holes.append(1000)
    ahead = _ahead(stream, sparse=True)
    ahead.fill()
    assert ahead.take(64, stop_at_hole=True) == b"x" * 10  # data stops before the hole
    assert ahead.take(300, stop_at_hole=False) == bytes(300)
    assert ahead.take(300, stop_at_hole=True) == Hole(700)
    assert ahead.take(300, stop_at_hole=True) == b"y" * 5


def test_it_stops_at_its_bound_and_asks_for_no_more() -> None:
    packets = [bytes(PACKET)] * (READ_AHEAD_LIMIT // PACKET + 5)
    stream = ScriptedStream(*packets)
    ahead = _ahead(stream)
    ahead.fill()
    assert stream.calls == READ_AHEAD_LIMIT // PACKET + 1  # the first one at or past the bound
    assert not ahead.wants_data  # without a socket to hold, the events stop instead
    ahead.take(2 * PACKET, stop_at_hole=False)
    assert not ahead.wants_data  # until the reader took half
    ahead.take(READ_AHEAD_LIMIT // 2, stop_at_hole=False)
    assert ahead.wants_data


def test_an_empty_queue_asks_for_the_events_again() -> None:
    ahead = _ahead(ScriptedStream())
    assert ahead.fill() is True  # -2 at once: libvirt left its 0 ms timer enabled


def test_the_end_and_libvirts_error_come_after_the_data() -> None:
    ahead = _ahead(ScriptedStream(b"last", 0))
    ahead.fill()
    assert ahead.ended and not ahead.wants_data
    assert ahead.take(10, stop_at_hole=False) == b"last"
    broken = libvirt.libvirtError("stream broke")
    ahead = _ahead(ScriptedStream(b"some", broken))
    ahead.fill()
    assert ahead.error is broken and not ahead.wants_data
    assert ahead.take(10, stop_at_hole=False) == b"some"


def test_it_reads_nothing_before_a_reader_starts_and_after_drop() -> None:
    ahead = ReadAhead(ScriptedStream(b"x"), sparse=False, socket=None)
    assert not ahead.wants_data
    ahead.start()
    ahead.fill()
    ahead.drop()
    assert not ahead and not ahead.wants_data


@pytest.mark.parametrize("max_bytes", [1, 7, 24, PACKET, PACKET + 24, 1 << 20])
def test_any_read_size_gives_the_bytes_in_order(max_bytes: int) -> None:
    chunks = [bytes([n]) * size for n, size in enumerate([PACKET, 24, 5000, PACKET, 24])]
    ahead = _ahead(ScriptedStream(*chunks))
    ahead.fill()
    out = bytearray()
    while ahead:
        item = ahead.take(max_bytes, stop_at_hole=False)
        assert isinstance(item, bytes) and 0 < len(item) <= max_bytes
        out += item
    assert bytes(out) == b"".join(chunks)


def _filled(budget: ReadAheadBudget, packets: int = 20) -> tuple[ReadAhead, ScriptedStream]:
    stream = ScriptedStream(*[bytes(PACKET)] * packets)
    return _ahead(stream, budget=budget), stream


def test_the_read_aheads_of_a_process_share_one_budget() -> None:
    budget = ReadAheadBudget(total=8 * PACKET, most=6 * PACKET, least=PACKET)
    first, first_stream = _filled(budget)
    second, second_stream = _filled(budget)
    assert budget.share() == 4 * PACKET
    first.fill()
    second.fill()
    assert first_stream.calls == second_stream.calls == 4  # half the budget each
    assert not first.wants_data and not second.wants_data
    second.drop()  # its stream is over: the other may hold more, up to `most`...
    assert budget.share() == 6 * PACKET
    first.take(3 * PACKET, stop_at_hole=False)  # ...once its reader took half
    assert first.wants_data
    first.fill()
    assert first_stream.calls == 4 + 5


def test_a_share_that_shrinks_holds_the_socket_at_the_next_event() -> None:
    budget = ReadAheadBudget(total=8 * PACKET, most=8 * PACKET, least=PACKET)
    first, stream = _filled(budget)
    first.fill()
    assert stream.calls == 8 and not first.wants_data
    first.take(5 * PACKET, stop_at_hole=False)
    assert first.wants_data  # 3 packets left: at most half its share
    others = [_filled(budget)[0] for _ in range(2)]  # two more readers start
    assert budget.share() < 3 * PACKET
    assert first.wants_data  # not held yet: its next event...
    first.fill()  # ...holds the socket without receiving
    assert stream.calls == 8 and not first.wants_data
    assert len(others) == 2


def test_what_others_hold_counts_against_the_total() -> None:
    budget = ReadAheadBudget(total=8 * PACKET, most=8 * PACKET, least=PACKET)
    first, first_stream = _filled(budget)
    first.fill()  # alone: all of it
    second, second_stream = _filled(budget)
    second.fill()  # the total is held already: a packet, as every reader may
    assert first_stream.calls == 8 and second_stream.calls == 1
    first.take(8 * PACKET, stop_at_hole=False)
    first.fill()  # its part now: half, less what the second holds
    assert first_stream.calls == 8 + 4


def test_a_share_never_falls_below_a_packet_nor_passes_the_limit() -> None:
    budget = ReadAheadBudget()
    aheads = [_filled(budget)[0] for _ in range(READ_AHEAD_BUDGET // READ_AHEAD_MIN + 10)]
    assert budget.share() == READ_AHEAD_MIN
    del aheads[1:]
    gc.collect()  # a stream collected without its read-ahead dropped leaves the budget too
    assert budget.share() == READ_AHEAD_LIMIT


def test_starting_twice_counts_once_and_an_unstarted_one_takes_no_share() -> None:
    budget = ReadAheadBudget(total=8 * PACKET, most=8 * PACKET, least=PACKET)
    ahead, _ = _filled(budget)
    ahead.start()
    ReadAhead(ScriptedStream(), sparse=False, socket=None, budget=budget)  # never read
    assert budget.share() == 8 * PACKET
    ahead.drop()
    ahead.drop()
    assert budget.share() == 8 * PACKET
