"""``upload`` and ``download`` (several ``VOLUME FILE`` pairs at once on one connection),
and ``copy`` (a volume into another, on two connections).

Every volume is found before any transfer starts (a typo moves nothing); then
the transfers run concurrently, each to its own end, as ``cp`` does with
several files: one that fails is said on stderr and the others go on.
"""

from __future__ import annotations

__all__ = ["cmd_upload", "cmd_download", "cmd_copy"]

import argparse
import contextlib
import time
import traceback
from collections.abc import Iterator
from typing import Any

import anyio
import libvirt

import aiovirtstream as avs

from .errors import FAILURES, CommandError, describe
from .lookup import connection, find_volume
from .output import Outcome, err, open_board, print_outcomes, with_bar
from .pairs import Pair


@contextlib.contextmanager
def _local_file(action: str, path: str) -> Iterator[None]:
    """A local file's ``OSError``, said of the file named on the command line.

    (A download's errors may name its temporary file beside it.)
    """
    try:
        yield
    except OSError as error:
        if isinstance(error, avs.AioVirtStreamError):  # ours already say what to do
            raise
        raise CommandError(f"cannot {action} {path!r}: {error.strerror or error}") from error


async def _run(args: argparse.Namespace, verb: str) -> int:
    pairs: list[Pair] = args.pairs
    async with connection(args.connect) as conn:
        found: list[tuple[libvirt.virStorageVol, str | None]] = []
        for pair in pairs:
            found.append(await find_volume(conn, pair.volume, args.pool))
        outcomes = [
            Outcome(verb, p.volume, p.file, pool) for p, (_, pool) in zip(pairs, found, strict=True)
        ]
        board = open_board([f"{verb} {p.volume}" for p in pairs], quiet=args.quiet or args.json)
        started = time.perf_counter()

        async def one(index: int) -> None:
            pair, (vol, _) = pairs[index], found[index]
            progress = board.reporter(index) if board is not None else None
            try:
                with _local_file("read" if verb == "upload" else "write", pair.file):
                    outcomes[index].result = await _transfer(verb, vol, pair.file, args, progress)
            except FAILURES as error:
                if args.debug:
                    traceback.print_exception(error)
                outcomes[index].error = describe(error)
                if board is not None:
                    board.failed(index)

        try:
            async with anyio.create_task_group() as tg:
                for index in range(len(pairs)):
                    tg.start_soon(one, index)
        except BaseException:
            if board is not None:
                board.close(clear=True)
            raise
        if board is not None:
            board.close(clear=False)
    seconds = time.perf_counter() - started
    print_outcomes(outcomes, as_json=args.json, quiet=args.quiet, seconds=seconds)
    failed = [o for o in outcomes if o.error is not None]
    for outcome in failed:
        prefix = f"{outcome.volume}: " if len(pairs) > 1 else ""
        err(f"aiovirtstream: error: {prefix}{outcome.error}")
    return 1 if failed else 0


async def _transfer(
    verb: str, vol: libvirt.virStorageVol, file: str, args: argparse.Namespace, progress: Any
) -> avs.TransferResult:
    if verb == "upload":
        return await avs.upload(
            vol,
            file,
            sparse=args.sparse,
            offset=args.offset,
            length=args.length,
            checksum=args.checksum,
            detect_zeroes=args.detect_zeroes,
            progress=progress,
        )
    return await avs.download(
        vol,
        file,
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


async def cmd_upload(args: argparse.Namespace) -> int:
    """``aiovirtstream upload``: each FILE into its VOLUME."""
    return await _run(args, "upload")


async def cmd_download(args: argparse.Namespace) -> int:
    """``aiovirtstream download``: each VOLUME into its FILE."""
    return await _run(args, "download")


async def cmd_copy(args: argparse.Namespace) -> int:
    """``aiovirtstream copy``: SRC (on ``--from``) into DST (on ``--to``), no file between."""
    from_uri = args.from_uri or args.connect
    to_uri = args.to_uri or from_uri
    async with connection(from_uri) as src_conn, connection(to_uri) as dst_conn:
        src, src_pool = await find_volume(src_conn, args.source, args.from_pool)
        dst, dst_pool = await find_volume(dst_conn, args.destination, args.to_pool)
        outcome = Outcome("copy", args.source, args.destination, src_pool, dst_pool)
        started = time.perf_counter()
        outcome.result = await with_bar(
            f"copy {args.source}",
            args.quiet or args.json,
            lambda progress: avs.copy(
                src,
                dst,
                sparse=args.sparse,
                offset=args.offset,
                length=args.length,
                checksum=args.checksum,
                progress=progress,
            ),
        )
    seconds = time.perf_counter() - started
    print_outcomes([outcome], as_json=args.json, quiet=args.quiet, seconds=seconds)
    return 0
