"""The sandbox: a private, unprivileged libvirtd and its helpers."""

from __future__ import annotations

__all__ = [
    "Sandbox",
    "guest_requirements_problem",
]

import contextlib
import functools
import os
import pwd
import shutil
import signal
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import anyio
import anyio.to_thread
import libvirt

from .._exceptions import (
    GuestPackageMissingError,
    SandboxError,
    map_libvirt_errors,
)
from .._workers import run_to_the_end
from . import _guest
from ._certs import default_path, sandbox_user
from ._daemon import DaemonFiles, DaemonProcess, find_programs
from ._guests import NAME_RE, TestGuests
from ._launch import DaemonLaunch
from ._processes import process_state
from ._records import GuestInfo, PoolInfo, SandboxMode, VolumeInfo
from ._storage import pool_xml, remove_pool, volume_xml

#: Lines of libvirtd's stderr and log in an error's message.
_LOG_TAIL_LINES = 40
#: Seconds between two checks of a starting daemon.
_POLL_INTERVAL = 0.05
#: Seconds :meth:`Sandbox.freeze` waits for the daemon to stop.
_FREEZE_TIMEOUT = 5.0


def guest_requirements_problem(*, libvirtd: str | os.PathLike[str] | None = None) -> str | None:
    """Why the test guest cannot boot here (a message naming the packages), or None.

    Checks libvirtd and its qemu driver, ``qemu-system-x86_64``, the kernel
    and its modules, and busybox, without starting anything.
    """
    problems = []
    try:
        find_programs(libvirtd, default_path(), "full")
    except SandboxError as error:
        problems.append(str(error))
    try:
        _guest.check_requirements()
    except GuestPackageMissingError as error:
        problems.append(str(error))
    return "; ".join(problems) or None


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
        uid, gid, self._user = self._resolve_user(user)
        self._daemon = DaemonProcess(uid, gid, stop_timeout)
        self._finalizer = weakref.finalize(self, self._daemon.cleanup)
        self._started = False
        self._root: Path | None = None
        self._files = DaemonFiles(self._daemon)
        self._launch = DaemonLaunch(
            self,
            self._daemon,
            self._files,
            libvirtd=libvirtd,
            env_path=env_path if env_path is not None else default_path(),
            tmp_dir=Path(tmp_dir) if tmp_dir is not None else None,
            user=self._user,
        )
        self._guests = TestGuests(self, self._daemon, self.read_file)

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
        if self._launch.port is None:
            raise SandboxError("the sandbox was not started")
        return self._launch.port

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
        for path in (self._launch.stderr_path, self.log_path):
            text = self.read_file(path, lines)
            if text.strip():
                parts.append(f"--- {path} (last lines) ---\n{text}")
        return "\n".join(parts)

    def read_file(self, path: Path, lines: int = _LOG_TAIL_LINES, offset: int | None = None) -> str:
        """The last ``lines`` lines of a file of the sandbox (or all of it from
        ``offset``); '' if it cannot be read.

        A file in the daemon user's folder is opened below it without
        following links, and read only if it is a regular file of that user:
        safe as root on a folder another user controls.
        """
        return self._files.read(path, lines, offset)

    # --- start and stop -------------------------------------------------------

    def start(self) -> None:
        """Start libvirtd and wait until it answers; on failure clean up and raise."""
        self._claim()
        try:
            self._begin()
            deadline = time.monotonic() + self.start_timeout
            while not self._launch.check_ready(deadline):
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
                if await run_to_the_end(functools.partial(self._launch.check_ready, deadline)):
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
        deadline = time.monotonic() + _FREEZE_TIMEOUT
        while process_state(pid) not in (b"T", b"t") and time.monotonic() < deadline:
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
        name = user or sandbox_user()
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SandboxError(f"no user {name!r} to run the sandbox's libvirtd as") from None
        if entry.pw_uid == 0:
            # A root libvirtd takes machine-wide pid locks under /run/libvirt
            # (a second one fails): only unprivileged daemons coexist.
            raise SandboxError("the sandbox's libvirtd must not run as root")
        return entry.pw_uid, entry.pw_gid, name

    def _claim(self) -> None:
        if self._started:
            raise SandboxError("a Sandbox can be started only once; create a new one")
        self._started = True

    def _begin(self) -> None:
        self._root = self._launch.begin()
        self._launch.spawn()

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
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"pool name {name!r}: use letters, digits and _.+-")
        target = self.path / "pools" / name
        with self.connect() as conn, map_libvirt_errors(context=f"create pool {name!r}"):
            conn.storagePoolCreateXML(
                pool_xml(name, target), libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD
            )
        return PoolInfo(name, target)

    def create_volume(self, pool: PoolInfo | str, name: str, capacity: int) -> VolumeInfo:
        """Create a sparse raw volume of capacity bytes (allocation 0) in pool."""
        pool_name = pool.name if isinstance(pool, PoolInfo) else pool
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"volume name {name!r}: use letters, digits and _.+-")
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        context = f"create volume {name!r} in pool {pool_name!r}"
        with self.connect() as conn, map_libvirt_errors(context=context):
            vol = conn.storagePoolLookupByName(pool_name).createXML(volume_xml(name, capacity), 0)
            return VolumeInfo(pool_name, name, Path(vol.path()), capacity)

    def delete_pool(self, pool: PoolInfo | str) -> None:
        """Delete the pool's volumes, destroy it and remove its folder; no-op if it is gone."""
        pool_name = pool.name if isinstance(pool, PoolInfo) else pool
        with self.connect() as conn, map_libvirt_errors(context=f"delete pool {pool_name!r}"):
            target = remove_pool(conn, pool_name)
        if target is not None and target.is_relative_to(self.path):
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

    def start_test_guest(self, name: str = "guest", *, ready_timeout: float = 60.0) -> GuestInfo:
        """Boot the tiny test guest as a transient domain; return once it answers.

        Full mode only. The guest (:mod:`aiovirtstream.testing._guest`: TCG, no
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
        return self._guests.start(name, ready_timeout)

    def stop_test_guest(self, guest: GuestInfo | str, *, wait: bool = True) -> None:
        """Stop the guest (a transient domain: it is gone then); no-op if it is not running.

        ``wait=True`` destroys it through libvirt and returns once libvirt
        saw QEMU go (here up to 2 s: libvirt polls every 200 ms until the
        process is reaped). ``wait=False`` SIGKILLs the guest's QEMU (found
        by its pid file in the sandbox) and returns at once; libvirtd notices
        and removes the domain in the background. Open streams of the guest
        end either way.
        """
        self._guests.stop(guest, wait)

    async def astart_test_guest(
        self, name: str = "guest", *, ready_timeout: float = 60.0
    ) -> GuestInfo:
        """:meth:`start_test_guest` in a worker thread."""
        start = functools.partial(self.start_test_guest, name, ready_timeout=ready_timeout)
        return await run_to_the_end(start)

    async def astop_test_guest(self, guest: GuestInfo | str, *, wait: bool = True) -> None:
        """:meth:`stop_test_guest` in a worker thread."""
        await run_to_the_end(functools.partial(self.stop_test_guest, guest, wait=wait))
