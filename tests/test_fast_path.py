"""The run loop's fast path (csrc/run_fast.c, run/fastpath.py): the exits C
answers, and proof that it answers them as the Python model would.

The rules one by one, on a hand-made kvm_run (no /dev/kvm); then one
sequence of port accesses -- the UART through DLAB, THR-empty interrupts,
loopback, input and an overrun, ports nobody claims, string I/O -- played
through the run loop with the fast path and without, on the fake vCPU and
on a real one, with the same answers, output, interrupt line and counts;
then what only a real guest shows: a prompt printed before a halt reaches
the console, a console that stops reading still holds the guest back,
and --trace still sees every exit.
"""

import os
import select
import threading
import time

import pytest
from fake_vcpu import FakeVcpu, io_answer, io_in, io_out, look
from test_kvm import RealModeVm

from pylguest._native import ffi, lib
from pylguest.hostconsole.output import BUFFER_LIMIT, ConsoleOutput
from pylguest.platform import uart
from pylguest.platform.ports import PortBus
from pylguest.run import stop
from pylguest.run.fastpath import FastPath
from pylguest.run.loop import RunLoop
from pylguest.run.policy import request_stop_of_vcpu, signal_stop, supervise
from pylguest.run.stop import StopRequest
from pylguest.run.trace import Tracer

COM1 = uart.COM1_PORT
THR, IER, IIR, LCR, MCR, LSR = (COM1 + r for r in (0, 1, 2, 3, 4, 5))
FEED_PORT = 0x502         # a test device: writing N hands FEEDS[N] to the UART as input
STOP_PORT = 0x503         # a test device: any write ends the run
IO_EXIT = lib.KVM_EXIT_IO


# -- the rules, one exit at a time -----------------------------------------------------------

class Exit:
    """A kvm_run page as KVM leaves it for one port access."""

    def __init__(self, direction, port, size=1, data=b"", count=1):
        self.page = ffi.new("uint8_t[]", 4096 + max(64, len(data)))
        self.run = ffi.cast("struct kvm_run *", self.page)
        self.run.exit_reason = IO_EXIT
        io = self.run.io
        io.direction, io.port, io.size, io.data_offset = direction, port, size, 4096
        io.count = len(data) // size if data else count
        self.data = memoryview(ffi.buffer(self.page))[4096:]
        self.data[:len(data)] = data

    def answered_by(self, table):
        return lib.pyl_fast_answer(table, self.run) == 1


def out(port, data, size=1):
    return Exit(lib.KVM_EXIT_IO_OUT, port, size, data)


def in_(port, size=1, count=1):
    return Exit(0, port, size, count=count)


@pytest.fixture
def bus():
    """A port bus with a UART whose output is captured."""
    sent = []
    ports = PortBus(FastPath())
    output = ConsoleOutput(os.open(os.devnull, os.O_WRONLY), tee=sent.append)
    device = uart.Uart8250(lambda level: None, output)
    ports.register(COM1, uart.PORT_COUNT, "uart", device)
    device.attach_fast(ports.fast, COM1)
    yield ports, device, sent
    output.close()
    os.close(output.fd)


def ring(table):
    fast_bytes = ffi.new("uint8_t[]", lib.PYL_FAST_RING_SIZE)
    return ffi.buffer(fast_bytes, lib.pyl_fast_take(table, fast_bytes, len(fast_bytes)))[:]


def test_a_port_nobody_claims_ignores_writes_and_reads_all_ones_in_c(bus):
    ports, _, _ = bus
    table = ports.fast.table
    assert out(0x80, b"\x12").answered_by(table)
    assert out(0x510, b"\x34\x12\x78\x56", size=2).answered_by(table)     # rep outsw
    wide = in_(0x2F8, size=2, count=3)                                     # rep insw
    assert wide.answered_by(table) and bytes(wide.data[:6]) == b"\xff" * 6
    assert not in_(IIR).answered_by(table) and not out(IER, b"\x00").answered_by(table)
    assert ports.fast.answered() == {IO_EXIT: 3}


def test_thr_bytes_go_to_the_ring_only_while_a_write_is_only_output(bus):
    ports, device, _ = bus
    table = ports.fast.table
    assert out(THR, b"a").answered_by(table)
    assert out(THR, b"bcd").answered_by(table)                             # rep outsb
    assert out(THR, b"\x61\x62", size=2).answered_by(table) is False       # outw: Python's
    for register, value in ((LCR, uart.LCR_DLAB), (MCR, uart.MCR_LOOP), (IER, uart.IER_THRI)):
        device.io_out(register - COM1, value)
        assert not out(THR, b"x").answered_by(table), f"{register:#x} = {value:#x}"
        device.io_out(register - COM1, 0)
    assert out(THR, b"e").answered_by(table)
    assert ring(table) == b"abcde"


