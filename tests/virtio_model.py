"""A reference model of the legacy split virtqueue and of pylguest's devices.

The ring fuzzer (tests/test_fuzz_rings.py) checks the launcher's virtqueue
and devices against this model, case by case.  Its value is that it is a
*second* implementation of the rules, written from the specification and
not from launcher/pylguest/virtio/queue.py: nothing here imports pylguest.
Where the two walks differ in method they still have to agree in outcome:

    - the launcher walks a chain once, checking each descriptor as it goes,
      and detects a loop with a TTL (at most table-size descriptors);
    - the model first *traces* the chain (following `next`, detecting a
      loop with a set of visited entries per table), then *classifies* the
      traced descriptors as a list (lengths, bounds, read/write order).

Sections are those of the virtio 1.0 specification ("1.0 2.4.5.2"), whose
"legacy interface" is the virtio 0.9.5 ring that lguest uses; the device
rules are pylguest's own, each stated where it is modelled below.

The model is a sequential simulator over its own copy of guest memory
(`ModelMemory`): one `DeviceModel.kick()` serves available entries one at
a time, in order -- walk the chain, do the request, write the used
element, then used.idx -- applying every write to the copy as it happens.
So buffers that overlap between chains, or a request that writes where a
later chain reads, come out right without special cases.  What a real
device may do at other moments (the notification fields, prefetching
descriptors) the model does not predict; `Kick.timing_dependent()` says
when a case touches such bytes, and the fuzzer then checks less.
"""

import os
import struct
from collections import deque
from dataclasses import dataclass, field

U16 = 1 << 16
U32_MAX = (1 << 32) - 1

# Descriptor flags, avail/used flags (1.0 2.4.5, 2.4.7, 2.4.9).
DESC_NEXT, DESC_WRITE, DESC_INDIRECT = 1, 2, 4
AVAIL_NO_INTERRUPT = 1
USED_NO_NOTIFY = 1
DESC_BYTES = 16                  # struct virtq_desc {le64 addr; le32 len; le16 flags; le16 next}
RING_ALIGN = 4096                # lguest's legacy ring alignment (1.0 2.4.2)
MAX_INDIRECT = 32768             # pylguest's bound on one indirect table


class Broken(Exception):
    """The guest broke a rule: the device stops serving.  `rule` names the
    rule (for the fuzzer's counts); its kind is "ring" when the available
    ring itself is broken, "chain" when one chain was rejected."""

    def __init__(self, rule, message):
        super().__init__(message)
        self.rule = rule
        self.kind = "ring" if rule == "avail idx" else "chain"


# --- Guest memory, the model's own copy. -----------------------------------------

class ModelMemory:
    """Guest memory as a list of (gpa, bytearray) regions that never touch.

    A range is guest memory iff all of [addr, addr + length) lies inside
    one region (Python integers do not wrap, so an address near 2^64 plus a
    length simply lands outside every region).
    """

    def __init__(self, regions):
        self.regions = [(gpa, bytearray(data)) for gpa, data in regions]

    def _locate(self, addr, length):
        for gpa, data in self.regions:
            if gpa <= addr and addr + length <= gpa + len(data):
                return data, addr - gpa
        return None

    def contains(self, addr, length):
        return self._locate(addr, length) is not None

    def view(self, addr, length):
        """The bytes of [addr, addr + length): a memoryview into the copy."""
        data, offset = self._locate(addr, length)
        return memoryview(data)[offset:offset + length]

    def write(self, addr, data):
        self.view(addr, len(data))[:] = data

    def u16(self, addr):
        return int.from_bytes(self.view(addr, 2), "little")


# --- Where the parts of a ring are (1.0 2.4.2, legacy layout). -------------------

class Ring:
    """A legacy ring of `num` entries at guest-physical `gpa`:

        descriptor table  num x 16 bytes
        available ring    le16 flags; le16 idx; le16 ring[num]; le16 used_event
        (pad to the next 4096 boundary)
        used ring         le16 flags; le16 idx; {le32 id; le32 len} ring[num];
                          le16 avail_event
    """

    def __init__(self, num, gpa):
        self.num = num
        self.desc = gpa
        self.avail = gpa + DESC_BYTES * num
        avail_end = self.avail + 2 * (3 + num)
        self.used = (avail_end + RING_ALIGN - 1) // RING_ALIGN * RING_ALIGN
        self.used_event = self.avail + 4 + 2 * num
        self.used_flags = self.used
        self.avail_event = self.used + 4 + 8 * num

    def ranges(self):
        """(addr, length) of the descriptor table, available ring, used ring."""
        return [(self.desc, DESC_BYTES * self.num), (self.avail, 2 * (3 + self.num)),
                (self.used, 6 + 8 * self.num)]

    def used_range(self):
        return (self.used, 6 + 8 * self.num)


