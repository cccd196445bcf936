"""Ending exactly the processes a sandbox started, and its watchdog process.

A sandbox's processes are the libvirtd processes it spawned (their pids, sent
here), what they forked in their sessions, and the daemons libvirtd left pid
files for in the sandbox's run folder (QEMU, virtlogd), each of them only if
it runs as the daemon's user. Nothing is found by its command line.

``python -I aiovirtstream/testing/_watchdog.py UID FOLDER...`` reads pids, one a line, on
stdin until EOF (the sandbox stopped or its process died), then ends those
processes and removes the folders; the first folder is the daemon's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import Iterable


def _stat_fields(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _real_uid(pid: int) -> int | None:
    # From status, not the owner of /proc/PID: a process that has just
    # changed its uids is not dumpable and its entries belong to root.
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _pid_files(root: str) -> set[int]:
    """The pids in ``*.pid`` files under root/run, read without following links."""
    found: set[int] = set()
    for _, _, files, dir_fd in os.fwalk(os.path.join(root, "run"), follow_symlinks=False):
        for name in files:
            if not name.endswith(".pid"):
                continue
            with contextlib.suppress(OSError, ValueError):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
                try:
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        found.add(int(os.read(fd, 32).split()[0]))
                finally:
                    os.close(fd)
    return found


def sandbox_processes(root: str, uid: int, leaders: Iterable[int]) -> list[int]:
    """Live processes of uid that the sandbox started (see the module's docstring)."""
    leaders = set(leaders)
    candidates = leaders | _pid_files(root)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if len(fields) > 3 and int(fields[3]) in leaders:
                candidates.add(int(entry))
    me = os.getpid()
    return sorted(
        pid
        for pid in candidates
        if pid > 1 and pid != me and _real_uid(pid) == uid and _stat_fields(pid)[:1] != [b"Z"]
    )


def kill_process(pid: int, uid: int) -> None:
    """SIGKILL pid if it runs as uid, through a pidfd where the kernel has them."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        if _real_uid(pid) == uid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return
    try:
        # Checked after the pidfd is held: the process it names cannot be replaced.
        if _real_uid(pid) == uid:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)


def reap(folders: list[str], uid: int, leaders: Iterable[int]) -> None:
    """End the sandbox's processes, then remove its folders (the first is the daemon's)."""
    leaders = list(leaders)
    deadline = time.monotonic() + 5.0
    while (pids := sandbox_processes(folders[0], uid, leaders)) and time.monotonic() < deadline:
        for pid in pids:
            kill_process(pid, uid)
        time.sleep(0.02)
    for folder in folders:
        for _ in range(5):
            shutil.rmtree(folder, ignore_errors=True)
            if not os.path.lexists(folder):
                break
            time.sleep(0.1)


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uid, folders = int(argv[0]), argv[1:]
    leaders = [int(line) for line in sys.stdin.buffer if line.strip()]
    if any(os.path.lexists(folder) for folder in folders):
        reap(folders, uid, leaders)


if __name__ == "__main__":
    main(sys.argv[1:])
