"""A fake vCPU for the run loop's tests, and the machine around it.

FakeVcpu plays KVM's side of struct kvm_run: each run() takes the next
scripted exit, fills kvm_run the way KVM would, and returns its reason.  As
KVM does, it returns EINTR (None) at once when kvm_run->immediate_exit is
set, which is how the C signal handler and StopRequest's on_request end a
run; with the script done, the "guest" spins (KVM_EXIT_INTR now and then).

As KVM's, its kvm_run is a page with the data of port I/O after it
(io.data_offset), so that run_fast() can hand each exit to the C fast path
(csrc/run_fast.c's pyl_fast_answer) as vcpu.py's does: the run loop's
tests run both ways (FakeVcpu(fast=False) has no run_fast).
"""

import time

from pylguest import layout
from pylguest._native import ffi, lib
from pylguest.lguest.hypercall import LHCALL_SHUTDOWN, HypercallPage
from pylguest.memory import GuestMemory, Region
from pylguest.platform import i8042
from pylguest.platform.ports import PortBus
from pylguest.run import stop
from pylguest.run.fastpath import FastPath
from pylguest.run.loop import RunLoop
from pylguest.run.policy import request_stop_of_vcpu
from pylguest.run.stop import StopRequest

RECORDER_PORT = 0x3F8
RAM_TOP = 0x100000


PAGE = 4096
IO_DATA_SIZE = 64


class FakeVcpu:
    def __init__(self, script=(), rip=0x1000, rflags=0x2, fast=True):
        self._pages = ffi.new("uint8_t[]", PAGE + IO_DATA_SIZE)
        self.kvm_run = ffi.cast("struct kvm_run *", self._pages)
        self.script = list(script)        # callables(kvm_run, vcpu) -> exit reason
        self.io_buffer = memoryview(ffi.buffer(self._pages))[PAGE:]
        if not fast:
            self.run_fast = None          # the run loop then takes the Python path
        self.regs = ffi.new("struct kvm_regs *", {"rip": rip, "rflags": rflags})
        self.sregs = ffi.new("struct kvm_sregs *", {"cr0": 0x80000011, "efer": 0x500})
        self.events = ffi.new("struct kvm_vcpu_events *")
        self.runs = 0

    def run(self):
        self.runs += 1
        if self.kvm_run.immediate_exit:
            self.kvm_run.immediate_exit = 0
            return None                   # EINTR, as KVM_RUN with immediate_exit
        if not self.script:
            time.sleep(0.002)             # the guest runs on...
            return lib.KVM_EXIT_INTR      # ...and a host interrupt shows it
        reason = self.script.pop(0)(self.kvm_run, self)
        if reason is not None:
            self.kvm_run.exit_reason = reason
        return reason

    def run_fast(self, table):
        """Vcpu.run_fast's loop, in Python: every exit goes to the C fast
        path first, as in csrc/run_fast.c's pyl_run_fast."""
        while True:
            reason = self.run()
            if reason is None or not lib.pyl_fast_answer(table, self.kvm_run):
                return reason

    def io_data(self):
        io = self.kvm_run.io
        return memoryview(self.io_buffer)[:io.size * io.count]

    def get_regs(self):
        return self.regs

    def set_regs(self, regs):
        self.regs = regs

    def get_sregs(self):
        return self.sregs

    def get_events(self):
        return self.events

    def set_events(self, events):
        self.events = events


# --- scripted exits: what KVM puts in kvm_run for each kind ----------------------------

def io_out(port, data, size=1):
    def exit_(run, vcpu):
        run.io.direction, run.io.size, run.io.port = lib.KVM_EXIT_IO_OUT, size, port
        run.io.count, run.io.data_offset = len(data) // size, PAGE
        vcpu.io_buffer[:len(data)] = data
        return lib.KVM_EXIT_IO
    return exit_


def io_in(port, size=1, count=1):
    def exit_(run, vcpu):
        run.io.direction, run.io.size, run.io.port, run.io.count = 0, size, port, count
        run.io.data_offset = PAGE
        vcpu.io_buffer[:] = bytes(len(vcpu.io_buffer))
        return lib.KVM_EXIT_IO
    return exit_


