"""Upload planning (no daemon): how holes go given what the volume holds, the stream's
length, the room, the size-restoring last hole, and the ranges refused."""

from __future__ import annotations

import logging

import pytest

from aiovirtstream import InvalidRangeError, SourceTooLargeError
from aiovirtstream._transfer._options import TransferOptions
from aiovirtstream._transfer._plan import UploadPlan, make_upload_plan, size_restoring_hole
from aiovirtstream._volume import VolumeSize

MiB = 1024 * 1024
CAPACITY = 10 * MiB
NAME = "the test source"
HOLDS_DATA = "the volume holds data"
FULLY_ALLOCATED = "the volume is fully allocated"


def options(*, sparse: bool = True, offset: int = 0, length: int = 0) -> TransferOptions:
    return TransferOptions(sparse, offset, length, None, 0.1, False)


def raw(
    allocation: int = 0,
    capacity: int = CAPACITY,
    *,
    kind: str | None = "file",
    fmt: str | None = "raw",
) -> VolumeSize:
    """A volume whose stream carries the guest's disk (``capacity`` bytes)."""
    return VolumeSize("disk.img", capacity, allocation, capacity, kind, fmt)


def qcow2(physical: int | None, allocation: int = 3 * MiB) -> VolumeSize:
    """A container file of ``physical`` bytes for a 20 MiB guest disk."""
    return VolumeSize("disk.qcow2", 20 * MiB, allocation, physical, "file", "qcow2")


def plan(
    size: VolumeSize,
    amount: int | None,
    *,
    sparse: bool = True,
    offset: int = 0,
    length: int = 0,
) -> UploadPlan:
    return make_upload_plan(
        options(sparse=sparse, offset=offset, length=length), amount, NAME, size
    )


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(autouse=True)
def _capture_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aiovirtstream")


# ------------------------------------------------------------ holes as holes


@pytest.mark.parametrize("amount", [5 * MiB, None], ids=["known", "unknown"])
def test_into_an_empty_volume_every_hole_goes_as_a_hole_and_the_size_is_restored(
    caplog: pytest.LogCaptureFixture, amount: int | None
) -> None:
    """The stream is opened for the whole room (not the source's length), so that
    the last hole can run to the volume's end."""
    got = plan(raw(allocation=0), amount, offset=3 * MiB)
    assert got == UploadPlan(
        holes_from=3 * MiB, room=7 * MiB, stream_length=7 * MiB, restore_size=True
    )
    assert got.holes
    assert warnings_logged(caplog) == []


def test_an_empty_volume_smaller_than_a_sector_still_takes_holes() -> None:
    """Allocation 0 is checked before "fully allocated" (0 // 512 >= 100 // 512)."""
    size = raw(allocation=0, capacity=100)
    assert size.fully_allocated
    assert plan(size, 60, offset=40) == UploadPlan(40, 60, 60, True)


# ------------------------------------------------------------ holes as zeroes


@pytest.mark.parametrize(
    ("size", "amount", "expected"),
    [
        (raw(allocation=0), 4 * MiB, UploadPlan(None, 7 * MiB, 4 * MiB, False)),
        (raw(allocation=0), None, UploadPlan(None, 7 * MiB, 7 * MiB, False)),
        (raw(allocation=MiB), 4 * MiB, UploadPlan(None, 7 * MiB, 4 * MiB, False)),
        (raw(allocation=CAPACITY), None, UploadPlan(None, 7 * MiB, 7 * MiB, False)),
        (qcow2(physical=2 * MiB), 4 * MiB, UploadPlan(None, None, 4 * MiB, False)),
        (qcow2(physical=2 * MiB), None, UploadPlan(None, None, 0, False)),
    ],
    ids=["empty", "empty-unknown", "with-data", "full-unknown", "qcow2", "qcow2-unknown"],
)
def test_without_sparse_holes_go_as_zeroes_and_nothing_is_said(
    caplog: pytest.LogCaptureFixture,
    size: VolumeSize,
    amount: int | None,
    expected: UploadPlan,
) -> None:
    """The stream's length: the source's if known, else the room (0, no limit, for
    a container file, which has no room to speak of)."""
    got = plan(size, amount, sparse=False, offset=3 * MiB if size.raw_file else 0)
    assert got == expected
    assert not got.holes
    assert warnings_logged(caplog) == []


