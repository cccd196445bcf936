"""The blocking contender's child: libvirt-python's helpers, written the way virsh uses libvirt's.

``recvAll`` / ``sendAll`` / ``sparseRecvAll`` / ``sparseSendAll`` on a plain
``libvirt.open`` connection, with handlers like virsh's (``os.write`` in a
loop, holes made by ``lseek`` + ``ftruncate``, SEEK_DATA/SEEK_HOLE to find
the data). The process never imports aiovirtstream (no event implementation
is registered in it) nor asyncio.
"""

from __future__ import annotations

__all__ = ["run_blocking"]

import argparse
import errno
import os
import time
from typing import Any

from benchmarks._probes import reset_peak_rss, status_bytes, usage, usage_delta


def _in_data(fd: int) -> tuple[bool, int]:
    """virsh's virFileInData: (in data?, length of this section) at fd's position."""
    cur = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        data = os.lseek(fd, cur, os.SEEK_DATA)
    except OSError as error:
        if error.errno != errno.ENXIO:
            raise
        end = os.lseek(fd, 0, os.SEEK_END)  # in the trailing hole (or at the end)
        result = (False, end - cur)
    else:
        if data > cur:
            result = (False, data - cur)
        else:
            result = (True, os.lseek(fd, cur, os.SEEK_HOLE) - cur)
    os.lseek(fd, cur, os.SEEK_SET)
    return result


def _write_all(fd: int, data: bytes) -> int:
    """virsh's safewrite."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


def run_blocking(args: argparse.Namespace) -> dict[str, Any]:
    """Time one upload or download (``args`` from the parent's command line); its figures."""
    import libvirt

    conn = libvirt.open(args.uri)
    try:
        reset = reset_peak_rss()
        base = status_bytes("VmRSS")
        usage0, t0 = usage(), time.perf_counter()
        vol = conn.storagePoolLookupByName(args.pool).storageVolLookupByName(args.vol)
        stream = conn.newStream(0)
        if args.op == "download":
            flags = libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM if args.sparse else 0
            fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                vol.download(stream, 0, 0, flags)

                def sink(_st: Any, data: bytes, fd: int) -> int:
                    return _write_all(fd, data)

                if args.sparse:

                    def skip(_st: Any, length: int, fd: int) -> int:
                        # virsh's virshStreamSkip: seek, then truncate to make the hole.
                        os.ftruncate(fd, os.lseek(fd, length, os.SEEK_CUR))
                        return 0

                    stream.sparseRecvAll(sink, skip, fd)
                else:
                    stream.recvAll(sink, fd)
                stream.finish()
            finally:
                os.close(fd)
        else:
            flags = libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM if args.sparse else 0
            fd = os.open(args.file, os.O_RDONLY)
            try:
                vol.upload(stream, 0, 0, flags)

                def source(_st: Any, nbytes: int, fd: int) -> bytes:
                    return os.read(fd, nbytes)

                if args.sparse:

                    def hole(_st: Any, fd: int) -> tuple[bool, int]:
                        return _in_data(fd)

                    def skip_source(_st: Any, length: int, fd: int) -> int:
                        return os.lseek(fd, length, os.SEEK_CUR)

                    stream.sparseSendAll(source, hole, skip_source, fd)
                else:
                    stream.sendAll(source, fd)
                stream.finish()
            finally:
                os.close(fd)
        op_s, usage_op = time.perf_counter() - t0, usage_delta(usage0)
        peak = status_bytes("VmHWM")
    finally:
        conn.close()
    return {
        "op_s": op_s,
        **usage_op,
        "rss_base": base,
        "rss_peak": peak,
        "hwm_reset": reset,
    }
