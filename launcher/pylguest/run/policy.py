"""The run policy: what may end a run besides the guest, set up around the loop.

  * SIGINT, SIGTERM and SIGHUP: a C handler (csrc/kvm.c) records the
    signal and sets kvm_run->immediate_exit, so KVM_RUN returns EINTR even
    if the signal came just before it was entered;
  * --timeout: a timer thread asks for stop.timeout();
  * console input: a thread reads the terminal (or a pipe) and hands the
    bytes to the guest; on a terminal, Ctrl-A x asks for stop.user_quit().

All of them ask through the one StopRequest (run/stop.py), whose on_request
wakes the vCPU thread; the run loop then returns the Stop.  Whatever ends
the run, everything set up here is taken down again before supervise()
returns, and the console is flushed.
"""

import os
import signal
import threading
from typing import Callable, Optional

from pylguest.run import stop
from pylguest._native import ffi, lib
from pylguest.hostconsole.terminal import InputReader
from pylguest.run.stop import Stop

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def signal_stop() -> Optional[Stop]:
    """The Stop for a stop signal the C handler caught, if one came."""
    signo = lib.pyl_stop_signal()
    return stop.signal_stop(signo, signal.Signals(signo).name) if signo else None


def request_stop_of_vcpu() -> None:
    """StopRequest's on_request: interrupt KVM_RUN as a signal would."""
    lib.pyl_request_stop(0)


def wake_vcpu() -> None:
    """StopRequest's on_pause: bring the vCPU out of KVM_RUN, no stop."""
    lib.pyl_wake_vcpu()


def supervise(run: Callable[[], Stop], kvm_run, stopping: stop.StopRequest, *,
              timeout: Optional[float] = None, input_fd: Optional[int] = None,
              on_input: Optional[Callable[[bytes], None]] = None,
              flush: Callable[[], None] = lambda: None) -> Stop:
    """Call run() (the vCPU's loop, on this thread) with the stop signals
    armed for `kvm_run`, a --timeout timer and an input reader; return its
    Stop."""
    signals = ffi.new("int[]", list(STOP_SIGNALS))
    if lib.pyl_arm_stop_signals(kvm_run, signals, len(STOP_SIGNALS)) < 0:
        raise OSError("cannot install the launcher's signal handlers")
    reader = timer = None
    try:
        if input_fd is not None:
            reader = InputReader(input_fd, on_input,
                                 on_quit=lambda: stopping.request(stop.user_quit()),
                                 escapes=os.isatty(input_fd)).start()
        if timeout:
            timer = threading.Timer(timeout, lambda: stopping.request(stop.timeout(timeout)))
            timer.daemon = True
            timer.start()
        return run()
    finally:
        if timer:
            timer.cancel()
        if reader:
            reader.stop()
        lib.pyl_disarm_stop_signals()
        flush()