def test_a_full_ring_leaves_the_write_to_python(bus):
    ports, _, _ = bus
    table = ports.fast.table
    assert out(THR, b"x" * (lib.PYL_FAST_RING_SIZE - 1)).answered_by(table)
    assert not out(THR, b"yz").answered_by(table)                          # no room for both
    assert out(THR, b"y").answered_by(table)
    assert not out(THR, b"z").answered_by(table)
    assert ring(table) == b"x" * (lib.PYL_FAST_RING_SIZE - 1) + b"y"
    assert out(THR, b"z").answered_by(table)


def test_lsr_reads_the_published_value_unless_an_error_waits(bus):
    ports, device, _ = bus
    table = ports.fast.table
    read = in_(LSR, count=2)
    assert read.answered_by(table) and bytes(read.data[:2]) == b"\x60\x60"
    device.receive(b"k")
    read = in_(LSR)
    assert read.answered_by(table) and read.data[0] == 0x61               # DR: input waits
    device.receive(b"k" * uart.RX_QUEUE_LIMIT)                             # an overrun
    assert not in_(LSR).answered_by(table)                                 # reading clears OE
    assert device.io_in(LSR - COM1) == 0x63
    assert in_(LSR).answered_by(table)
    assert not in_(LSR, size=2).answered_by(table)


# -- one sequence, both ways ------------------------------------------------------------------

FEEDS = [b"hi", b"z" * (uart.RX_QUEUE_LIMIT + 1)]

# (op, port, bytes written | (size, count) read): what a guest's driver does
SEQUENCE = [
    ("in", LSR, (1, 1)), ("out", THR, b"a"), ("in", LSR, (1, 1)), ("out", THR, b"b"),
    ("out", 0x80, b"\x55"), ("in", 0x80, (1, 1)), ("in", 0x2F8, (2, 1)), ("in", 0x510, (1, 3)),
    ("out", LCR, b"\x83"), ("out", THR, b"\x01"), ("out", IER, b"\x00"),      # DLAB: the divisor
    ("in", THR, (1, 1)), ("out", LCR, b"\x03"), ("out", THR, b"c"),
    ("out", MCR, bytes([uart.MCR_OUT2])), ("out", IER, bytes([uart.IER_THRI])),
    ("in", IIR, (1, 1)), ("out", THR, b"d"), ("in", IIR, (1, 1)), ("in", IIR, (1, 1)),
    ("out", IER, b"\x00"), ("out", THR, b"e"),
    ("out", MCR, bytes([uart.MCR_LOOP | uart.MCR_OUT2])), ("out", THR, b"L"),   # loopback
    ("in", LSR, (1, 1)), ("in", THR, (1, 1)), ("in", LSR, (1, 1)),
    ("out", MCR, bytes([uart.MCR_OUT2])), ("out", IER, bytes([uart.IER_RDI])),
    ("out", FEED_PORT, b"\x00"), ("in", LSR, (1, 2)), ("in", IIR, (1, 1)),      # input
    ("in", THR, (1, 1)), ("in", LSR, (1, 1)), ("in", THR, (1, 1)), ("in", LSR, (1, 1)),
    ("out", FEED_PORT, b"\x01"), ("in", LSR, (1, 1)), ("in", LSR, (1, 1)),       # an overrun
    ("out", IIR, b"\x03"), ("in", LSR, (1, 1)),                                 # FCR: clear
    ("out", THR, b"rep outsb\n"), ("in", LSR, (1, 1)), ("out", THR, b"f"),
]


class Device:
    """The test's two ports: input for the UART on demand, and the end."""

    def __init__(self, com1, stop_on_write=False):
        self.com1, self.stop_on_write = com1, stop_on_write

    def io_in(self, offset):
        return 0

    def io_out(self, offset, value):
        if self.stop_on_write:
            return stop.shutdown(0)
        self.com1.receive(FEEDS[value])
        return None


class NoMmio:
    def contains(self, gpa):
        return False