def mmio(gpa, data=None, length=8):
    """A store of `data` to gpa, or (data None) a load of `length` bytes."""
    def exit_(run, vcpu):
        run.mmio.phys_addr = gpa
        run.mmio.is_write = data is not None
        run.mmio.len = length if data is None else len(data)
        run.mmio.data = (data or bytes([0xAA] * 8)).ljust(8, b"\0")
        return lib.KVM_EXIT_MMIO
    return exit_


def plain(reason, fill=None):
    def exit_(run, vcpu):
        if fill:
            fill(run)
        return reason
    return exit_


def fill_refused(run, insn, flags=None):
    """kvm_run as an emulating KVM leaves it when it refuses `insn`: an
    emulation failure carrying the instruction bytes (unless flags say not)."""
    run.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = lib.KVM_INTERNAL_ERROR_EMULATION
    run.internal.ndata = 3
    run.internal.data[0] = (lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
                            if flags is None else flags)
    raw = bytes([len(insn)]) + insn + bytes(15 - len(insn))
    run.internal.data[1] = int.from_bytes(raw[:8], "little")
    run.internal.data[2] = int.from_bytes(raw[8:16], "little")


def refused(insn, flags=None):
    return plain(lib.KVM_EXIT_INTERNAL_ERROR, lambda run: fill_refused(run, insn, flags))


def system_event(kind):
    def fill(run):
        run.system_event.type = kind
    return plain(lib.KVM_EXIT_SYSTEM_EVENT, fill)


def interrupted(run, vcpu):
    return None                           # EINTR with nothing asked: run on


def look(what, seen):
    """Not an exit: record what the previous exit's answer left in kvm_run
    (`what(run, vcpu)`), as the guest would read it, then a host interrupt."""
    def exit_(run, vcpu):
        seen.append(what(run, vcpu))
        return lib.KVM_EXIT_INTR
    return exit_


def io_answer(count):
    return lambda run, vcpu: bytes(vcpu.io_buffer[:count])


def mmio_answer(length):
    return lambda run, vcpu: bytes(run.mmio.data)[:length]


SYSTEM_EVENT_SHUTDOWN = 1                 # <linux/kvm.h>; RESET is 2


# --- the machine around the loop: a port recorder, the i8042, the hypercall page ----

class Recorder:
    """A port device: remembers what was written, answers reads with a count."""

    def __init__(self, stop_on=None):
        self.written, self.reads, self.stop_on = [], 0, stop_on

    def io_in(self, offset):
        self.reads += 1
        return 0x40 + self.reads

    def io_out(self, offset, value):
        self.written.append((offset, value))
        return stop.shutdown(value) if value == self.stop_on else None


class Rig:
    def __init__(self, script, recorder=None, signal_source=None, fast=True):
        self.memory = GuestMemory([Region(0, RAM_TOP + 0x1000, 0)])
        self.early = bytearray()
        self.reports = []
        self.recorder = recorder or Recorder()
        self.fast = FastPath() if fast else None
        self.ports = PortBus(self.fast)
        self.ports.register(RECORDER_PORT, 8, "recorder", self.recorder)
        self.ports.register(i8042.BASE_PORT, i8042.PORT_COUNT, "i8042",
                            i8042.I8042(lambda: stop.reboot("i8042 reset")))
        self.hypercalls = HypercallPage(self.memory, RAM_TOP, self, self.reports.append)
        self.vcpu = FakeVcpu(script, fast=fast)
        # The run loop's tests give a signal source of their own: the C
        # handler's record (signal_stop) is process-wide and is reset only
        # when supervise() arms it, as run/policy.py's tests do.
        self.signals = []
        self.stopping = StopRequest(
            on_request=request_stop_of_vcpu,
            signal_stop=signal_source or (lambda: self.signals[0] if self.signals else None))
        self.loop = RunLoop(self.vcpu, self.ports, self.hypercalls, self.stopping, fast=self.fast)

    def write(self, data):                # the early console
        self.early += data

    def run(self):
        return self.loop.run()

    def close(self):
        self.memory.close()


def rigs(fast=True):
    """The body of each test module's rig_of fixture: rig_of(script, ...)
    makes a Rig (with the fast path or without), and every Rig made is
    closed after the test."""
    made = []

    def make(script, **kw):
        kw.setdefault("fast", fast)
        made.append(Rig(script, **kw))
        return made[-1]
    yield make
    for rig in made:
        rig.close()


def shutdown_hypercall(status):
    return mmio(layout.HYPERCALL_PAGE + LHCALL_SHUTDOWN, status.to_bytes(8, "little"))
