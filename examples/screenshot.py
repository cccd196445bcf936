"""Save a screenshot of a running domain.

    python examples/screenshot.py --uri qemu:///session --domain guest shot.png
    python examples/screenshot.py --uri test:///default --domain test shot.png

The image is streamed into a temporary file next to the destination and
renamed into place once complete. Its format is the hypervisor's choice
(QEMU: PNG); the MIME type is printed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import anyio

import aiovirtstream as avs


async def main(argv: Sequence[str] | None = None) -> str:
    """Take the screenshot; returns its MIME type."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", default=None, help="libvirt URI (default: libvirt's default)")
    parser.add_argument("--domain", required=True, help="domain name or UUID")
    parser.add_argument("--screen", type=int, default=0, help="screen number (default 0)")
    parser.add_argument("dest", help="file to write, e.g. shot.png")
    args = parser.parse_args(argv)

    conn = await avs.connect(args.uri)
    try:
        domain = await avs.lookup_domain(conn, args.domain)
        mime = await avs.screenshot_to_file(domain, args.dest, screen=args.screen)
    finally:
        await avs.aclose_connection(conn)
    size = (await anyio.Path(args.dest).stat()).st_size
    print(f"{args.dest}: {mime}, {size} bytes")
    return mime


if __name__ == "__main__":
    anyio.run(main)
