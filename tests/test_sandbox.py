"""aiovirtstream.testing and its pytest plugin, against real libvirt daemons."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import libvirt
import pytest

import aiovirtstream.testing._sandbox as sandbox_module
from aiovirtstream.testing import (
    DaemonNotInstalledError,
    PoolInfo,
    Sandbox,
    SandboxError,
    SandboxStartError,
    TcpRelay,
)
from aiovirtstream.testing._processes import free_port

MiB = 1 << 20


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _processes_mentioning(text: str) -> list[int]:
    """Live processes (but this one) whose command line or environment contains text."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{entry}/{name}").read_bytes()
            except OSError:
                continue
            if text.encode() in data and _alive(int(entry)):
                found.append(int(entry))
                break
    return found


def assert_cleaned_up(path: Path, pid: int, user: str) -> None:
    assert not _alive(pid), f"libvirtd {pid} still runs"
    pgrep = subprocess.run(["pgrep", "-u", user, "-f", str(path)], capture_output=True, text=True)
    assert pgrep.returncode == 1, f"processes of {user} still mention {path}: {pgrep.stdout}"
    assert _processes_mentioning(str(path)) == []
    assert not path.exists()


@pytest.fixture
def parent_dir() -> Iterator[Path]:
    """A folder for sandboxes that the daemon user can enter, so a test can see all it made."""
    parent = Path(tempfile.mkdtemp(prefix="sbtest-", dir="/tmp"))
    parent.chmod(0o755)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


def _exercise(sb: Sandbox, uri: str, pool_name: str) -> None:
    """Over uri: the daemon answers, makes a pool and a sparse volume."""
    conn = libvirt.open(uri)
    try:
        assert conn.getLibVersion() >= 9_000_000
        target = sb.path / "pools" / pool_name
        pool = conn.storagePoolCreateXML(
            f"<pool type='dir'><name>{pool_name}</name>"
            f"<target><path>{target}</path></target></pool>",
            libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD,
        )
        vol = pool.createXML(
            "<volume><name>v.img</name><capacity unit='bytes'>67108864</capacity>"
            "<allocation unit='bytes'>0</allocation><target><format type='raw'/></target>"
            "</volume>",
            0,
        )
        _type, capacity, allocation = vol.info()
        assert capacity == 64 * MiB
        assert allocation < 64 * 1024
        assert (target / "v.img").stat().st_size == 64 * MiB
        pool.destroy()
    finally:
        conn.close()


def test_storage_sandbox_over_unix_and_tcp() -> None:
    with Sandbox(tcp=True) as sb:
        path, pid = sb.path, sb.pid
        assert sb.uri == f"storage+unix:///session?socket={path}/run/libvirt/libvirt-sock"
        assert sb.tcp_uri == (
            f"storage+tls://127.0.0.1:{sb.tcp_port}/session?pkipath={sb.pki_path}"
        )
        assert sb.socket_path.is_socket()
        _exercise(sb, sb.uri, "over-unix")
        _exercise(sb, sb.tcp_uri, "over-tcp")
        assert sb.log_path.parent == path
        # libvirt 11.x logs nothing at start-up (9.0 logs D-Bus errors): an XML error, which
        # the daemon logs at error level, gives the log its "libvirt version" header.
        with sb.connect() as conn, contextlib.suppress(libvirt.libvirtError):
            conn.storagePoolCreateXML("<pool", 0)
        assert "libvirt version" in sb.log_path.read_text()
        if os.geteuid() == 0:
            status = Path(f"/proc/{pid}/status").read_text()
            uid = pwd.getpwnam(sb.daemon_user).pw_uid
            assert f"Uid:\t{uid}\t" in status
            assert sb.daemon_user in ("aiovirtstream-sandbox", "nobody")
        started = time.monotonic()
    assert time.monotonic() - started < 5, "SIGTERM should stop libvirtd quickly"
    assert not sb.running
    assert_cleaned_up(path, pid, sb.daemon_user)


