"""pytest fixtures giving each test run a private libvirt daemon (see :mod:`aiovirtstream.testing`).

Fixtures ``libvirt_sandbox``, ``libvirt_pool``, ``libvirt_sandbox_full`` and
``libvirt_guest``, and their options: docs/testing.md, "pytest fixtures".
"""

from __future__ import annotations

__all__ = [
    "libvirt_sandbox",
    "libvirt_sandbox_full",
    "libvirt_pool",
    "libvirt_guest",
    "require_test_guest",
    "pytest_addoption",
    "pytest_runtest_makereport",
]

import itertools
import os
import re
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from .testing import GuestInfo, PoolInfo, Sandbox, SandboxMode

_pool_numbers = itertools.count(1)
_guest_numbers = itertools.count(1)
_guest_sandboxes: dict[str, Sandbox] = {}  # guest name -> its sandbox, for failure reports
_SANDBOX_FIXTURES = ("libvirt_sandbox", "libvirt_sandbox_full")


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--libvirtd``, ``--libvirt-missing`` and the ``libvirt_sandbox_tls`` ini option."""
    group = parser.getgroup("aiovirtstream", "aiovirtstream libvirt sandbox")
    parser.addini(
        "libvirt_sandbox_tls",
        "give the session sandboxes a loopback TLS listener (tcp_uri), for this user only",
        type="bool",
        default=False,
    )
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

    tls = bool(config.getini("libvirt_sandbox_tls"))
    sandbox = Sandbox(mode, tcp=tls, libvirtd=config.getoption("--libvirtd"))
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

    ``libvirt_sandbox.uri`` (unix socket) and ``.tcp_uri`` (TLS on 127.0.0.1,
    with a client certificate only this user can read) take ``storage+``
    URIs; open stream connections with
    ``await aiovirtstream.connect(libvirt_sandbox.uri)``. It is shared by all
    tests: prefer ``libvirt_pool`` for a clean pool per test.
    """
    yield from _sandbox(pytestconfig, "storage")


@pytest.fixture(scope="session")
def libvirt_sandbox_full(pytestconfig: pytest.Config) -> Iterator[Sandbox]:
    """A private libvirtd with every driver (qemu included) for the whole session.

    Its ``uri``/``tcp_uri`` are ``qemu+unix``/``qemu+tls`` session URIs;
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


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _guest_unavailable(problem: str) -> NoReturn:
    """Skip (a contributor's machine) or fail (CI=true) a test that needs the test guest."""
    if _in_ci():
        pytest.fail(
            f"the QEMU test guest cannot run and CI=true, so this fails instead of skipping: "
            f"{problem}",
            pytrace=False,
        )
    pytest.skip(
        "QEMU TEST GUEST UNAVAILABLE, console/channel/screenshot tests skipped: "
        f"{problem} (apt-get install --no-install-recommends qemu-system-x86 "
        "libvirt-daemon-driver-qemu busybox-static linux-image-cloud-amd64; "
        "these tests run in CI)"
    )


def require_test_guest(config: pytest.Config | None = None) -> None:
    """Skip the calling test, loudly, if the QEMU test guest cannot run here (fail if CI=true).

    For tests that start their own ``Sandbox("full")`` and guests;
    ``libvirt_guest`` does this itself.
    """
    from .testing import guest_requirements_problem

    libvirtd = config.getoption("--libvirtd") if config is not None else None
    problem = guest_requirements_problem(libvirtd=libvirtd)
    if problem is not None:
        _guest_unavailable(problem)


@pytest.fixture
def libvirt_guest(request: pytest.FixtureRequest) -> Iterator[GuestInfo]:
    """A freshly booted test guest in ``libvirt_sandbox_full``, killed after the test.

    Function scope: a guest boots in 2-3 s under TCG (the first of a session
    about 2 s more), is killed without waiting, and every test gets one nobody
    else touched (tests destroy guests and take consoles over).
    The guest's ready marker was already read: its console answers every byte
    upper-cased, its channel ``guest.channel`` with letters' case swapped. Open
    them with ``aiovirtstream.lookup_domain(conn, guest.name)`` on a connection
    to ``guest.uri`` (or ``guest.tcp_uri``).
    """
    from .testing import GuestPackageMissingError

    require_test_guest(request.config)
    sandbox: Sandbox = request.getfixturevalue("libvirt_sandbox_full")
    name = f"guest-{next(_guest_numbers)}"
    try:
        guest = sandbox.start_test_guest(name)
    except GuestPackageMissingError as error:
        _guest_unavailable(str(error))
    _guest_sandboxes[guest.name] = sandbox
    try:
        yield guest
    finally:
        # SIGKILL, no waiting: libvirt's own destroy waits up to 2 s per guest.
        sandbox.stop_test_guest(guest, wait=False)


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
        guest = funcargs.get("libvirt_guest")
        if guest is not None:
            owner = _guest_sandboxes.get(guest.name)
            if owner is not None and "libvirt_sandbox_full" not in funcargs:
                tail = owner.log_tail()
                if tail:
                    report.sections.append(("libvirtd log (libvirt_sandbox_full)", tail))
            tail = owner._read_file(guest.log_path) if owner is not None else ""
            if tail:
                report.sections.append((f"QEMU log of test guest {guest.name}", tail))
    return report
