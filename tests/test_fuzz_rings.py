"""The ring fuzzer: random and mutated virtqueues against every device.

Hypothesis plays the guest's driver: it builds rings, chains and indirect
tables in guest memory -- mostly well-formed, then mutated (flag bits,
`next`, lengths, addresses at region edges and in the 3-4 GiB hole,
avail.idx jumps, heads out of range) -- and kicks one queue of one device,
block, console (transmit, receive), net (transmit, receive) or rng, the
way the bus does (service() under the device's lock).  Every case is
checked against tests/virtio_model.py, an independent implementation of
the legacy split-ring rules and of pylguest's devices:

    - the outcome: every pending chain served, or the device broken at
      the same chain (its report naming device and queue), with the same
      entries consumed;
    - every byte of guest memory: the buffers written, the used elements
      and used.idx (the notification fields excepted: for those the
      lost-wakeup rule is checked instead);
    - the interrupts raised;
    - what the device did outside: the image file, the console's output
      (checked as it streams: a chain may be 4 GiB), the frames sent and
      those still waiting in the socket.

A case whose device writes land on the rings themselves, or whose reads
cover a used ring, depends on when a device touches those bytes, which
the model does not predict: there only the weaker invariants are checked
(check_loosely), and the case is counted as "timing-dependent".

Every case must finish within CASE_SECONDS, and no test may grow the
process's peak RSS by RSS_GROWTH_LIMIT (tests/fuzz_support.py).

    python3 -m pytest -q -m fuzz tests/test_fuzz_rings.py                  # quick
    PYLGUEST_FUZZ=long python3 -m pytest -q -m fuzz tests/test_fuzz_rings.py -p no:timeout
"""

import functools
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import virtio_model as model
from fuzz_support import CASE_SECONDS, RSS_GROWTH_LIMIT, fuzz_test, peak_rss, record

from pylguest.devices.block import BlockDevice
from pylguest.devices.console import ConsoleDevice
from pylguest.devices.net import NetDevice
from pylguest.devices.rng import RngDevice
from pylguest.memory import GuestMemory, Region
from pylguest.virtio.device import DeviceContext
from pylguest.virtio.queue import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from ring_builder import DESC_DTYPE, RingBuilder, before_enabling_kicks

pytestmark = [pytest.mark.fuzz, pytest.mark.usefixtures("peak_rss_bounded")]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
U16 = 1 << 16
NEXT, WRITE, INDIRECT = model.DESC_NEXT, model.DESC_WRITE, model.DESC_INDIRECT

# --- Guest memory: three regions, none adjacent, around the 3-4 GiB hole. ----------
#
# LOW holds every device's rings (at pfns 1..6), indirect tables (pages
# 7..9) and, from 0xA000, buffers.  BELOW_HOLE's lower half is where a
# huge indirect table goes (4096 entries), its upper half buffers.  HIGH,
# 1 MiB at 4 GiB, takes large buffers, and is what each entry of a huge
# table covers: 4095 of them make a chain of almost 4 GiB.

LOW = Region(0, 64 * KiB, 0)
BELOW_HOLE = Region(3 * GiB - 128 * KiB, 128 * KiB, 64 * KiB)
HIGH = Region(4 * GiB, 1 * MiB, 192 * KiB)
REGIONS = (LOW, BELOW_HOLE, HIGH)
DATA_AREAS = ((0xA000, LOW.end), (BELOW_HOLE.gpa + 64 * KiB, BELOW_HOLE.end),
              (HIGH.gpa, HIGH.end))
TABLE_AREA = (0x7000, 0xA000)
HUGE_TABLE, HUGE_ENTRIES = BELOW_HOLE.gpa, 4096
RING_PFNS = {"block0": (1,), "console0": (1, 3), "net0": (1, 4), "rng0": (1,)}

# Addresses a mutation or an "edge" placement moves a buffer to: region
# ends (just inside, and one byte across), the hole, the top of the 64-bit
# space.  Each is a function of the buffer's length.
EDGES = {
    "end of LOW": lambda n: LOW.end - n,
    "across the end of LOW": lambda n: LOW.end - n + 1,
    "start of LOW": lambda n: 0,
    "end of BELOW_HOLE": lambda n: BELOW_HOLE.end - n,
    "across 3 GiB": lambda n: BELOW_HOLE.end - n + 1,
    "across the start of BELOW_HOLE": lambda n: BELOW_HOLE.gpa - 1,
    "in the hole": lambda n: 3 * GiB + 4096,
    "across 4 GiB": lambda n: HIGH.gpa - 1,
    "start of HIGH": lambda n: HIGH.gpa,
    "end of HIGH": lambda n: HIGH.end - n,
    "across the end of HIGH": lambda n: HIGH.end - n + 1,
    "up to 2^64": lambda n: (1 << 64) - n,
    "last byte before 2^64": lambda n: (1 << 64) - 1,
}
ADDRESSES = [0, LOW.end - 1, LOW.end, BELOW_HOLE.gpa - 1, 3 * GiB - 1, 3 * GiB,
             4 * GiB - 1, HIGH.gpa, HIGH.end - 16, HIGH.end, (1 << 64) - 16, (1 << 64) - 1]

# Initial guest memory, console input and frames all come from one pool of
# pseudo-random bytes (fixed seed: a failing case replays exactly).
NOISE = np.random.default_rng(20240601).integers(0, 256, 4 * MiB, dtype=np.uint8)
NOISE_OFFSETS = st.integers(0, 2 * MiB)


def noise(offset, length):
    return NOISE[offset:offset + length].tobytes()


# --- What a case is. ---------------------------------------------------------------

FRESH = ("fresh",)


@dataclass(frozen=True)
class Buf:
    """One buffer of a chain; `place` says where: FRESH (a new address in a
    data area), ("reuse", k) (an address used before in this case), or
    ("edge", name) (EDGES[name])."""
    length: int
    writable: bool
    place: tuple = FRESH


