"""How fast a lost daemon ends each operation: from a kill, and from a freeze, to the error.

For each operation (a download over one stream and over two, a hand-read
``AsyncStream``, an upload, a console read when the QEMU test guest can run
here, a dense ``copy()`` between two daemons with the fault at its source
and, as another row, at its destination), in the middle of it: the daemon is
SIGKILLed (a fresh sandbox every round), or SIGSTOPped on a connection with
keepalive (1, 3), which gives up after about 4 s, or its loopback TCP
connection is cut (a :class:`~aiovirtstream.testing.TcpRelay`). A copy's
other daemon (its peer, one sandbox for all the copy rounds) is left alone.
The time from the fault to the operation's error is reported, median of
``--rounds``, as a Markdown table (docs/reliability.md).

``python -m benchmarks faults [--rounds N] [--quick] [--no-console]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.metadata as metadata
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import libvirt

import aiovirtstream as avs
from aiovirtstream.testing import Sandbox, SandboxMode, TcpRelay, guest_requirements_problem

MiB = 1 << 20
SIZE = 256 * MiB  # of data: a dense download of it lasts a few hundred ms here
MIDWAY = 16 * MiB  # the fault comes once this much was moved
KEEPALIVE = (1, 3)
TIMEOUT = 15.0  # a round whose operation has not failed by then counts as "no error"

Operation = Callable[["_Fault", libvirt.virConnect, Path], Awaitable[object]]


class _Fault:
    """Kills or freezes the daemon once, when the operation is in the middle; notes when."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.action = action
        self.at: float | None = None

    def fire(self) -> None:
        if self.at is None:
            self.action()
            self.at = time.perf_counter()

    def progress(self, progress: avs.TransferProgress) -> None:
        if progress.done_bytes >= MIDWAY:
            self.fire()


@dataclass
class _Round:
    seconds: float | None  # fault to error; None: no error within TIMEOUT, or before the fault
    outcome: str


# ---------------------------------------------------------------- operations


async def _download(fault: _Fault, conn: libvirt.virConnect, work: Path, parallel: int) -> None:
    vol = await avs.lookup_volume(conn, "data.img", pool="pool")
    await avs.download(
        vol, work / "copy.img", parallel=parallel, progress=fault.progress, progress_interval=0.005
    )


async def _download_one(fault: _Fault, conn: libvirt.virConnect, work: Path) -> None:
    await _download(fault, conn, work, 1)


async def _download_two(fault: _Fault, conn: libvirt.virConnect, work: Path) -> None:
    await _download(fault, conn, work, 2)


async def _read(fault: _Fault, conn: libvirt.virConnect, work: Path) -> None:
    vol = await avs.lookup_volume(conn, "data.img", pool="pool")
    received = 0
    async with await avs.open_volume_download(vol) as stream:
        while chunk := await stream.read(MiB):
            received += len(chunk)
            if received >= MIDWAY:
                fault.fire()


async def _upload(fault: _Fault, conn: libvirt.virConnect, work: Path) -> None:
    vol = await avs.lookup_volume(conn, "data.img", pool="pool")
    await avs.upload(
        vol, work.parent / "source.img", progress=fault.progress, progress_interval=0.005
    )


async def _console(fault: _Fault, conn: libvirt.virConnect, work: Path) -> None:
    dom = await avs.lookup_domain(conn, "guest")
    async with await avs.open_console(dom) as console:
        await console.send(b"ab")
        answer = b""
        with anyio.fail_after(TIMEOUT):
            while len(answer) < 2:
                answer += await console.read()
        reading = asyncio.ensure_future(console.read())
        await asyncio.sleep(0.1)  # the read waits for the guest
        fault.fire()
        await reading


Side = Literal["source", "destination"]
COPIES: dict[str, Side] = {
    "copy, fault at the source": "source",
    "copy, fault at the destination": "destination",
}


