"""The command line's grammar (argparse): verbs, options, sizes and ``VOLUME FILE`` pairs.

A value that cannot be right (``--offset -5``, ``--parallel 0``, ``1Q``) is a
usage error: one line naming the option and ``--help``, exit status 2.
"""

from __future__ import annotations

__all__ = ["build_parser"]

import argparse
from collections.abc import Callable
from typing import NoReturn

import libvirt

import aiovirtstream as avs

from .errors import EXIT_USAGE
from .pairs import PairsAction
from .units import SIZE_HELP, parse_size


def _size(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: a size of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more {what}, not {text}")
        return value

    return parse


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


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"aiovirtstream: error: {message} (see '{self.prog} --help')\n")


def _version() -> str:
    major, rest = divmod(libvirt.getVersion(), 1_000_000)
    minor, micro = divmod(rest, 1000)
    return f"aiovirtstream {avs.__version__} (libvirt {major}.{minor}.{micro})"


def _debug(sub: argparse.ArgumentParser) -> None:
    # SUPPRESS: a verb not given --debug keeps the main parser's value.
    sub.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def _connect(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "-c",
        "--connect",
        metavar="URI",
        default=None,
        help="libvirt URI, as with virsh -c (default: $LIBVIRT_DEFAULT_URI, else libvirt's "
        "default)",
    )


def _transfer_args(sub: argparse.ArgumentParser, verb: str) -> None:
    _debug(sub)
    _connect(sub)
    if verb != "copy":
        _pairs(sub, verb)
    _moving_args(sub)


def _pairs(sub: argparse.ArgumentParser, verb: str) -> None:
    sub.add_argument(
        "pairs",
        nargs="+",
        action=PairsAction,
        const="upload" if verb == "upload" else "download",
        metavar="VOLUME FILE",
        help="a volume and the local file to " + verb + " (or one VOLUME=FILE); several "
        "pairs run at once",
    )
    sub.add_argument(
        "--pool",
        metavar="POOL",
        default=None,
        help="the volumes' storage pool, by name or UUID (without it: VOLUME is a path, a "
        "key, or a name found in exactly one active pool)",
    )