# --- One chain: trace it, then classify it. ----------------------------------------

@dataclass(frozen=True)
class Descriptor:
    addr: int
    length: int
    flags: int
    next: int


def read_descriptor(memory, table, index):
    return Descriptor(*struct.unpack("<QIHH", memory.view(table + DESC_BYTES * index,
                                                          DESC_BYTES)))


@dataclass(frozen=True)
class Chain:
    """A chain that obeys every rule: its non-empty buffers, split by direction."""
    head: int
    readable: tuple              # (addr, length) the device reads, in order
    writable: tuple              # (addr, length) the device writes, in order

    @property
    def readable_len(self):
        return sum(length for _, length in self.readable)

    @property
    def writable_len(self):
        return sum(length for _, length in self.writable)


def trace_chain(memory, ring, head, indirect_negotiated, tables):
    """The descriptors of the chain from `head`, in order, indirect ones
    replaced by their table's chain; each indirect table walked is added
    to `tables` as (addr, length).  Raises Broken for a rule of the chain's
    *shape*: indices, loops, indirect descriptors."""
    if head >= ring.num:
        # 1.0 2.4.6: the ring holds heads of descriptor chains, indices
        # into the table of Queue Size entries.
        raise Broken("head", f"head {head} is not an index into {ring.num} descriptors")
    return _follow(memory, ring.desc, ring.num, head, indirect_negotiated, tables, nested=False)


def _follow(memory, table, size, start, indirect_negotiated, tables, nested):
    """Follow NEXT through one table (the ring's, or an indirect one) from `start`."""
    out, visited, index = [], set(), start
    while True:
        if index in visited:
            # 1.0 2.4.5.2: a chain is at most 2^32 bytes, "this implies
            # that loops in the descriptor chain are forbidden".
            raise Broken("loop", f"the chain visits descriptor {index} twice")
        visited.add(index)
        desc = read_descriptor(memory, table, index)
        if desc.flags & DESC_INDIRECT:
            _check_indirect(memory, desc, indirect_negotiated, nested)
            tables.append((desc.addr, desc.length))
            # 1.0 2.4.5.3: the table is walked from its entry 0, and (NEXT
            # being forbidden on the indirect descriptor) it ends the chain.
            return out + _follow(memory, desc.addr, desc.length // DESC_BYTES, 0,
                                 indirect_negotiated, tables, nested=True)
        out.append(desc)
        if not desc.flags & DESC_NEXT:
            return out
        if desc.next >= size:
            # 1.0 2.4.5: `next` indexes the table this descriptor is in.
            raise Broken("next", f"next {desc.next} is beyond a table of {size}")
        index = desc.next


def _check_indirect(memory, desc, indirect_negotiated, nested):
    """1.0 2.4.5.3.1, Driver Requirements: Indirect Descriptors."""
    if not indirect_negotiated:
        raise Broken("indirect feature", "INDIRECT without VIRTIO_RING_F_INDIRECT_DESC")
    if nested:
        raise Broken("indirect nested", "INDIRECT inside an indirect table")
    if desc.flags & DESC_NEXT:
        raise Broken("indirect next", "INDIRECT together with NEXT")
    # 1.0 2.4.5.3: the table is len / 16 descriptors; pylguest bounds it.
    if desc.length == 0 or desc.length % DESC_BYTES:
        raise Broken("indirect size", f"an indirect table of {desc.length} bytes")
    if desc.length // DESC_BYTES > MAX_INDIRECT:
        raise Broken("indirect size", f"an indirect table of more than {MAX_INDIRECT} entries")
    if not memory.contains(desc.addr, desc.length):
        raise Broken("indirect memory", "an indirect table outside guest memory")


