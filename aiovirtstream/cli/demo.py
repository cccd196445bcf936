"""``demo``: a private libvirtd, a generated sparse image uploaded and downloaded back,
bytes and holes checked. Plain text; bars when rich is installed and stderr a terminal."""

from __future__ import annotations

__all__ = ["cmd_demo", "make_demo_image", "DEMO_MIN_MIB"]

import argparse
import hashlib
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import anyio.to_thread

import aiovirtstream as avs

from .output import say, with_bar
from .units import format_rate, format_size

DEMO_MIN_MIB = 64
MiB = 1024 * 1024


def make_demo_image(path: Path, size: int, seed: int = 7) -> tuple[int, str]:
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


async def cmd_demo(args: argparse.Namespace) -> int:
    """``aiovirtstream demo``: the round trip, with a table of what it did."""
    from aiovirtstream.testing import Sandbox

    size = args.size_mib * MiB
    say(f"aiovirtstream demo: a private libvirtd, a {format_size(size)} sparse image")
    started = time.perf_counter()
    async with Sandbox(tcp=args.tcp) as sandbox:
        say(f"  daemon up as {sandbox.daemon_user!r} in {sandbox.path}")
        workdir = Path(tempfile.mkdtemp(prefix="aiovirtstream-demo-"))
        try:
            source = workdir / "source.img"
            data_bytes, digest = await anyio.to_thread.run_sync(make_demo_image, source, size)
            say(
                f"  generated {source.name}: {format_size(size)} logical, "
                f"{format_size(data_bytes)} of data, {format_size(_allocated(source))} "
                "allocated (8 MiB of it written zeroes)"
            )
            pool = await sandbox.acreate_pool("demo")
            await sandbox.acreate_volume(pool, "disk.img", size)
            dest = workdir / "downloaded.img"
            conn = await avs.connect(sandbox.tcp_uri if args.tcp else sandbox.uri)
            try:
                vol = await avs.lookup_volume(conn, "disk.img", pool=pool.name)
                sent = await with_bar(
                    "upload",
                    args.quiet,
                    lambda p: avs.upload(vol, source, detect_zeroes=True, progress=p),
                )
                vol_allocation = (await anyio.to_thread.run_sync(vol.info))[2]
                got = await with_bar(
                    "download", args.quiet, lambda p: avs.download(vol, dest, progress=p)
                )
            finally:
                await avs.aclose_connection(conn)
            dest_allocated = _allocated(dest)
            same_bytes = await anyio.to_thread.run_sync(_sha256_file, dest) == digest
            holes_kept = dest_allocated <= data_bytes + 2 * MiB
            rows = [
                ("step", "data", "holes", "seconds", "data rate", "allocated"),
                (
                    "upload",
                    format_size(sent.data_bytes),
                    format_size(sent.hole_bytes),
                    f"{sent.seconds:.2f}",
                    format_rate(sent.data_rate),
                    f"volume {format_size(vol_allocation)}",
                ),
                (
                    "download",
                    format_size(got.data_bytes),
                    format_size(got.hole_bytes),
                    f"{got.seconds:.2f}",
                    format_rate(got.data_rate),
                    f"file {format_size(dest_allocated)}",
                ),
            ]
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            for row in rows:
                cells = [row[0].ljust(widths[0])]
                cells += [
                    cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
                ]
                say("  " + "  ".join(cells))
            say(
                f"  sha256 of source and download: {digest[:16]}... "
                + ("identical" if same_bytes else "DIFFERENT")
            )
            say(
                f"  holes preserved: {format_size(dest_allocated)} allocated for "
                f"{format_size(data_bytes)} of data in {format_size(size)}: "
                + ("yes" if holes_kept else "NO")
            )
        finally:
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(workdir, ignore_errors=True))
    say(f"  daemon stopped, everything removed; {time.perf_counter() - started:.1f} s")
    return 0 if same_bytes and holes_kept else 1
