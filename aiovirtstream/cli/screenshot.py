"""``screenshot DOMAIN [FILE]``: a domain's screen saved in the type libvirt sends.

The extension comes from that MIME type (``.png``, ``.ppm``) when FILE has
none; the file appears whole or not at all, and an existing one is replaced
only with ``--overwrite``.
"""

from __future__ import annotations

__all__ = ["cmd_screenshot", "extension_for"]

import argparse
import contextlib
import mimetypes
import os
import secrets
import time
from pathlib import Path

import anyio.to_thread

import aiovirtstream as avs

from .errors import CommandError
from .lookup import connection, find_domain
from .output import say
from .units import format_size

_EXTENSIONS = {"image/png": ".png", "image/x-portable-pixmap": ".ppm"}


def extension_for(mime: str) -> str:
    """The file extension for a screenshot's MIME type (``.bin`` if unknown)."""
    return _EXTENSIONS.get(mime) or mimetypes.guess_extension(mime) or ".bin"


def _save(path: Path, image: bytes, overwrite: bool) -> None:
    """Write ``image`` to ``path`` through a temporary file beside it (worker thread)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o666)
    try:
        try:
            view = memoryview(image)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # refuses an existing path, atomically
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


async def cmd_screenshot(args: argparse.Namespace) -> int:
    """``aiovirtstream screenshot``: save the screen of a domain."""
    async with connection(args.connect) as conn:
        dom = await find_domain(conn, args.domain)
        mime, image = await avs.screenshot(dom, args.screen)
        name = dom.name()
    if args.file is None:
        path = Path(f"{name}-{time.strftime('%Y-%m-%d-%H:%M:%S')}{extension_for(mime)}")
    else:
        path = Path(args.file)
        if not path.suffix:
            path = path.with_name(path.name + extension_for(mime))
    try:
        await anyio.to_thread.run_sync(_save, path, image, args.overwrite)
    except FileExistsError:
        raise CommandError(f"{str(path)!r} exists: pass --overwrite to replace it") from None
    except OSError as error:
        raise CommandError(f"cannot write {str(path)!r}: {error.strerror or error}") from error
    say(f"{path} ({mime}, {format_size(len(image))}): screen {args.screen} of domain {name!r}")
    return 0
