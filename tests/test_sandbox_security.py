"""Who can drive a sandbox, and what root does in the folder its daemon's user owns."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import libvirt
import pytest

import aiovirtstream as avs
from aiovirtstream.pytest_plugin import _in_ci, require_test_guest
from aiovirtstream.testing import Sandbox, SandboxError
from aiovirtstream.testing._certs import make_certificates

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
        make_certificates(tmp_path, "aiovirtstream-intruder")
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
        # libvirt 11.x logs nothing at start-up (9.0 logs D-Bus errors): log an XML error.
        with sb.connect() as conn, contextlib.suppress(libvirt.libvirtError):
            conn.storagePoolCreateXML("<pool", 0)
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


def _state(folder: Path) -> list[tuple[str, int, int, int]]:
    """What root could have changed in folder: its entries, owners and modes, itself too."""
    paths = [folder, *sorted(folder.rglob("*"))]
    return [(str(p), (st := p.lstat()).st_uid, st.st_gid, st.st_mode) for p in paths]


def test_guest_files_do_not_follow_a_planted_link(request: pytest.FixtureRequest) -> None:
    """The daemon's user swaps ``guests`` for a link to a root folder before the first guest."""
    _needs_root("plant a link as the daemon's user would")
    require_test_guest(request.config)
    target = Path(tempfile.mkdtemp(prefix="aiovirtstream-target-"))
    try:
        (target / "keep").write_text("root's\n")
        target.chmod(0o755)  # the daemon's user may enter it: only root may write there
        before = _state(target)
        with Sandbox("full") as sb:
            entry = pwd.getpwnam(sb.daemon_user)
            link = sb.path / "guests"
            os.symlink(target, link)
            os.lchown(link, entry.pw_uid, entry.pw_gid)
            with pytest.raises(SandboxError, match="tampered"):
                sb.start_test_guest("planted")
            assert _state(target) == before

            # Without the link the guest starts; root's files are outside the daemon's folder.
            link.unlink()
            guest = sb.start_test_guest("planted")
            assert guest.channel_path.parent == link and not link.is_symlink()
            assert link.stat().st_uid == entry.pw_uid
            with sb.connect() as conn:
                booted = ElementTree.fromstring(conn.lookupByName("planted").XMLDesc(0))
            kernel, initrd = (
                Path(booted.findtext(f"os/{tag}") or "") for tag in ("kernel", "initrd")
            )
            for path in (initrd, kernel):
                if path.is_relative_to(Path("/boot")):
                    continue  # a kernel everyone may read is used in place
                assert not path.is_relative_to(sb.path)
                assert path.stat().st_uid == 0 and path.parent.stat().st_uid == 0
                assert path.parent.stat().st_mode & 0o777 == 0o755
            sb.stop_test_guest(guest, wait=False)
            guest_folder = initrd.parent
        assert not guest_folder.exists(), "the guest files' folder outlived the sandbox"
        assert _state(target) == before
    finally:
        shutil.rmtree(target)
