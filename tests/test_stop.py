"""Each way a guest run ends, and the exit status it gives (stop.py)."""

import signal
import time

import pytest

from conftest import guest_path
from pylguest import Guest


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
