"""The lguest device page: one page of device descriptors (docs/abi.md section 3).

This is the contract between the two halves of lguest.  The seed driver
(lguest_device.c, scan_devices()) walks it from the start of the page:

    struct lguest_device_desc { u8 type, num_vq, feature_len, config_len, status; }
    struct lguest_vqconfig    { u16 num; u16 irq; u32 pfn; }   x num_vq
    u8 host_features[feature_len]     what we offer
    u8 guest_features[feature_len]    what the guest accepts (it writes these)
    u8 config[config_len]             the device's config space

packed back to back, unaligned; a zero type ends the list.

The page is guest memory, so the guest can scribble on all of it.  The
launcher therefore keeps its own copy of every field it owns (type, num_vq,
feature_len, config_len, the vqconfigs, the host features) in `DeviceSlot`,
and never reads those back.  It reads only what the guest owns -- the
status byte and the guest features -- and writes the page only twice: whole,
when the bus is installed (encode()), and a device's guest features, zeroed,
when the guest resets it.  The config space is the device's to offer; what
the guest writes there is never read.
"""

import struct
from typing import NamedTuple

PAGE_SIZE = 4096
DESC_FORMAT = "<BBBBB"             # type, num_vq, feature_len, config_len, status
DESC_SIZE = struct.calcsize(DESC_FORMAT)
VQCONFIG_FORMAT = "<HHI"           # num, irq, pfn
VQCONFIG_SIZE = struct.calcsize(VQCONFIG_FORMAT)
FEATURE_LEN = 4                    # 32 feature bits: enough for EVENT_IDX (29)
STATUS_OFFSET = 4                  # of the status byte inside the descriptor


class VqConfig(NamedTuple):
    num: int
    irq: int
    pfn: int


class DeviceSlot(NamedTuple):
    """The launcher's own copy of one device's descriptor, and where it is."""
    offset: int                    # from the start of the device page
    type: int
    vqs: tuple                     # of VqConfig
    host_features: int
    config_len: int

    @property
    def size(self):
        return DESC_SIZE + VQCONFIG_SIZE * len(self.vqs) + 2 * FEATURE_LEN + self.config_len

    @property
    def status_offset(self):
        return self.offset + STATUS_OFFSET

    @property
    def guest_features_offset(self):
        return self.offset + DESC_SIZE + VQCONFIG_SIZE * len(self.vqs) + FEATURE_LEN

    @property
    def config_offset(self):
        return self.guest_features_offset + FEATURE_LEN


def features_to_bytes(features):
    """Feature bit i is byte[i / 8] & (1 << (i % 8)): little-endian, as the seed reads it."""
    return features.to_bytes(FEATURE_LEN, "little")


def encode(slot, config):
    """The bytes of one descriptor entry, as the seed's desc_size() walks them."""
    out = bytearray(struct.pack(DESC_FORMAT, slot.type, len(slot.vqs), FEATURE_LEN,
                                slot.config_len, 0))
    for vq in slot.vqs:
        out += struct.pack(VQCONFIG_FORMAT, vq.num, vq.irq, vq.pfn)
    out += features_to_bytes(slot.host_features)
    out += bytes(FEATURE_LEN)                      # guest features: none yet
    out += config
    assert len(out) == slot.size
    return bytes(out)


def layout_slots(devices_shape):
    """Offsets for devices given as (type, vqs, host_features, config_len).

    Raises ValueError if they do not fit in one page with the terminating
    zero type after them.
    """
    slots, offset = [], 0
    for type_, vqs, features, config_len in devices_shape:
        slot = DeviceSlot(offset, type_, tuple(vqs), features, config_len)
        slots.append(slot)
        offset += slot.size
    if offset + 1 > PAGE_SIZE:
        raise ValueError(f"{len(slots)} devices need {offset + 1} bytes of device page, "
                         f"there are {PAGE_SIZE}")
    return slots
