"""Processes of the sandbox's user: finding, probing and reaping them."""

from __future__ import annotations

__all__ = [
    "process_state",
    "alive",
    "processes_using",
    "start_watchdog",
    "free_port",
    "probe",
]

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import libvirt


def process_state(pid: int) -> bytes:
    """The state letter of /proc/PID/stat (b"R", b"S", b"T", b"Z", ...); b"" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return b""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie (reparented zombies may never be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return bool(fields) and fields[0] != b"Z"


def processes_using(folder: str, uid: int) -> list[int]:
    """Live processes of uid (but this one) whose command line or environment names folder.

    For tests and diagnostics only: the sandbox ends the processes it
    started by their pids (``aiovirtstream/testing/_watchdog.py``), never by name.
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
                        if pattern.search(f.read()) and alive(int(entry)):
                            found.append(int(entry))
                            break
        except OSError:
            continue  # it exited meanwhile
    return found


def start_watchdog(folders: list[Path], uid: int) -> subprocess.Popen[bytes] | None:
    """A process that reaps the sandbox if this one dies without stopping it (SIGKILL, crash).

    It reads the pids of the sandbox's libvirtd processes from a pipe whose
    only writer is this process, until EOF.
    """
    if not sys.executable:
        return None
    # Run as a script in isolated mode: it needs only the standard library,
    # and nothing of the caller's environment or folders is imported.
    script = Path(__file__).resolve().with_name("_watchdog.py")
    return subprocess.Popen(
        [sys.executable, "-I", str(script), str(uid), *folders],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        start_new_session=True,
    )


def probe(uri: str, timeout: float) -> str | None:
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