def _moving_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--no-sparse", dest="sparse", action="store_false", help="send holes as zeroes"
    )
    sub.add_argument(
        "--offset", metavar="SIZE", type=_size(0, "bytes"), default=0, help="offset in the volume"
    )
    sub.add_argument(
        "--length", metavar="SIZE", type=_size(0, "bytes"), default=0, help="bytes to move (0: all)"
    )
    sub.add_argument(
        "--checksum", action="store_true", help="compute the SHA-256 of the bytes moved"
    )
    sub.add_argument("--json", action="store_true", help="one JSON object per transfer on stdout")
    sub.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no bars and no summary (with --checksum: 'SHA256  FILE' lines, as sha256sum)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser; each verb's namespace has ``run``, its coroutine function."""
    from . import console, demo, sandbox, screenshot, transfers  # the verbs

    parser = _Parser(
        prog="aiovirtstream",
        description="Move data into and out of libvirt storage volumes, talk to consoles, "
        "take screenshots, asyncio-native.",
        epilog=f"{SIZE_HELP}. Progress bars need rich: pip install 'aiovirtstream[cli]'. "
        "Exit status: 0 done, 1 failed, 2 usage error, 130 Ctrl+C, 143 SIGTERM.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logs (also after the verb)"
    )
    verbs = parser.add_subparsers(dest="command", required=True, metavar="VERB")

    up = verbs.add_parser(
        "upload",
        help="upload files into volumes",
        epilog=SIZE_HELP,
        description="Upload local files into libvirt storage volumes, sparse by default.",
    )
    _transfer_args(up, "upload")
    up.add_argument(
        "--detect-zeroes", action="store_true", help="send aligned runs of zeroes as holes"
    )
    up.set_defaults(run=transfers.cmd_upload)

    down = verbs.add_parser(
        "download",
        help="download volumes into files",
        epilog=SIZE_HELP,
        description="Download libvirt storage volumes into local files, sparse by default.",
    )
    _transfer_args(down, "write")
    down.add_argument("--overwrite", action="store_true", help="replace existing files")
    down.add_argument(
        "--parallel",
        metavar="N",
        type=_whole_number(1, "streams"),
        default=None,
        help="streams over ranges of each volume, >= 64 MiB each "
        "(default: 2 for 256 MiB or more, else 1)",
    )
    down.add_argument(
        "--page-cache",
        dest="direct_io",
        action="store_false",
        help="write through the page cache, as virsh does (default: O_DIRECT where "
        "the file system allows)",
    )
    down.add_argument(
        "--fsync", action="store_true", help="flush the files and their renames to the disk"
    )
    down.set_defaults(run=transfers.cmd_download)

    cp = verbs.add_parser(
        "copy",
        help="copy a volume into another, on two hosts",
        epilog=SIZE_HELP,
        description="Stream a volume into another one, typically on another host, with no "
        "file in between; holes stay holes.",
    )
    _transfer_args(cp, "copy")
    cp.add_argument("source", metavar="SRC", help="the source volume (name, path or key)")
    cp.add_argument("destination", metavar="DST", help="the destination volume, made beforehand")
    cp.add_argument("--from", dest="from_uri", metavar="URI", help="SRC's URI (default: -c)")
    cp.add_argument("--to", dest="to_uri", metavar="URI", help="DST's URI (default: --from)")
    cp.add_argument("--from-pool", metavar="POOL", help="SRC's pool, by name or UUID")
    cp.add_argument("--to-pool", metavar="POOL", help="DST's pool, by name or UUID")
    cp.set_defaults(run=transfers.cmd_copy)

    con = verbs.add_parser(
        "console",
        help="connect to a domain's console, as virsh console",
        description="Connect the terminal to a domain's serial console. Ctrl+] leaves.",
    )
    _debug(con)
    _connect(con)
    con.add_argument("domain", metavar="DOMAIN", help="domain name, UUID or id")
    con.add_argument(
        "--devname", metavar="NAME", help="console alias, e.g. serial1 (default: the first console)"
    )
    con.add_argument(
        "--force", action="store_true", help="take the console over from another client"
    )
    con.add_argument(
        "--safe", action="store_true", help="only if the driver guarantees exclusive access"
    )
    con.set_defaults(run=console.cmd_console)

    shot = verbs.add_parser(
        "screenshot",
        help="save a screenshot of a domain's screen",
        description="Save a screenshot of a domain's screen; the file type is the one "
        "libvirt sends (PNG from current QEMU, else PPM), its extension added when FILE has none.",
    )
    _debug(shot)
    _connect(shot)
    shot.add_argument("domain", metavar="DOMAIN", help="domain name, UUID or id")
    shot.add_argument(
        "file", metavar="FILE", nargs="?", help="where to save it (default: DOMAIN-TIME.EXT)"
    )
    shot.add_argument(
        "--screen",
        metavar="N",
        type=_whole_number(0, "screens"),
        default=0,
        help="screen number (default 0)",
    )
    shot.add_argument("--overwrite", action="store_true", help="replace an existing file")
    shot.set_defaults(run=screenshot.cmd_screenshot)

    box = verbs.add_parser(
        "sandbox",
        help="run a private libvirt daemon until Ctrl+C",
        description="Start a private, unprivileged libvirtd in a temporary folder, print its "
        "URIs and run until Ctrl+C or SIGTERM, then stop it and remove everything.",
    )
    _debug(box)
    box.add_argument(
        "--full", action="store_true", help="every driver, qemu included (default: storage only)"
    )
    box.add_argument("--tcp", action="store_true", help="also a TLS listener on 127.0.0.1")
    box.add_argument(
        "--pool",
        metavar="NAME",
        action="append",
        default=[],
        help="create a storage pool (repeatable)",
    )
    box.add_argument(
        "--guest", action="store_true", help="boot the QEMU test guest (implies --full)"
    )
    box.add_argument("--json", action="store_true", help="print the URIs as one JSON object")
    box.set_defaults(run=sandbox.cmd_sandbox)

    dem = verbs.add_parser(
        "demo", help="start a private libvirtd and round-trip a sparse image through it"
    )
    _debug(dem)
    dem.add_argument(
        "--size-mib",
        metavar="N",
        type=_whole_number(demo.DEMO_MIN_MIB, "MiB"),
        default=1024,
        help=f"logical image size in MiB (at least {demo.DEMO_MIN_MIB})",
    )
    dem.add_argument("--tcp", action="store_true", help="use the loopback TLS transport")
    dem.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    dem.set_defaults(run=demo.cmd_demo)
    return parser
