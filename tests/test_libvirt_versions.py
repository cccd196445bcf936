"""What differs between the libvirt versions the suite runs on (Debian 12's 9.0, Debian 13's 11.x).

Each test runs on every version and asserts what that version does; docs/streams.md says
which versions differ and how.
"""

from __future__ import annotations

import os

import pytest

import aiovirtstream as avs
from aiovirtstream.testing import Sandbox

MiB = 1 << 20


@pytest.mark.parametrize("tls", [False, True], ids=["unix", "tls"])
async def test_upload_past_its_length(tls: bool) -> None:
    """More data than an upload's ``length``: libvirt 9.0 fails the stream and the
    connection lives on; libvirt 11.x's daemon (11.3 measured) spins at 100 % CPU in its
    main loop for good (over unix: keepalive declares the connection lost; seen once over
    TLS too) or closes the connection (TLS, most runs). Either way the caller gets a typed
    error, never a hang; on 11.x the daemon is lost, so this runs on a private one."""
    async with Sandbox(tcp=tls) as sb:
        pool = await sb.acreate_pool("p")
        await sb.acreate_volume(pool, "v", 8 * MiB)
        conn = await avs.connect(sb.tcp_uri if tls else sb.uri)
        try:
            vol = await avs.lookup_volume(conn, "v", pool="p")
            new_daemon = conn.getLibVersion() >= 11_000_000
            with pytest.raises(avs.StreamBrokenError) as caught:
                async with await avs.open_volume_upload(vol, length=4096) as stream:
                    await stream.write(os.urandom(2 * MiB))
            if new_daemon:
                assert isinstance(caught.value, avs.ConnectionLostError), caught.value
            else:
                assert not isinstance(caught.value, avs.ConnectionLostError), caught.value
                assert (await avs.lookup_volume(conn, "v", pool="p")).name() == "v"
        finally:
            await avs.aclose_connection(conn)