@dataclass(frozen=True)
class ChainSpec:
    """One chain as the driver builds it (before any mutation)."""
    bufs: tuple
    header: bytes = b""          # written over the first readable bytes
    indirect_from: int = None    # bufs[indirect_from:] go in an indirect table
    indirect_write: bool = False # the WRITE flag on the indirect descriptor: ignored
    huge: tuple = None           # (count, length, writable): entries through HIGH, in the table
    nested: bool = False         # the table's last buffer behind an indirect table of its own


@dataclass(frozen=True)
class Mutation:
    """`field` of the `target`-th descriptor written in the round ("flags"
    is XORed, "addr", "len", "next" set, "loop" points it back at its
    chain's first descriptor); or "avail_idx" (set to the round's first
    entry plus `value`: num is as far ahead as avail.idx may be, num + 1
    too far), or "head" (set in the `target`-th ring entry the round
    published)."""
    field: str
    target: int
    value: int


@dataclass(frozen=True)
class Round:
    """The driver publishes `chains`, applies `mutations`, sets avail.flags
    and used_event, and kicks (with `data`: console input, or frames); it
    publishes `late` while the device works (see Race)."""
    chains: tuple
    late: tuple = ()
    mutations: tuple = ()
    no_interrupt: bool = False
    used_event: int = 0          # used_event = case.start + this
    data: tuple = ()             # (offset, length) spans of NOISE


@dataclass(frozen=True)
class Case:
    event_idx: bool
    indirect: bool
    start: int                   # avail.idx, last_avail_idx and used_idx to begin with
    fill: int                    # guest memory (and the image) start as NOISE from here
    rounds: tuple
    read_only: bool = False      # block: the image is read-only
    image_tail: int = 0          # block: bytes after the image's last whole sector


def describe(case):
    """A case in a few words, for the slowest-case line of the summary."""
    chains = [c for r in case.rounds for c in r.chains + r.late]
    count, length, _ = max((c.huge for c in chains if c.huge), default=(0, 0, False))
    return (f"{len(case.rounds)} rounds, {len(chains)} chains"
            + (f", an indirect table of {count} {length}-byte buffers" if count else ""))


# --- Strategies. ---------------------------------------------------------------------
#
# Generation speed matters (the long profile runs 100,000 cases), so every
# strategy object is built once, here, and a case is drawn by plain
# functions taking Hypothesis's `draw`: a couple of hundred draws, and no
# strategy built on the fly.  Each choice shrinks towards its first, most
# ordinary branch, so a failing case shrinks towards a well-formed one.

PERCENT = st.integers(0, 99)
U32 = st.integers(0, 2**32 - 1)


def chance(draw, percent):
    """True `percent` times in a hundred."""
    return draw(PERCENT) >= 100 - percent


def weighted(*choices):
    """A strategy: one of `choices`, [(weight, strategy)], picked by weight."""
    total = sum(weight for weight, _ in choices)

    @st.composite
    def pick(draw):
        roll = draw(st.integers(0, total - 1))
        for weight, strategy in choices:
            if roll < weight:
                return draw(strategy)
            roll -= weight
    return pick()


EDGE_NAMES = st.sampled_from(sorted(EDGES))


def draw_place(draw):
    """Where a buffer goes (Buf.place)."""
    roll = draw(PERCENT)
    if roll < 96:
        return FRESH
    if roll < 98:
        return ("reuse", draw(st.integers(0, 15)))
    return ("edge", draw(EDGE_NAMES))


def draw_split(draw, total, most=3):
    """`total` bytes as 1 to `most` buffer lengths (some may be zero)."""
    cuts = sorted(draw(st.integers(0, total)) for _ in range(draw(st.integers(0, most - 1))))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


SMALL = st.integers(0, 64)


def draw_ignored(draw):
    """Now and then some buffers of the direction a device ignores."""
    return draw_split(draw, draw(SMALL)) if chance(draw, 10) else []


# A payload is a function of `draw` giving one request's (readable lengths,
# writable lengths, header bytes).

def reads(lengths):
    return lambda draw: (draw_split(draw, draw(lengths)), draw_ignored(draw), b"")


def writes(lengths):
    return lambda draw: (draw_ignored(draw), draw_split(draw, draw(lengths)), b"")


SECTORS = 64                    # the block image: 64 sectors, 32 KiB
BLK_IN, BLK_OUT, BLK_FLUSH, BLK_GET_ID = (model.BLK_T_IN, model.BLK_T_OUT,
                                          model.BLK_T_FLUSH, model.BLK_T_GET_ID)
BLOCK_TYPES = weighted((3, st.just(BLK_IN)), (3, st.just(BLK_OUT)), (1, st.just(BLK_FLUSH)),
                       (1, st.just(BLK_GET_ID)), (1, U32))
BLOCK_SECTORS = weighted((6, st.integers(0, SECTORS)), (2, st.integers(SECTORS - 4, SECTORS + 1)),
                         (1, st.integers(0, 2**64 - 1)))


def block_payload(draw):
    """A request: header, data (a whole number of sectors, now and then
    not), status byte; now and then no header, or no status byte."""
    type_, sector = draw(BLOCK_TYPES), draw(BLOCK_SECTORS)
    length = draw(st.integers(0, 4)) * model.SECTOR
    if chance(draw, 10):
        length += draw(st.integers(1, 511))
    readable = 16 + (length if type_ == BLK_OUT else 0)
    room = (length if type_ == BLK_IN else
            draw(st.integers(0, 40)) if type_ == BLK_GET_ID else 0)
    if chance(draw, 1):
        readable = draw(st.integers(0, 15))
    writable = 0 if chance(draw, 1) else room + 1
    header = struct.pack("<IIQ", type_, draw(U32), sector)
    return draw_split(draw, readable), draw_split(draw, writable), header


