"""Reading ELF64 executables: a synthetic one built field by field, and a
real one compiled here with gcc and checked against readelf."""

import re
import shutil
import struct
import subprocess

import pytest

from pylguest.boot.elf import ElfImage, Segment, is_elf, parse_elf64
from pylguest.errors import BootError

PT_LOAD, PT_NOTE = 1, 4
EHDR_SIZE, PHDR_SIZE = 64, 56


def make_elf(phdrs, body=b"", entry=0x100000, ei_class=2, ei_data=1, machine=62,
             phoff=EHDR_SIZE, phentsize=PHDR_SIZE, phnum=None):
    """An ELF64 file: header, program headers at `phoff`, then `body`.

    phdrs: (p_type, p_offset, p_paddr, p_filesz, p_memsz) tuples; offsets
    count from the start of the file.
    """
    phnum = len(phdrs) if phnum is None else phnum
    ident = b"\x7fELF" + bytes([ei_class, ei_data, 1]) + bytes(9)
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, machine, 1, entry, phoff, 0, 0,
                         EHDR_SIZE, phentsize, phnum, 64, 0, 0)
    table = b"".join(struct.pack("<IIQQQQQQ", p_type, 5, offset, paddr | 0xFFFFFFFF80000000,
                                 paddr, filesz, memsz, 0x1000)
                     for p_type, offset, paddr, filesz, memsz in phdrs)
    return header + table + body


BODY_AT = EHDR_SIZE + 3 * PHDR_SIZE
TEXT = b"\xf4" * 0x40                     # hlt
DATA = b"DATA" * 4


def sample_elf():
    """Text at 1 MiB, a note to ignore, data with .bss after it at 2 MiB."""
    return make_elf([(PT_LOAD, BODY_AT, 0x100000, len(TEXT), len(TEXT)),
                     (PT_NOTE, BODY_AT, 0, 4, 4),
                     (PT_LOAD, BODY_AT + len(TEXT), 0x200000, len(DATA), 0x1000)],
                    body=TEXT + DATA, entry=0x100010)


def test_is_elf():
    assert is_elf(sample_elf())
    assert not is_elf(b"MZ" + bytes(100))
    assert not is_elf(b"")


def test_synthetic_elf():
    image = parse_elf64(sample_elf(), "guest.elf")
    assert image == ElfImage(entry=0x100010, segments=(
        Segment(paddr=0x100000, data=TEXT, memsz=len(TEXT)),
        Segment(paddr=0x200000, data=DATA, memsz=0x1000),    # p_paddr, not p_vaddr
    ))


def test_empty_pt_load_is_skipped():
    data = make_elf([(PT_LOAD, 0, 0, 0, 0), (PT_LOAD, 0, 0x100000, 0x40, 0x40)])
    assert [s.paddr for s in parse_elf64(data, "g").segments] == [0x100000]


def test_larger_program_header_entries_are_stepped_over():
    phdr = struct.pack("<IIQQQQQQ", PT_LOAD, 5, 0, 0, 0x100000, 0x40, 0x40, 0) + bytes(8)
    data = make_elf([], phentsize=PHDR_SIZE + 8, phnum=2) + phdr + phdr
    assert len(parse_elf64(data, "g").segments) == 2


# --- every check: a BootError naming the file


def expect(data, message):
    with pytest.raises(BootError, match="^guest.elf: " + message):
        parse_elf64(data, "guest.elf")


def test_not_elf():
    expect(b"\x7fELG" + bytes(100), "not an ELF file")


def test_header_cut_short():
    expect(sample_elf()[:40], "too short for an ELF64 header")


def test_not_64_bit():
    expect(make_elf([], ei_class=1), r"not a 64-bit ELF \(ELF class 1")


def test_not_little_endian():
    expect(make_elf([], ei_data=2), "not a little-endian ELF")


def test_not_x86_64():
    expect(make_elf([(PT_LOAD, 0, 0x100000, 0, 0x10)], machine=183),
           r"an ELF for machine 183, not x86-64 \(62\)")


def test_no_pt_load():
    expect(make_elf([(PT_NOTE, 0, 0, 0, 0)]), "the ELF has no PT_LOAD segment")
    expect(make_elf([]), "the ELF has no PT_LOAD segment")


def test_program_headers_outside_the_file():
    expect(make_elf([], phnum=3), r"the program headers \(offset 0x40, 3 of 56 bytes\) "
                                  "lie outside the file")
    expect(make_elf([], phoff=1 << 63, phnum=1), "the program headers .* lie outside")