async def _copy(fault: _Fault, conn: libvirt.virConnect, work: Path, peer: str, side: Side) -> None:
    """Copy between ``conn``'s daemon (the faulted ``side``) and ``peer`` (default keepalive)."""
    other = await avs.connect(peer)
    try:
        # The faulted daemon's data.img is the source (data) or the destination
        # (empty); the peer has a volume for either role (_prepare_peer).
        here = await avs.lookup_volume(conn, "data.img", pool="pool")
        there = await avs.lookup_volume(other, f"{_other(side)}.img", pool="pool")
        src, dst = (here, there) if side == "source" else (there, here)
        await avs.copy(src, dst, sparse=False, progress=fault.progress, progress_interval=0.005)
    finally:
        with contextlib.suppress(avs.AioVirtStreamError):
            await avs.aclose_connection(other)


def _other(side: Side) -> Side:
    return "destination" if side == "source" else "source"


def _copy_operations(peer: str) -> dict[str, Operation]:
    """The copy rows, their peer bound."""
    return {name: functools.partial(_copy, peer=peer, side=side) for name, side in COPIES.items()}


OPERATIONS: dict[str, Operation] = {
    "download, 1 stream": _download_one,
    "download, 2 streams": _download_two,
    "AsyncStream.read": _read,
    "upload": _upload,
    "console read": _console,
}


# ---------------------------------------------------------------- rounds


