"""The split virtqueue (virtio 1.x section 2.7, legacy layout), over plain memory.

A RingBuilder plays the guest's driver in a 1 MiB GuestMemory; no /dev/kvm.
One test per malformed ring the device must refuse, each checking the rule
the error names (its RingRule, not its wording) and that the message names
the queue, then the good paths.
"""


import pytest
from virtio_model import need_event

from pylguest.errors import GuestError
from pylguest.memory import GuestMemory, Region
from pylguest.virtio.queue import (
    DESC_SIZE, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
    Buffer, DescriptorChain, RingRule, Virtqueue, VirtqueueError, vring_addresses,
    vring_size)
from ring_builder import RingBuilder, before_enabling_kicks, fill_pattern, link_table, read_all

NAME = "block0/requests"
NUM = 8
PFN = 1                      # the ring at 0x1000; buffers from 0x3000 up
MEM_SIZE = 1 << 20
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT


@pytest.fixture
def memory():
    mem = GuestMemory([Region(0, MEM_SIZE, 0)])
    yield mem
    mem.close()


@pytest.fixture
def ring(memory):
    return RingBuilder(memory, NUM, PFN)


@pytest.fixture
def queue(memory):
    return Virtqueue(memory, NAME, NUM, PFN)


def rejected(queue, rule, head=None):
    """pop() must raise VirtqueueError for `rule`, from the chain at `head`
    (None: the ring itself is broken), its message naming the queue."""
    with pytest.raises(VirtqueueError) as info:
        queue.pop()
    return checked(info.value, rule, head)


def checked(error, rule, head=None):
    assert error.rule is rule, error
    assert (error.queue, error.head) == (NAME, head), error
    assert error.section == rule.section
    # What a person reads: the queue first, and the rule's section.
    message = str(error)
    assert message.startswith(NAME + ": "), message
    if rule.section:
        assert message.endswith(f" (virtio {rule.section})"), message
    return error


# --- Layout (2.7.2, "Legacy Interfaces: A Note on Virtqueue Layout").

def test_vring_size_is_linux_legacy_layout():
    # desc 16*num + avail 2*(3+num), aligned to 4096, then used 2*3 + 8*num
    assert vring_size(8) == 4096 + 6 + 64
    assert vring_size(256) == 8192 + 6 + 8 * 256
    assert vring_addresses(0x1000, 8) == (0x1000, 0x1080, 0x2000)


@pytest.mark.parametrize("num", [0, 3, 65536])
def test_bad_queue_size(memory, num):
    with pytest.raises(VirtqueueError) as info:
        Virtqueue(memory, NAME, num, PFN)
    checked(info.value, RingRule.QUEUE_SIZE)


@pytest.mark.parametrize("pfn", [MEM_SIZE >> 12, (MEM_SIZE >> 12) - 1, 1 << 40])
def test_ring_outside_memory(memory, pfn):
    with pytest.raises(VirtqueueError) as info:
        Virtqueue(memory, NAME, NUM, pfn)
    checked(info.value, RingRule.RING_MEMORY)


# --- Malformed rings: one test per rule.

def test_avail_idx_too_far_ahead(ring, queue):
    ring.set_avail_idx(NUM + 1)
    rejected(queue, RingRule.AVAIL_IDX)
    assert queue.last_avail_idx == 0      # the ring is broken, nothing consumed


def test_avail_idx_too_far_ahead_across_the_wrap(ring, queue):
    ring.set_avail_idx(0xFFFF)            # "65535 ahead" of 0, not "-1"
    error = rejected(queue, RingRule.AVAIL_IDX)
    assert queue.last_avail_idx == 0
    # The one line a person reads, whole: queue, what was wrong, section.
    assert str(error) == (f"{NAME}: avail idx 65535 is 65535 entries ahead of the 0 we "
                          "consumed; a ring of 8 holds at most 8 (virtio 2.7.13.3)")


