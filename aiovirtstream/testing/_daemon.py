"""The daemon process of a sandbox: spawned, recorded for the watchdog, stopped, cleaned up."""

from __future__ import annotations

__all__ = [
    "SUN_PATH_MAX",
    "DaemonProcess",
    "DaemonFiles",
    "find_programs",
    "daemon_config",
    "write_config",
]

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from .._exceptions import DaemonNotInstalledError, SandboxError
from . import _watchdog
from ._files import find_driver_dir, open_beneath, read_regular, traversable
from ._processes import start_watchdog

#: sizeof(sockaddr_un.sun_path) - 1 on Linux.
SUN_PATH_MAX = 107


class DaemonProcess:
    """A sandbox's resources, kept apart from it so that weakref.finalize can free them.

    ``root`` is the daemon user's folder (``root_fd`` an open descriptor of it:
    files in it are opened below it without following links), ``private`` the
    owner's (the TLS client's key, libvirtd's stderr), ``guest_files`` the
    owner's folder (0755) of the test guest's kernel and initramfs (full mode);
    ``leaders`` the pids of every libvirtd it spawned.
    """

    def __init__(self, uid: int, gid: int, stop_timeout: float) -> None:
        self.uid = uid
        self.gid = gid
        self.stop_timeout = stop_timeout
        self.root: Path | None = None
        self.root_fd: int | None = None
        self.private: Path | None = None
        self.guest_files: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.leaders: list[int] = []
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()

    def record(self, proc: subprocess.Popen[bytes]) -> None:
        """Remember a libvirtd this sandbox spawned, here and in the watchdog."""
        self.proc = proc
        self.leaders.append(proc.pid)
        if self.watchdog is not None and self.watchdog.stdin is not None:
            with contextlib.suppress(OSError):
                self.watchdog.stdin.write(b"%d\n" % proc.pid)
                self.watchdog.stdin.flush()

    def kill(self) -> bool:
        """SIGKILL libvirtd and reap it, as a crash would; False if it was not running."""
        with self.lock:
            proc, self.proc = self.proc, None
            if proc is None:
                return False
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            return True

    def cleanup(self) -> None:
        """Stop libvirtd (SIGTERM, then SIGKILL), end what it started, remove the folders."""
        with self.lock:
            proc, self.proc = self.proc, None
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                    proc.send_signal(signal.SIGCONT)  # a test may have stopped it (SIGSTOP)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            if self.root_fd is not None:
                os.close(self.root_fd)
                self.root_fd = None
            folders = [f for f in (self.root, self.private, self.guest_files) if f is not None]
            self.root = self.private = self.guest_files = None
            if folders:
                # What libvirtd forked and did not reap (a helper stopped between
                # fork and exec, seen when a start was cancelled) is in its session.
                _watchdog.reap([str(f) for f in folders], self.uid, self.leaders)
                for folder in folders:
                    if folder.exists():
                        warnings.warn(
                            f"could not remove sandbox folder {folder}", ResourceWarning, 2
                        )
            watchdog, self.watchdog = self.watchdog, None
            if watchdog is not None:
                assert watchdog.stdin is not None
                with contextlib.suppress(OSError):
                    watchdog.stdin.close()  # EOF: it finds the folders gone and exits
                try:
                    watchdog.wait(10)
                except subprocess.TimeoutExpired:
                    watchdog.kill()
                    watchdog.wait()

    def make_folders(self, tmp_dir: Path | None, user: str, *, full: bool) -> Path:
        """The daemon's folder (returned), the caller's private folder and, with
        ``full``, the guest files' folder; the watchdog that removes them."""
        uid, gid = self.uid, self.gid
        parents = [tmp_dir] if tmp_dir else [Path(tempfile.gettempdir()), Path("/tmp")]
        usable = [p for p in dict.fromkeys(parents) if p.is_dir() and traversable(p, uid, gid)]
        if not usable:
            raise SandboxError(
                f"user {user} cannot enter {parents[0]}: pass tmp_dir= a folder it can enter"
            )
        private = Path(tempfile.mkdtemp(prefix="aiovirtstream-owner-", dir=usable[0]))
        self.private = private
        root = Path(tempfile.mkdtemp(prefix="aiovirtstream-", dir=usable[0]))
        self.root = root
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        folders = [root, private]
        if full:
            # The test guest's kernel and initramfs: the caller's, the daemon's user
            # may only read them (root never writes in the daemon's folder for them).
            guest_files = Path(tempfile.mkdtemp(prefix="aiovirtstream-guest-", dir=usable[0]))
            self.guest_files = guest_files
            fd = os.open(guest_files, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchmod(fd, 0o755)
            finally:
                os.close(fd)
            folders.append(guest_files)
        self.watchdog = start_watchdog(folders, self.uid)
        sock = root / "run" / "libvirt" / "libvirt-sock"
        if len(os.fsencode(sock)) > SUN_PATH_MAX:
            raise SandboxError(f"socket path {sock} is too long for a unix socket: use tmp_dir=")
        return root


class DaemonFiles:
    """Reads files of a sandbox: those in the daemon's folder below its descriptor,
    without following links, and only regular files of the daemon's user."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self._daemon = daemon

    def read(self, path: Path, lines: int, offset: int | None = None) -> str:
        """The last ``lines`` lines (or all from ``offset``); '' if unreadable."""
        opened = self._open(path)
        if opened is None:
            return ""
        fd, uid = opened
        try:
            return read_regular(fd, uid, lines, offset)
        except OSError:
            return ""
        finally:
            os.close(fd)

    def size(self, path: Path) -> int:
        opened = self._open(path)
        if opened is None:
            return 0
        try:
            return os.fstat(opened[0]).st_size
        finally:
            os.close(opened[0])

    def _open(self, path: Path) -> tuple[int, int | None] | None:
        root, root_fd = self._daemon.root, self._daemon.root_fd
        try:
            if root_fd is not None and root is not None and path.is_relative_to(root):
                rel = path.relative_to(root).as_posix()
                return open_beneath(root_fd, rel, os.O_RDONLY | os.O_NONBLOCK), self._daemon.uid
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(path, flags), None
        except (OSError, ValueError):
            return None


def find_programs(
    libvirtd_arg: str | os.PathLike[str] | None, env_path: str, mode: str
) -> tuple[Path, Path]:
    """libvirtd and the driver folder, or DaemonNotInstalledError naming the package."""
    arg = os.fspath(libvirtd_arg) if libvirtd_arg is not None else "libvirtd"
    if os.sep in arg:
        found = arg if os.access(arg, os.X_OK) and os.path.isfile(arg) else None
    else:
        found = shutil.which(arg, path=env_path)
    if found is None:
        raise DaemonNotInstalledError(
            f"libvirtd not found ({arg!r}, PATH={env_path})", "libvirt-daemon"
        )
    libvirtd = Path(found).absolute()
    driver_dir = find_driver_dir(libvirtd)
    if driver_dir is None or not (driver_dir / "libvirt_driver_storage.so").exists():
        raise DaemonNotInstalledError(
            "libvirt's storage driver libvirt_driver_storage.so not found "
            f"(looked in {driver_dir or 'lib*/libvirt/connection-driver'})",
            "libvirt-daemon",
        )
    if mode == "full":
        if not (driver_dir / "libvirt_driver_qemu.so").exists():
            raise DaemonNotInstalledError(
                f"libvirt's qemu driver not found in {driver_dir}",
                "libvirt-daemon-driver-qemu",
            )
        if shutil.which("qemu-system-x86_64", path=env_path) is None:
            raise DaemonNotInstalledError(
                f"qemu-system-x86_64 not found (PATH={env_path})", "qemu-system-x86"
            )
    return libvirtd, driver_dir


def daemon_config(log_path: Path, pki: Path | None, port: int | None, client_dn: str) -> str:
    """libvirtd.conf: its log, and with ``pki`` a TLS listener on 127.0.0.1:``port``
    that takes only the client certificate named ``client_dn``."""
    lines = [f'log_outputs = "3:file:{log_path}"']
    if pki is not None:
        lines += [
            "listen_tcp = 0",
            "listen_tls = 1",
            'listen_addr = "127.0.0.1"',
            f'tls_port = "{port}"',
            'auth_tls = "none"',  # the client certificate is the authentication
            f'ca_file = "{pki / "cacert.pem"}"',
            f'cert_file = "{pki / "servercert.pem"}"',
            f'key_file = "{pki / "serverkey.pem"}"',
            "tls_no_verify_certificate = 0",
            f'tls_allowed_dn_list = ["{client_dn}"]',
        ]
    return "\n".join(lines) + "\n"


def write_config(root_fd: int, config: str, uid: int, gid: int) -> bool:
    """Write ``config/libvirt/libvirtd.conf`` below ``root_fd`` without following a
    link; False if what is there is not a plain file of its own (tampered with)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = open_beneath(root_fd, "config/libvirt/libvirtd.conf", flags, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return False
        os.write(fd, config.encode())
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)
        return True
    finally:
        os.close(fd)
