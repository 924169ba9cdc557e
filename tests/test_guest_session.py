"""pylguest.Guest as a session, against a stand-in launcher (no boot).

The stand-in (FAKE below) is what the test process sees of a real
launcher: a process with --agent fd:N, a console on stdout, one line on
stderr when it stops.  It lets the cases that need a guest to die at an
exact moment -- a kernel panic while a command runs -- be checked in
milliseconds; tests/test_linux_session.py checks the same paths with a
real Linux.
"""

import struct
import sys
import time

import pytest

from pylguest import ChannelClosed, Guest

FAKE = r'''
import os, socket, struct, sys, time
argv = sys.argv
fd = int(argv[argv.index("--agent") + 1].split(":")[1])
channel = socket.socket(fileno=fd)
channel.sendall(struct.pack("<IIHH", 16, 0, 0x81, 0) + struct.pack("<III", 1, 65536, 262144)
                + b"fake")
sys.stdout.buffer.write(b"console: na\xc3\xafve \xff line\n")
sys.stdout.flush()
header = b""
while len(header) < 12:
    header += channel.recv(12 - len(header))
length, id_, type_, _ = struct.unpack("<IIHH", header)
print("[   31.5] Kernel panic - not syncing: Attempted to kill init!", flush=True)
time.sleep(0.2)
print("pylguest: kernel panic (exit status 125): Attempted to kill init!", file=sys.stderr,
      flush=True)
sys.exit(125)
'''


@pytest.fixture
def fake_guest(tmp_path):
    script = tmp_path / "fake_launcher.py"
    script.write_text(FAKE)
    with Guest("unused-kernel", agent=True, timeout=30,
               wrapper=[sys.executable, str(script)]) as guest:
        yield guest


def test_a_panic_while_a_command_runs_fails_the_call_at_once(fake_guest):
    fake_guest.wait_ready(10)
    started = time.monotonic()
    with pytest.raises(ChannelClosed) as caught:
        fake_guest.run("sleep 600", timeout=600)
    assert time.monotonic() - started < 10
    assert str(caught.value) == (
        "agent channel: the guest stopped (launcher exit status 125): "
        "pylguest: kernel panic (exit status 125): Attempted to kill init!")
    with pytest.raises(ChannelClosed):
        fake_guest.run("true")


def test_text_and_bytes_follow_the_pattern(fake_guest):
    text = fake_guest.expect(r"naïve (.) line")
    assert text.group(1) == "\ufffd"                  # str pattern: the text, bad bytes replaced
    raw = fake_guest.expect(rb"na\xc3\xafve (.) line")
    assert raw.group(1) == b"\xff"                    # bytes pattern: the exact bytes
    assert "naïve \ufffd line" in fake_guest.output
    assert b"\xff line" in fake_guest.output_bytes


def test_a_session_call_on_a_guest_without_an_agent_says_how_to_get_one(tmp_path):
    guest = Guest("unused-kernel")
    with pytest.raises(Exception, match=r"Guest\(\.\.\., agent=True\)"):
        guest.run("true")