def test_head_out_of_range(ring, queue):
    ring.publish(NUM)
    rejected(queue, RingRule.HEAD)        # no head to give back: it is not one
    assert queue.last_avail_idx == 1      # the entry is consumed
    assert queue.pop() is None


def test_next_out_of_range(ring, queue):
    addr, length = ring.buffer(size=16)
    ring.set_desc(0, addr, length, NEXT, NUM)
    ring.publish(0)
    rejected(queue, RingRule.NEXT, head=0)


def test_descriptor_loop(ring, queue):
    addr, length = ring.buffer(size=16)
    ring.set_desc(0, addr, length, NEXT, 1)
    ring.set_desc(1, addr, length, NEXT, 0)
    ring.publish(0)
    rejected(queue, RingRule.LOOP, head=0)


def test_chain_longer_than_queue(ring, queue):
    # Every descriptor once, then back to the start: num + 1 links.
    addr, length = ring.buffer(size=16)
    for i in range(NUM):
        ring.set_desc(i, addr, length, NEXT, (i + 1) % NUM)
    ring.publish(3)
    rejected(queue, RingRule.LOOP, head=3)


def test_loop_inside_indirect_table(ring, memory):
    queue = Virtqueue(memory, NAME, NUM, PFN, indirect=True)
    addr, length = ring.buffer(size=16)
    table_gpa, table = ring.indirect_table(4)
    for i in range(4):
        ring.set_desc(i, addr, length, NEXT, 2 if i == 3 else i + 1, table=table)
    ring.set_desc(0, table_gpa, 4 * DESC_SIZE, INDIRECT)
    ring.publish(0)
    rejected(queue, RingRule.LOOP, head=0)


def test_buffer_outside_memory(ring, queue):
    # The first byte is inside guest memory, the last is not.
    ring.set_desc(0, MEM_SIZE - 16, 32, 0)
    ring.publish(0)
    rejected(queue, RingRule.MEMORY, head=0)


def test_buffer_wrapping_past_2_64(ring, queue):
    ring.set_desc(0, (1 << 64) - 16, 32, 0)
    ring.publish(0)
    rejected(queue, RingRule.MEMORY, head=0)


def test_indirect_when_not_negotiated(ring, queue):
    ring.add_indirect([(*ring.buffer(size=16), False)])
    rejected(queue, RingRule.INDIRECT_FEATURE, head=0)


@pytest.mark.parametrize("length", [0, 24])
def test_indirect_length_not_a_multiple_of_16(ring, memory, length):
    queue = Virtqueue(memory, NAME, NUM, PFN, indirect=True)
    table_gpa, _ = ring.indirect_table(4)
    ring.set_desc(0, table_gpa, length, INDIRECT)
    ring.publish(0)
    rejected(queue, RingRule.INDIRECT_SIZE, head=0)


def test_indirect_table_beyond_our_bound(ring, memory):
    # pylguest's own bound, before the table is looked at: no section.
    queue = Virtqueue(memory, NAME, NUM, PFN, indirect=True)
    ring.set_desc(0, 0x3000, (32768 + 1) * DESC_SIZE, INDIRECT)
    ring.publish(0)
    assert rejected(queue, RingRule.INDIRECT_BOUND, head=0).section is None


def test_indirect_table_outside_memory(ring, memory):
    queue = Virtqueue(memory, NAME, NUM, PFN, indirect=True)
    ring.set_desc(0, MEM_SIZE - 32, 4 * DESC_SIZE, INDIRECT)
    ring.publish(0)
    rejected(queue, RingRule.INDIRECT_MEMORY, head=0)


def test_nested_indirect(ring, memory):
    queue = Virtqueue(memory, NAME, NUM, PFN, indirect=True)
    inner_gpa, _ = ring.indirect_table(1)
    outer_gpa, outer = ring.indirect_table(1)
    ring.set_desc(0, inner_gpa, DESC_SIZE, INDIRECT, table=outer)
    ring.set_desc(0, outer_gpa, DESC_SIZE, INDIRECT)
    ring.publish(0)
    rejected(queue, RingRule.INDIRECT_NESTED, head=0)


