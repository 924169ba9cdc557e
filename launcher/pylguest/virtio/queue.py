"""The device half of a legacy split virtqueue (virtio 1.x, section 2.7),
as Python sees it.

The ring itself -- the chain walk with every rule below, the used-ring
push, kick suppression and the EVENT_IDX interrupt decision -- is C
(csrc/virtq.c, a tour of its own, which explains the layout and the
indices), compiled into pylguest._native.  There is one implementation
of the rules: the block and net request loops (csrc/blk.c, csrc/net.c)
drive the C ring directly, and `Virtqueue` here wraps the same C ring for
the devices served in Python (console, rng) and for the tests.

Everything the guest wrote may be garbage or hostile, and may change
while we look at it.  So we follow Firecracker: *parse, then act*.
`Virtqueue.pop()` has the C walk read each descriptor of a chain exactly
once, check every rule, and fill in plain (gpa, length) buffers, which
come back as an immutable `DescriptorChain`; device code works from that
value and never from the descriptor table, so a guest rewriting a
descriptor after we checked it changes nothing.  A broken rule comes back
from C as a number and the values it concerns; `VirtqueueError` turns it
into a message that names the queue ("block0/requests: ...") and the
rule, with its spec section.  What to do about it (mark the device
broken, stop the guest) is decided by whoever catches it, never here.

Threads.  One Virtqueue is driven by one thread at a time (its device's
backend, holding the device's lock); nothing here locks.
"""

from typing import NamedTuple

from pylguest._native import ffi, lib
from pylguest.errors import GuestError, Rule

# --- Constants of the ring format: the kernel's include/uapi/linux/virtio_ring.h
# and csrc/pylguest.h, through the extension, so they are the numbers C uses.

MAX_QUEUE_SIZE = lib.PYL_MAX_QUEUE_SIZE   # 2.7: "Queue Size ... maximum is 32768"

VRING_DESC_F_NEXT = lib.VRING_DESC_F_NEXT          # the buffer continues in descriptor `next`
VRING_DESC_F_WRITE = lib.VRING_DESC_F_WRITE        # device-writable (otherwise device-readable)
VRING_DESC_F_INDIRECT = lib.VRING_DESC_F_INDIRECT  # the buffer is a table of descriptors (2.7.5.3)

VRING_USED_F_NO_NOTIFY = lib.VRING_USED_F_NO_NOTIFY          # to the driver: don't kick (2.7.10)
VRING_AVAIL_F_NO_INTERRUPT = lib.VRING_AVAIL_F_NO_INTERRUPT  # to us: don't interrupt (2.7.7)

VIRTIO_RING_F_INDIRECT_DESC = lib.VIRTIO_RING_F_INDIRECT_DESC  # feature bits, for the device code
VIRTIO_RING_F_EVENT_IDX = lib.VIRTIO_RING_F_EVENT_IDX

DESC_SIZE = ffi.sizeof("struct pyl_vring_desc")

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


# --- Where the parts of a ring are (2.7.2, legacy layout), for the driver's
# side (tests/ring_builder.py), the device page and the messages: csrc/virtq.c's
# pyl_vring_layout, the one computation pyl_vq_init uses too.

def _layout(gpa, num):
    layout = ffi.new("struct pyl_vring_layout *")
    lib.pyl_vring_layout(gpa, num, layout)
    return layout


def vring_size(num):
    """Bytes taken by a legacy split ring of `num` entries (Linux's vring_size)."""
    return _layout(0, num).size


def vring_addresses(gpa, num):
    """(descriptor table, available ring, used ring) addresses of a ring at gpa."""
    layout = _layout(gpa, num)
    return layout.desc, layout.avail, layout.used


# --- What pop() hands to device code.

class Buffer(NamedTuple):
    """A guest buffer [gpa, gpa + length), checked to lie in guest memory."""
    gpa: int
    length: int


class DescriptorChain(NamedTuple):
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


# --- The queue.

# The C walk's rule numbers (enum pyl_ring_rule) -> RingRule, by name.
_RULES = {getattr(lib, "PYL_RULE_" + rule.name): rule for rule in RingRule}

# The chain buffer need not be zeroed: C fills in what it reports.
_new_unzeroed = ffi.new_allocator(should_clear_after_alloc=False)


