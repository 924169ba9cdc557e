"""The machine state KVM holds for us: what a snapshot would have to save.

Guest memory and the devices are the launcher's own.  Everything else of
a running machine lives in the kernel, behind ioctls that read it out as a
blob and write the same blob back:

  per vCPU   regs, sregs          the registers, and the segment, control
                                  and descriptor-table registers
             fpu, xsave, xcrs     the x87/SSE state, the XSAVE area (AVX
                                  and beyond), the XCR0 register
             msrs                 model-specific registers: the ones KVM
                                  lists (KVM_GET_MSR_INDEX_LIST), kvmclock's
                                  among them
             lapic                the local APIC's 1 KiB page: its timer,
                                  pending and in-service interrupts
             events               an exception, interrupt or NMI that is
                                  pending or being injected
             debugregs            DR0-3, DR6, DR7
             mp_state             running, halted, waiting for INIT/SIPI
  per VM     pic master/slave,    the in-kernel interrupt controllers
             ioapic
             pit2                 the in-kernel timer
             clock                kvmclock's time base (KVM_GET/SET_CLOCK)

Each piece is read and written whole; `PIECES` is the table, and read()
and write() the only two ways in.  The MSRs are the one piece that is a
list rather than a blob (read_msrs, write_msrs).  Which of these this KVM
lets us read and write back is a fact of the KVM, not of this code:
tools/kvm_state_probe.py asks, and docs/abi.md section 10 records it.
"""

from typing import NamedTuple, Optional

from pylguest._native import ffi, lib
from pylguest.kvm.ioctl import ioctl


class Piece(NamedTuple):
    name: str
    ctype: str                    # the blob's C type
    get: str                      # its ioctls, as <linux/kvm.h> names them
    set: str
    scope: str                    # "vcpu" or "vm"
    chip: Optional[int] = None    # KVM_GET_IRQCHIP's chip_id


PIECES = (
    Piece("regs", "struct kvm_regs", "KVM_GET_REGS", "KVM_SET_REGS", "vcpu"),
    Piece("sregs", "struct kvm_sregs", "KVM_GET_SREGS", "KVM_SET_SREGS", "vcpu"),
    Piece("fpu", "struct kvm_fpu", "KVM_GET_FPU", "KVM_SET_FPU", "vcpu"),
    Piece("xsave", "struct kvm_xsave", "KVM_GET_XSAVE", "KVM_SET_XSAVE", "vcpu"),
    Piece("xcrs", "struct kvm_xcrs", "KVM_GET_XCRS", "KVM_SET_XCRS", "vcpu"),
    Piece("lapic", "struct kvm_lapic_state", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "vcpu"),
    Piece("events", "struct kvm_vcpu_events", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS",
          "vcpu"),
    Piece("debugregs", "struct kvm_debugregs", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS",
          "vcpu"),
    Piece("mp_state", "struct kvm_mp_state", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "vcpu"),
    Piece("pic master", "struct kvm_irqchip", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "vm",
          lib.KVM_IRQCHIP_PIC_MASTER),
    Piece("pic slave", "struct kvm_irqchip", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "vm",
          lib.KVM_IRQCHIP_PIC_SLAVE),
    Piece("ioapic", "struct kvm_irqchip", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "vm",
          lib.KVM_IRQCHIP_IOAPIC),
    Piece("pit2", "struct kvm_pit_state2", "KVM_GET_PIT2", "KVM_SET_PIT2", "vm"),
    Piece("clock", "struct kvm_clock_data", "KVM_GET_CLOCK", "KVM_SET_CLOCK", "vm"),
)

MAX_MSRS = 1024                   # more than any KVM lists


def read(fd, piece):
    """The piece's blob, read from `fd` (the vCPU's or the VM's)."""
    blob = ffi.new(piece.ctype + " *")
    if piece.chip is not None:
        blob.chip_id = piece.chip
    ioctl(fd, piece.get, blob)
    return blob


def write(fd, piece, blob):
    ioctl(fd, piece.set, blob)


def as_bytes(blob):
    return bytes(ffi.buffer(blob))


def msr_indices(kvm_fd):
    """The MSRs KVM says it can save and restore (on /dev/kvm)."""
    # A flexible array: allocate it with room, as the header's users do.
    room = ffi.new("char[]", ffi.sizeof("struct kvm_msr_list") + 4 * MAX_MSRS)
    listing = ffi.cast("struct kvm_msr_list *", room)
    listing.nmsrs = MAX_MSRS
    ioctl(kvm_fd, "KVM_GET_MSR_INDEX_LIST", listing)
    return [listing.indices[i] for i in range(listing.nmsrs)]


def _msrs(entries):
    room = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + 16 * len(entries))
    msrs = ffi.cast("struct kvm_msrs *", room)
    msrs.nmsrs = len(entries)
    for slot, (index, data) in zip(msrs.entries[0:len(entries)], entries):
        slot.index, slot.data = index, data
    return msrs, room


def read_msrs(vcpu_fd, indices):
    """{index: value} for each MSR in `indices` that this KVM reads.  One
    KVM_GET_MSRS per MSR: KVM stops a batch at the first MSR it cannot
    read, and asking alone says which those are."""
    values = {}
    for index in indices:
        msrs, _room = _msrs([(index, 0)])
        if ioctl(vcpu_fd, "KVM_GET_MSRS", msrs) == 1:
            values[index] = msrs.entries[0].data
    return values


def write_msrs(vcpu_fd, values):
    """The indices of `values` ({index: value}) that KVM_SET_MSRS refused."""
    refused = []
    for index, data in values.items():
        msrs, _room = _msrs([(index, data)])
        if ioctl(vcpu_fd, "KVM_SET_MSRS", msrs) != 1:
            refused.append(index)
    return refused


def size_of(piece):
    """The size of the piece's blob on this host's KVM, in bytes."""
    return ffi.sizeof(piece.ctype)


def from_bytes(piece, data):
    """A blob for write(), holding `data` (exactly size_of(piece) bytes)."""
    blob = ffi.new(piece.ctype + " *")
    ffi.buffer(blob)[:] = data
    return blob
