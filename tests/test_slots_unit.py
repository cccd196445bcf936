"""The slot pool's bookkeeping (no daemon): reuse, bounds, the idle drop, the hand-back."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import threading
from pathlib import Path

import pytest
from _helpers.processes import run_script
from _helpers.volumes import require_direct_io

from aiovirtstream._transfer._filewriter import FileWriter, open_direct
from aiovirtstream._transfer._slots import BUDGET_SLOTS, MIN_SHARE, SLOT_SIZE, SlotAccount, SlotPool
from aiovirtstream._transfer._writebehind import WriteBehind, WriteWorker


def address(slot: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(slot))


def take(pool: SlotPool, account: SlotAccount) -> memoryview:
    slot = pool.take(account)
    assert slot is not None
    return slot


def test_new_slots_are_page_aligned_and_writable() -> None:
    pool = SlotPool()
    slot = pool.take(pool.open_account())
    assert slot is not None
    assert slot.nbytes == SLOT_SIZE
    assert address(slot) % mmap.PAGESIZE == 0  # what O_DIRECT needs
    slot[-1] = 7
    assert slot[-1] == 7


def test_the_slot_given_back_last_is_taken_first() -> None:
    pool = SlotPool(keep=4)
    account = pool.open_account()
    first, second = take(pool, account), take(pool, account)
    pool.give_back([first, second])
    assert len(pool) == 2
    assert pool.take(account) is second
    assert pool.take(account) is first
    fresh = pool.take(account)  # empty: a new one
    assert fresh is not first and fresh is not second


def test_the_pool_keeps_at_most_its_bound() -> None:
    pool = SlotPool(keep=3)
    account = pool.open_account()
    pool.give_back([take(pool, account) for _ in range(5)], account)
    assert len(pool) == 3


async def test_slots_unused_for_the_idle_time_are_dropped() -> None:
    pool = SlotPool(keep=8, idle=0.05)
    account = pool.open_account()
    pool.give_back([take(pool, account), take(pool, account)])
    await asyncio.sleep(0.15)
    assert len(pool) == 0


async def test_a_download_meanwhile_keeps_the_slots() -> None:
    pool = SlotPool(keep=8, idle=0.5)
    account = pool.open_account()
    pool.give_back([take(pool, account), take(pool, account)])
    await asyncio.sleep(0.2)
    slot = take(pool, account)  # the next download starts before the idle time is up...
    await asyncio.sleep(0.5)
    assert len(pool) == 1  # ...so the first timer dropped nothing
    pool.give_back([slot])
    assert len(pool) == 2
    await asyncio.sleep(0.8)
    assert len(pool) == 0  # the timer armed by the last return


async def test_a_finished_download_gives_its_slots_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write-behind's slots go to the process's pool once every write is done."""
    pool = SlotPool()
    monkeypatch.setattr("aiovirtstream._transfer._writebehind.slot_pool", pool)
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    writer = FileWriter(fd, 0, False, None, -1)
    worker = WriteWorker(str(path))
    sink = WriteBehind(
        writer, limit=16 * SLOT_SIZE, pause=lambda: None, resume=lambda: None, worker=worker
    )
    data = os.urandom(3 * SLOT_SIZE + 5)
    for start in range(0, len(data), SLOT_SIZE):
        target = sink.buffer()
        assert target is not None
        buffer, offset, room = target
        piece = data[start : start + room]
        memoryview(buffer)[offset : offset + len(piece)] = piece
        sink.received(len(piece))
    sink.flush()
    await worker.run_after_writes(writer.close)
    worker.close()
    os.close(fd)
    assert path.read_bytes() == data
    assert len(pool) == 4  # every slot it made


