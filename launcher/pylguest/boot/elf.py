"""Reading an ELF64 executable: what to load where, and where to start.

An ELF file (the System V ABI, "gABI", with the x86-64 supplement) starts
with a 64-byte header; the fields a loader needs are

    0x00  e_ident    "\\x7fELF", class (2 = 64-bit), data (1 = little-endian)
    0x12  e_machine  62 = x86-64
    0x18  e_entry    where execution starts
    0x20  e_phoff    where the program header table is, in the file
    0x36  e_phentsize, 0x38 e_phnum: its entry size and count

Each 56-byte program header of type PT_LOAD says "copy p_filesz bytes from
p_offset in the file to address p_paddr, and zero the rest up to p_memsz"
(the rest is .bss).  A loader ignores sections entirely.

A vmlinux is linked to run at a high virtual address, but its p_paddr are
where it must sit in physical memory, and its e_entry (startup_64) is a
physical address too: the kernel builds its own page tables before it
uses virtual ones.  With no bootloader in between, we load physical.

Every offset and size comes from the file, so every one is checked before
use: a table or segment must lie inside the file, and a segment must not
wrap around the top of the address space.
"""

import struct
from typing import NamedTuple

from pylguest.errors import BootError

ELF_MAGIC = b"\x7fELF"
EI_CLASS = 4
EI_DATA = 5
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1

ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")    # e_ident .. e_shstrndx: 64 bytes
ELF64_PHDR = struct.Struct("<IIQQQQQQ")              # p_type .. p_align: 56 bytes
ADDRESS_SPACE = 1 << 64


class Segment(NamedTuple):
    """One PT_LOAD: `data` goes to physical `paddr`, zeros up to `memsz`."""
    paddr: int
    data: bytes
    memsz: int


class ElfImage(NamedTuple):
    entry: int                      # e_entry: the first instruction (physical here)
    segments: tuple[Segment, ...]   # the PT_LOADs, in file order


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def _check_identity(data: bytes, name: str) -> None:
    """Is this an x86-64 ELF64 in little-endian: something we can run?"""
    if not is_elf(data):
        raise BootError(f"{name}: not an ELF file")
    if len(data) < ELF64_HEADER.size:
        raise BootError(f"{name}: too short for an ELF64 header ({len(data)} bytes)")
    if data[EI_CLASS] != ELFCLASS64:
        raise BootError(f"{name}: not a 64-bit ELF (ELF class {data[EI_CLASS]}, "
                        f"64-bit is {ELFCLASS64})")
    if data[EI_DATA] != ELFDATA2LSB:
        raise BootError(f"{name}: not a little-endian ELF (data encoding {data[EI_DATA]})")
    machine = ELF64_HEADER.unpack_from(data, 0)[2]
    if machine != EM_X86_64:
        raise BootError(f"{name}: an ELF for machine {machine}, not x86-64 ({EM_X86_64})")


def _program_headers(data: bytes, name: str):
    """Yield the program headers as tuples, after checking the table fits."""
    (_, _, _, _, _, phoff, _, _, _, phentsize, phnum,
     _, _, _) = ELF64_HEADER.unpack_from(data, 0)
    # Entries may be larger than the structure we know (future fields),
    # never smaller.
    if phnum and phentsize < ELF64_PHDR.size:
        raise BootError(f"{name}: program header entries of {phentsize} bytes, "
                        f"ELF64 needs {ELF64_PHDR.size}")
    if phoff + phnum * phentsize > len(data):
        raise BootError(f"{name}: the program headers (offset 0x{phoff:x}, {phnum} of "
                        f"{phentsize} bytes) lie outside the file ({len(data)} bytes)")
    for i in range(phnum):
        yield i, ELF64_PHDR.unpack_from(data, phoff + i * phentsize)


def _segment(data: bytes, name: str, index: int, phdr) -> Segment:
    _, _, offset, _, paddr, filesz, memsz, _ = phdr
    where = f"{name}: PT_LOAD segment {index}"
    if offset + filesz > len(data):
        raise BootError(f"{where}: its file bytes 0x{offset:x}-0x{offset + filesz:x} lie "
                        f"outside the file ({len(data)} bytes)")
    if filesz > memsz:
        raise BootError(f"{where}: p_filesz 0x{filesz:x} is larger than p_memsz 0x{memsz:x}")
    if paddr + memsz > ADDRESS_SPACE:
        raise BootError(f"{where}: 0x{paddr:x} + 0x{memsz:x} runs past the end of the "
                        "64-bit address space")
    return Segment(paddr=paddr, data=data[offset:offset + filesz], memsz=memsz)


def parse_elf64(data: bytes, name: str) -> ElfImage:
    """The entry point and loadable segments of an x86-64 ELF64 executable."""
    _check_identity(data, name)
    entry = ELF64_HEADER.unpack_from(data, 0)[4]
    segments = tuple(_segment(data, name, i, phdr)
                     for i, phdr in _program_headers(data, name)
                     # An empty PT_LOAD loads nothing; skipping it spares
                     # the loader a pointless range check at address 0.
                     if phdr[0] == PT_LOAD and phdr[6] > 0)
    if not segments:
        raise BootError(f"{name}: the ELF has no PT_LOAD segment: nothing to load")
    return ElfImage(entry=entry, segments=segments)
