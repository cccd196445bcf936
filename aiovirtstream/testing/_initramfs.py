"""The test guest's boot files: the distribution's kernel and an initramfs built here.

The initramfs is a gzip'd newc cpio written in pure Python: the static
busybox, the kernel's virtio modules and a shell ``/init`` that answers on
the console and the channels (docs/testing.md, "Test guests").
"""

# What the build relies on (Debian 12: linux-image-cloud-amd64, busybox-static):
# * The module load order comes from modules.dep (virtio needs virtio_ring).
# * busybox tr does not buffer: one write() per read().
# * A virtio port read returns 0 at once while no host end is connected, so the
#   guest polls virtio_console's debugfs host_connected with shell builtins only
#   (no fork per poll).
# * Closing a virtio port in the guest discards data the host sent and nobody
#   read yet: a new host end (a takeover, a quick reopen) can send before tr saw
#   the old one go, so the guest keeps the port open and restarts tr on it.

from __future__ import annotations

__all__ = [
    "VIRTIO_MODULES",
    "build_initramfs",
    "check_requirements",
    "find_kernel",
    "kernel_modules_dir",
]

import gzip
import hashlib
import io
import lzma
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path

from .._exceptions import GuestPackageMissingError
from ._files import is_regular, opened_folder, write_atomically

VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
)
"""Modules loaded by ``/init`` (plus whatever ``modules.dep`` says they need)."""

_BOOT = Path("/boot")
_MODULES_ROOT = Path("/lib/modules")
_BUSYBOX = Path("/bin/busybox")
_KERNEL_PACKAGE = "linux-image-cloud-amd64"
_BUSYBOX_PACKAGE = "busybox-static"
_FORMAT_VERSION = "2"  # bump when the initramfs layout or /init changes
_APPLETS_FALLBACK = (
    "bin/sh bin/mount bin/stty bin/sleep bin/ls bin/cat bin/echo bin/mkdir "
    "sbin/insmod usr/bin/tr usr/bin/printf usr/bin/basename usr/bin/test usr/bin/["
).split()

_INIT_TEMPLATE = r"""#!/bin/sh
# /init of the aiovirtstream test guest (written by aiovirtstream.testing._initramfs).
# console ttyS0: upper-cases (tr a-z A-Z); virtio-serial ports: swap case.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# raw and no echo as early as possible: the line discipline echoes until then
stty -F /dev/ttyS0 raw -echo
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "aiovirtstream-guest: insmod $m failed"
done
mount -t debugfs debugfs /sys/kernel/debug
mkfifo /tmp/tick
nap() {
    # a fork-free sleep: nobody ever writes the fifo
    read -t "$1" _ <>/tmp/tick
}
host_connected() {
    # virtio_console's debugfs entry tells whether the host end is open
    f=/sys/kernel/debug/virtio-ports/$1
    [ -r "$f" ] || return 0
    while read -r k v; do
        [ "$k" = host_connected: ] && [ "$v" = 1 ] && return 0
    done <"$f"
    return 1
}
serve_port() {
    # read() returns 0 while no host end is connected: wait for one without
    # forking (an idle guest then costs little CPU), serve it, again. The port
    # stays open (fd 3) for good: closing it discards unread data, and a new
    # host end (FORCE takeover, quick reopen) may send before tr saw the old
    # one go.
    exec 3<>"/dev/$1"
    while :; do
        if host_connected "$1"; then
            tr a-zA-Z A-Za-z <&3 >&3 2>/dev/null
        fi
        nap 0.05
    done
}
# a virtio console device (id 3) announces its ports asynchronously: wait for them
if grep -qx 0x0003 /sys/bus/virtio/devices/*/device 2>/dev/null; then
    i=0
    while [ $i -lt 100 ] && ! ls /sys/class/virtio-ports/ 2>/dev/null | grep -q .; do
        sleep 0.05
        i=$((i + 1))
    done
    sleep 0.1
fi
for p in /sys/class/virtio-ports/*; do
    [ -e "$p" ] || continue
    port=$(basename "$p")
    [ -c "/dev/$port" ] && serve_port "$port" </dev/null >/dev/null 2>&1 &
done
exec 2>/dev/null
printf 'AIOVIRTSTREAM-GUEST-READY\n' >/dev/ttyS0
while :; do
    tr a-z A-Z 0<>/dev/ttyS0 1>&0
    nap 0.05
done
"""


