"""TcpRelay: the network in front of a sandbox that tests cut, reset or slow down."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

import libvirt
import pytest
from _helpers.volumes import MiB

from aiovirtstream.testing import Sandbox, TcpRelay
from aiovirtstream.testing._processes import free_port


class _Server:
    """A server on 127.0.0.1: sends ``reply`` to its first client, keeps what it reads."""

    def __init__(self, reply: bytes) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.received = bytearray()
        self.ended: list[str] = []
        self.accepted = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        self.accepted.set()
        with conn:
            conn.sendall(self.reply)
            try:
                while data := conn.recv(1 << 16):
                    self.received += data
                self.ended.append("eof")
            except ConnectionResetError:
                self.ended.append("reset")

    def close(self) -> None:
        self.sock.close()


def _exchange(client: socket.socket, up: bytes) -> bytes:
    """Send ``up`` and then an end of file from a thread while reading ``client`` to its end."""

    def send() -> None:
        client.sendall(up)
        client.shutdown(socket.SHUT_WR)

    sending = threading.Thread(target=send)
    sending.start()
    got = _recv_all(client)
    sending.join(30)
    return got


def _recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(1 << 16):
        out += data
    return bytes(out)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_relay_carries_bytes_both_ways() -> None:
    down, up = os.urandom(3 * MiB), os.urandom(5 * MiB)  # both more than its buffers
    server = _Server(down)
    try:
        with TcpRelay("127.0.0.1", server.port) as relay:
            assert relay.address == ("127.0.0.1", relay.port)
            assert relay.port != server.port
            with socket.create_connection(relay.address, timeout=10) as client:
                got = _exchange(client, up)  # the server ends once it has read everything
                server.thread.join(10)
            assert got == down
            assert bytes(server.received) == up
            assert server.ended == ["eof"]
    finally:
        server.close()


def _download_through(relay: TcpRelay, clients: int) -> tuple[list[bytes], float]:
    """What each of ``clients`` connections at once reads through ``relay``, and the
    seconds from their connecting to the last one's end."""
    got: list[bytes] = [b""] * clients

    def read(index: int) -> None:
        with socket.create_connection(relay.address, timeout=30) as client:
            got[index] = _recv_all(client)

    started = time.monotonic()
    readers = [threading.Thread(target=read, args=(index,)) for index in range(clients)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60)
    return got, time.monotonic() - started


def _serve_each(reply: bytes) -> tuple[socket.socket, list[bytes]]:
    """A server that sends ``reply`` to every client and keeps what each sends."""
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return

            def one(conn: socket.socket = conn) -> None:
                with conn:
                    conn.sendall(reply)
                    conn.shutdown(socket.SHUT_WR)
                    received.append(_recv_all(conn))

            threading.Thread(target=one, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, received


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("clients", [1, 3])
def test_relay_rate_holds_every_connection_to_the_link(clients: int) -> None:
    """A rate-limited relay carries at most ``rate`` bytes a second each way, all
    its connections together, and every byte arrives intact."""
    reply, rate = os.urandom(2 * MiB), 8e6
    server, _ = _serve_each(reply)
    try:
        with TcpRelay("127.0.0.1", server.getsockname()[1], rate=rate) as relay:
            assert relay.rate == rate
            got, seconds = _download_through(relay, clients)
    finally:
        server.close()
    assert got == [reply] * clients
    # At most one burst (10 ms of the rate) goes before the bucket runs dry.
    assert seconds >= (clients * len(reply) - 0.01 * rate) / rate


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_relay_rate_limits_both_directions() -> None:
    """Sending up while reading down: each direction is held to the rate, intact."""
    down, up, rate = os.urandom(2 * MiB), os.urandom(2 * MiB), 8e6
    server, received = _serve_each(down)
    try:
        with TcpRelay("127.0.0.1", server.getsockname()[1], rate=rate) as relay:
            started = time.monotonic()
            with socket.create_connection(relay.address, timeout=30) as client:
                got = _exchange(client, up)
            down_seconds = time.monotonic() - started
            deadline = time.monotonic() + 10
            while not received and time.monotonic() < deadline:
                time.sleep(0.01)
            up_seconds = time.monotonic() - started
    finally:
        server.close()
    assert got == down
    assert received == [up]
    assert down_seconds >= (len(down) - 0.01 * rate) / rate
    assert up_seconds >= (len(up) - 0.01 * rate) / rate


@pytest.mark.parametrize("rate", [0, -1.0, float("nan")])
def test_relay_refuses_a_rate_that_is_not_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="positive number of bytes a second"):
        TcpRelay("127.0.0.1", 1, rate=rate)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("reset", [False, True])
