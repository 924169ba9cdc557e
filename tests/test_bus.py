"""The lguest bus without KVM: the plan, status changes, kicks, broken devices.

The bus is installed for real (LguestBus.install) on plain memory, with a
FakeVm recording the irqfd and ioeventfd ioctls and a real HypercallPage;
then the tests play the guest: write features and status into the device
page and call status_changed(), or kick a queue the way a QueueWorker does
(bus.kicked, then device.service).  A device's interrupts are what its
irqfd eventfd counted.
"""

import os
import select
import struct
import threading
import time

import pytest
from virtio_rig import MEM_SIZE, DeviceRig, EarlyConsole, FakeVm, new_memory

from pylguest.run import stop
from pylguest.lguest import device_page
from pylguest.lguest.bus import IRQ_POOL, BusRule, LguestBus, status_text
from pylguest.lguest.hypercall import HypercallPage
from pylguest.devices.block import BlockDevice
from pylguest.devices.rng import RngDevice
from pylguest.virtio.device import VirtioDevice
from pylguest.virtio.queue import DESC_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, vring_size
from ring_builder import DESC_DTYPE, RingBuilder, fill_pattern, link_table

RAM_TOP = 0x40000                     # the device page; rings from pfn 0x41
ACK, DRIVER, DRIVER_OK, FAILED = 1, 2, 4, 0x80
F_INDIRECT, F_EVENT_IDX = 1 << 28, 1 << 29
F_BLK_FLUSH = 1 << 9
NEXT, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_INDIRECT
IMAGE = fill_pattern(64 * 512, seed=5)
BLOCK_DATA, RNG_DATA = (0x80000, 0xC0000), (0xC0000, 0xF0000)


class BusRig(DeviceRig):
    """The guest's driver for a device the bus attached."""

    def __init__(self, entry, memory, data_area, reports):
        self.entry, self._interrupts = entry, 0
        super().__init__(entry.device, memory, [vq.pfn for vq in entry.slot.vqs], data_area,
                         reports, attach=False)

    @property
    def interrupts(self):
        """How many times the device wrote its irqfd eventfd."""
        fd = self.entry.irq_fd
        if select.select([fd], [], [], 0)[0]:
            self._interrupts += os.eventfd_read(fd)
        return self._interrupts


class Guest:
    """A machine's worth of bus, for a block0 and an rng0 sharing memory."""

    def __init__(self, tmp_path):
        image = tmp_path / "disk.img"
        image.write_bytes(IMAGE)
        self.image = image
        source = tmp_path / "entropy"
        source.write_bytes(fill_pattern(4096, seed=9))
        self.memory = new_memory()
        self.block = BlockDevice("block0", str(image))
        self.rng = RngDevice("rng0", str(source))
        self.reports = []
        self.traces = []
        self.bus = bus = LguestBus([self.block, self.rng])
        self.vm = FakeVm()
        self.hypercalls = HypercallPage(self.memory, RAM_TOP, EarlyConsole(), self.reports.append)
        bus.install(self.memory, RAM_TOP, self.vm, self.hypercalls, self.reports.append,
                    self.traces.append)
        self.rigs = {e.device.name: BusRig(e, self.memory, data, self.reports)
                     for e, data in zip(bus.entries, (BLOCK_DATA, RNG_DATA))}
        self.entry = {e.device.name: e for e in bus.entries}

    def close(self):
        assert self.bus.close() == []
        self.memory.close()

    # -- what the guest's driver (the seed) does

    def set_features(self, name, features):
        slot = self.entry[name].slot
        self.memory.write_int(RAM_TOP + slot.guest_features_offset, 4, features)

    def guest_features(self, name):
        slot = self.entry[name].slot
        return self.memory.read_int(RAM_TOP + slot.guest_features_offset, 4)

    def set_status(self, name, status):
        entry = self.entry[name]
        self.memory.write(RAM_TOP + entry.slot.status_offset, bytes([status]))
        assert self.bus.status_changed(entry) is None

    def start(self, name, features):
        self.set_status(name, 0)
        self.set_status(name, ACK)
        self.set_status(name, ACK | DRIVER)
        self.set_features(name, features)
        self.set_status(name, ACK | DRIVER | DRIVER_OK)

    def kick(self, name, index=0):
        entry = self.entry[name]
        self.bus.kicked(entry, index)
        entry.device.service(index)

    def fresh_ring(self, name, index=0):
        """The driver reinitialises its ring after a reset."""
        rig = self.rigs[name]
        slot = self.entry[name].slot
        vq = slot.vqs[index]
        self.memory.view(vq.pfn << 12, vring_size(vq.num))[:] = 0
        rig.rings[index] = RingBuilder(self.memory, vq.num, vq.pfn)

    def read_request(self, sector=0):
        """Post a one-sector read on block0; return (head, data buffer, status buffer)."""
        rig = self.rigs["block0"]
        head, placed = rig.chain(0, [(b"\0" * 4 + b"\0" * 4 + sector.to_bytes(8, "little"), False),
                                     (512, True), (1, True)])
        return head, placed[1], placed[2]

    def rng_works(self):
        """A good rng0 request is served: used ring updated, interrupt raised."""
        rig = self.rigs["rng0"]
        ring = rig.rings[0]
        before_idx, before_irqs = ring.used_idx, rig.interrupts
        head, placed = rig.chain(0, [(32, True)])
        self.kick("rng0")
        assert ring.used_idx == before_idx + 1
        assert ring.used_elem(before_idx) == (head, 32)
        assert rig.memory.read(*placed[0]) != b"\xEE" * 32
        assert rig.interrupts == before_irqs + 1
        return True


