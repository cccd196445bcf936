"""Who can drive a sandbox, and what root does in the folder its daemon's user owns."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

import aiovirtstream as avs
from aiovirtstream.pytest_plugin import _in_ci
from aiovirtstream.testing import Sandbox, _make_certificates

OTHER_USER = "aiovirtstream-test-other"


def _needs_root(why: str) -> None:
    if os.geteuid() != 0:
        if _in_ci():
            pytest.fail(f"CI=true and not root: cannot {why}", pytrace=False)
        pytest.skip(f"not root: cannot {why}")


@pytest.fixture(scope="module")
def other_user() -> Iterator[pwd.struct_passwd]:
    """A second unprivileged user, made for the test (and removed) if it did not exist."""
    _needs_root("run a command as a second user")
    created = False
    try:
        entry = pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
             "/nonexistent", "--shell", "/usr/sbin/nologin", OTHER_USER],
            check=True, capture_output=True,
        )  # fmt: skip
        created = True
        entry = pwd.getpwnam(OTHER_USER)
    try:
        yield entry
    finally:
        if created:
            subprocess.run(["userdel", OTHER_USER], check=False, capture_output=True)


def _as(user: pwd.struct_passwd | None, *argv: str) -> subprocess.CompletedProcess[str]:
    prefix = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent"}
    return subprocess.run(
        [*prefix, *argv], env=env, capture_output=True, text=True, timeout=30, cwd="/"
    )


PROBE = "import libvirt, sys; libvirt.open(sys.argv[1]).getLibVersion(); print('connected')"


def test_tls_uri_works_for_the_owner_only(other_user: pwd.struct_passwd) -> None:
    with Sandbox(tcp=True) as sb:
        uri = sb.tcp_uri
        assert uri.startswith("storage+tls://127.0.0.1:") and f"pkipath={sb.pki_path}" in uri
        assert sb.pki_path.stat().st_mode & 0o777 == 0o700
        assert (sb.pki_path / "clientkey.pem").stat().st_mode & 0o077 == 0
        mine = _as(None, "virsh", "-c", uri, "pool-list")
        assert mine.returncode == 0, mine.stderr
        assert "connected" in _as(None, sys.executable, "-c", PROBE, uri).stdout

        theirs = _as(other_user, "virsh", "-c", uri, "pool-list")
        assert theirs.returncode != 0
        assert "Name" not in theirs.stdout
        python = _as(other_user, sys.executable, "-c", PROBE, uri)
        assert python.returncode != 0 and "connected" not in python.stdout
        assert sb.running


def test_a_certificate_of_another_ca_is_refused(tmp_path: Path) -> None:
    """What another user could make for themselves: a CA and a client certificate of theirs."""
    with Sandbox(tcp=True) as sb:
        _make_certificates(tmp_path, "aiovirtstream-intruder")
        (tmp_path / "servercert.pem").unlink()
        uri = f"storage+tls://127.0.0.1:{sb.tcp_port}/session?pkipath={tmp_path}"
        with pytest.raises(libvirt.libvirtError):
            libvirt.open(uri)
        # Their CA does not vouch for the server either: no_verify=1 skips only that.
        with pytest.raises(libvirt.libvirtError):
            libvirt.open(uri + "&no_verify=1")
        libvirt.open(sb.tcp_uri).close()


async def test_aiovirtstream_connects_over_tls() -> None:
    async with Sandbox(tcp=True) as sb:
        conn = await avs.connect(sb.tcp_uri)
        try:
            assert conn.getLibVersion() > 0
        finally:
            await avs.aclose_connection(conn)


def test_sandboxes_of_root_run_as_a_dedicated_user() -> None:
    _needs_root("check the user root's sandboxes run as")
    with Sandbox() as sb:
        expected = "aiovirtstream-sandbox" if shutil.which("useradd") else "nobody"
        assert sb.daemon_user == expected
        assert pwd.getpwnam(sb.daemon_user).pw_uid != 0


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_log_tail_does_not_follow_a_planted_link(tmp_path: Path, how: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOP SECRET CONTENT\n")
    secret.chmod(0o600)
    with Sandbox() as sb:
        assert "libvirt version" in sb.log_tail()
        sb.log_path.unlink()
        if how == "symlink":
            sb.log_path.symlink_to(secret)
        else:
            if os.geteuid() != 0:
                pytest.skip("a hard link to another user's file needs root to plant")
            os.link(secret, sb.log_path)
        assert "TOP SECRET" not in sb.log_tail()
    assert secret.read_text() == "TOP SECRET CONTENT\n"


def test_stop_spares_a_bystander_naming_the_folder() -> None:
    """A process of the daemon's user whose command line and environment name the folder."""
    with Sandbox() as sb:
        folder = str(sb.path)
        entry = pwd.getpwnam(sb.daemon_user)
        prefix = []
        if os.geteuid() == 0:
            prefix = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                      "--clear-groups"]  # fmt: skip
        bystander = subprocess.Popen(
            [*prefix, "sh", "-c", 'sleep 60; : "$1"', "sh", folder],
            env={"PATH": "/usr/bin:/bin", "HOME": folder},
            cwd="/",
            start_new_session=True,
        )
    try:
        time.sleep(0.2)
        assert bystander.poll() is None, "the sandbox's stop ended a process it did not start"
    finally:
        os.killpg(bystander.pid, signal.SIGKILL)  # sh and its sleep
        bystander.wait()
