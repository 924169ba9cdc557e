"""boot_params, the "zero page": how a bootloader talks to Linux.

Documentation/x86/boot.rst and zero-page.rst define it.  It is one 4 KiB
page; the part from 0x1f1 is the setup header, copied from the bzImage
itself and then filled in by the loader (us).  Our teaching guests read the
very same page, so what they print is what Linux would see.

Only the fields a 64-bit boot needs are written; the rest stays zero.
"""

import struct

from pylguest.boot.e820 import E820_MAX_ENTRIES

# Offsets into boot_params (arch/x86/include/uapi/asm/bootparam.h).
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SETUP_HEADER = 0x1F1
BOOT_FLAG = 0x1FE
HEADER_MAGIC = 0x202
VERSION = 0x206
VID_MODE = 0x1FA
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
CMDLINE_SIZE = 0x238
E820_TABLE = 0x2D0
SETUP_HEADER_END = 0x290           # the header may not run past this

LOADED_HIGH = 0x01                 # loadflags: protected-mode code at 1 MiB
CAN_USE_HEAP = 0x80                # loadflags: heap_end_ptr is valid
TYPE_OF_LOADER_UNDEFINED = 0xFF    # "a boot loader without an assigned id"
VID_MODE_NORMAL = 0xFFFF

# What we tell a kernel that came without a setup header (a plain ELF):
# protocol 2.15, and the command line limit Linux has on x86.
SYNTHETIC_VERSION = 0x020F
SYNTHETIC_CMDLINE_SIZE = 2047
SYNTHETIC_INITRD_ADDR_MAX = 0x7FFFFFFF


def _put(page, offset, fmt, value):
    struct.pack_into("<" + fmt, page, offset, value)


def synthetic_setup_header():
    """A setup header for an image that had none (ELF guests): enough for
    a reader of boot_params to find its command line and e820 map."""
    page = bytearray(4096)
    _put(page, BOOT_FLAG, "H", 0xAA55)
    page[HEADER_MAGIC:HEADER_MAGIC + 4] = b"HdrS"
    _put(page, VERSION, "H", SYNTHETIC_VERSION)
    _put(page, LOADFLAGS, "B", LOADED_HIGH)
    _put(page, INITRD_ADDR_MAX, "I", SYNTHETIC_INITRD_ADDR_MAX)
    _put(page, KERNEL_ALIGNMENT, "I", 0x200000)
    _put(page, CMDLINE_SIZE, "I", SYNTHETIC_CMDLINE_SIZE)
    return bytes(page[SETUP_HEADER:SETUP_HEADER_END])


def build_boot_params(setup_header, e820, cmdline_addr, initrd=None):
    """The zero page, as bytes.

    setup_header: the header bytes from offset 0x1f1 (a bzImage's own, or
    synthetic_setup_header()); e820: E820Entry list; initrd: (addr, size).
    """
    page = bytearray(4096)
    header = setup_header[:SETUP_HEADER_END - SETUP_HEADER]
    page[SETUP_HEADER:SETUP_HEADER + len(header)] = header

    _put(page, VID_MODE, "H", VID_MODE_NORMAL)
    _put(page, TYPE_OF_LOADER, "B", TYPE_OF_LOADER_UNDEFINED)
    _put(page, LOADFLAGS, "B", page[LOADFLAGS] | LOADED_HIGH | CAN_USE_HEAP)
    # The real-mode heap would end below our own setup code at 0xfe00
    # (boot.rst's example); a 64-bit entry never uses it, but the field
    # must be sane when CAN_USE_HEAP is set.
    _put(page, HEAP_END_PTR, "H", 0xFE00 - 0x200)
    _put(page, CMD_LINE_PTR, "I", cmdline_addr & 0xFFFFFFFF)
    _put(page, EXT_CMD_LINE_PTR, "I", cmdline_addr >> 32)

    if initrd is not None:
        addr, size = initrd
        _put(page, RAMDISK_IMAGE, "I", addr & 0xFFFFFFFF)
        _put(page, RAMDISK_SIZE, "I", size & 0xFFFFFFFF)
        _put(page, EXT_RAMDISK_IMAGE, "I", addr >> 32)
        _put(page, EXT_RAMDISK_SIZE, "I", size >> 32)

    if len(e820) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(e820)} e820 entries, boot_params holds {E820_MAX_ENTRIES}")
    _put(page, E820_ENTRIES, "B", len(e820))
    for i, entry in enumerate(e820):
        struct.pack_into("<QQI", page, E820_TABLE + 20 * i, entry.addr, entry.size, entry.type)
    return bytes(page)


def read_cmdline_size(boot_params):
    return struct.unpack_from("<I", boot_params, CMDLINE_SIZE)[0]
