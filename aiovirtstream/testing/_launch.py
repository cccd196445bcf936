"""Starting a sandbox's libvirtd: its folder, its configuration, the process, the wait."""

from __future__ import annotations

__all__ = ["DaemonLaunch", "LaunchedSandbox"]

import os
import subprocess
import time
from pathlib import Path
from typing import IO, Protocol

from .._exceptions import SandboxError, SandboxStartError
from ._certs import install_certificates
from ._daemon import DaemonFiles, DaemonProcess, daemon_config, find_programs, write_config
from ._processes import free_port, probe
from ._records import SandboxMode

#: Seconds one probe of the daemon's socket may take.
_PROBE_TIMEOUT = 5.0
#: Ports tried for the TLS listener when another process takes the one picked.
_PORT_ATTEMPTS = 5


class LaunchedSandbox(Protocol):
    """What the launch uses of its sandbox (a ``Sandbox``)."""

    @property
    def mode(self) -> SandboxMode: ...
    @property
    def tcp(self) -> bool: ...
    @property
    def start_timeout(self) -> float: ...
    @property
    def path(self) -> Path: ...
    @property
    def socket_path(self) -> Path: ...
    @property
    def log_path(self) -> Path: ...
    @property
    def pki_path(self) -> Path: ...
    @property
    def uri(self) -> str: ...
    @property
    def tcp_uri(self) -> str: ...
    def log_tail(self) -> str: ...


class DaemonLaunch:
    """One sandbox's libvirtd from its folder to its first answer, a TLS port retried."""

    def __init__(
        self,
        sandbox: LaunchedSandbox,
        daemon: DaemonProcess,
        files: DaemonFiles,
        *,
        libvirtd: str | os.PathLike[str] | None,
        env_path: str,
        tmp_dir: Path | None,
        user: str,
    ) -> None:
        self._sandbox = sandbox
        self._daemon = daemon
        self._files = files
        self._libvirtd_arg = libvirtd
        self._libvirtd: Path | None = None
        self._env_path = env_path
        self._tmp_dir = tmp_dir
        self._user = user
        self._port_attempts = 0
        self._spawn_offsets: dict[Path, int] = {}
        #: The TLS listener's port, once picked.
        self.port: int | None = None

    @property
    def stderr_path(self) -> Path:
        """libvirtd's stdout and stderr, in the owner's private folder."""
        return self._private / "libvirtd.stderr"

    @property
    def client_dn(self) -> str:
        """The distinguished name of the only client certificate the TLS listener takes."""
        return f"CN=aiovirtstream-client-{self._private.name}"

    @property
    def _private(self) -> Path:
        private = self._daemon.private
        if private is None:
            raise SandboxError("the sandbox was not started")
        return private

    def begin(self) -> Path:
        """Check the programs, make and populate the folder, spawn libvirtd; the folder."""
        sandbox = self._sandbox
        self._libvirtd, driver_dir = find_programs(self._libvirtd_arg, self._env_path, sandbox.mode)
        root = self._daemon.make_folders(self._tmp_dir, self._user, full=sandbox.mode == "full")
        for sub in ("run", "config/libvirt", "cache", "data", "pools"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        if sandbox.mode == "storage":
            (root / "drivers").mkdir()
            (root / "drivers" / "libvirt_driver_storage.so").symlink_to(
                driver_dir / "libvirt_driver_storage.so"
            )
        self.stderr_path.touch(0o600)
        if sandbox.tcp:
            install_certificates(sandbox.pki_path, root, self.client_dn.removeprefix("CN="))
        root.chmod(0o700)
        if os.geteuid() == 0:
            # The folder itself last: until then its new owner cannot enter it.
            for folder, dirs, files in os.walk(root, topdown=False):
                for name in [*dirs, *files, *(["."] if folder != str(root) else [])]:
                    os.lchown(os.path.join(folder, name), self._daemon.uid, self._daemon.gid)
            os.lchown(root, self._daemon.uid, self._daemon.gid)
        return root

    def spawn(self) -> None:
        """Write the configuration (a new port) and start libvirtd."""
        assert self._libvirtd is not None, "begin() first"
        sandbox = self._sandbox
        self._write_config()
        self._port_attempts += 1
        root = sandbox.path
        self._spawn_offsets = {
            path: self._files.size(path) for path in (self.stderr_path, sandbox.log_path)
        }
        env = {
            "PATH": self._env_path,
            "HOME": str(root),
            "XDG_RUNTIME_DIR": str(root / "run"),
            "XDG_CONFIG_HOME": str(root / "config"),
            "XDG_CACHE_HOME": str(root / "cache"),
            "XDG_DATA_HOME": str(root / "data"),
        }
        if sandbox.mode == "storage":
            # libvirtd loads only the modules in LIBVIRT_DRIVER_DIR: storage-only
            # daemons start in about a second.
            env["LIBVIRT_DRIVER_DIR"] = str(root / "drivers")
        as_root = os.geteuid() == 0
        stderr: IO[bytes]
        with open(self.stderr_path, "ab") as stderr:
            proc = subprocess.Popen(
                [str(self._libvirtd), *(["--listen"] if sandbox.tcp else [])],
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

    def check_ready(self, deadline: float) -> bool:
        """One poll: True once libvirtd answers; raises if it died or the time is up."""
        sandbox = self._sandbox
        proc = self._daemon.proc
        if proc is None:
            raise SandboxError("the sandbox was stopped while starting")
        code = proc.poll()
        if code is not None:
            if (
                sandbox.tcp
                and "Address already in use" in self._output_since_spawn()
                and self._port_attempts < _PORT_ATTEMPTS
            ):
                self.spawn()  # someone took the free port we picked: pick another
                return False
            raise self._fail(f"exited with status {code} while starting")
        error: str | None
        if not sandbox.socket_path.exists():
            error = "its socket does not exist yet"
        else:
            error = probe(sandbox.uri, _PROBE_TIMEOUT)
            if error is not None and "no connection driver available" in error:
                raise self._fail(
                    f"has no driver for {sandbox.uri} ({error}): is libvirt-daemon"
                    f"{'-driver-qemu' if sandbox.mode == 'full' else ''} installed?"
                )
            if error is None and sandbox.tcp:
                error = probe(sandbox.tcp_uri, _PROBE_TIMEOUT)
            if error is None:
                return True
        if time.monotonic() > deadline:
            raise self._fail(f"did not answer within {sandbox.start_timeout:g} s: {error}")
        return False

    def _write_config(self) -> None:
        sandbox = self._sandbox
        if sandbox.tcp:
            self.port = free_port()
        pki = sandbox.path / "pki" if sandbox.tcp else None
        config = daemon_config(sandbox.log_path, pki, self.port, self.client_dn)
        # The daemon's user owns the folder (and may have run already): no link is followed.
        assert self._daemon.root_fd is not None
        if not write_config(self._daemon.root_fd, config, self._daemon.uid, self._daemon.gid):
            raise SandboxError(f"{sandbox.path}/config/libvirt/libvirtd.conf was tampered with")

    def _output_since_spawn(self) -> str:
        return "\n".join(
            self._files.read(path, 0, offset) for path, offset in self._spawn_offsets.items()
        )

    def _fail(self, message: str) -> SandboxStartError:
        return SandboxStartError(
            f"libvirtd of {self._sandbox!r} {message}", self._sandbox.log_tail()
        )
