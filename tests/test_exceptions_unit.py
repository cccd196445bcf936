"""The one place that maps libvirt's errors to ours."""

from __future__ import annotations

import anyio
import libvirt
import pytest

import aiovirtstream as avs
from aiovirtstream._exceptions import libvirt_error_to_exception, map_libvirt_errors


def make_error(code: int, domain: int, message: str = "boom") -> libvirt.libvirtError:
    error = libvirt.libvirtError(message)
    error.err = (code, domain, message, 2, None, None, None, 0, 0)
    return error


@pytest.mark.parametrize(
    ("code", "domain", "stream", "expected"),
    [
        (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_FROM_STORAGE, False, avs.NotFoundError),
        (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, True, avs.NotFoundError),
        (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_FROM_NONE, False, avs.UnsupportedError),
        (
            libvirt.VIR_ERR_OPERATION_INVALID,
            libvirt.VIR_FROM_NONE,
            False,
            avs.OperationInvalidError,
        ),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, False, avs.ConnectError),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, True, avs.StreamBrokenError),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_STREAMS, True, avs.StreamBrokenError),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_STORAGE, False, avs.LibvirtError),
    ],
)
def test_mapping(code: int, domain: int, stream: bool, expected: type[Exception]) -> None:
    mapped = libvirt_error_to_exception(make_error(code, domain), stream=stream, context="ctx")
    assert type(mapped) is expected
    assert str(mapped) == "ctx: boom"


def test_map_keeps_the_cause_and_the_anyio_classes() -> None:
    original = make_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_STREAMS)
    with pytest.raises(anyio.BrokenResourceError) as caught:
        with map_libvirt_errors(stream=True):
            raise original
    assert caught.value.__cause__ is original
    assert isinstance(caught.value, avs.AioVirtStreamError)
    assert issubclass(avs.StreamClosedError, anyio.ClosedResourceError)
    assert issubclass(avs.StreamBusyError, anyio.BusyResourceError)
    assert issubclass(avs.ConnectError, ConnectionError)
    assert issubclass(avs.DestinationExistsError, FileExistsError)
