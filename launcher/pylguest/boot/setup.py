"""The boot setup: everything a kernel finds in memory and in its registers
at its first instruction, written in one step once the images are loaded.

A bootloader builds this in real mode; linux-loader calls the same step
"configuring" the boot.  Here it is:

  memory   the command line (at CMDLINE_ADDR, NUL-terminated), boot_params
           (the zero page: setup header, e820 map, initrd, command line
           pointer), the GDT, the MP table, and an identity map of all of
           guest-physical memory;
  vCPU     long mode on those page tables, flat 64-bit segments, rip at the
           kernel's entry and rsi at boot_params (boot/x86.py).

The memory map (layout.py) says where each of these lives.
"""

import os
from typing import NamedTuple, Optional, Tuple

from pylguest import layout
from pylguest._native import ffi
from pylguest.boot import x86
from pylguest.boot.bootparams import build_boot_params
from pylguest.boot.loader import LoadedKernel, cmdline_limit
from pylguest.boot.mptable import MPTABLE_ADDR, build_mptable
from pylguest.errors import UsageError


class BootSetup(NamedTuple):
    kernel: LoadedKernel
    cmdline: bytes                          # as the kernel reads it, without the NUL
    initrd: Optional[Tuple[int, int]]       # (address, size) where it was loaded
    e820: list                              # boot/e820.py's entries
    memory_end: int                         # the end of guest-physical memory


def encode_cmdline(text: str, kernel: LoadedKernel) -> bytes:
    """The command line as bytes, checked against what the kernel accepts.
    The user's non-UTF-8 bytes (which Python's argv holds as surrogate
    escapes) pass unchanged."""
    encoded = os.fsencode(text)
    if b"\0" in encoded:
        raise UsageError("the command line cannot hold a NUL byte")
    limit = cmdline_limit(kernel)
    if len(encoded) > limit:
        raise UsageError(f"the command line is {len(encoded)} bytes; "
                         f"this kernel accepts at most {limit}")
    return encoded


def write_boot_memory(memory, setup: BootSetup) -> None:
    """The command line, boot_params, GDT, MP table and page tables."""
    memory.write(layout.CMDLINE_ADDR, setup.cmdline + b"\0")
    memory.write(layout.BOOT_PARAMS_ADDR,
                 build_boot_params(setup.kernel.setup_header, setup.e820,
                                   layout.CMDLINE_ADDR, setup.initrd))
    memory.write(layout.GDT_ADDR, x86.build_gdt())
    # The MP table: one CPU, the ISA bus, the IOAPIC, ISA IRQ n on pin n.
    # Linux then takes our devices' interrupts through the IOAPIC, and
    # finds the table early in its search of the BIOS areas.
    memory.write(MPTABLE_ADDR, build_mptable())
    tables = x86.build_page_tables(layout.PAGE_TABLES_ADDR, setup.memory_end)
    assert layout.PAGE_TABLES_ADDR + len(tables) <= layout.PAGE_TABLES_END
    memory.write(layout.PAGE_TABLES_ADDR, tables)


def set_entry_state(vcpu, entry: int) -> None:
    """The vCPU at the kernel's 64-bit entry, as the boot protocol asks."""
    sregs = vcpu.get_sregs()
    x86.set_long_mode(sregs, layout.PAGE_TABLES_ADDR)
    vcpu.set_sregs(sregs)
    regs = ffi.new("struct kvm_regs *")
    x86.set_entry_registers(regs, entry, layout.BOOT_PARAMS_ADDR)
    vcpu.set_regs(regs)