class Board:
    """A UART, the test's ports and a run loop around `vcpu`."""

    def __init__(self, vcpu, stopping=None, tracer=None, output_fd=None, flush_delay=0.01):
        self.levels, self.sent = [], []
        self.stopping = stopping or StopRequest()
        self.devnull = os.open(os.devnull, os.O_WRONLY)
        self.output = ConsoleOutput(self.devnull if output_fd is None else output_fd,
                                    tee=self.sent.append, flush_delay=flush_delay,
                                    stopping=self.stopping)
        self.uart = uart.Uart8250(self.levels.append, self.output)
        # Wired as machine.py wires it: a fast path unless every exit is
        # traced (or the vCPU has no run_fast: the Python path's tests).
        fast = FastPath() if tracer is None and vcpu.run_fast is not None else None
        self.ports = PortBus(fast)
        self.ports.register(COM1, uart.PORT_COUNT, "uart", self.uart, uart.REGISTER_NAMES)
        if fast is not None:
            self.uart.attach_fast(fast, COM1)
        self.ports.register(FEED_PORT, 1, "feed", Device(self.uart))
        self.ports.register(STOP_PORT, 1, "stop", Device(self.uart, stop_on_write=True))
        self.loop = RunLoop(vcpu, self.ports, NoMmio(), self.stopping, tracer, fast=fast)

    def output_bytes(self):
        self.output.close()
        os.close(self.devnull)
        return b"".join(self.sent)


def fake_script(sequence, answers):
    script = []
    for op, port, arg in sequence:
        if op == "out":
            script.append(io_out(port, arg))
        else:
            size, count = arg
            script += [io_in(port, size, count), look(io_answer(size * count), answers)]
    return script + [io_out(STOP_PORT, b"\x00")]


def run_fake(fast):
    answers = []
    board = Board(FakeVcpu(fake_script(SEQUENCE, answers), fast=fast))
    result = board.loop.run()
    counts = board.loop.exit_counts
    counts.pop(lib.KVM_EXIT_INTR)                  # the fake's look() steps
    return (result, b"".join(answers), board.output_bytes(), board.levels, counts,
            board.ports.fast.answered() if fast else {})


OUTPUT = b"abcderep outsb\nf"   # not the divisor, not the byte looped back
EXITS = len(SEQUENCE) + 1         # each access is one exit, and the end


def test_the_sequence_is_answered_alike_with_the_fast_path_and_without():
    python = run_fake(fast=False)
    fast = run_fake(fast=True)
    assert fast[:5] == python[:5]              # verdict, answers, output, IRQ line, counts
    assert fast[5][IO_EXIT] >= 20              # and C did answer a good part of it
    result, answers, output, levels, counts, _ = python
    assert result == stop.shutdown(0) and output == OUTPUT
    assert answers[:3] == b"\x60\x60\xff" and levels == [True, False] * 4
    assert counts == {IO_EXIT: EXITS}


# -- the same on a real vCPU: the sequence as a real-mode program --------------------------

RESULTS = 0x3000          # where the program stores what each `in` read
STRINGS = 0x4000          # the bytes of a `rep outsb`


def le16(value):
    return value.to_bytes(2, "little")


def real_mode_program(sequence, tail=b""):
    """Code for the sequence; what each `in` read is stored from RESULTS on.
    Returns (code, strings)."""
    code, strings, results = bytearray(), bytearray(), RESULTS
    for op, port, arg in sequence:
        code += b"\xBA" + le16(port)                                   # mov dx, port
        if op == "out" and len(arg) == 1:
            code += b"\xB0" + arg + b"\xEE"                             # mov al, v; out dx, al
        elif op == "out":
            code += b"\xBE" + le16(STRINGS + len(strings))              # mov si, src
            code += b"\xB9" + le16(len(arg)) + b"\xF3\x6E"              # mov cx, n; rep outsb
            strings += arg
        elif arg == (1, 1):
            code += b"\xEC\xA2" + le16(results)                         # in al, dx; mov [r], al
            results += 1
        elif arg == (2, 1):
            code += b"\xED\xA3" + le16(results)                         # in ax, dx; mov [r], ax
            results += 2
        else:
            code += b"\xBF" + le16(results)                             # mov di, r
            code += b"\xB9" + le16(arg[1]) + b"\xF3\x6C"                # mov cx, n; rep insb
            results += arg[1]
    code += tail or b"\xBA" + le16(STOP_PORT) + b"\xEE"                # the end
    return bytes(code), bytes(strings), results - RESULTS


def real_machine(sequence, tail=b""):
    code, strings, result_size = real_mode_program(sequence, tail)
    machine = RealModeVm(code)
    machine.memory.write(STRINGS, strings)
    return machine, result_size


