"""Streams collected while open: the daemon is told, as ``abort()`` would.

Left alone, libvirt's client goes on queueing the data of such a download
without limit, and the daemon goes on sending it (or, for an upload, holds
the stream open) until the connection closes. A finalizer runs on any
thread, inside any lock held when the collector starts, so it only queues
the clean-up: the loop removes the event callback, the connection's runner
aborts the stream.
"""

from __future__ import annotations

__all__ = ["abort_abandoned", "abort_quietly"]

import asyncio
import functools
import logging

import libvirt

from .._workers import SerialRunner, submit_to_worker
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
) -> None:
    """Have an unreferenced open stream aborted (from a finalizer: takes no lock).

    When ``loop`` is closed, only the event callback is removed here: the
    stream then ends with its connection.
    """
    try:
        loop.call_soon_threadsafe(_clean_up, virstream, events, sender, runner, description)
    except RuntimeError:
        events.remove()


def _clean_up(
    virstream: libvirt.virStream,
    events: EventSubscription,
    sender: StreamSender,
    runner: SerialRunner,
    description: str,
) -> None:
    sender.stop()
    events.remove()
    logger.debug("%s was collected open: aborting it", description)
    submit_to_worker(functools.partial(_abort, virstream, sender), runner)


def _abort(virstream: libvirt.virStream, sender: StreamSender) -> None:
    try:
        abort_quietly(virstream)
    finally:
        sender.release()
