"""Sizes on the command line: read with suffixes (``1M``, ``2GiB``, ``500MB``), shown
in binary units (``1.5 MiB``, ``812.4 MiB/s``)."""

from __future__ import annotations

__all__ = ["parse_size", "SIZE_HELP", "format_size", "format_rate"]

import re

#: Size suffixes, as virsh takes them: a bare letter and ``xiB`` are powers
#: of 1024, ``xB`` powers of 1000. Case does not matter.
_PREFIXES = "kmgtpe"
_SIZE_RE = re.compile(r"\s*([+-]?\d+)\s*(?:([kmgtpe])(i?b)?|(b))?\s*", re.IGNORECASE)

SIZE_HELP = (
    "sizes are whole numbers of bytes, or with a suffix: K, M, G, T (also KiB, MiB, "
    "GiB, TiB) are powers of 1024, KB, MB, GB, TB powers of 1000; e.g. 4096, 1M, 2GiB, 500MB"
)


def parse_size(text: str) -> int:
    """``"4096"``, ``"1M"``/``"1MiB"`` (1,048,576), ``"1MB"`` (1,000,000): a number of bytes.

    Raises ``ValueError`` for anything else (fractions included).
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"expected a size such as 4096, 1M or 2GiB, not {text!r}")
    number, prefix, binary_or_decimal, _ = match.groups()
    value = int(number)
    if prefix:
        power = _PREFIXES.index(prefix.lower()) + 1
        decimal = binary_or_decimal is not None and binary_or_decimal.lower() == "b"
        value *= (1000 if decimal else 1024) ** power
    return value


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 MiB``, ``2.0 GiB``."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def format_rate(bytes_per_second: float) -> str:
    """A data rate in binary units: ``812.4 MiB/s``."""
    if bytes_per_second == float("inf"):
        return "- B/s"
    return f"{format_size(bytes_per_second)}/s"
