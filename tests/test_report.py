"""report.py: lines on stderr that a broken stderr cannot turn into a crash,
and guest errors that a hostile guest cannot turn into a flood."""

import os
import subprocess
import sys

from conftest import ROOT, guest_path
from pylguest.report import GuestErrorLog


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make_log():
    lines, clock = [], Clock()
    return GuestErrorLog(write=lines.append, clock=clock), lines, clock


def test_the_first_few_are_shown_in_full():
    log, lines, _ = make_log()
    for i in range(GuestErrorLog.BURST):
        log.report(f"mistake {i}")
    assert lines == [f"pylguest: guest error: mistake {i}" for i in range(GuestErrorLog.BURST)]


def test_a_flood_is_counted_not_printed():
    log, lines, clock = make_log()
    for i in range(20000):
        log.report(f"mistake {i}")
    assert len(lines) == GuestErrorLog.BURST
    clock.now += 1.0                       # one more line a second, saying what it held back
    log.report("one more")
    assert lines[-2:] == [f"pylguest: guest error: ({20000 - GuestErrorLog.BURST} more not shown)",
                          "pylguest: guest error: one more"]
    log.close()
    assert len(lines) == GuestErrorLog.BURST + 2          # nothing held back at the end
    assert log.total == 20001


def test_close_says_how_many_were_held_back():
    log, lines, _ = make_log()
    for i in range(GuestErrorLog.BURST + 3):
        log.report("again")
    log.close()
    assert lines[-1] == f"pylguest: guest error: 3 more not shown ({GuestErrorLog.BURST + 3} in all)"


def test_the_rate_refills_but_never_beyond_the_burst():
    log, lines, clock = make_log()
    for _ in range(GuestErrorLog.BURST):
        log.report("x")
    clock.now += 3600                       # an hour of quiet earns a burst, not 3600 lines
    for _ in range(100):
        log.report("y")
    assert lines.count("pylguest: guest error: y") == GuestErrorLog.BURST


def run_python(code, **kwargs):
    return subprocess.run([sys.executable, "-c", code], timeout=30, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT / "launcher")}, **kwargs)


def test_say_survives_a_closed_stderr():
    # With fd 2 closed, and with fd 2 a pipe whose reader has gone.
    code = "from pylguest.report import say; say('x' * 100000); print('alive')"
    closed = run_python(code, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                        preexec_fn=lambda: os.close(2))
    assert closed.returncode == 0 and closed.stdout == b"alive\n"
    broken = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=ROOT,
                              env={"PYTHONPATH": str(ROOT / "launcher")})
    broken.stderr.close()                   # the reader goes away before the write
    out, _ = broken.communicate(timeout=30)
    assert broken.returncode == 0 and out == b"alive\n"


def test_a_notify_flood_gives_a_few_lines_and_a_count(kvm_available):
    # guests/hostile.c: 20,000 LHCALL_NOTIFYs on an address that is nothing.
    result = subprocess.run([sys.executable, "-m", "pylguest", "run", str(guest_path("hostile")),
                             "--cmdline", "do=notify count=20000", "--timeout", "60"],
                            capture_output=True, text=True, timeout=90, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT / "launcher")})
    assert result.returncode == 0, result.stderr
    assert "hostile: done" in result.stdout
    lines = result.stderr.splitlines()
    assert 1 < len(lines) <= 2 * GuestErrorLog.BURST, result.stderr
    assert all(line.startswith("pylguest: guest error: ") for line in lines)
    assert "LHCALL_NOTIFY(0x7ff000000000)" in lines[0]
    assert lines[-1].endswith("(20000 in all)")


def test_unlimited_every_report_goes_out():
    lines, clock = [], Clock()
    log = GuestErrorLog(write=lines.append, clock=clock, limited=False)
    for i in range(100):
        log.report(f"mistake {i}")
    log.close()
    assert lines == [f"pylguest: guest error: mistake {i}" for i in range(100)]


def test_with_trace_every_guest_error_is_shown(kvm_available):
    """--trace is for someone tracing a driver under development: none is held back."""
    result = subprocess.run([sys.executable, "-m", "pylguest", "run", str(guest_path("hostile")),
                             "--cmdline", "do=notify count=50", "--timeout", "60", "--trace"],
                            capture_output=True, text=True, timeout=90, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT / "launcher")})
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("pylguest: guest error: ")]
    assert len(errors) == 50 and "more not shown" not in result.stderr
