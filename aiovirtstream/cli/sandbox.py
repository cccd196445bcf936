"""``sandbox``: a private libvirtd (:class:`aiovirtstream.testing.Sandbox`) until Ctrl+C.

It prints the URIs to try every other verb against, then waits; Ctrl+C,
SIGTERM or SIGHUP stop the daemon, its guests and remove its folder (exit 0).
"""

from __future__ import annotations

__all__ = ["cmd_sandbox"]

import argparse
import json
import re
import signal

import anyio

from .errors import CommandError
from .output import err, say
from .signals import TERMINATING, handle_signals

_POOL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


async def cmd_sandbox(args: argparse.Namespace) -> int:
    """``aiovirtstream sandbox``: start, print, wait for a signal, stop."""
    from aiovirtstream.testing import Sandbox, guest_requirements_problem

    full = args.full or args.guest
    if args.guest:
        problem = await anyio.to_thread.run_sync(lambda: guest_requirements_problem())
        if problem is not None:
            raise CommandError(f"the test guest cannot run here: {problem}")
    for name in args.pool:
        if not _POOL_NAME.fullmatch(name):
            raise CommandError(f"pool name {name!r}: use letters, digits and _.+-")
    stop = anyio.Event()
    sandbox = Sandbox("full" if full else "storage", tcp=args.tcp)
    await sandbox.astart()  # a Ctrl+C meanwhile: stopped and removed, exit 130
    try:
        # From here on a signal asks the sandbox to stop, also while it stops.
        with handle_signals((signal.SIGINT, *TERMINATING), stop.set):
            try:
                pools = [await sandbox.acreate_pool(name) for name in args.pool]
                guest = await sandbox.astart_test_guest() if args.guest else None
                info: dict[str, object] = {
                    "uri": sandbox.uri,
                    "tcp_uri": sandbox.tcp_uri if args.tcp else None,
                    "mode": sandbox.mode,
                    "path": str(sandbox.path),
                    "pid": sandbox.pid,
                    "daemon_user": sandbox.daemon_user,
                    "pools": [{"name": p.name, "path": str(p.path)} for p in pools],
                    "guest": guest.name if guest is not None else None,
                }
                if args.json:
                    say(json.dumps(info))
                else:
                    _describe(info)
                await stop.wait()
                if not args.json:
                    err("aiovirtstream: stopping the sandbox")
            finally:
                await sandbox.astop()
    finally:
        await sandbox.astop()  # idempotent; for a cancellation before the handlers
    return 0


def _describe(info: dict[str, object]) -> None:
    driver = "every driver, qemu included" if info["mode"] == "full" else "storage driver only"
    say(f"sandbox libvirtd running as {info['daemon_user']!r} ({driver}), pid {info['pid']}")
    say(f"  folder:  {info['path']}")
    say(f"  uri:     {info['uri']}")
    if info["tcp_uri"]:
        say(f"  tcp_uri: {info['tcp_uri']}")
    for pool in info["pools"]:  # type: ignore[attr-defined]
        say(f"  pool:    {pool['name']} ({pool['path']})")
    if info["guest"]:
        say(f"  guest:   {info['guest']} (aiovirtstream console -c URI {info['guest']})")
    say(f"Try:  export LIBVIRT_DEFAULT_URI='{info['uri']}'")
    say("Ctrl+C (or SIGTERM) stops it and removes everything.")
