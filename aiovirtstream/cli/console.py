"""``console DOMAIN``: the terminal on a domain's console, as ``virsh console``.

The terminal is raw while connected (Ctrl+C goes to the guest) and restored on
every way out: Ctrl+], the guest's end, an error, SIGTERM, SIGHUP. The end of
stdin (a pipe) stops sending; the guest's output is still shown.
"""

from __future__ import annotations

__all__ = ["cmd_console", "ESCAPE", "raw_terminal"]

import argparse
import contextlib
import os
import sys
import termios
import tty
from collections.abc import Iterator

import anyio
import anyio.to_thread
import libvirt

import aiovirtstream as avs

from .errors import CommandError, single_errors
from .lookup import connection, find_domain
from .output import err

ESCAPE = b"\x1d"  # Ctrl+]


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """``fd``'s terminal in raw mode for the block, its settings restored after; no-op
    when ``fd`` is not a terminal."""
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    tty.setraw(fd, termios.TCSADRAIN)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def _guest_to_stdout(stream: avs.AsyncStream, out: int) -> None:
    """Show what the guest writes until its console ends (``b""``)."""
    while chunk := await stream.read(65536):
        await anyio.to_thread.run_sync(_write_all, out, chunk)


async def _read_input(fd: int, pollable: list[bool]) -> bytes:
    if pollable[0]:
        try:
            await anyio.wait_readable(fd)
        except PermissionError:  # a regular file or /dev/null: epoll refuses, reads never wait
            pollable[0] = False
    return os.read(fd, 4096)


async def _stdin_to_guest(stream: avs.AsyncStream, fd: int) -> bool:
    """Send what is typed; True once Ctrl+] was typed, False at the end of stdin."""
    pollable = [True]
    while data := await _read_input(fd, pollable):
        before, escape, _ = data.partition(ESCAPE)
        if before:
            await stream.write(before)
        if escape:
            return True
    return False


async def _how_it_ended(dom: libvirt.virDomain) -> str:
    def state() -> str:
        try:
            code = dom.state()[0]
        except libvirt.libvirtError:
            return "the domain is gone"
        return {
            libvirt.VIR_DOMAIN_SHUTOFF: "the domain shut off",
            libvirt.VIR_DOMAIN_CRASHED: "the domain crashed",
            libvirt.VIR_DOMAIN_SHUTDOWN: "the domain is shutting down",
        }.get(code, "the daemon closed it")

    return await anyio.to_thread.run_sync(state)


async def cmd_console(args: argparse.Namespace) -> int:
    """``aiovirtstream console``: connect stdin and stdout to the domain's console."""
    in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
    async with connection(args.connect) as conn:
        dom = await find_domain(conn, args.domain)
        name = dom.name()
        try:
            stream = await avs.open_console(dom, args.devname, force=args.force, safe=args.safe)
        except avs.LibvirtError as error:
            if "Active console session exists" in str(error):
                raise CommandError(
                    f"another client holds the console of domain {name!r}: pass --force "
                    "to take it over"
                ) from error
            raise
        err(f"Connected to domain '{name}'")
        err("Escape character is ^] (Ctrl + ])")
        left = False
        try:
            async with stream:
                with raw_terminal(in_fd), single_errors():
                    async with anyio.create_task_group() as tg:

                        async def typing() -> None:
                            nonlocal left
                            if await _stdin_to_guest(stream, in_fd):
                                left = True
                                tg.cancel_scope.cancel()

                        tg.start_soon(typing)
                        await _guest_to_stdout(stream, out_fd)
                        tg.cancel_scope.cancel()
        except avs.StreamBrokenError as error:
            if isinstance(error, avs.ConnectionLostError):
                raise
            raise CommandError(
                f"the console of domain {name!r} was closed by the daemon: another client "
                "took it over (--force), or the console failed"
            ) from error
        if not left:
            err(f"aiovirtstream: the console of domain {name!r} ended: {await _how_it_ended(dom)}")
    return 0
