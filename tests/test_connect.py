"""connect() against a real libvirt daemon (the session sandbox): the send buffer
of its socket (aiovirtstream/_connection/_connect.py)."""

from __future__ import annotations

import os

import libvirt
import pytest
from _helpers.volumes import round_trip

import aiovirtstream as avs
from aiovirtstream.testing import PoolInfo, Sandbox

KiB = 1024
MiB = 1024 * KiB


async def test_connect_widens_the_send_buffer_of_unix_sockets_only(
    libvirt_sandbox: Sandbox, libvirt_pool: PoolInfo
) -> None:
    """A unix socket gets connect()'s send buffer; TCP keeps the kernel's autotuning."""
    import socket

    from aiovirtstream._connection._connect import DEFAULT_SEND_BUFFER, widen_send_buffer

    def send_buffer(conn: libvirt.virConnect) -> tuple[int, int]:
        fd = avs.connection_socket(conn)
        assert fd is not None
        with socket.socket(fileno=os.dup(fd)) as sock:
            return sock.family, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    with open("/proc/sys/net/core/wmem_max") as limit:
        wmem_max = int(limit.read())
    with pytest.raises(ValueError, match="send_buffer"):
        await avs.connect(libvirt_sandbox.uri, send_buffer=0)
    widened = await avs.connect(libvirt_sandbox.uri)
    untouched = await avs.connect(libvirt_sandbox.uri, send_buffer=None)
    tcp = await avs.connect(libvirt_sandbox.tcp_uri)
    try:
        family, default = send_buffer(untouched)
        assert family == socket.AF_UNIX
        # The kernel doubles what is asked, capped at wmem_max; never lowered.
        assert send_buffer(widened) == (
            socket.AF_UNIX,
            max(2 * min(DEFAULT_SEND_BUFFER, wmem_max), default),
        )
        family, tcp_size = send_buffer(tcp)
        assert family == socket.AF_INET
        # Autotuned sizes are multiples of a segment's truesize, never this one.
        assert tcp_size != 2 * min(DEFAULT_SEND_BUFFER, wmem_max), "TCP's send buffer was set"
        tcp_fd = avs.connection_socket(tcp)
        assert tcp_fd is not None and not widen_send_buffer(tcp_fd, 4 * tcp_size)
        assert send_buffer(tcp) == (socket.AF_INET, tcp_size)
        read_end, write_end = os.pipe()
        try:
            open_fds = len(os.listdir("/proc/self/fd"))
            assert not widen_send_buffer(read_end, DEFAULT_SEND_BUFFER), "a pipe is no socket"
            assert len(os.listdir("/proc/self/fd")) == open_fds, "the fd's copy leaked"
        finally:
            os.close(read_end)
            os.close(write_end)
        # The widened connection still carries a stream both ways.
        data = os.urandom(3 * MiB + 5)
        await libvirt_sandbox.acreate_volume(libvirt_pool, "widened", len(data))
        await round_trip(widened, libvirt_pool.name, "widened", data)
    finally:
        for conn in (widened, untouched, tcp):
            await avs.aclose_connection(conn)
