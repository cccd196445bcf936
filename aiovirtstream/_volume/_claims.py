"""The volumes this process is uploading into or downloading from.

libvirt takes no lock on a volume while a stream runs: with libvirt 9.0, a
second upload, a download, a wipe, a resize and even a delete of a volume
all succeed while an upload into it is under way. Two uploads
into one volume then interleave their bytes, and a download during an
upload reads a half-written volume, with no error from anyone. Across
processes nothing can be done about it; within one, :func:`claim_volume`
refuses the second transfer before it starts: any transfer while an upload
runs, and an upload while any transfer runs. Downloads share a volume.
:func:`take_claim` is the same claim for a holder that is not a block (a
stream opened by ``open_volume_*``, released when the stream ends).
"""

from __future__ import annotations

__all__ = ["claim_volume", "take_claim"]

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import libvirt

from .._exceptions import VolumeBusyError, map_libvirt_errors


@dataclass(slots=True)
class _Use:
    uploads: int = 0
    downloads: int = 0


_lock = threading.Lock()  # transfers may run on loops in several threads
_uses: dict[tuple[str, str], _Use] = {}
#: Releases not yet applied to ``_uses``: a release never waits for the lock.
_releases: deque[Callable[[], None]] = deque()


@contextlib.contextmanager
def claim_volume(vol: libvirt.virStorageVol, *, upload: bool) -> Iterator[None]:
    """Mark ``vol`` as being uploaded into (or downloaded from) while the block runs.

    Raises :class:`VolumeBusyError` at once if that would clash with a
    transfer of the same volume already running in this process. A volume
    is known by its connection's URI and its key (a file volume's key is its
    path): both are kept by the Python objects, so no call to the daemon.
    Two connections to one daemon by different URIs (its unix socket and
    TCP, say) are therefore not seen as one: a daemon that has no hypervisor
    driver cannot even tell its host name (``virConnectGetHostname``).
    """
    release = take_claim(vol, upload=upload)
    try:
        yield
    finally:
        release()


def take_claim(vol: libvirt.virStorageVol, *, upload: bool) -> Callable[[], None]:
    """:func:`claim_volume` until the returned function is called.

    That function may be called more than once, from any thread: the first
    call releases the claim, the others do nothing.
    """
    with map_libvirt_errors(context="cannot tell which volume this is"):
        key = (vol.connect().getURI(), vol.key())  # a closed connection raises here
    with _lock:
        _apply_releases_locked()
        use = _uses.setdefault(key, _Use())
        if use.uploads or (upload and use.downloads):
            raise VolumeBusyError(vol.name(), "uploaded" if use.uploads else "downloaded")
        if upload:
            use.uploads += 1
        else:
            use.downloads += 1
    held = True

    def release_locked() -> None:
        nonlocal held
        if not held:
            return
        held = False
        if upload:
            use.uploads -= 1
        else:
            use.downloads -= 1
        if not (use.uploads or use.downloads):
            del _uses[key]

    def release() -> None:
        # The garbage collector calls this for a stream collected unclosed, on
        # whatever thread it runs, maybe one inside this lock: queued, and
        # applied now if the lock is free, else by the next claim.
        _releases.append(release_locked)
        if _lock.acquire(blocking=False):
            try:
                _apply_releases_locked()
            finally:
                _lock.release()

    return release


def _apply_releases_locked() -> None:
    while _releases:
        _releases.popleft()()
