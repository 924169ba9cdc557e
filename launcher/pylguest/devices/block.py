"""The virtio block device: a raw disk image file behind a virtqueue.

A request is a descriptor chain: a readable 16-byte header
{u32 type; u32 ioprio; u64 sector}, then data buffers (readable for a write,
writable for a read), then one writable status byte.

The request loop is C (csrc/blk.c): on each kick the queue's worker calls
it once, with the GIL released, and it drains the ring -- pop and check the
chain (csrc/virtq.c), parse the request (every length and the sector range
checked before any I/O, Firecracker's way), preadv/pwritev straight between
the image file and guest memory, the status byte, push -- until the ring
is empty; Python then decides on one interrupt for the batch.  What stays
here is the control plane: the image and its features, the config space,
and turning a broken rule into a broken device.

Never lose data: a write the guest sees complete has been handed to the
file (pwritev returned every byte), FLUSH means fdatasync, and a read-only
image answers every write with IOERR.

One request may move up to 4 GiB.  It moves in system calls of at most
IO_CHUNK bytes (and IOV_MAX buffers), and between them the loop checks the
device's abandon flag: once a reset or the end of the run has set it, the
request stops where it is and is never pushed, so the guest never sees it
complete, and nobody waits for the rest of it.
"""

import enum
import fcntl
import os
import struct

from pylguest._native import ffi, lib       # csrc/pylguest.h, and <linux/virtio_blk.h>'s numbers
from pylguest.errors import GuestError, HostIOError, Rule, UsageError
from pylguest.hostfiles import BLOCK_DEVICE, REGULAR, disk_size, open_user_file
from pylguest.virtio.device import RequestAbandoned, VirtioDevice

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = lib.PYL_BLK_SECTOR_SIZE      # csrc/pylguest.h: blk.c's, too

# Request types and status values (virtio spec 5.2.6): the kernel's
# <linux/virtio_blk.h>, the same numbers blk.c uses.
VIRTIO_BLK_T_IN = lib.VIRTIO_BLK_T_IN
VIRTIO_BLK_T_OUT = lib.VIRTIO_BLK_T_OUT
VIRTIO_BLK_T_FLUSH = lib.VIRTIO_BLK_T_FLUSH
VIRTIO_BLK_T_GET_ID = lib.VIRTIO_BLK_T_GET_ID
VIRTIO_BLK_S_OK = lib.VIRTIO_BLK_S_OK
VIRTIO_BLK_S_IOERR = lib.VIRTIO_BLK_S_IOERR
VIRTIO_BLK_S_UNSUPP = lib.VIRTIO_BLK_S_UNSUPP
VIRTIO_BLK_ID_BYTES = lib.PYL_BLK_ID_BYTES

# Feature bits (5.2.3).
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

HEADER = struct.Struct("<IIQ")      # type, ioprio, sector: struct virtio_blk_outhdr
if HEADER.size != lib.PYL_BLK_HEADER_SIZE:        # not an assert: python -O keeps it
    raise ImportError("csrc/blk.c and devices/block.py disagree on the request header")
QUEUE_SIZE = 128
IO_CHUNK = lib.PYL_BLK_IO_CHUNK     # bytes per preadv/pwritev: the longest a stop waits
IOV_MAX = lib.PYL_BLK_IOV_MAX       # buffers per preadv/pwritev call, blk.c's batches


class RequestType(enum.IntEnum):
    """What a request asks, from its header's type field (5.2.6)."""
    IN = VIRTIO_BLK_T_IN            # read sectors into the guest's buffers
    OUT = VIRTIO_BLK_T_OUT          # write the guest's buffers to sectors
    FLUSH = VIRTIO_BLK_T_FLUSH      # make the writes before it durable
    GET_ID = VIRTIO_BLK_T_GET_ID    # the device's id string
    UNSUPPORTED = -1                # any other number: never a u32 on the wire


class Status(enum.IntEnum):
    """The status byte the device answers with (5.2.6)."""
    OK = VIRTIO_BLK_S_OK
    IOERR = VIRTIO_BLK_S_IOERR
    UNSUPP = VIRTIO_BLK_S_UNSUPP


class BlockRule(Rule):
    """The rules of a block request that csrc/blk.c's parse() checks.

    Sections are virtio 1.2's (5.2.6, Device Operation, is numbered alike
    in 1.0); the names are the ones the ring fuzzer's reference model
    gives the same rules (tests/virtio_model.py).
    """
    # No way to answer: BlockRequestError, and the device is broken.
    STATUS = "block status", "5.2.6"   # the request ends in a device-writable status byte
    HEADER = "block header", "5.2.6"   # and starts with the 16-byte readable header
    # Answered at once, with no I/O: UNSUPP for the type, IOERR for the
    # others (the verdict blk.c's parse() gives the request).
    TYPE = "block type", "5.2.6"       # a type this device serves
    LENGTH = "block length", "5.2.6.1"  # IN and OUT data: a multiple of 512 bytes
    RANGE = "block range", "5.2.6.1"    # no read or write beyond capacity



class BlockRequestError(GuestError):
    """A block request the device cannot even answer: with no status byte
    there is nowhere to say IOERR, and one with no whole header does not
    say what it asks.  Not a ring error: the chain itself obeyed every ring rule.
    `rule` is the BlockRule broken."""


