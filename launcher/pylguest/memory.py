"""Guest physical memory: one shared mapping of a memfd, and two checked ways in.

The guest's RAM, the lguest device page and the vrings above it are a
single shared mapping, registered with KVM as one or two memory slots (two
when RAM reaches above 3 GiB: the part above goes above 4 GiB, so the
32-bit MMIO hole stays free, docs/abi.md section 2).

The mapping is of a memfd (an anonymous file), not of anonymous memory, so
that another process can map the same pages: a vhost-user daemon serving a
device (virtiofsd, devices/fs.py) is handed `fd` and reads and writes the
guest's buffers itself, and the launcher never copies them.  Until a page
is touched it costs nothing, as with anonymous memory.

Every guest-physical access the launcher makes is checked at one of two
gates, with the same rule (lguest's check_pointer): the whole range
[gpa, gpa+length) must lie inside one region of guest memory, with no
wraparound.  Checking only the first byte is the classic hole; both check
the last one too.  Python's gate is `_offset`, behind every accessor here
(view, array, read, write, zero), which raises GuestMemoryError.  The C
data plane's is pyl_guest_range (csrc/virtq.c), over the region table
`c_memory` makes from this mapping; it answers NULL, and the ring or
request loop turns that into the rule the guest broke.

A restored guest (snapshot/) maps its snapshot's memory file instead,
privately (MAP_PRIVATE): every restore of one snapshot shares the file's
pages in the host's page cache, and a page a guest writes becomes that
guest's own copy.  Such a memory has no fd to hand a daemon, which is
one reason a guest with virtio-fs is never snapshotted.

Device code gets numpy views (`array(gpa, dtype, count)`) over the same
bytes, so rings and buffers are read and written in place, without copies.
numpy is imported on the first such view, not before: the loaders and the
device page go through the plain byte accessors (read, write, zero), so a
guest that never uses a device never pays numpy's import (about 60% of
`import pylguest.machine` when this module imported it at the top).
"""

import mmap
import os
from typing import NamedTuple

from pylguest._native import ffi, lib
from pylguest.errors import GuestMemoryError

PAGE_SIZE = 4096
GiB = 1 << 30


class Region(NamedTuple):
    """A guest-physical range backed by [host_offset, +size) of our mmap."""
    gpa: int
    size: int
    host_offset: int

    @property
    def end(self):
        return self.gpa + self.size

    def contains(self, gpa, length):
        return self.gpa <= gpa and gpa + length <= self.end


def plan_regions(ram_size, extra_size, low_limit=3 * GiB, high_base=4 * GiB):
    """Where RAM (plus the device area `extra_size` above it) goes.

    RAM up to `low_limit` starts at 0; any more starts at 4 GiB.  The device
    area always follows the last byte of RAM, which makes it sit exactly at
    max_pfn << 12 as the guest computes it from e820.
    """
    if ram_size <= low_limit:
        return [Region(0, ram_size + extra_size, 0)]
    high = ram_size - low_limit
    return [Region(0, low_limit, 0),
            Region(high_base, high + extra_size, low_limit)]


