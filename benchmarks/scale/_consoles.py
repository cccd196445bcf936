"""The console case: many consoles and channels open at once while transfers run.

libvirt lets one client hold a guest's console (``force`` takes it over,
ending the holder's stream), so consoles open *at once* need a device each:
the parent boots guests that have the test guest's kernel and initramfs, one
serial console and ``channels`` virtio-serial channels each (the test guest
answers on every port it has: the console upper-cases, a channel swaps case,
so a lower-case line comes back upper-cased on both).
"""

from __future__ import annotations

__all__ = ["start_guests", "run_consoles"]

import asyncio
import statistics
import time
from typing import Any
from xml.etree import ElementTree

from benchmarks._lag import Ticker
from benchmarks._probes import percentile

from ._probe import Footprint

CHANNEL_PREFIX = "org.aiovirtstream.scale."


def _guest_xml(template: str, name: str, channels: int, socket_dir: str) -> str:
    root = ElementTree.fromstring(template)
    for tag in ("uuid", "seclabel"):
        for element in root.findall(tag):
            root.remove(element)
    root.find("name").text = name  # type: ignore[union-attr]
    devices = root.find("devices")
    assert devices is not None
    for element in devices.findall("channel") + devices.findall("graphics"):
        devices.remove(element)
    for element in devices.findall("serial") + devices.findall("console"):
        for source in element.findall("source"):
            element.remove(source)
    for element in devices.findall("controller"):
        if element.get("type") == "virtio-serial":
            devices.remove(element)
    for number in range(channels):
        channel = ElementTree.SubElement(devices, "channel", type="unix")
        ElementTree.SubElement(
            channel, "source", mode="bind", path=f"{socket_dir}/{name}.{number}.chan"
        )
        ElementTree.SubElement(channel, "target", type="virtio", name=f"{CHANNEL_PREFIX}{number}")
    return ElementTree.tostring(root, encoding="unicode")


def start_guests(sandbox: Any, guests: int, channels: int) -> list[dict[str, Any]]:
    """Boot ``guests`` guests with a console and ``channels`` channels each, in ``sandbox``.

    The first is :meth:`Sandbox.start_test_guest`'s guest, whose definition
    (kernel, initramfs, console) the others copy. Returns what the child needs.
    """
    first = sandbox.start_test_guest("scale-template")
    with sandbox.connect() as conn:
        template = conn.lookupByName(first.name).XMLDesc(0)
        sandbox.stop_test_guest(first)
        socket_dir = str(first.channel_path.parent)
        specs = []
        for number in range(guests):
            name = f"scale{number}"
            conn.createXML(_guest_xml(template, name, channels, socket_dir), 0)
            ports = [f"{CHANNEL_PREFIX}{n}" for n in range(channels)]
            specs.append({"name": name, "channels": ports})
    return specs


class _Port:
    """One console or channel: its stream, what it has read, its round trips."""

    def __init__(self, stream: Any, label: str) -> None:
        self.stream = stream
        self.label = label
        self.pending = bytearray()
        self.count = 0
        self.rtts: list[float] = []

    async def round_trip(self, line: bytes, wait: float | None = None) -> float:
        expect = line.upper()
        start = time.perf_counter()
        await self.stream.write(line)
        async with asyncio.timeout(wait):
            while (at := self.pending.find(expect)) < 0:
                chunk = await self.stream.read(4096)
                if not chunk:
                    raise RuntimeError(f"{self.label}: end of stream")
                self.pending += chunk
        del self.pending[: at + len(expect)]
        return time.perf_counter() - start

    async def warm_up(self, deadline: float) -> None:
        tries = 0
        while True:
            tries += 1
            try:
                await self.round_trip(f"probe{tries}x\n".encode(), wait=1.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.label} never answered") from None

    async def run(self, until: asyncio.Event, pause: float, record: bool) -> None:
        number = 0
        while not until.is_set():
            number += 1
            rtt = await self.round_trip(f"line{number}of{self.label}\n".lower().encode())
            if record:
                self.rtts.append(rtt)
                self.count += 1
            await asyncio.sleep(pause)


def _summary(ports: list[_Port]) -> dict[str, Any]:
    rtts = [rtt for port in ports for rtt in port.rtts]
    counts = [port.count for port in ports]
    return {
        "rtt_p50": percentile(rtts, 50),
        "rtt_p99": percentile(rtts, 99),
        "rtt_max": max(rtts, default=float("nan")),
        "count_min": min(counts),
        "count_median": statistics.median(counts),
        "count_max": max(counts),
        "worst_port_p99": max(percentile(port.rtts, 99) for port in ports),
    }


async def _main(spec: dict[str, Any]) -> dict[str, Any]:
    import aiovirtstream as avs

    consoles = await avs.connect(spec["console_uri"])
    storage = await avs.connect(spec["storage_uri"])
    ports: list[_Port] = []
    try:
        for guest in spec["guests"]:
            dom = await avs.lookup_domain(consoles, guest["name"])
            ports.append(_Port(await avs.open_console(dom), f"{guest['name']}con"))
            for channel in guest["channels"]:
                stream = await avs.open_channel(dom, channel)
                ports.append(_Port(stream, f"{guest['name']}ch{channel.rsplit('.', 1)[1]}"))
        deadline = time.monotonic() + spec["ready_timeout"]
        async with asyncio.TaskGroup() as group:
            for port in ports:
                group.create_task(port.warm_up(deadline))
        idle = await _window(ports, spec["pause"], spec["idle_seconds"])
        jobs = [
            await _transfer(avs, storage, op, job, spec["seconds"])
            for op in ("download", "upload")
            for job in spec[op]
        ]
        ticker = Ticker()
        loaded = await _window(ports, spec["pause"], None, jobs)
        lag = await ticker.stop()
        return {"ports": len(ports), "idle": idle, "loaded": loaded, **lag}
    finally:
        for port in ports:
            await port.stream.aclose()
        await avs.aclose_connection(consoles)
        await avs.aclose_connection(storage)


async def _transfer(avs: Any, conn: Any, op: str, job: list[Any], seconds: float) -> Any:
    _, pool, name, path = job
    vol = await avs.lookup_volume(conn, name, pool=pool)

    async def run(started: float) -> int:
        done = 0
        while done == 0 or time.perf_counter() - started < seconds:
            if op == "download":
                await avs.download(vol, path, sparse=False, overwrite=True)
            else:
                await avs.upload(vol, path, sparse=False)
            done += 1
        return done

    return run


async def _window(
    ports: list[_Port], pause: float, seconds: float | None, jobs: list[Any] | None = None
) -> dict[str, Any]:
    for port in ports:
        port.rtts.clear()
        port.count = 0
    until = asyncio.Event()
    started = time.perf_counter()
    transfers = 0
    async with asyncio.TaskGroup() as group:
        for port in ports:
            group.create_task(port.run(until, pause, record=True))
        if jobs is None:
            await asyncio.sleep(seconds or 0)
        else:
            counts = await asyncio.gather(*(job(started) for job in jobs))
            transfers = sum(counts)
        until.set()
    return {"seconds": time.perf_counter() - started, "transfers": transfers, **_summary(ports)}


def run_consoles(spec: dict[str, Any]) -> dict[str, Any]:
    """The console case's child: its figures."""
    footprint = Footprint()
    result = asyncio.run(_main(spec))
    return {**result, **footprint.stop()}
