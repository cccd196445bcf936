"""The transfer children: N concurrent downloads or uploads, ours or a thread pool's.

Each child runs its phases one after the other (a phase: every job at once)
on an asyncio loop with the 1 ms ticker, and reports its footprint from just
after the imports to the end. The thread-pool children never import
aiovirtstream: no event implementation is registered in them.
"""

from __future__ import annotations

__all__ = ["run_transfers"]

import asyncio
import functools
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks._lag import Ticker
from benchmarks._probes import cpu_seconds

from ._probe import Footprint

Job = tuple[int, str, str, str]  # daemon index, pool, volume, local file


async def _phase(op: str, starts: list[Callable[[], Awaitable[None]]]) -> dict[str, Any]:
    done: list[float] = []
    cpu0, t0 = cpu_seconds(), time.perf_counter()

    async def one(start: Callable[[], Awaitable[None]]) -> None:
        await start()
        done.append(time.perf_counter() - t0)

    async with asyncio.TaskGroup() as group:
        for start in starts:
            group.create_task(one(start))
    return {"op": op, "seconds": max(done), "cpu": cpu_seconds() - cpu0, "done": sorted(done)}


async def _ours(uris: list[str], phases: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    import aiovirtstream as avs

    # Loaded now: the package loads its names on first use, a one-time cost
    # that is not the transfers'.
    download, upload = avs.download, avs.upload
    conns = [await avs.connect(uri) for uri in uris]
    try:
        plans = []
        for phase in phases:
            starts: list[Callable[[], Awaitable[None]]] = []
            for daemon, pool, name, path in phase["jobs"]:
                vol = await avs.lookup_volume(conns[daemon], name, pool=pool)
                if phase["op"] == "download":

                    async def start(vol: Any = vol, path: str = path) -> None:
                        await download(vol, path, sparse=False, overwrite=True)

                else:

                    async def start(vol: Any = vol, path: str = path) -> None:
                        await upload(vol, path, sparse=False)

                starts.append(start)
            plans.append((phase["op"], starts))
        ticker = Ticker()
        results = [await _phase(op, starts) for op, starts in plans]
        results[-1].update(await ticker.stop())
        return results
    finally:
        for conn in conns:
            await avs.aclose_connection(conn)


def _download(conn: Any, vol: Any, path: str) -> None:
    stream = conn.newStream(0)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        vol.download(stream, 0, 0, 0)

        def sink(_stream: Any, data: bytes, fd: int) -> int:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            return len(data)

        stream.recvAll(sink, fd)
        stream.finish()
    finally:
        os.close(fd)


def _upload(conn: Any, vol: Any, path: str, size: int) -> None:
    stream = conn.newStream(0)
    fd = os.open(path, os.O_RDONLY)
    try:
        vol.upload(stream, 0, size, 0)

        def source(_stream: Any, nbytes: int, fd: int) -> bytes:
            return os.read(fd, nbytes)

        stream.sendAll(source, fd)
        stream.finish()
    finally:
        os.close(fd)


async def _pool(
    uris: list[str], phases: list[dict[str, Any]], size: int, shared: bool
) -> list[dict[str, Any]]:
    import libvirt

    loop = asyncio.get_running_loop()
    opened: list[Any] = []

    def connect(uri: str) -> Any:
        conn = libvirt.open(uri)
        opened.append(conn)
        return conn

    per_daemon = [connect(uri) for uri in uris] if shared else []
    workers = max(len(phase["jobs"]) for phase in phases)
    try:
        with ThreadPoolExecutor(max_workers=workers) as executor:
            plans = []
            for phase in phases:
                starts: list[Callable[[], Awaitable[None]]] = []
                for daemon, pool, name, path in phase["jobs"]:
                    conn = per_daemon[daemon] if shared else connect(uris[daemon])
                    vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
                    if phase["op"] == "download":
                        call = functools.partial(_download, conn, vol, path)
                    else:
                        call = functools.partial(_upload, conn, vol, path, size)

                    async def start(call: Callable[[], None] = call) -> None:
                        await loop.run_in_executor(executor, call)

                    starts.append(start)
                plans.append((phase["op"], starts))
            ticker = Ticker()
            results = [await _phase(op, starts) for op, starts in plans]
            results[-1].update(await ticker.stop())
            return results
    finally:
        for conn in opened:
            conn.close()


def run_transfers(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one contender's phases (``spec`` from the parent); its figures."""
    footprint = Footprint()
    contender, uris, phases, size = spec["contender"], spec["uris"], spec["phases"], spec["size"]
    if contender == "ours":
        results = asyncio.run(_ours(uris, phases, size))
    else:
        results = asyncio.run(_pool(uris, phases, size, shared=contender == "tp-shared"))
    lag = {key: results[-1].pop(key) for key in ("lag_p50", "lag_p99", "lag_max")}
    return {"phases": results, **lag, **footprint.stop()}