def classify(memory, head, descriptors):
    """The Chain the traced descriptors make, or Broken."""
    writes = [bool(d.flags & DESC_WRITE) for d in descriptors]
    # 1.0 2.4.4.2: "The driver MUST place any device-writable descriptor
    # elements after any device-readable descriptor elements."  So the
    # WRITE flags, read in order, never go from set back to clear (a
    # zero-length descriptor counts: the flag is what orders them).
    if writes != sorted(writes):
        raise Broken("order", "a device-readable descriptor after a device-writable one")
    if sum(d.length for d in descriptors) > U32_MAX:
        raise Broken("total", "more than 2^32 - 1 bytes in total (1.0 2.4.5.2)")
    buffers = [(d.addr, d.length, w) for d, w in zip(descriptors, writes) if d.length]
    # A zero-length buffer carries no bytes, so its address is never used.
    for addr, length, _ in buffers:
        if not memory.contains(addr, length):
            raise Broken("memory", f"buffer 0x{addr:x}+0x{length:x} is not guest memory")
    return Chain(head, tuple((a, n) for a, n, w in buffers if not w),
                 tuple((a, n) for a, n, w in buffers if w))


def walk_chain(memory, ring, head, indirect_negotiated, tables):
    return classify(memory, head, trace_chain(memory, ring, head, indirect_negotiated, tables))


def cut(buffers, start, end):
    """The byte range [start, end) of a list of (addr, length) buffers."""
    out, position = [], 0
    for addr, length in buffers:
        lo, hi = max(start, position), min(end, position + length)
        if lo < hi:
            out.append((addr + lo - position, hi - lo))
        position += length
    return out


# --- One queue's indices (1.0 2.4.6, 2.4.8). ---------------------------------------

def need_event(event, new, old):
    """1.0 2.4.10, vring_need_event: did an index moving from `old` to `new`
    pass `event`, the entry the other side asked to hear about?  (u16: the
    subtraction wraps, which keeps it right across 65535 -> 0.)"""
    return (new - event - 1) % U16 < (new - old) % U16


class QueueModel:
    """The device's side of one ring: its own last_avail_idx and used_idx
    (free-running u16, slot = idx % num; used.idx is never read back)."""

    def __init__(self, ring, event_idx, indirect, start=0):
        self.ring, self.event_idx, self.indirect = ring, event_idx, indirect
        self.last_avail = self.used_idx = start
        self.decided_at = start           # used_idx when we last decided on an interrupt

    def next_head(self, memory):
        """Consume the next available entry: its head, or None when there is none."""
        ring = self.ring
        avail_idx = memory.u16(ring.avail + 2)
        pending = (avail_idx - self.last_avail) % U16
        if pending > ring.num:
            # The available ring has num slots (1.0 2.4.6): more entries
            # than that not yet consumed means the driver is lying.
            raise Broken("avail idx", f"avail idx {avail_idx} is {pending} entries ahead")
        if pending == 0:
            return None
        head = memory.u16(ring.avail + 4 + 2 * (self.last_avail % ring.num))
        self.last_avail = (self.last_avail + 1) % U16
        return head

    def push(self, memory, head, written):
        """1.0 2.4.8.2: the used element first, then used.idx."""
        ring = self.ring
        memory.write(ring.used + 4 + 8 * (self.used_idx % ring.num),
                     struct.pack("<II", head, written))
        self.used_idx = (self.used_idx + 1) % U16
        memory.write(ring.used + 2, struct.pack("<H", self.used_idx))

    def interrupt_due(self, memory):
        """After a batch that pushed: does the driver want an interrupt?"""
        old, new = self.decided_at, self.used_idx
        self.decided_at = new
        if self.event_idx:
            # 1.0 2.4.7.2: interrupt when used.idx went past used_event
            # since the last decision.
            return need_event(memory.u16(self.ring.used_event), new, old)
        # 1.0 2.4.7.2: without EVENT_IDX, only avail.flags can say "don't".
        return not memory.u16(self.ring.avail) & AVAIL_NO_INTERRUPT


# --- One kick of one queue. ----------------------------------------------------------

