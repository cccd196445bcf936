"""Receiving stream data into memory we own, through libvirt's C API.

``virStreamRecvFlags`` called through :mod:`ctypes` fills a reusable buffer,
where libvirt-python's ``recv`` zeroes a new one and copies twice per call;
:func:`receiver_for` falls back to the binding's calls when that is not possible.
"""

from __future__ import annotations

__all__ = ["Buffer", "Receiver", "receiver_for", "native_receive_available"]

import ctypes
import logging
from typing import Any, TypeAlias

import libvirt

Buffer: TypeAlias = bytearray | memoryview

logger = logging.getLogger(__name__)

_STOP_AT_HOLE = libvirt.VIR_STREAM_RECV_STOP_AT_HOLE
_CAPSULE_NAME = b"virStreamPtr"  # libvirt-python's typewrappers.c


class _Libvirt:
    """The few C functions we call, bound once."""

    def __init__(self) -> None:
        # CDLL, not PyDLL: the GIL is released during the call, as
        # libvirt-python does. libvirt calls our event hooks from inside
        # recv (they take the GIL); holding it here while libvirt waits for
        # its driver lock could deadlock against a thread that holds that
        # lock and waits for the GIL in a hook.
        lib = ctypes.CDLL("libvirt.so.0")
        self.recv_flags = lib.virStreamRecvFlags
        self.recv_flags.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
        ]
        self.recv_flags.restype = ctypes.c_int
        self.recv = lib.virStreamRecv
        self.recv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        self.recv.restype = ctypes.c_int
        # A prototype of our own: setting argtypes on ctypes.pythonapi's
        # function would change it for every other user in the process.
        prototype = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)
        self.get_pointer = prototype(("PyCapsule_GetPointer", ctypes.pythonapi))


_lib: _Libvirt | None = None
_lib_failed = False


def _load() -> _Libvirt | None:
    global _lib, _lib_failed
    if _lib is None and not _lib_failed:
        try:
            _lib = _Libvirt()
        except (OSError, AttributeError) as error:
            _lib_failed = True
            logger.info("receiving through libvirt-python's copies: %s", error)
    return _lib


class Receiver:
    """Receives from one ``virStream`` into writable buffers (``bytearray``, ``memoryview``).

    :meth:`recv_into` returns what ``virStreamRecvFlags`` does: the byte
    count, 0 at end of stream, -2 when nothing is queued (NONBLOCK), -3 at a
    hole (with ``stop_at_hole``); it raises ``libvirt.libvirtError`` on -1.
    """

    native = False

    def __init__(self, virstream: libvirt.virStream) -> None:
        self.virstream = virstream

    def recv_into(self, buffer: Buffer, offset: int, nbytes: int, stop_at_hole: bool) -> int:
        if offset < 0 or nbytes <= 0 or offset + nbytes > memoryview(buffer).nbytes:
            raise ValueError("the receive range lies outside the buffer")
        st = self.virstream
        result: Any = st.recvFlags(nbytes, _STOP_AT_HOLE) if stop_at_hole else st.recv(nbytes)
        if isinstance(result, int):
            return result
        size = len(result)
        memoryview(buffer).cast("B")[offset : offset + size] = result
        return size

    def recv_hole(self) -> int:
        """The length of the hole at the current position (after -3)."""
        return int(self.virstream.recvHole(0))


class _NativeReceiver(Receiver):
    native = True

    def __init__(self, virstream: libvirt.virStream, lib: _Libvirt, pointer: int) -> None:
        super().__init__(virstream)
        self._lib = lib
        self._pointer = pointer

    def recv_into(self, buffer: Buffer, offset: int, nbytes: int, stop_at_hole: bool) -> int:
        # from_buffer checks that [offset, offset + nbytes) lies inside the
        # (writable) buffer, and pins it while ``target`` lives.
        try:
            target = (ctypes.c_char * nbytes).from_buffer(buffer, offset)
        except ValueError as error:
            raise ValueError("the receive range lies outside the buffer") from error
        if stop_at_hole:
            result = self._lib.recv_flags(self._pointer, target, nbytes, _STOP_AT_HOLE)
        else:
            result = self._lib.recv(self._pointer, target, nbytes)
        if result == -1:
            # libvirtError reads libvirt's last error of this thread, which the
            # call has just set.
            raise libvirt.libvirtError("virStreamRecvFlags() failed")
        return int(result)


def native_receive_available() -> bool:
    """True if :func:`receiver_for` can receive without libvirt-python's copies."""
    return _load() is not None


def receiver_for(virstream: libvirt.virStream, *, native: bool = True) -> Receiver:
    """A :class:`Receiver` for ``virstream``: native if possible (and ``native``)."""
    lib = _load() if native else None
    if lib is not None:
        try:
            pointer = lib.get_pointer(virstream._o, _CAPSULE_NAME)
        except (AttributeError, ValueError, TypeError) as error:
            logger.info("receiving through libvirt-python's copies: %s", error)
        else:
            if pointer:
                return _NativeReceiver(virstream, lib, pointer)
    return Receiver(virstream)
