"""The aiovirtstream command line, against the sandbox daemon: in a subprocess
(stderr a pipe or a terminal), or in-process through ``main()``."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import pytest
import rich.console
from _helpers import page_cache_bytes

from aiovirtstream import _cli
from aiovirtstream._cli import CommandError
from aiovirtstream._exceptions import (
    ConnectionLostError,
    DestinationExistsError,
    InvalidRangeError,
    NotFoundError,
)
from aiovirtstream.testing import PoolInfo, Sandbox

MiB = 1024 * 1024
ERASE_LINE = "\x1b[2K"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiovirtstream", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def run_on_terminal(
    *args: str, interrupt_on: str | None = None, timeout: float = 120
) -> tuple[int, str]:
    """Run the command with stderr on a pseudo-terminal: (exit status, what it drew).

    With ``interrupt_on``, Ctrl+C (SIGINT) as soon as that text was drawn.
    """
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TTY_COMPATIBLE")}
    env.update(TERM="xterm", COLUMNS="120")
    process = subprocess.Popen(
        [sys.executable, "-m", "aiovirtstream", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    drawn = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 0.1)[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the command closed the terminal's last end
                break
            if not chunk:
                break
            drawn += chunk
            if interrupt_on is not None and interrupt_on.encode() in drawn:
                process.send_signal(signal.SIGINT)
                interrupt_on = None
    finally:
        os.close(master)
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
    return process.wait(timeout=30), drawn.decode(errors="replace")


def error_line(stderr: str) -> str:
    """The one line of a failed command's stderr (asserted to be one)."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("aiovirtstream: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_demo_round_trips_a_sparse_image() -> None:
    done = run_cli("demo", "--size-mib", "256", "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical" in done.stdout
    assert "holes preserved" in done.stdout and "yes" in done.stdout


def test_upload_and_download_commands(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    libvirt_sandbox.create_volume(libvirt_pool, "cli.img", 8 * MiB)
    source = tmp_path / "in.img"
    with open(source, "wb") as f:
        f.write(os.urandom(MiB))
        f.seek(6 * MiB)
        f.write(b"tail")
    uri = libvirt_sandbox.uri
    forced = {**os.environ, "FORCE_COLOR": "1"}  # rich would take the pipe for a terminal
    up = run_cli(
        "upload", "-c", uri, "--pool", libvirt_pool.name, "cli.img", str(source), env=forced
    )
    assert up.returncode == 0, up.stderr
    [summary] = up.stderr.splitlines()  # no bar on a pipe, the summary alone
    assert summary.startswith("uploaded 1.0 MiB of data")
    dest = tmp_path / "out.img"
    args = ("download", "-c", uri, "--pool", libvirt_pool.name, "cli.img", str(dest), "-q")
    down = run_cli(*args, "--length", str(6 * MiB + 4))
    assert down.returncode == 0, down.stderr
    assert page_cache_bytes(dest) <= 64 * 1024  # O_DIRECT: only the last, partial block
    assert dest.read_bytes() == source.read_bytes()
    again = run_cli(*args)
    assert again.returncode == 1
    assert "overwrite" in again.stderr and "Traceback" not in again.stderr
    cached = run_cli(*args, "--overwrite", "--page-cache")
    assert cached.returncode == 0, cached.stderr
    assert page_cache_bytes(dest) >= MiB  # its data; with O_DIRECT (the default) ~0
    assert dest.read_bytes()[: 6 * MiB + 4] == source.read_bytes()
    durable = run_cli(*args, "--overwrite", "--fsync")
    assert durable.returncode == 0, durable.stderr
    assert dest.read_bytes()[: 6 * MiB + 4] == source.read_bytes()


def test_download_fsync_flag_is_parsed() -> None:
    from aiovirtstream._cli import build_parser

    parse = build_parser().parse_args
    assert parse(["download", "vol", "file", "--fsync"]).fsync is True
    assert parse(["download", "vol", "file"]).fsync is False


BAD_INPUT = [
    (["download", "v.img", "f", "--offset", "-5"], "--offset"),
    (["upload", "v.img", "f", "--length", "-1"], "--length"),
    (["download", "v.img", "f", "--parallel", "0"], "--parallel"),
    (["download", "v.img", "f", "--offset", "5x"], "--offset"),
    (["upload", "v.img", "f", "--length", ""], "--length"),
    (["demo", "--size-mib", "10"], "--size-mib"),
    (["download", "v.img"], "file"),
    (["frobnicate", "a"], "frobnicate"),
]


@pytest.mark.parametrize(("args", "named"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_usage_line(args: list[str], named: str) -> None:
    done = run_cli(*args)
    assert done.returncode == 2
    line = done.stderr.rstrip("\n")
    assert "\n" not in line and "Traceback" not in line, done.stderr
    assert line.startswith("aiovirtstream: error: ") and named in line
    assert line.endswith("--help')")  # where to look
    assert done.stdout == ""


def test_bad_input_through_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["download", "v.img", "f", "--parallel", "0"]) == 2
    assert capsys.readouterr().err == (
        "aiovirtstream: error: argument --parallel: must be 1 or more streams, not 0 "
        "(see 'aiovirtstream download --help')\n"
    )
    assert _cli.main(["--help"]) == 0
    assert "upload" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            InvalidRangeError("offset 9 is past the end of 'v.img': pass an offset of at most 8"),
            "offset 9 is past the end of 'v.img': pass an --offset of at most 8",
        ),
        (
            ConnectionLostError(
                "the connection to qemu:///x was lost: end of file", uri="qemu:///x", reason="eof"
            ),
            "the connection to qemu:///x was lost: end of file "
            "(check that the daemon is running, then run the command again)",
        ),
        (
            DestinationExistsError("'f' exists: pass overwrite=True to replace it"),
            "'f' exists: pass --overwrite to replace it",
        ),
        (NotFoundError("no volume\n  named 'v.img'"), "no volume named 'v.img'"),
        (
            CommandError("cannot write 'f': Disk quota exceeded"),
            "cannot write 'f': Disk quota exceeded",
        ),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "",
)
def test_errors_during_a_transfer_are_one_line(
    error: Exception,
    line: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The library's errors once the transfer has started, InvalidRangeError (a
    ValueError) and ConnectionLostError (an OSError) among them: exit 1, no traceback."""

    @contextlib.asynccontextmanager
    async def volume(args: object) -> AsyncIterator[None]:
        yield None

    async def download(*args: object, **kwargs: object) -> NoReturn:
        raise error

    monkeypatch.setattr(_cli, "_volume", volume)
    monkeypatch.setattr(_cli, "download", download)
    assert _cli.main(["download", "v.img", "f"]) == 1
    assert capsys.readouterr().err == f"aiovirtstream: error: {line}\n"


def test_clear_error_for_a_missing_volume(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    args = ("-c", libvirt_sandbox.uri, "--pool", libvirt_pool.name, "nope.img")
    done = run_cli("download", *args, str(tmp_path / "x"))
    assert done.returncode == 1
    assert "nope.img" in error_line(done.stderr)
    assert list(tmp_path.iterdir()) == []
    # --debug, before or after the verb: the traceback instead.
    for debug in (["--debug", "download", *args], ["download", "--debug", *args]):
        shown = run_cli(*debug, str(tmp_path / "x"))
        assert shown.returncode == 1
        assert "Traceback" in shown.stderr and "NotFoundError" in shown.stderr


def test_failures_are_one_line(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    libvirt_sandbox.create_volume(libvirt_pool, "small.img", 8 * MiB)
    common = ("-c", libvirt_sandbox.uri, "--pool", libvirt_pool.name, "small.img")
    dest = tmp_path / "out.img"
    past_end = run_cli("download", *common, str(dest), "--offset", str(9 * MiB))
    assert past_end.returncode == 1
    assert "offset" in error_line(past_end.stderr)
    missing = run_cli("upload", *common, str(tmp_path / "absent.img"))
    assert missing.returncode == 1
    assert "absent.img" in error_line(missing.stderr)
    no_folder = run_cli("download", *common, str(tmp_path / "absent" / "out.img"))
    assert no_folder.returncode == 1
    assert "absent" in error_line(no_folder.stderr)
    unwritable = run_cli("download", *common, "/proc/out.img")  # its temporary file fails
    assert unwritable.returncode == 1
    assert error_line(unwritable.stderr).startswith(
        "aiovirtstream: error: cannot write '/proc/out.img': "
    )
    no_daemon = f"qemu+unix:///session?socket={tmp_path}/absent.sock"
    bad_uri = run_cli("download", "-c", no_daemon, "v.img", str(dest))
    assert bad_uri.returncode == 1
    assert no_daemon in error_line(bad_uri.stderr)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_download_leaves_nothing_and_erases_its_bar(
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    libvirt_sandbox.create_volume(libvirt_pool, "full.img", 8 * MiB)
    source = tmp_path / "in.img"
    source.write_bytes(os.urandom(4 * MiB))
    common = ["-c", libvirt_sandbox.uri, "--pool", libvirt_pool.name, "full.img"]
    assert _cli.main(["upload", *common, str(source), "-q"]) == 0
    terminal = io.StringIO()
    monkeypatch.setattr(
        _cli,
        "_bar_console",
        lambda: rich.console.Console(file=terminal, force_terminal=True, width=120),
    )

    def disk_full(fd: int, data: object, offset: int) -> int:
        time.sleep(0.3)  # the first progress report (after 0.1 s) draws the bar
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", disk_full)
    dest = tmp_path / "out.img"
    assert _cli.main(["download", *common, str(dest), "--page-cache"]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"aiovirtstream: error: cannot write {str(dest)!r}: ")
    assert os.strerror(errno.ENOSPC) in line
    assert sorted(tmp_path.iterdir()) == [source]  # neither the file nor its .part
    drawn = terminal.getvalue()
    assert "download full.img" in drawn and "0/?" not in drawn
    assert ERASE_LINE in drawn[drawn.rindex("download full.img") :]


def test_no_bar_on_a_terminal_before_the_transfer_starts(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    libvirt_sandbox.create_volume(libvirt_pool, "t.img", 8 * MiB)
    common = ("-c", libvirt_sandbox.uri, "--pool", libvirt_pool.name)
    status, drawn = run_on_terminal("download", *common, "nope.img", str(tmp_path / "x"))
    assert status == 1
    assert drawn.startswith("aiovirtstream: error: ") and drawn.count("\n") == 1, drawn
    # A transfer that ran: its bar drawn, left in place, the summary below it.
    source = tmp_path / "in.img"
    source.write_bytes(os.urandom(MiB))
    status, drawn = run_on_terminal("upload", *common, "t.img", str(source))
    assert status == 0, drawn
    assert "upload t.img" in drawn and "0/?" not in drawn
    after_bar = drawn[drawn.rindex("upload t.img") :]
    assert ERASE_LINE not in after_bar and "uploaded 1.0 MiB of data" in after_bar


def test_ctrl_c_ends_a_download_with_130(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    libvirt_sandbox.create_volume(libvirt_pool, "big.img", 64 * 1024 * MiB)
    status, drawn = run_on_terminal(
        *("download", "-c", libvirt_sandbox.uri, "--pool", libvirt_pool.name, "big.img"),
        *(str(tmp_path / "out.img"), "--no-sparse"),  # 64 GiB of zeroes: minutes
        interrupt_on="download big.img",
    )
    assert status == 130, drawn
    assert drawn.endswith("aiovirtstream: interrupted\r\n") and "Traceback" not in drawn
    assert ERASE_LINE in drawn[drawn.rindex("download big.img") :]
    assert list(tmp_path.iterdir()) == []
