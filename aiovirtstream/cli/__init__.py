"""The ``aiovirtstream`` command line (also ``python -m aiovirtstream``); see docs/cli.md.

Verbs: ``upload``, ``download``, ``console``, ``screenshot``, ``sandbox``, ``demo``.
It uses the library through its public API only.
"""

from __future__ import annotations

__all__ = ["main", "build_parser"]

from .command import main
from .parser import build_parser
