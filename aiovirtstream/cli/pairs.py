"""``VOLUME FILE`` pairs: the transfers a command asks for, and their argparse action."""

from __future__ import annotations

__all__ = ["Pair", "PairsAction"]

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pair:
    """One transfer asked for: a volume and a local file."""

    volume: str
    file: str


class PairsAction(argparse.Action):
    """``VOLUME FILE [VOLUME FILE ...]``, where any pair may be one ``VOLUME=FILE``."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        items = list(values or [])
        pairs: list[Pair] = []
        while items:
            volume = items.pop(0)
            if "=" in volume:
                volume, file = volume.split("=", 1)
            elif items:
                file = items.pop(0)
            else:
                raise argparse.ArgumentError(self, f"volume {volume!r} has no FILE")
            if not volume or not file:
                raise argparse.ArgumentError(self, "VOLUME=FILE needs both, around the '='")
            pairs.append(Pair(volume, file))
        # What two transfers of one command must not share: where they write.
        written = [p.volume if self.const == "upload" else p.file for p in pairs]
        twice = sorted({x for x in written if written.count(x) > 1})
        if twice:
            what = "volume" if self.const == "upload" else "file"
            raise argparse.ArgumentError(self, f"{what} {twice[0]!r} is written twice")
        setattr(namespace, self.dest, pairs)
