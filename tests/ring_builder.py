"""A mock guest driver, for the tests and benchmarks only: builds split
rings in plain guest memory, and reads back what a device left there.

The tests (and benchmarks) play the guest with it: write descriptors,
publish chains in the available ring, read what the device put in the used
ring.  It writes whatever it is told, including malformed rings, which is
the point: the device must survive them.  No /dev/kvm is involved; any
`GuestMemory` will do.
"""

import fcntl
import os
import socket
import struct

import numpy as np

from pylguest._native import ffi
from pylguest.virtio.queue import (
    DESC_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    vring_addresses, vring_size)

U16 = 0xFFFF
# The ring's entries as the driver writes them (2.7.5, 2.7.8), as numpy dtypes.
DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"),
                       ("flags", "<u2"), ("next", "<u2")])
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])
assert DESC_DTYPE.itemsize == DESC_SIZE and USED_ELEM_DTYPE.itemsize == 8


def before_enabling_kicks(queue, callback):
    """Call `callback()` (None: nothing) each time the Virtqueue `queue`'s
    pop_with_notify() finds the ring empty, just before it turns kicks back
    on -- the moment a racing driver's publish is hardest to see.  The C
    ring's `before_enable` hook (csrc/pylguest.h) is NULL outside tests."""
    if callback is None:
        queue.c.before_enable, queue.test_hook = ffi.NULL, None
        return
    queue.test_hook = ffi.callback("void(void *)", lambda _data: callback())   # kept alive
    queue.c.before_enable = queue.test_hook


class RingBuilder:
    """The driver's side of a legacy split ring of `num` entries at pfn << 12."""

    def __init__(self, memory, num, pfn):
        self.memory, self.num, self.pfn = memory, num, pfn
        desc, avail, used = vring_addresses(pfn << 12, num)
        self.desc = memory.array(desc, DESC_DTYPE, num)
        self.avail = memory.array(avail, "<u2", 3 + num)     # flags, idx, ring, used_event
        self.used = memory.array(used, "<u2", 2)             # flags, idx
        self.used_ring = memory.array(used + 4, USED_ELEM_DTYPE, num)
        self._avail_event = memory.array(used + 4 + 8 * num, "<u2", 1)
        self.avail_idx = 0       # the driver's own copy of avail.idx
        self.next_free = 0       # next descriptor index add_chain() hands out
        self._data_next = ((pfn << 12) + vring_size(num) + 0xFFF) & ~0xFFF

    # -- Raw writes, for building broken rings.

    def set_desc(self, index, addr, length, flags=0, next_index=0, table=None):
        """Write descriptor `index` of the ring (or of an indirect `table`)."""
        (self.desc if table is None else table)[index] = (addr, length, flags, next_index)

    def publish(self, head):
        """Put `head` in the next available slot, then advance avail.idx."""
        self.avail[2 + self.avail_idx % self.num] = head
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, value):
        self.avail_idx = value & U16
        self.avail[1] = self.avail_idx

    # -- The conveniences a well-behaved driver would use.

    def alloc(self, size, fill=None):
        """Bump-allocate `size` bytes of guest memory above the ring."""
        gpa = self._data_next
        self._data_next = (gpa + size + 15) & ~15
        if fill is not None:
            self.memory.write(gpa, fill)
        return gpa

    def buffer(self, data=b"", size=None):
        """A (gpa, length) holding `data`, or `size` zero bytes."""
        size = len(data) if size is None else size
        return self.alloc(size, data or None), size

    @staticmethod
    def _links(buffers):
        """(addr, len, flags) for each (addr, len, writable), chained with NEXT."""
        last = len(buffers) - 1
        return [(addr, length, (VRING_DESC_F_WRITE if writable else 0)
                 | (VRING_DESC_F_NEXT if i < last else 0))
                for i, (addr, length, writable) in enumerate(buffers)]

    def add_chain(self, buffers, publish=True):
        """Chain [(addr, len, writable), ...] through free descriptors; return the head."""
        indices = [(self.next_free + i) % self.num for i in range(len(buffers))]
        self.next_free = (self.next_free + len(buffers)) % self.num
        for i, (addr, length, flags) in enumerate(self._links(buffers)):
            nxt = indices[i + 1] if i + 1 < len(indices) else 0
            self.set_desc(indices[i], addr, length, flags, nxt)
        if publish:
            self.publish(indices[0])
        return indices[0]

    def indirect_table(self, count):
        """A fresh table of `count` descriptors in guest memory: (gpa, array)."""
        gpa = self.alloc(count * DESC_SIZE, bytes(count * DESC_SIZE))
        return gpa, self.memory.array(gpa, DESC_DTYPE, count)

    def add_indirect(self, buffers, publish=True, table=None):
        """One ring descriptor pointing at a table holding the chain; return
        the head.  `table`: an indirect_table() to reuse (a driver's pool),
        at least len(buffers) long; None: a fresh one."""
        gpa, table = table or self.indirect_table(len(buffers))
        for i, (addr, length, flags) in enumerate(self._links(buffers)):
            table[i] = (addr, length, flags, i + 1 if flags & VRING_DESC_F_NEXT else 0)
        head = self.next_free
        self.next_free = (self.next_free + 1) % self.num
        self.set_desc(head, gpa, len(buffers) * DESC_SIZE, VRING_DESC_F_INDIRECT)
        if publish:
            self.publish(head)
        return head

    # -- Reading back what the device did.

    @property
    def used_idx(self):
        return int(self.used[1])

    @property
    def used_flags(self):
        return int(self.used[0])

    def used_elem(self, n):
        """The used element of the n-th (free-running) used index: (id, len)."""
        return tuple(int(x) for x in self.used_ring[n % self.num].item())

    @property
    def avail_event(self):
        return int(self._avail_event[0])

    # -- The driver's notification knobs.

    def set_avail_flags(self, flags):
        self.avail[0] = flags

    def set_used_event(self, value):
        self.avail[2 + self.num] = value & U16


def link_table(table, length):
    """Fill a descriptor `table` with one chain of len(table) buffers of
    `length` bytes at address 0 (4097 of 1 MiB: a chain past 2^32 bytes)."""
    count = len(table)
    table["addr"] = 0
    table["len"] = length
    table["flags"] = VRING_DESC_F_NEXT
    table["next"][:-1] = range(1, count)
    table["flags"][-1] = 0


def fill_pattern(length, seed=0):
    """Deterministic, recognisable bytes for scatter/gather tests."""
    return ((np.arange(length, dtype=np.uint32) * 7 + seed) & 0xFF).astype(np.uint8).tobytes()


def read_all(chain, memory):
    """The readable part of a chain, gathered into one bytes object: what
    the driver put there.  (Device code never gathers a whole chain: it
    reads DescriptorChain.readable_pieces, a bounded piece at a time.)"""
    return b"".join(memory.read(b.gpa, b.length) for b in chain.readable)


# -- The host's side of a tap, for the net tests and benchmarks.

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1   # <linux/sockios.h>, <net/if.h>


def interface_up(name):
    """Bring host interface `name` up (ip link set NAME up), with IPv6 off
    so that the kernel's own router solicitations stay out of the frames."""
    disable_v6 = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
    if os.path.exists(disable_v6):
        with open(disable_v6, "w") as f:
            f.write("1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", name.encode(), 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags | IFF_UP))
