"""The test guest of a full-mode sandbox: its files, its channel folder, booting and stopping it."""

from __future__ import annotations

__all__ = ["TestGuests", "GuestsSandbox", "NAME_RE"]

import contextlib
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import libvirt

from .._exceptions import SandboxError, map_libvirt_errors
from . import _guest, _watchdog
from ._daemon import SUN_PATH_MAX, DaemonProcess
from ._records import GuestInfo, SandboxMode

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


class GuestsSandbox(Protocol):
    """What the test guests use of their sandbox (a ``Sandbox``)."""

    @property
    def mode(self) -> SandboxMode: ...
    @property
    def tcp(self) -> bool: ...
    @property
    def path(self) -> Path: ...
    @property
    def uri(self) -> str: ...
    @property
    def tcp_uri(self) -> str: ...
    def connect(self) -> contextlib.AbstractContextManager[libvirt.virConnect]: ...


class TestGuests:
    """Boots and stops a sandbox's test guests; the kernel and initramfs are built once."""

    __test__ = False  # not a pytest test class

    def __init__(
        self, sandbox: GuestsSandbox, daemon: DaemonProcess, read_file: Callable[..., str]
    ) -> None:
        self._sandbox = sandbox
        self._daemon = daemon
        self._read_file = read_file
        self._lock = threading.Lock()
        self._files_cache: _guest.GuestFiles | None = None
        self._channel_dir: Path | None = None

    def _files(self) -> _guest.GuestFiles:
        """Kernel and initramfs, built once per sandbox into the caller's guest-files folder.

        That folder (beside :attr:`path`, 0755) is the caller's: the daemon's
        user may read it but not change it, so root never writes, chmods or
        chowns in a folder that user controls. Files are written below its
        descriptor, without following links.
        """
        with self._lock:
            if self._files_cache is None:
                folder = self._daemon.guest_files
                if folder is None:
                    raise SandboxError(f"{self._sandbox!r} is not running")
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(folder, flags)
                try:
                    st = os.fstat(fd)
                    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                        raise SandboxError(f"{folder} was tampered with")
                    files = _guest.prepare_guest_files(folder, dir_fd=fd)
                finally:
                    os.close(fd)
                self._files_cache = files
            return self._files_cache

    def _channels_folder(self) -> Path:
        """``<path>/guests``, where QEMU (the daemon's user) binds the channels' sockets.

        Made below the descriptor of the daemon's folder and, as root, given to
        the daemon's user through a descriptor of its own: no link is followed.
        A ``guests`` that is not a folder (a planted link) is a SandboxError.
        """
        with self._lock:
            if self._channel_dir is not None:
                return self._channel_dir
            root_fd = self._daemon.root_fd
            if root_fd is None:
                raise SandboxError(f"{self._sandbox!r} is not running")
            folder = self._sandbox.path / "guests"
            with contextlib.suppress(FileExistsError):
                os.mkdir("guests", 0o700, dir_fd=root_fd)
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open("guests", flags, dir_fd=root_fd)
            except OSError as error:
                raise SandboxError(f"{folder} is not a folder (tampered with?): {error}") from None
            try:
                st = os.fstat(fd)
                uid = self._daemon.uid
                if st.st_uid == os.geteuid() and uid != st.st_uid and st.st_nlink == 2:
                    os.fchown(fd, uid, self._daemon.gid)  # the empty folder just made
                elif st.st_uid != uid:
                    raise SandboxError(f"{folder} is not the daemon user's (tampered with?)")
            finally:
                os.close(fd)
            self._channel_dir = folder
            return folder

    def start(self, name: str, ready_timeout: float) -> GuestInfo:
        """:meth:`Sandbox.start_test_guest`: boot the guest, return once it answers."""
        if self._sandbox.mode != "full":
            raise SandboxError("test guests need a full-mode sandbox: Sandbox('full')")
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"guest name {name!r}: use letters, digits and _.+-")
        files = self._files()
        channel_path = self._channels_folder() / f"{name}.chan"
        if len(os.fsencode(channel_path)) > SUN_PATH_MAX:
            raise SandboxError(f"channel socket path {channel_path} is too long: use tmp_dir=")
        xml = _guest.domain_xml(
            name, files.kernel, files.initrd, graphics="vnc-socket", channel_path=channel_path
        )
        log_path = self._sandbox.path / "cache" / "libvirt" / "qemu" / "log" / f"{name}.log"
        with self._sandbox.connect() as conn:
            with map_libvirt_errors(context=f"start test guest {name!r}"):
                dom = conn.createXML(xml, 0)
            try:
                _wait_for_ready_marker(conn, dom, ready_timeout)
            except BaseException as error:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                if isinstance(error, _GuestNotReadyError):
                    log = self._read_file(log_path)
                    sandbox = self._sandbox
                    raise SandboxError(
                        f"test guest {name!r} of {sandbox!r} {error}\n--- {log_path} ---\n{log}"
                    ) from None
                raise
        return GuestInfo(
            name=name,
            uri=self._sandbox.uri,
            tcp_uri=self._sandbox.tcp_uri if self._sandbox.tcp else None,
            channel=_guest.DEFAULT_CHANNEL_NAME,
            channel_path=channel_path,
            log_path=log_path,
        )

    def stop(self, guest: GuestInfo | str, wait: bool) -> None:
        """:meth:`Sandbox.stop_test_guest`: destroy the guest, or kill its QEMU."""
        name = str(guest)
        if not wait and self._kill_qemu(name):
            return
        with (
            self._sandbox.connect() as conn,
            map_libvirt_errors(context=f"stop test guest {name!r}"),
        ):
            try:
                conn.lookupByName(name).destroy()
            except libvirt.libvirtError as error:
                if error.get_error_code() not in (
                    libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_OPERATION_INVALID,
                ):
                    raise

    def _kill_qemu(self, name: str) -> bool:
        """SIGKILL the QEMU of domain ``name`` of this sandbox; False if it was not found."""
        pid_file = self._sandbox.path / "run" / "libvirt" / "qemu" / "run" / f"{name}.pid"
        try:
            pid = int(self._read_file(pid_file, 1).strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            owner = os.stat(f"/proc/{pid}").st_uid
        except (OSError, ValueError):
            return False
        # Only the QEMU of that guest of this sandbox (pid files can be stale).
        if owner != self._daemon.uid or f"guest={name},".encode() not in cmdline:
            return False
        if os.fsencode(self._sandbox.path) not in cmdline:
            return False
        _watchdog.kill_process(pid, self._daemon.uid)
        return True


class _GuestNotReadyError(Exception):
    pass


def _wait_for_ready_marker(
    conn: libvirt.virConnect, dom: libvirt.virDomain, timeout: float
) -> None:
    """Read the console (a blocking stream, in a thread) until the guest's ready marker.

    The console is opened right after ``createXML``: QEMU's pty drops guest
    output while nobody holds it, and the marker is written once. On timeout
    the caller's ``destroy`` ends the stream, which ends the thread.
    """
    stream = conn.newStream(0)
    dom.openConsole(None, stream, 0)
    seen = bytearray()
    outcome: list[str | None] = []

    def read() -> None:
        try:
            while _guest.READY_MARKER not in seen:
                data = stream.recv(64 * 1024)
                if not isinstance(data, bytes) or not data:
                    outcome.append("stopped before it was ready")
                    return
                seen.extend(data)
            outcome.append(None)
        except libvirt.libvirtError as error:
            outcome.append(f"console failed: {error.get_error_message() or error}")

    thread = threading.Thread(target=read, name="aiovirtstream-guest-console", daemon=True)
    thread.start()
    thread.join(timeout)
    if outcome == [None]:
        stream.finish()
        return
    if thread.is_alive():
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()  # ends the blocked recv with end of stream
        thread.join(10)
        reason = f"was not ready within {timeout:g} s"
    else:
        reason = (outcome[0] if outcome else None) or "failed"
    with contextlib.suppress(libvirt.libvirtError):
        stream.abort()
    tail = bytes(seen[-2000:]).decode(errors="replace")
    raise _GuestNotReadyError(f"{reason}; console output:\n{tail}")
