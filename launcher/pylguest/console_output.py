"""Where the guest's console output goes: a buffered writer to a host fd.

Every console the guest has (the 8250's transmit register, the virtio
console, the early-console hypercall) ends up here.  The 8250 hands us one
byte per `out` instruction; one write(2) per byte would cost more than the
guest's exit did, so bytes collect in a buffer and reach the fd in chunks:

- at once on a newline, so line-by-line output (a boot log) is never late;
- at once when the buffer reaches FLUSH_SIZE, which bounds memory;
- otherwise FLUSH_DELAY after the first unwritten byte, by a flusher
  thread, so a shell prompt with no newline still shows up promptly.

Two locks, and why: `_lock` (inside `_more`) guards the buffer and is held
only for moments, so the vCPU thread appending a byte never waits on a
slow terminal.  `_write_lock` is held across the write(2) calls: it keeps
chunks in order when the vCPU thread and the flusher flush at the same
time, and it is what makes a writer wait (back pressure) when the fd is
stuck and the buffer is full.  Order: `_write_lock` before `_lock`.

A stdout that goes away (the reader of a pipe exits, a terminal hangs up)
must not kill the launcher: the first such error is remembered in `error`,
later output is counted in `dropped` and discarded.  Python ignores
SIGPIPE, so a closed pipe shows up as EPIPE here rather than as a signal.
"""

import errno
import os
import select
import threading
import time
from typing import Callable, Optional

FLUSH_SIZE = 4096         # bytes: flush when the buffer holds this many
FLUSH_DELAY = 0.010       # seconds: the longest an unfinished line waits
TAIL_SIZE = 4096          # bytes of recent output kept, to explain a stop

# Errors after which the fd will never take output again.
_GONE = (errno.EPIPE, errno.EBADF, errno.EIO, errno.ENXIO)


class ConsoleOutput:
    def __init__(self, fd: int = 1, tee: Optional[Callable[[bytes], None]] = None,
                 flush_delay: float = FLUSH_DELAY):
        self.fd = fd
        self.tee = tee                    # also sees every chunk (the Python API);
                                          # it must not write to this output
        self.flush_delay = flush_delay
        self.system_writes = 0            # write(2) calls made: tests watch this
        self.dropped = 0                  # bytes lost because the fd went away
        self.error: Optional[OSError] = None
        self._buffer = bytearray()
        self._tail = bytearray()          # the last TAIL_SIZE bytes written out
        self._first_byte_time = 0.0       # when the oldest unwritten byte came
        self._closed = False
        self._write_lock = threading.Lock()
        self._more = threading.Condition(threading.Lock())
        self._flusher = threading.Thread(target=self._flusher_loop, daemon=True,
                                         name="pylguest console flusher")
        self._flusher.start()

    # -- what the devices call -------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue guest output; it reaches the fd soon (see the module doc)."""
        if not data:
            return
        with self._more:
            if not self._buffer:
                self._first_byte_time = time.monotonic()
                self._more.notify()       # the flusher starts its countdown
            self._buffer += data
            urgent = (self._closed or b"\n" in data
                      or len(self._buffer) >= FLUSH_SIZE)
        if urgent:
            self.flush()

    def flush(self) -> None:
        """Write out everything queued so far, in order."""
        with self._write_lock:
            with self._more:
                chunk = bytes(self._buffer)
                self._buffer.clear()
            if chunk:
                self._emit(chunk)

    def tail(self) -> bytes:
        """The most recent output (up to TAIL_SIZE bytes), flushed first:
        what a kernel said just before it stopped, for the stop's reason."""
        self.flush()
        with self._write_lock:
            return bytes(self._tail)

    def close(self) -> None:
        """Flush and stop the flusher thread.  The fd stays open: it is the
        caller's (usually our own stdout).  Later writes go straight out."""
        with self._more:
            self._closed = True
            self._more.notify()
        self._flusher.join(timeout=5.0)
        self.flush()

    # -- the flusher thread ------------------------------------------------------

    def _flusher_loop(self):
        with self._more:
            while not self._closed:
                if not self._buffer:
                    self._more.wait()
                    continue
                wait = self._first_byte_time + self.flush_delay - time.monotonic()
                if wait > 0:
                    self._more.wait(wait)
                    continue
                # flush() takes _write_lock first: drop ours to keep the order.
                self._more.release()
                try:
                    self.flush()
                finally:
                    self._more.acquire()

    # -- the system calls ----------------------------------------------------------

    def _emit(self, chunk: bytes) -> None:
        """Hand one chunk to the tee and to the fd.  Called with _write_lock."""
        if self.tee is not None:
            self.tee(chunk)
        self._tail += chunk
        del self._tail[:-TAIL_SIZE]
        if self.error is not None:
            self.dropped += len(chunk)
            return
        view = memoryview(chunk)
        while view:
            try:
                written = os.write(self.fd, view)
                self.system_writes += 1
            except InterruptedError:
                continue
            except BlockingIOError:
                # Someone made our stdout non-blocking (a shell sharing the
                # terminal can): wait until it drains, as a blocking fd would.
                self._wait_writable()
                continue
            except OSError as e:
                if e.errno not in _GONE:
                    raise
                self.error = e
                self.dropped += len(view)
                return
            view = view[written:]

    def _wait_writable(self):
        poller = select.poll()             # poll, not select: any fd number works
        poller.register(self.fd, select.POLLOUT)
        poller.poll()