def _fill(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "r+b") as f:
        for _ in range(size // MiB):
            f.write(block)


async def _volume(sb: Sandbox, name: str, data: bool) -> None:
    """A volume of SIZE in ``pool``, every byte data or none."""
    info = await sb.acreate_volume("pool", name, SIZE)
    if data:
        await anyio.to_thread.run_sync(_fill, info.path, SIZE)


async def _prepare(sb: Sandbox, name: str) -> None:
    if name == "console read":
        await sb.astart_test_guest("guest")
        return
    await sb.acreate_pool("pool")
    await _volume(sb, "data.img", name != "upload" and COPIES.get(name) != "destination")


async def _prepare_peer(sb: Sandbox) -> None:
    """The copies' other daemon: a source full of data and an empty destination."""
    await sb.acreate_pool("pool")
    for side in COPIES.values():
        await _volume(sb, f"{side}.img", side == "source")


async def _run_round(
    uri: str, operation: Operation, fault: _Fault, work: Path, keepalive: tuple[int, int]
) -> _Round:
    conn = await avs.connect(uri, keepalive=keepalive)
    try:
        with anyio.move_on_after(TIMEOUT):
            try:
                await operation(fault, conn, work)
            except avs.AioVirtStreamError as error:
                failed_at = time.perf_counter()
                reason = getattr(error, "reason", None)
                outcome = type(error).__name__ + (f" ({reason})" if reason else "")
                if fault.at is None:
                    return _Round(None, f"{outcome} before the fault")
                return _Round(failed_at - fault.at, outcome)
            return _Round(None, "no error" if fault.at is not None else "ended before the fault")
        return _Round(None, f"no error within {TIMEOUT:g} s")
    finally:
        with contextlib.suppress(avs.AioVirtStreamError):
            await avs.aclose_connection(conn)
        for leftover in work.iterdir():
            leftover.unlink()


async def _kill_round(mode: SandboxMode, name: str, operation: Operation, work: Path) -> _Round:
    async with Sandbox(mode) as sb:
        await _prepare(sb, name)
        return await _run_round(sb.uri, operation, _Fault(sb.kill), work, (5, 3))


async def _freeze_and_cut_rounds(
    mode: SandboxMode, name: str, operation: Operation, work: Path, rounds: int
) -> tuple[list[_Round], list[_Round]]:
    """Rounds of both faults on one sandbox: it survives them (thawed, the relay's cut)."""
    async with Sandbox(mode, tcp=True) as sb:
        await _prepare(sb, name)
        frozen, cut = [], []
        for _ in range(rounds):
            try:
                fault = _Fault(sb.freeze)
                frozen.append(await _run_round(sb.uri, operation, fault, work, KEEPALIVE))
            finally:
                sb.thaw()
            with TcpRelay("127.0.0.1", sb.tcp_port) as relay:
                fault = _Fault(relay.cut)
                uri = relay.uri_for(sb.tcp_uri)
                cut.append(await _run_round(uri, operation, fault, work, (5, 3)))
        return frozen, cut


def _summary(rounds: list[_Round]) -> tuple[str, str]:
    """The median (min-max) time, or "-" if a round had no error after the fault; the errors."""
    times = [r.seconds for r in rounds if r.seconds is not None]
    outcomes = ", ".join(sorted({r.outcome for r in rounds}))
    if len(times) < len(rounds):
        return "-", outcomes
    spread = f" ({min(times):.3f}-{max(times):.3f})" if len(times) > 1 else ""
    return f"{statistics.median(times):.3f}{spread}", outcomes


def _errors_cell(outcomes: list[str]) -> str:
    """``ConnectionLostError (eof / keepalive / error)``, or each fault's errors in full."""
    lost = "ConnectionLostError ("
    items = [o.split(", ") for o in outcomes]
    if all(i.startswith(lost) and i.endswith(")") for per_fault in items for i in per_fault):
        reasons = [", ".join(i[len(lost) : -1] for i in per_fault) for per_fault in items]
        return lost + " / ".join(reasons) + ")"
    return "; ".join(f"{fault}: {o}" for fault, o in zip(FAULTS, outcomes, strict=True))


FAULTS = ("kill", "freeze", "cut")


async def _main(rounds: int, console: bool) -> int:
    table = []
    status = 0
    with tempfile.TemporaryDirectory(prefix="aiovirtstream-faults-") as folder:
        work = Path(folder) / "work"
        work.mkdir()
        source = Path(folder) / "source.img"
        source.touch()
        await anyio.to_thread.run_sync(_fill, source, SIZE)
        async with Sandbox("storage") as peer:
            await _prepare_peer(peer)
            operations = {**OPERATIONS, **_copy_operations(peer.uri)}
            if not console:
                del operations["console read"]
            for name, operation in operations.items():
                mode: SandboxMode = "full" if name == "console read" else "storage"
                killed = [await _kill_round(mode, name, operation, work) for _ in range(rounds)]
                frozen, cut = await _freeze_and_cut_rounds(mode, name, operation, work, rounds)
                summaries = [_summary(results) for results in (killed, frozen, cut)]
                if any(seconds == "-" for seconds, _ in summaries):
                    status = 1
                errors = _errors_cell([outcomes for _, outcomes in summaries])
                table.append([name, *(seconds for seconds, _ in summaries), errors])
                print(f"  {' | '.join(table[-1])}", flush=True)
    print()
    print(
        f"Seconds from the fault to the error, median (min-max) of {rounds} round(s). "
        "kill: SIGKILL (keepalive (5, 3)); "
        f"freeze: SIGSTOP, keepalive {KEEPALIVE}; cut: a loopback TCP relay closed."
    )
    print()
    print("| operation | kill | freeze | cut | error (reason: kill / freeze / cut) |")
    print("| --- | --- | --- | --- | --- |")
    for row in table:
        print("| " + " | ".join(row) + " |")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks faults", description=__doc__)
    parser.add_argument("--rounds", type=int, help="rounds per operation and fault (default 3)")
    parser.add_argument("--quick", action="store_true", help="one round each")
    parser.add_argument("--no-console", action="store_true", help="leave out the console read")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"benchmarks.faults: ignoring unknown options {unknown}", file=sys.stderr)
    rounds = args.rounds or (1 if args.quick else 3)
    console = not args.no_console
    if console and (problem := guest_requirements_problem()) is not None:
        print(f"benchmarks.faults: no console read, the test guest cannot run: {problem}")
        console = False
    version = libvirt.getVersion()
    print(
        f"libvirt {version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}, "
        f"libvirt-python {metadata.version('libvirt-python')}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    return asyncio.run(_main(rounds, console))


if __name__ == "__main__":
    sys.exit(main())
