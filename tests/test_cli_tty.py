"""`pylguest run` on a real terminal: raw mode, Ctrl-A x, and restoring it."""

import contextlib
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


@contextlib.contextmanager
def on_a_terminal(*args):
    """`pylguest run ARGS` with a pty as its terminal: (master, slave,
    process, the terminal's attributes before the launcher started)."""
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "launcher"))
    process = subprocess.Popen([sys.executable, "-m", "pylguest", "run", *map(str, args)],
                               stdin=slave, stdout=slave, stderr=slave, env=env,
                               start_new_session=True)
    try:
        yield master, slave, process, before
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
        os.close(slave)


def test_ctrl_a_x_quits_and_the_terminal_is_restored(kvm_available):
    with on_a_terminal(guest_path("echo"), "--timeout", "60") as (master, slave, process, before):
        read_until(master, b"echo: ready")
        during = termios.tcgetattr(slave)
        assert not during[3] & termios.ICANON and not during[3] & termios.ECHO   # raw
        os.write(master, b"abc")
        read_until(master, b"ABC")
        os.write(master, b"\x01x")                 # Ctrl-A x
        assert process.wait(timeout=30) == 0
        assert termios.tcgetattr(slave) == before


def test_ctrl_a_x_quits_at_once_while_the_disk_is_busy(kvm_available, tmp_path):
    # guests/block.c mode=storm keeps the block worker busy with reads of
    # nearly 4 GiB each (test_stop.py has the other ways of stopping it).
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(5 << 30)                        # sparse
    with on_a_terminal(guest_path("block"), "--timeout", "60", "--block", image,
                       "--cmdline", "mode=storm") as (master, _, process, _):
        read_until(master, b"status write answered")
        sent = time.monotonic()
        os.write(master, b"\x01x")                 # Ctrl-A x
        assert process.wait(timeout=30) == 0
        took = time.monotonic() - sent
    print(f"Ctrl-A x with the disk busy: exited after {took:.2f} s")
    assert took < 2.0
