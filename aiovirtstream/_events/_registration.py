"""Registering the event implementation's hooks with libvirt (once per process)."""

from __future__ import annotations

__all__ = [
    "Registration",
]

import logging
from typing import Any

import libvirt

from .._exceptions import EventLoopError
from ._state import EventState


class Registration(EventState):
    """Registering the hooks with libvirt, and checking that libvirt uses them."""

    def register(self) -> None:
        """Register the hooks with libvirt (once per process).

        Also routes libvirt's error reports to :mod:`logging` (logger
        ``aiovirtstream.libvirt``) instead of stderr: every error reaches the
        caller as an exception anyway, and libvirt's printing would spew on
        expected events such as a guest shutting down under a console.
        """
        if self.registered_with_libvirt:
            return
        libvirt.registerErrorHandler(_log_libvirt_error, None)
        already = EventLoopError(
            "another libvirt event implementation (libvirtaio, or "
            "virEventRegisterDefaultImpl) is already registered in this process; "
            "aiovirtstream needs its own: do not register another one"
        )
        try:
            libvirt.virEventRegisterImpl(
                self.add_handle,
                self.update_handle,
                self.remove_handle,
                self.add_timeout,
                self.update_timeout,
                self.remove_timeout,
            )
        except (libvirt.libvirtError, RuntimeError) as error:
            raise already from error
        # libvirt ignores a second registration with only a logged warning when
        # the first came from C (virEventRegisterDefaultImpl): check that a
        # timer added through libvirt now reaches our hooks.
        before = next(self._timer_ids)
        probe = libvirt.virEventAddTimeout(-1, _ignore_timer, None)
        with self._lock:
            timer = self._timers.get(probe) if probe > before else None
        libvirt.virEventRemoveTimeout(probe)
        if timer is None:
            raise already
        # The probe's free is libvirt-python's own, for a timer added here, outside
        # any hook: run it now, so that a fresh registration leaves nothing pending.
        self._free_now(timer.opaque)
        self.registered_with_libvirt = True


def _ignore_timer(_timer: int, _opaque: object) -> None:
    """The registration probe's timer never fires (-1)."""


_libvirt_logger = logging.getLogger("aiovirtstream.libvirt")


def _log_libvirt_error(_context: object, error: Any) -> None:
    # error is libvirt's error tuple: (code, domain, message, level, ...)
    _libvirt_logger.debug("libvirt: %s", error[2] if len(error) > 2 else error)
