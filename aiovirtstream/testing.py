"""A private, unprivileged libvirt daemon for tests, the demo and users' test suites.

:class:`Sandbox` runs ``libvirtd`` in session mode in a fresh temporary folder,
with helpers for pools, volumes, a test guest and faults (docs/testing.md).
"""

from __future__ import annotations

__all__ = [
    "Sandbox",
    "SandboxMode",
    "TcpRelay",
    "PoolInfo",
    "VolumeInfo",
    "SandboxError",
    "DaemonNotInstalledError",
    "SandboxStartError",
    "GuestInfo",
    "GuestPackageMissingError",
    "guest_requirements_problem",
]

import contextlib
import functools
import os
import pwd
import re
import selectors
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal
from urllib.parse import urlsplit, urlunsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import anyio
import anyio.to_thread
import libvirt

from . import _testguest, _watchdog
from ._exceptions import SandboxError, map_libvirt_errors
from ._testguest import GuestPackageMissingError
from ._workqueue import run_to_the_end

SandboxMode = Literal["storage", "full"]

_LOG_TAIL_LINES = 40
_POLL_INTERVAL = 0.05
_PROBE_TIMEOUT = 5.0
_PORT_ATTEMPTS = 5
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_STANDARD_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


class DaemonNotInstalledError(SandboxError):
    """A program or driver module the sandbox needs is missing; ``package`` installs it."""

    def __init__(self, what: str, package: str) -> None:
        super().__init__(
            f"{what}; install the Debian package {package} "
            f"(apt-get install --no-install-recommends {package})"
        )
        self.package = package


class SandboxStartError(SandboxError):
    """libvirtd did not come up; the message ends with the tail of its log."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(f"{message}\n{log_tail}" if log_tail else message)
        self.log_tail = log_tail


@dataclass(frozen=True)
class PoolInfo:
    """A transient ``dir`` storage pool of a sandbox: its name and target folder."""

    name: str
    path: Path


@dataclass(frozen=True)
class VolumeInfo:
    """A volume of a sandbox pool. ``path`` is also the libvirt key of a dir-pool volume."""

    pool: str
    name: str
    path: Path
    capacity: int


@dataclass(frozen=True)
class GuestInfo:
    """A running test guest of a full-mode sandbox (:meth:`Sandbox.start_test_guest`).

    Its serial console upper-cases what it reads, its virtio-serial channel
    ``channel`` swaps the case of letters (:mod:`aiovirtstream._testguest`).
    """

    name: str
    uri: str
    tcp_uri: str | None
    channel: str
    channel_path: Path
    log_path: Path

    def __str__(self) -> str:
        return self.name


def guest_requirements_problem(*, libvirtd: str | os.PathLike[str] | None = None) -> str | None:
    """Why the test guest cannot boot here (a message naming the packages), or None.

    Checks libvirtd and its qemu driver, ``qemu-system-x86_64``, the kernel
    and its modules, and busybox, without starting anything.
    """
    problems = []
    try:
        Sandbox("full", libvirtd=libvirtd)._find_programs()
    except SandboxError as error:
        problems.append(str(error))
    try:
        _testguest.check_requirements()
    except GuestPackageMissingError as error:
        problems.append(str(error))
    return "; ".join(problems) or None


def _process_state(pid: int) -> bytes:
    """The state letter of /proc/PID/stat (b"R", b"S", b"T", b"Z", ...); b"" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return b""


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * lines))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _find_driver_dir(libvirtd: Path) -> Path | None:
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


def _traversable(path: Path, uid: int, gid: int) -> bool:
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


def _alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie (reparented zombies may never be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return bool(fields) and fields[0] != b"Z"


def _processes_using(folder: str, uid: int) -> list[int]:
    """Live processes of uid (but this one) whose command line or environment names folder.

    For tests and diagnostics only: the sandbox ends the processes it
    started by their pids (:mod:`aiovirtstream._watchdog`), never by name.
    """
    pattern = re.compile(re.escape(os.fsencode(folder)) + rb"(?![A-Za-z0-9_.-])")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as status:
                uids = [line.split()[1] for line in status if line.startswith(b"Uid:")]
            if uids != [str(uid).encode()]:
                continue
            for name in ("cmdline", "environ"):
                with contextlib.suppress(PermissionError):
                    with open(f"/proc/{entry}/{name}", "rb") as f:
                        if pattern.search(f.read()) and _alive(int(entry)):
                            found.append(int(entry))
                            break
        except OSError:
            continue  # it exited meanwhile
    return found


def _start_watchdog(folders: list[Path], uid: int) -> subprocess.Popen[bytes] | None:
    """A process that reaps the sandbox if this one dies without stopping it (SIGKILL, crash).

    It reads the pids of the sandbox's libvirtd processes from a pipe whose
    only writer is this process, until EOF.
    """
    if not sys.executable:
        return None
    package_parent = Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        [sys.executable, "-E", "-s", "-m", "aiovirtstream._watchdog", str(uid), *folders],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=package_parent,  # -m looks in the working folder first
        start_new_session=True,
    )


def _open_beneath(dir_fd: int, relpath: str, flags: int, mode: int = 0o600) -> int:
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


def _read_regular(fd: int, uid: int | None, lines: int, offset: int | None) -> str:
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


def _probe(uri: str, timeout: float) -> str | None:
    """Open uri and ask for the library version; None if it answered, else why not.

    virConnectOpen has no timeout of its own, so it runs in a daemon thread:
    one stuck on a hung daemon ends with an error when the daemon is killed.
    """
    outcome: list[str | None] = []

    def run() -> None:
        try:
            conn = libvirt.open(uri)
            try:
                conn.getLibVersion()
            finally:
                conn.close()
        except libvirt.libvirtError as error:
            outcome.append(error.get_error_message() or str(error))
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="aiovirtstream-sandbox-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