MAX_FRAME = model.MAX_FRAME
CONSOLE_TX = reads(weighted((20, st.integers(0, 300)), (1, st.integers(60_000, 140_000))))
CONSOLE_RX = writes(weighted((20, st.integers(0, 200)), (1, st.integers(0, 9000))))
AROUND_MAX_FRAME = st.sampled_from([MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1])
NET_TX = reads(weighted((60, st.integers(10, 1600)), (1, st.integers(0, 12)), (5, AROUND_MAX_FRAME)))
NET_RX = writes(weighted((60, st.integers(10, 2000)), (3, st.integers(0, 12)), (1, AROUND_MAX_FRAME)))
RNG = writes(weighted((16, st.integers(0, 300)), (1, st.sampled_from([65_535, 65_536, 65_537])),
                      (1, st.integers(0, 300_000))))


# A huge table: thousands of tiny buffers (past IOV_MAX, 1024, where the
# devices change how they move data), or up to 4095 entries of 1 MiB.
HUGE_COUNTS = st.sampled_from([1024, 1025, 2048, HUGE_ENTRIES - 1]) | st.integers(1, HUGE_ENTRIES - 1)
HUGE_LENGTHS = weighted((1, st.just(MiB)), (2, st.sampled_from([1, 16, 64]) | st.integers(1, 64)))


def draw_chain(draw, payload, indirect, huge_max):
    """One chain: mostly direct, or partly in an indirect table when the
    feature is negotiated (rarely when it is not); rarely out of order, or
    with a huge table (of at most `huge_max` entries)."""
    readable, writable, header = payload(draw)
    bufs = ([Buf(n, False, draw_place(draw)) for n in readable]
            + [Buf(n, True, draw_place(draw)) for n in writable]) or [Buf(0, False)]
    if chance(draw, 1):
        bufs = bufs[-1:] + bufs[:-1]        # the last (writable) buffer first
    if not chance(draw, 40 if indirect else 1):
        return ChainSpec(tuple(bufs), header)
    huge = None
    if chance(draw, 3):
        huge = (min(draw(HUGE_COUNTS), huge_max), draw(HUGE_LENGTHS), draw(st.booleans()))
    return ChainSpec(tuple(bufs), header, draw(st.integers(0, len(bufs) - 1)),
                     draw(st.booleans()), huge, nested=chance(draw, 3))


@functools.lru_cache
def mutations(num):
    targets = st.integers(0, 255)

    def mutation(field, values):
        return st.builds(Mutation, st.just(field), targets, values)
    return st.one_of(
        mutation("flags", st.sampled_from([NEXT, WRITE, INDIRECT, NEXT | INDIRECT])
                 | st.integers(0, 0xFFFF)),
        mutation("next", st.sampled_from([0, 1, num - 1, num, 0xFFFF]) | st.integers(0, 0xFFFF)),
        mutation("loop", st.just(0)),
        mutation("len", st.sampled_from([0, 1, 16, 17, 64 * KiB, 128 * KiB, MiB,
                                         0xFFFF_FFF0, 0xFFFF_FFFF]) | U32),
        mutation("addr", st.sampled_from(ADDRESSES) | st.integers(0, 2**64 - 1)),
        mutation("avail_idx", weighted((3, st.sampled_from([num, num + 1])),
                                       (1, st.sampled_from([0, 0xFFFF, 0x8000])),
                                       (1, st.integers(0, 0xFFFF)))),
        mutation("head", st.sampled_from([num, 0xFFFF]) | st.integers(0, 0xFFFF)))


