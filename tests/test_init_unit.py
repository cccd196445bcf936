"""The package's namespace: every public name, loaded on first use (no daemon)."""

from __future__ import annotations

import subprocess
import sys

import aiovirtstream
import aiovirtstream._exceptions as exceptions


def test_every_public_name_resolves_and_every_exception_is_public() -> None:
    for name in aiovirtstream.__all__:
        assert getattr(aiovirtstream, name) is not None, name
    assert set(exceptions.__all__) <= set(aiovirtstream.__all__)
    assert set(aiovirtstream.__all__) <= set(dir(aiovirtstream))


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        aiovirtstream.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("no AttributeError")


def test_importing_the_package_loads_neither_libvirt_nor_anyio() -> None:
    """The pytest plugin imports the package at every pytest start."""
    check = (
        "import sys, aiovirtstream, aiovirtstream.pytest_plugin; "
        "print(sorted(m for m in ('libvirt', 'anyio', 'aiovirtstream._stream') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    star = "from aiovirtstream import *; print(len(dir()))"
    out = subprocess.run([sys.executable, "-c", star], capture_output=True, text=True, check=True)
    assert int(out.stdout) >= len(aiovirtstream.__all__)
