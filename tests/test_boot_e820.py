"""The e820 map and boot_params, byte for byte as Linux reads them."""

import struct

from pylguest import layout
from pylguest.boot import bootparams
from pylguest.boot.e820 import E820_RAM, E820_RESERVED, E820Entry, build_e820, max_pfn
from pylguest.memory import GiB, plan_regions

MiB = 1 << 20


def test_e820_for_64m_puts_max_pfn_on_the_device_page():
    e820 = build_e820(plan_regions(64 * MiB, 4096), 4096)
    assert e820 == [
        E820Entry(0, 0x9FC00, E820_RAM),
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
        E820Entry(0x100000, 64 * MiB - 0x100000, E820_RAM),
        E820Entry(64 * MiB, 4096, E820_RESERVED),
        E820Entry(0xFEB00000, 4096, E820_RESERVED),
    ]
    assert max_pfn(e820) << 12 == 64 * MiB


def test_e820_above_4g():
    e820 = build_e820(plan_regions(4 * GiB, 3 * 4096), 3 * 4096)
    ram = [e for e in e820 if e.type == E820_RAM]
    assert ram[-2] == E820Entry(0x100000, 3 * GiB - 0x100000, E820_RAM)
    assert ram[-1] == E820Entry(4 * GiB, 1 * GiB, E820_RAM)
    assert max_pfn(e820) << 12 == 5 * GiB
    assert E820Entry(5 * GiB, 3 * 4096, E820_RESERVED) in e820


def test_e820_entry_prints_like_linux():
    assert str(E820Entry(0x100000, 0x100000, E820_RAM)) == \
        "[mem 0x0000000000100000-0x00000000001fffff] usable"


def test_boot_params_fields():
    header = bootparams.synthetic_setup_header()
    e820 = build_e820(plan_regions(64 * MiB, 4096), 4096)
    page = bootparams.build_boot_params(header, e820, 0x20000, initrd=(0x3000000, 0x1234))
    assert len(page) == 4096
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55
    assert page[0x202:0x206] == b"HdrS"
    assert page[0x210] == 0xFF                                    # type_of_loader
    assert page[0x211] & 0x81 == 0x81                             # LOADED_HIGH | CAN_USE_HEAP
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x20000    # cmd_line_ptr
    assert struct.unpack_from("<I", page, 0x0C8)[0] == 0          # ext_cmd_line_ptr
    assert struct.unpack_from("<II", page, 0x218) == (0x3000000, 0x1234)
    assert page[0x1E8] == len(e820)
    for i, entry in enumerate(e820):
        assert struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) == (entry.addr, entry.size, entry.type)


def test_boot_params_keeps_the_images_own_header():
    header = bytearray(bootparams.synthetic_setup_header())
    # version 2.15 and a cmdline_size of 255 from "the image"
    struct.pack_into("<I", header, bootparams.CMDLINE_SIZE - bootparams.SETUP_HEADER, 255)
    page = bootparams.build_boot_params(bytes(header), [], layout.CMDLINE_ADDR)
    assert bootparams.read_cmdline_size(page) == 255
    assert struct.unpack_from("<H", page, 0x206)[0] == 0x020F