def run_real(tracer=None):
    machine, result_size = real_machine(SEQUENCE)
    try:
        board = Board(machine.vcpu, tracer=tracer)
        result = board.loop.run()
        answers = machine.memory.read(RESULTS, result_size)
        return (result, answers, board.output_bytes(), board.levels, board.loop.exit_counts,
                board.ports.fast.answered() if board.ports.fast else {})
    finally:
        machine.close()


def test_a_real_vcpu_answers_the_sequence_alike_in_c_and_in_python(kvm_available):
    lines = []
    traced = run_real(tracer=Tracer(write=lines.append))          # a tracer: all in Python
    fast = run_real()
    assert traced[5] == {}                                        # C answered nothing...
    assert fast[5][IO_EXIT] >= 20                                 # ...and here a good part
    assert fast[:5] == traced[:5]
    assert fast[0] == stop.shutdown(0) and fast[2] == OUTPUT
    # --stats: the exits C answered are counted with the rest
    # (KVM may split a string instruction into several exits: at least one each)
    assert fast[4] == traced[4] and fast[4][IO_EXIT] >= EXITS
    # --trace: one line for every item of every port exit
    items = sum(len(arg) if op == "out" else arg[1] for op, _, arg in SEQUENCE) + 1
    assert sum(" io  " in line for line in lines) == items


# -- what only a real guest shows ------------------------------------------------------------

CLI_HLT = b"\xFA\xF4"     # cli; hlt: with the in-kernel irqchip, no exit ever again


def supervised(board, machine):
    return supervise(board.loop.run, machine.vcpu.kvm_run, board.stopping)


def stopping_like_machine():
    return StopRequest(on_request=request_stop_of_vcpu, signal_stop=signal_stop)


def read_pipe(fd, at_least, timeout):
    data, deadline = b"", time.monotonic() + timeout
    while len(data) < at_least:
        if not select.select([fd], [], [], max(0, deadline - time.monotonic()))[0]:
            break
        data += os.read(fd, 65536)
    return data


def test_a_prompt_printed_before_a_halt_reaches_the_console(kvm_available):
    prompt = [("in", LSR, (1, 1)), ("out", THR, b"l"), ("in", LSR, (1, 1)),
              ("out", THR, b"ogin: ")]
    machine, _ = real_machine(prompt, tail=CLI_HLT)
    r, w = os.pipe()
    seen = []
    try:
        board = Board(machine.vcpu, stopping_like_machine(), output_fd=w)

        def watch():
            seen.append(read_pipe(r, len(b"login: "), timeout=5.0))
            board.stopping.request(stop.timeout(5))
        watcher = threading.Thread(target=watch)
        watcher.start()
        result = supervised(board, machine)
        watcher.join()
        assert result == stop.timeout(5)
        assert seen == [b"login: "]
        c_answered = board.ports.fast.answered()[IO_EXIT]
        assert c_answered >= 4 and board.loop.exit_counts[IO_EXIT] == c_answered  # all in C
    finally:
        board.output_bytes()
        machine.close()
        os.close(r)
        os.close(w)


THR_FOREVER = b"\xBA" + le16(THR) + b"\xB0\x78\xEE\xEB\xFD"        # mov dx; mov al; l: out; jmp l


def test_a_console_that_stops_reading_holds_the_guest_back_until_a_stop(kvm_available):
    machine = RealModeVm(THR_FOREVER)
    r, w = os.pipe()                                               # nobody reads it
    try:
        board = Board(machine.vcpu, stopping_like_machine(), output_fd=w)
        answered = board.ports.fast.table.answered
        samples, asked = [0], []

        def watch():
            # until the ring, the console's buffer and the pipe are full
            # and the guest waits: no more bytes in half a second
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                time.sleep(0.5)
                samples.append(answered[IO_EXIT])
                if samples[-1] == samples[-2]:
                    break
            asked.append(time.monotonic())
            board.stopping.request(stop.timeout(1))
        watcher = threading.Thread(target=watch)
        watcher.start()
        result = supervised(board, machine)
        watcher.join()
        assert result == stop.timeout(1)
        assert time.monotonic() - asked[0] < 1.0                  # the wait gave way to it
        assert samples[-1] == samples[-2]
        assert BUFFER_LIMIT < samples[-1] < BUFFER_LIMIT + 4 * 65536
    finally:
        board.output_bytes()
        machine.close()
        os.close(r)
        os.close(w)
