"""Disk images over HTTP, the way oVirt's imageio serves them: aiohttp and aiovirtstream.

    python examples/image_service.py --connect URI [--host 127.0.0.1] [--port 8080]

``PUT /volumes/{pool}/{name}[?offset=N]`` streams the request body into the
volume (zero blocks become holes in a volume that holds no data yet), ``GET
/volumes/{pool}/{name}`` streams the volume out (one ``Range: bytes=a-b``
gives a 206), ``GET /volumes/{pool}/{name}/extents`` lists its data and
holes as JSON (``[{"start", "length", "zero", "hole"}]``). Errors come back
as ``{"error": class name, "message": ...}`` with a status that says what
kind they are (404, 409, 413, 416, 502, ...). The first line on stdout is
the service's URL (``--port 0`` picks a free port); SIGTERM or Ctrl+C stop
it (transfers under way get ``--shutdown-timeout`` seconds, then are aborted).

Try it against a private libvirt daemon: ``aiovirtstream sandbox --pool
images`` prints the sandbox's URI; pass it as ``--connect``, make a volume
(``virsh -c URI vol-create-as images disk.img 1G --allocation 0 --format raw``:
without ``--allocation 0`` it is preallocated, and zeroes are then stored as data),
then::

    curl -T disk.img http://127.0.0.1:8080/volumes/images/disk.img
    curl -r 0-1023 http://127.0.0.1:8080/volumes/images/disk.img | xxd | head
    curl http://127.0.0.1:8080/volumes/images/disk.img/extents

From Python, ``aiovirtstream.testing.Sandbox`` does the same:
``async with Sandbox() as sb``, ``await sb.acreate_pool("images")``,
``await sb.acreate_volume("images", "disk.img", 1 << 30)``, then run this
script with ``--connect`` ``sb.uri``. Needs aiohttp (``pip install
'aiovirtstream[examples]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from xml.etree import ElementTree

import anyio.abc
import anyio.to_thread
import libvirt
from aiohttp import web

import aiovirtstream as avs

MiB = 1024 * 1024
#: The request body is handed to the upload in pieces of this size.
BODY_CHUNK = MiB
logger = logging.getLogger("image_service")


class HTTPProblem(Exception):
    """A request the service refuses, with its status (and headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class IncompleteBodyError(Exception):
    """The client sent less than its Content-Length, or its connection broke."""


# Most specific first: ConnectionLostError is also a StreamBrokenError and a ConnectError.
STATUS_OF: tuple[tuple[type[BaseException], int], ...] = (
    (avs.NotFoundError, 404),
    (avs.VolumeBusyError, 409),
    (avs.VolumeChangedError, 409),
    (avs.OperationInvalidError, 409),
    (avs.SourceTooLargeError, 413),
    (avs.InvalidRangeError, 416),
    (IncompleteBodyError, 400),
    (avs.UnsupportedError, 501),
    (avs.ConnectionLostError, 502),
    (avs.ConnectError, 502),
    (avs.StreamBrokenError, 502),
    (avs.AioVirtStreamError, 500),
)


def status_of(error: BaseException) -> int | None:
    """The HTTP status for an error (None: not one of ours, a bug)."""
    if isinstance(error, HTTPProblem):
        return error.status
    for kind, status in STATUS_OF:
        if isinstance(error, kind):
            return status
    return None


def error_response(error: BaseException, status: int) -> web.Response:
    headers = error.headers if isinstance(error, HTTPProblem) else None
    body = {"error": type(error).__name__, "message": str(error)}
    return web.json_response(body, status=status, headers=headers)


@dataclass(frozen=True)
class Size:
    """How many bytes a volume's streams carry, and how many it has allocated."""

    streamed: int  # the capacity of a raw volume, the file's size for qcow2 and others
    allocation: int
    container: bool  # a file in a format other than raw, which grows as it is written


def volume_size(vol: libvirt.virStorageVol) -> Size:
    """Read ``vol``'s sizes from its XML (one round trip: call it in a thread)."""
    description = ElementTree.fromstring(vol.XMLDesc(0))

    def number(tag: str) -> int:
        return int(description.findtext(tag) or 0)

    fmt = description.find("target/format")
    container = description.get("type") == "file" and (
        fmt is not None and fmt.get("type") not in (None, "raw")
    )
    streamed = number("physical") if container else number("capacity")
    return Size(streamed, number("allocation"), container)


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str, size: int) -> tuple[int, int]:
    """``(offset, length)`` for one ``Range: bytes=`` range of a ``size``-byte volume."""
    unsatisfiable = {"Content-Range": f"bytes */{size}"}
    match = _RANGE.fullmatch(header.strip())
    if match is None or not (match[1] or match[2]):
        raise HTTPProblem(
            416,
            f"cannot serve Range {header!r}: ask for one range, bytes=FIRST-LAST",
            unsatisfiable,
        )
    if match[1]:
        first = int(match[1])
        last = min(int(match[2]), size - 1) if match[2] else size - 1
        if match[2] and int(match[2]) < first:
            raise HTTPProblem(416, f"Range {header!r} ends before it starts", unsatisfiable)
    else:
        first, last = max(size - int(match[2]), 0), size - 1
    if first >= size or last < first:
        raise HTTPProblem(
            416, f"Range {header!r} starts past the end of the volume ({size} bytes)", unsatisfiable
        )
    return first, last - first + 1


