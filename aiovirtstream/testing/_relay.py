"""A TCP relay in front of a sandbox: a network that tests can cut or slow down."""

from __future__ import annotations

__all__ = [
    "TcpRelay",
]

import contextlib
import selectors
import socket
import struct
import threading
import time
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

_RELAY_CHUNK = 256 * 1024


_RELAY_BUFFER = 1 << 20  # per direction: a side is not read while this much waits for the other
_BURST_SECONDS = 0.01  # a rate-limited direction may send this much of a second's bytes at once
_MIN_BURST = 16 * 1024


class _Bucket:
    """A token bucket: the bytes one direction of the relay may send now."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(rate * _BURST_SECONDS, _MIN_BURST)
        self.tokens = self.burst
        self._stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait(self) -> float:
        """Seconds until a send of at least a quarter burst is allowed (0: now)."""
        want = self.burst / 4
        return 0.0 if self.tokens >= want else (want - self.tokens) / self.rate


class _Link:
    """One relayed connection: the client's socket, the target's, a buffer towards each."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.upstream = upstream
        self.peer = {client: upstream, upstream: client}
        self.out = {client: bytearray(), upstream: bytearray()}  # bytes to write to the socket
        self.read_done = {client: False, upstream: False}
        self.registered: dict[socket.socket, int] = {}
        self.closed = False

    def close(self, selector: selectors.BaseSelector, *, reset: bool = False) -> None:
        self.closed = True
        for sock in self.peer:
            if self.registered.pop(sock, 0):
                selector.unregister(sock)
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


