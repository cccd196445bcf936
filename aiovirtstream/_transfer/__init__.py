"""Transfers: sparse ``upload()`` and ``download()`` between files and volumes."""

from __future__ import annotations

from ._copy import copy
from ._download import DownloadDestination, download
from ._extents import Extent, file_extents
from ._options import ProgressCallback, ProgressTarget, TransferProgress, TransferResult
from ._upload import UploadSource, upload

__all__ = [
    "upload",
    "download",
    "copy",
    "UploadSource",
    "DownloadDestination",
    "TransferResult",
    "TransferProgress",
    "ProgressCallback",
    "ProgressTarget",
    "Extent",
    "file_extents",
]