def test_indirect_with_next(ring, memory):
    queue = Virtqueue(memory, NAME, NUM, PFN, indirect=True)
    table_gpa, _ = ring.indirect_table(1)
    ring.set_desc(0, table_gpa, DESC_SIZE, INDIRECT | NEXT, 1)
    ring.publish(0)
    rejected(queue, RingRule.INDIRECT_NEXT, head=0)


def test_readable_after_writable(ring, queue):
    head = ring.add_chain([(*ring.buffer(size=16), True), (*ring.buffer(size=16), False)])
    rejected(queue, RingRule.ORDER, head)


def test_readable_after_zero_length_writable(ring, queue):
    # The rule is about the flags: an empty writable buffer still counts.
    head = ring.add_chain([(0x3000, 0, True), (*ring.buffer(size=16), False)])
    rejected(queue, RingRule.ORDER, head)


def test_total_length_overflows_u32(ring, memory):
    # 4097 buffers of 1 MiB each: more than 2^32 bytes in one chain.
    queue = Virtqueue(memory, NAME, NUM, PFN, indirect=True)
    count = 4097
    table_gpa, table = ring.indirect_table(count)
    link_table(table, MEM_SIZE)
    ring.set_desc(0, table_gpa, count * DESC_SIZE, INDIRECT)
    ring.publish(0)
    rejected(queue, RingRule.TOTAL, head=0)


def test_a_ring_error_is_a_guest_error():
    # What the device layer catches to mark a device broken, whatever broke.
    assert issubclass(VirtqueueError, GuestError)
    assert str(RingRule.LOOP) == "loop" and RingRule("loop") is RingRule.LOOP


# --- Good paths: parsing.

def test_empty_ring_pops_none(queue):
    assert queue.pop() is None


def test_simple_chain(ring, queue):
    addr, _ = ring.buffer(b"hello")
    head = ring.add_chain([(addr, 5, False)])
    chain = queue.pop()
    assert chain == DescriptorChain(head, (Buffer(addr, 5),), (), 5, 0)
    assert queue.pop() is None


def test_readable_then_writable(ring, queue):
    header, _ = ring.buffer(size=16)
    data, _ = ring.buffer(size=512)
    status, _ = ring.buffer(size=1)
    head = ring.add_chain([(header, 16, False), (data, 512, True), (status, 1, True)])
    chain = queue.pop()
    assert chain.head == head
    assert chain.readable == (Buffer(header, 16),)
    assert chain.writable == (Buffer(data, 512), Buffer(status, 1))
    assert (chain.readable_len, chain.writable_len) == (16, 513)


def test_zero_length_buffers_are_dropped(ring, queue):
    addr, _ = ring.buffer(b"x")
    ring.add_chain([(addr, 0, False), (addr, 1, False), (0xDEAD0000, 0, True)])
    chain = queue.pop()
    assert chain.readable == (Buffer(addr, 1),) and chain.writable == ()
    assert (chain.readable_len, chain.writable_len) == (1, 0)


def test_indirect_chain(ring, memory):
    queue = Virtqueue(memory, NAME, NUM, PFN, indirect=True)
    out, _ = ring.buffer(b"request")
    back, _ = ring.buffer(size=64)
    head = ring.add_indirect([(out, 7, False), (back, 64, True)])
    chain = queue.pop()
    assert chain == DescriptorChain(head, (Buffer(out, 7),), (Buffer(back, 64),), 7, 64)