@pytest.mark.parametrize("amount", [4 * MiB, None], ids=["known", "unknown"])
def test_into_a_volume_holding_data_holes_go_as_zeroes_with_a_warning(
    caplog: pytest.LogCaptureFixture, amount: int | None
) -> None:
    """libvirt would keep the old data inside an uploaded hole."""
    got = plan(raw(allocation=MiB), amount, offset=2 * MiB)
    assert got == UploadPlan(None, 8 * MiB, amount or 8 * MiB, False)
    (warning,) = warnings_logged(caplog)
    assert HOLDS_DATA in warning and f"({MiB} bytes allocated)" in warning


@pytest.mark.parametrize(
    ("capacity", "allocation", "said"),
    [
        (CAPACITY, CAPACITY, FULLY_ALLOCATED),
        (CAPACITY, CAPACITY + 4096, FULLY_ALLOCATED),  # a file system's metadata on top
        (CAPACITY, CAPACITY - 1, HOLDS_DATA),  # one sector short of full
        (CAPACITY + 100, CAPACITY, FULLY_ALLOCATED),  # counted in whole sectors
    ],
    ids=["equal", "more", "a-sector-short", "partial-last-sector"],
)
def test_a_fully_allocated_volume_takes_zeroes_with_its_own_warning(
    caplog: pytest.LogCaptureFixture, capacity: int, allocation: int, said: str
) -> None:
    got = plan(raw(allocation, capacity), MiB)
    assert got == UploadPlan(None, capacity, MiB, False)
    (warning,) = warnings_logged(caplog)
    assert said in warning and str(allocation) in warning


# ------------------------------------------------------------ container files


@pytest.mark.parametrize(
    ("offset", "amount", "holes_from", "stream_length"),
    [
        (0, None, 3 * MiB, 0),  # a source of unknown length may reach past the file's end
        (MiB, 5 * MiB, 3 * MiB, 5 * MiB),  # reaches past it: holes as holes from there
        (MiB, 2 * MiB, None, 2 * MiB),  # ends at the file's end: every hole inside it
        (MiB, 2 * MiB + 1, 3 * MiB, 2 * MiB + 1),  # one byte past it
        (3 * MiB, MiB, 3 * MiB, MiB),  # starts at the file's end
        (MiB, 100 * MiB, 3 * MiB, 100 * MiB),  # past the guest's capacity: the file grows
    ],
    ids=["unknown", "past-the-end", "to-the-end", "a-byte-past", "at-the-end", "grows"],
)
def test_into_a_container_file_holes_go_as_holes_only_past_its_end(
    caplog: pytest.LogCaptureFixture,
    offset: int,
    amount: int | None,
    holes_from: int | None,
    stream_length: int,
) -> None:
    """Inside the file a hole would keep what the file holds there; past its end a
    hole reads as zeroes. No room (the file grows), no size to restore, no warning,
    whatever the file's allocation."""
    got = plan(qcow2(physical=3 * MiB), amount, offset=offset)
    assert got == UploadPlan(holes_from, None, stream_length, False)
    assert warnings_logged(caplog) == []


def test_into_a_container_file_of_unknown_size_holes_go_as_zeroes() -> None:
    assert plan(qcow2(physical=None), 4 * MiB, offset=MiB) == UploadPlan(None, None, 4 * MiB, False)


def test_an_empty_container_file_is_still_a_container() -> None:
    """The container test comes before allocation 0: no room, no size restored."""
    got = plan(qcow2(physical=0, allocation=0), MiB)
    assert got == UploadPlan(0, None, MiB, False)


@pytest.mark.parametrize(
    ("kind", "fmt", "container"),
    [
        ("file", "qcow2", True),
        ("file", "vmdk", True),
        ("file", "raw", False),
        ("file", None, False),
        ("block", None, False),
        ("network", "qcow2", False),
    ],
)
def test_only_a_file_in_a_format_other_than_raw_is_a_container(
    kind: str, fmt: str | None, container: bool
) -> None:
    got = plan(raw(allocation=0, kind=kind, fmt=fmt), None, offset=MiB)
    if container:
        assert got == UploadPlan(CAPACITY, None, 0, False)  # from the file's end (its size)
    else:
        assert got == UploadPlan(MiB, 9 * MiB, 9 * MiB, True)


