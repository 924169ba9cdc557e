"""The device half of a legacy split virtqueue (virtio 1.x, section 2.7).

A virtqueue is three arrays in guest memory that the guest's driver and
our device share.  lguest uses the legacy layout (section 2.7.2, "Legacy
Interfaces: A Note on Virtqueue Layout"): a ring of `num` entries lives at
guest-physical `pfn << 12` as one block,

    descriptor table   num x {u64 addr; u32 len; u16 flags; u16 next}
    available ring     u16 flags; u16 idx; u16 ring[num]; u16 used_event
    (padding up to the next 4096-byte boundary, LGUEST_VRING_ALIGN)
    used ring          u16 flags; u16 idx; {u32 id; u32 len} ring[num];
                       u16 avail_event

all little-endian (x86).  The driver writes descriptors and the available
ring; the device reads them, does the I/O, and writes the used ring.

Everything the guest wrote may be garbage or hostile, and may change
while we look at it.  So we follow Firecracker: *parse, then act*.
`Virtqueue.pop()` reads each descriptor of a chain exactly once, checks
every rule below, and returns an immutable `DescriptorChain` of plain
(gpa, length) buffers; device code works from that value and never from
the descriptor table, so a guest rewriting a descriptor after we checked
it changes nothing.  Each broken rule raises `VirtqueueError`, whose
message names the queue ("block0/requests: ...") and the rule, with its
spec section.  What to do about it (mark the device broken, stop the
guest) is decided by whoever catches it, never here.

The indices.  avail.idx and used.idx are free-running u16 counters: they
count entries ever added, wrap at 65536, and a ring slot is `idx % num`
(num is a power of two, so 65536 is a multiple of it and the slots stay
in step across the wrap).  We keep our own copies, `last_avail_idx` (how
many available entries we have consumed) and `used_idx` (how many used
entries we have published), and never read back the guest's copy of
used.idx: the guest can write it, and must not be able to make us
overwrite entries it has not read yet.

Threads.  One Virtqueue is driven by one thread (its device's backend);
nothing here locks.
"""

import threading
from dataclasses import dataclass

from pylguest.errors import GuestError, Rule

# --- Constants of the ring format (Linux include/uapi/linux/virtio_ring.h).

LGUEST_VRING_ALIGN = 4096
MAX_QUEUE_SIZE = 32768          # 2.7: "Queue Size ... maximum is 32768"

VRING_DESC_F_NEXT = 1           # the buffer continues in descriptor `next`
VRING_DESC_F_WRITE = 2          # device-writable (otherwise device-readable)
VRING_DESC_F_INDIRECT = 4       # the buffer is a table of descriptors (2.7.5.3)

VRING_USED_F_NO_NOTIFY = 1      # device to driver: don't kick me (2.7.10)
VRING_AVAIL_F_NO_INTERRUPT = 1  # driver to device: don't interrupt me (2.7.7)

VIRTIO_RING_F_INDIRECT_DESC = 28  # feature bits, for the device code
VIRTIO_RING_F_EVENT_IDX = 29

DESC_SIZE = 16
# numpy dtype specs, for memory.array(): plain lists, so that importing this
# module does not import numpy (a guest that never starts a queue needs none).
DESC_DTYPE = [("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")]
USED_ELEM_DTYPE = [("id", "<u4"), ("len", "<u4")]

U16 = 0xFFFF
U32_MAX = 0xFFFFFFFF


class RingRule(Rule):
    """The rules of the split ring that pop() checks, one member each.

    Sections are virtio 1.2's, where the split virtqueue is 2.7 (virtio
    1.0 numbers it 2.4: tests/virtio_model.py cites those).  The names are
    the ones the reference model gives the same rules, so the ring fuzzer
    can compare the two; None marks pylguest's own rules: guest memory the
    spec takes for granted, and a bound it does not set.
    """
    # The ring itself: no chain to blame.
    QUEUE_SIZE = "queue size", "2.7"          # a power of two, at most 32768
    RING_MEMORY = "ring memory"               # the ring lies in guest memory
    AVAIL_IDX = "avail idx", "2.7.13.3"       # at most num entries ahead of us
    HEAD = "head", "2.7.6"                    # a head indexes the table
    # One chain: its head is known.
    LOOP = "loop", "2.7.5.2"                  # a chain never visits a descriptor twice
    NEXT = "next", "2.7.5"                    # `next` indexes its own table
    INDIRECT_FEATURE = "indirect feature", "2.7.5.3.1"  # only if negotiated
    INDIRECT_NESTED = "indirect nested", "2.7.5.3.1"    # no table inside a table
    INDIRECT_NEXT = "indirect next", "2.7.5.3.1"        # not INDIRECT and NEXT at once
    INDIRECT_SIZE = "indirect size", "2.7.5.3"  # len a non-zero multiple of 16
    INDIRECT_BOUND = "indirect bound"         # at most MAX_QUEUE_SIZE entries
    INDIRECT_MEMORY = "indirect memory"       # the table lies in guest memory
    MEMORY = "memory"                         # each buffer lies in guest memory
    ORDER = "order", "2.7.4.2"                # device-writable parts come last
    TOTAL = "total", "2.7.5.2"                # at most 2^32 - 1 bytes in all


