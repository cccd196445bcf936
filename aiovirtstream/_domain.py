"""Domain streams: serial consoles, virtio-serial channels and screenshots.

A console or a channel is a bidirectional :class:`~aiovirtstream.AsyncStream`;
how one ends (the guest gone, a takeover, our own close) is in docs/consoles.md.
"""

from __future__ import annotations

__all__ = [
    "lookup_domain",
    "open_console",
    "open_channel",
    "screenshot",
    "screenshot_to_file",
    "SCREENSHOT_MAX_BYTES",
]

import contextlib
import os
import secrets
import uuid
from pathlib import Path

import anyio
import anyio.to_thread
import libvirt

from ._connection import map_connection_errors
from ._exceptions import ScreenshotTooLargeError
from ._stream import AsyncStream, open_stream
from ._workers import run_to_the_end, runner_for

SCREENSHOT_MAX_BYTES = 64 * 1024 * 1024
"""The default limit of a screenshot's size (``max_bytes``): an uncompressed
4096 x 4096 RGBA image; a 4K screen in PPM (uncompressed RGB) is 24 MiB."""


def _domain_name(domain: libvirt.virDomain) -> str:
    try:
        return str(domain.name())  # kept by the binding: no round trip
    except libvirt.libvirtError:  # pragma: no cover - name() is local
        return "?"


async def lookup_domain(
    conn: libvirt.virConnect, name_or_uuid: str | uuid.UUID
) -> libvirt.virDomain:
    """Find a domain by name or UUID, off the loop thread (a lookup is a round trip).

    A string that parses as a UUID is tried as one first, then as a name.
    Raises :class:`aiovirtstream.NotFoundError` when there is no such domain.
    """
    key = str(name_or_uuid)
    try:
        as_uuid: str | None = str(uuid.UUID(key))
    except ValueError:
        as_uuid = None

    def lookup() -> libvirt.virDomain:
        if as_uuid is not None:
            try:
                return conn.lookupByUUIDString(as_uuid)
            except libvirt.libvirtError as error:
                if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN or isinstance(
                    name_or_uuid, uuid.UUID
                ):
                    raise
        return conn.lookupByName(key)

    with map_connection_errors(conn, context=f"cannot find domain {key!r}"):
        return await run_to_the_end(lookup, runner_for(conn))


async def open_console(
    domain: libvirt.virDomain,
    dev_name: str | None = None,
    *,
    force: bool = False,
    safe: bool = False,
) -> AsyncStream:
    """Open the domain's console (``dev_name``: an alias such as ``serial0``; default the first).

    ``force`` (``VIR_DOMAIN_CONSOLE_FORCE``) takes the console over from
    whichever client holds it: that client's reads raise
    :class:`~aiovirtstream.StreamBrokenError`. Without it, a console held
    elsewhere raises :class:`~aiovirtstream.LibvirtError` ("Active console
    session exists"). ``safe`` (``VIR_DOMAIN_CONSOLE_SAFE``) refuses drivers
    that cannot guarantee exclusive access. How the stream ends: see the
    module documentation.
    """
    flags = (libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else 0) | (
        libvirt.VIR_DOMAIN_CONSOLE_SAFE if safe else 0
    )
    device = f" {dev_name!r}" if dev_name else ""
    return await open_stream(
        domain.connect(),
        lambda st: domain.openConsole(dev_name, st, flags),
        description=f"console{device} of domain {_domain_name(domain)!r}",
    )


async def open_channel(domain: libvirt.virDomain, name: str, *, force: bool = False) -> AsyncStream:
    """Open the domain's ``<channel>`` with target name (or alias) ``name``.

    QEMU serves only ``type='unix'`` channels. ``force``
    (``VIR_DOMAIN_CHANNEL_FORCE``) takes the channel over from another
    client, as for :func:`open_console`; the stream ends the same way.
    """
    flags = libvirt.VIR_DOMAIN_CHANNEL_FORCE if force else 0
    return await open_stream(
        domain.connect(),
        lambda st: domain.openChannel(name, st, flags),
        description=f"channel {name!r} of domain {_domain_name(domain)!r}",
    )


async def _open_screenshot(domain: libvirt.virDomain, screen: int) -> tuple[AsyncStream, str]:
    stream = await open_stream(
        domain.connect(),
        lambda st: domain.screenshot(st, screen, 0),
        description=f"screenshot of screen {screen} of domain {_domain_name(domain)!r}",
    )
    return stream, str(stream.start_result or "application/octet-stream")


def _check_size(received: int, max_bytes: int | None, screen: int) -> None:
    if max_bytes is not None and received > max_bytes:
        raise ScreenshotTooLargeError(
            f"the screenshot of screen {screen} is larger than max_bytes={max_bytes} "
            "(the daemon sent more): the stream was aborted; pass a larger max_bytes "
            "(or None) if such a screen is expected"
        )


async def screenshot(
    domain: libvirt.virDomain, screen: int = 0, *, max_bytes: int | None = SCREENSHOT_MAX_BYTES
) -> tuple[str, bytes]:
    """Take a screenshot of ``screen``: ``(mime type, image bytes)``, e.g. ``image/png``.

    The format is the hypervisor's choice (QEMU: PNG, or PPM from older
    ones). For large screens prefer :func:`screenshot_to_file`. An image
    larger than ``max_bytes`` (default :data:`SCREENSHOT_MAX_BYTES`, 64
    MiB; None: no limit) raises :class:`ScreenshotTooLargeError` as soon as
    that much arrived, and the stream is aborted: the image is held in
    memory, and its size is the daemon's to say.
    """
    stream, mime = await _open_screenshot(domain, screen)
    chunks: list[bytes] = []
    received = 0
    async with stream:
        async for chunk in stream:
            received += len(chunk)
            _check_size(received, max_bytes, screen)
            chunks.append(chunk)
    return mime, b"".join(chunks)


async def screenshot_to_file(
    domain: libvirt.virDomain,
    path: str | os.PathLike[str],
    screen: int = 0,
    *,
    max_bytes: int | None = SCREENSHOT_MAX_BYTES,
) -> str:
    """Stream a screenshot of ``screen`` into ``path``; returns the mime type.

    The image goes to a temporary file next to ``path`` (disk writes run in
    worker threads), renamed over ``path`` only once the daemon finished the
    stream: ``path`` is either the whole new image or untouched. The new
    file's permissions follow the umask, as ``open`` would make them.
    ``max_bytes`` limits the image's size as for :func:`screenshot`.
    """
    dest = Path(path)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")

    def create() -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(tmp, flags, 0o666)

    stream, mime = await _open_screenshot(domain, screen)
    try:
        async with stream:
            fd = await anyio.to_thread.run_sync(create)
            try:
                received = 0
                async for chunk in stream:
                    received += len(chunk)
                    _check_size(received, max_bytes, screen)
                    await anyio.to_thread.run_sync(_write_all, fd, chunk)
                await anyio.to_thread.run_sync(os.fsync, fd)
            finally:
                os.close(fd)
        await anyio.to_thread.run_sync(os.replace, tmp, dest)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_unlink_quietly, tmp)
        raise
    return mime


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