class BlockDevice(VirtioDevice):
    type = VIRTIO_ID_BLOCK
    queue_names = ("requests",)
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, name, path, read_only=False, io_uring=True, direct=False):
        """`io_uring`: let requests be in flight together when the host has
        io_uring (False: one at a time, as the tests of both ways ask).
        `direct`: open the image O_DIRECT, past the host's page cache (the
        guest's buffers must then be 512-byte aligned, as Linux's are; an
        unaligned request fails with IOERR)."""
        super().__init__(name)
        self.path = path
        self.read_only = read_only
        # A regular file or a host block device; a FIFO, a directory or a
        # character device is refused, without blocking (hostfiles.py).
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | (os.O_DIRECT if direct else 0)
        self.fd = open_user_file(path, "--block", flags, kinds=(REGULAR, BLOCK_DEVICE))
        try:
            # Two launchers writing one image would corrupt it: refuse.
            fcntl.flock(self.fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise UsageError(f"--block {path}: the image is already in use (another launcher, "
                             "or the same image given twice)") from None
        size = disk_size(self.fd)
        if size < SECTOR_SIZE:
            os.close(self.fd)
            raise UsageError(f"--block {path}: {size} bytes is less than one {SECTOR_SIZE}-byte "
                             "sector (an unattached loop device, an empty file?)")
        self.capacity = size // SECTOR_SIZE          # in sectors; a partial last one is unused
        # What blk.c is given: the disk, and the id GET_ID answers.
        self._c = ffi.new("struct pyl_blk *")
        self._c.fd, self._c.capacity, self._c.read_only = self.fd, self.capacity, read_only
        self._c.abandon = self.abandon.c              # the device's one flag, for good
        ident = name.encode()[:VIRTIO_BLK_ID_BYTES]
        ffi.memmove(self._c.id, ident.ljust(VIRTIO_BLK_ID_BYTES, b"\0"), VIRTIO_BLK_ID_BYTES)
        self._outcome = ffi.new("struct pyl_blk_outcome *")
        started = lib.pyl_blk_open(self._c, io_uring)
        if started < 0:
            os.close(self.fd)
            raise MemoryError(f"{name}: no memory for its requests in flight")
        self.io_uring = bool(started)             # requests in flight together

    def device_features(self):
        features = (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_BLK_SIZE)
        if self.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        return features

    def config_space(self):
        # Legacy virtio_blk_config: capacity u64, size_max u32, seg_max u32,
        # geometry (u16 cylinders, u8 heads, u8 sectors), blk_size u32.
        return struct.pack("<QIIHBBI", self.capacity, 0, 0, 0, 0, 0, SECTOR_SIZE)

    def process(self, index, vq):
        """Drain the ring in C; with --trace, one request per call, so each
        is traced as it is answered."""
        limit = 1 if self.trace else 0
        out = self._outcome
        pushed = False
        while True:
            lib.pyl_blk_drain(vq.c, vq.c_chain, self._c, limit, out)
            pushed = pushed or out.pushed > 0
            if out.pushed and self.trace:
                self.trace(f"req   {vq.name}: {describe(out.last)} -> "
                           f"{Status(out.last.status).name}")
            if out.stop != lib.PYL_BLK_LIMIT:
                break
        if out.stop == lib.PYL_BLK_RING_FAULT:
            raise vq.fault()
        if out.stop == lib.PYL_BLK_REQUEST_FAULT:
            raise _request_error(vq.name, out)
        if out.stop == lib.PYL_BLK_ABANDONED:
            raise RequestAbandoned(self.name)
        if out.stop == lib.PYL_BLK_HOST_FAULT:
            raise HostIOError(f"{vq.name}: io_uring failed: {os.strerror(out.error)} "
                              f"(errno {out.error}); the requests in flight are lost")
        return pushed

    @property
    def requests_served(self):
        return self._c.requests

    @property
    def most_in_flight(self):
        """The most requests io_uring had in flight at once."""
        return self._c.most_in_flight

    @property
    def io_counts(self):
        """(preadv/pwritev calls, the most bytes one asked for, fdatasyncs)."""
        return self._c.syscalls, self._c.largest_syscall, self._c.flushes

    def close(self, timeout=5.0):
        if self.fd >= 0:
            lib.pyl_blk_close(self._c)
            os.close(self.fd)
            self.fd = -1
        return True


REQUEST_NAMES = {RequestType.IN: "read", RequestType.OUT: "write",
                 RequestType.FLUSH: "flush", RequestType.GET_ID: "get id"}


def describe(request):
    """A request in words, for --trace: "read 4096 bytes at sector 8"."""
    type_ = _request_type(request.type)
    name = REQUEST_NAMES.get(type_, f"type {request.type}")
    if type_ in (RequestType.IN, RequestType.OUT):
        return f"{name} {request.data_len} bytes at sector {request.sector}"
    return name


def _request_type(code):
    try:
        return RequestType(code)
    except ValueError:                    # a u32 is never UNSUPPORTED's -1
        return RequestType.UNSUPPORTED


def _request_error(queue, out):
    """The BlockRequestError for a request blk.c could not answer."""
    head = out.head
    if out.rule == lib.PYL_BLK_RULE_STATUS:
        return BlockRequestError(f"{queue}: request {head} has no status byte", head,
                                 rule=BlockRule.STATUS, queue=queue)
    return BlockRequestError(f"{queue}: request {head} has a {out.readable_len}-byte header, "
                             f"{HEADER.size} needed", head, rule=BlockRule.HEADER, queue=queue)