@dataclass
class Kick:
    """What the device did in one service of one queue."""
    pushed: list = field(default_factory=list)     # (head, written), in order
    broken: str = None                             # the report, if it broke
    broken_kind: str = None                        # "chain" or "ring"
    broken_rule: str = None                        # which rule
    found_empty: bool = False                      # it looked, and the ring was empty
    interrupt: bool = False
    chains: list = field(default_factory=list)     # the chains it accepted
    tables: list = field(default_factory=list)     # (addr, len) of indirect tables read
    reads: list = field(default_factory=list)      # (addr, len) of buffer bytes read
    writes: list = field(default_factory=list)     # (addr, len) of buffer bytes written

    def gather(self, memory, buffers):
        """The bytes of `buffers`, in order (the device reads them)."""
        self.reads.extend(buffers)
        return b"".join(bytes(memory.view(addr, length)) for addr, length in buffers)

    def segments(self, memory, buffers):
        """Like gather(), as memoryviews: a 4 GiB chain costs no memory."""
        self.reads.extend(buffers)
        return [memory.view(addr, length) for addr, length in buffers]

    def scatter(self, memory, buffers, data):
        """Write `data` over `buffers` in order; the bytes written."""
        done = 0
        for addr, length in buffers:
            piece = data[done:done + length]
            if not piece:
                break
            memory.write(addr, piece)
            self.writes.append((addr, len(piece)))
            done += len(piece)
        return done

    def timing_dependent(self, rings):
        """Did this kick touch bytes whose value depends on *when* a device
        reads or writes them, which the sequential model cannot know?

        - a buffer write landing on a ring (descriptors, available or used
          ring) or on an indirect table: a device may read those ahead;
        - an indirect table or a readable buffer overlapping a used ring,
          which the device writes (used elements, and the notification
          fields at moments of its choosing).

        Every request reads all it needs before it writes (as every device
        here does), so a write never lands on bytes its own chain has still
        to read: that case cannot arise.
        """
        used = [ring.used_range() for ring in rings]
        structures = [r for ring in rings for r in ring.ranges()] + self.tables
        return (_overlap(self.writes, structures) or _overlap(self.tables, used)
                or _overlap(self.reads, used))


def _overlap(ranges, others):
    return any(a < b + m and b < a + n for a, n in ranges for b, m in others)


class DeviceModel:
    """A device's queues, and the loop every queue runs (1.0 3.2.1, 3.2.2)."""

    def __init__(self, name, queue_names, queues):
        self.name, self.queue_names, self.queues = name, queue_names, queues
        self.broken = None

    def kick(self, memory, index, serve, has_work=lambda: True, on_empty=None):
        """Serve queue `index` while has_work(): `serve(memory, chain, kick)`
        does one request and returns the bytes it wrote into the chain.
        A broken device does nothing until reset.

        `on_empty(memory)`, if given, is the driver's move at the moment the
        device first finds the ring empty: it may publish more entries
        (returning True), and the device must still find them.  A driver
        that just then reads notifications off will not kick for them
        (1.0 3.2.1.4.1), so a device that re-enables notifications must
        look at the ring once more (1.0 2.4.9: the lost wakeup)."""
        kick = Kick()
        if self.broken:
            return kick
        queue = self.queues[index]
        try:
            while has_work():
                head = queue.next_head(memory)
                if head is None:
                    if on_empty and on_empty(memory):
                        on_empty = None
                        continue
                    kick.found_empty = True
                    break
                chain = walk_chain(memory, queue.ring, head, queue.indirect, kick.tables)
                kick.chains.append(chain)
                written = serve(memory, chain, kick)
                queue.push(memory, head, written)
                kick.pushed.append((head, written))
        except Broken as e:
            self.broken = kick.broken = f"{self.name}/{self.queue_names[index]}: {e}"
            kick.broken_kind, kick.broken_rule = e.kind, e.rule
        # Chains served before a rejection still get their interrupt.
        if kick.pushed:
            kick.interrupt = queue.interrupt_due(memory)
        return kick


# --- pylguest's devices. -------------------------------------------------------------

SECTOR = 512
BLK_T_IN, BLK_T_OUT, BLK_T_FLUSH, BLK_T_GET_ID = 0, 1, 4, 8
BLK_S_OK, BLK_S_IOERR, BLK_S_UNSUPP = 0, 1, 2
BLK_ID_BYTES = 20


