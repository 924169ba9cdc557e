"""The virtio block device: a raw disk image file behind a virtqueue.

A request is a descriptor chain: a readable 16-byte header
{u32 type; u32 ioprio; u64 sector}, then data buffers (readable for a write,
writable for a read), then one writable status byte.  Following Firecracker,
a chain is first *parsed* into an immutable BlockRequest, every length and
the sector range checked with exact arithmetic, and only then *executed*;
execution never looks at raw descriptors again.

Data moves with preadv/pwritev straight between the image file and guest
memory (numpy views of the guest's buffers), with no copy in between.

Never lose data: a write the guest sees complete has been handed to the
file (pwritev returned every byte), FLUSH means fdatasync, and a read-only
image answers every write with IOERR.

One request may move up to 4 GiB.  It moves in system calls of at most
IO_CHUNK bytes (and IOV_MAX buffers), and between them the device checks
whether a reset or the end of the run is waiting (check_abandoned): then
the request stops where it is and is never pushed, so the guest never sees
it complete, and nobody waits for the rest of it.
"""

import enum
import fcntl
import os
import struct
from dataclasses import dataclass
from typing import Optional

from pylguest.errors import GuestError, Rule, UsageError
from pylguest.hostfiles import BLOCK_DEVICE, REGULAR, disk_size, open_user_file
from pylguest.virtio.device import VirtioDevice
from pylguest.virtio.queue import Buffer, slice_buffers

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512

# Request types and status values (virtio spec 5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20

# Feature bits (5.2.3).
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

HEADER = struct.Struct("<IIQ")      # type, ioprio, sector
QUEUE_SIZE = 128
IO_CHUNK = 1 << 20                  # bytes per preadv/pwritev: the longest a stop waits
IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers per preadv/pwritev (1024 on Linux)


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
    """The rules of a block request that BlockRequest.parse checks.

    Sections are virtio 1.2's (5.2.6, Device Operation, is numbered alike
    in 1.0); the names are the ones the ring fuzzer's reference model
    gives the same rules (tests/virtio_model.py).
    """
    # No way to answer: BlockRequestError, and the device is broken.
    STATUS = "block status", "5.2.6"   # the request ends in a device-writable status byte
    HEADER = "block header", "5.2.6"   # and starts with the 16-byte readable header
    # Answered at once, with no I/O, with the status ANSWERS gives.
    TYPE = "block type", "5.2.6"       # a type this device serves
    LENGTH = "block length", "5.2.6.1"  # IN and OUT data: a multiple of 512 bytes
    RANGE = "block range", "5.2.6.1"    # no read or write beyond capacity


# The status each answerable fault gets: what a real disk says.
ANSWERS = {BlockRule.TYPE: Status.UNSUPP,
           BlockRule.LENGTH: Status.IOERR,
           BlockRule.RANGE: Status.IOERR}


class BlockRequestError(GuestError):
    """A block request the device cannot even answer: with no status byte
    there is nowhere to say IOERR, and one with no whole header does not
    say what it asks.  Not a ring error: the chain itself obeyed every ring rule.
    `rule` is the BlockRule broken."""


@dataclass(frozen=True)
class BlockRequest:
    """One parsed, validated request: nothing here came unchecked from the guest.

    `fault` is None for a request execute() carries out, or the BlockRule
    it broke, which execute() answers with ANSWERS[fault] and no I/O.
    """
    type: RequestType
    code: int                       # the header's type field, as the guest wrote it
    sector: int
    data: tuple                     # Buffers: the data part of the chain
    data_len: int
    status: Buffer                  # the one status byte
    fault: Optional[BlockRule] = None

    @classmethod
    def parse(cls, chain, memory, capacity, queue=None):
        """Every check of the request in `chain`, for a disk of `capacity`
        sectors, in one place.  A request that leaves us no way to answer
        raises BlockRequestError (`queue` labels its message); any other
        comes back, its fault if it has one recorded for execute()."""
        status = _status_byte(chain, queue)
        code, sector = _header(chain, memory, queue)
        type_ = _request_type(code)
        status_offset = chain.writable_len - 1
        # Which part is the data follows from the type (5.2.6): a write's
        # comes after the header, readable; every other type's is the
        # writable room before the status byte.  The other part, if the
        # guest sent one, is not looked at (Linux never sends one).
        if type_ is RequestType.OUT:
            data = slice_buffers(chain.readable, HEADER.size, chain.readable_len)
            data_len = chain.readable_len - HEADER.size
        else:
            data = slice_buffers(chain.writable, 0, status_offset)
            data_len = status_offset
        fault = _fault(type_, sector, data_len, capacity)
        return cls(type_, code, sector, data, data_len, status, fault)


def _refuse(queue, rule, head, words):
    message = f"{queue}: {words}" if queue else words
    return BlockRequestError(message, head, rule=rule, queue=queue)


def _status_byte(chain, queue):
    """The status byte: the chain's last byte.  The ring's rules (2.7.4.2)
    already put every writable byte after every readable one, so the last
    writable byte is the last of all; a chain with none cannot be answered."""
    if chain.writable_len < 1:
        raise _refuse(queue, BlockRule.STATUS, chain.head,
                      f"request {chain.head} has no status byte")
    offset = chain.writable_len - 1
    return slice_buffers(chain.writable, offset, offset + 1)[0]