@pytest.fixture
def guest(tmp_path):
    g = Guest(tmp_path)
    yield g
    g.close()


# --- The plan: where rings go, which IRQ each device gets.

class Fake(VirtioDevice):
    type = 4

    def __init__(self, name, sizes):
        super().__init__(name)
        self.queue_sizes = sizes
        self.queue_names = tuple(f"q{i}" for i in range(len(sizes)))

    def process(self, index, vq):
        return False


def test_plan_places_rings_after_the_device_page():
    # Pages per ring, by hand: vring_size(128) = 4096 + 6 + 1024, 2 pages;
    # vring_size(64) = 4096 + 6 + 512, 2 pages; vring_size(256) =
    # 8192 + 6 + 2048, 3 pages; vring_size(8) = 4096 + 70, 2 pages.
    devices = [Fake("a", (128,)), Fake("b", (64, 64)), Fake("c", (256, 256)), Fake("d", (8,))]
    ram_top = 0x8000000
    bus = LguestBus(devices)
    slots = bus.plan(ram_top)
    pfns = [[vq.pfn for vq in s.vqs] for s in slots]
    first = (ram_top + 4096) >> 12
    assert first == 0x8001
    assert pfns == [[first], [first + 2, first + 4], [first + 6, first + 9], [first + 12]]
    assert bus.area_size == 4096 * (1 + 14)
    # Page aligned (a pfn), in order, none overlapping, all inside the area.
    rings = sorted((vq.pfn << 12, (vq.pfn << 12) + vring_size(vq.num))
                   for s in slots for vq in s.vqs)
    for (_, end), (start, _) in zip(rings, rings[1:]):
        assert end <= start
    assert rings[0][0] >= ram_top + 4096
    assert rings[-1][1] <= ram_top + bus.area_size
    assert [vq.num for s in slots for vq in s.vqs] == [128, 64, 64, 256, 256, 8]


def test_plan_irqs_from_the_pool_in_order():
    devices = [Fake(f"d{i}", (8, 8)) for i in range(11)]
    slots = LguestBus(devices).plan(0x100000)
    irqs = [{vq.irq for vq in s.vqs} for s in slots]
    assert irqs == [{5}, {9}, {10}, {11}, {12}, {14}, {15}, {6}, {7}, {5}, {9}]
    assert IRQ_POOL == (5, 9, 10, 11, 12, 14, 15, 6, 7)


def test_plan_lays_out_the_page_with_host_features():
    devices = [Fake("a", (8,)), Fake("b", (16, 16))]
    slots = LguestBus(devices).plan(0x100000)
    assert [s.offset for s in slots] == [0, 5 + 8 + 8]
    assert all(s.host_features == F_INDIRECT | F_EVENT_IDX for s in slots)
    assert [s.type for s in slots] == [4, 4]


@pytest.mark.parametrize("status, text", [
    (0, "0 (reset)"),
    (1, "0x01 (ACKNOWLEDGE)"),
    (7, "0x07 (ACKNOWLEDGE|DRIVER|DRIVER_OK)"),
    (0x83, "0x83 (ACKNOWLEDGE|DRIVER|FAILED)"),
    (0x40, "0x40 (unknown bits)"),
])
def test_status_text(status, text):
    assert status_text(status) == text


# --- Status changes.

