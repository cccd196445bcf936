"""A tiny QEMU/TCG guest for console, channel and screenshot tests (no KVM needed).

Built at run time from installed Debian packages (:mod:`._initramfs`); the
console answers upper-cased, every channel case-swapped (docs/testing.md,
"Test guests").
"""

# Facts the guest's users rely on (libvirt 9.0.0, QEMU 7.2):
# * The console (ttyS0, raw -echo) prints READY_MARKER once, when the channel
#   servers run; QEMU's pty backend drops output while nobody holds the pty, so
#   open the console right after createXML to see it. Input sent before the
#   marker is partly echoed, partly lost (the line discipline is not raw yet).
# * virDomainOpenChannel rejects <channel type='pty'> ("channel ... is not using
#   a UNIX socket"): the channel is type='unix' (bind).
# * virDomainScreenshot answers image/png with or without <graphics>.

from __future__ import annotations

__all__ = [
    "READY_MARKER",
    "KERNEL_CMDLINE",
    "DEFAULT_CHANNEL_NAME",
    "GuestFiles",
    "console_transform",
    "channel_transform",
    "domain_xml",
    "prepare_guest_files",
    "check_requirements",
]

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import escape, quoteattr

from ._files import opened_folder, read_regular_bytes, write_atomically
from ._initramfs import build_initramfs, check_requirements, find_kernel

READY_MARKER = b"AIOVIRTSTREAM-GUEST-READY\n"
"""Written once on the serial console when the guest answers on console and channels."""

KERNEL_CMDLINE = "console=ttyS0 quiet loglevel=0 panic=-1"
"""``loglevel=0`` keeps kernel messages off the console; ``panic=-1`` + ``on_reboot``
``destroy`` turn a dead ``/init`` into a stopped domain."""

DEFAULT_CHANNEL_NAME = "org.aiovirtstream.test"


@dataclass(frozen=True)
class GuestFiles:
    """The kernel and initramfs of the test guest, readable by the daemon's user."""

    kernel: Path
    initrd: Path


def console_transform(data: bytes) -> bytes:
    """What the guest answers on its serial console: ASCII letters upper-cased."""
    return data.upper()


def channel_transform(data: bytes) -> bytes:
    """What the guest answers on a virtio-serial channel: ASCII letters' case swapped."""
    return data.swapcase()


def _readable_by_others(path: Path) -> bool:
    if not path.stat().st_mode & stat.S_IROTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.resolve().parents)


def prepare_guest_files(dest_dir: Path, *, dir_fd: int | None = None) -> GuestFiles:
    """Kernel and initramfs for :func:`domain_xml`, built into ``dest_dir`` if not there yet.

    The kernel is used in place when everyone may read it, else copied (0644) into
    ``dest_dir``. ``dest_dir`` and its parents must be enterable by the daemon's user.
    ``dir_fd``: an open descriptor of ``dest_dir``; files are then written below it,
    without following links, and ``dest_dir`` is not made.
    """
    with opened_folder(dest_dir, dir_fd) as fd:
        kernel = find_kernel()
        initrd = build_initramfs(dest_dir, kernel=kernel, dir_fd=fd)
        if not _readable_by_others(kernel):
            name = kernel.name  # keeps the vmlinuz-<version> name
            data = kernel.read_bytes()
            if read_regular_bytes(fd, name) != data:
                write_atomically(fd, name, data)
            kernel = dest_dir / name
    return GuestFiles(kernel=kernel, initrd=initrd)


def domain_xml(
    name: str,
    kernel: Path,
    initrd: Path,
    *,
    channel_name: str = DEFAULT_CHANNEL_NAME,
    memory_mib: int = 128,
    graphics: Literal["vnc-tcp", "vnc-socket", "none"] = "vnc-tcp",
    channel_path: Path | None = None,
) -> str:
    """A transient-domain XML of the test guest: TCG, no disk, no network.

    A pty serial console, one virtio-serial ``<channel type='unix'>`` named
    ``channel_name`` and a std VGA. ``graphics``: VNC on 127.0.0.1 with autoport
    (``vnc-tcp``), VNC on a unix socket libvirt places (``vnc-socket``: no TCP port
    to race for between daemons) or none; screenshots work with all three.
    ``channel_path``: the channel's socket (its folder writable by the daemon),
    default one libvirt places under ``$XDG_CONFIG_HOME/libvirt/qemu/channel``:
    mind the 107-byte limit of socket paths with a long sandbox folder.
    """
    if graphics == "vnc-tcp":
        display = "\n    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>"
    elif graphics == "vnc-socket":
        display = "\n    <graphics type='vnc'><listen type='socket'/></graphics>"
    else:
        display = ""
    path_attr = f" path={quoteattr(str(channel_path))}" if channel_path is not None else ""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{int(memory_mib)}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(KERNEL_CMDLINE)}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'>
      <source mode='bind'{path_attr}/>
      <target type='virtio' name={quoteattr(channel_name)}/>
    </channel>{display}
    <video><model type='vga'/></video>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""