def _header(chain, memory, queue):
    """(type, sector) from the 16-byte header, which may be split over
    several readable buffers: a device must not assume how a request is
    laid out in descriptors (2.7.4.1)."""
    if chain.readable_len < HEADER.size:
        raise _refuse(queue, BlockRule.HEADER, chain.head,
                      f"request {chain.head} has a {chain.readable_len}-byte header, "
                      f"{HEADER.size} needed")
    header = b"".join(memory.read(b.gpa, b.length)
                      for b in slice_buffers(chain.readable, 0, HEADER.size))
    type_, _ioprio, sector = HEADER.unpack(header)
    return type_, sector


def _request_type(code):
    try:
        return RequestType(code)
    except ValueError:                    # a u32 is never UNSUPPORTED's -1
        return RequestType.UNSUPPORTED


def _fault(type_, sector, data_len, capacity):
    """The rule an answerable request breaks, or None.  Python's integers
    make the range check exact: a sector near 2^64 cannot wrap round."""
    if type_ is RequestType.UNSUPPORTED:
        return BlockRule.TYPE
    if type_ in (RequestType.IN, RequestType.OUT):
        if data_len % SECTOR_SIZE:
            return BlockRule.LENGTH
        if sector + data_len // SECTOR_SIZE > capacity:
            return BlockRule.RANGE
    return None


class BlockDevice(VirtioDevice):
    type = VIRTIO_ID_BLOCK
    queue_names = ("requests",)
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, name, path, read_only=False):
        super().__init__(name)
        self.path = path
        self.read_only = read_only
        # A regular file or a host block device; a FIFO, a directory or a
        # character device is refused, without blocking (hostfiles.py).
        self.fd = open_user_file(path, "--block", os.O_RDONLY if read_only else os.O_RDWR,
                                 kinds=(REGULAR, BLOCK_DEVICE))
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
        self.requests_served = 0

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
        # vq.name is the queue's label, made once when the queue was.
        return self.drain(vq, lambda chain: self._serve(vq.name, chain))

    def _serve(self, label, chain):
        request = BlockRequest.parse(chain, self.memory, self.capacity, label)
        status, written = self.execute(request)
        if self.trace:
            self.trace(f"req   {label}: {describe(request)} -> "
                       f"{Status(status).name}")
        self.memory.write(request.status.gpa, bytes([status]))
        self.requests_served += 1
        return written + 1

    def execute(self, request):
        """Do what a parsed request asks; return (status, bytes written into
        guest buffers).  Every check of the request was parse()'s: here a
        fault is only answered, and the rest is I/O."""
        if request.fault is not None:
            return ANSWERS[request.fault], 0
        if request.type is RequestType.IN:
            return self._read(request)
        if request.type is RequestType.OUT:
            return self._write(request)
        if request.type is RequestType.FLUSH:
            return self._flush()
        return self._get_id(request)          # GET_ID: the last type parse() lets through

    def _read(self, request):
        done = self._transfer(os.preadv, request)
        if done != request.data_len:
            return Status.IOERR, done
        return Status.OK, done

    def _write(self, request):
        if self.read_only:                    # 5.2.6.2: IOERR, and no data written
            return Status.IOERR, 0
        done = self._transfer(os.pwritev, request)
        return (Status.OK if done == request.data_len else Status.IOERR), 0

    def _transfer(self, call, request):
        """preadv/pwritev the request's data, IO_CHUNK bytes at a time,
        until every byte moved, EOF, or an error; the count.  Between the
        calls, a waiting reset or stop abandons the request."""
        done, offset = 0, request.sector * SECTOR_SIZE
        for views in _batches(self.memory, request.data):
            self.check_abandoned()
            moved = _move(call, self.fd, views, offset + done)
            done += moved
            if moved < sum(len(v) for v in views):
                break                         # EOF or an error: the rest fails too
        return done

    def _flush(self):
        if self.read_only:
            return Status.OK, 0
        try:
            os.fdatasync(self.fd)
        except OSError:
            return Status.IOERR, 0
        return Status.OK, 0

    def _get_id(self, request):
        ident = self.name.encode()[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        written = 0
        for buf in request.data:
            chunk = ident[written:written + buf.length]
            if not chunk:
                break
            self.memory.write(buf.gpa, chunk)
            written += len(chunk)
        return Status.OK, written

    def close(self, timeout=5.0):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return True


REQUEST_NAMES = {RequestType.IN: "read", RequestType.OUT: "write",
                 RequestType.FLUSH: "flush", RequestType.GET_ID: "get id"}


def describe(request):
    """A request in words, for --trace: "read 4096 bytes at sector 8"."""
    name = REQUEST_NAMES.get(request.type, f"type {request.code}")
    if request.type in (RequestType.IN, RequestType.OUT):
        return f"{name} {request.data_len} bytes at sector {request.sector}"
    return name


def _batches(memory, buffers):
    """The buffers as lists of numpy views, each list at most IO_CHUNK
    bytes and IOV_MAX views: one system call's worth.  A buffer longer
    than what is left of a batch is cut, and goes on in the next."""
    batch, size = [], 0
    for buf in buffers:
        at, left = buf.gpa, buf.length
        while left:
            n = min(left, IO_CHUNK - size)
            batch.append(memory.view(at, n))
            size, at, left = size + n, at + n, left - n
            if size == IO_CHUNK or len(batch) == IOV_MAX:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _move(call, fd, views, offset):
    """One batch: preadv/pwritev until every byte moved, EOF, or an error."""
    done, total = 0, sum(len(v) for v in views)
    while views:
        try:
            n = call(fd, views, offset + done)
        except OSError:
            return done
        if n <= 0:
            return done
        done += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if views and n:
            views = [views[0][n:]] + views[1:]
    return min(done, total)
