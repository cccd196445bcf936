"""Every exception aiovirtstream raises, and the one place that maps libvirt's.

Stream errors subclass the matching anyio exception; :func:`map_libvirt_errors`
turns a ``libvirtError`` into one of ours, the original kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
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

import contextlib
import traceback
from collections.abc import Iterator
from typing import TypeVar

import anyio
import libvirt


class AioVirtStreamError(Exception):
    """Base class of every error raised by aiovirtstream."""


class LibvirtError(AioVirtStreamError):
    """libvirt reported an error that has no more specific class here.

    ``code``, ``domain`` and ``libvirt_message`` are libvirt's own; the
    original ``libvirt.libvirtError`` is the ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        domain: int | None = None,
        libvirt_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.domain = domain
        self.libvirt_message = libvirt_message


class NotFoundError(LibvirtError, LookupError):
    """The domain, pool or volume named does not exist.

    (libvirt reports an unknown console or channel name as a plain
    :class:`LibvirtError`.)
    """


class UnsupportedError(LibvirtError):
    """The driver or the daemon does not support this operation or flag."""


class OperationInvalidError(LibvirtError):
    """The object is in a state that does not allow this (e.g. a volume in use)."""


class ConnectError(LibvirtError, ConnectionError):
    """Opening the connection failed, or the connection is gone."""


class EventLoopError(AioVirtStreamError, RuntimeError):
    """The libvirt event implementation cannot serve this loop."""


class EventLoopNotRegisteredError(EventLoopError):
    """The connection was opened before aiovirtstream's event implementation.

    libvirt reads a connection's stream events only if an event
    implementation was registered *before* ``virConnectOpen``. Open the
    connection with :func:`aiovirtstream.connect`, or call
    :func:`aiovirtstream.register_event_impl` before ``libvirt.open``.
    """


class StreamError(AioVirtStreamError):
    """Base class of errors of one stream."""


class StreamClosedError(StreamError, anyio.ClosedResourceError):
    """The stream was finished, aborted or closed by this side; it cannot be used."""


class StreamBrokenError(StreamError, anyio.BrokenResourceError):
    """The other side failed: the daemon reported an error, or the connection broke."""


class ConnectionLostError(StreamBrokenError, ConnectError):
    """The connection to the daemon was lost while the stream was in use.

    The daemon died or closed the connection, the network broke, or the
    keepalive gave up on a daemon that stopped answering. It is both a
    :class:`StreamBrokenError` and a :class:`ConnectError`. Every stream of
    that connection fails with it (and only those); the connection cannot
    be used again: close it with :func:`aiovirtstream.aclose_connection`
    and open a new one. ``uri`` names the host, ``reason`` says what
    libvirt reported (``"eof"``, ``"keepalive"``, ``"error"``, ``"client"``).
    """

    def __init__(self, message: str, *, uri: str, reason: str) -> None:
        super().__init__(message)
        self.uri = uri
        self.reason = reason


class StreamBusyError(StreamError, anyio.BusyResourceError):
    """Another task is already reading from (or writing to) this stream."""

    def __init__(self, action: str) -> None:
        # Not anyio's __init__: it would wrap our message in its own sentence.
        Exception.__init__(
            self,
            f"another task is already {action} this stream; "
            "use one reader and one writer per stream",
        )
        self.action = action


class InvalidRangeError(AioVirtStreamError, ValueError):
    """An ``offset`` or ``length`` is negative, or reaches past the volume's end.

    Raised before anything is sent, by the stream openers and the transfers
    alike. For a volume that is not raw (qcow2, ...) the end is that of its
    file on the host, which a download streams as it is.
    """


class ScreenshotTooLargeError(StreamError, ValueError):
    """The daemon sent a screenshot larger than ``max_bytes``; the stream was aborted."""


class SparseNotSupportedError(StreamError, ValueError):
    """A hole was sent or asked for on a stream that was not opened sparse.

    Holes exist only when the call that started the stream had its
    ``*_SPARSE_STREAM`` flag (e.g. ``VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM``).
    """


class TransferError(AioVirtStreamError):
    """A volume upload or download could not be done.

    A failed download to a path leaves no file behind; a failed upload may
    have written part of the volume (libvirt has no transactions): run it
    again.
    """


class DestinationExistsError(TransferError, FileExistsError):
    """The download's destination exists; pass ``overwrite=True`` to replace it."""


class SourceTooLargeError(TransferError, ValueError):
    """The upload's source does not fit in the volume (at the given offset)."""


class VolumeBusyError(TransferError, anyio.BusyResourceError):
    """Another transfer of this process is uploading into (or downloading from) the volume.

    libvirt does not lock a volume during a transfer, so aiovirtstream
    refuses, within one process, an upload while the volume is being moved
    in either direction, and a download while it is being uploaded. Nothing
    was sent or written; wait for the other transfer to end and try again.
    """

    def __init__(self, volume: str, activity: str) -> None:
        # Not anyio's __init__: it would wrap our message in its own sentence.
        Exception.__init__(
            self,
            f"volume {volume!r} is being {activity} by another transfer of this process: "
            "wait for that transfer to end (libvirt does not lock a volume, and two "
            "transfers that overlap with an upload would mix or read half-written data)",
        )
        self.volume = volume
        self.activity = activity


