"""The lguest device page (docs/abi.md section 3), byte for byte.

The reader here is a transcription of the seed driver (seed/lguest_device.c):
scan_devices(), desc_size(), lg_vq(), lg_features(), lg_config() and
lg_get_features(), written from the C and not from device_page.py, so an
encoding the guest would misread fails here.
"""

import struct

import pytest

from pylguest.lguest import device_page
from pylguest.lguest.device_page import (FEATURE_LEN, PAGE_SIZE, DeviceSlot, VqConfig, encode,
                                  features_to_bytes, layout_slots)


# --- The seed's reader, in Python.

def seed_desc_size(page, d):
    # sizeof(*desc) + num_vq * sizeof(struct lguest_vqconfig)
    #   + feature_len * 2 + config_len;  sizeof(desc) == 5, vqconfig == 8
    type_, num_vq, feature_len, config_len, status = page[d:d + 5]
    return 5 + num_vq * 8 + feature_len * 2 + config_len


def seed_lg_vq(d):
    return d + 5                                  # (void *)(desc + 1)


def seed_lg_features(page, d):
    return seed_lg_vq(d) + page[d + 1] * 8        # lg_vq(desc) + desc->num_vq


def seed_lg_config(page, d):
    return seed_lg_features(page, d) + page[d + 2] * 2


