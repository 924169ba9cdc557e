"""The e820 memory map: how a PC tells its kernel where the RAM is.

The guest computes max_pfn from this map (the end of the highest usable
entry), so we list RAM only up to ram_top: that puts max_pfn << 12 exactly
on the lguest device page, as the seed's lguest_devices_init() expects.
The device page and the vrings are listed as reserved, so the guest's
allocator never hands them out.
"""

from typing import NamedTuple

from pylguest import layout

E820_RAM = 1
E820_RESERVED = 2
E820_MAX_ENTRIES = 128             # the size of boot_params.e820_table


class E820Entry(NamedTuple):
    addr: int
    size: int
    type: int

    @property
    def end(self):
        return self.addr + self.size

    def __str__(self):
        kind = {E820_RAM: "usable", E820_RESERVED: "reserved"}.get(self.type, f"type {self.type}")
        return f"[mem 0x{self.addr:016x}-0x{self.end - 1:016x}] {kind}"


def build_e820(regions, device_area_size):
    """The map for guest memory `regions` (see memory.plan_regions), whose
    last `device_area_size` bytes are the device page and vrings."""
    entries = [E820Entry(0, layout.LOW_RAM_END, E820_RAM),
               E820Entry(layout.LOW_RAM_END, layout.HIGH_MEMORY - layout.LOW_RAM_END,
                         E820_RESERVED)]
    for i, region in enumerate(regions):
        start = max(region.gpa, layout.HIGH_MEMORY)
        end = region.end - (device_area_size if i == len(regions) - 1 else 0)
        entries.append(E820Entry(start, end - start, E820_RAM))
    ram_top = entries[-1].end
    if device_area_size:
        entries.append(E820Entry(ram_top, device_area_size, E820_RESERVED))
    entries.append(E820Entry(layout.HYPERCALL_PAGE, layout.HYPERCALL_PAGE_SIZE, E820_RESERVED))
    return entries


def max_pfn(entries):
    """max_pfn as Linux computes it: the end of the highest usable RAM."""
    return max(e.end for e in entries if e.type == E820_RAM) >> 12
