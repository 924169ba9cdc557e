"""Block backend throughput: four request shapes through the ring, each
against plain preadv/pwritev on the same file, from Python and from C, and
with --o-direct against fio's io_uring at queue depth 32.

The shapes: 64 KiB sequential reads, 4 KiB random reads, 64 KiB
sequential writes, 4 KiB random writes.  Both sides issue the same
requests (the same offsets, in the same order; random offsets come from a
fixed seed) to the same file, into or out of as many buffers (one per
request of a batch): plain side with os.preadv/os.pwritev, ring side
through a BlockDevice, with tests/ring_builder.py's RingBuilder playing the
guest driver (guest kernel code is emulated on some of our machines, far
too slow to drive a disk).  The stand-in driver fills the ring with a
batch of requests (three descriptors each: header, data, status; in an
indirect table, one ring slot each, as Linux lays them out, so NUM of
them; or with --chains direct in the ring itself, NUM // 3) and then calls
service() once; only service() is timed: pop and
validate the chains, parse the requests, preadv/pwritev straight into or
out of guest memory, push, decide on an interrupt.  Filling the ring is
not counted.

By default the file is read once first, so reads come from the page cache
and writes go to it: the figures compare per-request overhead, not the
disk.  Before each write run, untimed, the file is synced and dropped from
the cache (settle(): why, there), so every write run starts the same way.  --o-direct opens the file with O_DIRECT on both sides (the
plain buffer is an mmap and the guest buffers are page aligned, as
O_DIRECT needs), which measures the disk instead.

The baselines.  `plain` is os.preadv/os.pwritev from Python, one call per
request: what a Python backend would cost.  `C` is the same loop in C
(bench/block_baseline.c, built into bench/build/ by this script): the
system calls' own cost, the floor for one request at a time.  With
--o-direct, `fio` is fio's io_uring engine at queue depth 32 (the depth
blk.c keeps in flight) on the same file and shape: the floor for requests
in flight together.  fio is a Debian package (`apt-get install fio`);
without it that column says n/a.

    python bench/block_throughput.py [--size-mib 256] [--random-requests 32768]
                                     [--o-direct] [--shapes seq-read,rand-read,...]
"""

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time

# The tests' mock guest driver (tests/ring_builder.py) plays the guest here.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import numpy as np

from pylguest.devices.block import BlockDevice, HEADER, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from pylguest.memory import GuestMemory, Region
from pylguest.virtio.device import DeviceContext
from pylguest.virtio.queue import VIRTIO_RING_F_INDIRECT_DESC
from ring_builder import RingBuilder

BENCH = os.path.dirname(os.path.abspath(__file__))
C_BASELINE = os.path.join(BENCH, "build", "block_baseline")
FIO_DEPTH = 32                    # blk.c's DEPTH: requests in flight at most

QUEUE_PFN = 0x10                  # ring at 64 KiB; headers, statuses, data above it
NUM = 128                         # the block device's queue size
# Requests per service(): a chain is three descriptors (header, data,
# status); Linux's virtio_blk puts them in an indirect table when
# VIRTIO_RING_F_INDIRECT_DESC is negotiated (it is offered), one ring slot
# each; --chains direct spends three ring slots per request instead.
BATCHES = {"indirect": NUM, "direct": NUM // 3}
SEED = 9

# name: (write?, KiB per request, random?)
SHAPES = {"seq-read": (False, 64, False), "rand-read": (False, 4, True),
          "seq-write": (True, 64, False), "rand-write": (True, 4, True)}
LABELS = {"seq-read": "64 KiB sequential read", "rand-read": "4 KiB random read",
          "seq-write": "64 KiB sequential write", "rand-write": "4 KiB random write"}


def offsets_for(shape, size, random_requests):
    """The byte offsets of one run's requests: every request-sized block in
    order, or `random_requests` blocks from a fixed seed."""
    _, kib, rand = SHAPES[shape]
    request = kib << 10
    blocks = size // request
    if not rand:
        return np.arange(blocks, dtype=np.int64) * request
    rng = np.random.default_rng(SEED)
    return rng.integers(0, blocks, random_requests, dtype=np.int64) * request


def pattern(length):
    return ((np.arange(length, dtype=np.uint32) * 7 + 3) & 0xFF).astype(np.uint8)


def plain(fd, write, request, offsets, batch):
    """The same requests with os.preadv/os.pwritev, request i into buffer
    i % batch: as much memory as the ring side's batch of buffers."""
    mapping = mmap.mmap(-1, request * batch)      # page aligned, for O_DIRECT
    mapping[:] = np.tile(pattern(request), batch).tobytes()
    view = memoryview(mapping)
    buffers = [view[i * request:(i + 1) * request] for i in range(batch)]
    call = os.pwritev if write else os.preadv
    moved = 0
    start = time.perf_counter()
    for i, offset in enumerate(offsets.tolist()):
        moved += call(fd, [buffers[i % batch]], offset)
    elapsed = time.perf_counter() - start
    del buffers
    view.release()
    mapping.close()
    return elapsed, moved


def build_c_baseline():
    os.makedirs(os.path.dirname(C_BASELINE), exist_ok=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", C_BASELINE,
                    os.path.join(BENCH, "block_baseline.c")], check=True)


