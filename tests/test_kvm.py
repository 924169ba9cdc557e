"""The KVM layer: kind detection, ioctl errors, and a vCPU running real code."""

import errno
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from pylguest._native import ffi, lib
from pylguest.errors import KvmError
from pylguest.kvm import Kvm, detect_kvm_kind, system
from pylguest.kvm.ioctl import ioctl, ioctl_error
from pylguest.memory import GuestMemory, Region


def fake_host(tmp_path, modules, flags):
    sysmod = tmp_path / "module"
    for m in modules:
        (sysmod / m).mkdir(parents=True)
    sysmod.mkdir(exist_ok=True)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu {' '.join(flags)} sse2\n")
    return str(sysmod), str(cpuinfo)


def test_kind_emulating_from_pvm_module(tmp_path):
    kind = detect_kvm_kind(*fake_host(tmp_path, ["kvm", "kvm_pvm"], []))
    assert kind.emulating and not kind.hardware and kind.module == "kvm_pvm"


def test_kind_hardware_needs_module_and_cpu_flag(tmp_path):
    assert detect_kvm_kind(*fake_host(tmp_path / "a", ["kvm", "kvm_intel"], ["vmx"])).hardware
    assert detect_kvm_kind(*fake_host(tmp_path / "b", ["kvm", "kvm_amd"], ["svm"])).hardware
    odd = detect_kvm_kind(*fake_host(tmp_path / "c", ["kvm", "kvm_intel"], []))
    assert odd.kind == "unknown" and "neither vmx nor svm" in odd.evidence


def test_kind_unknown_is_never_a_guess(tmp_path):
    assert detect_kvm_kind(*fake_host(tmp_path, ["kvm"], ["vmx"])).kind == "unknown"


# Two million instructions in real mode (which, like ring 0, an emulating
# KVM runs in software): mov ecx, 1000000; 1: dec ecx; jnz 1b; out 0x80, al
RING0_LOOP = bytes([0x66, 0xB9, 0x40, 0x42, 0x0F, 0x00, 0x66, 0x49, 0x75, 0xFC, 0xE6, 0x80])
# Hardware runs them in about a millisecond; an emulator at about 2 million
# instructions a second (docs/linux.md) takes about one second.
EMULATED_IF_SLOWER_THAN = 0.1


def test_this_machine_kind_matches_how_fast_kernel_mode_runs(kvm_available):
    # The kind comes from the host's facts (the vendor module, CPU flags);
    # the oracle here is a different fact: the time two million kernel-mode
    # instructions take.
    kind = detect_kvm_kind()
    print(f"this machine's KVM: {kind}")
    if kind.kind == "unknown":
        pytest.skip(f"this machine's KVM kind is unknown ({kind.evidence}): nothing to check")
    machine = RealModeVm(RING0_LOOP)
    try:
        started = time.monotonic()
        assert machine.vcpu.run() == lib.KVM_EXIT_IO
        seconds = time.monotonic() - started
    finally:
        machine.close()
    print(f"2 million kernel-mode instructions took {seconds:.4f} s")
    assert (seconds > EMULATED_IF_SLOWER_THAN) == kind.emulating


def test_failed_ioctl_names_the_ioctl(kvm_available):
    kvm = Kvm()
    try:
        with pytest.raises(KvmError) as info:
            # A vCPU's ioctl on /dev/kvm itself: the kernel refuses it.
            ioctl(kvm.fd, "KVM_GET_REGS", ffi.new("struct kvm_regs *"))
    finally:
        kvm.close()
    error = info.value
    assert error.ioctl == "KVM_GET_REGS"
    assert error.errno in (errno.EINVAL, errno.ENOTTY), error
    # The line a person reads: the ioctl, the system's words, the number.
    assert str(error) == (f"KVM_GET_REGS failed: {os.strerror(error.errno)} "
                          f"(errno {error.errno})")


def test_an_ioctl_error_carries_its_name_and_errno():
    error = ioctl_error("KVM_RUN", errno.EFAULT)
    assert (error.ioctl, error.errno) == ("KVM_RUN", errno.EFAULT)
    assert str(error) == f"KVM_RUN failed: {os.strerror(errno.EFAULT)} (errno {errno.EFAULT})"


