"""A transfer's progress against a real daemon: an anyio object stream as the target."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from _helpers.volumes import MiB, random_volume
from conftest import MakeVolume

import aiovirtstream as avs


async def test_progress_as_an_async_stream_of_events(
    make_volume: MakeVolume, tmp_path: Path
) -> None:
    size = 64 * MiB
    vol, source = await random_volume(make_volume, tmp_path, "progress.img", size)
    # A reader that keeps up: snapshots in order, the last one complete, then the end.
    send, receive = anyio.create_memory_object_stream[avs.TransferProgress](100)
    seen: list[avs.TransferProgress] = []

    async def watch() -> None:
        async with receive:
            async for event in receive:
                seen.append(event)

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        result = await avs.download(vol, tmp_path / "out", progress=send, progress_interval=0.001)
    assert result.data_bytes == size
    assert seen and seen[-1].done_bytes == size and seen[-1].total == size
    done = [event.done_bytes for event in seen]
    assert done == sorted(done)
    # A reader that never reads (buffer of 1): the transfer is not held up,
    # the final snapshot waits for room, and the stream is closed at the end.
    send, receive = anyio.create_memory_object_stream[avs.TransferProgress](1)
    late: list[avs.TransferProgress] = []

    async def read_once_the_final_snapshot_waits() -> None:
        # Snapshots that find no room are dropped; only the final one waits
        # for room: a waiting sender means the data has all been sent.
        while receive.statistics().tasks_waiting_send == 0:
            await anyio.sleep(0.005)
        async with receive:
            async for event in receive:
                late.append(event)

    async with anyio.create_task_group() as group:
        group.start_soon(read_once_the_final_snapshot_waits)
        await avs.upload(vol, source, progress=send, progress_interval=0.001)
    assert late[-1].done_bytes == size and len(late) <= 2
    # A reader that went away does not break the transfer.
    send, receive = anyio.create_memory_object_stream[avs.TransferProgress](0)
    receive.close()
    result = await avs.download(
        vol, tmp_path / "out", overwrite=True, progress=send, progress_interval=0.001
    )
    assert result.data_bytes == size
    # A failed transfer closes the stream too: the reader's loop ends.
    send, receive = anyio.create_memory_object_stream[avs.TransferProgress](10)
    with pytest.raises(avs.DestinationExistsError):
        await avs.download(vol, tmp_path / "out", progress=send)
    async with receive:
        assert [event async for event in receive] == []
