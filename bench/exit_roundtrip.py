"""The exit round trip of a guest doing port writes, compared with the same
loop written in C.

Four launchers run a guest that does nothing but `out` to a port nobody in
the kernel handles, so each write is a full round trip: guest -> KVM -> the
launcher's run loop -> KVM -> guest. The figure is microseconds per exit.

  C            bench/exit_roundtrip.c: ioctl(KVM_RUN) in a C loop, nothing else
  KVM layer    the same real-mode loop through pylguest.kvm, each exit
               dispatched through a PortBus in Python, as the run loop
               does when the fast path is off (--trace)
  fast path    the same real-mode loop again, each exit answered by the run
               loop's fast path (csrc/run_fast.c), as the launcher answers a
               port nobody claims: the C row's guest and count, with the
               launcher's own per-exit work; the guest's last `out`, to a
               claimed port, hands the loop back to Python
  launcher     `python -m pylguest run guests/build/portloop.elf --cmdline
               count=N`, timed against count=0, the difference divided by N;
               its run loop answers these exits in C (csrc/run_fast.c: port
               0x510 is one nobody claims), so this row shows what the whole
               launcher adds to an exit that Python never sees; its guest is a
               long-mode ELF with paging, not the real-mode loop, which on
               emulating KVM costs the exit itself more (the fast-path row
               against this one tells the two apart)

The guest loops are alike (an `out` and two more instructions each), and
the rows are measured in turn, REPEATS rounds of all four, so that a burst
of load from elsewhere falls on every row alike; each figure is the best of
its rounds. Where KVM emulates guest kernel mode
(docs/abi.md section 7) the exit itself is slow and the ratios are small;
on hardware KVM the exit is cheap and the ratios show Python's share.

    PYTHONPATH=launcher python bench/exit_roundtrip.py [--count N]   (from the repository root)
"""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
C_PROGRAM = os.path.join(BENCH, "build", "exit_roundtrip")
PORTLOOP = os.path.join(ROOT, "guests", "build", "portloop.elf")
REPEATS = 5

# mov al, 0x41 ; l: out 0x80, al ; inc al ; jmp l   (as in tests/test_kvm.py)
DONE_PORT = 0x81               # the loop's last write: claimed, so C hands it back
MAX_COUNT = 0xFFFF             # the loop counts in CX


def real_mode_loop(count):
    """`count` writes to port 0x80 (0x41, 0x42, ...), then one to DONE_PORT:
    the same code as bench/exit_roundtrip.c's guest."""
    return bytes([0xB0, 0x41,                        # mov al, 0x41
                  0xB9, count & 0xFF, count >> 8,    # mov cx, count
                  0xE6, 0x80,                        # l: out 0x80, al
                  0xFE, 0xC0,                        # inc al
                  0xE2, 0xFA,                        # loop l
                  0xE6, DONE_PORT,                   # out DONE_PORT, al
                  0xEB, 0xFE])                       # jmp $


