#!/usr/bin/env python3
"""Which machine state can this KVM read and write back while Linux runs?

    PYTHONPATH=launcher python3 tools/kvm_state_probe.py [--pause-after S]

Before a snapshot can be designed (issue 17), the facts: this boots the
project's Linux (build/linux, `make linux`) with a command that counts for
a while, pauses the vCPU once it has reached user space, and for every
piece of kvm/state.py's table (and every MSR KVM lists) reads it, writes
the same bytes back, and reads it again.  Then (unless --no-restore) it
builds a second machine of the same shape, gives it the first one's
memory, every piece of its state and its UART's registers, closes the
first, and runs the second: a restore in one process, without files.
The guest must finish its count and power off with status 0.  It prints
one line per piece:

    read      the GET ioctl worked (or the error)
    write     the SET ioctl took the same blob back (or the error)
    same      a second read gives the same bytes (a running timer or
              clock may differ: that is said, not an error)

docs/abi.md section 10 records what it printed here.  Nothing is saved.
"""

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launcher"))

from pylguest.errors import KvmError  # noqa: E402
from pylguest.kvm import state  # noqa: E402
from pylguest.machine import Machine, MachineConfig  # noqa: E402
from pylguest.run.policy import supervise  # noqa: E402

COUNT = "i=0; while [ $i -lt 12 ]; do echo tick $i; i=$((i + 1)); sleep 1; done"


def probe_piece(fd, piece):
    """(read, write, same) words for one piece."""
    try:
        blob = state.read(fd, piece)
    except KvmError as e:
        return f"no: {e}", "-", "-"
    before = state.as_bytes(blob)
    try:
        state.write(fd, piece, blob)
        wrote = "yes"
    except KvmError as e:
        wrote = f"no: {e}"
    after = state.as_bytes(state.read(fd, piece))
    changed = sum(a != b for a, b in zip(after, before))
    same = "yes" if after == before else f"differs in {changed} bytes"
    return "yes", wrote, same


def probe_msrs(machine):
    indices = state.msr_indices(machine.kvm.fd)
    values = state.read_msrs(machine.vcpu.fd, indices)
    unread = [i for i in indices if i not in values]
    refused = state.write_msrs(machine.vcpu.fd, values)
    again = state.read_msrs(machine.vcpu.fd, list(values))
    changed = [i for i in values if again.get(i) != values[i]]
    print(f"{'msrs':<12} listed {len(indices)}, read {len(values)}, "
          f"written back {len(values) - len(refused)}, unchanged {len(values) - len(changed)}")
    for label, group in (("not readable", unread), ("refused on write", refused),
                         ("changed between reads", changed)):
        if group:
            print(f"{'':<12} {label}: {' '.join(f'0x{i:x}' for i in group)}")
    kvmclock = [0x4b564d00, 0x4b564d01]
    print(f"{'':<12} kvmclock's MSRs (0x4b564d00/01) listed: "
          f"{all(i in indices for i in kvmclock)}, read: {all(i in values for i in kvmclock)}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pause-after", type=float, default=25.0,
                        help="seconds to run before pausing (past the start of user space)")
    parser.add_argument("--no-restore", dest="restore", action="store_false",
                        help="resume the same VM instead of restoring into a new one")
    options = parser.parse_args()
    linux = ROOT / "build" / "linux"
    config = MachineConfig(kernel=str(linux / "bzImage"), initrd=str(linux / "initramfs.cpio"),
                           command=["sh", "-c", COUNT])
    machine = Machine(config)
    try:
        start = time.monotonic()
        first = supervise(machine.run_loop.run, machine.vcpu.kvm_run, machine.stopping,
                          timeout=options.pause_after, flush=machine.console.flush)
        machine.console.flush()
        print(f"\npaused after {time.monotonic() - start:.1f} s ({first}); KVM "
              f"{machine.kvm_kind.kind}\n")
        print(f"{'piece':<12} {'read':<10} {'write':<44} same")
        for piece in state.PIECES:
            fd = machine.vcpu.fd if piece.scope == "vcpu" else machine.vm.fd
            read, wrote, same = probe_piece(fd, piece)
            print(f"{piece.name:<12} {read:<10} {wrote:<44} {same}")
        probe_msrs(machine)
        clock = state.read(machine.vm.fd, next(p for p in state.PIECES if p.name == "clock"))
        flags = [name for bit, name in ((2, "TSC_STABLE"), (4, "REALTIME"), (8, "HOST_TSC"))
                 if clock.flags & bit]
        print(f"{'clock':<12} flags 0x{clock.flags:x} ({', '.join(flags) or 'none'}): "
              f"{'one exact value for every vCPU' if clock.flags & 2 else 'CLOCK_MONOTONIC plus an offset'}")
        if options.restore:
            machine = restore_into_a_new_vm(machine, config)
            print("\nresuming the guest in a new VM")
        else:
            # Resume: the stop was handled, the vCPU may enter KVM_RUN again.
            machine.stopping.clear()
            machine.vcpu.kvm_run.immediate_exit = 0
            print("\nresuming the guest")
        last = supervise(machine.run_loop.run, machine.vcpu.kvm_run, machine.stopping,
                         timeout=120, flush=machine.console.flush)
        machine.console.flush()
        print(f"\nthe guest went on and ended: {last} (status {last.status})")
        return 0 if last.status == 0 else 1
    finally:
        machine.close()


# The order QEMU's x86 code puts a vCPU's state back in: the registers, the
# FPU and XSAVE state with XCR0, the special registers, then the rest.
RESTORE_ORDER = ("regs", "xsave", "xcrs", "sregs", "mp_state", "lapic", "events", "debugregs")
UART_REGISTERS = ("ier", "lcr", "mcr", "fcr", "scr", "divisor", "line_errors", "thr_interrupt",
                  "_line", "rx")


def restore_into_a_new_vm(old, config):
    """A second machine of the same shape, given the first one's memory and
    every piece of its KVM state (and its UART's registers, the one device
    a command-only guest has), while the first is closed: what a restore
    would do, within one process and without files."""
    pieces = {p.name: p for p in state.PIECES}
    saved = {name: state.read(old.vcpu.fd if p.scope == "vcpu" else old.vm.fd, p)
             for name, p in pieces.items()}
    msrs = state.read_msrs(old.vcpu.fd, state.msr_indices(old.kvm.fd))
    memory = old.memory.read(0, old.memory.size) if len(old.memory.regions) == 1 else None
    uart = {name: getattr(old.uart, name) for name in UART_REGISTERS}
    new = Machine(config)
    try:
        new.memory.write(0, memory)
        for name, value in uart.items():
            setattr(new.uart, name, value)
        new.uart._publish()
        for name in ("pic master", "pic slave", "ioapic", "pit2"):
            state.write(new.vm.fd, pieces[name], saved[name])
        for name in RESTORE_ORDER:
            state.write(new.vcpu.fd, pieces[name], saved[name])
        refused = state.write_msrs(new.vcpu.fd, msrs)
        state.write(new.vm.fd, pieces["clock"], saved["clock"])
        print(f"{'restore':<12} every piece set on a new VM; MSRs refused: "
              f"{' '.join(hex(i) for i in refused) or 'none'}")
    except BaseException:
        new.close()
        raise
    old.close()
    return new


if __name__ == "__main__":
    sys.exit(main())
