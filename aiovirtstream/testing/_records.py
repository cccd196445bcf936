"""What the sandbox's helpers return: pools, volumes, guests."""

from __future__ import annotations

__all__ = [
    "SandboxMode",
    "PoolInfo",
    "VolumeInfo",
    "GuestInfo",
]

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SandboxMode = Literal["storage", "full"]
"""``"storage"``: only the storage driver (starts fast); ``"full"``: every
driver, qemu included (for test guests)."""


@dataclass(frozen=True)
class PoolInfo:
    """A transient ``dir`` storage pool of a sandbox: its name and target folder."""

    name: str
    path: Path


@dataclass(frozen=True)
class VolumeInfo:
    """A volume of a sandbox pool. ``path`` is also the libvirt key of a dir-pool volume."""

    pool: str
    name: str
    path: Path
    capacity: int


@dataclass(frozen=True)
class GuestInfo:
    """A running test guest of a full-mode sandbox (:meth:`Sandbox.start_test_guest`).

    Its serial console upper-cases what it reads, its virtio-serial channel
    ``channel`` swaps the case of letters (:mod:`aiovirtstream.testing._initramfs`).
    """

    name: str
    uri: str
    tcp_uri: str | None
    channel: str
    channel_path: Path
    log_path: Path

    def __str__(self) -> str:
        return self.name
