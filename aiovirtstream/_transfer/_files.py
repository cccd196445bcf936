"""Download destinations: temporary files, their mode, flushing and renaming into place."""

from __future__ import annotations

__all__ = [
    "check_fsync",
    "flush_to_disk",
    "sync_folder_of",
    "current_umask",
    "final_mode",
    "put_in_place",
    "close_all",
    "discard",
    "make_destination_files",
    "inspect_destination",
    "has_fileno",
]

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import IO

from .._exceptions import (
    DestinationExistsError,
    DestinationIsDirectoryError,
    TransferError,
)
from ._filewriter import open_direct
from ._options import TransferOptions


def _check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse a folder, or anything in ``dest``'s place without ``overwrite``.

    A symbolic link is never followed: it exists (dangling or not), and with
    ``overwrite`` the rename replaces the link itself, not its target.
    """
    try:
        mode: int | None = os.lstat(dest).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise DestinationIsDirectoryError(
            f"download destination {str(dest)!r} is a directory: name a file inside it"
        )
    if mode is not None and not overwrite:
        link = " (a symbolic link: replaced itself, never written through)"
        raise DestinationExistsError(
            f"download destination {str(dest)!r} exists"
            f"{link if stat.S_ISLNK(mode) else ''}: pass overwrite=True to replace it"
        )
    if not dest.parent.is_dir():
        raise TransferError(f"the folder of download destination {str(dest)!r} does not exist")


def check_fsync(options: TransferOptions, what: str) -> None:
    if options.fsync:
        raise ValueError(
            f"fsync=True needs a path or a regular file to flush, not {what}: "
            "drop fsync, or download into a file"
        )


def flush_to_disk(fd: int, name: str) -> None:
    """fdatasync ``fd`` (worker thread): the data and the size it needs to be read."""
    try:
        os.fdatasync(fd)
    except OSError as error:
        raise TransferError(f"cannot flush {name!r} to disk: {error}") from error


def sync_folder_of(dest: Path) -> None:
    """fsync ``dest``'s folder, so that its rename survives a crash (worker thread)."""
    try:
        fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise TransferError(
            f"{str(dest)!r} is complete, but its folder cannot be flushed to disk, so "
            f"its rename may not survive a crash: {error}"
        ) from error


def _make_temporary(dest: Path, overwrite: bool) -> tuple[int, Path]:
    """Check ``dest`` and create the temporary file beside it (worker thread).

    mkstemp creates it with ``O_EXCL|O_NOFOLLOW`` and mode 0600: private
    while it is written; :func:`final_mode` is set just before the rename.
    """
    _check_destination(dest, overwrite)
    fd, temp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    return fd, Path(temp_name)


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status``: never set to learn it
    (``os.umask`` changes it for every thread). 0o077 if it cannot be read."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o077  # unknown: the final file stays private rather than too open


def final_mode(dest: Path, overwrite: bool) -> int:
    """The mode of a finished download: that of the regular file it replaces
    (permission bits only), else what ``open()`` would give a new file."""
    if overwrite:
        with contextlib.suppress(OSError):
            info = os.lstat(dest)
            if stat.S_ISREG(info.st_mode):
                return info.st_mode & 0o777
    return 0o666 & ~current_umask()


def put_in_place(temp: Path, dest: Path, overwrite: bool) -> None:
    """Rename the finished temporary file to ``dest`` (worker thread)."""
    try:
        if overwrite:
            os.replace(temp, dest)
            return
        # link() fails if the destination appeared meanwhile: never clobber it.
        os.link(temp, dest)
    except FileExistsError as error:
        raise DestinationExistsError(
            f"download destination {str(dest)!r} appeared during the download: "
            "pass overwrite=True to replace it"
        ) from error
    except OSError as error:  # the folder removed or renamed meanwhile, ...
        raise TransferError(
            f"cannot put the finished download in place as {str(dest)!r}: {error}"
        ) from error
    temp.unlink()


def close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def discard(fds: tuple[int, ...], temp: Path) -> None:
    close_all(fds)
    temp.unlink(missing_ok=True)


def make_destination_files(dest: Path, overwrite: bool, direct_io: bool) -> tuple[int, int, Path]:
    """The temporary file and its direct descriptor (or -1), worker thread."""
    fd, temp = _make_temporary(dest, overwrite)
    direct_fd = -1
    try:
        if direct_io:
            direct_fd = open_direct(fd)  # the file itself, not whatever temp names now
    except BaseException:
        discard((fd, -1), temp)
        raise
    return fd, direct_fd, temp


def inspect_destination(dest: IO[bytes]) -> tuple[int, int]:
    """Flush an open destination; its (position, size), position -1 if it is
    not a seekable regular file (worker thread: this is file I/O)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        dest.flush()
    try:
        position = dest.tell()
    except (OSError, ValueError):
        return -1, 0
    info = os.fstat(dest.fileno())
    return (position, info.st_size) if stat.S_ISREG(info.st_mode) else (-1, 0)


def has_fileno(obj: object) -> bool:
    fileno = getattr(obj, "fileno", None)
    if fileno is None:
        return False
    try:
        fileno()
    except (OSError, ValueError):
        return False
    return True
