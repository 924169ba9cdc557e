"""The MP table: how a PC without ACPI tells its kernel about its CPUs.

Before ACPI, a multiprocessor BIOS described the machine with the Intel
MultiProcessor Specification 1.4 (chapter 4, "MP Configuration Table").
The kernel finds a 16-byte "floating pointer" by scanning a few places for
"_MP_"; it points at a configuration table: a header, then entries for
each processor, bus, IOAPIC and interrupt wire.  With the ISA IRQs listed
as IOAPIC inputs, Linux routes them through the IOAPIC ("symmetric I/O
mode") instead of the 8259 PICs.  Linux's reader is
arch/x86/kernel/mpparse.c; it looks in the last KiB of base memory,
639 KiB = 0x9fc00, among other places, so that is where we put it:

    0x9fc00  floating pointer (16)  "_MP_", -> config table, rev 4, checksum
    0x9fc10  config table header (44)  "PCMP", base length, checksum, LAPIC
    0x9fc3c  processor entries (20 each)  LAPIC id = cpu index, cpu 0 = BSP
             bus entry (8)  bus 0 is "ISA"
             IOAPIC entry (8)  id = ncpus, at 0xfec00000
             I/O interrupt entries (8 each)  ISA IRQ n -> IOAPIC pin n
             local interrupt entries (8 each)  ExtINT on LINT0, NMI on LINT1
    < 0xa0000

Our e820 marks 0x9fc00-0x100000 reserved, as a PC's EBDA is, so the guest
never hands these bytes out.  One vCPU gives 240 bytes; the 1 KiB holds 40.
"""

import struct

MPTABLE_ADDR = 0x9FC00             # where Linux scans: 639 KiB
MPTABLE_MAX_SIZE = 0x400           # up to 0xa0000, the end of base memory

# The floating pointer structure (MP spec 4.1).
FLOATING_SIGNATURE = b"_MP_"
FLOATING_FORMAT = "<4sIBBB5s"      # signature, physptr, length, rev, checksum, features
FLOATING_SIZE = 16
FLOATING_LENGTH_PARAGRAPHS = FLOATING_SIZE // 16
FEATURES_TABLE_PRESENT = bytes(5)  # byte 1 = 0: no default config, read the table;
                                   # byte 2 bit 7 = 0: virtual wire, no IMCR
SPEC_REV_1_4 = 4
PARAGRAPH = 16                     # Linux scans in 16-byte steps

# The configuration table header (MP spec 4.2).
TABLE_SIGNATURE = b"PCMP"
HEADER_FORMAT = "<4sHBB8s12sIHHIHBB"
HEADER_SIZE = 44
OEM_ID = b"PYLGUEST"
PRODUCT_ID = b"LGUEST"
LOCAL_APIC_ADDR = 0xFEE00000       # where every local APIC sits by default

# Entry types and their sizes (MP spec 4.3).
ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4
PROCESSOR_FORMAT = "<BBBBII8s"     # type, LAPIC id, version, flags, signature, features
PROCESSOR_SIZE = 20
BUS_FORMAT = "<BB6s"               # type, bus id, bus type string
IOAPIC_FORMAT = "<BBBBI"           # type, id, version, flags, address
INTERRUPT_FORMAT = "<BBHBBBB"      # type, interrupt type, flags, source bus/irq, dest id/pin
SMALL_ENTRY_SIZE = 8

LOCAL_APIC_VERSION = 0x14          # an integrated (on-chip) local APIC, as KVM's
CPU_ENABLED = 0x01
CPU_BOOT_PROCESSOR = 0x02
CPU_SIGNATURE = 0x600              # family 6, model 0, stepping 0
CPU_FEATURE_FPU = 1 << 0           # CPUID.1:EDX bits, as the spec asks
CPU_FEATURE_APIC = 1 << 9

ISA_BUS_ID = 0
BUS_TYPE_ISA = b"ISA   "           # six bytes, padded with blanks

IOAPIC_VERSION = 0x11              # what KVM's IOAPIC reports
IOAPIC_ENABLED = 0x01
IOAPIC_ADDR = 0xFEC00000
ISA_IRQS = 16

INT_VECTORED = 0                   # an ordinary interrupt, through the IOAPIC
INT_NMI = 1
INT_EXTINT = 3                     # the 8259's vectored interrupt, passed through
FLAGS_CONFORM_TO_BUS = 0           # for ISA: edge triggered, active high
ALL_LOCAL_APICS = 0xFF
LINT0 = 0
LINT1 = 1


