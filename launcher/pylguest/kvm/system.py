"""/dev/kvm itself: the API version, capabilities and supported CPUID."""

import errno
import os

from pylguest._native import ffi, lib
from pylguest.errors import KvmError
from pylguest.kvm.ioctl import ioctl

KVM_DEVICE = "/dev/kvm"

# Capabilities the launcher cannot work without, with the reason.
REQUIRED_CAPS = {
    "KVM_CAP_USER_MEMORY": "guest memory comes from our own mmap",
    "KVM_CAP_IRQCHIP": "the PIC and IOAPIC live in the kernel",
    "KVM_CAP_PIT2": "the PIT lives in the kernel",
    "KVM_CAP_IRQFD": "device backends raise interrupts through irqfds",
    "KVM_CAP_IOEVENTFD": "virtqueue kicks must not exit to userspace",
    "KVM_CAP_IMMEDIATE_EXIT": "Ctrl-C and timeouts stop the vCPU without a race",
    "KVM_CAP_EXT_CPUID": "the guest's CPUID comes from KVM_GET_SUPPORTED_CPUID",
}


class Kvm:
    """An open /dev/kvm."""

    def __init__(self, path=KVM_DEVICE):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"cannot open {path}: {e.strerror} "
                           "(is KVM available here, and may you use it?)",
                           errno=e.errno) from None
        version = ioctl(self.fd, "KVM_GET_API_VERSION")
        if version != lib.KVM_API_VERSION:
            raise KvmError(f"{path} speaks KVM API {version}, "
                           f"pylguest needs {lib.KVM_API_VERSION}")

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap_name):
        """KVM_CHECK_EXTENSION: 0 when absent, otherwise a cap-specific value."""
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", getattr(lib, cap_name))

    def require_capabilities(self):
        for cap, why in REQUIRED_CAPS.items():
            if not self.check_extension(cap):
                raise KvmError(f"this KVM lacks {cap}, and pylguest needs it: {why}")

    def vcpu_mmap_size(self):
        return ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID, as a cffi `struct kvm_cpuid2 *`.

        The kernel does not say how many entries it has; the protocol is to
        offer a buffer and grow it while the kernel answers E2BIG.
        """
        nent = 64
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
            try:
                ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid)
                return cpuid
            except KvmError as e:
                if e.errno != errno.E2BIG or nent >= 4096:
                    raise
                nent *= 2

    def create_vm(self):
        from pylguest.kvm.vm import Vm
        return Vm(self, ioctl(self.fd, "KVM_CREATE_VM", 0))
