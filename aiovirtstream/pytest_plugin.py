"""pytest fixtures giving each test run a private libvirt daemon (see :mod:`aiovirtstream.testing`).

Installing aiovirtstream registers this plugin (``pytest11`` entry point);
disable it with ``-p no:aiovirtstream``. Fixtures:

* ``libvirt_sandbox`` (session): a storage-only :class:`~aiovirtstream.testing.Sandbox`
  with a loopback TCP listener: ``sb.uri``, ``sb.tcp_uri``.
* ``libvirt_pool`` (function): a fresh transient dir pool in ``libvirt_sandbox``,
  a :class:`~aiovirtstream.testing.PoolInfo`, deleted with its volumes after the test.
* ``libvirt_sandbox_full`` (session): a sandbox with every driver, qemu included,
  and a TCP listener.

They are sync fixtures, so they serve sync tests and async tests under any
event loop (pytest-asyncio's loop per test included). Options (or environment
variables): ``--libvirtd=PATH`` (``AIOVIRTSTREAM_LIBVIRTD``) picks the
libvirtd binary; ``--libvirt-missing=skip`` (``AIOVIRTSTREAM_LIBVIRT_MISSING``)
skips, instead of failing, the tests that need a libvirt that is not
installed. When such a test fails, its report shows the tail of libvirtd's log.
"""

from __future__ import annotations

__all__ = [
    "libvirt_sandbox",
    "libvirt_sandbox_full",
    "libvirt_pool",
    "pytest_addoption",
    "pytest_runtest_makereport",
]

import itertools
import os
import re
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .testing import PoolInfo, Sandbox, SandboxMode

_pool_numbers = itertools.count(1)
_SANDBOX_FIXTURES = ("libvirt_sandbox", "libvirt_sandbox_full")


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--libvirtd`` and ``--libvirt-missing``."""
    group = parser.getgroup("aiovirtstream", "aiovirtstream libvirt sandbox")
    group.addoption(
        "--libvirtd",
        default=os.environ.get("AIOVIRTSTREAM_LIBVIRTD"),
        metavar="PATH",
        help="libvirtd binary for the libvirt_sandbox fixtures "
        "(default: $AIOVIRTSTREAM_LIBVIRTD, else libvirtd on PATH)",
    )
    group.addoption(
        "--libvirt-missing",
        choices=("fail", "skip"),
        default=os.environ.get("AIOVIRTSTREAM_LIBVIRT_MISSING", "fail"),
        help="when libvirtd, its drivers or QEMU are not installed: fail (default) "
        "or skip the tests using the libvirt_sandbox fixtures "
        "($AIOVIRTSTREAM_LIBVIRT_MISSING)",
    )


def _sandbox(config: pytest.Config, mode: SandboxMode) -> Iterator[Sandbox]:
    from .testing import DaemonNotInstalledError, Sandbox

    sandbox = Sandbox(mode, tcp=True, libvirtd=config.getoption("--libvirtd"))
    try:
        sandbox.start()
    except DaemonNotInstalledError as error:
        if config.getoption("--libvirt-missing") == "skip":
            pytest.skip(str(error))
        raise
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture(scope="session")
def libvirt_sandbox(pytestconfig: pytest.Config) -> Iterator[Sandbox]:
    """A private storage-only libvirtd for the whole session, with unix and TCP access.

    ``libvirt_sandbox.uri`` (unix socket) and ``.tcp_uri`` (127.0.0.1, no
    auth) take ``storage+`` URIs; open stream connections with
    ``await aiovirtstream.connect(libvirt_sandbox.uri)``. It is shared by all
    tests: prefer ``libvirt_pool`` for a clean pool per test.
    """
    yield from _sandbox(pytestconfig, "storage")


@pytest.fixture(scope="session")
def libvirt_sandbox_full(pytestconfig: pytest.Config) -> Iterator[Sandbox]:
    """A private libvirtd with every driver (qemu included) for the whole session.

    Its ``uri``/``tcp_uri`` are ``qemu+unix``/``qemu+tcp`` session URIs;
    guests run under TCG as the daemon's user (``daemon_user``) and are
    killed when the session ends.
    """
    yield from _sandbox(pytestconfig, "full")


@pytest.fixture
def libvirt_pool(libvirt_sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[PoolInfo]:
    """A fresh transient dir pool in ``libvirt_sandbox``, deleted with its volumes afterwards.

    Add sparse raw volumes with
    ``libvirt_sandbox.create_volume(libvirt_pool, "disk.img", capacity)``
    (or ``await ...acreate_volume(...)``).
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:48].lstrip(".-") or "pool"
    pool = libvirt_sandbox.create_pool(f"{stem}-{next(_pool_numbers)}")
    try:
        yield pool
    finally:
        libvirt_sandbox.delete_pool(pool)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the tail of libvirtd's log to failed tests that used a sandbox."""
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name in _SANDBOX_FIXTURES:
            sandbox = funcargs.get(name)
            tail = sandbox.log_tail() if sandbox is not None else ""
            if tail:
                report.sections.append((f"libvirtd log ({name})", tail))
    return report
