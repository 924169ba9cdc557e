"""The run loop's fast path: the port exits answered in C, and the console
bytes they leave behind.

A Linux serial console costs two exits per character (read LSR until THR
is empty, write the byte to THR), and a probe for absent hardware reads
ports that nobody claims.  Each exit is cheap next to a trip through Python
per exit, so csrc/run_fast.c loops on KVM_RUN and answers those itself:

    `in`/`out` on a port nobody claims   writes vanish, reads are all ones
    `out` of bytes to the UART's THR     the bytes go into a ring (below)
    `in` from the UART's LSR             the value the UART published

It decides nothing by itself.  The port bus publishes which ports are
claimed (claim()); the UART publishes, whenever its registers change,
whether a THR write is nothing but output and what LSR reads as
(publish_uart(), uart.py says when each holds).  Every other exit goes back
to the run loop and its Python handlers, as does every exit when --trace is
on, because the tracer must see each one.

The console ring.  C cannot write to the console itself: ConsoleOutput
(hostconsole/output.py) is Python, and it may make a producer wait for room
(back pressure).  So the bytes wait in a ring in struct pyl_fast, and
drain() moves them to the UART's output, in order, under one lock:

- the run loop drains before it answers any exit C hands back, so a byte
  written through the Python path (or a hypercall's output) never comes
  before one C took earlier;
- a thread drains when C kicks it (an eventfd, written once per batch), so
  a guest that prints a prompt and then halts -- no exit would ever carry
  the prompt out -- still shows it, GATHER seconds later at most;
- a full ring makes C hand the THR write to Python: the run loop's drain
  waits for room in ConsoleOutput, giving way to a stop, as before.
"""

import os
import threading
import time
from contextlib import contextmanager

from pylguest._native import ffi, lib

GATHER = 0.002   # seconds the console thread lets a burst collect: one wakeup, not one per byte


class FastPath:
    """struct pyl_fast (run_fast.c): the table C answers from, the ring of
    console bytes, and the counts of the exits it answered."""

    def __init__(self):
        self.table = ffi.new("struct pyl_fast *")     # zeroed: no port claimed, no UART
        self.table.kick_fd = -1
        self._write = None                # where THR bytes go: the UART's output
        self._lock = threading.Lock()     # one drain at a time, so bytes stay in order
        self._taken = ffi.new("uint8_t[]", lib.PYL_FAST_RING_SIZE)
        self._stopping = None
        self._closing = False

    # -- what the port bus and the UART publish -------------------------------------

    def claim(self, port: int) -> None:
        self.table.claimed[port >> 3] |= 1 << (port & 7)

    def attach_uart(self, base: int, write) -> None:
        """The UART at `base`; THR bytes taken in C go to write(bytes)."""
        self.table.uart_base = base
        self._write = write

    def publish_uart(self, thr_plain: bool, lsr: int) -> None:
        """What C may answer now: THR writes if `thr_plain`, LSR reads with
        `lsr` (0: leave them to Python)."""
        self.table.uart_thr_plain = thr_plain
        self.table.uart_lsr = lsr

    # -- the console ring --------------------------------------------------------------

    def drain(self) -> bool:
        """Move every console byte C has taken to the output, in order; False
        if the run is stopping and the output was still waiting for room."""
        stopping = self._stopping
        if stopping is None:
            self._lock.acquire()
        elif not stopping.acquire(self._lock):
            return False
        try:
            table = self.table
            if table.out_head != table.out_tail:
                count = lib.pyl_fast_take(table, self._taken, lib.PYL_FAST_RING_SIZE)
                self._write(ffi.buffer(self._taken, count)[:])
        finally:
            self._lock.release()
        return True

    @contextmanager
    def running(self, stopping):
        """While the vCPU runs: the thread that C kicks.  (The run loop
        drains after the last exit itself.)"""
        self._stopping = stopping
        self._closing = False
        kick_fd = os.eventfd(0, os.EFD_CLOEXEC)
        thread = threading.Thread(target=self._console_thread, args=(kick_fd,), daemon=True,
                                  name="pylguest fast-path console")
        thread.start()
        self.table.kick_fd = kick_fd
        try:
            yield
        finally:
            self.table.kick_fd = -1       # C is not running: the vCPU thread is here
            self._closing = True
            os.eventfd_write(kick_fd, 1)
            thread.join()                 # a drain waiting for room gives way to a stop
            os.close(kick_fd)

    def _console_thread(self, kick_fd):
        while True:
            os.eventfd_read(kick_fd)
            if self._closing:
                return
            time.sleep(GATHER)
            self.drain()

    # -- --stats -----------------------------------------------------------------------

    def answered(self) -> dict:
        """KVM exit reason -> how many exits of it C answered."""
        return {reason: n for reason, n in enumerate(self.table.answered) if n}
