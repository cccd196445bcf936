"""How a download is split over streams (no daemon): how many streams, and their ranges."""

from __future__ import annotations

import pytest

from aiovirtstream._transfer._options import TransferOptions
from aiovirtstream._transfer._ranges import (
    AUTO_PARALLEL,
    AUTO_PARALLEL_MIN,
    PARALLEL_MIN_PART,
    split_range,
    streams_for,
)

MiB = 1024 * 1024
PART = PARALLEL_MIN_PART


def options(parallel: int | None, *, checksum: bool = False) -> TransferOptions:
    return TransferOptions(True, 0, 0, None, 0.1, checksum, parallel=parallel)


# ------------------------------------------------------------ how many streams


def test_the_automatic_choice_splits_only_large_downloads() -> None:
    assert AUTO_PARALLEL > 1
    assert streams_for(options(None), AUTO_PARALLEL_MIN - 1) == 1
    assert streams_for(options(None), AUTO_PARALLEL_MIN) == AUTO_PARALLEL
    # ...and a download that large is in fact split that many ways.
    assert len(split_range(0, AUTO_PARALLEL_MIN, AUTO_PARALLEL)) == AUTO_PARALLEL


@pytest.mark.parametrize("total", [1, AUTO_PARALLEL_MIN], ids=["small", "large"])
def test_a_parallel_asked_for_is_taken_as_it_is(total: int) -> None:
    """Whether the download is large enough for it is split_range's call."""
    assert streams_for(options(3), total) == 3
    assert streams_for(options(1), total) == 1


@pytest.mark.parametrize("parallel", [None, 4])
def test_a_checksum_takes_one_stream(parallel: int | None) -> None:
    """The hash needs the content in order."""
    assert streams_for(options(parallel, checksum=True), 100 * AUTO_PARALLEL_MIN) == 1


# ------------------------------------------------------------ the ranges


@pytest.mark.parametrize("parallel", [1, 0, -1])
def test_one_stream_takes_the_whole_range(parallel: int) -> None:
    assert split_range(7, 100 * PART, parallel) == [(7, 100 * PART)]


@pytest.mark.parametrize(
    ("total", "parallel"),
    [(2 * PART - 1, 2), (3 * PART - 1, 3), (0, 2)],
    ids=["a-byte-short-of-two", "a-byte-short-of-three", "empty"],
)
def test_a_range_too_small_for_its_parts_is_not_split(total: int, parallel: int) -> None:
    assert split_range(7, total, parallel) == [(7, total)]


def test_ranges_of_exactly_the_least_size() -> None:
    assert split_range(5, 2 * PART, 2) == [(5, PART), (5 + PART, PART)]


def test_ranges_are_cut_at_mib_boundaries_and_the_last_takes_the_rest() -> None:
    """A third of 3 parts and 5 bytes, rounded up to a MiB: the first two ranges
    take a MiB more than a part each, the last what is left."""
    assert split_range(7, 3 * PART + 5, 3) == [
        (7, PART + MiB),
        (7 + PART + MiB, PART + MiB),
        (7 + 2 * PART + 2 * MiB, PART - 2 * MiB + 5),
    ]


@pytest.mark.parametrize("parallel", [2, 3, 4, 8])
@pytest.mark.parametrize("extra", [0, 1, MiB - 1, MiB, 12_345_678])
def test_ranges_tile_the_download(parallel: int, extra: int) -> None:
    """As many ranges as streams, in order, end to end over exactly the range
    asked for, each but the last a whole number of MiB."""
    offset, total = 4097, parallel * PART + extra
    ranges = split_range(offset, total, parallel)
    assert len(ranges) == parallel
    position = offset
    for start, length in ranges:
        assert start == position and length > 0
        position += length
    assert position == offset + total
    assert all(length % MiB == 0 for _, length in ranges[:-1])