def test_helpers_create_pool_and_sparse_volume() -> None:
    with Sandbox() as sb:
        pool = sb.create_pool("helpers")
        assert pool == PoolInfo("helpers", sb.path / "pools" / "helpers")
        vol = sb.create_volume(pool, "disk.img", 10 * MiB)
        assert vol.path == pool.path / "disk.img"
        assert vol.capacity == 10 * MiB
        st = vol.path.stat()
        assert st.st_size == 10 * MiB
        assert st.st_blocks * 512 < 64 * 1024, "the volume should be sparse"
        with sb.connect() as conn:
            assert conn.storageVolLookupByPath(str(vol.path)).info()[1] == 10 * MiB
        sb.delete_pool(pool)
        assert not pool.path.exists()
        with sb.connect() as conn:
            assert "helpers" not in [p.name() for p in conn.listAllStoragePools(0)]
        sb.delete_pool(pool)  # already gone: no error


async def test_async_helpers() -> None:
    async with Sandbox(tcp=True) as sb:
        pool = await sb.acreate_pool("apool")
        vol = await sb.acreate_volume(pool, "a.img", 3 * MiB)
        with sb.connect(tcp=True) as conn:
            assert conn.storageVolLookupByPath(str(vol.path)).info()[1] == 3 * MiB
        await sb.adelete_pool(pool)
        assert not pool.path.exists()


async def test_async_start_does_not_block_the_loop() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        async with Sandbox() as sb:
            with sb.connect() as conn:
                assert conn.getLibVersion() > 0
    finally:
        ticker.cancel()
    assert ticks >= 3


def test_two_sandboxes_at_once() -> None:
    with Sandbox(tcp=True) as a, Sandbox(tcp=True) as b:
        pids = {a: a.pid, b: b.pid}
        assert a.path != b.path
        assert a.uri != b.uri
        assert a.tcp_port != b.tcp_port
        assert a.pid != b.pid
        for sb in (a, b):
            for uri in (sb.uri, sb.tcp_uri):
                conn = libvirt.open(uri)
                assert conn.getLibVersion() > 0
                conn.close()
        a.create_pool("same-name")
        b.create_pool("same-name")  # separate daemons, separate pools
    for sb, pid in pids.items():
        assert_cleaned_up(sb.path, pid, sb.daemon_user)


def test_cleanup_after_exception() -> None:
    sb = Sandbox()
    with pytest.raises(RuntimeError, match="boom"), sb:
        path, pid = sb.path, sb.pid
        assert _alive(pid)
        raise RuntimeError("boom")
    assert_cleaned_up(path, pid, sb.daemon_user)


def test_cleanup_of_a_stopped_daemon_is_quick() -> None:
    """A test may leave libvirtd stopped (SIGSTOP): stop() still ends it without waiting."""
    with Sandbox(stop_timeout=20) as sb:
        path, pid = sb.path, sb.pid
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert_cleaned_up(path, pid, sb.daemon_user)


async def test_cleanup_after_exception_async() -> None:
    sb = Sandbox()
    with pytest.raises(RuntimeError, match="boom"):
        async with sb:
            path, pid = sb.path, sb.pid
            assert _alive(pid)
            raise RuntimeError("boom")
    assert_cleaned_up(path, pid, sb.daemon_user)


async def test_cancelled_body_cleans_up() -> None:
    seen: list[tuple[Path, int, str]] = []
    entered = asyncio.Event()

    async def body() -> None:
        async with Sandbox() as sb:
            seen.append((sb.path, sb.pid, sb.daemon_user))
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_cleaned_up(*seen[0])


async def test_anyio_cancel_scope_cleans_up() -> None:
    seen: list[tuple[Path, int, str]] = []
    with anyio.move_on_after(10) as scope:
        async with Sandbox() as sb:
            seen.append((sb.path, sb.pid, sb.daemon_user))
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert_cleaned_up(*seen[0])


@pytest.mark.parametrize("delay", [0, 0.005, 0.02, 0.05])
async def test_cancelled_while_starting_cleans_up(parent_dir: Path, delay: float) -> None:
    async def body() -> None:
        async with Sandbox(tcp=True, tmp_dir=parent_dir):
            await asyncio.sleep(3600)

    task = asyncio.create_task(body())
    await asyncio.sleep(delay)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(parent_dir) == []
    assert _processes_mentioning(str(parent_dir)) == []


OWNER_SCRIPT = """
import sys, time
from aiovirtstream.testing import Sandbox
sb = Sandbox(tcp=True)
sb.start()
print(sb.path, sb.pid, sb.daemon_user, flush=True)
time.sleep(3600)
"""


