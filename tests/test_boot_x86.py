"""The 64-bit entry state: GDT and identity page tables."""

import struct

from pylguest.boot import x86

GiB = 1 << 30


def test_gdt_has_linux_boot_selectors():
    gdt = x86.build_gdt()
    code = struct.unpack_from("<Q", gdt, x86.BOOT_CS)[0]
    data = struct.unpack_from("<Q", gdt, x86.BOOT_DS)[0]
    assert code >> 53 & 1 == 1          # L: 64-bit code
    assert code >> 47 & 1 == 1          # present
    assert code >> 43 & 1 == 1          # executable
    assert data >> 43 & 1 == 0          # not executable
    assert data >> 41 & 1 == 1          # writable


def walk(tables, base, addr):
    """Translate `addr` through the tables as the MMU would."""
    def entry(table_addr, index):
        return struct.unpack_from("<Q", tables, table_addr - base + 8 * index)[0]
    pml4e = entry(base, addr >> 39 & 511)
    assert pml4e & 1
    pdpte = entry(pml4e & ~0xFFF, addr >> 30 & 511)
    assert pdpte & 1
    pde = entry(pdpte & ~0xFFF, addr >> 21 & 511)
    assert pde & 1 and pde & x86.PTE_HUGE
    return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (addr & 0x1FFFFF)


def test_identity_map_covers_4g_at_least():
    base = 0x9000
    tables = x86.build_page_tables(base, 64 << 20)
    assert len(tables) == x86.page_tables_size(64 << 20) == 6 * 4096
    for addr in (0, 0x7000, 0x100000, 0x12345678, 0xFEB00008, 4 * GiB - 1):
        assert walk(tables, base, addr) == addr


def test_identity_map_grows_with_memory():
    tables = x86.build_page_tables(0x9000, 5 * GiB + 4096)
    assert len(tables) == (2 + 6) * 4096
    assert walk(tables, 0x9000, 5 * GiB + 0x1234) == 5 * GiB + 0x1234