def test_direct_descriptors_then_indirect(ring, memory):
    # 2.7.5.3.2: zero or more chained descriptors, then one indirect one.
    queue = Virtqueue(memory, NAME, NUM, PFN, indirect=True)
    first, _ = ring.buffer(b"a")
    rest, _ = ring.buffer(b"bc")
    table_gpa, table = ring.indirect_table(1)
    ring.set_desc(0, rest, 2, 0, table=table)
    ring.set_desc(5, first, 1, NEXT, 6)
    ring.set_desc(6, table_gpa, DESC_SIZE, INDIRECT)
    ring.publish(5)
    chain = queue.pop()
    assert chain.readable == (Buffer(first, 1), Buffer(rest, 2))
    assert read_all(chain, memory) == b"abc"


def test_a_rejected_chain_is_consumed_and_names_its_head(ring, queue):
    ring.set_desc(2, (1 << 64) - 1, 2, 0)
    ring.publish(2)
    good = ring.add_chain([(*ring.buffer(b"ok"), False)])
    rejected(queue, RingRule.MEMORY, head=2)
    assert queue.pop().head == good


# --- Scatter/gather.

def test_read_all_gathers_readable_buffers(ring, queue, memory):
    parts = [b"scatter ", b"and ", b"gather"]
    ring.add_chain([(ring.buffer(p)[0], len(p), False) for p in parts]
                   + [(*ring.buffer(size=4), True)])
    assert read_all(queue.pop(), memory) == b"scatter and gather"


def test_write_scatters_and_stops_at_writable_len(ring, queue, memory):
    sizes = [3, 5, 7]
    bufs = [ring.buffer(size=n)[0] for n in sizes]
    ring.add_chain([(a, n, True) for a, n in zip(bufs, sizes)])
    chain = queue.pop()
    data = fill_pattern(20)
    assert chain.write(memory, data) == 15          # 20 offered, room for 15
    got = b"".join(memory.read(a, n) for a, n in zip(bufs, sizes))
    assert got == data[:15]
    assert chain.write(memory, b"ab") == 2          # a short write fills the start
    assert memory.read(bufs[0], 3) == b"ab" + data[2:3]


# --- The used ring and interrupts.

def test_push_fills_the_used_ring(ring, queue):
    ring.add_chain([(*ring.buffer(size=8), True)])
    ring.add_chain([(*ring.buffer(size=8), True), (*ring.buffer(size=8), True)])
    first, second = queue.pop(), queue.pop()
    queue.push(second, 16)
    queue.push(first.head, 3)
    assert ring.used_idx == 2 == queue.used_idx
    assert ring.used_elem(0) == (second.head, 16)
    assert ring.used_elem(1) == (first.head, 3)


def test_push_refuses_device_bugs(ring, queue):
    ring.add_chain([(*ring.buffer(size=8), True)])
    chain = queue.pop()
    with pytest.raises(ValueError):
        queue.push(chain, 9)                        # more than it can hold
    with pytest.raises(ValueError):
        queue.push(NUM, 0)


def test_guest_copy_of_used_idx_is_not_trusted(ring, queue):
    ring.add_chain([(*ring.buffer(size=8), True)])
    queue.push(queue.pop(), 0)
    ring.used[1] = 5                                # the guest scribbles
    ring.add_chain([(*ring.buffer(size=8), True)])
    queue.push(queue.pop(), 0)
    assert ring.used_idx == 2


def test_interrupt_without_event_idx(ring, queue):
    ring.add_chain([(*ring.buffer(size=8), True)])
    ring.add_chain([(*ring.buffer(size=8), True)])
    assert not queue.needs_interrupt()              # nothing pushed yet
    queue.push(queue.pop(), 0)
    assert queue.needs_interrupt()
    assert not queue.needs_interrupt()              # already told
    ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    queue.push(queue.pop(), 0)
    assert not queue.needs_interrupt()


