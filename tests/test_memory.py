"""Guest memory: the layout of regions and the one checked accessor."""

import numpy as np
import pytest

from pylguest.errors import GuestMemoryError
from pylguest.memory import GiB, GuestMemory, Region, plan_regions

MiB = 1 << 20


@pytest.fixture
def memory():
    mem = GuestMemory(plan_regions(16 * MiB, 4096))
    yield mem
    mem.close()


def test_small_guest_is_one_region_with_the_device_area_on_top():
    assert plan_regions(64 * MiB, 8192) == [Region(0, 64 * MiB + 8192, 0)]


def test_ram_above_3g_goes_above_4g():
    regions = plan_regions(5 * GiB, 4096)
    assert regions == [Region(0, 3 * GiB, 0), Region(4 * GiB, 2 * GiB + 4096, 3 * GiB)]


def test_read_write_round_trip(memory):
    memory.write(0x1000, b"lguest")
    assert memory.read(0x1000, 6) == b"lguest"
    memory.write_int(0x2000, 8, 0x1122334455667788)
    assert memory.read_int(0x2000, 4) == 0x55667788


def test_write_takes_any_bytes_like_object_and_zero_clears(memory):
    memory.write(0x1000, bytearray(b"ab"))
    memory.write(0x1002, memoryview(b"cd"))
    memory.write(0x1004, np.array([0x6665], dtype="<u2"))
    assert memory.read(0x1000, 6) == b"abcdef"
    memory.zero(0x1001, 4)
    assert memory.read(0x1000, 6) == b"a\0\0\0\0f"
    with pytest.raises(GuestMemoryError):
        memory.zero(16 * MiB, 8192)           # runs past the end


def test_numpy_views_share_the_bytes(memory):
    ring = memory.array(0x3000, np.uint16, 4)
    ring[:] = [1, 2, 3, 0xFFFF]
    assert memory.read(0x3000, 8) == bytes([1, 0, 2, 0, 3, 0, 0xFF, 0xFF])


def test_the_last_byte_is_accessible_and_one_more_is_not(memory):
    top = 16 * MiB + 4096
    memory.write(top - 1, b"x")
    with pytest.raises(GuestMemoryError):
        memory.view(top - 1, 2)            # starts inside, ends outside
    with pytest.raises(GuestMemoryError):
        memory.view(top, 1)


def test_length_is_checked_not_just_the_start(memory):
    with pytest.raises(GuestMemoryError):
        memory.view(0x1000, 1 << 40)


def test_wraparound_and_negative_are_refused(memory):
    with pytest.raises(GuestMemoryError, match="wraps"):
        memory.view((1 << 64) - 8, 16)
    with pytest.raises(GuestMemoryError):
        memory.view(-1, 4)
    with pytest.raises(GuestMemoryError):
        memory.view(0, -4)


def test_a_range_may_not_span_the_hole_between_regions():
    mem = GuestMemory(plan_regions(3 * GiB + 64 * MiB, 4096))
    try:
        with pytest.raises(GuestMemoryError):
            mem.view(3 * GiB - 4, 8)        # runs off the low region into the hole
        with pytest.raises(GuestMemoryError):
            mem.view(3 * GiB + 16, 4)       # inside the 3-4 GiB hole
        mem.write(4 * GiB, b"high")
        assert mem.read(4 * GiB, 4) == b"high"
    finally:
        mem.close()


def test_cstring_is_bounded_by_limit_and_region(memory):
    memory.write(0x5000, b"hello\0world")
    assert memory.read_cstring(0x5000, 64) == b"hello"
    memory.write(0x6000, b"A" * 100)
    assert memory.read_cstring(0x6000, 10) == b"A" * 10
    top = 16 * MiB + 4096
    memory.write(top - 3, b"abc")
    assert memory.read_cstring(top - 3, 256) == b"abc"
    with pytest.raises(GuestMemoryError):
        memory.read_cstring(top, 16)
