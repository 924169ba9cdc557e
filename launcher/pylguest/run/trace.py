"""--trace: one line per exit, decoded, for people learning what a guest does.

Each line says when (seconds since the guest started), what kind of exit,
and what it meant:

    [  0.004121] io  out 0x3f8 uart.THR/RBR = 0x68 'h'
    [  0.004190] io  in  0x3fd uart.LSR -> 0x60
    [  0.010002] mmio write 0xfeb00008 LHCALL_SHUTDOWN(status 3)

The device bus adds status changes, kicks and interrupts by device and
queue name (`status block0: 0x07 (...)`, `kick  block0/requests`, `irq   block0/requests`).
Tracing costs nothing when off: the run loop only calls a Tracer if there
is one.
"""

import threading
import time

from pylguest.report import say


def _printable(value):
    return f" {chr(value)!r}" if 0x20 <= value < 0x7F else ""


class Tracer:
    def __init__(self, write=say):
        self.write = write             # one line of text; stderr by default
        self.start = time.monotonic()
        # The vCPU thread and every queue worker trace: one line at a time.
        self._lock = threading.Lock()

    def line(self, text):
        elapsed = time.monotonic() - self.start
        with self._lock:
            self.write(f"[{elapsed:12.6f}] {text}")

    def io_out(self, port, size, value, name):
        self.line(f"io  out 0x{port:x} {name} = 0x{value:0{2 * size}x}{_printable(value)}")

    def io_in(self, port, size, value, name):
        self.line(f"io  in  0x{port:x} {name} -> 0x{value:0{2 * size}x}")

    def mmio(self, gpa, is_write, meaning):
        verb = "write" if is_write else "read "
        self.line(f"mmio {verb} 0x{gpa:x} {meaning}")

    def event(self, text):
        self.line(text)
