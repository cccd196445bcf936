"""The fault suite for consoles, channels and screenshots: the daemon of a full
sandbox of the test's own (its test guest running) killed or frozen while a read
or a screenshot waits: a typed error naming the host, nothing left behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import anyio
import pytest
from _helpers.faults import (
    HARD_TIMEOUT,
    KEEPALIVE,
    KEEPALIVE_BOUND,
    KILL_BOUND,
    Failure,
    assert_lost,
    failing,
    nothing_left_behind,
)

import aiovirtstream as avs
from aiovirtstream.pytest_plugin import require_test_guest
from aiovirtstream.testing import GuestInfo, Sandbox


@pytest.fixture
def guest_sandbox(request: pytest.FixtureRequest) -> Iterator[tuple[Sandbox, GuestInfo]]:
    """A full sandbox of this test's own, and its test guest, running."""
    require_test_guest(request.config)
    with Sandbox("full", tcp=True) as sb:
        yield sb, sb.start_test_guest("guest")


async def console_read_pending(
    guest: GuestInfo,
    fault: Callable[[], object],
    *,
    keepalive: tuple[int, int] = (5, 3),
    channel: bool = False,
) -> tuple[Failure, float]:
    """Open the guest's console (or channel), check it answers, leave a read waiting, ``fault``."""
    conn = await avs.connect(guest.uri, keepalive=keepalive)
    try:
        dom = await avs.lookup_domain(conn, guest.name)
        opening = avs.open_channel(dom, guest.channel) if channel else avs.open_console(dom)
        async with await opening as console:
            await console.send(b"ab")
            answer = b""
            with anyio.fail_after(HARD_TIMEOUT):
                while len(answer) < 2:
                    answer += await console.read()
            assert answer == b"AB", "the guest does not answer"
            reading = failing(console.read())
            await asyncio.sleep(0.1)
            assert not reading.done(), "the console read did not wait"
            fault()
            fault_at = time.perf_counter()
            return await reading, fault_at
    finally:
        await avs.aclose_connection(conn)


@pytest.mark.parametrize("device", ["console", "channel"])
async def test_kill_during_console_read(
    guest_sandbox: tuple[Sandbox, GuestInfo], device: str
) -> None:
    sb, guest = guest_sandbox
    async with nothing_left_behind():
        failure, killed_at = await console_read_pending(guest, sb.kill, channel=device == "channel")
    assert_lost(failure, sb.uri, "eof")
    print(f"{device} read: kill to error {failure.at - killed_at:.3f} s")
    assert failure.at - killed_at < KILL_BOUND


async def test_freeze_during_console_read(guest_sandbox: tuple[Sandbox, GuestInfo]) -> None:
    sb, guest = guest_sandbox
    try:
        async with nothing_left_behind():
            failure, frozen_at = await console_read_pending(guest, sb.freeze, keepalive=KEEPALIVE)
    finally:
        sb.thaw()
    assert_lost(failure, sb.uri, "keepalive")
    print(f"console read: freeze to error {failure.at - frozen_at:.3f} s")
    assert failure.at - frozen_at < KEEPALIVE_BOUND


async def test_kill_during_screenshot(guest_sandbox: tuple[Sandbox, GuestInfo]) -> None:
    """A screenshot in flight when the daemon dies ends with a typed error naming the host.

    A screenshot takes a few milliseconds, too short to aim a kill at: the
    daemon is frozen first, so that the screenshot surely waits for it, and
    killed 100 ms later.
    """
    sb, guest = guest_sandbox

    async def scenario() -> tuple[Failure, float]:
        conn = await avs.connect(guest.uri)
        try:
            dom = await avs.lookup_domain(conn, guest.name)
            mime, image = await avs.screenshot(dom)
            assert mime == "image/png" and image.startswith(b"\x89PNG")
            with sb.frozen():
                shooting = failing(avs.screenshot(dom))
                await asyncio.sleep(0.1)
                assert not shooting.done()
                sb.kill()
                killed_at = time.perf_counter()
            return await shooting, killed_at
        finally:
            await avs.aclose_connection(conn)

    async with nothing_left_behind():
        failure, killed_at = await scenario()
    print(f"screenshot: kill to error {failure.at - killed_at:.3f} s ({failure.kind.__name__})")
    if issubclass(failure.kind, avs.ConnectionLostError):
        assert_lost(failure, sb.uri)
    else:
        assert issubclass(failure.kind, avs.ConnectError), f"{failure.kind}: {failure.message}"
        assert sb.uri in failure.message, f"the message does not name the host: {failure.message}"
    assert failure.at - killed_at < KILL_BOUND