class VirtqueueError(GuestError):
    """The guest broke a rule of the virtqueue format.

    The message names the queue and the rule, in words; `rule` is the
    RingRule, `section` its spec section, `queue` the queue's label.
    `head` is the descriptor index of the offending chain when there is
    one (a lenient device may give it back with push(head, 0)); None when
    the ring itself is broken.
    """


# --- Where the parts of a ring are (2.7.2, legacy layout).

def _align_up(value, align):
    return (value + align - 1) & ~(align - 1)


def vring_size(num, align=LGUEST_VRING_ALIGN):
    """Bytes taken by a legacy split ring of `num` entries (Linux's vring_size).

    The descriptor table and available ring (with its trailing used_event)
    are packed together; the used ring (with its trailing avail_event)
    starts at the next `align` boundary.
    """
    driver_part = DESC_SIZE * num + 2 * (3 + num)
    return _align_up(driver_part, align) + 2 * 3 + 8 * num


def vring_addresses(gpa, num, align=LGUEST_VRING_ALIGN):
    """(descriptor table, available ring, used ring) addresses of a ring at gpa."""
    avail = gpa + DESC_SIZE * num
    used = _align_up(avail + 2 * (3 + num), align)
    return gpa, avail, used


def vring_need_event(event_idx, new_idx, old_idx):
    """Did the index move from old_idx to new_idx cross `event_idx`?

    The spec's helper (2.7.7.2 / 2.7.10, "vring_need_event"): the other side
    asked to be told once entry number event_idx is reached, and we have
    gone from old_idx to new_idx since we last told it.  All u16: the
    subtraction wraps, which is what makes it right across 65535 -> 0.
    """
    return ((new_idx - event_idx - 1) & U16) < ((new_idx - old_idx) & U16)


# Python has no memory fence.  On x86 any locked instruction is a full
# barrier, and taking an uncontended lock executes one (a locked cmpxchg
# in the pthread/semaphore code), so acquiring and releasing this lock is
# our smp_mb().  See the comments at its two callers for why they need it.
_FENCE = threading.Lock()


def full_barrier():
    """Order our earlier stores to guest memory before our later loads."""
    with _FENCE:
        pass


# --- What pop() hands to device code.

@dataclass(frozen=True, slots=True)
class Buffer:
    """A guest buffer [gpa, gpa + length), checked to lie in guest memory."""
    gpa: int
    length: int


@dataclass(frozen=True, slots=True)
class DescriptorChain:
    """One request from the guest, parsed and validated (2.7.4 message framing).

    `head` is the descriptor index to give back in the used ring; the
    buffers are split into the device-readable part (the request) and the
    device-writable part that follows it (room for the reply).  Buffers of
    length zero are not kept: they carry no bytes.
    """
    head: int
    readable: tuple
    writable: tuple
    readable_len: int
    writable_len: int

    def readable_views(self, memory):
        """numpy uint8 views of the readable buffers (for os.pwritev)."""
        return [memory.view(b.gpa, b.length) for b in self.readable]

    def writable_views(self, memory):
        """numpy uint8 views of the writable buffers (for os.preadv)."""
        return [memory.view(b.gpa, b.length) for b in self.writable]

    def readable_pieces(self, memory, size):
        """The readable part of the chain, in order, as bytes objects of
        `size` bytes (the last one shorter): a device copying guest data out
        holds one piece at a time, however long the chain is (up to 4 GiB,
        naming the guest's own memory any number of times)."""
        piece = bytearray()
        for buf in self.readable:
            at, left = buf.gpa, buf.length
            while left:
                n = min(left, size - len(piece))
                piece += memoryview(memory.view(at, n))
                at, left = at + n, left - n
                if len(piece) == size:
                    yield bytes(piece)
                    piece.clear()
        if piece:
            yield bytes(piece)

    def write(self, memory, data):
        """Scatter `data` over the writable buffers, in order.

        Stops at the end of the writable part: returns how many bytes were
        written, which is less than len(data) when the guest gave too
        little room.  That count is what push() should report.
        """
        data = memoryview(data).cast("B")
        done = 0
        for buf in self.writable:
            n = min(buf.length, len(data) - done)
            if n == 0:
                break
            memory.write(buf.gpa, data[done:done + n])
            done += n
        return done