class Virtqueue:
    """The device side of one legacy split virtqueue in guest memory: a
    struct pyl_vq (`c`) and the chain buffer its walks fill in (`c_chain`),
    which the C request loops use directly."""

    def __init__(self, memory, name, num, pfn, *, event_idx=False, indirect=False):
        self.memory = memory
        self.name = name                 # "block0/requests": for messages
        self.event_idx = event_idx       # VIRTIO_RING_F_EVENT_IDX accepted
        self.indirect = indirect         # VIRTIO_RING_F_INDIRECT_DESC accepted
        self.num, self.pfn, self.gpa = num, pfn, None
        self._memory_c = memory.c_memory
        self.c = ffi.new("struct pyl_vq *")
        if not (isinstance(num, int) and 0 <= num < 1 << 32):
            self.c.fault.rule = lib.PYL_RULE_QUEUE_SIZE   # not even a u32
        elif not (isinstance(pfn, int) and 0 <= pfn < 1 << 64):
            self.c.fault.rule = lib.PYL_RULE_RING_MEMORY
        else:
            lib.pyl_vq_init(self.c, self._memory_c, num, pfn, event_idx, indirect)
        if self.c.fault.rule:
            raise self.fault()
        self.gpa = pfn << 12
        # A chain holds at most num descriptors and one indirect table.
        capacity = num + MAX_QUEUE_SIZE
        self._bufs = _new_unzeroed("struct pyl_buffer[]", capacity)
        self.c_chain = ffi.new("struct pyl_chain *")
        self.c_chain.capacity, self.c_chain.bufs = capacity, self._bufs

    def reset(self):
        """Forget all ring state: the guest reset the device.  Guest memory
        is not touched: the ring pages belong to the driver again."""
        lib.pyl_vq_reset(self.c)

    # Our own indices, in the C struct (tests start a ring mid-way).
    last_avail_idx = property(lambda self: self.c.last_avail_idx,
                              lambda self, v: setattr(self.c, "last_avail_idx", v))
    used_idx = property(lambda self: self.c.used_idx,
                        lambda self, v: setattr(self.c, "used_idx", v))
    _signalled_used = property(lambda self: self.c.signalled_used,
                               lambda self, v: setattr(self.c, "signalled_used", v))

    def position(self):
        """Where the device is in the ring, as a snapshot keeps it: the
        place, and the indices and kick state the ring's memory does not
        hold (virtio/device.py's save_state)."""
        return {"num": self.num, "pfn": self.pfn, "last_avail": self.c.last_avail_idx,
                "used": self.c.used_idx, "signalled": self.c.signalled_used,
                "notify": bool(self.c.notify_enabled)}

    def set_position(self, position):
        """Resume at a saved position (num and pfn were checked by then)."""
        self.c.last_avail_idx = position["last_avail"]
        self.c.used_idx = position["used"]
        self.c.signalled_used = position["signalled"]
        self.c.notify_enabled = int(position["notify"])

    # -- The available side: taking requests.

    def pending(self):
        """How many available entries we have not popped yet."""
        count = lib.pyl_vq_pending(self.c)
        if count < 0:
            raise self.fault()
        return count

    def pop(self):
        """The next available chain, fully validated, or None if there is none.

        The ring entry is consumed even when its chain is then rejected
        (the VirtqueueError carries its head, when in range).
        """
        return self._chain(lib.pyl_vq_pop(self.c, self.c_chain))

    def pop_with_notify(self):
        """pop(), keeping kicks off while there is work and on when there is none.

        A backend loop is then simply

            while (chain := queue.pop_with_notify()) is not None:
                ...serve it, queue.push(chain, n)...
            if queue.needs_interrupt(): raise the IRQ

        and it can block on its kick eventfd afterwards without losing a
        request (see set_notification for the race it closes).
        """
        return self._chain(lib.pyl_vq_pop_with_notify(self.c, self.c_chain))

    def _chain(self, got):
        if got < 0:
            raise self.fault()
        if got == 0:
            return None
        c = self.c_chain
        bufs = self._bufs
        readable = tuple(Buffer(bufs[i].gpa, bufs[i].len) for i in range(c.nreadable))
        writable = tuple(Buffer(bufs[i].gpa, bufs[i].len)
                         for i in range(c.nreadable, c.nreadable + c.nwritable))
        return DescriptorChain(c.head, readable, writable, c.readable_len, c.writable_len)

    # -- The used side: giving buffers back.

    def push(self, chain_or_head, written):
        """Return a chain to the guest, saying `written` bytes were written
        into it (2.7.8.2: the element first, then used.idx)."""
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
        lib.pyl_vq_push(self.c, head, written)

    def needs_interrupt(self):
        """After push()es: should we interrupt the guest now?  (The flag
        without EVENT_IDX, used_event with it: csrc/virtq.c.)"""
        return bool(lib.pyl_vq_needs_interrupt(self.c))

    def set_notification(self, enabled):
        """Ask the guest to kick us (enabled) or not to bother (disabled).

        Returns True when entries are available that we have not popped:
        a backend that finds the ring empty and re-enables kicks must look
        once more then, since the driver will not kick for an entry it
        added before it saw the re-enable.
        """
        pending = lib.pyl_vq_set_notification(self.c, bool(enabled))
        if pending < 0:
            raise self.fault()
        return bool(pending)

    # -- A broken rule, in words.

    def fault(self):
        """The VirtqueueError for the fault C recorded (in this queue's walk,
        or in a C request loop that drove it): the queue's name,
        the rule in words with the values it concerns, then the rule's spec
        section, so that message and field agree."""
        fault = self.c.fault
        rule = _RULES[fault.rule]
        words = _fault_words(rule, fault, self)
        if rule.section:
            words += f" (virtio {rule.section})"
        head = fault.head if fault.has_head else None
        return VirtqueueError(f"{self.name}: {words}", head, rule=rule, queue=self.name)


