"""examples/image_service.py, started as a subprocess against the sandbox and used over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _helpers.processes import rss

from aiovirtstream.testing import PoolInfo, Sandbox

try:
    import aiohttp
except ImportError:  # pragma: no cover - depends on the environment
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        raise  # CI installs the examples extra: a missing aiohttp is a failure there
    pytest.skip(
        "AIOHTTP NOT INSTALLED, the image service example is not tested: "
        "pip install -e '.[examples]' (CI runs these tests)",
        allow_module_level=True,
    )

MiB = 1024 * 1024
GiB = 1024 * MiB
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "image_service.py"
Layout = list[tuple[int, int]]  # data extents (offset, length); everything else is a hole


@dataclass
class Service:
    """A running image service: its base URL and the file its log goes to."""

    url: str
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def volume_url(self, pool: PoolInfo, name: str) -> str:
        return f"{self.url}{pool.name}/{name}"

    async def wait_for_log(self, text: str) -> str:
        """The log once it holds ``text`` (within 15 s)."""
        deadline = time.monotonic() + 15
        while text not in (log := self.log()):
            assert time.monotonic() < deadline, f"{text!r} not logged; the log:\n{log}"
            await asyncio.sleep(0.05)
        return log

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM the service; its exit code (it must end within ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"no exit {timeout} s after SIGTERM; log:\n{self.log()}") from None


def start_service(uri: str, folder: Path, *extra: str) -> Service:
    log_path = folder / "image_service.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--connect", uri, "--host", "127.0.0.1",
             "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=log,
        )  # fmt: skip
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("image service: http://"):
        proc.kill()
        proc.wait()
        raise AssertionError(f"the service did not start ({line!r}):\n{log_path.read_text()}")
    return Service(line.split(": ", 1)[1].strip(), log_path, proc)


@pytest.fixture
def service(libvirt_sandbox: Sandbox, tmp_path: Path) -> Iterator[Service]:
    started = start_service(libvirt_sandbox.uri, tmp_path)
    try:
        yield started
    finally:
        code = started.stop()
    assert code == 0, f"exit code {code} after SIGTERM; log:\n{started.log()}"
    assert "stopping" in started.log()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        yield session


def write_sparse(path: Path, size: int, layout: Layout) -> str:
    """A sparse file of ``size`` bytes with random data at ``layout``; returns its sha256."""
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in layout:
            f.seek(offset)
            f.write(os.urandom(length))
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def expected_extents(size: int, layout: Layout) -> list[dict[str, object]]:
    extents: list[dict[str, object]] = []
    position = 0
    for offset, length in [*layout, (size, 0)]:
        if offset > position:
            extents.append(
                {"start": position, "length": offset - position, "zero": True, "hole": True}
            )
        if length:
            extents.append({"start": offset, "length": length, "zero": False, "hole": False})
        position = offset + length
    return extents


def allocation(sandbox: Sandbox, pool: PoolInfo, name: str) -> int:
    with sandbox.connect() as conn:
        return int(conn.storagePoolLookupByName(pool.name).storageVolLookupByName(name).info()[2])


async def put_bytes(http: aiohttp.ClientSession, url: str, data: bytes) -> None:
    async with http.put(url, data=data) as response:
        assert response.status == 200, await response.text()


async def error_of(response: aiohttp.ClientResponse, status: int) -> str:
    """The ``error`` (class name) of a JSON error response with ``status``."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["message"]
    return str(body["error"])