def slice_buffers(buffers, start, end):
    """The byte range [start, end) of a list of buffers, as buffers."""
    out, position = [], 0
    for buf in buffers:
        lo, hi = max(start, position), min(end, position + buf.length)
        if lo < hi:
            out.append(Buffer(buf.gpa + lo - position, hi - lo))
        position += buf.length
    return tuple(out)


# --- The queue.

class Virtqueue:
    """The device side of one legacy split virtqueue in guest memory."""

    def __init__(self, memory, name, num, pfn, *, event_idx=False, indirect=False):
        self.memory = memory
        self.name = name                 # "block0/requests": for messages
        self.event_idx = event_idx       # VIRTIO_RING_F_EVENT_IDX accepted
        self.indirect = indirect         # VIRTIO_RING_F_INDIRECT_DESC accepted
        self._check_layout(num, pfn)
        self.num = num
        self.pfn = pfn
        self.gpa = pfn << 12
        desc, avail, used = vring_addresses(self.gpa, num)
        # Views created once, so pop() and push() are a few numpy indexings.
        self._desc = memory.array(desc, DESC_DTYPE, num)
        self._avail = memory.array(avail, "<u2", 3 + num)  # flags, idx, ring, used_event
        self._used_header = memory.array(used, "<u2", 2)   # flags, idx
        self._used_ring = memory.array(used + 4, USED_ELEM_DTYPE, num)
        self._avail_event = memory.array(used + 4 + 8 * num, "<u2", 1)
        self.reset()

    def _error(self, rule, words, head=None):
        """The VirtqueueError for `rule`: the queue's name, then `words`,
        then the rule's spec section, so that message and field agree."""
        if rule.section:
            words += f" (virtio {rule.section})"
        return VirtqueueError(f"{self.name}: {words}", head, rule=rule, queue=self.name)

    def _check_layout(self, num, pfn):
        # 2.7: "Queue Size value is always a power of 2.  The maximum Queue
        # Size value is 32768."  The slot arithmetic (idx % num across the
        # u16 wrap) depends on the power of two.
        if not (isinstance(num, int) and 1 <= num <= MAX_QUEUE_SIZE
                and num & (num - 1) == 0):
            raise self._error(RingRule.QUEUE_SIZE, f"queue size {num!r} is not a power of two "
                              f"from 1 to {MAX_QUEUE_SIZE}")
        size = vring_size(num)
        if pfn < 0 or not self.memory.contains(pfn << 12, size):
            raise self._error(RingRule.RING_MEMORY, f"ring of {num} entries at pfn 0x{pfn:x} "
                              f"(0x{pfn << 12:x}, 0x{size:x} bytes) is not "
                              "inside guest memory")

    def reset(self):
        """Forget all ring state: the guest reset the device.

        Guest memory is not touched: after a reset the ring pages belong to
        the driver again, which reinitialises them before reuse.
        """
        self.last_avail_idx = 0   # available entries consumed so far (u16)
        self.used_idx = 0         # used entries published so far (u16)
        self._signalled_used = 0  # used_idx when needs_interrupt() last decided
        self._notify_enabled = True

    # -- The available side: taking requests.

    def pending(self):
        """How many available entries we have not popped yet."""
        avail_idx = int(self._avail[1])
        count = (avail_idx - self.last_avail_idx) & U16
        # 2.7.13.3: the driver adds at most num entries we have not consumed,
        # since the ring has only num slots.  More means it is lying.
        if count > self.num:
            raise self._error(RingRule.AVAIL_IDX,
                              f"avail idx {avail_idx} is {count} entries ahead of "
                              f"the {self.last_avail_idx} we consumed; a ring of "
                              f"{self.num} holds at most {self.num}")
        return count

    def pop(self):
        """The next available chain, fully validated, or None if there is none.

        The ring entry is consumed even when its chain is then rejected
        (the VirtqueueError carries its head, when in range).
        """
        if self.pending() == 0:
            return None
        # On x86 loads are not reordered with other loads, so having read
        # avail.idx first we see the ring entry and descriptors the driver
        # wrote before publishing it (its side of 2.7.13.3).
        head = int(self._avail[2 + self.last_avail_idx % self.num])
        self.last_avail_idx = (self.last_avail_idx + 1) & U16
        return self._parse_chain(head)

    def _parse_chain(self, head):
        """Walk the chain from `head`: every check, each descriptor read once."""
        if head >= self.num:
            raise self._error(RingRule.HEAD, f"available ring entry names head descriptor {head}, "
                              f"beyond the table of {self.num}")
        memory = self.memory
        table, table_size, in_indirect = self._desc, self.num, False
        readable, writable = [], []
        readable_len = writable_len = 0
        seen_writable = False  # by flag: a zero-length writable one counts too
        index = head
        # The TTL: a chain visits at most table_size descriptors of a table.
        # A longer walk must have looped, which 2.7.5.2 forbids ("this
        # implies that loops in the descriptor chain are forbidden").
        ttl = table_size
        while True:
            if ttl == 0:
                where = "indirect table" if in_indirect else "queue"
                raise self._error(RingRule.LOOP,
                                  f"chain from head {head} is longer than its {where} "
                                  f"of {table_size} descriptors: a loop",
                                  head)
            ttl -= 1
            addr, length, flags, next_index = table.item(index)

            if flags & VRING_DESC_F_INDIRECT:
                self._check_indirect(head, addr, length, flags, in_indirect)
                table_size = length // DESC_SIZE
                table = memory.array(addr, DESC_DTYPE, table_size)
                in_indirect, index, ttl = True, 0, table_size
                continue  # 2.7.5.3: the table's chain starts at its entry 0

            if length:
                self._check_buffer(head, addr, length)
            if flags & VRING_DESC_F_WRITE:
                seen_writable = True
                writable_len += length
                if length:
                    writable.append(Buffer(addr, length))
            else:
                # 2.7.4.2: "The driver MUST place any device-writable
                # descriptor elements after any device-readable descriptor
                # elements."
                if seen_writable:
                    raise self._error(RingRule.ORDER,
                                      f"chain from head {head} has a device-readable "
                                      "descriptor after a device-writable one", head)
                readable_len += length
                if length:
                    readable.append(Buffer(addr, length))
            # 2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than
            # 2^32 bytes in total"; used.len is a u32 and must be able to say it.
            if readable_len + writable_len > U32_MAX:
                raise self._error(RingRule.TOTAL,
                                  f"chain from head {head} is longer than 2^32 - 1 bytes "
                                  "in total: the lengths overflow u32",
                                  head)

            if not flags & VRING_DESC_F_NEXT:
                break
            if next_index >= table_size:
                where = "indirect table" if in_indirect else "queue"
                raise self._error(RingRule.NEXT,
                                  f"descriptor {index} of the chain from head {head} "
                                  f"has next {next_index}, beyond its {where} of "
                                  f"{table_size}", head)
            index = next_index

        return DescriptorChain(head, tuple(readable), tuple(writable),
                               readable_len, writable_len)

    def _check_indirect(self, head, addr, length, flags, in_indirect):
        """The rules of 2.7.5.3 for a descriptor that points at a table."""
        if not self.indirect:
            raise self._error(RingRule.INDIRECT_FEATURE,
                              f"chain from head {head} uses an indirect descriptor, "
                              "but VIRTIO_RING_F_INDIRECT_DESC was not negotiated", head)
        if in_indirect:
            raise self._error(RingRule.INDIRECT_NESTED,
                              f"chain from head {head} has an indirect descriptor "
                              "inside an indirect table", head)
        if flags & VRING_DESC_F_NEXT:
            raise self._error(RingRule.INDIRECT_NEXT,
                              f"chain from head {head} has an indirect descriptor "
                              "with NEXT set too", head)
        if length == 0 or length % DESC_SIZE:
            raise self._error(RingRule.INDIRECT_SIZE,
                              f"chain from head {head} has an indirect table of "
                              f"{length} bytes, not a non-zero multiple of "
                              f"{DESC_SIZE}", head)
        # Our own bound, so that one table cannot make us walk millions of
        # entries; Linux never builds a table this large.
        if length // DESC_SIZE > MAX_QUEUE_SIZE:
            raise self._error(RingRule.INDIRECT_BOUND,
                              f"chain from head {head} has an indirect table of "
                              f"{length // DESC_SIZE} descriptors, more than "
                              f"{MAX_QUEUE_SIZE}", head)
        if not self.memory.contains(addr, length):
            raise self._error(RingRule.INDIRECT_MEMORY,
                              f"chain from head {head} has an indirect table at "
                              f"0x{addr:x} (0x{length:x} bytes) outside guest memory",
                              head)

    def _check_buffer(self, head, addr, length):
        """[addr, addr + length) must lie in guest memory: first byte AND last."""
        if addr + length > 1 << 64:
            raise self._error(RingRule.MEMORY,
                              f"chain from head {head} has a buffer at 0x{addr:x} "
                              f"of 0x{length:x} bytes that wraps past 2^64", head)
        if not self.memory.contains(addr, length):
            raise self._error(RingRule.MEMORY, f"chain from head {head} has a buffer 0x{addr:x}-"
                              f"0x{addr + length:x} outside guest memory", head)

    # -- The used side: giving buffers back.

    def push(self, chain_or_head, written):
        """Return a chain to the guest, saying `written` bytes were written into it.

        2.7.8.2: the element is written first, then used.idx is advanced, so
        the driver never sees an index covering a stale element.  On x86
        stores are not reordered with other stores, so program order is
        enough (a weaker CPU would need a write barrier in between).
        """
        if isinstance(chain_or_head, DescriptorChain):
            head = chain_or_head.head
            if not 0 <= written <= chain_or_head.writable_len:
                raise ValueError(f"{self.name}: {written} bytes written into a chain "
                                 f"with {chain_or_head.writable_len} writable")
        else:
            head = int(chain_or_head)
        if not 0 <= head < self.num:   # a bug in device code, not in the guest
            raise ValueError(f"{self.name}: pushing head {head}, beyond the queue of {self.num}")
        if not 0 <= written <= U32_MAX:
            raise ValueError(f"{self.name}: written length {written} does not fit in u32")
        self._used_ring[self.used_idx % self.num] = (head, written)
        self.used_idx = (self.used_idx + 1) & U16
        self._used_header[1] = self.used_idx

    def needs_interrupt(self):
        """After push()es: should we interrupt the guest now?

        Without EVENT_IDX the guest can only say "never" (2.7.7,
        VRING_AVAIL_F_NO_INTERRUPT).  With it, the guest writes used_event,
        "interrupt me once used.idx passes this", and we ask whether the
        entries published since we last decided crossed it.
        """
        old, new = self._signalled_used, self.used_idx
        self._signalled_used = new
        if old == new:
            return False  # nothing published since last time
        # used.idx was stored above; the guest's flag or used_event must be
        # read after that store is visible, or guest and device can each
        # miss the other's update and the guest sleeps forever.  On x86 a
        # load may pass an earlier store: a full barrier is needed here.
        full_barrier()
        if self.event_idx:
            used_event = int(self._avail[2 + self.num])
            return vring_need_event(used_event, new, old)
        return not int(self._avail[0]) & VRING_AVAIL_F_NO_INTERRUPT

    def set_notification(self, enabled):
        """Ask the guest to kick us (enabled) or not to bother (disabled).

        Without EVENT_IDX this is VRING_USED_F_NO_NOTIFY in used.flags
        (2.7.10).  With EVENT_IDX the flag is ignored by the driver; instead
        avail_event = last_avail_idx asks for a kick when the driver adds
        the entry after those we have consumed.  Disabling is then a no-op:
        the old avail_event is already behind, so no kick comes.

        Returns True when entries are available that we have not popped.
        A backend that finds the ring empty and re-enables kicks must look
        once more when this says True: the driver may have added an entry
        after our look and before it could see the re-enable, and it will
        not kick for that one.  pop_with_notify() does exactly this.
        """
        self._notify_enabled = enabled
        if self.event_idx:
            if enabled:
                self._avail_event[0] = self.last_avail_idx
        else:
            flags = int(self._used_header[0])
            if enabled:
                flags &= ~VRING_USED_F_NO_NOTIFY
            else:
                flags |= VRING_USED_F_NO_NOTIFY
            self._used_header[0] = flags
        if enabled:
            # Our store above must be visible before we read avail.idx
            # below (store then load: x86 needs a full barrier), the mirror
            # of the driver's "write idx, barrier, read flags/avail_event".
            full_barrier()
        return self.pending() > 0

    def pop_with_notify(self):
        """pop(), keeping kicks off while there is work and on when there is none.

        A backend loop is then simply

            while (chain := queue.pop_with_notify()) is not None:
                ...serve it, queue.push(chain, n)...
            if queue.needs_interrupt(): raise the IRQ

        and it can block on its kick eventfd afterwards without losing a
        request (see set_notification for the race it closes).
        """
        chain = self.pop()
        if chain is None:
            if not self.set_notification(True):
                return None
            chain = self.pop()
        if self._notify_enabled and chain is not None:
            self.set_notification(False)
        return chain
