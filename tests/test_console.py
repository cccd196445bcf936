"""Consoles, channels and screenshots against a real QEMU/TCG guest (libvirt_guest).

The guest's serial console answers every byte upper-cased, its virtio-serial
channel with letters' case swapped (aiovirtstream.testing._guest): an answer can
only have made the round trip through the guest. Without QEMU these tests
skip (fail with CI=true): see the libvirt_guest fixture.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import struct
import sys
import warnings
import weakref
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import libvirt
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.text import TextStream

import aiovirtstream as avs
from aiovirtstream.pytest_plugin import require_test_guest
from aiovirtstream.testing import GuestInfo, Sandbox
from aiovirtstream.testing._processes import alive, processes_using

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
KiB = 1024


@pytest.fixture
async def conn(libvirt_guest: GuestInfo) -> AsyncIterator[libvirt.virConnect]:
    connection = await avs.connect(libvirt_guest.uri)
    yield connection
    await avs.aclose_connection(connection)


@pytest.fixture
async def dom(conn: libvirt.virConnect, libvirt_guest: GuestInfo) -> libvirt.virDomain:
    return await avs.lookup_domain(conn, libvirt_guest.name)


async def read_exactly(stream: avs.AsyncStream, size: int, seconds: float = 15.0) -> bytes:
    """Read until ``size`` bytes arrived (the guest answers a byte or a few at a time)."""
    out = bytearray()
    with anyio.fail_after(seconds):
        while len(out) < size:
            chunk = await stream.read(size - len(out))
            assert chunk, f"end of stream after {bytes(out)!r}"
            out += chunk
    return bytes(out)


async def round_trip(stream: avs.AsyncStream, data: bytes, answer: bytes) -> None:
    await stream.write(data)
    assert await read_exactly(stream, len(answer)) == answer


def is_running(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise


def stream_stats() -> tuple[int, int, int, int]:
    s = avs.get_event_impl().stats()
    return (s.watches, s.fds, s.timers, s.pending_frees)


# --------------------------------------------------------------------------- consoles


async def test_console_round_trip_unix_and_tcp(
    libvirt_guest: GuestInfo, conn: libvirt.virConnect, dom: libvirt.virDomain
) -> None:
    async with await avs.open_console(dom) as console:
        await round_trip(console, b"hello\n", b"HELLO\n")
    assert console.closed
    # Released at once: a second client opens it without force, over TCP.
    assert libvirt_guest.tcp_uri is not None
    tcp = await avs.connect(libvirt_guest.tcp_uri)
    try:
        by_uuid = await avs.lookup_domain(tcp, dom.UUIDString())
        assert by_uuid.name() == libvirt_guest.name
        async with await avs.open_console(by_uuid, safe=True) as console:
            await round_trip(console, b"Mixed Case 123\n", b"MIXED CASE 123\n")
    finally:
        await avs.aclose_connection(tcp)
    with pytest.raises(avs.NotFoundError):
        await avs.lookup_domain(conn, "no-such-guest")


async def test_console_64k_both_directions_at_once(dom: libvirt.virDomain) -> None:
    payload = os.urandom(64 * KiB)  # every byte value: the console is raw and 8-bit clean
    received = bytearray()

    async def writer(console: avs.AsyncStream) -> None:
        for start in range(0, len(payload), 4 * KiB):
            await console.write(payload[start : start + 4 * KiB])
        await console.flush()

    async def reader(console: avs.AsyncStream) -> None:
        while len(received) < len(payload):
            chunk = await console.read(64 * KiB)
            assert chunk, "end of stream"
            received.extend(chunk)

    async with await avs.open_console(dom) as console:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader, console)
                tg.start_soon(writer, console)
    assert len(received) == len(payload)
    assert bytes(received) == payload.upper()  # all of it, transformed, in order


async def test_text_and_buffered_streams_on_a_console(dom: libvirt.virDomain) -> None:
    async with await avs.open_console(dom) as console:
        buffered = BufferedByteReceiveStream(console)
        await console.send(b"login: ")
        assert await buffered.receive_until(b": ", 100) == b"LOGIN"  # a prompt, no newline
        await console.send(b"first line\nsecond line\n")
        assert await buffered.receive_until(b"\n", 100) == b"FIRST LINE"
        assert await buffered.receive_until(b"\n", 100) == b"SECOND LINE"
        await console.send(b"0123456789")
        assert await buffered.receive_exactly(10) == b"0123456789"
        assert buffered.buffer == b""

        # TextStream: multi-byte UTF-8 comes back byte by byte and must decode whole.
        text = TextStream(console)
        await text.send("grüße, naïve café ✓\n")
        got = ""
        with anyio.fail_after(15):
            while not got.endswith("\n"):
                got += await text.receive()
        assert got == "GRüßE, NAïVE CAFé ✓\n"  # ASCII letters only: tr a-z A-Z


@pytest.mark.parametrize("how", ["destroy", "crash"])
async def test_guest_end_ends_pending_reads(
    capfd: pytest.CaptureFixture[str],
    libvirt_sandbox_full: Sandbox,
    dom: libvirt.virDomain,
    libvirt_guest: GuestInfo,
    how: str,
) -> None:
    console = await avs.open_console(dom)
    channel = await avs.open_channel(dom, libvirt_guest.channel)
    await round_trip(console, b"alive\n", b"ALIVE\n")
    await round_trip(channel, b"Alive\n", b"aLIVE\n")
    pending_console = asyncio.create_task(console.read())
    pending_channel = asyncio.create_task(channel.read())
    await asyncio.sleep(0.2)
    assert not pending_console.done() and not pending_channel.done()

    start = asyncio.get_running_loop().time()
    if how == "destroy":
        await anyio.to_thread.run_sync(dom.destroy)
    else:  # QEMU killed (SIGKILL): what a crash looks like to libvirt
        await libvirt_sandbox_full.astop_test_guest(libvirt_guest, wait=False)
    with anyio.fail_after(5):
        assert await pending_console == b""  # end of stream, not an error
        assert await pending_channel == b""
    assert asyncio.get_running_loop().time() - start < 5
    assert await console.read() == b""  # stays at end of stream
    with pytest.raises(anyio.EndOfStream):
        await console.receive()
    assert [chunk async for chunk in channel] == []

    # Leaving async with after the end of stream: a clean finish, no error.
    async with console, channel:
        pass
    assert console.closed and channel.closed
    with pytest.raises(avs.StreamClosedError):
        await console.read()
    with anyio.fail_after(10):
        while await anyio.to_thread.run_sync(is_running, dom):  # libvirtd notices a crash
            await anyio.sleep(0.05)
    with pytest.raises(avs.NotFoundError):  # a transient guest is gone once stopped
        await avs.open_console(dom)
    out, err = capfd.readouterr()
    assert err == "" and out == "", "libvirt printed something"


async def test_force_takes_the_console_over(
    capfd: pytest.CaptureFixture[str], libvirt_guest: GuestInfo, dom: libvirt.virDomain
) -> None:
    first = await avs.open_console(dom)
    await round_trip(first, b"one\n", b"ONE\n")
    pending = asyncio.create_task(first.read())
    assert libvirt_guest.tcp_uri is not None
    other = await avs.connect(libvirt_guest.tcp_uri)
    try:
        dom2 = await avs.lookup_domain(other, libvirt_guest.name)
        with pytest.raises(avs.LibvirtError, match="[Aa]ctive console"):
            await avs.open_console(dom2)  # held: refused without force
        assert not pending.done()
        async with await avs.open_console(dom2, force=True) as second:
            with anyio.fail_after(5):
                with pytest.raises(avs.StreamBrokenError) as caught:
                    await pending  # the previous holder: the documented error
            assert isinstance(caught.value, anyio.BrokenResourceError)
            assert first.closed
            await first.aclose()  # no error, and it does not disturb the new holder
            await round_trip(second, b"two\n", b"TWO\n")
            with pytest.raises(avs.StreamBrokenError):
                await first.write(b"x")
    finally:
        await avs.aclose_connection(other)
    # The same, for a holder that never read: leaving async with reports it.
    with pytest.raises(avs.StreamBrokenError):
        async with await avs.open_console(dom) as third:
            async with await avs.open_console(dom, force=True) as fourth:
                await round_trip(fourth, b"four\n", b"FOUR\n")
    assert third.closed
    out, err = capfd.readouterr()
    assert err == "" and out == "", "libvirt printed something"


async def test_closing_while_a_read_waits(dom: libvirt.virDomain) -> None:
    for close in ("aclose", "finish"):
        console = await avs.open_console(dom)
        pending = asyncio.create_task(console.read())
        await asyncio.sleep(0.1)
        await getattr(console, close)()
        with anyio.fail_after(5), pytest.raises(avs.StreamClosedError):
            await pending
    # Cancelling a waiting read leaves the console usable.
    async with await avs.open_console(dom) as console:
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.2):
                await console.read()
        await round_trip(console, b"still here\n", b"STILL HERE\n")


async def test_no_callback_watch_or_fd_left(
    libvirt_guest: GuestInfo, conn: libvirt.virConnect, dom: libvirt.virDomain
) -> None:
    impl = avs.get_event_impl()
    gc.collect()  # connections of earlier tests, freed now rather than during this one
    await impl.wait_frees()
    baseline, fds = stream_stats(), len(os.listdir("/proc/self/fd"))
    refs: list[weakref.ref[avs.AsyncStream]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(3):
            async with await avs.open_console(dom) as console:
                await round_trip(console, b"x\n", b"X\n")
            refs.append(weakref.ref(console))
            channel = await avs.open_channel(dom, libvirt_guest.channel)
            await round_trip(channel, b"y\n", b"Y\n")
            pending = asyncio.create_task(channel.read())
            await asyncio.sleep(0)
            await (channel.aclose() if n % 2 else channel.finish())
            with pytest.raises(avs.StreamClosedError):
                await pending
            refs.append(weakref.ref(channel))
        first = await avs.open_console(dom)
        second = await avs.open_console(dom, force=True)
        with pytest.raises(avs.StreamBrokenError):
            await first.read()
        await first.aclose()
        await second.aclose()
        refs += [weakref.ref(first), weakref.ref(second)]
        mime, _ = await avs.screenshot(dom)
        assert mime == "image/png"
        del console, channel, first, second, pending
        gc.collect()
        await impl.wait_frees()
    assert [r for r in refs if r() is not None] == [], "closed streams kept alive"
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert stream_stats() == baseline
    assert len(os.listdir("/proc/self/fd")) == fds


# --------------------------------------------------------------------------- channels


async def test_channel_round_trip_and_force(
    libvirt_guest: GuestInfo, dom: libvirt.virDomain
) -> None:
    async with await avs.open_channel(dom, libvirt_guest.channel) as channel:
        await round_trip(channel, b"Hello World\n", b"hELLO wORLD\n")
        big = bytes(range(256)) * 1024  # 256 KiB, more than one packet
        writer = asyncio.create_task(channel.write(big))
        assert await read_exactly(channel, len(big), 30) == big.swapcase()
        await writer
        with pytest.raises(avs.LibvirtError, match="[Aa]ctive channel"):
            await avs.open_channel(dom, libvirt_guest.channel)
        async with await avs.open_channel(dom, libvirt_guest.channel, force=True) as taker:
            with anyio.fail_after(5), pytest.raises(avs.StreamBrokenError):
                await channel.read()
            await round_trip(taker, b"Taken\n", b"tAKEN\n")
    with pytest.raises(avs.LibvirtError):
        await avs.open_channel(dom, "org.example.missing")


# --------------------------------------------------------------------------- screenshots


def decode_png(data: bytes) -> tuple[int, int]:
    """Check a PNG fully (signature, CRCs, inflated size); return (width, height)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    pos, idat, header = 8, bytearray(), None
    while True:
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
        if kind == b"IEND":
            break
    assert pos == len(data)
    assert header is not None
    width, height, depth, color, _, _, interlace = header
    assert width > 0 and height > 0
    raw = zlib.decompress(bytes(idat))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    if interlace == 0:
        stride = 1 + (width * channels * depth + 7) // 8
        assert len(raw) == height * stride
        assert all(raw[row * stride] <= 4 for row in range(height))  # filter types
    return width, height


