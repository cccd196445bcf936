"""Streams: AsyncStream, how one is opened, and what it carries."""

from __future__ import annotations

from ._aborts import abort_quietly
from ._asyncstream import DEFAULT_WRITE_BUFFER, AsyncStream, stream_connection
from ._items import DEFAULT_READ_SIZE, MAX_CHUNK, Hole, ReceiveSink, StreamItem
from ._native import Buffer, Receiver, native_receive_available, receiver_for
from ._open import (
    adopt_stream,
    check_connection,
    check_stream_events,
    open_stream,
    start_stream_blocking,
)
from ._sender import StreamSender

__all__ = [
    "AsyncStream",
    "Hole",
    "StreamItem",
    "ReceiveSink",
    "MAX_CHUNK",
    "DEFAULT_READ_SIZE",
    "DEFAULT_WRITE_BUFFER",
    "Buffer",
    "Receiver",
    "receiver_for",
    "native_receive_available",
    "open_stream",
    "adopt_stream",
    "start_stream_blocking",
    "check_stream_events",
    "check_connection",
    "abort_quietly",
    "stream_connection",
    "StreamSender",
]
