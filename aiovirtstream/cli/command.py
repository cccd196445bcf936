"""The command's entry point: parse, run the verb on asyncio, turn its end into an exit
status and at most one line on stderr (the traceback with ``--debug``)."""

from __future__ import annotations

__all__ = ["main"]

import argparse
import asyncio
import logging
import sys
import traceback
from collections.abc import Sequence

from .errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    FAILURES,
    Terminated,
    describe,
)
from .parser import build_parser
from .signals import cancel_on_termination


def _show_logs() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    logger = logging.getLogger("aiovirtstream")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


async def _run(args: argparse.Namespace) -> int:
    with cancel_on_termination():
        return int(await args.run(args))


def _failed(args: argparse.Namespace, line: str) -> None:
    if args.debug:
        traceback.print_exc()
    print(f"aiovirtstream: {line}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error argparse has printed
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    if args.debug:
        _show_logs()
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        _failed(args, "interrupted")
        return EXIT_INTERRUPTED
    except Terminated:
        _failed(args, "terminated")
        return EXIT_TERMINATED
    except FAILURES as error:
        _failed(args, f"error: {describe(error)}")
        return EXIT_FAILURE
