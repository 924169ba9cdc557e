"""A KVM virtual machine: its memory slots, interrupt controllers and eventfds."""

import os

from pylguest._native import ffi, lib
from pylguest.kvm.ioctl import ioctl

# KVM on Intel needs three pages for the real-mode TSS and one for the
# EPT identity map, somewhere in guest-physical space that the guest never
# uses.  Just below the 4 GiB boundary, away from our hypercall page, is
# where QEMU and kvmtool put them too.
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000


class Vm:
    """A VM file descriptor, created by Kvm.create_vm()."""

    def __init__(self, kvm, fd):
        """Takes `fd` (from KVM_CREATE_VM): closed here if setting it up fails,
        since no caller holds a Vm to close then."""
        self.kvm = kvm
        self.fd = fd
        try:
            ioctl(self.fd, "KVM_SET_TSS_ADDR", TSS_ADDR)
            identity = ffi.new("uint64_t *", IDENTITY_MAP_ADDR)
            ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", identity)
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_memory_region(self, slot, guest_phys_addr, size, host_addr):
        """Back [guest_phys_addr, +size) with our memory at host_addr."""
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": 0, "guest_phys_addr": guest_phys_addr,
            "memory_size": size, "userspace_addr": host_addr})
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def create_irqchip(self):
        """The PIC pair and the IOAPIC, emulated inside the kernel."""
        ioctl(self.fd, "KVM_CREATE_IRQCHIP")

    def create_pit(self):
        """The 8254 PIT, in the kernel; port 0x61 speaker bits as a dummy."""
        config = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        ioctl(self.fd, "KVM_CREATE_PIT2", config)

    def irq_line(self, irq, level):
        """Drive a legacy interrupt line (0-15 reach both PIC and IOAPIC)."""
        line = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": int(level)})
        ioctl(self.fd, "KVM_IRQ_LINE", line)

    def irqfd(self, eventfd, gsi):
        """Writing to `eventfd` now raises interrupt `gsi` without us."""
        irqfd = ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi})
        ioctl(self.fd, "KVM_IRQFD", irqfd)

    def ioeventfd(self, eventfd, addr, length, datamatch=None):
        """A guest store of `length` bytes to `addr` (MMIO) signals `eventfd`
        inside the kernel instead of exiting to us; with `datamatch`, only a
        store of exactly that value does."""
        flags = 0 if datamatch is None else lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        request = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length,
            "fd": eventfd, "flags": flags})
        ioctl(self.fd, "KVM_IOEVENTFD", request)

    def create_vcpu(self, index=0):
        from pylguest.kvm.vcpu import Vcpu
        return Vcpu(self, ioctl(self.fd, "KVM_CREATE_VCPU", index))