async def test_slots_stay_with_a_write_still_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed while the worker writes (an abandoned download), nothing goes to the
    pool: a slot being written must not be handed to the next download."""
    require_direct_io(tmp_path)
    pool = SlotPool()
    monkeypatch.setattr("aiovirtstream._transfer._writebehind.slot_pool", pool)
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    direct_fd = open_direct(path)
    writer = FileWriter(fd, 0, False, None, direct_fd)
    release = threading.Event()
    writing = threading.Event()
    real_write_blocks = writer.write_blocks

    def slow_write_blocks(views: list[memoryview]) -> None:
        writing.set()
        release.wait(5)
        real_write_blocks(views)

    monkeypatch.setattr(writer, "write_blocks", slow_write_blocks)
    worker = WriteWorker(str(path))
    sink = WriteBehind(
        writer, limit=32 * SLOT_SIZE, pause=lambda: None, resume=lambda: None, worker=worker
    )
    for _ in range(10):
        target = sink.buffer()
        assert target is not None
        buffer, offset, room = target
        sink.received(room)
    sink.flush()
    assert await asyncio.to_thread(writing.wait, 5)
    worker.close()
    assert len(pool) == 0
    release.set()
    await worker.join()
    os.close(fd)
    os.close(direct_fd)


def test_the_process_maps_at_most_its_budget_and_each_download_its_minimum() -> None:
    pool = SlotPool(keep=64, budget=20)
    first, second, third = (pool.open_account() for _ in range(3))
    assert pool.share() == max(MIN_SHARE, 20 // 3)
    held = [take(pool, first) for _ in range(20)]
    assert pool.take(first) is None, "over the budget"
    # Another download still gets its minimum, beyond the budget.
    late = [take(pool, second) for _ in range(MIN_SHARE)]
    assert pool.take(second) is None and pool.mapped == 20 + MIN_SHARE
    pool.give_back(held[:10], first)
    assert pool.take(third) is not None  # a kept slot: the budget is not consulted
    pool.close_account(first)  # its other 10 slots were dropped with it
    pool.close_account(first)  # idempotent
    assert pool.mapped == 20 + MIN_SHARE - 10
    pool.give_back(late, second)
    pool.close_account(second)
    pool.close_account(third)  # the one it took leaves the budget
    assert pool.mapped == len(pool)


GC_INSIDE_THE_LOCK = """
import asyncio, gc, os, sys, tempfile, threading
import aiovirtstream._transfer._writebehind as wb
from aiovirtstream._transfer._filewriter import FileWriter
from aiovirtstream._transfer._slots import SLOT_SIZE
from aiovirtstream._transfer._slots import SlotPool

pool = wb.slot_pool = SlotPool()

def collect_at_pop(frame, event, arg):
    # The collector runs at an allocation, on whatever thread makes it: here,
    # at the pool's list.pop, inside its lock.
    if event == "c_call" and getattr(arg, "__name__", "") == "pop":
        gc.collect()

def churn():
    account = pool.open_account()
    sys.setprofile(collect_at_pop)
    for _ in range(3):
        slot = pool.take(account)
        pool.give_back([slot], account)
    sys.setprofile(None)

async def main():
    fd = os.open(tempfile.mktemp(), os.O_RDWR | os.O_CREAT, 0o600)
    gc.disable()
    for _ in range(5):
        # The write-behind and its worker hold each other: only the collector frees them.
        worker = wb.WriteWorker("x")
        wb.WriteBehind(FileWriter(fd, 0, False, None, -1), limit=SLOT_SIZE,
                       pause=lambda: None, resume=lambda: None, worker=worker)
        del worker
    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    thread.join(10)
    print("deadlocked" if thread.is_alive() else f"done {pool.share()}", flush=True)
    os._exit(0)  # a deadlocked thread holds the pool's lock: no clean exit

asyncio.run(main())
"""


def test_a_write_behind_collected_inside_the_pools_lock_does_not_deadlock(
    tmp_path: Path,
) -> None:
    """The collector runs on whatever thread allocates, inside any lock that thread holds."""
    assert run_script(GC_INSIDE_THE_LOCK, tmp_path) == f"done {BUDGET_SLOTS}"  # 5 accounts closed
