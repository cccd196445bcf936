"""The aiovirtstream command line, run in a subprocess against the sandbox daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _helpers import page_cache_bytes

from aiovirtstream.testing import PoolInfo, Sandbox

MiB = 1024 * 1024


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiovirtstream", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


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
    up = run_cli("upload", "-c", uri, "--pool", libvirt_pool.name, "cli.img", str(source))
    assert up.returncode == 0, up.stderr
    assert "uploaded 1.0 MiB of data" in up.stderr
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


def test_clear_error_for_a_missing_volume(libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo) -> None:
    done = run_cli(
        "download", "-c", libvirt_sandbox.uri, "--pool", libvirt_pool.name, "nope.img", "/tmp/x"
    )
    assert done.returncode == 1
    assert "nope.img" in done.stderr and "Traceback" not in done.stderr
