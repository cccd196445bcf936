"""A domain's serial console in the browser: a terminal page bridged over a WebSocket.

One console stream is opened for the domain and shared by every browser tab:
what the guest writes goes to all of them (a new tab first gets the last 64 KiB
of it), what is typed in any of them goes to the guest. A tab that closes ends
nothing; a tab that cannot keep up is disconnected rather than slowing the
others down. When the guest's console ends (the domain shut down or destroyed,
the console taken over, the connection to libvirt lost) every tab shows why and
the server stops; SIGINT/SIGTERM stop it too, telling every tab.

Needs aiohttp (``pip install 'aiovirtstream[examples]'``). Against a private
daemon and the test guest (its console answers what it reads upper-cased)::

    aiovirtstream sandbox --full --guest    # prints "uri: URI", "guest: guest"; Ctrl+C stops
    python examples/web_console.py --connect URI --domain guest --port 8080
    # open http://127.0.0.1:8080/ in as many tabs as you like; Enter sends CR, Ctrl+J LF

or from Python, with ``aiovirtstream.testing``::

    async with Sandbox("full") as sb:
        guest = await sb.astart_test_guest()
        await web_console.main(["--connect", guest.uri, "--domain", guest.name])

It listens on 127.0.0.1 unless told otherwise: there is no authentication,
anyone who can reach the port can type on the guest's console (WebSockets from
pages of other origins, or on loopback to a name that is not a loopback one,
are refused). ``--port 0`` picks a free port; the first
line printed says which one (``serving http://HOST:PORT/``).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import signal
import socket
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import anyio.abc
from aiohttp import WSMsgType, web

import aiovirtstream as avs

log = logging.getLogger("web_console")

#: The page, its script and its style sheet.
STATIC = Path(__file__).resolve().with_name("web_console_static")
#: Guest output replayed to a tab that opens later.
HISTORY_BYTES = 64 * 1024
#: Guest output waiting for one tab before it counts as too slow.
TAB_BACKLOG_BYTES = 1024 * 1024
#: Largest WebSocket frame: guest output is sent in frames of at most this, input accepted up to it.
MAX_FRAME = 64 * 1024
#: How long closing tabs may take when the server stops.
CLOSE_TIMEOUT = 5.0
#: The page, its script and its style load from this origin only; no inline code.
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'"


class Tab:
    """One browser tab: guest output queued for it, sent by its own task."""

    def __init__(self, ws: web.WebSocketResponse, peer: str) -> None:
        self.ws = ws
        self.peer = peer
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self.wake = asyncio.Event()
        #: Set once: the last message the tab gets before the WebSocket closes.
        self.farewell: dict[str, str] | None = None

    def push(self, chunk: bytes) -> bool:
        """Queue guest output; False if the tab is too far behind (nothing queued then)."""
        if self.pending_bytes + len(chunk) > TAB_BACKLOG_BYTES:
            return False
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        self.wake.set()
        return True

    def say_goodbye(self, kind: str, reason: str) -> None:
        """Send what is queued, then ``{"type": kind, "reason": reason}``, then close."""
        if self.farewell is None:
            self.farewell = {"type": kind, "reason": reason}
            self.wake.set()

    def drop(self, reason: str) -> None:
        """Forget the queued output, send ``{"type": "closed", "reason": reason}``, close."""
        self.pending.clear()
        self.pending_bytes = 0
        self.say_goodbye("closed", reason)

    async def send_loop(self) -> None:
        """Deliver queued output in frames of up to MAX_FRAME; close after the farewell."""
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.pending:
                    frame = bytearray()
                    while self.pending and len(frame) + len(self.pending[0]) <= MAX_FRAME:
                        chunk = self.pending.popleft()
                        self.pending_bytes -= len(chunk)
                        frame += chunk
                    if not frame:  # one chunk larger than a frame: split it
                        chunk = self.pending.popleft()
                        self.pending_bytes -= len(chunk)
                        frame += chunk[:MAX_FRAME]
                        self.pending.appendleft(chunk[MAX_FRAME:])
                        self.pending_bytes += len(chunk) - MAX_FRAME
                    await self.ws.send_bytes(bytes(frame))
                if self.farewell is not None:
                    await self.ws.send_str(json.dumps(self.farewell))
                    await self.ws.close()
                    return
        except (ConnectionError, RuntimeError):
            pass  # the tab went away (aiohttp: "closing transport" / "websocket closed")


class ConsoleHub:
    """Fan the console's output out to every tab; any tab's input goes to the guest."""

    def __init__(
        self, console: avs.AsyncStream, domain_name: str, *, loopback_only: bool = True
    ) -> None:
        self.console = console
        self.domain_name = domain_name
        #: Refuse WebSockets whose Host is not a loopback name (DNS rebinding).
        self.loopback_only = loopback_only
        self.tabs: dict[Tab, asyncio.Task[None]] = {}
        self.history = bytearray()
        self.write_lock = asyncio.Lock()  # one writer at a time on the console
        self.ended: str | None = None  # why the console ended, once it has

    async def pump_guest_output(self) -> str:
        """Copy guest output to every tab until the console ends; say why it ended."""
        try:
            async for chunk in self.console:
                self.history += chunk
                del self.history[:-HISTORY_BYTES]
                for tab in list(self.tabs):
                    if tab.farewell is None and not tab.push(chunk):
                        log.warning("tab %s too slow: disconnected", tab.peer)
                        tab.drop("this tab fell behind the console's output")
            reason = "the guest closed its console (domain shut down or destroyed)"
        except avs.ConnectionLostError as error:
            reason = f"the connection to libvirt was lost: {error}"
        except anyio.BrokenResourceError as error:  # avs.StreamBrokenError: e.g. taken over
            reason = f"the console was lost: {error}"
        self.ended = reason
        for tab in self.tabs:
            tab.say_goodbye("end", reason)
        return reason

    async def page(self, request: web.Request) -> web.StreamResponse:
        """GET /, /terminal.js, /terminal.css: the page and its two files."""
        name = request.match_info.get("name", "index.html")
        response = web.FileResponse(STATIC / name)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """GET /ws: guest output as binary frames out, binary frames in as input."""
        if not _allowed(request, loopback_only=self.loopback_only):
            origin, host = request.headers.get("Origin"), request.host
            log.warning("refused a WebSocket from origin %s to host %s", origin, host)
            raise web.HTTPForbidden(text="WebSocket from another origin refused\n")
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_FRAME)
        await ws.prepare(request)
        tab = Tab(ws, _peer(request))
        await ws.send_str(json.dumps({"type": "hello", "domain": self.domain_name}))
        # No await from here until the tab is registered: it misses no output.
        if self.history:
            tab.push(bytes(self.history))
        if self.ended is not None:
            tab.say_goodbye("end", self.ended)
        self.tabs[tab] = asyncio.create_task(tab.send_loop())
        log.info("tab %s attached (%d now)", tab.peer, len(self.tabs))
        try:
            async for message in ws:
                if message.type == WSMsgType.BINARY and self.ended is None:
                    async with self.write_lock:
                        await self.console.send(message.data)
        except (avs.StreamClosedError, avs.StreamBrokenError) as error:
            log.info("input from tab %s dropped: %s", tab.peer, error)  # the console ended
        finally:
            sender = self.tabs.pop(tab)
            if tab.farewell is None:
                sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            log.info("tab %s detached (%d left)", tab.peer, len(self.tabs))
        return ws

    async def close_tabs(self, reason: str) -> None:
        """Tell every tab ``reason``, wait up to CLOSE_TIMEOUT for their WebSockets to close."""
        for tab in self.tabs:
            tab.say_goodbye("closed", reason)
        senders = list(self.tabs.values())
        if senders:
            await asyncio.wait(senders, timeout=CLOSE_TIMEOUT)


def make_app(hub: ConsoleHub) -> web.Application:
    """The aiohttp application: the page at ``/``, the WebSocket at ``/ws``."""
    app = web.Application()
    app.router.add_get("/", hub.page)
    app.router.add_get("/{name:terminal\\.(?:js|css)}", hub.page)
    app.router.add_get("/ws", hub.websocket)
    return app


def _allowed(request: web.Request, *, loopback_only: bool) -> bool:
    """A browser sends Origin with every WebSocket: it must be the page's own.

    On loopback, the Host must be a loopback name too: a page whose DNS name
    was rebound to 127.0.0.1 is same-origin with itself, not with us.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser: nothing to protect against
    host = (request.host or "").lower()
    if urlsplit(origin).netloc.lower() != host:
        return False
    return not loopback_only or _is_loopback(urlsplit(f"//{host}").hostname or "")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "-c", "--connect", default=None, metavar="URI", help="libvirt URI (default: libvirt's)"
    )
    parser.add_argument("--domain", required=True, help="domain name or UUID")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (0: any free one)")
    parser.add_argument("--device", default=None, help="console device alias (default: first)")
    parser.add_argument("--force", action="store_true", help="take the console over")
    return parser.parse_args(argv)


