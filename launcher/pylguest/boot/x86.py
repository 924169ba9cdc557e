"""The CPU state a 64-bit kernel expects at its entry point.

Linux's 64-bit boot protocol (boot.rst, "64-bit BOOT PROTOCOL") asks for:
long mode with paging on, an identity map covering the kernel, boot_params
and the command line, a GDT whose 0x10 is a flat 64-bit code segment and
0x18 a flat data segment (__BOOT_CS, __BOOT_DS), interrupts off, and rsi
pointing at boot_params.  A bootloader normally does this in real mode;
we simply write the result into guest memory and the vCPU's registers.
"""

import struct

from pylguest import layout

# GDT descriptors, in the packed form the CPU reads.
GDT_NULL = 0
GDT_CODE64 = 0x00AF9A000000FFFF    # present, ring 0, code, execute/read, L=1, G=1
GDT_DATA = 0x00CF92000000FFFF      # present, ring 0, data, read/write, D/B=1, G=1
GDT_ENTRIES = (GDT_NULL, GDT_NULL, GDT_CODE64, GDT_DATA)
BOOT_CS = 0x10
BOOT_DS = 0x18

# Page table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_HUGE = 1 << 7                  # in a page directory: a 2 MiB page

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

GiB = 1 << 30


def build_gdt():
    return b"".join(struct.pack("<Q", e) for e in GDT_ENTRIES)


def build_page_tables(base, cover):
    """Identity page tables at `base` mapping [0, cover) with 2 MiB pages.

    Returns the bytes to write at `base`: one PML4, one PDPT, then one page
    directory per GiB.  cover is rounded up to a whole GiB, and is at least
    4 GiB so the 32-bit MMIO hole (our hypercall page) is mapped too.
    """
    gigs = max(4, -(-cover // GiB))
    pml4 = bytearray(4096)
    pdpt = bytearray(4096)
    struct.pack_into("<Q", pml4, 0, (base + 0x1000) | PTE_PRESENT | PTE_WRITABLE)
    directories = bytearray(4096 * gigs)
    for g in range(gigs):
        pd_addr = base + 0x2000 + 0x1000 * g
        struct.pack_into("<Q", pdpt, 8 * g, pd_addr | PTE_PRESENT | PTE_WRITABLE)
        for i in range(512):
            phys = g * GiB + i * (2 << 20)
            struct.pack_into("<Q", directories, 0x1000 * g + 8 * i,
                             phys | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE)
    return bytes(pml4 + pdpt + directories)


def page_tables_size(cover):
    return 4096 * (2 + max(4, -(-cover // GiB)))


def set_segment(seg, selector, code):
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.present = 1
    seg.dpl = 0
    seg.s = 1
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0
    if code:
        seg.type = 0xB                 # execute/read, accessed
        seg.l = 1
        seg.db = 0
    else:
        seg.type = 0x3                 # read/write, accessed
        seg.l = 0
        seg.db = 1


def set_long_mode(sregs, page_tables_addr):
    """Fill a struct kvm_sregs for 64-bit mode with our GDT and page tables."""
    set_segment(sregs.cs, BOOT_CS, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        set_segment(seg, BOOT_DS, code=False)
    # VM entry insists on a usable task register even if the guest never
    # switches tasks: a busy 64-bit TSS at 0, as after a BIOS.
    sregs.tr.base = 0
    sregs.tr.limit = 0x67
    sregs.tr.selector = 0
    sregs.tr.type = 0xB
    sregs.tr.present = 1
    sregs.tr.s = 0
    sregs.tr.unusable = 0
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = len(GDT_ENTRIES) * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = page_tables_addr
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA


def set_entry_registers(regs, entry, boot_params_addr):
    """rip at the kernel's entry, rsi at boot_params, interrupts off."""
    regs.rip = entry
    regs.rsi = boot_params_addr
    regs.rflags = 0x2                  # bit 1 is reserved and always set
    regs.rsp = boot_params_addr        # a stack just below the zero page
