"""The ``aiovirtstream`` command: volume transfers with progress bars, and the demo.

Arguments are parsed by :mod:`argparse` (standard library, nothing to
install); progress bars and tables come from ``rich`` (the ``cli`` extra).
"""

from __future__ import annotations

__all__ = ["main", "build_parser"]

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ._connect import aclose_connection, connect
from ._exceptions import AioVirtStreamError, DestinationExistsError
from ._transfer import TransferProgress, TransferResult, download, upload
from ._volume import lookup_volume

MiB = 1024 * 1024


def _rich() -> Any:
    try:
        import rich.console
        import rich.progress
        import rich.table
    except ImportError as error:  # pragma: no cover - the cli extra is missing
        raise SystemExit(
            "the aiovirtstream command needs rich for its output: pip install 'aiovirtstream[cli]'"
        ) from error
    return rich


@contextlib.contextmanager
def _progress_bar(label: str, quiet: bool) -> Iterator[Callable[[TransferProgress], None]]:
    """A rich progress bar fed by a transfer's progress callback."""
    if quiet:
        yield lambda _progress: None
        return
    rich = _rich()
    columns = (
        rich.progress.TextColumn("[bold]{task.description}"),
        rich.progress.BarColumn(),
        rich.progress.DownloadColumn(binary_units=True),
        rich.progress.TransferSpeedColumn(),
        rich.progress.TimeRemainingColumn(),
        rich.progress.TextColumn("holes {task.fields[holes]}"),
    )
    with rich.progress.Progress(*columns, console=rich.console.Console(stderr=True)) as bar:
        task = bar.add_task(label, total=None, holes="0 B")

        def update(progress: TransferProgress) -> None:
            bar.update(
                task,
                completed=progress.done_bytes,
                total=progress.total,
                holes=_size(progress.hole_bytes),
            )

        yield update


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _print_result(verb: str, result: TransferResult, quiet: bool) -> None:
    if quiet:
        if result.sha256:
            print(result.sha256)
        return
    digest = f", sha256 {result.sha256}" if result.sha256 else ""
    print(
        f"{verb} {_size(result.data_bytes)} of data and {_size(result.hole_bytes)} of holes "
        f"in {result.seconds:.2f} s ({_size(result.data_rate)}/s){digest}",
        file=sys.stderr,
    )


async def _cmd_transfer(args: argparse.Namespace) -> int:
    """``upload`` and ``download``: one volume, one file, a progress bar."""
    conn = await connect(args.connect)
    try:
        vol = await lookup_volume(conn, args.volume, pool=args.pool)
        common: dict[str, Any] = {
            "sparse": args.sparse,
            "offset": args.offset,
            "length": args.length,
            "checksum": args.checksum,
        }
        with _progress_bar(f"{args.command} {args.volume}", args.quiet) as progress:
            if args.command == "upload":
                result = await upload(
                    vol, args.file, detect_zeroes=args.detect_zeroes, progress=progress, **common
                )
            else:
                result = await download(
                    vol,
                    args.file,
                    overwrite=args.overwrite,
                    parallel=args.parallel,
                    direct_io=args.direct_io,
                    fsync=args.fsync,
                    progress=progress,
                    **common,
                )
        _print_result(f"{args.command}ed", result, args.quiet)
    finally:
        await aclose_connection(conn)
    return 0


# ---------------------------------------------------------------------- demo