def test_sandbox_of_a_killed_process_is_reaped() -> None:
    """SIGKILL leaves no finalizer to run: the watchdog process cleans up."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT], stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        path, pid, user = owner.stdout.readline().split()
        assert _alive(int(pid))
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 10
    while Path(path.decode()).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_cleaned_up(Path(path.decode()), int(pid), user.decode())


def test_missing_libvirtd_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotInstalledError, match="libvirt-daemon") as info:
        Sandbox(env_path=str(tmp_path)).start()
    assert info.value.package == "libvirt-daemon"
    assert "libvirtd not found" in str(info.value)
    assert isinstance(info.value, SandboxError)
    with pytest.raises(DaemonNotInstalledError, match="libvirt-daemon"):
        Sandbox(libvirtd="/nonexistent/libvirtd").start()


def test_missing_qemu_names_the_package(tmp_path: Path) -> None:
    libvirtd = shutil.which("libvirtd", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert libvirtd is not None
    with pytest.raises(DaemonNotInstalledError, match="qemu-system-x86") as info:
        Sandbox("full", libvirtd=libvirtd, env_path=str(tmp_path)).start()
    assert info.value.package == "qemu-system-x86"


def test_daemon_that_exits_fails_fast_with_its_output(parent_dir: Path) -> None:
    fake = parent_dir / "libvirtd"
    fake.write_text("#!/bin/sh\necho 'fake libvirtd: cannot parse config' >&2\nexit 3\n")
    fake.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(SandboxStartError) as info:
        Sandbox(libvirtd=fake, tmp_dir=parent_dir).start()
    assert time.monotonic() - started < 5
    assert "exited with status 3" in str(info.value)
    assert "cannot parse config" in str(info.value)
    assert "cannot parse config" in info.value.log_tail
    assert [p.name for p in parent_dir.iterdir()] == ["libvirtd"]


def test_tcp_port_collision_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        monkeypatch.setattr(sandbox_module, "free_port", lambda: next(ports, None) or free_port())
        with Sandbox(tcp=True) as sb:
            assert sb.tcp_port != busy
            conn = libvirt.open(sb.tcp_uri)
            assert conn.getLibVersion() > 0
            conn.close()
            assert "Address already in use" in sb.log_tail(200)


def test_misuse_is_reported() -> None:
    sb = Sandbox()
    with pytest.raises(SandboxError, match="not started"):
        _ = sb.uri
    with sb:
        with pytest.raises(SandboxError, match="tcp=True"):
            _ = sb.tcp_uri
        with pytest.raises(SandboxError, match="only once"):
            sb.start()
        assert sb.running  # the failed second start left it alone
    with pytest.raises(ValueError):
        Sandbox("xen")  # type: ignore[arg-type]


DOMAIN_XML = """<domain type='qemu'><name>idle</name><memory unit='MiB'>32</memory>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices/></domain>"""


def test_full_mode_answers_and_kills_its_qemu() -> None:
    with Sandbox("full", tcp=True) as sb:
        path, pid = sb.path, sb.pid
        assert sb.uri.startswith("qemu+unix:///session?socket=")
        assert sb.tcp_uri.startswith("qemu+tls://127.0.0.1:")
        for uri in (sb.uri, sb.tcp_uri):
            conn = libvirt.open(uri)
            assert conn.getType() == "QEMU"
            assert conn.getLibVersion() > 0
            conn.close()
        with sb.connect() as conn:
            dom = conn.createXML(DOMAIN_XML, 0)
            assert dom.isActive()
        qemu_pid = int((path / "run/libvirt/qemu/run/idle.pid").read_text())
        assert _alive(qemu_pid)
    assert not _alive(qemu_pid)
    assert_cleaned_up(path, pid, sb.daemon_user)


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


# ---------------------------------------------------------------- faults: kill, freeze


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_kill_crashes_the_daemon_and_stop_cleans_up() -> None:
    sb = Sandbox()
    with sb:
        path, pid = sb.path, sb.pid
        conn = libvirt.open(sb.uri)
        try:
            sb.kill()
            assert not _alive(pid)
            assert not sb.running
            assert path.exists(), "kill() leaves the folder to stop()"
            with pytest.raises(libvirt.libvirtError):
                conn.getLibVersion()
            assert conn.isAlive() == 0
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        with pytest.raises(SandboxError, match="not running"):
            sb.kill()
        with pytest.raises(SandboxError, match="not running"):
            _ = sb.pid
    assert_cleaned_up(path, pid, sb.daemon_user)


def test_frozen_daemon_answers_nothing_until_thawed() -> None:
    with Sandbox() as sb:
        conn = libvirt.open(sb.uri)
        try:
            with sb.frozen():
                assert _state(sb.pid) == "T"
                answer: list[int] = []
                asking = threading.Thread(target=lambda: answer.append(conn.getLibVersion()))
                asking.start()
                asking.join(0.5)
                assert answer == [], "a frozen daemon answered"
            asking.join(5)
            assert answer and answer[0] > 0
            assert _state(sb.pid) in ("S", "R")
            with pytest.raises(RuntimeError, match="boom"), sb.frozen():
                raise RuntimeError("boom")
            assert _state(sb.pid) in ("S", "R"), "frozen() must thaw on an exception"
            sb.freeze()
            sb.thaw()
            assert conn.getLibVersion() > 0
        finally:
            conn.close()
        sb.freeze()  # left frozen: stop() still ends it at once
        started = time.monotonic()
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- TcpRelay


class _Server:
    """A server on 127.0.0.1: sends ``reply`` to its first client, keeps what it reads."""

    def __init__(self, reply: bytes) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.received = bytearray()
        self.ended: list[str] = []
        self.accepted = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        self.accepted.set()
        with conn:
            conn.sendall(self.reply)
            try:
                while data := conn.recv(1 << 16):
                    self.received += data
                self.ended.append("eof")
            except ConnectionResetError:
                self.ended.append("reset")

    def close(self) -> None:
        self.sock.close()


def _exchange(client: socket.socket, up: bytes) -> bytes:
    """Send ``up`` and then an end of file from a thread while reading ``client`` to its end."""

    def send() -> None:
        client.sendall(up)
        client.shutdown(socket.SHUT_WR)

    sending = threading.Thread(target=send)
    sending.start()
    got = _recv_all(client)
    sending.join(30)
    return got


def _recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(1 << 16):
        out += data
    return bytes(out)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_relay_carries_bytes_both_ways() -> None:
    down, up = os.urandom(3 * MiB), os.urandom(5 * MiB)  # both more than its buffers
    server = _Server(down)
    try:
        with TcpRelay("127.0.0.1", server.port) as relay:
            assert relay.address == ("127.0.0.1", relay.port)
            assert relay.port != server.port
            with socket.create_connection(relay.address, timeout=10) as client:
                got = _exchange(client, up)  # the server ends once it has read everything
                server.thread.join(10)
            assert got == down
            assert bytes(server.received) == up
            assert server.ended == ["eof"]
    finally:
        server.close()


def _download_through(relay: TcpRelay, clients: int) -> tuple[list[bytes], float]:
    """What each of ``clients`` connections at once reads through ``relay``, and the
    seconds from their connecting to the last one's end."""
    got: list[bytes] = [b""] * clients

    def read(index: int) -> None:
        with socket.create_connection(relay.address, timeout=30) as client:
            got[index] = _recv_all(client)

    started = time.monotonic()
    readers = [threading.Thread(target=read, args=(index,)) for index in range(clients)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60)
    return got, time.monotonic() - started


