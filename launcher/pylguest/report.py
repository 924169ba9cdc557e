"""What the launcher tells the person running it: lines on stderr.

Two rules, each learned the hard way.

A message must never cost the guest its exit status.  stderr may be
closed (`2>&-`), a pipe whose reader has gone (`2>&1 | head -c 10`), or a
full disk; Python's own `sys.stderr` would raise BrokenPipeError in the
middle of a run, and again when the interpreter flushes it at exit.  So
every line goes out through `say()`, one write(2) on fd 2, and what cannot
be written is dropped: the launcher's messages are worth less than the
guest's result.

A guest decides how often it misbehaves.  A hostile one can do something
wrong 20,000 times a second (a bad LHCALL_NOTIFY costs it one store), and
a line per mistake would flood the host's logs.  `GuestErrorLog` prints the
first few in full, then at most one a second, and says how many it held
back; `close()` gives the final count.
"""

import os
import threading
import time

STDERR = 2


def say(text: str) -> None:
    """One line on stderr, or nothing if stderr cannot take it."""
    data = (text.rstrip("\n") + "\n").encode("utf-8", "backslashreplace")
    view = memoryview(data)
    while view:
        try:
            written = os.write(STDERR, view)
        except InterruptedError:
            continue
        except OSError:
            return                 # closed, broken pipe, full disk: drop it
        view = view[written:]


class BrokenReport(str):
    """The line a device's breaking reports ("block0/requests: ...: device
    block0 marked broken until the guest resets it"), which also keeps
    what broke it: `device` (its name) and `error` (the GuestError or
    HostIOError, with its rule, queue and head)."""

    def __new__(cls, device, error):
        line = super().__new__(
            cls, f"{error}: device {device} marked broken until the guest resets it")
        line.device, line.error = device, error
        return line


class GuestErrorLog:
    """Rate-limited reports of a guest's mistakes (a token bucket).

    `BURST` reports go out at once; after that one more a second.  A report
    that finds the bucket empty is counted, and the next one that goes out
    says how many were held back.  Thread-safe: the vCPU thread and every
    queue worker report here.  With `limited=False` (a --trace run, which
    is already a line per event, for someone tracing a driver under
    development) every report goes out.
    """

    BURST = 5
    PER_SECOND = 1.0
    PREFIX = "pylguest: guest error: "

    def __init__(self, write=say, clock=time.monotonic, before_write=None, limited=True):
        self._write = write
        self._limited = limited
        self._clock = clock
        self._before_write = before_write   # e.g. flush the console first, for order
        self._lock = threading.Lock()
        self._tokens = float(self.BURST)
        self._last = clock()
        self.held_back = 0                  # not shown since the last line
        self.total = 0                      # every report, shown or not

    def report(self, message: str) -> None:
        with self._lock:
            self.total += 1
            now = self._clock()
            self._tokens = min(self.BURST, self._tokens + (now - self._last) * self.PER_SECOND)
            self._last = now
            if self._tokens < 1 and self._limited:
                self.held_back += 1
                return
            self._tokens = max(self._tokens - 1, 0.0)
            held, self.held_back = self.held_back, 0
        if self._before_write is not None:
            self._before_write()
        if held:
            self._write(f"{self.PREFIX}({held} more not shown)")
        self._write(self.PREFIX + message)

    def close(self) -> None:
        """Say how many reports were held back at the end, if any were."""
        with self._lock:
            held, self.held_back = self.held_back, 0
        if held:
            self._write(f"{self.PREFIX}{held} more not shown ({self.total} in all)")
