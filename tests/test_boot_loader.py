"""The loader: where a kernel, its initrd and its setup header end up."""

import gzip
import struct

import pytest

from conftest import guest_path
from test_boot_bzimage import make_bzimage
from pylguest.boot import loader
from pylguest.errors import BootError
from pylguest.memory import GuestMemory, plan_regions

MiB = 1 << 20
RAM = 64 * MiB


@pytest.fixture
def memory():
    mem = GuestMemory(plan_regions(RAM, 4096))
    yield mem
    mem.close()


def tiny_elf(paddr=0x200000, entry=0x200010, code=b"\xf4" * 32, memsz=64):
    """An ELF64 x86-64 executable with one PT_LOAD, built by hand."""
    ehdr = struct.pack("<4sBBBB8xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 2, 62, 1,
                       entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, paddr, paddr, len(code), memsz, 0x1000)
    return (ehdr + phdr).ljust(0x1000, b"\0") + code


def test_bzimage_guest_decompress_goes_to_1m_and_enters_at_0x200(memory):
    image = make_bzimage()
    kernel = loader.load_kernel(memory, RAM, image, "bz", host_decompress=False)
    assert kernel.entry == 0x100200
    protected = image[(3 + 1) * 512:]
    assert memory.read(0x100000, len(protected)) == protected
    assert kernel.end == 0x100000 + 0x2000000        # init_size reserved
    assert kernel.setup_header[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"
    assert kernel.linux


def test_bzimage_host_decompress_boots_the_payload_elf(memory):
    vmlinux = tiny_elf()
    payload = gzip.compress(vmlinux)
    protected = b"\x90" * 0x100 + payload
    image = make_bzimage(payload_offset=0x100, payload_length=len(payload),
                         protected_mode=protected)
    kernel = loader.load_kernel(memory, RAM, image, "bz", host_decompress=True)
    assert kernel.entry == 0x200010
    assert memory.read(0x200000, 32) == b"\xf4" * 32
    assert memory.read(0x200020, 32) == bytes(32)      # memsz beyond filesz is zeroed
    assert "host-decompressed (gzip)" in kernel.kind
    assert kernel.setup_header == image[0x1F1:0x26C]


def test_elf_segment_below_1m_or_past_ram_is_refused(memory):
    with pytest.raises(BootError, match="does not fit"):
        loader.load_kernel(memory, RAM, tiny_elf(paddr=0x8000, entry=0x8000), "low", False)
    with pytest.raises(BootError, match="does not fit"):
        loader.load_kernel(memory, RAM, tiny_elf(paddr=RAM - 16, entry=RAM - 16), "high", False)


def test_teaching_guest_loads_at_1m(memory):
    data = guest_path("hello").read_bytes()
    kernel = loader.load_kernel(memory, RAM, data, "hello", False)
    assert kernel.entry == 0x100000 and not kernel.linux
    assert loader.cmdline_limit(kernel) == 2047


def test_initrd_goes_high_and_page_aligned(memory):
    kernel = loader.load_kernel(memory, RAM, tiny_elf(), "k", False)
    addr, size = loader.load_initrd(memory, RAM, b"I" * 5000, "initrd", kernel)
    assert size == 5000 and addr % 4096 == 0
    assert addr + size <= RAM and addr + size > RAM - 8192
    assert memory.read(addr, 5000) == b"I" * 5000


def test_initrd_respects_initrd_addr_max(memory):
    image = bytearray(make_bzimage())
    struct.pack_into("<I", image, 0x22C, 0x01FFFFFF)        # initrd_addr_max: 32 MiB
    struct.pack_into("<I", image, 0x260, 0x100000)          # a small init_size
    kernel = loader.load_kernel(memory, RAM, bytes(image), "bz", False)
    addr, size = loader.load_initrd(memory, RAM, b"x" * 4096, "initrd", kernel)
    assert addr + size <= 0x02000000


def test_initrd_too_big_is_a_clear_error(memory):
    kernel = loader.load_kernel(memory, RAM, tiny_elf(), "k", False)
    with pytest.raises(BootError, match="does not fit"):
        loader.load_initrd(memory, RAM, bytes(RAM), "huge.cpio", kernel)