def test_relay_cut_ends_both_sides_at_once(reset: bool) -> None:
    server = _Server(b"hello")
    try:
        with TcpRelay("127.0.0.1", server.port) as relay:
            client = socket.create_connection(relay.address, timeout=10)
            with client:
                assert client.recv(5) == b"hello"
                assert relay.connections == 1
                assert relay.cut(reset=reset) == 1
                assert relay.connections == 0
                if reset:
                    with pytest.raises(ConnectionResetError):
                        client.recv(1)
                else:
                    assert client.recv(1) == b""
                server.thread.join(5)
                assert server.ended == ["reset" if reset else "eof"]
            # It relays new connections after a cut.
            server2 = _Server(b"again")
            try:
                with TcpRelay("127.0.0.1", server2.port) as relay2:
                    with socket.create_connection(relay2.address, timeout=10) as again:
                        assert again.recv(5) == b"again"
            finally:
                server2.close()
            assert relay.cut() == 0
    finally:
        server.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_relay_passes_a_reset_on_and_keeps_relaying() -> None:
    """The target resets while the client sends: the client sees the reset, the relay lives."""
    server = socket.create_server(("127.0.0.1", 0))
    resets = 0

    def serve() -> None:
        nonlocal resets
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            resets += 1

    threading.Thread(target=serve, daemon=True).start()
    try:
        with TcpRelay("127.0.0.1", server.getsockname()[1]) as relay:
            for _ in range(20):
                with socket.create_connection(relay.address, timeout=10) as client:
                    with pytest.raises((ConnectionResetError, BrokenPipeError)):
                        for _ in range(1000):
                            client.sendall(bytes(64 * 1024))
                deadline = time.monotonic() + 5
                while relay.connections and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert relay.connections == 0
            deadline = time.monotonic() + 5
            while resets < 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert resets == 20
    finally:
        server.close()


def test_relay_to_a_closed_port_closes_the_client() -> None:
    port = free_port()
    with TcpRelay("127.0.0.1", port) as relay:
        with socket.create_connection(relay.address, timeout=10) as client:
            assert client.recv(1) == b""
        assert relay.connections == 0


def test_relay_uri_for() -> None:
    with TcpRelay("127.0.0.1", 16509) as relay:
        assert relay.uri_for("storage+tcp://127.0.0.1:16509/session") == (
            f"storage+tcp://127.0.0.1:{relay.port}/session"
        )
        assert relay.uri_for("qemu+tcp://me@localhost:16509/session?x=1") == (
            f"qemu+tcp://me@127.0.0.1:{relay.port}/session?x=1"
        )
        with pytest.raises(ValueError, match="16509"):
            relay.uri_for("storage+tcp://127.0.0.1:16510/session")
    relay.close()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        relay.cut()


def test_relay_to_a_sandbox() -> None:
    with Sandbox(tcp=True) as sb, TcpRelay("127.0.0.1", sb.tcp_port) as relay:
        conn = libvirt.open(relay.uri_for(sb.tcp_uri))
        try:
            assert conn.getLibVersion() > 0
            assert relay.connections == 1
            relay.cut()
            with pytest.raises(libvirt.libvirtError):
                conn.getLibVersion()
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        with sb.connect(tcp=True) as direct:
            assert direct.getLibVersion() > 0, "the daemon itself is unharmed"