class BlockModel(DeviceModel):
    """virtio-blk (1.0 5.2.6) over a model image (a bytearray)."""

    def __init__(self, name, queue, image, read_only):
        super().__init__(name, ("requests",), [queue])
        self.image, self.read_only = image, read_only
        self.capacity = len(image) // SECTOR

    def service(self, memory, on_empty=None):
        return self.kick(memory, 0, self._request, on_empty=on_empty)

    def _request(self, memory, chain, kick):
        if chain.writable_len < 1:
            raise Broken("block status", "no status byte")
        if chain.readable_len < 16:
            raise Broken("block header", "no 16-byte header")
        type_, _ioprio, sector = struct.unpack(
            "<IIQ", kick.gather(memory, cut(chain.readable, 0, 16)))
        room_len = chain.writable_len - 1         # the status byte is the last one
        room = cut(chain.writable, 0, room_len)
        if type_ == BLK_T_OUT:
            status, written = self._write(memory, chain, sector, kick), 0
        elif type_ == BLK_T_IN:
            status, written = self._read(memory, room, room_len, sector, kick)
        elif type_ == BLK_T_FLUSH:
            status, written = BLK_S_OK, 0
        elif type_ == BLK_T_GET_ID:
            ident = self.name.encode().ljust(BLK_ID_BYTES, b"\0")
            status, written = BLK_S_OK, kick.scatter(memory, room, ident[:room_len])
        else:
            status, written = BLK_S_UNSUPP, 0
        kick.scatter(memory, cut(chain.writable, room_len, room_len + 1), bytes([status]))
        return written + 1

    def _in_range(self, sector, length):
        return length % SECTOR == 0 and sector + length // SECTOR <= self.capacity

    def _write(self, memory, chain, sector, kick):
        length = chain.readable_len - 16
        if self.read_only or not self._in_range(sector, length):
            return BLK_S_IOERR
        start = sector * SECTOR
        self.image[start:start + length] = kick.gather(memory, cut(chain.readable, 16,
                                                                   chain.readable_len))
        return BLK_S_OK

    def _read(self, memory, room, length, sector, kick):
        if not self._in_range(sector, length):
            return BLK_S_IOERR, 0
        start = sector * SECTOR
        return BLK_S_OK, kick.scatter(memory, room, self.image[start:start + length])


class ConsoleModel(DeviceModel):
    """virtio-console (1.0 5.3.6): receiveq 0 fills from pending input,
    transmitq 1 hands each chain's readable bytes to the output."""

    def __init__(self, name, receiveq, transmitq):
        super().__init__(name, ("receiveq", "transmitq"), [receiveq, transmitq])
        self.pending = bytearray()

    def transmit(self, memory, on_empty=None):
        """(Kick, the output as a list of memoryviews)."""
        output = []

        def send(memory, chain, kick):
            output.extend(kick.segments(memory, chain.readable))
            return 0                          # nothing written into the chain
        return self.kick(memory, 1, send, on_empty=on_empty), output

    def receive(self, memory, data, on_empty=None):
        """Input arrived (or, with data empty, receiveq was kicked)."""
        self.pending += data
        return self.kick(memory, 0, self._fill, lambda: bool(self.pending), on_empty)

    def _fill(self, memory, chain, kick):
        written = kick.scatter(memory, chain.writable, bytes(self.pending[:chain.writable_len]))
        del self.pending[:written]
        return written


VNET_HDR = 10
MAX_FRAME = VNET_HDR + 14 + 4 + 65535


class NetModel(DeviceModel):
    """virtio-net (1.0 5.1.6) on a frame socket: `waiting` are the frames
    in the socket that the device has not taken yet."""

    def __init__(self, name, receiveq, transmitq):
        super().__init__(name, ("receiveq", "transmitq"), [receiveq, transmitq])
        self.waiting = deque()

    def transmit(self, memory, on_empty=None):
        """(Kick, the frames sent)."""
        sent = []

        def send(memory, chain, kick):
            if not VNET_HDR <= chain.readable_len <= MAX_FRAME:
                raise Broken("net frame", f"a {chain.readable_len}-byte frame")
            sent.append(kick.gather(memory, chain.readable))
            return 0
        return self.kick(memory, 1, send, on_empty=on_empty), sent

    def receive(self, memory, frames, on_empty=None):
        self.waiting.extend(frames)
        return self.kick(memory, 0, self._deliver, lambda: bool(self.waiting), on_empty)

    def _deliver(self, memory, chain, kick):
        if chain.writable_len < VNET_HDR:
            raise Broken("net room", "no room for the virtio_net_hdr")   # the frame stays
        frame = self.waiting.popleft()
        return kick.scatter(memory, chain.writable, frame[:min(chain.writable_len, MAX_FRAME)])


RNG_MAX_REQUEST = 64 * 1024


class RngModel(DeviceModel):
    """virtio-rng (1.0 5.4.6): each chain gets up to 64 KiB from `source`,
    a file the model reads with its own descriptor, in order."""

    def __init__(self, name, queue, source_fd):
        super().__init__(name, ("requests",), [queue])
        self.source_fd, self.offset = source_fd, 0

    def service(self, memory, on_empty=None):
        return self.kick(memory, 0, self._fill, on_empty=on_empty)

    def _fill(self, memory, chain, kick):
        wanted = min(chain.writable_len, RNG_MAX_REQUEST)
        data = os.pread(self.source_fd, wanted, self.offset)
        self.offset += len(data)
        return kick.scatter(memory, chain.writable, data)
