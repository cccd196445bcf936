"""The daemon process of a sandbox: spawned, recorded for the watchdog, stopped, cleaned up."""

from __future__ import annotations

__all__ = [
    "DaemonProcess",
]

import contextlib
import os
import signal
import subprocess
import threading
import warnings
from pathlib import Path

from . import _watchdog


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
