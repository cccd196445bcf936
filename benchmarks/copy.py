"""Host-to-host copies: ``aiovirtstream.copy`` vs download-then-upload.

Run it with ``python -m benchmarks.copy`` (or ``python -m benchmarks copy``);
``--quick`` is a smoke test with small volumes.

Two private storage-only daemons (:class:`aiovirtstream.testing.Sandbox`)
stand for two hosts. The source daemon holds a dense volume (random data,
``--dense-mib``) and a sparse one (``--sparse-gib``, 1 MiB extents of random
data spread over it). Each workload runs over each network of ``--links``:
``unix`` (the daemons' unix sockets, one machine), or ``N`` Gbit/s (TLS over
TCP through a :class:`~aiovirtstream.testing.TcpRelay` in front of each
daemon that carries N Gbit/s each way, as each host's link would). Round
after round, each contender copies each source into a fresh, empty raw
volume of the same size on the other daemon:

* **copy**: ``aiovirtstream.copy(src, dst)`` (holes as holes);
* **dl+ul**: ``aiovirtstream.download()`` to a file, then ``upload()`` of it;
* **virsh**: ``virsh vol-download`` to a file, then ``virsh vol-upload`` of
  it, both with ``--sparse``.

Each run is a fresh child process (the aiovirtstream contenders connect to
both daemons first; virsh connects before its command starts): the time is
that of the operation only, volume lookups included (for virsh the sum of the
two times its ``-t`` prints). The temporary file (in ``--tmp-dir``) is removed
after each run; "disk" is the space it took. The contenders' order rotates
every round; medians over ``--rounds`` rounds. After every run the destination
volume is compared byte for byte with the source, and its allocation recorded.

Exit status: 0 when copy is at least ``--target`` times faster than virsh on
every workload over every link (between hosts; over ``unix`` the ratio is
printed, with no target: both daemons and the client share this machine's
CPUs), 1 when not, 2 when a run failed or copied wrong data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.transfer import compare_files

MiB = 1 << 20
GiB = 1 << 30
CONTENDERS = ("copy", "dl+ul", "virsh")
POOL = "pool"
_RESULT = "COPY-RESULT "


# ============================================================== the child


def _child(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    import aiovirtstream

    async def run() -> dict[str, Any]:
        src_conn = await aiovirtstream.connect(args.src_uri)
        dst_conn = await aiovirtstream.connect(args.dst_uri)
        try:
            cpu0, start = _cpu(resource.RUSAGE_SELF), time.perf_counter()
            src = await aiovirtstream.lookup_volume(src_conn, args.src, pool=POOL)
            dst = await aiovirtstream.lookup_volume(dst_conn, args.dst, pool=POOL)
            disk = 0
            if args.child == "copy":
                await aiovirtstream.copy(src, dst)
            else:
                await aiovirtstream.download(src, args.file, overwrite=True)
                disk = os.stat(args.file).st_blocks * 512
                await aiovirtstream.upload(dst, args.file)
                os.unlink(args.file)
            op_s = time.perf_counter() - start
            return {"op_s": op_s, "cpu": _cpu(resource.RUSAGE_SELF) - cpu0, "disk": disk}
        finally:
            await aiovirtstream.aclose_connection(src_conn)
            await aiovirtstream.aclose_connection(dst_conn)

    return asyncio.run(run())


# ============================================================== the parent


@dataclass(frozen=True)
class Workload:
    name: str
    vol: str
    path: Path
    size: int


def _virsh_seconds(argv: list[str]) -> float:
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    times = [float(w) for w in out.replace("(Time:", "").split() if _is_float(w)]
    if not times:
        raise RuntimeError(f"virsh printed no time: {out!r}")
    return times[-1] / 1000


def _is_float(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _daemon_cpu(pid: int) -> float:
    """A process's CPU seconds so far (user + system), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _virsh(src_uri: str, dst_uri: str, src: str, dst: str, file: Path) -> dict[str, Any]:
    common = ["virsh", "-t", "-q"]
    cpu0 = _cpu(resource.RUSAGE_CHILDREN)
    down = _virsh_seconds(
        [*common, "-c", src_uri, "vol-download", "--pool", POOL, src, str(file), "--sparse"]
    )
    disk = file.stat().st_blocks * 512
    up = _virsh_seconds(
        [*common, "-c", dst_uri, "vol-upload", "--pool", POOL, dst, str(file), "--sparse"]
    )
    file.unlink()
    return {"op_s": down + up, "cpu": _cpu(resource.RUSAGE_CHILDREN) - cpu0, "disk": disk}


