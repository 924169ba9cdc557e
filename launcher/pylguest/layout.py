"""The guest-physical memory map (docs/abi.md section 2), in one place.

    0x500           GDT: 0x10 = 64-bit code, 0x18 = data (Linux's __BOOT_CS/DS)
    0x7000          boot_params, the "zero page"
    0x9000 ..       identity page tables (PML4, PDPT, one PD per GiB)
    0x20000         kernel command line
    0x9fc00-0x100000  reserved (EBDA, VGA, BIOS), as on a PC
    0x9fc00         the MP table, where a BIOS would leave it (boot/mptable.py)
    0x100000        the kernel (bzImage protected-mode code; an ELF's p_paddr)
    below RAM top   the initrd
    ram_top         the lguest device page (= max_pfn << 12)
    ram_top+4096 .. the vrings
    0xFEB00000      the hypercall page (MMIO: no memory behind it)
"""

GDT_ADDR = 0x500
BOOT_PARAMS_ADDR = 0x7000
PAGE_TABLES_ADDR = 0x9000
PAGE_TABLES_END = 0x20000          # room for PML4 + PDPT + 21 page directories
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000              # our own limit; a bzImage may set a lower one
LOW_RAM_END = 0x9FC00              # where the EBDA would start on a PC
HIGH_MEMORY = 0x100000             # 1 MiB: the kernel goes here
KERNEL_ADDR = HIGH_MEMORY
HYPERCALL_PAGE = 0xFEB00000
HYPERCALL_PAGE_SIZE = 0x1000

MiB = 1 << 20
GiB = 1 << 30
LOW_RAM_LIMIT = 3 * GiB            # RAM beyond this goes above 4 GiB
HIGH_RAM_BASE = 4 * GiB
MIN_MEM = 16 * MiB
MAX_MEM = 16 * GiB                 # the page tables below 0x20000 map 21 GiB