def _version_key(version: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", version)]


def find_kernel(*, boot: Path = _BOOT, modules_root: Path = _MODULES_ROOT) -> Path:
    """The newest ``vmlinuz-*-cloud-amd64`` under /boot that has a modules folder.

    Other ``vmlinuz-*`` kernels are the fallback. The caller must still make sure
    the daemon's user can read it (:func:`prepare_guest_files` does).
    """
    found: list[tuple[bool, list[tuple[int, int | str]], Path]] = []
    for path in boot.glob("vmlinuz-*"):
        version = path.name.removeprefix("vmlinuz-")
        if path.is_file() and (modules_root / version / "kernel").is_dir():
            found.append((version.endswith("-cloud-amd64"), _version_key(version), path))
    if not found:
        raise GuestPackageMissingError(
            f"no kernel {boot}/vmlinuz-* with modules under {modules_root}", _KERNEL_PACKAGE
        )
    return max(found)[2]


def kernel_modules_dir(kernel: Path, *, modules_root: Path = _MODULES_ROOT) -> Path:
    """``/lib/modules/<version>`` of a ``vmlinuz-<version>`` (or a copy named so)."""
    version = kernel.name.removeprefix("vmlinuz-")
    folder = modules_root / version
    if not (folder / "kernel").is_dir():
        raise GuestPackageMissingError(f"no modules folder {folder} for {kernel}", _KERNEL_PACKAGE)
    return folder


def _module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name.split(".ko", 1)[0].replace("-", "_")


def _resolve_modules(mod_dir: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """``(name, file)`` of ``wanted`` and their dependencies, dependencies first."""
    deps: dict[str, tuple[str, list[str]]] = {}
    dep_file = mod_dir / "modules.dep"
    if dep_file.is_file():
        for line in dep_file.read_text().splitlines():
            target, sep, rest = line.partition(":")
            if sep:
                deps[_module_name(target)] = (target, [_module_name(d) for d in rest.split()])
    builtin: set[str] = set()
    for name in ("modules.builtin",):
        if (mod_dir / name).is_file():
            builtin |= {_module_name(x) for x in (mod_dir / name).read_text().split()}

    def locate(name: str) -> Path | None:
        if name in deps:
            return mod_dir / deps[name][0]
        for pattern in (f"{name}.ko*", f"{name.replace('_', '-')}.ko*"):
            hits = sorted((mod_dir / "kernel" / "drivers").rglob(pattern))
            if hits:
                return hits[0]
        return None

    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in deps.get(name, ("", []))[1]:
            visit(dep)
        path = locate(name)
        if path is not None:
            order.append((name, path))
        elif name not in builtin:
            raise GuestPackageMissingError(
                f"kernel module {name} not found under {mod_dir}", _KERNEL_PACKAGE
            )

    for name in wanted:
        visit(name)
    return order


def _module_bytes(path: Path) -> bytes:
    """The uncompressed ``.ko`` (handles ``.ko``, ``.ko.xz``, ``.ko.gz``, ``.ko.zst``)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise GuestPackageMissingError(f"{path} is zstd-compressed", "zstd")
        return subprocess.run([zstd, "-dcq"], input=data, capture_output=True, check=True).stdout
    return data


def _applet_links(busybox: Path) -> list[str]:
    """Relative paths (``bin/sh``, ``usr/bin/tr``...) of busybox's applets."""
    try:
        out = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return list(_APPLETS_FALLBACK)
    links = [line.strip().lstrip("/") for line in out.splitlines() if line.strip()]
    return [link for link in links if link != "bin/busybox" and ".." not in link] or list(
        _APPLETS_FALLBACK
    )


class _Newc:
    """A minimal writer of the cpio ``newc`` format (what the kernel unpacks)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self.ino += 1
        raw_name = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
        head = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(head + raw_name)
        self.out.write(b"\0" * (-(len(head) + len(raw_name)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.out.write(b"\0" * (-self.out.tell() % 512))
        return self.out.getvalue()


def build_initramfs(
    dest_dir: Path,
    *,
    kernel: Path | None = None,
    busybox: Path = _BUSYBOX,
    dir_fd: int | None = None,
) -> Path:
    """Write the guest's gzip'd newc initramfs into ``dest_dir`` and return its path.

    The file name carries a hash of everything in it: an existing file is reused.
    ``kernel`` (default :func:`find_kernel`) chooses the modules' version.
    ``dir_fd``: an open descriptor of ``dest_dir``; the file is then written
    below it, without following links, and ``dest_dir`` is not made.
    """
    if not busybox.is_file():
        raise GuestPackageMissingError(f"{busybox} not found", _BUSYBOX_PACKAGE)
    kernel = kernel if kernel is not None else find_kernel()
    mod_dir = kernel_modules_dir(kernel)
    modules = [
        (name, _module_bytes(path)) for name, path in _resolve_modules(mod_dir, VIRTIO_MODULES)
    ]
    init = _INIT_TEMPLATE.replace("@MODULES@", " ".join(name for name, _ in modules)).encode()
    busybox_data = busybox.read_bytes()
    applets = _applet_links(busybox)

    digest = hashlib.sha256(_FORMAT_VERSION.encode())
    for part in (busybox_data, init, "\n".join(applets).encode()):
        digest.update(hashlib.sha256(part).digest())
    for name, data in modules:
        digest.update(name.encode() + hashlib.sha256(data).digest())
    name = f"aiovirtstream-guest-{digest.hexdigest()[:16]}.cpio.gz"
    with opened_folder(dest_dir, dir_fd) as fd:
        if not is_regular(fd, name):
            write_atomically(fd, name, _initramfs(busybox_data, applets, modules, init))
    return dest_dir / name


def _initramfs(
    busybox_data: bytes, applets: list[str], modules: list[tuple[str, bytes]], init: bytes
) -> bytes:
    """The gzip'd newc archive of the guest's root."""
    cpio = _Newc()
    dirs = set("bin sbin usr usr/bin usr/sbin dev proc sys tmp root lib lib/modules".split())
    dirs |= {str(Path(link).parent) for link in applets} - {"."}
    for folder in sorted(dirs, key=lambda d: (d.count("/"), d)):
        cpio.dir(folder)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox_data, 0o755)
    for link in applets:
        cpio.symlink(link, "/bin/busybox")
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file("init", init, 0o755)
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def check_requirements(*, busybox: Path = _BUSYBOX) -> None:
    """Raise :class:`GuestPackageMissingError` if the kernel, its modules or busybox is missing.

    Cheap: it builds nothing.
    """
    if not busybox.is_file():
        raise GuestPackageMissingError(f"{busybox} not found", _BUSYBOX_PACKAGE)
    _resolve_modules(kernel_modules_dir(find_kernel()), VIRTIO_MODULES)
