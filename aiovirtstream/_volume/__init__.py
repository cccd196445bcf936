"""Volumes: looking them up, opening their streams, their size and range checks, claims."""

from __future__ import annotations

from ._claims import claim_volume
from ._open import (
    download_description,
    lookup_volume,
    open_upload_stream,
    open_volume_download,
    open_volume_upload,
    start_volume_download,
    start_volume_upload,
    upload_call,
    upload_description,
)
from ._size import (
    VolumeSize,
    check_download_range,
    check_not_negative,
    check_upload_range,
    volume_size,
)

__all__ = [
    "lookup_volume",
    "open_volume_upload",
    "open_volume_download",
    "open_upload_stream",
    "upload_call",
    "upload_description",
    "start_volume_upload",
    "start_volume_download",
    "download_description",
    "VolumeSize",
    "volume_size",
    "check_not_negative",
    "check_download_range",
    "check_upload_range",
    "claim_volume",
]
