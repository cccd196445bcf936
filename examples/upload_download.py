"""Upload a file into a storage volume and download it back, sparse-aware.

    python examples/upload_download.py --uri qemu:///session --pool default disk.img

Creates the volume ``<name of the file>`` in the pool if it does not exist
(raw, sized to the file), uploads the file (its holes stay holes), downloads
the volume into ``<file>.back`` and checks both SHA-256 digests match. With
``--sandbox`` it runs against a private libvirt daemon instead of ``--uri``
(``aiovirtstream.testing.Sandbox``; needs libvirt-daemon installed), and
without a file argument it makes a sparse 64 MiB test file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import anyio
import anyio.to_thread
import libvirt

import aiovirtstream as avs
from aiovirtstream.testing import Sandbox

MiB = 1024 * 1024


def _make_sparse_file(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(64 * MiB)
        for offset in (0, 20 * MiB, 63 * MiB):
            f.seek(offset)
            f.write(os.urandom(MiB))


def _volume(conn: libvirt.virConnect, pool: str, name: str, size: int) -> libvirt.virStorageVol:
    """The volume, created (raw, sparse) when missing. Blocking: run it in a thread."""
    handle = conn.storagePoolLookupByName(pool)
    with contextlib.suppress(libvirt.libvirtError):
        return handle.storageVolLookupByName(name)
    xml = (
        f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{size}</capacity>"
        "<allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>"
    )
    return handle.createXML(xml, 0)


@contextlib.asynccontextmanager
async def _target(args: argparse.Namespace) -> AsyncIterator[tuple[str | None, str]]:
    """(uri, pool): the user's, or a private sandbox with a fresh pool."""
    if not args.sandbox:
        yield args.uri, args.pool
        return
    async with Sandbox() as sb:
        pool = await sb.acreate_pool("example")
        yield sb.uri, pool.name


def _progress(p: avs.TransferProgress) -> None:
    total = f"/{p.total / MiB:.0f}" if p.total else ""
    print(f"\r  {p.done_bytes / MiB:6.1f}{total} MiB", end="", flush=True)


def _summary(result: avs.TransferResult) -> None:
    data, holes = result.data_bytes / MiB, result.hole_bytes / MiB
    print(f"\n  {data:.1f} MiB data, {holes:.1f} MiB holes in {result.seconds:.2f} s")


async def main(argv: Sequence[str] | None = None) -> bool:
    """Upload, download, compare; True if the digests match."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", default=None, help="libvirt URI (default: libvirt's default)")
    parser.add_argument("--pool", default="default", help="storage pool (default: default)")
    parser.add_argument("--sandbox", action="store_true", help="use a private libvirtd")
    parser.add_argument("file", nargs="?", help="file to upload (default: a sparse test file)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.file) if args.file else Path(tmp) / "sparse.img"
        if not args.file:
            await anyio.to_thread.run_sync(_make_sparse_file, source)
        back = Path(tmp) / (source.name + ".back") if not args.file else Path(f"{source}.back")
        async with _target(args) as (uri, pool):
            conn = await avs.connect(uri)
            try:
                size = (await anyio.Path(source).stat()).st_size
                vol = await anyio.to_thread.run_sync(_volume, conn, pool, source.name, size)
                print(f"upload {source} -> {pool}/{source.name}")
                up = await avs.upload(vol, source, progress=_progress, checksum=True)
                _summary(up)
                print(f"download {pool}/{source.name} -> {back}")
                down = await avs.download(
                    vol, back, length=size, overwrite=True, progress=_progress, checksum=True
                )
                _summary(down)
            finally:
                await avs.aclose_connection(conn)
    ok = up.sha256 == down.sha256
    print(f"sha256 {'match' if ok else 'DIFFER'}: {up.sha256}")
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if anyio.run(main) else 1)
