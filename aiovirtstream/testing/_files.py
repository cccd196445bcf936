"""The daemon's files and the guest's, read and written safely: beneath a folder,
never through a link."""

from __future__ import annotations

__all__ = [
    "is_regular",
    "opened_folder",
    "read_regular_bytes",
    "write_atomically",
    "tail",
    "traversable",
    "find_driver_dir",
    "open_beneath",
    "read_regular",
]

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path


def tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * lines))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def find_driver_dir(libvirtd: Path) -> Path | None:
    """The folder of libvirt's connection-driver modules (Debian: /usr/lib/<triplet>/...)."""
    prefixes = dict.fromkeys([libvirtd.resolve().parent.parent, Path("/usr"), Path("/usr/local")])
    patterns = (
        "lib/*/libvirt/connection-driver",
        "lib64/libvirt/connection-driver",
        "lib/libvirt/connection-driver",
    )
    candidates = [c for p in prefixes for pat in patterns for c in sorted(p.glob(pat))]
    for candidate in candidates:
        if (candidate / "libvirt_driver_storage.so").exists():
            return candidate
    return candidates[0] if candidates else None


def traversable(path: Path, uid: int, gid: int) -> bool:
    """Whether uid:gid may enter every folder from / down to path (mode bits only)."""
    for folder in [path, *path.parents]:
        st = folder.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def open_beneath(dir_fd: int, relpath: str, flags: int, mode: int = 0o600) -> int:
    """Open relpath below the folder dir_fd without following any link on the way."""
    *folders, name = relpath.split("/")
    fd = dir_fd
    try:
        for folder in folders:
            flags_dir = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            new = os.open(folder, flags_dir, dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = new
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        if fd != dir_fd:
            os.close(fd)


def read_regular(fd: int, uid: int | None, lines: int, offset: int | None) -> str:
    """The last lines (or everything from offset) of the regular file fd; '' if it is not one.

    With uid, the file must belong to uid (no hard link to another's file).
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
        return ""
    if offset is None:
        offset = max(0, st.st_size - 256 * lines)
    os.lseek(fd, offset, os.SEEK_SET)
    data = os.read(fd, 1 << 20)
    text = data.decode(errors="replace")
    return text if lines <= 0 else "\n".join(text.splitlines()[-lines:])


def write_atomically(dir_fd: int, name: str, data: bytes) -> None:
    """Put ``name`` (0644) in the folder ``dir_fd`` through a temporary file renamed over it.

    Everything goes below the descriptor and the temporary file is made with
    ``O_EXCL|O_NOFOLLOW``: no link is followed, whoever may change the path.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp = f".{name}.{secrets.token_hex(8)}"
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def read_regular_bytes(dir_fd: int, name: str) -> bytes | None:
    """The content of the regular file ``name`` below ``dir_fd`` (no link followed), or None."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read() if stat.S_ISREG(os.fstat(fd).st_mode) else None


def is_regular(dir_fd: int, name: str) -> bool:
    """True if ``name`` below ``dir_fd`` is a regular file (a link is not followed)."""
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _make_dir(dest_dir: Path) -> None:
    if not dest_dir.is_dir():
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest_dir.chmod(0o755)  # the daemon's user must enter it, whatever the umask


@contextlib.contextmanager
def opened_folder(dest_dir: Path, dir_fd: int | None) -> Iterator[int]:
    """``dir_fd`` if given (a descriptor of ``dest_dir``), else ``dest_dir`` made and opened."""
    if dir_fd is not None:
        yield dir_fd
        return
    _make_dir(dest_dir)
    fd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)
