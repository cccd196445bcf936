"""The command line's grammar and its errors: sizes, pairs, usage errors (exit 2, one
line), failures (exit 1, one line with what to do), --version, --help; no daemon needed
except the URIs that point at none."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import pytest

import aiovirtstream as avs
from aiovirtstream import cli
from aiovirtstream.cli import errors, parser, transfers
from aiovirtstream.cli.pairs import Pair
from aiovirtstream.cli.units import parse_size

MiB = 1024 * 1024


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiovirtstream", *args], capture_output=True, text=True, timeout=120
    )


def error_line(stderr: str) -> str:
    """The one line of a failed command's stderr (asserted to be one)."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("aiovirtstream: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("0", 0),
        ("1M", MiB),
        ("1m", MiB),
        ("1MiB", MiB),
        ("1MB", 1_000_000),
        ("2GiB", 2 << 30),
        ("2G", 2 << 30),
        ("3kb", 3000),
        ("1K", 1024),
        ("7B", 7),
        ("1T", 1 << 40),
        (" 5 MiB ", 5 * MiB),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1.5G", "1Q", "", "M", "1 M B", "0x10", "1iB"])
def test_sizes_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)


def test_pairs_and_their_forms() -> None:
    parse = parser.build_parser().parse_args
    args = parse(["download", "a.img", "a.out", "b.img=b.out", "c.img", "x=y", "--length", "1M"])
    assert args.pairs == [Pair("a.img", "a.out"), Pair("b.img", "b.out"), Pair("c.img", "x=y")]
    assert args.length == MiB and args.fsync is False
    assert parse(["upload", "v=f"]).pairs == [Pair("v", "f")]
    # One file into two volumes is fine; one volume into two files too.
    assert len(parse(["upload", "a", "f", "b", "f"]).pairs) == 2
    assert len(parse(["download", "v", "f1", "v", "f2"]).pairs) == 2
    assert parse(["download", "vol", "file", "--fsync"]).fsync is True


BAD_INPUT = [
    (["download", "v.img", "f", "--offset", "-5"], "--offset"),
    (["upload", "v.img", "f", "--length", "-1"], "--length"),
    (["download", "v.img", "f", "--parallel", "0"], "--parallel"),
    (["download", "v.img", "f", "--offset", "5x"], "--offset"),
    (["upload", "v.img", "f", "--length", "1.5G"], "--length"),
    (["upload", "v.img", "f", "--length", ""], "--length"),
    (["demo", "--size-mib", "10"], "--size-mib"),
    (["download", "v.img"], "has no FILE"),
    (["download", "=f"], "VOLUME=FILE"),
    (["download", "a", "f", "b", "f"], "file 'f' is written twice"),
    (["upload", "v", "f1", "v=f2"], "volume 'v' is written twice"),
    (["screenshot", "dom", "--screen", "-1"], "--screen"),
    (["console"], "DOMAIN"),
    (["frobnicate", "a"], "frobnicate"),
    ([], "VERB"),
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
    assert cli.main(["download", "v.img", "f", "--parallel", "0"]) == 2
    assert capsys.readouterr().err == (
        "aiovirtstream: error: argument --parallel: must be 1 or more streams, not 0 "
        "(see 'aiovirtstream download --help')\n"
    )
    assert cli.main(["--help"]) == 0
    shown = capsys.readouterr().out
    for verb in ("upload", "download", "copy", "console", "screenshot", "sandbox", "demo"):
        assert verb in shown
    assert "KiB" in shown and "KB" in shown  # the size suffixes are explained


def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.startswith(f"aiovirtstream {avs.__version__} (libvirt ")


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            avs.InvalidRangeError(
                "offset 9 is past the end of 'v.img': pass an offset of at most 8"
            ),
            "offset 9 is past the end of 'v.img': pass an --offset of at most 8",
        ),
        (
            avs.ConnectionLostError(
                "the connection to qemu:///x was lost: end of file", uri="qemu:///x", reason="eof"
            ),
            "the connection to qemu:///x was lost: end of file "
            "(check that the daemon is running, then run the command again)",
        ),
        (
            avs.DestinationExistsError("'f' exists: pass overwrite=True to replace it"),
            "'f' exists: pass --overwrite to replace it",
        ),
        (avs.NotFoundError("no volume\n  named 'v.img'"), "no volume named 'v.img'"),
        (OSError(28, "No space left on device"), "cannot write 'f': No space left on device"),
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
    async def connection(uri: object) -> AsyncIterator[None]:
        yield None

    async def find_volume(*args: object) -> tuple[None, None]:
        return None, None

    async def download(*args: object, **kwargs: object) -> NoReturn:
        raise error

    monkeypatch.setattr(transfers, "connection", connection)
    monkeypatch.setattr(transfers, "find_volume", find_volume)
    monkeypatch.setattr(avs, "download", download)
    assert cli.main(["download", "v.img", "f"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"aiovirtstream: error: {line}\n"
    assert captured.out == ""
    # With --json the failure is also an object on stdout, for scripts.
    assert cli.main(["download", "v.img", "f", "--json"]) == 1
    assert '"error": ' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("qemu+tls://127.0.0.1:1/system", "pkipath"),
        ("qemu+unix:///session?socket={tmp}/absent.sock", "no libvirt daemon listens there"),
        ("qemu+tcp://127.0.0.1:1/system", "nothing listens at that address"),
        ("not a uri", "a libvirt URI looks like"),
    ],
)
def test_a_bad_uri_says_what_to_do(uri: str, says: str, tmp_path: Path) -> None:
    uri = uri.format(tmp=tmp_path)
    done = run_cli("download", "-c", uri, "v.img", str(tmp_path / "out"))
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert uri in line and says in line
    assert list(tmp_path.iterdir()) == []


def test_the_default_uri_comes_from_the_environment(tmp_path: Path) -> None:
    uri = f"qemu+unix:///session?socket={tmp_path}/env.sock"
    done = subprocess.run(
        [sys.executable, "-m", "aiovirtstream", "screenshot", "dom", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LIBVIRT_DEFAULT_URI": uri},
    )
    assert done.returncode == 1
    assert uri in error_line(done.stderr)


def test_connect_advice_is_one_line() -> None:
    error = avs.ConnectError("cannot connect to x: Failed to connect socket to\n '/a'")
    line = errors.describe(error)
    assert "\n" not in line and "start it" in line