class SourceNotFoundError(TransferError, FileNotFoundError):
    """The upload's source file does not exist."""


class DestinationIsDirectoryError(TransferError, IsADirectoryError):
    """The download's destination is a directory; name a file inside it."""


class VolumeChangedError(TransferError):
    """The volume was deleted, or shrunk below the uploaded data, while an upload ran.

    libvirt locks nothing during a stream, and an upload into a volume
    deleted meanwhile goes on into the deleted file: the daemon reports
    success. :func:`aiovirtstream.upload` therefore checks the volume once
    the stream finished, and raises this when it is gone or smaller than the
    data written. The data is not (all) in the volume: find what else
    changed it (another program, virsh, a management tool), recreate or
    resize the volume, and upload again.
    """


class SandboxError(AioVirtStreamError):
    """The private libvirt daemon of :mod:`aiovirtstream.testing` failed."""


class DaemonNotInstalledError(SandboxError):
    """A program or driver module the sandbox needs is missing; ``package`` installs it."""

    def __init__(self, what: str, package: str) -> None:
        super().__init__(
            f"{what}; install the Debian package {package} "
            f"(apt-get install --no-install-recommends {package})"
        )
        self.package = package


class SandboxStartError(SandboxError):
    """libvirtd did not come up; the message ends with the tail of its log."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(f"{message}\n{log_tail}" if log_tail else message)
        self.log_tail = log_tail


class GuestPackageMissingError(SandboxError):
    """A file the test guest is built from is missing; ``package`` installs it."""

    def __init__(self, what: str, package: str) -> None:
        super().__init__(
            f"{what}; install the Debian package {package} "
            f"(apt-get install --no-install-recommends {package})"
        )
        self.package = package


_NOT_FOUND_CODES = frozenset(
    getattr(libvirt, name)
    for name in (
        "VIR_ERR_NO_DOMAIN",
        "VIR_ERR_NO_STORAGE_POOL",
        "VIR_ERR_NO_STORAGE_VOL",
        "VIR_ERR_NO_NETWORK",
        "VIR_ERR_NO_SECRET",
    )
    if hasattr(libvirt, name)
)
_UNSUPPORTED_CODES = frozenset(
    getattr(libvirt, name)
    for name in ("VIR_ERR_NO_SUPPORT", "VIR_ERR_ARGUMENT_UNSUPPORTED")
    if hasattr(libvirt, name)
)
# Raised by the RPC layer when the socket broke ("Cannot write data: Broken pipe").
_TRANSPORT_CODES = frozenset(
    getattr(libvirt, name)
    for name in ("VIR_ERR_SYSTEM_ERROR", "VIR_ERR_RPC", "VIR_ERR_INTERNAL_ERROR")
    if hasattr(libvirt, name)
)
_CONNECT_CODES = frozenset(
    getattr(libvirt, name)
    for name in ("VIR_ERR_NO_CONNECT", "VIR_ERR_AUTH_FAILED", "VIR_ERR_AUTH_CANCELLED")
    if hasattr(libvirt, name)
)


def libvirt_error_to_exception(
    error: libvirt.libvirtError,
    *,
    stream: bool = False,
    context: str | None = None,
) -> AioVirtStreamError:
    """Translate a ``libvirtError`` into the matching aiovirtstream exception.

    With ``stream=True`` errors with no more specific class become
    :class:`StreamBrokenError` (the other side failed mid-stream).
    The caller raises the result ``from error``.
    """
    code = error.get_error_code()
    domain = error.get_error_domain()
    libvirt_message = error.get_error_message() or str(error)
    message = f"{context}: {libvirt_message}" if context else libvirt_message
    kwargs = {"code": code, "domain": domain, "libvirt_message": libvirt_message}
    if code in _NOT_FOUND_CODES:
        return NotFoundError(message, **kwargs)
    if code in _UNSUPPORTED_CODES:
        return UnsupportedError(message, **kwargs)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return OperationInvalidError(message, **kwargs)
    if stream:
        return StreamBrokenError(message)
    if code in _CONNECT_CODES or (domain == libvirt.VIR_FROM_RPC and code in _TRANSPORT_CODES):
        return ConnectError(message, **kwargs)
    return LibvirtError(message, **kwargs)


@contextlib.contextmanager
def map_libvirt_errors(*, stream: bool = False, context: str | None = None) -> Iterator[None]:
    """Re-raise any ``libvirtError`` from the block as ours, keeping it as ``__cause__``."""
    try:
        yield
    except libvirt.libvirtError as error:
        raise libvirt_error_to_exception(error, stream=stream, context=context) from error


_E = TypeVar("_E", bound=BaseException)


def detach_traceback(error: _E) -> _E:
    """Make ``error`` safe to keep past the frame that caught it.

    An exception handed to a future or another thread keeps its traceback,
    whose frames keep their locals (and, through ``f_back``, the locals of
    the frame that caught it), among them whatever holds that future: a
    reference cycle that keeps a stream and its connection alive until the
    garbage collector runs. The frames are dropped; where the error was
    raised is kept as a note (shown in printed tracebacks).
    """
    tb = error.__traceback__
    if tb is not None and tb.tb_next is not None:
        where = "".join(traceback.format_tb(tb.tb_next)).rstrip()
        error.add_note(f"raised in:\n{where}")
    return error.with_traceback(None)
