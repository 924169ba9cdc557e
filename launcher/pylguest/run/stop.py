"""How a guest run ends, and the launcher's exit status for each way.

A guest's own status (LHCALL_SHUTDOWN, bits 0-7) becomes the launcher's
exit status unchanged, so a CI script can `exit 3` from inside the guest
and see 3.  Every other way a run ends has a status of its own and a
reason, which the command line prints as one line on stderr, so that a
kernel panic or a timeout is never taken for what the guest's command
returned.  The launcher's own outcomes use values a shell user already
knows: 124 for a timeout (as timeout(1)), 128+N for signal N.
"""

import re
import threading
import time
from typing import Callable, NamedTuple, Optional

EXIT_OK = 0
EXIT_LAUNCHER_ERROR = 1        # KVM refused something, an unhandled exit
EXIT_USAGE = 2                 # bad command line, missing or unloadable file
EXIT_GUEST_HALTED = 123        # the guest halted without giving a status
EXIT_TIMEOUT = 124             # --timeout expired, as timeout(1) says it
EXIT_GUEST_CRASH = 125         # triple fault or kernel panic: the guest could not go on
EXIT_SIGNAL_BASE = 128         # + the signal number, as a shell reports it


class Stop(NamedTuple):
    """The end of a run: the exit status and a phrase saying why."""
    status: int
    reason: str                # "shutdown", "reboot", "i8042 reset", ...
    detail: str = ""

    def __str__(self):
        text = f"{self.reason} (exit status {self.status})"
        return f"{text}: {self.detail}" if self.detail else text


# What every exit handler returns -- the run loop's, the port bus's and its
# devices', the hypercall page's, the lguest bus's status handler: None to
# let the guest run on, or the Stop that ends the run.
ExitResult = Optional[Stop]


def shutdown(status):
    return Stop(status & 0xFF, "shutdown", f"the guest asked to stop with status {status & 0xFF}")


def reboot(how):
    # We have no firmware to reboot into, so a reboot ends the run, like
    # `qemu -no-reboot`; it is a clean end, status 0.
    return Stop(EXIT_OK, "reboot", how)


def timeout(seconds):
    return Stop(EXIT_TIMEOUT, "timeout", f"the guest was still running after {seconds:g} s")


def signal_stop(signo, name):
    return Stop(EXIT_SIGNAL_BASE + signo, "signal", f"stopped by {name}")


def user_quit():
    return Stop(EXIT_OK, "quit", "Ctrl-A x")


def halted():
    return Stop(EXIT_GUEST_HALTED, "halted",
                "the guest kernel halted instead of powering off, so it gave no exit status")


def kernel_panic(message):
    return Stop(EXIT_GUEST_CRASH, "kernel panic", message)


PANIC_LINE = re.compile(rb"Kernel panic - not syncing: ([^\r\n]*)")
REASON_MAX = 200                   # characters of the guest's words we repeat


def panic_reason(console_tail):
    """What Linux said as it panicked, from the last console output: the
    guest's own words, so only printable characters, and not too many of
    them, reach the host's terminal."""
    said = PANIC_LINE.findall(console_tail)
    if not said:
        return ""
    text = said[-1].decode("utf-8", "replace").strip()
    return "".join(c if c.isprintable() else "?" for c in text)[:REASON_MAX]


def triple_fault(registers):
    return Stop(EXIT_GUEST_CRASH, "triple fault", registers)


def launcher_error(message):
    return Stop(EXIT_LAUNCHER_ERROR, "launcher error", message)


# -- asking for a stop, and waiting without holding one hostage ---------------------
#
# A run ends through one protocol.  Whoever wants it to end -- the --timeout
# timer, the input thread on Ctrl-A x, the Python API, a handler of its own
# -- calls StopRequest.request(stop); a stop signal (SIGTERM, SIGINT,
# SIGHUP) is recorded by the C handler in csrc/kvm.c, since no Python
# code can run inside a signal handler while the vCPU is in KVM_RUN, and
# `signal_stop` reads it.  The first request wins.  The run loop asks
# pending() whenever KVM_RUN returns EINTR, and `on_request` (the machine:
# set immediate_exit and interrupt the vCPU thread) makes sure it returns.
#
# That alone is not enough: the vCPU thread may be waiting for something
# else when the request comes -- a device's lock while a backend works on a
# multi-GiB request, room in a console buffer whose terminal has stopped
# reading.  So no such wait is ever unbounded: each waits in slices of
# SLICE seconds and gives up once pending() says the run is ending.


class StopRequest:
    SLICE = 0.05                   # seconds: the longest a stop waits for a wait

    def __init__(self, on_request=None, signal_stop=None, on_pause=None):
        self._stop = None
        self._on_request = on_request      # () -> None: wake the vCPU thread
        self._signal_stop = signal_stop    # () -> Stop or None: a stop signal seen
        self._on_pause = on_pause          # () -> None: wake it without a stop
        self._pauses = []                  # actions for the vCPU thread, oldest first
        self._pauses_lock = threading.Lock()

    def request(self, stop: Stop) -> None:
        """End the run with `stop`, from any thread (the first request wins)."""
        if self._stop is None:
            self._stop = stop
        if self._on_request is not None:
            self._on_request()

    def pause(self, action: Callable[[], None]) -> None:
        """Have the vCPU thread call action() out of KVM_RUN, then run on:
        a pause, not a stop (a snapshot is taken this way, machine.py).
        From any thread; the run loop calls run_pauses() when KVM_RUN
        returns EINTR."""
        with self._pauses_lock:
            self._pauses.append(action)
        if self._on_pause is not None:
            self._on_pause()

    def run_pauses(self) -> None:
        """On the vCPU thread, stopped: the actions pause() was given."""
        while True:
            with self._pauses_lock:
                if not self._pauses:
                    return
                action = self._pauses.pop(0)
            action()

    def clear(self):
        """Forget a stop that was handled without ending the machine: a
        pause, after which the run loop is entered again
        (tools/kvm_state_probe.py)."""
        self._stop = None

    def pending(self):
        """The Stop the run is ending with, or None while it goes on."""
        if self._stop is not None:
            return self._stop
        return self._signal_stop() if self._signal_stop is not None else None

    def acquire(self, lock) -> bool:
        """Take `lock`, unless the run ends first: True if it was taken."""
        while not lock.acquire(timeout=self.SLICE):
            if self.pending() is not None:
                return False
        return True

    def wait(self, condition, predicate, timeout=None) -> bool:
        """condition.wait_for(predicate), in slices, giving up when the run
        ends or `timeout` passes; the caller holds `condition`.  True if
        the predicate came true."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not predicate():
            if self.pending() is not None:
                return False
            left = self.SLICE if deadline is None else min(self.SLICE, deadline - time.monotonic())
            if left <= 0:
                return False
            condition.wait(left)
        return True
