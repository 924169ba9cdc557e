"""The 8250 UART and the console output, driven as a guest would, without KVM."""

import os
import select
import threading
import time

import pytest

from pylguest.hostconsole import output as output_module
from pylguest.platform import uart
from pylguest.hostconsole.output import TAIL_SIZE, ConsoleOutput
from pylguest.platform.uart import Uart8250

THR, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 2, 3, 4, 5, 6, 7
OUT2 = uart.MCR_OUT2
NEVER = 3600.0        # a flush delay that never fires during a test


class Pipe:
    """Console output into a pipe we can read back."""

    def __init__(self):
        self.r, self.w = os.pipe()

    def read(self, at_least, timeout=2.0):
        data = b""
        deadline = time.monotonic() + timeout
        while len(data) < at_least:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                break
            data += os.read(self.r, 65536)
        return data

    def empty(self):
        return not select.select([self.r], [], [], 0)[0]

    def close(self):
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pipe():
    p = Pipe()
    yield p
    p.close()


def make_uart(pipe, flush_delay=NEVER):
    levels = []
    output = ConsoleOutput(pipe.w, flush_delay=flush_delay)
    return Uart8250(levels.append, output), levels, output


@pytest.fixture
def com1(pipe):
    device, levels, output = make_uart(pipe)
    yield device, levels
    output.close()


def send(device, text):
    for byte in text:
        device.io_out(THR, byte)


# -- registers at rest ------------------------------------------------------------

def test_idle_registers(com1):
    device, levels = com1
    assert device.io_in(LSR) == 0x60              # THRE | TEMT, no data
    assert device.io_in(IIR) == 0x01              # nothing pending, no FIFO
    assert device.io_in(MSR) == 0xB0              # DCD | DSR | CTS: a connected line
    assert levels == []


def test_scratch_lcr_and_ier_read_back(com1):
    device, _ = com1
    device.io_out(SCR, 0x5A)
    device.io_out(LCR, 0x03)
    device.io_out(IER, 0xFF)
    assert device.io_in(SCR) == 0x5A
    assert device.io_in(LCR) == 0x03
    assert device.io_in(IER) == 0x0F              # only four enable bits exist


# -- output -----------------------------------------------------------------------

def test_output_in_order_with_few_system_calls(pipe, com1):
    device, _ = com1
    lines = b"".join(b"line %d of the boot log\n" % i for i in range(50))
    send(device, lines)
    assert pipe.read(len(lines)) == lines
    # At most one per line, never one per byte (the writer thread may take
    # several lines in one write when they come faster than it writes).
    assert 1 <= device.output.system_writes <= 50


def test_output_flushes_at_4k_without_newline(pipe, com1):
    device, _ = com1
    send(device, b"x" * 5000)
    early = pipe.read(4096)                       # no newline, no flush, no delay
    assert len(early) >= 4096 and early == b"x" * len(early)
    assert device.output.system_writes <= 2
    device.output.flush()
    assert early + pipe.read(5000 - len(early)) == b"x" * 5000


def test_partial_line_appears_after_short_delay(pipe):
    device, _, output = make_uart(pipe, flush_delay=0.01)
    try:
        send(device, b"login: ")
        assert pipe.read(7, timeout=2.0) == b"login: "
        assert output.system_writes == 1
    finally:
        output.close()


def test_close_flushes_what_is_left(pipe):
    device, _, output = make_uart(pipe)
    send(device, b"bye")
    output.close()
    assert pipe.read(3) == b"bye"


def test_tee_sees_the_output(pipe):
    seen = []
    output = ConsoleOutput(pipe.w, tee=seen.append, flush_delay=NEVER)
    output.write(b"hello\n")
    output.close()
    assert b"".join(seen) == b"hello\n"
    assert pipe.read(6) == b"hello\n"


def test_tail_keeps_the_last_output_even_unflushed_and_is_bounded(pipe):
    output = ConsoleOutput(pipe.w, flush_delay=NEVER)
    output.write(b"x" * (TAIL_SIZE + 100) + b"\n")
    pipe.read(TAIL_SIZE + 101)
    output.write(b"Kernel panic - not syncing: no init")        # no newline yet
    tail = output.tail()
    assert len(tail) == TAIL_SIZE and tail.endswith(b"not syncing: no init")
    pipe.read(len(b"Kernel panic - not syncing: no init"))
    output.close()


def test_closed_reader_does_not_crash_the_launcher(pipe):
    seen = []
    output = ConsoleOutput(pipe.w, tee=seen.append, flush_delay=NEVER)
    os.close(pipe.r)
    output.write(b"nobody reads this\n")          # EPIPE: remembered, not raised
    output.write(b"nor this\n")
    output.close()
    assert output.error is not None
    assert output.dropped == len(b"nobody reads this\nnor this\n")
    assert b"".join(seen) == b"nobody reads this\nnor this\n"