class GuestMemory:
    """The guest's physical memory, as the launcher sees it."""

    def __init__(self, regions, private_file=None):
        """Fresh, zeroed memory for `regions`; or, with `private_file` (a
        snapshot's memory file, exactly the regions' size), that file's
        contents mapped copy-on-write."""
        self.regions = tuple(regions)
        self.size = sum(r.size for r in self.regions)
        self.private = private_file is not None
        # MAP_NORESERVE: a 4 GiB guest that touches 100 MiB costs 100 MiB.
        flags = getattr(mmap, "MAP_NORESERVE", 0)
        if self.private:
            fd = os.open(private_file, os.O_RDONLY | os.O_CLOEXEC)
            flags |= mmap.MAP_PRIVATE
        else:
            # A memfd: see the module docstring.
            fd = os.memfd_create("pylguest-guest-memory", os.MFD_CLOEXEC)
            flags |= mmap.MAP_SHARED
        try:
            if self.private:
                if os.fstat(fd).st_size != self.size:
                    raise GuestMemoryError(f"{private_file} is not {self.size} bytes")
            else:
                os.ftruncate(fd, self.size)
            self._map = mmap.mmap(fd, self.size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        if self.private:
            self._populate(fd)
            os.close(fd)                # the mapping holds the file
            fd = -1
        self.fd = fd                    # the memfd, for a vhost-user daemon; -1 if private
        self._bytes = None              # the numpy uint8 array, on first use
        self._c_memory = None           # the data plane's view, on first use
        address = ffi.from_buffer(self._map)
        self.host_address = int(ffi.cast("uintptr_t", address))
        ffi.release(address)            # no export left: close() can unmap

    @property
    def c_memory(self):
        """The data plane's view of this memory (struct pyl_memory,
        csrc/pylguest.h): each region and where it lives in our address space,
        which the C request loops check every guest address against.  Made
        on first use: a guest without devices never needs it."""
        if self._c_memory is None:
            if len(self.regions) > lib.PYL_MAX_REGIONS:
                raise ValueError(f"{len(self.regions)} memory regions; "
                                 f"the data plane takes {lib.PYL_MAX_REGIONS}")
            c = ffi.new("struct pyl_memory *")
            c.nregions = len(self.regions)
            for slot, region in zip(c.region, self.regions):
                slot.gpa, slot.size = region.gpa, region.size
                slot.host = ffi.cast("uint8_t *", self.host_address + region.host_offset)
            self._c_memory = c
        return self._c_memory

    MADV_POPULATE_READ = 22          # Linux 5.14: fault pages in, read-only

    def _populate(self, fd):
        """Map in now what the file holds (its data, not its holes), each
        page shared with the page cache until the guest writes it: a
        restored guest's first touch of a page then costs no host fault."""
        for start, end in _extents(fd, self.size):
            start &= ~(mmap.PAGESIZE - 1)
            try:
                self._map.madvise(self.MADV_POPULATE_READ, start, end - start)
            except OSError:
                return                  # an older kernel: the guest faults them in

    def close(self):
        self._bytes = None
        try:
            self._map.close()
        except BufferError:
            pass  # views handed out are still alive; the mapping goes at exit
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def host_address_of(self, gpa, length):
        """Where [gpa, gpa+length) is in the launcher's address space (what
        a vhost-user daemon is told a ring's address is), checked."""
        return self.host_address + self._offset(gpa, length)

    def _offset(self, gpa, length):
        """The mmap offset of [gpa, gpa+length), or GuestMemoryError."""
        if gpa < 0 or length < 0 or gpa + length > 1 << 64:
            raise GuestMemoryError(
                f"guest address range 0x{gpa:x}+0x{length:x} wraps around")
        for region in self.regions:
            if region.contains(gpa, length):
                return region.host_offset + (gpa - region.gpa)
        raise GuestMemoryError(
            f"guest address range 0x{gpa:x}-0x{gpa + length:x} "
            "is not inside guest memory")

    def contains(self, gpa, length=1):
        try:
            self._offset(gpa, length)
            return True
        except GuestMemoryError:
            return False

    def view(self, gpa, length):
        """A writable numpy uint8 view of [gpa, gpa+length): the checked accessor."""
        offset = self._offset(gpa, length)
        if self._bytes is None:
            # Imported here, not at the top: see the module docstring.
            import numpy as np
            self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        return self._bytes[offset:offset + length]

    def array(self, gpa, dtype, count):
        """A numpy array of `count` items of `dtype` living at `gpa`."""
        # Imported here, not at the top: see the module docstring.
        import numpy as np
        dtype = np.dtype(dtype)
        return self.view(gpa, dtype.itemsize * count).view(dtype)

    def read(self, gpa, length):
        offset = self._offset(gpa, length)
        return self._map[offset:offset + length]

    def write(self, gpa, data):
        """Copy `data` (any bytes-like object) to guest memory at `gpa`."""
        data = memoryview(data).cast("B")
        offset = self._offset(gpa, len(data))
        self._map[offset:offset + len(data)] = data

    def zero(self, gpa, length):
        """Zero [gpa, gpa+length): an ELF segment's bss, the device page."""
        self.write(gpa, bytes(length))

    def read_int(self, gpa, size):
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa, size, value):
        self.write(gpa, value.to_bytes(size, "little"))

    def data_pieces(self, size=1 << 20):
        """(offset, bytes) for every piece of at most `size` bytes (a
        multiple of PAGE_SIZE) that may hold something other than zeroes,
        in order: what a snapshot saves.  A memfd's holes (pages the guest
        never touched) are skipped without being read, so the guest's
        memory does not grow by being saved."""
        for start, end in self._data_extents():
            for offset in range(start, end, size):
                length = min(size, end - offset)
                if self.fd >= 0:
                    yield offset, os.pread(self.fd, length, offset)
                else:
                    yield offset, self._map[offset:offset + length]

    def _data_extents(self):
        if self.fd < 0:
            return [(0, self.size)]
        return _extents(self.fd, self.size)

    def read_cstring(self, gpa, limit):
        """A NUL-terminated string at gpa, at most `limit` bytes, never
        reading past the end of the region it starts in."""
        for region in self.regions:
            if region.contains(gpa, 1):
                length = min(limit, region.end - gpa)
                data = self.read(gpa, length)
                return data.split(b"\0", 1)[0]
        raise GuestMemoryError(f"guest address 0x{gpa:x} is not inside guest memory")


def _extents(fd, size):
    """(start, end) of each part of file `fd` that holds data, not holes."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:                 # ENXIO: no data after offset
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end
