"""Each way a guest run ends, and the exit status it gives (run/stop.py)."""

import signal
import time

import pytest

from conftest import guest_path
from pylguest import Guest
from pylguest.run import stop


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


# -- a stop while a backend is busy: guests/block.c mode=storm ----------------------
#
# The guest fills its ring with reads of nearly 4 GiB each and keeps them
# coming; the block worker is never idle.  Whatever ends the run -- a
# timeout, a signal, the API -- must end it within about a second, and a
# write the guest saw complete before (its marker in sector 0) must be in
# the file.  The bound asserted is loose for a loaded CI machine; what it
# guards against is a stop that waits for the requests (tens of seconds).

STORM_IMAGE_SIZE = 5 << 30        # sparse: nothing is stored, reads are zeros
STOP_WITHIN = 2.0                 # seconds from the stop to the launcher's exit
MARKER_PATTERN = 7


@pytest.fixture(scope="module")
def storm_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("storm") / "big.img"
    with open(path, "wb") as f:
        f.truncate(STORM_IMAGE_SIZE)
    return path


def storm(image, then="status", timeout=60):
    return Guest(guest_path("block"), timeout=timeout, extra_args=["--block", str(image)],
                 cmdline=f"mode=storm pattern={MARKER_PATTERN} then={then}")


def assert_marker_written(image):
    # block.c's pattern: byte o of sector s is ((s * 7 + o) ^ K) & 0xff.
    with open(image, "rb") as f:
        assert f.read(512) == bytes(((0 * 7 + o) ^ MARKER_PATTERN) & 0xFF for o in range(512))


def test_timeout_ends_a_run_whose_disk_is_busy(kvm_available, storm_image):
    started = time.monotonic()
    with storm(storm_image, timeout=4) as guest:
        guest.expect("storm of 128 reads")
        status = guest.wait(timeout=30)
    late = time.monotonic() - started - 4
    print(f"--timeout 4 with the disk busy: exited {late:.2f} s after the timeout")
    assert status == 124, guest.stderr
    assert late < STOP_WITHIN
    assert_marker_written(storm_image)


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_a_run_whose_disk_is_busy(kvm_available, storm_image, signo):
    with storm(storm_image) as guest:
        guest.expect("status write answered")
        time.sleep(0.2)
        sent = time.monotonic()
        guest.process.send_signal(signo)
        status = guest.wait(timeout=30)
    took = time.monotonic() - sent
    print(f"{signal.Signals(signo).name} with the disk busy: exited after {took:.2f} s")
    assert status == 128 + signo
    assert took < STOP_WITHIN
    assert_marker_written(storm_image)


def test_the_api_stop_ends_a_run_whose_disk_is_busy(kvm_available, storm_image):
    with storm(storm_image) as guest:
        guest.expect("status write answered")
        sent = time.monotonic()
        assert guest.stop(timeout=30) == 143
    assert time.monotonic() - sent < STOP_WITHIN
    assert_marker_written(storm_image)


@pytest.mark.parametrize("then, what", [("status", "status write"), ("reset", "reset")])
def test_the_guest_is_answered_at_once_while_its_disk_is_busy(kvm_available, storm_image,
                                                               then, what):
    # The vCPU thread handles the status write; it must not wait for the
    # worker's reads (a reset abandons them; a plain status write needs no
    # lock at all once the device runs).
    with storm(storm_image, then=then) as guest:
        match = guest.expect(rf"{what} answered in (\d+) ms".encode())
        answered_ms = int(match.group(1))
        assert guest.stop(timeout=30) == 143
    print(f"{what} with the disk busy: answered in {answered_ms} ms (guest clock)")
    assert answered_ms < 1000


def test_an_exit_handler_returns_its_stop_and_never_requests_one():
    """run/__init__.py's stop protocol: the code that answers exits (the
    loop, the port bus and its devices, the hypercall page, the lguest
    bus) hands a Stop up as its return value; only what stands outside the
    loop (run/policy.py, the machine's API) calls StopRequest.request."""
    import pathlib
    import re
    package = pathlib.Path(stop.__file__).resolve().parent.parent
    handlers = [package / "run" / "loop.py", *(package / "platform").glob("*.py"),
                *(package / "lguest").glob("*.py")]
    assert len(handlers) >= 6
    requesting = [path.relative_to(package).as_posix() for path in handlers
                  if re.search(r"\.request\(", path.read_text())]
    assert requesting == []
    # The pattern finds the second door where it is used.
    assert re.search(r"\.request\(", (package / "run" / "policy.py").read_text())