def interrupting_lib(errors):
    """A stand-in for the cffi lib whose ioctls fail with `errors` in turn
    (then succeed, returning 7); the calls it saw."""
    calls = []

    def pyl_ioctl_val(fd, request, arg):
        calls.append(request)
        if len(calls) <= len(errors):
            ffi.errno = errors[len(calls) - 1]
            return -1
        return 7
    return SimpleNamespace(KVM_CREATE_VM=lib.KVM_CREATE_VM, pyl_ioctl_val=pyl_ioctl_val), calls


def test_an_interrupted_ioctl_is_asked_again(monkeypatch):
    from pylguest.kvm import ioctl as ioctl_module
    fake, calls = interrupting_lib([errno.EINTR, errno.EINTR])
    monkeypatch.setattr(ioctl_module, "lib", fake)
    assert ioctl(3, "KVM_CREATE_VM", 0) == 7 and len(calls) == 3


def test_an_ioctl_that_fails_otherwise_is_not(monkeypatch):
    from pylguest.kvm import ioctl as ioctl_module
    fake, calls = interrupting_lib([errno.EINTR, errno.ENOMEM])
    monkeypatch.setattr(ioctl_module, "lib", fake)
    with pytest.raises(KvmError) as info:
        ioctl(3, "KVM_CREATE_VM", 0)
    assert info.value.errno == errno.ENOMEM and len(calls) == 2


def test_missing_device_is_a_clear_error(tmp_path):
    with pytest.raises(KvmError) as info:
        Kvm(str(tmp_path / "no-kvm"))
    assert (info.value.ioctl, info.value.errno) == (None, errno.ENOENT)
    assert str(info.value).startswith(f"cannot open {tmp_path / 'no-kvm'}: ")


def unopened_kvm(monkeypatch, errors):
    """A Kvm whose KVM_GET_SUPPORTED_CPUID fails with `errors`, in turn,
    then succeeds: no /dev/kvm needed.  Returns it and the sizes offered."""
    kvm, offered = object.__new__(Kvm), []
    kvm.fd = -1

    def fake_ioctl(fd, name, cpuid):
        assert name == "KVM_GET_SUPPORTED_CPUID"
        offered.append(cpuid.nent)
        if len(offered) <= len(errors):
            raise ioctl_error(name, errors[len(offered) - 1])
        return 0
    monkeypatch.setattr(system, "ioctl", fake_ioctl)
    return kvm, offered


def test_supported_cpuid_grows_its_buffer_on_e2big(monkeypatch):
    kvm, offered = unopened_kvm(monkeypatch, [errno.E2BIG, errno.E2BIG])
    assert kvm.supported_cpuid().nent == 256
    assert offered == [64, 128, 256]


def test_supported_cpuid_gives_up_on_other_errors_and_at_4096(monkeypatch):
    kvm, offered = unopened_kvm(monkeypatch, [errno.ENOMEM])
    with pytest.raises(KvmError) as info:
        kvm.supported_cpuid()
    assert info.value.errno == errno.ENOMEM and offered == [64]
    kvm, offered = unopened_kvm(monkeypatch, [errno.E2BIG] * 10)
    with pytest.raises(KvmError) as info:
        kvm.supported_cpuid()
    assert info.value.errno == errno.E2BIG and offered == [64, 128, 256, 512, 1024, 2048, 4096]


# A real-mode loop at 0x1000:  mov al, 0x41 ; out 0x80, al ; inc al ; jmp out
REAL_MODE_LOOP = bytes([0xB0, 0x41, 0xE6, 0x80, 0xFE, 0xC0, 0xEB, 0xFA])
HLT_WITH_IRQS_OFF = bytes([0xFA, 0xF4, 0xEB, 0xFD])   # cli; hlt; jmp hlt


class RealModeVm:
    """The smallest VM: 1 MiB of memory, code at 0x1000, real mode."""

    def __init__(self, code):
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.vm.create_irqchip()
        self.memory = GuestMemory([Region(0, 1 << 20, 0)])
        self.vm.set_memory_region(0, 0, 1 << 20, self.memory.host_address)
        self.memory.write(0x1000, code)
        self.vcpu = self.vm.create_vcpu()
        sregs = self.vcpu.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        self.vcpu.set_sregs(sregs)
        regs = ffi.new("struct kvm_regs *")
        regs.rip = 0x1000
        regs.rflags = 2
        self.vcpu.set_regs(regs)

    def close(self):
        self.vcpu.close()
        self.memory.close()
        self.vm.close()
        self.kvm.close()