def query_offset(request: web.Request) -> int:
    text = request.query.get("offset", "0")
    if not text.isdigit():
        raise HTTPProblem(400, f"offset={text!r}: pass a byte position in the volume, 0 or more")
    return int(text)


class ResponseSink(anyio.abc.ByteSendStream):
    """A download's destination: the HTTP response, its headers sent with the first bytes.

    Until then a failure can still become an error response.
    """

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self.request = request
        self.response = response
        self.started = False

    async def send(self, item: bytes) -> None:
        if not self.started:
            self.started = True
            await self.response.prepare(self.request)
        await self.response.write(item)

    async def send_eof(self) -> None:
        if not self.started:
            self.started = True
            await self.response.prepare(self.request)
        await self.response.write_eof()

    async def aclose(self) -> None:
        pass


class ImageService:
    """The service's state: one libvirt connection, reopened after it was lost."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._connecting = asyncio.Lock()
        self._uploading: Counter[tuple[str, str]] = Counter()  # PUTs under way, by volume

    async def connection(self) -> libvirt.virConnect:
        async with self._connecting:
            if self._conn is not None and not self._conn.isAlive():
                await self.close()
            if self._conn is None:
                self._conn = await avs.connect(self.uri)
            return self._conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(avs.AioVirtStreamError, libvirt.libvirtError):
                await avs.aclose_connection(conn)

    async def volume(self, request: web.Request) -> tuple[libvirt.virStorageVol, Size]:
        pool, name = request.match_info["pool"], request.match_info["name"]
        vol = await avs.lookup_volume(await self.connection(), name, pool=pool)
        return vol, await anyio.to_thread.run_sync(volume_size, vol)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.put("/volumes/{pool}/{name}", self.put),
            web.get("/volumes/{pool}/{name}", self.get, allow_head=False),
            web.head("/volumes/{pool}/{name}", self.head),
            web.get("/volumes/{pool}/{name}/extents", self.extents),
        ]

    async def put(self, request: web.Request) -> web.StreamResponse:
        """Stream the body into the volume at ``?offset=`` (zero blocks as holes where they can)."""
        offset = query_offset(request)
        declared = request.content_length
        vol, size = await self.volume(request)
        if offset > size.streamed and not (size.container and offset == size.streamed):
            raise HTTPProblem(416, f"offset {offset} is past the volume's end ({size.streamed})")
        if declared is not None and not size.container and offset + declared > size.streamed:
            raise avs.SourceTooLargeError(
                f"{declared} bytes at offset {offset} do not fit in the volume "
                f"({size.streamed} bytes): resize it or send less"
            )
        key = (request.match_info["pool"], request.match_info["name"])
        self._uploading[key] += 1
        try:
            result = await avs.upload(
                vol,
                request_body(request, declared),
                offset=offset,
                length=declared or 0,
                detect_zeroes=True,
            )
        except BaseException as error:
            logger.error(
                "PUT %s/%s: not stored, the upload was refused or aborted (%s)",
                *key,
                type(error).__name__,
            )
            raise
        finally:
            self._uploading[key] -= 1
            if not self._uploading[key]:
                del self._uploading[key]
        logger.info(
            "PUT %s/%s: %d bytes at offset %d stored (%d data, %d as holes) in %.2f s",
            *key,
            result.total_bytes,
            offset,
            result.data_bytes,
            result.hole_bytes,
            result.seconds,
        )
        return web.json_response(
            {
                "offset": offset,
                "bytes": result.total_bytes,
                "data_bytes": result.data_bytes,
                "hole_bytes": result.hole_bytes,
                "seconds": result.seconds,
            }
        )

    async def head(self, request: web.Request) -> web.StreamResponse:
        """The headers a GET would have: the size, and that ranges are served."""
        _, size = await self.volume(request)
        response = web.StreamResponse(headers=_download_headers())
        response.content_length = size.streamed
        await response.prepare(request)
        return response

    async def get(self, request: web.Request) -> web.StreamResponse:
        """Stream the volume, or the one range asked for, out (holes as zeroes)."""
        vol, size = await self.volume(request)
        offset, length, status = 0, size.streamed, 200
        headers = _download_headers()
        if (asked := request.headers.get("Range")) is not None:
            offset, length = parse_range(asked, size.streamed)
            status = 206
            headers["Content-Range"] = f"bytes {offset}-{offset + length - 1}/{size.streamed}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        sink = ResponseSink(request, response)
        try:
            # download() holds the volume against an upload of this process for as
            # long as it runs (VolumeBusyError, 409).
            if length:
                await avs.download(vol, sink, offset=offset, length=length)
            await sink.send_eof()
        except BaseException as error:
            if not sink.started:
                raise  # nothing sent yet: an error response (or the service is stopping)
            logger.error(
                "GET %s: the download was aborted after the headers were sent (%s: %s); "
                "connection closed",
                request.path,
                type(error).__name__,
                error,
            )
            if request.transport is not None:
                request.transport.close()  # the client sees a body shorter than announced
            if not isinstance(error, Exception):
                raise
        return response

    async def extents(self, request: web.Request) -> web.StreamResponse:
        """The volume's data and holes, from a sparse download that drops the data.

        libvirt has no call that lists a volume's extents; a sparse stream
        carries holes as lengths, so this moves only the data. A volume with
        nothing allocated is one hole, without a stream.
        """
        pool, name = request.match_info["pool"], request.match_info["name"]
        if (pool, name) in self._uploading:
            raise avs.VolumeBusyError(name, "uploaded")
        vol, size = await self.volume(request)
        if size.allocation == 0:
            return web.json_response(_extents_json([(0, size.streamed, False)]))
        found: list[tuple[int, int, bool]] = []  # (start, length, is data), runs merged
        position = 0
        async with await avs.open_volume_download(vol, sparse=True) as stream:
            async for item in stream.iter_items(BODY_CHUNK):
                is_data = not isinstance(item, avs.Hole)
                length = len(item) if isinstance(item, bytes) else item.length
                if not length:
                    continue
                if found and found[-1][2] == is_data:
                    start, before, _ = found[-1]
                    found[-1] = (start, before + length, is_data)
                else:
                    found.append((position, length, is_data))
                position += length
        return web.json_response(_extents_json(found))


def _download_headers() -> dict[str, str]:
    return {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}


def _extents_json(found: list[tuple[int, int, bool]]) -> list[dict[str, object]]:
    return [
        {"start": start, "length": length, "zero": not data, "hole": not data}
        for start, length, data in found
        if length
    ]


async def request_body(request: web.Request, declared: int | None) -> AsyncIterator[bytes]:
    """The body in pieces of :data:`BODY_CHUNK`; a short one raises :class:`IncompleteBodyError`."""
    pending = bytearray()
    received = 0
    try:
        async for chunk in request.content.iter_chunked(BODY_CHUNK):
            received += len(chunk)
            pending += chunk
            while len(pending) >= BODY_CHUNK:  # whole pieces: zero blocks stay aligned
                yield bytes(pending[:BODY_CHUNK])
                del pending[:BODY_CHUNK]
    except (OSError, web.HTTPException, ValueError) as error:
        raise IncompleteBodyError(
            f"the request body broke off after {received} bytes ({type(error).__name__}: {error})"
        ) from error
    if declared is not None and received < declared:
        raise IncompleteBodyError(
            f"the request body ended after {received} of its {declared} bytes"
        )
    if pending:
        yield bytes(pending)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn the library's typed errors into statuses with a JSON body, and log them."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as error:
        status = status_of(error)
        if status is None:
            raise
        logger.error(
            "%s %s failed with %d (%s: %s)",
            request.method,
            request.path,
            status,
            type(error).__name__,
            error,
        )
        if isinstance(error, avs.ConnectionLostError):
            service: ImageService = request.app[SERVICE]
            await service.close()  # the next request connects again
        return error_response(error, status)


SERVICE = web.AppKey("service", ImageService)


def make_app(service: ImageService) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=MiB)
    app[SERVICE] = service
    app.add_routes(service.routes())
    return app


async def serve(args: argparse.Namespace) -> None:
    service = ImageService(args.connect)
    await service.connection()  # fail at start, not at the first request
    runner = web.AppRunner(make_app(service), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port, shutdown_timeout=args.shutdown_timeout)
        await site.start()
        port = runner.addresses[0][1]
        print(f"image service: http://{args.host}:{port}/volumes/", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        logger.info("stopping: transfers still running are aborted")
    finally:
        await runner.cleanup()
        await service.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--connect",
        "-c",
        metavar="URI",
        default=None,
        help="libvirt URI (default: LIBVIRT_DEFAULT_URI, then libvirt's own)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port (0: a free one)")
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="at SIGTERM, how long transfers under way may go on before they are aborted",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(args))
    except avs.AioVirtStreamError as error:
        print(f"image_service: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
