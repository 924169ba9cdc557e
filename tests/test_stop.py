"""Each way a guest run ends, and the exit status it gives (stop.py)."""

import signal
import time

import pytest

from conftest import guest_path
from pylguest import Guest, stop


def run_stop_guest(how, *, timeout=30, extra=""):
    with Guest(guest_path("stop"), cmdline=f"how={how} {extra}".strip(),
               timeout=timeout) as guest:
        guest.expect(f"stop: {how}")
        status = guest.wait()
        return status, guest.stderr


def test_shutdown_status_is_the_exit_status(kvm_available):
    assert run_stop_guest("shutdown", extra="status=7")[0] == 7
    assert run_stop_guest("shutdown", extra="status=0")[0] == 0


def test_reboot_hypercall_ends_the_run_cleanly(kvm_available):
    assert run_stop_guest("reboot", extra="status=9")[0] == 0


def test_i8042_reset(kvm_available):
    assert run_stop_guest("i8042")[0] == 0


def test_triple_fault_prints_registers(kvm_available):
    status, stderr = run_stop_guest("triple")
    assert status == 125
    assert "triple fault" in stderr
    assert "rip=0x" in stderr and "cr3=0x9000" in stderr


@pytest.mark.parametrize("how", ["hang", "spin"])
def test_timeout_stops_a_guest_that_never_exits(kvm_available, how):
    start = time.monotonic()
    status, stderr = run_stop_guest(how, timeout=3)
    assert status == 124
    assert "timeout" in stderr
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_a_halted_guest(kvm_available, signo):
    with Guest(guest_path("stop"), cmdline="how=hang", timeout=60) as guest:
        guest.expect("stop: hang")
        time.sleep(0.2)
        guest.process.send_signal(signo)
        assert guest.wait(timeout=20) == 128 + signo
        assert "signal" in guest.stderr


# -- the reason a kernel panic gives ------------------------------------------------


def test_panic_reason_is_the_last_thing_linux_said_as_it_panicked():
    tail = (b"[ 1.0] Kernel panic - not syncing: first\r\n[ 2.0] noise\r\n"
            b"[ 3.0] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n"
            b"[ 3.1] CPU: 0 PID: 1\r\n")
    assert stop.panic_reason(tail) == "VFS: Unable to mount root fs"
    assert stop.panic_reason(b"no panic here\n") == ""


def test_panic_reason_passes_no_control_characters_and_is_bounded():
    hostile = b"Kernel panic - not syncing: \x1b[2J\x07" + b"A" * 1000 + b"\n"
    reason = stop.panic_reason(hostile)
    assert "\x1b" not in reason and "\x07" not in reason
    assert reason.startswith("?[2J?AAA") and len(reason) == stop.REASON_MAX
