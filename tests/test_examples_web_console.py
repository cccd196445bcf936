"""examples/web_console.py in a real browser against the QEMU test guest (libvirt_guest).

The example runs as a subprocess, as a user starts it; Debian's chromium, headless
and driven by Playwright (never a browser of Playwright's own), opens its page
in several tabs. The guest's console answers what it reads upper-cased and the
page echoes nothing itself: an upper-cased line on a page has been through the
guest. Without chromium or playwright these tests skip loudly (fail with CI=true).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import aiohttp
import anyio
import pytest

import aiovirtstream as avs
from aiovirtstream.testing import GuestInfo, Sandbox, TcpRelay

try:
    import playwright.async_api as pw
except ImportError:  # the `browser` fixture says so
    pw = None  # type: ignore[assignment]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "web_console.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 15_000  # the guest runs under TCG on a busy machine


def _browser_unavailable(problem: str) -> NoReturn:
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{problem}, and CI=true: this fails instead of skipping", pytrace=False)
    pytest.skip(f"NO BROWSER, web console tests skipped: {problem} (these tests run in CI)")


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[pw.BrowserContext]:
    """Debian's chromium, headless, with a fresh profile; its pages are tabs of one window."""
    if pw is None:
        _browser_unavailable("playwright is not installed (pip install -e '.[examples]')")
    if not CHROMIUM.exists():
        _browser_unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    async with pw.async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        context.set_default_timeout(TIMEOUT_MS)
        pw.expect.set_options(timeout=TIMEOUT_MS)
        try:
            yield context
        finally:
            await context.close()


@dataclass
class WebConsole:
    """The example's process, its address, and what it logged so far."""

    proc: asyncio.subprocess.Process
    url: str
    log: bytearray = field(default_factory=bytearray)

    async def wait_log(self, text: str) -> None:
        with anyio.fail_after(TIMEOUT_MS / 1000):
            while text.encode() not in self.log:
                await anyio.sleep(0.05)

    async def stopped(self) -> tuple[int, str]:
        """Wait for the process to end; its exit code and the rest of its stdout."""
        assert self.proc.stdout is not None
        with anyio.fail_after(TIMEOUT_MS / 1000):
            out = await self.proc.stdout.read()
            code = await self.proc.wait()
        return code, out.decode()