def _serve_each(reply: bytes) -> tuple[socket.socket, list[bytes]]:
    """A server that sends ``reply`` to every client and keeps what each sends."""
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return

            def one(conn: socket.socket = conn) -> None:
                with conn:
                    conn.sendall(reply)
                    conn.shutdown(socket.SHUT_WR)
                    received.append(_recv_all(conn))

            threading.Thread(target=one, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, received


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("clients", [1, 3])
def test_relay_rate_holds_every_connection_to_the_link(clients: int) -> None:
    """A rate-limited relay carries at most ``rate`` bytes a second each way, all
    its connections together, and every byte arrives intact."""
    reply, rate = os.urandom(2 * MiB), 8e6
    server, _ = _serve_each(reply)
    try:
        with TcpRelay("127.0.0.1", server.getsockname()[1], rate=rate) as relay:
            assert relay.rate == rate
            got, seconds = _download_through(relay, clients)
    finally:
        server.close()
    assert got == [reply] * clients
    # At most one burst (10 ms of the rate) goes before the bucket runs dry.
    assert seconds >= (clients * len(reply) - 0.01 * rate) / rate


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_relay_rate_limits_both_directions() -> None:
    """Sending up while reading down: each direction is held to the rate, intact."""
    down, up, rate = os.urandom(2 * MiB), os.urandom(2 * MiB), 8e6
    server, received = _serve_each(down)
    try:
        with TcpRelay("127.0.0.1", server.getsockname()[1], rate=rate) as relay:
            started = time.monotonic()
            with socket.create_connection(relay.address, timeout=30) as client:
                got = _exchange(client, up)
            down_seconds = time.monotonic() - started
            deadline = time.monotonic() + 10
            while not received and time.monotonic() < deadline:
                time.sleep(0.01)
            up_seconds = time.monotonic() - started
    finally:
        server.close()
    assert got == down
    assert received == [up]
    assert down_seconds >= (len(down) - 0.01 * rate) / rate
    assert up_seconds >= (len(up) - 0.01 * rate) / rate


@pytest.mark.parametrize("rate", [0, -1.0, float("nan")])
def test_relay_refuses_a_rate_that_is_not_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="positive number of bytes a second"):
        TcpRelay("127.0.0.1", 1, rate=rate)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("reset", [False, True])
