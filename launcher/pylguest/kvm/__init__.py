"""KVM, seen from userspace: /dev/kvm, a VM, a vCPU.

The layers, bottom up:

    ioctl.py   one helper that issues an ioctl and turns a failure into a
               KvmError naming it
    system.py  /dev/kvm: API version, capabilities, supported CPUID
    kind.py    is this KVM hardware-backed or emulating? (docs/abi.md 7)
    vm.py      a VM: memory slots, irqchip, PIT, irq lines, irqfd, ioeventfd
    vcpu.py    a vCPU: registers, CPUID, events, and KVM_RUN itself
    cpuid.py   which CPUID the guest is shown

The structures and ioctl numbers come from <linux/kvm.h> through the cffi
extension pylguest._native (csrc/linux.cdef names what we use of them).
"""

from pylguest.kvm.system import Kvm
from pylguest.kvm.vm import Vm
from pylguest.kvm.vcpu import Vcpu
from pylguest.kvm.kind import KvmKind, detect_kvm_kind

__all__ = ["Kvm", "Vm", "Vcpu", "KvmKind", "detect_kvm_kind"]
