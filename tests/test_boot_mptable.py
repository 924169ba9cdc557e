"""The MP table, read back by a parser written from the MP spec 1.4, chapter 4."""

import struct
from collections import namedtuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pylguest.boot.mptable import MPTABLE_ADDR, MPTABLE_MAX_CPUS, build_mptable

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}   # spec table 4-3


FloatingPointer = namedtuple("FloatingPointer", "sig physptr length rev checksum feature1")
Header = namedtuple("Header", "sig length rev checksum oem product oemptr oemsize count lapic "
                              "extlen")


def parse(blob, base=MPTABLE_ADDR):
    """(floating pointer, header, offset of the header, [(type, entry bytes)]),
    as Linux's mpparse.c finds them: the pointer first, then where it points."""
    fp = FloatingPointer(*struct.unpack_from("<4sIBBBB", blob, 0))
    off = fp.physptr - base
    header = Header(*struct.unpack_from("<4sHBB8s12sIHHIH", blob, off))
    entries, pos = [], off + 44
    while pos < off + header.length:
        kind = blob[pos]
        entries.append((kind, blob[pos:pos + ENTRY_SIZES[kind]]))
        pos += ENTRY_SIZES[kind]
    assert pos == off + header.length
    return fp, header, off, entries


def of_type(entries, kind):
    return [e for t, e in entries if t == kind]


def test_floating_pointer():
    blob = build_mptable()
    fp, header, off, _ = parse(blob)
    assert (fp.sig, fp.length, fp.rev) == (b"_MP_", 1, 4)
    assert fp.feature1 == 0                           # 0: a config table is present
    assert sum(blob[:16]) % 256 == 0
    assert fp.physptr == MPTABLE_ADDR + 16 == MPTABLE_ADDR + off
    assert header.sig == b"PCMP"


def test_header():
    blob = build_mptable()
    _, header, off, entries = parse(blob)
    assert sum(blob[off:off + header.length]) % 256 == 0
    assert header.rev == 4 and header.lapic == 0xFEE00000
    assert header.oem == b"PYLGUEST" and len(header.product) == 12
    assert (header.oemptr, header.oemsize, header.extlen) == (0, 0, 0)
    assert header.count == len(entries)
    assert off + header.length == len(blob)


@pytest.mark.parametrize("ncpus", [1, 2, MPTABLE_MAX_CPUS])
def test_processors_bus_and_ioapic(ncpus):
    blob = build_mptable(ncpus)
    assert MPTABLE_ADDR + len(blob) <= 0xA0000
    _, _, _, entries = parse(blob)
    cpus = [struct.unpack("<BBBB", e[:4]) for e in of_type(entries, 0)]
    assert [apic_id for _, apic_id, _, _ in cpus] == list(range(ncpus))
    assert all(flags & 1 for *_, flags in cpus)                          # enabled
    assert [flags & 2 for *_, flags in cpus] == [2] + [0] * (ncpus - 1)  # cpu 0 is the BSP

    assert of_type(entries, 1) == [b"\x01\x00ISA   "]
    [ioapic] = of_type(entries, 2)
    _, ioapic_id, _, flags, addr = struct.unpack("<BBBBI", ioapic)
    assert flags & 1 and addr == 0xFEC00000
    assert ioapic_id not in range(ncpus)


def test_isa_irqs_go_to_the_same_ioapic_pin():
    _, _, _, entries = parse(build_mptable(2))
    ioapic_id = of_type(entries, 2)[0][1]
    irqs = [struct.unpack("<BBHBBBB", e) for e in of_type(entries, 3)]
    assert irqs == [(3, 0, 0, 0, n, ioapic_id, n) for n in range(16)]


def test_local_interrupts():
    _, _, _, entries = parse(build_mptable())
    lints = [struct.unpack("<BBHBBBB", e) for e in of_type(entries, 4)]
    extint, nmi = 3, 1
    assert lints == [(4, extint, 0, 0, 0, 0xFF, 0), (4, nmi, 0, 0, 0, 0xFF, 1)]


def test_too_many_cpus():
    with pytest.raises(ValueError):
        build_mptable(MPTABLE_MAX_CPUS + 1)
    with pytest.raises(ValueError):
        build_mptable(0)


def test_pointer_follows_base():
    fp, header, _, _ = parse(build_mptable(base=0xF0000), base=0xF0000)
    assert fp.physptr == 0xF0010 and header.sig == b"PCMP"


@given(ncpus=st.integers(1, MPTABLE_MAX_CPUS), where=st.integers(0, 1023),
       delta=st.integers(1, 255))
def test_any_corrupted_byte_breaks_a_checksum(ncpus, where, delta):
    blob = bytearray(build_mptable(ncpus))
    where %= len(blob)
    blob[where] = (blob[where] + delta) % 256
    assert sum(blob[:16]) % 256 != 0 or sum(blob[16:]) % 256 != 0