async def test_sparse_1_gib_round_trip_and_its_extents(
    service: Service, http: aiohttp.ClientSession, libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo, tmp_path: Path,
) -> None:  # fmt: skip
    layout = [(0, MiB), (300 * MiB, 3 * MiB), (GiB - MiB, MiB)]
    source = tmp_path / "sparse.img"
    digest = write_sparse(source, GiB, layout)
    await libvirt_sandbox.acreate_volume(libvirt_pool, "big.img", GiB)
    url = service.volume_url(libvirt_pool, "big.img")

    with source.open("rb") as body:  # aiohttp streams a file, with its Content-Length
        async with http.put(url, data=body) as response:
            assert response.status == 200, await response.text()
            stored = await response.json()
    assert stored["bytes"] == GiB
    assert stored["data_bytes"] == 5 * MiB  # the zeroes went as holes
    assert allocation(libvirt_sandbox, libvirt_pool, "big.img") < 16 * MiB

    received = hashlib.sha256()
    async with http.get(url) as response:
        assert response.status == 200
        assert response.content_length == GiB
        assert response.headers["Accept-Ranges"] == "bytes"
        async for chunk in response.content.iter_chunked(4 * MiB):
            received.update(chunk)
    assert received.hexdigest() == digest

    async with http.get(f"{url}/extents") as response:
        assert response.status == 200
        assert await response.json() == expected_extents(GiB, layout)
    assert " stored (" in service.log()


async def test_extents_of_a_fragmented_and_of_an_empty_volume(
    service: Service, http: aiohttp.ClientSession, libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
) -> None:  # fmt: skip
    size = 8 * MiB
    layout = [(i * 256 * 1024, 64 * 1024) for i in range(1, 32, 3)]
    content = bytearray(size)
    for offset, length in layout:
        content[offset : offset + length] = os.urandom(length)
    await libvirt_sandbox.acreate_volume(libvirt_pool, "frag.img", size)
    await libvirt_sandbox.acreate_volume(libvirt_pool, "empty.img", size)
    await put_bytes(http, service.volume_url(libvirt_pool, "frag.img"), bytes(content))

    async with http.get(service.volume_url(libvirt_pool, "frag.img") + "/extents") as response:
        assert await response.json() == expected_extents(size, layout)
    async with http.get(service.volume_url(libvirt_pool, "empty.img") + "/extents") as response:
        assert await response.json() == expected_extents(size, [])


async def test_ranged_get(
    service: Service, http: aiohttp.ClientSession, libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
) -> None:  # fmt: skip
    size = 8 * MiB
    content = os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(3 * MiB)
    await libvirt_sandbox.acreate_volume(libvirt_pool, "ranges.img", size)
    url = service.volume_url(libvirt_pool, "ranges.img")
    await put_bytes(http, url, content)

    cases = {
        "bytes=0-0": (0, 0),
        "bytes=100-200": (100, 200),
        "bytes=3145000-5243000": (3145000, 5243000),  # across the zeroes stored as a hole
        f"bytes={size - 1000}-": (size - 1000, size - 1),
        "bytes=-4096": (size - 4096, size - 1),
        f"bytes=5000-{size * 4}": (5000, size - 1),  # a last byte past the end is the end
    }
    for asked, (first, last) in cases.items():
        async with http.get(url, headers={"Range": asked}) as response:
            assert response.status == 206, asked
            assert response.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
            assert response.content_length == last - first + 1
            assert await response.read() == content[first : last + 1], asked

    async with http.head(url) as response:
        assert response.status == 200 and response.content_length == size
        assert await response.read() == b""

    for bad in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=9-3", "bytes=0-1,5-9"):
        async with http.get(url, headers={"Range": bad}) as response:
            assert await error_of(response, 416) == "HTTPProblem", bad
            assert response.headers["Content-Range"] == f"bytes */{size}"


async def test_a_slow_client_holds_its_download_not_the_services_memory(
    service: Service, http: aiohttp.ClientSession, libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
) -> None:  # fmt: skip
    """A GET read slowly holds the daemon back through the download's queue: the
    service does not take the rest of the volume into memory meanwhile."""
    size = 256 * MiB
    await libvirt_sandbox.acreate_volume(libvirt_pool, "slow-get.img", size)
    url = service.volume_url(libvirt_pool, "slow-get.img")
    await put_bytes(http, url, os.urandom(size))
    base = peak = rss(service.proc.pid)
    received = 0
    async with http.get(url) as response:
        assert response.status == 200
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            received += len(await response.content.read(64 * 1024))
            peak = max(peak, rss(service.proc.pid))
            await asyncio.sleep(0.005)
    assert 0 < received < size, "the client was meant to be slower than the daemon"
    growth = peak - base
    print(f"service RSS growth {growth / MiB:.1f} MiB, {received / MiB:.1f} MiB read")
    assert growth < 64 * MiB