def test_driver_ok_starts_with_the_guest_features(guest):
    entry = guest.entry["block0"]
    guest.set_status("block0", ACK)
    guest.set_status("block0", ACK | DRIVER)
    guest.set_features("block0", F_EVENT_IDX | F_BLK_FLUSH)
    assert not entry.device.active and guest.block.queues == []
    guest.set_status("block0", ACK | DRIVER | DRIVER_OK)
    assert entry.device.active
    assert guest.block.guest_features == F_EVENT_IDX | F_BLK_FLUSH
    (vq,) = guest.block.queues
    assert (vq.num, vq.pfn, vq.name) == (128, entry.slot.vqs[0].pfn, "block0/requests")
    assert vq.event_idx and not vq.indirect
    assert guest.traces and any("block0" in t for t in guest.traces)


def test_status_zero_resets(guest):
    entry = guest.entry["block0"]
    guest.start("block0", F_INDIRECT | F_BLK_FLUSH)
    head, data, _ = guest.read_request(2)
    guest.kick("block0")
    assert guest.rigs["block0"].rings[0].used_elem(0) == (head, 513)
    guest.set_status("block0", 0)
    assert not entry.device.active
    assert guest.block.queues == [] and guest.block.guest_features == 0
    assert guest.guest_features("block0") == 0                  # cleared in the page
    assert not guest.entry["rng0"].device.active                       # rng0 was never involved


def test_failed_is_reported_and_resets(guest):
    entry = guest.entry["block0"]
    guest.start("block0", F_BLK_FLUSH)
    guest.set_status("block0", ACK | DRIVER | DRIVER_OK | FAILED)
    assert not entry.device.active and guest.block.queues == []
    assert guest.guest_features("block0") == 0
    assert any("block0" in r and "FAILED" in r for r in guest.reports), guest.reports


def test_unoffered_feature_is_refused(guest):
    entry = guest.entry["block0"]
    guest.start("block0", F_BLK_FLUSH | 1 << 1)                 # bit 1 was never offered
    assert not entry.device.active and guest.block.queues == []
    assert guest.block.broken and "0x2" in guest.block.broken
    assert guest.block.fault.rule is BusRule.FEATURES and guest.block.fault.rule.section == "2.2.1"
    assert any("never offered" in r and "block0" in r for r in guest.reports)
    guest.kick("block0")                                        # a kick does not start it
    assert not entry.device.active
    # The guest resets and accepts only what was offered: it starts.
    guest.start("block0", F_BLK_FLUSH)
    assert entry.device.active and not guest.block.broken


def test_only_a_reset_brings_a_refused_device_back(guest):
    entry = guest.entry["block0"]
    guest.start("block0", 1 << 1)                              # refused
    # The guest quietly fixes its features and sets DRIVER_OK again,
    # without the reset that "marked broken until the guest resets it" asks for.
    guest.set_features("block0", F_BLK_FLUSH)
    guest.set_status("block0", ACK | DRIVER | DRIVER_OK)
    assert not entry.device.active and guest.block.broken
    guest.start("block0", F_BLK_FLUSH)                         # status 0 first: it starts
    assert entry.device.active and not guest.block.broken


def test_host_features_in_the_page_are_not_trusted(guest):
    entry = guest.entry["block0"]
    slot = entry.slot
    host_at = RAM_TOP + slot.guest_features_offset - device_page.FEATURE_LEN
    guest.memory.write_int(host_at, 4, 0xFFFFFFFF)              # "everything is offered"
    guest.start("block0", 1 << 1)
    assert not entry.device.active and guest.block.broken


def test_vq_config_in_the_page_is_not_trusted(guest):
    entry = guest.entry["block0"]
    vq_at = RAM_TOP + entry.slot.offset + device_page.DESC_SIZE
    guest.memory.write(vq_at, b"\x03\x00\x01\x00\xff\xff\xff\x00")   # num 3, pfn far away
    guest.start("block0", 0)
    assert entry.device.active
    (vq,) = guest.block.queues
    assert (vq.num, vq.pfn) == (128, entry.slot.vqs[0].pfn)


def test_kick_on_an_inactive_device_starts_it(guest):
    entry = guest.entry["block0"]
    guest.set_status("block0", ACK | DRIVER)
    guest.set_features("block0", F_BLK_FLUSH)
    head, data, status = guest.read_request(3)
    guest.kick("block0")                                        # before DRIVER_OK
    assert entry.device.active and guest.block.guest_features == F_BLK_FLUSH
    ring = guest.rigs["block0"].rings[0]
    assert ring.used_elem(0) == (head, 513)
    assert guest.memory.read(*data) == IMAGE[3 * 512:4 * 512]
    # DRIVER_OK afterwards keeps the running queue (and its indices).
    queue = guest.block.queues[0]
    guest.set_status("block0", ACK | DRIVER | DRIVER_OK)
    assert guest.block.queues[0] is queue and queue.last_avail_idx == 1
    head2, _, _ = guest.read_request(4)
    guest.kick("block0")
    assert ring.used_idx == 2 and ring.used_elem(1) == (head2, 513)