@contextlib.asynccontextmanager
async def web_console(guest: GuestInfo, uri: str | None = None) -> AsyncIterator[WebConsole]:
    """Start the example on a free port; kill it on the way out if it still runs."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        *("--connect", uri or guest.uri, "--domain", guest.name, "--port", "0"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    log = bytearray()

    async def collect(stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            log.extend(line)

    collector = asyncio.create_task(collect(proc.stderr))
    try:
        with anyio.fail_after(30):
            line = await proc.stdout.readline()
            match = re.fullmatch(rb"serving (http://127\.0\.0\.1:\d+/)\n", line)
            if not match:
                await proc.wait()
                await collector
        assert match, (line + bytes(log)).decode()
        yield WebConsole(proc, match[1].decode(), log)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await collector


async def open_tab(context: pw.BrowserContext, url: str) -> pw.Page:
    page = await context.new_page()
    await page.goto(url)
    await pw.expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    return page


async def type_line(page: pw.Page, text: str, end: str = "Control+J") -> None:
    """Type into the terminal, then ``end`` (Ctrl+J sends LF, which the test guest echoes).

    Characters not on Playwright's US keyboard arrive as text input, not key presses.
    """
    keyboard = page.locator("#keyboard")
    await keyboard.press_sequentially(text)
    await keyboard.press(end)


async def screen_lines(page: pw.Page) -> list[str]:
    text: str = await page.locator("#screen").inner_text()
    return [line.rstrip() for line in text.split("\n")]


async def sees(page: pw.Page, answer: str) -> None:
    """The page shows ``answer`` as a line of its own, and nothing typed echoed locally."""
    screen = page.locator("#screen")
    await pw.expect(screen).to_contain_text(answer)
    lines = await screen_lines(page)
    assert answer in lines, lines
    assert answer.lower() not in await screen.inner_text()


async def test_tabs_share_the_console_and_one_closing_ends_nothing(
    browser: pw.BrowserContext, libvirt_guest: GuestInfo
) -> None:
    async with web_console(libvirt_guest) as server:
        a = await open_tab(browser, server.url)
        assert await a.title() == f"console: {libvirt_guest.name}"
        await type_line(a, "hello from a")
        await sees(a, "HELLO FROM A")

        b = await open_tab(browser, server.url)  # opened later: gets what was said so far
        await sees(b, "HELLO FROM A")
        await server.wait_log("(2 now)")
        await type_line(b, "from b")
        for page in (a, b):
            await sees(page, "FROM B")
        await type_line(a, "again from a")
        for page in (a, b):
            await sees(page, "AGAIN FROM A")
        await type_line(b, "grüße, naïve café ✓")  # UTF-8 both ways; the guest: tr a-z A-Z
        for page in (a, b):
            await sees(page, "GRüßE, NAïVE CAFé ✓")

        # Enter sends CR: the guest's "ABC\r" puts the cursor back, "X\n" overwrites the A.
        await type_line(a, "abc", end="Enter")
        await type_line(a, "x")
        for page in (a, b):
            await sees(page, "XBC")

        await a.close()
        await server.wait_log("(1 left)")
        await type_line(b, "still here")
        await sees(b, "STILL HERE")
        await pw.expect(b.locator("#status")).to_have_attribute("data-state", "connected")

        assert server.proc.returncode is None
        server.proc.send_signal(signal.SIGTERM)
        status = b.locator("#status")
        await pw.expect(status).to_have_attribute("data-state", "disconnected")
        await pw.expect(status).to_contain_text("the web console stopped (got SIGTERM)")
        code, out = await server.stopped()
        assert code == 0, server.log.decode()
        assert out == "web console stopped: got SIGTERM\n"
        assert b"Traceback" not in server.log and b"libvirt:" not in server.log

    # The console was released: it opens again without force.
    conn = await avs.connect(libvirt_guest.uri)
    try:
        dom = await avs.lookup_domain(conn, libvirt_guest.name)
        async with await avs.open_console(dom) as console:
            await console.send(b"after\n")
            answer = bytearray()
            with anyio.fail_after(15):
                while not answer.endswith(b"\n"):
                    answer += await console.receive()
            assert answer == b"AFTER\n"
    finally:
        await avs.aclose_connection(conn)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("destroy", "the guest closed its console"),
        ("force", "the console was lost"),
        ("network", "the connection to libvirt was lost"),
    ],
)
async def test_the_guests_end_is_shown_in_every_tab(
    browser: pw.BrowserContext, libvirt_guest: GuestInfo, how: str, reason: str
) -> None:
    assert libvirt_guest.tcp_uri is not None
    port = urlsplit(libvirt_guest.tcp_uri).port
    assert port is not None
    conn = await avs.connect(libvirt_guest.uri)
    try:
        dom = await avs.lookup_domain(conn, libvirt_guest.name)
        async with contextlib.AsyncExitStack() as stack:
            relay = stack.enter_context(TcpRelay("127.0.0.1", port))
            uri = relay.uri_for(libvirt_guest.tcp_uri)  # the example's connection, to be cut
            server = await stack.enter_async_context(web_console(libvirt_guest, uri))
            tabs = [await open_tab(browser, server.url) for _ in range(2)]
            await type_line(tabs[0], "before the end")
            for page in tabs:
                await sees(page, "BEFORE THE END")

            if how == "destroy":
                await anyio.to_thread.run_sync(dom.destroy)
            elif how == "force":  # another client takes the console over
                await stack.enter_async_context(await avs.open_console(dom, force=True))
            else:  # the network between the example and libvirtd breaks
                assert relay.cut() == 1
            for page in tabs:
                status = page.locator("#status")
                await pw.expect(status).to_have_attribute("data-state", "ended")
                await pw.expect(status).to_contain_text(f"console ended: {reason}")
                await pw.expect(page.locator("#screen .notice")).to_contain_text(reason)
            code, out = await server.stopped()
            assert code == 0, server.log.decode()
            assert out.startswith(f"web console stopped: {reason}")
            assert b"Traceback" not in server.log
            await type_line(tabs[1], "after the end")  # goes nowhere, breaks nothing
            assert "AFTER THE END" not in await tabs[1].locator("#screen").inner_text()
    finally:
        await avs.aclose_connection(conn)


async def test_websockets_from_other_origins_are_refused(libvirt_guest: GuestInfo) -> None:
    async with web_console(libvirt_guest) as server, aiohttp.ClientSession() as http:
        ws_url = server.url + "ws"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(ws_url, origin="http://evil.example")
        assert refused.value.status == 403
        rebound = f"evil.example:{urlsplit(ws_url).port}"  # DNS rebinding: same origin, wrong host
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(ws_url, origin=f"http://{rebound}", headers={"Host": rebound})
        assert refused.value.status == 403
        async with http.ws_connect(ws_url, origin=server.url.rstrip("/")) as ws:
            hello = await ws.receive_json(timeout=15)
            assert hello == {"type": "hello", "domain": libvirt_guest.name}
            await ws.send_bytes(b"no browser\n")
            answer = b""
            with anyio.fail_after(15):
                while not answer.endswith(b"\n"):
                    answer += await ws.receive_bytes()
            assert answer == b"NO BROWSER\n"
        async with http.get(server.url) as page:
            assert page.status == 200
            assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        async with http.get(server.url + "web_console.py") as other:
            assert other.status == 404  # only the page and its two files are served


async def test_an_unknown_domain_is_one_line_and_exit_code_1(libvirt_sandbox_full: Sandbox) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        *("--connect", libvirt_sandbox_full.uri, "--domain", "no-such-guest", "--port", "0"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    with anyio.fail_after(30):
        out, err = await proc.communicate()
    assert proc.returncode == 1
    assert out == b""
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("web console: "), lines
    assert "no-such-guest" in lines[0]


def test_a_missing_browser_skips_loudly_or_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        _browser_unavailable("no chromium")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="NO BROWSER"):
        _browser_unavailable("no chromium")