async def test_requests_the_volume_refuses_get_json_errors(
    service: Service, http: aiohttp.ClientSession, libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
) -> None:  # fmt: skip
    await libvirt_sandbox.acreate_volume(libvirt_pool, "small.img", MiB)
    url = service.volume_url(libvirt_pool, "small.img")

    async with http.put(url, data=bytes(MiB + 1)) as response:
        assert await error_of(response, 413) == "SourceTooLargeError"
    async with http.put(f"{url}?offset=4096", data=bytes(MiB)) as response:
        assert await error_of(response, 413) == "SourceTooLargeError"
    async with http.put(f"{url}?offset={MiB + 1}", data=b"x") as response:
        assert await error_of(response, 416) == "HTTPProblem"
    async with http.put(f"{url}?offset=-3", data=b"x") as response:
        assert await error_of(response, 400) == "HTTPProblem"
    assert allocation(libvirt_sandbox, libvirt_pool, "small.img") == 0  # nothing was written

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: found out as it comes
        for _ in range(3):
            yield os.urandom(MiB // 2)

    async with http.put(url, data=chunked()) as response:
        assert "Content-Length" not in response.request_info.headers
        assert await error_of(response, 413) == "SourceTooLargeError"

    for missing in (service.volume_url(libvirt_pool, "nope.img"), f"{service.url}nopool/x.img"):
        async with http.get(missing) as response:
            assert await error_of(response, 404) == "NotFoundError"
        async with http.get(f"{missing}/extents") as response:
            assert await error_of(response, 404) == "NotFoundError"

    # The refused chunked PUT may have stored part of its body before it
    # overflowed (an aborted upload leaves what reached the volume): read
    # around the bytes a PUT at an offset writes, from a known state.
    async with http.put(url, data=bytes(MiB)) as response:
        assert response.status == 200
    async with http.put(f"{url}?offset=4096", data=b"tail") as response:
        assert response.status == 200  # a PUT at an offset writes only there
    async with http.get(url, headers={"Range": "bytes=4090-4103"}) as response:
        assert await response.read() == bytes(6) + b"tail" + bytes(4)


async def test_interrupted_put_is_aborted_and_reported(
    service: Service, http: aiohttp.ClientSession, libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
) -> None:  # fmt: skip
    size = 32 * MiB
    await libvirt_sandbox.acreate_volume(libvirt_pool, "cut.img", size)
    url = service.volume_url(libvirt_pool, "cut.img")
    host, port = url.split("/")[2].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    path = f"/volumes/{libvirt_pool.name}/cut.img"
    writer.write(f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n\r\n".encode())
    writer.write(os.urandom(5 * MiB))  # of the 32 MiB announced
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    await writer.wait_closed()

    log = await service.wait_for_log("failed with 400 (IncompleteBodyError")
    assert "not stored, the upload was refused or aborted" in log
    assert " stored (" not in log  # the service never reported the cut upload as done

    content = os.urandom(size)
    await put_bytes(http, url, content)  # the volume is free again: no 409
    async with http.get(url) as response:
        assert await response.read() == content
    assert " stored (" in service.log()


async def test_two_gets_at_once_and_a_put_meanwhile_is_refused(
    service: Service, http: aiohttp.ClientSession, libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
) -> None:  # fmt: skip
    size = 64 * MiB
    content = os.urandom(size)
    await libvirt_sandbox.acreate_volume(libvirt_pool, "shared.img", size)
    url = service.volume_url(libvirt_pool, "shared.img")
    await put_bytes(http, url, content)

    async def get(headers: dict[str, str]) -> bytes:
        async with http.get(url, headers=headers) as response:
            assert response.status in (200, 206)
            return await response.read()

    whole, part = await asyncio.gather(get({}), get({"Range": "bytes=1000-40000000"}))
    assert whole == content and part == content[1000:40000001]

    async with http.get(url) as slow:  # its download runs while we do not read it
        first = await slow.content.readexactly(MiB)
        async with http.put(url, data=b"new") as response:
            assert await error_of(response, 409) == "VolumeBusyError"
        async with http.get(url, headers={"Range": "bytes=0-9"}) as response:
            assert await response.read() == content[:10]  # downloads share the volume
        assert first + await slow.read() == content


async def test_sigterm_ends_a_transfer_under_way_and_the_service(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    service = start_service(libvirt_sandbox.uri, tmp_path, "--shutdown-timeout", "0.5")
    try:
        await libvirt_sandbox.acreate_volume(libvirt_pool, "long.img", 16 * GiB)
        url = service.volume_url(libvirt_pool, "long.img")
        async with http.get(url) as response:
            await response.content.readexactly(MiB)
            service.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()  # less than the Content-Length it announced
        code = await asyncio.to_thread(service.proc.wait, 15)
        ended = time.monotonic() - signalled
    finally:
        if service.proc.poll() is None:
            service.stop()
    assert code == 0, service.log()
    assert ended < 5, f"{ended:.1f} s from SIGTERM to exit"
    log = service.log()
    assert "stopping" in log and "connection closed" in log


async def test_a_lost_daemon_is_a_502_and_the_service_keeps_running(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with Sandbox() as sandbox:
        pool = await sandbox.acreate_pool("lost")
        await sandbox.acreate_volume(pool, "disk.img", MiB)
        service = start_service(sandbox.uri, tmp_path)
        try:
            url = service.volume_url(pool, "disk.img")
            async with http.get(url) as response:
                assert response.status == 200 and len(await response.read()) == MiB
            await asyncio.to_thread(sandbox.kill)
            async with http.get(url) as response:
                assert await error_of(response, 502) in ("ConnectionLostError", "ConnectError")
            async with http.get(f"{url}/extents") as response:  # still answering
                assert response.status == 502
        finally:
            code = service.stop()
        assert code == 0, service.log()


async def test_a_volume_being_put_is_refused_to_other_transfers(
    service: Service, http: aiohttp.ClientSession, libvirt_sandbox: Sandbox,
    libvirt_pool: PoolInfo,
) -> None:  # fmt: skip
    size = 4 * MiB
    await libvirt_sandbox.acreate_volume(libvirt_pool, "busy.img", size)
    url = service.volume_url(libvirt_pool, "busy.img")
    go_on = asyncio.Event()
    content = os.urandom(size)

    async def slow_body() -> AsyncIterator[bytes]:
        yield content[:MiB]
        await go_on.wait()
        yield content[MiB:]

    async def put() -> int:
        headers = {"Content-Length": str(size)}
        async with http.put(url, data=slow_body(), headers=headers) as response:
            return response.status

    putting = asyncio.create_task(put())
    try:
        deadline = time.monotonic() + 15
        while True:
            async with http.get(f"{url}/extents") as response:
                if response.status == 409:
                    assert (await response.json())["error"] == "VolumeBusyError"
                    break
            assert time.monotonic() < deadline, "extents were served during the PUT"
            await asyncio.sleep(0.05)
        async with http.get(url) as response:
            assert await error_of(response, 409) == "VolumeBusyError"
        async with http.put(url, data=b"x") as response:
            assert await error_of(response, 409) == "VolumeBusyError"
        async with http.get(f"{url}/extents") as response:  # the refused PUT changed nothing
            assert await error_of(response, 409) == "VolumeBusyError"
    finally:
        go_on.set()
        status = await putting
    assert status == 200
    async with http.get(url) as response:
        assert await response.read() == content
