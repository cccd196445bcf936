"""aiovirtstream.libvirtaio as a drop-in for libvirt-python's libvirtaio.

libvirt-python's own tests/test_aio.py and tests/eventmock.py, unchanged from
the sdist of the installed version (downloaded with pip into a cache folder
outside the repository), run against a ``libvirtaio`` module that only
re-exports ours: every test that passes with the real libvirtaio must pass.
Then the module against the sandbox daemon.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from _helpers.volumes import download_all, upload_all

import aiovirtstream as avs
import aiovirtstream.libvirtaio as libvirtaio
from aiovirtstream._events import EventImpl
from aiovirtstream._exceptions import EventLoopError
from aiovirtstream.testing import PoolInfo, Sandbox

REPO = Path(__file__).resolve().parent.parent
SDIST_TESTS = ("test_aio.py", "eventmock.py")
# test_aio.py touches no private name of libvirtaio: a star import is the whole shim.
SHIM = "from aiovirtstream.libvirtaio import *  # noqa: F403\n"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aiovirtstream" / "libvirt-python-sdist"


@pytest.fixture(scope="session")
def libvirt_python_tests() -> Path:
    """A folder with test_aio.py and eventmock.py of the installed libvirt-python's sdist."""
    try:
        version = importlib.metadata.version("libvirt-python")
    except importlib.metadata.PackageNotFoundError:
        version = ""  # e.g. a distribution package without metadata
    if not version:
        message = "libvirt-python has no package metadata: its sdist version is unknown"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    folder = cache_dir() / version
    if all((folder / name).is_file() for name in SDIST_TESTS):
        return folder
    download = folder / "download"
    download.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    done = subprocess.run(
        [*pip, "--dest", str(download), f"libvirt-python=={version}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        message = f"cannot download libvirt-python {version}'s sdist: {done.stderr[-2000:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    (archive,) = download.glob("libvirt[-_]python-*.tar.gz")
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "tests" and parts[2] in SDIST_TESTS:
                source = tar.extractfile(member)
                assert source is not None
                (folder / parts[2]).write_bytes(source.read())
    assert all((folder / name).is_file() for name in SDIST_TESTS)
    return folder


def passing_tests(workdir: Path, sdist_tests: Path, shim: str | None) -> set[str]:
    """Run test_aio.py in a fresh pytest process; the ids of the tests that passed.

    ``shim``: the text of a ``libvirtaio.py`` put first on sys.path (None: the
    real libvirtaio of the installed libvirt-python).
    """
    tests = workdir / "tests"
    tests.mkdir(parents=True)
    for name in SDIST_TESTS:
        (tests / name).write_bytes((sdist_tests / name).read_bytes())
    (workdir / "pytest.ini").write_text("[pytest]\n")
    path = [str(REPO)]
    if shim is not None:
        (workdir / "shim").mkdir()
        (workdir / "shim" / "libvirtaio.py").write_text(shim)
        path.insert(0, str(workdir / "shim"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(path)
    report = workdir / "report.xml"
    plugins = ["-p", "no:cacheprovider", "-p", "no:asyncio", "-p", "no:aiovirtstream"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(workdir / "pytest.ini"), *plugins]
        + ["--rootdir", str(workdir), f"--junitxml={report}", "-q", "tests/test_aio.py"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.is_file(), done.stdout + done.stderr
    passed = set()
    for case in ET.parse(report).iter("testcase"):
        if not any(child.tag in ("failure", "error", "skipped") for child in case):
            passed.add(f"{case.get('classname')}::{case.get('name')}")
    # The real run must be the real module, ours ours.
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import libvirtaio; print(libvirtaio.__file__)",
        ],
        cwd=tests,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    in_shim = str(workdir / "shim") in check.stdout
    assert in_shim == (shim is not None), check.stdout + check.stderr
    return passed


def test_libvirt_pythons_own_test_aio_passes(libvirt_python_tests: Path, tmp_path: Path) -> None:
    real = passing_tests(tmp_path / "real", libvirt_python_tests, None)
    ours = passing_tests(tmp_path / "ours", libvirt_python_tests, SHIM)
    assert real, "no test of test_aio.py passes with the real libvirtaio: nothing compared"
    assert real <= ours, f"pass with libvirtaio only: {sorted(real - ours)}"


# ---------------------------------------------------------------- the module itself


async def test_registering_binds_the_running_loop() -> None:
    impl = libvirtaio.virEventRegisterAsyncIOImpl()
    assert impl.loop is asyncio.get_running_loop()
    assert impl.event_impl is avs.get_event_impl()
    assert libvirtaio.getCurrentImpl() is impl
    again = libvirtaio.virEventRegisterAsyncIOImpl()  # once per process underneath
    assert again.loop is asyncio.get_running_loop()
    assert libvirtaio.getCurrentImpl() is again


def test_registering_a_loop_before_it_runs() -> None:
    loop = asyncio.new_event_loop()
    try:
        impl = libvirtaio.virEventRegisterAsyncIOImpl(loop)
        assert impl.loop is loop
        conn = libvirt.open("test:///default")
        try:
            dom = conn.lookupByName("test")
            changed = asyncio.Event()

            def lifecycle(*_args: object) -> None:
                changed.set()

            async def stop_and_wait() -> None:
                conn.domainEventRegisterAny(
                    dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None
                )
                dom.destroy()
                await asyncio.wait_for(changed.wait(), 5)
                conn.domainEventDeregisterAny(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE)

            loop.run_until_complete(stop_and_wait())
        finally:
            conn.close()
    finally:
        loop.close()


async def test_stream_on_a_connection_opened_after_registering(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    libvirtaio.virEventRegisterAsyncIOImpl()
    conn = await asyncio.to_thread(libvirt.open, libvirt_sandbox.uri)
    try:
        await libvirt_sandbox.acreate_volume(libvirt_pool, "compat.img", 4 << 20)
        vol = await avs.lookup_volume(conn, "compat.img", pool=libvirt_pool.name)
        data = os.urandom(3 << 20)
        await upload_all(vol, data)
        assert await download_all(vol, len(data)) == data
    finally:
        await avs.aclose_connection(conn)


IDLE_SCRIPT = """
import asyncio, os, sys
import libvirt
import aiovirtstream.libvirtaio as libvirtaio
from aiovirtstream._events import EventImpl
from aiovirtstream._exceptions import EventLoopError
import aiovirtstream as avs

async def main(uri, pool, name):
    impl = libvirtaio.virEventRegisterAsyncIOImpl()
    assert impl.is_idle(), "not idle right after registering"
    await asyncio.wait_for(impl.drain(), 5)
    conn = libvirt.open(uri)
    assert not impl.is_idle(), "idle with a connection open"
    vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
    data = os.urandom(1 << 20)
    async with await avs.open_volume_upload(vol) as stream:
        await stream.write(data)
    back = bytearray()
    async with await avs.open_volume_download(vol, length=len(data)) as stream:
        async for chunk in stream:
            back += chunk
    assert back == data
    del stream, vol
    conn.close()
    del conn
    await asyncio.wait_for(impl.drain(), 10)
    assert impl.is_idle(), repr(impl)
    print("ok")

asyncio.run(main(*sys.argv[1:]))
"""


async def test_idle_and_drain_around_a_connection(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """In a fresh process: idle once registered, not while connected, drain()ed after close."""
    await libvirt_sandbox.acreate_volume(libvirt_pool, "idle.img", 1 << 20)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", textwrap.dedent(IDLE_SCRIPT)]
        + [libvirt_sandbox.uri, libvirt_pool.name, "idle.img"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


# ---------------------------------------------------------------- EventImpl's new parts, alone


def test_bind_ahead_and_the_first_hook_binding() -> None:
    frees: list[object] = []
    impl = EventImpl(invoke_free=frees.append)
    loop = asyncio.new_event_loop()
    try:
        impl.bind_ahead(loop)
        assert impl.loop is loop

        async def other_loop_running() -> None:
            with pytest.raises(EventLoopError):
                impl.bind_ahead(loop)

        asyncio.run(other_loop_running())
    finally:
        loop.close()
    with pytest.raises(EventLoopError):
        impl.bind_ahead(loop)

    unbound = EventImpl(invoke_free=frees.append)

    async def first_hook() -> None:
        timer = unbound.add_timeout(5000, lambda *_: None, "t")
        assert unbound.loop is asyncio.get_running_loop()
        assert not unbound.is_idle()
        waiting = asyncio.ensure_future(unbound.wait_idle())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        unbound.remove_timeout(timer)
        await asyncio.wait_for(waiting, 5)
        assert unbound.is_idle() and frees == ["t"]

    asyncio.run(first_hook())
