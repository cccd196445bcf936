"""Run every benchmark module of this package, or the ones named.

``python -m benchmarks`` runs all (``make bench``); ``python -m benchmarks
events`` runs one. Options after the names (``--quick``) are handed to each
benchmark run. A benchmark is any module here not starting with ``_`` that
defines ``main(argv: list[str]) -> int``; it is found at run time, so new
ones need no registration. The exit status is the highest of theirs.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from collections.abc import Callable
from typing import cast

import benchmarks


def available() -> list[str]:
    """Names of the benchmark modules in this package, in run order."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(benchmarks.__path__)
        if not info.name.startswith("_")
    )


def main(argv: list[str] | None = None) -> int:
    """Parse ``[NAME ...] [options for the benchmarks]`` and run them one after the other."""
    names = available()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run aiovirtstream's benchmarks.",
        epilog=f"benchmarks: {', '.join(names) or '(none)'}; other options go to each one",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args, rest = parser.parse_known_args(argv)
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [name for name in args.names if name not in names]
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)}; there are: {', '.join(names)}")
    status = 0
    for name in args.names or names:
        module = importlib.import_module(f"benchmarks.{name}")
        run = cast(Callable[[list[str]], int] | None, getattr(module, "main", None))
        if run is None:
            print(f"benchmarks.{name} has no main(argv); skipped", file=sys.stderr)
            status = max(status, 2)
            continue
        print(f"=== benchmarks.{name} ===", flush=True)
        start = time.perf_counter()
        try:
            code = run(list(rest))
        except SystemExit as exit_:  # argparse in a benchmark: report it, run the others
            code = exit_.code if isinstance(exit_.code, int) else 2
        print(f"=== benchmarks.{name}: exit {code} in {time.perf_counter() - start:.1f} s ===\n")
        status = max(status, code)
    return status


if __name__ == "__main__":
    sys.exit(main())
