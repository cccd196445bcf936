"""Many concurrent streams: aiovirtstream against a thread pool of blocking libvirt calls.

``python -m benchmarks scale`` (or ``python -m benchmarks.scale``); ``--quick``
is a short run. The sweep, the contenders and how each figure is taken are in
docs/benchmarks.md ("Scale"); the targets are issue 24's.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ._probe import RESULT_PREFIX
from ._report import CONTENDERS, Row, report

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
DISTINCT = 4  # distinct contents: stream i moves content i % DISTINCT


class TransferFailed(Exception):
    """A child failed or a copy is not byte-identical."""


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description="Concurrent transfers and consoles: aiovirtstream against a "
        "ThreadPoolExecutor of blocking libvirt-python calls.",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    parser.add_argument("--streams", default=None, help="stream counts (default 1,4,16,64)")
    parser.add_argument("--daemons", default="1,4", help="daemon counts (default 1,4)")
    parser.add_argument("--size-mib", type=int, default=None, help="volume size (default 16)")
    parser.add_argument(
        "--pool-threads", type=int, default=8, help="shared pool size the thread targets allow"
    )
    parser.add_argument("--quick", action="store_true", help="1 round, up to 16 streams, 4 MiB")
    parser.add_argument("--no-console", action="store_true", help="skip the console case")
    parser.add_argument("--guests", type=int, default=4, help="console case: guests")
    parser.add_argument("--channels", type=int, default=15, help="console case: channels a guest")
    parser.add_argument("--console-seconds", type=float, default=None, help="loaded window")
    parser.add_argument(
        "--console-pause", type=float, default=0.1, help="pause between a port's round trips"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every run's figures here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"benchmarks.scale: ignoring unknown options {unknown}", file=sys.stderr)
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 3)
    args.streams = [
        int(n) for n in (args.streams or ("1,4,16" if quick else "1,4,16,64")).split(",")
    ]
    args.daemons = [int(n) for n in args.daemons.split(",")]
    args.size = (args.size_mib or (4 if quick else 16)) * MiB
    args.console_seconds = args.console_seconds or (2.0 if quick else 5.0)
    return args


def _sha(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _run_child(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--child", json.dumps(spec)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX) and done.returncode == 0:
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return result
    raise TransferFailed(
        f"{spec.get('contender', spec['kind'])} child failed: {done.stderr[-3000:]}"
    )


class Bench:
    """The daemons, their volumes and the local files; runs children and checks their copies."""

    def __init__(self, stack: ExitStack, args: argparse.Namespace, work: Path) -> None:
        from aiovirtstream.testing import Sandbox

        self.args, self.work, self.size = args, work, args.size
        self.sandboxes = [stack.enter_context(Sandbox()) for _ in range(max(args.daemons))]
        self.conns = [stack.enter_context(sb.connect()) for sb in self.sandboxes]
        self.pools = [conn.storagePoolLookupByName(sb.create_pool("scale").name)
                      for sb, conn in zip(self.sandboxes, self.conns, strict=True)]  # fmt: skip
        self.sources = [work / f"src{k}" for k in range(DISTINCT)]
        for source in self.sources:
            source.write_bytes(os.urandom(self.size))
        self.shas = [_sha(source) for source in self.sources]
        (work / "out").mkdir()
        most = max(max(args.streams), 32, 8)
        for daemon, pool in enumerate(self.pools):
            for k, source in enumerate(self.sources):
                self._upload(pool.createXML(self._xml(f"dl{k}"), 0), source)
            # The mixed case (downloads then uploads) runs on the first daemon alone.
            fewest = min(d for d in [*args.daemons, 1] if d > daemon)
            for j in range(-(-most // fewest)):
                pool.createXML(self._xml(f"up{j}"), 0)
        self.runs: dict[tuple[Row, str], list[dict[str, Any]]] = {}

    def _xml(self, name: str) -> str:
        return (
            f"<volume><name>{name}</name><capacity unit='bytes'>{self.size}</capacity>"
            "<allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>"
        )

    def _upload(self, vol: Any, source: Path) -> None:
        stream = vol.connect().newStream(0)
        vol.upload(stream, 0, self.size, 0)
        with open(source, "rb") as file:
            stream.sendAll(lambda _st, n, f: f.read(n), file)
        stream.finish()
        if _sha(Path(vol.path())) != _sha(source):
            raise TransferFailed(f"set-up upload of {vol.name()} is not byte-identical")

    def _fresh(self, daemon: int, name: str) -> None:
        """Recreate an upload target empty: an upload that writes nothing fails the check."""
        self.pools[daemon].storageVolLookupByName(name).delete(0)
        self.pools[daemon].createXML(self._xml(name), 0)

    def jobs(self, op: str, daemons: int, streams: int, tag: str = "") -> list[list[Any]]:
        """[daemon, pool, volume, local file] of each stream; upload targets made empty."""
        jobs = []
        for i in range(streams):
            daemon, j = i % daemons, i // daemons
            if op == "download":
                jobs.append(
                    [daemon, "scale", f"dl{j % DISTINCT}", str(self.work / "out" / f"{tag}{i}")]
                )
            else:
                self._fresh(daemon, f"up{j}")
                jobs.append([daemon, "scale", f"up{j}", str(self.sources[j % DISTINCT])])
        return jobs

    def check(self, op: str, jobs: list[list[Any]]) -> None:
        for daemon, _, name, path in jobs:
            expected = self.shas[int(name[2:]) % DISTINCT]
            if op == "download":
                got = _sha(Path(path))
                Path(path).unlink()
            else:
                got = _sha(Path(self.pools[daemon].storageVolLookupByName(name).path()))
            if got != expected:
                raise TransferFailed(f"{op} of {name} on daemon {daemon} is not byte-identical")

    def run(self, row: Row, contender: str) -> None:
        phases: list[dict[str, Any]] = [
            {"op": op, "jobs": self.jobs(op, row.daemons, row.streams)} for op in row.ops
        ]
        os.sync()
        spec = {
            "kind": "transfers",
            "contender": contender,
            "uris": [sb.uri for sb in self.sandboxes[: row.daemons]],
            "phases": phases,
            "size": self.size,
        }
        result = _run_child(spec)
        for phase in phases:
            self.check(phase["op"], phase["jobs"])
        self.runs.setdefault((row, contender), []).append(result)
        if self.args.verbose:
            seconds = sum(p["seconds"] for p in result["phases"])
            print(f"  {row.label:<24} {contender:<10} {seconds:6.2f} s", flush=True)


def _console_case(bench: Bench, stack: ExitStack) -> dict[str, Any] | str:
    """Boot the guests once; the child's runner, or why the case cannot run here."""
    from aiovirtstream.testing import Sandbox, guest_requirements_problem

    from ._consoles import start_guests

    problem = guest_requirements_problem()
    if problem:
        return problem
    full = stack.enter_context(Sandbox("full"))
    guests = start_guests(full, bench.args.guests, bench.args.channels)
    conn = stack.enter_context(full.connect())
    domains = [conn.lookupByName(guest["name"]) for guest in guests]
    _pause(domains)
    return {"console_uri": full.uri, "guests": guests, "domains": domains}