def test_reset_then_start_again_in_the_same_boot(guest):
    entry = guest.entry["block0"]
    guest.start("block0", F_BLK_FLUSH)
    for sector in range(3):
        guest.read_request(sector)
    guest.kick("block0")
    assert guest.rigs["block0"].rings[0].used_idx == 3
    guest.set_status("block0", 0)
    guest.fresh_ring("block0")
    guest.start("block0", F_INDIRECT)
    assert entry.device.active and guest.block.guest_features == F_INDIRECT
    head, data, status = guest.read_request(9)
    guest.kick("block0")
    ring = guest.rigs["block0"].rings[0]
    assert ring.used_idx == 1 and ring.used_elem(0) == (head, 513)
    assert guest.memory.read(*data) == IMAGE[9 * 512:10 * 512]
    assert guest.memory.read(*status) == b"\0"


# --- Broken devices: a malformed ring breaks block0 and nothing else.

def _avail_too_far_ahead(ring, alloc):
    ring.set_avail_idx(ring.num + 1)


def _head_out_of_range(ring, alloc):
    ring.publish(ring.num)


def _next_out_of_range(ring, alloc):
    ring.set_desc(0, alloc(16), 16, NEXT, ring.num)
    ring.publish(0)


def _descriptor_loop(ring, alloc):
    addr = alloc(16)
    ring.set_desc(0, addr, 16, NEXT, 1)
    ring.set_desc(1, addr, 16, NEXT, 0)
    ring.publish(0)


def _chain_longer_than_queue(ring, alloc):
    addr = alloc(16)
    for i in range(ring.num):
        ring.set_desc(i, addr, 16, NEXT, (i + 1) % ring.num)
    ring.publish(5)


def _buffer_outside_memory(ring, alloc):
    ring.set_desc(0, MEM_SIZE - 8, 16, 0)            # first byte in, last byte out
    ring.publish(0)


def _nested_indirect(ring, alloc):
    inner = alloc(DESC_SIZE)
    outer_gpa = alloc(DESC_SIZE)
    ring.memory.write(outer_gpa, inner.to_bytes(8, "little") + DESC_SIZE.to_bytes(4, "little")
                      + INDIRECT.to_bytes(2, "little") + bytes(2))
    ring.set_desc(0, outer_gpa, DESC_SIZE, INDIRECT)
    ring.publish(0)


def _indirect_length_not_multiple_of_16(ring, alloc):
    ring.set_desc(0, alloc(64), 24, INDIRECT)
    ring.publish(0)


def _readable_after_writable(ring, alloc):
    ring.add_chain([(alloc(16), 16, True), (alloc(16), 16, False)])


def _total_length_overflow(ring, alloc):
    count = 4097                                     # 4097 x 1 MiB > 2^32
    gpa = alloc(count * DESC_SIZE)
    link_table(ring.memory.array(gpa, DESC_DTYPE, count), MEM_SIZE)
    ring.set_desc(0, gpa, count * DESC_SIZE, INDIRECT)
    ring.publish(0)


