"""libvirt-python's and the OS's calls, recorded or replaced: aborts, stream starts,
adopted streams, writes into a folder, socket pauses, O_DIRECT refused."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest

import aiovirtstream as avs
import aiovirtstream._transfer._copy as copy_module


def was_aborted(virstream: libvirt.virStream) -> bool:
    """True if ``virstream`` (with data still to come) was aborted already:
    libvirt then refuses another abort ("stream is closed")."""
    try:
        virstream.abort()
    except libvirt.libvirtError:
        return True
    return False


@dataclass
class Aborts:
    """The ``virStream`` objects aborted since :func:`spy_aborts`, in order."""

    streams: list[libvirt.virStream] = field(default_factory=list)
    happened: threading.Event = field(default_factory=threading.Event)


def spy_aborts(monkeypatch: pytest.MonkeyPatch) -> Aborts:
    """Record every ``virStream.abort`` call (libvirt-python's public method)."""
    aborts = Aborts()
    original = libvirt.virStream.abort

    def abort(self: libvirt.virStream) -> int:
        aborts.streams.append(self)
        aborts.happened.set()
        return int(original(self))

    monkeypatch.setattr(libvirt.virStream, "abort", abort)
    return aborts


def refuse_direct_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``os.open`` fail with EINVAL for O_DIRECT, as a file system without it does."""
    real_open = os.open

    def no_direct(name: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)


class AdoptedStreams:
    """How the streams copy() adopts ended (``adopt_stream`` monkeypatched to note them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._streams: list[avs.AsyncStream] = []
        self._forgotten: list[weakref.ref[avs.AsyncStream]] = []
        real = copy_module.adopt_stream  # type: ignore[attr-defined]

        async def adopt(*args: object, **kwargs: object) -> avs.AsyncStream:
            stream = await real(*args, **kwargs)  # type: ignore[arg-type]
            self._streams.append(stream)
            return stream

        monkeypatch.setattr(copy_module, "adopt_stream", adopt)

    def states(self) -> dict[str, str]:
        """``{"source": state, "destination": state}``; forgets the streams (:meth:`held`)."""
        states = [repr(s).rsplit(" ", 1)[1].rstrip(">") for s in self._streams]
        self._forgotten += [weakref.ref(s) for s in self._streams]
        self._streams.clear()
        return dict(zip(["source", "destination"], states, strict=True))

    async def held(self) -> int:
        """How many streams forgotten by :meth:`states` are still alive 3 s on (0: none)."""
        deadline = time.monotonic() + 3
        while True:
            alive = sum(ref() is not None for ref in self._forgotten)
            if not alive or time.monotonic() > deadline:
                return alive
            await asyncio.sleep(0.002)


@dataclass(frozen=True)
class StreamStart:
    """One start of a volume's stream, seen at libvirt-python's public API."""

    vol: libvirt.virStorageVol
    stream: libvirt.virStream
    offset: int
    length: int
    flags: int


VolumeStreamCall = Callable[[libvirt.virStorageVol, libvirt.virStream, int, int, int], int]
AroundStreamCall = Callable[
    [VolumeStreamCall, libvirt.virStorageVol, libvirt.virStream, int, int, int], int
]


def spy_stream_starts(
    monkeypatch: pytest.MonkeyPatch,
    method: str = "download",
    around: AroundStreamCall | None = None,
) -> list[StreamStart]:
    """Record the streams started by ``virStorageVol.download`` (or ``upload``).

    The calls run in worker threads (``list.append`` is atomic); a start that
    raised is not recorded. ``around(real, vol, stream, offset, length, flags)``
    replaces the call: to delay it, or to start it on another volume.
    """
    starts: list[StreamStart] = []
    real: VolumeStreamCall = getattr(libvirt.virStorageVol, method)

    def spy(
        vol: libvirt.virStorageVol,
        stream: libvirt.virStream,
        offset: int,
        length: int,
        flags: int = 0,
    ) -> int:
        if around is not None:
            result = around(real, vol, stream, offset, length, flags)
        else:
            result = real(vol, stream, offset, length, flags)
        starts.append(StreamStart(vol, stream, offset, length, flags))
        return result

    monkeypatch.setattr(libvirt.virStorageVol, method, spy)
    return starts


def around_writes(
    monkeypatch: pytest.MonkeyPatch,
    folder: Path,
    before: Callable[[], object] | None = None,
    after: Callable[[], object] | None = None,
) -> None:
    """Run ``before`` / ``after`` around every ``os.pwrite`` and ``os.pwritev`` into a
    file in ``folder``: a download's writes (in its writer thread), through the page
    cache or direct. ``before`` may raise, as a full disk does."""
    inside = str(folder) + os.sep

    for name in ("pwrite", "pwritev"):
        real = getattr(os, name)

        def wrapped(fd: int, data: Any, offset: int, *args: int, _real: Any = real) -> int:
            try:
                ours = os.readlink(f"/proc/self/fd/{fd}").startswith(inside)
            except OSError:
                ours = False
            if ours and before is not None:
                before()
            written: int = _real(fd, data, offset, *args)
            if ours and after is not None:
                after()
            return written

        monkeypatch.setattr(os, name, wrapped)


@dataclass
class SocketPauses:
    """The fds a download paused and resumed reading (the event implementation's
    public ``pause_reading`` / ``resume_reading``)."""

    paused: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)

    def unbalanced(self) -> dict[int, int]:
        """Pauses less resumes, by fd where they differ (empty: every socket paused
        was resumed, once a pause)."""
        left = Counter(self.paused)
        left.subtract(self.resumed)
        return {fd: count for fd, count in left.items() if count}


def spy_socket_pauses(monkeypatch: pytest.MonkeyPatch) -> SocketPauses:
    """Record every ``pause_reading`` and ``resume_reading`` from now on."""
    pauses = SocketPauses()
    impl = avs.get_event_impl()
    real_pause, real_resume = impl.pause_reading, impl.resume_reading

    def pause(fd: int) -> None:
        pauses.paused.append(fd)
        real_pause(fd)

    def resume(fd: int) -> None:
        pauses.resumed.append(fd)
        real_resume(fd)

    monkeypatch.setattr(impl, "pause_reading", pause)
    monkeypatch.setattr(impl, "resume_reading", resume)
    return pauses