_SANDBOX_USER = "aiovirtstream-sandbox"
_CERT_DAYS = 30
_OPENSSL_CONFIG = """[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
[ext]
{extensions}
"""
_CA_EXTENSIONS = "basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign"
_LEAF_EXTENSIONS = (
    "basicConstraints = critical, CA:FALSE\n"
    "keyUsage = critical, digitalSignature, keyEncipherment\n"
    "extendedKeyUsage = {usage}\n"
)


def _openssl(work: Path, *args: str) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=work, capture_output=True, stdin=subprocess.DEVNULL, check=False
    )
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise SandboxError(f"openssl {args[0]} failed making the sandbox's certificates: {message}")


def _sandbox_user() -> str:
    """The dedicated user for root's sandboxes, made if missing; ``nobody`` if it cannot be."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(_SANDBOX_USER).pw_name
    useradd = shutil.which("useradd", path=os.pathsep.join(_STANDARD_PATH))
    if useradd is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [useradd, "--system", "--user-group", "--no-create-home",
                 "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                 "--comment", "aiovirtstream test sandboxes", _SANDBOX_USER],
                capture_output=True, stdin=subprocess.DEVNULL, timeout=30, check=False,
            )  # fmt: skip
    try:  # made now, or by a concurrent sandbox
        return pwd.getpwnam(_SANDBOX_USER).pw_name
    except KeyError:
        return "nobody"


def _make_certificates(work: Path, client_cn: str) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, in work.

    Leaves cacert.pem, servercert.pem, serverkey.pem, clientcert.pem and
    clientkey.pem (keys 0600); the CA's key is deleted once both are signed.
    """
    if shutil.which("openssl") is None:
        raise DaemonNotInstalledError("openssl not found (the TLS listener needs it)", "openssl")
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    leaves = {
        "ca": ("aiovirtstream sandbox CA", _CA_EXTENSIONS),
        "server": (
            "127.0.0.1",
            _LEAF_EXTENSIONS.format(usage="serverAuth")
            + "subjectAltName = IP:127.0.0.1, DNS:localhost",
        ),
        "client": (client_cn, _LEAF_EXTENSIONS.format(usage="clientAuth")),
    }
    for name, (cn, extensions) in leaves.items():
        (work / f"{name}.cnf").write_text(_OPENSSL_CONFIG.format(cn=cn, extensions=extensions))
    days = str(_CERT_DAYS)
    _openssl(work, "req", "-x509", "-config", "ca.cnf", "-extensions", "ext", *newkey,
             "-keyout", "cakey.pem", "-out", "cacert.pem", "-days", days)  # fmt: skip
    for serial, name in enumerate(("server", "client"), 1):
        _openssl(work, "req", "-new", "-config", f"{name}.cnf", *newkey,
                 "-keyout", f"{name}key.pem", "-out", f"{name}.csr")  # fmt: skip
        _openssl(work, "x509", "-req", "-in", f"{name}.csr", "-CA", "cacert.pem",
                 "-CAkey", "cakey.pem", "-set_serial", str(serial), "-days", days,
                 "-extfile", f"{name}.cnf", "-extensions", "ext",
                 "-out", f"{name}cert.pem")  # fmt: skip
    for leftover in ("cakey.pem", "ca.cnf", "server.cnf", "client.cnf", "server.csr", "client.csr"):
        (work / leftover).unlink()
    for key in ("serverkey.pem", "clientkey.pem"):
        (work / key).chmod(0o600)


class _Daemon:
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


