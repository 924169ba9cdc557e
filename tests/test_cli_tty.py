"""`pylguest run` on a real terminal: raw mode, Ctrl-A x, and restoring it."""

import os
import select
import subprocess
import sys
import termios
import time

from conftest import ROOT, guest_path


def read_until(fd, marker, timeout=30):
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} in {seen!r}"
        if select.select([fd], [], [], remaining)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def test_ctrl_a_x_quits_and_the_terminal_is_restored(kvm_available):
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "launcher"))
    process = subprocess.Popen(
        [sys.executable, "-m", "pylguest", "run", str(guest_path("echo")), "--timeout", "60"],
        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    try:
        read_until(master, b"echo: ready")
        during = termios.tcgetattr(slave)
        assert not during[3] & termios.ICANON and not during[3] & termios.ECHO   # raw
        os.write(master, b"abc")
        read_until(master, b"ABC")
        os.write(master, b"\x01x")                 # Ctrl-A x
        assert process.wait(timeout=30) == 0
        assert termios.tcgetattr(slave) == before
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
        os.close(slave)
