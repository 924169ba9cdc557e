"""The vCPU run loop: KVM_RUN, and an answer to every exit.

KVM_RUN returns when the guest does something the kernel leaves to us; the
exit reason in kvm_run says what.  The loop looks up the reason's handler,
which reads the details from kvm_run, answers (an `in` gets its value, an
MMIO read its bytes, a refused instruction its completion) and returns the
handler's verdict:

    None    go on: KVM_RUN again
    a Stop  the run is over (run/stop.py lists every kind)

That is the whole stop protocol of an exit: the port bus, the i8042, the
hypercall page and the lguest bus hand their handlers' verdicts up the same
way (stop.ExitResult).  A stop asked for from outside -- a signal, the
--timeout timer, Ctrl-A x, the API -- makes KVM_RUN return EINTR, and the
loop then takes the Stop from the StopRequest.

The fast path.  Most exits are the same few port accesses -- the 8250's
THR and LSR (a serial console costs two exits per character) and ports
nobody claims -- and a trip through Python for each would cost more than
the exit.  So the loop calls vcpu.run_fast() with the port bus's table
(run/fastpath.py): C runs KVM_RUN again and again, answers those exits from
the table that the port bus and the UART keep up to date, and returns only
with an exit the handlers below must answer, or EINTR.  Before answering
that exit, the loop drains the console bytes C collected, so output stays
in order.  The exits C answered count in exit_counts too (--stats).
The loop is given its fast path or not (`fast`): machine.py gives none
under --trace, which shows every exit, so every exit goes through Python
and is decoded here.  It is the same on hardware and on emulating KVM: it
saves the trip through Python, not an emulation step.

The loop needs of its vCPU only run(), kvm_run, io_data() and the register
calls (kvm/vcpu.py's Vcpu), and run_fast() when it is given a fast path,
so a test can drive it with a fake one.
"""

from typing import Optional

from pylguest._native import ffi, lib
from pylguest.run import stop
from pylguest.run.emulate import complete_refused_instruction, instruction_bytes
from pylguest.run.fastpath import FastPath
from pylguest.run.stop import ExitResult, Stop, StopRequest

