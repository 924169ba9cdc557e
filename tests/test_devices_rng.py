"""The virtio entropy device (virtio spec 5.4)."""

import pytest
from virtio_rig import DeviceRig

from pylguest.devices import rng
from pylguest.devices.rng import RngDevice
from ring_builder import fill_pattern

PFN = 0x10
DATA_AREA = (0x20000, 0xF0000)
SOURCE = fill_pattern(200_000, seed=11)


@pytest.fixture
def source(tmp_path):
    """A file standing in for /dev/urandom: known bytes, read in order."""
    path = tmp_path / "entropy"
    path.write_bytes(SOURCE)
    return str(path)


def make_rig(memory, source=None):
    device = RngDevice("rng0") if source is None else RngDevice("rng0", source)
    rig = DeviceRig(device, memory, [PFN], DATA_AREA)
    rig.activate()
    return rig


@pytest.fixture
def rig(memory, source):
    rig = make_rig(memory, source)
    yield rig
    rig.device.close()


def test_fills_every_buffer_of_a_chain(rig):
    head, placed = rig.chain(0, [(100, True), (28, True)])
    rig.device.service(0)
    got = rig.memory.read(*placed[0]) + rig.memory.read(*placed[1])
    assert got == SOURCE[:128]
    assert rig.rings[0].used_idx == 1
    assert rig.rings[0].used_elem(0) == (head, 128)
    assert rig.interrupts == 1


def test_successive_requests_take_successive_bytes(rig):
    first, p1 = rig.chain(0, [(16, True)])
    second, p2 = rig.chain(0, [(16, True)])
    rig.device.service(0)
    assert rig.memory.read(*p1[0]) + rig.memory.read(*p2[0]) == SOURCE[:32]
    assert [rig.rings[0].used_elem(n) for n in range(2)] == [(first, 16), (second, 16)]
    assert rig.interrupts == 1                    # one kick, one interrupt


def test_caps_a_request_at_max_bytes(rig):
    cap = rng.MAX_BYTES_PER_REQUEST
    assert cap == 64 * 1024
    head, placed = rig.chain(0, [(cap + 4096, True)])
    rig.device.service(0)
    gpa, _ = placed[0]
    assert rig.rings[0].used_elem(0) == (head, cap)
    assert rig.memory.read(gpa, cap) == SOURCE[:cap]
    assert rig.memory.read(gpa + cap, 4096) == b"\xEE" * 4096    # beyond: untouched


def test_readable_only_chain_gets_nothing(rig):
    head, placed = rig.chain(0, [(b"not for you", False)])
    rig.device.service(0)
    assert rig.rings[0].used_elem(0) == (head, 0)
    assert rig.memory.read(*placed[0]) == b"not for you"


def test_short_source_reports_what_was_written(memory, tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"only10byte")
    rig = make_rig(memory, str(path))
    try:
        head, placed = rig.chain(0, [(64, True)])
        rig.device.service(0)
        assert rig.rings[0].used_elem(0) == (head, 10)
        assert rig.memory.read(placed[0][0], 10) == b"only10byte"
    finally:
        rig.device.close()


def test_urandom_bytes_are_not_constant(memory):
    rig = make_rig(memory)
    try:
        head, placed = rig.chain(0, [(4096, True)])
        rig.device.service(0)
        assert rig.rings[0].used_elem(0) == (head, 4096)
        data = rig.memory.read(*placed[0])
        # 4096 random bytes with fewer than 200 distinct values: p < 1e-100.
        assert len(set(data)) > 200
    finally:
        rig.device.close()


def test_broken_ring_is_reported_with_the_queue_name(rig):
    rig.rings[0].set_avail_idx(65)               # a ring of 64 holds at most 64
    rig.device.service(0)
    assert rig.device.broken
    assert rig.reports[0].startswith("rng0/requests: ")
    assert rig.interrupts == 0
