"""Share one domain's serial console with several TCP clients.

One console stream is opened; what the guest writes goes to every client
(fan-out), what any client sends goes to the guest. A client that cannot keep
up is disconnected rather than slowing the others down. SIGINT/SIGTERM (or the
guest going away) closes the console stream and every client, then exits.

    python examples/console_proxy.py --uri qemu:///session --domain guest --port 4555
    nc 127.0.0.1 4555        # as many as you like

It listens on 127.0.0.1 unless told otherwise: there is no authentication,
anyone who can connect can type on the guest's console. ``--port 0`` picks a
free port; the first line printed says which one (``listening on HOST:PORT``).
Try it against a private daemon and the test guest of
``aiovirtstream.testing`` (``Sandbox("full").start_test_guest()``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

import aiovirtstream as avs

log = logging.getLogger("console_proxy")

#: Chunks of guest output waiting for one client before it counts as too slow.
CLIENT_BACKLOG = 1024


class ConsoleProxy:
    """Fan the console's output out to all clients; any client's input goes in."""

    def __init__(self, console: avs.AsyncStream) -> None:
        self.console = console
        self.clients: dict[anyio.abc.SocketStream, MemoryObjectSendStream[bytes]] = {}
        self.write_lock = anyio.Lock()  # one writer at a time on the console

    async def pump_guest_output(self) -> str:
        """Copy guest output to every client until the console ends; say why it ended."""
        try:
            async for chunk in self.console:
                for client, queue in list(self.clients.items()):
                    try:
                        queue.send_nowait(chunk)
                    except anyio.WouldBlock:
                        log.warning("client %s too slow: disconnected", _peer(client))
                        queue.close()
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        pass  # that client is leaving
        except anyio.BrokenResourceError as error:
            return f"console lost: {error}"  # e.g. taken over with force by another client
        return "the guest closed its console"

    async def serve_client(self, client: anyio.abc.SocketStream) -> None:
        """One client: its own writer task for guest output; its input goes to the console."""
        send, receive = anyio.create_memory_object_stream[bytes](CLIENT_BACKLOG)
        self.clients[client] = send
        log.info("client %s attached (%d now)", _peer(client), len(self.clients))
        try:
            async with client, send, receive, anyio.create_task_group() as tg:

                async def to_client() -> None:
                    try:
                        async for chunk in receive:
                            await client.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                    tg.cancel_scope.cancel()  # slow (queue closed) or gone

                tg.start_soon(to_client)
                try:
                    async for data in client:
                        async with self.write_lock:
                            await self.console.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass
                tg.cancel_scope.cancel()
        finally:
            del self.clients[client]
            log.info("client %s detached (%d left)", _peer(client), len(self.clients))


def _peer(client: anyio.abc.SocketStream) -> str:
    address = client.extra(anyio.abc.SocketAttribute.remote_address, None)
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", default=None, help="libvirt URI (default: libvirt's default)")
    parser.add_argument("--domain", required=True, help="domain name or UUID")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=4555, help="TCP port (0: any free one)")
    parser.add_argument("--device", default=None, help="console device alias (default: first)")
    parser.add_argument("--force", action="store_true", help="take the console over")
    return parser.parse_args(argv)


async def main(
    argv: Sequence[str] | None = None,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> str:
    """Run the proxy until a signal or the end of the console; returns why it stopped.

    ``task_status.started(port)`` reports the listening port (for
    ``await task_group.start(main, [...])``); cancel to stop it.
    """
    args = parse_args(argv)
    conn = await avs.connect(args.uri)
    try:
        domain = await avs.lookup_domain(conn, args.domain)
        # Leaving `async with` ends the console stream and releases it, so
        # the console can be opened again (without force) once we are gone.
        async with await avs.open_console(domain, args.device, force=args.force) as console:
            proxy = ConsoleProxy(console)
            listener = await anyio.create_tcp_listener(local_host=args.host, local_port=args.port)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            print(f"listening on {args.host}:{port}", flush=True)
            task_status.started(port)
            reason = "stopped"
            async with listener, anyio.create_task_group() as tg:

                async def watch_signals() -> None:
                    nonlocal reason
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for signum in signals:
                            reason = f"got {signal.Signals(signum).name}"
                            tg.cancel_scope.cancel()

                async def watch_console() -> None:
                    nonlocal reason
                    reason = await proxy.pump_guest_output()
                    tg.cancel_scope.cancel()

                if sys.platform != "win32":
                    tg.start_soon(watch_signals)
                tg.start_soon(watch_console)
                tg.start_soon(listener.serve, proxy.serve_client, tg)
            # The task group's cancellation closed every client's socket.
            log.info("stopping: %s", reason)
            return reason
    finally:
        with anyio.CancelScope(shield=True):
            await avs.aclose_connection(conn)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    print(f"console proxy stopped: {anyio.run(main)}", flush=True)