def test_partial_writes_are_completed(pipe, monkeypatch):
    real_write = os.write
    calls = []

    def two_bytes_at_a_time(fd, data):
        calls.append(len(data))
        return real_write(fd, bytes(data[:2]))

    monkeypatch.setattr(os, "write", two_bytes_at_a_time)
    output = ConsoleOutput(pipe.w, flush_delay=NEVER)
    output.write(b"abcdefg\n")
    output.flush()                                # the writer thread is done with it
    monkeypatch.undo()
    output.close()
    assert pipe.read(8) == b"abcdefg\n"
    assert calls == [8, 6, 4, 2]


def test_divisor_latch_is_not_output(pipe, com1):
    device, _ = com1
    device.io_out(LCR, 0x80 | 0x03)               # DLAB on
    device.io_out(0, 0x01)                        # DLL: 115200 baud
    device.io_out(1, 0x00)                        # DLM
    assert device.io_in(0) == 0x01
    assert device.io_in(1) == 0x00
    device.io_out(LCR, 0x03)                      # DLAB off
    device.io_out(THR, ord("A"))
    device.output.flush()
    assert pipe.read(1) == b"A"
    assert pipe.empty()
    assert device.divisor == 1
    assert device.io_in(IER) == 0                 # offset 1 is IER again


# -- input ------------------------------------------------------------------------

def test_received_bytes_are_read_from_rbr(com1):
    device, _ = com1
    device.receive(b"ab")
    assert device.io_in(LSR) == 0x61              # DR
    assert device.io_in(THR) == ord("a")
    assert device.io_in(THR) == ord("b")
    assert device.io_in(LSR) == 0x60
    assert device.io_in(THR) == 0                 # empty RBR


def test_overrun_drops_counts_and_sets_oe(com1):
    device, _ = com1
    device.receive(b"y" * (uart.RX_QUEUE_LIMIT + 10))
    assert device.overruns == 10
    assert device.pending_input == uart.RX_QUEUE_LIMIT
    assert device.io_in(LSR) == 0x60 | 0x02 | 0x01   # OE and DR
    assert device.io_in(LSR) == 0x61              # OE clears once read


def test_fifo_control(com1):
    device, _ = com1
    device.io_out(FCR, 0x01)                      # FIFOs on
    assert device.io_in(IIR) == 0xC1              # a 16550A, nothing pending
    device.receive(b"typed before the driver opened the port")
    device.io_out(FCR, 0x01 | 0x02)               # clear the receive FIFO
    assert device.io_in(LSR) == 0x60
    device.io_out(FCR, 0x00)
    assert device.io_in(IIR) == 0x01


# -- interrupts -------------------------------------------------------------------

def test_receive_raises_the_line_only_when_enabled(com1):
    device, levels = com1
    device.io_out(MCR, OUT2)
    device.receive(b"a")
    assert levels == []                           # IER.RDI is off
    device.io_out(IER, uart.IER_RDI)
    assert levels == [True]
    assert device.io_in(IIR) == 0x04
    device.io_in(THR)                             # draining RBR ends it
    assert levels == [True, False]
    device.receive(b"b")
    assert levels == [True, False, True]


def test_out2_gates_the_line(com1):
    device, levels = com1
    device.io_out(IER, uart.IER_RDI)
    device.receive(b"a")
    assert levels == []                           # the source is pending...
    assert device.io_in(IIR) == 0x04              # ...but OUT2 keeps it off the bus
    device.io_out(MCR, OUT2)
    assert levels == [True]
    device.io_out(MCR, 0)
    assert levels == [True, False]


def test_thr_empty_interrupt(com1):
    device, levels = com1
    device.io_out(MCR, OUT2)
    device.io_out(IER, uart.IER_THRI)             # THR is empty: due at once
    assert levels == [True]
    assert device.io_in(IIR) == 0x02
    assert levels == [True, False]                # reading IIR acknowledged it
    assert device.io_in(IIR) == 0x01
    device.io_out(THR, ord("x"))                  # sent at once: empty again
    assert levels == [True, False, True]
    device.io_out(IER, 0)                         # how Linux stops transmitting
    assert levels == [True, False, True, False]


def test_linux_thre_test_sees_the_interrupt_reasserted(com1):
    # serial8250_do_startup: toggling IER.THRI must raise THRE again.
    device, _ = com1
    device.io_out(IER, uart.IER_THRI)
    first = device.io_in(IIR)
    device.io_out(IER, 0)
    device.io_out(IER, uart.IER_THRI)
    second = device.io_in(IIR)
    assert (first, second) == (0x02, 0x02)


