"""``console`` and ``screenshot`` against the QEMU test guest (libvirt_guest), the
console in a pseudo-terminal: typed bytes come back upper-cased by the guest, Ctrl+]
leaves, and the terminal's settings are restored on every way out."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiovirtstream.testing import GuestInfo, Sandbox

Attrs = list[object]


class Terminal:
    """``aiovirtstream console ...`` on a pseudo-terminal of its own."""

    def __init__(self, *args: str) -> None:
        self.master, self.slave = pty.openpty()
        self.before: Attrs = termios.tcgetattr(self.slave)
        env = {**os.environ, "TERM": "xterm"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aiovirtstream", "console", *args],
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            env=env,
            start_new_session=True,
        )
        self.seen = b""

    def attrs(self) -> Attrs:
        return termios.tcgetattr(self.slave)

    def read_until(self, text: bytes, timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            assert time.monotonic() < deadline, f"no {text!r} in {self.seen!r}"
            if select.select([self.master], [], [], 0.1)[0]:
                self.seen += os.read(self.master, 65536)
        return self.seen

    def wait_raw(self, timeout: float = 30) -> None:
        """Until the command made the terminal raw (no ICANON, no ECHO)."""
        self.read_until(b"Escape character is ^]")
        deadline = time.monotonic() + timeout
        while self.attrs()[3] & (termios.ICANON | termios.ECHO):  # type: ignore[operator]
            assert time.monotonic() < deadline, "the terminal never went raw"
            time.sleep(0.01)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def end(self, timeout: float = 30) -> tuple[int, str]:
        """(exit status, everything it wrote) once it exited."""
        status = self.process.wait(timeout=timeout)
        while select.select([self.master], [], [], 0.2)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        return status, self.seen.decode(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


def console(terminals: list[Terminal], guest: GuestInfo, *args: str) -> Terminal:
    terminal = Terminal("-c", guest.uri, guest.name, *args)
    terminals.append(terminal)
    return terminal


def test_type_see_the_answer_and_leave_with_ctrl_bracket(
    libvirt_guest: GuestInfo, terminals: list[Terminal]
) -> None:
    term = console(terminals, libvirt_guest)
    term.wait_raw()
    assert term.attrs() != term.before
    term.type(b"hello console\n")
    term.read_until(b"HELLO CONSOLE")  # only the guest upper-cases
    term.type(b"\x03more\n")  # Ctrl+C goes to the guest, the command stays
    term.read_until(b"MORE")
    term.type(b"\x1d")
    status, seen = term.end()
    assert status == 0, seen
    assert term.attrs() == term.before
    assert f"Connected to domain '{libvirt_guest.name}'" in seen
    assert "ended" not in seen and "error" not in seen
    # The console was left, not held: another client gets it without --force.
    again = console(terminals, libvirt_guest)
    again.wait_raw()
    again.type(b"x\n")
    again.read_until(b"X")
    again.type(b"\x1d")
    assert again.end()[0] == 0


def test_sigterm_restores_the_terminal(libvirt_guest: GuestInfo, terminals: list[Terminal]) -> None:
    term = console(terminals, libvirt_guest)
    term.wait_raw()
    term.process.send_signal(signal.SIGTERM)
    status, seen = term.end()
    assert status == 143, seen
    assert term.attrs() == term.before
    assert seen.rstrip().endswith("aiovirtstream: terminated") and "Traceback" not in seen


def test_the_guest_going_away_is_one_line(
    libvirt_sandbox_full: Sandbox, libvirt_guest: GuestInfo, terminals: list[Terminal]
) -> None:
    term = console(terminals, libvirt_guest)
    term.wait_raw()
    libvirt_sandbox_full.stop_test_guest(libvirt_guest, wait=False)
    status, seen = term.end()
    assert status == 0, seen
    assert term.attrs() == term.before
    last = seen.rstrip().splitlines()[-1]
    assert last.startswith(f"aiovirtstream: the console of domain '{libvirt_guest.name}' ended: ")


def test_a_held_console_needs_force_and_force_takes_it(
    libvirt_guest: GuestInfo, terminals: list[Terminal]
) -> None:
    holder = console(terminals, libvirt_guest)
    holder.wait_raw()
    refused = console(terminals, libvirt_guest)
    status, seen = refused.end()
    assert status == 1, seen
    assert refused.attrs() == refused.before  # never made raw
    assert seen.strip().splitlines()[-1].startswith("aiovirtstream: error: another client holds")
    assert "--force" in seen
    taker = console(terminals, libvirt_guest, "--force")
    taker.wait_raw()
    status, seen = holder.end()
    assert status == 1, seen
    assert holder.attrs() == holder.before
    assert "was closed by the daemon: another client took it over" in seen.splitlines()[-1], seen
    taker.type(b"mine\n")
    taker.read_until(b"MINE")
    taker.type(b"\x1d")
    assert taker.end()[0] == 0


def test_an_unknown_domain_or_device(libvirt_guest: GuestInfo, terminals: list[Terminal]) -> None:
    term = Terminal("-c", libvirt_guest.uri, "no-such-guest")
    terminals.append(term)
    status, seen = term.end()
    assert status == 1 and "no-such-guest" in seen and "Traceback" not in seen
    bad_dev = console(terminals, libvirt_guest, "--devname", "serial9")
    status, seen = bad_dev.end()
    assert status == 1, seen
    assert seen.strip().splitlines()[-1].startswith("aiovirtstream: error: ")
    assert bad_dev.attrs() == bad_dev.before


def test_screenshot(libvirt_guest: GuestInfo, tmp_path: Path) -> None:
    def shot(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aiovirtstream", "screenshot", "-c", libvirt_guest.uri, *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )

    done = shot(libvirt_guest.name, "screen")  # no extension: the MIME type's is added
    assert done.returncode == 0, done.stderr
    [made] = list(tmp_path.iterdir())
    magic = made.read_bytes()[:8]
    if made.suffix == ".png":
        assert magic == b"\x89PNG\r\n\x1a\n" and "(image/png, " in done.stdout
    else:
        assert made.suffix == ".ppm" and magic.startswith(b"P6")
    assert done.stdout.startswith(f"{made.name} (")
    again = shot(libvirt_guest.name, made.name)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert len(again.stderr.splitlines()) == 1
    assert shot(libvirt_guest.name, made.name, "--overwrite").returncode == 0
    default = shot(libvirt_guest.name)  # DOMAIN-TIME.EXT
    assert default.returncode == 0, default.stderr
    assert any(p.name.startswith(f"{libvirt_guest.name}-") for p in tmp_path.iterdir())
    bad_screen = shot(libvirt_guest.name, "s2", "--screen", "7")
    assert bad_screen.returncode == 1
    assert bad_screen.stderr.startswith("aiovirtstream: error: ")
    assert len(bad_screen.stderr.splitlines()) == 1
    assert not list(tmp_path.glob("s2*")) and not list(tmp_path.glob(".*part"))