def build_c():
    source = os.path.join(BENCH, "exit_roundtrip.c")
    os.makedirs(os.path.dirname(C_PROGRAM), exist_ok=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", C_PROGRAM, source], check=True)


def c_us_per_exit(count):
    out = subprocess.run([C_PROGRAM, str(count)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[0])


class CountingPort:
    """The device behind port 0x80: remembers how many writes it saw."""

    def __init__(self):
        self.writes = 0

    def io_out(self, offset, value):
        self.writes += 1

    def io_in(self, offset):
        return 0xFF


def real_mode_vm(count):
    """The real-mode loop's VM, through pylguest's KVM layer (tests/test_kvm.py's
    RealModeVm): (what to close, the vCPU), stopped at its first exit."""
    from pylguest._native import ffi
    from pylguest.kvm import Kvm
    from pylguest.memory import GuestMemory, Region

    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    memory = GuestMemory([Region(0, 1 << 20, 0)])
    vm.set_memory_region(0, 0, 1 << 20, memory.host_address)
    memory.write(0x1000, real_mode_loop(count))
    vcpu = vm.create_vcpu()
    sregs = vcpu.get_sregs()
    sregs.cs.base = 0
    sregs.cs.selector = 0
    vcpu.set_sregs(sregs)
    regs = ffi.new("struct kvm_regs *")
    regs.rip = 0x1000
    regs.rflags = 2
    vcpu.set_regs(regs)
    vcpu.run()                                  # first exit: faults pages in
    return (vcpu, memory, vm, kvm), vcpu


def python_us_per_exit(count):
    """The real-mode loop, each exit handled in Python as run/loop.py's
    _exit_io does, through a PortBus."""
    from pylguest._native import lib
    from pylguest.platform.ports import PortBus

    closing, vcpu = real_mode_vm(count + 1)     # + the untimed first exit
    device = CountingPort()
    ports = PortBus()
    ports.register(0x80, 1, "counter", device)
    try:
        start = time.perf_counter()
        for _ in range(count):
            if vcpu.run() != lib.KVM_EXIT_IO:
                raise RuntimeError(f"unexpected exit {vcpu.kvm_run.exit_reason}")
            io = vcpu.kvm_run.io
            port, size = io.port, io.size
            data = vcpu.io_data()
            ports.io_out(port, size, int.from_bytes(data[0:size], "little"))
        elapsed = time.perf_counter() - start
    finally:
        for thing in closing:
            thing.close()
    assert device.writes == count
    return elapsed / count * 1e6


def fast_path_us_per_exit(count):
    """The same real-mode loop, each exit answered by the run loop's fast
    path (csrc/run_fast.c) as the launcher answers a port nobody claims:
    the C row's guest, with the launcher's own per-exit work.  DONE_PORT
    is claimed, so its exit, after `count` answered ones, comes back."""
    from pylguest._native import lib
    from pylguest.run.fastpath import FastPath

    closing, vcpu = real_mode_vm(count + 1)     # + the untimed first exit
    fast = FastPath()
    fast.claim(DONE_PORT)
    try:
        start = time.perf_counter()
        result = vcpu.run_fast(fast.table)
        elapsed = time.perf_counter() - start
        port = vcpu.kvm_run.io.port
    finally:
        for thing in closing:
            thing.close()
    answered = fast.table.answered[lib.KVM_EXIT_IO]
    if result != lib.KVM_EXIT_IO or port != DONE_PORT or answered != count:
        raise RuntimeError(f"the fast path handed back exit {result} at port {port:#x} "
                           f"after {answered} exits, not {count}")
    return elapsed / count * 1e6


def launcher_seconds(count):
    """Wall time of one whole launcher run of portloop with count=N."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "launcher"))
    command = [sys.executable, "-m", "pylguest", "run", PORTLOOP,
               "--cmdline", f"count={count}", "--timeout", "600"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or f"portloop: done {count}" not in done.stdout:
        raise RuntimeError(f"portloop count={count} failed (status {done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")
    return elapsed



def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000, help="port writes per run")
    args = parser.parse_args()
    if not 1 <= args.count < MAX_COUNT:
        parser.error(f"--count is 1 to {MAX_COUNT - 1}: the real-mode loop counts in CX")

    from pylguest.kvm import detect_kvm_kind
    print(f"KVM: {detect_kvm_kind()}")
    print(f"{args.count} port writes, best of {REPEATS}\n")

    build_c()
    c, py, fast, base, whole, why = [], [], [], [], [], None
    for _ in range(REPEATS):
        c.append(c_us_per_exit(args.count))
        py.append(python_us_per_exit(args.count))
        fast.append(fast_path_us_per_exit(args.count))
        if why is None:
            try:
                base.append(launcher_seconds(0))
                whole.append(launcher_seconds(args.count))
            except (RuntimeError, OSError) as e:    # report the rest even so
                why = str(e)
    c, py, fast = min(c), min(py), min(fast)
    full = None if why else (min(whole) - min(base)) / args.count * 1e6

    print(f"{'':<22}{'us/exit':>9}{'x C':>8}")
    print(f"{'C (KVM_RUN loop)':<22}{c:9.2f}{1:8.2f}")
    print(f"{'Python KVM layer':<22}{py:9.2f}{py / c:8.2f}")
    print(f"{'fast path, same VM':<22}{fast:9.2f}{fast / c:8.2f}")
    if full is None:
        print(f"{'full launcher':<22}{'n/a':>9}\n\nlauncher not measured: {why}")
    else:
        print(f"{'full launcher':<22}{full:9.2f}{full / c:8.2f}")
        print(f"\nlauncher / KVM layer: {full / py:.2f}")


if __name__ == "__main__":
    main()