async def test_screenshot_of_the_qemu_guest(
    libvirt_guest: GuestInfo, dom: libvirt.virDomain, tmp_path: Path
) -> None:
    mime, image = await avs.screenshot(dom)
    assert mime == "image/png"
    width, height = decode_png(image)
    assert (width, height) == (720, 400)  # VGA text mode

    dest = tmp_path / "shot.png"
    dest.write_bytes(b"old")
    assert await avs.screenshot_to_file(dom, dest) == "image/png"
    assert decode_png(dest.read_bytes()) == (720, 400)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shot.png"]  # no temp file left

    with pytest.raises(avs.LibvirtError):
        await avs.screenshot_to_file(dom, tmp_path / "bad.png", screen=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shot.png"]

    # examples/screenshot.py
    example = tmp_path / "example.png"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "screenshot.py"),
        *("--uri", libvirt_guest.uri, "--domain", libvirt_guest.name, str(example)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert b"image/png" in out
    assert decode_png(example.read_bytes()) == (720, 400)


async def test_screenshot_of_the_test_driver(tmp_path: Path) -> None:
    conn = await avs.connect("test:///default")
    try:
        dom = await avs.lookup_domain(conn, "test")
        mime, image = await avs.screenshot(dom)
        assert mime == "image/png"
        assert decode_png(image) > (0, 0)
        assert await avs.screenshot_to_file(dom, tmp_path / "t.png") == "image/png"
        assert (tmp_path / "t.png").read_bytes() == image
    finally:
        await avs.aclose_connection(conn)


# --------------------------------------------------------------------------- examples


async def test_console_proxy_example_with_two_clients(
    libvirt_guest: GuestInfo, dom: libvirt.virDomain
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "console_proxy.py"),
        *("--uri", libvirt_guest.uri, "--domain", libvirt_guest.name, "--port", "0"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    log = bytearray()
    try:
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
        match = re.fullmatch(rb"listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, line + await proc.stderr.read()
        port = int(match[1])
        a_reader, a_writer = await asyncio.open_connection("127.0.0.1", port)
        b_reader, b_writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(15):
            while b"(2 now)" not in log:  # both clients attached
                log += await proc.stderr.readline()

        async def both_get(expected: bytes) -> None:
            async with asyncio.timeout(15):
                for reader in (a_reader, b_reader):
                    assert await reader.readexactly(len(expected)) == expected

        a_writer.write(b"from a\n")
        await both_get(b"FROM A\n")  # fan-out of one client's echo to both
        b_writer.write(b"from b\n")
        await both_get(b"FROM B\n")

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            out, err = await proc.communicate()
            assert await a_reader.read() == b""  # clients closed
            assert await b_reader.read() == b""
        log += err
        assert proc.returncode == 0, bytes(log).decode()
        assert b"console proxy stopped: got SIGTERM" in out
        assert b"Traceback" not in log and b"libvirt:" not in log
        a_writer.close()
        b_writer.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # The proxy released the console: it opens without force.
    async with await avs.open_console(dom) as console:
        await round_trip(console, b"after\n", b"AFTER\n")


# --------------------------------------------------------------------------- sandbox


def test_sandbox_stop_kills_guest_qemu_and_virtlogd(pytestconfig: pytest.Config) -> None:
    require_test_guest(pytestconfig)
    with Sandbox("full") as sb:
        guest = sb.start_test_guest("solo")
        assert guest.name == "solo" and guest.tcp_uri is None
        path, uid = sb.path, os.stat(sb.path).st_uid
        pids = [p for p in processes_using(str(path), uid) if p != sb.pid]
        names = {Path(f"/proc/{p}/exe").resolve().name for p in pids}
        assert "virtlogd" in names and any(n.startswith("qemu-system") for n in names), names
    assert [p for p in pids if alive(p)] == []
    assert not path.exists()


INNER_INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""


@pytest.mark.parametrize("ci", ["", "true"])
def test_guest_fixture_skips_loudly_or_fails_in_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    """No QEMU test guest possible (here: no libvirtd): skip with the reason, fail if CI=true."""
    monkeypatch.setenv("CI", ci)
    pytester.makeini(INNER_INI)
    pytester.makepyfile("def test_needs_guest(libvirt_guest):\n    assert False\n")
    result = pytester.runpytest("--libvirtd=/nonexistent/libvirtd", "-rsf")
    if ci:
        result.assert_outcomes(errors=1)  # fails in the fixture: a setup error
        result.stdout.fnmatch_lines(["*cannot run and CI=true*libvirtd not found*"])
    else:
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(["SKIPPED*QEMU TEST GUEST UNAVAILABLE*libvirtd not found*"])
