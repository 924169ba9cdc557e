"""Parsing a bzImage's setup header (Documentation/x86/boot.rst).

The images are synthetic: a real-mode part with a setup header at the
offsets boot.rst gives, then a protected-mode part holding a payload.
"""

import struct

import pytest

from pylguest.boot.bzimage import (ENTRY64_OFFSET, BzImage, is_bzimage, parse_bzimage,
                                   parse_setup_header)
from pylguest.errors import BootError

PROTECTED_MODE = b"\x90" * 0x300 + b"PAYLOAD!" + b"\xcc" * 0x100    # 0x408 bytes
PAYLOAD_OFFSET = 0x300
PAYLOAD_LENGTH = 8


def make_bzimage(setup_sects=3, version=0x020F, xloadflags=0x3, header_end=0x26C,
                 payload_offset=PAYLOAD_OFFSET, payload_length=PAYLOAD_LENGTH,
                 protected_mode=PROTECTED_MODE):
    """A bzImage as a build would lay it out; defaults are a 2.15 kernel."""
    real_mode = bytearray((max(setup_sects, 0) or 4) * 512 + 512)
    real_mode[0x1F1] = setup_sects
    struct.pack_into("<H", real_mode, 0x1FE, 0xAA55)
    real_mode[0x200] = 0xEB                               # jmp short ...
    real_mode[0x201] = header_end - 0x202                 # ... to the header's end
    real_mode[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", real_mode, 0x206, version)
    real_mode[0x211] = 0x01                               # LOADED_HIGH
    struct.pack_into("<I", real_mode, 0x214, 0x100000)    # code32_start
    struct.pack_into("<I", real_mode, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", real_mode, 0x230, 0x200000)    # kernel_alignment
    real_mode[0x234] = 1                                  # relocatable_kernel
    struct.pack_into("<H", real_mode, 0x236, xloadflags)
    struct.pack_into("<I", real_mode, 0x238, 2047)        # cmdline_size
    struct.pack_into("<II", real_mode, 0x248, payload_offset, payload_length)
    struct.pack_into("<Q", real_mode, 0x258, 0x1000000)   # pref_address
    struct.pack_into("<I", real_mode, 0x260, 0x2000000)   # init_size
    return bytes(real_mode) + protected_mode


def test_is_bzimage():
    assert is_bzimage(make_bzimage())
    assert not is_bzimage(b"\x7fELF" + bytes(0x300))
    assert not is_bzimage(make_bzimage()[:0x204])
    no_boot_flag = bytearray(make_bzimage())
    no_boot_flag[0x1FE] = 0
    assert not is_bzimage(bytes(no_boot_flag))


def test_header_fields():
    header = parse_bzimage(make_bzimage(), "bz").header
    assert header.setup_sects == 3
    assert header.version == 0x020F and header.protocol == "2.15"
    assert header.loadflags == 0x01
    assert header.xloadflags == 0x3
    assert header.code32_start == 0x100000
    assert header.initrd_addr_max == 0x7FFFFFFF
    assert header.kernel_alignment == 0x200000
    assert header.relocatable_kernel == 1
    assert header.cmdline_size == 2047
    assert (header.payload_offset, header.payload_length) == (PAYLOAD_OFFSET, PAYLOAD_LENGTH)
    assert header.pref_address == 0x1000000
    assert header.init_size == 0x2000000


def test_raw_header_runs_from_0x1f1_to_the_jump_target():
    data = make_bzimage()
    raw = parse_bzimage(data, "bz").header.raw
    assert raw == data[0x1F1:0x26C]
    # Copied into boot_params at 0x1f1, the magic lands at 0x202 again.
    assert raw[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"


def test_raw_header_is_clamped_where_boot_params_continues():
    data = make_bzimage(header_end=0x202 + 0xFF)          # claims to run to 0x301
    assert parse_bzimage(data, "bz").header.raw == data[0x1F1:0x290]


def test_short_header_reads_missing_fields_as_zero():
    # A header ending at 0x248 has no payload, pref_address or init_size.
    header = parse_bzimage(make_bzimage(header_end=0x248), "bz").header
    assert len(header.raw) == 0x248 - 0x1F1
    assert header.payload_length == header.pref_address == header.init_size == 0


def test_protected_mode_part_and_payload():
    image = parse_bzimage(make_bzimage(setup_sects=3), "bz")
    assert image.protected_mode == PROTECTED_MODE
    assert image.payload == b"PAYLOAD!"
    assert image.entry64_offset == ENTRY64_OFFSET == 0x200


def test_setup_sects_zero_means_four():
    image = parse_bzimage(make_bzimage(setup_sects=0), "bz")
    assert image.header.setup_sects == 4
    assert image.protected_mode == PROTECTED_MODE          # found after 5 sectors


def test_image_without_payload_says_so_when_asked():
    image = parse_bzimage(make_bzimage(payload_offset=0, payload_length=0), "bz")
    with pytest.raises(BootError, match="bz: the bzImage has no payload"):
        image.payload


# --- every way a file can fail to be a bootable bzImage; the message names it


def test_too_short():
    with pytest.raises(BootError, match=r"^vmlinuz: too short to be a bzImage \(100 bytes\)"):
        parse_bzimage(bytes(100), "vmlinuz")


def test_header_past_end_of_file():
    with pytest.raises(BootError, match="vmlinuz: too short: .*setup header runs to 0x26c"):
        parse_bzimage(make_bzimage()[:0x250], "vmlinuz")


def test_no_hdrs_magic():
    data = bytearray(make_bzimage())
    data[0x202:0x206] = b"HdrX"
    with pytest.raises(BootError, match="vmlinuz: not a bzImage"):
        parse_bzimage(bytes(data), "vmlinuz")


def test_protocol_too_old():
    with pytest.raises(BootError, match="vmlinuz: boot protocol 2.05 is too old: "
                                        "pylguest needs 2.06 or newer"):
        parse_bzimage(make_bzimage(version=0x0205), "vmlinuz")


def test_protocol_2_06_is_accepted_as_far_as_the_version_goes():
    # ... but 2.06 had no xloadflags (2.12), so there is no 64-bit entry.
    with pytest.raises(BootError, match="protocol 2.06.*XLF_KERNEL_64"):
        parse_bzimage(make_bzimage(version=0x0206, xloadflags=0x3), "vmlinuz")
    assert parse_setup_header(make_bzimage(version=0x0206), "v").xloadflags == 0


def test_no_64_bit_entry():
    with pytest.raises(BootError, match="vmlinuz: .*no 64-bit entry point.*XLF_KERNEL_64"):
        parse_bzimage(make_bzimage(xloadflags=0x2), "vmlinuz")


def test_setup_sects_past_end_of_file():
    data = make_bzimage(setup_sects=3)
    with pytest.raises(BootError, match="vmlinuz: setup_sects=3 .*past the end of the file"):
        parse_bzimage(data[:4 * 512], "vmlinuz")


@pytest.mark.parametrize("offset, length", [(0x400, 0x10), (0xFFFFFFFF, 1), (0, 0x409)])
def test_payload_outside_the_image(offset, length):
    with pytest.raises(BootError, match="vmlinuz: the payload .*outside the protected-mode"):
        parse_bzimage(make_bzimage(payload_offset=offset, payload_length=length), "vmlinuz")


def test_payload_filling_the_protected_mode_part_exactly_is_fine():
    data = make_bzimage(payload_offset=0, payload_length=len(PROTECTED_MODE))
    assert parse_bzimage(data, "bz").payload == PROTECTED_MODE


def test_bzimage_is_immutable():
    image = parse_bzimage(make_bzimage(), "bz")
    assert isinstance(image, BzImage)
    with pytest.raises(AttributeError):
        image.protected_mode = b""
