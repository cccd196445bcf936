"""A private, unprivileged libvirt daemon for tests, the demo and users' test suites.

:class:`Sandbox` runs ``libvirtd`` in session mode in a fresh temporary folder,
with helpers for pools, volumes, a test guest and faults (docs/testing.md).
"""

from __future__ import annotations

from .._exceptions import (
    DaemonNotInstalledError,
    GuestPackageMissingError,
    SandboxError,
    SandboxStartError,
)
from ._records import GuestInfo, PoolInfo, SandboxMode, VolumeInfo
from ._relay import TcpRelay
from ._sandbox import Sandbox, guest_requirements_problem

__all__ = [
    "Sandbox",
    "SandboxMode",
    "TcpRelay",
    "PoolInfo",
    "VolumeInfo",
    "SandboxError",
    "DaemonNotInstalledError",
    "SandboxStartError",
    "GuestInfo",
    "GuestPackageMissingError",
    "guest_requirements_problem",
]