def _make_demo_image(path: Path, size: int, seed: int = 7) -> tuple[int, str]:
    """A sparse image: scattered random extents, a run of written zeroes, holes.

    Returns (bytes of real data, sha256 of the logical content).
    """
    if size < 64 * MiB:
        raise ValueError("the demo image needs at least 64 MiB")
    rng = random.Random(seed)
    extent = MiB
    zero_slots = range(size // extent // 2, size // extent // 2 + 8)  # written zeroes go here
    free = [s for s in range(1, size // extent - 1) if s not in zero_slots]
    slots = sorted(rng.sample(free, k=min(48, len(free) // 4)))
    with open(path, "wb") as f:
        f.truncate(size)
        for slot in slots:
            f.seek(slot * extent)
            f.write(rng.randbytes(extent))
        f.seek(zero_slots[0] * extent)
        f.write(bytes(8 * MiB))  # allocated, but all zeroes: detect_zeroes skips it
        f.seek(size - 11)
        f.write(b"last bytes!")  # data at the very end
    return len(slots) * extent + 11, _sha256_file(path)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * MiB):
            digest.update(block)
    return digest.hexdigest()


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


async def _cmd_demo(args: argparse.Namespace) -> int:
    from .testing import Sandbox  # the demo starts its own private daemon

    rich = _rich()
    console = rich.console.Console()
    size = args.size_mib * MiB
    console.print(f"[bold]aiovirtstream demo[/]: a private libvirtd, a {_size(size)} sparse image")
    started = time.perf_counter()
    async with Sandbox(tcp=args.tcp) as sandbox:
        console.print(f"  daemon up as {sandbox.daemon_user!r} in {sandbox.path}")
        workdir = Path(tempfile.mkdtemp(prefix="aiovirtstream-demo-"))
        try:
            source = workdir / "source.img"
            data_bytes, digest = await asyncio.to_thread(_make_demo_image, source, size)
            console.print(
                f"  generated {source.name}: {_size(size)} logical, {_size(data_bytes)} of data,"
                f" {_size(_allocated(source))} allocated (8 MiB of it written zeroes)"
            )
            pool = await sandbox.acreate_pool("demo")
            await sandbox.acreate_volume(pool, "disk.img", size)
            conn = await connect(sandbox.tcp_uri if args.tcp else sandbox.uri)
            try:
                vol = await lookup_volume(conn, "disk.img", pool=pool.name)
                with _progress_bar("upload", args.quiet) as progress:
                    sent = await upload(vol, source, detect_zeroes=True, progress=progress)
                vol_allocation = (await asyncio.to_thread(vol.info))[2]
                dest = workdir / "downloaded.img"
                with _progress_bar("download", args.quiet) as progress:
                    got = await download(vol, dest, progress=progress)
            finally:
                await aclose_connection(conn)
            dest_allocated = _allocated(dest)
            same_bytes = await asyncio.to_thread(_sha256_file, dest) == digest
            holes_kept = dest_allocated <= data_bytes + 2 * MiB
            table = rich.table.Table(title="what the demo did")
            for column in ("step", "data", "holes", "seconds", "data rate", "allocated"):
                table.add_column(column, justify="right" if column != "step" else "left")
            table.add_row(
                "upload",
                _size(sent.data_bytes),
                _size(sent.hole_bytes),
                f"{sent.seconds:.2f}",
                f"{_size(sent.data_rate)}/s",
                f"volume {_size(vol_allocation)}",
            )
            table.add_row(
                "download",
                _size(got.data_bytes),
                _size(got.hole_bytes),
                f"{got.seconds:.2f}",
                f"{_size(got.data_rate)}/s",
                f"file {_size(dest_allocated)}",
            )
            console.print(table)
            console.print(f"  sha256 of source and download: {digest[:16]}... ", end="")
            console.print("[green]identical[/]" if same_bytes else "[red]DIFFERENT[/]")
            console.print(
                f"  holes preserved: {_size(dest_allocated)} allocated for "
                f"{_size(data_bytes)} of data in {_size(size)}: "
                + ("[green]yes[/]" if holes_kept else "[red]NO[/]")
            )
        finally:
            await asyncio.to_thread(_remove_tree, workdir)
    console.print(f"  daemon stopped, everything removed; {time.perf_counter() - started:.1f} s")
    return 0 if same_bytes and holes_kept else 1


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``upload``, ``download`` and ``demo``."""
    parser = argparse.ArgumentParser(
        prog="aiovirtstream",
        description="Move data into and out of libvirt storage volumes, asyncio-native.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def transfer_args(sub: argparse.ArgumentParser, verb: str) -> None:
        sub.add_argument("-c", "--connect", default=None, help="libvirt URI (as with virsh -c)")
        sub.add_argument("--pool", default=None, help="storage pool (else VOLUME is a path/key)")
        sub.add_argument("volume", help="volume name (with --pool), path or key")
        sub.add_argument("file", help=f"local file to {verb}")
        sub.add_argument(
            "--no-sparse", dest="sparse", action="store_false", help="send holes as zeroes"
        )
        sub.add_argument("--offset", type=int, default=0, help="byte offset in the volume")
        sub.add_argument("--length", type=int, default=0, help="bytes to move (0: all)")
        sub.add_argument("--checksum", action="store_true", help="print the content's SHA-256")
        sub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    up = commands.add_parser("upload", help="upload a file into a volume")
    transfer_args(up, "upload")
    up.add_argument(
        "--detect-zeroes", action="store_true", help="send aligned runs of zeroes as holes"
    )
    up.set_defaults(run=_cmd_transfer)

    down = commands.add_parser("download", help="download a volume into a file")
    transfer_args(down, "write")
    down.add_argument("--overwrite", action="store_true", help="replace an existing file")
    down.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="streams over ranges of the volume, >= 64 MiB each "
        "(default: 2 for 256 MiB or more, else 1)",
    )
    down.add_argument(
        "--page-cache",
        dest="direct_io",
        action="store_false",
        help="write through the page cache, as virsh does (default: O_DIRECT where "
        "the file system allows, which costs less CPU and keeps the image out of the cache)",
    )
    down.add_argument(
        "--fsync",
        action="store_true",
        help="flush the file and its rename to the disk before exiting (about 1 ms "
        "with O_DIRECT, a full writeback with --page-cache)",
    )
    down.set_defaults(run=_cmd_transfer)

    demo = commands.add_parser(
        "demo", help="start a private libvirtd and round-trip a sparse image through it"
    )
    demo.add_argument("--size-mib", type=int, default=1024, help="logical image size in MiB")
    demo.add_argument("--tcp", action="store_true", help="use the loopback TCP transport")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(asyncio.run(args.run(args)))
    except DestinationExistsError as error:
        message = str(error).replace("overwrite=True", "--overwrite")
        print(f"aiovirtstream: error: {message}", file=sys.stderr)
        return 1
    except AioVirtStreamError as error:
        print(f"aiovirtstream: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aiovirtstream: interrupted", file=sys.stderr)
        return 130
