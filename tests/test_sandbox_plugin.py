"""The pytest plugin's sandbox fixtures, here and in a project of pytester's (the
plugin as installed from a fresh venv is test_pytest_plugin.py)."""

from __future__ import annotations

import libvirt
import pytest
from _helpers.volumes import MiB

from aiovirtstream.testing import PoolInfo, Sandbox


def test_fixtures_give_a_pool(libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo) -> None:
    assert libvirt_pool.path.parent == libvirt_sandbox.path / "pools"
    vol = libvirt_sandbox.create_volume(libvirt_pool, "f.img", MiB)
    conn = libvirt.open(libvirt_sandbox.tcp_uri)
    try:
        pool = conn.storagePoolLookupByName(libvirt_pool.name)
        assert pool.isActive()
        assert pool.listVolumes() == ["f.img"]
        assert conn.storageVolLookupByPath(str(vol.path)).info()[1] == MiB
    finally:
        conn.close()


def test_full_fixture(libvirt_sandbox_full: Sandbox) -> None:
    conn = libvirt.open(libvirt_sandbox_full.uri)
    try:
        assert conn.getType() == "QEMU"
    finally:
        conn.close()


INNER_INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""


def test_plugin_in_a_user_project(pytester: pytest.Pytester) -> None:
    """A project that installed aiovirtstream gets the fixtures, pools are per test."""
    pytester.makeini(INNER_INI)
    pytester.makepyfile(
        """
        import libvirt

        names = []

        def test_one(libvirt_sandbox, libvirt_pool):
            names.append(libvirt_pool.name)
            assert libvirt_pool.path.is_dir()

        def test_two(libvirt_sandbox, libvirt_pool):
            conn = libvirt.open(libvirt_sandbox.uri)
            active = [p.name() for p in conn.listAllStoragePools(0)]
            conn.close()
            assert names[0] not in active, "the first test's pool was not deleted"
            assert active == [libvirt_pool.name]
            names.append(libvirt_sandbox.path)

        async def test_async(libvirt_sandbox, libvirt_pool):
            vol = await libvirt_sandbox.acreate_volume(libvirt_pool, "x.img", 4096)
            assert vol.path.stat().st_size == 4096

        def test_fails(libvirt_sandbox):
            # libvirt 11.x logs nothing at start-up (9.0: D-Bus errors): give the log a line.
            conn = libvirt.open(libvirt_sandbox.uri)
            try:
                conn.storagePoolCreateXML("<pool", 0)
            except libvirt.libvirtError:
                pass
            conn.close()
            assert False, "deliberate"

        def test_zz_sandbox_path_kept(libvirt_sandbox):
            assert libvirt_sandbox.path == names[1]

        def test_no_network_listener_unless_asked(libvirt_sandbox):
            import pytest
            from aiovirtstream.testing import SandboxError

            assert libvirt_sandbox.tcp is False
            with pytest.raises(SandboxError):
                libvirt_sandbox.tcp_uri
        """
    )
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(["*libvirtd log (libvirt_sandbox)*"])


def test_plugin_network_listener_is_opt_in(pytester: pytest.Pytester) -> None:
    """``libvirt_sandbox_tls = true`` gives the session sandbox its TLS listener."""
    pytester.makeini(INNER_INI + "libvirt_sandbox_tls = true\n")
    pytester.makepyfile(
        """
        import libvirt

        def test_tls(libvirt_sandbox):
            assert libvirt_sandbox.tcp_uri.startswith("storage+tls://127.0.0.1:")
            conn = libvirt.open(libvirt_sandbox.tcp_uri)
            try:
                assert conn.isAlive()
            finally:
                conn.close()
        """
    )
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=1)


def test_plugin_skip_when_libvirt_missing(pytester: pytest.Pytester) -> None:
    pytester.makeini(INNER_INI)
    pytester.makepyfile("def test_needs_libvirt(libvirt_pool):\n    pass\n")
    skipped = pytester.runpytest_inprocess(
        "--libvirtd=/nonexistent/libvirtd", "--libvirt-missing=skip", "-rs"
    )
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*libvirt-daemon*"])
    failed = pytester.runpytest_inprocess("--libvirtd=/nonexistent/libvirtd")
    failed.assert_outcomes(errors=1)