@pytest.mark.parametrize("event, new, old, expected", [
    (0, 1, 0, True),            # asked for entry 0, we published it
    (1, 1, 0, False),           # asked for entry 1, only entry 0 is out
    (5, 8, 2, True),            # crossed in the middle of a batch
    (8, 8, 2, False),
    (0xFFFF, 0, 0xFFFE, True),  # the crossing is at the wrap
    (0xFFFE, 3, 0xFFFF, False), # event already behind old: no
    (0, 0, 0, False),           # nothing new
])
def test_vring_need_event(ring, memory, event, new, old, expected):
    # The spec's vring_need_event, through the interrupt decision: we last
    # decided at `old`, have published up to `new`, the guest asked for
    # entry `event`.
    queue = Virtqueue(memory, NAME, NUM, PFN, event_idx=True)
    queue._signalled_used, queue.used_idx = old, new
    ring.set_used_event(event)
    assert queue.needs_interrupt() is expected


def test_interrupt_with_event_idx_across_the_wrap(ring, memory):
    queue = Virtqueue(memory, NAME, NUM, PFN, event_idx=True)
    start = 0xFFFD
    queue.last_avail_idx = queue.used_idx = queue._signalled_used = start
    ring.set_avail_idx(start)
    # The guest wants an interrupt once used entry 0 (after 0xFFFF) exists.
    ring.set_used_event(0)
    for _ in range(4):
        ring.add_chain([(*ring.buffer(size=8), True)])
    for expected_idx, expected in [(0xFFFE, False), (0xFFFF, False), (0, False), (1, True)]:
        queue.push(queue.pop(), 0)
        assert queue.used_idx == ring.used_idx == expected_idx
        assert queue.needs_interrupt() is expected
    # NO_INTERRUPT is not how an EVENT_IDX driver says no: used_event is.
    ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    ring.set_used_event(1)
    ring.add_chain([(*ring.buffer(size=8), True)])
    queue.push(queue.pop(), 0)
    assert queue.needs_interrupt()


# --- Kicks.

def test_set_notification_without_event_idx(ring, queue):
    assert queue.set_notification(False) is False
    assert ring.used_flags & VRING_USED_F_NO_NOTIFY
    ring.add_chain([(*ring.buffer(size=8), True)])
    assert queue.set_notification(True) is True     # work arrived: look again
    assert not ring.used_flags & VRING_USED_F_NO_NOTIFY


def test_set_notification_with_event_idx(ring, memory):
    queue = Virtqueue(memory, NAME, NUM, PFN, event_idx=True)
    for _ in range(3):
        ring.add_chain([(*ring.buffer(size=8), True)])
    queue.pop(), queue.pop()
    assert queue.set_notification(True) is True     # one still pending
    assert ring.avail_event == 2                    # kick me for entry 2 onwards
    assert ring.used_flags == 0                     # the flag is not used
    queue.pop()
    queue.set_notification(False)
    assert ring.avail_event == 2                    # disabling leaves it behind
    assert queue.set_notification(True) is False
    assert ring.avail_event == 3


@pytest.mark.parametrize("event_idx", [False, True])
def test_pop_with_notify(ring, memory, event_idx):
    queue = Virtqueue(memory, NAME, NUM, PFN, event_idx=event_idx)
    assert queue.pop_with_notify() is None          # empty: kicks are on
    assert not ring.used_flags & VRING_USED_F_NO_NOTIFY
    heads = [ring.add_chain([(*ring.buffer(size=8), True)]) for _ in range(2)]
    assert queue.pop_with_notify().head == heads[0]
    if not event_idx:
        assert ring.used_flags & VRING_USED_F_NO_NOTIFY  # busy: kicks are off
    assert queue.pop_with_notify().head == heads[1]
    assert queue.pop_with_notify() is None
    assert not ring.used_flags & VRING_USED_F_NO_NOTIFY
    if event_idx:
        assert ring.avail_event == 2


# --- Reset and the index wrap.