def _pause(domains: list[Any], resume: bool = False) -> None:
    """Suspend the guests (their vCPUs stop: no CPU taken from the other rows), or resume them."""
    for domain in domains:
        if resume:
            domain.resume()
        else:
            domain.suspend()


def _run_consoles(bench: Bench, setup: dict[str, Any]) -> None:
    args = bench.args
    spec = {
        "kind": "consoles",
        "console_uri": setup["console_uri"],
        "guests": setup["guests"],
        "storage_uri": bench.sandboxes[0].uri,
        "download": bench.jobs("download", 1, 8, tag="console"),
        "upload": bench.jobs("upload", 1, 8),
        "seconds": args.console_seconds,
        "idle_seconds": min(2.0, args.console_seconds),
        "pause": args.console_pause,
        "ready_timeout": 180.0,
    }
    os.sync()
    _pause(setup["domains"], resume=True)
    try:
        result = _run_child(spec)
    finally:
        _pause(setup["domains"])
    bench.check("download", spec["download"])
    bench.check("upload", spec["upload"])
    bench.runs.setdefault((Row.consoles(), "ours"), []).append(result)


def main(argv: list[str], *, direct: bool = False) -> int:
    """Run the benchmark (``direct``: in this process); 0 if every target is met."""
    args = _parse(argv)
    if args.child:
        from benchmarks._probes import emit

        spec = json.loads(args.child)
        if spec["kind"] == "consoles":
            from ._consoles import run_consoles

            emit(run_consoles(spec), RESULT_PREFIX)
        else:
            from ._child import run_transfers

            emit(run_transfers(spec), RESULT_PREFIX)
        return 0
    if not direct:
        # Another benchmark may have registered an event implementation in this process.
        return subprocess.call([sys.executable, "-m", "benchmarks.scale", *argv], cwd=REPO)
    rows = Row.sweep(args.streams, args.daemons) + [Row.mixed()]
    started, load = time.perf_counter(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="aiovirtstream-scale-"))
    try:
        with ExitStack() as stack:
            print(
                f"preparing {max(args.daemons)} daemons, {args.size // MiB} MiB volumes", flush=True
            )
            bench = Bench(stack, args, work)
            consoles = None if args.no_console else _console_case(bench, stack)
            for number in range(args.rounds):
                print(f"round {number + 1}/{args.rounds}", flush=True)
                for row in rows:
                    shift = number % len(CONTENDERS)
                    for contender in CONTENDERS[shift:] + CONTENDERS[:shift]:
                        bench.run(row, contender)
                if isinstance(consoles, dict):
                    _run_consoles(bench, consoles)
    except TransferFailed as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({f"{r.label}|{c}": runs for (r, c), runs in bench.runs.items()}, indent=1)
        )
    text, passed = report(bench.runs, rows, args, consoles)
    print(text)
    print(
        f"\n{time.perf_counter() - started:.0f} s in all; {os.cpu_count()} CPUs; "
        f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    return 0 if passed else 1