class TcpRelay:
    """A loopback TCP relay that can cut its connections: a network fault for tests.

    It listens on ``127.0.0.1`` (a free port: :attr:`port`) and forwards each
    connection to ``host:port``, in a thread of its own, so it serves sync
    and async tests alike and never waits for the test's event loop.
    :meth:`cut` closes every connection relayed so far, both sides at once,
    as a broken network would end them; later connections are relayed again::

        with Sandbox(tcp=True) as sb, TcpRelay("127.0.0.1", sb.tcp_port) as relay:
            conn = await aiovirtstream.connect(relay.uri_for(sb.tcp_uri))
            ...
            relay.cut()  # the connection's streams fail with ConnectionLostError

    ``rate`` (bytes a second) slows the relay down to a network link's speed:
    each direction carries at most ``rate`` bytes a second, shared by all the
    connections relayed, as a host's link would (``rate=125e6`` for 1 Gbit/s).
    None (the default): as fast as loopback goes.

    Use it as a context manager or call :meth:`start` and :meth:`close`.
    """

    def __init__(self, host: str, port: int, *, rate: float | None = None) -> None:
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be a positive number of bytes a second, not {rate!r}")
        self.target = (host, port)
        self.rate = rate
        # Bytes towards the target, and towards the clients.
        self._buckets = (_Bucket(rate), _Bucket(rate)) if rate is not None else None
        self._listener: socket.socket | None = None
        self._address: tuple[str, int] | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._commands: list[tuple[str, bool, threading.Event, list[int]]] = []
        self._commands_lock = threading.Lock()
        self._links: list[_Link] = []
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where the relay listens: ``("127.0.0.1", port)``."""
        if self._address is None:
            raise RuntimeError("the relay was not started")
        return self._address

    @property
    def port(self) -> int:
        """The port the relay listens on."""
        return self.address[1]

    @property
    def connections(self) -> int:
        """How many relayed connections are open now."""
        return len(self._links)

    def uri_for(self, uri: str) -> str:
        """``uri`` (e.g. a sandbox's :attr:`~Sandbox.tcp_uri`) with its host and port the relay's.

        Raises ValueError if ``uri`` does not name the relay's target port.
        """
        parts = urlsplit(uri)
        if parts.port != self.target[1]:
            raise ValueError(f"{uri!r} does not go to port {self.target[1]}, the relay's target")
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@" if user else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{self.port}"))

    def start(self) -> None:
        """Listen and start relaying (once)."""
        if self._listener is not None:
            raise RuntimeError("the relay was started already")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        self._wake_r.setblocking(False)
        self._listener = listener
        self._address = ("127.0.0.1", listener.getsockname()[1])
        self._thread = threading.Thread(
            target=self._run, name=f"aiovirtstream-relay-{self.port}", daemon=True
        )
        self._thread.start()

    def cut(self, *, reset: bool = False) -> int:
        """Close every relayed connection, client and target side; return how many.

        Returns once they are closed. With ``reset`` they end with a TCP
        reset (ECONNRESET) rather than an orderly end of file.
        """
        return self._command("cut", reset)

    def close(self) -> None:
        """Cut every connection, stop listening and end the thread. Idempotent."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._command("close", False)
            thread.join()
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> TcpRelay:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"127.0.0.1:{self.port}" if self._address is not None else "not started"
        return f"<TcpRelay {where} -> {self.target[0]}:{self.target[1]}>"

    def _command(self, name: str, reset: bool) -> int:
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"{self!r} is not running")
        done, result = threading.Event(), [0]
        with self._commands_lock:
            self._commands.append((name, reset, done, result))
        self._wake_w.send(b"\0")
        if not done.wait(10):
            raise RuntimeError(f"{self!r} did not answer {name}")
        return result[0]

    # --- the relay's thread ---------------------------------------------------

    def _run(self) -> None:
        assert self._listener is not None
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, None)
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while True:
                timeout = self._refill()
                for key, mask in selector.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept(selector)
                    elif key.fileobj is self._wake_r:
                        if not self._serve_commands(selector):
                            return
                    else:
                        link, sock = key.data
                        if not link.closed:  # an earlier event of this batch closed it
                            self._pump(selector, link, sock, mask)
                if self._buckets is not None:
                    self._refill()
                    for link in self._links:
                        self._update(selector, link)
        finally:
            for link in self._links:
                link.close(selector)
            self._links.clear()
            selector.close()

    def _refill(self) -> float | None:
        """Refill the buckets; how long the thread may wait before doing it again."""
        if self._buckets is None:
            return None
        now = time.monotonic()
        waits = []
        for bucket in self._buckets:
            bucket.refill(now)
            waits.append(bucket.wait())
        waiting = [wait for wait in waits if wait > 0]
        return min(waiting) if waiting else None

    def _bucket(self, link: _Link, sock: socket.socket) -> _Bucket | None:
        """The bucket that sending on ``sock`` draws from."""
        if self._buckets is None:
            return None
        return self._buckets[0] if sock is link.upstream else self._buckets[1]

    def _serve_commands(self, selector: selectors.BaseSelector) -> bool:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        with self._commands_lock:
            commands, self._commands = self._commands, []
        running = True
        for name, reset, done, result in commands:
            result[0] = len(self._links)
            for link in self._links:
                link.close(selector, reset=reset)
            self._links.clear()
            running = running and name != "close"
            done.set()
        return running

    def _accept(self, selector: selectors.BaseSelector) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()  # the target refuses: so does the relay
                continue
            link = _Link(client, upstream)
            for sock in (client, upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._links.append(link)
            self._update(selector, link)

    def _pump(
        self, selector: selectors.BaseSelector, link: _Link, sock: socket.socket, mask: int
    ) -> None:
        peer = link.peer[sock]
        try:
            if mask & selectors.EVENT_READ:
                data = sock.recv(_RELAY_CHUNK)
                if data:
                    link.out[peer] += data
                else:
                    link.read_done[sock] = True
                    if not link.out[peer]:
                        peer.shutdown(socket.SHUT_WR)
            bucket = self._bucket(link, sock)
            if mask & selectors.EVENT_WRITE and link.out[sock]:
                out = link.out[sock]
                if bucket is None:
                    sent = sock.send(out)
                else:
                    sent = sock.send(memoryview(out)[: max(int(bucket.tokens), 0)])
                    bucket.tokens -= sent
                del out[:sent]
                if not link.out[sock] and link.read_done[peer]:
                    sock.shutdown(socket.SHUT_WR)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # one side reset: so is the other
            link.close(selector, reset=True)
            self._links.remove(link)
            return
        if all(link.read_done.values()) and not any(link.out.values()):
            link.close(selector)
            self._links.remove(link)
            return
        self._update(selector, link)

    def _update(self, selector: selectors.BaseSelector, link: _Link) -> None:
        """Read a side while its peer's buffer has room, write it while it has
        bytes waiting (and, with a rate, while its direction's bucket allows)."""
        for sock, peer in link.peer.items():
            bucket = self._bucket(link, sock)
            allowed = bucket is None or bucket.wait() == 0
            events = selectors.EVENT_WRITE if link.out[sock] and allowed else 0
            if not link.read_done[sock] and len(link.out[peer]) < _RELAY_BUFFER:
                events |= selectors.EVENT_READ
            registered = link.registered.get(sock, 0)
            if events == registered:
                continue
            if not registered:
                selector.register(sock, events, (link, sock))
            elif not events:
                selector.unregister(sock)
            else:
                selector.modify(sock, events, (link, sock))
            link.registered[sock] = events
