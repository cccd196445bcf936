"""How the command fails: one line on stderr that says what to do, and an exit status.

2 for a usage error, 1 for a failure, 130 for Ctrl+C, 143 for SIGTERM; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "CommandError",
    "Terminated",
    "FAILURES",
    "describe",
    "single_errors",
]

import contextlib
from collections.abc import Iterator

import aiovirtstream as avs

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


class CommandError(Exception):
    """A failure the command reports in one line (exit status 1)."""


class Terminated(Exception):
    """SIGTERM (or SIGHUP) ended the command after its clean-up (exit status 143)."""


#: What :func:`describe` turns into one line with exit status 1.
FAILURES: tuple[type[BaseException], ...] = (avs.AioVirtStreamError, OSError, CommandError)

#: The library's advice in its keywords, said in the command's options.
_OPTION_FOR_KEYWORD = {
    "overwrite=True": "--overwrite",
    "sparse=False": "--no-sparse",
    "direct_io=False": "--page-cache",
    "pass an offset": "pass an --offset",
    "pass a length": "pass a --length",
}

#: libvirt's words when a connection cannot be opened, and what to do about them.
_CONNECT_ADVICE = (
    (
        "Cannot read CA certificate",
        "a TLS URI needs the CA certificate and a client certificate and key: name "
        "their folder in the URI (?pkipath=DIR) or install them under /etc/pki as "
        "libvirt's TLS setup says, or use an ssh URI (qemu+ssh://HOST/system)",
    ),
    (
        "Cannot read certificate",
        "a TLS URI needs a client certificate and key: name their folder in the URI "
        "(?pkipath=DIR) or install them under /etc/pki",
    ),
    (
        "Failed to connect socket",
        "no libvirt daemon listens there: start it (systemctl start libvirtd, or "
        "virtqemud.socket) or check the URI given with -c or LIBVIRT_DEFAULT_URI; "
        "'aiovirtstream sandbox' starts a private one",
    ),
    (
        "Connection refused",
        "nothing listens at that address: check the host and port, and that the "
        "daemon listens on the network (libvirtd --listen, or its tcp/tls socket units)",
    ),
    (
        "Could not resolve hostname",
        "check the host name in the URI",
    ),
    (
        "Unable to parse URI",
        "a libvirt URI looks like qemu:///system, qemu+ssh://USER@HOST/system or "
        "qemu+tls://HOST/system",
    ),
    (
        "Permission denied",
        "this user may not use that daemon: run as root, join the libvirt group, "
        "or use a session URI (qemu:///session)",
    ),
    (
        "authentication failed",
        "check the credentials the daemon asks for (its auth_* settings)",
    ),
)


def _connect_advice(message: str) -> str | None:
    for words, advice in _CONNECT_ADVICE:
        if words.lower() in message.lower():
            return advice
    return None


def describe(error: BaseException) -> str:
    """One line for ``error``: what went wrong and, where known, what to do."""
    if isinstance(error, OSError) and not isinstance(error, avs.AioVirtStreamError):
        if error.strerror and error.filename is not None:
            return f"{error.filename}: {error.strerror}"
        return error.strerror or str(error)
    message = str(error) or type(error).__name__
    for keyword, option in _OPTION_FOR_KEYWORD.items():
        message = message.replace(keyword, option)
    if isinstance(error, avs.ConnectionLostError):
        message += " (check that the daemon is running, then run the command again)"
    elif isinstance(error, avs.ConnectError):
        advice = _connect_advice(message)
        if advice is not None:
            message += f" ({advice})"
    elif isinstance(error, avs.SandboxError):
        message = message.split("\n", 1)[0]  # the log's tail follows with --debug
    return " ".join(message.split())  # libvirt's messages may span lines


@contextlib.contextmanager
def single_errors() -> Iterator[None]:
    """A task group's group of one exception raised as that exception (with its cause)."""
    single: BaseException | None = None
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = []
        pending: list[BaseException] = [group]
        while pending:
            error = pending.pop()
            if isinstance(error, BaseExceptionGroup):
                pending.extend(error.exceptions)
            else:
                leaves.append(error)
        if len(leaves) != 1:
            raise
        single = leaves[0]
    if single is not None:
        # Raised outside the handler: inside, its __context__ would be the
        # group that holds it (a reference cycle).
        try:
            raise single from single.__cause__
        finally:
            del single