def test_priorities(com1):
    device, levels = com1
    device.io_out(MCR, OUT2)
    device.io_out(IER, uart.IER_RDI | uart.IER_THRI | uart.IER_RLSI)
    device.receive(b"z" * (uart.RX_QUEUE_LIMIT + 1))  # data and an overrun
    assert device.io_in(IIR) == 0x06              # line status first
    device.io_in(LSR)                             # reading LSR clears it
    assert device.io_in(IIR) == 0x04              # then received data
    while device.io_in(LSR) & uart.LSR_DR:
        device.io_in(THR)
    assert device.io_in(IIR) == 0x02              # then THR empty
    assert device.io_in(IIR) == 0x01
    assert levels[0] is True and levels[-1] is False
    assert all(a != b for a, b in zip(levels, levels[1:]))   # changes only


def test_loopback(pipe, com1):
    device, levels = com1
    device.io_out(IER, uart.IER_RDI)
    device.io_out(MCR, uart.MCR_LOOP | OUT2 | uart.MCR_RTS)
    assert device.io_in(MSR) & 0xF0 == 0x90       # DCD | CTS, as Linux's probe expects
    device.io_out(THR, 0x42)
    assert device.io_in(LSR) & uart.LSR_DR
    assert device.io_in(IIR) == 0x04
    assert levels == []                           # loopback keeps the IRQ off the bus
    assert device.io_in(THR) == 0x42
    device.output.flush()
    assert pipe.empty()                           # nothing reached the host
    device.io_out(MCR, 0)
    assert device.io_in(MSR) == 0xB0


def test_line_level_stays_consistent_across_threads(com1):
    device, levels = com1
    device.io_out(MCR, OUT2)
    device.io_out(IER, uart.IER_RDI)
    total = 2000
    done = threading.Event()

    def typist():
        for i in range(total // 10):
            device.receive(b"0123456789")
        done.set()

    thread = threading.Thread(target=typist)
    thread.start()
    got = 0
    deadline = time.monotonic() + 10
    while (got < total) and time.monotonic() < deadline:
        if device.io_in(LSR) & uart.LSR_DR:
            device.io_in(THR)
            got += 1
    thread.join(10)
    assert done.is_set() and got == total
    assert all(a != b for a, b in zip(levels, levels[1:]))
    assert levels[-1] is False                    # drained: the line is low


def test_non_blocking_stdout_waits_instead_of_failing(pipe):
    os.set_blocking(pipe.w, False)                # EAGAIN when the pipe is full
    output = ConsoleOutput(pipe.w, flush_delay=NEVER)
    big = bytes(range(256)) * 1024                # 256 KiB, more than a pipe holds
    writer = threading.Thread(target=lambda: (output.write(big), output.flush()))
    writer.start()
    got = pipe.read(len(big), timeout=10.0)
    writer.join(10)
    output.close()
    assert not writer.is_alive()
    assert got == big and output.error is None


# -- a terminal that stops reading must not hold the run hostage ------------------------

def fill_until_blocked(output, total=1 << 20):
    """Write `total` bytes, 64 KiB at a time, from a thread; return
    (thread, done event)."""
    done = threading.Event()

    def produce():
        for _ in range(total // 65536):
            output.write(b"x" * 65536)
        done.set()
    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    return thread, done


def test_a_producer_waits_for_room_then_gives_way_to_a_stop(pipe):
    from pylguest.run.stop import StopRequest, timeout
    stopping = StopRequest()
    output = ConsoleOutput(pipe.w, flush_delay=NEVER, stopping=stopping)
    # Nobody reads the pipe: the writer thread blocks once it is full,
    # the buffer fills up, and the producer must wait (back pressure).
    thread, done = fill_until_blocked(output)
    assert not done.wait(0.5)                     # waiting for room, as it should
    stopping.request(timeout(1))
    assert done.wait(1.0)                         # the stop ends the wait
    assert output.dropped > 0
    started = time.monotonic()
    output.close()                                # the writer is stuck: close is bounded
    assert time.monotonic() - started < output_module.STOP_DRAIN + 0.5


def test_flush_with_a_timeout_returns_on_a_stuck_fd(pipe):
    output = ConsoleOutput(pipe.w, flush_delay=NEVER)
    output.write(b"z" * 200000)                   # more than a pipe holds
    started = time.monotonic()
    assert output.flush(timeout=0.2) is False
    assert time.monotonic() - started < 1.0
    pipe.read(200000)                             # drain it, so close() can finish
    output.close()