def seed_get_features(page, d):
    """lg_get_features(): bit i is in_features[i / 8] & (1 << (i % 8))."""
    in_features = seed_lg_features(page, d)
    features = 0
    for i in range(min(page[d + 2] * 8, 32)):
        if page[in_features + i // 8] & (1 << (i % 8)):
            features |= 1 << i
    return features


def seed_scan(page):
    """scan_devices(): every descriptor up to the zero type, as dicts."""
    found = []
    i = 0
    while i < PAGE_SIZE:
        d = i
        if page[d] == 0:
            break
        vq = seed_lg_vq(d)
        feats = seed_lg_features(page, d)
        cfg = seed_lg_config(page, d)
        found.append(dict(
            offset=d, type=page[d], status=page[d + 4], status_at=d + 4,
            vqs=[struct.unpack_from("<HHI", page, vq + 8 * k) for k in range(page[d + 1])],
            host_features=seed_get_features(page, d),
            guest_features_at=feats + page[d + 2],
            guest_features=bytes(page[feats + page[d + 2]:feats + 2 * page[d + 2]]),
            config_at=cfg, config=bytes(page[cfg:cfg + page[d + 3]])))
        i += seed_desc_size(page, d)
    return found, i


def page_of(slots, configs):
    page = bytearray(PAGE_SIZE)
    for slot, config in zip(slots, configs):
        page[slot.offset:slot.offset + slot.size] = encode(slot, config)
    return page


# --- One descriptor, byte for byte.

def test_one_descriptor_bytes():
    slot = DeviceSlot(0, 2, (VqConfig(128, 5, 0x12345),),
                      (1 << 0) | (1 << 9) | (1 << 28) | (1 << 29), 3)
    expected = (b"\x02\x01\x04\x03\x00"            # type 2, 1 vq, 4 feature bytes, config 3, status 0
                b"\x80\x00" b"\x05\x00" b"\x45\x23\x01\x00"   # num 128, irq 5, pfn 0x12345
                b"\x01\x02\x00\x30"                # host: bits 0, 9 | 28, 29
                b"\x00\x00\x00\x00"                # guest: nothing accepted yet
                b"abc")
    assert encode(slot, b"abc") == expected
    assert slot.size == len(expected) == 24


def test_offsets_agree_with_the_seed():
    slot = DeviceSlot(0, 3, (VqConfig(64, 9, 0x401), VqConfig(64, 9, 0x403)), 1 << 29, 12)
    page = page_of([slot], [bytes(range(12))])
    (dev,), end = seed_scan(page)
    assert dev["status_at"] == slot.status_offset == 4
    assert dev["guest_features_at"] == slot.guest_features_offset == 5 + 16 + 4
    assert dev["config_at"] == slot.config_offset == 5 + 16 + 8
    assert dev["config"] == bytes(range(12))
    assert dev["vqs"] == [(64, 9, 0x401), (64, 9, 0x403)]
    assert dev["host_features"] == 1 << 29
    assert dev["guest_features"] == bytes(FEATURE_LEN)
    assert end == slot.size


def test_constants_are_the_seed_struct_sizes():
    assert device_page.DESC_SIZE == 5
    assert device_page.VQCONFIG_SIZE == 8
    assert device_page.STATUS_OFFSET == 4


@pytest.mark.parametrize("bit", range(32))
def test_feature_bit_i_is_byte_i_div_8_bit_i_mod_8(bit):
    raw = features_to_bytes(1 << bit)
    assert len(raw) == FEATURE_LEN
    assert raw[bit // 8] == 1 << (bit % 8)
    assert sum(raw) == raw[bit // 8]               # no other bit set
    slot = DeviceSlot(0, 4, (), 1 << bit, 0)
    (dev,), _ = seed_scan(page_of([slot], [b""]))
    assert dev["host_features"] == 1 << bit


def test_many_features_at_once():
    features = 0xA5C3_0F81
    slot = DeviceSlot(0, 4, (VqConfig(8, 5, 1),), features, 0)
    (dev,), _ = seed_scan(page_of([slot], [b""]))
    assert dev["host_features"] == features


# --- Several devices: packed back to back, unaligned, zero type at the end.

def test_two_devices_back_to_back_unaligned():
    shapes = [(3, [VqConfig(64, 5, 0x101), VqConfig(64, 5, 0x103)], 1 << 28, 6),   # 35 bytes
              (2, [VqConfig(128, 9, 0x105)], (1 << 9) | (1 << 5), 24)]
    slots = layout_slots(shapes)
    assert [s.offset for s in slots] == [0, 35]      # 35: not aligned to anything
    assert slots[1].size == 5 + 8 + 8 + 24
    configs = [b"consol", bytes(range(100, 124))]
    page = page_of(slots, configs)
    found, end = seed_scan(page)
    assert [d["offset"] for d in found] == [0, 35]
    assert [d["type"] for d in found] == [3, 2]
    assert found[1]["vqs"] == [(128, 9, 0x105)]
    assert found[1]["host_features"] == (1 << 9) | (1 << 5)
    assert [d["config"] for d in found] == configs
    assert end == 35 + 45 and page[end] == 0         # the terminating zero type


def test_layout_keeps_the_launchers_fields():
    shapes = [(1, [VqConfig(256, 11, 0x200)], 1 << 5, 6)]
    (slot,) = layout_slots(shapes)
    assert (slot.type, slot.vqs, slot.host_features, slot.config_len) == \
        (1, (VqConfig(256, 11, 0x200),), 1 << 5, 6)


def test_empty_page_is_just_the_terminator():
    assert layout_slots([]) == []
    assert seed_scan(bytearray(PAGE_SIZE)) == ([], 0)


# --- Fitting in one page.

def _shapes(last_config_len):
    # 16 devices of 5 + 8 + 242 = 255 bytes, then one of 13 + last_config_len.
    return [(4, [], 0, 242)] * 16 + [(4, [], 0, last_config_len)]


def test_exactly_fills_the_page_with_room_for_the_terminator():
    slots = layout_slots(_shapes(2))                # 16 * 255 + 15 = 4095
    assert slots[-1].offset + slots[-1].size == PAGE_SIZE - 1
    page = page_of(slots, [bytes(242)] * 16 + [b"zz"])
    found, end = seed_scan(page)
    assert len(found) == 17 and end == PAGE_SIZE - 1 and page[end] == 0


def test_no_room_for_the_terminator_is_refused():
    with pytest.raises(ValueError, match="17 devices need 4097 bytes"):
        layout_slots(_shapes(3))                    # 4096 bytes, no zero after them


def test_too_many_devices_for_one_page():
    shape = (2, [VqConfig(128, 5, 0x101)], 0, 24)   # 45 bytes each
    layout_slots([shape] * 91)                       # 4095 bytes: fits
    with pytest.raises(ValueError, match="device page"):
        layout_slots([shape] * 92)
