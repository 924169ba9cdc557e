"""The run policy (run/policy.py): every way a run is stopped from outside.

Through supervise(), as Machine.run() does it, around the real run loop and
a fake vCPU (tests/fake_vcpu.py): the real C signal handler armed on the
fake's kvm_run, the real StopRequest and its on_request.
"""

import os
import signal
import threading
import time
import tty

import pytest
from fake_vcpu import interrupted, rigs, shutdown_hypercall

from pylguest.run import stop
from pylguest.run.policy import signal_stop, supervise
from pylguest.run.stop import Stop


@pytest.fixture
def rig_of():
    """Rigs whose stop signals are the C handler's, as Machine's are."""
    for make in rigs():
        yield lambda script, **kw: make(script, signal_source=signal_stop, **kw)


def supervised(rig, **kw):
    return supervise(rig.run, rig.vcpu.kvm_run, rig.stopping, **kw)


def later(seconds, action):
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
    return timer


def test_a_timeout_ends_a_spinning_guest(rig_of):
    rig = rig_of([])
    started = time.monotonic()
    result = supervised(rig, timeout=0.2)
    assert result == stop.timeout(0.2)
    assert time.monotonic() - started < 2


def test_an_api_stop_from_another_thread(rig_of):
    rig = rig_of([])
    wanted = Stop(143, "signal", "the API")
    later(0.1, lambda: rig.stopping.request(wanted))
    assert supervised(rig) == wanted


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal(rig_of, signo):
    rig = rig_of([])
    later(0.1, lambda: os.kill(os.getpid(), signo))
    result = supervised(rig)
    assert result == stop.signal_stop(signo, signal.Signals(signo).name)
    assert result.status == 128 + signo


def test_the_first_stop_asked_for_wins(rig_of):
    rig = rig_of([])
    first = Stop(7, "first")
    later(0.05, lambda: (rig.stopping.request(first), rig.stopping.request(Stop(8, "second"))))
    assert supervised(rig, timeout=5) == first


def test_ctrl_a_x_on_a_terminal(rig_of):
    master, slave = os.openpty()
    tty.setraw(slave)                     # as RawTerminal leaves it: no line discipline
    try:
        rig = rig_of([])
        typed = []
        later(0.1, lambda: os.write(master, b"ab\x01x"))
        result = supervised(rig, input_fd=slave, on_input=typed.append)
        assert result == stop.user_quit()
        assert b"".join(typed) == b"ab"
    finally:
        os.close(master)
        os.close(slave)


def test_the_guest_stopping_itself_takes_everything_down(rig_of):
    rig = rig_of([interrupted, shutdown_hypercall(4)])
    flushed = []
    before = threading.active_count()
    read_fd, write_fd = os.pipe()
    try:
        result = supervised(rig, timeout=30, input_fd=read_fd, on_input=lambda data: None,
                            flush=lambda: flushed.append(True))
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert result == stop.shutdown(4)
    assert flushed == [True]
    deadline = time.monotonic() + 2                  # a cancelled timer ends soon after
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before        # the timer and the reader are gone