def c_loop(path, write, request, offsets, o_direct, batch):
    """The same requests from bench/block_baseline.c: (seconds, bytes)."""
    with tempfile.NamedTemporaryFile(prefix="pylguest-offsets-") as f:
        f.write(np.asarray(offsets, dtype="<u8").tobytes())
        f.flush()
        out = subprocess.run([C_BASELINE, path, "write" if write else "read", str(request),
                              f.name, "direct" if o_direct else "cached", str(batch)],
                             capture_output=True, text=True, check=True, timeout=600)
    seconds, moved = out.stdout.split()
    return float(seconds), int(moved)


def fio_rate(path, shape, request, count):
    """fio's io_uring, queue depth FIO_DEPTH, O_DIRECT: bytes per second
    for `count` requests of the shape, or None without fio."""
    if shutil.which("fio") is None:
        return None
    write, _, rand = SHAPES[shape]
    rw = ("rand" if rand else "") + ("write" if write else "read")
    out = subprocess.run(["fio", "--name=baseline", f"--filename={path}", f"--rw={rw}",
                          f"--bs={request}", "--ioengine=io_uring", f"--iodepth={FIO_DEPTH}",
                          "--direct=1", f"--number_ios={count}", "--randrepeat=1",
                          "--output-format=json"],
                         capture_output=True, text=True, check=True, timeout=600)
    job = json.loads(out.stdout)["jobs"][0]
    return job["write" if write else "read"]["bw_bytes"]


