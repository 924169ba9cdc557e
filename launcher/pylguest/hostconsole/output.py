"""Where the guest's console output goes: a buffer, and one thread that writes it.

Every console the guest has (the 8250's transmit register, the virtio
console, the early-console hypercall) ends up here.  The 8250 hands us one
byte per `out` instruction; one write(2) per byte would cost more than the
guest's exit did, so bytes collect in a buffer and reach the fd in chunks:

- soon after a newline, so line-by-line output (a boot log) is never late;
- soon after the buffer reaches FLUSH_SIZE;
- otherwise FLUSH_DELAY after the first unwritten byte, so a shell prompt
  with no newline still shows up promptly.

Only the writer thread ever calls write(2).  The fd is the launcher's
stdout, which may stop taking data at any time (a terminal scrolled back
with Ctrl-S, a pipe whose reader is busy): a vCPU thread blocked in
write(2) there could be stopped by nothing, not --timeout and not SIGTERM.
So the threads that produce output only append to the buffer, under
`_more`, which is held for moments.  When the buffer holds BUFFER_LIMIT
bytes, a producer waits for room (back pressure: the guest slows down to
the terminal's pace rather than losing output), but it waits through the
run's StopRequest, in slices, and once the run is ending it drops what
does not fit instead (`dropped`).

A stdout that goes away (the reader of a pipe exits, a terminal hangs up)
must not kill the launcher: the first such error is remembered in `error`,
later output is counted in `dropped` and discarded.  Python ignores
SIGPIPE, so a closed pipe shows up as EPIPE here rather than as a signal.
"""

import os
import select
import threading
import time
from typing import Callable, Optional

from pylguest.run.stop import StopRequest

FLUSH_SIZE = 4096         # bytes: write out as soon as the buffer holds this many
FLUSH_DELAY = 0.010       # seconds: the longest an unfinished line waits
BUFFER_LIMIT = 64 * 1024  # bytes a producer may queue before it waits for room
TAIL_SIZE = 4096          # bytes of recent output kept, to explain a stop
STOP_DRAIN = 1.0          # seconds close() gives the writer when the run is stopping


class ConsoleOutput:
    def __init__(self, fd: int = 1, tee: Optional[Callable[[bytes], None]] = None,
                 flush_delay: float = FLUSH_DELAY, stopping: Optional[StopRequest] = None):
        self.fd = fd
        self.tee = tee                    # also sees every chunk (the Python API);
                                          # it must not write to this output
        self.flush_delay = flush_delay
        self.stopping = stopping or StopRequest()
        self.system_writes = 0            # write(2) calls made (or begun): tests watch this
        self.dropped = 0                  # bytes lost: the fd went away, or a stop
        self.error: Optional[OSError] = None
        self._buffer = bytearray()
        self._tail = bytearray()          # the last TAIL_SIZE bytes given to us
        self._queued = 0                  # bytes ever appended to the buffer
        self._done = 0                    # of those, bytes written out (or dropped)
        self._urgent = False              # a newline or FLUSH_SIZE: write now
        self._first_byte_time = 0.0       # when the oldest unwritten byte came
        self._closed = False
        self._more = threading.Condition(threading.Lock())
        self._writer = threading.Thread(target=self._writer_loop, daemon=True,
                                        name="pylguest console writer")
        self._writer.start()

    # -- what the devices call -------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue guest output; it reaches the fd soon (see the module doc)."""
        if not data:
            return
        with self._more:
            self._tail += data
            del self._tail[:-TAIL_SIZE]
            if self._closed:
                self.dropped += len(data)
                return
            if len(self._buffer) >= BUFFER_LIMIT and not self.stopping.wait(
                    self._more, lambda: len(self._buffer) < BUFFER_LIMIT or self._closed):
                self.dropped += len(data)       # the run is ending: no more waiting
                return
            if not self._buffer:
                self._first_byte_time = time.monotonic()
            self._buffer += data
            self._queued += len(data)
            if b"\n" in data or len(self._buffer) >= FLUSH_SIZE:
                self._urgent = True
            self._more.notify_all()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything queued so far is written out (or until the
        run is stopping, or `timeout` passes); True if it was."""
        with self._more:
            target = self._queued
            self._urgent = True
            self._more.notify_all()
            return self.stopping.wait(self._more, lambda: self._done >= target, timeout)

    def unwritten(self) -> bytes:
        """What was given to us and is not written out yet (a snapshot
        keeps it, for the restored guest's console)."""
        with self._more:
            return bytes(self._buffer)

    def tail(self) -> bytes:
        """The most recent output (up to TAIL_SIZE bytes), written out or
        not: what a kernel said just before it stopped, for the stop's reason."""
        with self._more:
            return bytes(self._tail)

    def close(self) -> None:
        """Write out what is queued, and stop the writer thread.  When the
        run is ending by a stop (a timeout, a signal), the writer gets at
        most STOP_DRAIN seconds; what a stuck fd did not take is dropped.
        The fd stays open: it is the caller's (usually our own stdout)."""
        limit = STOP_DRAIN if self.stopping.pending() is not None else None
        with self._more:
            self._closed = True
            self._urgent = True
            self._more.notify_all()
        self._writer.join(limit)
        with self._more:
            self.dropped += len(self._buffer)
            self._buffer.clear()

    # -- the writer thread ---------------------------------------------------------

    def _writer_loop(self):
        while True:
            with self._more:
                chunk = self._next_chunk()
                if chunk is None:
                    return
            self._emit(chunk)
            with self._more:
                self._done += len(chunk)
                self._more.notify_all()           # room for producers, news for flush()

    def _next_chunk(self):
        """Wait (holding _more) until there is something to write now; take
        it.  None once closed and drained."""
        while True:
            if self._buffer:
                due = self._first_byte_time + self.flush_delay - time.monotonic()
                if self._urgent or self._closed or due <= 0:
                    chunk = bytes(self._buffer)
                    self._buffer.clear()
                    self._urgent = False
                    return chunk
                self._more.wait(due)
            elif self._closed:
                return None
            else:
                self._more.wait()

    # -- the system calls ----------------------------------------------------------

    def _emit(self, chunk: bytes) -> None:
        """Hand one chunk to the tee and to the fd (the writer thread only)."""
        if self.tee is not None:
            self.tee(chunk)
        if self.error is not None:
            self.dropped += len(chunk)
            return
        view = memoryview(chunk)
        while view:
            self.system_writes += 1       # before: the bytes are visible once it returns
            try:
                written = os.write(self.fd, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                # Someone made our stdout non-blocking (a shell sharing the
                # terminal can): wait until it drains, as a blocking fd would.
                self._wait_writable()
                continue
            except OSError as e:
                # EPIPE, EIO (a hung-up terminal), ENOSPC (a file on a full
                # disk): the fd takes no more, and the guest runs on.
                self.error = e
                self.dropped += len(view)
                return
            view = view[written:]

    def _wait_writable(self):
        poller = select.poll()             # poll, not select: any fd number works
        poller.register(self.fd, select.POLLOUT)
        poller.poll()