def test_program_header_entries_too_small():
    expect(make_elf([], phentsize=32, phnum=1), "program header entries of 32 bytes")


@pytest.mark.parametrize("offset, filesz", [(BODY_AT, 0x1000), ((1 << 64) - 8, 16)])
def test_segment_outside_the_file(offset, filesz):
    expect(make_elf([(PT_LOAD, offset, 0x100000, filesz, filesz)], body=TEXT),
           "PT_LOAD segment 0: its file bytes .* lie outside the file")


def test_filesz_larger_than_memsz():
    expect(make_elf([(PT_LOAD, 0, 0x100000, 0x40, 0x20)]),
           "PT_LOAD segment 0: p_filesz 0x40 is larger than p_memsz 0x20")


@pytest.mark.parametrize("memsz", [0x1001, 0x2000, (1 << 64) - 1])
def test_segment_wraps_around_the_address_space(memsz):
    expect(make_elf([(PT_LOAD, 0, 0xFFFFFFFFFFFFF000, 0, memsz)]),
           "PT_LOAD segment 0: .* runs past the end of the 64-bit address space")


def test_segment_ending_at_the_top_of_the_address_space():
    # Ending exactly at 2**64 is still inside; one byte more is not.
    image = parse_elf64(make_elf([(PT_LOAD, 0, 0xFFFFFFFFFFFFF000, 0, 0x1000)]), "g")
    assert image.segments == (Segment(paddr=0xFFFFFFFFFFFFF000, data=b"", memsz=0x1000),)
    with pytest.raises(BootError, match="runs past the end of the 64-bit address space"):
        parse_elf64(make_elf([(PT_LOAD, 0, 0xFFFFFFFFFFFFF000, 0, 0x1001)]), "g")


# --- a real executable, the kind of file our teaching guests are

FREESTANDING_C = r"""
static const char message[] = "hello from a tiny guest";
unsigned long scratch[1024];                        /* .bss: memsz > filesz */
unsigned long counter = 42;                          /* .data */

void _start(void)
{
    for (unsigned i = 0; message[i]; i++)
        scratch[i] = message[i] + counter;
    for (;;)
        __asm__ volatile("hlt");
}
"""


@pytest.fixture(scope="module")
def real_elf(tmp_path_factory):
    for tool in ("gcc", "readelf"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed: cannot build a real ELF to parse")
    workdir = tmp_path_factory.mktemp("elf")
    source, binary = workdir / "tiny.c", workdir / "tiny.elf"
    source.write_text(FREESTANDING_C)
    subprocess.run(["gcc", "-O1", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib",
                    "-static", "-Wl,-Ttext=0x100000", "-Wl,--build-id=none",
                    "-o", str(binary), str(source)], check=True)
    return binary


def readelf_loads(path):
    """(entry, [(offset, paddr, filesz, memsz)]) as binutils sees the file."""
    header = subprocess.run(["readelf", "-hW", str(path)], capture_output=True, text=True,
                            check=True).stdout
    entry = int(re.search(r"Entry point address:\s+0x([0-9a-f]+)", header).group(1), 16)
    program = subprocess.run(["readelf", "-lW", str(path)], capture_output=True, text=True,
                             check=True).stdout
    loads = [tuple(int(field, 16) for field in (m[0], m[2], m[3], m[4]))
             for m in re.findall(r"^\s*LOAD\s+(0x\w+)\s+(0x\w+)\s+(0x\w+)\s+(0x\w+)\s+(0x\w+)",
                                 program, re.M)]
    return entry, loads


def test_real_elf_matches_readelf(real_elf):
    data = real_elf.read_bytes()
    entry, loads = readelf_loads(real_elf)
    image = parse_elf64(data, "tiny.elf")
    assert image.entry == entry
    assert [(s.paddr, len(s.data), s.memsz) for s in image.segments] == \
        [(paddr, filesz, memsz) for _, paddr, filesz, memsz in loads if memsz]
    for segment, (offset, _, filesz, _) in zip(image.segments, loads):
        assert segment.data == data[offset:offset + filesz]


def test_real_elf_is_where_we_linked_it(real_elf):
    image = parse_elf64(real_elf.read_bytes(), "tiny.elf")
    text = next(s for s in image.segments if s.paddr <= image.entry < s.paddr + s.memsz)
    assert 0x100000 <= image.entry < 0x100000 + 0x1000
    assert any(s.memsz > len(s.data) for s in image.segments)      # the .bss
    assert b"hello from a tiny guest" in b"".join(s.data for s in image.segments)
    assert text.data                                                # code, not zeros
