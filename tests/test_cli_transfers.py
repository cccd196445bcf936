"""``upload``, ``download`` and ``demo`` against the sandbox daemon: in a subprocess
(stderr a pipe or a pseudo-terminal), or in-process through ``main()``."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import rich.console
from _helpers.volumes import page_cache_bytes

from aiovirtstream import cli
from aiovirtstream.cli import output, transfers
from aiovirtstream.cli.progress import Board
from aiovirtstream.testing import PoolInfo, Sandbox

MiB = 1024 * 1024
ERASE_LINE = "\x1b[2K"
NO_RICH = "import sys; sys.modules['rich'] = None; from aiovirtstream.cli import main; "


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiovirtstream", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def run_on_terminal(
    *args: str,
    interrupt_on: str | None = None,
    signum: int = signal.SIGINT,
    timeout: float = 120,
    python: tuple[str, ...] = ("-m", "aiovirtstream"),
) -> tuple[int, str]:
    """Run the command with stderr on a pseudo-terminal: (exit status, what it drew).

    With ``interrupt_on``, ``signum`` as soon as that text was drawn.
    """
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TTY_COMPATIBLE")}
    env.update(TERM="xterm", COLUMNS="160")
    # A command on a terminal gets Ctrl-C, whatever this process was started
    # with: a background job of a non-interactive shell ignores SIGINT, and an
    # ignored signal stays ignored across exec (a handled one does not).
    ignoring = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [sys.executable, *python, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
            env=env,
        )
    finally:
        signal.signal(signal.SIGINT, ignoring)
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
                process.send_signal(signum)
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


def sparse_source(path: Path, data: bytes = b"", size: int = 8 * MiB) -> bytes:
    """A file of ``size`` with random data at its start and 'tail' at 6 MiB; its bytes."""
    with open(path, "wb") as f:
        f.write(data or os.urandom(MiB))
        f.seek(6 * MiB)
        f.write(b"tail")
        f.truncate(size)
    return path.read_bytes()


def test_demo_round_trips_a_sparse_image() -> None:
    done = run_cli("demo", "--size-mib", "256", "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical" in done.stdout
    assert "holes preserved" in done.stdout and "yes" in done.stdout
    # Binary units whatever the speed (a fast run prints GiB/s), never decimal ones.
    assert re.search(r"\d [KMG]iB/s", done.stdout), done.stdout
    assert not re.search(r"\d [kKMG]B/s", done.stdout), done.stdout


def test_upload_and_download_commands(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    libvirt_sandbox.create_volume(libvirt_pool, "cli.img", 8 * MiB)
    source = tmp_path / "in.img"
    content = sparse_source(source)
    uri = libvirt_sandbox.uri
    forced = {**os.environ, "FORCE_COLOR": "1"}  # rich would take the pipe for a terminal
    up = run_cli(
        "upload", "-c", uri, "--pool", libvirt_pool.name, "cli.img", str(source), env=forced
    )
    assert up.returncode == 0, up.stderr
    assert up.stderr == ""  # no bar on a pipe
    [summary] = up.stdout.splitlines()  # the summary alone, plain
    assert summary.startswith(f"uploaded {source} -> cli.img: 1.0 MiB of data and 7.0 MiB")
    assert "\x1b" not in up.stdout and "MiB/s)" in summary
    dest = tmp_path / "out.img"
    args = ("download", "-c", uri, "--pool", libvirt_pool.name, "cli.img", str(dest), "-q")
    down = run_cli(*args, "--length", "6291460")  # 6 MiB + 4
    assert down.returncode == 0, down.stderr
    assert down.stdout == down.stderr == ""
    assert page_cache_bytes(dest) <= 64 * 1024  # O_DIRECT: only the last, partial block
    assert dest.read_bytes() == content[: 6 * MiB + 4]
    again = run_cli(*args)
    assert again.returncode == 1
    assert "--overwrite" in error_line(again.stderr)
    cached = run_cli(*args, "--overwrite", "--page-cache")
    assert cached.returncode == 0, cached.stderr
    assert page_cache_bytes(dest) >= MiB  # its data; with O_DIRECT (the default) ~0
    assert dest.read_bytes() == content
    durable = run_cli(*args, "--overwrite", "--fsync", "--length", "6MiB")
    assert durable.returncode == 0, durable.stderr
    assert dest.read_bytes() == content[: 6 * MiB]


def test_several_pairs_json_checksums_and_lookups(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    """Two uploads and two downloads at once; pools by UUID, volumes by name in whichever
    pool has them and by path; --json objects; -q --checksum as sha256sum prints it."""
    a = libvirt_sandbox.create_volume(libvirt_pool, "a.img", 8 * MiB)
    libvirt_sandbox.create_volume(libvirt_pool, "b.img", 8 * MiB)
    src_a, src_b = tmp_path / "a.src", tmp_path / "b.src"
    content_a, content_b = sparse_source(src_a), sparse_source(src_b)
    with libvirt_sandbox.connect() as conn:
        pool_uuid = conn.storagePoolLookupByName(libvirt_pool.name).UUIDString()
    uri = libvirt_sandbox.uri
    up = run_cli("upload", "-c", uri, "--pool", pool_uuid, "a.img", str(src_a), f"b.img={src_b}")
    assert up.returncode == 0, up.stderr
    lines = up.stdout.splitlines()
    assert len(lines) == 3 and lines[2].startswith("total: 2 of 2 transfers, 2.0 MiB of data")
    out_a, out_b = tmp_path / "a.out", tmp_path / "b.out"
    down = run_cli(
        *("download", "-c", uri, str(a.path), str(out_a), "b.img", str(out_b)),
        *("--json", "--checksum"),
    )
    assert down.returncode == 0, down.stderr
    objects = [json.loads(line) for line in down.stdout.splitlines()]
    assert [(o["volume"], o["file"]) for o in objects] == [
        (str(a.path), str(out_a)),
        ("b.img", str(out_b)),
    ]
    assert objects[1]["pool"] == libvirt_pool.name  # found by name without --pool
    for obj, content in zip(objects, (content_a, content_b), strict=True):
        assert obj["verb"] == "download"
        assert obj["data_bytes"] + obj["hole_bytes"] == len(content)
        assert obj["hole_bytes"] >= 6 * MiB and isinstance(obj["seconds"], float)
        assert obj["sha256"] == hashlib.sha256(content).hexdigest()
    assert out_a.read_bytes() == content_a and out_b.read_bytes() == content_b
    # -q --checksum: sha256sum's lines, which sha256sum -c accepts.
    quiet = run_cli("download", "-c", uri, "a.img", str(out_a), "-q", "--checksum", "--overwrite")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == f"{hashlib.sha256(content_a).hexdigest()}  {out_a}\n"
    check = subprocess.run(["sha256sum", "-c"], input=quiet.stdout, capture_output=True, text=True)
    assert check.returncode == 0 and "OK" in check.stdout
    # Without --json nor -q, the digest ends the summary line.
    summary = run_cli("upload", "-c", uri, "a.img", str(src_a), "--checksum")
    assert summary.stdout.rstrip().endswith(f"sha256 {hashlib.sha256(content_a).hexdigest()}")


def test_one_failed_transfer_does_not_stop_the_others(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    libvirt_sandbox.create_volume(libvirt_pool, "ok.img", 8 * MiB)
    (tmp_path / "exists").write_bytes(b"keep me")
    common = ("-c", libvirt_sandbox.uri, "--pool", libvirt_pool.name)
    done = run_cli(
        "download",
        *common,
        "ok.img",
        str(tmp_path / "exists"),
        "ok.img=" + str(tmp_path / "new"),
        "--json",
    )
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert line.startswith("aiovirtstream: error: ok.img: ") and "--overwrite" in line
    failed, ok = (json.loads(x) for x in done.stdout.splitlines())
    assert "error" in failed and "data_bytes" not in failed
    assert ok["data_bytes"] + ok["hole_bytes"] == 8 * MiB
    assert (tmp_path / "exists").read_bytes() == b"keep me"
    assert (tmp_path / "new").stat().st_size == 8 * MiB
    # A volume that does not exist: nothing starts, not even the other transfer.
    missing = run_cli("download", *common, "ok.img", str(tmp_path / "x"), "nope.img", "y")
    assert missing.returncode == 1
    assert "nope.img" in error_line(missing.stderr)
    assert not (tmp_path / "x").exists()


def test_clear_error_for_a_missing_volume(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    args = ("-c", libvirt_sandbox.uri, "--pool", libvirt_pool.name, "nope.img")
    done = run_cli("download", *args, str(tmp_path / "x"))
    assert done.returncode == 1
    assert "nope.img" in error_line(done.stderr)
    assert list(tmp_path.iterdir()) == []
    unknown_pool = run_cli(
        "download",
        "-c",
        libvirt_sandbox.uri,
        "--pool",
        str(uuid.uuid4()),
        "v.img",
        str(tmp_path / "x"),
    )
    assert unknown_pool.returncode == 1
    assert "no storage pool" in error_line(unknown_pool.stderr)
    # --debug, before or after the verb: the traceback too.
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
    past_end = run_cli("download", *common, str(dest), "--offset", "9M")
    assert past_end.returncode == 1
    assert "--offset" in error_line(past_end.stderr)
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
    assert cli.main(["upload", *common, str(source), "-q"]) == 0
    terminal = io.StringIO()
    console = rich.console.Console(file=terminal, force_terminal=True, width=160)
    monkeypatch.setattr(transfers, "open_board", lambda labels, quiet: Board(labels, console))

    def disk_full(fd: int, data: object, offset: int) -> int:
        time.sleep(0.3)  # the first progress report (after 0.1 s) draws the bar
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", disk_full)
    dest = tmp_path / "out.img"
    assert cli.main(["download", *common, str(dest), "--page-cache"]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"aiovirtstream: error: cannot write {str(dest)!r}: ")
    assert os.strerror(errno.ENOSPC) in line
    assert sorted(tmp_path.iterdir()) == [source]  # neither the file nor its .part
    drawn = terminal.getvalue()
    assert "download full.img" in drawn and "0/?" not in drawn
    assert ERASE_LINE in drawn[drawn.rindex("download full.img") :]


def test_bars_on_a_terminal_in_binary_units(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    libvirt_sandbox.create_volume(libvirt_pool, "t.img", 8 * MiB)
    libvirt_sandbox.create_volume(libvirt_pool, "u.img", 8 * MiB)
    common = ("-c", libvirt_sandbox.uri, "--pool", libvirt_pool.name)
    # A transfer that cannot start draws no bar: the error line alone.
    status, drawn = run_on_terminal("download", *common, "nope.img", str(tmp_path / "x"))
    assert status == 1
    assert drawn.startswith("aiovirtstream: error: ") and drawn.count("\n") == 1, drawn
    source = tmp_path / "in.img"
    source.write_bytes(os.urandom(MiB))
    status, drawn = run_on_terminal("upload", *common, "t.img", str(source), "u.img", str(source))
    assert status == 0, drawn
    assert "upload t.img" in drawn and "upload u.img" in drawn and "total" in drawn
    assert "0/?" not in drawn and "MiB" in drawn
    for decimal in ("GB/s", "MB/s", "kB/s", " MB", " GB"):
        assert decimal not in drawn, drawn
    assert ERASE_LINE not in drawn[drawn.rindex("upload t.img") :]  # the bars stay
    # Without rich (no cli extra) the command works the same, without bars.
    status, drawn = run_on_terminal(
        f"sys.exit(main({['upload', *common, 't.img', str(source)]!r}))",
        python=(
            "-c",
            "import sys; sys.modules['rich'] = None; from aiovirtstream.cli import main; ",
        ),
    )
    assert status == 0 and drawn == "", drawn


def test_without_rich_every_verb_but_the_bars_works(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    libvirt_sandbox.create_volume(libvirt_pool, "r.img", 8 * MiB)
    args = ["download", "-c", libvirt_sandbox.uri, "--pool", libvirt_pool.name, "r.img"]
    code = NO_RICH + f"sys.exit(main({[*args, str(tmp_path / 'r.out')]!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("downloaded r.img -> ")
    assert output.open_board(["x"], quiet=False) is None  # stderr is no terminal here


@pytest.mark.parametrize(
    ("signum", "status", "said"),
    [
        (signal.SIGINT, 130, "aiovirtstream: interrupted\r\n"),
        (signal.SIGTERM, 143, "aiovirtstream: terminated\r\n"),
    ],
)
def test_ctrl_c_and_sigterm_end_a_download(
    signum: int,
    status: int,
    said: str,
    libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
    tmp_path: Path,
) -> None:
    libvirt_sandbox.create_volume(libvirt_pool, "big.img", 64 * 1024 * MiB)
    ended, drawn = run_on_terminal(
        *("download", "-c", libvirt_sandbox.uri, "--pool", libvirt_pool.name, "big.img"),
        *(str(tmp_path / "out.img"), "--no-sparse"),  # 64 GiB of zeroes: minutes
        interrupt_on="download big.img",
        signum=signum,
    )
    assert ended == status, drawn
    assert drawn.endswith(said) and "Traceback" not in drawn
    assert ERASE_LINE in drawn[drawn.rindex("download big.img") :]
    assert list(tmp_path.iterdir()) == []


def test_copy_between_two_daemons(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path
) -> None:
    """``copy --from URI --to URI``: a volume into one of another daemon, holes kept."""
    libvirt_sandbox.create_volume(libvirt_pool, "src.img", 8 * MiB)
    source = tmp_path / "in.img"
    content = sparse_source(source)
    uri = libvirt_sandbox.uri
    assert run_cli("upload", "-c", uri, "src.img", str(source), "-q").returncode == 0
    with Sandbox() as other:
        pool = other.create_pool("there")
        other.create_volume(pool, "dst.img", 8 * MiB)
        done = run_cli(
            *("copy", "--from", uri, "--to", other.uri, "src.img", "dst.img"),
            *("--to-pool", "there", "--json", "--checksum"),
        )
        assert done.returncode == 0, done.stderr
        [obj] = [json.loads(line) for line in done.stdout.splitlines()]
        assert obj["verb"] == "copy" and obj["to_volume"] == "dst.img"
        assert obj["pool"] == libvirt_pool.name and obj["to_pool"] == "there"
        assert obj["sha256"] == hashlib.sha256(content).hexdigest()
        assert obj["hole_bytes"] >= 6 * MiB
        back = run_cli("download", "-c", other.uri, "dst.img", str(tmp_path / "back"), "-q")
        assert back.returncode == 0, back.stderr
        assert (tmp_path / "back").read_bytes() == content
        missing = run_cli("copy", "--from", uri, "--to", other.uri, "src.img", "nope.img")
        assert missing.returncode == 1
        assert "nope.img" in error_line(missing.stderr)
