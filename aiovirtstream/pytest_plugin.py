"""pytest fixtures giving each test run a private libvirt daemon (see :mod:`aiovirtstream.testing`).

Fixtures ``libvirt_sandbox``, ``libvirt_pool``, ``libvirt_sandbox_full`` and
``libvirt_guest``, their options and what a project's pytest configuration
needs: docs/testing.md. Loading the plugin imports only pytest; the sandbox
and libvirt are imported by the first fixture that needs them.
"""

from __future__ import annotations

__all__ = [
    "libvirt_sandbox",
    "libvirt_sandbox_full",
    "libvirt_pool",
    "libvirt_guest",
    "require_test_guest",
    "pytest_addoption",
    "pytest_runtest_setup",
    "pytest_runtest_makereport",
]

from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from collections.abc import Generator, Iterator

    from .testing import GuestInfo, PoolInfo, Sandbox, SandboxMode

_numbers = {"pool": 0, "guest": 0}
_guest_sandboxes: dict[str, Sandbox] = {}  # guest name -> its sandbox, for failure reports
_SANDBOX_FIXTURES = ("libvirt_sandbox", "libvirt_sandbox_full")
_test_started = pytest.StashKey[float]()

_LOG_SCAN_LINES = 2000
_LOG_REPORT_LINES = 60
_LOG_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}[+-]\d{4}): \d+: "
# What libvirtd says at start-up about parts of the host a sandbox lacks on
# purpose (a D-Bus session, dnsmasq, DMI data, access to /dev/kvm): no test
# failure is explained by these, and they are repeated by every daemon.
_LOG_NOISE = (
    r"Unable to get (session|system) bus connection",
    r"DBus not available",
    r"Unable to find 'dnsmasq' binary",
    r"Cannot find 'dmidecode'",
    r"/sys/devices/virtual/dmi/id",
    r"Unable to open /dev/kvm",
)


def _next_number(kind: str) -> int:
    _numbers[kind] += 1
    return _numbers[kind]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--libvirtd``, ``--libvirt-missing`` and the ``libvirt_sandbox_tls`` ini option."""
    import os

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
    """A private storage-only libvirtd for the whole session.

    ``libvirt_sandbox.uri`` (unix socket) takes ``storage+`` URIs; with the
    ini option ``libvirt_sandbox_tls = true``, ``.tcp_uri`` too (TLS on
    127.0.0.1, with a client certificate only this user can read). Open
    stream connections with ``await aiovirtstream.connect(libvirt_sandbox.uri)``.
    It is shared by all tests: prefer ``libvirt_pool`` for a clean pool per test.
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
    import re

    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:48].lstrip(".-") or "pool"
    pool = libvirt_sandbox.create_pool(f"{stem}-{_next_number('pool')}")
    try:
        yield pool
    finally:
        libvirt_sandbox.delete_pool(pool)


def _in_ci() -> bool:
    import os

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

    Function scope: a guest boots in a few seconds under TCG, is killed
    without waiting, and every test gets one nobody else touched (tests
    destroy guests and take consoles over).
    The guest's ready marker was already read: its console answers every byte
    upper-cased, its channel ``guest.channel`` with letters' case swapped. Open
    them with ``aiovirtstream.lookup_domain(conn, guest.name)`` on a connection
    to ``guest.uri`` (or ``guest.tcp_uri``).
    """
    from .testing import GuestPackageMissingError

    require_test_guest(request.config)
    sandbox: Sandbox = request.getfixturevalue("libvirt_sandbox_full")
    name = f"guest-{_next_number('guest')}"
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


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Note when the test's set-up starts: its failure report shows the log from then on."""
    import time

    item.stash[_test_started] = time.time()


def _log_during_test(tail: str, since: float) -> str:
    """The entries of a ``Sandbox.log_tail()`` logged since ``since``, without start-up noise.

    A file without timestamps (libvirtd's stderr) is kept whole; a last line
    says how many noise lines were left out.
    """
    import re
    from datetime import UTC, datetime

    stamp = re.compile(_LOG_STAMP)
    noise = re.compile("|".join(_LOG_NOISE))
    header = re.compile(r"^--- (.*?)(?: \(last lines\))? ---$")
    since_ms = datetime.fromtimestamp(int(since * 1000) / 1000, UTC)

    files: list[tuple[str, list[tuple[datetime | None, list[str]]]]] = []
    for line in tail.splitlines():
        found = header.match(line)
        if found:
            files.append((found.group(1), []))
            continue
        if not files or not line.strip():
            continue
        entries = files[-1][1]
        found = stamp.match(line)
        if found:
            when = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S.%f%z")
            entries.append((when, [line]))
        elif entries and entries[-1][0] is not None:
            entries[-1][1].append(line)  # a message's continuation (an XML excerpt)
        else:
            entries.append((None, [line]))
    out: list[str] = []
    left_out = 0
    for path, entries in files:
        if any(when is not None for when, _ in entries):
            recent = [lines for when, lines in entries if when is not None and when >= since_ms]
        else:
            recent = [lines for _, lines in entries]
        kept = [line for lines in recent if not noise.search(lines[0]) for line in lines]
        left_out += sum(map(len, recent)) - len(kept)
        if len(kept) > _LOG_REPORT_LINES:
            kept = [f"[{len(kept) - _LOG_REPORT_LINES} earlier lines]", *kept[-_LOG_REPORT_LINES:]]
        if kept:
            out += [f"--- {path} ---", *kept]
    if out and left_out:
        out.append(f"[{left_out} lines of libvirtd's complaints about this host left out]")
    return "\n".join(out)


def _daemon_log(sandbox: Sandbox, item: pytest.Item) -> str:
    since = item.stash.get(_test_started, 0.0)
    return _log_during_test(sandbox.log_tail(_LOG_SCAN_LINES), since)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach to a failed test that used a sandbox what libvirtd logged during it.

    libvirtd's start-up complaints about the host (no D-Bus, no KVM, ...)
    are left out; with ``libvirt_guest``, also the guest's QEMU log.
    """
    report = yield
    if not report.failed:
        return report
    funcargs = getattr(item, "funcargs", {})
    for name in _SANDBOX_FIXTURES:
        sandbox = funcargs.get(name)
        text = _daemon_log(sandbox, item) if sandbox is not None else ""
        if text:
            report.sections.append((f"libvirtd log ({name})", text))
    guest: GuestInfo | None = funcargs.get("libvirt_guest")
    owner = _guest_sandboxes.get(guest.name) if guest is not None else None
    if guest is not None and owner is not None:
        if "libvirt_sandbox_full" not in funcargs:
            text = _daemon_log(owner, item)
            if text:
                report.sections.append(("libvirtd log (libvirt_sandbox_full)", text))
        text = owner.read_file(guest.log_path)
        if text:
            report.sections.append((f"QEMU log of test guest {guest.name}", text))
    return report