def through_the_ring(path, write, request, offsets, o_direct, chains):
    batch_size = BATCHES[chains]
    memory = GuestMemory([Region(0, 64 << 20, 0)])
    device = BlockDevice("block0", path, direct=o_direct)     # --block PATH,direct
    device.attach(DeviceContext(memory=memory, interrupt=lambda: None, report=print))
    ring = RingBuilder(memory, NUM, QUEUE_PFN)
    indirect = chains == "indirect"
    device.activate((1 << VIRTIO_RING_F_INDIRECT_DESC) if indirect else 0, [(NUM, QUEUE_PFN)])
    # One request's buffers per slot, reused as the ring goes round, as a
    # driver with a fixed pool would.  Data buffers page aligned (O_DIRECT),
    # the status bytes side by side so one view checks a whole batch.
    headers = [ring.alloc(HEADER.size) for _ in range(batch_size)]
    statuses = ring.alloc(batch_size)
    status_view = memory.view(statuses, batch_size)
    data_base = (ring.alloc(batch_size * request + 4096) + 4095) & ~4095
    data = [data_base + i * request for i in range(batch_size)]
    tables = [ring.indirect_table(3) for _ in range(batch_size)] if indirect else None
    # The buffers are resident, as a running guest's are (its driver has
    # used them): a fresh memfd's first touch is not the device's cost.
    memory.view(data_base, batch_size * request)[:] = np.tile(pattern(request), batch_size)
    kind = VIRTIO_BLK_T_OUT if write else VIRTIO_BLK_T_IN
    elapsed = 0.0                 # only the device's work: service()
    served = 0
    offsets = offsets.tolist()
    for first in range(0, len(offsets), batch_size):
        batch = offsets[first:first + batch_size]
        ring.next_free = 0
        status_view[:] = 0xFF
        for header, buf, offset, i in zip(headers, data, batch, range(batch_size)):
            memory.write(header, HEADER.pack(kind, 0, offset // 512))
            chain = [(header, HEADER.size, False), (buf, request, not write),
                     (statuses + i, 1, True)]
            if indirect:                          # this slot's table, reused
                ring.add_indirect(chain, table=tables[i])
            else:
                ring.add_chain(chain)
        start = time.perf_counter()
        device.service(0)
        elapsed += time.perf_counter() - start
        assert not status_view[:len(batch)].any(), "a request failed"   # 0 is S_OK
        served += len(batch)
    assert ring.used_idx == len(offsets) & 0xFFFF and not device.broken, device.broken
    moved = served * request
    del status_view
    device.close()
    memory.close()
    return elapsed, moved


def settle(fd):
    """Before a write run, untimed: no dirty pages carried over from the
    last, and none of the file cached.  A 4 KiB buffered write into a page
    that readahead brought in (a large folio, on ext4 with kernel 6.18)
    costs tens of microseconds and dirties the whole folio.  A write into
    a page that is not cached costs a few, so every write run starts from
    an empty cache.  (With O_DIRECT nothing is cached, and this only syncs.)"""
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def fstype(path):
    """The filesystem `path` is on, from /proc/self/mounts (longest match)."""
    best, kind = "", "?"
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mount, fs = line.split()[:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, fs
    return kind


def make_file(directory, size):
    f = tempfile.NamedTemporaryFile(dir=directory, prefix="pylguest-bench-")
    rng = np.random.default_rng(1)
    chunk = 16 << 20
    for at in range(0, size, chunk):
        f.write(rng.integers(0, 256, min(chunk, size - at), dtype=np.uint8).tobytes())
    f.flush()
    os.fsync(f.fileno())
    return f


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--random-requests", type=int, default=32768,
                        help="requests per run of a random shape (sequential: the whole file)")
    parser.add_argument("--o-direct", action="store_true",
                        help="open the file with O_DIRECT on both sides: the disk, not the cache")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="comma-separated, from: " + ", ".join(SHAPES))
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the best counts")
    parser.add_argument("--chains", choices=sorted(BATCHES), default="indirect",
                        help="how the stand-in driver lays out a request: in an indirect "
                             "table, as Linux does (the default), or as 3 ring descriptors")
    parser.add_argument("--dir", default=os.environ.get("TMPDIR", "/var/tmp"),
                        help="where the temporary file goes (a real disk, not tmpfs)")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    size = args.size_mib << 20
    build_c_baseline()
    with make_file(args.dir, size) as f:
        flags = os.O_RDWR | (os.O_DIRECT if args.o_direct else 0)
        fd = os.open(f.name, flags)
        if not args.o_direct:
            plain(fd, False, 64 << 10, offsets_for("seq-read", size, 0), 1)   # warm the cache
        rows = []
        for shape in shapes:
            write, kib, _ = SHAPES[shape]
            request = kib << 10
            offsets = offsets_for(shape, size, args.random_requests)
            best_plain = best_c = best_ring = float("inf")
            for _ in range(args.repeat):          # alternate, so load drift hits every side
                if write:
                    settle(fd)
                t, moved_plain = plain(fd, write, request, offsets, BATCHES[args.chains])
                best_plain = min(best_plain, t)
                if write:
                    settle(fd)
                t, moved_c = c_loop(f.name, write, request, offsets, args.o_direct,
                                    BATCHES[args.chains])
                best_c = min(best_c, t)
                if write:
                    settle(fd)
                t, moved_ring = through_the_ring(f.name, write, request, offsets, args.o_direct,
                                                 args.chains)
                best_ring = min(best_ring, t)
            if write:
                os.fdatasync(fd)
            expected = len(offsets) * request
            assert moved_plain == moved_c == moved_ring == expected, \
                (moved_plain, moved_c, moved_ring, expected)
            if write:                             # what the guest wrote is in the file
                check = mmap.mmap(-1, request)
                os.preadv(fd, [check], int(offsets[-1]))
                assert check[:] == pattern(request).tobytes(), "written data not in the file"
                check.close()
            fio = None
            if args.o_direct:                     # after the check: fio writes data of its own
                for _ in range(args.repeat):      # the best of as many runs as the ring's
                    if write:
                        settle(fd)
                    rate = fio_rate(f.name, shape, request, len(offsets))
                    fio = None if rate is None else max(fio or 0, rate)
            rows.append((shape, len(offsets), expected, best_plain, best_c, best_ring, fio))
        os.close(fd)
        where = f"{args.dir} ({fstype(f.name)})"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    mode = "O_DIRECT (the disk)" if args.o_direct else "page cache (warm)"
    print(f"block device vs plain preadv/pwritev: {args.size_mib} MiB file in {where}, {mode}")
    print(f"load average {load}; {os.cpu_count()} CPUs; host only, no KVM involved")
    print(f"ring: up to {BATCHES[args.chains]} requests per service() call (queue of {NUM}, "
          f"{args.chains} chains); "
          f"only service() timed; best of {args.repeat}")
    if args.o_direct:
        print(f"fio: io_uring, queue depth {FIO_DEPTH}, O_DIRECT, the same shape and count"
              + ("" if shutil.which("fio") else " (n/a: fio is not installed)"))
    print(f"{'':26}{'requests':>9}{'MiB/s':>9}{'MiB/s':>9}{'MiB/s':>9}{'MiB/s':>9}"
          f"{'us/req':>9}{'us/req':>9}{'ring/':>8}{'ring/':>8}{'ring/':>8}")
    print(f"{'':26}{'':>9}{'plain':>9}{'C':>9}{'fio':>9}{'ring':>9}{'C':>9}{'ring':>9}"
          f"{'plain':>8}{'C':>8}{'fio':>8}")
    for shape, n, moved, tp, tc, tr, fio in rows:
        mib = moved / (1 << 20)
        fio_mib = f"{fio / (1 << 20):9.0f}" if fio else f"{'n/a':>9}"
        fio_ratio = f"{(mib / tr) / (fio / (1 << 20)):8.2f}" if fio else f"{'':>8}"
        print(f"{LABELS[shape]:26}{n:9d}{mib / tp:9.0f}{mib / tc:9.0f}{fio_mib}{mib / tr:9.0f}"
              f"{tc / n * 1e6:9.1f}{tr / n * 1e6:9.1f}{tp / tr:8.2f}{tc / tr:8.2f}{fio_ratio}")
    print("ring/X: throughput through the ring over X's (1.00: as fast as X; fio only "
          "with --o-direct)")


if __name__ == "__main__":
    main()