REGISTER_NAMES = ("rip", "rsp", "rbp", "rflags", "rax", "rbx", "rcx", "rdx",
                  "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def exit_reason_names():
    """KVM_EXIT_* number -> its short name, from the KVM header."""
    names = {getattr(lib, n): n[len("KVM_EXIT_"):].lower()
             for n in dir(lib) if n.startswith("KVM_EXIT_") and not n.startswith("KVM_EXIT_IO_")}
    names[None] = "interrupted"
    return names


class RunLoop:
    """One vCPU's loop, with what answers its exits: `ports` (port I/O),
    `mmio` (the hypercall page, the only MMIO we serve) and `stopping`;
    `fast`, the FastPath whose table C answers the common port exits from
    (the one the port bus and the UART publish to), or None: every exit
    through Python."""

    def __init__(self, vcpu, ports, mmio, stopping: StopRequest, tracer=None,
                 fast: Optional[FastPath] = None):
        self.vcpu = vcpu
        self.ports = ports
        self.mmio = mmio
        self.stopping = stopping
        self.tracer = tracer
        self.fast = fast
        self._counts = {}                  # KVM exit reason (None: EINTR) -> count
        self.handlers = {
            lib.KVM_EXIT_IO: self._exit_io,
            lib.KVM_EXIT_MMIO: self._exit_mmio,
            lib.KVM_EXIT_SHUTDOWN: self._exit_triple_fault,
            lib.KVM_EXIT_INTERNAL_ERROR: self._exit_internal_error,
            lib.KVM_EXIT_SYSTEM_EVENT: self._exit_system_event,
            lib.KVM_EXIT_FAIL_ENTRY: self._exit_fail_entry,
            lib.KVM_EXIT_HLT: self._exit_hlt,
            lib.KVM_EXIT_INTR: lambda: None,
        }

    def run(self) -> Stop:
        """KVM_RUN until a handler or a stop request ends the run."""
        if self.fast is None:
            return self._loop(self.vcpu.run)
        with self.fast.running(self.stopping):
            return self._loop(self._run_fast)

    def _run_fast(self):
        reason = self.vcpu.run_fast(self.fast.table)
        self.fast.drain()                  # C's console bytes before anything we do
        return reason

    def _loop(self, run) -> Stop:
        counts, handlers = self._counts, self.handlers
        while True:
            reason = run()
            counts[reason] = counts.get(reason, 0) + 1
            if reason is None:
                # EINTR: a pause (the vCPU is out of the guest: a snapshot
                # may be taken now), a stop, or nothing.
                self.stopping.run_pauses()
                result = self.stopping.pending()
            else:
                handler = handlers.get(reason)
                result = handler() if handler else self._exit_unknown(reason)
            if result is not None:
                return result

    # -- port I/O: the UART, the i8042, and the ports nobody claims -------------

    def _exit_io(self) -> ExitResult:
        io = self.vcpu.kvm_run.io
        port, size, count = io.port, io.size, io.count
        data = self.vcpu.io_data()
        if io.direction == lib.KVM_EXIT_IO_OUT:
            if size == 1 and count == 1:          # the common case: one byte out
                if self.tracer:
                    self.tracer.io_out(port, 1, data[0], self.ports.describe(port))
                return self.ports.io_out(port, 1, data[0])
            return self._string_out(port, size, count, data)
        for i in range(count):
            value = self.ports.io_in(port, size)
            data[i * size:(i + 1) * size] = value.to_bytes(size, "little")
            if self.tracer:
                self.tracer.io_in(port, size, value, self.ports.describe(port))
        return None

    def _string_out(self, port, size, count, data) -> ExitResult:
        """A wider `out`, or `rep outs`: every item, in order; the first
        Stop wins, but every item is still written."""
        result = None
        for i in range(count):
            value = int.from_bytes(data[i * size:(i + 1) * size], "little")
            if self.tracer:
                self.tracer.io_out(port, size, value, self.ports.describe(port))
            outcome = self.ports.io_out(port, size, value)
            result = result or outcome
        return result

    # -- MMIO: the hypercall page ---------------------------------------------

    def _exit_mmio(self) -> ExitResult:
        mmio = self.vcpu.kvm_run.mmio
        gpa, length = mmio.phys_addr, mmio.len
        data = bytes(ffi.buffer(mmio.data, length))
        if not self.mmio.contains(gpa):
            if self.tracer:
                self.tracer.mmio(gpa, mmio.is_write, "unclaimed")
            if not mmio.is_write:
                ffi.buffer(mmio.data, length)[:] = b"\xff" * length
            return None
        if self.tracer:
            self.tracer.mmio(gpa, mmio.is_write, self.mmio.describe(gpa, data))
        if mmio.is_write:
            return self.mmio.mmio_write(gpa, data)
        ffi.buffer(mmio.data, length)[:] = bytes(length)
        return None

    # -- the exits that end a run, and the one an emulating KVM adds ------------

    def _exit_triple_fault(self) -> ExitResult:
        return stop.triple_fault(self.registers_text())

    def _exit_internal_error(self) -> ExitResult:
        # Only an emulating KVM refuses the instructions run/emulate.py knows;
        # on hardware KVM an internal error is always the end of the run.
        kvm_run = self.vcpu.kvm_run
        insn = instruction_bytes(kvm_run)
        name = complete_refused_instruction(self.vcpu, insn) if insn else None
        if name:
            if self.tracer:
                self.tracer.event(f"emulation: completed {name} ({insn.hex(' ')}) for KVM")
            return None
        return stop.launcher_error(
            f"KVM internal error (suberror {kvm_run.internal.suberror}), instruction bytes "
            f"[{insn.hex(' ') or 'unknown'}]: {self.registers_text()}")

    def _exit_system_event(self) -> ExitResult:
        event = self.vcpu.kvm_run.system_event.type
        if event == lib.KVM_SYSTEM_EVENT_RESET:
            return stop.reboot("system reset")
        return stop.shutdown(0)

    def _exit_fail_entry(self) -> ExitResult:
        reason = self.vcpu.kvm_run.fail_entry.hardware_entry_failure_reason
        return stop.launcher_error(f"KVM could not enter the guest (hardware reason 0x{reason:x})")

    def _exit_hlt(self) -> ExitResult:
        # With the in-kernel irqchip, KVM waits for interrupts itself and
        # never gives us a HLT; if it does, the guest halted for good.
        return stop.Stop(stop.EXIT_LAUNCHER_ERROR, "halted", "the guest halted with no way to wake")

    def _exit_unknown(self, reason) -> ExitResult:
        return stop.launcher_error(f"unhandled KVM exit reason {reason}: {self.registers_text()}")

    # -- what a person reads -------------------------------------------------------

    def registers_text(self) -> str:
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        text = " ".join(f"{n}=0x{getattr(regs, n):x}" for n in REGISTER_NAMES)
        return (f"{text} cr0=0x{sregs.cr0:x} cr2=0x{sregs.cr2:x} cr3=0x{sregs.cr3:x} "
                f"cr4=0x{sregs.cr4:x} efer=0x{sregs.efer:x} cs=0x{sregs.cs.selector:x}")

    @property
    def exit_counts(self) -> dict:
        """KVM exit reason (None: EINTR) -> how many, in C and here."""
        counts = dict(self._counts)
        if self.fast is not None:
            for reason, n in self.fast.answered().items():
                counts[reason] = counts.get(reason, 0) + n
        return counts

    def exit_summary(self) -> str:
        """`--stats`: how many times the guest exited to us, by reason."""
        names = exit_reason_names()
        counts = self.exit_counts
        parts = [f"{names.get(r, r)} {n}" for r, n in sorted(counts.items(),
                                                             key=lambda item: -item[1])]
        return f"exits to userspace: {sum(counts.values())} ({', '.join(parts)})"