async def main(
    argv: Sequence[str] | None = None,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> str:
    """Serve the console until a signal or the end of the console; return why it stopped.

    ``task_status.started(port)`` reports the listening port (for
    ``await task_group.start(main, [...])``); cancel to stop it.
    """
    args = parse_args(argv)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    conn = await avs.connect(args.connect)
    try:
        domain = await avs.lookup_domain(conn, args.domain)
        # Leaving `async with` ends the console stream and releases it, so the
        # console can be opened again (without force) once we are gone.
        async with await avs.open_console(domain, args.device, force=args.force) as console:
            hub = ConsoleHub(console, args.domain, loopback_only=_is_loopback(args.host))
            runner = web.AppRunner(make_app(hub), handle_signals=False, access_log=None)
            await runner.setup()
            reason = "stopped"
            try:
                listener = socket.create_server((args.host, args.port), family=family)
                await web.SockSite(runner, listener).start()
                port = listener.getsockname()[1]
                host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
                print(f"serving http://{host}:{port}/", flush=True)
                task_status.started(port)
                async with anyio.create_task_group() as tg:

                    async def watch_signals() -> None:
                        nonlocal reason
                        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                            async for signum in signals:
                                reason = f"got {signal.Signals(signum).name}"
                                tg.cancel_scope.cancel()

                    async def watch_console() -> None:
                        nonlocal reason
                        reason = await hub.pump_guest_output()
                        tg.cancel_scope.cancel()

                    if sys.platform != "win32":
                        tg.start_soon(watch_signals)
                    tg.start_soon(watch_console)
            finally:
                with anyio.CancelScope(shield=True):
                    await hub.close_tabs(f"the web console stopped ({reason})")
                    await runner.cleanup()
            log.info("stopping: %s", reason)
            return reason
    finally:
        with anyio.CancelScope(shield=True):
            await avs.aclose_connection(conn)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        stopped = anyio.run(main)
    except (avs.AioVirtStreamError, OSError) as error:  # no such domain, port taken, ...
        sys.exit(f"web console: {error}")
    print(f"web console stopped: {stopped}", flush=True)
