"""Aborting a stream on its connection's runner: on request, or once collected open.

A stream collected while open is aborted too: left alone, libvirt's client
would go on queueing a download's data without limit, and the daemon
sending it (or, for an upload, holding the stream open) until the
connection closes. A finalizer runs on any thread, inside any lock held
when the collector starts, so it only queues the clean-up: the loop removes
the event callback, the connection's runner aborts the stream.
"""

from __future__ import annotations

__all__ = ["abort_abandoned", "abort_quietly", "abort_and_release"]

import asyncio
import functools
import logging

import libvirt

from .._workers import SerialRunner, submit_to_worker
from ._readahead import ReadAhead
from ._sender import StreamSender
from ._subscription import EventSubscription

logger = logging.getLogger(__name__)


def abort_quietly(virstream: libvirt.virStream) -> None:
    """Abort ``virstream`` (worker thread), for a stream nobody uses any more:
    libvirt's error, if any, is only logged."""
    try:
        virstream.abort()
    except libvirt.libvirtError as error:
        logger.debug("abort of a stream that nobody uses: %s", error)


def abort_abandoned(
    loop: asyncio.AbstractEventLoop,
    virstream: libvirt.virStream,
    events: EventSubscription,
    sender: StreamSender,
    runner: SerialRunner,
    description: str,
    ahead: ReadAhead,
) -> None:
    """Have an unreferenced open stream aborted (from a finalizer: takes no lock).

    When ``loop`` is closed, only the event callback is removed here: the
    stream then ends with its connection.
    """
    try:
        loop.call_soon_threadsafe(_clean_up, virstream, events, sender, runner, description, ahead)
    except RuntimeError:
        events.remove()


def _clean_up(
    virstream: libvirt.virStream,
    events: EventSubscription,
    sender: StreamSender,
    runner: SerialRunner,
    description: str,
    ahead: ReadAhead,
) -> None:
    sender.stop()
    events.remove()
    ahead.drop()
    logger.debug("%s was collected open: aborting it", description)
    submit_to_worker(functools.partial(abort_and_release, virstream, sender, description), runner)


def abort_and_release(virstream: libvirt.virStream, sender: StreamSender, description: str) -> None:
    """Abort a stream, then let its sender forget it (the connection's runner:
    after the send under way, if any)."""
    try:
        virstream.abort()
    except libvirt.libvirtError as error:
        # After an error libvirt has already torn the stream down; abort then
        # only reports that again.
        logger.debug("%s: abort: %s", description, error)
    finally:
        sender.release()