def _fault_words(rule, fault, queue):
    """What was wrong, from the numbers C recorded for `rule`."""
    head, addr, length = fault.head, fault.addr, fault.len
    chain = f"chain from head {head}"
    where = "indirect table" if fault.in_indirect else "queue"
    if rule is RingRule.QUEUE_SIZE:
        return (f"queue size {queue.num!r} is not a power of two "
                f"from 1 to {MAX_QUEUE_SIZE}")
    if rule is RingRule.RING_MEMORY:
        size = vring_size(queue.num)
        return (f"ring of {queue.num} entries at pfn 0x{queue.pfn:x} "
                f"(0x{queue.pfn << 12:x}, 0x{size:x} bytes) is not inside guest memory")
    if rule is RingRule.AVAIL_IDX:
        return (f"avail idx {fault.avail_idx} is {fault.count} entries ahead of "
                f"the {queue.last_avail_idx} we consumed; a ring of "
                f"{queue.num} holds at most {queue.num}")
    if rule is RingRule.HEAD:
        return (f"available ring entry names head descriptor {head}, "
                f"beyond the table of {queue.num}")
    if rule is RingRule.LOOP:
        return (f"{chain} is longer than its {where} of {fault.table_size} "
                "descriptors: a loop")
    if rule is RingRule.NEXT:
        return (f"descriptor {fault.index} of the {chain} has next {fault.next}, "
                f"beyond its {where} of {fault.table_size}")
    if rule is RingRule.INDIRECT_FEATURE:
        return (f"{chain} uses an indirect descriptor, "
                "but VIRTIO_RING_F_INDIRECT_DESC was not negotiated")
    if rule is RingRule.INDIRECT_NESTED:
        return f"{chain} has an indirect descriptor inside an indirect table"
    if rule is RingRule.INDIRECT_NEXT:
        return f"{chain} has an indirect descriptor with NEXT set too"
    if rule is RingRule.INDIRECT_SIZE:
        return (f"{chain} has an indirect table of {length} bytes, "
                f"not a non-zero multiple of {DESC_SIZE}")
    if rule is RingRule.INDIRECT_BOUND:
        return (f"{chain} has an indirect table of {length // DESC_SIZE} "
                f"descriptors, more than {MAX_QUEUE_SIZE}")
    if rule is RingRule.INDIRECT_MEMORY:
        return (f"{chain} has an indirect table at 0x{addr:x} (0x{length:x} bytes) "
                "outside guest memory")
    if rule is RingRule.MEMORY:
        if addr + length > 1 << 64:
            return (f"{chain} has a buffer at 0x{addr:x} of 0x{length:x} bytes "
                    "that wraps past 2^64")
        return f"{chain} has a buffer 0x{addr:x}-0x{addr + length:x} outside guest memory"
    if rule is RingRule.ORDER:
        return f"{chain} has a device-readable descriptor after a device-writable one"
    return f"{chain} is longer than 2^32 - 1 bytes in total: the lengths overflow u32"