def test_relay_cut_ends_both_sides_at_once(reset: bool) -> None:
    server = _Server(b"hello")
    try:
        with TcpRelay("127.0.0.1", server.port) as relay:
            client = socket.create_connection(relay.address, timeout=10)
            with client:
                assert client.recv(5) == b"hello"
                assert relay.connections == 1
                assert relay.cut(reset=reset) == 1
                assert relay.connections == 0
                if reset:
                    with pytest.raises(ConnectionResetError):
                        client.recv(1)
                else:
                    assert client.recv(1) == b""
                server.thread.join(5)
                assert server.ended == ["reset" if reset else "eof"]
            # It relays new connections after a cut.
            server2 = _Server(b"again")
            try:
                with TcpRelay("127.0.0.1", server2.port) as relay2:
                    with socket.create_connection(relay2.address, timeout=10) as again:
                        assert again.recv(5) == b"again"
            finally:
                server2.close()
            assert relay.cut() == 0
    finally:
        server.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_relay_passes_a_reset_on_and_keeps_relaying() -> None:
    """The target resets while the client sends: the client sees the reset, the relay lives."""
    server = socket.create_server(("127.0.0.1", 0))
    resets = 0

    def serve() -> None:
        nonlocal resets
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            resets += 1

    threading.Thread(target=serve, daemon=True).start()
    try:
        with TcpRelay("127.0.0.1", server.getsockname()[1]) as relay:
            for _ in range(20):
                with socket.create_connection(relay.address, timeout=10) as client:
                    with pytest.raises((ConnectionResetError, BrokenPipeError)):
                        for _ in range(1000):
                            client.sendall(bytes(64 * 1024))
                deadline = time.monotonic() + 5
                while relay.connections and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert relay.connections == 0
            deadline = time.monotonic() + 5
            while resets < 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert resets == 20
    finally:
        server.close()


def test_relay_to_a_closed_port_closes_the_client() -> None:
    port = free_port()
    with TcpRelay("127.0.0.1", port) as relay:
        with socket.create_connection(relay.address, timeout=10) as client:
            assert client.recv(1) == b""
        assert relay.connections == 0


def test_relay_uri_for() -> None:
    with TcpRelay("127.0.0.1", 16509) as relay:
        assert relay.uri_for("storage+tcp://127.0.0.1:16509/session") == (
            f"storage+tcp://127.0.0.1:{relay.port}/session"
        )
        assert relay.uri_for("qemu+tcp://me@localhost:16509/session?x=1") == (
            f"qemu+tcp://me@127.0.0.1:{relay.port}/session?x=1"
        )
        with pytest.raises(ValueError, match="16509"):
            relay.uri_for("storage+tcp://127.0.0.1:16510/session")
    relay.close()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        relay.cut()


def test_relay_to_a_sandbox() -> None:
    with Sandbox(tcp=True) as sb, TcpRelay("127.0.0.1", sb.tcp_port) as relay:
        conn = libvirt.open(relay.uri_for(sb.tcp_uri))
        try:
            assert conn.getLibVersion() > 0
            assert relay.connections == 1
            relay.cut()
            with pytest.raises(libvirt.libvirtError):
                conn.getLibVersion()
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        with sb.connect(tcp=True) as direct:
            assert direct.getLibVersion() > 0, "the daemon itself is unharmed"
