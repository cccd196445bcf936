"""aiovirtstream: libvirt data streams, native to asyncio."""

from __future__ import annotations

from ._connection import (
    ConnectionWatch,
    aclose_connection,
    connect,
    connection_socket,
    watch_connection,
)
from ._domain import (
    SCREENSHOT_MAX_BYTES,
    lookup_domain,
    open_channel,
    open_console,
    screenshot,
    screenshot_to_file,
)
from ._events import EventImplStats, bind_event_loop, get_event_impl, register_event_impl
from ._exceptions import *  # noqa: F403
from ._exceptions import __all__ as _exceptions_all
from ._stream import AsyncStream, Hole, ReceiveSink, StreamItem, open_stream
from ._transfer import (
    Extent,
    ProgressCallback,
    ProgressTarget,
    TransferProgress,
    TransferResult,
    copy,
    download,
    file_extents,
    upload,
)
from ._volume import lookup_volume, open_volume_download, open_volume_upload

__all__ = [
    "connect",
    "aclose_connection",
    "connection_socket",
    "watch_connection",
    "ConnectionWatch",
    "register_event_impl",
    "bind_event_loop",
    "get_event_impl",
    "EventImplStats",
    "AsyncStream",
    "Hole",
    "StreamItem",
    "ReceiveSink",
    "open_stream",
    "open_volume_upload",
    "open_volume_download",
    "lookup_volume",
    "lookup_domain",
    "open_console",
    "open_channel",
    "screenshot",
    "screenshot_to_file",
    "SCREENSHOT_MAX_BYTES",
    "upload",
    "download",
    "copy",
    "TransferResult",
    "TransferProgress",
    "ProgressTarget",
    "ProgressCallback",
    "Extent",
    "file_extents",
    *_exceptions_all,
]
__version__ = "0.1.0.dev0"
