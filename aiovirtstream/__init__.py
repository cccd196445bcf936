"""aiovirtstream: libvirt data streams, native to asyncio.

Names are loaded on first use (PEP 562), all of them at once: importing the
package (the pytest plugin does, at every pytest start) costs nothing until
it is used, and no later first use stalls the loop with an import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from ._events import (
        EventImplStats,
        bind_event_loop,
        get_event_impl,
        register_event_impl,
    )
    from ._exceptions import (
        AioVirtStreamError,
        ConnectError,
        ConnectionLostError,
        DaemonNotInstalledError,
        DestinationExistsError,
        DestinationIsDirectoryError,
        EventLoopError,
        EventLoopNotRegisteredError,
        GuestPackageMissingError,
        InvalidRangeError,
        LibvirtError,
        NotFoundError,
        OperationInvalidError,
        SandboxError,
        SandboxStartError,
        ScreenshotTooLargeError,
        SourceNotFoundError,
        SourceTooLargeError,
        SparseNotSupportedError,
        StreamBrokenError,
        StreamBusyError,
        StreamClosedError,
        StreamError,
        TransferError,
        UnsupportedError,
        VolumeBusyError,
        VolumeChangedError,
        libvirt_error_to_exception,
        map_libvirt_errors,
    )
    from ._stream import (
        AsyncStream,
        Hole,
        ReceiveSink,
        StreamItem,
        open_stream,
    )
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
    from ._volume import (
        lookup_volume,
        open_volume_download,
        open_volume_upload,
    )

#: Where each public name lives but the exceptions (added below __all__).
_EXPORTS: dict[str, str] = {
    "ConnectionWatch": "._connection",
    "aclose_connection": "._connection",
    "connect": "._connection",
    "connection_socket": "._connection",
    "watch_connection": "._connection",
    "SCREENSHOT_MAX_BYTES": "._domain",
    "lookup_domain": "._domain",
    "open_channel": "._domain",
    "open_console": "._domain",
    "screenshot": "._domain",
    "screenshot_to_file": "._domain",
    "EventImplStats": "._events",
    "bind_event_loop": "._events",
    "get_event_impl": "._events",
    "register_event_impl": "._events",
    "AsyncStream": "._stream",
    "Hole": "._stream",
    "ReceiveSink": "._stream",
    "StreamItem": "._stream",
    "open_stream": "._stream",
    "Extent": "._transfer",
    "ProgressCallback": "._transfer",
    "ProgressTarget": "._transfer",
    "TransferProgress": "._transfer",
    "TransferResult": "._transfer",
    "copy": "._transfer",
    "download": "._transfer",
    "file_extents": "._transfer",
    "upload": "._transfer",
    "lookup_volume": "._volume",
    "open_volume_download": "._volume",
    "open_volume_upload": "._volume",
}

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
    "AioVirtStreamError",
    "LibvirtError",
    "NotFoundError",
    "UnsupportedError",
    "OperationInvalidError",
    "ConnectError",
    "EventLoopError",
    "EventLoopNotRegisteredError",
    "StreamError",
    "StreamClosedError",
    "StreamBrokenError",
    "ConnectionLostError",
    "StreamBusyError",
    "InvalidRangeError",
    "SparseNotSupportedError",
    "ScreenshotTooLargeError",
    "TransferError",
    "DestinationExistsError",
    "SourceTooLargeError",
    "VolumeBusyError",
    "VolumeChangedError",
    "SourceNotFoundError",
    "DestinationIsDirectoryError",
    "SandboxError",
    "DaemonNotInstalledError",
    "SandboxStartError",
    "GuestPackageMissingError",
    "map_libvirt_errors",
    "libvirt_error_to_exception",
]

__version__ = "0.1.0.dev0"
# The rest of __all__: the exceptions.
_EXPORTS.update(dict.fromkeys((name for name in __all__ if name not in _EXPORTS), "._exceptions"))


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Every name at once, on the first use of any (usually connect() at the
    # start): no later first use stalls the loop with an import.
    for exported, module in _EXPORTS.items():
        globals()[exported] = getattr(importlib.import_module(module, __name__), exported)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
