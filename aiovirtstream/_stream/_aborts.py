"""Aborting a stream on its connection's runner: on request, or once collected open.

A stream collected while open is aborted too: left alone, libvirt's client
would go on queueing a download's data without limit, and the daemon
sending it (or, for an upload, holding the stream open) until the
connection closes. A finalizer runs on any thread, inside any lock held
when the collector starts, so it only queues the clean-up: the loop removes
the event callback, the connection's runner aborts the stream.
"""

from __future__ import annotations

__all__ = ["Abandoned", "abort_abandoned", "abort_quietly", "abort_and_release"]

import asyncio
import functools
import logging
from dataclasses import dataclass

import libvirt

from .._workers import SerialRunner, submit_to_worker
from ._readahead import ReadAhead
from ._sender import StreamSender
from ._subscription import EventSubscription

logger = logging.getLogger(__name__)


def abort_quietly(virstream: libvirt.virStream, description: str = "a stream") -> None:
    """Abort ``virstream`` (worker thread): libvirt's error, if any, is only logged.

    After an error libvirt has already torn the stream down; abort then only
    reports that again.
    """
    try:
        virstream.abort()
    except libvirt.libvirtError as error:
        logger.debug("%s: abort: %s", description, error)


@dataclass(frozen=True, slots=True)
class Abandoned:
    """What an open stream collected by the garbage collector leaves to clean up."""

    virstream: libvirt.virStream
    events: EventSubscription
    sender: StreamSender
    runner: SerialRunner
    ahead: ReadAhead
    description: str

    def clean_up(self) -> None:
        """Remove the event callback, give the socket back, abort (loop thread)."""
        self.sender.stop()
        self.events.remove()
        self.ahead.drop()
        logger.debug("%s was collected open: aborting it", self.description)
        abort = functools.partial(abort_and_release, self.virstream, self.sender, self.description)
        submit_to_worker(abort, self.runner)


def abort_abandoned(loop: asyncio.AbstractEventLoop, abandoned: Abandoned) -> None:
    """Have an unreferenced open stream aborted (from a finalizer: takes no lock).

    When ``loop`` is closed, the event callback is removed and the socket
    given back here: the stream then ends with its connection.
    """
    try:
        loop.call_soon_threadsafe(abandoned.clean_up)
    except RuntimeError:
        abandoned.events.remove()
        abandoned.ahead.drop()


def abort_and_release(virstream: libvirt.virStream, sender: StreamSender, description: str) -> None:
    """Abort a stream, then let its sender forget it (the connection's runner:
    after the send under way, if any)."""
    try:
        abort_quietly(virstream, description)
    finally:
        sender.release()
