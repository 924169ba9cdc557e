"""A device on plain memory, attached the way a transport attaches it, with no KVM.

The device tests (test_devices_*.py) play the transport: they attach a
VirtioDevice with a DeviceContext whose interrupt, report and trace are
recorded here, and activate it as the bus does on DRIVER_OK; one
RingBuilder per queue plays the guest's driver.
Buffers come from a data area of their own (`Allocator`), so two devices
can share one GuestMemory without their rings and buffers overlapping.
"""

from pylguest.memory import GuestMemory, Region
from pylguest.virtio.device import DeviceContext
from pylguest.virtio.queue import (DESC_SIZE, VIRTIO_RING_F_EVENT_IDX,
                                   VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT,
                                   VRING_DESC_F_NEXT, VRING_DESC_F_WRITE)
from ring_builder import RingBuilder

MEM_SIZE = 1 << 20


def new_memory():
    return GuestMemory([Region(0, MEM_SIZE, 0)])


class Allocator:
    """Bump allocation of guest buffers inside [start, end)."""

    def __init__(self, memory, start, end):
        self.memory, self.next, self.end = memory, start, end

    def buffer(self, data=b"", size=None, fill=None):
        """(gpa, length) of a buffer holding `data`, or `size` bytes of `fill`."""
        size = len(data) if size is None else size
        gpa = self.next
        self.next = (gpa + size + 15) & ~15
        assert self.next <= self.end, "test data area exhausted"
        if data:
            self.memory.write(gpa, data)
        elif fill is not None:
            self.memory.write(gpa, bytes([fill]) * size)
        return gpa, size


class FakeVm:
    """The two ioctls the bus makes (LguestBus.install), recorded instead of made."""

    def __init__(self):
        self.irqfds, self.ioeventfds = [], []

    def irqfd(self, fd, gsi):
        self.irqfds.append((fd, gsi))

    def ioeventfd(self, fd, addr, length, datamatch=None):
        self.ioeventfds.append((fd, addr, length, datamatch))


class EarlyConsole:
    """The hypercall page's console (HypercallPage(console=...)): what the
    guest printed with early-console notifies."""

    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data


class DeviceRig:
    """One device, its rings at `pfns`, its buffers in `data_area`.

    With attach=True (the device tests) the rig is the device's transport
    too: it attaches the device, counts its interrupts and starts it.  With
    attach=False (the bus tests) a real LguestBus has done that, and the
    rig is only the guest's driver."""

    def __init__(self, device, memory, pfns, data_area, report=None, start=True, attach=True,
                 trace=False):
        """`trace`: give the device a --trace callable (its lines land in
        `traces`); without, it runs as it does when nobody traces."""
        self.device, self.memory = device, memory
        self.reports = [] if report is None else report
        self.traces = []
        if attach:
            self.interrupts = 0
            device.attach(DeviceContext(memory=memory, interrupt=self._interrupt,
                                        report=self.reports.append,
                                        trace=self.traces.append if trace else None))
        self.pfns = list(pfns)
        self.rings = [RingBuilder(memory, num, pfn)
                      for num, pfn in zip(device.queue_sizes, self.pfns)]
        self.data = Allocator(memory, *data_area)
        if attach and start:
            device.start()                # the device's own threads, as the bus starts them

    def _interrupt(self):
        self.interrupts += 1

    def activate(self, features=0, event_idx=False, indirect=False):
        """What the bus does on DRIVER_OK, with these features accepted."""
        features |= (event_idx << VIRTIO_RING_F_EVENT_IDX
                     | indirect << VIRTIO_RING_F_INDIRECT_DESC)
        self.device.activate(features, list(zip(self.device.queue_sizes, self.pfns)))
        return self.device.queues

    def buffer(self, data=b"", size=None, fill=None):
        return self.data.buffer(data, size, fill)

    def indirect_chain(self, index, buffers):
        """Like chain(), but in one indirect table (the queue must accept
        INDIRECT_DESC): for chains longer than the ring."""
        placed = [(*(self.buffer(size=w, fill=0xEE) if isinstance(w, int) else self.buffer(w)),
                   writable) for w, writable in buffers]
        ring = self.rings[index]
        gpa, table = ring.indirect_table(len(placed))
        for i, (addr, length, writable) in enumerate(placed):
            more = i + 1 < len(placed)
            ring.set_desc(i, addr, length, (VRING_DESC_F_WRITE if writable else 0)
                          | (VRING_DESC_F_NEXT if more else 0), i + 1 if more else 0, table=table)
        head = ring.next_free
        ring.next_free = (head + 1) % ring.num
        ring.set_desc(head, gpa, len(placed) * DESC_SIZE, VRING_DESC_F_INDIRECT)
        ring.publish(head)
        return head, [(gpa, length) for gpa, length, _ in placed]

    def chain(self, index, buffers):
        """Post [(data_or_size, writable), ...] on queue `index`; return
        (head, [(gpa, length), ...])."""
        placed = []
        for what, writable in buffers:
            if isinstance(what, int):
                gpa, length = self.buffer(size=what, fill=0xEE)
            else:
                gpa, length = self.buffer(what)
            placed.append((gpa, length, writable))
        head = self.rings[index].add_chain(placed)
        return head, [(gpa, length) for gpa, length, _ in placed]