def _run_child(contender: str, argv: list[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.copy", "--child", contender, *argv]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith(_RESULT):
            result: dict[str, Any] = json.loads(line[len(_RESULT) :])
            return result
    raise RuntimeError(f"{contender}: no result in {out!r}")


def _write_dense(path: Path, size: int) -> None:
    with open(path, "r+b") as out:
        for _ in range(size // (16 * MiB)):
            out.write(os.urandom(16 * MiB))
        out.write(os.urandom(size % (16 * MiB)))


def _write_sparse(path: Path, size: int, extents: int) -> None:
    rng = random.Random(25)
    slot = size // extents
    with open(path, "r+b") as out:
        for index in range(extents):
            out.seek(index * slot + rng.randrange(0, (slot - MiB) // 4096) * 4096)
            out.write(rng.randbytes(MiB))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.copy", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--dense-mib", type=int, default=256, help="dense volume (default 256)")
    parser.add_argument("--sparse-gib", type=int, default=1, help="sparse volume (default 1)")
    parser.add_argument("--extents", type=int, default=32, help="1 MiB extents in the sparse one")
    parser.add_argument("--target", type=float, default=1.5, help="copy vs virsh (default 1.5)")
    parser.add_argument("--settle", type=float, default=1.0, help="pause between runs (s)")
    parser.add_argument("--tmp-dir", help="where the download-then-upload files go")
    parser.add_argument(
        "--links",
        type=_links,
        default=_links("unix,1"),
        help="networks to run over: unix (sockets) or N (Gbit/s links), comma separated "
        "(default unix,1)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="64 MiB dense volume, 8 extents, 3 rounds"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run")
    parser.add_argument("--child", choices=["copy", "dl+ul"], help=argparse.SUPPRESS)
    for hidden in ("--src-uri", "--dst-uri", "--src", "--dst", "--file"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _links(text: str) -> list[float | None]:
    """``unix,1,0.5`` -> [None, 1.0, 0.5]: None for the unix sockets, else Gbit/s."""
    links: list[float | None] = []
    for word in text.split(","):
        if word.strip() == "unix":
            links.append(None)
            continue
        try:
            gbit = float(word)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{word!r} is neither unix nor Gbit/s") from None
        if not gbit > 0:
            raise argparse.ArgumentTypeError(f"a link carries more than 0 Gbit/s, not {word!r}")
        links.append(gbit)
    return links


def _link_name(gbit: float | None) -> str:
    return "unix" if gbit is None else f"{gbit:g} Gbit/s"


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(_RESULT + json.dumps(_child(args)), flush=True)
        return 0
    if shutil.which("virsh") is None:
        print("virsh not found: install libvirt-clients", file=sys.stderr)
        return 2
    if args.quick:
        args.dense_mib, args.sparse_gib, args.extents, args.rounds = 64, 1, 8, 3
    from aiovirtstream.testing import Sandbox, TcpRelay

    tcp = any(link is not None for link in args.links)
    with Sandbox(tcp=tcp) as source, Sandbox(tcp=tcp) as dest:
        work = Path(tempfile.mkdtemp(prefix="copy-bench-", dir=args.tmp_dir))
        try:
            workloads = _workloads(args, source, dest)
            status = 0
            for link in args.links:
                with ExitStack() as stack:
                    if link is None:
                        uris = (source.uri, dest.uri)
                    else:
                        rate = link * 125e6  # bytes a second, each way
                        relays = [
                            stack.enter_context(TcpRelay("127.0.0.1", sb.tcp_port, rate=rate))
                            for sb in (source, dest)
                        ]
                        uris = (
                            relays[0].uri_for(source.tcp_uri),
                            relays[1].uri_for(dest.tcp_uri),
                        )
                    status = max(status, _bench(args, source, dest, work, workloads, link, uris))
            return status
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _workloads(args: argparse.Namespace, source: Any, dest: Any) -> list[Workload]:
    source.create_pool(POOL)
    dest.create_pool(POOL)
    workloads = []
    for name, size in (("dense", args.dense_mib * MiB), ("sparse", args.sparse_gib * GiB)):
        info = source.create_volume(POOL, f"{name}.img", size)
        if name == "dense":
            _write_dense(info.path, size)
        else:
            _write_sparse(info.path, size, args.extents)
        workloads.append(Workload(name, info.name, info.path, size))
    return workloads


def _bench(
    args: argparse.Namespace,
    source: Any,
    dest: Any,
    work: Path,
    workloads: list[Workload],
    link: float | None,
    uris: tuple[str, str],
) -> int:
    times: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    dcpus: dict[tuple[str, str], list[float]] = {}
    facts: dict[tuple[str, str], dict[str, Any]] = {}
    status = 0
    for round_ in range(args.rounds):
        order = CONTENDERS[round_ % 3 :] + CONTENDERS[: round_ % 3]
        for workload in workloads:
            for contender in order:
                dest_name = f"{workload.name}-{contender.replace('+', '')}.img"
                dest_path = _recreate(dest, dest_name, workload.size)
                file = work / f"{workload.name}.img"
                os.sync()
                time.sleep(args.settle)
                daemons0 = _daemon_cpu(source.pid) + _daemon_cpu(dest.pid)
                try:
                    if contender == "virsh":
                        result = _virsh(*uris, workload.vol, dest_name, file)
                    else:
                        result = _run_child(
                            contender,
                            [
                                *("--src-uri", uris[0], "--dst-uri", uris[1]),
                                *("--src", workload.vol, "--dst", dest_name, "--file", str(file)),
                            ],
                        )
                except (subprocess.CalledProcessError, RuntimeError) as error:
                    detail = getattr(error, "stderr", "") or ""
                    where = f"{workload.name} {contender} ({_link_name(link)})"
                    print(f"{where}: failed: {error} {detail}")
                    return 2
                wrong = compare_files(workload.path, dest_path)
                if wrong:
                    print(f"{workload.name} {contender} ({_link_name(link)}): wrong data: {wrong}")
                    status = 2
                result["alloc"] = dest_path.stat().st_blocks * 512
                result["daemons_cpu"] = _daemon_cpu(source.pid) + _daemon_cpu(dest.pid) - daemons0
                times.setdefault((workload.name, contender), []).append(result["op_s"])
                cpus.setdefault((workload.name, contender), []).append(result["cpu"])
                dcpus.setdefault((workload.name, contender), []).append(result["daemons_cpu"])
                facts[(workload.name, contender)] = result
                if args.verbose:
                    print(
                        f"round {round_ + 1} {_link_name(link)} {workload.name:6} "
                        f"{contender:6} {result}"
                    )
    return max(status, _report(args, workloads, link, times, cpus, dcpus, facts))


def _recreate(dest: Any, name: str, size: int) -> Path:
    """A fresh, empty raw volume ``name`` on ``dest``; its path."""
    with dest.connect() as conn:
        pool = conn.storagePoolLookupByName(POOL)
        if name in pool.listVolumes():
            pool.storageVolLookupByName(name).delete(0)
    path: Path = dest.create_volume(POOL, name, size).path
    return path


def _report(
    args: argparse.Namespace,
    workloads: list[Workload],
    link: float | None,
    times: dict[tuple[str, str], list[float]],
    cpus: dict[tuple[str, str], list[float]],
    dcpus: dict[tuple[str, str], list[float]],
    facts: dict[tuple[str, str], dict[str, Any]],
) -> int:
    print(
        f"\nover {_link_name(link)}: medians of {args.rounds} rounds; ratio = virsh's time / "
        "this one's (higher: faster)"
    )
    print("client cpu: the copying process(es); daemons cpu: both libvirtd's")
    print(
        f"{'workload':18} {'contender':8} {'median s':>9} {'MiB/s':>7} {'vs virsh':>9} "
        f"{'client cpu':>10} {'daemons cpu':>11} {'disk MiB':>9} {'dest alloc MiB':>14}"
    )
    status = 0
    for workload in workloads:
        label = f"{workload.name} {workload.size // MiB} MiB"
        virsh = _median(times[(workload.name, "virsh")])
        for contender in CONTENDERS:
            key = (workload.name, contender)
            median = _median(times[key])
            fact = facts[key]
            print(
                f"{label:18} {contender:8} {median:9.3f} {workload.size / MiB / median:7.0f} "
                f"{virsh / median:8.2f}x {_median(cpus[key]):10.3f} {_median(dcpus[key]):11.3f} "
                f"{fact['disk'] / MiB:9.1f} {fact['alloc'] / MiB:14.1f}"
            )
        ratio = virsh / _median(times[(workload.name, "copy")])
        if link is None:
            # Both daemons and the client share this machine's CPUs: the
            # target is for hosts, whose transfers wait for their links.
            print(f"  copy vs virsh on one machine: {ratio:.2f}x (the target is between hosts)")
            continue
        met = ratio >= args.target
        print(f"  target: copy >= {args.target}x virsh: {ratio:.2f}x {'met' if met else 'MISSED'}")
        status = max(status, 0 if met else 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