# ------------------------------------------------------------ refused


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_a_source_larger_than_the_room_is_refused(sparse: bool) -> None:
    size = raw(allocation=MiB)
    assert plan(size, 7 * MiB, sparse=sparse, offset=3 * MiB).room == 7 * MiB  # just fits
    with pytest.raises(SourceTooLargeError) as refused:
        plan(size, 7 * MiB + 1, sparse=sparse, offset=3 * MiB)
    message = str(refused.value)
    assert f"{NAME} has {7 * MiB + 1} bytes to upload at offset {3 * MiB}" in message
    assert f"the volume holds {CAPACITY} bytes: resize the volume" in message


@pytest.mark.parametrize(
    ("offset", "length"),
    [(CAPACITY + 1, 0), (CAPACITY - MiB, MiB + 1), (0, CAPACITY + 1)],
    ids=["offset-past-the-end", "length-past-the-end", "length-too-long"],
)
def test_a_range_past_the_volumes_end_is_refused(offset: int, length: int) -> None:
    """Before the source's size is looked at: a range error, not a size error."""
    with pytest.raises(InvalidRangeError, match="past the end of volume 'disk.img'"):
        plan(raw(), 100 * MiB, offset=offset, length=length)


@pytest.mark.parametrize(
    ("offset", "length", "room"),
    [(CAPACITY, 0, 0), (CAPACITY - MiB, MiB, MiB), (0, CAPACITY, CAPACITY)],
    ids=["offset-at-the-end", "length-to-the-end", "length-of-the-volume"],
)
def test_a_range_up_to_the_volumes_end_is_taken(offset: int, length: int, room: int) -> None:
    assert plan(raw(), None, offset=offset, length=length, sparse=False).room == room


def test_into_a_container_file_only_an_offset_past_its_end_is_refused() -> None:
    size = qcow2(physical=3 * MiB)
    with pytest.raises(InvalidRangeError, match="writes the file itself"):
        plan(size, MiB, offset=3 * MiB + 1)
    # A length past the file's end (and the guest's capacity) is not: the file grows.
    assert plan(size, None, offset=3 * MiB, length=100 * MiB).room is None
    # Nor is any offset into a file of unknown size.
    assert plan(qcow2(physical=None), None, offset=100 * MiB).room is None


# ------------------------------------------------------------ the plan's answers


def test_holes_from_source_is_the_volume_offset_as_a_position_in_the_source() -> None:
    """A source read from ``position`` at volume ``offset``: shifted by the difference."""
    assert UploadPlan(3 * MiB, None, 0, False).holes_from_source(MiB, 10) == 10 + 2 * MiB
    assert UploadPlan(3 * MiB, None, 0, False).holes_from_source(3 * MiB, 0) == 0
    assert UploadPlan(None, MiB, MiB, False).holes_from_source(MiB, 10) is None


@pytest.mark.parametrize(
    ("room", "sent", "hole"),
    [(7 * MiB, 5 * MiB, 2 * MiB), (7 * MiB, 7 * MiB, 0), (7 * MiB, 7 * MiB + 1, 0), (7, 0, 7)],
    ids=["short", "to-the-end", "past-the-end", "nothing-sent"],
)
def test_size_restoring_hole_runs_from_what_was_sent_to_the_volumes_end(
    room: int, sent: int, hole: int
) -> None:
    assert size_restoring_hole(UploadPlan(0, room, room, True), sent) == hole


def test_no_size_restoring_hole_unless_the_plan_asks_for_one() -> None:
    assert size_restoring_hole(UploadPlan(0, 7 * MiB, 7 * MiB, False), MiB) == 0
    assert size_restoring_hole(UploadPlan(0, None, 0, True), MiB) == 0  # no room known
    # From make_upload_plan: only the empty volume's plan asks for it.
    assert size_restoring_hole(plan(raw(allocation=0), 5 * MiB, offset=3 * MiB), 5 * MiB) == 2 * MiB
    assert size_restoring_hole(plan(raw(allocation=MiB), 5 * MiB, offset=3 * MiB), 5 * MiB) == 0