@functools.lru_cache
def chain_counts(num):
    return weighted((19, st.integers(0, 6)), (1, st.integers(0, num // 2)))


USED_EVENTS = weighted((3, st.integers(-2, 12)), (1, st.integers(0, U16 - 1)))
STARTS = weighted((3, st.just(0)), (2, st.integers(U16 - 12, U16 - 1)), (1, st.integers(0, U16 - 1)))


def draw_round(draw, chain, num, data):
    count = draw(chain_counts(num))
    return Round(
        chains=tuple(chain(draw) for _ in range(count)),
        late=tuple(chain(draw) for _ in range(draw(st.integers(1, 2)) if chance(draw, 15) else 0)),
        mutations=(tuple(draw(st.lists(mutations(num), min_size=1, max_size=2)))
                   if chance(draw, 20) else ()),
        no_interrupt=draw(st.booleans()), used_event=draw(USED_EVENTS), data=data(draw))


def no_data(draw):
    return ()


def no_options(draw):
    return {}


@st.composite
def cases(draw, payload, num, data=no_data, options=no_options):
    event_idx, indirect = draw(st.booleans()), draw(st.booleans())

    def chain(draw):
        return draw_chain(draw, payload, indirect, HUGE_ENTRIES - 1)
    return Case(event_idx=event_idx, indirect=indirect, start=draw(STARTS),
                fill=draw(NOISE_OFFSETS),
                rounds=tuple(draw_round(draw, chain, num, data)
                             for _ in range(draw(st.integers(1, 3)))),
                **options(draw))


def block_options(draw):
    return {"read_only": chance(draw, 40), "image_tail": draw(st.sampled_from([0, 100]))}


# Console input: one span per round (empty: a plain kick of receiveq).  At
# most 3 x 9000 bytes are ever pending, below the console's 64 KiB limit.
CONSOLE_INPUT = weighted((2, st.just(0)), (12, st.integers(1, 120)), (1, st.integers(0, 9000)))


def console_input(draw):
    return ((draw(NOISE_OFFSETS), draw(CONSOLE_INPUT)),)


# Frames for receiveq: a few small ones, and now and then one up to past
# MAX_FRAME, at most one a round, so a case's frames always fit in the socket.
FRAME_BYTES = st.integers(0, 1600)
BIG_FRAME_BYTES = st.integers(MAX_FRAME - 2, MAX_FRAME + 40)


def frames(draw):
    spans = [(draw(NOISE_OFFSETS), draw(FRAME_BYTES)) for _ in range(draw(st.integers(0, 3)))]
    if chance(draw, 8):
        spans.append((draw(NOISE_OFFSETS), draw(BIG_FRAME_BYTES)))
    return tuple(spans)


HUGE_TOTALS = weighted((1, st.just(model.U32_MAX)), (1, st.just(model.U32_MAX + 1)),
                       (1, st.integers(MiB, model.U32_MAX + 1)))


@st.composite
def huge_console_cases(draw):
    """One console transmit chain of up to 4 GiB: a prefix in HIGH, then an
    indirect table of up to 4095 entries each covering all of HIGH, in all
    2^32 - 1 bytes (the longest a chain may be), one byte more, or less;
    then maybe a small chain, to see the queue go on after it."""
    total = draw(HUGE_TOTALS)
    count = min(total // MiB, HUGE_ENTRIES - 1)
    prefix = total - count * MiB                  # at most 1 MiB: all of HIGH
    huge = ChainSpec((Buf(prefix, False, ("edge", "start of HIGH")), Buf(0, False)),
                     indirect_from=1, huge=(count, MiB, False))
    small = draw_chain(draw, CONSOLE_TX, True, 16)
    round_ = Round(chains=(huge, small)[:draw(st.integers(1, 2))],
                   mutations=(draw(mutations(64)),) if chance(draw, 33) else (),
                   no_interrupt=draw(st.booleans()), used_event=draw(st.integers(-2, 3)))
    return Case(event_idx=draw(st.booleans()), indirect=True, start=draw(STARTS),
                fill=draw(NOISE_OFFSETS), rounds=(round_,))


# --- The guest's driver. ---------------------------------------------------------------

class Allocator:
    """Where one case's buffers go: FRESH ones one after another through the
    data areas (wrapping around), the others as their `place` says; and
    its indirect tables, through TABLE_AREA, where no buffer goes."""

    def __init__(self):
        self.area, self.cursor = 0, DATA_AREAS[0][0]
        self.table_cursor = TABLE_AREA[0]
        self.used = []

    def fresh(self, length):
        for _ in range(len(DATA_AREAS) + 1):
            lo, hi = DATA_AREAS[self.area]
            if self.cursor + length <= hi:
                self.cursor += length
                return self.cursor - length
            self.area = (self.area + 1) % len(DATA_AREAS)
            self.cursor = DATA_AREAS[self.area][0]
        return HIGH.gpa                 # longer than any area: at least it starts in RAM

    def table(self, length):
        """Room for a table of `length` bytes (at most TABLE_AREA's size)."""
        if self.table_cursor + length > TABLE_AREA[1]:
            self.table_cursor = TABLE_AREA[0]
        self.table_cursor += length
        return self.table_cursor - length

    def place(self, buf):
        if buf.place[0] == "reuse" and self.used:
            addr = self.used[buf.place[1] % len(self.used)]
        elif buf.place[0] == "edge":
            addr = EDGES[buf.place[1]](buf.length) % (1 << 64)
        else:
            addr = self.fresh(buf.length)
        self.used.append(addr)
        return addr


DESC_FIELDS = {"addr": (0, 8), "len": (8, 4), "flags": (12, 2), "next": (14, 2)}


class Driver:
    """The guest's driver of one ring: writes a round's chains into guest
    memory, publishes them, then applies the round's mutations."""

    def __init__(self, memory, ring, allocator):
        self.memory, self.ring, self.alloc = memory, ring, allocator
        self.next_desc = 0           # descriptors are handed out round-robin

    def play(self, rnd, start):
        """Write the round; the avail.idx that will publish its late chains."""
        # The descriptors written, as (gpa, index of their chain's first
        # descriptor in the same table); the avail slots filled.
        written, slots, first = [], [], self.ring.avail_idx
        for spec in rnd.chains:
            slots.append(self.ring.avail_idx)
            self.ring.publish(self._write_chain(spec, written))
        for n, spec in enumerate(rnd.late):          # in the ring, not yet published
            slots.append(self.ring.avail_idx + n)
            self.ring.avail[2 + slots[-1] % self.ring.num] = self._write_chain(spec, written)
        for mutation in rnd.mutations:
            self._mutate(mutation, written, slots, first)
        self.ring.set_avail_flags(model.AVAIL_NO_INTERRUPT if rnd.no_interrupt else 0)
        self.ring.set_used_event(start + rnd.used_event)
        return (self.ring.avail_idx + len(rnd.late)) % U16

    def _write_chain(self, spec, written):
        placed = [(self.alloc.place(b), b.length, WRITE * b.writable) for b in spec.bufs]
        self._write_header(spec.header, placed)
        if spec.indirect_from is None:
            return self._link_ring(placed, written)
        direct, entries = placed[:spec.indirect_from], placed[spec.indirect_from:]
        if spec.huge:
            table, entries = HUGE_TABLE, self._with_huge(entries, *spec.huge)
        else:
            table = self.alloc.table(model.DESC_BYTES * len(entries))
        if spec.nested:
            inner = self.alloc.table(model.DESC_BYTES)
            self._write_table(inner, [entries[-1] + (0,)], written)
            entries[-1] = (inner, model.DESC_BYTES, INDIRECT)
        last = len(entries) - 1
        self._write_table(table, [(addr, n, flags | NEXT * (i < last), i + 1)
                                  for i, (addr, n, flags) in enumerate(entries)], written)
        return self._link_ring(direct + [(table, model.DESC_BYTES * len(entries),
                                          INDIRECT | WRITE * spec.indirect_write)], written)

    @staticmethod
    def _with_huge(entries, count, length, writable):
        """Insert `count` entries of `length` bytes, one after another through
        HIGH (from its start again when they reach its end), where the
        readable part of `entries` ends."""
        count, fit = min(count, HUGE_ENTRIES - len(entries)), HIGH.size // length
        huge = [(HIGH.gpa + i % fit * length, length, WRITE * writable) for i in range(count)]
        at = next((i for i, (_, _, flags) in enumerate(entries) if flags & WRITE), len(entries))
        return entries[:at] + huge + entries[at:]

    def _write_header(self, header, placed):
        """The request header over the first readable buffers (those in RAM)."""
        for addr, length, flags in placed:
            if flags & WRITE or not header:
                return
            piece, header = header[:length], header[length:]
            if self.memory.contains(addr, len(piece)):
                self.memory.write(addr, piece)

    def _write_table(self, gpa, descriptors, written):
        self.memory.array(gpa, DESC_DTYPE, len(descriptors))[:] = descriptors
        written.extend((gpa + model.DESC_BYTES * i, 0) for i in range(len(descriptors)))

    def _link_ring(self, links, written):
        """Ring descriptors for `links`, [(addr, len, flags)], chained; the head."""
        num = self.ring.num
        indices = [(self.next_desc + i) % num for i in range(len(links))]
        self.next_desc = (self.next_desc + len(links)) % num
        for i, (addr, n, flags) in enumerate(links):
            more = i + 1 < len(links)
            self.ring.set_desc(indices[i], addr, n, flags | NEXT * more,
                               indices[i + 1] if more else 0)
            written.append((self.ring.pfn * 4096 + model.DESC_BYTES * indices[i], indices[0]))
        return indices[0]

    def _mutate(self, mutation, written, slots, first):
        if mutation.field == "avail_idx":
            self.ring.set_avail_idx(first + mutation.value)
        elif mutation.field == "head":
            if slots:
                slot = slots[mutation.target % len(slots)] % self.ring.num
                self.ring.avail[2 + slot] = mutation.value
        elif written:
            gpa, first = written[mutation.target % len(written)]
            if mutation.field == "loop":      # NEXT, back to the chain's first descriptor
                self._set(gpa, "flags", self._get(gpa, "flags") | NEXT)
                self._set(gpa, "next", first)
            elif mutation.field == "flags":
                self._set(gpa, "flags", self._get(gpa, "flags") ^ mutation.value)
            else:
                self._set(gpa, mutation.field, mutation.value)

    def _get(self, gpa, field):
        offset, size = DESC_FIELDS[field]
        return self.memory.read_int(gpa + offset, size)

    def _set(self, gpa, field, value):
        offset, size = DESC_FIELDS[field]
        self.memory.write_int(gpa + offset, size, value)


# --- A device on the fuzz memory, and its model beside it. -----------------------------

class Bench:
    """A device attached and activated as the bus does it (as
    virtio_rig.DeviceRig does, which would also start() it: the net
    device's receive thread must not run here), its queues starting at
    case.start; a Driver per ring; the model of each queue."""

    def __init__(self, memory, device, case):
        self.memory, self.device = memory, device
        self.reports, self.interrupts = [], 0
        device.attach(DeviceContext(memory=memory, interrupt=self._interrupt,
                                    report=self.reports.append))
        rings = list(zip(device.queue_sizes, RING_PFNS[device.name]))
        device.activate(case.event_idx << VIRTIO_RING_F_EVENT_IDX
                        | case.indirect << VIRTIO_RING_F_INDIRECT_DESC, rings)
        self.queues = device.queues
        allocator = Allocator()
        self.drivers, self.model_queues = [], []
        for queue, (num, pfn) in zip(self.queues, rings):
            # As if the ring had gone round case.start times already.
            queue.last_avail_idx = queue.used_idx = queue._signalled_used = case.start
            ring = RingBuilder(memory, num, pfn)
            ring.set_avail_idx(case.start)
            self.drivers.append(Driver(memory, ring, allocator))
            self.model_queues.append(model.QueueModel(model.Ring(num, pfn << 12), case.event_idx,
                                                      case.indirect, case.start))
        self.model_rings = [q.ring for q in self.model_queues]

    def _interrupt(self):
        self.interrupts += 1

    def snapshot(self):
        return model.ModelMemory([(r.gpa, self.memory.view(r.gpa, r.size)) for r in REGIONS])


class Fuzz:
    """One fuzzed queue of one device: subclasses build the device and its
    model, and say how a round kicks each."""
    label = ""                  # for the counts: "block", "net receive", ...
    queue = 0                   # the queue index kicked

    def __init__(self, env, case, device):
        self.env, self.device = env, device
        self.bench = Bench(env.memory, device, case)

    def kick_model(self, memory, rnd, on_empty):
        """(the model's Kick, what the device should do outside, or None)"""
        raise NotImplementedError

    def kick_device(self, rnd, expected):
        """Kick the device; `expected` is None in a timing-dependent round."""
        raise NotImplementedError

    def settle(self):
        """After the round's kicks (the driver's own, and any Race kick)."""

    def check(self, expected):
        """After an exact round: what the device did outside guest memory."""

    def check_end(self):
        """After the last round, when every round was exact."""

    def close(self):
        self.device.close()


def run_case(kind, env, case):
    fill_memory(env.memory, case.fill)
    started = time.monotonic()
    fuzz = kind(env, case)
    try:
        outcome, rule = play(fuzz, case)
    finally:
        fuzz.close()
    seconds = time.monotonic() - started
    record(kind.label, outcome, seconds, describe(case), rule)
    assert seconds <= CASE_SECONDS, f"the case took {seconds:.1f} s"


def fill_memory(memory, offset):
    for region in REGIONS:
        memory.view(region.gpa, region.size)[:] = NOISE[offset:offset + region.size]
        offset += region.size


def play(fuzz, case):
    """Every round: the driver writes, the model kicks its copy, the device
    kicks guest memory, and the two must agree.  The case's outcome, and
    the rule broken if one was."""
    outcome, rule, bench = "served", None, fuzz.bench
    for rnd in case.rounds:
        late_idx = bench.drivers[fuzz.queue].play(rnd, case.start)
        race = Race(bench, fuzz.queue, late_idx, case.event_idx) if rnd.late else None
        memory = bench.snapshot()
        kick, expected = fuzz.kick_model(memory, rnd, race and race.publish_in_model)
        if kick.timing_dependent(bench.model_rings):
            check_loosely(fuzz, rnd, kick, race)
            return "timing-dependent", None
        interrupts = bench.interrupts
        kick_round(fuzz, rnd, expected, race)
        # A driver that kicked for its late chains may see them served in
        # that second batch, with interrupts decided twice: not counted.
        check_exactly(fuzz, memory, kick, None if race and race.kicked else interrupts)
        fuzz.check(expected)
        if kick.broken:
            outcome, rule = f"broken-{kick.broken_kind}", kick.broken_rule
    fuzz.check_end()
    return outcome, rule


def kick_round(fuzz, rnd, expected, race):
    """The round's kick, and the driver's second one if its Race asked."""
    fuzz.kick_device(rnd, expected)
    if race:
        race.close()
        if race.kicked:
            fuzz.device.service(fuzz.queue)
    fuzz.settle()


class Race:
    """A round's late chains: the driver publishes them at the worst moment,
    just as the device, having found the ring empty, turns notifications
    back on (the C ring's before_enable moment, before the store), and
    kicks only if it then reads notifications on (1.0 3.2.1.4.1).  Unless
    the device looks at the ring once more after turning them on, those
    chains wait for a kick that never comes.  The model publishes them
    when it first finds the ring empty, and serves them in the same kick."""

    def __init__(self, bench, index, late_idx, event_idx):
        self.memory, self.event_idx, self.late_idx = bench.memory, event_idx, late_idx
        self.driver_ring, self.ring = bench.drivers[index].ring, bench.model_rings[index]
        self.queue, self.published, self.kicked = bench.queues[index], False, False
        before_enabling_kicks(self.queue, self._publish)

    def publish_in_model(self, memory):
        memory.write(self.ring.avail + 2, self.late_idx.to_bytes(2, "little"))
        return True

    def _publish(self):
        if not self.published:
            self.published, old = True, self.driver_ring.avail_idx
            self.driver_ring.set_avail_idx(self.late_idx)
            self.kicked = self._driver_kicks(old)

    def _driver_kicks(self, old):
        """1.0 3.2.1.4.1: what a driver that just published reads."""
        if self.event_idx:
            avail_event = self.memory.read_int(self.ring.avail_event, 2)
            return model.need_event(avail_event, self.late_idx, old)
        return not self.memory.read_int(self.ring.used_flags, 2) & model.USED_NO_NOTIFY

    def close(self):
        before_enabling_kicks(self.queue, None)


def check_exactly(fuzz, expected, kick, interrupts_before):
    """The device did what the model did: the same outcome, indices, guest
    memory (`expected`, the model's copy) and interrupts."""
    bench, index = fuzz.bench, fuzz.queue
    queue, modelled = bench.queues[index], bench.model_queues[index]
    label = bench.device.queue_label(index)
    # The outcome: broken iff the model broke, in this queue, reported once.
    assert (bench.device.broken is None) == (fuzz.model.broken is None), (
        f"device: {bench.device.broken!r}; model: {fuzz.model.broken!r}")
    if fuzz.model.broken:
        assert bench.device.broken.startswith(label + ": "), bench.device.broken
        assert len(bench.reports) == 1 and bench.reports[0].startswith(label + ": "), bench.reports
    if kick.broken:
        # The error itself, kept by mark_broken and carried by the report.
        assert bench.reports[0].error is bench.device.fault
        check_rule(bench.device.fault, kick.broken_rule)
    assert (queue.last_avail_idx, queue.used_idx) == (modelled.last_avail, modelled.used_idx), (
        "entries consumed and used")
    compare_memory(bench.memory, expected, bench.model_rings)
    check_notifications(bench.memory, kick, modelled)
    if interrupts_before is not None:
        assert bench.interrupts - interrupts_before == kick.interrupt, "interrupts"


# The model's names for the rules of a chain's descriptors.  The two walks
# check these in different orders (see virtio_model's docstring), so a chain
# that breaks two of them may be reported under either; every other rule
# (the ring's avail idx and head, a device's own) both check at one moment.
DESCRIPTOR_RULES = {"loop", "next", "indirect feature", "indirect nested", "indirect next",
                    "indirect size", "indirect memory", "order", "total", "memory"}


def check_rule(error, model_rule):
    """The device broke on the rule the model did: its error's rule has the
    model's name (virtio/queue.py's RingRule and each device's rules are
    named alike), or another of the DESCRIPTOR_RULES where the model's is
    one (pylguest's "indirect bound" the model counts as "indirect size")."""
    assert error.rule is not None, f"an error without its rule: {error}"
    name = error.rule.value
    if model_rule in DESCRIPTOR_RULES:
        assert name in DESCRIPTOR_RULES | {"indirect bound"}, (name, model_rule, str(error))
    else:
        assert name == model_rule, (name, model_rule, str(error))


def compare_memory(memory, expected, rings):
    """Every byte the model predicts: all but used.flags bit 0 and avail_event."""
    for ring in rings:
        flags = (expected.u16(ring.used_flags) & ~model.USED_NO_NOTIFY
                 | memory.read_int(ring.used_flags, 2) & model.USED_NO_NOTIFY)
        expected.write(ring.used_flags, flags.to_bytes(2, "little"))
        expected.write(ring.avail_event, memory.read(ring.avail_event, 2))
    for gpa, data in expected.regions:
        got, want = memory.view(gpa, len(data)), np.frombuffer(data, np.uint8)
        if not np.array_equal(got, want):
            at = int(np.flatnonzero(got != want)[0])
            pytest.fail(f"guest memory differs at 0x{gpa + at:x} ({where(gpa + at, rings)}): "
                        f"device left {got[at:at + 8].tobytes().hex()}, "
                        f"model {want[at:at + 8].tobytes().hex()}")


def where(addr, rings):
    for ring in rings:
        for name, (lo, n) in zip(("descriptor table", "avail ring", "used ring"), ring.ranges()):
            if lo <= addr < lo + n:
                return f"{name} of the ring at 0x{ring.desc:x}"
    return "a buffer"


def check_notifications(memory, kick, modelled):
    """The lost-wakeup rule (1.0 2.4.9, 3.2.1.4): a device that found the
    ring empty leaves notifications on, or the driver's next buffer, added
    without a kick, would wait forever."""
    if not kick.found_empty or kick.broken:
        return
    ring = modelled.ring
    if modelled.event_idx:
        assert memory.read_int(ring.avail_event, 2) == modelled.last_avail, (
            "avail_event is not last_avail_idx after the ring was found empty")
    else:
        assert not memory.read_int(ring.used_flags, 2) & model.USED_NO_NOTIFY, (
            "used.flags still says NO_NOTIFY after the ring was found empty")


def check_loosely(fuzz, rnd, kick, race):
    """A timing-dependent round: the device must end served or broken (with
    its report), having written only into the writable buffers of chains
    it walked, its used ring and notification fields (and the driver only
    avail.idx, publishing its late chains)."""
    bench, index = fuzz.bench, fuzz.queue
    before = [bench.memory.read(r.gpa, r.size) for r in REGIONS]
    kick_round(fuzz, rnd, None, race)
    label = bench.device.queue_label(index)
    assert bench.device.broken is None or bench.device.broken.startswith(label + ": ")
    ring = bench.model_queues[index].ring
    allowed = [b for chain in kick.chains for b in chain.writable]
    allowed += [ring.used_range(), (ring.avail + 2, 2)]
    for region, old in zip(REGIONS, before):
        mask = np.zeros(region.size, bool)
        for addr, length in allowed:
            lo, hi = max(addr, region.gpa), min(addr + length, region.end)
            mask[lo - region.gpa:max(lo, hi) - region.gpa] = True
        changed = np.flatnonzero(bench.memory.view(region.gpa, region.size)
                                 != np.frombuffer(old, np.uint8))
        outside = changed[~mask[changed]]
        assert not outside.size, (f"the device changed 0x{region.gpa + int(outside[0]):x}, "
                                  "outside every writable buffer and its used ring")


# --- The devices. -------------------------------------------------------------------------

class BlockFuzz(Fuzz):
    label = "block"

    def __init__(self, env, case):
        image = NOISE[case.fill:case.fill + SECTORS * model.SECTOR + case.image_tail].tobytes()
        env.image.write_bytes(image)
        super().__init__(env, case, BlockDevice("block0", str(env.image), case.read_only))
        self.model = model.BlockModel("block0", self.bench.model_queues[0], bytearray(image),
                                      case.read_only)

    def kick_model(self, memory, rnd, on_empty):
        return self.model.service(memory, on_empty), None

    def kick_device(self, rnd, expected):
        self.device.service(0)

    def check(self, expected):
        assert self.env.image.read_bytes() == self.model.image, "the image file"


CONSOLE_PIECE = 64 * KiB          # the most one output call may carry


class OutputCheck:
    """The console's output callable: each piece is checked against the
    stream the model expects as it arrives, so a 4 GiB stream is never held.
    expect(None) accepts any bytes (a timing-dependent round)."""

    def __init__(self):
        self.segments, self.offset = deque(), 0

    def expect(self, segments):
        self.segments = None if segments is None else deque(s for s in segments if len(s))
        self.offset = 0

    def __call__(self, piece):
        assert type(piece) is bytes and 0 < len(piece) <= CONSOLE_PIECE, (type(piece), len(piece))
        at = 0
        while self.segments is not None and at < len(piece):
            assert self.segments, "the console wrote more than the chains held"
            segment = self.segments[0]
            n = min(len(segment) - self.offset, len(piece) - at)
            assert piece[at:at + n] == bytes(segment[self.offset:self.offset + n]), (
                "the console's output differs from the chains' bytes")
            at, self.offset = at + n, self.offset + n
            if self.offset == len(segment):
                self.segments.popleft()
                self.offset = 0

    def finish(self):
        assert not self.segments, "the console wrote less than the chains held"


def refuse_output(piece):
    raise AssertionError("the console wrote output on a receiveq kick")


class ConsoleTransmitFuzz(Fuzz):
    label, queue = "console transmit", 1

    def __init__(self, env, case):
        self.output = OutputCheck()
        super().__init__(env, case, ConsoleDevice("console0", self.output))
        self.model = model.ConsoleModel("console0", *self.bench.model_queues)

    def kick_model(self, memory, rnd, on_empty):
        return self.model.transmit(memory, on_empty)

    def kick_device(self, rnd, expected):
        self.output.expect(expected)
        self.device.service(1)

    def check(self, expected):
        self.output.finish()


class ConsoleReceiveFuzz(Fuzz):
    label, queue = "console receive", 0

    def __init__(self, env, case):
        super().__init__(env, case, ConsoleDevice("console0", refuse_output))
        self.model = model.ConsoleModel("console0", *self.bench.model_queues)

    def kick_model(self, memory, rnd, on_empty):
        return self.model.receive(memory, noise(*rnd.data[0]), on_empty), None

    def kick_device(self, rnd, expected):
        data = noise(*rnd.data[0])
        if data:
            self.device.receive(data)
        else:
            self.device.service(0)          # buffers posted, no input: a plain kick

    def check(self, expected):
        assert self.device.pending == self.model.pending, "the input still pending"


MAC = bytes.fromhex("525400123456")
SYNC = b"\xff"                    # shorter than any frame the device may send


class FrameReader:
    """The far end of the net device's 'tap': a thread takes every frame the
    device sends, so the device never blocks on a full socket.  collect()
    sends SYNC through the device's end and returns the frames before it."""

    def __init__(self, peer):
        self.peer, self.frames, self.synced = peer, [], threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while frame := self.peer.recv(1 << 17):
            if frame == SYNC:
                self.synced.set()
            else:
                self.frames.append(frame)

    def collect(self, device_fd):
        os.write(device_fd, SYNC)
        assert self.synced.wait(CASE_SECONDS), "the frames sent never arrived"
        self.synced.clear()
        frames, self.frames = self.frames, []
        return frames

    def close(self):
        self.peer.shutdown(socket.SHUT_RDWR)
        self.thread.join(CASE_SECONDS)
        self.peer.close()


def net_device():
    """A NetDevice on one end of a SOCK_SEQPACKET pair (which keeps frame
    boundaries, as a tap does); the other end."""
    device_end, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Room for FRAMES each way: the device's end is non-blocking (net.c
    # never waits), and a full one would drop frames the model has sent.
    for end in (device_end, peer):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    return NetDevice("net0", "fuzz0", MAC, tap_fd=device_end.detach()), peer


class NetTransmitFuzz(Fuzz):
    label, queue = "net transmit", 1

    def __init__(self, env, case):
        device, peer = net_device()
        self.reader = FrameReader(peer)
        super().__init__(env, case, device)
        self.model = model.NetModel("net0", *self.bench.model_queues)

    def kick_model(self, memory, rnd, on_empty):
        return self.model.transmit(memory, on_empty)

    def kick_device(self, rnd, expected):
        self.device.service(1)

    def settle(self):
        self.sent = self.reader.collect(self.device.tap)

    def check(self, expected):
        assert self.sent == expected, "the frames sent"

    def close(self):
        self.device.close()
        self.reader.close()


class NetReceiveFuzz(Fuzz):
    label, queue = "net receive", 0

    def __init__(self, env, case):
        device, self.peer = net_device()
        super().__init__(env, case, device)
        self.model = model.NetModel("net0", *self.bench.model_queues)

    def kick_model(self, memory, rnd, on_empty):
        return self.model.receive(memory, [noise(*span) for span in rnd.data], on_empty), None

    def kick_device(self, rnd, expected):
        for span in rnd.data:
            self.peer.send(noise(*span), socket.MSG_DONTWAIT)   # never blocks: FRAMES fit
        self.device.service(0)

    def check_end(self):
        waiting = []
        while select.select([self.device.tap], [], [], 0)[0]:
            waiting.append(os.read(self.device.tap, 1 << 17))
        assert waiting == list(self.model.waiting), "the frames left in the socket"

    def close(self):
        self.device.close()
        self.peer.close()


class RngFuzz(Fuzz):
    label = "rng"

    def __init__(self, env, case):
        super().__init__(env, case, RngDevice("rng0", source=str(env.rng_source)))
        self.model = model.RngModel("rng0", self.bench.model_queues[0], env.rng_fd)

    def kick_model(self, memory, rnd, on_empty):
        return self.model.service(memory, on_empty), None

    def kick_device(self, rnd, expected):
        self.device.service(0)


# --- Fixtures and tests. ---------------------------------------------------------------------

RNG_SOURCE_BYTES = 16 * MiB       # more than a case can take: 3 rounds x 64 chains x 64 KiB


@dataclass
class Env:
    memory: GuestMemory
    image: object                 # pathlib.Path of the block image
    rng_source: object            # pathlib.Path of the rng's bytes
    rng_fd: int                   # the model's own descriptor on them


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz")
    rng_source = workdir / "random"
    rng_source.write_bytes(np.random.default_rng(7).bytes(RNG_SOURCE_BYTES))
    memory = GuestMemory(REGIONS)
    rng_fd = os.open(rng_source, os.O_RDONLY)
    yield Env(memory, workdir / "disk.img", rng_source, rng_fd)
    os.close(rng_fd)
    memory.close()


@pytest.fixture
def peak_rss_bounded():
    before = peak_rss()
    yield
    growth = peak_rss() - before
    assert growth < RSS_GROWTH_LIMIT, f"the peak RSS grew by {growth >> 20} MiB in this test"


@fuzz_test(quick=200, long=22_000)
@given(case=cases(block_payload, 128, options=block_options))
def test_block(env, batch, case):
    run_case(BlockFuzz, env, case)


@fuzz_test(quick=150, long=16_000)
@given(case=cases(CONSOLE_TX, 64))
def test_console_transmit(env, batch, case):
    run_case(ConsoleTransmitFuzz, env, case)


@fuzz_test(quick=10, long=300, batch=50)      # up to 0.6 s a case
@given(case=huge_console_cases())
def test_console_transmit_huge_chains(env, batch, case):
    run_case(ConsoleTransmitFuzz, env, case)


@fuzz_test(quick=150, long=16_000)
@given(case=cases(CONSOLE_RX, 64, data=console_input))
def test_console_receive(env, batch, case):
    run_case(ConsoleReceiveFuzz, env, case)


@fuzz_test(quick=150, long=16_000)
@given(case=cases(NET_TX, 256))
def test_net_transmit(env, batch, case):
    run_case(NetTransmitFuzz, env, case)


@fuzz_test(quick=150, long=16_000)
@given(case=cases(NET_RX, 256, data=frames))
def test_net_receive(env, batch, case):
    run_case(NetReceiveFuzz, env, case)


@fuzz_test(quick=150, long=16_000)
@given(case=cases(RNG, 64))
def test_rng(env, batch, case):
    run_case(RngFuzz, env, case)
