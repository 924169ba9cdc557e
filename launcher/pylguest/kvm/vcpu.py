"""A virtual CPU: its registers, and KVM_RUN.

KVM shares one page-sized `struct kvm_run` with us per vCPU (we mmap it from
the vCPU fd).  KVM_RUN enters the guest and returns when the guest does
something the kernel leaves to userspace; kvm_run then says why (the exit
reason) and carries the details (the port and data of an `out`, the address
of an MMIO store).  We answer by filling in kvm_run and calling KVM_RUN
again.
"""

import errno
import mmap
import os

from pylguest._native import ffi, lib
from pylguest.kvm.ioctl import ioctl, ioctl_error


class Vcpu:
    """A vCPU file descriptor and its shared kvm_run page."""

    def __init__(self, vm, fd):
        """Takes `fd` (from KVM_CREATE_VCPU): closed here if mapping its
        kvm_run fails, since no caller holds a Vcpu to close then."""
        self.vm = vm
        self.fd = fd
        try:
            size = vm.kvm.vcpu_mmap_size()
            self._run_map = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self.fd = -1
            raise
        self._run_view = memoryview(self._run_map)
        self.kvm_run = ffi.cast("struct kvm_run *", ffi.from_buffer(self._run_map))

    def close(self):
        if self.fd >= 0:
            self.kvm_run = None
            self._run_view.release()
            try:
                self._run_map.close()
            except BufferError:
                pass  # a cffi view may still be alive; the unmap happens at exit
            os.close(self.fd)
            self.fd = -1

    def run(self):
        """Enter the guest; return the exit reason, or None if a signal (or
        immediate_exit) interrupted us before or during the run."""
        return self._exit(lib.pyl_run(self.fd))

    def run_fast(self, table):
        """run(), but the exits that run/fastpath.py's `table` covers are
        answered in C, inside one call: it returns with the first exit
        Python must answer (or None)."""
        return self._exit(lib.pyl_run_fast(self.fd, self.kvm_run, table))

    def _exit(self, result):
        if result < 0:
            err = ffi.errno
            if err in (errno.EINTR, errno.EAGAIN):
                self.kvm_run.immediate_exit = 0
                return None
            raise ioctl_error("KVM_RUN", err)
        return self.kvm_run.exit_reason

    def io_data(self):
        """The bytes of a KVM_EXIT_IO, a writable view into the kvm_run page
        (for an `in`, we write the answer there)."""
        io = self.kvm_run.io
        offset = io.data_offset
        return self._run_view[offset:offset + io.size * io.count]

    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, "KVM_GET_REGS", regs)
        return regs

    def set_regs(self, regs):
        ioctl(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, "KVM_GET_SREGS", sregs)
        return sregs

    def set_sregs(self, sregs):
        ioctl(self.fd, "KVM_SET_SREGS", sregs)

    def set_cpuid(self, cpuid):
        ioctl(self.fd, "KVM_SET_CPUID2", cpuid)

    def get_events(self):
        events = ffi.new("struct kvm_vcpu_events *")
        ioctl(self.fd, "KVM_GET_VCPU_EVENTS", events)
        return events

    def set_events(self, events):
        ioctl(self.fd, "KVM_SET_VCPU_EVENTS", events)