def test_reset_then_reuse(ring, queue, memory):
    for _ in range(3):
        ring.add_chain([(*ring.buffer(size=8), True)])
        queue.push(queue.pop(), 1)
    queue.reset()
    assert (queue.last_avail_idx, queue.used_idx) == (0, 0)
    # The guest's driver starts over on a fresh ring at the same place.
    memory.view(PFN << 12, vring_size(NUM))[:] = 0
    ring = RingBuilder(memory, NUM, PFN)
    head = ring.add_chain([(*ring.buffer(b"again"), False)])
    chain = queue.pop()
    assert chain.head == head and read_all(chain, memory) == b"again"
    queue.push(chain, 0)
    assert ring.used_idx == 1 and ring.used_elem(0) == (head, 0)


def test_ring_indices_wrap_past_65535(ring, queue, memory):
    start = 0xFFFA
    queue.last_avail_idx = queue.used_idx = start
    ring.set_avail_idx(start)
    pushed = []
    for n in range(12):                             # 0xFFFA .. 0x0005
        addr, _ = ring.buffer(bytes([n]))
        head = ring.add_chain([(addr, 1, False), (*ring.buffer(size=16), True)])
        chain = queue.pop()
        assert chain.head == head and read_all(chain, memory) == bytes([n])
        queue.push(chain, n)
        pushed.append((head, n))
    assert queue.pop() is None
    assert queue.last_avail_idx == queue.used_idx == ring.used_idx == 6
    for n in range(NUM):                            # the last NUM entries
        idx = (start + 4 + n) & 0xFFFF
        assert ring.used_elem(idx) == pushed[4 + n]


# --- The rules that say "look again": each test recreates the race it guards.

def driver_would_kick(ring, queue, old_avail_idx):
    """What a driver decides after publishing (virtio 2.7.13.3 / vq_kick)."""
    if queue.event_idx:
        return need_event(ring.avail_event, ring.avail_idx, old_avail_idx)
    return not ring.used_flags & VRING_USED_F_NO_NOTIFY


@pytest.mark.parametrize("event_idx", [False, True])
def test_pop_with_notify_looks_again_after_re_enabling_kicks(ring, memory, event_idx):
    # The lost wakeup: the device finds the ring empty; before its re-enable
    # of kicks is visible, the driver adds a chain, sees kicks still off,
    # and does not kick.  Unless the device looks once more, that chain
    # waits for ever (and so does the guest).
    queue = Virtqueue(memory, NAME, NUM, PFN, event_idx=event_idx)
    ring.add_chain([(*ring.buffer(size=8), True)])
    assert queue.pop_with_notify() is not None             # busy: kicks now off
    raced = {}

    def driver_adds_in_the_window():
        if not raced:
            old = ring.avail_idx
            raced["head"] = ring.add_chain([(*ring.buffer(size=8), True)])
            raced["kicked"] = driver_would_kick(ring, queue, old)

    before_enabling_kicks(queue, driver_adds_in_the_window)
    chain = queue.pop_with_notify()
    assert raced and raced["kicked"] is False              # no kick came for it
    assert chain is not None and chain.head == raced["head"]


def test_the_interrupt_decision_reads_the_drivers_flag_after_the_push(ring, queue):
    # A driver that polled (NO_INTERRUPT) decides to sleep: it clears the
    # flag, looks at the used ring (nothing yet), and sleeps.  The device
    # pushes afterwards: it must read the flag then, not when it popped.
    ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    ring.add_chain([(*ring.buffer(size=8), True)])
    chain = queue.pop()
    ring.set_avail_flags(0)                                # the driver goes to sleep
    queue.push(chain, 0)
    assert queue.needs_interrupt()


def test_the_interrupt_decision_reads_used_event_after_the_push(ring, memory):
    # The same with EVENT_IDX: used_event moved on while we worked.
    queue = Virtqueue(memory, NAME, NUM, PFN, event_idx=True)
    ring.set_used_event(0xFFFF)                            # "don't bother me"
    ring.add_chain([(*ring.buffer(size=8), True)])
    chain = queue.pop()
    ring.set_used_event(0)                                 # "tell me at the next one"
    queue.push(chain, 0)
    assert queue.needs_interrupt()