BROKEN = {
    "avail idx too far ahead": (_avail_too_far_ahead, "2.7.13.3"),
    "head out of range": (_head_out_of_range, "head descriptor 128"),
    "next out of range": (_next_out_of_range, "next 128"),
    "descriptor loop": (_descriptor_loop, "loop"),
    "chain longer than the queue": (_chain_longer_than_queue, "longer than its queue of 128"),
    "buffer outside guest memory": (_buffer_outside_memory, "outside guest memory"),
    "nested indirect": (_nested_indirect, "inside an indirect table"),
    "indirect length not a multiple of 16": (_indirect_length_not_multiple_of_16, "multiple of 16"),
    "readable after writable": (_readable_after_writable, "2.7.4.2"),
    "total length overflow": (_total_length_overflow, "overflow u32"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_block_ring_leaves_rng_serving(guest, case):
    build, words = BROKEN[case]
    guest.start("block0", F_INDIRECT)
    guest.start("rng0", F_INDIRECT)
    assert guest.rng_works()
    block_rig = guest.rigs["block0"]
    alloc = lambda size: block_rig.buffer(size=size, fill=0)[0]
    build(block_rig.rings[0], alloc)

    guest.kick("block0")
    assert guest.block.broken
    (report,) = [r for r in guest.reports if "block0" in r]
    assert report.startswith("block0/requests: "), report
    assert words in report, report
    assert "device block0 marked broken" in report
    assert block_rig.interrupts == 0
    assert open(guest.image, "rb").read() == IMAGE

    # The rest of the machine never notices.
    assert guest.entry["rng0"].device.active and not guest.rng.broken
    assert guest.rng_works()

    # block0 serves nothing more until the guest resets it...
    guest.kick("block0")
    assert block_rig.rings[0].used_idx == 0
    # ...and after a reset it works again.
    guest.set_status("block0", 0)
    assert not guest.block.broken
    guest.fresh_ring("block0")
    guest.start("block0", F_INDIRECT)
    head, data, _ = guest.read_request(1)
    guest.kick("block0")
    assert block_rig.rings[0].used_elem(0) == (head, 513)
    assert guest.memory.read(*data) == IMAGE[512:1024]
    assert guest.rng_works()



# --- The vCPU never waits long for a device (the run's stop depends on it).

def big_read(guest, megabytes):
    """A read of `megabytes` MiB into one 1 MiB buffer named again and again
    (an indirect table), from a sparse image; returns the head."""
    rig = guest.rigs["block0"]
    ring = rig.rings[0]
    header_gpa, _ = rig.buffer(b"\0" * 16)
    status_gpa, _ = rig.buffer(size=1, fill=0xEE)
    table_gpa, table = ring.indirect_table(megabytes + 2)
    table[0] = (header_gpa, 16, NEXT, 1)
    for i in range(1, megabytes + 1):
        table[i] = (0, MEM_SIZE, NEXT | 2, i + 1)
    table[megabytes + 1] = (status_gpa, 1, 2, 0)
    ring.set_desc(0, table_gpa, (megabytes + 2) * DESC_SIZE, INDIRECT)
    ring.publish(0)
    return 0


def test_a_reset_abandons_the_request_in_flight(guest):
    # A read of 4095 MiB from a sparse image: seconds of preadv calls of
    # 1 MiB each, which the reset must not wait for.
    with open(guest.image, "r+b") as f:
        f.truncate(4 << 30)
    guest.block.capacity = guest.block._c.capacity = (4 << 30) // 512
    guest.start("block0", F_INDIRECT)
    big_read(guest, 4095)
    worker = threading.Thread(target=guest.kick, args=("block0",))
    worker.start()
    deadline = time.monotonic() + 5
    while guest.block.io_counts[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.001)                          # until the read is under way
    assert guest.block.io_counts[0] >= 2
    started = time.monotonic()
    guest.set_status("block0", 0)                  # the guest's reset, on the "vCPU"
    took = time.monotonic() - started
    worker.join(30)
    assert took < 0.5, f"the reset waited {took:.2f} s for the request"
    assert guest.block.io_counts[0] < 4095         # it stopped part way
    assert guest.rigs["block0"].rings[0].used_idx == 0     # never completed
    assert not guest.entry["block0"].device.active and guest.block.broken is None


def test_a_stop_frees_the_vcpu_from_a_device_that_will_not_let_go(guest, monkeypatch):
    # fdatasync cannot be cut in pieces: a worker in it holds the lock.
    # A reset must then give way to a stop request, not wait for the disk.
    guest.start("block0", F_BLK_FLUSH)
    in_flush = threading.Event()
    serve = guest.block.process

    def stuck_in_fdatasync(index, vq):
        # The device's request loop, inside one system call that takes 5 s.
        in_flush.set()
        time.sleep(5)
        return serve(index, vq)
    monkeypatch.setattr(guest.block, "process", stuck_in_fdatasync)
    rig = guest.rigs["block0"]
    rig.chain(0, [(struct.pack("<IIQ", 4, 0, 0), False), (1, True)])      # FLUSH
    worker = threading.Thread(target=guest.kick, args=("block0",), daemon=True)
    worker.start()
    assert in_flush.wait(5)
    threading.Timer(0.3, guest.bus.stopping.request, args=(stop.timeout(1),)).start()
    started = time.monotonic()
    guest.set_status("block0", 0)
    took = time.monotonic() - started
    assert 0.25 < took < 1.0, f"status_changed returned after {took:.2f} s"
    worker.join(10)