def test_port_writes_exit_with_their_data(kvm_available):
    machine = RealModeVm(REAL_MODE_LOOP)
    try:
        seen = []
        for _ in range(3):
            assert machine.vcpu.run() == lib.KVM_EXIT_IO
            io = machine.vcpu.kvm_run.io
            assert (io.direction, io.port, io.size) == (lib.KVM_EXIT_IO_OUT, 0x80, 1)
            seen.append(machine.vcpu.io_data()[0])
        assert seen == [0x41, 0x42, 0x43]
    finally:
        machine.close()


def test_immediate_exit_stops_a_halted_vcpu(kvm_available):
    """A guest in `cli; hlt` never exits by itself: a stop request from
    another thread must still end KVM_RUN (KVM_CAP_IMMEDIATE_EXIT + signal)."""
    machine = RealModeVm(HLT_WITH_IRQS_OFF)
    signals = ffi.new("int[]", [signal.SIGUSR1])
    assert lib.pyl_arm_stop_signals(machine.vcpu.kvm_run, signals, 1) == 0
    try:
        timer = threading.Timer(0.3, lib.pyl_request_stop, args=(signal.SIGALRM,))
        timer.start()
        start = time.monotonic()
        assert machine.vcpu.run() is None          # EINTR: interrupted
        assert time.monotonic() - start < 10
        assert lib.pyl_stop_signal() == signal.SIGALRM
        timer.join()
    finally:
        lib.pyl_disarm_stop_signals()
        machine.close()


# -- the CPUID a guest is shown -------------------------------------------------------

KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_FEATURE_CLOCKSOURCE2 = 1 << 3       # kvmclock's new MSRs (Documentation/virt/kvm/x86/cpuid.rst)


def cpuid_leaves(cpuid):
    """The entries, copied: a cffi entry points into `cpuid`'s memory, which
    is freed once `cpuid` is collected (the test read garbage when it kept
    only the entries)."""
    return {(e.function, e.index): SimpleNamespace(eax=e.eax, ebx=e.ebx, ecx=e.ecx, edx=e.edx)
            for e in (cpuid.entries[i] for i in range(cpuid.nent))}


@pytest.mark.parametrize("emulating", [False, True])
def test_the_kvm_paravirt_leaves_are_kept_for_kvmclock(kvm_available, tmp_path, emulating):
    from pylguest.kvm.cpuid import guest_cpuid
    kind = detect_kvm_kind(*fake_host(tmp_path, ["kvm", "kvm_pvm"] if emulating else
                                      ["kvm", "kvm_intel"], [] if emulating else ["vmx"]))
    kvm = Kvm()
    try:
        supported = cpuid_leaves(kvm.supported_cpuid())
        leaves = cpuid_leaves(guest_cpuid(kvm, kind))
    finally:
        kvm.close()
    base = leaves[(0x40000000, 0)]
    signature = b"".join(v.to_bytes(4, "little") for v in (base.ebx, base.ecx, base.edx))
    assert signature == KVM_SIGNATURE
    assert leaves[(0x40000001, 0)].eax & KVM_FEATURE_CLOCKSOURCE2
    cx16 = leaves[(1, 0)].ecx >> 13 & 1           # hidden only where KVM emulates
    assert cx16 == (0 if emulating else supported[(1, 0)].ecx >> 13 & 1)
    assert leaves[(1, 0)].ecx >> 31 & 1           # "running under a hypervisor"


def _is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_vm_that_cannot_be_set_up_closes_its_fd(monkeypatch):
    """Vm takes KVM_CREATE_VM's fd: if its setup fails, nothing else could close it."""
    from pylguest.kvm import vm as vm_module

    def refuse(fd, name, *args):
        raise OSError(22, f"{name} refused")
    monkeypatch.setattr(vm_module, "ioctl", refuse)
    fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(OSError, match="KVM_SET_TSS_ADDR"):
        vm_module.Vm(None, fd)
    assert not _is_open(fd)


def test_a_vcpu_whose_kvm_run_cannot_be_mapped_closes_its_fd():
    """Vcpu takes KVM_CREATE_VCPU's fd: /dev/null cannot be mmapped."""
    from pylguest.kvm.vcpu import Vcpu
    vm = SimpleNamespace(kvm=SimpleNamespace(vcpu_mmap_size=lambda: 4096))
    fd = os.open(os.devnull, os.O_RDWR)
    with pytest.raises(OSError):
        Vcpu(vm, fd)
    assert not _is_open(fd)