class Sandbox:
    """An unprivileged libvirtd in session mode, all of its state in one temporary folder.

    Use it as a context manager, sync (``with``) or async (``async with``; the
    blocking parts run in worker threads), or call :meth:`start`/:meth:`stop`
    (:meth:`astart`/:meth:`astop`). On exit, also after an exception or a
    cancellation, the daemon is stopped, any QEMU or virtlogd it started is
    killed and the folder removed; if this process dies first (SIGKILL, crash)
    a small watchdog process does that. A sandbox is started once.

    * ``mode="storage"`` loads only the storage driver (starts in well under
      a second); ``mode="full"`` loads every driver, qemu included. Files
      given to guests must be readable by :attr:`daemon_user`;
      :meth:`start_test_guest` boots the test guest.
    * ``tcp=True`` adds a TLS listener on 127.0.0.1 that takes only the
      client certificate made for this sandbox, kept in :attr:`pki_path`
      (a folder only the caller may read): :attr:`tcp_uri`. Needs openssl.
    * As root the daemon runs as ``user`` (default: the system user
      ``aiovirtstream-sandbox``, made with useradd if missing, else
      ``nobody``) and its primary group; otherwise as the caller. Root reads
      files in the daemon's folder without following links.
    * ``libvirtd`` is the binary (a path, or a name looked up on
      ``env_path``); ``env_path`` is the daemon's PATH (default: the
      caller's plus the usual sbin folders).
    * ``tmp_dir`` is where the temporary folder is made; the daemon user must
      be able to enter it, and the socket path must fit in 107 bytes.

    For fault tests, :meth:`kill` crashes the daemon (SIGKILL) and
    :meth:`frozen` hangs it (SIGSTOP) for a block; :class:`TcpRelay` cuts
    TCP connections to it.
    """

    def __init__(
        self,
        mode: SandboxMode = "storage",
        *,
        tcp: bool = False,
        libvirtd: str | os.PathLike[str] | None = None,
        env_path: str | None = None,
        user: str | None = None,
        tmp_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if mode not in ("storage", "full"):
            raise ValueError(f"mode must be 'storage' or 'full', not {mode!r}")
        self.mode: SandboxMode = mode
        self.tcp = tcp
        self.start_timeout = start_timeout
        self._libvirtd_arg = libvirtd
        self._tmp_dir = Path(tmp_dir) if tmp_dir is not None else None
        if env_path is None:
            own = os.environ.get("PATH", "").split(os.pathsep)
            env_path = os.pathsep.join(dict.fromkeys([d for d in own if d] + list(_STANDARD_PATH)))
        self._env_path = env_path
        uid, gid, self._user = self._resolve_user(user)
        self._daemon = _Daemon(uid, gid, stop_timeout)
        self._finalizer = weakref.finalize(self, self._daemon.cleanup)
        self._started = False
        self._root: Path | None = None
        self._port: int | None = None
        self._port_attempts = 0
        self._libvirtd: Path | None = None
        self._spawn_offsets: dict[Path, int] = {}
        self._guest_lock = threading.Lock()
        self._guest_files_cache: _testguest.GuestFiles | None = None
        self._channel_dir: Path | None = None

    # --- properties -----------------------------------------------------------

    @property
    def path(self) -> Path:
        """The sandbox's temporary folder (it no longer exists once stopped)."""
        if self._root is None:
            raise SandboxError("the sandbox was not started")
        return self._root

    @property
    def socket_path(self) -> Path:
        """libvirtd's unix socket."""
        return self.path / "run" / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The URI over the unix socket: ``storage+unix:///session?socket=...`` or ``qemu+...``."""
        return f"{self._scheme}+unix:///session?socket={self.socket_path}"

    @property
    def tcp_port(self) -> int:
        """The loopback port of the TLS listener (only with ``tcp=True``)."""
        if not self.tcp:
            raise SandboxError("this sandbox has no TCP listener: create it with Sandbox(tcp=True)")
        if self._port is None:
            raise SandboxError("the sandbox was not started")
        return self._port

    @property
    def tcp_uri(self) -> str:
        """The URI of the loopback TLS listener, for the owner only.

        ``storage+tls://127.0.0.1:N/session?pkipath=P`` (``qemu+tls`` in full
        mode): libvirt's client takes the sandbox's CA and the client
        certificate and key from :attr:`pki_path`, a folder only the owner
        may read.
        """
        port = self.tcp_port
        return f"{self._scheme}+tls://127.0.0.1:{port}/session?pkipath={self.pki_path}"

    @property
    def pki_path(self) -> Path:
        """The owner's folder (0700) with cacert.pem, clientcert.pem and clientkey.pem."""
        if not self.tcp:
            raise SandboxError("this sandbox has no TCP listener: create it with Sandbox(tcp=True)")
        return self._private_path / "pki"

    @property
    def _private_path(self) -> Path:
        private = self._daemon.private
        if private is None:
            raise SandboxError("the sandbox was not started")
        return private

    @property
    def log_path(self) -> Path:
        """libvirtd's log file (warnings and errors), inside :attr:`path`."""
        return self.path / "libvirtd.log"

    @property
    def pid(self) -> int:
        """libvirtd's process id."""
        proc = self._daemon.proc
        if proc is None:
            raise SandboxError("the sandbox is not running")
        return proc.pid

    @property
    def daemon_user(self) -> str:
        """The user libvirtd (and any QEMU it starts) runs as."""
        return self._user

    @property
    def running(self) -> bool:
        """Whether libvirtd was started and not stopped yet (it may have crashed)."""
        return self._daemon.proc is not None

    @property
    def _scheme(self) -> str:
        return "storage" if self.mode == "storage" else "qemu"

    def __repr__(self) -> str:
        where = self._root if self._root is not None else "not started"
        return f"<Sandbox mode={self.mode} tcp={self.tcp} user={self._user} {where}>"

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of libvirtd's stderr and log, with headers; '' if both are empty."""
        if self._root is None:
            return ""
        parts = []
        for path in (self._stderr_path, self.log_path):
            text = self._read_file(path, lines)
            if text.strip():
                parts.append(f"--- {path} (last lines) ---\n{text}")
        return "\n".join(parts)

    @property
    def _stderr_path(self) -> Path:
        return self._private_path / "libvirtd.stderr"

    def _read_file(
        self, path: Path, lines: int = _LOG_TAIL_LINES, offset: int | None = None
    ) -> str:
        """The last lines of a file of the sandbox (or all from offset); '' if unreadable.

        A file in the daemon user's folder is opened below it without
        following links and read only if it is a regular file of that user.
        """
        opened = self._open_file(path)
        if opened is None:
            return ""
        fd, uid = opened
        try:
            return _read_regular(fd, uid, lines, offset)
        except OSError:
            return ""
        finally:
            os.close(fd)

    def _file_size(self, path: Path) -> int:
        opened = self._open_file(path)
        if opened is None:
            return 0
        try:
            return os.fstat(opened[0]).st_size
        finally:
            os.close(opened[0])

    def _open_file(self, path: Path) -> tuple[int, int | None] | None:
        root_fd = self._daemon.root_fd
        try:
            if root_fd is not None and self._root is not None and path.is_relative_to(self._root):
                rel = path.relative_to(self._root).as_posix()
                return _open_beneath(root_fd, rel, os.O_RDONLY | os.O_NONBLOCK), self._daemon.uid
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(path, flags), None
        except (OSError, ValueError):
            return None

    # --- start and stop -------------------------------------------------------

    def start(self) -> None:
        """Start libvirtd and wait until it answers; on failure clean up and raise."""
        self._claim()
        try:
            self._begin()
            deadline = time.monotonic() + self.start_timeout
            while not self._check_ready(deadline):
                time.sleep(_POLL_INTERVAL)
        except BaseException:
            self.stop()
            raise

    async def astart(self) -> None:
        """:meth:`start` without blocking the event loop; cleans up when cancelled."""
        self._claim()
        try:
            await run_to_the_end(self._begin)
            deadline = time.monotonic() + self.start_timeout
            while True:
                if await run_to_the_end(functools.partial(self._check_ready, deadline)):
                    break
                await anyio.sleep(_POLL_INTERVAL)
        except BaseException:
            await self.astop()
            raise

    def stop(self) -> None:
        """Stop libvirtd and everything it started, remove the folder. Idempotent."""
        self._finalizer()

    async def astop(self) -> None:
        """:meth:`stop` in a worker thread, shielded from cancellation."""
        with anyio.CancelScope(shield=True):
            await run_to_the_end(self._finalizer)

    # --- faults: a crashed or a hung daemon ---------------------------------

    def kill(self) -> None:
        """SIGKILL libvirtd and reap it: what its clients see when the host dies.

        Returns once the daemon is gone (its connections' sockets end); the
        sandbox is then not :attr:`running`. QEMU processes it started keep
        running, as after a real crash, until :meth:`stop`, which also removes
        the folder (it is needed: a killed sandbox does not start again).
        Raises :class:`SandboxError` if the daemon is not running.
        """
        if not self._daemon.kill():
            raise SandboxError(f"{self!r} is not running: nothing to kill")

    def freeze(self) -> None:
        """SIGSTOP libvirtd: it keeps its connections open but answers nothing.

        Returns once the daemon is stopped. Clients notice only through their
        keepalive (``aiovirtstream.connect(..., keepalive=(interval, count))``
        gives up after about ``interval * (count + 1)`` seconds). Undo with
        :meth:`thaw`; :meth:`stop` thaws it too. Prefer :meth:`frozen`.
        """
        pid = self.pid
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + _PROBE_TIMEOUT
        while _process_state(pid) not in (b"T", b"t") and time.monotonic() < deadline:
            time.sleep(0.001)

    def thaw(self) -> None:
        """SIGCONT libvirtd after :meth:`freeze`; a no-op if it runs or was killed."""
        proc = self._daemon.proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """:meth:`freeze` for the block; :meth:`thaw` on exit, whatever happens.

        A sync context manager: ``with sb.frozen():`` in sync and async code.
        """
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Sandbox:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    # --- internals of start ---------------------------------------------------

    @staticmethod
    def _resolve_user(user: str | None) -> tuple[int, int, str]:
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid())
            if user not in (None, me.pw_name):
                raise SandboxError(f"only root can run the sandbox as {user!r}")
            return me.pw_uid, os.getegid(), me.pw_name
        name = user or _sandbox_user()
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SandboxError(f"no user {name!r} to run the sandbox's libvirtd as") from None
        if entry.pw_uid == 0:
            # A root libvirtd takes machine-wide pid locks under /run/libvirt
            # (a second one fails): only unprivileged daemons coexist.
            raise SandboxError("the sandbox's libvirtd must not run as root")
        return entry.pw_uid, entry.pw_gid, name

    def _find_programs(self) -> tuple[Path, Path]:
        """libvirtd and the driver folder, or DaemonNotInstalledError naming the package."""
        arg = os.fspath(self._libvirtd_arg) if self._libvirtd_arg is not None else "libvirtd"
        if os.sep in arg:
            found = arg if os.access(arg, os.X_OK) and os.path.isfile(arg) else None
        else:
            found = shutil.which(arg, path=self._env_path)
        if found is None:
            raise DaemonNotInstalledError(
                f"libvirtd not found ({arg!r}, PATH={self._env_path})", "libvirt-daemon"
            )
        libvirtd = Path(found).absolute()
        driver_dir = _find_driver_dir(libvirtd)
        if driver_dir is None or not (driver_dir / "libvirt_driver_storage.so").exists():
            raise DaemonNotInstalledError(
                "libvirt's storage driver libvirt_driver_storage.so not found "
                f"(looked in {driver_dir or 'lib*/libvirt/connection-driver'})",
                "libvirt-daemon",
            )
        if self.mode == "full":
            if not (driver_dir / "libvirt_driver_qemu.so").exists():
                raise DaemonNotInstalledError(
                    f"libvirt's qemu driver not found in {driver_dir}",
                    "libvirt-daemon-driver-qemu",
                )
            if shutil.which("qemu-system-x86_64", path=self._env_path) is None:
                raise DaemonNotInstalledError(
                    f"qemu-system-x86_64 not found (PATH={self._env_path})", "qemu-system-x86"
                )
        return libvirtd, driver_dir

    def _make_root(self) -> Path:
        uid, gid = self._daemon.uid, self._daemon.gid
        parents = [self._tmp_dir] if self._tmp_dir else [Path(tempfile.gettempdir()), Path("/tmp")]
        usable = [p for p in dict.fromkeys(parents) if p.is_dir() and _traversable(p, uid, gid)]
        if not usable:
            raise SandboxError(
                f"user {self._user} cannot enter {parents[0]}: pass tmp_dir= a folder it can enter"
            )
        private = Path(tempfile.mkdtemp(prefix="aiovirtstream-owner-", dir=usable[0]))
        self._daemon.private = private
        root = Path(tempfile.mkdtemp(prefix="aiovirtstream-", dir=usable[0]))
        self._daemon.root = root
        self._daemon.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        folders = [root, private]
        if self.mode == "full":
            # The test guest's kernel and initramfs: the caller's, the daemon's user
            # may only read them (root never writes in the daemon's folder for them).
            guest_files = Path(tempfile.mkdtemp(prefix="aiovirtstream-guest-", dir=usable[0]))
            self._daemon.guest_files = guest_files
            fd = os.open(guest_files, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchmod(fd, 0o755)
            finally:
                os.close(fd)
            folders.append(guest_files)
        self._daemon.watchdog = _start_watchdog(folders, self._daemon.uid)
        sock = root / "run" / "libvirt" / "libvirt-sock"
        if len(os.fsencode(sock)) > _SUN_PATH_MAX:
            raise SandboxError(f"socket path {sock} is too long for a unix socket: use tmp_dir=")
        return root

    def _claim(self) -> None:
        if self._started:
            raise SandboxError("a Sandbox can be started only once; create a new one")
        self._started = True

    def _begin(self) -> None:
        """Check the programs, make and populate the folder, spawn libvirtd."""
        self._libvirtd, driver_dir = self._find_programs()
        root = self._root = self._make_root()
        for sub in ("run", "config/libvirt", "cache", "data", "pools"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        if self.mode == "storage":
            (root / "drivers").mkdir()
            (root / "drivers" / "libvirt_driver_storage.so").symlink_to(
                driver_dir / "libvirt_driver_storage.so"
            )
        self._stderr_path.touch(0o600)
        if self.tcp:
            self._make_pki(root)
        root.chmod(0o700)
        if os.geteuid() == 0:
            # The folder itself last: until then its new owner cannot enter it.
            for folder, dirs, files in os.walk(root, topdown=False):
                for name in [*dirs, *files, *(["."] if folder != str(root) else [])]:
                    os.lchown(os.path.join(folder, name), self._daemon.uid, self._daemon.gid)
            os.lchown(root, self._daemon.uid, self._daemon.gid)
        self._spawn()

    def _make_pki(self, root: Path) -> None:
        """Certificates for the TLS listener: the server's in root/pki, the client's private."""
        pki = self.pki_path
        pki.mkdir(mode=0o700)
        _make_certificates(pki, self._client_dn.removeprefix("CN="))
        (root / "pki").mkdir(mode=0o700)
        for name in ("servercert.pem", "serverkey.pem"):
            os.replace(pki / name, root / "pki" / name)
        shutil.copyfile(pki / "cacert.pem", root / "pki" / "cacert.pem")

    @property
    def _client_dn(self) -> str:
        return f"CN=aiovirtstream-client-{self._private_path.name}"

    def _write_config(self) -> None:
        lines = [f'log_outputs = "3:file:{self.log_path}"']
        if self.tcp:
            self._port = _free_port()
            pki = self.path / "pki"
            lines += [
                "listen_tcp = 0",
                "listen_tls = 1",
                'listen_addr = "127.0.0.1"',
                f'tls_port = "{self._port}"',
                'auth_tls = "none"',  # the client certificate is the authentication
                f'ca_file = "{pki / "cacert.pem"}"',
                f'cert_file = "{pki / "servercert.pem"}"',
                f'key_file = "{pki / "serverkey.pem"}"',
                "tls_no_verify_certificate = 0",
                f'tls_allowed_dn_list = ["{self._client_dn}"]',
            ]
        # The daemon's user owns the folder (and may have run already): no link is followed.
        assert self._daemon.root_fd is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = _open_beneath(self._daemon.root_fd, "config/libvirt/libvirtd.conf", flags, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise SandboxError(f"{self.path}/config/libvirt/libvirtd.conf was tampered with")
            os.write(fd, ("\n".join(lines) + "\n").encode())
            if os.geteuid() == 0:
                os.fchown(fd, self._daemon.uid, self._daemon.gid)
        finally:
            os.close(fd)

    def _spawn(self) -> None:
        assert self._libvirtd is not None
        self._write_config()
        self._port_attempts += 1
        root = self.path
        self._spawn_offsets = {
            path: self._file_size(path) for path in (self._stderr_path, self.log_path)
        }
        env = {
            "PATH": self._env_path,
            "HOME": str(root),
            "XDG_RUNTIME_DIR": str(root / "run"),
            "XDG_CONFIG_HOME": str(root / "config"),
            "XDG_CACHE_HOME": str(root / "cache"),
            "XDG_DATA_HOME": str(root / "data"),
        }
        if self.mode == "storage":
            # libvirtd loads only the modules in LIBVIRT_DRIVER_DIR: storage-only
            # daemons start in about a second.
            env["LIBVIRT_DRIVER_DIR"] = str(root / "drivers")
        as_root = os.geteuid() == 0
        stderr: IO[bytes]
        with open(self._stderr_path, "ab") as stderr:
            proc = subprocess.Popen(
                [str(self._libvirtd), *(["--listen"] if self.tcp else [])],
                env=env,
                cwd=root,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=self._daemon.uid if as_root else None,
                group=self._daemon.gid if as_root else None,
                extra_groups=[] if as_root else None,
            )
        self._daemon.record(proc)

    def _output_since_spawn(self) -> str:
        return "\n".join(self._read_file(p, 0, off) for p, off in self._spawn_offsets.items())

    def _fail(self, message: str) -> SandboxStartError:
        return SandboxStartError(f"libvirtd of {self!r} {message}", self.log_tail())

    def _check_ready(self, deadline: float) -> bool:
        """One poll: True once libvirtd answers; raises if it died or the time is up."""
        proc = self._daemon.proc
        if proc is None:
            raise SandboxError("the sandbox was stopped while starting")
        code = proc.poll()
        if code is not None:
            if (
                self.tcp
                and "Address already in use" in self._output_since_spawn()
                and self._port_attempts < _PORT_ATTEMPTS
            ):
                self._spawn()  # someone took the free port we picked: pick another
                return False
            raise self._fail(f"exited with status {code} while starting")
        error: str | None
        if not self.socket_path.exists():
            error = "its socket does not exist yet"
        else:
            error = _probe(self.uri, _PROBE_TIMEOUT)
            if error is not None and "no connection driver available" in error:
                raise self._fail(
                    f"has no driver for {self.uri} ({error}): is libvirt-daemon"
                    f"{'-driver-qemu' if self.mode == 'full' else ''} installed?"
                )
            if error is None and self.tcp:
                error = _probe(self.tcp_uri, _PROBE_TIMEOUT)
            if error is None:
                return True
        if time.monotonic() > deadline:
            raise self._fail(f"did not answer within {self.start_timeout:g} s: {error}")
        return False

    # --- helpers: pools and volumes -------------------------------------------

    @contextlib.contextmanager
    def connect(self, *, tcp: bool = False) -> Iterator[libvirt.virConnect]:
        """A plain blocking connection, closed on exit: for set-up, not for streams.

        libvirt reads a connection's stream events only if an event
        implementation was registered before it was opened; use
        :func:`aiovirtstream.connect` with :attr:`uri` for streams.
        """
        with map_libvirt_errors(context=f"connect to the sandbox {self.path}"):
            conn = libvirt.open(self.tcp_uri if tcp else self.uri)
        try:
            yield conn
        finally:
            conn.close()

    def create_pool(self, name: str = "pool") -> PoolInfo:
        """Create (and build) a transient dir pool with its folder in the sandbox."""
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"pool name {name!r}: use letters, digits and _.+-")
        target = self.path / "pools" / name
        xml = (
            f"<pool type='dir'><name>{escape(name)}</name>"
            f"<target><path>{escape(str(target))}</path></target></pool>"
        )
        with self.connect() as conn, map_libvirt_errors(context=f"create pool {name!r}"):
            conn.storagePoolCreateXML(xml, libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
        return PoolInfo(name, target)

    def create_volume(self, pool: PoolInfo | str, name: str, capacity: int) -> VolumeInfo:
        """Create a sparse raw volume of capacity bytes (allocation 0) in pool."""
        pool_name = pool.name if isinstance(pool, PoolInfo) else pool
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"volume name {name!r}: use letters, digits and _.+-")
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        xml = (
            f"<volume><name>{escape(name)}</name>"
            f"<capacity unit='bytes'>{capacity}</capacity>"
            "<allocation unit='bytes'>0</allocation>"
            "<target><format type='raw'/></target></volume>"
        )
        context = f"create volume {name!r} in pool {pool_name!r}"
        with self.connect() as conn, map_libvirt_errors(context=context):
            vol = conn.storagePoolLookupByName(pool_name).createXML(xml, 0)
            return VolumeInfo(pool_name, name, Path(vol.path()), capacity)

    def delete_pool(self, pool: PoolInfo | str) -> None:
        """Delete the pool's volumes, destroy it and remove its folder; no-op if it is gone."""
        pool_name = pool.name if isinstance(pool, PoolInfo) else pool
        with self.connect() as conn, map_libvirt_errors(context=f"delete pool {pool_name!r}"):
            try:
                handle = conn.storagePoolLookupByName(pool_name)
            except libvirt.libvirtError as error:
                if error.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                    return
                raise
            target = Path(ElementTree.fromstring(handle.XMLDesc(0)).findtext("target/path", ""))
            persistent = handle.isPersistent()
            if handle.isActive():
                for vol in handle.listAllVolumes(0):
                    vol.delete(0)
                handle.destroy()
            if persistent:
                handle.undefine()
        if target.is_relative_to(self.path):
            shutil.rmtree(target, ignore_errors=True)

    async def acreate_pool(self, name: str = "pool") -> PoolInfo:
        """:meth:`create_pool` in a worker thread."""
        return await anyio.to_thread.run_sync(self.create_pool, name)

    async def acreate_volume(self, pool: PoolInfo | str, name: str, capacity: int) -> VolumeInfo:
        """:meth:`create_volume` in a worker thread."""
        return await anyio.to_thread.run_sync(self.create_volume, pool, name, capacity)

    async def adelete_pool(self, pool: PoolInfo | str) -> None:
        """:meth:`delete_pool` in a worker thread."""
        await anyio.to_thread.run_sync(self.delete_pool, pool)

    # --- helpers: the test guest (full mode) ----------------------------------

    def _guest_files(self) -> _testguest.GuestFiles:
        """Kernel and initramfs, built once per sandbox into the caller's guest-files folder.

        That folder (beside :attr:`path`, 0755) is the caller's: the daemon's
        user may read it but not change it, so root never writes, chmods or
        chowns in a folder that user controls. Files are written below its
        descriptor, without following links.
        """
        with self._guest_lock:
            if self._guest_files_cache is None:
                folder = self._daemon.guest_files
                if folder is None:
                    raise SandboxError(f"{self!r} is not running")
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(folder, flags)
                try:
                    st = os.fstat(fd)
                    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                        raise SandboxError(f"{folder} was tampered with")
                    files = _testguest.prepare_guest_files(folder, dir_fd=fd)
                finally:
                    os.close(fd)
                self._guest_files_cache = files
            return self._guest_files_cache

    def _channels_folder(self) -> Path:
        """``<path>/guests``, where QEMU (the daemon's user) binds the channels' sockets.

        Made below the descriptor of the daemon's folder and, as root, given to
        the daemon's user through a descriptor of its own: no link is followed.
        A ``guests`` that is not a folder (a planted link) is a SandboxError.
        """
        with self._guest_lock:
            if self._channel_dir is not None:
                return self._channel_dir
            root_fd = self._daemon.root_fd
            if root_fd is None:
                raise SandboxError(f"{self!r} is not running")
            folder = self.path / "guests"
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

    def start_test_guest(self, name: str = "guest", *, ready_timeout: float = 60.0) -> GuestInfo:
        """Boot the tiny test guest as a transient domain; return once it answers.

        Full mode only. The guest (:mod:`aiovirtstream._testguest`: TCG, no
        KVM, about 2 s to boot) has a pty serial console that upper-cases what
        it reads and a virtio-serial channel that swaps letters' case. Its
        kernel and initramfs are built (once per sandbox) into a folder of the
        caller's beside :attr:`path` that the daemon's user may only read; its
        channel's socket is ``<path>/guests/<name>.chan``; its display is VNC
        on a unix socket (no TCP port for concurrent daemons to race for). The ready
        marker is consumed here: the console opened next shows only answers.
        Raises :class:`GuestPackageMissingError` naming a missing package, or
        :class:`SandboxError` with the guest's console output and log if it
        did not come up within ``ready_timeout`` seconds.
        """
        if self.mode != "full":
            raise SandboxError("test guests need a full-mode sandbox: Sandbox('full')")
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"guest name {name!r}: use letters, digits and _.+-")
        files = self._guest_files()
        channel_path = self._channels_folder() / f"{name}.chan"
        if len(os.fsencode(channel_path)) > _SUN_PATH_MAX:
            raise SandboxError(f"channel socket path {channel_path} is too long: use tmp_dir=")
        xml = _testguest.domain_xml(
            name, files.kernel, files.initrd, graphics="vnc-socket", channel_path=channel_path
        )
        log_path = self.path / "cache" / "libvirt" / "qemu" / "log" / f"{name}.log"
        with self.connect() as conn:
            with map_libvirt_errors(context=f"start test guest {name!r}"):
                dom = conn.createXML(xml, 0)
            try:
                _wait_for_ready_marker(conn, dom, ready_timeout)
            except BaseException as error:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                if isinstance(error, _GuestNotReadyError):
                    log = self._read_file(log_path)
                    raise SandboxError(
                        f"test guest {name!r} of {self!r} {error}\n--- {log_path} ---\n{log}"
                    ) from None
                raise
        return GuestInfo(
            name=name,
            uri=self.uri,
            tcp_uri=self.tcp_uri if self.tcp else None,
            channel=_testguest.DEFAULT_CHANNEL_NAME,
            channel_path=channel_path,
            log_path=log_path,
        )

    def stop_test_guest(self, guest: GuestInfo | str, *, wait: bool = True) -> None:
        """Stop the guest (a transient domain: it is gone then); no-op if it is not running.

        ``wait=True`` destroys it through libvirt and returns once libvirt
        saw QEMU go (here up to 2 s: libvirt polls every 200 ms until the
        process is reaped). ``wait=False`` SIGKILLs the guest's QEMU (found
        by its pid file in the sandbox) and returns at once; libvirtd notices
        and removes the domain in the background. Open streams of the guest
        end either way.
        """
        name = str(guest)
        if not wait and self._kill_guest_qemu(name):
            return
        with self.connect() as conn, map_libvirt_errors(context=f"stop test guest {name!r}"):
            try:
                conn.lookupByName(name).destroy()
            except libvirt.libvirtError as error:
                if error.get_error_code() not in (
                    libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_OPERATION_INVALID,
                ):
                    raise

    def _kill_guest_qemu(self, name: str) -> bool:
        """SIGKILL the QEMU of domain ``name`` of this sandbox; False if it was not found."""
        pid_file = self.path / "run" / "libvirt" / "qemu" / "run" / f"{name}.pid"
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
        if os.fsencode(self.path) not in cmdline:
            return False
        _watchdog.kill_process(pid, self._daemon.uid)
        return True

    async def astart_test_guest(
        self, name: str = "guest", *, ready_timeout: float = 60.0
    ) -> GuestInfo:
        """:meth:`start_test_guest` in a worker thread."""
        start = functools.partial(self.start_test_guest, name, ready_timeout=ready_timeout)
        return await run_to_the_end(start)

    async def astop_test_guest(self, guest: GuestInfo | str, *, wait: bool = True) -> None:
        """:meth:`stop_test_guest` in a worker thread."""
        await run_to_the_end(functools.partial(self.stop_test_guest, guest, wait=wait))


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
            while _testguest.READY_MARKER not in seen:
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


_RELAY_CHUNK = 256 * 1024
_RELAY_BUFFER = 1 << 20  # per direction: a side is not read while this much waits for the other


class _Link:
    """One relayed connection: the client's socket, the target's, a buffer towards each."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.peer = {client: upstream, upstream: client}
        self.out = {client: bytearray(), upstream: bytearray()}  # bytes to write to the socket
        self.read_done = {client: False, upstream: False}
        self.registered: dict[socket.socket, int] = {}
        self.closed = False

    def close(self, selector: selectors.BaseSelector, *, reset: bool = False) -> None:
        self.closed = True
        for sock in self.peer:
            if self.registered.pop(sock, 0):
                selector.unregister(sock)
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


class TcpRelay:
    """A loopback TCP relay that can cut its connections: a network fault for tests.

    It listens on ``127.0.0.1`` (a free port: :attr:`port`) and forwards each
    connection to ``host:port``, in a thread of its own, so it serves sync
    and async tests alike and never waits for the test's event loop.
    :meth:`cut` closes every connection relayed so far, both sides at once,
    as a broken network would end them; later connections are relayed again::

        with Sandbox(tcp=True) as sb, TcpRelay("127.0.0.1", sb.tcp_port) as relay:
            conn = await aiovirtstream.connect(relay.uri_for(sb.tcp_uri))
            ...
            relay.cut()  # the connection's streams fail with ConnectionLostError

    Use it as a context manager or call :meth:`start` and :meth:`close`.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener: socket.socket | None = None
        self._address: tuple[str, int] | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._commands: list[tuple[str, bool, threading.Event, list[int]]] = []
        self._commands_lock = threading.Lock()
        self._links: list[_Link] = []
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where the relay listens: ``("127.0.0.1", port)``."""
        if self._address is None:
            raise RuntimeError("the relay was not started")
        return self._address

    @property
    def port(self) -> int:
        """The port the relay listens on."""
        return self.address[1]

    @property
    def connections(self) -> int:
        """How many relayed connections are open now."""
        return len(self._links)

    def uri_for(self, uri: str) -> str:
        """``uri`` (e.g. a sandbox's :attr:`~Sandbox.tcp_uri`) with its host and port the relay's.

        Raises ValueError if ``uri`` does not name the relay's target port.
        """
        parts = urlsplit(uri)
        if parts.port != self.target[1]:
            raise ValueError(f"{uri!r} does not go to port {self.target[1]}, the relay's target")
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@" if user else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{self.port}"))

    def start(self) -> None:
        """Listen and start relaying (once)."""
        if self._listener is not None:
            raise RuntimeError("the relay was started already")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        self._wake_r.setblocking(False)
        self._listener = listener
        self._address = ("127.0.0.1", listener.getsockname()[1])
        self._thread = threading.Thread(
            target=self._run, name=f"aiovirtstream-relay-{self.port}", daemon=True
        )
        self._thread.start()

    def cut(self, *, reset: bool = False) -> int:
        """Close every relayed connection, client and target side; return how many.

        Returns once they are closed. With ``reset`` they end with a TCP
        reset (ECONNRESET) rather than an orderly end of file.
        """
        return self._command("cut", reset)

    def close(self) -> None:
        """Cut every connection, stop listening and end the thread. Idempotent."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._command("close", False)
            thread.join()
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> TcpRelay:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"127.0.0.1:{self.port}" if self._address is not None else "not started"
        return f"<TcpRelay {where} -> {self.target[0]}:{self.target[1]}>"

    def _command(self, name: str, reset: bool) -> int:
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"{self!r} is not running")
        done, result = threading.Event(), [0]
        with self._commands_lock:
            self._commands.append((name, reset, done, result))
        self._wake_w.send(b"\0")
        if not done.wait(10):
            raise RuntimeError(f"{self!r} did not answer {name}")
        return result[0]

    # --- the relay's thread ---------------------------------------------------

    def _run(self) -> None:
        assert self._listener is not None
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, None)
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while True:
                for key, mask in selector.select():
                    if key.fileobj is self._listener:
                        self._accept(selector)
                    elif key.fileobj is self._wake_r:
                        if not self._serve_commands(selector):
                            return
                    else:
                        link, sock = key.data
                        if not link.closed:  # an earlier event of this batch closed it
                            self._pump(selector, link, sock, mask)
        finally:
            for link in self._links:
                link.close(selector)
            self._links.clear()
            selector.close()

    def _serve_commands(self, selector: selectors.BaseSelector) -> bool:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        with self._commands_lock:
            commands, self._commands = self._commands, []
        running = True
        for name, reset, done, result in commands:
            result[0] = len(self._links)
            for link in self._links:
                link.close(selector, reset=reset)
            self._links.clear()
            running = running and name != "close"
            done.set()
        return running

    def _accept(self, selector: selectors.BaseSelector) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()  # the target refuses: so does the relay
                continue
            link = _Link(client, upstream)
            for sock in (client, upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._links.append(link)
            self._update(selector, link)

    def _pump(
        self, selector: selectors.BaseSelector, link: _Link, sock: socket.socket, mask: int
    ) -> None:
        peer = link.peer[sock]
        try:
            if mask & selectors.EVENT_READ:
                data = sock.recv(_RELAY_CHUNK)
                if data:
                    link.out[peer] += data
                else:
                    link.read_done[sock] = True
                    if not link.out[peer]:
                        peer.shutdown(socket.SHUT_WR)
            if mask & selectors.EVENT_WRITE and link.out[sock]:
                sent = sock.send(link.out[sock])
                del link.out[sock][:sent]
                if not link.out[sock] and link.read_done[peer]:
                    sock.shutdown(socket.SHUT_WR)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # one side reset: so is the other
            link.close(selector, reset=True)
            self._links.remove(link)
            return
        if all(link.read_done.values()) and not any(link.out.values()):
            link.close(selector)
            self._links.remove(link)
            return
        self._update(selector, link)

    @staticmethod
    def _update(selector: selectors.BaseSelector, link: _Link) -> None:
        """Read a side while its peer's buffer has room, write it while it has bytes waiting."""
        for sock, peer in link.peer.items():
            events = selectors.EVENT_WRITE if link.out[sock] else 0
            if not link.read_done[sock] and len(link.out[peer]) < _RELAY_BUFFER:
                events |= selectors.EVENT_READ
            registered = link.registered.get(sock, 0)
            if events == registered:
                continue
            if not registered:
                selector.register(sock, events, (link, sock))
            elif not events:
                selector.unregister(sock)
            else:
                selector.modify(sock, events, (link, sock))
            link.registered[sock] = events
