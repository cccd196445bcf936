"""The ``aiovirtstream`` command: volume transfers with progress bars, and the demo.

Arguments are parsed by :mod:`argparse` (standard library, nothing to
install); progress bars and tables come from ``rich`` (the ``cli`` extra).
Every error ends in :func:`main`: one line on stderr and an exit status
(2 for a usage error, 1 for a failure, 130 for Ctrl+C), or with
``--debug`` the traceback.
"""

from __future__ import annotations

__all__ = ["main", "build_parser"]

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import libvirt

from ._connect import aclose_connection, connect
from ._exceptions import AioVirtStreamError, ConnectionLostError
from ._transfer import TransferProgress, TransferResult, download, upload
from ._volume import lookup_volume

MiB = 1024 * 1024
DEMO_MIN_MIB = 64

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A failure the command reports in one line (exit status 1)."""


def _rich() -> Any:
    try:
        import rich.console
        import rich.progress
        import rich.table
    except ImportError as error:  # pragma: no cover - the cli extra is missing
        raise CommandError(
            "progress bars and the demo need rich: pip install 'aiovirtstream[cli]' (or pass -q)"
        ) from error
    return rich


def _bar_console() -> Any:
    """rich's console on stderr, or None when stderr is no terminal (then no bars).

    Asked of stderr itself: rich takes FORCE_COLOR for a terminal.
    """
    if sys.stderr is None or not sys.stderr.isatty():
        return None
    return _rich().console.Console(stderr=True)


class _ProgressBar:
    """A transfer's progress callback that draws a rich bar on its first report.

    upload() and download() report only once their streams are open, so no
    bar is drawn for a transfer that never started.
    """

    def __init__(self, label: str, console: Any) -> None:
        self._label = label
        self._console = console
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, progress: TransferProgress) -> None:
        fields = {
            "completed": progress.done_bytes,
            "total": progress.total,
            "holes": _size(progress.hole_bytes),
        }
        if self._bar is None:
            rich = _rich()
            self._bar = rich.progress.Progress(
                rich.progress.TextColumn("[bold]{task.description}"),
                rich.progress.BarColumn(),
                rich.progress.DownloadColumn(binary_units=True),
                rich.progress.TransferSpeedColumn(),
                rich.progress.TimeRemainingColumn(),
                rich.progress.TextColumn("holes {task.fields[holes]}"),
                console=self._console,
            )
            self._task = self._bar.add_task(self._label, **fields)  # before its first frame
            self._bar.start()
        else:
            self._bar.update(self._task, **fields)

    def close(self, *, clear: bool) -> None:
        if self._bar is not None:
            self._bar.live.transient = clear  # erases the bar's lines when it stops
            self._bar.stop()


@contextlib.contextmanager
def _progress_bar(label: str, quiet: bool) -> Iterator[_ProgressBar | None]:
    """The progress callback for one transfer: a bar on a terminal, else None.

    A bar that was drawn stays after a success and is erased after any error.
    """
    console = None if quiet else _bar_console()
    if console is None:
        yield None
        return
    bar = _ProgressBar(label, console)
    try:
        yield bar
    except BaseException:
        bar.close(clear=True)
        raise
    bar.close(clear=False)


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


@contextlib.asynccontextmanager
async def _volume(args: argparse.Namespace) -> AsyncIterator[libvirt.virStorageVol]:
    """The volume named on the command line, on a connection of its own."""
    conn = await connect(args.connect)
    try:
        yield await lookup_volume(conn, args.volume, pool=args.pool)
    finally:
        await aclose_connection(conn)


@contextlib.contextmanager
def _local_file(action: str, path: str) -> Iterator[None]:
    """A local file's ``OSError``, said of the file named on the command line.

    (A download's errors may name its temporary file beside it.)
    """
    try:
        yield
    except OSError as error:
        if isinstance(error, AioVirtStreamError):  # ours already say what to do
            raise
        raise CommandError(f"cannot {action} {path!r}: {error.strerror or error}") from error


async def _cmd_upload(args: argparse.Namespace) -> int:
    async with _volume(args) as vol:
        with (
            _local_file("read", args.file),
            _progress_bar(f"upload {args.volume}", args.quiet) as progress,
        ):
            result = await upload(
                vol,
                args.file,
                sparse=args.sparse,
                offset=args.offset,
                length=args.length,
                checksum=args.checksum,
                detect_zeroes=args.detect_zeroes,
                progress=progress,
            )
    _print_result("uploaded", result, args.quiet)
    return 0


async def _cmd_download(args: argparse.Namespace) -> int:
    async with _volume(args) as vol:
        with (
            _local_file("write", args.file),
            _progress_bar(f"download {args.volume}", args.quiet) as progress,
        ):
            result = await download(
                vol,
                args.file,
                sparse=args.sparse,
                offset=args.offset,
                length=args.length,
                checksum=args.checksum,
                overwrite=args.overwrite,
                parallel=args.parallel,
                direct_io=args.direct_io,
                fsync=args.fsync,
                progress=progress,
            )
    _print_result("downloaded", result, args.quiet)
    return 0


# ---------------------------------------------------------------------- demo


def _make_demo_image(path: Path, size: int, seed: int = 7) -> tuple[int, str]:
    """A sparse image: scattered random extents, a run of written zeroes, holes.

    Returns (bytes of real data, sha256 of the logical content).
    """
    if size < DEMO_MIN_MIB * MiB:
        raise ValueError(f"the demo image needs at least {DEMO_MIN_MIB} MiB")
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


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"aiovirtstream: error: {message} (see '{self.prog} --help')\n")


def _whole_number(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``, refused in words otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number of {what}, not {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more {what}, not {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``upload``, ``download`` and ``demo``."""
    parser = _Parser(
        prog="aiovirtstream",
        description="Move data into and out of libvirt storage volumes, asyncio-native.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    def common_args(sub: argparse.ArgumentParser) -> None:
        # SUPPRESS: a subcommand that is not given --debug keeps the main parser's value.
        sub.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks and debug logs",
        )

    def transfer_args(sub: argparse.ArgumentParser, verb: str) -> None:
        common_args(sub)
        sub.add_argument(
            "-c", "--connect", metavar="URI", default=None, help="libvirt URI (as with virsh -c)"
        )
        sub.add_argument("--pool", default=None, help="storage pool (else VOLUME is a path/key)")
        sub.add_argument("volume", help="volume name (with --pool), path or key")
        sub.add_argument("file", help=f"local file to {verb}")
        sub.add_argument(
            "--no-sparse", dest="sparse", action="store_false", help="send holes as zeroes"
        )
        sub.add_argument(
            "--offset",
            metavar="N",
            type=_whole_number(0, "bytes"),
            default=0,
            help="byte offset in the volume",
        )
        sub.add_argument(
            "--length",
            metavar="N",
            type=_whole_number(0, "bytes"),
            default=0,
            help="bytes to move (0: all)",
        )
        sub.add_argument("--checksum", action="store_true", help="print the content's SHA-256")
        sub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    up = commands.add_parser("upload", help="upload a file into a volume")
    transfer_args(up, "upload")
    up.add_argument(
        "--detect-zeroes", action="store_true", help="send aligned runs of zeroes as holes"
    )
    up.set_defaults(run=_cmd_upload)

    down = commands.add_parser("download", help="download a volume into a file")
    transfer_args(down, "write")
    down.add_argument("--overwrite", action="store_true", help="replace an existing file")
    down.add_argument(
        "--parallel",
        metavar="N",
        type=_whole_number(1, "streams"),
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
    down.set_defaults(run=_cmd_download)

    demo = commands.add_parser(
        "demo", help="start a private libvirtd and round-trip a sparse image through it"
    )
    common_args(demo)
    demo.add_argument(
        "--size-mib",
        metavar="N",
        type=_whole_number(DEMO_MIN_MIB, "MiB"),
        default=1024,
        help=f"logical image size in MiB (at least {DEMO_MIN_MIB})",
    )
    demo.add_argument("--tcp", action="store_true", help="use the loopback TCP transport")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_cmd_demo)
    return parser


#: The library's advice in its keywords, said in the command's options.
_OPTION_FOR_KEYWORD = {
    "overwrite=True": "--overwrite",
    "sparse=False": "--no-sparse",
    "direct_io=False": "--page-cache",
    "pass an offset": "pass an --offset",
    "pass a length": "pass a --length",
}


def _describe(error: BaseException) -> str:
    """One line for ``error``: what went wrong and, where we know it, what to do."""
    if isinstance(error, OSError) and not isinstance(error, AioVirtStreamError):
        if error.strerror and error.filename is not None:
            return f"{error.filename}: {error.strerror}"
        return error.strerror or str(error)
    message = str(error) or type(error).__name__
    for keyword, option in _OPTION_FOR_KEYWORD.items():
        message = message.replace(keyword, option)
    if isinstance(error, ConnectionLostError):
        message += " (check that the daemon is running, then run the command again)"
    return " ".join(message.split())  # libvirt's messages may span lines


def _show_logs() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    logger = logging.getLogger("aiovirtstream")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error argparse has printed
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    if args.debug:
        _show_logs()
    try:
        return int(asyncio.run(args.run(args)))
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("aiovirtstream: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (AioVirtStreamError, OSError, CommandError) as error:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"aiovirtstream: error: {_describe(error)}", file=sys.stderr)
        return EXIT_FAILURE