def _checksum_byte(data):
    """The byte that makes `data` (with a 0 in its checksum slot) sum to 0."""
    return -sum(data) & 0xFF


def _processor(apic_id):
    flags = CPU_ENABLED | (CPU_BOOT_PROCESSOR if apic_id == 0 else 0)
    return struct.pack(PROCESSOR_FORMAT, ENTRY_PROCESSOR, apic_id, LOCAL_APIC_VERSION,
                       flags, CPU_SIGNATURE, CPU_FEATURE_FPU | CPU_FEATURE_APIC, bytes(8))


def _isa_bus():
    return struct.pack(BUS_FORMAT, ENTRY_BUS, ISA_BUS_ID, BUS_TYPE_ISA)


def _ioapic(ioapic_id):
    return struct.pack(IOAPIC_FORMAT, ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION,
                       IOAPIC_ENABLED, IOAPIC_ADDR)


def _isa_irq(irq, ioapic_id):
    """ISA IRQ `irq` wired to the same-numbered IOAPIC pin: KVM's default
    GSI routing, so no IRQ0 -> pin 2 override as on a real PC."""
    return struct.pack(INTERRUPT_FORMAT, ENTRY_IO_INTERRUPT, INT_VECTORED,
                       FLAGS_CONFORM_TO_BUS, ISA_BUS_ID, irq, ioapic_id, irq)


def _local_interrupt(int_type, lint):
    return struct.pack(INTERRUPT_FORMAT, ENTRY_LOCAL_INTERRUPT, int_type,
                       FLAGS_CONFORM_TO_BUS, ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint)


def _entries(ncpus):
    # The IOAPIC needs an APIC id of its own: take the one after the CPUs'.
    ioapic_id = ncpus
    entries = [_processor(cpu) for cpu in range(ncpus)]
    entries.append(_isa_bus())
    entries.append(_ioapic(ioapic_id))
    entries += [_isa_irq(irq, ioapic_id) for irq in range(ISA_IRQS)]
    # The virtual-wire setup: the PIC's output on LINT0, NMIs on LINT1.
    entries.append(_local_interrupt(INT_EXTINT, LINT0))
    entries.append(_local_interrupt(INT_NMI, LINT1))
    return entries


def _config_table(entries):
    body = b"".join(entries)
    length = HEADER_SIZE + len(body)

    def header(checksum):
        return struct.pack(HEADER_FORMAT, TABLE_SIGNATURE, length, SPEC_REV_1_4, checksum,
                           OEM_ID.ljust(8), PRODUCT_ID.ljust(12), 0, 0, len(entries),
                           LOCAL_APIC_ADDR, 0, 0, 0)

    # The checksum covers the header and all base entries ("base table length").
    return header(_checksum_byte(header(0) + body)) + body


def _floating_pointer(table_addr):
    def pointer(checksum):
        return struct.pack(FLOATING_FORMAT, FLOATING_SIGNATURE, table_addr,
                           FLOATING_LENGTH_PARAGRAPHS, SPEC_REV_1_4, checksum,
                           FEATURES_TABLE_PRESENT)

    return pointer(_checksum_byte(pointer(0)))


MPTABLE_MAX_CPUS = (MPTABLE_MAX_SIZE - FLOATING_SIZE - HEADER_SIZE - 2 * SMALL_ENTRY_SIZE
                    - (ISA_IRQS + 2) * SMALL_ENTRY_SIZE) // PROCESSOR_SIZE


def build_mptable(ncpus=1, base=MPTABLE_ADDR):
    """The bytes to write at guest-physical `base`: the floating pointer,
    then the configuration table right after it."""
    if not 1 <= ncpus <= MPTABLE_MAX_CPUS:
        raise ValueError(f"{ncpus} CPUs: the MP table holds 1 to {MPTABLE_MAX_CPUS}")
    if base % PARAGRAPH or base + MPTABLE_MAX_SIZE > 1 << 32:
        raise ValueError(f"MP table at {base:#x}: must be 16-byte aligned, below 4 GiB")
    table = _config_table(_entries(ncpus))
    mptable = _floating_pointer(base + FLOATING_SIZE) + table
    assert len(mptable) <= MPTABLE_MAX_SIZE
    return mptable
