"""Block backend throughput: 64 KiB sequential reads through the ring,
against plain preadv on the same file.

The guest side is played by virtio.testing.RingBuilder (guest kernel code
is emulated on some of our machines, far too slow to drive a disk), so
this measures exactly the launcher's share of a request: pop and validate
the chain, parse the request, preadv into guest memory, push, decide on an
interrupt (the time the stand-in driver spends filling the ring is not
counted).  The file is read once first so both runs come from the page
cache: the figures compare per-request overhead, not the disk.

    python bench/block_throughput.py [--size-mib 256] [--request-kib 64]
"""

import argparse
import os
import tempfile
import time

import numpy as np

from pylguest.devices.block import BlockDevice, HEADER, VIRTIO_BLK_T_IN
from pylguest.memory import GuestMemory, Region
from pylguest.virtio.device import DeviceContext
from pylguest.virtio.testing import RingBuilder

QUEUE_PFN = 0x10                  # ring at 64 KiB; buffers above it
NUM = 128


def plain_preadv(fd, size, request):
    buffer = np.zeros(request, dtype=np.uint8)
    start = time.perf_counter()
    for offset in range(0, size, request):
        os.preadv(fd, [buffer], offset)
    return time.perf_counter() - start


def through_the_ring(path, size, request):
    memory = GuestMemory([Region(0, 64 << 20, 0)])
    device = BlockDevice("block0", path)
    interrupts = []
    device.attach(DeviceContext(memory=memory, interrupt=lambda: interrupts.append(1),
                                report=print))
    ring = RingBuilder(memory, NUM, QUEUE_PFN)
    device.activate(0, [(NUM, QUEUE_PFN)])
    # One request's buffers per ring slot, reused as the ring goes round,
    # as a driver with a fixed pool would.
    slots = []
    for _ in range(NUM // 4):
        header = ring.alloc(HEADER.size)
        data = ring.alloc(request)
        status = ring.alloc(1)
        slots.append((header, data, status))
    batch = len(slots)
    elapsed = 0.0                 # only the device's work: service()
    sector, requests = 0, size // request
    done = 0
    while done < requests:
        n = min(batch, requests - done)
        ring.next_free = 0
        for header, data, status in slots[:n]:
            memory.write(header, HEADER.pack(VIRTIO_BLK_T_IN, 0, sector))
            ring.add_chain([(header, HEADER.size, False), (data, request, True),
                            (status, 1, True)])
            sector += request // 512
        start = time.perf_counter()
        device.service(0)
        elapsed += time.perf_counter() - start
        done += n
    assert ring.used_idx == requests & 0xFFFF and not device.broken
    device.close()
    memory.close()
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--request-kib", type=int, default=64)
    args = parser.parse_args()
    size, request = args.size_mib << 20, args.request_kib << 10
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR", "/var/tmp")) as f:
        f.write(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)
        plain_preadv(fd, size, request)                       # warm the page cache
        plain = min(plain_preadv(fd, size, request) for _ in range(3))
        ring = min(through_the_ring(f.name, size, request) for _ in range(3))
        os.close(fd)
    mib = size / (1 << 20)
    n = size // request
    print(f"{mib:.0f} MiB in {request >> 10} KiB sequential reads ({n} requests), best of 3")
    print(f"{'':24}{'MiB/s':>10}{'us/request':>12}")
    print(f"{'plain preadv':24}{mib / plain:10.0f}{plain / n * 1e6:12.1f}")
    print(f"{'block device via ring':24}{mib / ring:10.0f}{ring / n * 1e6:12.1f}")
    print(f"ring / preadv throughput: {plain / ring:.2f}")


if __name__ == "__main__":
    main()
