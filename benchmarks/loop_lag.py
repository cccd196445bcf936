"""Loop lag during an upload to a daemon that stops for 2 s: ours against libvirtaio.

Each contender runs in its own child process (only one libvirt event
implementation can be registered per process) and does the same thing: a
ticker task sleeps 1 ms at a time and records how late it wakes; a stream
uploads ``--mib`` MiB of random data; the daemon is stopped (SIGSTOP) right
after the stream opens and continued 2 s later by a timer *thread* (the loop
may be frozen). The reference is what users write today: libvirtaio plus
``virStream.send`` called on the loop (remote send blocks the calling thread).

Target (issue: AsyncStream): our loop lag p99 under 5 ms while the daemon is
stopped; the ratio column is libvirtaio's lag over ours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

MiB = 1024 * 1024
PAUSE = 2.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _ticker(gaps: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(0.001)
        gaps.append(loop.time() - before - 0.001)


def _pause_daemon(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    threading.Timer(PAUSE, os.kill, (pid, signal.SIGCONT)).start()


async def _child_ours(uri: str, pool: str, volume: str, mib: int, pid: int) -> dict[str, Any]:
    import aiovirtstream as avs

    conn = await avs.connect(uri)
    vol = await avs.lookup_volume(conn, volume, pool=pool)
    data = os.urandom(mib * MiB)
    gaps: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(_ticker(gaps, stop))
    start = time.perf_counter()
    async with await avs.open_volume_upload(vol) as stream:
        _pause_daemon(pid)
        for offset in range(0, len(data), MiB):
            await stream.write(data[offset : offset + MiB])
    seconds = time.perf_counter() - start
    stop.set()
    await tick
    await avs.aclose_connection(conn)
    return {"gaps": gaps, "seconds": seconds}


async def _child_libvirtaio(uri: str, pool: str, volume: str, mib: int, pid: int) -> dict[str, Any]:
    import libvirt
    import libvirtaio

    libvirtaio.virEventRegisterAsyncIOImpl()
    conn = libvirt.open(uri)
    vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(volume)
    data = os.urandom(mib * MiB)
    gaps: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(_ticker(gaps, stop))
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
    vol.upload(stream, 0, 0, 0)
    _pause_daemon(pid)
    for offset in range(0, len(data), 262_120):
        stream.send(data[offset : offset + 262_120])  # what users write: blocks the loop
        await asyncio.sleep(0)
    stream.finish()
    seconds = time.perf_counter() - start
    stop.set()
    await tick
    conn.close()
    return {"gaps": gaps, "seconds": seconds}


def _run_child(kind: str, sandbox: Any, pool: str, volume: str, mib: int) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.loop_lag", "--child", kind,
            sandbox.uri, pool, volume, str(mib), str(sandbox.pid),
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str]) -> int:
    """Run the benchmark; 0 if our p99 lag meets the target."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks loop_lag")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=48)
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--child", nargs=6, metavar="ARG", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    if args.child:
        kind, uri, pool, volume, mib, pid = args.child
        child = _child_ours if kind == "ours" else _child_libvirtaio
        result = asyncio.run(child(uri, pool, volume, int(mib), int(pid)))
        print(json.dumps(result))
        return 0

    from aiovirtstream.testing import Sandbox

    rounds = 1 if args.quick else args.rounds
    gaps: dict[str, list[float]] = {"ours": [], "libvirtaio": []}
    seconds: dict[str, list[float]] = {"ours": [], "libvirtaio": []}
    with Sandbox() as sandbox:
        pool = sandbox.create_pool("lag")
        sandbox.create_volume(pool, "lag.img", args.mib * MiB)
        for number in range(rounds):
            order = ["ours", "libvirtaio"] if number % 2 == 0 else ["libvirtaio", "ours"]
            for kind in order:
                result = _run_child(kind, sandbox, pool.name, "lag.img", args.mib)
                gaps[kind] += result["gaps"]
                seconds[kind].append(result["seconds"])
    print(f"loop lag while uploading {args.mib} MiB to a daemon stopped for {PAUSE:g} s")
    print(f"({rounds} rounds, contenders alternated; lag = ticker wake-up delay)")
    print(f"{'contender':<12}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'upload s':>10}")
    stats: dict[str, tuple[float, float, float]] = {}
    for kind in ("ours", "libvirtaio"):
        values = gaps[kind]
        stats[kind] = (
            _percentile(values, 0.5) * 1e3,
            _percentile(values, 0.99) * 1e3,
            max(values) * 1e3,
        )
        p50, p99, worst = stats[kind]
        median_s = statistics.median(seconds[kind])
        print(f"{kind:<12}{p50:>10.2f}{p99:>10.2f}{worst:>10.1f}{median_s:>10.2f}")
    ratio = stats["libvirtaio"][1] / max(stats["ours"][1], 1e-6)
    verdict = "PASS" if stats["ours"][1] < 5 else "FAIL"
    print(f"p99 lag: libvirtaio / ours = {ratio:.0f}x; target ours p99 < 5 ms: {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
